//! Channel rewiring (DynaBERT's idea for nested widths): permute the residual stream's D
//! channels so that the most important ones sit in the shared narrow slice that every
//! nested expert reads and writes. Every tensor that reads or writes the residual stream is
//! permuted the same way, and LayerNorm normalises over all D channels whatever the expert,
//! so the full-width function is unchanged; the narrow widths see other channels.

use std::collections::HashMap;

use candle_core::{Result, Tensor};

use super::Config;

/// Which dimension of a weight indexes residual channels (None: it does not touch them).
fn residual_dim(name: &str) -> Option<usize> {
    let last = name.rsplit('.').next().unwrap_or("");
    if name == "embedding.projection.weight" || name == "embedding.projection.bias" {
        return Some(0);
    }
    if name.starts_with("embedding.") {
        // Position tables and CLS tokens, (1, n, D).
        return Some(2);
    }
    if name == "router.weight" || name == "head.weight" || name == "moe_router.weight" {
        return Some(1);
    }
    if name.contains(".norm") && (last == "weight" || last == "bias") {
        return Some(0);
    }
    if name.ends_with(".attention.qkv.weight") || name.ends_with(".fc1.weight") {
        return Some(1);
    }
    if name.ends_with(".attention.proj.weight")
        || name.ends_with(".attention.proj.bias")
        || name.ends_with(".fc2.weight")
        || name.ends_with(".fc2.bias")
    {
        return Some(0);
    }
    None
}

fn col_norms(w: &Tensor) -> Result<Vec<f32>> {
    w.sqr()?.sum(0)?.sqrt()?.to_vec1::<f32>()
}

fn row_norms(w: &Tensor) -> Result<Vec<f32>> {
    w.sqr()?.sum(1)?.sqrt()?.to_vec1::<f32>()
}

/// Each residual channel's importance in the routed stage, measured on the weights: how
/// strongly the layers read it (the LayerNorm gain times the in-projection's column norm, for
/// attention and the MLP) plus how strongly they write it (the out-projections' row norms),
/// summed over the routed layers. The routed stage is `spatial` (factorized) or `encoder`.
pub fn importance(cfg: &Config, t: &HashMap<String, Tensor>) -> Result<Vec<f32>> {
    let d = cfg.hidden_size;
    let stage = if cfg.is_joint() { "encoder" } else { "spatial" };
    let get = |k: String| {
        t.get(&k)
            .ok_or_else(|| candle_core::Error::Msg(format!("rewiring needs `{k}`")))
    };
    let mut imp = vec![0f32; d];
    for l in 0..cfg.spatial_layers {
        let p = format!("{stage}.layers.{l}");
        for (norm, w_in) in [("norm1", "attention.qkv"), ("norm2", "mlp.fc1")] {
            let g = get(format!("{p}.{norm}.weight"))?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1::<f32>()?;
            let c =
                col_norms(&get(format!("{p}.{w_in}.weight"))?.to_dtype(candle_core::DType::F32)?)?;
            for k in 0..d {
                imp[k] += g[k].abs() * c[k];
            }
        }
        for w_out in ["attention.proj", "mlp.fc2"] {
            let r =
                row_norms(&get(format!("{p}.{w_out}.weight"))?.to_dtype(candle_core::DType::F32)?)?;
            for k in 0..d {
                imp[k] += r[k];
            }
        }
    }
    Ok(imp)
}

/// Channels from most to least important (ties keep their order): new channel i is old
/// channel `perm[i]`.
pub fn order_by(importance: &[f32]) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..importance.len()).collect();
    perm.sort_by(|&a, &b| importance[b].total_cmp(&importance[a]));
    perm
}

/// Every residual-stream tensor of `t` permuted by `perm`; the others unchanged.
pub fn permute(
    cfg: &Config,
    t: &HashMap<String, Tensor>,
    perm: &[usize],
) -> Result<HashMap<String, Tensor>> {
    let d = cfg.hidden_size;
    let mut seen = perm.to_vec();
    seen.sort_unstable();
    if perm.len() != d || seen.iter().enumerate().any(|(i, &p)| i != p) {
        candle_core::bail!("a rewiring permutation must hold each of the {d} channels once");
    }
    let mut out = HashMap::with_capacity(t.len());
    for (name, w) in t {
        let w2 = match residual_dim(name) {
            Some(dim) if w.rank() > dim && w.dim(dim)? == d => {
                let idx: Vec<u32> = perm.iter().map(|&p| p as u32).collect();
                let idx = Tensor::new(idx.as_slice(), w.device())?;
                w.index_select(&idx, dim)?
            }
            _ => w.clone(),
        };
        out.insert(name.clone(), w2);
    }
    Ok(out)
}
