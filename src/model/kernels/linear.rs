//! The nested linear layers: partial in-projections (the first d_g input features of each row
//! group, full output) and partial out-projections accumulated into the residual in place.
//! They run on the gemm crate, but for the out-projections of small wide groups on AVX-512,
//! which run on `gemm512`.

use candle_core::{bail, CpuStorage, CustomOp3, InplaceOp3, Layout, Result, Shape};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::gemm512;
use super::simd::{act_row, level, SimdLevel};
use super::{f32_slice, overwritten_f32, strides2, RowGroup, SyncPtr};
use crate::model::config::Activation;

/// fc1's activation fused into its in-projection: y = act(x W^T + b) * s_r.
#[derive(Clone, Copy, Debug)]
pub struct FusedAct<'a> {
    pub act: Activation,
    pub row_scale: Option<&'a [f32]>,
}

/// Whether the out-projection of `g` runs on `gemm512` here.
fn use_gemm512(g: &RowGroup) -> bool {
    cfg!(all(target_arch = "x86_64", feature = "avx512"))
        && g.rows < gemm512::MAX_ROWS
        && g.width >= gemm512::MIN_WIDTH
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
        let prefill = self.add_bias && self.act.is_none();
        if prefill {
            dst.par_chunks_mut(out)
                .for_each(|row| row.copy_from_slice(b));
        }
        // Each thread takes a contiguous block of output columns and runs every group on it
        // single-threaded: one join per op instead of one parallel region per group, and each
        // thread's weight panel stays in its cache across the groups.
        let chunk = out.div_ceil(threads).div_ceil(16) * 16;
        (0..threads).into_par_iter().for_each(|t| {
            let c0 = t * chunk;
            if c0 >= out {
                return;
            }
            let cn = chunk.min(out - c0);
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
                        prefill,
                        x.as_ptr().add(g.row0 * x_rs),
                        x_cs as isize,
                        x_rs as isize,
                        w.as_ptr().add(c0 * w_rs),
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
            if let Some(a) = self.act {
                for i in 0..r {
                    let s = a.row_scale.map_or(1.0, |s| s[i]);
                    // SAFETY: this thread's column block of row i, written above.
                    let row =
                        unsafe { std::slice::from_raw_parts_mut(dst_ref.0.add(i * out + c0), cn) };
                    act_row(row, &b[c0..c0 + cn], a.act, s);
                }
            }
        });
        Ok((CpuStorage::F32(dst), Shape::from((r, out))))
    }
}

/// In place: x[rows_g, :d_g] += s_r * (a[rows_g] @ W[:d_g]^T + b[:d_g]) with x (R, D),
/// a (R, in), W (D, in). When `row_scale` is set, `a` must already be scaled by s_r (the
/// caller folds the scale into the activation); only the bias is scaled here.
pub struct NestedOutAccum<'a> {
    pub groups: &'a [RowGroup],
    pub bias: &'a [f32],
    pub row_scale: Option<&'a [f32]>,
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
        let small: Vec<bool> = self
            .groups
            .iter()
            .map(|g| a_cs == 1 && w_cs == 1 && use_gemm512(g))
            .collect();
        let nmax = self
            .groups
            .iter()
            .zip(&small)
            .filter(|(_, s)| **s)
            .map(|(g, _)| g.width)
            .max();
        let packed = nmax.map(|n| gemm512::Packed::new(w, w_rs, n, k));
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
        drop(packed);
        Ok(())
    }
}
