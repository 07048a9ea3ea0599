//! Self-attention with nested partial in/out projections: QKV reads the first d_j features
//! and produces full-width Q, K, V; attention runs over all tokens at full width; the
//! out-projection writes only the first d_j channels of the residual.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{Init, Linear, VarBuilder};

use super::cuda;
use super::kernels::{FusedAttention, NestedInProj, NestedOutAccum};
use super::nested::{fused_ok, in_proj, out_proj, TokenLayout};
use super::profile::{scope, Part};
use super::Config;

#[derive(Clone, Debug)]
pub struct Attention {
    pub qkv: Linear,
    pub proj: Linear,
    pub num_heads: usize,
}

pub(crate) fn linear(inp: usize, out: usize, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get_with_hints(
        (out, inp),
        "weight",
        Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        },
    )?;
    let b = vb.get_with_hints(out, "bias", Init::Const(0.0))?;
    Ok(Linear::new(w, Some(b)))
}

fn bias(l: &Linear) -> Result<&Tensor> {
    l.bias()
        .ok_or_else(|| candle_core::Error::Msg("linear layer without bias".into()))
}

impl Attention {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            qkv: linear(d, 3 * d, vb.pp("qkv"))?,
            proj: linear(d, d, vb.pp("proj"))?,
            num_heads: cfg.num_heads,
        })
    }

    /// x + SA(h) for the normalised input h; the residual x is updated in place on the fused
    /// path (the caller owns it).
    pub fn forward_residual(
        &self,
        x: Tensor,
        h: &Tensor,
        layout: &TokenLayout,
        train: bool,
    ) -> Result<Tensor> {
        let d = h.dim(1)?;
        let hd = d / self.num_heads;
        if fused_ok(h, train) {
            let qkv = {
                let _p = scope(Part::Qkv);
                h.apply_op3_no_bwd(
                    self.qkv.weight(),
                    bias(&self.qkv)?,
                    &NestedInProj {
                        groups: &layout.groups,
                        add_bias: true,
                        act: None,
                    },
                )?
            };
            // (The op records its own time, split into GEMMs and softmax.)
            let a = qkv.apply_op1_no_bwd(&FusedAttention {
                n: layout.n,
                s: layout.s,
                heads: self.num_heads,
                head_dim: hd,
                token_major: layout.token_major,
            })?;
            let _p = scope(Part::Proj);
            let b = bias(&self.proj)?.to_vec1::<f32>()?;
            x.inplace_op3(
                &a,
                self.proj.weight(),
                &NestedOutAccum {
                    groups: &layout.groups,
                    bias: &b,
                    row_scale: None,
                    packed: None,
                },
            )?;
            return Ok(x);
        }
        if cuda::applies(h, train) && cuda::head_dim_ok(hd) && x.is_contiguous() {
            let qkv = {
                let _p = scope(Part::Qkv);
                cuda::in_proj(
                    h,
                    self.qkv.weight(),
                    bias(&self.qkv)?,
                    &layout.groups,
                    None,
                    None,
                )?
            };
            let a = {
                let _p = scope(Part::Attention);
                cuda::attention(&qkv, layout.n, layout.s, self.num_heads, layout.token_major)?
            };
            let _p = scope(Part::Proj);
            cuda::out_accum(
                &x,
                &a,
                self.proj.weight(),
                bias(&self.proj)?,
                &layout.groups,
                None,
            )?;
            return Ok(x);
        }
        let qkv = {
            let _p = scope(Part::Qkv);
            in_proj(h, self.qkv.weight(), bias(&self.qkv)?, layout)?
        };
        let a = {
            let _p = scope(Part::Attention);
            attention(&qkv, layout, self.num_heads, train)?
        };
        let _p = scope(Part::Proj);
        x + out_proj(&a, self.proj.weight(), bias(&self.proj)?, layout, None)?
    }

    /// The dense reference: plain candle layers, every token at full width.
    pub fn forward_plain(&self, h: &Tensor, layout: &TokenLayout, train: bool) -> Result<Tensor> {
        let qkv = self.qkv.forward(h)?;
        let a = attention(&qkv, layout, self.num_heads, train)?;
        self.proj.forward(&a)
    }
}

/// Multi-head attention over (rows, 3D) QKV in `layout`'s row order, returning (rows, D).
pub fn attention(qkv: &Tensor, layout: &TokenLayout, heads: usize, train: bool) -> Result<Tensor> {
    let d = qkv.dim(1)? / 3;
    let hd = d / heads;
    let (n, s) = (layout.n, layout.s);
    // -> (3, S, H, N, hd)
    let q = if layout.token_major {
        qkv.reshape((n, s, 3, heads, hd))?
            .permute((2, 1, 3, 0, 4))?
    } else {
        qkv.reshape((s, n, 3, heads, hd))?
            .permute((2, 0, 3, 1, 4))?
    };
    let q = q.contiguous()?;
    let (qq, k, v) = (q.get(0)?, q.get(1)?, q.get(2)?);
    let att = (qq.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
    let att = if train {
        candle_nn::ops::softmax(&att, D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(&att)?
    };
    let o = att.matmul(&v)?; // (S, H, N, hd)
    let o = if layout.token_major {
        o.permute((2, 0, 1, 3))?
    } else {
        o.permute((0, 2, 1, 3))?
    };
    o.contiguous()?.reshape((n * s, d))
}
