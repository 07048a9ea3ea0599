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
    now, redact, Event, EventSink, ExpertUse, LabelScore, Latency, LatencyPercentiles, StreamStats,
};
use crate::metrics::{percentile, StreamInfo, Telemetry};
use crate::model::{Config, ForwardOptions, LoadedModel};
use crate::source::{Input, Pulled, Resize, RtspTransport, SourceOptions, SourcePipeline};
use crate::tokenizer;

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
            queue: 4,
            watchdog: Duration::from_secs(5),
            stall_timeout: Duration::from_secs(30),
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            max_reconnects: None,
            eos_timeout: Duration::from_secs(2),
            controller: None,
            stats_interval: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct StreamSpec {
    /// Name in events: the input with credentials redacted, unless the config names it.
    pub name: String,
    pub input: String,
}

impl StreamSpec {
    pub fn from_input(input: &str) -> Self {
        Self {
            name: redact(input),
            input: input.to_string(),
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
    /// (stream, reason) of every input that failed.
    pub failed: Vec<(String, String)>,
    pub clips: u64,
    pub frames: u64,
    pub dropped_clips: u64,
    pub events: u64,
    pub elapsed: Duration,
}

struct ClipMsg {
    clip_index: u64,
    frames: [u64; 2],
    padded: usize,
    pts: [u64; 2],
    data: Vec<f32>,
    /// When the clip's last frame was pulled from the source: latency runs from here.
    arrived: Instant,
}

enum StreamMsg {
    Clip(ClipMsg),
    End {
        frames: u64,
        dropped: u64,
        error: Option<String>,
    },
}

struct StreamCtx {
    idx: usize,
    name: String,
    input: Input,
    live: bool,
    sopts: SourceOptions,
    spec: ClipSpec,
    mean: [f32; 3],
    std: [f32; 3],
    opts: RuntimeOptions,
    tx: Sender<StreamMsg>,
    /// A second handle on the stream's own queue, to drop its oldest clip in live mode.
    oldest: Receiver<StreamMsg>,
    events: Sender<Event>,
    /// This stream's own stop flag (removal, or the run stopping).
    stop: Arc<AtomicBool>,
    frames_seen: Arc<AtomicU64>,
    dropped_live: Arc<AtomicU64>,
    model: String,
    device: String,
}

fn jitter(seed: &mut u64) -> f64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    (*seed >> 11) as f64 / (1u64 << 53) as f64
}

/// Stop a pipeline, but never wait on it for more than the EOS timeout plus two seconds: a
/// wedged element (seen with a truncated MP4) must not hang the stream's thread. A pipeline that
/// does not stop in time is left to its helper thread.
fn stop_bounded(p: SourcePipeline, eos_timeout: Duration) {
    let (tx, rx) = bounded::<()>(1);
    let spawned = std::thread::Builder::new()
        .name("source-stop".into())
        .spawn(move || {
            p.stop(eos_timeout);
            let _ = tx.send(());
        });
    if spawned.is_ok() {
        let _ = rx.recv_timeout(eos_timeout + Duration::from_secs(2));
    }
}

/// Sleep in short steps so a stop request is seen quickly; false if stopped.
fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::sleep(
            Duration::from_millis(20).min(end.saturating_duration_since(Instant::now())),
        );
    }
    !stop.load(Ordering::Relaxed)
}

impl StreamCtx {
    fn emit(&self, e: Event) {
        let _ = self.events.send(e);
    }

    /// Queue a clip: files block (backpressure), live streams drop their oldest queued clip.
    /// Returns false when the worker is gone.
    fn send_clip(&self, clip: Clip, arrived: Instant, dropped: &mut u64) -> bool {
        let msg = StreamMsg::Clip(ClipMsg {
            clip_index: clip.index,
            frames: [clip.first_frame(), clip.last_frame()],
            padded: clip.padded,
            pts: [clip.pts_start_ns(), clip.pts_end_ns()],
            data: tokenizer::clip_to_chw(&clip, self.mean, self.std),
            arrived,
        });
        if !self.live {
            return self.tx.send(msg).is_ok();
        }
        match self.tx.try_send(msg) {
            Ok(()) => true,
            Err(TrySendError::Disconnected(_)) => false,
            Err(TrySendError::Full(msg)) => {
                if let Ok(StreamMsg::Clip(_)) = self.oldest.try_recv() {
                    *dropped += 1;
                    self.dropped_live.fetch_add(1, Ordering::Relaxed);
                }
                match self.tx.try_send(msg) {
                    Ok(()) => true,
                    Err(TrySendError::Full(_)) => {
                        *dropped += 1;
                        self.dropped_live.fetch_add(1, Ordering::Relaxed);
                        true
                    }
                    Err(TrySendError::Disconnected(_)) => false,
                }
            }
        }
    }

    fn run(self) {
        let mut asm = ClipAssembler::new(self.spec);
        let (mut frames, mut dropped) = (0u64, 0u64);
        let mut error: Option<String> = None;
        let mut attempt = 0u32;
        let mut offline_since: Option<Instant> = None;
        let mut started = false;
        // The stream's own timeline: monotonic across reconnects.
        let mut timeline_end = 0u64;
        let mut last_pts: Option<u64> = None;
        let mut seed =
            0x2545_F491_4F6C_DD1Du64 ^ ((self.idx as u64 + 1) << 32) ^ std::process::id() as u64;
        let stop = &self.stop;
        'outer: loop {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let reason: String;
            match SourcePipeline::new(&self.input, &self.sopts)
                .and_then(|p| p.start_in_background().map(|_| p))
            {
                Err(e) => reason = e.to_string(),
                Ok(mut p) => {
                    if !started {
                        started = true;
                        self.emit(Event::StreamStarted {
                            stream: self.name.clone(),
                            time: now(),
                            model: self.model.clone(),
                            device: self.device.clone(),
                            live: self.live,
                        });
                    }
                    let mut last_frame_at = Instant::now();
                    let mut session_first: Option<u64> = None;
                    let session_offset = timeline_end;
                    reason = loop {
                        if stop.load(Ordering::Relaxed) {
                            stop_bounded(p, self.opts.eos_timeout);
                            break 'outer;
                        }
                        match p.pull(Duration::from_millis(100)) {
                            Pulled::Frame(mut f) => {
                                last_frame_at = Instant::now();
                                self.frames_seen.fetch_add(1, Ordering::Relaxed);
                                if let Some(t0) = offline_since.take() {
                                    self.emit(Event::Reconnected {
                                        stream: self.name.clone(),
                                        attempt,
                                        offline_ms: t0.elapsed().as_millis() as u64,
                                        time: now(),
                                    });
                                    attempt = 0;
                                }
                                // First session: the input's own PTS. After a reconnect: continue
                                // from where the previous session ended.
                                let first = *session_first.get_or_insert(f.pts_ns);
                                let mut pts = if session_offset == 0 && last_pts.is_none() {
                                    f.pts_ns
                                } else {
                                    session_offset + f.pts_ns.saturating_sub(first)
                                };
                                if let Some(lp) = last_pts {
                                    if pts <= lp {
                                        pts = lp + 1;
                                    }
                                }
                                last_pts = Some(pts);
                                f.pts_ns = pts;
                                timeline_end = timeline_end.max(pts + f.duration_ns.max(1));
                                f.index = frames;
                                frames += 1;
                                if let Some(clip) = asm.push(f) {
                                    if !self.send_clip(clip, last_frame_at, &mut dropped) {
                                        stop_bounded(p, self.opts.eos_timeout);
                                        break 'outer;
                                    }
                                    // Time blocked on a full queue (backpressure) is not a stall.
                                    last_frame_at = Instant::now();
                                }
                            }
                            Pulled::Idle => {
                                let idle = last_frame_at.elapsed();
                                if self.live && idle >= self.opts.watchdog {
                                    break format!(
                                        "no frames for {:.1} s",
                                        self.opts.watchdog.as_secs_f64()
                                    );
                                }
                                if !self.live && idle >= self.opts.stall_timeout {
                                    error = Some(format!(
                                        "the input stalled: no frame, end or error for {:.1} s",
                                        self.opts.stall_timeout.as_secs_f64()
                                    ));
                                    stop_bounded(p, self.opts.eos_timeout);
                                    break 'outer;
                                }
                            }
                            Pulled::Eos => {
                                if self.live {
                                    break "the source ended".to_string();
                                }
                                if frames == 0 {
                                    error = Some(
                                        "no video frames decoded (not a video, or no video stream)"
                                            .into(),
                                    );
                                }
                                stop_bounded(p, self.opts.eos_timeout);
                                break 'outer;
                            }
                            Pulled::Error(e) => {
                                if self.live {
                                    break e;
                                }
                                error = Some(e);
                                stop_bounded(p, self.opts.eos_timeout);
                                break 'outer;
                            }
                        }
                    };
                    stop_bounded(p, self.opts.eos_timeout);
                }
            }
            // GStreamer's messages quote the location, credentials included.
            let reason = crate::events::redact_text(&reason);
            if !self.live {
                error = Some(reason);
                break;
            }
            // Live: offline, then reconnect with exponential back-off and jitter.
            if offline_since.is_none() {
                offline_since = Some(Instant::now());
                self.emit(Event::Offline {
                    stream: self.name.clone(),
                    reason: reason.clone(),
                    time: now(),
                });
            }
            attempt += 1;
            if self.opts.max_reconnects.is_some_and(|m| attempt > m) {
                error = Some(format!(
                    "gave up after {} reconnect attempts: {reason}",
                    attempt - 1
                ));
                break;
            }
            let base =
                self.opts.backoff_initial.as_secs_f64() * 2f64.powi(attempt.min(20) as i32 - 1);
            let wait = base.min(self.opts.backoff_max.as_secs_f64()) * (0.5 + jitter(&mut seed));
            if !sleep_unless_stopped(Duration::from_secs_f64(wait), stop) {
                break;
            }
        }
        if let Some(clip) = asm.finish() {
            self.send_clip(clip, Instant::now(), &mut dropped);
        }
        let _ = self.tx.send(StreamMsg::End {
            frames,
            dropped,
            error,
        });
    }
}

/// Add or remove a stream while [`run`] is running (the HTTP API sends these).
pub enum Control {
    Add {
        stream: StreamSpec,
        reply: Sender<Result<(), ControlError>>,
    },
    Remove {
        id: String,
        reply: Sender<Result<(), ControlError>>,
    },
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ControlError {
    #[error("a stream named `{0}` is already running")]
    Duplicate(String),
    #[error("{0}")]
    BadInput(String),
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
        /// The normalised (C, T, H, W) clip the model saw.
        data: &'a [f32],
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

#[derive(Default)]
struct Interval {
    latencies: Vec<f64>,
    capacity_sum: f64,
    clips: u64,
    within: u64,
    dropped: u64,
    shed: u64,
    frames_at_start: u64,
    /// Frames decoded in the interval by streams that have ended since it began.
    retired_frames: u64,
}

struct StreamState {
    name: String,
    live: bool,
    rx: Receiver<StreamMsg>,
    queue: VecDeque<ClipMsg>,
    /// The End message, once received.
    end: Option<(u64, u64, Option<String>)>,
    stop: Arc<AtomicBool>,
    frames_seen: Arc<AtomicU64>,
    dropped_live: Arc<AtomicU64>,
    /// Drops (producer side) already accounted.
    dropped_seen: u64,
    /// Drops in the worker's queue and sheds.
    dropped_here: u64,
    shed: u64,
    handle: Option<JoinHandle<()>>,
    clips: u64,
    prob_sum: Vec<f64>,
    interval: Interval,
}

fn topk(probs: &[f32], labels: &[String], k: usize) -> Vec<LabelScore> {
    let mut idx: Vec<usize> = (0..probs.len()).collect();
    idx.sort_by(|&a, &b| {
        probs[b]
            .partial_cmp(&probs[a])
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    idx.into_iter()
        .take(k)
        .map(|i| LabelScore {
            label: labels
                .get(i)
                .cloned()
                .unwrap_or_else(|| format!("class {i}")),
            score: probs[i],
        })
        .collect()
}

struct Worker<'a, 'h> {
    model: &'a dyn Classifier,
    model_name: &'a str,
    device: &'a Device,
    dev_name: String,
    opts: &'a RuntimeOptions,
    spec: ClipSpec,
    sopts: SourceOptions,
    sink: &'a mut dyn EventSink,
    hooks: Hooks<'h>,
    ev_tx: Sender<Event>,
    ev_rx: Receiver<Event>,
    streams: Vec<StreamState>,
    controller: Option<Controller>,
    summary: Summary,
    t_start: Instant,
    spawned: usize,
    done: usize,
    last_stats: Instant,
    /// The current stats interval's figures of streams that have ended.
    retired: Interval,
    /// The last interval's figures of streams that ended during it, for the next stats event.
    retired_streams: Vec<StreamStats>,
    /// When recent clips arrived (dropped ones included), for the arrival rate.
    arrivals: VecDeque<Instant>,
    control_closed: bool,
}

/// Clips per millisecond over the last two seconds of `arrivals` (pruned here).
fn arrival_rate(arrivals: &mut VecDeque<Instant>, now: Instant) -> Option<f64> {
    const WINDOW: Duration = Duration::from_secs(2);
    while arrivals
        .front()
        .is_some_and(|t| now.saturating_duration_since(*t) > WINDOW)
    {
        arrivals.pop_front();
    }
    let first = *arrivals.front()?;
    // A short history (a stream just started) is measured over at least 250 ms.
    let span = now
        .saturating_duration_since(first)
        .max(Duration::from_millis(250));
    Some(arrivals.len() as f64 / (span.as_secs_f64() * 1e3))
}

impl Interval {
    fn merge(&mut self, o: &Interval) {
        self.latencies.extend_from_slice(&o.latencies);
        self.capacity_sum += o.capacity_sum;
        self.clips += o.clips;
        self.within += o.within;
        self.dropped += o.dropped;
        self.shed += o.shed;
        self.retired_frames += o.retired_frames;
    }
}

impl Worker<'_, '_> {
    fn target_ms(&self) -> Option<f64> {
        self.controller
            .as_ref()
            .map(|c| c.settings.latency_target_ms)
    }

    fn capacity(&self) -> f64 {
        self.controller
            .as_ref()
            .map_or(self.opts.capacity, |c| c.capacity())
    }

    fn progress(&mut self) {
        let p = Progress {
            clips: self.summary.clips,
            streams_done: self.done,
            streams: self.spawned,
            elapsed: self.t_start.elapsed(),
        };
        if let Some(f) = self.hooks.progress.as_mut() {
            f(&p);
        }
    }

    /// Start a stream; errors (a bad input spec, a duplicate id) are returned and also written
    /// as `stream_error` + `stream_ended` for streams given at start-up.
    fn add(&mut self, s: &StreamSpec) -> Result<(), ControlError> {
        if self.streams.iter().any(|st| st.name == s.name) {
            return Err(ControlError::Duplicate(s.name.clone()));
        }
        let input = Input::parse(&s.input)
            .map_err(|e| ControlError::BadInput(e.to_string().replace(&s.input, &s.name)))?;
        let cfg = self.model.config();
        let live = input.is_live();
        let (tx, rx) = bounded(self.opts.queue);
        let stop = Arc::new(AtomicBool::new(false));
        let frames_seen = Arc::new(AtomicU64::new(0));
        let dropped_live = Arc::new(AtomicU64::new(0));
        let ctx = StreamCtx {
            idx: self.spawned,
            name: s.name.clone(),
            input,
            live,
            sopts: self.sopts.clone(),
            spec: self.spec,
            mean: cfg.mean,
            std: cfg.std,
            opts: self.opts.clone(),
            tx,
            oldest: rx.clone(),
            events: self.ev_tx.clone(),
            stop: stop.clone(),
            frames_seen: frames_seen.clone(),
            dropped_live: dropped_live.clone(),
            model: self.model_name.to_string(),
            device: self.dev_name.clone(),
        };
        let handle = std::thread::Builder::new()
            .name(format!("source-{}", self.spawned))
            .spawn(move || ctx.run())
            .map_err(|e| {
                ControlError::BadInput(format!("cannot start the stream's thread: {e}"))
            })?;
        self.spawned += 1;
        self.summary.inputs += 1;
        if let Some(t) = &self.hooks.telemetry {
            t.set_stream(StreamInfo {
                id: s.name.clone(),
                uri: redact(&s.input),
                live,
                state: "starting".into(),
                ..Default::default()
            });
        }
        self.streams.push(StreamState {
            name: s.name.clone(),
            live,
            rx,
            queue: VecDeque::new(),
            end: None,
            stop,
            frames_seen,
            dropped_live,
            dropped_seen: 0,
            dropped_here: 0,
            shed: 0,
            handle: Some(handle),
            clips: 0,
            prob_sum: vec![0.0; cfg.num_classes],
            interval: Interval::default(),
        });
        Ok(())
    }

    fn remove(&mut self, id: &str) -> Result<(), ControlError> {
        match self.streams.iter().find(|s| s.name == id) {
            Some(s) => {
                s.stop.store(true, Ordering::Relaxed);
                Ok(())
            }
            None => Err(ControlError::NotFound(id.to_string())),
        }
    }

    fn write(&mut self, e: &Event) -> Result<(), RuntimeError> {
        if let Some(t) = &self.hooks.telemetry {
            let state = match e {
                Event::StreamStarted { stream, .. } | Event::Reconnected { stream, .. } => {
                    Some((stream, "running"))
                }
                Event::Offline { stream, .. } => Some((stream, "offline")),
                _ => None,
            };
            if let Some((stream, st)) = state {
                t.update_stream(stream, |i| i.state = st.into());
            }
        }
        self.sink.write(e)?;
        Ok(())
    }

    fn drain_events(&mut self) -> Result<(), RuntimeError> {
        while let Ok(e) = self.ev_rx.try_recv() {
            self.write(&e)?;
        }
        Ok(())
    }

    fn dropped(&mut self, i: usize, count: u64, shed: bool) {
        if count == 0 {
            return;
        }
        let st = &mut self.streams[i];
        if shed {
            st.shed += count;
            st.interval.shed += count;
        } else {
            st.interval.dropped += count;
        }
        if let Some(t) = &self.hooks.telemetry {
            if self.controller.is_some() {
                t.slo_misses(count);
            }
        }
        if let Some(f) = self.hooks.on_clip.as_mut() {
            f(&ClipOutcome::Dropped {
                stream: &st.name,
                count,
                shed,
                at: Instant::now(),
            });
        }
    }

    /// Move clips from the streams' channels into their queues. Files: only while their queue
    /// has room (backpressure reaches the source). Live: everything, the oldest dropped beyond
    /// the queue size.
    fn pull(&mut self) -> bool {
        let mut took = false;
        for i in 0..self.streams.len() {
            let cap = self.opts.queue;
            loop {
                let st = &mut self.streams[i];
                if st.end.is_some() || (!st.live && st.queue.len() >= cap) {
                    break;
                }
                match st.rx.try_recv() {
                    Ok(StreamMsg::Clip(c)) => {
                        took = true;
                        self.arrivals.push_back(c.arrived);
                        st.queue.push_back(c);
                        if st.live && st.queue.len() > cap {
                            st.queue.pop_front();
                            st.dropped_here += 1;
                            self.dropped(i, 1, false);
                        }
                    }
                    Ok(StreamMsg::End {
                        frames,
                        dropped,
                        error,
                    }) => {
                        took = true;
                        st.end = Some((frames, dropped, error));
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        st.end = Some((
                            st.frames_seen.load(Ordering::Relaxed),
                            st.dropped_live.load(Ordering::Relaxed),
                            Some("source thread stopped unexpectedly".into()),
                        ));
                    }
                }
            }
            let st = &mut self.streams[i];
            let d = st.dropped_live.load(Ordering::Relaxed);
            let new = d.saturating_sub(st.dropped_seen);
            st.dropped_seen = d;
            let now = Instant::now();
            self.arrivals.extend(std::iter::repeat_n(now, new as usize));
            self.dropped(i, new, false);
        }
        took
    }

    /// (stream, position in its queue) of every queued clip, oldest first, with its wait.
    fn queued(&self, now: Instant) -> Vec<(usize, f64)> {
        let mut all: Vec<(usize, Instant)> = self
            .streams
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.queue.iter().map(move |c| (i, c.arrived)))
            .collect();
        all.sort_by_key(|(_, a)| *a);
        all.into_iter()
            .map(|(i, a)| (i, now.saturating_duration_since(a).as_secs_f64() * 1e3))
            .collect()
    }

    /// Milliseconds until the queued clips must be flushed (0: now; None: nothing queued).
    fn flush_in_ms(&self, queued: &[(usize, f64)]) -> Option<f64> {
        let oldest = queued.first()?.1;
        let ending = self
            .streams
            .iter()
            .any(|s| (s.end.is_some() || s.stop.load(Ordering::Relaxed)) && !s.queue.is_empty());
        if ending || self.hooks.stop.load(Ordering::Relaxed) {
            return Some(0.0);
        }
        let max_wait = self.opts.max_wait.as_secs_f64() * 1e3 - oldest;
        let by_size = match &self.controller {
            Some(c) => {
                let waits: Vec<f64> = queued.iter().map(|q| q.1).collect();
                c.flush_in_ms(&waits)
            }
            None if queued.len() >= self.opts.batch => 0.0,
            None => f64::INFINITY,
        };
        Some(by_size.min(max_wait).max(0.0))
    }

    fn run_batch(&mut self, queued: &[(usize, f64)]) -> Result<(), RuntimeError> {
        let rate = arrival_rate(&mut self.arrivals, Instant::now());
        let (shed, n, capacity) = match self.controller.as_mut() {
            Some(c) => {
                if let Some(r) = rate {
                    c.set_arrival_rate(r);
                }
                let waits: Vec<f64> = queued.iter().map(|q| q.1).collect();
                let p = c.plan(&waits);
                (p.shed, p.batch, p.capacity)
            }
            None => (0, queued.len().min(self.opts.batch), self.opts.capacity),
        };
        // Shed the oldest live clips the controller gave up on; a file's clip is never shed.
        let mut order: Vec<usize> = Vec::with_capacity(queued.len());
        let mut shed_left = shed;
        let mut shed_per_stream = vec![0u64; self.streams.len()];
        for (i, _) in queued {
            if shed_left > 0 && self.streams[*i].live {
                shed_left -= 1;
                shed_per_stream[*i] += 1;
            } else {
                order.push(*i);
            }
        }
        for (i, k) in shed_per_stream.iter().enumerate() {
            for _ in 0..*k {
                self.streams[i].queue.pop_front();
            }
            self.streams[i].dropped_here += k;
            self.dropped(i, *k, true);
        }
        let n = n.min(order.len());
        if n == 0 {
            return Ok(());
        }
        let batch: Vec<(usize, ClipMsg)> = order[..n]
            .iter()
            .filter_map(|i| self.streams[*i].queue.pop_front().map(|c| (*i, c)))
            .collect();
        let started = Instant::now();
        let cfg = self.model.config();
        let (t, hw) = (cfg.frames, cfg.image_size);
        let refs: Vec<&[f32]> = batch.iter().map(|(_, c)| c.data.as_slice()).collect();
        let x = tokenizer::batch(&refs, t, hw, hw, self.device)?;
        let Classified {
            probs,
            capacity: caps,
            experts,
        } = self.model.classify_detailed(&x, capacity)?;
        let inference_ms = started.elapsed().as_secs_f64() * 1e3;
        let target = self.target_ms();
        for (k, (i, c)) in batch.iter().enumerate() {
            let labels = topk(&probs[k], self.model.labels(), self.opts.topk);
            let ran_at = caps.get(k).copied().unwrap_or(capacity);
            let st = &mut self.streams[*i];
            st.clips += 1;
            st.prob_sum
                .iter_mut()
                .zip(&probs[k])
                .for_each(|(a, p)| *a += *p as f64);
            self.summary.clips += 1;
            let queue_ms = started.duration_since(c.arrived).as_secs_f64() * 1e3;
            let e2e = c.arrived.elapsed().as_secs_f64() * 1e3;
            let e = Event::Clip {
                event_id: format!("{}#{}", st.name, c.clip_index),
                stream: st.name.clone(),
                clip_index: c.clip_index,
                pts_start_ns: c.pts[0],
                pts_end_ns: c.pts[1],
                frames: c.frames,
                padded_frames: c.padded,
                labels,
                capacity: ran_at,
                experts: experts.get(k).map_or_else(Vec::new, |e| {
                    e.iter()
                        .map(|&(expert, weight)| ExpertUse { expert, weight })
                        .collect()
                }),
                model: self.model_name.to_string(),
                latency_ms: Latency {
                    queue_ms,
                    inference_ms,
                    end_to_end_ms: e2e,
                },
                time: now(),
            };
            self.sink.write(&e)?;
            let st = &mut self.streams[*i];
            st.interval.latencies.push(e2e);
            st.interval.capacity_sum += ran_at;
            st.interval.clips += 1;
            let within = target.is_none_or(|t| e2e <= t);
            st.interval.within += within as u64;
            if let Some(tel) = &self.hooks.telemetry {
                tel.clip(
                    [queue_ms, inference_ms, e2e],
                    target.is_some().then_some(within),
                );
            }
            if let Some(f) = self.hooks.on_clip.as_mut() {
                f(&ClipOutcome::Classified {
                    stream: &st.name,
                    clip_index: c.clip_index,
                    data: &c.data,
                    probs: &probs[k],
                    capacity: ran_at,
                    latency_ms: e2e,
                    arrived: c.arrived,
                });
            }
        }
        let service_ms = started.elapsed().as_secs_f64() * 1e3;
        let mut slowdown = 1.0;
        if let Some(c) = self.controller.as_mut() {
            c.observe(capacity, batch.len(), service_ms);
            slowdown = c.slowdown.factor();
        }
        if let Some(tel) = &self.hooks.telemetry {
            tel.batch(capacity, slowdown);
        }
        self.progress();
        Ok(())
    }

    /// Streams whose source has ended and whose queue is empty: final events, thread joined,
    /// resources released.
    fn finish_streams(&mut self) -> Result<(), RuntimeError> {
        let mut i = 0;
        while i < self.streams.len() {
            let st = &self.streams[i];
            if st.end.is_none() || !st.queue.is_empty() {
                i += 1;
                continue;
            }
            let mut st = self.streams.remove(i);
            let (frames, dropped, error) = st.end.take().unwrap_or((0, 0, None));
            // GStreamer's messages quote the location, credentials included.
            let error = error.map(|e| crate::events::redact_text(&e));
            if let Some(h) = st.handle.take() {
                let _ = h.join();
            }
            let dropped_total = dropped.max(st.dropped_seen) + st.dropped_here;
            self.summary.frames += frames;
            self.summary.dropped_clips += dropped_total;
            if let Some(reason) = &error {
                self.write(&Event::StreamError {
                    stream: st.name.clone(),
                    reason: reason.clone(),
                    time: now(),
                })?;
                self.summary.failed.push((st.name.clone(), reason.clone()));
            }
            if !st.live && st.clips > 0 {
                let avg: Vec<f32> = st
                    .prob_sum
                    .iter()
                    .map(|p| (*p / st.clips as f64) as f32)
                    .collect();
                self.write(&Event::Video {
                    event_id: format!("{}#video", st.name),
                    stream: st.name.clone(),
                    clips: st.clips,
                    labels: topk(&avg, self.model.labels(), self.opts.topk),
                    model: self.model_name.to_string(),
                    time: now(),
                })?;
            }
            self.write(&Event::StreamEnded {
                stream: st.name.clone(),
                clips: st.clips,
                frames,
                dropped_clips: dropped_total,
                time: now(),
            })?;
            if let Some(t) = &self.hooks.telemetry {
                t.remove_stream(&st.name);
            }
            st.interval.retired_frames = st
                .frames_seen
                .load(Ordering::Relaxed)
                .saturating_sub(st.interval.frames_at_start);
            // Its fps over the part of the interval it lived through.
            let secs = self.last_stats.elapsed().as_secs_f64().max(1e-9);
            let last = self.stream_stats(&st, secs);
            self.retired_streams.push(last);
            self.retired.merge(&st.interval);
            self.done += 1;
            self.progress();
        }
        Ok(())
    }

    fn stream_stats(&self, st: &StreamState, secs: f64) -> StreamStats {
        let iv = &st.interval;
        let frames = st.frames_seen.load(Ordering::Relaxed);
        summarize(
            st.name.clone(),
            &mut iv.latencies.clone(),
            (frames.saturating_sub(iv.frames_at_start)) as f64 / secs,
            st.queue.len(),
            iv,
            self.target_ms(),
        )
    }

    fn stats(&mut self) -> Result<(), RuntimeError> {
        let secs = self.last_stats.elapsed().as_secs_f64().max(1e-9);
        self.last_stats = Instant::now();
        let live: Vec<StreamStats> = self
            .streams
            .iter()
            .map(|s| self.stream_stats(s, secs))
            .collect();
        // Streams that ended in this interval come first, with their final figures.
        let ended = std::mem::take(&mut self.retired_streams);
        let ended_fps: f64 = ended.iter().map(|s| s.fps).sum();
        let streams: Vec<StreamStats> = ended.into_iter().chain(live).collect();
        let mut all = std::mem::take(&mut self.retired);
        for s in &self.streams {
            all.merge(&s.interval);
        }
        let mut lat = std::mem::take(&mut all.latencies);
        let total = summarize(
            "*".into(),
            &mut lat,
            streams
                .iter()
                .fold(all.retired_frames as f64 / secs - ended_fps, |a, s| {
                    a + s.fps
                }),
            streams.iter().map(|s| s.queue_depth).sum(),
            &all,
            self.target_ms(),
        );
        self.update_gauges();
        if let Some(t) = &self.hooks.telemetry {
            for s in &streams {
                t.update_stream(&s.stream, |i| i.fps = s.fps);
            }
        }
        for s in &mut self.streams {
            s.interval = Interval {
                frames_at_start: s.frames_seen.load(Ordering::Relaxed),
                ..Default::default()
            };
        }
        let e = Event::Stats {
            interval_s: secs,
            latency_target_ms: self.target_ms(),
            capacity: self.capacity(),
            slowdown: self.controller.as_ref().map(|c| c.slowdown.factor()),
            streams,
            total,
            time: now(),
        };
        self.write(&e)
    }

    /// Refresh the per-stream gauges (between stats events).
    fn update_gauges(&self) {
        if let Some(t) = &self.hooks.telemetry {
            for st in &self.streams {
                t.update_stream(&st.name, |i| {
                    i.clips = st.clips;
                    i.frames = st.frames_seen.load(Ordering::Relaxed);
                    i.dropped_clips = st.dropped_seen + st.dropped_here - st.shed;
                    i.shed_clips = st.shed;
                    i.queue_depth = st.queue.len();
                });
            }
        }
    }

    fn handle_control(&mut self) -> bool {
        let Some(rx) = self.hooks.control.clone() else {
            return false;
        };
        let mut any = false;
        loop {
            let cmd = match rx.try_recv() {
                Ok(c) => c,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    // Nobody can send any more; stop selecting on it (it would always be ready).
                    self.control_closed = true;
                    break;
                }
            };
            any = true;
            match cmd {
                Control::Add { stream, reply } => {
                    let r = if self.hooks.stop.load(Ordering::Relaxed) {
                        Err(ControlError::Stopping)
                    } else {
                        self.add(&stream)
                    };
                    let _ = reply.send(r);
                }
                Control::Remove { id, reply } => {
                    let _ = reply.send(self.remove(&id));
                }
            }
        }
        any
    }

    fn wait(&self, timeout: Duration) {
        let mut sel = Select::new();
        for st in &self.streams {
            if st.end.is_none() && (st.live || st.queue.len() < self.opts.queue) {
                sel.recv(&st.rx);
            }
        }
        sel.recv(&self.ev_rx);
        if let Some(c) = self.hooks.control.as_ref().filter(|_| !self.control_closed) {
            sel.recv(c);
        }
        let _ = sel.ready_timeout(timeout);
    }

    fn main_loop(&mut self) -> Result<(), RuntimeError> {
        loop {
            self.drain_events()?;
            let controlled = self.handle_control();
            if self.hooks.stop.load(Ordering::Relaxed) {
                for s in &self.streams {
                    s.stop.store(true, Ordering::Relaxed);
                }
            }
            let took = self.pull();
            let now = Instant::now();
            let queued = self.queued(now);
            let flush_in = self.flush_in_ms(&queued);
            let flushed = flush_in == Some(0.0);
            if flushed {
                self.run_batch(&queued)?;
            }
            self.drain_events()?;
            self.finish_streams()?;
            if let Some(iv) = self.opts.stats_interval {
                if self.last_stats.elapsed() >= iv {
                    self.stats()?;
                }
            }
            let stopping = self.hooks.stop.load(Ordering::Relaxed);
            if self.streams.is_empty() && (self.hooks.control.is_none() || stopping) {
                return Ok(());
            }
            if !took && !flushed && !controlled {
                self.update_gauges();
                let mut wait = flush_in.unwrap_or(100.0).min(100.0);
                if let Some(iv) = self.opts.stats_interval {
                    wait =
                        wait.min(iv.saturating_sub(self.last_stats.elapsed()).as_secs_f64() * 1e3);
                }
                self.wait(Duration::from_secs_f64(wait.max(0.5) / 1e3));
            }
        }
    }
}

fn summarize(
    stream: String,
    latencies: &mut [f64],
    fps: f64,
    queue_depth: usize,
    iv: &Interval,
    target: Option<f64>,
) -> StreamStats {
    let judged = iv.clips + iv.dropped + iv.shed;
    let pct = |l: &mut [f64], p| percentile(l, p).unwrap_or(0.0);
    StreamStats {
        stream,
        fps,
        clips: iv.clips,
        queue_depth,
        dropped_clips: iv.dropped,
        shed_clips: iv.shed,
        mean_capacity: (iv.clips > 0).then(|| iv.capacity_sum / iv.clips as f64),
        latency_ms: (!latencies.is_empty()).then(|| LatencyPercentiles {
            p50: pct(latencies, 50.0),
            p95: pct(latencies, 95.0),
            p99: pct(latencies, 99.0),
        }),
        slo_attainment: match target {
            Some(_) if judged > 0 => Some(iv.within as f64 / judged as f64),
            _ => None,
        },
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
    if opts.batch == 0 || opts.queue == 0 || opts.topk == 0 {
        return Err(RuntimeError::Config(
            "batch, queue and topk must be at least 1".into(),
        ));
    }
    let spec = ClipSpec {
        frames: cfg.frames,
        stride: opts.stride.unwrap_or(cfg.frames),
        step: opts.step,
        tail: opts.tail,
    };
    spec.validate().map_err(RuntimeError::Config)?;
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
    };
    for s in streams {
        if let Err(e) = w.add(s) {
            let reason = crate::events::redact_text(&e.to_string());
            w.write(&Event::StreamError {
                stream: s.name.clone(),
                reason: reason.clone(),
                time: now(),
            })?;
            // Every stream's last event is stream_ended, even one that never started.
            w.write(&Event::StreamEnded {
                stream: s.name.clone(),
                clips: 0,
                frames: 0,
                dropped_clips: 0,
                time: now(),
            })?;
            w.summary.inputs += 1;
            w.summary.failed.push((s.name.clone(), reason));
        }
    }
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
