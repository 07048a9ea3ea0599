//! The runtime: one thread per stream (source -> clip windows -> tokenizer) feeding a bounded
//! per-stream queue, and an inference worker that batches clips across streams and writes
//! events. Files apply backpressure and lose nothing; live streams drop their oldest clips
//! (never encoded packets) and count every drop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, D};
use crossbeam_channel::{bounded, unbounded, Receiver, Select, Sender, TryRecvError, TrySendError};

use crate::clip::{Clip, ClipAssembler, ClipSpec, Tail};
use crate::events::{now, redact, Event, JsonLinesSink, LabelScore, Latency};
use crate::model::{ForwardOptions, LoadedModel};
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
    ready: Instant,
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
    stop: Arc<AtomicBool>,
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
    fn send_clip(&self, clip: Clip, dropped: &mut u64) -> bool {
        let msg = StreamMsg::Clip(ClipMsg {
            clip_index: clip.index,
            frames: [clip.first_frame(), clip.last_frame()],
            padded: clip.padded,
            pts: [clip.pts_start_ns(), clip.pts_end_ns()],
            data: tokenizer::clip_to_chw(&clip, self.mean, self.std),
            ready: Instant::now(),
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
                }
                match self.tx.try_send(msg) {
                    Ok(()) => true,
                    Err(TrySendError::Full(_)) => {
                        *dropped += 1;
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
                                    if !self.send_clip(clip, &mut dropped) {
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
            self.send_clip(clip, &mut dropped);
        }
        let _ = self.tx.send(StreamMsg::End {
            frames,
            dropped,
            error,
        });
    }
}

struct StreamState {
    name: String,
    live: bool,
    ended: bool,
    clips: u64,
    prob_sum: Vec<f64>,
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

/// Classify `streams` until they all end (files) or `stop` is set, writing events to `sink`.
#[allow(clippy::too_many_arguments)]
pub fn run(
    model: &LoadedModel,
    model_name: &str,
    device: &Device,
    streams: &[StreamSpec],
    opts: &RuntimeOptions,
    sink: &mut JsonLinesSink,
    stop: Arc<AtomicBool>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<Summary, RuntimeError> {
    let cfg = &model.config;
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
    let t_start = Instant::now();
    let mut summary = Summary {
        inputs: streams.len(),
        ..Default::default()
    };
    let (ev_tx, ev_rx) = unbounded::<Event>();
    let sopts = SourceOptions {
        width: cfg.image_size as u32,
        height: cfg.image_size as u32,
        fps: opts.fps,
        resize: opts.resize,
        rtsp_transport: opts.rtsp_transport,
    };
    let dev_name = crate::device::describe(device);
    let mut states: Vec<StreamState> = Vec::new();
    let mut rxs: Vec<Receiver<StreamMsg>> = Vec::new();
    let mut handles = Vec::new();
    for s in streams {
        match Input::parse(&s.input) {
            Err(e) => {
                let reason = e.to_string().replace(&s.input, &s.name);
                sink.write(&Event::StreamError {
                    stream: s.name.clone(),
                    reason: reason.clone(),
                    time: now(),
                })?;
                // Every stream's last event is stream_ended, even one that never started.
                sink.write(&Event::StreamEnded {
                    stream: s.name.clone(),
                    clips: 0,
                    frames: 0,
                    dropped_clips: 0,
                    time: now(),
                })?;
                summary.failed.push((s.name.clone(), reason));
            }
            Ok(input) => {
                let live = input.is_live();
                let (tx, rx) = bounded(opts.queue);
                let ctx = StreamCtx {
                    idx: states.len(),
                    name: s.name.clone(),
                    input,
                    live,
                    sopts: sopts.clone(),
                    spec,
                    mean: cfg.mean,
                    std: cfg.std,
                    opts: opts.clone(),
                    tx,
                    oldest: rx.clone(),
                    events: ev_tx.clone(),
                    stop: stop.clone(),
                    model: model_name.to_string(),
                    device: dev_name.clone(),
                };
                handles.push(
                    std::thread::Builder::new()
                        .name(format!("source-{}", states.len()))
                        .spawn(move || ctx.run())
                        .map_err(RuntimeError::Sink)?,
                );
                states.push(StreamState {
                    name: s.name.clone(),
                    live,
                    ended: false,
                    clips: 0,
                    prob_sum: vec![0.0; cfg.num_classes],
                });
                rxs.push(rx);
            }
        }
    }
    drop(ev_tx);

    let (t, hw) = (cfg.frames, cfg.image_size);
    let mut pending: Vec<(usize, ClipMsg)> = Vec::new();
    let mut next = 0usize;
    let mut done = 0usize;
    loop {
        while let Ok(e) = ev_rx.try_recv() {
            sink.write(&e)?;
        }
        // Take clips round-robin across streams so no stream starves another.
        let mut took = false;
        let mut ended_now: Vec<(usize, u64, u64, Option<String>)> = Vec::new();
        for k in 0..rxs.len() {
            let i = (next + k) % rxs.len();
            if states[i].ended || pending.len() >= opts.batch {
                continue;
            }
            match rxs[i].try_recv() {
                Ok(StreamMsg::Clip(c)) => {
                    pending.push((i, c));
                    took = true;
                }
                Ok(StreamMsg::End {
                    frames,
                    dropped,
                    error,
                }) => {
                    states[i].ended = true;
                    ended_now.push((i, frames, dropped, error));
                    took = true;
                }
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => {
                    states[i].ended = true;
                    ended_now.push((i, 0, 0, Some("source thread stopped unexpectedly".into())));
                }
            }
        }
        next = (next + 1) % rxs.len().max(1);
        let all_ended = states.iter().all(|s| s.ended);
        let oldest_wait = pending.first().map(|(_, c)| c.ready.elapsed());
        let flush = pending.len() >= opts.batch
            || oldest_wait.is_some_and(|w| w >= opts.max_wait)
            || (!pending.is_empty() && (all_ended || !ended_now.is_empty()));
        if flush {
            infer(
                model,
                device,
                opts,
                &mut pending,
                &mut states,
                sink,
                model_name,
                (t, hw),
                &mut summary,
            )?;
            progress(&Progress {
                clips: summary.clips,
                streams_done: done,
                streams: states.len(),
                elapsed: t_start.elapsed(),
            });
        }
        for (i, frames, dropped, error) in ended_now {
            let st = &states[i];
            summary.frames += frames;
            summary.dropped_clips += dropped;
            if let Some(reason) = &error {
                sink.write(&Event::StreamError {
                    stream: st.name.clone(),
                    reason: reason.clone(),
                    time: now(),
                })?;
                summary.failed.push((st.name.clone(), reason.clone()));
            }
            if !st.live && st.clips > 0 {
                let avg: Vec<f32> = st
                    .prob_sum
                    .iter()
                    .map(|p| (*p / st.clips as f64) as f32)
                    .collect();
                sink.write(&Event::Video {
                    event_id: format!("{}#video", st.name),
                    stream: st.name.clone(),
                    clips: st.clips,
                    labels: topk(&avg, &model.labels, opts.topk),
                    model: model_name.to_string(),
                    time: now(),
                })?;
            }
            sink.write(&Event::StreamEnded {
                stream: st.name.clone(),
                clips: st.clips,
                frames,
                dropped_clips: dropped,
                time: now(),
            })?;
            done += 1;
            progress(&Progress {
                clips: summary.clips,
                streams_done: done,
                streams: states.len(),
                elapsed: t_start.elapsed(),
            });
        }
        if all_ended && pending.is_empty() {
            break;
        }
        if !took && !flush {
            // Nothing ready: block until a queue or an event has something, or the oldest
            // pending clip's wait runs out.
            let wait = match pending.first() {
                Some((_, c)) => opts
                    .max_wait
                    .saturating_sub(c.ready.elapsed())
                    .max(Duration::from_millis(1)),
                None => Duration::from_millis(100),
            };
            let mut sel = Select::new();
            for (i, rx) in rxs.iter().enumerate() {
                if !states[i].ended {
                    sel.recv(rx);
                }
            }
            sel.recv(&ev_rx);
            let _ = sel.ready_timeout(wait);
        }
    }
    while let Ok(e) = ev_rx.try_recv() {
        sink.write(&e)?;
    }
    for h in handles {
        let _ = h.join();
    }
    summary.events = sink.written;
    summary.elapsed = t_start.elapsed();
    Ok(summary)
}

#[allow(clippy::too_many_arguments)]
fn infer(
    model: &LoadedModel,
    device: &Device,
    opts: &RuntimeOptions,
    pending: &mut Vec<(usize, ClipMsg)>,
    states: &mut [StreamState],
    sink: &mut JsonLinesSink,
    model_name: &str,
    (t, hw): (usize, usize),
    summary: &mut Summary,
) -> Result<(), RuntimeError> {
    let batch: Vec<(usize, ClipMsg)> = std::mem::take(pending);
    let started = Instant::now();
    let refs: Vec<&[f32]> = batch.iter().map(|(_, c)| c.data.as_slice()).collect();
    let x = tokenizer::batch(&refs, t, hw, hw, device)?;
    let out = model
        .model
        .forward(&x, &[opts.capacity], &ForwardOptions::default())?;
    let probs = candle_nn::ops::softmax(&out.logits, D::Minus1)?.to_vec2::<f32>()?;
    let inference_ms = started.elapsed().as_secs_f64() * 1e3;
    for (k, (i, c)) in batch.iter().enumerate() {
        let st = &mut states[*i];
        st.clips += 1;
        st.prob_sum
            .iter_mut()
            .zip(&probs[k])
            .for_each(|(a, p)| *a += *p as f64);
        summary.clips += 1;
        let e = Event::Clip {
            event_id: format!("{}#{}", st.name, c.clip_index),
            stream: st.name.clone(),
            clip_index: c.clip_index,
            pts_start_ns: c.pts[0],
            pts_end_ns: c.pts[1],
            frames: c.frames,
            padded_frames: c.padded,
            labels: topk(&probs[k], &model.labels, opts.topk),
            capacity: out.capacity[k],
            model: model_name.to_string(),
            latency_ms: Latency {
                queue_ms: started.duration_since(c.ready).as_secs_f64() * 1e3,
                inference_ms,
                end_to_end_ms: c.ready.elapsed().as_secs_f64() * 1e3,
            },
            time: now(),
        };
        sink.write(&e)?;
    }
    Ok(())
}
