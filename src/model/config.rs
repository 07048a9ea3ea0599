//! Model configuration, stored as `config.json` in a model folder.

use serde::{Deserialize, Serialize};

use super::ModelError;

/// How the temporal transformer's output becomes one clip vector.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// A learned CLS token is prepended to the temporal sequence.
    #[default]
    Cls,
    /// Mean of the temporal tokens.
    Mean,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// GELU with the tanh approximation (Flax's default, and ViViT's).
    #[default]
    GeluTanh,
    /// Exact GELU (erf).
    GeluErf,
}

fn default_channels() -> usize {
    3
}
fn default_experts() -> usize {
    4
}
fn default_eps() -> f64 {
    1e-6
}
fn default_kind() -> String {
    KIND_FE.to_string()
}

/// The factorized encoder: a routed spatial transformer per temporal index, then a dense
/// temporal transformer (the paper's video model).
pub const KIND_FE: &str = "mone-vivit-fe";
/// Joint space-time attention over every tubelet of the clip (HuggingFace's ViViT and
/// VideoMAE): one routed encoder; `spatial_layers` is its depth and `temporal_layers` is 0.
pub const KIND_JOINT: &str = "mone-vivit-joint";

/// Mobile V-MoE on the factorized encoder: a dense spatial transformer (no nested router),
/// then the temporal transformer whose last `moe.layers` MLPs are each one of `moe.experts`
/// expert MLPs, chosen per clip by one router over the pooled clip representation.
pub const KIND_VMOE: &str = "vmoe-vivit-fe";

fn default_moe_layers() -> usize {
    2
}
fn default_moe_experts() -> usize {
    10
}
fn default_top_k() -> usize {
    1
}

/// The sparse part of a Mobile V-MoE (Daxberger et al. 2023, "Mobile V-MoEs").
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoeConfig {
    /// The last L layers of the temporal transformer are MoE layers.
    #[serde(default = "default_moe_layers")]
    pub layers: usize,
    /// Expert MLPs per MoE layer (E).
    #[serde(default = "default_moe_experts")]
    pub experts: usize,
    /// Experts each clip runs (1 or 2); their router probabilities scale their outputs.
    #[serde(default = "default_top_k")]
    pub top_k: usize,
}

impl Default for MoeConfig {
    fn default() -> Self {
        Self {
            layers: default_moe_layers(),
            experts: default_moe_experts(),
            top_k: default_top_k(),
        }
    }
}

/// How a raw input tensor (`mone infer --tensor`) is laid out; the pipeline always builds
/// (B, C, T, H, W).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum InputLayout {
    /// (B, C, T, H, W), the Conv3d layout.
    #[default]
    Bcthw,
    /// (B, T, C, H, W), transformers' `pixel_values`.
    Btchw,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// A MoNE-ViViT factorized-encoder configuration.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Config {
    /// Model family: [`KIND_FE`], [`KIND_JOINT`] or [`KIND_VMOE`].
    #[serde(default = "default_kind")]
    pub kind: String,
    /// Frames per clip (T).
    pub frames: usize,
    /// Square input size in pixels.
    pub image_size: usize,
    #[serde(default = "default_channels")]
    pub channels: usize,
    /// Tubelet size (t, p, p): frames x pixels x pixels.
    pub tubelet: [usize; 3],
    /// Model width D.
    pub hidden_size: usize,
    pub num_heads: usize,
    /// Depth of the nested, routed stage: the spatial transformer L_s (factorized), or the
    /// whole encoder (joint).
    pub spatial_layers: usize,
    /// Temporal transformer depth L_t (dense; 0 for the joint encoder).
    pub temporal_layers: usize,
    /// MLP hidden width as a multiple of D.
    pub mlp_ratio: f64,
    /// Number of nested experts E; widths are D/2^(E-1) .. D.
    #[serde(default = "default_experts")]
    pub num_experts: usize,
    pub num_classes: usize,
    /// Per-channel normalisation applied to RGB in [0, 1].
    pub mean: [f32; 3],
    pub std: [f32; 3],
    #[serde(default)]
    pub pooling: Pooling,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub hidden_act: Activation,
    /// Epsilon of the final norm before the head, when it differs from `layer_norm_eps`
    /// (VideoMAE's `fc_norm` is a default torch LayerNorm, 1e-5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_norm_eps: Option<f64>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub input_layout: InputLayout,
    /// The expert layers of a [`KIND_VMOE`] model (absent for MoNE models).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe: Option<MoeConfig>,
}

impl Config {
    /// Names accepted by [`Config::preset`].
    pub const PRESETS: &'static [&'static str] = &[
        "vivit-fe-b16",
        "vivit-fe-s16",
        "vivit-fe-motion",
        "vivit-fe-tiny",
        "vivit-b16",
        "vivit-joint-motion",
        "vivit-joint-tiny",
        "vmoe-fe-motion",
        "vmoe-fe-tiny",
    ];

    /// A named preset (random-weight architectures; trained models ship their own config).
    pub fn preset(name: &str) -> Result<Self, ModelError> {
        let base = Config {
            kind: default_kind(),
            frames: 32,
            image_size: 224,
            channels: 3,
            tubelet: [2, 16, 16],
            hidden_size: 768,
            num_heads: 12,
            spatial_layers: 12,
            temporal_layers: 4,
            mlp_ratio: 4.0,
            num_experts: 4,
            num_classes: 400,
            mean: [0.5, 0.5, 0.5],
            std: [0.5, 0.5, 0.5],
            pooling: Pooling::Cls,
            layer_norm_eps: 1e-6,
            hidden_act: Activation::GeluTanh,
            final_norm_eps: None,
            input_layout: InputLayout::Bcthw,
            moe: None,
        };
        let joint = |c: Config| Config {
            kind: KIND_JOINT.to_string(),
            temporal_layers: 0,
            ..c
        };
        let vmoe = |c: Config| Config {
            kind: KIND_VMOE.to_string(),
            moe: Some(MoeConfig::default()),
            ..c
        };
        let cfg = match name {
            // The paper's Kinetics-400 ViViT-FE-B/16x2 (factorized encoder).
            "vivit-fe-b16" => base,
            // A small model that trains on this CPU: 16 frames at 112 px.
            "vivit-fe-s16" => Config {
                frames: 16,
                image_size: 112,
                hidden_size: 192,
                num_heads: 3,
                spatial_layers: 6,
                temporal_layers: 2,
                num_classes: 10,
                ..base
            },
            // The shipped motion model (models/mone-vivit-tiny-motion): small enough to train
            // from scratch in well under an hour on 2 CPU cores.
            "vivit-fe-motion" => Config {
                frames: 16,
                image_size: 32,
                tubelet: [2, 8, 8],
                hidden_size: 64,
                num_heads: 4,
                spatial_layers: 4,
                temporal_layers: 2,
                num_classes: 12,
                ..base
            },
            // For tests: fast enough to run many forwards in a unit test.
            "vivit-fe-tiny" => Config {
                frames: 8,
                image_size: 32,
                tubelet: [2, 8, 8],
                hidden_size: 64,
                num_heads: 4,
                spatial_layers: 2,
                temporal_layers: 1,
                num_classes: 5,
                ..base
            },
            // HuggingFace's google/vivit-b-16x2-kinetics400: joint space-time attention over
            // 16 x 196 tubelets and a CLS token.
            "vivit-b16" => Config {
                input_layout: InputLayout::Btchw,
                ..joint(base)
            },
            // The motion model's size with joint attention (128 tubelets + CLS), for showing
            // MoNE fine-tuning of an imported architecture (docs/import.md).
            "vivit-joint-motion" => joint(Self::preset("vivit-fe-motion")?),
            "vivit-joint-tiny" => joint(Self::preset("vivit-fe-tiny")?),
            // The motion model's architecture with its two temporal layers as MoE layers of
            // 10 experts each (Mobile V-MoE's defaults), top-1.
            "vmoe-fe-motion" => vmoe(Self::preset("vivit-fe-motion")?),
            "vmoe-fe-tiny" => Config {
                moe: Some(MoeConfig {
                    layers: 1,
                    experts: 3,
                    top_k: 1,
                }),
                ..vmoe(Self::preset("vivit-fe-tiny")?)
            },
            other => {
                return Err(ModelError::Config(format!(
                    "unknown preset `{other}`; known presets: {}",
                    Self::PRESETS.join(", ")
                )))
            }
        };
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        let err = |m: String| Err(ModelError::Config(m));
        let [t, ph, pw] = self.tubelet;
        if ![KIND_FE, KIND_JOINT, KIND_VMOE].contains(&self.kind.as_str()) {
            return err(format!(
                "unsupported model kind `{}` (known: {KIND_FE}, {KIND_JOINT}, {KIND_VMOE})",
                self.kind
            ));
        }
        match (self.is_vmoe(), &self.moe) {
            (true, None) => return err(format!("a {KIND_VMOE} model needs a `moe` section")),
            (false, Some(_)) => {
                return err(format!(
                    "`moe` is only for {KIND_VMOE} models, not `{}`",
                    self.kind
                ))
            }
            (true, Some(m)) => {
                if m.layers == 0 || m.layers > self.temporal_layers {
                    return err(format!(
                        "moe.layers must be in 1..={} (the temporal transformer's depth), got {}",
                        self.temporal_layers, m.layers
                    ));
                }
                if m.experts == 0 || m.experts > 256 {
                    return err(format!("moe.experts must be in 1..=256, got {}", m.experts));
                }
                if !(1..=2).contains(&m.top_k) || m.top_k > m.experts {
                    return err(format!(
                        "moe.top_k must be 1 or 2 and at most moe.experts ({}), got {}",
                        m.experts, m.top_k
                    ));
                }
            }
            (false, None) => {}
        }
        if self.is_joint() && self.temporal_layers != 0 {
            return err(format!(
                "a {KIND_JOINT} model has no temporal stage: temporal_layers must be 0, got {}",
                self.temporal_layers
            ));
        }
        if t == 0 || ph == 0 || pw == 0 || ph != pw {
            return err(format!(
                "tubelet must be (t, p, p) with t, p > 0, got {:?}",
                self.tubelet
            ));
        }
        if self.frames == 0 || !self.frames.is_multiple_of(t) {
            return err(format!(
                "frames ({}) must be a positive multiple of the tubelet's t ({t})",
                self.frames
            ));
        }
        if self.image_size == 0 || !self.image_size.is_multiple_of(ph) {
            return err(format!(
                "image_size ({}) must be a positive multiple of the patch size ({ph})",
                self.image_size
            ));
        }
        if self.channels != 3 {
            return err(format!(
                "only 3-channel (RGB) input is supported, got {}",
                self.channels
            ));
        }
        if self.num_heads == 0 || !self.hidden_size.is_multiple_of(self.num_heads) {
            return err(format!(
                "hidden_size ({}) must be divisible by num_heads ({})",
                self.hidden_size, self.num_heads
            ));
        }
        if self.num_experts == 0 || self.num_experts > 8 {
            return err(format!(
                "num_experts must be in 1..=8, got {}",
                self.num_experts
            ));
        }
        if !self.hidden_size.is_multiple_of(1 << (self.num_experts - 1)) {
            return err(format!(
                "hidden_size ({}) must be divisible by 2^(num_experts-1) = {} so every nested width is whole",
                self.hidden_size,
                1 << (self.num_experts - 1)
            ));
        }
        if self.spatial_layers == 0 {
            return err(
                "spatial_layers must be at least 1 (the router sits at the first spatial layer)"
                    .into(),
            );
        }
        if self.num_classes == 0 {
            return err("num_classes must be at least 1".into());
        }
        if self.mlp_ratio.is_nan() || self.mlp_ratio <= 0.0 || self.mlp_dim() == 0 {
            return err(format!(
                "mlp_ratio must be positive, got {}",
                self.mlp_ratio
            ));
        }
        if self.std.iter().any(|s| s.is_nan() || *s <= 0.0) {
            return err(format!("std must be positive, got {:?}", self.std));
        }
        if let Some(e) = self.final_norm_eps.filter(|e| e.is_nan() || *e <= 0.0) {
            return err(format!("final_norm_eps must be positive, got {e}"));
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            return err(format!(
                "layer_norm_eps must be positive, got {}",
                self.layer_norm_eps
            ));
        }
        Ok(())
    }

    pub fn is_joint(&self) -> bool {
        self.kind == KIND_JOINT
    }
    /// A Mobile V-MoE: per-clip expert MLPs instead of MoNE's per-token nested widths.
    pub fn is_vmoe(&self) -> bool {
        self.kind == KIND_VMOE
    }
    /// Whether the model has MoNE's nested router (and so a capacity to turn).
    pub fn is_mone(&self) -> bool {
        !self.is_vmoe()
    }
    /// Tokens the joint encoder attends over per clip: every tubelet, plus the CLS token.
    pub fn joint_seq_len(&self) -> usize {
        self.temporal_tokens() * self.spatial_tokens() + usize::from(self.pooling == Pooling::Cls)
    }
    pub fn final_eps(&self) -> f64 {
        self.final_norm_eps.unwrap_or(self.layer_norm_eps)
    }
    pub fn patch(&self) -> usize {
        self.tubelet[1]
    }
    /// Temporal indices (tubelets along time) per clip.
    pub fn temporal_tokens(&self) -> usize {
        self.frames / self.tubelet[0]
    }
    /// Spatial tokens per temporal index (N).
    pub fn spatial_tokens(&self) -> usize {
        let g = self.image_size / self.patch();
        g * g
    }
    /// Length of the temporal sequence, including the CLS token when pooling with one.
    pub fn temporal_seq_len(&self) -> usize {
        self.temporal_tokens() + usize::from(self.pooling == Pooling::Cls)
    }
    pub fn mlp_dim(&self) -> usize {
        (self.hidden_size as f64 * self.mlp_ratio).round() as usize
    }
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
    /// Input features of one tubelet (C * t * p * p).
    pub fn tubelet_dim(&self) -> usize {
        self.channels * self.tubelet[0] * self.tubelet[1] * self.tubelet[2]
    }
    /// Nested expert widths, smallest first: D/2^(E-1), ..., D/2, D.
    pub fn expert_widths(&self) -> Vec<usize> {
        (0..self.num_experts)
            .map(|i| self.hidden_size >> (self.num_experts - 1 - i))
            .collect()
    }

    /// Whether layer `i` of `stage` holds expert MLPs (the last `moe.layers` temporal layers).
    pub fn expert_layer(&self, stage: &str, i: usize) -> bool {
        self.moe
            .is_some_and(|m| stage == "temporal" && i + m.layers >= self.temporal_layers)
    }

    /// Every tensor the weights file must hold, with its shape.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let d = self.hidden_size;
        let m = self.mlp_dim();
        let [t, p, _] = self.tubelet;
        let mut v: Vec<(String, Vec<usize>)> = vec![
            (
                "embedding.projection.weight".into(),
                vec![d, self.channels, t, p, p],
            ),
            ("embedding.projection.bias".into(), vec![d]),
        ];
        if let Some(moe) = &self.moe {
            v.push(("moe_router.weight".into(), vec![moe.experts, d]));
            v.push(("moe_router.bias".into(), vec![moe.experts]));
        } else {
            v.push(("router.weight".into(), vec![self.num_experts, d]));
            v.push(("router.bias".into(), vec![self.num_experts]));
            v.push(("router.alpha".into(), vec![1]));
        }
        let cls = self.pooling == Pooling::Cls;
        let stages: Vec<(&str, usize)> = if self.is_joint() {
            v.push((
                "embedding.position".into(),
                vec![1, self.joint_seq_len(), d],
            ));
            if cls {
                v.push(("embedding.cls".into(), vec![1, 1, d]));
            }
            vec![("encoder", self.spatial_layers)]
        } else {
            v.push((
                "embedding.spatial_position".into(),
                vec![1, self.spatial_tokens(), d],
            ));
            v.push((
                "embedding.temporal_position".into(),
                vec![1, self.temporal_seq_len(), d],
            ));
            if cls {
                v.push(("embedding.temporal_cls".into(), vec![1, 1, d]));
            }
            vec![
                ("spatial", self.spatial_layers),
                ("temporal", self.temporal_layers),
            ]
        };
        for (stage, layers) in stages {
            for i in 0..layers {
                let pre = format!("{stage}.layers.{i}");
                for (name, shape) in [
                    ("norm1.weight", vec![d]),
                    ("norm1.bias", vec![d]),
                    ("attention.qkv.weight", vec![3 * d, d]),
                    ("attention.qkv.bias", vec![3 * d]),
                    ("attention.proj.weight", vec![d, d]),
                    ("attention.proj.bias", vec![d]),
                    ("norm2.weight", vec![d]),
                    ("norm2.bias", vec![d]),
                ] {
                    v.push((format!("{pre}.{name}"), shape));
                }
                let mlps: Vec<String> = match self.expert_layer(stage, i) {
                    true => (0..self.moe.map_or(0, |m| m.experts))
                        .map(|j| format!("{pre}.mlp.experts.{j}"))
                        .collect(),
                    false => vec![format!("{pre}.mlp")],
                };
                for mlp in mlps {
                    for (name, shape) in [
                        ("fc1.weight", vec![m, d]),
                        ("fc1.bias", vec![m]),
                        ("fc2.weight", vec![d, m]),
                        ("fc2.bias", vec![d]),
                    ] {
                        v.push((format!("{mlp}.{name}"), shape));
                    }
                }
            }
            v.push((format!("{stage}.norm.weight"), vec![d]));
            v.push((format!("{stage}.norm.bias"), vec![d]));
        }
        v.push(("head.weight".into(), vec![self.num_classes, d]));
        v.push(("head.bias".into(), vec![self.num_classes]));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_roundtrip_through_json() {
        for name in Config::PRESETS {
            let cfg = Config::preset(name).unwrap();
            cfg.validate().unwrap();
            let json = serde_json::to_string(&cfg).unwrap();
            let back: Config = serde_json::from_str(&json).unwrap();
            assert_eq!(cfg, back);
        }
        let b16 = Config::preset("vivit-fe-b16").unwrap();
        assert_eq!(b16.spatial_tokens(), 196);
        assert_eq!(b16.temporal_tokens(), 16);
        assert_eq!(b16.expert_widths(), vec![96, 192, 384, 768]);
    }

    #[test]
    fn invalid_configs_are_rejected_with_a_reason() {
        let mut c = Config::preset("vivit-fe-tiny").unwrap();
        c.image_size = 30;
        assert!(c.validate().unwrap_err().to_string().contains("image_size"));
        let mut c = Config::preset("vivit-fe-tiny").unwrap();
        c.hidden_size = 60;
        assert!(c.validate().is_err());
        let mut c = Config::preset("vivit-fe-tiny").unwrap();
        c.num_experts = 5; // 64 / 16 = 4 is fine, but 60 would not be
        c.validate().unwrap();
        let mut c = Config::preset("vmoe-fe-tiny").unwrap();
        c.moe = Some(MoeConfig {
            layers: 2,
            ..MoeConfig::default()
        });
        assert!(c.validate().unwrap_err().to_string().contains("moe.layers"));
        c.moe = Some(MoeConfig {
            layers: 1,
            experts: 2,
            top_k: 3,
        });
        assert!(c.validate().unwrap_err().to_string().contains("top_k"));
        c.moe = None;
        assert!(c.validate().unwrap_err().to_string().contains("moe"));
        let mut c = Config::preset("vivit-fe-tiny").unwrap();
        c.moe = Some(MoeConfig::default());
        assert!(c.validate().is_err());
        assert!(Config::preset("nope").is_err());
    }
}
