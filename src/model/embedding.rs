//! Tubelet embedding (a Conv3d whose stride equals its kernel, done as one GEMM over
//! flattened tubelets), the learned position embeddings and the CLS token, for the factorized
//! and the joint encoder.

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
    /// Factorized: (1, N, D) added to every temporal index's spatial tokens
    /// (`spatial_position`). Joint: (1, L, D) over the clip's sequence, CLS first (`position`).
    pub position: Tensor,
    /// Factorized only: (1, L, D), L = temporal tokens (+ 1 with a CLS token).
    pub temporal_position: Option<Tensor>,
    /// The CLS token, (1, 1, D): of the temporal sequence (factorized, `temporal_cls`) or of
    /// the clip (joint, `cls`).
    pub cls: Option<Tensor>,
    cfg: Config,
}

/// A learned position embedding that starts as a fixed sin-cos table. With ViT's usual
/// N(0, 0.02) start, a model trained from scratch on the motion data sat at chance for 600 to
/// 1400+ steps: position then carries about 2% of a token, and the one moving object is one
/// token of 16 in the spatial mean. Starting from unit-amplitude sin-cos it left chance after
/// about 300 steps (docs/training.md). Loaded weights replace it.
fn position(vb: &VarBuilder, name: &str, table: &[f32], n: usize, d: usize) -> Result<Tensor> {
    if vb.contains_tensor(name) {
        return vb.get((1, n, d), name);
    }
    let init = Tensor::from_vec(table.to_vec(), (1, n, d), vb.device())?.to_dtype(vb.dtype())?;
    // get_with_hints creates the variable; then it takes the table's values.
    let t = vb.get_with_hints((1, n, d), name, Init::Const(0.0))?;
    // Variables created by a VarMap share storage with what `get` returns: write through it.
    t.slice_set(&init, 0, 0)?;
    Ok(t)
}

/// (g*g, d): for patch (row, col), sin/cos of col then sin/cos of row at d/4 frequencies each.
pub fn sincos_2d(g: usize, d: usize) -> Vec<f32> {
    let q = (d / 4).max(1);
    let mut pe = vec![0f32; g * g * d];
    for i in 0..g * g {
        let (col, row) = ((i % g) as f32, (i / g) as f32);
        for k in 0..q.min(d / 4) {
            let om = 1.0 / 10000f32.powf(k as f32 / q as f32);
            let r = &mut pe[i * d..(i + 1) * d];
            r[k] = (col * om).sin();
            r[q + k] = (col * om).cos();
            r[2 * q + k] = (row * om).sin();
            r[3 * q + k] = (row * om).cos();
        }
    }
    pe
}

/// (n, d): sin/cos of the position at d/2 frequencies.
pub fn sincos_1d(n: usize, d: usize) -> Vec<f32> {
    let q = (d / 2).max(1);
    let mut pe = vec![0f32; n * d];
    for i in 0..n {
        for k in 0..q.min(d / 2) {
            let om = 1.0 / 10000f32.powf(k as f32 / q as f32);
            pe[i * d + k] = (i as f32 * om).sin();
            pe[i * d + q + k] = (i as f32 * om).cos();
        }
    }
    pe
}

/// (L, d) start for the joint encoder's positions: zeros for the CLS token, then for tubelet
/// (t, patch) the spatial sin-cos table of the patch plus the 1-d table of t.
pub fn sincos_joint(cfg: &Config) -> Vec<f32> {
    let (d, nt, n) = (cfg.hidden_size, cfg.temporal_tokens(), cfg.spatial_tokens());
    let spatial = sincos_2d(cfg.image_size / cfg.patch(), d);
    let temporal = sincos_1d(nt, d);
    let cls = usize::from(cfg.pooling == super::Pooling::Cls);
    let mut pe = vec![0f32; cfg.joint_seq_len() * d];
    for t in 0..nt {
        for i in 0..n {
            let row = &mut pe[(cls + t * n + i) * d..(cls + t * n + i + 1) * d];
            for (k, v) in row.iter_mut().enumerate() {
                *v = spatial[i * d + k] + temporal[t * d + k];
            }
        }
    }
    pe
}

impl Embedding {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let [t, p, _] = cfg.tubelet;
        let pvb = vb.pp("projection");
        let projection_weight = pvb.get_with_hints(
            (d, cfg.channels, t, p, p),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: (1.0 / cfg.tubelet_dim() as f64).sqrt(),
            },
        )?;
        let projection_bias = pvb.get_with_hints(d, "bias", Init::Const(0.0))?;
        let with_cls = cfg.pooling == super::Pooling::Cls;
        if cfg.is_joint() {
            let l = cfg.joint_seq_len();
            return Ok(Self {
                projection_weight,
                projection_bias,
                position: position(&vb, "position", &sincos_joint(cfg), l, d)?,
                temporal_position: None,
                cls: if with_cls {
                    Some(vb.get_with_hints((1, 1, d), "cls", Init::Const(0.0))?)
                } else {
                    None
                },
                cfg: cfg.clone(),
            });
        }
        Ok(Self {
            projection_weight,
            projection_bias,
            position: position(
                &vb,
                "spatial_position",
                &sincos_2d(cfg.image_size / p, d),
                cfg.spatial_tokens(),
                d,
            )?,
            temporal_position: Some(position(
                &vb,
                "temporal_position",
                &sincos_1d(cfg.temporal_seq_len(), d),
                cfg.temporal_seq_len(),
                d,
            )?),
            cls: if with_cls {
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

    /// Factorized: spatial tokens with position embeddings, (B * nt, N, D). Joint: the clip's
    /// sequence (CLS first, then tubelets in (t, row, column) order) with positions, (B, L, D).
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
                    act: None,
                },
            )?
        } else {
            patches
                .matmul(&w.t()?)?
                .broadcast_add(&self.projection_bias)?
        };
        let d = c.hidden_size;
        if c.is_joint() {
            let per_clip = c.temporal_tokens() * c.spatial_tokens();
            let b = rows / per_clip;
            let mut seq = tokens.reshape((b, per_clip, d))?;
            if let Some(cls) = &self.cls {
                seq = Tensor::cat(&[&cls.broadcast_as((b, 1, d))?.contiguous()?, &seq], 1)?;
            }
            return seq.broadcast_add(&self.position);
        }
        let n = c.spatial_tokens();
        tokens
            .reshape((rows / n, n, d))?
            .broadcast_add(&self.position)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn new_variables_start_as_the_sincos_tables() {
        let cfg = Config::preset("vivit-fe-tiny").unwrap();
        let vm = VarMap::new();
        let e =
            Embedding::new(&cfg, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu)).unwrap();
        let want = sincos_2d(cfg.image_size / cfg.tubelet[1], cfg.hidden_size);
        let var = vm.data().lock().unwrap()["spatial_position"]
            .as_tensor()
            .clone();
        for t in [var, e.position] {
            assert_eq!(t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
        }
        // Patch (0, 1) and (1, 0) differ; the table is bounded by 1.
        let d = cfg.hidden_size;
        assert_ne!(want[d..2 * d], want[4 * d..5 * d]);
        assert!(want.iter().all(|v| v.abs() <= 1.0));
    }
}
