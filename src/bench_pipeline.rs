//! `mone bench pipeline`: frames/s of decode, model and the full pipeline on one long input, in
//! one run, against the shared-CPU ceiling 1 / (1/decode + 1/model). The three are measured in
//! rounds, one after another in each, and every round gives its own ratio: on a shared 2-core VM
//! the machine's speed drifts by up to 2x between passes a minute apart, which a ceiling measured
//! once at the start would put on the ratio.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use serde::Serialize;

use crate::clip::{ClipAssembler, ClipSpec, Tail};
use crate::events::JsonLinesSink;
use crate::model::{self, profile, Config, ForwardOptions};
use crate::runtime::{self, RuntimeOptions, StreamSpec};
use crate::source::{self, Input, Pulled, SourceOptions, SourcePipeline};

#[derive(clap::Args, Debug, Clone)]
pub struct PipelineBenchArgs {
    /// Model folder; without one, a random-weight `--preset` model.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, default_value = "vivit-fe-s16")]
    pub preset: String,
    /// Input video; default: a generated H.264 clip (cached under target/bench/).
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Length of the generated input.
    #[arg(long, default_value_t = 120)]
    pub seconds: u32,
    #[arg(long, default_value_t = 1280)]
    pub width: u32,
    #[arg(long, default_value_t = 720)]
    pub height: u32,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 1.0)]
    pub capacity: f64,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Threads per libav decoder (default: as `mone run` picks for one input).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub decode_threads: Option<u32>,
    /// The full pipeline as `mone classify --yield-to-model` runs it: the file's decoding drops
    /// to the lowest priority once the model is the bottleneck.
    #[arg(long)]
    pub yield_to_model: bool,
    /// The full pipeline as `mone classify --no-decode-gate` runs it: the file decodes while
    /// batches run even when the model is the bottleneck.
    #[arg(long)]
    pub no_decode_gate: bool,
    /// Rounds of (decode only, model only, full pipeline); the report takes the medians.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Also time the model's parts (ms per clip) in the model-only pass and inside the full
    /// pipeline, to show which of them the decoder's share of the cores slows down.
    #[arg(long)]
    pub profile: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize, Debug)]
pub struct PipelineBench {
    pub input: String,
    pub frames: u64,
    pub model: String,
    pub device: String,
    pub batch: usize,
    pub capacity: f64,
    /// Threads per libav decoder, in the decode-only pass and the full pipeline alike.
    pub decode_threads: u32,
    /// The full pipeline ran with `yield_to_model`.
    pub yield_to_model: bool,
    /// The full pipeline ran with `decode_gate`.
    pub decode_gate: bool,
    /// (a) decode to RGB at the model's size, frames/s (median over the rounds).
    pub decode_fps: f64,
    pub decode_clips_tokenize_fps: f64,
    /// (b) model clips/s times frames per clip advance.
    pub model_fps: f64,
    pub model_clips_per_s: f64,
    pub full_pipeline_fps: f64,
    /// 1 / (1/a + 1/b) on a shared CPU, min(a, b) when the model runs elsewhere (from the
    /// median a and b).
    pub ceiling_fps: f64,
    /// The median of the rounds' own full / ceiling.
    pub full_vs_ceiling: f64,
    pub rounds: Vec<Round>,
    /// Peak resident memory of the whole run (VmHWM), MiB.
    pub peak_rss_mib: f64,
    /// With `--profile`: per part, ms per clip in the model-only pass and in the full
    /// pipeline (medians over the rounds).
    pub parts: Vec<PartTimes>,
}

#[derive(Serialize, Debug, Clone)]
pub struct PartTimes {
    pub part: String,
    pub model_only_ms: f64,
    pub full_ms: f64,
}

/// One round's frames/s.
#[derive(Serialize, Debug, Clone, Copy)]
pub struct Round {
    pub decode_fps: f64,
    pub model_fps: f64,
    pub full_fps: f64,
    pub ceiling_fps: f64,
    pub full_vs_ceiling: f64,
}

fn median(v: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = v.collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn decode(
    input: &Input,
    sopts: &SourceOptions,
    clips: Option<ClipSpec>,
) -> anyhow::Result<(u64, f64)> {
    let t = Instant::now();
    let mut p = SourcePipeline::new(input, sopts)?;
    p.start()?;
    let mut n = 0u64;
    let mut asm = clips.map(ClipAssembler::new);
    let mut sink = 0f32;
    loop {
        match p.pull(Duration::from_millis(500)) {
            Pulled::Frame(f) => {
                n += 1;
                if let Some(a) = asm.as_mut() {
                    if let Some(c) = a.push(f) {
                        sink += crate::tokenizer::clip_to_chw_u8(&c)[0] as f32;
                    }
                }
            }
            Pulled::Eos => break,
            Pulled::Idle => {}
            Pulled::Error(e) => anyhow::bail!("decoding: {e}"),
        }
    }
    std::hint::black_box(sink);
    p.stop(Duration::from_secs(1));
    Ok((n, t.elapsed().as_secs_f64()))
}

pub fn measure(a: &PipelineBenchArgs) -> anyhow::Result<PipelineBench> {
    let device = crate::device::open(&a.device)?;
    let (loaded, model_name) = match &a.model {
        Some(dir) => (
            model::load_model_dir(dir, &device)?,
            dir.display().to_string(),
        ),
        None => {
            let cfg = Config::preset(&a.preset)?;
            let m = model::random_model(&cfg, &device)?;
            let labels = (0..cfg.num_classes).map(|i| format!("class_{i}")).collect();
            (
                model::LoadedModel {
                    dir: PathBuf::new(),
                    config: cfg,
                    labels,
                    model: m,
                },
                format!("{} (random weights)", a.preset),
            )
        }
    };
    let cfg = loaded.config.clone();
    let input_path = match &a.input {
        Some(p) => p.clone(),
        None => {
            let p = PathBuf::from(format!(
                "target/bench/pipeline-{}s-{}x{}.mp4",
                a.seconds, a.width, a.height
            ));
            if !p.exists() {
                std::fs::create_dir_all("target/bench")?;
                eprintln!("encoding {} ...", p.display());
                let tmp = p.with_extension("partial.mp4");
                source::write_test_video(
                    &tmp,
                    "ball",
                    a.seconds * 25,
                    25,
                    a.width,
                    a.height,
                    "mp4",
                )?;
                std::fs::rename(&tmp, &p)?;
            }
            p
        }
    };
    let input_str = input_path.display().to_string();
    let input = Input::parse(&input_str)?;
    // The decode-only pass and the full pipeline decode alike.
    let decode_threads = a
        .decode_threads
        .unwrap_or_else(|| source::default_decode_threads(1));
    let sopts = SourceOptions {
        width: cfg.image_size as u32,
        height: cfg.image_size as u32,
        fps: None,
        resize: Default::default(),
        rtsp_transport: Default::default(),
        decode_threads: Some(decode_threads),
        threads: None,
        gate: None,
    };
    let spec = ClipSpec {
        frames: cfg.frames,
        stride: cfg.frames,
        step: 1,
        tail: Tail::Pad,
    };

    eprintln!("decode + clips + tokenize ...");
    let (frames, t_tok) = decode(&input, &sopts, Some(spec))?;

    let x = Tensor::randn(
        0f32,
        1f32,
        (a.batch, 3, cfg.frames, cfg.image_size, cfg.image_size),
        &device,
    )?;
    let opts = ForwardOptions::default();
    loaded.model.forward(&x, &[a.capacity], &opts)?;
    let ropts = RuntimeOptions {
        batch: a.batch,
        capacity: a.capacity,
        decode_threads: Some(decode_threads),
        yield_to_model: a.yield_to_model,
        decode_gate: !a.no_decode_gate,
        ..RuntimeOptions::default()
    };
    let mut rounds = Vec::new();
    let mut parts: Vec<(Vec<f64>, Vec<f64>)> = Vec::new();
    for i in 0..a.rounds.max(1) {
        eprintln!("round {}: (a) decode ...", i + 1);
        let (n, t) = decode(&input, &sopts, None)?;
        let dec_fps = n as f64 / t;

        eprintln!("round {}: (b) model ...", i + 1);
        profiled(a.profile);
        let (mut k, t0) = (0usize, Instant::now());
        while k < 3 || t0.elapsed() < Duration::from_secs(3) {
            loaded.model.forward(&x, &[a.capacity], &opts)?;
            device.synchronize()?;
            k += 1;
        }
        let model_fps = (k * a.batch * spec.stride) as f64 / t0.elapsed().as_secs_f64();
        let model_parts = per_clip(a.profile, (k * a.batch) as u64);
        profiled(a.profile);

        eprintln!("round {}: full pipeline ...", i + 1);
        let mut sink = JsonLinesSink::null();
        let s = runtime::run(
            &loaded,
            "bench",
            &device,
            &[StreamSpec::from_input(&input_str)],
            &ropts,
            &mut sink,
            runtime::Hooks::new(Arc::new(AtomicBool::new(false))),
        )?;
        anyhow::ensure!(s.failed.is_empty(), "pipeline failed: {:?}", s.failed);
        let full = s.frames as f64 / s.elapsed.as_secs_f64();
        let full_parts = per_clip(a.profile, s.clips);
        if a.profile {
            parts.push((model_parts, full_parts));
        }
        let ceiling = ceiling(&device, dec_fps, model_fps);
        rounds.push(Round {
            decode_fps: dec_fps,
            model_fps,
            full_fps: full,
            ceiling_fps: ceiling,
            full_vs_ceiling: full / ceiling,
        });
    }
    let dec_fps = median(rounds.iter().map(|r| r.decode_fps));
    let model_fps = median(rounds.iter().map(|r| r.model_fps));
    Ok(PipelineBench {
        input: input_str,
        frames,
        model: model_name,
        device: crate::device::describe(&device),
        batch: a.batch,
        capacity: a.capacity,
        decode_threads,
        yield_to_model: a.yield_to_model,
        decode_gate: !a.no_decode_gate,
        decode_fps: dec_fps,
        decode_clips_tokenize_fps: frames as f64 / t_tok,
        model_fps,
        model_clips_per_s: model_fps / spec.stride as f64,
        full_pipeline_fps: median(rounds.iter().map(|r| r.full_fps)),
        ceiling_fps: ceiling(&device, dec_fps, model_fps),
        full_vs_ceiling: median(rounds.iter().map(|r| r.full_vs_ceiling)),
        rounds,
        peak_rss_mib: crate::bench::peak_rss_mib().unwrap_or(f64::NAN),
        parts: profile::PARTS
            .iter()
            .enumerate()
            .filter(|_| !parts.is_empty())
            .map(|(k, p)| PartTimes {
                part: format!("{p:?}").to_lowercase(),
                model_only_ms: median(parts.iter().map(|r| r.0[k])),
                full_ms: median(parts.iter().map(|r| r.1[k])),
            })
            .collect(),
    })
}

/// Starts (or stops) counting the model's parts from zero.
fn profiled(on: bool) {
    profile::reset();
    profile::enable(on);
}

/// ms per clip of each part since [`profiled`], over `clips` clips; profiling off again.
fn per_clip(on: bool, clips: u64) -> Vec<f64> {
    profile::enable(false);
    if !on {
        return Vec::new();
    }
    profile::snapshot()
        .into_iter()
        .map(|(_, s)| s * 1e3 / clips.max(1) as f64)
        .collect()
}

fn ceiling(device: &candle_core::Device, decode: f64, model: f64) -> f64 {
    if device.is_cpu() {
        1.0 / (1.0 / decode + 1.0 / model)
    } else {
        decode.min(model)
    }
}

pub fn run_pipeline_bench(a: &PipelineBenchArgs) -> anyhow::Result<()> {
    let r = measure(a)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "mone bench pipeline: {} ({} frames), model {}, {}, batch {}, capacity {}, {} decoder thread(s){}{}",
        r.input,
        r.frames,
        r.model,
        r.device,
        r.batch,
        r.capacity,
        r.decode_threads,
        if r.yield_to_model {
            ", yield to model"
        } else {
            ""
        },
        if r.decode_gate {
            ""
        } else {
            ", no decode gate"
        }
    );
    println!(
        "stage                          frames/s (median of {} rounds)",
        r.rounds.len()
    );
    println!("(a) decode to RGB            {:>10.1}", r.decode_fps);
    println!(
        "decode + clips + tokenize    {:>10.1}",
        r.decode_clips_tokenize_fps
    );
    println!(
        "(b) model only               {:>10.1}   ({:.2} clips/s)",
        r.model_fps, r.model_clips_per_s
    );
    println!("full pipeline                {:>10.1}", r.full_pipeline_fps);
    println!(
        "ceiling 1/(1/a + 1/b)        {:>10.1}   full = {:.0}% of it (median of the rounds' own)",
        r.ceiling_fps,
        r.full_vs_ceiling * 100.0
    );
    println!("round   decode    model     full  ceiling  full/ceiling");
    for (i, x) in r.rounds.iter().enumerate() {
        println!(
            "{:>5} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>12.0}%",
            i + 1,
            x.decode_fps,
            x.model_fps,
            x.full_fps,
            x.ceiling_fps,
            x.full_vs_ceiling * 100.0
        );
    }
    println!("peak memory (RSS)            {:>10.1} MiB", r.peak_rss_mib);
    if !r.parts.is_empty() {
        println!("part         model only ms/clip   in the pipeline   ratio");
        let (mut a, mut b) = (0.0, 0.0);
        for p in &r.parts {
            a += p.model_only_ms;
            b += p.full_ms;
            println!(
                "{:<12} {:>18.2} {:>17.2} {:>7.2}",
                p.part,
                p.model_only_ms,
                p.full_ms,
                p.full_ms / p.model_only_ms
            );
        }
        println!("{:<12} {:>18.2} {:>17.2} {:>7.2}", "all", a, b, b / a);
    }
    Ok(())
}
