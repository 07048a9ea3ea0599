//! The MoNE-ViViT: tubelet embedding -> router at the first layer -> the routed nested stage
//! -> head. Factorized encoder (the paper's): the routed stage is a spatial transformer per
//! temporal index, mean-pooled, then a dense temporal transformer. Joint encoder (ViViT and
//! VideoMAE as published in transformers): the routed stage attends over all tubelets of the
//! clip at once, Expert Preferred Routing runs per temporal index and the CLS token always
//! takes the widest expert; then CLS or mean pooling, the final norm and the head. Mobile V-MoE
//! (`vmoe-vivit-fe`): the factorized encoder without the token router, whose last temporal
//! blocks hold per-clip expert MLPs (`moe.rs`).

use std::collections::HashMap;

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::attention::linear;
use super::capacity;
use super::embedding::Embedding;
use super::kernels::MeanPool;
use super::mlp::{Mlp, RowScale};
use super::moe::{ClipRoute, ClipRouter};
use super::nested::{fused_ok, TokenLayout};
use super::profile::{scope, Part};
use super::router::{epr_batch, epr_order_device, group_order, random_scores, Router};
use super::{Config, Pooling};

pub use super::block::{Block, Ffn, Norm, Stage};

mod joint;

/// How a dense stage runs: the model's own path (fused kernels in CPU inference, generic ops
/// otherwise) or plain candle layers.
#[derive(Clone, Copy, Debug)]
enum Exec {
    Model { train: bool },
    Plain,
}

impl Exec {
    fn train(self) -> bool {
        matches!(self, Exec::Model { train: true })
    }
}

/// Which experts the spatial tokens go to.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Routing {
    /// The learned router with Expert Preferred Routing (the model).
    Learned,
    /// Random scores with the same capacities (the paper's ablation).
    Random { seed: u64 },
    /// Every token on expert `j` (0 = narrowest); the capacity is ignored. For the nested
    /// joint-training phase.
    Width(usize),
}

#[derive(Clone, Copy, Debug)]
pub struct ForwardOptions {
    pub routing: Routing,
    /// Differentiable ops only (no fused kernels, no in-place updates).
    pub train: bool,
    /// Return every token's expert.
    pub want_assignment: bool,
}

impl Default for ForwardOptions {
    fn default() -> Self {
        Self {
            routing: Routing::Learned,
            train: false,
            want_assignment: false,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ForwardOutput {
    /// (B, classes)
    pub logits: Tensor,
    /// Expert index (0 = narrowest) of every tubelet, (B, nt, N) flattened, when requested.
    pub assignment: Option<Vec<u8>>,
    /// The e_c each clip actually ran at (integer token counts; 1 for a V-MoE).
    pub capacity: Vec<f64>,
    /// A V-MoE's experts per clip with their router weights, most probable first (empty for
    /// MoNE models).
    pub experts: Vec<Vec<(usize, f32)>>,
    /// A V-MoE's router logits (B, E), for the super-class loss.
    pub router_logits: Option<Tensor>,
}

#[derive(Clone, Debug)]
pub struct MoneVivit {
    pub embedding: Embedding,
    /// MoNE's token router (absent in a V-MoE).
    pub router: Option<Router>,
    /// A V-MoE's per-clip router.
    pub moe_router: Option<ClipRouter>,
    /// The routed stage: the spatial transformer (factorized, `spatial.*`) or the whole
    /// encoder with the final norm (joint, `encoder.*`).
    pub spatial: Stage,
    /// The dense temporal transformer (factorized only).
    pub temporal: Option<Stage>,
    pub head: Linear,
    pub cfg: Config,
}

/// Per-expert token counts per routing group (a temporal index's N tokens) for each clip's
/// capacity, and the clips grouped by equal counts: (counts of each clip, [(counts, clips)]).
type CapacityGroups = (Vec<Vec<usize>>, Vec<(Vec<usize>, Vec<usize>)>);

fn capacity_groups(caps: &[f64], n: usize, e: usize, routing: Routing) -> Result<CapacityGroups> {
    let mut counts_of = Vec::with_capacity(caps.len());
    for &c in caps {
        counts_of.push(match routing {
            Routing::Width(j) if j < e => {
                let mut k = vec![0; e];
                k[j] = n;
                k
            }
            Routing::Width(j) => candle_core::bail!("expert {j} out of range for {e} experts"),
            _ => capacity::token_counts(
                &capacity::solve(c, e).map_err(|err| candle_core::Error::Msg(err.to_string()))?,
                n,
            ),
        });
    }
    let mut groups: Vec<(Vec<usize>, Vec<usize>)> = Vec::new();
    for (clip, k) in counts_of.iter().enumerate() {
        match groups.iter_mut().find(|(gk, _)| gk == k) {
            Some((_, clips)) => clips.push(clip),
            None => groups.push((k.clone(), vec![clip])),
        }
    }
    Ok((counts_of, groups))
}

/// Logits of a reduced-precision model as f32, the callers' type (f32 and f64 stay as they are).
fn widen(logits: Tensor) -> Result<Tensor> {
    match logits.dtype() {
        DType::BF16 | DType::F16 => logits.to_dtype(DType::F32),
        _ => Ok(logits),
    }
}

/// Router scores on the host: the probabilities, or random ones for the ablation.
fn host_scores(probs: &Tensor, routing: Routing, salt: u64) -> Result<Vec<f32>> {
    Ok(match routing {
        Routing::Random { seed } => random_scores(
            probs.elem_count(),
            seed.wrapping_add(salt.wrapping_mul(0x5851_F42D)),
        ),
        _ => probs
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?,
    })
}

/// Run `stage` (tokens, probs, per-expert counts, salt -> pooled rows and, when routed on the
/// host, every tubelet's expert) once per capacity group on that group's clips (`rows` rows of `tokens` and
/// `probs` per clip, `rows` pooled rows back) and return the pooled rows and the assignment
/// (`per_clip` tubelets a clip) in clip order.
fn run_groups(
    tokens: Tensor,
    probs: &Tensor,
    groups: &[(Vec<usize>, Vec<usize>)],
    rows: usize,
    per_clip: usize,
    opts: &ForwardOptions,
    stage: impl Fn(Tensor, &Tensor, &[usize], u64) -> Result<(Tensor, Option<Vec<u8>>)>,
) -> Result<(Tensor, Option<Vec<u8>>)> {
    let b: usize = groups.iter().map(|(_, clips)| clips.len()).sum();
    let mut assignment = opts.want_assignment.then(|| vec![0u8; b * per_clip]);
    if let [(k, _)] = groups {
        let (pooled, assign) = stage(tokens, probs, k, 0)?;
        if let (Some(a), Some(assign)) = (assignment.as_mut(), assign) {
            a.copy_from_slice(&assign);
        }
        return Ok((pooled, assignment));
    }
    let dev = tokens.device().clone();
    let mut parts = Vec::new();
    let mut order = Vec::new();
    for (gi, (k, clips)) in groups.iter().enumerate() {
        let ids: Vec<u32> = clips
            .iter()
            .flat_map(|&c| (c * rows..(c + 1) * rows).map(|r| r as u32))
            .collect();
        let idx = Tensor::new(ids.as_slice(), &dev)?;
        let (p, assign) = stage(
            tokens.index_select(&idx, 0)?,
            &probs.index_select(&idx, 0)?,
            k,
            gi as u64,
        )?;
        if let (Some(a), Some(assign)) = (assignment.as_mut(), assign) {
            for (i, &c) in clips.iter().enumerate() {
                a[c * per_clip..(c + 1) * per_clip]
                    .copy_from_slice(&assign[i * per_clip..(i + 1) * per_clip]);
            }
        }
        parts.push(p);
        order.extend(ids);
    }
    let mut inverse = vec![0u32; order.len()];
    for (pos, &r) in order.iter().enumerate() {
        inverse[r as usize] = pos as u32;
    }
    let pooled =
        Tensor::cat(&parts, 0)?.index_select(&Tensor::new(inverse.as_slice(), &dev)?, 0)?;
    Ok((pooled, assignment))
}

fn output(logits: Tensor, assignment: Option<Vec<u8>>, counts_of: &[Vec<usize>]) -> ForwardOutput {
    ForwardOutput {
        logits,
        assignment,
        capacity: counts_of
            .iter()
            .map(|k| capacity::realised_capacity(k))
            .collect(),
        experts: Vec::new(),
        router_logits: None,
    }
}

/// Each routed row's probability for its own expert, (rows, 1): `probs` (rows, E) gathered
/// into the grouped order `idx`, group g holding expert `experts[g]`.
fn expert_probs(
    probs: &Tensor,
    idx: &Tensor,
    layout: &TokenLayout,
    experts: &[usize],
) -> Result<Tensor> {
    let p_rows = probs.index_select(idx, 0)?;
    let parts = experts
        .iter()
        .zip(&layout.groups)
        .map(|(&j, g)| p_rows.narrow(0, g.row0, g.rows)?.narrow(1, j, 1))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, 0)
}

/// Row p * S + i of the token-major layout is row i * L + order[i][p] of the sequence-major
/// one, for `order` (S, L) u32.
fn token_major_index(order: &Tensor) -> Result<Tensor> {
    let (s, l) = order.dims2()?;
    let base: Vec<u32> = (0..s).map(|i| (i * l) as u32).collect();
    let base = Tensor::from_vec(base, (s, 1), order.device())?;
    order.broadcast_add(&base)?.t()?.contiguous()?.flatten_all()
}

/// EPR on the host for `probs` (S, N, E): the token-major gather index and every token's expert.
fn host_route(
    probs: &Tensor,
    counts: &[usize],
    routing: Routing,
    salt: u64,
) -> Result<(Tensor, Vec<u8>)> {
    let (s, n, e) = probs.dims3()?;
    let assign = epr_batch(&host_scores(probs, routing, salt)?, s, n, e, counts);
    let perm = group_order(&assign, s, n, e);
    // Token-major gather: row p * S + i holds the p-th token of sequence i's grouped order.
    let mut idx = vec![0u32; s * n];
    for i in 0..s {
        for p in 0..n {
            idx[p * s + i] = (i * n) as u32 + perm[i * n + p];
        }
    }
    Ok((Tensor::new(idx.as_slice(), probs.device())?, assign))
}

impl MoneVivit {
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        cfg.validate()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let no_experts = (usize::MAX, 0);
        let (spatial, temporal) = if cfg.is_joint() {
            (
                Stage::new(
                    cfg,
                    cfg.spatial_layers,
                    cfg.final_eps(),
                    no_experts,
                    vb.pp("encoder"),
                )?,
                None,
            )
        } else {
            let experts = cfg.moe.map_or(no_experts, |m| {
                (cfg.temporal_layers.saturating_sub(m.layers), m.experts)
            });
            (
                Stage::new(
                    cfg,
                    cfg.spatial_layers,
                    cfg.layer_norm_eps,
                    no_experts,
                    vb.pp("spatial"),
                )?,
                Some(Stage::new(
                    cfg,
                    cfg.temporal_layers,
                    cfg.final_eps(),
                    experts,
                    vb.pp("temporal"),
                )?),
            )
        };
        Ok(Self {
            embedding: Embedding::new(cfg, vb.pp("embedding"))?,
            router: if cfg.is_mone() {
                Some(Router::new(cfg, vb.pp("router"))?)
            } else {
                None
            },
            moe_router: if cfg.is_vmoe() {
                Some(ClipRouter::new(cfg, vb.pp("moe_router"))?)
            } else {
                None
            },
            spatial,
            temporal,
            head: linear(cfg.hidden_size, cfg.num_classes, vb.pp("head"))?,
            cfg: cfg.clone(),
        })
    }

    /// Packs weights once for the CPU's fused kernels where this machine runs them (AVX-512,
    /// f32): fc2's weight, a third of each block's weights, so about a third more weight memory.
    /// Only for weights that no longer change; the loaders call it, training does not.
    pub fn prepack(&mut self) -> Result<()> {
        for stage in std::iter::once(&mut self.spatial).chain(self.temporal.as_mut()) {
            stage.layers.iter_mut().try_for_each(Block::prepack)?;
        }
        Ok(())
    }

    /// Classify a batch of normalised clips (B, C, T, H, W). `capacity` holds one e_c for the
    /// whole batch or one per clip; clips that share a capacity run together.
    pub fn forward(
        &self,
        x: &Tensor,
        capacity: &[f64],
        opts: &ForwardOptions,
    ) -> Result<ForwardOutput> {
        let b = x.dim(0)?;
        let x = &x.to_dtype(self.dtype())?;
        let caps: Vec<f64> = match capacity.len() {
            1 => vec![capacity[0]; b],
            n if n == b => capacity.to_vec(),
            n => candle_core::bail!("{n} capacities for a batch of {b} clips"),
        };
        if self.cfg.is_joint() {
            return self.forward_joint(x, &caps, opts);
        }
        if self.cfg.is_vmoe() {
            return self.forward_vmoe(x, opts);
        }
        let (nt, n, e) = (
            self.cfg.temporal_tokens(),
            self.cfg.spatial_tokens(),
            self.cfg.num_experts,
        );
        let tokens = {
            let _p = scope(Part::Embedding);
            self.embedding.forward(x, opts.train)? // (B*nt, N, D)
        };
        let probs = {
            let _p = scope(Part::Routing);
            self.mone_router()?.probs(&tokens, opts.train)? // (B*nt, N, E)
        };

        // Clips with the same token counts share one routed layout.
        let (counts_of, groups) = capacity_groups(&caps, n, e, opts.routing)?;

        // One pooled row per temporal index: nt rows of `tokens` per clip.
        let (pooled, assignment) = run_groups(
            tokens,
            &probs,
            &groups,
            nt,
            nt * n,
            opts,
            |t, p, k, salt| self.spatial_stage(t, p, k, opts, salt),
        )?;
        let logits = widen(self.temporal_and_head(&pooled, b, opts.train)?)?;
        Ok(output(logits, assignment, &counts_of))
    }

    /// Route S sequences of spatial tokens (S, N, D) with the given per-expert token counts and
    /// run the spatial transformer; returns the pooled (S, D) vectors and, when routed on the
    /// host, per token in original order, its expert.
    fn spatial_stage(
        &self,
        tokens: Tensor,
        probs: &Tensor,
        counts: &[usize],
        opts: &ForwardOptions,
        salt: u64,
    ) -> Result<(Tensor, Option<Vec<u8>>)> {
        let (s, n, d) = tokens.dims3()?;
        let e = self.cfg.num_experts;
        let widths = self.cfg.expert_widths();
        let nonempty: Vec<usize> = (0..e).filter(|&j| counts[j] > 0).collect();
        let fused = fused_ok(&tokens, opts.train);
        let routing_scope = scope(Part::Routing);

        let (x, layout, assign, r_rows) = if nonempty.len() == 1 {
            // Every token on one expert: no permutation needed.
            let j = nonempty[0];
            let x = tokens.reshape((s * n, d))?;
            let x = if fused { x.copy()? } else { x };
            let mut layout = TokenLayout::dense(n, s, d);
            layout.groups[0].width = widths[j];
            let r = probs.reshape((s * n, e))?.narrow(1, j, 1)?;
            (x, layout, Some(vec![j as u8; s * n]), r)
        } else {
            // The CPU routes on the host (fast there, and it yields the assignment); other
            // devices route where the probabilities are unless the assignment is wanted.
            let host_f32 = tokens.device().is_cpu() && tokens.dtype() == DType::F32;
            let on_device = !matches!(opts.routing, Routing::Random { .. })
                && !opts.want_assignment
                && !host_f32;
            let (idx, assign) = if on_device {
                (token_major_index(&epr_order_device(probs, counts)?)?, None)
            } else {
                let (idx, assign) = host_route(probs, counts, opts.routing, salt)?;
                (idx, Some(assign))
            };
            let x = tokens.reshape((s * n, d))?.index_select(&idx, 0)?;
            let layout = TokenLayout::grouped(n, s, counts, &widths);
            let r_rows = expert_probs(&probs.reshape((s * n, e))?, &idx, &layout, &nonempty)?;
            (x, layout, assign, r_rows)
        };
        drop(routing_scope);
        let x = self.routed_layers(x, &layout, &r_rows, opts.train)?;
        let x = self.spatial.norm.forward(&x, opts.train)?;
        let _p = scope(Part::Rest);
        let pooled = mean_pool(&x, n, s, layout.token_major, fused)?;
        Ok((pooled, assign))
    }

    /// The routed stage's blocks over rows in `layout`; `r_rows` (rows, 1) holds each row's
    /// router probability for its expert, which scales its MLP output by (alpha * r + 1).
    fn routed_layers(
        &self,
        x: Tensor,
        layout: &TokenLayout,
        r_rows: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let scale = {
            let _p = scope(Part::Routing);
            let alpha = self.mone_router()?.alpha()?.to_dtype(r_rows.dtype())?;
            let tensor = r_rows.broadcast_mul(&alpha)?.affine(1.0, 1.0)?;
            let host = if fused_ok(&x, train) {
                Some(tensor.flatten_all()?.to_vec1::<f32>()?)
            } else {
                None
            };
            RowScale { tensor, host }
        };
        let mut x = x;
        for layer in &self.spatial.layers {
            x = layer.forward(x, layout, Some(&scale), train)?;
        }
        Ok(x)
    }

    fn temporal_and_head(&self, pooled: &Tensor, b: usize, train: bool) -> Result<Tensor> {
        self.temporal_and_head_with(pooled, b, Exec::Model { train }, Routing::Learned)
            .map(|(logits, _)| logits)
    }

    /// MoNE's token router, which a V-MoE does not have.
    fn mone_router(&self) -> Result<&Router> {
        self.router
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("a V-MoE has no token router".into()))
    }

    /// The V-MoE: a dense spatial transformer, then the temporal one with its expert layers.
    fn forward_vmoe(&self, x: &Tensor, opts: &ForwardOptions) -> Result<ForwardOutput> {
        let (logits, route) =
            self.factorized_dense(x, Exec::Model { train: opts.train }, opts.routing)?;
        let b = x.dim(0)?;
        Ok(ForwardOutput {
            logits,
            assignment: None,
            capacity: vec![1.0; b],
            experts: route.as_ref().map_or_else(Vec::new, |r| {
                r.choice
                    .iter()
                    .zip(&r.weights)
                    .map(|(c, w)| c.iter().copied().zip(w.iter().copied()).collect())
                    .collect()
            }),
            router_logits: route.map(|r| r.logits),
        })
    }

    /// The factorized encoder with every spatial token at full width (the dense ViViT, or a
    /// V-MoE with its clip routing), and the V-MoE's route.
    fn factorized_dense(
        &self,
        x: &Tensor,
        exec: Exec,
        routing: Routing,
    ) -> Result<(Tensor, Option<ClipRoute>)> {
        let x = &x.to_dtype(self.dtype())?;
        let tokens = {
            let _p = scope(Part::Embedding);
            // The plain baseline takes the generic embedding too.
            self.embedding
                .forward(x, exec.train() || matches!(exec, Exec::Plain))?
        };
        let (s, n, d) = tokens.dims3()?;
        let h = self.dense_stage(
            &self.spatial,
            tokens.reshape((s * n, d))?,
            &TokenLayout::dense(n, s, d),
            exec,
        )?;
        let pooled = {
            let _p = scope(Part::Rest);
            let fused = matches!(exec, Exec::Model { .. }) && fused_ok(&h, exec.train());
            mean_pool(&h, n, s, false, fused)?
        };
        let (logits, route) = self.temporal_and_head_with(&pooled, x.dim(0)?, exec, routing)?;
        Ok((widen(logits)?, route))
    }

    /// The temporal transformer (its V-MoE layers routed once, at the first of them, from the
    /// clip's mean token) and the head.
    fn temporal_and_head_with(
        &self,
        pooled: &Tensor,
        b: usize,
        exec: Exec,
        routing: Routing,
    ) -> Result<(Tensor, Option<ClipRoute>)> {
        let _p = scope(Part::Rest);
        let (nt, d) = (self.cfg.temporal_tokens(), self.cfg.hidden_size);
        let (Some(temporal), Some(position)) = (&self.temporal, &self.embedding.temporal_position)
        else {
            candle_core::bail!("a factorized model without its temporal stage");
        };
        let mut t = pooled.reshape((b, nt, d))?;
        if let Some(cls) = &self.embedding.cls {
            t = Tensor::cat(&[cls.broadcast_as((b, 1, d))?.contiguous()?, t], 1)?;
        }
        let t = t.broadcast_add(position)?;
        let l = t.dim(1)?;
        let layout = TokenLayout::dense(l, b, d);
        let mut x = t.reshape((b * l, d))?;
        let mut route = None;
        if let Some(router) = &self.moe_router {
            let train = exec.train();
            if fused_ok(&x, train) {
                // The fused path updates the residual in place: own it.
                x = x.copy()?;
            }
            for layer in &temporal.layers {
                x = match &layer.mlp {
                    Ffn::Dense(_) => match exec {
                        Exec::Model { train } => layer.forward(x, &layout, None, train)?,
                        Exec::Plain => layer.forward_plain(&x, &layout)?,
                    },
                    Ffn::Experts(_) => {
                        if route.is_none() {
                            let _p = scope(Part::Routing);
                            route = Some(router.route(&x, l, routing)?);
                        }
                        let r = route.as_ref().ok_or_else(|| {
                            candle_core::Error::Msg("no route for an expert layer".into())
                        })?;
                        // (The plain baseline has no expert layer of its own: the model's.)
                        layer.forward_routed(x, &layout, r, train)?
                    }
                };
            }
            x = temporal.norm.forward(&x, train)?;
        } else {
            x = self.dense_stage(temporal, x, &layout, exec)?;
        }
        let x = x.reshape((b, l, d))?;
        let v = match self.cfg.pooling {
            Pooling::Cls => x.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Mean => x.mean(1)?,
        };
        // cuBLAS takes no row stride other than the width (the CLS rows are strided).
        Ok((self.head.forward(&v.contiguous()?)?, route))
    }

    /// Every token of a stage at full width, then the stage's final norm.
    fn dense_stage(
        &self,
        stage: &Stage,
        x: Tensor,
        layout: &TokenLayout,
        exec: Exec,
    ) -> Result<Tensor> {
        let x = Self::dense_layers(stage, x, layout, exec)?;
        stage.norm.forward(&x, exec.train())
    }

    /// Every token of a stage at full width, without the final norm.
    fn dense_layers(stage: &Stage, x: Tensor, layout: &TokenLayout, exec: Exec) -> Result<Tensor> {
        let mut x = x;
        match exec {
            Exec::Model { train } => {
                if fused_ok(&x, train) {
                    // The fused path updates the residual in place: own it.
                    x = x.copy()?;
                }
                for layer in &stage.layers {
                    x = layer.forward(x, layout, None, train)?;
                }
            }
            Exec::Plain => {
                for layer in &stage.layers {
                    x = layer.forward_plain(&x, layout)?;
                }
            }
        }
        Ok(x)
    }

    /// The precision of the weights (and of the activations: inputs are converted).
    pub fn dtype(&self) -> DType {
        self.embedding.projection_weight.dtype()
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    fn dense_forward(&self, x: &Tensor, exec: Exec) -> Result<Tensor> {
        if !self.cfg.is_joint() {
            return self
                .factorized_dense(x, exec, Routing::Learned)
                .map(|(l, _)| l);
        }
        let x = &x.to_dtype(self.dtype())?;
        let tokens = {
            let _p = scope(Part::Embedding);
            self.embedding.forward(x, matches!(exec, Exec::Plain))?
        };
        let (s, n, d) = tokens.dims3()?;
        let layout = TokenLayout::dense(n, s, d);
        let h = Self::dense_layers(&self.spatial, tokens.reshape((s * n, d))?, &layout, exec)?;
        let pooled = self.joint_pool(&h, &layout, s, 0)?;
        widen(self.joint_head(&pooled, exec.train())?)
    }

    /// The dense ViViT-FE forward with no router: every token at full width through the same
    /// kernels. The reference MoNE at e_c = 1 is measured against.
    pub fn forward_dense(&self, x: &Tensor) -> Result<Tensor> {
        self.dense_forward(x, Exec::Model { train: false })
    }

    /// The dense forward with plain candle layers (Linear, matmul attention, candle GELU):
    /// what candle gives out of the box, for comparison.
    pub fn forward_plain(&self, x: &Tensor) -> Result<Tensor> {
        self.dense_forward(x, Exec::Plain)
    }

    /// Every weight under its safetensors name.
    pub fn named_tensors(&self) -> HashMap<String, Tensor> {
        let mut m = HashMap::new();
        let e = &self.embedding;
        m.insert(
            "embedding.projection.weight".into(),
            e.projection_weight.clone(),
        );
        m.insert(
            "embedding.projection.bias".into(),
            e.projection_bias.clone(),
        );
        let joint = self.cfg.is_joint();
        let (pos, cls) = if joint {
            ("embedding.position", "embedding.cls")
        } else {
            ("embedding.spatial_position", "embedding.temporal_cls")
        };
        m.insert(pos.into(), e.position.clone());
        if let Some(t) = &e.temporal_position {
            m.insert("embedding.temporal_position".into(), t.clone());
        }
        if let Some(c) = &e.cls {
            m.insert(cls.into(), c.clone());
        }
        let lin = |m: &mut HashMap<String, Tensor>, name: String, l: &Linear| {
            m.insert(format!("{name}.weight"), l.weight().clone());
            if let Some(b) = l.bias() {
                m.insert(format!("{name}.bias"), b.clone());
            }
        };
        if let Some(r) = &self.router {
            lin(&mut m, "router".into(), &r.router);
            m.insert("router.alpha".into(), r.alpha.clone());
        }
        if let Some(r) = &self.moe_router {
            lin(&mut m, "moe_router".into(), &r.router);
        }
        let norm = |m: &mut HashMap<String, Tensor>, name: String, n: &Norm| {
            m.insert(format!("{name}.weight"), n.weight.clone());
            m.insert(format!("{name}.bias"), n.bias.clone());
        };
        let mut stages = vec![(if joint { "encoder" } else { "spatial" }, &self.spatial)];
        if let Some(t) = &self.temporal {
            stages.push(("temporal", t));
        }
        for (stage, st) in stages {
            for (i, l) in st.layers.iter().enumerate() {
                let p = format!("{stage}.layers.{i}");
                norm(&mut m, format!("{p}.norm1"), &l.norm1);
                lin(&mut m, format!("{p}.attention.qkv"), &l.attention.qkv);
                lin(&mut m, format!("{p}.attention.proj"), &l.attention.proj);
                norm(&mut m, format!("{p}.norm2"), &l.norm2);
                let mlps: Vec<(String, &Mlp)> = match &l.mlp {
                    Ffn::Dense(mlp) => vec![(format!("{p}.mlp"), mlp)],
                    Ffn::Experts(ex) => ex
                        .iter()
                        .enumerate()
                        .map(|(j, mlp)| (format!("{p}.mlp.experts.{j}"), mlp))
                        .collect(),
                };
                for (name, mlp) in mlps {
                    lin(&mut m, format!("{name}.fc1"), &mlp.fc1);
                    lin(&mut m, format!("{name}.fc2"), &mlp.fc2);
                }
            }
            norm(&mut m, format!("{stage}.norm"), &st.norm);
        }
        lin(&mut m, "head".into(), &self.head);
        m
    }
}

/// The mean of each sequence's token rows in a (N * S, D) stage output (see
/// `kernels::MeanPool` for the row orders); the fused kernel only where `fused`.
fn mean_pool(x: &Tensor, n: usize, s: usize, token_major: bool, fused: bool) -> Result<Tensor> {
    if fused {
        return x
            .contiguous()?
            .apply_op1_no_bwd(&MeanPool { n, s, token_major });
    }
    let d = x.dim(1)?;
    if token_major {
        x.reshape((n, s, d))?.mean(0)
    } else {
        x.reshape((s, n, d))?.mean(1)
    }
}
