//! What the `mone` subcommands do; `main.rs` only parses the command line and calls these.

pub mod cluster;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;

use crate::clip::Tail;
use crate::controller::{ControllerSettings, LatencyProfile};
use crate::events::JsonLinesSink;
use crate::model::{self, Config};
use crate::pipeline::PipelineConfig;
use crate::runtime::{self, Progress, RuntimeOptions, StreamSpec, Summary};
use crate::source::Resize;

/// Where `--model` points by default.
pub const DEFAULT_MODEL: &str = "models/mone-vivit-tiny-motion";

#[derive(clap::Args, Debug)]
pub struct ClassifyArgs {
    /// Video files, folders (searched recursively for video files), URIs (file://, rtsp://,
    /// http(s)://, srt://...) or test:... sources.
    #[arg(required_unless_present = "from_file")]
    pub inputs: Vec<String>,
    /// Also read inputs from this file, one per line (`-`: stdin; `#` starts a comment).
    #[arg(long, value_name = "LIST")]
    pub from_file: Option<String>,
    /// Files open at once; the next starts as one finishes, so memory stays bounded however
    /// many inputs there are (default: sized to the machine's cores and memory, printed at start).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Threads per libav decoder (default: the cores shared among the open files and the
    /// model, at least 1, printed at start).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub decode_threads: Option<u32>,
    /// Once the model is the bottleneck, drop the files' decoding to the lowest priority, so
    /// that it runs in the model's gaps instead of preempting it (for heavy models on the CPU)
    #[arg(long)]
    pub yield_to_model: bool,
    /// Let the files decode while a batch runs even when the model is the bottleneck (by
    /// default decoding pauses then, so that it does not stall the model's threads)
    #[arg(long)]
    pub no_decode_gate: bool,
    /// Model folder (config.json, model.safetensors, labels.txt); default: the shipped model,
    /// wherever `mone model list` finds it.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Compute budget e_c in [1/8, 1].
    #[arg(long, default_value_t = 1.0)]
    pub capacity: f64,
    #[arg(long, default_value_t = 5)]
    pub topk: usize,
    /// Append events (JSON Lines) to this file instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// auto, cpu or cuda[:N].
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Model precision: f32, or bf16/f16 on a GPU.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Sampled frames between clip starts (default: the clip length, no overlap).
    #[arg(long)]
    pub stride: Option<usize>,
    /// Use every N-th frame.
    #[arg(long, default_value_t = 1)]
    pub step: usize,
    /// The last partial clip of a file: pad (repeat the last frame) or drop.
    #[arg(long, value_enum, default_value = "pad")]
    pub tail: TailArg,
    /// Frame rate the model expects (default: the input's).
    #[arg(long)]
    pub fps: Option<f64>,
    #[arg(long, value_enum, default_value = "crop")]
    pub resize: ResizeArg,
    /// Flush a partial batch after its oldest clip waited this long.
    #[arg(long, default_value_t = 200)]
    pub max_wait_ms: u64,
    /// A network input that fails transiently (refused, lost, timed out) is retried with
    /// back-off this many times in a row before it fails (about 2.5 minutes at 10).
    #[arg(long, default_value_t = 10)]
    pub max_reconnects: u32,
    /// Action segments with the default thresholds (segment_started / segment_ended, and each
    /// file's segments in its video event); a pipeline config's [segments] tunes them.
    #[arg(long)]
    pub segments: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum TailArg {
    Pad,
    Drop,
}
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum ResizeArg {
    Crop,
    Letterbox,
}

#[derive(clap::Args, Debug)]
pub struct InitModelArgs {
    /// Architecture preset.
    #[arg(long, default_value = "vivit-fe-s16")]
    pub preset: String,
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct SampleVideoArgs {
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 150)]
    pub frames: u32,
    #[arg(long, default_value_t = 25)]
    pub fps: u32,
    #[arg(long, default_value_t = 320)]
    pub width: u32,
    #[arg(long, default_value_t = 240)]
    pub height: u32,
    /// A videotestsrc pattern (ball, smpte, snow, ...).
    #[arg(long, default_value = "ball")]
    pub pattern: String,
    /// mp4 (H.264), mkv (H.264), webm (VP8) or avi (MJPEG).
    #[arg(long, default_value = "mp4")]
    pub format: String,
}

/// SIGINT/SIGTERM: the first asks for a clean stop (sources stop, queued clips drain, the sink
/// flushes); a second exits at once.
pub fn install_signal_handlers() -> anyhow::Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, 130, Arc::clone(&stop))?;
        signal_hook::flag::register(sig, Arc::clone(&stop))?;
    }
    Ok(stop)
}

fn load_model(
    dir: &Path,
    device: &candle_core::Device,
    dtype: candle_core::DType,
) -> anyhow::Result<model::LoadedModel> {
    if !dir.exists() {
        anyhow::bail!(
            "no model folder at {} (pass --model DIR; `mone model init --out DIR` makes a random-weight one for trying the pipeline)",
            dir.display()
        );
    }
    Ok(model::load_model_dir_as(dir, device, dtype)?)
}

fn model_name(dir: &Path) -> String {
    dir.file_name().map_or_else(
        || dir.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

fn print_summary(s: &Summary) {
    let secs = s.elapsed.as_secs_f64().max(1e-9);
    eprintln!(
        "{} inputs, {} clips, {} frames in {:.1} s ({:.2} clips/s), {} dropped clips, {} failed",
        s.inputs,
        s.clips,
        s.frames,
        secs,
        s.clips as f64 / secs,
        s.dropped_clips,
        s.failed.len()
    );
    for (name, f) in &s.failed {
        eprintln!("  failed: {name}: {}: {}", f.class, f.reason);
    }
    if s.not_started > 0 {
        eprintln!(
            "  stopped before {} inputs started (no events were written for them)",
            s.not_started
        );
    }
}

/// What `mone run` adds to a plain classify run.
#[derive(Default)]
struct Extras {
    /// f32 when None.
    dtype: Option<String>,
    controller: Option<ControllerSettings>,
    reprofile: bool,
    /// Listen address and access rules of the HTTP API.
    http: Option<(String, crate::http::ApiAccess)>,
    sinks: Vec<crate::sinks::SinkSpec>,
    spool_dir: Option<PathBuf>,
    drain: Option<std::time::Duration>,
}

fn cache_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|d| d.join("mone").join("profiles"))
}

/// The latency profile for this model, device, thread count and batch size: from the cache
/// when it was measured for exactly these, else measured now (a few seconds) and cached.
pub fn latency_profile(
    loaded: &model::LoadedModel,
    device: &candle_core::Device,
    levels: &[f64],
    batch: usize,
    refresh: bool,
) -> anyhow::Result<(LatencyProfile, &'static str)> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |b: &[u8]| {
        for x in b {
            h = (h ^ *x as u64).wrapping_mul(0x100_0000_01b3);
        }
    };
    feed(&std::fs::read(loaded.dir.join(model::io::CONFIG_FILE)).unwrap_or_default());
    if let Ok(m) = std::fs::metadata(loaded.dir.join(model::io::WEIGHTS_FILE)) {
        feed(&m.len().to_le_bytes());
        if let Ok(t) = m.modified() {
            feed(format!("{t:?}").as_bytes());
        }
    }
    feed(format!("{levels:?}").as_bytes());
    let key = format!(
        "{}-{:016x}-{}-{:?}-t{}-b{batch}",
        model_name(&loaded.dir),
        h,
        crate::device::describe(device),
        loaded.model.dtype(),
        candle_core::utils::get_num_threads()
    );
    let path = cache_dir().map(|d| d.join(format!("{key}.json")));
    if !refresh {
        if let Some(p) = &path {
            if let Ok(text) = std::fs::read_to_string(p) {
                if let Ok(prof) = serde_json::from_str::<LatencyProfile>(&text) {
                    if prof.key == key && prof.capacities == levels && prof.validate().is_ok() {
                        return Ok((prof, "cached"));
                    }
                }
            }
        }
    }
    let prof = runtime::measure_profile(loaded, device, levels, batch, 3, &key)?;
    if let Some(p) = &path {
        // A cache that cannot be written only costs a new measurement next time.
        if let Some(d) = p.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        let _ = std::fs::write(p, serde_json::to_string_pretty(&prof)?);
    }
    Ok((prof, "measured"))
}

/// A latency target: measures (or loads) the model's latency profile and sets the controller.
pub(crate) fn add_controller(
    loaded: &crate::model::LoadedModel,
    device: &candle_core::Device,
    model_dir: &Path,
    opts: &mut RuntimeOptions,
    mut settings: crate::controller::ControllerSettings,
    reprofile: bool,
) -> anyhow::Result<()> {
    if !loaded.config.is_mone() {
        // A V-MoE costs the same at any capacity: the controller only sizes batches and
        // sheds, at full capacity.
        eprintln!("mone: {} is a V-MoE (fixed compute per clip): the controller holds the target with batch size and shedding only", model_dir.display());
        settings.min_capacity = 1.0;
        settings.max_capacity = 1.0;
    }
    let levels = settings.effective_levels();
    let (profile, how) = latency_profile(loaded, device, &levels, opts.batch, reprofile)?;
    eprintln!(
        "mone: latency target {} ms at p{}, capacity {} in [{}, {}]; latency profile {how} ({:.1} ms per batch of {} at e_c {}, {:.1} ms at e_c {})",
        settings.latency_target_ms,
        settings.percentile,
        if settings.adaptive { "adaptive" } else { "fixed" },
        settings.min_capacity,
        settings.max_capacity,
        profile.predict(settings.max_capacity, opts.batch),
        opts.batch,
        settings.max_capacity,
        profile.predict(settings.min_capacity, opts.batch),
        settings.min_capacity,
    );
    let (_, unused) =
        crate::controller::useful_levels(&levels, &profile, opts.batch, settings.min_gain);
    if !unused.is_empty() {
        eprintln!(
            "mone: capacities {unused:?} are not at least {:.0}% faster than the next one up at batch {} on this device: the controller leaves them out (lower accuracy for no time)",
            settings.min_gain * 100.0,
            opts.batch
        );
    }
    opts.controller = Some(runtime::ControlOptions { settings, profile });
    Ok(())
}

fn run_streams(
    model_dir: Option<&Path>,
    device: &str,
    streams: &[StreamSpec],
    opts: &RuntimeOptions,
    out: Option<&Path>,
    extras: Extras,
) -> anyhow::Result<Summary> {
    let (found, source) = model::locate::resolve(model_dir)?;
    if source != "given" {
        eprintln!("mone: model {} ({source})", found.display());
    }
    let model_dir = found.as_path();
    let device = crate::device::open(device)?;
    let dtype = crate::device::parse_dtype(extras.dtype.as_deref().unwrap_or("f32"))?;
    let loaded = load_model(model_dir, &device, dtype)?;
    let mut opts = opts.clone();
    if let Some(settings) = extras.controller {
        add_controller(
            &loaded,
            &device,
            model_dir,
            &mut opts,
            settings,
            extras.reprofile,
        )?;
    }
    let target = opts
        .controller
        .as_ref()
        .map(|c| c.settings.latency_target_ms);
    let telemetry = Arc::new(crate::metrics::Telemetry::new(target));
    let mut control_rx = None;
    let _server = match &extras.http {
        None => None,
        Some((listen, access)) => {
            let (tx, rx) = crossbeam_channel::unbounded();
            control_rx = Some(rx);
            let guarded = access.token.is_some();
            let s = crate::http::serve(listen, access.clone(), telemetry.clone(), tx)?;
            eprintln!(
                "mone: HTTP API on http://{} (/healthz, /metrics, /streams), {}",
                s.addr,
                if guarded {
                    "bearer token required"
                } else {
                    "no token: loopback only"
                }
            );
            Some(s)
        }
    };
    let opts = &opts;
    let primary = match out {
        Some(p) => {
            JsonLinesSink::file(p).with_context(|| format!("cannot open {}", p.display()))?
        }
        None => JsonLinesSink::stdout(),
    };
    let spool_root = extras
        .spool_dir
        .clone()
        .unwrap_or_else(crate::sinks::config::default_spool_root);
    let mut sink = crate::sinks::Fanout::start(
        primary,
        &extras.sinks,
        &spool_root,
        extras.drain.unwrap_or(std::time::Duration::from_secs(10)),
    )?;
    let stop = install_signal_handlers()?;
    eprintln!(
        "mone: model {} ({} classes, {} frames at {} px) on {}, capacity {}, events to {}",
        model_dir.display(),
        loaded.config.num_classes,
        loaded.config.frames,
        loaded.config.image_size,
        crate::device::describe(&device),
        opts.capacity,
        sink.describe()
    );
    let bar = if std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new_spinner();
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        Some(b)
    } else {
        None
    };
    // Off a terminal (a log file, a pipe), a progress line every 10 s instead of the spinner.
    let mut last_line = std::time::Instant::now();
    let mut progress = |p: &Progress| {
        let msg = format!(
            "{}/{} inputs done, {} clips, {:.2} clips/s",
            p.streams_done,
            p.streams,
            p.clips,
            p.clips as f64 / p.elapsed.as_secs_f64().max(1e-9)
        );
        if let Some(b) = &bar {
            b.set_message(msg);
            b.tick();
        } else if last_line.elapsed() >= std::time::Duration::from_secs(10) {
            last_line = std::time::Instant::now();
            eprintln!("mone: {msg}");
        }
    };
    let mut hooks = runtime::Hooks::new(stop);
    hooks.progress = Some(&mut progress);
    hooks.telemetry = Some(telemetry);
    hooks.control = control_rx;
    let summary = runtime::run(
        &loaded,
        &model_name(model_dir),
        &device,
        streams,
        opts,
        &mut sink,
        hooks,
    )?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    crate::sinks::print_reports(&sink.close());
    print_summary(&summary);
    Ok(summary)
}

/// Files open at once by default: two per core (decoding overlaps the model), at most 16, and
/// no more than 128 MiB of available memory each (a 720p H.264 input holds about 32 MiB).
pub fn default_jobs() -> (usize, String) {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let avail_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .map(|kib| kib / 1024);
    let by_mem = avail_mib.map_or(usize::MAX, |m| (m / 128).max(1) as usize);
    let jobs = (2 * cores).clamp(2, 16).min(by_mem);
    let why = match avail_mib {
        Some(m) => format!("{cores} cores, {:.1} GiB available", m as f64 / 1024.0),
        None => format!("{cores} cores"),
    };
    (jobs, why)
}

/// `mone classify`: returns the process exit code (1 when any input failed).
pub fn classify(a: &ClassifyArgs) -> anyhow::Result<i32> {
    let inputs = crate::inputs::expand(&a.inputs, a.from_file.as_deref())?;
    let jobs = match a.jobs {
        Some(0) => anyhow::bail!("--jobs must be at least 1"),
        Some(n) => {
            eprintln!(
                "mone: {} inputs, at most {n} files open at once (--jobs)",
                inputs.len()
            );
            n
        }
        None => {
            let (n, why) = default_jobs();
            eprintln!(
                "mone: {} inputs, at most {n} files open at once ({why}; --jobs to change)",
                inputs.len()
            );
            n
        }
    };
    let decode_threads = a.decode_threads.unwrap_or_else(|| {
        let n = crate::source::default_decode_threads(jobs.min(inputs.len()));
        eprintln!("mone: {n} thread(s) per decoder (--decode-threads to change)");
        n
    });
    let opts = RuntimeOptions {
        capacity: a.capacity,
        topk: a.topk,
        batch: a.batch,
        max_wait: std::time::Duration::from_millis(a.max_wait_ms),
        stride: a.stride,
        step: a.step,
        tail: match a.tail {
            TailArg::Pad => Tail::Pad,
            TailArg::Drop => Tail::Drop,
        },
        fps: a.fps,
        resize: match a.resize {
            ResizeArg::Crop => Resize::Crop,
            ResizeArg::Letterbox => Resize::Letterbox,
        },
        max_reconnects: Some(a.max_reconnects),
        max_open: Some(jobs),
        decode_threads: Some(decode_threads),
        yield_to_model: a.yield_to_model,
        decode_gate: !a.no_decode_gate,
        segments: a.segments.then(crate::segments::SegmentSettings::default),
        ..RuntimeOptions::default()
    };
    let streams: Vec<StreamSpec> = inputs.iter().map(|i| StreamSpec::from_input(i)).collect();
    let s = run_streams(
        a.model.as_deref(),
        &a.device,
        &streams,
        &opts,
        a.out.as_deref(),
        Extras {
            dtype: Some(a.dtype.clone()),
            ..Extras::default()
        },
    )?;
    Ok(if s.failed.is_empty() { 0 } else { 1 })
}

/// `mone run PIPELINE.toml`.
pub fn run_pipeline(path: &Path) -> anyhow::Result<i32> {
    let cfg = PipelineConfig::load(path)?;
    let opts = cfg.options().map_err(anyhow::Error::msg)?;
    let extras = Extras {
        dtype: Some(cfg.model.dtype.clone()),
        controller: cfg.controller_settings().map_err(anyhow::Error::msg)?,
        reprofile: cfg.controller.as_ref().is_some_and(|c| c.reprofile),
        http: match &cfg.http {
            Some(h) => Some((h.listen.clone(), h.access().map_err(anyhow::Error::msg)?)),
            None => None,
        },
        sinks: cfg.output.sinks.clone(),
        spool_dir: cfg.output.spool_dir.clone(),
        drain: match cfg.output.drain_s {
            Some(d) if d.is_finite() && d >= 0.0 => Some(std::time::Duration::from_secs_f64(d)),
            Some(d) => anyhow::bail!("[output] drain_s must be a number >= 0, got {d}"),
            None => None,
        },
    };
    let s = run_streams(
        cfg.model.dir.as_deref(),
        &cfg.model.device,
        &cfg.streams(),
        &opts,
        cfg.output.path.as_deref(),
        extras,
    )?;
    Ok(if s.failed.is_empty() { 0 } else { 1 })
}

/// `mone model list`: where the default model is looked for, in order, and which is used.
pub fn list_models() -> anyhow::Result<()> {
    let all = model::locate::candidates();
    let used = all.iter().position(|c| c.found);
    for (i, c) in all.iter().enumerate() {
        println!(
            "{} {:<24} {}{}",
            if Some(i) == used { "*" } else { " " },
            c.source,
            c.path.display(),
            if c.found { "" } else { "  (not there)" }
        );
    }
    println!("(* the one `mone classify` and `mone run` use without --model / [model] dir)");
    Ok(())
}

/// `mone model init`: a model folder with random weights, for trying the pipeline.
pub fn init_model(a: &InitModelArgs) -> anyhow::Result<()> {
    let cfg = Config::preset(&a.preset)?;
    let m = model::random_model(&cfg, &candle_core::Device::Cpu)?;
    let labels: Vec<String> = (0..cfg.num_classes).map(|i| format!("class_{i}")).collect();
    model::save_model_dir(&a.out, &cfg, &labels, &m.named_tensors())?;
    std::fs::write(
        a.out.join("README.md"),
        format!(
            "# Random-weight `{}` model\n\nMade by `mone model init`. Its weights are random: it exercises the pipeline and measures speed, and it classifies nothing.\n",
            a.preset
        ),
    )?;
    eprintln!(
        "wrote a random-weight {} model to {}",
        a.preset,
        a.out.display()
    );
    Ok(())
}

/// `mone sample-video`: encode a test-pattern video with GStreamer.
pub fn sample_video(a: &SampleVideoArgs) -> anyhow::Result<()> {
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    crate::source::write_test_video(
        &a.out, &a.pattern, a.frames, a.fps, a.width, a.height, &a.format,
    )?;
    eprintln!(
        "wrote {} ({} frames at {} fps, {}x{})",
        a.out.display(),
        a.frames,
        a.fps,
        a.width,
        a.height
    );
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct DatasetRenderArgs {
    /// Output folder (created): clip_NNNNNN.<format>, labels.csv, classes.txt.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 120)]
    pub count: u64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// mp4 (H.264), webm (VP8), mkv (H.264) or avi (MJPEG).
    #[arg(long, default_value = "mp4")]
    pub format: String,
    #[arg(long, default_value_t = 16)]
    pub frames: usize,
    /// Square frame size in pixels (even, for H.264).
    #[arg(long, default_value_t = 112)]
    pub size: usize,
    #[arg(long, default_value_t = 12)]
    pub fps: u32,
}

/// `mone dataset render`: the procedural motion dataset as real video files plus a labels CSV.
pub fn render_dataset(a: &DatasetRenderArgs) -> anyhow::Result<()> {
    use std::io::Write;
    anyhow::ensure!(
        a.count > 0 && a.frames > 0,
        "--count and --frames must be at least 1"
    );
    anyhow::ensure!(
        a.size >= 16 && a.size.is_multiple_of(2),
        "--size must be even and at least 16"
    );
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    std::fs::write(
        a.out.join("classes.txt"),
        crate::dataset::CLASSES.join("\n") + "\n",
    )?;
    let mut csv = std::io::BufWriter::new(std::fs::File::create(a.out.join("labels.csv"))?);
    writeln!(csv, "path,label")?;
    let tty = std::io::stderr().is_terminal();
    for i in 0..a.count {
        let plan = crate::dataset::plan(a.seed, i, a.frames);
        let frames = crate::dataset::render(&plan, a.size);
        let name = format!("clip_{i:06}.{}", a.format);
        crate::source::write_rgb_video(
            &a.out.join(&name),
            &frames,
            a.size as u32,
            a.size as u32,
            a.fps,
            &a.format,
        )?;
        writeln!(csv, "{name},{}", crate::dataset::CLASSES[plan.label])?;
        if tty {
            eprint!("\r{}/{} clips", i + 1, a.count);
        }
    }
    csv.flush()?;
    if tty {
        eprintln!();
    }
    eprintln!(
        "wrote {} clips and labels.csv to {}",
        a.count,
        a.out.display()
    );
    Ok(())
}

/// `mone eval`: the table (or JSON) on stdout, progress on stderr.
pub fn eval(a: &crate::eval::EvalArgs) -> anyhow::Result<()> {
    let r = crate::eval::run(a)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", crate::eval::table(&r));
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct ExplainArgs {
    /// Model folder; default: the shipped model, wherever `mone model list` finds it.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A video file, URI or test: source; its first clip is explained.
    pub input: String,
    /// Compute budget e_c.
    #[arg(long, default_value_t = 0.3)]
    pub capacity: f64,
    /// The image to write.
    #[arg(long, default_value = "explain.png")]
    pub out: PathBuf,
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// `mone explain`: which tubelets of one clip went to which expert, drawn over the frames.
pub fn explain(a: &ExplainArgs) -> anyhow::Result<()> {
    let device = crate::device::open(&a.device)?;
    let (model_dir, _) = model::locate::resolve(a.model.as_deref())?;
    let lm = crate::model::load_model_dir(&model_dir, &device)?;
    let cfg = &lm.config;
    anyhow::ensure!(
        cfg.is_mone(),
        "{} is a V-MoE: it routes whole clips, not tubelets, so there is no per-token routing to draw (its events name each clip's experts)",
        model_dir.display()
    );
    let frames = crate::source::decode_input(&a.input, cfg.image_size as u32, cfg.frames)?;
    anyhow::ensure!(!frames.is_empty(), "{}: no frames", a.input);
    let refs: Vec<&[u8]> = (0..cfg.frames)
        .map(|i| frames[i.min(frames.len() - 1)].rgb.as_slice())
        .collect();
    let x = crate::tokenizer::frames_batch(
        std::slice::from_ref(&refs),
        cfg.image_size,
        cfg.mean,
        cfg.std,
        &device,
    )?;
    let out = lm.model.forward(
        &x,
        &[a.capacity],
        &crate::model::ForwardOptions {
            want_assignment: true,
            ..Default::default()
        },
    )?;
    let probs = candle_nn::ops::softmax_last_dim(&out.logits)?.to_vec2::<f32>()?;
    let (best, p) = probs[0]
        .iter()
        .enumerate()
        .fold((0, 0f32), |b, (i, &p)| if p > b.1 { (i, p) } else { b });
    let assignment = out
        .assignment
        .ok_or_else(|| anyhow::anyhow!("the model returned no routing"))?;
    let title = format!(
        "{}: {} ({:.0}%) at e_c {:.2}",
        a.input,
        lm.labels[best],
        p * 100.0,
        out.capacity.first().copied().unwrap_or(a.capacity)
    );
    crate::plot::expert_map(
        &refs,
        cfg.image_size,
        cfg.tubelet,
        cfg.num_experts,
        &assignment,
        &title,
        &a.out,
    )?;
    let n = assignment.len().max(1) as f64;
    let shares: Vec<String> = (0..cfg.num_experts)
        .map(|e| {
            let k = assignment.iter().filter(|&&x| x as usize == e).count();
            format!("expert {}: {:.0}%", e + 1, k as f64 / n * 100.0)
        })
        .collect();
    println!("{title}");
    println!("tubelets per expert: {}", shares.join(", "));
    eprintln!("wrote {}", a.out.display());
    Ok(())
}
