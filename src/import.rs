//! `mone import-hf`: video classifiers saved by HuggingFace transformers (ViViT, VideoMAE) as
//! mone model folders (the joint space-time encoder), with the input normalisation taken from
//! the checkpoint's preprocessing config. Nothing is downloaded: the source is a local folder.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::dataset::Rng;
use crate::model::config::{InputLayout, KIND_JOINT};
use crate::model::{self, Activation, Config, ModelError, Pooling};

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: malformed JSON: {error}")]
    Json {
        path: PathBuf,
        error: serde_json::Error,
    },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Weights { path: PathBuf, message: String },
    #[error("cannot map checkpoint tensor `{name}`: {why}")]
    Unmapped { name: String, why: String },
    #[error("checkpoint tensor `{name}` is missing")]
    Missing { name: String },
    #[error("checkpoint tensor `{name}` has shape {got:?}; the config implies {want:?}")]
    Shape {
        name: String,
        got: Vec<usize>,
        want: Vec<usize>,
    },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The two architectures `import-hf` maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Vivit,
    VideoMae,
}

impl Arch {
    fn prefix(self) -> &'static str {
        match self {
            Arch::Vivit => "vivit.",
            Arch::VideoMae => "videomae.",
        }
    }
}

/// What an import produced.
#[derive(Clone, Debug)]
pub struct Imported {
    pub arch: Arch,
    pub config: Config,
    pub labels: Vec<String>,
    pub out: PathBuf,
}

fn read_json(path: &Path) -> Result<Value, ImportError> {
    let text = std::fs::read_to_string(path).map_err(|error| ImportError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    serde_json::from_str(&text).map_err(|error| ImportError::Json {
        path: path.to_path_buf(),
        error,
    })
}

/// Typed access to a transformers config with errors that name the file and the field.
struct Fields<'a> {
    v: &'a Value,
    path: &'a Path,
}

impl Fields<'_> {
    fn err(&self, message: String) -> ImportError {
        ImportError::Config {
            path: self.path.to_path_buf(),
            message,
        }
    }
    fn usize_or(&self, key: &str, default: Option<usize>) -> Result<usize, ImportError> {
        match self.v.get(key) {
            None | Some(Value::Null) => {
                default.ok_or_else(|| self.err(format!("`{key}` is missing")))
            }
            Some(v) => v.as_u64().map(|x| x as usize).ok_or_else(|| {
                self.err(format!("`{key}` must be a non-negative integer, got {v}"))
            }),
        }
    }
    fn f64_or(&self, key: &str, default: f64) -> Result<f64, ImportError> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.err(format!("`{key}` must be a number, got {v}"))),
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool, ImportError> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(format!("`{key}` must be true or false, got {v}"))),
        }
    }
    fn str(&self, key: &str) -> Option<&str> {
        self.v.get(key).and_then(Value::as_str)
    }
    /// A size given as one integer or as [h, w] with h == w.
    fn square(&self, key: &str, default: Option<usize>) -> Result<usize, ImportError> {
        match self.v.get(key) {
            Some(Value::Array(a)) => {
                let xs: Vec<u64> = a.iter().filter_map(Value::as_u64).collect();
                match xs.as_slice() {
                    [h, w] if h == w => Ok(*h as usize),
                    _ => Err(self.err(format!("`{key}` must be square, got {}", self.v[key]))),
                }
            }
            _ => self.usize_or(key, default),
        }
    }
    /// Three floats (a single number means the same for every channel).
    fn triple(&self, key: &str, default: [f64; 3]) -> Result<[f64; 3], ImportError> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Number(n)) => {
                let x = n.as_f64().unwrap_or(f64::NAN);
                Ok([x; 3])
            }
            Some(Value::Array(a)) if a.len() == 3 => {
                let mut out = [0.0; 3];
                for (o, v) in out.iter_mut().zip(a) {
                    *o = v
                        .as_f64()
                        .ok_or_else(|| self.err(format!("`{key}` must hold numbers")))?;
                }
                Ok(out)
            }
            Some(v) => Err(self.err(format!("`{key}` must be 3 numbers, got {v}"))),
        }
    }
}

/// The architecture named by a transformers config.
fn arch_of(cfg: &Fields) -> Result<Arch, ImportError> {
    let arch = match cfg.str("model_type") {
        Some("vivit") => Arch::Vivit,
        Some("videomae") => Arch::VideoMae,
        Some(other) => {
            return Err(cfg.err(format!(
                "model_type `{other}` is not supported (supported: vivit, videomae)"
            )))
        }
        None => return Err(cfg.err("`model_type` is missing".into())),
    };
    if let Some(Value::Array(names)) = cfg.v.get("architectures") {
        let names: Vec<&str> = names.iter().filter_map(Value::as_str).collect();
        if !names.iter().any(|n| n.ends_with("ForVideoClassification")) {
            return Err(cfg.err(format!(
                "architectures {names:?} has no video classification head; import a \
                 *ForVideoClassification checkpoint (e.g. one fine-tuned on Kinetics-400)"
            )));
        }
    }
    Ok(arch)
}

/// Input mean/std for RGB in [0, 1] equivalent to transformers' preprocessing
/// ((p * rescale_factor - offset) - mean) / std of 8-bit pixels p.
pub fn normalisation(
    arch: Arch,
    pre: Option<&Value>,
    path: &Path,
) -> Result<([f32; 3], [f32; 3]), ImportError> {
    let empty = Value::Object(Default::default());
    let f = Fields {
        v: pre.unwrap_or(&empty),
        path,
    };
    let (rescale_default, offset_default, mean_default, std_default) = match arch {
        // VivitImageProcessor: 1/127.5 with offset (to [-1, 1]), then ImageNet "standard" 0.5.
        Arch::Vivit => (1.0 / 127.5, true, [0.5; 3], [0.5; 3]),
        // VideoMAEImageProcessor: 1/255, then ImageNet's mean and std.
        Arch::VideoMae => (
            1.0 / 255.0,
            false,
            [0.485, 0.456, 0.406],
            [0.229, 0.224, 0.225],
        ),
    };
    let rf = if f.bool_or("do_rescale", true)? {
        f.f64_or("rescale_factor", rescale_default)?
    } else {
        1.0
    };
    let off = if f.bool_or("offset", offset_default)? {
        1.0
    } else {
        0.0
    };
    let (m, s) = if f.bool_or("do_normalize", true)? {
        (
            f.triple("image_mean", mean_default)?,
            f.triple("image_std", std_default)?,
        )
    } else {
        ([0.0; 3], [1.0; 3])
    };
    if rf.is_nan() || rf <= 0.0 || s.iter().any(|x| x.is_nan() || *x <= 0.0) {
        return Err(f.err(format!(
            "rescale_factor ({rf}) and image_std ({s:?}) must be positive"
        )));
    }
    // p = 255 x: ((255 rf x - off) - m) / s = (x - (off + m) / (255 rf)) / (s / (255 rf)).
    let k = 255.0 * rf;
    let mean = [0, 1, 2].map(|c| ((off + m[c]) / k) as f32);
    let std = [0, 1, 2].map(|c| (s[c] / k) as f32);
    Ok((mean, std))
}

/// Our config for a transformers ViViT/VideoMAE config.
fn config_from(
    arch: Arch,
    f: &Fields,
    pre: Option<&Value>,
    pre_path: &Path,
    experts: usize,
    num_classes: usize,
) -> Result<Config, ImportError> {
    let d = f.usize_or("hidden_size", None)?;
    let heads = f.usize_or("num_attention_heads", None)?;
    let layers = f.usize_or("num_hidden_layers", None)?;
    let inter = f.usize_or("intermediate_size", None)?;
    let image = f.square("image_size", None)?;
    let frames = f.usize_or("num_frames", None)?;
    let channels = f.usize_or("num_channels", Some(3))?;
    let tubelet = match arch {
        Arch::Vivit => match f.v.get("tubelet_size") {
            Some(Value::Array(a)) => {
                let t: Vec<usize> = a
                    .iter()
                    .filter_map(Value::as_u64)
                    .map(|x| x as usize)
                    .collect();
                match t.as_slice() {
                    [t, h, w] if h == w => [*t, *h, *w],
                    _ => {
                        return Err(f.err(format!(
                            "`tubelet_size` must be [t, p, p], got {}",
                            f.v["tubelet_size"]
                        )))
                    }
                }
            }
            _ => return Err(f.err("`tubelet_size` must be [t, p, p]".into())),
        },
        Arch::VideoMae => {
            let p = f.square("patch_size", None)?;
            [f.usize_or("tubelet_size", Some(2))?, p, p]
        }
    };
    let act = match f.str("hidden_act") {
        Some("gelu_fast") | Some("gelu_new") | Some("gelu_pytorch_tanh") => Activation::GeluTanh,
        Some("gelu") => Activation::GeluErf,
        Some(other) => {
            return Err(f.err(format!(
            "hidden_act `{other}` is not supported (gelu, gelu_fast, gelu_new, gelu_pytorch_tanh)"
        )))
        }
        None => match arch {
            Arch::Vivit => Activation::GeluTanh,
            Arch::VideoMae => Activation::GeluErf,
        },
    };
    let eps = f.f64_or(
        "layer_norm_eps",
        match arch {
            Arch::Vivit => 1e-6,
            Arch::VideoMae => 1e-12,
        },
    )?;
    let (pooling, final_norm_eps) = match arch {
        Arch::Vivit => (Pooling::Cls, None),
        Arch::VideoMae => {
            if !f.bool_or("use_mean_pooling", true)? {
                return Err(f.err(
                    "use_mean_pooling = false (classify the first patch token) is not supported"
                        .into(),
                ));
            }
            // fc_norm is nn.LayerNorm(hidden_size) with torch's default eps.
            (Pooling::Mean, Some(1e-5))
        }
    };
    let (mean, std) = normalisation(arch, pre, pre_path)?;
    if d == 0 || inter == 0 {
        return Err(f.err("hidden_size and intermediate_size must be positive".into()));
    }
    // As many nested experts as the width allows (D/2^(E-1) must be whole), up to `experts`.
    let mut e = experts.clamp(1, 8);
    while e > 1 && !d.is_multiple_of(1 << (e - 1)) {
        e -= 1;
    }
    let cfg = Config {
        kind: KIND_JOINT.to_string(),
        frames,
        image_size: image,
        channels,
        tubelet,
        hidden_size: d,
        num_heads: heads,
        spatial_layers: layers,
        temporal_layers: 0,
        mlp_ratio: inter as f64 / d as f64,
        num_experts: e,
        num_classes,
        mean,
        std,
        pooling,
        layer_norm_eps: eps,
        hidden_act: act,
        final_norm_eps,
        input_layout: InputLayout::Btchw,
        moe: None,
    };
    if cfg.mlp_dim() != inter {
        return Err(f.err(format!("intermediate_size {inter} is not representable")));
    }
    cfg.validate()?;
    Ok(cfg)
}

/// Class names from `id2label` (ids 0..n-1, each present once).
fn labels_of(f: &Fields) -> Result<Vec<String>, ImportError> {
    let Some(Value::Object(map)) = f.v.get("id2label") else {
        return Err(f.err("`id2label` is missing: the checkpoint names no classes".into()));
    };
    let mut by_id = BTreeMap::new();
    for (k, v) in map {
        let id: usize = k
            .parse()
            .map_err(|_| f.err(format!("id2label key `{k}` is not an integer")))?;
        let name = v
            .as_str()
            .ok_or_else(|| f.err(format!("id2label[{k}] is not a string")))?;
        // One label per line in labels.txt.
        by_id.insert(id, name.replace(['\n', '\r'], " ").trim().to_string());
    }
    let n = by_id.len();
    if n == 0 || by_id.keys().copied().ne(0..n) {
        return Err(f.err(format!("id2label must number its {n} classes 0..{n}")));
    }
    Ok(by_id.into_values().collect())
}

/// VideoMAE's fixed position table: sin at even and cos at odd channels of
/// pos / 10000^(2 floor(j/2) / d), in f64 as numpy computes it.
pub fn videomae_sinusoid(n: usize, d: usize) -> Vec<f32> {
    let mut t = vec![0f32; n * d];
    for p in 0..n {
        for j in 0..d {
            let angle = p as f64 / 10000f64.powf(2.0 * (j / 2) as f64 / d as f64);
            t[p * d + j] = if j % 2 == 0 { angle.sin() } else { angle.cos() } as f32;
        }
    }
    t
}

/// The checkpoint's tensors (one file or a sharded index), on the CPU in f32.
fn read_tensors(dir: &Path) -> Result<HashMap<String, Tensor>, ImportError> {
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if single.exists() {
        vec![single]
    } else if index.exists() {
        let v = read_json(&index)?;
        let Some(Value::Object(map)) = v.get("weight_map") else {
            return Err(ImportError::Config {
                path: index,
                message: "`weight_map` is missing".into(),
            });
        };
        let mut shards: Vec<PathBuf> = map
            .values()
            .filter_map(Value::as_str)
            .map(|s| dir.join(s))
            .collect();
        shards.sort();
        shards.dedup();
        shards
    } else if dir.join("pytorch_model.bin").exists() {
        return Err(ImportError::Weights {
            path: dir.join("pytorch_model.bin"),
            message: "pickled PyTorch weights are not read (they can run code); convert them \
                      once with transformers: model.save_pretrained(dir, safe_serialization=True)"
                .into(),
        });
    } else {
        return Err(ImportError::Io {
            path: single,
            error: std::io::Error::new(std::io::ErrorKind::NotFound, "no model.safetensors"),
        });
    };
    let mut all = HashMap::new();
    for f in files {
        let t =
            candle_core::safetensors::load(&f, &Device::Cpu).map_err(|e| ImportError::Weights {
                path: f.clone(),
                message: format!("not a readable safetensors file: {e}"),
            })?;
        for (k, v) in t {
            all.insert(k, v.to_dtype(DType::F32)?);
        }
    }
    Ok(all)
}

/// Checkpoint tensors by their transformers 4 names (what the Hub's checkpoints and
/// `save_pretrained` use), also accepting the module names of transformers 5.
fn canonical(name: &str) -> String {
    let mut s = name.to_string();
    for (new, old) in [
        (".layers.", ".encoder.layer."),
        ("attention.q_proj.", "attention.attention.query."),
        ("attention.k_proj.", "attention.attention.key."),
        ("attention.v_proj.", "attention.attention.value."),
        ("attention.o_proj.", "attention.output.dense."),
        ("mlp.fc1.", "intermediate.dense."),
        ("mlp.fc2.", "output.dense."),
        (
            "attention.attention.q_bias",
            "attention.attention.query.bias",
        ),
        (
            "attention.attention.v_bias",
            "attention.attention.value.bias",
        ),
    ] {
        if s.contains(new) && !s.contains(old) {
            s = s.replace(new, old);
        }
    }
    s
}

/// Takes tensors out of the checkpoint by name, checking shapes; what is left over at the end
/// could not be mapped.
struct Source {
    t: HashMap<String, Tensor>,
}

impl Source {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor, ImportError> {
        let t = self.t.remove(name).ok_or_else(|| ImportError::Missing {
            name: name.to_string(),
        })?;
        if t.dims() != shape {
            return Err(ImportError::Shape {
                name: name.to_string(),
                got: t.dims().to_vec(),
                want: shape.to_vec(),
            });
        }
        Ok(t)
    }
    fn take_opt(&mut self, name: &str, shape: &[usize]) -> Result<Option<Tensor>, ImportError> {
        if self.t.contains_key(name) {
            self.take(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }
}

/// Our weights for a checkpoint's tensors.
fn map_tensors(
    arch: Arch,
    cfg: &Config,
    tensors: HashMap<String, Tensor>,
    bias: bool,
    seed: u64,
) -> Result<HashMap<String, Tensor>, ImportError> {
    let dev = Device::Cpu;
    let pre = arch.prefix();
    let mut src = Source {
        t: tensors
            .into_iter()
            .map(|(k, v)| (canonical(&k), v))
            .collect(),
    };
    let (d, m) = (cfg.hidden_size, cfg.mlp_dim());
    let [t, p, _] = cfg.tubelet;
    let mut out = HashMap::new();
    let emb = format!("{pre}embeddings.patch_embeddings.projection");
    out.insert(
        "embedding.projection.weight".to_string(),
        src.take(&format!("{emb}.weight"), &[d, cfg.channels, t, p, p])?,
    );
    out.insert(
        "embedding.projection.bias".to_string(),
        src.take(&format!("{emb}.bias"), &[d])?,
    );
    let l = cfg.joint_seq_len();
    match arch {
        Arch::Vivit => {
            out.insert(
                "embedding.cls".into(),
                src.take(&format!("{pre}embeddings.cls_token"), &[1, 1, d])?,
            );
            out.insert(
                "embedding.position".into(),
                src.take(&format!("{pre}embeddings.position_embeddings"), &[1, l, d])?,
            );
        }
        Arch::VideoMae => {
            out.insert(
                "embedding.position".into(),
                Tensor::from_vec(videomae_sinusoid(l, d), (1, l, d), &dev)?,
            );
        }
    }
    let zeros = Tensor::zeros(d, DType::F32, &dev)?;
    for i in 0..cfg.spatial_layers {
        let s = format!("{pre}encoder.layer.{i}");
        let o = format!("encoder.layers.{i}");
        let mut put = |k: &str, v: Tensor| out.insert(format!("{o}.{k}"), v);
        put(
            "norm1.weight",
            src.take(&format!("{s}.layernorm_before.weight"), &[d])?,
        );
        put(
            "norm1.bias",
            src.take(&format!("{s}.layernorm_before.bias"), &[d])?,
        );
        put(
            "norm2.weight",
            src.take(&format!("{s}.layernorm_after.weight"), &[d])?,
        );
        put(
            "norm2.bias",
            src.take(&format!("{s}.layernorm_after.bias"), &[d])?,
        );
        let a = format!("{s}.attention.attention");
        let mut w = Vec::new();
        let mut b = Vec::new();
        for proj in ["query", "key", "value"] {
            w.push(src.take(&format!("{a}.{proj}.weight"), &[d, d])?);
            // VideoMAE has no key bias (and none at all without qv_bias); a zero bias is the same.
            let pb = src.take_opt(&format!("{a}.{proj}.bias"), &[d])?;
            if bias && pb.is_none() && !(arch == Arch::VideoMae && proj == "key") {
                return Err(ImportError::Missing {
                    name: format!("{a}.{proj}.bias"),
                });
            }
            b.push(pb.unwrap_or_else(|| zeros.clone()));
        }
        put("attention.qkv.weight", Tensor::cat(&w, 0)?);
        put("attention.qkv.bias", Tensor::cat(&b, 0)?);
        for (ours, theirs, out, inp) in [
            ("attention.proj", "attention.output.dense", d, d),
            ("mlp.fc1", "intermediate.dense", m, d),
            ("mlp.fc2", "output.dense", d, m),
        ] {
            put(
                &format!("{ours}.weight"),
                src.take(&format!("{s}.{theirs}.weight"), &[out, inp])?,
            );
            put(
                &format!("{ours}.bias"),
                src.take(&format!("{s}.{theirs}.bias"), &[out])?,
            );
        }
    }
    let norm = match arch {
        Arch::Vivit => format!("{pre}layernorm"),
        Arch::VideoMae => "fc_norm".to_string(),
    };
    out.insert(
        "encoder.norm.weight".into(),
        src.take(&format!("{norm}.weight"), &[d])?,
    );
    out.insert(
        "encoder.norm.bias".into(),
        src.take(&format!("{norm}.bias"), &[d])?,
    );
    let k = cfg.num_classes;
    out.insert(
        "head.weight".into(),
        src.take("classifier.weight", &[k, d])?,
    );
    out.insert("head.bias".into(), src.take("classifier.bias", &[k])?);
    // The checkpoint has no router: a small seeded random one, and alpha 0 so that the
    // router does not change any token's output until fine-tuning trains it.
    let e = cfg.num_experts;
    let mut rng = Rng::new(seed);
    // Uniform with std 0.02 (half-width 0.02 * sqrt(3)).
    let w: Vec<f32> = (0..e * d)
        .map(|_| rng.range(-0.034_641, 0.034_641))
        .collect();
    out.insert("router.weight".into(), Tensor::from_vec(w, (e, d), &dev)?);
    out.insert("router.bias".into(), Tensor::zeros(e, DType::F32, &dev)?);
    out.insert("router.alpha".into(), Tensor::zeros(1, DType::F32, &dev)?);
    let mut left: Vec<&String> = src.t.keys().collect();
    left.sort();
    if let Some(name) = left.first() {
        return Err(ImportError::Unmapped {
            name: name.to_string(),
            why: format!(
                "no part of a {} video classifier uses it ({} tensors left over)",
                match arch {
                    Arch::Vivit => "ViViT",
                    Arch::VideoMae => "VideoMAE",
                },
                left.len()
            ),
        });
    }
    Ok(out)
}

/// Import the transformers checkpoint folder `src` into the model folder `out`.
pub fn import_hf(src: &Path, out: &Path, experts: usize) -> Result<Imported, ImportError> {
    if !src.is_dir() {
        return Err(ImportError::Io {
            path: src.to_path_buf(),
            error: std::io::Error::new(std::io::ErrorKind::NotFound, "checkpoint folder not found"),
        });
    }
    let cfg_path = src.join("config.json");
    let v = read_json(&cfg_path)?;
    let f = Fields {
        v: &v,
        path: &cfg_path,
    };
    let arch = arch_of(&f)?;
    let pre_path = src.join("preprocessor_config.json");
    let pre = if pre_path.exists() {
        Some(read_json(&pre_path)?)
    } else {
        None
    };
    let labels = labels_of(&f)?;
    let config = config_from(arch, &f, pre.as_ref(), &pre_path, experts, labels.len())?;
    let bias = match arch {
        Arch::Vivit => f.bool_or("qkv_bias", true)?,
        Arch::VideoMae => f.bool_or("qv_bias", f.bool_or("qkv_bias", true)?)?,
    };
    let tensors = read_tensors(src)?;
    let weights = map_tensors(arch, &config, tensors, bias, 0x4d6f_4e45)?;
    model::save_model_dir(out, &config, &labels, &weights)?;
    std::fs::write(
        out.join("MODEL_CARD.md"),
        model_card(arch, src, &config, pre.is_some()),
    )
    .map_err(|error| ImportError::Io {
        path: out.join("MODEL_CARD.md"),
        error,
    })?;
    // The folder must load as written.
    model::load_model_dir(out, &Device::Cpu)?;
    Ok(Imported {
        arch,
        config,
        labels,
        out: out.to_path_buf(),
    })
}

fn model_card(arch: Arch, src: &Path, c: &Config, had_pre: bool) -> String {
    let name = match arch {
        Arch::Vivit => "ViViT (VivitForVideoClassification)",
        Arch::VideoMae => "VideoMAE (VideoMAEForVideoClassification)",
    };
    let flops = model::flops::macs(c, None)
        .map(|m| format!("{:.1}", m.gmacs()))
        .unwrap_or_else(|_| "?".into());
    format!(
        "# Imported {name}\n\n\
         Imported by `mone import-hf` from `{src}` (HuggingFace transformers format).\n\n\
         - Joint space-time encoder: {layers} layers, width {d}, {heads} heads, MLP {m}; \
         {frames} frames at {size} px in tubelets of {tub:?}; {tokens} tokens per clip; \
         {classes} classes; {flops} GMACs per clip (dense).\n\
         - Pooling: {pool}; GELU: {act}; LayerNorm eps {eps:e}{fin}.\n\
         - Input normalisation for RGB in [0, 1]: mean {mean:?}, std {std:?} ({pre}). The \
         pipeline resizes each frame to {size} x {size}; transformers' processors resize the \
         short side and centre-crop, so framing can differ slightly.\n\
         - `mone infer --tensor` takes transformers' (B, T, C, H, W) `pixel_values`.\n\n\
         ## MoNE capacity\n\n\
         The checkpoint was trained dense. At capacity 1 (the default) this model computes \
         what transformers computes. Its router ({e} nested experts) is not trained: at lower \
         capacities accuracy falls until it is fine-tuned with `mone train --init <this folder> \
         --dataset <labelled videos>` (docs/import.md).\n",
        src = src.display(),
        layers = c.spatial_layers,
        d = c.hidden_size,
        heads = c.num_heads,
        m = c.mlp_dim(),
        frames = c.frames,
        size = c.image_size,
        tub = c.tubelet,
        tokens = c.joint_seq_len(),
        classes = c.num_classes,
        pool = match c.pooling {
            Pooling::Cls => "CLS token",
            Pooling::Mean => "mean of all tokens, then the final norm",
        },
        act = match c.hidden_act {
            Activation::GeluTanh => "tanh approximation",
            Activation::GeluErf => "exact (erf)",
        },
        eps = c.layer_norm_eps,
        fin = c
            .final_norm_eps
            .map(|e| format!(" (final norm {e:e})"))
            .unwrap_or_default(),
        mean = c.mean,
        std = c.std,
        pre = if had_pre {
            "from preprocessor_config.json"
        } else {
            "the processor's defaults: the checkpoint has no preprocessor_config.json"
        },
        e = c.num_experts,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vivit_and_videomae_preprocessing_become_unit_range_normalisation() {
        let p = Path::new("preprocessor_config.json");
        // ViViT: (p/127.5 - 1 - 0.5) / 0.5 = (x - 0.75) / 0.25 for x = p / 255.
        let (m, s) = normalisation(Arch::Vivit, None, p).unwrap();
        assert!(m.iter().all(|v| (v - 0.75).abs() < 1e-6), "{m:?}");
        assert!(s.iter().all(|v| (v - 0.25).abs() < 1e-6), "{s:?}");
        // VideoMAE: ImageNet statistics on p / 255 unchanged.
        let (m, s) = normalisation(Arch::VideoMae, None, p).unwrap();
        assert!((m[0] - 0.485).abs() < 1e-6 && (s[2] - 0.225).abs() < 1e-6);
        let v: Value = serde_json::json!({"do_normalize": false, "offset": false});
        let (m, s) = normalisation(Arch::Vivit, Some(&v), p).unwrap();
        assert!((m[0] - 0.0).abs() < 1e-6 && (s[0] - 0.5).abs() < 1e-6);
        let bad: Value = serde_json::json!({"image_std": [0.5, 0.0, 0.5]});
        assert!(normalisation(Arch::Vivit, Some(&bad), p).is_err());
    }

    #[test]
    fn sinusoid_table_matches_the_numpy_formula() {
        let t = videomae_sinusoid(5, 6);
        // Position 3, channel 2: sin(3 / 10000^(2/6)); channel 3: cos of the same angle.
        let a = 3.0f64 / 10000f64.powf(2.0 / 6.0);
        assert!((t[3 * 6 + 2] as f64 - a.sin()).abs() < 1e-7);
        assert!((t[3 * 6 + 3] as f64 - a.cos()).abs() < 1e-7);
        assert_eq!(t[0], 0.0);
        assert_eq!(t[1], 1.0);
    }

    #[test]
    fn transformers_5_module_names_map_to_the_checkpoint_names() {
        assert_eq!(
            canonical("vivit.layers.3.attention.q_proj.weight"),
            "vivit.encoder.layer.3.attention.attention.query.weight"
        );
        assert_eq!(
            canonical("videomae.encoder.layer.0.attention.attention.q_bias"),
            "videomae.encoder.layer.0.attention.attention.query.bias"
        );
        assert_eq!(
            canonical("vivit.encoder.layer.0.output.dense.bias"),
            "vivit.encoder.layer.0.output.dense.bias"
        );
    }
}
