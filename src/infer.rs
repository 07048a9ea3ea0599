//! `mone infer`: the model on a raw input tensor from a safetensors file (in the model's input
//! layout, e.g. transformers' (B, T, C, H, W) `pixel_values`), printing the logits. For
//! debugging and logit-parity checks against other implementations.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::model::config::InputLayout;
use crate::model::{self, Config, ForwardOptions, LoadedModel};

#[derive(clap::Args, Debug)]
pub struct InferArgs {
    /// Model folder.
    #[arg(long)]
    pub model: PathBuf,
    /// FILE.safetensors[:NAME]; without NAME, `pixel_values` or the file's only tensor.
    #[arg(long)]
    pub tensor: String,
    /// Capacity e_c in (0, 1]; 1 runs every token at full width.
    #[arg(long, default_value_t = 1.0)]
    pub capacity: f64,
    /// One JSON object on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{path}: no tensor `{name}` (it holds: {have})")]
    NoSuchTensor {
        path: PathBuf,
        name: String,
        have: String,
    },
    #[error("{path}: holds {have}; name one as {path}:NAME")]
    Ambiguous { path: PathBuf, have: String },
    #[error("input `{name}` has shape {got:?}; the model takes {want} ({layout})")]
    Shape {
        name: String,
        got: Vec<usize>,
        want: String,
        layout: &'static str,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Split FILE[:NAME]; a path that exists as given wins over a colon inside it.
pub fn parse_spec(spec: &str) -> (PathBuf, Option<String>) {
    if Path::new(spec).exists() {
        return (PathBuf::from(spec), None);
    }
    match spec.rsplit_once(':') {
        Some((file, name)) if !file.is_empty() && !name.is_empty() => {
            (PathBuf::from(file), Some(name.to_string()))
        }
        _ => (PathBuf::from(spec), None),
    }
}

/// The input tensor named by `spec`, as the model's (B, C, T, H, W) f32 batch.
pub fn read_input(spec: &str, cfg: &Config, device: &Device) -> Result<Tensor, InputError> {
    let (path, name) = parse_spec(spec);
    if !path.is_file() {
        return Err(InputError::File {
            path,
            message: "not found".into(),
        });
    }
    let tensors =
        candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| InputError::File {
            path: path.clone(),
            message: format!("not a readable safetensors file: {e}"),
        })?;
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let have = names
        .iter()
        .map(|n| n.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let name = match name {
        Some(n) if tensors.contains_key(&n) => n,
        Some(n) => {
            return Err(InputError::NoSuchTensor {
                path,
                name: n,
                have,
            })
        }
        None if tensors.contains_key("pixel_values") => "pixel_values".to_string(),
        None if tensors.len() == 1 => names[0].clone(),
        None => return Err(InputError::Ambiguous { path, have }),
    };
    let t = tensors[&name].to_dtype(DType::F32)?;
    let (c, f, s) = (cfg.channels, cfg.frames, cfg.image_size);
    let (want, layout) = match cfg.input_layout {
        InputLayout::Bcthw => ([c, f, s, s], "(B, C, T, H, W)"),
        InputLayout::Btchw => ([f, c, s, s], "(B, T, C, H, W)"),
    };
    // One clip may come without its batch dimension.
    let t = if t.rank() == 4 { t.unsqueeze(0)? } else { t };
    if t.rank() != 5 || t.dims()[1..] != want || t.dim(0)? == 0 {
        return Err(InputError::Shape {
            got: tensors[&name].dims().to_vec(),
            name,
            want: format!("(B, {})", want.map(|x| x.to_string()).join(", ")),
            layout,
        });
    }
    let t = match cfg.input_layout {
        InputLayout::Bcthw => t,
        InputLayout::Btchw => t.permute((0, 2, 1, 3, 4))?.contiguous()?,
    };
    Ok(t.to_device(device)?)
}

/// Logits (B, classes) and the capacity each clip ran at.
pub fn infer(m: &LoadedModel, x: &Tensor, capacity: f64) -> anyhow::Result<(Vec<Vec<f32>>, f64)> {
    let out = m
        .model
        .forward(x, &[capacity], &ForwardOptions::default())?;
    let realised = out.capacity.first().copied().unwrap_or(capacity);
    Ok((out.logits.to_dtype(DType::F32)?.to_vec2::<f32>()?, realised))
}

pub fn run(a: &InferArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.capacity > 0.0 && a.capacity <= 1.0,
        "--capacity must be in (0, 1], got {}",
        a.capacity
    );
    let device = crate::device::open(&a.device)?;
    let m = model::load_model_dir(&a.model, &device)?;
    let x = read_input(&a.tensor, &m.config, &device)?;
    let (logits, realised) = infer(&m, &x, a.capacity)?;
    let top1: Vec<usize> = logits
        .iter()
        .map(|row| {
            row.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(i, _)| i)
        })
        .collect();
    if a.json {
        let v = serde_json::json!({
            "model": a.model,
            "tensor": a.tensor,
            "capacity": a.capacity,
            "realised_capacity": realised,
            "logits": logits,
            "top1": top1.iter().map(|&i| serde_json::json!({"index": i, "label": m.labels[i]})).collect::<Vec<_>>(),
        });
        println!("{v}");
        return Ok(());
    }
    println!(
        "{} clip(s), capacity {} (realised {realised:.3})",
        logits.len(),
        a.capacity
    );
    for (i, row) in logits.iter().enumerate() {
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&x, &y| row[y].total_cmp(&row[x]));
        let best: Vec<String> = order
            .iter()
            .take(5)
            .map(|&k| format!("{} {:.4}", m.labels[k], row[k]))
            .collect();
        println!("clip {i}: {}", best.join(", "));
        let all: Vec<String> = row.iter().map(|v| format!("{v:.6}")).collect();
        println!("  logits [{}]", all.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_splits_at_the_last_colon_unless_the_path_exists() {
        assert_eq!(
            parse_spec("/nonexistent/x.safetensors:pixel_values"),
            (
                PathBuf::from("/nonexistent/x.safetensors"),
                Some("pixel_values".into())
            )
        );
        assert_eq!(
            parse_spec("/nonexistent/x.safetensors"),
            (PathBuf::from("/nonexistent/x.safetensors"), None)
        );
        let dir = std::env::temp_dir().join(format!("mone-infer-spec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let odd = dir.join("a:b.safetensors");
        std::fs::write(&odd, b"x").unwrap();
        let spec = odd.to_string_lossy().to_string();
        assert_eq!(parse_spec(&spec), (odd.clone(), None));
        std::fs::remove_dir_all(&dir).ok();
    }
}
