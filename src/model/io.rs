//! Model folders: `config.json`, `model.safetensors`, `labels.txt`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::{Config, ModelError, MoneVivit};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const LABELS_FILE: &str = "labels.txt";

/// A model loaded from its folder.
#[derive(Clone, Debug)]
pub struct LoadedModel {
    pub dir: PathBuf,
    pub config: Config,
    pub labels: Vec<String>,
    pub model: MoneVivit,
}

fn io_err(path: &Path, e: std::io::Error) -> ModelError {
    ModelError::Io {
        path: path.to_path_buf(),
        error: e,
    }
}

pub fn read_config(path: &Path) -> Result<Config, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    let cfg: Config = serde_json::from_str(&text).map_err(|e| ModelError::Json {
        path: path.to_path_buf(),
        error: e,
    })?;
    cfg.validate()?;
    Ok(cfg)
}

pub fn read_labels(path: &Path, num_classes: usize) -> Result<Vec<String>, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    let labels: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if labels.len() != num_classes {
        return Err(ModelError::Labels(format!(
            "{} has {} labels but the config has num_classes = {num_classes}",
            path.display(),
            labels.len()
        )));
    }
    Ok(labels)
}

/// Compare a safetensors file's tensors with what `cfg` needs; the error names the first
/// missing, misshapen or unexpected tensor.
pub fn check_weights(path: &Path, cfg: &Config) -> Result<(), ModelError> {
    let err = |message: String| ModelError::Weights {
        path: path.to_path_buf(),
        message,
    };
    // SAFETY: the file is only read; a concurrent writer would corrupt our view, as with any mmap.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }
        .map_err(|e| err(format!("not a readable safetensors file: {e}")))?;
    let have: HashMap<String, Vec<usize>> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.shape().to_vec()))
        .collect();
    let expected = cfg.expected_tensors();
    for (name, shape) in &expected {
        match have.get(name) {
            None => return Err(err(format!("tensor `{name}` (shape {shape:?}) is missing"))),
            Some(got) if got != shape => {
                return Err(err(format!(
                    "tensor `{name}` has shape {got:?} but the config needs {shape:?}"
                )))
            }
            _ => {}
        }
    }
    let mut extra: Vec<&String> = have
        .keys()
        .filter(|k| !expected.iter().any(|(n, _)| n == *k))
        .collect();
    extra.sort();
    if let Some(name) = extra.first() {
        return Err(err(format!(
            "tensor `{name}` is not part of this config ({} unexpected tensors): does config.json match the weights?",
            extra.len()
        )));
    }
    Ok(())
}

/// Build the model from a weights file after checking it against the config.
pub fn load_weights(
    path: &Path,
    cfg: &Config,
    device: &Device,
    dtype: DType,
) -> Result<MoneVivit, ModelError> {
    check_weights(path, cfg)?;
    // SAFETY: as above.
    let vb =
        unsafe { VarBuilder::from_mmaped_safetensors(&[path], dtype, device) }.map_err(|e| {
            ModelError::Weights {
                path: path.to_path_buf(),
                message: e.to_string(),
            }
        })?;
    let weights_err = |e: candle_core::Error| ModelError::Weights {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let mut m = MoneVivit::new(cfg, vb).map_err(weights_err)?;
    m.prepack().map_err(weights_err)?;
    Ok(m)
}

pub fn load_model_dir(dir: &Path, device: &Device) -> Result<LoadedModel, ModelError> {
    load_model_dir_as(dir, device, DType::F32)
}

/// Load a model folder with weights and activations in `dtype` (bf16/f16 for GPUs).
pub fn load_model_dir_as(
    dir: &Path,
    device: &Device,
    dtype: DType,
) -> Result<LoadedModel, ModelError> {
    if !dir.is_dir() {
        return Err(ModelError::Io {
            path: dir.to_path_buf(),
            error: std::io::Error::new(std::io::ErrorKind::NotFound, "model folder not found"),
        });
    }
    let config = read_config(&dir.join(CONFIG_FILE))?;
    let labels = read_labels(&dir.join(LABELS_FILE), config.num_classes)?;
    let model = load_weights(&dir.join(WEIGHTS_FILE), &config, device, dtype)?;
    Ok(LoadedModel {
        dir: dir.to_path_buf(),
        config,
        labels,
        model,
    })
}

/// Write a model folder (creating it).
pub fn save_model_dir(
    dir: &Path,
    cfg: &Config,
    labels: &[String],
    tensors: &HashMap<String, Tensor>,
) -> Result<(), ModelError> {
    cfg.validate()?;
    if labels.len() != cfg.num_classes {
        return Err(ModelError::Labels(format!(
            "{} labels for {} classes",
            labels.len(),
            cfg.num_classes
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let cfg_path = dir.join(CONFIG_FILE);
    let json = serde_json::to_string_pretty(cfg).map_err(|e| ModelError::Json {
        path: cfg_path.clone(),
        error: e,
    })?;
    std::fs::write(&cfg_path, json + "\n").map_err(|e| io_err(&cfg_path, e))?;
    let lab_path = dir.join(LABELS_FILE);
    std::fs::write(&lab_path, labels.join("\n") + "\n").map_err(|e| io_err(&lab_path, e))?;
    let w_path = dir.join(WEIGHTS_FILE);
    candle_core::safetensors::save(tensors, &w_path).map_err(|e| ModelError::Weights {
        path: w_path.clone(),
        message: e.to_string(),
    })?;
    Ok(())
}

/// A model with freshly initialised weights, detached from any VarMap (for benchmarks and
/// tests), and its tensors by name.
pub fn random_model(cfg: &Config, device: &Device) -> Result<MoneVivit, ModelError> {
    cfg.validate()?;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, device);
    MoneVivit::new(cfg, vb)?;
    let tensors: HashMap<String, Tensor> = vm
        .data()
        .lock()
        .map_err(|_| ModelError::Config("weight map lock poisoned".into()))?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
    let mut m = MoneVivit::new(cfg, vb)?;
    m.prepack()?;
    Ok(m)
}

/// The same weights in another precision (and on another device).
pub fn convert_model(
    m: &MoneVivit,
    device: &Device,
    dtype: DType,
) -> Result<MoneVivit, ModelError> {
    let tensors = m
        .named_tensors()
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_device(device)?.to_dtype(dtype)?)))
        .collect::<candle_core::Result<HashMap<_, _>>>()?;
    let vb = VarBuilder::from_tensors(tensors, dtype, device);
    let mut out = MoneVivit::new(m.config(), vb)?;
    out.prepack()?;
    Ok(out)
}
