//! Training on the procedural motion dataset with the MoNE recipe: AdamW, warm-up plus cosine,
//! a capacity drawn from {0.15, 0.25, ..., 0.95} every step (optionally after a phase that
//! trains the nested widths jointly), and checkpoints that resume exactly. A Mobile V-MoE
//! trains end to end, optionally with its router pulled towards super-classes
//! (L = L_task + w * CE(router, super-class)).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::dataset::{self, Rng, CLASSES};
use crate::model::{self, Config, ForwardOptions, MoneVivit, Routing};
use crate::optim::{AdamW, AdamWConfig};

pub const CAPACITIES: [f64; 9] = [0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95];
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

/// Learning rate at `step`: linear warm-up, then cosine to zero.
pub fn lr_at(cfg: &TrainConfig, step: u64) -> f64 {
    if step < cfg.warmup {
        return cfg.lr * (step + 1) as f64 / cfg.warmup as f64;
    }
    let span = cfg.steps.saturating_sub(cfg.warmup).max(1) as f64;
    let u = ((step - cfg.warmup) as f64 / span).min(1.0);
    cfg.lr * 0.5 * (1.0 + (std::f64::consts::PI * u).cos())
}

#[derive(Debug, Serialize, Deserialize)]
struct State {
    step: u64,
    config: TrainConfig,
}

pub struct Trainer {
    pub cfg: TrainConfig,
    /// Decoded clips of `cfg.dataset`, when training on a folder.
    pub clips: Option<crate::eval::ClipSet>,
    pub varmap: VarMap,
    pub model: MoneVivit,
    opt: AdamW,
    pub step: u64,
    device: Device,
}

/// One step's outcome.
#[derive(Clone, Copy, Debug)]
pub struct StepInfo {
    pub step: u64,
    pub loss: f32,
    pub lr: f64,
    pub capacity: Option<f64>,
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

    /// One optimisation step on the batch (x, y), with the step's capacity and learning rate.
    pub fn step_on(&mut self, x: &Tensor, y: &Tensor) -> anyhow::Result<StepInfo> {
        let (x, y) = (x.clone(), y.clone());
        let s = self.step;
        let opts = |routing| ForwardOptions {
            routing,
            train: true,
            want_assignment: false,
        };
        let (loss, capacity) = if self.cfg.model.is_vmoe() {
            let out = self.model.forward(&x, &[1.0], &opts(Routing::Learned))?;
            let task = candle_nn::loss::cross_entropy(&out.logits, &y)?;
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
            let loss = match (&out.router_logits, self.cfg.balance_weight) {
                (Some(logits), w) if w > 0.0 => {
                    let probs = candle_nn::ops::softmax(logits, 1)?;
                    let imp = probs.sum(0)?;
                    let mean = imp.mean_all()?;
                    let var = imp.broadcast_sub(&mean)?.sqr()?.mean_all()?;
                    (loss + ((var / mean.sqr()?)? * w)?)?
                }
                _ => loss,
            };
            (loss, None)
        } else if self.cfg.dense {
            let out = self.model.forward(
                &x,
                &[1.0],
                &opts(Routing::Width(self.cfg.model.num_experts - 1)),
            )?;
            (candle_nn::loss::cross_entropy(&out.logits, &y)?, Some(1.0))
        } else if s < self.cfg.nested_steps {
            let mut total: Option<Tensor> = None;
            for j in 0..self.cfg.model.num_experts {
                let out = self.model.forward(&x, &[1.0], &opts(Routing::Width(j)))?;
                let l = candle_nn::loss::cross_entropy(&out.logits, &y)?;
                total = Some(match total {
                    None => l,
                    Some(t) => (t + l)?,
                });
            }
            (total.ok_or_else(|| anyhow::anyhow!("no experts"))?, None)
        } else {
            let mut rng = Rng::new(self.cfg.seed ^ s.wrapping_mul(0x2545_F491_4F6C_DD1D));
            let e_c = CAPACITIES[rng.below(CAPACITIES.len())];
            let out = self.model.forward(&x, &[e_c], &opts(Routing::Learned))?;
            (candle_nn::loss::cross_entropy(&out.logits, &y)?, Some(e_c))
        };
        let grads = loss.backward()?;
        let lr = lr_at(&self.cfg, s);
        self.opt.set_lr(lr);
        self.opt.step(&grads)?;
        self.step += 1;
        Ok(StepInfo {
            step: s,
            loss: loss.to_scalar::<f32>()?,
            lr,
            capacity,
        })
    }

    /// Top-1 accuracy on `count` held-out clips (dataset seed `seed`) at capacity `e_c`.
    pub fn accuracy(
        &self,
        seed: u64,
        count: u64,
        e_c: f64,
        routing: Routing,
    ) -> anyhow::Result<f64> {
        let set = crate::eval::ClipSet::synthetic(&self.cfg.model, seed, count);
        let input = if self.cfg.single_frame {
            crate::eval::Input::SingleFrame
        } else {
            crate::eval::Input::AsIs
        };
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
        Ok(s.top1())
    }

    /// Write the trained model as a model folder.
    pub fn export(&self, dir: &Path) -> anyhow::Result<()> {
        let labels = labels_of(&self.cfg);
        model::save_model_dir(dir, &self.cfg.model, &labels, &self.model.named_tensors())?;
        Ok(())
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    /// Architecture preset (its classes are set to the dataset's 12).
    #[arg(long, default_value = "vivit-fe-motion")]
    pub preset: String,
    /// Override the preset's input size (pixels).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// Override the preset's frames per clip.
    #[arg(long)]
    pub frames: Option<usize>,
    /// Override the preset's width D.
    #[arg(long)]
    pub hidden_size: Option<usize>,
    /// Override the preset's attention heads.
    #[arg(long)]
    pub heads: Option<usize>,
    /// Override the preset's spatial depth L_s.
    #[arg(long)]
    pub spatial_layers: Option<usize>,
    /// Override the preset's temporal depth L_t.
    #[arg(long)]
    pub temporal_layers: Option<usize>,
    /// Output folder: checkpoints while training, then the model folder.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 2600)]
    pub steps: u64,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Peak learning rate. Small ViTs from scratch sit at chance for several hundred steps
    /// before they find the moving object; with 1e-3 the loss fell more slowly than with 2e-4.
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 50)]
    pub warmup: u64,
    #[arg(long, default_value_t = 0.05)]
    pub weight_decay: f64,
    /// Steps of the nested joint phase first.
    #[arg(long, default_value_t = 0)]
    pub nested_steps: u64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: u64,
    /// Held-out clips for the final evaluation (dataset seed + 1).
    #[arg(long, default_value_t = 240)]
    pub eval_count: u64,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Train the dense baseline (every token at full width) instead of MoNE.
    #[arg(long)]
    pub dense: bool,
    /// Train the single-frame baseline: dense, on each clip's middle frame repeated.
    #[arg(long)]
    pub single_frame: bool,
    /// Start from this model folder's weights (same architecture), e.g. MoNE from a trained
    /// dense model, or fine-tuning on new data.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Train on a labelled folder of your own videos (labels.csv, or one sub-folder per
    /// class) instead of the procedural dataset; usually with --init (fine-tuning).
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Only write the model folder from the checkpoint in --out (e.g. of a stopped run).
    #[arg(long)]
    pub export: bool,
    /// `mone` (nested experts per token) or `vmoe` (Mobile V-MoE: the preset's last temporal
    /// layers become per-clip expert layers).
    #[arg(long, default_value = "mone", value_parser = ["mone", "vmoe"])]
    pub kind: String,
    /// V-MoE: expert MLPs per MoE layer.
    #[arg(long, default_value_t = 10)]
    pub experts: usize,
    /// V-MoE: how many of the last temporal layers are MoE layers.
    #[arg(long, default_value_t = 2)]
    pub moe_layers: usize,
    /// V-MoE: experts per clip (1 or 2).
    #[arg(long, default_value_t = 1)]
    pub top_k: usize,
    /// V-MoE: train the router towards super-classes: `auto` (cluster the confusion matrix of
    /// --baseline on held-out clips) or a superclasses.json file. Without it the router
    /// learns end to end.
    #[arg(long)]
    pub superclasses: Option<String>,
    /// The dense model whose confusion matrix `--superclasses auto` clusters.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// Weight of the super-class router loss.
    #[arg(long, default_value_t = 0.3)]
    pub router_weight: f64,
    /// V-MoE: weight of the importance (load-balancing) loss, CV^2 of the experts' summed
    /// router probabilities per batch (V-MoE's auxiliary loss); 0 = none.
    #[arg(long, default_value_t = 0.0)]
    pub balance_weight: f64,
    /// Held-out clips (dataset seed + 2) for the baseline's confusion matrix.
    #[arg(long, default_value_t = 1200)]
    pub superclass_clips: u64,
}

/// `mone train`: train on the procedural dataset, resuming from `--out` when it holds a checkpoint.
pub fn run(a: &TrainArgs) -> anyhow::Result<()> {
    let device = crate::device::open(&a.device)?;
    let mut mcfg = Config::preset(&a.preset)?;
    mcfg.num_classes = CLASSES.len();
    let over = |v: Option<usize>, dst: &mut usize| {
        if let Some(v) = v {
            *dst = v;
        }
    };
    over(a.image_size, &mut mcfg.image_size);
    over(a.frames, &mut mcfg.frames);
    over(a.hidden_size, &mut mcfg.hidden_size);
    over(a.heads, &mut mcfg.num_heads);
    over(a.spatial_layers, &mut mcfg.spatial_layers);
    over(a.temporal_layers, &mut mcfg.temporal_layers);
    if a.kind == "vmoe" && !mcfg.is_vmoe() {
        mcfg.kind = model::config::KIND_VMOE.to_string();
        mcfg.moe = Some(model::MoeConfig {
            layers: a.moe_layers,
            experts: a.experts,
            top_k: a.top_k,
        });
    }
    if let Some(dir) = &a.init {
        // The architecture is the init model's (its classes may change below).
        mcfg = model::io::read_config(&dir.join("config.json"))?;
        mcfg.num_classes = CLASSES.len();
    }
    mcfg.validate()?;
    anyhow::ensure!(
        mcfg.is_vmoe() || (a.superclasses.is_none() && a.baseline.is_none()),
        "--superclasses and --baseline are for V-MoE training (--kind vmoe)"
    );
    anyhow::ensure!(
        !(mcfg.is_vmoe() && (a.dense || a.single_frame || a.nested_steps > 0)),
        "--dense, --single-frame and --nested-steps are MoNE options, not for a V-MoE"
    );
    let mut classes = Vec::new();
    if let Some(dir) = &a.dataset {
        let mut names: Vec<String> = crate::eval::list_folder(dir)?
            .into_iter()
            .map(|(_, l)| l)
            .collect();
        names.sort();
        names.dedup();
        anyhow::ensure!(
            names.len() >= 2,
            "{} needs at least two classes",
            dir.display()
        );
        mcfg.num_classes = names.len();
        classes = names;
        // The same classes as the init model: keep its order, so its head carries over.
        if let Some(init) = &a.init {
            let theirs = model::io::read_labels(&init.join("labels.txt"), mcfg.num_classes).ok();
            if let Some(theirs) = theirs {
                let mut sorted = theirs.clone();
                sorted.sort();
                if sorted == classes {
                    classes = theirs;
                }
            }
        }
    }
    let cfg = TrainConfig {
        model: mcfg,
        steps: a.steps,
        batch: a.batch,
        lr: a.lr,
        warmup: a.warmup,
        weight_decay: a.weight_decay,
        nested_steps: a.nested_steps,
        seed: a.seed,
        checkpoint_every: a.checkpoint_every.max(1),
        dense: a.dense || a.single_frame,
        single_frame: a.single_frame,
        init: a.init.clone(),
        dataset: a.dataset.clone(),
        classes: Vec::new(),
        superclasses: None,
        router_weight: a.router_weight,
        balance_weight: a.balance_weight,
    };
    let superclasses = match (&a.superclasses, cfg.model.moe) {
        (Some(spec), Some(moe)) => {
            let labels = if classes.is_empty() {
                CLASSES.iter().map(|s| s.to_string()).collect()
            } else {
                classes.clone()
            };
            let sc = superclasses_for(a, spec, &cfg.model, &labels, moe.experts, &device)?;
            let index = sc.index(&labels, moe.experts)?;
            std::fs::create_dir_all(&a.out)?;
            sc.write(&a.out.join(crate::superclass::FILE))?;
            for (g, group) in sc.groups.iter().enumerate() {
                eprintln!("super-class {g}: {}", group.join(", "));
            }
            Some(index)
        }
        _ => None,
    };
    let cfg = TrainConfig {
        classes,
        superclasses,
        router_weight: a.router_weight,
        balance_weight: a.balance_weight,
        ..cfg
    };
    let mut tr = Trainer::new(cfg, &device)?;
    if let Some(dir) = &a.dataset {
        #[cfg(feature = "gst")]
        {
            let set = crate::eval::ClipSet::folder(dir, &tr.cfg.model, &tr.cfg.classes)?;
            eprintln!("training on {}", set.source);
            tr.clips = Some(set);
        }
        #[cfg(not(feature = "gst"))]
        anyhow::bail!("--dataset {} needs the `gst` feature", dir.display());
    }
    if tr.resume(&a.out)? {
        eprintln!("resumed from {} at step {}", a.out.display(), tr.step);
    } else if let Some(dir) = &a.init {
        tr.init_from(dir)?;
        eprintln!("weights initialised from {}", dir.display());
    }
    if a.export {
        anyhow::ensure!(
            tr.step > 0,
            "{} holds no checkpoint of this config",
            a.out.display()
        );
        tr.export(&a.out)?;
        eprintln!(
            "model folder (step {}) written to {}",
            tr.step,
            a.out.display()
        );
        return Ok(());
    }
    let t0 = Instant::now();
    let start = tr.step;
    // A bar on a terminal; a line every 10 steps in a log file.
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
        let b = indicatif::ProgressBar::new(tr.cfg.steps).with_position(start);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  eta {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let mut smooth: Option<f32> = None;
    while tr.step < tr.cfg.steps {
        let info = tr.step()?;
        let done = tr.step - start;
        smooth = Some(smooth.map_or(info.loss, |s| 0.95 * s + 0.05 * info.loss));
        let msg = format!(
            "loss {:.4} (avg {:.4})  lr {:.2e}  e_c {}  {:.1} clips/s",
            info.loss,
            smooth.unwrap_or(info.loss),
            info.lr,
            info.capacity.map_or(
                if tr.cfg.model.is_vmoe() {
                    "-"
                } else {
                    "nested"
                }
                .into(),
                |c| format!("{c:.2}")
            ),
            (done * tr.cfg.batch as u64) as f64 / t0.elapsed().as_secs_f64()
        );
        match &bar {
            Some(b) => {
                b.set_position(tr.step);
                b.set_message(msg);
            }
            None if info.step % 10 == 0 || tr.step == tr.cfg.steps => {
                eprintln!("step {}/{}  {msg}", tr.step, tr.cfg.steps)
            }
            None => {}
        }
        if tr.step % tr.cfg.checkpoint_every == 0 || tr.step == tr.cfg.steps {
            tr.save_checkpoint(&a.out)?;
        }
    }
    if let Some(b) = bar {
        b.finish();
    }
    tr.export(&a.out)?;
    if tr.clips.is_some() {
        tr.export(&a.out)?;
        eprintln!(
            "model folder written to {}; evaluate it on held-out videos with `mone eval --dataset`",
            a.out.display()
        );
        return Ok(());
    }
    // A dense or single-frame model has no trained router: only full width means anything.
    let caps: &[f64] = if tr.cfg.dense || tr.cfg.model.is_vmoe() {
        &[1.0]
    } else {
        &[1.0, 0.5, 0.3, 0.15]
    };
    for &e_c in caps {
        let acc = tr.accuracy(a.seed + 1, a.eval_count, e_c, Routing::Learned)?;
        if tr.cfg.model.is_vmoe() {
            eprintln!("held-out top-1: {:.1}%", acc * 100.0);
        } else {
            eprintln!("held-out top-1 at e_c {e_c}: {:.1}%", acc * 100.0);
        }
    }
    eprintln!("model folder written to {}", a.out.display());
    Ok(())
}

/// Super-classes from a file, or (`auto`) clustered from `--baseline`'s confusion matrix on
/// held-out clips: the procedural dataset's seed + 2, or the training folder itself.
fn superclasses_for(
    a: &TrainArgs,
    spec: &str,
    cfg: &Config,
    labels: &[String],
    experts: usize,
    device: &Device,
) -> anyhow::Result<crate::superclass::Superclasses> {
    use crate::superclass::{from_confusion, Superclasses};
    if spec != "auto" {
        return Ok(Superclasses::read(Path::new(spec))?);
    }
    let Some(dir) = &a.baseline else {
        anyhow::bail!("--superclasses auto needs --baseline DIR: a dense model of the same classes whose confusion matrix is clustered");
    };
    let b = model::load_model_dir(dir, device)?;
    anyhow::ensure!(
        b.labels == labels,
        "{} predicts other classes (or another order) than the V-MoE being trained",
        dir.display()
    );
    let set = match &a.dataset {
        #[cfg(feature = "gst")]
        Some(d) => crate::eval::ClipSet::folder(d, &b.config, labels)?,
        #[cfg(not(feature = "gst"))]
        Some(d) => anyhow::bail!("--dataset {} needs the `gst` feature", d.display()),
        None => crate::eval::ClipSet::synthetic(&b.config, a.seed + 2, a.superclass_clips),
    };
    anyhow::ensure!(
        b.config.image_size == cfg.image_size && b.config.frames == cfg.frames,
        "{} takes other clips than the V-MoE",
        dir.display()
    );
    eprintln!(
        "confusion matrix of {} on {} ...",
        dir.display(),
        set.source
    );
    let routing = if b.config.is_mone() {
        Routing::Width(b.config.num_experts - 1)
    } else {
        Routing::Learned
    };
    let s = crate::eval::score(
        &b.model,
        &b.config,
        &set,
        1.0,
        routing,
        crate::eval::Input::AsIs,
        32,
        device,
    )?;
    eprintln!("baseline top-1 there: {:.1}%", s.top1() * 100.0);
    Ok(from_confusion(
        &s.confusion,
        labels,
        experts,
        format!("{} on {}", dir.display(), set.source),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_cfg(steps: u64) -> TrainConfig {
        let mut m = Config::preset("vivit-fe-tiny").unwrap();
        m.num_classes = CLASSES.len();
        TrainConfig {
            model: m,
            steps,
            batch: 4,
            lr: 1e-3,
            warmup: 2,
            weight_decay: 0.05,
            nested_steps: 2,
            seed: 3,
            checkpoint_every: 3,
            dense: false,
            single_frame: false,
            init: None,
            dataset: None,
            classes: Vec::new(),
            superclasses: None,
            router_weight: 0.3,
            balance_weight: 0.0,
        }
    }

    fn weights(t: &Trainer) -> Vec<(String, Vec<f32>)> {
        let mut v: Vec<(String, Vec<f32>)> = t
            .varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_tensor()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap(),
                )
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        let c = TrainConfig {
            warmup: 10,
            steps: 110,
            lr: 1.0,
            ..tiny_cfg(110)
        };
        assert!((lr_at(&c, 0) - 0.1).abs() < 1e-12);
        assert!((lr_at(&c, 9) - 1.0).abs() < 1e-12);
        assert!((lr_at(&c, 60) - 0.5).abs() < 1e-9);
        assert!(lr_at(&c, 109) < 0.01);
    }

    #[test]
    fn a_short_run_lowers_the_loss_on_a_fixed_batch() {
        let cfg = TrainConfig {
            nested_steps: 5,
            lr: 2e-3,
            warmup: 1,
            ..tiny_cfg(40)
        };
        let mut tr = Trainer::new(cfg.clone(), &Device::Cpu).unwrap();
        let idx: Vec<u64> = (0..8).collect();
        let (x, y) = synthetic_batch(&cfg.model, 1, &idx, &Device::Cpu, false).unwrap();
        let eval = |tr: &Trainer| {
            let out = tr
                .model
                .forward(&x, &[1.0], &ForwardOptions::default())
                .unwrap();
            candle_nn::loss::cross_entropy(&out.logits, &y)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let before = eval(&tr);
        for _ in 0..40 {
            let info = tr.step_on(&x, &y).unwrap();
            assert!(info.loss.is_finite());
        }
        let after = eval(&tr);
        // A run that learns nothing stays near 1x; 40 steps reach about 0.5x, a little more or
        // less with the rounding of the GEMM kernels the CPU runs (0.508x was seen).
        assert!(after < before * 0.6, "loss {before} -> {after}");
    }

    #[test]
    fn the_superclass_loss_teaches_the_vmoe_router_its_groups() {
        let mut m = Config::preset("vmoe-fe-tiny").unwrap();
        m.num_classes = CLASSES.len();
        let sc: Vec<usize> = (0..CLASSES.len()).map(|c| c % 3).collect();
        let cfg = |superclasses| TrainConfig {
            model: m.clone(),
            nested_steps: 0,
            lr: 3e-3,
            warmup: 1,
            superclasses,
            router_weight: 1.0,
            ..tiny_cfg(30)
        };
        let idx: Vec<u64> = (0..12).collect();
        let (x, y) = synthetic_batch(&m, 1, &idx, &Device::Cpu, false).unwrap();
        let labels = y.to_vec1::<u32>().unwrap();
        let router_ce = |tr: &Trainer| {
            let out = tr
                .model
                .forward(&x, &[1.0], &ForwardOptions::default())
                .unwrap();
            let t: Vec<u32> = labels.iter().map(|&l| sc[l as usize] as u32).collect();
            let t = Tensor::new(t.as_slice(), &Device::Cpu).unwrap();
            candle_nn::loss::cross_entropy(out.router_logits.as_ref().unwrap(), &t)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let mut guided = Trainer::new(cfg(Some(sc.clone())), &Device::Cpu).unwrap();
        let mut plain = Trainer::new(cfg(None), &Device::Cpu).unwrap();
        let before = router_ce(&guided);
        // Near-uniform at initialisation: ln 3.
        assert!((before - 3f32.ln()).abs() < 0.1, "{before}");
        for _ in 0..30 {
            assert!(guided.step_on(&x, &y).unwrap().loss.is_finite());
            assert!(plain.step_on(&x, &y).unwrap().loss.is_finite());
        }
        let (g, p) = (router_ce(&guided), router_ce(&plain));
        assert!(g < 0.5 * before, "guided router CE {before} -> {g}");
        assert!(g < 0.5 * p, "guided {g} vs end-to-end {p}");
    }

    #[test]
    fn the_balance_loss_adds_the_cv_squared_of_expert_importance() {
        let mut m = Config::preset("vmoe-fe-tiny").unwrap();
        m.num_classes = CLASSES.len();
        let cfg = |balance_weight| TrainConfig {
            model: m.clone(),
            nested_steps: 0,
            balance_weight,
            ..tiny_cfg(5)
        };
        let idx: Vec<u64> = (0..6).collect();
        let (x, y) = synthetic_batch(&m, 2, &idx, &Device::Cpu, false).unwrap();
        let mut plain = Trainer::new(cfg(0.0), &Device::Cpu).unwrap();
        let mut balanced = Trainer::new(cfg(2.0), &Device::Cpu).unwrap();
        // The same weights, and a router that prefers expert 0.
        for (name, var) in balanced.varmap.data().lock().unwrap().iter() {
            let src = plain.varmap.data().lock().unwrap()[name]
                .as_tensor()
                .copy()
                .unwrap();
            let src = if name == "moe_router.bias" {
                Tensor::new(&[1.5f32, 0.0, -0.5], &Device::Cpu).unwrap()
            } else {
                src
            };
            var.set(&src).unwrap();
            plain.varmap.data().lock().unwrap()[name].set(&src).unwrap();
        }
        let out = plain
            .model
            .forward(&x, &[1.0], &ForwardOptions::default())
            .unwrap();
        let p = candle_nn::ops::softmax(out.router_logits.as_ref().unwrap(), 1)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let imp: Vec<f64> = (0..3)
            .map(|e| p.iter().map(|r| r[e] as f64).sum())
            .collect();
        let mean = imp.iter().sum::<f64>() / 3.0;
        let var = imp.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 3.0;
        let cv2 = var / (mean * mean);
        assert!(cv2 > 0.1, "{cv2}");
        let a = plain.step_on(&x, &y).unwrap().loss as f64;
        let b = balanced.step_on(&x, &y).unwrap().loss as f64;
        assert!((b - a - 2.0 * cv2).abs() < 1e-4, "{b} - {a} vs 2 * {cv2}");
    }

    #[test]
    fn a_resumed_run_ends_exactly_where_a_straight_run_does() {
        let dir = std::env::temp_dir().join(format!("mone-train-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut straight = Trainer::new(tiny_cfg(6), &Device::Cpu).unwrap();
        // Same initial weights for both runs: copy them over.
        let mut first = Trainer::new(tiny_cfg(6), &Device::Cpu).unwrap();
        for (name, var) in first.varmap.data().lock().unwrap().iter() {
            let src = straight
                .varmap
                .data()
                .lock()
                .unwrap()
                .get(name)
                .unwrap()
                .as_tensor()
                .copy()
                .unwrap();
            var.set(&src).unwrap();
        }
        let mut losses = Vec::new();
        for _ in 0..6 {
            losses.push(straight.step().unwrap().loss);
        }
        assert!(losses.iter().all(|l| l.is_finite()));
        for _ in 0..3 {
            first.step().unwrap();
        }
        first.save_checkpoint(&dir).unwrap();
        let mut resumed = Trainer::new(tiny_cfg(6), &Device::Cpu).unwrap();
        assert!(resumed.resume(&dir).unwrap());
        assert_eq!(resumed.step, 3);
        for _ in 3..6 {
            resumed.step().unwrap();
        }
        assert_eq!(weights(&resumed), weights(&straight));
        // Another config refuses the checkpoint.
        let mut other = Trainer::new(
            TrainConfig {
                lr: 5e-4,
                ..tiny_cfg(6)
            },
            &Device::Cpu,
        )
        .unwrap();
        assert!(other.resume(&dir).is_err());
        resumed.export(&dir.join("model")).unwrap();
        let loaded = model::load_model_dir(&dir.join("model"), &Device::Cpu).unwrap();
        assert_eq!(loaded.labels.len(), 12);
        std::fs::remove_dir_all(&dir).ok();
    }
}
