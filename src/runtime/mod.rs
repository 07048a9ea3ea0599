//! The runtime: one thread per stream (source -> clip windows -> tokenizer) feeding a bounded
//! per-stream queue, and an inference worker that batches clips across streams, oldest first,
//! and writes events. Files apply backpressure and lose nothing; live streams drop their oldest
//! clips (never encoded packets) and count every drop. With a latency target the
//! [`Controller`] picks each batch's capacity and size and flushes on the oldest clip's
//! deadline; streams can be added and removed while running ([`Control`]); [`Telemetry`] and
//! periodic `stats` events report what happened.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor, D};
use crossbeam_channel::{bounded, unbounded, Receiver, Select, Sender, TryRecvError, TrySendError};

use crate::clip::{Clip, ClipAssembler, ClipSpec, Tail};
use crate::controller::{Controller, ControllerSettings, LatencyProfile};
use crate::events::{
    now, redact, CaptureSource, Event, EventSink, ExpertUse, LabelScore, Latency,
    LatencyPercentiles, StreamStats,
};
use crate::failure::{ErrorClass, Failure};
use crate::metrics::{percentile, StreamInfo, Telemetry};
use crate::model::{Config, ForwardOptions, LoadedModel};
use crate::source::{
    DecodeThreads, Input, ModelGate, Pulled, Resize, RtspTransport, SourceOptions, SourcePipeline,
};
use crate::tokenizer;

mod bottleneck;
mod segmenting;
mod stats;
mod stream;
mod worker;

use bottleneck::{GateSwitch, ModelBound};
use stats::Interval;
use stream::{ClipMsg, StreamCtx, StreamMsg};
use worker::Worker;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("model: {0}")]
    Model(#[from] candle_core::Error),
    #[error("event sink: {0}")]
    Sink(#[from] std::io::Error),
    #[error("{0}")]
    Config(String),
}

/// What the runtime needs of a model: its config, labels and a batched forward. Implemented by
/// [`LoadedModel`]; tests wrap it (e.g. to make it deliberately slow).
pub trait Classifier: Send + Sync {
    fn config(&self) -> &Config;
    fn labels(&self) -> &[String];
    /// Class probabilities per clip of `x` (B, C, T, H, W), and the e_c each clip ran at.
    fn classify(&self, x: &Tensor, capacity: f64)
        -> candle_core::Result<(Vec<Vec<f32>>, Vec<f64>)>;
    /// As [`Classifier::classify`], plus the experts each clip of a V-MoE ran.
    fn classify_detailed(&self, x: &Tensor, capacity: f64) -> candle_core::Result<Classified> {
        let (probs, capacity) = self.classify(x, capacity)?;
        Ok(Classified {
            probs,
            capacity,
            experts: Vec::new(),
        })
    }
}

/// One batch's results.
#[derive(Clone, Debug)]
pub struct Classified {
    pub probs: Vec<Vec<f32>>,
    pub capacity: Vec<f64>,
    /// Per clip, a V-MoE's experts and router weights (empty for MoNE).
    pub experts: Vec<Vec<(usize, f32)>>,
}

impl Classifier for LoadedModel {
    fn config(&self) -> &Config {
        &self.config
    }
    fn labels(&self) -> &[String] {
        &self.labels
    }
    fn classify(
        &self,
        x: &Tensor,
        capacity: f64,
    ) -> candle_core::Result<(Vec<Vec<f32>>, Vec<f64>)> {
        let out = self
            .model
            .forward(x, &[capacity], &ForwardOptions::default())?;
        let probs = candle_nn::ops::softmax(&out.logits, D::Minus1)?.to_vec2::<f32>()?;
        Ok((probs, out.capacity))
    }
    fn classify_detailed(&self, x: &Tensor, capacity: f64) -> candle_core::Result<Classified> {
        let out = self
            .model
            .forward(x, &[capacity], &ForwardOptions::default())?;
        Ok(Classified {
            probs: candle_nn::ops::softmax(&out.logits, D::Minus1)?.to_vec2::<f32>()?,
            capacity: out.capacity,
            experts: out.experts,
        })
    }
}

/// Adaptive (or fixed, as a baseline) capacity under a latency target.
#[derive(Clone, Debug)]
pub struct ControlOptions {
    pub settings: ControllerSettings,
    pub profile: LatencyProfile,
}

/// Measure the latency profile of `model` on `device`: every capacity in `capacities` at batch
/// sizes 1, 2, 4, ... up to `max_batch`, median of `iters` forwards each.
pub fn measure_profile(
    model: &dyn Classifier,
    device: &Device,
    capacities: &[f64],
    max_batch: usize,
    iters: usize,
    key: &str,
) -> Result<LatencyProfile, RuntimeError> {
    let cfg = model.config();
    let mut batches: Vec<usize> = std::iter::successors(Some(1usize), |b| Some(b * 2))
        .take_while(|b| *b < max_batch)
        .collect();
    batches.push(max_batch.max(1));
    let per_clip = 3 * cfg.frames * cfg.image_size * cfg.image_size;
    let mut seed = 0x9E37_79B9u32;
    let data: Vec<f32> = (0..per_clip * max_batch.max(1))
        .map(|_| {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
        })
        .collect();
    LatencyProfile::measure(capacities, &batches, iters, key, |c, n| {
        let x = Tensor::from_slice(
            &data[..n * per_clip],
            (n, 3, cfg.frames, cfg.image_size, cfg.image_size),
            device,
        )
        .map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        model.classify(&x, c).map_err(|e| e.to_string())?;
        Ok(t0.elapsed().as_secs_f64() * 1e3)
    })
    .map_err(|e| RuntimeError::Config(e.to_string()))
}

/// Everything about how streams are read, cut and batched.
#[derive(Clone, Debug)]
pub struct RuntimeOptions {
    pub capacity: f64,
    pub topk: usize,
    pub batch: usize,
    /// Flush a partial batch once its oldest clip has waited this long.
    pub max_wait: Duration,
    /// Sampled frames between clip starts; None: the clip length (no overlap).
    pub stride: Option<usize>,
    pub step: usize,
    pub tail: Tail,
    /// Frame rate the model expects; None keeps the input's.
    pub fps: Option<f64>,
    pub resize: Resize,
    pub rtsp_transport: RtspTransport,
    /// Threads per libav decoder; None: the cores shared among the inputs open at the start
    /// and the model ([`crate::source::threads_per_decoder`]).
    pub decode_threads: Option<u32>,
    /// With the model on the CPU, lower files' decoding threads to the lowest priority
    /// (SCHED_IDLE) once the model is the bottleneck, so that they run in its gaps instead of
    /// preempting its threads (`crate::source::DecodeThreads`). Off by default: it gains
    /// where a heavy model is the bottleneck and may cost a few percent where decoding is.
    pub yield_to_model: bool,
    /// With the model on the CPU, files' decoding pauses while a batch runs, as long as the
    /// model is the bottleneck (`crate::source::ModelGate`): the two then alternate instead
    /// of sharing the cores, where a decoder that preempts one of the model's threads stalls
    /// the other at the op's end. On by default; it turns itself off while decoding is the
    /// slower stage.
    pub decode_gate: bool,
    /// Clips queued per stream.
    pub queue: usize,
    /// A live stream with no frame for this long is declared offline and reconnected.
    pub watchdog: Duration,
    /// A finite input (file) with no frame, end or error for this long has stalled: it fails
    /// with a `stream_error` instead of hanging the run.
    pub stall_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Give up on a live stream after this many failed reconnects in a row (None: never).
    pub max_reconnects: Option<u32>,
    /// How long to wait for a source's EOS when stopping it.
    pub eos_timeout: Duration,
    /// A latency target with adaptive (or fixed) capacity; None: `capacity` and `max_wait`.
    pub controller: Option<ControlOptions>,
    /// Emit a `stats` event this often.
    pub stats_interval: Option<Duration>,
    /// Finite inputs open at once (the next starts as one ends); None: all. Live inputs never
    /// end, so they all start whatever this is.
    pub max_open: Option<usize>,
    /// Action segments per stream (`segment_started` / `segment_ended`, and a file's segments
    /// in its `video` event); None: off.
    pub segments: Option<crate::segments::SegmentSettings>,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        Self {
            capacity: 1.0,
            topk: 5,
            batch: 4,
            max_wait: Duration::from_millis(200),
            stride: None,
            step: 1,
            tail: Tail::Pad,
            fps: None,
            resize: Resize::Crop,
            rtsp_transport: RtspTransport::Tcp,
            decode_threads: None,
            yield_to_model: false,
            decode_gate: true,
            queue: 4,
            watchdog: Duration::from_secs(5),
            stall_timeout: Duration::from_secs(30),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            max_reconnects: None,
            eos_timeout: Duration::from_secs(2),
            controller: None,
            stats_interval: None,
            max_open: None,
            segments: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct StreamSpec {
    /// Name in events: the input with credentials redacted, unless the config names it.
    pub name: String,
    pub input: String,
    /// A live stream's timeline origin (Unix ns): its first frame's PTS is the time elapsed
    /// since then, so that a camera that moves between workers keeps one monotonic timeline.
    /// None: the source's own PTS.
    pub origin_ns: Option<i64>,
}

impl StreamSpec {
    pub fn from_input(input: &str) -> Self {
        crate::events::register_secrets(input);
        Self {
            name: redact(input),
            input: input.to_string(),
            origin_ns: None,
        }
    }
}

/// Progress after each batch.
#[derive(Clone, Copy, Debug, Default)]
pub struct Progress {
    pub clips: u64,
    pub streams_done: usize,
    pub streams: usize,
    pub elapsed: Duration,
}

#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub inputs: usize,
    /// Every input that failed, and why.
    pub failed: Vec<(String, Failure)>,
    /// Inputs never started because the run was stopped first.
    pub not_started: usize,
    pub clips: u64,
    pub frames: u64,
    pub dropped_clips: u64,
    pub events: u64,
    pub elapsed: Duration,
}

/// Add or remove a stream while [`run`] is running (the HTTP API sends these). Removal is
/// asynchronous: the stream is `stopping` (its source stops, its queued clips are classified)
/// until its `stream_ended`; removing it again meanwhile is not an error.
pub enum Control {
    Add {
        stream: StreamSpec,
        reply: Sender<Result<(), ControlError>>,
    },
    Remove {
        id: String,
        reply: Sender<Result<(), ControlError>>,
    },
    /// Write the caller's event in order with the run's own (a cluster camera's
    /// `stream_moved`).
    Emit(Box<Event>),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ControlError {
    #[error("a stream named `{0}` is already running")]
    Duplicate(String),
    #[error("the stream `{0}` is still stopping: add it again once it is gone")]
    StillStopping(String),
    #[error("{}", .0.reason)]
    BadInput(Failure),
    #[error("no stream named `{0}`")]
    NotFound(String),
    #[error("the pipeline is stopping")]
    Stopping,
}

/// What became of a clip, for callers that watch every clip (benchmarks).
pub enum ClipOutcome<'a> {
    Classified {
        stream: &'a str,
        clip_index: u64,
        /// The raw (C, T, H, W) clip the model saw, before normalisation.
        data: &'a [u8],
        probs: &'a [f32],
        capacity: f64,
        /// Last frame in to event written.
        latency_ms: f64,
        arrived: Instant,
    },
    /// `count` clips dropped (full queue) or shed (controller) at about `at`.
    Dropped {
        stream: &'a str,
        count: u64,
        shed: bool,
        at: Instant,
    },
}

/// The run's inputs besides the model and the streams.
pub struct Hooks<'a> {
    /// Set to stop: sources stop, queued clips drain, then [`run`] returns.
    pub stop: Arc<AtomicBool>,
    /// Add/remove streams while running. With it, the run lasts until `stop`, even when every
    /// stream has ended; without it, until every stream has ended.
    pub control: Option<Receiver<Control>>,
    pub telemetry: Option<Arc<Telemetry>>,
    pub progress: Option<&'a mut dyn FnMut(&Progress)>,
    pub on_clip: Option<&'a mut dyn FnMut(&ClipOutcome)>,
}

impl Hooks<'_> {
    pub fn new(stop: Arc<AtomicBool>) -> Self {
        Self {
            stop,
            control: None,
            telemetry: None,
            progress: None,
            on_clip: None,
        }
    }
}

/// Classify `streams` until they all end (files), or until `hooks.stop` is set when
/// `hooks.control` is given or a stream is live, writing events to `sink`.
pub fn run(
    model: &dyn Classifier,
    model_name: &str,
    device: &Device,
    streams: &[StreamSpec],
    opts: &RuntimeOptions,
    sink: &mut dyn EventSink,
    hooks: Hooks,
) -> Result<Summary, RuntimeError> {
    let cfg = model.config();
    crate::model::capacity::solve(opts.capacity, cfg.num_experts)
        .map_err(|e| RuntimeError::Config(e.to_string()))?;
    if opts.batch == 0 || opts.queue == 0 || opts.topk == 0 || opts.max_open == Some(0) {
        return Err(RuntimeError::Config(
            "batch, queue, topk and the inputs open at once must be at least 1".into(),
        ));
    }
    let spec = ClipSpec {
        frames: cfg.frames,
        stride: opts.stride.unwrap_or(cfg.frames),
        step: opts.step,
        tail: opts.tail,
    };
    spec.validate().map_err(RuntimeError::Config)?;
    if let Some(s) = &opts.segments {
        s.validate(model.labels()).map_err(RuntimeError::Config)?;
    }
    let controller = match &opts.controller {
        None => None,
        Some(c) => {
            let min = crate::model::capacity::min_capacity(cfg.num_experts);
            if c.settings.min_capacity < min - 1e-9 {
                return Err(RuntimeError::Config(format!(
                    "min_capacity {} is below this model's smallest capacity {min}",
                    c.settings.min_capacity
                )));
            }
            let mut settings = c.settings.clone();
            settings.max_batch = opts.batch;
            // The runtime itself never sheds a file's clips.
            settings.live = true;
            Some(
                Controller::new(settings, c.profile.clone())
                    .map_err(|e| RuntimeError::Config(e.to_string()))?,
            )
        }
    };
    let (ev_tx, ev_rx) = unbounded::<Event>();
    let decode_threads = opts.decode_threads.unwrap_or_else(|| {
        let open = opts
            .max_open
            .map_or(streams.len(), |m| m.min(streams.len()));
        crate::source::default_decode_threads(open)
    });
    let gate_switch = GateSwitch::default();
    let mut w = Worker {
        model,
        model_name,
        device,
        dev_name: crate::device::describe(device),
        opts,
        spec,
        sopts: SourceOptions {
            width: cfg.image_size as u32,
            height: cfg.image_size as u32,
            fps: opts.fps,
            resize: opts.resize,
            rtsp_transport: opts.rtsp_transport,
            decode_threads: Some(decode_threads),
            threads: None,
            gate: None,
        },
        sink,
        hooks,
        ev_tx,
        ev_rx,
        streams: Vec::new(),
        controller,
        summary: Summary::default(),
        t_start: Instant::now(),
        spawned: 0,
        done: 0,
        last_stats: Instant::now(),
        retired: Interval::default(),
        retired_streams: Vec::new(),
        arrivals: VecDeque::new(),
        control_closed: false,
        pending: VecDeque::new(),
        file_threads: (opts.yield_to_model && device.is_cpu()).then(DecodeThreads::new),
        model_bound: ModelBound::default(),
        file_gate: (opts.decode_gate && device.is_cpu()).then(|| {
            let g = ModelGate::new();
            g.set_enabled(gate_switch.is_on());
            g
        }),
        gate_switch,
        last_batch_end: None,
    };
    w.summary.inputs = streams.len();
    // Live inputs never end: they all start now. Finite ones wait for a free slot.
    for s in streams {
        if Input::spec_is_live(&s.input) {
            w.start(s)?;
        } else {
            w.pending.push_back(s.clone());
        }
    }
    w.fill()?;
    let result = w.main_loop();
    if result.is_err() {
        // Do not leave source threads running behind an error.
        for s in &w.streams {
            s.stop.store(true, Ordering::Relaxed);
        }
        for s in &mut w.streams {
            if let Some(h) = s.handle.take() {
                let _ = h.join();
            }
        }
    }
    result?;
    if w.opts.stats_interval.is_some() {
        w.stats()?;
    }
    w.drain_events()?;
    w.summary.events = w.sink.written();
    w.summary.elapsed = w.t_start.elapsed();
    Ok(w.summary)
}
