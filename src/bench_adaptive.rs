//! `mone bench adaptive`: K live test streams against a model with a load step in the middle
//! (the stream count doubles), under a latency target full capacity cannot hold after the step.
//! In one run: the adaptive controller, fixed capacities from 1.0 down to the lowest, per phase
//! SLO attainment, latency percentiles, mean capacity, shed and dropped clips, and agreement of
//! the top-1 label with full capacity on the same clips; a PNG timeline.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::controller::{ControllerSettings, LatencyProfile};
use crate::metrics::percentile;
use crate::model::LoadedModel;
use crate::runtime::{
    self, Classifier, ClipOutcome, Control, ControlOptions, Hooks, RuntimeOptions, StreamSpec,
};

#[derive(clap::Args, Debug, Clone)]
pub struct AdaptiveBenchArgs {
    /// Model folder.
    #[arg(long, default_value = crate::cli::DEFAULT_MODEL)]
    pub model: PathBuf,
    /// Streams before the step (doubled after it); 0: chosen from a calibration run so that
    /// full capacity keeps up before the step and not after it.
    #[arg(long, default_value_t = 0)]
    pub streams: usize,
    /// Frame rate of each live test stream.
    #[arg(long, default_value_t = 25)]
    pub fps: u32,
    /// Sampled frames between clip starts (clips per second per stream = fps / stride).
    #[arg(long, default_value_t = 1)]
    pub stride: usize,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// End-to-end latency target per clip (last frame in to event out).
    #[arg(long, default_value_t = 150.0)]
    pub target_ms: f64,
    /// Latency percentile the controller holds.
    #[arg(long, default_value_t = 99.0)]
    pub percentile: f64,
    /// Seconds of each phase (before and after the step).
    #[arg(long, default_value_t = 15.0)]
    pub phase_s: f64,
    /// Seconds discarded at the start of each run.
    #[arg(long, default_value_t = 3.0)]
    pub warmup_s: f64,
    /// Fixed capacities to compare with (the lowest is the model's minimum if below it).
    #[arg(long, value_delimiter = ',', default_value = "1.0,0.75,0.5,0.3,0.125")]
    pub fixed: Vec<f64>,
    /// Clips per phase and policy re-run at full capacity for the agreement figure.
    #[arg(long, default_value_t = 150)]
    pub agreement_clips: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Model precision: f32, or bf16/f16 on a GPU.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// PNG timeline of the adaptive and the fixed 1.0 runs.
    #[arg(long, default_value = "target/bench/adaptive.png")]
    pub plot: PathBuf,
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize, Debug, Clone)]
pub struct PhaseResult {
    pub offered_clips_per_s: f64,
    pub clips: u64,
    pub shed: u64,
    pub dropped: u64,
    /// % of clips within the target; shed and dropped clips count as misses.
    pub slo_attainment: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub mean_capacity: f64,
    /// % of sampled clips whose top-1 equals the top-1 at e_c 1.0 on the same clip.
    pub agreement: Option<f64>,
}

#[derive(Serialize, Debug, Clone)]
pub struct PolicyResult {
    /// "adaptive" or "fixed 0.50".
    pub policy: String,
    pub before: PhaseResult,
    pub after: PhaseResult,
}

#[derive(Serialize, Debug)]
pub struct AdaptiveBench {
    pub model: String,
    pub device: String,
    pub streams_before: usize,
    pub streams_after: usize,
    pub clips_per_s_per_stream: f64,
    pub batch: usize,
    pub target_ms: f64,
    pub percentile: f64,
    pub phase_s: f64,
    /// Clips/s the pipeline sustained at e_c 1.0 and at the lowest capacity in the calibration
    /// runs (0 when --streams is given).
    pub calibrated_clips_per_s: [f64; 2],
    pub profile: LatencyProfile,
    pub policies: Vec<PolicyResult>,
    pub checks: Vec<Check>,
}

#[derive(Serialize, Debug)]
pub struct Check {
    pub what: String,
    pub met: bool,
}

/// Per classified or dropped clip: seconds since the run started.
#[derive(Default)]
struct Trace {
    done: Vec<(f64, f64, f64)>, // (t, latency ms, capacity)
    dropped: Vec<(f64, u64, bool)>,
    /// (phase, clip data, top-1) samples for the agreement figure.
    samples: [Vec<(Vec<u8>, usize)>; 2],
    seen: [u64; 2],
}

fn argmax(p: &[f32]) -> usize {
    p.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

fn stream(i: usize, fps: u32, size: usize) -> StreamSpec {
    // Different patterns so the batch mixes content; generated at the model's size.
    const PATTERNS: [&str; 4] = ["ball", "snow", "smpte", "pinwheel"];
    let mut s = StreamSpec::from_input(&format!(
        "test:pattern={},fps={fps},live=true,width={size},height={size}",
        PATTERNS[i % PATTERNS.len()]
    ));
    s.name = format!("s{i:02}");
    s
}

struct Run<'a> {
    model: &'a LoadedModel,
    device: &'a candle_core::Device,
    a: &'a AdaptiveBenchArgs,
    profile: &'a LatencyProfile,
}

impl Run<'_> {
    /// One policy: `k` streams, `k` more at the step, stop at the end.
    fn run(
        &self,
        settings: ControllerSettings,
        k: usize,
        total_s: f64,
        step_s: f64,
        phases: Option<(f64, f64)>,
    ) -> anyhow::Result<Trace> {
        let size = self.model.config.image_size;
        let opts = RuntimeOptions {
            batch: self.a.batch,
            stride: Some(self.a.stride),
            queue: 4,
            max_wait: Duration::from_secs_f64(self.a.target_ms / 1e3),
            controller: Some(ControlOptions {
                settings,
                profile: self.profile.clone(),
            }),
            ..RuntimeOptions::default()
        };
        let stop = Arc::new(AtomicBool::new(false));
        let (ctl_tx, ctl_rx) = crossbeam_channel::unbounded();
        let initial: Vec<StreamSpec> = (0..k).map(|i| stream(i, self.a.fps, size)).collect();
        let t0 = Instant::now();
        let timer = {
            let stop = stop.clone();
            let fps = self.a.fps;
            std::thread::spawn(move || {
                if step_s >= total_s {
                    std::thread::sleep(Duration::from_secs_f64(total_s));
                    stop.store(true, Ordering::Relaxed);
                    return;
                }
                std::thread::sleep(Duration::from_secs_f64(step_s));
                for i in k..2 * k {
                    let (tx, _rx) = crossbeam_channel::bounded(1);
                    let _ = ctl_tx.send(Control::Add {
                        stream: stream(i, fps, size),
                        reply: tx,
                    });
                }
                let left = total_s - t0.elapsed().as_secs_f64();
                std::thread::sleep(Duration::from_secs_f64(left.max(0.0)));
                stop.store(true, Ordering::Relaxed);
            })
        };
        let mut trace = Trace::default();
        let mut rng = crate::dataset::Rng::new(0x2545_F491_4F6C_DD1D);
        let cap = self.a.agreement_clips;
        let mut on_clip = |o: &ClipOutcome| match o {
            ClipOutcome::Classified {
                data,
                probs,
                capacity,
                latency_ms,
                arrived,
                ..
            } => {
                let t = arrived.saturating_duration_since(t0).as_secs_f64();
                trace.done.push((t, *latency_ms, *capacity));
                let Some((p1, p2)) = phases else { return };
                let ph = if t >= p1 && t < p2 {
                    0
                } else if t >= p2 {
                    1
                } else {
                    return;
                };
                // Reservoir sampling: a uniform sample of the phase's clips.
                trace.seen[ph] += 1;
                let s = &mut trace.samples[ph];
                if s.len() < cap {
                    s.push((data.to_vec(), argmax(probs)));
                } else {
                    let j = rng.below(trace.seen[ph] as usize);
                    if j < cap {
                        s[j] = (data.to_vec(), argmax(probs));
                    }
                }
            }
            ClipOutcome::Dropped {
                count, shed, at, ..
            } => {
                let t = at.saturating_duration_since(t0).as_secs_f64();
                trace.dropped.push((t, *count, *shed));
            }
        };
        let mut sink: Vec<crate::events::Event> = Vec::new();
        let mut hooks = Hooks::new(stop.clone());
        hooks.control = Some(ctl_rx);
        hooks.on_clip = Some(&mut on_clip);
        let r = runtime::run(
            self.model,
            "bench",
            self.device,
            &initial,
            &opts,
            &mut sink,
            hooks,
        );
        stop.store(true, Ordering::Relaxed);
        let _ = timer.join();
        let s = r?;
        anyhow::ensure!(s.failed.is_empty(), "test streams failed: {:?}", s.failed);
        Ok(trace)
    }

    fn agreement(&self, samples: &[(Vec<u8>, usize)]) -> anyhow::Result<Option<f64>> {
        if samples.is_empty() {
            return Ok(None);
        }
        let cfg = &self.model.config;
        let mut same = 0;
        for chunk in samples.chunks(self.a.batch) {
            let refs: Vec<&[u8]> = chunk.iter().map(|(d, _)| d.as_slice()).collect();
            let x = crate::tokenizer::batch_normalized(
                &refs,
                cfg.frames,
                cfg.image_size,
                cfg.image_size,
                cfg.mean,
                cfg.std,
                self.device,
            )?;
            let (probs, _) = self.model.classify(&x, 1.0)?;
            same += chunk
                .iter()
                .zip(&probs)
                .filter(|((_, top), p)| argmax(p) == *top)
                .count();
        }
        Ok(Some(100.0 * same as f64 / samples.len() as f64))
    }
}

fn phase(trace: &Trace, lo: f64, hi: f64, target: f64, offered: f64) -> PhaseResult {
    let mut lat: Vec<f64> = Vec::new();
    let (mut caps, mut within) = (0.0, 0u64);
    for (t, l, c) in &trace.done {
        if *t >= lo && *t < hi {
            lat.push(*l);
            caps += c;
            within += (*l <= target) as u64;
        }
    }
    let (mut shed, mut dropped) = (0, 0);
    for (t, n, s) in &trace.dropped {
        if *t >= lo && *t < hi {
            if *s {
                shed += n;
            } else {
                dropped += n;
            }
        }
    }
    let clips = lat.len() as u64;
    let judged = (clips + shed + dropped).max(1);
    PhaseResult {
        offered_clips_per_s: offered,
        clips,
        shed,
        dropped,
        slo_attainment: 100.0 * within as f64 / judged as f64,
        p50_ms: percentile(&mut lat, 50.0).unwrap_or(f64::NAN),
        p95_ms: percentile(&mut lat, 95.0).unwrap_or(f64::NAN),
        p99_ms: percentile(&mut lat, 99.0).unwrap_or(f64::NAN),
        mean_capacity: if clips > 0 {
            caps / clips as f64
        } else {
            f64::NAN
        },
        agreement: None,
    }
}

pub fn measure(a: &AdaptiveBenchArgs) -> anyhow::Result<AdaptiveBench> {
    anyhow::ensure!(
        a.phase_s > 0.0 && a.warmup_s >= 0.0,
        "phase_s must be positive"
    );
    anyhow::ensure!(
        a.stride >= 1 && a.fps >= 1 && a.batch >= 1,
        "fps, stride and batch must be at least 1"
    );
    let device = crate::device::open(&a.device)?;
    let dtype = crate::device::parse_dtype(&a.dtype)?;
    let model = crate::model::load_model_dir_as(&a.model, &device, dtype)
        .with_context(|| format!("loading {}", a.model.display()))?;
    let min_c = crate::model::capacity::min_capacity(model.config.num_experts);
    let base = ControllerSettings {
        latency_target_ms: a.target_ms,
        percentile: a.percentile,
        min_capacity: min_c,
        max_capacity: 1.0,
        ..ControllerSettings::default()
    };
    base.validate()?;
    eprintln!("latency profile ...");
    let profile = runtime::measure_profile(
        &model,
        &device,
        &base.effective_levels(),
        a.batch,
        3,
        "bench",
    )?;
    let run = Run {
        model: &model,
        device: &device,
        a,
        profile: &profile,
    };
    let per_stream = a.fps as f64 / a.stride as f64;
    let fixed_settings = |c: f64| ControllerSettings {
        adaptive: false,
        min_capacity: c,
        max_capacity: c,
        ..base.clone()
    };
    let (k, calibrated) = if a.streams > 0 {
        (a.streams, [0.0; 2])
    } else {
        // Calibration: overload the pipeline at e_c 1.0 and at the lowest capacity and count
        // what each sustains; the load after the step goes 40% of the way from the first to the
        // second (and at least 8% over the first).
        let full = a.batch as f64 / profile.predict(1.0, a.batch) * 1e3;
        let speedup = profile.predict(1.0, a.batch) / profile.predict(min_c, a.batch);
        let probe_k = ((1.3 * full * speedup / per_stream).ceil() as usize).max(2);
        let mut sustained = [0.0; 2];
        for (i, c) in [1.0, min_c].into_iter().enumerate() {
            eprintln!("calibration: {probe_k} streams at e_c {c} for 8 s ...");
            let tr = run.run(fixed_settings(c), probe_k, 8.0, 1e9, None)?;
            let n = tr.done.iter().filter(|(t, _, _)| *t >= 3.0).count();
            sustained[i] = n as f64 / 5.0;
        }
        let after = (sustained[0] + 0.4 * (sustained[1] - sustained[0])).max(1.08 * sustained[0]);
        let k = ((after / 2.0 / per_stream).round() as usize).max(1);
        eprintln!(
            "calibration: {:.0} clips/s sustained at e_c 1.0, {:.0} at e_c {min_c} (profile: {full:.0}, {speedup:.2}x); {k} streams before the step, {} after",
            sustained[0],
            sustained[1],
            2 * k
        );
        (k, sustained)
    };
    let total = a.warmup_s + 2.0 * a.phase_s;
    let step = a.warmup_s + a.phase_s;
    let mut policies: Vec<(String, ControllerSettings)> = vec![("adaptive".into(), base.clone())];
    for c in &a.fixed {
        let c = c.clamp(min_c, 1.0);
        policies.push((format!("fixed {c:.3}"), fixed_settings(c)));
    }
    let mut results = Vec::new();
    let mut timelines = Vec::new();
    for (name, s) in policies {
        eprintln!(
            "{name}: {k} streams, {} after {step:.0} s, {total:.0} s ...",
            2 * k
        );
        let tr = run.run(s.clone(), k, total, step, Some((a.warmup_s, step)))?;
        let mut before = phase(&tr, a.warmup_s, step, a.target_ms, k as f64 * per_stream);
        let mut after = phase(&tr, step, total, a.target_ms, 2.0 * k as f64 * per_stream);
        before.agreement = run.agreement(&tr.samples[0])?;
        after.agreement = run.agreement(&tr.samples[1])?;
        if name == "adaptive" || (s.max_capacity - 1.0).abs() < 1e-9 {
            timelines.push((name.clone(), tr));
        }
        results.push(PolicyResult {
            policy: name,
            before,
            after,
        });
    }
    let checks = checks(&results);
    if let Some(parent) = a.plot.parent() {
        std::fs::create_dir_all(parent).ok();
    }
    let lines: Vec<crate::plot::TimelineRun> = timelines
        .iter()
        .map(|(name, tr)| crate::plot::TimelineRun {
            name: name.clone(),
            done: tr.done.clone(),
            dropped: tr.dropped.iter().map(|(t, n, _)| (*t, *n)).collect(),
        })
        .collect();
    // A plot that cannot be drawn (no font on a bare GPU machine) must not cost the numbers.
    if let Err(e) = crate::plot::timeline(
        &lines,
        a.target_ms,
        step,
        total,
        (k as f64 * per_stream, 2.0 * k as f64 * per_stream),
        &a.plot,
    ) {
        eprintln!("warning: no timeline plot: {e:#}");
    }
    Ok(AdaptiveBench {
        model: a.model.display().to_string(),
        device: crate::device::describe(&device),
        streams_before: k,
        streams_after: 2 * k,
        clips_per_s_per_stream: per_stream,
        batch: a.batch,
        target_ms: a.target_ms,
        percentile: a.percentile,
        phase_s: a.phase_s,
        calibrated_clips_per_s: calibrated,
        profile,
        policies: results,
        checks,
    })
}

fn checks(r: &[PolicyResult]) -> Vec<Check> {
    let mut out = Vec::new();
    let Some(ad) = r.iter().find(|p| p.policy == "adaptive") else {
        return out;
    };
    for (k, name) in ["before", "after"].into_iter().enumerate() {
        let get = |p: &PolicyResult| {
            if k == 0 {
                p.before.clone()
            } else {
                p.after.clone()
            }
        };
        let a = get(ad);
        out.push(Check {
            what: format!(
                "adaptive holds >= 99% within the target {name} the step ({:.1}%)",
                a.slo_attainment
            ),
            met: a.slo_attainment >= 99.0,
        });
        // The highest fixed capacity that met the target in this phase.
        let best = r
            .iter()
            .filter(|p| p.policy != "adaptive" && get(p).slo_attainment >= 99.0)
            .map(|p| get(p).mean_capacity)
            .fold(None, |m: Option<f64>, c| Some(m.map_or(c, |m| m.max(c))));
        match best {
            Some(b) => out.push(Check {
                what: format!(
                    "adaptive's mean capacity {name} the step ({:.3}) >= 90% of the highest fixed capacity meeting the target ({b:.3})",
                    a.mean_capacity
                ),
                met: a.mean_capacity >= 0.9 * b,
            }),
            None => out.push(Check {
                what: format!("no fixed capacity met the target {name} the step"),
                met: true,
            }),
        }
    }
    if let Some(f) = r.iter().find(|p| p.policy == "fixed 1.000") {
        out.push(Check {
            what: format!(
                "fixed 1.0 falls below 90% after the step ({:.1}%): the step is a real overload",
                f.after.slo_attainment
            ),
            met: f.after.slo_attainment < 90.0,
        });
    }
    out
}

pub fn format_table(b: &AdaptiveBench) -> String {
    let mut s = format!(
        "mone bench adaptive: {}, {}, {} -> {} live streams at {:.1} clips/s each, batch {}, target {} ms (p{}), {} s per phase\n",
        b.model, b.device, b.streams_before, b.streams_after, b.clips_per_s_per_stream, b.batch, b.target_ms, b.percentile, b.phase_s
    );
    if b.calibrated_clips_per_s[0] > 0.0 {
        s += &format!(
            "calibration: {:.0} clips/s sustained at e_c 1.0, {:.0} at the lowest capacity\n",
            b.calibrated_clips_per_s[0], b.calibrated_clips_per_s[1]
        );
    }
    s += "policy         phase   offered/s  clips   shed  drop   SLO %   p50 ms   p95 ms   p99 ms  mean e_c  agree %\n";
    for p in &b.policies {
        for (name, ph) in [("before", &p.before), ("after", &p.after)] {
            s += &format!(
                "{:<14} {:<6} {:>9.0} {:>6} {:>6} {:>5} {:>7.1} {:>8.1} {:>8.1} {:>8.1} {:>9.3} {:>8}\n",
                p.policy,
                name,
                ph.offered_clips_per_s,
                ph.clips,
                ph.shed,
                ph.dropped,
                ph.slo_attainment,
                ph.p50_ms,
                ph.p95_ms,
                ph.p99_ms,
                ph.mean_capacity,
                ph.agreement.map_or("-".into(), |a| format!("{a:.1}")),
            );
        }
    }
    s += "\ntargets:\n";
    for c in &b.checks {
        s += &format!("  [{}] {}\n", if c.met { "met" } else { "MISSED" }, c.what);
    }
    s
}

pub fn run_adaptive_bench(a: &AdaptiveBenchArgs) -> anyhow::Result<()> {
    let b = measure(a)?;
    if a.json {
        // The table still goes to stderr for whoever watches the run.
        eprint!("{}", format_table(&b));
        println!("{}", serde_json::to_string_pretty(&b)?);
    } else {
        print!("{}", format_table(&b));
        println!("timeline: {}", a.plot.display());
    }
    Ok(())
}
