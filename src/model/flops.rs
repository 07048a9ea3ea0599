//! Multiply-add counts per clip for a config and a capacity.

use serde::Serialize;

use super::{capacity, Config, ModelError};

/// Multiply-adds for one clip, by part.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq)]
pub struct Macs {
    pub embedding: u64,
    pub router: u64,
    /// Nested QKV, attention out, fc1, fc2 of the spatial stage: the only part that shrinks.
    pub spatial_linear: u64,
    /// Q K^T and attention-weighted V of the spatial stage.
    pub spatial_attention: u64,
    pub temporal: u64,
    pub head: u64,
}

impl Macs {
    pub fn total(&self) -> u64 {
        self.embedding
            + self.router
            + self.spatial_linear
            + self.spatial_attention
            + self.temporal
            + self.head
    }
    pub fn gmacs(&self) -> f64 {
        self.total() as f64 / 1e9
    }
}

fn dense_layer(cfg: &Config, tokens: u64) -> u64 {
    let (d, m) = (cfg.hidden_size as u64, cfg.mlp_dim() as u64);
    (4 * d * d + 2 * d * m) * tokens + 2 * tokens * tokens * d
}

/// MACs per clip at capacity `e_c` (None: the dense ViViT, without a router). A V-MoE has no
/// capacity: its spatial stage is dense, its router reads one mean vector per clip, and each
/// MoE layer runs `top_k` expert MLPs per temporal token.
pub fn macs(cfg: &Config, e_c: Option<f64>) -> Result<Macs, ModelError> {
    let e_c = if cfg.is_vmoe() { None } else { e_c };
    let n = cfg.spatial_tokens() as u64;
    let counts: Vec<u64> = match e_c {
        None => {
            let mut k = vec![0; cfg.num_experts];
            k[cfg.num_experts - 1] = n;
            k
        }
        Some(c) => capacity::token_counts(&capacity::solve(c, cfg.num_experts)?, n as usize)
            .into_iter()
            .map(|k| k as u64)
            .collect(),
    };
    Ok(macs_of_counts(cfg, &counts, e_c.is_some()))
}

/// MACs per clip with every routed token at nested width `j` (`Routing::Width(j)`; the
/// router still runs).
pub fn macs_uniform(cfg: &Config, j: usize) -> Result<Macs, ModelError> {
    if j >= cfg.num_experts {
        return Err(ModelError::Config(format!(
            "width {j} out of range for {} experts",
            cfg.num_experts
        )));
    }
    let mut k = vec![0; cfg.num_experts];
    k[j] = cfg.spatial_tokens() as u64;
    Ok(macs_of_counts(cfg, &k, true))
}

/// MACs per clip with `counts[j]` tokens per temporal index at width j.
fn macs_of_counts(cfg: &Config, counts: &[u64], routed: bool) -> Macs {
    let (d, m) = (cfg.hidden_size as u64, cfg.mlp_dim() as u64);
    let (nt, n) = (cfg.temporal_tokens() as u64, cfg.spatial_tokens() as u64);
    let widths = cfg.expert_widths();
    // Per token at width d_j: QKV 3*D*d_j + out D*d_j + fc1 M*d_j + fc2 M*d_j.
    let per_seq_linear: u64 = counts
        .iter()
        .zip(&widths)
        .map(|(k, w)| k * (4 * d + 2 * m) * *w as u64)
        .sum();
    let layers = cfg.spatial_layers as u64;
    if cfg.is_joint() {
        // One encoder over every tubelet and the CLS token (always at full width).
        let l = cfg.joint_seq_len() as u64;
        let cls = l - nt * n;
        return Macs {
            embedding: nt * n * cfg.tubelet_dim() as u64 * d,
            router: if routed {
                nt * n * d * cfg.num_experts as u64
            } else {
                0
            },
            spatial_linear: layers * (nt * per_seq_linear + cls * (4 * d + 2 * m) * d),
            spatial_attention: layers * 2 * l * l * d,
            temporal: 0,
            head: d * cfg.num_classes as u64,
        };
    }
    let mut macs = Macs {
        embedding: nt * n * cfg.tubelet_dim() as u64 * d,
        router: if routed {
            nt * n * d * cfg.num_experts as u64
        } else {
            0
        },
        spatial_linear: layers * nt * per_seq_linear,
        spatial_attention: layers * nt * 2 * n * n * d,
        temporal: cfg.temporal_layers as u64 * dense_layer(cfg, cfg.temporal_seq_len() as u64)
            + cfg.moe.map_or(0, |moe| {
                let extra = (moe.top_k as u64 - 1) * 2 * d * m;
                moe.layers as u64 * extra * cfg.temporal_seq_len() as u64
            }),
        head: d * cfg.num_classes as u64,
    };
    if let Some(moe) = cfg.moe {
        macs.router = d * moe.experts as u64;
    }
    macs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vivit_b16_matches_the_papers_arithmetic() {
        let cfg = Config::preset("vivit-fe-b16").unwrap();
        let dense = macs(&cfg, None).unwrap();
        // The MoNE paper (Jain et al. 2024): about 283 GMACs for ViViT-B/16 at 224 px, 32 frames.
        assert!((dense.gmacs() - 282.0).abs() < 2.0, "{}", dense.gmacs());
        let r05 = dense.total() as f64 / macs(&cfg, Some(0.5)).unwrap().total() as f64;
        let r03 = dense.total() as f64 / macs(&cfg, Some(0.3)).unwrap().total() as f64;
        assert!((r05 - 1.90).abs() < 0.02, "{r05}");
        // The paper's 2.95 assumes exactly e_c = 0.3; floor(c_j * 196) tokens realise 0.296.
        assert!((r03 - 2.95).abs() < 0.05, "{r03}");
        // e_c = 1 costs the dense model plus the router.
        let full = macs(&cfg, Some(1.0)).unwrap();
        assert_eq!(full.total() - full.router, dense.total());
    }

    #[test]
    fn a_top1_vmoe_costs_the_dense_model_plus_its_router() {
        let dense = Config::preset("vivit-fe-motion").unwrap();
        let mut vmoe = Config::preset("vmoe-fe-motion").unwrap();
        let (d, m, l) = (64u64, 256u64, dense.temporal_seq_len() as u64);
        let base = macs(&dense, None).unwrap();
        let top1 = macs(&vmoe, Some(0.3)).unwrap();
        assert_eq!(top1.router, 64 * 10);
        assert_eq!(top1.total() - top1.router, base.total());
        vmoe.moe.as_mut().unwrap().top_k = 2;
        let top2 = macs(&vmoe, None).unwrap();
        assert_eq!(top2.temporal - base.temporal, 2 * l * 2 * d * m);
    }

    #[test]
    fn joint_vivit_b16_counts_3137_tokens() {
        let cfg = Config::preset("vivit-b16").unwrap();
        assert_eq!(cfg.joint_seq_len(), 3137);
        let dense = macs(&cfg, None).unwrap();
        // 12 layers over 3137 tokens: 12 * (12 * 768^2 * 3137 + 2 * 3137^2 * 768) plus the
        // tubelet embedding, about 451.5 GMACs.
        let layer = 12 * 768u64 * 768 * 3137 + 2 * 3137u64 * 3137 * 768;
        assert_eq!(dense.spatial_linear + dense.spatial_attention, 12 * layer);
        assert!((dense.gmacs() - 451.5).abs() < 1.0, "{}", dense.gmacs());
        let half = macs(&cfg, Some(0.5)).unwrap();
        assert!(half.spatial_linear < dense.spatial_linear * 6 / 10);
        assert_eq!(half.spatial_attention, dense.spatial_attention);
    }
}
