//! The single router at the first spatial layer and Expert Preferred Routing (EPR).

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Init, Linear, VarBuilder};

use super::Config;

/// r_i = softmax(W_r x_i + b_r) over the experts, plus the learned scalar alpha of the
/// (alpha * r + 1) MLP scaling.
#[derive(Clone, Debug)]
pub struct Router {
    pub router: Linear,
    pub alpha: Tensor,
}

impl Router {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let w = vb.get_with_hints(
            (cfg.num_experts, cfg.hidden_size),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        )?;
        let b = vb.get_with_hints(cfg.num_experts, "bias", Init::Const(0.0))?;
        // Alpha starts at 0 (the paper): the router gets gradients once alpha has grown.
        let alpha = vb.get_with_hints(1, "alpha", Init::Const(0.0))?;
        Ok(Self {
            router: Linear::new(w, Some(b)),
            alpha,
        })
    }

    /// Router probabilities (..., E) for tokens (..., D).
    pub fn probs(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let logits = self.router.forward(x)?;
        if train {
            candle_nn::ops::softmax(&logits, D::Minus1)
        } else {
            candle_nn::ops::softmax_last_dim(&logits)
        }
    }

    /// alpha kept in [0, 1), shape (1,). The clamp passes its gradient straight through: a
    /// plain clamp has none below 0, so an alpha that one step pushed negative stayed there
    /// and the router never learned again (its only gradient is through alpha * r).
    pub fn alpha(&self) -> Result<Tensor> {
        let a = self.alpha.to_dtype(DType::F32)?;
        let clamped = a.clamp(0f32, 0.999f32)?;
        a.clone() + (clamped - a)?.detach()
    }
}

/// Expert Preferred Routing for one example: `scores` is (n, e) row-major (token-major),
/// `counts[j]` the number of tokens expert j takes, smallest expert first; the widest expert
/// picks first, each its top-k among the tokens not yet taken; leftovers go to expert 0.
/// Returns the expert of every token. Ties break towards the lower token index.
pub fn epr(scores: &[f32], n: usize, e: usize, counts: &[usize]) -> Vec<u8> {
    debug_assert_eq!(scores.len(), n * e);
    debug_assert_eq!(counts.len(), e);
    let mut assign = vec![0u8; n];
    let mut taken = vec![false; n];
    let mut cand: Vec<usize> = Vec::with_capacity(n);
    for j in (1..e).rev() {
        let k = counts[j].min(n);
        if k == 0 {
            continue;
        }
        cand.clear();
        cand.extend((0..n).filter(|&t| !taken[t]));
        let by_score = |a: &usize, b: &usize| {
            scores[b * e + j]
                .partial_cmp(&scores[a * e + j])
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.cmp(b))
        };
        if k < cand.len() {
            cand.select_nth_unstable_by(k - 1, by_score);
        }
        for &t in cand.iter().take(k) {
            taken[t] = true;
            assign[t] = j as u8;
        }
    }
    assign
}

/// EPR for `s` independent examples of `n` tokens each; `scores` is (s, n, e).
pub fn epr_batch(scores: &[f32], s: usize, n: usize, e: usize, counts: &[usize]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s * n);
    for i in 0..s {
        out.extend(epr(&scores[i * n * e..(i + 1) * n * e], n, e, counts));
    }
    out
}

/// EPR on the tensor's own device, for `probs` (S, N, E): the grouped token order of
/// [`group_order`]`(`[`epr_batch`]`)` as an (S, N) u32 tensor, with no copy to the host (a GPU
/// would otherwise stop for one every forward). Each expert, widest first, sorts its scores
/// with the taken tokens pushed below every probability and keeps the first `counts[j]`; the
/// untaken rest is expert 0's. Same assignment as the host version up to ties; the order
/// within a group may differ, which attention and mean pooling do not see.
pub fn epr_order_device(probs: &Tensor, counts: &[usize]) -> Result<Tensor> {
    let (s, n, e) = probs.dims3()?;
    if counts.len() != e || counts.iter().sum::<usize>() != n {
        candle_core::bail!("token counts {counts:?} do not split {n} tokens over {e} experts");
    }
    let dev = probs.device();
    let probs = probs.to_dtype(DType::F32)?;
    let mut taken = Tensor::zeros((s, n), DType::F32, dev)?;
    let mut parts: Vec<Option<Tensor>> = vec![None; e];
    for j in (1..e).rev() {
        let k = counts[j];
        if k == 0 {
            continue;
        }
        // Probabilities are in [0, 1]; a taken token scores at most -1.
        let scores = (probs.narrow(2, j, 1)?.squeeze(2)? - (&taken * 2.0)?)?;
        let idx = scores
            .contiguous()?
            .arg_sort_last_dim(false)?
            .narrow(1, 0, k)?
            .contiguous()?;
        taken = taken.scatter_add(&idx, &Tensor::ones((s, k), DType::F32, dev)?, 1)?;
        parts[j] = Some(idx);
    }
    if counts[0] > 0 {
        let rest = taken
            .neg()?
            .contiguous()?
            .arg_sort_last_dim(false)?
            .narrow(1, 0, counts[0])?;
        parts[0] = Some(rest);
    }
    let parts: Vec<Tensor> = parts.into_iter().flatten().collect();
    Tensor::cat(&parts, 1)
}

/// Per example, the token order that groups tokens by expert, smallest expert first
/// (stable within a group). `assign` is (s, n); returns (s, n) original token indices.
pub fn group_order(assign: &[u8], s: usize, n: usize, e: usize) -> Vec<u32> {
    let mut perm = Vec::with_capacity(s * n);
    for i in 0..s {
        let a = &assign[i * n..(i + 1) * n];
        for j in 0..e as u8 {
            perm.extend((0..n).filter(|&t| a[t] == j).map(|t| t as u32));
        }
    }
    perm
}

/// Deterministic pseudo-random scores in [0, 1) for the random-router ablation.
pub fn random_scores(len: usize, seed: u64) -> Vec<f32> {
    let mut x = seed ^ 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            // splitmix64
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(rows: &[[f32; 4]]) -> Vec<f32> {
        rows.iter().flatten().copied().collect()
    }

    #[test]
    fn widest_first_then_top_k_among_untaken() {
        // Token 0 is the favourite of experts 3 and 2; expert 3 picks first and takes it,
        // so expert 2 must fall back to its next best, token 2.
        let s = scores(&[
            [0.0, 0.0, 0.9, 0.9],
            [0.0, 0.0, 0.1, 0.5],
            [0.0, 0.0, 0.8, 0.1],
            [0.0, 0.9, 0.2, 0.0],
            [0.0, 0.1, 0.0, 0.0],
            [0.0, 0.5, 0.3, 0.0],
        ]);
        let a = epr(&s, 6, 4, &[2, 1, 1, 2]);
        // Expert 3 takes tokens 0 and 1; expert 2 takes 2; expert 1 takes 3; rest to 0.
        assert_eq!(a, vec![3, 3, 2, 1, 0, 0]);
    }

    #[test]
    fn counts_are_respected_and_leftovers_go_to_the_smallest() {
        let n = 50;
        let sc = random_scores(n * 4, 7);
        let counts = [20, 5, 10, 15];
        let a = epr(&sc, n, 4, &counts);
        for (j, &c) in counts.iter().enumerate() {
            assert_eq!(a.iter().filter(|&&x| x as usize == j).count(), c);
        }
        // Expert 3's tokens are exactly the 15 best by its score.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&x, &y| sc[y * 4 + 3].partial_cmp(&sc[x * 4 + 3]).unwrap());
        let mut best: Vec<usize> = order[..15].to_vec();
        best.sort();
        let got: Vec<usize> = (0..n).filter(|&t| a[t] == 3).collect();
        assert_eq!(got, best);
    }

    #[test]
    fn examples_in_a_batch_are_routed_independently() {
        let n = 12;
        let a_s = random_scores(n * 4, 1);
        let b_s = random_scores(n * 4, 2);
        let counts = [3, 3, 3, 3];
        let both: Vec<f32> = a_s.iter().chain(&b_s).copied().collect();
        let batch = epr_batch(&both, 2, n, 4, &counts);
        assert_eq!(&batch[..n], &epr(&a_s, n, 4, &counts)[..]);
        assert_eq!(&batch[n..], &epr(&b_s, n, 4, &counts)[..]);
    }

    #[test]
    fn device_epr_matches_the_host_version() {
        let (s, n, e) = (5, 37, 4);
        for (seed, counts) in [
            (3u64, [10, 9, 9, 9]),
            (4, [0, 0, 12, 25]),
            (5, [30, 0, 7, 0]),
        ] {
            let sc = random_scores(s * n * e, seed);
            let host = group_order(&epr_batch(&sc, s, n, e, &counts), s, n, e);
            let probs = Tensor::from_vec(sc, (s, n, e), &candle_core::Device::Cpu).unwrap();
            let dev = epr_order_device(&probs, &counts)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<u32>()
                .unwrap();
            assert_eq!(dev.len(), s * n);
            for i in 0..s {
                let mut off = 0;
                for &k in &counts {
                    let mut a = host[i * n + off..i * n + off + k].to_vec();
                    let mut b = dev[i * n + off..i * n + off + k].to_vec();
                    a.sort();
                    b.sort();
                    assert_eq!(a, b, "sequence {i}, counts {counts:?}");
                    off += k;
                }
            }
        }
        let probs = Tensor::zeros((1, 4, 2), DType::F32, &candle_core::Device::Cpu).unwrap();
        assert!(epr_order_device(&probs, &[1, 1]).is_err());
    }

    #[test]
    fn group_order_is_stable_and_grouped() {
        let assign = [1u8, 0, 3, 0, 1, 2];
        assert_eq!(group_order(&assign, 1, 6, 4), vec![1, 3, 0, 4, 5, 2]);
    }

    #[test]
    fn a_negative_alpha_still_gets_its_gradient_and_passes_it_to_the_router() {
        use candle_core::{Device, Var};
        let dev = Device::Cpu;
        let alpha = Var::new(&[-0.0002f32], &dev).unwrap();
        let w = Var::new(&[[0.3f32, -0.1], [0.2, 0.4]], &dev).unwrap();
        let r = Router {
            router: Linear::new(w.as_tensor().clone(), None),
            alpha: alpha.as_tensor().clone(),
        };
        let a = r.alpha().unwrap();
        // The value is clamped...
        assert_eq!(a.to_vec1::<f32>().unwrap(), [0.0]);
        // ...and the MLP scale (alpha * r + 1) still sends gradients to alpha and the router.
        let x = Tensor::new(&[[1.0f32, 2.0], [0.5, -1.0]], &dev).unwrap();
        let p = r.probs(&x, true).unwrap().narrow(1, 1, 1).unwrap();
        let scale = (p.broadcast_mul(&a).unwrap() + 1.0).unwrap();
        let loss = (scale * Tensor::new(&[[3.0f32], [-1.0]], &dev).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let g = loss.backward().unwrap();
        let ga = g.get(alpha.as_tensor()).unwrap().to_vec1::<f32>().unwrap()[0];
        assert!(ga.abs() > 1e-3, "alpha gradient {ga}");
        assert!(g.get(w.as_tensor()).is_some());
    }
}
