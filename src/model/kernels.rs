//! Fused CPU kernels for the f32 inference path.
//!
//! candle's own CPU path spends much of a ViT forward outside matmul: single-threaded scalar
//! GELU, bias broadcasts, permute copies around attention, zero-padding and residual adds. These
//! kernels remove those passes: nested in-projections write bias + slice-GEMM into one buffer,
//! attention reads Q/K/V straight out of the QKV buffer with strided GEMMs, and nested
//! out-projections accumulate into the first d_j channels of the residual stream in place.
//! The generic (any device, differentiable) path in `nested.rs` computes the same thing.

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, InplaceOp1, InplaceOp3, Layout, Result,
    Shape, Tensor,
};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::config::Activation;

/// Rows [row0, row0 + rows) use the first `width` input (or output) features.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowGroup {
    pub row0: usize,
    pub rows: usize,
    pub width: usize,
}

/// A buffer the caller overwrites completely before anything reads it; skipping the zeroing
/// saves a full pass over tens of megabytes per layer.
#[allow(clippy::uninit_vec)]
fn overwritten_f32(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: f32 has no invalid bit patterns and every caller writes all n elements (each
    // row group's GEMM with read_dst = false, or the bias fill) before reading any.
    unsafe { v.set_len(n) };
    v
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, name: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(&v[l.start_offset()..]),
        _ => bail!("{name}: the fused CPU kernels are f32 only"),
    }
}

fn strides2(l: &Layout, name: &str) -> Result<(usize, usize, usize, usize)> {
    match (l.dims(), l.stride()) {
        ([r, c], [rs, cs]) => Ok((*r, *c, *rs, *cs)),
        _ => bail!("{name}: expected a 2-d tensor, got {:?}", l.dims()),
    }
}

/// y = x[:, :d_g] @ W[:, :d_g]^T (+ b) per row group; x (R, D), W (out, D), b (out) -> (R, out).
/// The groups must cover every row. With `add_bias` false the caller adds b in a later pass
/// it makes anyway (the activation).
pub struct NestedInProj<'a> {
    pub groups: &'a [RowGroup],
    pub add_bias: bool,
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
        let mut dst = vec![0f32; r * out];
        dst.par_chunks_mut(out)
            .for_each(|row| row.copy_from_slice(&b[..out]));
        for g in self.groups {
            if g.row0 + g.rows > r || g.width > d {
                bail!("nested-in-proj: group {g:?} outside ({r}, {d})");
            }
        }
        // Each thread takes a contiguous block of output columns and runs every group on it
        // single-threaded: one join per op instead of one parallel region per group, and each
        // thread's weight panel stays in its cache across the groups.
        let threads = rayon::current_num_threads().max(1);
        let chunk = out.div_ceil(threads).div_ceil(16) * 16;
        let dst_ptr = SyncPtr(dst.as_mut_ptr());
        let dst_ref = &dst_ptr;
        let add_bias = self.add_bias;
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
                        add_bias,
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
        });
        Ok((CpuStorage::F32(dst), Shape::from((r, out))))
    }
}

/// In place: x[rows_g, :d_g] += s_r * (a[rows_g] @ W[:d_g]^T + b[:d_g]) with x (R, D),
/// a (R, in), W (D, in). When `row_scale` is set, `a` must already be scaled by s_r (the
/// caller folds the scale into the GELU pass); only the bias is scaled here.
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
        // Each thread takes a contiguous share of every group's rows and runs its GEMMs
        // single-threaded: one join per op, no per-group barrier.
        let threads = rayon::current_num_threads().max(1);
        let x_ptr = SyncPtr(x.as_mut_ptr());
        let x_ref = &x_ptr;
        (0..threads).into_par_iter().for_each(|t| {
            for g in self.groups.iter().filter(|g| g.rows > 0) {
                let per = g.rows.div_ceil(threads);
                let r0 = g.row0 + t * per;
                let rn = per.min((g.row0 + g.rows).saturating_sub(r0));
                if rn == 0 {
                    continue;
                }
                // SAFETY: extents checked above; threads touch disjoint rows.
                unsafe {
                    let rows = std::slice::from_raw_parts_mut(x_ref.0.add(r0 * d), rn * d);
                    for (i, row) in rows.chunks_mut(d).enumerate() {
                        let s = self.row_scale.map_or(1.0, |s| s[r0 + i]);
                        for (y, b) in row[..g.width].iter_mut().zip(&self.bias[..g.width]) {
                            *y += s * b;
                        }
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
        Ok(())
    }
}

/// In place on (R, M): h = act(h + b) * s_r.
pub struct ActScale<'a> {
    pub act: Activation,
    pub bias: Option<&'a [f32]>,
    pub row_scale: Option<&'a [f32]>,
}

impl InplaceOp1 for ActScale<'_> {
    fn name(&self) -> &'static str {
        "act-scale"
    }
    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let (r, m, _, _) = strides2(layout, self.name())?;
        if !layout.is_contiguous() {
            bail!("act-scale: needs a contiguous tensor");
        }
        let h = match storage {
            CpuStorage::F32(v) => &mut v[layout.start_offset()..layout.start_offset() + r * m],
            _ => bail!("act-scale: f32 only"),
        };
        if let Some(s) = self.row_scale {
            if s.len() != r {
                bail!("act-scale: {} row scales for {r} rows", s.len());
            }
        }
        if self.bias.is_some_and(|b| b.len() != m) {
            bail!("act-scale: bias length does not match {m} columns");
        }
        let (act, zeros) = (self.act, vec![0f32; m]);
        let bias = self.bias.unwrap_or(&zeros);
        h.par_chunks_mut(m).enumerate().for_each(|(i, row)| {
            act_row(row, bias, act, self.row_scale.map_or(1.0, |s| s[i]));
        });
        Ok(())
    }
}

/// Multi-head self-attention over S sequences of N tokens stored in one (N * S, 3D) buffer
/// of [q | k | v] rows (heads contiguous inside each). Token p of sequence s is row
/// p * S + s when `token_major`, else s * N + p. Returns (N * S, D) in the same row order.
/// Every (sequence, head) pair is one task.
pub struct FusedAttention {
    pub n: usize,
    pub s: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub token_major: bool,
}

struct SyncPtr(*mut f32);
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}

impl CustomOp1 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }
    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, s, h, hd) = (self.n, self.s, self.heads, self.head_dim);
        let d = h * hd;
        if !layout.is_contiguous() || layout.dims() != [n * s, 3 * d] {
            bail!(
                "fused-attention: expected contiguous ({}, {}), got {:?}",
                n * s,
                3 * d,
                layout.dims()
            );
        }
        let qkv = f32_slice(storage, layout, self.name())?;
        // Every (sequence, head) task writes its whole (N, hd) block.
        let mut out = overwritten_f32(n * s * d);
        let out_ptr = SyncPtr(out.as_mut_ptr());
        // Row steps between consecutive tokens of a sequence, and between sequences.
        let (tok, seq) = if self.token_major { (s, 1) } else { (1, n) };
        let row = (tok * 3 * d) as isize;
        let scale = 1.0 / (hd as f32).sqrt();
        let out_ref = &out_ptr;
        (0..s * h).into_par_iter().for_each_init(
            || vec![0f32; n * n],
            |scores, task| {
                let (si, hi) = (task / h, task % h);
                let base = si * seq * 3 * d + hi * hd;
                // SAFETY: q/k/v reads stay inside qkv; each task writes a disjoint
                // (sequence, head) block of `out`.
                unsafe {
                    let q = qkv.as_ptr().add(base);
                    let k = qkv.as_ptr().add(base + d);
                    let v = qkv.as_ptr().add(base + 2 * d);
                    gemm(
                        n,
                        n,
                        hd,
                        scores.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        q,
                        1,
                        row,
                        k,
                        row,
                        1,
                        0.0,
                        scale,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                    for r in scores.chunks_mut(n) {
                        softmax_in_place(r);
                    }
                    let o = out_ref.0.add(si * seq * d + hi * hd);
                    gemm(
                        n,
                        hd,
                        n,
                        o,
                        1,
                        (tok * d) as isize,
                        false,
                        scores.as_ptr(),
                        1,
                        n as isize,
                        v,
                        1,
                        row,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((n * s, d))))
    }
}

/// Runs `$body` compiled for AVX2+FMA when the CPU has them (checked once), else for the
/// baseline target. The bodies are plain loops the compiler vectorises either way.
macro_rules! dispatch_simd {
    ($name:ident, $body:ident, ($($arg:ident : $ty:ty),*)) => {
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide($($arg: $ty),*) {
                    $body($($arg),*)
                }
                static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
                if *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
                    // SAFETY: the features were detected at run time.
                    return unsafe { wide($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

dispatch_simd!(softmax_in_place, softmax_body, (r: &mut [f32]));
dispatch_simd!(layer_norm_row, layer_norm_row_body, (x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]));

#[inline(always)]
fn sum8(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for k in 0..8 {
            acc[k] += c[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn layer_norm_row_body(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
    let n = x.len() as f32;
    let mean = sum8(x) / n;
    // Two passes (centre, then square) keep the variance accurate for large means.
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi = xi - mean;
    }
    let mut acc = [0f32; 8];
    let chunks = y.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for c in chunks {
        for k in 0..8 {
            acc[k] += c[k] * c[k];
        }
    }
    let inv = 1.0 / ((acc.iter().sum::<f32>() + tail) / n + eps).sqrt();
    for ((yi, wi), bi) in y.iter_mut().zip(w).zip(b) {
        *yi = *yi * inv * wi + bi;
    }
}

/// LayerNorm over the last dimension of a contiguous (R, D) tensor.
pub struct FusedLayerNorm {
    pub eps: f32,
}

impl CustomOp3 for FusedLayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
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
        let d = *l1.dims().last().unwrap_or(&0);
        if !l1.is_contiguous()
            || !l2.is_contiguous()
            || !l3.is_contiguous()
            || l2.dims() != [d]
            || l3.dims() != [d]
            || d == 0
        {
            bail!("fused-layer-norm: needs contiguous (.., {d}) input and ({d}) weight and bias");
        }
        let n = l1.shape().elem_count();
        let x = &f32_slice(s1, l1, self.name())?[..n];
        let w = &f32_slice(s2, l2, self.name())?[..d];
        let b = &f32_slice(s3, l3, self.name())?[..d];
        let mut y = overwritten_f32(n);
        let eps = self.eps;
        y.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(yr, xr)| layer_norm_row(xr, w, b, eps, yr));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    /// candle's composed layer norm spends most of its backward in strided column sums; this
    /// computes dx row by row and dw, db in one pass over the rows.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, g) = (x.contiguous()?, grad.contiguous()?);
        let dx = x.apply_op3_no_bwd(w, &g, &LayerNormGradX { eps: self.eps })?;
        let dwb = x.apply_op2_no_bwd(&g, &LayerNormGradWB { eps: self.eps })?;
        Ok((Some(dx), Some(dwb.get(0)?), Some(dwb.get(1)?)))
    }
}

/// Mean and 1/sigma of one row, as in the forward.
#[inline(always)]
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = sum8(x) / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// dx = (g w - mean(g w) - xhat mean(g w xhat)) / sigma, per row.
struct LayerNormGradX {
    eps: f32,
}

impl CustomOp3 for LayerNormGradX {
    fn name(&self) -> &'static str {
        "layer-norm-grad-x"
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
        let x = contiguous_f32(s1, l1, self.name())?;
        let w = contiguous_f32(s2, l2, self.name())?;
        let g = contiguous_f32(s3, l3, self.name())?;
        let d = w.len();
        if d == 0 || x.len() != g.len() || x.len() % d != 0 {
            bail!("layer-norm-grad-x: shapes do not match");
        }
        let mut dx = overwritten_f32(x.len());
        let eps = self.eps;
        dx.par_chunks_mut(d)
            .zip(x.par_chunks(d).zip(g.par_chunks(d)))
            .for_each(|(o, (x, g))| {
                let (mean, inv) = row_stats(x, eps);
                let (mut a, mut c) = (0f32, 0f32);
                for k in 0..d {
                    let gw = g[k] * w[k];
                    a += gw;
                    c += gw * (x[k] - mean) * inv;
                }
                let (a, c) = (a / d as f32, c / d as f32);
                for k in 0..d {
                    let xh = (x[k] - mean) * inv;
                    o[k] = (g[k] * w[k] - a - xh * c) * inv;
                }
            });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// (2, D): sum over rows of g * xhat, then of g.
struct LayerNormGradWB {
    eps: f32,
}

impl CustomOp2 for LayerNormGradWB {
    fn name(&self) -> &'static str {
        "layer-norm-grad-wb"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let g = contiguous_f32(s2, l2, self.name())?;
        let d = *l1.dims().last().unwrap_or(&0);
        if d == 0 || x.len() != g.len() {
            bail!("layer-norm-grad-wb: shapes do not match");
        }
        let eps = self.eps;
        let rows_per = (x.len() / d)
            .div_ceil(rayon::current_num_threads().max(1))
            .max(1);
        let partial: Vec<Vec<f32>> = x
            .par_chunks(rows_per * d)
            .zip(g.par_chunks(rows_per * d))
            .map(|(x, g)| {
                let mut acc = vec![0f32; 2 * d];
                for (x, g) in x.chunks(d).zip(g.chunks(d)) {
                    let (mean, inv) = row_stats(x, eps);
                    let (dw, db) = acc.split_at_mut(d);
                    for k in 0..d {
                        dw[k] += g[k] * (x[k] - mean) * inv;
                        db[k] += g[k];
                    }
                }
                acc
            })
            .collect();
        let mut out = vec![0f32; 2 * d];
        for p in partial {
            out.iter_mut().zip(p).for_each(|(o, v)| *o += v);
        }
        Ok((CpuStorage::F32(out), Shape::from((2, d))))
    }
}

/// x + b for a contiguous (R, D) x and (D) b, whose backward sums b's gradient over rows in one
/// pass (candle's broadcast backward reduces over the strided leading dimension, slowly).
pub struct BiasAdd;

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "bias-add"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let b = contiguous_f32(s2, l2, self.name())?;
        let d = b.len();
        if d == 0 || l1.dims().last() != Some(&d) {
            bail!("bias-add: bias of {d} for input {:?}", l1.dims());
        }
        let mut y = overwritten_f32(x.len());
        y.par_chunks_mut(d * 64)
            .zip(x.par_chunks(d * 64))
            .for_each(|(y, x)| {
                for (y, x) in y.chunks_mut(d).zip(x.chunks(d)) {
                    for k in 0..d {
                        y[k] = x[k] + b[k];
                    }
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let db = g.apply_op1_no_bwd(&ColumnSum(b.dim(0)?))?;
        Ok((Some(g), Some(db)))
    }
}

struct ColumnSum(usize);

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "column-sum"
    }
    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = contiguous_f32(storage, layout, self.name())?;
        let d = self.0;
        let mut out = vec![0f32; d];
        for r in g.chunks(d) {
            out.iter_mut().zip(r).for_each(|(o, v)| *o += v);
        }
        Ok((CpuStorage::F32(out), Shape::from(d)))
    }
}
dispatch_simd!(act_row, act_row_body, (row: &mut [f32], bias: &[f32], act: Activation, scale: f32));

/// GELU for training on CPU f32: candle's own op computes its backward from eight separate
/// tensor ops (powf, tanh, ...), which took a third of a training step; this one computes the
/// value and, on backward, the derivative in one vectorised pass each.
pub struct Gelu(pub Activation);

const ELEMWISE_CHUNK: usize = 1 << 14;

/// The elements of a contiguous f32 layout (which may start at an offset: a narrowed view).
fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, name: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        (CpuStorage::F32(_), None) => bail!("{name}: input must be contiguous"),
        _ => bail!("{name}: the fused CPU kernels are f32 only"),
    }
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-fast"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, "gelu-fast")?;
        let mut y = overwritten_f32(x.len());
        let act = self.0;
        y.par_chunks_mut(ELEMWISE_CHUNK)
            .zip(x.par_chunks(ELEMWISE_CHUNK))
            .for_each(|(y, x)| gelu_rows(x, y, act));
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.contiguous()?.apply_op2_no_bwd(
            &grad_res.contiguous()?,
            &GeluGrad(self.0),
        )?))
    }
}

/// grad * GELU'(x).
struct GeluGrad(Activation);

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "gelu-fast-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "gelu-fast-grad")?;
        let g = contiguous_f32(s2, l2, "gelu-fast-grad")?;
        if x.len() != g.len() {
            bail!("gelu-fast-grad: {} values, {} gradients", x.len(), g.len());
        }
        let mut y = overwritten_f32(x.len());
        let act = self.0;
        y.par_chunks_mut(ELEMWISE_CHUNK)
            .zip(
                x.par_chunks(ELEMWISE_CHUNK)
                    .zip(g.par_chunks(ELEMWISE_CHUNK)),
            )
            .for_each(|(y, (x, g))| gelu_grad_rows(x, g, y, act));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
}

dispatch_simd!(gelu_rows, gelu_rows_body, (x: &[f32], y: &mut [f32], act: Activation));
dispatch_simd!(gelu_grad_rows, gelu_grad_rows_body, (x: &[f32], g: &[f32], y: &mut [f32], act: Activation));

#[inline(always)]
fn gelu_rows_body(x: &[f32], y: &mut [f32], act: Activation) {
    let it = y.iter_mut().zip(x);
    match act {
        Activation::GeluTanh => it.for_each(|(y, x)| *y = gelu_tanh(*x)),
        Activation::GeluErf => it.for_each(|(y, x)| *y = gelu_erf(*x)),
    }
}

#[inline(always)]
fn gelu_grad_rows_body(x: &[f32], g: &[f32], y: &mut [f32], act: Activation) {
    let it = y.iter_mut().zip(x.iter().zip(g));
    match act {
        Activation::GeluTanh => it.for_each(|(y, (x, g))| *y = g * gelu_tanh_grad(*x)),
        Activation::GeluErf => it.for_each(|(y, (x, g))| *y = g * gelu_erf_grad(*x)),
    }
}

#[inline(always)]
pub fn gelu_tanh_grad(x: f32) -> f32 {
    const C: f32 = 0.797_884_6;
    let t = tanh_approx(C * (x + 0.044_715 * x * x * x));
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * C * (1.0 + 3.0 * 0.044_715 * x * x)
}

#[inline(always)]
pub fn gelu_erf_grad(x: f32) -> f32 {
    // Phi(x) + x * phi(x).
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    0.5 * (1.0 + erf_approx(x * std::f32::consts::FRAC_1_SQRT_2))
        + x * INV_SQRT_2PI * exp_approx(-0.5 * x * x)
}

#[inline(always)]
fn act_row_body(row: &mut [f32], bias: &[f32], act: Activation, scale: f32) {
    let it = row.iter_mut().zip(bias);
    match act {
        Activation::GeluTanh => it.for_each(|(v, b)| *v = gelu_tanh(*v + b) * scale),
        Activation::GeluErf => it.for_each(|(v, b)| *v = gelu_erf(*v + b) * scale),
    }
}

#[inline(always)]
fn softmax_body(r: &mut [f32]) {
    // Separate passes with 8 independent accumulators so each loop vectorises.
    let mut m8 = [f32::NEG_INFINITY; 8];
    let chunks = r.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            m8[k] = m8[k].max(c[k]);
        }
    }
    let m = tail.iter().copied().fold(
        m8.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        f32::max,
    );
    for v in r.iter_mut() {
        *v = exp_approx(*v - m);
    }
    let mut s8 = [0f32; 8];
    let chunks = r.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for k in 0..8 {
            s8[k] += c[k];
        }
    }
    let inv = 1.0 / (s8.iter().sum::<f32>() + tail);
    r.iter_mut().for_each(|v| *v *= inv);
}

/// exp with about 2 ulp error, written so the compiler vectorises it on baseline x86-64
/// (no table, no branch, no `floor` call: rounding by the 1.5 * 2^23 trick).
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    p = p * r * r + r + 1.0;
    let ni = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    p * f32::from_bits((ni.wrapping_add(127) as u32) << 23)
}

/// tanh via Eigen's rational approximation (accurate to a few ulp, vectorises).
#[inline(always)]
pub fn tanh_approx(x: f32) -> f32 {
    let x = x.clamp(-7.905_311, 7.905_311);
    let x2 = x * x;
    let mut p = -2.760_768_5e-16f32;
    p = p * x2 + 2.000_188e-13;
    p = p * x2 - 8.604_672e-11;
    p = p * x2 + 5.122_297e-8;
    p = p * x2 + 1.485_722_4e-5;
    p = p * x2 + 6.372_619_3e-4;
    p = p * x2 + 4.893_524_6e-3;
    p *= x;
    let mut q = 1.198_258_4e-6f32;
    q = q * x2 + 1.185_347e-4;
    q = q * x2 + 2.268_434_6e-3;
    q = q * x2 + 4.893_525e-3;
    p / q
}

#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2 / pi)
    0.5 * x * (1.0 + tanh_approx(C * (x + 0.044_715 * x * x * x)))
}

/// erf via Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7).
#[inline(always)]
pub fn erf_approx(x: f32) -> f32 {
    let sign = if x < 0.0 { -1.0 } else { 1.0 };
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let y = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_8) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    sign * (1.0 - y * exp_approx(-a * a))
}

#[inline(always)]
pub fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_approx(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn approximations_match_std() {
        let mut x = -20.0f32;
        while x < 20.0 {
            let e = (exp_approx(x) - x.exp()).abs() / x.exp().max(1e-30);
            assert!(e < 1e-6, "exp({x}) rel err {e}");
            assert!((tanh_approx(x) - x.tanh()).abs() < 2e-6, "tanh({x})");
            let g = 0.5 * x * (1.0 + (0.797_884_6f32 * (x + 0.044_715 * x * x * x)).tanh());
            assert!(
                (gelu_tanh(x) - g).abs() < 1e-5 * (1.0 + x.abs()),
                "gelu({x})"
            );
            x += 0.013;
        }
        assert!((erf_approx(0.5) - 0.520_499_9).abs() < 1e-6);
        assert!((erf_approx(-1.5) + 0.966_105_1).abs() < 1e-6);
        assert!(exp_approx(-200.0) < 1e-37);
    }

    #[test]
    fn fast_gelu_matches_candles_value_and_gradient() {
        use candle_core::{Device, Var};
        let xs: Vec<f32> = (0..40_000).map(|i| (i as f32 - 20_000.0) * 4e-4).collect();
        for act in [Activation::GeluTanh, Activation::GeluErf] {
            let x = Var::new(xs.as_slice(), &Device::Cpu).unwrap();
            let w = Tensor::new(
                (0..xs.len())
                    .map(|i| (i % 7) as f32 - 3.0)
                    .collect::<Vec<_>>(),
                &Device::Cpu,
            )
            .unwrap();
            let ours = x.apply_op1(Gelu(act)).unwrap();
            let theirs = match act {
                Activation::GeluTanh => x.gelu().unwrap(),
                Activation::GeluErf => x.gelu_erf().unwrap(),
            };
            let (a, b) = (
                ours.to_vec1::<f32>().unwrap(),
                theirs.to_vec1::<f32>().unwrap(),
            );
            assert!(
                a.iter().zip(&b).all(|(a, b)| (a - b).abs() < 1e-5),
                "{act:?}"
            );
            let ga = ours.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = theirs
                .mul(&w)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let ga = ga.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
            let gb = gb.get(x.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
            let worst = ga
                .iter()
                .zip(&gb)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-4, "{act:?}: gradient off by {worst}");
        }
    }

    fn close(a: &Tensor, b: &Tensor, tol: f32) {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a.len(), b.len());
        let worst = a
            .iter()
            .zip(&b)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst <= tol, "off by {worst}");
    }

    /// Gradients of sum(out * probe).
    fn grads(out: &Tensor, probe: &Tensor) -> candle_core::backprop::GradStore {
        out.mul(probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    }

    #[test]
    fn kernels_read_a_view_that_starts_at_an_offset() {
        use candle_core::{Device, Var};
        let dev = Device::Cpu;
        let base = Var::from_tensor(&Tensor::randn(0f32, 1.0, (6, 8), &dev).unwrap()).unwrap();
        let w = Tensor::ones(8, candle_core::DType::F32, &dev).unwrap();
        let b = Tensor::zeros(8, candle_core::DType::F32, &dev).unwrap();
        // Rows 3..5: contiguous, but at offset 24 of the storage.
        let view = base.narrow(0, 3, 2).unwrap();
        let ours = view
            .apply_op3(&w, &b, FusedLayerNorm { eps: 1e-6 })
            .unwrap();
        let theirs = candle_nn::ops::layer_norm_slow(&view, &w, &b, 1e-6).unwrap();
        close(&ours, &theirs, 1e-5);
        let probe = Tensor::randn(0f32, 1.0, (2, 8), &dev).unwrap();
        let (go, gt) = (grads(&ours, &probe), grads(&theirs, &probe));
        close(go.get(&base).unwrap(), gt.get(&base).unwrap(), 1e-4);
        let g = Gelu(Activation::GeluErf);
        let ours = view.apply_op1(g).unwrap();
        let (go, gt) = (
            grads(&ours, &probe),
            grads(&view.gelu_erf().unwrap(), &probe),
        );
        close(go.get(&base).unwrap(), gt.get(&base).unwrap(), 1e-4);
    }

    #[test]
    fn layer_norm_and_bias_gradients_match_candles() {
        use candle_core::{Device, Var};
        let dev = Device::Cpu;
        let (r, d) = (37, 24);
        let x = Var::from_tensor(&(Tensor::randn(0f32, 2.0, (r, d), &dev).unwrap() + 0.7).unwrap())
            .unwrap();
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, d, &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.3, d, &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (r, d), &dev).unwrap();
        let ours = x
            .apply_op3(w.as_tensor(), b.as_tensor(), FusedLayerNorm { eps: 1e-6 })
            .unwrap();
        let theirs = candle_nn::ops::layer_norm_slow(&x, &w, &b, 1e-6).unwrap();
        close(&ours, &theirs, 1e-5);
        let (go, gt) = (grads(&ours, &probe), grads(&theirs, &probe));
        for v in [&x, &w, &b] {
            close(go.get(v).unwrap(), gt.get(v).unwrap(), 1e-4);
        }
        let ours = x.apply_op2(b.as_tensor(), BiasAdd).unwrap();
        let theirs = x.broadcast_add(&b).unwrap();
        close(&ours, &theirs, 0.0);
        let (go, gt) = (grads(&ours, &probe), grads(&theirs, &probe));
        for v in [&x, &b] {
            close(go.get(v).unwrap(), gt.get(v).unwrap(), 1e-5);
        }
    }
}
