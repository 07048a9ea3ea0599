//! `mone train`: the flags or a recipe file (flags override the recipe's run settings), a
//! progress bar or log lines naming the phase, checkpoints, the training curve, and the
//! held-out evaluation at the end.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;

use super::curve::{self, Curve, Point};
use super::recipe::Recipe;
use super::{TrainConfig, Trainer};
use crate::dataset::CLASSES;
use crate::model::{self, Config, Routing};

#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    /// A recipe file (TOML): the model, the run's settings and the training phases. Flags
    /// given with it override its run settings; phase settings live in the file.
    #[arg(long, conflicts_with_all = ["steps", "lr", "warmup", "nested_steps", "dense", "single_frame"])]
    pub recipe: Option<PathBuf>,
    /// Architecture preset (its classes are set to the dataset's 12) [default: vivit-fe-motion].
    #[arg(long)]
    pub preset: Option<String>,
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
    /// Clips per step [default: 32].
    #[arg(long)]
    pub batch: Option<usize>,
    /// Peak learning rate. Small ViTs from scratch sit at chance for several hundred steps
    /// before they find the moving object; with 1e-3 the loss fell more slowly than with 2e-4.
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 50)]
    pub warmup: u64,
    /// AdamW weight decay [default: 0.05].
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Steps of the nested joint phase first.
    #[arg(long, default_value_t = 0)]
    pub nested_steps: u64,
    /// Dataset seed of the training clips (held-out clips use seed + 1) [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Steps between checkpoints [default: 100].
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Held-out clips for the curve's evaluations and the final one (dataset seed + 1)
    /// [default: 240].
    #[arg(long)]
    pub eval_count: Option<u64>,
    /// Steps between the training curve's held-out evaluations (0: none) [default: 200].
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Where to write the training-curve plot [default: curve.png in --out].
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Label-free distillation: the --init model at full capacity is the teacher and every
    /// pass learns its output; labels are never read. With --dataset, any folder of videos
    /// (searched recursively); without, the procedural clips.
    #[arg(long, requires = "init")]
    pub distill: bool,
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
    let recipe = a.recipe.as_deref().map(Recipe::read).transpose()?;
    let (spec, run) = recipe
        .as_ref()
        .map(|r| (r.model.clone(), r.run.clone()))
        .unwrap_or_default();
    let init = a.init.clone().or(run.init.clone());
    let preset = a
        .preset
        .clone()
        .or(spec.preset.clone())
        .unwrap_or_else(|| "vivit-fe-motion".into());
    let mut mcfg = Config::preset(&preset)?;
    mcfg.num_classes = CLASSES.len();
    let over = |v: Option<usize>, dst: &mut usize| {
        if let Some(v) = v {
            *dst = v;
        }
    };
    over(a.image_size.or(spec.image_size), &mut mcfg.image_size);
    over(a.frames.or(spec.frames), &mut mcfg.frames);
    over(a.hidden_size.or(spec.hidden_size), &mut mcfg.hidden_size);
    over(a.heads.or(spec.heads), &mut mcfg.num_heads);
    over(
        a.spatial_layers.or(spec.spatial_layers),
        &mut mcfg.spatial_layers,
    );
    over(
        a.temporal_layers.or(spec.temporal_layers),
        &mut mcfg.temporal_layers,
    );
    if a.kind == "vmoe" && !mcfg.is_vmoe() {
        mcfg.kind = model::config::KIND_VMOE.to_string();
        mcfg.moe = Some(model::MoeConfig {
            layers: a.moe_layers,
            experts: a.experts,
            top_k: a.top_k,
        });
    }
    if let Some(dir) = &init {
        // The architecture is the init model's (its classes may change below; a distilled
        // student keeps its teacher's).
        mcfg = model::io::read_config(&dir.join("config.json"))?;
        if !a.distill {
            mcfg.num_classes = CLASSES.len();
        }
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
    anyhow::ensure!(
        !(a.distill && mcfg.is_vmoe()),
        "--distill converts a model into MoNE; the init model is a V-MoE"
    );
    let mut classes = Vec::new();
    if a.distill {
        if let Some(dir) = &init {
            classes = model::io::read_labels(&dir.join("labels.txt"), mcfg.num_classes)?;
        }
    } else if let Some(dir) = &a.dataset {
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
        if let Some(init) = &init {
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
    let seed = a.seed.or(run.seed).unwrap_or(0);
    let eval_count = a.eval_count.or(run.eval_count).unwrap_or(240);
    let eval_every = a.eval_every.or(run.eval_every).unwrap_or(200);
    let phases = recipe
        .as_ref()
        .map(|r| r.phases.clone())
        .unwrap_or_default();
    let cfg = TrainConfig {
        model: mcfg,
        steps: if phases.is_empty() {
            a.steps
        } else {
            phases.iter().map(|p| p.steps).sum()
        },
        batch: a.batch.or(run.batch).unwrap_or(32),
        lr: a.lr,
        warmup: a.warmup,
        weight_decay: a.weight_decay.or(run.weight_decay).unwrap_or(0.05),
        nested_steps: a.nested_steps,
        seed,
        checkpoint_every: a
            .checkpoint_every
            .or(run.checkpoint_every)
            .unwrap_or(100)
            .max(1),
        dense: a.dense || a.single_frame,
        single_frame: a.single_frame,
        init: init.clone(),
        dataset: a.dataset.clone(),
        classes: Vec::new(),
        superclasses: None,
        router_weight: a.router_weight,
        balance_weight: a.balance_weight,
        phases,
        teacher: if a.distill { init.clone() } else { None },
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
    if let Some(dir) = &tr.cfg.teacher.clone() {
        tr.set_teacher(dir)?;
        eprintln!(
            "label-free distillation from {} at full capacity",
            dir.display()
        );
    }
    if let Some(dir) = &a.dataset {
        #[cfg(feature = "gst")]
        {
            let set = if a.distill {
                crate::eval::ClipSet::unlabelled(dir, &tr.cfg.model)?
            } else {
                crate::eval::ClipSet::folder(dir, &tr.cfg.model, &tr.cfg.classes)?
            };
            eprintln!("training on {}", set.source);
            tr.clips = Some(set);
        }
        #[cfg(not(feature = "gst"))]
        anyhow::bail!("--dataset {} needs the `gst` feature", dir.display());
    }
    if tr.resume(&a.out)? {
        eprintln!("resumed from {} at step {}", a.out.display(), tr.step);
    } else if let Some(dir) = &init {
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
    train_loop(&mut tr, a, eval_count, eval_every)?;
    if tr.clips.is_some() {
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
    for (&e_c, (acc, agree)) in caps.iter().zip(tr.held_out_at(seed + 1, eval_count, caps)?) {
        if tr.cfg.model.is_vmoe() {
            eprintln!("held-out top-1: {:.1}%", acc * 100.0);
        } else if let Some(agree) = agree {
            eprintln!(
                "held-out at e_c {e_c}: top-1 agreement with the teacher {:.1}% (labels: {:.1}%)",
                agree * 100.0,
                acc * 100.0
            );
        } else {
            eprintln!("held-out top-1 at e_c {e_c}: {:.1}%", acc * 100.0);
        }
    }
    eprintln!("model folder written to {}", a.out.display());
    Ok(())
}

/// Steps until the end with progress, checkpoints, the curve and its plot, then the export.
fn train_loop(
    tr: &mut Trainer,
    a: &TrainArgs,
    eval_count: u64,
    eval_every: u64,
) -> anyhow::Result<()> {
    let total = tr.cfg.total_steps();
    let t0 = Instant::now();
    let start = tr.step;
    let mut curve = Curve::open(&a.out, start)?;
    let plot = a.plot.clone().unwrap_or_else(|| a.out.join("curve.png"));
    let phases = tr.cfg.schedule();
    // A bar on a terminal; a line every 10 steps in a log file.
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
        let b = indicatif::ProgressBar::new(total).with_position(start);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  eta {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let mut smooth: Option<f32> = None;
    // Dense and V-MoE models have no capacity to track; folder runs no held-out set.
    let tracked = !tr.cfg.model.is_vmoe() && !tr.cfg.dense;
    while tr.step < total {
        let info = tr.step()?;
        let done = tr.step - start;
        smooth = Some(smooth.map_or(info.loss, |s| 0.95 * s + 0.05 * info.loss));
        let mut point = Point {
            step: info.step,
            phase: info.phase.name().to_string(),
            loss: info.loss,
            top1: None,
        };
        if eval_every > 0
            && tr.clips.is_none()
            && (tr.step.is_multiple_of(eval_every) || tr.step == total)
        {
            let caps: &[f64] = if tracked { &curve::CAPACITIES } else { &[1.0] };
            let top1 = tr.held_out_at(tr.cfg.seed + 1, eval_count, caps)?;
            point.top1 = Some(top1.into_iter().map(|(acc, _)| acc).collect());
        }
        let evaluated = point.top1.clone();
        curve.push(point)?;
        let msg = format!(
            "{} {}/{}  loss {:.4} (avg {:.4})  lr {:.2e}  e_c {}  {:.1} clips/s",
            info.phase.name(),
            info.phase_index + 1,
            phases.len(),
            info.loss,
            smooth.unwrap_or(info.loss),
            info.lr,
            info.capacity.map_or("-".into(), |c| format!("{c:.2}")),
            (done * tr.cfg.batch as u64) as f64 / t0.elapsed().as_secs_f64()
        );
        match &bar {
            Some(b) => {
                b.set_position(tr.step);
                b.set_message(msg);
            }
            None if info.step % 10 == 0 || tr.step == total => {
                eprintln!("step {}/{total}  {msg}", tr.step)
            }
            None => {}
        }
        if let Some(top1) = evaluated {
            let text: Vec<String> = top1.iter().map(|v| format!("{:.1}%", v * 100.0)).collect();
            let line = format!("step {}: held-out top-1 {}", tr.step, text.join(" / "));
            match &bar {
                Some(b) => b.println(line),
                None => eprintln!("{line}"),
            }
        }
        if tr.step.is_multiple_of(tr.cfg.checkpoint_every) || tr.step == total {
            tr.save_checkpoint(&a.out)?;
        }
    }
    if let Some(b) = bar {
        b.finish();
    }
    tr.export(&a.out)?;
    if !curve.points.is_empty() {
        match crate::plot::training_curve(&curve.points, &plot) {
            Ok(()) => eprintln!("training curve written to {}", plot.display()),
            Err(e) => eprintln!("warning: no training-curve plot: {e:#}"),
        }
    }
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
        None => {
            crate::eval::ClipSet::synthetic(&b.config, a.seed.unwrap_or(0) + 2, a.superclass_clips)
        }
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
