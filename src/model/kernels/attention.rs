//! Multi-head self-attention straight out of the fused QKV buffer.

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use super::simd::softmax_in_place;
use super::{f32_slice, overwritten_f32, SyncPtr};
use crate::model::profile::{self, Part};

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
        (0..s * h).into_par_iter().for_each_init(
            || vec![0f32; n * n],
            |scores, task| {
                let t0 = timing.then(Instant::now);
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
