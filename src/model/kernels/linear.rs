//! The nested linear layers: partial in-projections (the first d_g input features of each row
//! group, full output) and partial out-projections accumulated into the residual in place.
//! They run on the gemm crate, but for the wide out-projections on AVX-512 (fc2's, and the
//! attention's of small groups), which run on `gemm512`.

use candle_core::{bail, CpuStorage, CustomOp3, InplaceOp3, Layout, Result, Shape};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::gemm512;
use super::simd::{act_row, bias_row, level, SimdLevel};
use super::{f32_slice, overwritten_f32, strides2, RowGroup, SyncPtr};
use crate::model::config::Activation;

/// fc1's activation fused into its in-projection: y = act(x W^T + b) * s_r.
#[derive(Clone, Copy, Debug)]
pub struct FusedAct<'a> {
    pub act: Activation,
    pub row_scale: Option<&'a [f32]>,
}

/// Whether the out-projection of `g` runs on `gemm512` here: every group when W comes
/// packed (it won or tied on every fc2 group then), else the shapes where it wins even with
/// packing W per call (see `gemm512`).
fn use_gemm512(g: &RowGroup, k: usize, prepacked: bool) -> bool {
    cfg!(all(target_arch = "x86_64", feature = "avx512"))
        && (prepacked
            || g.width >= gemm512::MIN_WIDTH
                && (g.rows < gemm512::MAX_ROWS || k >= gemm512::LONG_K))
        && level() == SimdLevel::Avx512
}

/// Checks that the groups tile [0, rows) and fit `width`.
pub(crate) fn check_groups(
    name: &str,
    groups: &[RowGroup],
    rows: usize,
    width: usize,
) -> Result<()> {
    let mut next = 0;
    for g in groups {
        if g.row0 != next || g.width > width || g.width == 0 && g.rows > 0 {
            bail!("{name}: group {g:?} does not continue the rows at {next} within width {width}");
        }
        next += g.rows;
    }
    if next != rows {
        bail!("{name}: the groups cover {next} of {rows} rows");
    }
    Ok(())
}

/// y = x[:, :d_g] @ W[:, :d_g]^T (+ b) per row group; x (R, D), W (out, D), b (out) -> (R, out).
/// The groups must cover every row in order. With `act` set, b is added whatever `add_bias`
/// and y = act(...) * s_r.
pub struct NestedInProj<'a> {
    pub groups: &'a [RowGroup],
    pub add_bias: bool,
    pub act: Option<FusedAct<'a>>,
}

impl CustomOp3 for NestedInProj<'_> {
    fn name(&self) -> &'static str {
        "nested-in-proj"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let w = f32_slice(s2, l2, self.name())?;
        let b = f32_slice(s3, l3, self.name())?;
        let (r, d, x_rs, x_cs) = strides2(l1, self.name())?;
        let (out, d2, w_rs, w_cs) = strides2(l2, self.name())?;
        if d != d2 || !l3.is_contiguous() || l3.dims() != [out] {
            bail!(
                "nested-in-proj: shape mismatch x {:?} w {:?} b {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        check_groups(self.name(), self.groups, r, d)?;
        if let Some(s) = self.act.and_then(|a| a.row_scale) {
            if s.len() != r {
                bail!("nested-in-proj: {} row scales for {r} rows", s.len());
            }
        }
        let b = &b[..out];
        let threads = rayon::current_num_threads().max(1);
        // Every row is written by its group's GEMM (the groups tile the rows).
        let mut dst = overwritten_f32(r * out);
        let dst_ptr = SyncPtr(dst.as_mut_ptr());
        let dst_ref = &dst_ptr;
        // Each thread takes a contiguous block of output columns and runs every group on it
        // single-threaded: one join per op instead of one parallel region per group, and each
        // thread's weight panel stays in its cache across the groups. The bias (and fc1's
        // activation) goes onto each group's block right after its GEMM, while the block is
        // still in cache, rather than as a prefill the GEMM reads back.
        let chunk = out.div_ceil(threads).div_ceil(16) * 16;
        (0..threads).into_par_iter().for_each(|t| {
            let c0 = t * chunk;
            if c0 >= out {
                return;
            }
            let cn = chunk.min(out - c0);
            let bias = &b[c0..c0 + cn];
            for g in self.groups.iter().filter(|g| g.rows > 0) {
                // SAFETY: extents checked above; threads write disjoint column blocks.
                unsafe {
                    gemm(
                        g.rows,
                        cn,
                        g.width,
                        dst_ref.0.add(g.row0 * out + c0),
                        1,
                        out as isize,
                        false,
                        x.as_ptr().add(g.row0 * x_rs),
                        x_cs as isize,
                        x_rs as isize,
                        w.as_ptr().add(c0 * w_rs),
                        w_rs as isize,
                        w_cs as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    )
                }
                if !self.add_bias && self.act.is_none() {
                    continue;
                }
                for i in g.row0..g.row0 + g.rows {
                    // SAFETY: this thread's column block of row i, written just above.
                    let row =
                        unsafe { std::slice::from_raw_parts_mut(dst_ref.0.add(i * out + c0), cn) };
                    match self.act {
                        Some(a) => act_row(row, bias, a.act, a.row_scale.map_or(1.0, |s| s[i])),
                        None => bias_row(row, bias),
                    }
                }
            }
        });
        Ok((CpuStorage::F32(dst), Shape::from((r, out))))
    }
}

/// In place: x[rows_g, :d_g] += s_r * (a[rows_g] @ W[:d_g]^T + b[:d_g]) with x (R, D),
/// a (R, in), W (D, in). When `row_scale` is set, `a` must already be scaled by s_r (the
/// caller folds the scale into the activation); only the bias is scaled here. `packed`, W's
/// `gemm512` packing made once at load, saves packing it per call.
pub struct NestedOutAccum<'a> {
    pub groups: &'a [RowGroup],
    pub bias: &'a [f32],
    pub row_scale: Option<&'a [f32]>,
    pub packed: Option<&'a gemm512::Packed>,
}

/// W's `gemm512` packing for `NestedOutAccum`, where this CPU and build run it: a contiguous
/// f32 (out, in) weight on the CPU with at least `MIN_WIDTH` outputs. The packing is a copy:
/// the weight must not change while it is in use.
pub fn prepack_out(w: &candle_core::Tensor) -> Result<Option<gemm512::Packed>> {
    let (n, k) = w.dims2()?;
    if !cfg!(all(target_arch = "x86_64", feature = "avx512"))
        || super::simd::supported() < SimdLevel::Avx512
        || !w.device().is_cpu()
        || w.dtype() != candle_core::DType::F32
        || !w.is_contiguous()
        || n < gemm512::MIN_WIDTH
    {
        return Ok(None);
    }
    let v = w.flatten_all()?.to_vec1::<f32>()?;
    Ok(Some(gemm512::Packed::new(&v, k, n, k)))
}

impl InplaceOp3 for NestedOutAccum<'_> {
    fn name(&self) -> &'static str {
        "nested-out-accum"
    }
    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        sa: &CpuStorage,
        la: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> Result<()> {
        let a = f32_slice(sa, la, self.name())?;
        let w = f32_slice(sw, lw, self.name())?;
        let (r, k, a_rs, a_cs) = strides2(la, self.name())?;
        let (d, k2, w_rs, w_cs) = strides2(lw, self.name())?;
        if !dst_l.is_contiguous() || dst_l.dims() != [r, d] || k != k2 || self.bias.len() != d {
            bail!(
                "nested-out-accum: shape mismatch dst {:?} a {:?} w {:?}",
                dst_l.dims(),
                la.dims(),
                lw.dims()
            );
        }
        if let Some(s) = self.row_scale {
            if s.len() != r {
                bail!("nested-out-accum: {} row scales for {r} rows", s.len());
            }
        }
        let x = match dst {
            CpuStorage::F32(v) => &mut v[dst_l.start_offset()..],
            _ => bail!("nested-out-accum: f32 only"),
        };
        for g in self.groups {
            if g.row0 + g.rows > r || g.width > d {
                bail!("nested-out-accum: group {g:?} outside ({r}, {d})");
            }
        }
        let pre = self.packed.filter(|p| p.covers(d, k));
        let small: Vec<bool> = self
            .groups
            .iter()
            .map(|g| a_cs == 1 && (w_cs == 1 || pre.is_some()) && use_gemm512(g, k, pre.is_some()))
            .collect();
        let nmax = self
            .groups
            .iter()
            .zip(&small)
            .filter(|(_, s)| **s)
            .map(|(g, _)| g.width)
            .max();
        let own = match (nmax, pre) {
            (Some(n), None) => Some(gemm512::Packed::new(w, w_rs, n, k)),
            _ => None,
        };
        let packed = own.as_ref().or(pre);
        // Each thread takes a contiguous share of every group's rows and runs its GEMMs
        // single-threaded: one join per op, no per-group barrier.
        let threads = rayon::current_num_threads().max(1);
        let x_ptr = SyncPtr(x.as_mut_ptr());
        let x_ref = &x_ptr;
        (0..threads).into_par_iter().for_each(|t| {
            for (g, small) in self.groups.iter().zip(&small) {
                let per = g.rows.div_ceil(threads);
                let r0 = g.row0 + t * per;
                let rn = per.min((g.row0 + g.rows).saturating_sub(r0));
                if rn == 0 {
                    continue;
                }
                #[cfg(not(all(target_arch = "x86_64", feature = "avx512")))]
                let _ = small;
                // SAFETY: extents checked above; threads touch disjoint rows.
                unsafe {
                    let rows = std::slice::from_raw_parts_mut(x_ref.0.add(r0 * d), rn * d);
                    for (i, row) in rows.chunks_mut(d).enumerate() {
                        let s = self.row_scale.map_or(1.0, |s| s[r0 + i]);
                        for (y, b) in row[..g.width].iter_mut().zip(&self.bias[..g.width]) {
                            *y += s * b;
                        }
                    }
                    #[cfg(all(target_arch = "x86_64", feature = "avx512"))]
                    if let (true, Some(p)) = (small, &packed) {
                        // A packing of the widest group's rows serves every group: a
                        // narrower one uses the first panels (masked to its width).
                        let sub = gemm512::Gemm {
                            a: a.as_ptr(),
                            lda: a_rs,
                            c: x_ref.0,
                            ldc: d,
                            n: g.width,
                            k,
                            w: p,
                        };
                        sub.run(r0, r0 + rn, 0, g.width.div_ceil(gemm512::NR));
                        continue;
                    }
                    gemm(
                        rn,
                        g.width,
                        k,
                        x_ref.0.add(r0 * d),
                        1,
                        d as isize,
                        true,
                        a.as_ptr().add(r0 * a_rs),
                        a_cs as isize,
                        a_rs as isize,
                        w.as_ptr(),
                        w_rs as isize,
                        w_cs as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    )
                }
            }
        });
        #[cfg(not(all(target_arch = "x86_64", feature = "avx512")))]
        let _ = packed;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// The out-projection with W packed at load, packed per call, and with a packing of the
    /// wrong shape (which must be ignored, not read), against an f64 reference: widths on both
    /// sides of `MIN_WIDTH`, a K past `LONG_K`, a row scale, the columns past each width kept.
    #[test]
    fn out_accum_with_a_prepacked_weight_equals_the_reference() -> Result<()> {
        let dev = Device::Cpu;
        let (d, k) = (448, 2080);
        let groups = [(0, 40, 448), (40, 9, 416), (49, 5, 96)]
            .map(|(row0, rows, width)| RowGroup { row0, rows, width });
        let r = 54;
        let a = Tensor::randn(0f32, 1.0, (r, k), &dev)?;
        let w = Tensor::randn(0f32, 0.05, (d, k), &dev)?;
        let x0 = Tensor::randn(0f32, 1.0, (r, d), &dev)?;
        let bias: Vec<f32> = (0..d).map(|i| (i as f32 * 0.37).sin()).collect();
        let scale: Vec<f32> = (0..r).map(|i| 1.0 + (i % 7) as f32 * 0.1).collect();
        let (av, wv, xv) = (
            a.to_vec2::<f32>()?,
            w.to_vec2::<f32>()?,
            x0.to_vec2::<f32>()?,
        );
        let mut want = xv.clone();
        for g in &groups {
            for i in g.row0..g.row0 + g.rows {
                for j in 0..g.width {
                    let dot: f64 = (0..k).map(|c| av[i][c] as f64 * wv[j][c] as f64).sum();
                    want[i][j] = (xv[i][j] as f64 + dot + scale[i] as f64 * bias[j] as f64) as f32;
                }
            }
        }
        let prepacked = prepack_out(&w)?;
        if cfg!(all(target_arch = "x86_64", feature = "avx512"))
            && super::super::simd::supported() >= SimdLevel::Avx512
        {
            assert!(
                prepacked.is_some(),
                "no packing on an AVX-512 build and CPU"
            );
        } else {
            eprintln!("prepacked weights: skipped, this CPU (or build) has no AVX-512");
        }
        let wrong = prepack_out(&Tensor::randn(0f32, 1.0, (d, k - 32), &dev)?)?;
        for (name, packed) in [
            ("prepacked", prepacked.as_ref()),
            ("packed per call", None),
            ("wrong packing", wrong.as_ref()),
        ] {
            let x = x0.copy()?;
            x.inplace_op3(
                &a,
                &w,
                &NestedOutAccum {
                    groups: &groups,
                    bias: &bias,
                    row_scale: Some(&scale),
                    packed,
                },
            )?;
            for (i, (got, want)) in x.to_vec2::<f32>()?.iter().zip(&want).enumerate() {
                for (j, (g, w)) in got.iter().zip(want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                        "{name}: ({i}, {j}) {g} vs {w}"
                    );
                }
            }
        }
        Ok(())
    }
}
