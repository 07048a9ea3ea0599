//! The joint encoder's routed stage: Expert Preferred Routing per temporal index, attention
//! over every tubelet of the clip at once, the CLS token on the widest expert, then CLS or
//! mean pooling, the final norm and the head.

use candle_core::{DType, Module, Result, Tensor};

use super::{
    capacity_groups, expert_probs, host_scores, output, run_groups, token_major_index, widen,
    ForwardOptions, ForwardOutput, MoneVivit, Routing,
};
use crate::model::nested::{fused_ok, TokenLayout};
use crate::model::profile::{scope, Part};
use crate::model::router::{epr_batch, epr_order_device, group_order};
use crate::model::Pooling;

impl MoneVivit {
    /// Joint encoder: route per temporal index, attend over the whole clip, pool, head.
    pub(super) fn forward_joint(
        &self,
        x: &Tensor,
        caps: &[f64],
        opts: &ForwardOptions,
    ) -> Result<ForwardOutput> {
        let (nt, n, e) = (
            self.cfg.temporal_tokens(),
            self.cfg.spatial_tokens(),
            self.cfg.num_experts,
        );
        let c0 = usize::from(self.embedding.cls.is_some());
        let tokens = {
            let _p = scope(Part::Embedding);
            self.embedding.forward(x, opts.train)? // (B, L, D)
        };
        let probs = {
            let _p = scope(Part::Routing);
            self.mone_router()?
                .probs(&tokens.narrow(1, c0, nt * n)?, opts.train)? // (B, nt * N, E)
        };
        let (counts_of, groups) = capacity_groups(caps, n, e, opts.routing)?;
        // One row of `tokens` (the clip's whole sequence) and one pooled row per clip.
        let (pooled, assignment) =
            run_groups(tokens, &probs, &groups, 1, nt * n, opts, |t, p, k, salt| {
                self.joint_stage(t, p, k, opts, salt)
            })?;
        let logits = widen(self.joint_head(&pooled, opts.train)?)?;
        Ok(output(logits, assignment, &counts_of))
    }

    /// One capacity group of the joint encoder: `tokens` (B, L, D) with the CLS token first
    /// when there is one, `probs` (B, nt * N, E) of the tubelets, `counts` per temporal index.
    /// Returns the pooled (B, D) vectors before the final norm and, when routed on the host,
    /// every tubelet's expert.
    fn joint_stage(
        &self,
        tokens: Tensor,
        probs: &Tensor,
        counts: &[usize],
        opts: &ForwardOptions,
        salt: u64,
    ) -> Result<(Tensor, Option<Vec<u8>>)> {
        let (b, l, d) = tokens.dims3()?;
        let (nt, n, e) = (
            self.cfg.temporal_tokens(),
            self.cfg.spatial_tokens(),
            self.cfg.num_experts,
        );
        let c0 = l - nt * n;
        let widths = self.cfg.expert_widths();
        let dev = tokens.device().clone();
        let routing_scope = scope(Part::Routing);
        // Per clip: each temporal index's counts, and the CLS token on the widest expert.
        let mut clip_counts: Vec<usize> = counts.iter().map(|k| k * nt).collect();
        clip_counts[e - 1] += c0;
        let nonempty: Vec<usize> = (0..e).filter(|&j| clip_counts[j] > 0).collect();
        // The CLS token has no router probability: its MLP scale stays 1.
        let all_probs = if c0 > 0 {
            Tensor::cat(
                &[
                    &Tensor::zeros((b, c0, e), probs.dtype(), &dev)?,
                    &probs.contiguous()?,
                ],
                1,
            )?
        } else {
            probs.contiguous()?
        };
        let (x, layout, assign, r_rows) = if nonempty.len() == 1 {
            let j = nonempty[0];
            let x = tokens.reshape((b * l, d))?;
            // The fused path updates the residual in place: own it.
            let x = if fused_ok(&x, opts.train) {
                x.copy()?
            } else {
                x
            };
            let mut layout = TokenLayout::dense(l, b, d);
            layout.groups[0].width = widths[j];
            let r = all_probs.reshape((b * l, e))?.narrow(1, j, 1)?;
            (x, layout, Some(vec![j as u8; b * nt * n]), r)
        } else {
            let host_f32 = dev.is_cpu() && tokens.dtype() == DType::F32;
            let on_device = !matches!(opts.routing, Routing::Random { .. })
                && !opts.want_assignment
                && !host_f32;
            let per_index = probs.reshape((b * nt, n, e))?;
            // (B, L): each clip's tokens grouped by expert, narrowest first, the CLS token
            // first among the widest.
            let (order, assign) = if on_device {
                let offs: Vec<u32> = (0..b * nt).map(|s| (c0 + (s % nt) * n) as u32).collect();
                let ord = epr_order_device(&per_index, counts)?
                    .broadcast_add(&Tensor::from_vec(offs, (b * nt, 1), &dev)?)?
                    .reshape((b, nt, n))?;
                let mut parts = Vec::new();
                let mut start = 0;
                for (j, &k) in counts.iter().enumerate() {
                    if j == e - 1 && c0 > 0 {
                        parts.push(Tensor::zeros((b, c0), DType::U32, &dev)?);
                    }
                    if k > 0 {
                        parts.push(
                            ord.narrow(2, start, k)?
                                .contiguous()?
                                .reshape((b, nt * k))?,
                        );
                    }
                    start += k;
                }
                (Tensor::cat(&parts, 1)?, None)
            } else {
                let scores = host_scores(&per_index, opts.routing, salt)?;
                let assign = epr_batch(&scores, b * nt, n, e, counts);
                let mut clip_assign = vec![(e - 1) as u8; b * l];
                for c in 0..b {
                    clip_assign[c * l + c0..(c + 1) * l]
                        .copy_from_slice(&assign[c * nt * n..(c + 1) * nt * n]);
                }
                let perm = group_order(&clip_assign, b, l, e);
                (Tensor::from_vec(perm, (b, l), &dev)?, Some(assign))
            };
            let idx = token_major_index(&order)?;
            let x = tokens.reshape((b * l, d))?.index_select(&idx, 0)?;
            let layout = TokenLayout::grouped(l, b, &clip_counts, &widths);
            let r_rows = expert_probs(&all_probs.reshape((b * l, e))?, &idx, &layout, &nonempty)?;
            (x, layout, assign, r_rows)
        };
        drop(routing_scope);
        let x = self.routed_layers(x, &layout, &r_rows, opts.train)?;
        // The CLS token leads the widest group (token-major) or each clip (dense).
        let cls_pos = if layout.token_major {
            l - clip_counts[e - 1]
        } else {
            0
        };
        self.joint_pool(&x, &layout, b, cls_pos)
            .map(|p| (p, assign))
    }

    /// Pool the joint encoder's rows per clip: the CLS row at `cls_pos` of each clip's order,
    /// or the mean of all rows.
    pub(super) fn joint_pool(
        &self,
        x: &Tensor,
        layout: &TokenLayout,
        b: usize,
        cls_pos: usize,
    ) -> Result<Tensor> {
        let _p = scope(Part::Rest);
        let (l, d) = (layout.n, x.dim(1)?);
        let seq = if layout.token_major {
            x.reshape((l, b, d))?.transpose(0, 1)?
        } else {
            x.reshape((b, l, d))?
        };
        match self.cfg.pooling {
            Pooling::Cls => seq.narrow(1, cls_pos, 1)?.squeeze(1)?.contiguous(),
            Pooling::Mean => seq.mean(1),
        }
    }

    /// The final norm (per token, so after pooling) and the head.
    pub(super) fn joint_head(&self, pooled: &Tensor, train: bool) -> Result<Tensor> {
        let _p = scope(Part::Rest);
        let v = self.spatial.norm.forward(&pooled.contiguous()?, train)?;
        self.head.forward(&v)
    }
}
