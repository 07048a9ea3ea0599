//! Fused CPU kernels for the f32 inference path (and the training ops whose candle backward is
//! slow).
//!
//! candle's own CPU path spends much of a ViT forward outside matmul: single-threaded scalar
//! GELU, bias broadcasts, permute copies around attention, zero-padding and residual adds. These
//! kernels remove those passes: nested in-projections write bias + slice-GEMM into one buffer,
//! attention reads Q/K/V straight out of the QKV buffer with strided GEMMs, and nested
//! out-projections accumulate into the first d_j channels of the residual stream in place.
//! The generic (any device, differentiable) path in `nested.rs` computes the same thing.
//!
//! `simd` picks the instruction set at run time, `math` holds the vectorisable approximations,
//! `gemm512` an AVX-512 GEMM for small wide out-projections; `linear`, `attention`, `norm` and
//! `elementwise` are the candle ops.

use candle_core::{bail, CpuStorage, Layout, Result};

pub mod attention;
pub mod elementwise;
pub mod gemm512;
pub mod linear;
pub mod math;
pub mod norm;
pub mod simd;

pub use attention::FusedAttention;
pub use elementwise::{BiasAdd, Gelu, MeanPool};
pub use linear::{NestedInProj, NestedOutAccum};
pub use math::{
    erf_approx, exp_approx, gelu_erf, gelu_erf_grad, gelu_tanh, gelu_tanh_grad, tanh_approx,
};
pub use norm::FusedLayerNorm;
pub use simd::SimdLevel;

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
pub(crate) fn overwritten_f32(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: f32 has no invalid bit patterns and every caller writes all n elements (each
    // row group's GEMM with read_dst = false, or the bias fill) before reading any.
    unsafe { v.set_len(n) };
    v
}

pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, name: &str) -> Result<&'a [f32]> {
    match s {
        CpuStorage::F32(v) => Ok(&v[l.start_offset()..]),
        _ => bail!("{name}: the fused CPU kernels are f32 only"),
    }
}

pub(crate) fn strides2(l: &Layout, name: &str) -> Result<(usize, usize, usize, usize)> {
    match (l.dims(), l.stride()) {
        ([r, c], [rs, cs]) => Ok((*r, *c, *rs, *cs)),
        _ => bail!("{name}: expected a 2-d tensor, got {:?}", l.dims()),
    }
}

/// The elements of a contiguous f32 layout (which may start at an offset: a narrowed view).
pub(crate) fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, name: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        (CpuStorage::F32(_), None) => bail!("{name}: input must be contiguous"),
        _ => bail!("{name}: the fused CPU kernels are f32 only"),
    }
}

/// A pointer that threads writing disjoint parts of one buffer share.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(pub *mut f32);
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}
