//! Mobile V-MoE's per-clip routing: one router reads each clip's pooled representation after
//! the dense layers and picks its top-k expert MLPs for every MoE layer; the router
//! probabilities of the chosen experts scale their outputs. A batch runs grouped by expert,
//! one fc1/fc2 pair per expert over all of its clips' rows.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};

use super::attention::linear;
use super::mlp::{Mlp, RowScale};
use super::nested::{fused_ok, TokenLayout};
use super::router::random_scores;
use super::vivit::Routing;
use super::Config;

/// The single per-clip router: logits = W mean(x) + b over a clip's tokens.
#[derive(Clone, Debug)]
pub struct ClipRouter {
    pub router: Linear,
    pub top_k: usize,
}

/// Which experts every clip of a batch runs, and with what weights.
#[derive(Clone, Debug)]
pub struct ClipRoute {
    /// Router logits (B, E), for the super-class loss.
    pub logits: Tensor,
    /// Per clip, its k experts, most probable first.
    pub choice: Vec<Vec<usize>>,
    /// Per slot (0..k), the chosen experts' router probabilities (B, 1), differentiable.
    pub gates: Vec<Tensor>,
    /// The same probabilities on the host, per clip then slot.
    pub weights: Vec<Vec<f32>>,
}

/// The k highest of each row of `probs` (B rows of `e`), highest first; ties go to the
/// lower expert index.
pub fn top_k(probs: &[f32], e: usize, k: usize) -> Vec<Vec<usize>> {
    probs
        .chunks(e)
        .map(|row| {
            let mut idx: Vec<usize> = (0..e).collect();
            idx.sort_by(|&a, &b| {
                row[b]
                    .partial_cmp(&row[a])
                    .unwrap_or(std::cmp::Ordering::Equal)
                    .then(a.cmp(&b))
            });
            idx.truncate(k);
            idx
        })
        .collect()
}

/// The clips of each expert in slot `slot`, experts in ascending order, empty ones left out.
pub fn expert_groups(choice: &[Vec<usize>], slot: usize, e: usize) -> Vec<(usize, Vec<usize>)> {
    let mut by: Vec<Vec<usize>> = vec![Vec::new(); e];
    for (clip, c) in choice.iter().enumerate() {
        by[c[slot]].push(clip);
    }
    by.into_iter()
        .enumerate()
        .filter(|(_, clips)| !clips.is_empty())
        .collect()
}

impl ClipRouter {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let moe = cfg
            .moe
            .ok_or_else(|| candle_core::Error::Msg("not a V-MoE config".into()))?;
        Ok(Self {
            router: linear(cfg.hidden_size, moe.experts, vb)?,
            top_k: moe.top_k,
        })
    }

    pub fn experts(&self) -> usize {
        self.router.weight().dim(0).unwrap_or(0)
    }

    /// Route the clips of the residual stream `x` (B * L, D), L tokens per clip.
    pub fn route(&self, x: &Tensor, l: usize, routing: Routing) -> Result<ClipRoute> {
        let (rows, d) = x.dims2()?;
        let (b, e, k) = (rows / l, self.experts(), self.top_k);
        let pooled = x.reshape((b, l, d))?.mean(1)?;
        let logits = self.router.forward(&pooled)?;
        let probs = candle_nn::ops::softmax(&logits, D::Minus1)?;
        let host = probs
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let choice = match routing {
            Routing::Learned => top_k(&host, e, k),
            Routing::Random { seed } => top_k(&random_scores(b * e, seed), e, k),
            Routing::Width(j) if j < e => {
                // Every clip on expert j first; a second slot takes the most probable other.
                let mut masked = host.clone();
                for row in masked.chunks_mut(e) {
                    row[j] = f32::INFINITY;
                }
                top_k(&masked, e, k)
            }
            Routing::Width(j) => candle_core::bail!("expert {j} out of range for {e} experts"),
        };
        let mut gates = Vec::with_capacity(k);
        for slot in 0..k {
            let mut mask = vec![0f32; b * e];
            for (clip, c) in choice.iter().enumerate() {
                mask[clip * e + c[slot]] = 1.0;
            }
            let mask = Tensor::from_vec(mask, (b, e), x.device())?.to_dtype(probs.dtype())?;
            gates.push((&probs * mask)?.sum_keepdim(1)?);
        }
        let weights = choice
            .iter()
            .enumerate()
            .map(|(clip, c)| c.iter().map(|&j| host[clip * e + j]).collect())
            .collect();
        Ok(ClipRoute {
            logits,
            choice,
            gates,
            weights,
        })
    }
}

/// x + sum over slots of g * Expert(h) for the residual stream `x` and its normalised `h`
/// (B * L, D, clip-major), each expert run once over the rows of its clips. The fused path
/// updates `x` in place, so the caller must own its storage.
pub fn experts_residual(
    experts: &[Mlp],
    x: Tensor,
    h: &Tensor,
    l: usize,
    route: &ClipRoute,
    train: bool,
) -> Result<Tensor> {
    let (rows, d) = x.dims2()?;
    let b = rows / l;
    let dev = x.device().clone();
    let mut x = x;
    for (slot, gate) in route.gates.iter().enumerate() {
        let gate_rows = gate.broadcast_as((b, l))?.reshape((b * l, 1))?;
        let host_rows = |clips: &[usize]| -> Option<Vec<f32>> {
            fused_ok(h, train).then(|| {
                clips
                    .iter()
                    .flat_map(|&c| std::iter::repeat_n(route.weights[c][slot], l))
                    .collect()
            })
        };
        let groups = expert_groups(&route.choice, slot, experts.len());
        if let [(j, clips)] = groups.as_slice() {
            let scale = RowScale {
                tensor: gate_rows,
                host: host_rows(clips),
            };
            x = experts[*j].forward_residual(
                x,
                h,
                &TokenLayout::dense(l, b, d),
                Some(&scale),
                train,
            )?;
            continue;
        }
        let mut parts = Vec::with_capacity(groups.len());
        let mut order: Vec<u32> = Vec::with_capacity(rows);
        for (j, clips) in &groups {
            let ids: Vec<u32> = clips
                .iter()
                .flat_map(|&c| (c * l..(c + 1) * l).map(|r| r as u32))
                .collect();
            let idx = Tensor::new(ids.as_slice(), &dev)?;
            let scale = RowScale {
                tensor: gate_rows.index_select(&idx, 0)?,
                host: host_rows(clips),
            };
            // index_select returns fresh storage, which the fused path may update in place.
            parts.push(experts[*j].forward_residual(
                x.index_select(&idx, 0)?,
                &h.index_select(&idx, 0)?,
                &TokenLayout::dense(l, clips.len(), d),
                Some(&scale),
                train,
            )?);
            order.extend(ids);
        }
        let mut inverse = vec![0u32; rows];
        for (pos, &r) in order.iter().enumerate() {
            inverse[r as usize] = pos as u32;
        }
        x = Tensor::cat(&parts, 0)?.index_select(&Tensor::new(inverse.as_slice(), &dev)?, 0)?;
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_by_probability_and_breaks_ties_low() {
        let p = [0.1, 0.5, 0.4, 0.3, 0.3, 0.4];
        assert_eq!(top_k(&p, 3, 1), vec![vec![1], vec![2]]);
        assert_eq!(top_k(&p, 3, 2), vec![vec![1, 2], vec![2, 0]]);
        assert_eq!(top_k(&[0.5, 0.5], 2, 1), vec![vec![0]]);
    }

    #[test]
    fn groups_list_each_experts_clips_in_order() {
        let choice = vec![vec![2, 0], vec![0, 1], vec![2, 1]];
        assert_eq!(
            expert_groups(&choice, 0, 3),
            vec![(0, vec![1]), (2, vec![0, 2])]
        );
        assert_eq!(
            expert_groups(&choice, 1, 3),
            vec![(0, vec![0]), (1, vec![1, 2])]
        );
    }
}
