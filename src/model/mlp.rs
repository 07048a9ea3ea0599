//! The nested MLP: fc1 reads the first d_j features into the full hidden width, GELU, fc2
//! writes the first d_j channels, scaled by (alpha * r + 1) for routed tokens.

use std::sync::Arc;

use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::attention::linear;
use super::config::Activation;
use super::cuda;
use super::kernels::gemm512::Packed;
use super::kernels::linear::{prepack_out, FusedAct};
use super::kernels::{NestedInProj, NestedOutAccum};
use super::nested::{fused_ok, in_proj, out_proj, TokenLayout};
use super::profile::{scope, Part};
use super::Config;

#[derive(Clone, Debug)]
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
    pub act: Activation,
    /// fc2's weight packed for the CPU's AVX-512 out-projection (`prepack`).
    pub fc2_packed: Option<Arc<Packed>>,
}

/// Per-row MLP scale (alpha * r + 1): as a (rows, 1) tensor for the generic path and as
/// host values for the fused one.
#[derive(Clone, Debug)]
pub struct RowScale {
    pub tensor: Tensor,
    pub host: Option<Vec<f32>>,
}

fn bias(l: &Linear) -> Result<&Tensor> {
    l.bias()
        .ok_or_else(|| candle_core::Error::Msg("linear layer without bias".into()))
}

impl Mlp {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let (d, m) = (cfg.hidden_size, cfg.mlp_dim());
        Ok(Self {
            fc1: linear(d, m, vb.pp("fc1"))?,
            fc2: linear(m, d, vb.pp("fc2"))?,
            act: cfg.hidden_act,
            fc2_packed: None,
        })
    }

    /// Packs fc2's weight once for the fused CPU path, where it applies (AVX-512, f32). For
    /// weights that no longer change (a loaded model): the fused path would keep using the
    /// packing made here.
    pub fn prepack(&mut self) -> Result<()> {
        self.fc2_packed = prepack_out(self.fc2.weight())?.map(Arc::new);
        Ok(())
    }

    fn act(&self, h: &Tensor) -> Result<Tensor> {
        if h.device().is_cpu() && h.dtype() == candle_core::DType::F32 {
            return h.contiguous()?.apply_op1(super::kernels::Gelu(self.act));
        }
        match self.act {
            Activation::GeluTanh => h.gelu(),
            Activation::GeluErf => h.gelu_erf(),
        }
    }

    /// x + s * MLP(h) for the normalised input h.
    pub fn forward_residual(
        &self,
        x: Tensor,
        h: &Tensor,
        layout: &TokenLayout,
        scale: Option<&RowScale>,
        train: bool,
    ) -> Result<Tensor> {
        if fused_ok(h, train) {
            let host = scale.and_then(|s| s.host.as_deref());
            // fc1 + bias + activation + row scale in one op: the bias comes with the activation
            // pass, so fc1's output is not filled with it first.
            let f = {
                let _p = scope(Part::Fc1);
                h.apply_op3_no_bwd(
                    self.fc1.weight(),
                    bias(&self.fc1)?,
                    &NestedInProj {
                        groups: &layout.groups,
                        add_bias: true,
                        act: Some(FusedAct {
                            act: self.act,
                            row_scale: host,
                        }),
                    },
                )?
            };
            let _p = scope(Part::Fc2);
            let b = bias(&self.fc2)?.to_vec1::<f32>()?;
            x.inplace_op3(
                &f,
                self.fc2.weight(),
                &NestedOutAccum {
                    groups: &layout.groups,
                    bias: &b,
                    row_scale: host,
                    packed: self.fc2_packed.as_deref(),
                },
            )?;
            return Ok(x);
        }
        if cuda::applies(h, train) && x.is_contiguous() {
            let s = scale.map(|s| &s.tensor);
            let f = {
                let _p = scope(Part::Fc1);
                cuda::in_proj(
                    h,
                    self.fc1.weight(),
                    bias(&self.fc1)?,
                    &layout.groups,
                    Some(self.act),
                    s,
                )?
            };
            let _p = scope(Part::Fc2);
            cuda::out_accum(
                &x,
                &f,
                self.fc2.weight(),
                bias(&self.fc2)?,
                &layout.groups,
                s,
            )?;
            return Ok(x);
        }
        let f = {
            let _p = scope(Part::Fc1);
            in_proj(h, self.fc1.weight(), bias(&self.fc1)?, layout)?
        };
        let f = {
            let _p = scope(Part::Activation);
            self.act(&f)?
        };
        let _p = scope(Part::Fc2);
        x + out_proj(
            &f,
            self.fc2.weight(),
            bias(&self.fc2)?,
            layout,
            scale.map(|s| &s.tensor),
        )?
    }

    pub fn forward_plain(&self, h: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.act(&self.fc1.forward(h)?)?)
    }
}
