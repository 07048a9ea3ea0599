//! An AVX-512 GEMM for the wide out-projections: C += A[:, :k] W[:n, :k]^T, with
//! W packed (per call) into panels of 32 output features, k-major (a narrower group uses the
//! first panels of the same packing) and A copied per block. A 12 x 32 register tile, 24
//! accumulators.
//!
//! `mone bench gemm --iters 15` (b16, 2 threads, AVX-512, alternated with the gemm crate's own
//! AVX-512 kernels in one run) measured this kernel faster on fc2 (K 3072) wherever the output
//! is at least 384 wide: 155-166 GFLOP/s against 140-160 on the e_c 0.5 and 0.3 groups of
//! 600-900 rows, 118 against 70 on the widest group at e_c 0.3 (208 rows), 188-190 against
//! 180-184 dense; and on the attention's out-projection (K 768) only for groups of few rows
//! (141 against 126 at 208 rows). The crate won on every in-projection and on outputs of 96
//! columns, and tied at 192. So only those products come here (`linear.rs` picks), but for a
//! weight packed at load (fc2's, `Mlp::prepack`): then every group does, since without the
//! per-call packing this kernel won at 192 columns (181-184 against 144-166) and tied at 96.
// Without the `avx512` feature nothing calls into it.
#![cfg_attr(not(feature = "avx512"), allow(dead_code))]

use rayon::prelude::*;

use super::overwritten_f32;

/// Output features per panel (two AVX-512 registers).
pub const NR: usize = 32;
/// Rows per register tile.
pub const MR: usize = 12;
/// Most K per block (K is cut into equal blocks of at most this): a 12 x 256 micro-panel of A
/// (12 KiB) and a 256 x 32 panel (32 KiB) per tile. With 96 rows per block, it gave the fastest
/// e_c 0.3 forward in one sweep over KC 256-768 and MC 48-192 (b16, batch 1; a noisy machine).
const KC: usize = 256;
/// Rows per block: the packed MC x KC block of A (96 KiB) stays in L2 across the panels.
const MC: usize = 96;
/// Row stride of the packed A micro-panels: KC plus one cache line, so that the rows of a
/// tile fall into different L1 sets.
const KS: usize = KC + 16;
/// The products that come here: out-projections of at least `MIN_WIDTH` output columns with
/// fewer rows than `MAX_ROWS` or a K of at least `LONG_K` (see the module doc).
pub const MAX_ROWS: usize = 512;
pub const MIN_WIDTH: usize = 384;
pub const LONG_K: usize = 2048;

/// W's first `n` rows and first `k` columns as panels of NR rows, k-major, zero past `n`.
/// Packing fc2's 768 x 3072 weight took 3.7-6.6 ms (2 threads), 4-7% of a b16 forward at e_c
/// 0.3 over its 16 layers, so loaded models keep fc2's packing (`Mlp::prepack`).
pub struct Packed {
    pub n: usize,
    pub k: usize,
    data: Vec<f32>,
}

impl Packed {
    /// Packs W (row stride `w_rs`, column stride 1); the panels are packed in parallel.
    pub fn new(w: &[f32], w_rs: usize, n: usize, k: usize) -> Self {
        let panels = n.div_ceil(NR);
        let mut data = overwritten_f32(panels * k * NR);
        if k > 0 {
            data.par_chunks_mut(k * NR)
                .enumerate()
                .for_each(|(p, panel)| {
                    let j0 = p * NR;
                    let live = NR.min(n - j0);
                    for (kk, out) in panel.chunks_exact_mut(NR).enumerate() {
                        for (c, o) in out.iter_mut().enumerate() {
                            *o = if c < live {
                                w[(j0 + c) * w_rs + kk]
                            } else {
                                0.0
                            };
                        }
                    }
                });
        }
        Self { n, k, data }
    }

    /// Whether this packs all of a (n, k) weight.
    pub fn covers(&self, n: usize, k: usize) -> bool {
        self.n == n && self.k == k
    }

    fn panel(&self, p: usize, k0: usize) -> *const f32 {
        self.data[p * self.k * NR + k0 * NR..].as_ptr()
    }
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Packed({} x {})", self.n, self.k)
    }
}

/// One GEMM: rows of A (row stride `lda`, the first `k` columns) against the packed weights,
/// accumulated into C (row stride `ldc`) at columns [0, n), n <= w.n.
pub struct Gemm<'a> {
    pub a: *const f32,
    pub lda: usize,
    pub c: *mut f32,
    pub ldc: usize,
    pub n: usize,
    pub k: usize,
    pub w: &'a Packed,
}

impl Gemm<'_> {
    /// Computes rows [r0, r1) and the panels [p0, p1). Needs AVX-512 (`simd::supported`).
    ///
    /// # Safety
    /// A must hold rows [r0, r1) of `k` readable columns, C rows [r0, r1) of `n` writable
    /// columns, and no other thread may write the same part of C.
    #[cfg(all(target_arch = "x86_64", feature = "avx512"))]
    pub unsafe fn run(&self, r0: usize, r1: usize, p0: usize, p1: usize) {
        unsafe { x86::run(self, r0, r1, p0, p1) }
    }
}

#[cfg(all(target_arch = "x86_64", feature = "avx512"))]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Gemm, KC, KS, MC, MR, NR};

    /// A's block [ic, ie) x [pc, pc + kc) as MR-row micro-panels of row copies KS floats apart:
    /// plain vector copies (a transposing pack, by instruction count, costs about a third of the
    /// FMAs on 96-column outputs), and
    /// a stride that is no multiple of 4 KiB (a 3072-float row is exactly 3 x 4 KiB, so twelve
    /// fc2 rows read in place all fall into the same L1 sets).
    #[inline(always)]
    unsafe fn pack_a(g: &Gemm, ic: usize, ie: usize, pc: usize, kc: usize, buf: &mut [f32]) {
        let mut t = 0;
        let mut ir = ic;
        while ir < ie {
            let mr = MR.min(ie - ir);
            for r in 0..MR {
                // Rows past the block repeat its first row (computed, never stored).
                let row = if r < mr { ir + r } else { ir };
                // SAFETY: rows [ic, ie) and columns [pc, pc + kc) are inside A.
                let src = unsafe { std::slice::from_raw_parts(g.a.add(row * g.lda + pc), kc) };
                let o = (t * MR + r) * KS;
                buf[o..o + kc].copy_from_slice(src);
            }
            t += 1;
            ir += mr;
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
    pub(super) unsafe fn run(g: &Gemm, r0: usize, r1: usize, p0: usize, p1: usize) {
        let n = g.n.min(g.w.n);
        let mut buf = super::overwritten_f32(MC.div_ceil(MR) * MR * KS);
        let mut ic = r0;
        while ic < r1 {
            let ie = (ic + MC).min(r1);
            let mut pc = 0;
            let kb = g.k.div_ceil(g.k.div_ceil(KC).max(1)).max(1);
            loop {
                let kc = kb.min(g.k - pc);
                unsafe { pack_a(g, ic, ie, pc, kc, &mut buf) };
                for p in p0..p1 {
                    let j0 = p * NR;
                    let nr = NR.min(n - j0);
                    let b = g.w.panel(p, pc);
                    let (mut ir, mut t) = (ic, 0);
                    while ir < ie {
                        let mr = MR.min(ie - ir);
                        // SAFETY: the tile is inside A's block and C (the caller's contract).
                        unsafe {
                            let c = g.c.add(ir * g.ldc + j0);
                            tile(kc, buf[t * MR * KS..].as_ptr(), mr, b, c, g.ldc, nr);
                        }
                        ir += mr;
                        t += 1;
                    }
                }
                pc += kc;
                if pc >= g.k {
                    break;
                }
            }
            ic = ie;
        }
    }

    #[inline(always)]
    fn mask(live: usize) -> __mmask16 {
        if live >= 16 {
            0xFFFF
        } else {
            ((1u32 << live) - 1) as __mmask16
        }
    }

    /// C[0..mr, 0..nr] += A B, A a packed micro-panel (MR rows KS apart), B a packed panel
    /// (kc x NR).
    /// Rows past `mr` are computed and not stored.
    #[inline(always)]
    unsafe fn tile(
        kc: usize,
        a: *const f32,
        mr: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        nr: usize,
    ) {
        unsafe {
            let mut c0 = [_mm512_setzero_ps(); MR];
            let mut c1 = [_mm512_setzero_ps(); MR];
            for kk in 0..kc {
                let b0 = _mm512_loadu_ps(b.add(kk * NR));
                let b1 = _mm512_loadu_ps(b.add(kk * NR + 16));
                for r in 0..MR {
                    let av = _mm512_set1_ps(*a.add(r * KS + kk));
                    c0[r] = _mm512_fmadd_ps(av, b0, c0[r]);
                    c1[r] = _mm512_fmadd_ps(av, b1, c1[r]);
                }
            }
            let (m0, m1) = (mask(nr), mask(nr.saturating_sub(16)));
            // A constant trip count keeps the accumulators in registers (no indexed spill).
            for r in 0..MR {
                if r >= mr {
                    break;
                }
                let cp = c.add(r * ldc);
                let v0 = _mm512_add_ps(c0[r], _mm512_maskz_loadu_ps(m0, cp));
                let v1 = _mm512_add_ps(c1[r], _mm512_maskz_loadu_ps(m1, cp.add(16)));
                _mm512_mask_storeu_ps(cp, m0, v0);
                _mm512_mask_storeu_ps(cp.add(16), m1, v1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[allow(unused_imports)]
    use super::*;
    use crate::model::kernels::simd::{supported, SimdLevel};

    fn rng(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        }
    }

    /// Partial tiles in both directions, K past one block and over several uneven blocks, a
    /// narrower n than the packing, and rows split as two threads would, against an f64
    /// reference; the columns past n stay untouched.
    #[test]
    fn gemm512_equals_the_reference() {
        if supported() < SimdLevel::Avx512 {
            eprintln!("gemm512_equals_the_reference: skipped, this CPU (or build) has no AVX-512");
            return;
        }
        #[cfg(all(target_arch = "x86_64", feature = "avx512"))]
        for (m, n_pack, n, k, lda_extra) in [
            (1, 1, 1, 1, 0),
            (13, 40, 33, 7, 3),
            (25, 64, 64, 300, 0),
            (150, 100, 96, 513, 5),
            (7, 100, 100, 256, 1),
            (97, 768, 700, 1100, 0),
        ] {
            let mut r = rng((m * 1000 + n * 10 + k) as u64);
            let lda = k + lda_extra;
            let ldc = n_pack + 3;
            let a: Vec<f32> = (0..m * lda).map(|_| r()).collect();
            let w: Vec<f32> = (0..n_pack * (k + 2)).map(|_| r()).collect();
            let c0: Vec<f32> = (0..m * ldc).map(|_| r()).collect();
            let packed = Packed::new(&w, k + 2, n_pack, k);
            let mut c = c0.clone();
            let g = Gemm {
                a: a.as_ptr(),
                lda,
                c: c.as_mut_ptr(),
                ldc,
                n,
                k,
                w: &packed,
            };
            let panels = n.div_ceil(NR);
            // SAFETY: A, C and the packing hold the extents used.
            unsafe {
                g.run(0, m / 2, 0, panels);
                g.run(m / 2, m, 0, panels / 2);
                g.run(m / 2, m, panels / 2, panels);
            }
            for i in 0..m {
                for j in 0..ldc {
                    let old = c0[i * ldc + j] as f64;
                    let want = if j >= n {
                        old
                    } else {
                        old + (0..k)
                            .map(|kk| a[i * lda + kk] as f64 * w[j * (k + 2) + kk] as f64)
                            .sum::<f64>()
                    };
                    let got = c[i * ldc + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()) * (k as f64).sqrt(),
                        "m {m} n {n} k {k} at ({i}, {j}): {got} vs {want}"
                    );
                }
            }
        }
    }
}
