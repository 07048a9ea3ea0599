//! Token layouts and the nested (width-sliced) linear layers, generic over device and
//! differentiable. The CPU f32 inference path uses the fused equivalents in `kernels/`, the CUDA
//! one (opt-in) those in `cuda/`.

use candle_core::{DType, Device, Result, Tensor};

pub use super::kernels::RowGroup;

/// How the (rows, D) residual stream is laid out: S sequences of N tokens, rows grouped
/// into contiguous blocks that share one nested width.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLayout {
    pub n: usize,
    pub s: usize,
    /// Token p of sequence s is row p * S + s (true) or s * N + p (false). Routed layouts are
    /// token-major so that every expert group is one contiguous block of rows for all
    /// sequences at once.
    pub token_major: bool,
    pub groups: Vec<RowGroup>,
}

impl TokenLayout {
    /// Every token at full width, sequences stored one after another.
    pub fn dense(n: usize, s: usize, d: usize) -> Self {
        Self {
            n,
            s,
            token_major: false,
            groups: vec![RowGroup {
                row0: 0,
                rows: n * s,
                width: d,
            }],
        }
    }
    /// Token-major layout with `counts[j]` tokens per sequence at `widths[j]`, in that order.
    pub fn grouped(n: usize, s: usize, counts: &[usize], widths: &[usize]) -> Self {
        let mut groups = Vec::new();
        let mut off = 0;
        for (&c, &w) in counts.iter().zip(widths) {
            if c > 0 {
                groups.push(RowGroup {
                    row0: off * s,
                    rows: c * s,
                    width: w,
                });
            }
            off += c;
        }
        Self {
            n,
            s,
            token_major: true,
            groups,
        }
    }
    pub fn rows(&self) -> usize {
        self.n * self.s
    }
    pub fn is_full_width(&self, d: usize) -> bool {
        self.groups.iter().all(|g| g.width == d)
    }
}

/// Whether the fused CPU kernels apply to tensors like `t` in inference.
pub fn fused_ok(t: &Tensor, train: bool) -> bool {
    !train && matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32
}

/// x + b over the last dimension; on CPU f32 through a kernel whose backward is fast.
pub fn add_bias(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() == 2 {
        x.contiguous()?
            .apply_op2(&b.contiguous()?, super::kernels::BiasAdd)
    } else {
        x.broadcast_add(b)
    }
}

/// Columns appended to an input so that its matmul adds the bias: a one and zeros up to a
/// multiple of 8 (tensor cores want aligned K).
const BIAS_COLS: usize = 8;

/// x @ w^T + b in one GEMM on a GPU: [x | 1 0..0] @ [w | b 0..0]^T. candle adds a bias with a
/// broadcasting kernel that, measured on an H100 (docs/benchmarks.md), cost more than the
/// matmul itself; the extra columns cost one contiguous copy of x (which a width slice needs
/// anyway) and K + 8 in the GEMM.
pub(crate) fn gpu_affine(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (rows, n) = (x.dim(0)?, w.dim(0)?);
    let (dt, dev) = (x.dtype(), x.device());
    let xa = Tensor::cat(
        &[
            &x.contiguous()?,
            &Tensor::ones((rows, 1), dt, dev)?,
            &Tensor::zeros((rows, BIAS_COLS - 1), dt, dev)?,
        ],
        1,
    )?;
    let wa = Tensor::cat(
        &[
            &w.contiguous()?,
            &b.reshape((n, 1))?,
            &Tensor::zeros((n, BIAS_COLS - 1), dt, dev)?,
        ],
        1,
    )?;
    xa.matmul(&wa.t()?)
}

/// y[rows_g] = x[rows_g, :d_g] @ W[:, :d_g]^T + b: partial in-projection to the full output.
pub fn in_proj(x: &Tensor, w: &Tensor, b: &Tensor, layout: &TokenLayout) -> Result<Tensor> {
    let on_cpu = x.device().is_cpu();
    let mut parts = layout
        .groups
        .iter()
        .map(|g| {
            // (A full-width narrow is the tensor itself.)
            let xs = x.narrow(0, g.row0, g.rows)?.narrow(1, 0, g.width)?;
            let ws = w.narrow(1, 0, g.width)?;
            if on_cpu {
                xs.matmul(&ws.t()?)
            } else {
                gpu_affine(&xs, &ws, b)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let y = if parts.len() == 1 {
        parts.pop().unwrap_or_else(|| unreachable!())
    } else {
        Tensor::cat(&parts, 0)?
    };
    if on_cpu {
        add_bias(&y, b)
    } else {
        Ok(y)
    }
}

/// The residual update of a partial out-projection: rows of group g get
/// s_r * (a @ W[:d_g]^T + b[:d_g]) in their first d_g channels and zeros after.
pub fn out_proj(
    a: &Tensor,
    w: &Tensor,
    b: &Tensor,
    layout: &TokenLayout,
    row_scale: Option<&Tensor>,
) -> Result<Tensor> {
    let d = w.dim(0)?;
    let mut parts = Vec::with_capacity(layout.groups.len());
    for g in &layout.groups {
        let xs = a.narrow(0, g.row0, g.rows)?;
        let ws = w.narrow(0, 0, g.width)?;
        let bs = b.narrow(0, 0, g.width)?;
        let mut y = if a.device().is_cpu() {
            add_bias(&xs.matmul(&ws.t()?)?, &bs)?
        } else {
            gpu_affine(&xs, &ws, &bs)?
        };
        if let Some(s) = row_scale {
            y = y.broadcast_mul(&s.narrow(0, g.row0, g.rows)?)?;
        }
        if g.width != d {
            y = y.pad_with_zeros(1, 0, d - g.width)?;
        }
        parts.push(y);
    }
    if parts.len() == 1 {
        Ok(parts.pop().unwrap_or_else(|| unreachable!()))
    } else {
        Tensor::cat(&parts, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bias_in_the_gemm_equals_matmul_plus_bias() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (37, 24), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (40, 24), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 40, &dev).unwrap();
        // A width slice, as the nested layers pass it.
        let (xs, ws) = (x.narrow(1, 0, 12).unwrap(), w.narrow(1, 0, 12).unwrap());
        let got = gpu_affine(&xs, &ws, &b).unwrap();
        let want = xs
            .contiguous()
            .unwrap()
            .matmul(&ws.t().unwrap())
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        assert_eq!(got.dims(), &[37, 40]);
        let d = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-4, "{d}");
    }
}
