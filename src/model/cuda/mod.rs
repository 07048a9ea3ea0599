//! The CUDA inference path's own kernels (built with the `cuda` feature): attention that reads
//! Q, K and V in place in the QKV buffer and writes the merged heads, and nested in/out
//! projections as cuBLAS GEMMs on width slices with explicit leading dimensions, with their
//! bias, GELU and row scale in one epilogue pass. They replace candle's head split/merge copies,
//! materialised scores, width-slice copies, zero padding, group concatenation and the bias-fold
//! concat. The generic path in `nested.rs` and `attention.rs` computes the same thing and stays
//! the reference.
//!
//! Opt-in until they have been checked on a GPU (`tests/cuda_kernels.rs`): `MONE_CUDA_KERNELS=fused`
//! or [`set_fused`].

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{Result, Tensor};

use super::config::Activation;
use super::kernels::RowGroup;

#[cfg(feature = "cuda")]
mod ops;

// 0: not read yet, 1: generic, 2: fused.
static MODE: AtomicU8 = AtomicU8::new(0);

/// Whether the CUDA forward uses these kernels (`MONE_CUDA_KERNELS=fused`) or candle's generic
/// ops (the default).
pub fn fused() -> bool {
    match MODE.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var("MONE_CUDA_KERNELS").is_ok_and(|v| v.trim() == "fused");
            MODE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
        m => m == 2,
    }
}

/// Choose the path for this process (tests and benchmarks compare both).
pub fn set_fused(on: bool) {
    MODE.store(if on { 2 } else { 1 }, Ordering::Relaxed);
}

/// Whether the fused CUDA kernels apply to tensors like `t`: inference on a CUDA device with
/// the kernels built and switched on.
pub fn applies(t: &Tensor, train: bool) -> bool {
    cfg!(feature = "cuda") && !train && t.device().is_cuda() && fused()
}

/// Head dimensions the attention kernel handles; others take the generic path.
pub fn head_dim_ok(hd: usize) -> bool {
    #[cfg(feature = "cuda")]
    return ops::HEAD_DIMS.contains(&hd);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = hd;
        false
    }
}

/// Multi-head attention over a (rows, 3D) QKV buffer in the layout's row order: (rows, D).
pub fn attention(
    qkv: &Tensor,
    n: usize,
    s: usize,
    heads: usize,
    token_major: bool,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        let head_dim = qkv.dim(1)? / 3 / heads;
        qkv.apply_op1_no_bwd(&ops::Attention {
            n,
            s,
            heads,
            head_dim,
            token_major,
        })
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (qkv, n, s, heads, token_major);
        candle_core::bail!("mone was built without the cuda feature")
    }
}

/// y = s_r * act(x[:, :width_g] W[:, :width_g]^T + b) per row group (scale and act optional).
pub fn in_proj(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    groups: &[RowGroup],
    act: Option<Activation>,
    scale: Option<&Tensor>,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        x.apply_op3_no_bwd(w, b, &ops::InProj { groups, act, scale })
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, w, b, groups, act, scale);
        candle_core::bail!("mone was built without the cuda feature")
    }
}

/// In place: x[:, :width_g] += a W[:width_g]^T + s_r * b[:width_g] per row group. With a row
/// scale, `a` must already carry it (fc1's epilogue applies it).
pub fn out_accum(
    x: &Tensor,
    a: &Tensor,
    w: &Tensor,
    b: &Tensor,
    groups: &[RowGroup],
    scale: Option<&Tensor>,
) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        x.inplace_op3(
            a,
            w,
            &ops::OutAccum {
                groups,
                bias: b,
                scale,
            },
        )
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, a, w, b, groups, scale);
        candle_core::bail!("mone was built without the cuda feature")
    }
}
