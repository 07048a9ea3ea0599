//! Training: AdamW through phases (`recipe`: dense, nested joint with in-place distillation,
//! MoNE at an e_c drawn every step), each with warm-up plus cosine, optional channel
//! rewiring when a phase starts, label-free distillation from a teacher model (`loss`), and
//! checkpoints that resume exactly, across phase boundaries too. A Mobile V-MoE trains end to
//! end, optionally with its router pulled towards super-classes
//! (L = L_task + w * CE(router, super-class)). `cmd`: the `mone train` command.

mod cmd;
pub mod curve;
pub mod loss;
pub mod recipe;

pub use cmd::{run, TrainArgs};
pub use recipe::{Phase, PhaseKind, Recipe, CAPACITIES};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::dataset::{self, Rng, CLASSES};
use crate::model::{self, Config, ForwardOptions, MoneVivit, Routing};
use crate::optim::{AdamW, AdamWConfig};
const CHECKPOINT: &str = "checkpoint.safetensors";
const STATE: &str = "train_state.json";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    /// The model architecture (its num_classes must be 12 for the motion dataset).
    pub model: Config,
    pub steps: u64,
    pub batch: usize,
    pub lr: f64,
    pub warmup: u64,
    pub weight_decay: f64,
    /// Steps of the nested joint phase (every width, summed losses) before MoNE training.
    pub nested_steps: u64,
    pub seed: u64,
    pub checkpoint_every: u64,
    /// Train the dense baseline: every token at full width, no router.
    #[serde(default)]
    pub dense: bool,
    /// Train on the middle frame repeated (the single-frame baseline; implies dense).
    #[serde(default)]
    pub single_frame: bool,
    /// The model folder the weights started from (None: random initialisation).
    #[serde(default)]
    pub init: Option<PathBuf>,
    /// A labelled video folder to train on instead of the procedural dataset.
    #[serde(default)]
    pub dataset: Option<PathBuf>,
    /// The class names of `dataset` (empty: the motion dataset's).
    #[serde(default)]
    pub classes: Vec<String>,
    /// A V-MoE's super-class (router target) of every class; None: end-to-end routing.
    #[serde(default)]
    pub superclasses: Option<Vec<usize>>,
    /// Weight of the super-class router loss.
    #[serde(default = "default_router_weight")]
    pub router_weight: f64,
    /// Weight of V-MoE's importance (load-balancing) loss on the router, CV^2 of each
    /// expert's summed router probability over the batch; 0: none.
    #[serde(default)]
    pub balance_weight: f64,
    /// The phases (a recipe's); empty: the ones the flags above describe.
    #[serde(default)]
    pub phases: Vec<Phase>,
    /// Label-free distillation: every pass learns this model's full-capacity output and the
    /// labels are never read.
    #[serde(default)]
    pub teacher: Option<PathBuf>,
}

impl TrainConfig {
    /// A MoNE run of `model` with the `mone train` defaults (batch 32, AdamW at 2e-4 with 50
    /// warm-up steps and weight decay 0.05, 2,600 steps, seed 0) on the procedural dataset.
    pub fn for_model(model: Config) -> Self {
        Self {
            model,
            steps: 2600,
            batch: 32,
            lr: 2e-4,
            warmup: 50,
            weight_decay: 0.05,
            nested_steps: 0,
            seed: 0,
            checkpoint_every: 100,
            dense: false,
            single_frame: false,
            init: None,
            dataset: None,
            classes: Vec::new(),
            superclasses: None,
            router_weight: default_router_weight(),
            balance_weight: 0.0,
            phases: Vec::new(),
            teacher: None,
        }
    }

    /// The phases this run goes through.
    pub fn schedule(&self) -> Vec<Phase> {
        if !self.phases.is_empty() {
            return self.phases.clone();
        }
        let plain = |kind, steps| Phase::plain(kind, steps, self.lr, self.warmup);
        if self.dense || self.model.is_vmoe() {
            vec![plain(PhaseKind::Dense, self.steps)]
        } else if self.nested_steps > 0 && self.nested_steps < self.steps {
            vec![
                plain(PhaseKind::Nested, self.nested_steps),
                plain(PhaseKind::Mone, self.steps - self.nested_steps),
            ]
        } else if self.nested_steps > 0 {
            vec![plain(PhaseKind::Nested, self.steps)]
        } else {
            vec![plain(PhaseKind::Mone, self.steps)]
        }
    }

    /// Steps of all phases together.
    pub fn total_steps(&self) -> u64 {
        self.schedule().iter().map(|p| p.steps).sum()
    }
}

fn default_router_weight() -> f64 {
    0.3
}

/// Normalised (B, 3, T, S, S) clips and their labels for dataset indices `idx`; with
/// `single_frame`, every clip is its middle frame repeated (the single-frame baseline).
pub fn synthetic_batch(
    cfg: &Config,
    seed: u64,
    idx: &[u64],
    device: &Device,
    single_frame: bool,
) -> Result<(Tensor, Tensor)> {
    let t = cfg.frames;
    let (clips, labels): (Vec<Vec<Vec<u8>>>, Vec<u32>) = idx
        .iter()
        .map(|&i| {
            let plan = dataset::plan(seed, i, t);
            (dataset::render(&plan, cfg.image_size), plan.label as u32)
        })
        .unzip();
    let refs: Vec<Vec<&[u8]>> = clips
        .iter()
        .map(|f| {
            if single_frame {
                vec![f[t / 2].as_slice(); t]
            } else {
                f.iter().map(Vec::as_slice).collect()
            }
        })
        .collect();
    Ok((
        crate::tokenizer::frames_batch(&refs, cfg.image_size, cfg.mean, cfg.std, device)?,
        Tensor::from_vec(labels, idx.len(), device)?,
    ))
}

/// The class names a training config's model predicts.
pub fn labels_of(cfg: &TrainConfig) -> Vec<String> {
    if cfg.classes.is_empty() {
        CLASSES.iter().map(|s| s.to_string()).collect()
    } else {
        cfg.classes.clone()
    }
}

/// A batch from decoded clips: a fresh seeded permutation of the set every epoch.
pub fn folder_batch(
    cfg: &Config,
    set: &crate::eval::ClipSet,
    seed: u64,
    idx: &[u64],
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let n = set.len().max(1) as u64;
    let mut perm: Option<(u64, Vec<usize>)> = None;
    let (mut refs, mut labels) = (Vec::new(), Vec::new());
    for &i in idx {
        let epoch = i / n;
        if perm.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut order: Vec<usize> = (0..n as usize).collect();
            Rng::new(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)).shuffle(&mut order);
            perm = Some((epoch, order));
        }
        let c = perm.as_ref().map_or(0, |(_, o)| o[(i % n) as usize]);
        refs.push(set.frames[c].iter().map(Vec::as_slice).collect());
        labels.push(set.labels[c] as u32);
    }
    Ok((
        crate::tokenizer::frames_batch(&refs, cfg.image_size, cfg.mean, cfg.std, device)?,
        Tensor::from_vec(labels, idx.len(), device)?,
    ))
}

#[derive(Debug, Serialize, Deserialize)]
struct State {
    step: u64,
    config: TrainConfig,
    /// The last phase whose start (rewiring, fresh optimizer moments) has run.
    #[serde(default)]
    entered: Option<usize>,
}

pub struct Trainer {
    pub cfg: TrainConfig,
    /// Decoded clips of `cfg.dataset`, when training on a folder.
    pub clips: Option<crate::eval::ClipSet>,
    pub varmap: VarMap,
    pub model: MoneVivit,
    opt: AdamW,
    pub step: u64,
    entered: Option<usize>,
    /// The label-free distillation teacher.
    teacher: Option<model::LoadedModel>,
    device: Device,
}

/// One step's outcome.
#[derive(Clone, Copy, Debug)]
pub struct StepInfo {
    pub step: u64,
    pub loss: f32,
    pub lr: f64,
    pub capacity: Option<f64>,
    pub phase: PhaseKind,
    /// The phase's index in the schedule.
    pub phase_index: usize,
}

impl Trainer {
    pub fn new(cfg: TrainConfig, device: &Device) -> anyhow::Result<Self> {
        let classes = labels_of(&cfg);
        anyhow::ensure!(
            cfg.model.num_classes == classes.len(),
            "the data has {} classes; the model has {}",
            classes.len(),
            cfg.model.num_classes
        );
        anyhow::ensure!(
            cfg.batch > 0 && cfg.steps > 0,
            "batch and steps must be positive"
        );
        let varmap = VarMap::new();
        let model = MoneVivit::new(
            &cfg.model,
            VarBuilder::from_varmap(&varmap, DType::F32, device),
        )?;
        let mut vars: Vec<(String, candle_core::Var)> = varmap
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let opt = AdamW::new(
            vars,
            AdamWConfig {
                lr: cfg.lr,
                weight_decay: cfg.weight_decay,
                ..Default::default()
            },
        )?;
        Ok(Self {
            cfg,
            clips: None,
            varmap,
            model,
            opt,
            step: 0,
            entered: None,
            teacher: None,
            device: device.clone(),
        })
    }

    /// Resume from `dir` if it holds a checkpoint of the same config; returns whether it did.
    pub fn resume(&mut self, dir: &Path) -> anyhow::Result<bool> {
        let (ck, st) = (dir.join(CHECKPOINT), dir.join(STATE));
        if !ck.exists() || !st.exists() {
            return Ok(false);
        }
        let state: State = serde_json::from_str(&std::fs::read_to_string(&st)?)?;
        anyhow::ensure!(
            state.config == self.cfg,
            "{} was written with a different training config; use another --out or the same flags",
            st.display()
        );
        let tensors = candle_core::safetensors::load(&ck, &self.device)?;
        for (name, var) in self
            .varmap
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .iter()
        {
            let t = tensors
                .get(name)
                .ok_or_else(|| anyhow::anyhow!("checkpoint lacks `{name}`"))?;
            var.set(t)?;
        }
        self.opt.load_state(&tensors)?;
        self.step = state.step;
        self.entered = state.entered;
        Ok(true)
    }

    /// Copy the weights of a model folder with the same architecture into this trainer.
    pub fn init_from(&mut self, dir: &Path) -> anyhow::Result<()> {
        let lm = model::load_model_dir(dir, &self.device)?;
        let mut want = lm.config.clone();
        want.num_classes = self.cfg.model.num_classes;
        anyhow::ensure!(
            want == self.cfg.model,
            "{} has another architecture than the one being trained",
            dir.display()
        );
        // Other classes (or the same count in another order): everything but the head, which
        // keeps its fresh initialisation.
        let new_head = lm.labels != labels_of(&self.cfg);
        let tensors = lm.model.named_tensors();
        for (name, var) in self
            .varmap
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .iter()
        {
            if new_head && name.starts_with("head.") {
                continue;
            }
            let t = tensors
                .get(name)
                .ok_or_else(|| anyhow::anyhow!("{} lacks `{name}`", dir.display()))?;
            var.set(t)?;
        }
        Ok(())
    }

    pub fn save_checkpoint(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut all: HashMap<String, Tensor> = self.opt.state()?;
        for (k, v) in self
            .varmap
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .iter()
        {
            all.insert(k.clone(), v.as_tensor().clone());
        }
        // Write then rename, so a crash never leaves a half-written checkpoint.
        let tmp = dir.join(format!("{CHECKPOINT}.tmp"));
        candle_core::safetensors::save(&all, &tmp)?;
        std::fs::rename(&tmp, dir.join(CHECKPOINT))?;
        let st = State {
            step: self.step,
            config: self.cfg.clone(),
            entered: self.entered,
        };
        std::fs::write(dir.join(STATE), serde_json::to_string_pretty(&st)?)?;
        Ok(())
    }

    /// One optimisation step on the next batch.
    pub fn step(&mut self) -> anyhow::Result<StepInfo> {
        let s = self.step;
        let idx: Vec<u64> = (0..self.cfg.batch as u64)
            .map(|k| s * self.cfg.batch as u64 + k)
            .collect();
        if let Some(set) = &self.clips {
            let (x, y) = folder_batch(&self.cfg.model, set, self.cfg.seed, &idx, &self.device)?;
            return self.step_on(&x, &y);
        }
        let (x, y) = synthetic_batch(
            &self.cfg.model,
            self.cfg.seed,
            &idx,
            &self.device,
            self.cfg.single_frame,
        )?;
        self.step_on(&x, &y)
    }

    /// Use `dir`'s model at full capacity as the teacher of label-free distillation.
    pub fn set_teacher(&mut self, dir: &Path) -> anyhow::Result<()> {
        let t = model::load_model_dir(dir, &self.device)?;
        anyhow::ensure!(
            t.config.image_size == self.cfg.model.image_size
                && t.config.frames == self.cfg.model.frames
                && t.config.mean == self.cfg.model.mean
                && t.config.std == self.cfg.model.std,
            "the teacher {} takes other clips than the student",
            dir.display()
        );
        anyhow::ensure!(
            t.config.num_classes == self.cfg.model.num_classes,
            "the teacher {} has {} classes, the student {}",
            dir.display(),
            t.config.num_classes,
            self.cfg.model.num_classes
        );
        self.teacher = Some(t);
        Ok(())
    }

    /// The teacher's full-capacity logits for `x` (no graph).
    fn teacher_logits(&self, x: &Tensor) -> anyhow::Result<Option<Tensor>> {
        let Some(t) = &self.teacher else {
            return Ok(None);
        };
        let out = t.model.forward(x, &[1.0], &ForwardOptions::default())?;
        Ok(Some(out.logits.detach()))
    }

    /// Permute the residual channels by their measured importance (`model::rewire`).
    pub fn rewire(&mut self) -> anyhow::Result<Vec<usize>> {
        let named = self.model.named_tensors();
        let perm = model::rewire::order_by(&model::rewire::importance(&self.cfg.model, &named)?);
        let permuted = model::rewire::permute(&self.cfg.model, &named, &perm)?;
        for (name, var) in self
            .varmap
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .iter()
        {
            let t = permuted
                .get(name)
                .ok_or_else(|| anyhow::anyhow!("the model lacks `{name}`"))?;
            // (A var refuses a tensor that shares its storage: the unpermuted ones.)
            var.set(&t.copy()?)?;
        }
        Ok(perm)
    }

    /// Run phase `i`'s start once: rewiring if it asks for it, and fresh optimizer moments
    /// (the previous phase's moments belong to another loss).
    fn enter(&mut self, i: usize, phase: &Phase) -> anyhow::Result<()> {
        if self.entered == Some(i) {
            return Ok(());
        }
        if phase.rewire {
            self.rewire()?;
        }
        if self.entered.is_some() {
            self.opt.reset()?;
        }
        self.entered = Some(i);
        Ok(())
    }

    /// The phase and its step index of the next step.
    pub fn phase(&self) -> Option<(usize, u64, Phase)> {
        let phases = self.cfg.schedule();
        recipe::locate(&phases, self.step).map(|(i, s)| (i, s, phases[i].clone()))
    }

    /// One optimisation step on the batch (x, y), with the step's phase, capacity and
    /// learning rate. With a teacher, `y` is never read.
    pub fn step_on(&mut self, x: &Tensor, y: &Tensor) -> anyhow::Result<StepInfo> {
        let s = self.step;
        let (pi, ps, phase) = self
            .phase()
            .ok_or_else(|| anyhow::anyhow!("step {s} is past the last phase"))?;
        self.enter(pi, &phase)?;
        let teacher = self.teacher_logits(x)?;
        let opts = |routing| ForwardOptions {
            routing,
            train: true,
            want_assignment: false,
        };
        let ce = |logits: &Tensor| candle_nn::loss::cross_entropy(logits, y);
        // The term a pass learns on its own: the teacher's output, or the labels.
        let own = |logits: &Tensor| -> Result<Tensor> {
            match &teacher {
                Some(t) => loss::distill(t, logits),
                None => ce(logits),
            }
        };
        let widest = self.cfg.model.num_experts.saturating_sub(1);
        let (loss, capacity) = if self.cfg.model.is_vmoe() {
            (self.vmoe_loss(x, y)?, None)
        } else {
            match phase.kind {
                PhaseKind::Dense => {
                    let out = self
                        .model
                        .forward(x, &[1.0], &opts(Routing::Width(widest)))?;
                    (own(&out.logits)?, Some(1.0))
                }
                PhaseKind::Nested => {
                    let full = self
                        .model
                        .forward(x, &[1.0], &opts(Routing::Width(widest)))?;
                    let mut total = own(&full.logits)?;
                    let target = teacher.clone().unwrap_or_else(|| full.logits.detach());
                    let widths = recipe::sandwich(self.cfg.model.num_experts, 2, self.cfg.seed ^ s);
                    for j in widths.into_iter().filter(|&j| j != widest) {
                        let out = self.model.forward(x, &[1.0], &opts(Routing::Width(j)))?;
                        if phase.distill > 0.0 {
                            total =
                                (total + (loss::distill(&target, &out.logits)? * phase.distill)?)?;
                        }
                        if phase.ce > 0.0 && teacher.is_none() {
                            total = (total + (ce(&out.logits)? * phase.ce)?)?;
                        }
                    }
                    (total, None)
                }
                PhaseKind::Mone => {
                    let e_c = recipe::capacity_at(self.cfg.seed, s);
                    let student = if phase.distill > 0.0 {
                        // In-place distillation from the same batch at e_c 1.
                        let full = self.model.forward(x, &[1.0], &opts(Routing::Learned))?;
                        let target = teacher.clone().unwrap_or_else(|| full.logits.detach());
                        let out = self.model.forward(x, &[e_c], &opts(Routing::Learned))?;
                        let mut total = (own(&full.logits)?
                            + (loss::distill(&target, &out.logits)? * phase.distill)?)?;
                        if phase.ce > 0.0 && teacher.is_none() {
                            total = (total + (ce(&out.logits)? * phase.ce)?)?;
                        }
                        total
                    } else {
                        let out = self.model.forward(x, &[e_c], &opts(Routing::Learned))?;
                        own(&out.logits)?
                    };
                    (student, Some(e_c))
                }
            }
        };
        let grads = loss.backward()?;
        let lr = phase.lr_at(ps);
        self.opt.set_lr(lr);
        self.opt.step(&grads)?;
        self.step += 1;
        Ok(StepInfo {
            step: s,
            loss: loss.to_scalar::<f32>()?,
            lr,
            capacity,
            phase: phase.kind,
            phase_index: pi,
        })
    }

    /// A V-MoE's loss: the task, plus the super-class and balance terms when set.
    fn vmoe_loss(&self, x: &Tensor, y: &Tensor) -> anyhow::Result<Tensor> {
        let opts = ForwardOptions {
            routing: Routing::Learned,
            train: true,
            want_assignment: false,
        };
        let out = self.model.forward(x, &[1.0], &opts)?;
        let task = candle_nn::loss::cross_entropy(&out.logits, y)?;
        let loss = match (&self.cfg.superclasses, &out.router_logits) {
            (Some(sc), Some(logits)) => {
                let labels = y.to_vec1::<u32>()?;
                let target: Vec<u32> = labels
                    .iter()
                    .map(|&l| sc.get(l as usize).map(|&g| g as u32))
                    .collect::<Option<_>>()
                    .ok_or_else(|| anyhow::anyhow!("a label without a super-class"))?;
                let target = Tensor::from_vec(target, labels.len(), y.device())?;
                let router = candle_nn::loss::cross_entropy(logits, &target)?;
                (task + (router * self.cfg.router_weight)?)?
            }
            _ => task,
        };
        Ok(match (&out.router_logits, self.cfg.balance_weight) {
            (Some(logits), w) if w > 0.0 => {
                let probs = candle_nn::ops::softmax(logits, 1)?;
                let imp = probs.sum(0)?;
                let mean = imp.mean_all()?;
                let var = imp.broadcast_sub(&mean)?.sqr()?.mean_all()?;
                (loss + ((var / mean.sqr()?)? * w)?)?
            }
            _ => loss,
        })
    }

    /// Top-1 on `count` held-out clips (dataset seed `seed`) at each capacity of `caps`, and
    /// with a teacher, the top-1 agreement with the teacher's full-capacity prediction. The
    /// clips are rendered, and the teacher run, once for all capacities.
    pub fn held_out_at(
        &self,
        seed: u64,
        count: u64,
        caps: &[f64],
    ) -> anyhow::Result<Vec<(f64, Option<f64>)>> {
        let set = crate::eval::ClipSet::synthetic(&self.cfg.model, seed, count);
        let input = if self.cfg.single_frame {
            crate::eval::Input::SingleFrame
        } else {
            crate::eval::Input::AsIs
        };
        let routing = if self.cfg.dense {
            Routing::Width(self.cfg.model.num_experts - 1)
        } else {
            Routing::Learned
        };
        let reference = match &self.teacher {
            Some(t) => Some(crate::eval::predictions(
                &t.model,
                &t.config,
                &set,
                1.0,
                Routing::Learned,
                self.cfg.batch,
                &self.device,
            )?),
            None => None,
        };
        caps.iter()
            .map(|&e_c| {
                let s = crate::eval::score(
                    &self.model,
                    &self.cfg.model,
                    &set,
                    e_c,
                    routing,
                    input,
                    self.cfg.batch,
                    &self.device,
                )?;
                let agree = reference
                    .as_ref()
                    .map(|r| crate::eval::agreement(&s.predictions, r));
                Ok((s.top1(), agree))
            })
            .collect()
    }

    /// Write the trained model as a model folder.
    pub fn export(&self, dir: &Path) -> anyhow::Result<()> {
        let labels = labels_of(&self.cfg);
        model::save_model_dir(dir, &self.cfg.model, &labels, &self.model.named_tensors())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
