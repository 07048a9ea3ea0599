//! `mone eval`: top-1 accuracy against compute. One MoNE model at several capacities, the same
//! capacities with a random router (the paper's ablation), an optional dense baseline, and a
//! time-shuffled control; a table, JSON and a PNG plot. With V-MoE models or `--compare`,
//! models side by side on the same clips: top-1, GMACs, measured latency, and for a V-MoE its
//! router against the super-classes and the expert load per class.

#[cfg(feature = "gst")]
use std::path::Path;
use std::path::PathBuf;

use candle_core::Device;
#[cfg(feature = "gst")]
use candle_core::Tensor;
use serde::Serialize;

use crate::dataset::Rng;
use crate::model::{Config, ForwardOptions, MoneVivit, Routing};

mod clips;
pub use clips::{list_folder, list_videos, ClipSet};

pub const CAPACITIES: [f64; 7] = [1.0, 0.75, 0.5, 0.4, 0.3, 0.2, 0.15];

/// How clips are altered before the model sees them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Input {
    AsIs,
    /// Frames in a random order (seeded per clip): destroys motion, keeps appearance.
    Shuffled,
    /// The middle frame repeated T times.
    SingleFrame,
}

/// Per-class correct counts and totals.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Score {
    pub correct: Vec<u64>,
    pub total: Vec<u64>,
    /// Row = true class, column = predicted.
    pub confusion: Vec<Vec<u64>>,
    /// A V-MoE's experts for every clip of the set, most probable first (empty for MoNE).
    pub experts: Vec<Vec<usize>>,
    /// The predicted class of every clip of the set.
    #[serde(skip)]
    pub predictions: Vec<usize>,
}

impl Score {
    pub fn top1(&self) -> f64 {
        let (c, t): (u64, u64) = (self.correct.iter().sum(), self.total.iter().sum());
        c as f64 / t.max(1) as f64
    }
    /// Top-1 over the classes whose label is in `keep`.
    pub fn top1_of(&self, keep: impl Fn(usize) -> bool) -> f64 {
        let (mut c, mut t) = (0, 0);
        for k in 0..self.total.len() {
            if keep(k) {
                c += self.correct[k];
                t += self.total[k];
            }
        }
        c as f64 / t.max(1) as f64
    }
}

/// Top-1 of `m` on `set` at capacity `e_c`.
#[allow(clippy::too_many_arguments)]
pub fn score(
    m: &MoneVivit,
    cfg: &Config,
    set: &ClipSet,
    e_c: f64,
    routing: Routing,
    input: Input,
    batch: usize,
    device: &Device,
) -> anyhow::Result<Score> {
    anyhow::ensure!(
        set.size == cfg.image_size,
        "clips are {} px, the model takes {} px",
        set.size,
        cfg.image_size
    );
    let mut s = Score {
        correct: vec![0; cfg.num_classes],
        total: vec![0; cfg.num_classes],
        confusion: vec![vec![0; cfg.num_classes]; cfg.num_classes],
        experts: Vec::new(),
        predictions: Vec::with_capacity(set.len()),
    };
    for (chunk_i, idx) in (0..set.len())
        .collect::<Vec<_>>()
        .chunks(batch.max(1))
        .enumerate()
    {
        let clips: Vec<Vec<&[u8]>> = idx
            .iter()
            .map(|&i| {
                let f = &set.frames[i];
                let mut order: Vec<usize> = (0..f.len()).collect();
                match input {
                    Input::AsIs => {}
                    Input::SingleFrame => order.fill(f.len() / 2),
                    Input::Shuffled => Rng::new(0x5EED ^ i as u64).shuffle(&mut order),
                }
                order.iter().map(|&k| f[k].as_slice()).collect()
            })
            .collect();
        let x = crate::tokenizer::frames_batch(&clips, cfg.image_size, cfg.mean, cfg.std, device)?;
        let routing = match routing {
            // A different random assignment for every batch.
            Routing::Random { seed } => Routing::Random {
                seed: seed ^ (chunk_i as u64).wrapping_mul(0x9E37_79B9),
            },
            r => r,
        };
        let out = m.forward(
            &x,
            &[e_c],
            &ForwardOptions {
                routing,
                ..Default::default()
            },
        )?;
        let pred = out.logits.argmax(1)?.to_vec1::<u32>()?;
        for (&i, p) in idx.iter().zip(pred) {
            s.predictions.push(p as usize);
            let y = set.labels[i];
            s.total[y] += 1;
            if p as usize == y {
                s.correct[y] += 1;
            }
            if let Some(row) = s.confusion.get_mut(y) {
                if let Some(c) = row.get_mut(p as usize) {
                    *c += 1;
                }
            }
        }
        s.experts.extend(
            out.experts
                .into_iter()
                .map(|e| e.into_iter().map(|(j, _)| j).collect()),
        );
    }
    Ok(s)
}

/// Every clip's predicted class (as [`score`] computes it, the labels unused).
#[allow(clippy::too_many_arguments)]
pub fn predictions(
    m: &MoneVivit,
    cfg: &Config,
    set: &ClipSet,
    e_c: f64,
    routing: Routing,
    batch: usize,
    device: &Device,
) -> anyhow::Result<Vec<usize>> {
    Ok(score(m, cfg, set, e_c, routing, Input::AsIs, batch, device)?.predictions)
}

/// The share of equal entries of two prediction lists.
pub fn agreement(a: &[usize], b: &[usize]) -> f64 {
    let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
    same as f64 / a.len().min(b.len()).max(1) as f64
}

#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub capacity: f64,
    pub gmacs: f64,
    pub top1_learned: f64,
    pub top1_random: f64,
    /// Top-1 agreement with the same model's own prediction at e_c 1.
    pub agreement_with_full: f64,
    /// Top-1 agreement with `--teacher`'s prediction at full capacity.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agreement_with_teacher: Option<f64>,
}

/// Every token at one nested width (`Routing::Width`): the sub-models the experts are.
#[derive(Clone, Debug, Serialize)]
pub struct UniformRow {
    pub width: usize,
    pub gmacs: f64,
    pub top1: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Baseline {
    pub name: String,
    pub gmacs: f64,
    pub top1: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub model: String,
    pub data: String,
    pub clips: usize,
    pub dense_gmacs: f64,
    pub mone: Vec<Row>,
    /// The uniform-width sub-models, narrowest first.
    pub uniform: Vec<UniformRow>,
    pub baselines: Vec<Baseline>,
    /// Time-shuffled clips at e_c 1: top-1 over all classes and over the classes that need
    /// temporal order (all but `static`).
    pub shuffled_top1: f64,
    pub shuffled_top1_ordered_classes: f64,
    pub chance: f64,
    /// Models compared on the same clips (a V-MoE under evaluation and every --compare).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<ModelRow>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
}

/// One model of a side-by-side comparison, at its full compute (e_c 1 for MoNE).
#[derive(Clone, Debug, Serialize)]
pub struct ModelRow {
    pub name: String,
    pub kind: String,
    pub params: usize,
    pub gmacs: f64,
    pub top1: f64,
    /// A V-MoE with each clip sent to random experts.
    pub top1_random_router: Option<f64>,
    /// A V-MoE's share of clips whose top expert is their super-class (a model trained with
    /// super-classes; expert j is super-class j).
    pub router_accuracy: Option<f64>,
    /// Share of clips whose top expert's most common super-class is their own: how cleanly
    /// the router separates super-classes, whatever it calls them.
    pub routing_purity: Option<f64>,
    /// Clips per expert (top slot) for every true class: rows = classes, columns = experts.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub expert_load: Vec<Vec<u64>>,
    /// The super-classes used for the two router measures.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub superclasses: Vec<Vec<String>>,
    /// Median forward time of one clip alone.
    pub ms_per_clip_batch1: f64,
    /// Clips per second in batches of `--batch`.
    pub clips_per_s_batched: f64,
}

/// Median milliseconds of a batch-1 forward over up to `n` clips of `set`, and clips/s in
/// batches of `batch`, after a warm-up of each.
#[cfg(feature = "gst")]
fn latency(
    m: &MoneVivit,
    cfg: &Config,
    set: &ClipSet,
    batch: usize,
    n: usize,
    device: &Device,
) -> anyhow::Result<(f64, f64)> {
    let x_of = |idx: &[usize]| {
        let clips: Vec<Vec<&[u8]>> = idx
            .iter()
            .map(|&i| set.frames[i].iter().map(Vec::as_slice).collect())
            .collect();
        crate::tokenizer::frames_batch(&clips, cfg.image_size, cfg.mean, cfg.std, device)
    };
    let run = |x: &Tensor| -> anyhow::Result<()> {
        let out = m.forward(x, &[1.0], &ForwardOptions::default())?;
        // Wait for the result (a GPU runs asynchronously).
        out.logits
            .to_dtype(candle_core::DType::F32)?
            .to_vec2::<f32>()?;
        Ok(())
    };
    let n = n.min(set.len()).max(1);
    let mut ms = Vec::with_capacity(n);
    run(&x_of(&[0])?)?;
    for i in 0..n {
        let x = x_of(&[i])?;
        let t = std::time::Instant::now();
        run(&x)?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ms.sort_by(f64::total_cmp);
    let batch = batch.clamp(1, set.len().max(1));
    let batches: Vec<Tensor> = (0..4)
        .map(|k| {
            let idx: Vec<usize> = (0..batch).map(|i| (k * batch + i) % set.len()).collect();
            x_of(&idx)
        })
        .collect::<candle_core::Result<_>>()?;
    run(&batches[0])?;
    let t = std::time::Instant::now();
    for x in &batches {
        run(x)?;
    }
    let rate = (4 * batch) as f64 / t.elapsed().as_secs_f64();
    Ok((ms[ms.len() / 2], rate))
}

/// Evaluate one model of a comparison on `set`.
#[cfg(feature = "gst")]
fn model_row(
    dir: &Path,
    lm: &crate::model::LoadedModel,
    set: &ClipSet,
    superclasses: Option<&crate::superclass::Superclasses>,
    a: &EvalArgs,
    device: &Device,
) -> anyhow::Result<ModelRow> {
    use crate::model::flops;
    let cfg = &lm.config;
    let s = score(
        &lm.model,
        cfg,
        set,
        1.0,
        Routing::Learned,
        Input::AsIs,
        a.batch,
        device,
    )?;
    let mut row = ModelRow {
        name: dir.display().to_string(),
        kind: cfg.kind.clone(),
        params: lm
            .model
            .named_tensors()
            .values()
            .map(Tensor::elem_count)
            .sum(),
        gmacs: flops::macs(cfg, Some(1.0))?.gmacs(),
        top1: s.top1(),
        top1_random_router: None,
        router_accuracy: None,
        routing_purity: None,
        expert_load: Vec::new(),
        superclasses: Vec::new(),
        ms_per_clip_batch1: 0.0,
        clips_per_s_batched: 0.0,
    };
    if let Some(moe) = cfg.moe {
        let random = score(
            &lm.model,
            cfg,
            set,
            1.0,
            Routing::Random { seed: 7 },
            Input::AsIs,
            a.batch,
            device,
        )?;
        row.top1_random_router = Some(random.top1());
        let mut load = vec![vec![0u64; moe.experts]; cfg.num_classes];
        for (i, e) in s.experts.iter().enumerate() {
            if let (Some(&j), Some(r)) = (e.first(), load.get_mut(set.labels[i])) {
                r[j] += 1;
            }
        }
        // The model's own super-classes, else the ones given to the comparison.
        let own = dir.join(crate::superclass::FILE);
        let own = own
            .exists()
            .then(|| crate::superclass::Superclasses::read(&own))
            .transpose()?;
        if let Some(sc) = own.as_ref().or(superclasses) {
            let of = sc.index(&lm.labels, moe.experts)?;
            let n = s.experts.len().max(1) as f64;
            let first = |i: usize| s.experts[i].first().copied().unwrap_or(usize::MAX);
            if own.is_some() {
                let hits = (0..s.experts.len())
                    .filter(|&i| first(i) == of[set.labels[i]])
                    .count();
                row.router_accuracy = Some(hits as f64 / n);
            }
            // Each expert's most common super-class among its clips.
            let mut by = vec![vec![0u64; sc.groups.len()]; moe.experts];
            for (i, &y) in set.labels.iter().enumerate().take(s.experts.len()) {
                by[first(i)][of[y]] += 1;
            }
            let pure: u64 = by
                .iter()
                .map(|r| r.iter().copied().max().unwrap_or(0))
                .sum();
            row.routing_purity = Some(pure as f64 / n);
            row.superclasses = sc.groups.clone();
        }
        row.expert_load = load;
    }
    let (b1, rate) = latency(&lm.model, cfg, set, a.batch, a.latency_clips, device)?;
    row.ms_per_clip_batch1 = b1;
    row.clips_per_s_batched = rate;
    Ok(row)
}

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// The MoNE model folder.
    #[arg(long)]
    pub model: PathBuf,
    /// A labelled dataset folder (labels.csv, or one sub-folder per class).
    #[arg(long, conflicts_with = "synthetic")]
    pub dataset: Option<PathBuf>,
    /// Evaluate on the procedural dataset rendered in memory.
    #[arg(long)]
    pub synthetic: bool,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long, default_value_t = 2004)]
    pub count: u64,
    /// A dense baseline model folder, evaluated at full width.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// A single-frame baseline model folder (it sees the middle frame repeated).
    #[arg(long)]
    pub single_frame: Option<PathBuf>,
    /// More model folders (dense, MoNE or V-MoE) evaluated on the same clips in the same
    /// run: top-1, GMACs, parameters, latency; for a V-MoE also a random-router control, its
    /// router against the super-classes and the expert load per class.
    #[arg(long)]
    pub compare: Vec<PathBuf>,
    /// Super-classes for V-MoE models that have no superclasses.json of their own (e.g. an
    /// end-to-end routed one), for the routing purity measure.
    #[arg(long)]
    pub superclasses: Option<PathBuf>,
    /// Clips timed one at a time for the batch-1 latency of compared models.
    #[arg(long, default_value_t = 64)]
    pub latency_clips: usize,
    /// A model (e.g. the teacher of a label-free conversion) whose full-capacity predictions
    /// every capacity is compared with: top-1 agreement.
    #[arg(long)]
    pub teacher: Option<PathBuf>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Where to write the accuracy-vs-GMACs plot [default: eval.png in the current folder,
    /// never inside the model folder].
    #[arg(long)]
    pub plot: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[cfg(feature = "gst")]
fn dense_routing(cfg: &Config) -> Routing {
    Routing::Width(cfg.num_experts - 1)
}

/// `mone eval`.
#[cfg(feature = "gst")]
pub fn run(a: &EvalArgs) -> anyhow::Result<Report> {
    use crate::dataset::CLASSES;
    use crate::model::{self, flops};
    let device = crate::device::open(&a.device)?;
    let lm = model::load_model_dir(&a.model, &device)?;
    let cfg = &lm.config;
    let set = match (&a.dataset, a.synthetic) {
        (Some(d), _) => ClipSet::folder(d, cfg, &lm.labels)?,
        (None, true) => {
            anyhow::ensure!(
                lm.labels
                    .iter()
                    .map(String::as_str)
                    .eq(CLASSES.iter().copied()),
                "--synthetic needs a model trained on the motion dataset's classes"
            );
            ClipSet::synthetic(cfg, a.seed, a.count)
        }
        (None, false) => anyhow::bail!("give --dataset DIR or --synthetic"),
    };
    eprintln!("evaluating {} on {}", a.model.display(), set.source);
    let progress = |what: &str| eprintln!("  {what}");
    let mut rows = Vec::new();
    // A V-MoE has no capacity to sweep.
    let sweep: &[f64] = if cfg.is_mone() { &CAPACITIES } else { &[] };
    let mut full: Option<Vec<usize>> = None;
    let teacher = match &a.teacher {
        Some(dir) => {
            let t = model::load_model_dir(dir, &device)?;
            anyhow::ensure!(
                t.config.image_size == cfg.image_size && t.config.frames == cfg.frames,
                "the teacher {} takes other clips than {}",
                dir.display(),
                a.model.display()
            );
            Some(predictions(
                &t.model,
                &t.config,
                &set,
                1.0,
                Routing::Learned,
                a.batch,
                &device,
            )?)
        }
        None => None,
    };
    for &e_c in sweep {
        let learned = score(
            &lm.model,
            cfg,
            &set,
            e_c,
            Routing::Learned,
            Input::AsIs,
            a.batch,
            &device,
        )?;
        let random = score(
            &lm.model,
            cfg,
            &set,
            e_c,
            Routing::Random { seed: 7 },
            Input::AsIs,
            a.batch,
            &device,
        )?;
        // The sweep starts at e_c 1: the reference of the agreement.
        let reference = full.get_or_insert_with(|| learned.predictions.clone());
        let row = Row {
            capacity: e_c,
            gmacs: flops::macs(cfg, Some(e_c))?.gmacs(),
            top1_learned: learned.top1(),
            top1_random: random.top1(),
            agreement_with_full: agreement(&learned.predictions, reference),
            agreement_with_teacher: teacher.as_ref().map(|t| agreement(&learned.predictions, t)),
        };
        progress(&format!(
            "e_c {e_c:.2}: learned {:.1}%, random {:.1}%, agreement with e_c 1 {:.1}%{}",
            row.top1_learned * 100.0,
            row.top1_random * 100.0,
            row.agreement_with_full * 100.0,
            row.agreement_with_teacher
                .map_or(String::new(), |t| format!(
                    ", with the teacher {:.1}%",
                    t * 100.0
                ))
        ));
        rows.push(row);
    }
    let mut uniform = Vec::new();
    if cfg.is_mone() {
        for (j, &width) in cfg.expert_widths().iter().enumerate() {
            let s = score(
                &lm.model,
                cfg,
                &set,
                1.0,
                Routing::Width(j),
                Input::AsIs,
                a.batch,
                &device,
            )?;
            let row = UniformRow {
                width,
                gmacs: flops::macs_uniform(cfg, j)?.gmacs(),
                top1: s.top1(),
            };
            progress(&format!(
                "every token at width {width}: {:.1}%",
                row.top1 * 100.0
            ));
            uniform.push(row);
        }
    }
    let shuffled = score(
        &lm.model,
        cfg,
        &set,
        1.0,
        Routing::Learned,
        Input::Shuffled,
        a.batch,
        &device,
    )?;
    let static_idx = lm.labels.iter().position(|l| l == "static");
    let mut baselines = Vec::new();
    for (dir, input, name) in [
        (&a.baseline, Input::AsIs, "dense"),
        (&a.single_frame, Input::SingleFrame, "single-frame"),
    ] {
        let Some(dir) = dir else { continue };
        let b = model::load_model_dir(dir, &device)?;
        anyhow::ensure!(
            b.labels == lm.labels && b.config.image_size == cfg.image_size,
            "{} has other classes or input size than {}",
            dir.display(),
            a.model.display()
        );
        let s = score(
            &b.model,
            &b.config,
            &set,
            1.0,
            dense_routing(&b.config),
            input,
            a.batch,
            &device,
        )?;
        progress(&format!("{name} baseline: {:.1}%", s.top1() * 100.0));
        baselines.push(Baseline {
            name: name.to_string(),
            gmacs: flops::macs(&b.config, None)?.gmacs(),
            top1: s.top1(),
        });
    }
    let sc = a
        .superclasses
        .as_deref()
        .map(crate::superclass::Superclasses::read)
        .transpose()?;
    let mut models = Vec::new();
    if !cfg.is_mone() || !a.compare.is_empty() {
        let mut dirs = vec![(a.model.clone(), lm.clone())];
        for dir in &a.compare {
            let other = model::load_model_dir(dir, &device)?;
            anyhow::ensure!(
                other.labels == lm.labels
                    && other.config.image_size == cfg.image_size
                    && other.config.frames == cfg.frames,
                "{} has other classes or clips than {}",
                dir.display(),
                a.model.display()
            );
            dirs.push((dir.clone(), other));
        }
        for (dir, m) in &dirs {
            let row = model_row(dir, m, &set, sc.as_ref(), a, &device)?;
            progress(&format!(
                "{}: {:.1}%, {:.2} ms/clip alone, {:.0} clips/s batched",
                row.name,
                row.top1 * 100.0,
                row.ms_per_clip_batch1,
                row.clips_per_s_batched
            ));
            models.push(row);
        }
    }
    let report = Report {
        models,
        labels: lm.labels.clone(),
        model: a.model.display().to_string(),
        data: set.source.clone(),
        clips: set.len(),
        dense_gmacs: flops::macs(cfg, None)?.gmacs(),
        mone: rows,
        uniform,
        baselines,
        shuffled_top1: shuffled.top1(),
        shuffled_top1_ordered_classes: shuffled.top1_of(|k| Some(k) != static_idx),
        chance: 1.0 / cfg.num_classes as f64,
    };
    let plot = a.plot.clone().unwrap_or_else(|| PathBuf::from("eval.png"));
    if !report.mone.is_empty() {
        match crate::plot::accuracy_vs_gmacs(&report, &plot) {
            Ok(()) => eprintln!("plot written to {}", plot.display()),
            Err(e) => eprintln!("warning: no plot: {e:#}"),
        }
    }
    Ok(report)
}

/// The report as a Markdown table.
pub fn table(r: &Report) -> String {
    let mut s = format!(
        "{} on {}; dense ViViT {:.3} GMACs/clip\n\n",
        r.model, r.data, r.dense_gmacs
    );
    if !r.mone.is_empty() {
        s += "| e_c | GMACs | top-1 MoNE | top-1 random router | agreement with e_c 1 |\n|---|---|---|---|---|\n";
    }
    for row in &r.mone {
        s += &format!(
            "| {:.2} | {:.4} | {:.1}% | {:.1}% | {:.1}% |",
            row.capacity,
            row.gmacs,
            row.top1_learned * 100.0,
            row.top1_random * 100.0,
            row.agreement_with_full * 100.0
        );
        if let Some(t) = row.agreement_with_teacher {
            s += &format!(" agreement with the teacher {:.1}% |", t * 100.0);
        }
        s += "\n";
    }
    if !r.uniform.is_empty() {
        s += "\n| every token at width | GMACs | top-1 |\n|---|---|---|\n";
        for u in &r.uniform {
            s += &format!(
                "| {} | {:.4} | {:.1}% |\n",
                u.width,
                u.gmacs,
                u.top1 * 100.0
            );
        }
    }
    for b in &r.baselines {
        s += &format!(
            "\n{} baseline: {:.1}% at {:.3} GMACs",
            b.name,
            b.top1 * 100.0,
            b.gmacs
        );
    }
    s += &format!(
        "\ntime-shuffled frames (e_c 1): {:.1}% over all classes, {:.1}% over the order-dependent classes (chance {:.1}%)\n",
        r.shuffled_top1 * 100.0,
        r.shuffled_top1_ordered_classes * 100.0,
        r.chance * 100.0
    );
    s += &models_table(r);
    s
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{:.1}%", v * 100.0))
}

/// The side-by-side comparison and each V-MoE's expert load per class.
fn models_table(r: &Report) -> String {
    if r.models.is_empty() {
        return String::new();
    }
    let mut s = String::from(
        "\n| model | kind | params | GMACs | top-1 | random router | router vs super-classes | routing purity | ms/clip (batch 1) | clips/s (batched) |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for m in &r.models {
        s += &format!(
            "| {} | {} | {:.2} M | {:.4} | {:.1}% | {} | {} | {} | {:.2} | {:.0} |\n",
            m.name,
            m.kind,
            m.params as f64 / 1e6,
            m.gmacs,
            m.top1 * 100.0,
            pct(m.top1_random_router),
            pct(m.router_accuracy),
            pct(m.routing_purity),
            m.ms_per_clip_batch1,
            m.clips_per_s_batched
        );
    }
    for m in r.models.iter().filter(|m| !m.expert_load.is_empty()) {
        let e = m.expert_load.first().map_or(0, Vec::len);
        s += &format!(
            "\n{}: clips per expert (top slot) by true class\n\n| class |",
            m.name
        );
        for j in 0..e {
            s += &format!(" e{j} |");
        }
        s += "\n|---|";
        s += &"---|".repeat(e);
        s += "\n";
        for (k, row) in m.expert_load.iter().enumerate() {
            s += &format!("| {} |", r.labels.get(k).map_or("?", String::as_str));
            for v in row {
                s += &format!(" {v} |");
            }
            s += "\n";
        }
        if !m.superclasses.is_empty() {
            s += "\nsuper-classes: ";
            s += &m
                .superclasses
                .iter()
                .enumerate()
                .map(|(g, names)| format!("{g} = {{{}}}", names.join(", ")))
                .collect::<Vec<_>>()
                .join("; ");
            s += "\n";
        }
    }
    s
}
