//! Tubelet embedding (a Conv3d whose stride equals its kernel, done as one GEMM over
//! flattened tubelets) and the learned position embeddings.

use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::kernels::{NestedInProj, RowGroup};
use super::nested::fused_ok;
use super::Config;

#[derive(Clone, Debug)]
pub struct Embedding {
    /// (D, C, t, p, p), the Conv3d layout.
    pub projection_weight: Tensor,
    pub projection_bias: Tensor,
    /// (1, N, D), added to every temporal index's spatial tokens.
    pub spatial_position: Tensor,
    /// (1, L, D), L = temporal tokens (+ 1 with a CLS token).
    pub temporal_position: Tensor,
    pub temporal_cls: Option<Tensor>,
    cfg: Config,
}

impl Embedding {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let [t, p, _] = cfg.tubelet;
        let pos = Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let pvb = vb.pp("projection");
        Ok(Self {
            projection_weight: pvb.get_with_hints(
                (d, cfg.channels, t, p, p),
                "weight",
                Init::Randn {
                    mean: 0.0,
                    stdev: (1.0 / cfg.tubelet_dim() as f64).sqrt(),
                },
            )?,
            projection_bias: pvb.get_with_hints(d, "bias", Init::Const(0.0))?,
            spatial_position: vb.get_with_hints(
                (1, cfg.spatial_tokens(), d),
                "spatial_position",
                pos,
            )?,
            temporal_position: vb.get_with_hints(
                (1, cfg.temporal_seq_len(), d),
                "temporal_position",
                pos,
            )?,
            temporal_cls: if cfg.pooling == super::Pooling::Cls {
                Some(vb.get_with_hints((1, 1, d), "temporal_cls", Init::Const(0.0))?)
            } else {
                None
            },
            cfg: cfg.clone(),
        })
    }

    /// (B, C, T, H, W) -> tubelets flattened in Conv3d weight order, (B * nt * N, C * t * p * p),
    /// rows ordered (b, temporal index, row, column).
    pub fn tubelets(&self, x: &Tensor) -> Result<Tensor> {
        let c = &self.cfg;
        let (b, ch, frames, h, w) = x.dims5()?;
        if ch != c.channels || frames != c.frames || h != c.image_size || w != c.image_size {
            candle_core::bail!(
                "input clip is ({b}, {ch}, {frames}, {h}, {w}) but the model expects (B, {}, {}, {}, {})",
                c.channels,
                c.frames,
                c.image_size,
                c.image_size
            );
        }
        let [t, p, _] = c.tubelet;
        let (nt, g) = (frames / t, h / p);
        x.reshape(vec![b, ch, nt, t, g, p, g, p])?
            .permute(vec![0, 2, 4, 6, 1, 3, 5, 7])?
            .contiguous()?
            .reshape((b * nt * g * g, c.tubelet_dim()))
    }

    /// Spatial tokens with position embeddings: (B * nt, N, D).
    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let c = &self.cfg;
        let patches = self.tubelets(x)?;
        let w = self
            .projection_weight
            .reshape((c.hidden_size, c.tubelet_dim()))?;
        let rows = patches.dim(0)?;
        let tokens = if fused_ok(&patches, train) {
            let g = [RowGroup {
                row0: 0,
                rows,
                width: c.tubelet_dim(),
            }];
            patches.apply_op3_no_bwd(
                &w,
                &self.projection_bias,
                &NestedInProj {
                    groups: &g,
                    add_bias: true,
                },
            )?
        } else {
            patches
                .matmul(&w.t()?)?
                .broadcast_add(&self.projection_bias)?
        };
        let n = c.spatial_tokens();
        tokens
            .reshape((rows / n, n, c.hidden_size))?
            .broadcast_add(&self.spatial_position)
    }
}
