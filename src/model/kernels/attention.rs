//! Multi-head self-attention straight out of the fused QKV buffer.

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use super::simd::softmax_in_place;
use super::{f32_slice, overwritten_f32, SyncPtr};
use crate::model::profile::{self, Part};

/// Sequences at least this long are gathered into contiguous rows in token-major layouts.
const GATHER_MIN_TOKENS: usize = 64;

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
        // With profiling on, the threads' time in the softmax and in the whole tasks, to split
        // the op's wall time between the GEMMs and the softmax.
        let timing = profile::enabled();
        let (soft_ns, task_ns) = (AtomicU64::new(0), AtomicU64::new(0));
        let wall = Instant::now();
        // Token-major rows of one sequence lie S rows apart (a page or more), and the GEMMs
        // read each row many times: gather the task's q, k and v once into contiguous rows.
        // Short sequences re-read too little to repay the copy (measured slower at 17 tokens).
        let gather = self.token_major && s > 1 && n >= GATHER_MIN_TOKENS;
        (0..s * h).into_par_iter().for_each_init(
            || {
                let local = if gather {
                    vec![0f32; 3 * n * hd]
                } else {
                    Vec::new()
                };
                (vec![0f32; n * n], local)
            },
            |(scores, local), task| {
                let t0 = timing.then(Instant::now);
                let (si, hi) = (task / h, task % h);
                let base = si * seq * 3 * d + hi * hd;
                let (q, k, v, row) = if gather {
                    for p in 0..n {
                        let src = &qkv[base + p * tok * 3 * d..];
                        for (j, part) in local.chunks_exact_mut(n * hd).enumerate() {
                            part[p * hd..(p + 1) * hd].copy_from_slice(&src[j * d..j * d + hd]);
                        }
                    }
                    let l = local.as_ptr();
                    // SAFETY: offsets inside `local` (3 blocks of n * hd).
                    unsafe { (l, l.add(n * hd), l.add(2 * n * hd), hd as isize) }
                } else {
                    // SAFETY: offsets inside qkv (the layout was checked above).
                    let b = unsafe { qkv.as_ptr().add(base) };
                    unsafe { (b, b.add(d), b.add(2 * d), row) }
                };
                // SAFETY: q/k/v reads stay inside qkv or `local`; each task writes a disjoint
                // (sequence, head) block of `out`.
                unsafe {
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
                    let t1 = timing.then(Instant::now);
                    for r in scores.chunks_mut(n) {
                        softmax_in_place(r);
                    }
                    if let Some(t1) = t1 {
                        soft_ns.fetch_add(t1.elapsed().as_nanos() as u64, Ordering::Relaxed);
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
                if let Some(t0) = t0 {
                    task_ns.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
                }
            },
        );
        if timing {
            let wall = wall.elapsed().as_nanos() as f64;
            let (soft, all) = (soft_ns.into_inner() as f64, task_ns.into_inner() as f64);
            let share = if all > 0.0 { soft / all } else { 0.0 };
            profile::add(Part::Softmax, (wall * share) as u64);
            profile::add(Part::Attention, (wall * (1.0 - share)) as u64);
        }
        Ok((CpuStorage::F32(out), Shape::from((n * s, d))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::nested::TokenLayout;
    use candle_core::{Device, Tensor};

    /// Both row orders (token-major gathers a long sequence's rows first), one sequence and
    /// several, odd token counts, against the generic candle attention.
    #[test]
    fn fused_attention_equals_the_generic_one() {
        let long = GATHER_MIN_TOKENS + 3;
        for &(n, s, heads, hd) in &[(13, 1, 2, 8), (17, 3, 3, 16), (9, 5, 1, 4), (long, 3, 2, 8)] {
            for token_major in [false, true] {
                let d = heads * hd;
                let qkv = Tensor::randn(0f32, 1.0, (n * s, 3 * d), &Device::Cpu).unwrap();
                let layout = TokenLayout {
                    n,
                    s,
                    token_major,
                    groups: TokenLayout::dense(n, s, d).groups,
                };
                let want = crate::model::attention::attention(&qkv, &layout, heads, false).unwrap();
                let got = qkv
                    .apply_op1_no_bwd(&FusedAttention {
                        n,
                        s,
                        heads,
                        head_dim: hd,
                        token_major,
                    })
                    .unwrap();
                let diff = (got - want)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(diff < 1e-5, "n {n} s {s} token-major {token_major}: {diff}");
            }
        }
    }
}
