//! The transformer blocks of the routed and dense stages: the LayerNorm, the feed-forward
//! (a nested MLP, or a Mobile V-MoE's expert MLPs) and a stage's stack of blocks.

use candle_core::{DType, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::attention::Attention;
use super::kernels::FusedLayerNorm;
use super::mlp::{Mlp, RowScale};
use super::moe::{experts_residual, ClipRoute};
use super::nested::{fused_ok, TokenLayout};
use super::profile::{scope, Part};
use super::Config;

#[derive(Clone, Debug)]
pub struct Norm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl Norm {
    pub fn new(d: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(d, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(d, "bias", Init::Const(0.0))?,
            eps,
        })
    }
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let _p = scope(Part::Norm);
        let cpu_f32 = x.device().is_cpu() && x.dtype() == candle_core::DType::F32;
        if train && cpu_f32 {
            // Our kernel, with a backward: candle 0.11's fused layer norm has none.
            x.contiguous()?.apply_op3(
                &self.weight,
                &self.bias,
                FusedLayerNorm {
                    eps: self.eps as f32,
                },
            )
        } else if train || x.dtype() == DType::F64 {
            // (candle's fused layer norm has no f64 kernel.)
            candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, self.eps as f32)
        } else if fused_ok(x, false) {
            x.contiguous()?.apply_op3_no_bwd(
                &self.weight,
                &self.bias,
                &FusedLayerNorm {
                    eps: self.eps as f32,
                },
            )
        } else {
            candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps as f32)
        }
    }
}

/// A block's MLP: one (nested) MLP, or a V-MoE layer's experts (`mlp.experts.{j}`).
#[derive(Clone, Debug)]
pub enum Ffn {
    Dense(Mlp),
    Experts(Vec<Mlp>),
}

#[derive(Clone, Debug)]
pub struct Block {
    pub norm1: Norm,
    pub attention: Attention,
    pub norm2: Norm,
    pub mlp: Ffn,
}

impl Block {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        Self::with_experts(cfg, 0, vb)
    }

    /// A block whose MLP is `experts` expert MLPs (0: one dense MLP).
    pub fn with_experts(cfg: &Config, experts: usize, vb: VarBuilder) -> Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let mlp = if experts == 0 {
            Ffn::Dense(Mlp::new(cfg, vb.pp("mlp"))?)
        } else {
            let vb = vb.pp("mlp").pp("experts");
            Ffn::Experts(
                (0..experts)
                    .map(|j| Mlp::new(cfg, vb.pp(j)))
                    .collect::<Result<Vec<_>>>()?,
            )
        };
        Ok(Self {
            norm1: Norm::new(d, eps, vb.pp("norm1"))?,
            attention: Attention::new(cfg, vb.pp("attention"))?,
            norm2: Norm::new(d, eps, vb.pp("norm2"))?,
            mlp,
        })
    }

    /// Packs the MLPs' weights for the CPU (`Mlp::prepack`).
    pub fn prepack(&mut self) -> Result<()> {
        match &mut self.mlp {
            Ffn::Dense(m) => m.prepack(),
            Ffn::Experts(ms) => ms.iter_mut().try_for_each(Mlp::prepack),
        }
    }

    fn dense_mlp(&self) -> Result<&Mlp> {
        match &self.mlp {
            Ffn::Dense(m) => Ok(m),
            Ffn::Experts(_) => candle_core::bail!("an expert layer needs a clip route"),
        }
    }

    /// The V-MoE block on clip-major rows (B * L, D): attention as in [`Block::forward`],
    /// then each clip's routed experts.
    pub fn forward_routed(
        &self,
        x: Tensor,
        layout: &TokenLayout,
        route: &ClipRoute,
        train: bool,
    ) -> Result<Tensor> {
        let Ffn::Experts(experts) = &self.mlp else {
            candle_core::bail!("a dense layer has no experts to route to");
        };
        let h = self.norm1.forward(&x, train)?;
        let x = self.attention.forward_residual(x, &h, layout, train)?;
        let h = self.norm2.forward(&x, train)?;
        experts_residual(experts, x, &h, layout.n, route, train)
    }

    /// z = x + SA_j(LN(x)); x' = z + s * MLP_j(LN(z)) on the (rows, D) residual stream. The
    /// fused path updates `x` in place, so the caller must own its storage.
    pub fn forward(
        &self,
        x: Tensor,
        layout: &TokenLayout,
        scale: Option<&RowScale>,
        train: bool,
    ) -> Result<Tensor> {
        let h = self.norm1.forward(&x, train)?;
        let x = self.attention.forward_residual(x, &h, layout, train)?;
        let h = self.norm2.forward(&x, train)?;
        self.dense_mlp()?
            .forward_residual(x, &h, layout, scale, train)
    }

    /// Plain candle layers, dense: the out-of-the-box baseline.
    pub fn forward_plain(&self, x: &Tensor, layout: &TokenLayout) -> Result<Tensor> {
        let h = self.norm1.forward(x, false)?;
        let x = (x + self.attention.forward_plain(&h, layout, false)?)?;
        let h = self.norm2.forward(&x, false)?;
        &x + self.dense_mlp()?.forward_plain(&h)?
    }
}

#[derive(Clone, Debug)]
pub struct Stage {
    pub layers: Vec<Block>,
    pub norm: Norm,
}

impl Stage {
    /// `depth` blocks and a final norm with `norm_eps`; blocks from `experts_from` on are
    /// V-MoE layers with `experts` expert MLPs each.
    pub fn new(
        cfg: &Config,
        depth: usize,
        norm_eps: f64,
        (experts_from, experts): (usize, usize),
        vb: VarBuilder,
    ) -> Result<Self> {
        let layers = (0..depth)
            .map(|i| {
                let e = if i >= experts_from { experts } else { 0 };
                Block::with_experts(cfg, e, vb.pp(format!("layers.{i}")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            norm: Norm::new(cfg.hidden_size, norm_eps, vb.pp("norm"))?,
        })
    }
}
