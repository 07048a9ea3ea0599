//! The inference worker: pulls clips from every stream's queue, batches them oldest first
//! (on the controller's deadline when there is one), writes events and stats.

use super::*;
use crate::segments::{Segment, Segmenter};

pub(super) struct StreamState {
    pub(super) name: String,
    pub(super) live: Arc<AtomicBool>,
    pub(super) rx: Receiver<StreamMsg>,
    pub(super) queue: VecDeque<ClipMsg>,
    /// The End message, once received.
    pub(super) end: Option<(u64, u64, Option<Failure>)>,
    /// The End message said the source was stopped before its end.
    pub(super) interrupted: bool,
    pub(super) stop: Arc<AtomicBool>,
    /// When the worker first saw the stop flag set.
    pub(super) stopping_since: Option<Instant>,
    pub(super) frames_seen: Arc<AtomicU64>,
    pub(super) dropped_live: Arc<AtomicU64>,
    /// Drops (producer side) already accounted.
    pub(super) dropped_seen: u64,
    /// Drops in the worker's queue and sheds.
    pub(super) dropped_here: u64,
    pub(super) shed: u64,
    pub(super) handle: Option<JoinHandle<()>>,
    pub(super) clips: u64,
    pub(super) prob_sum: Vec<f64>,
    /// With segments on: the stream's segmenter, and the segments it has closed.
    pub(super) segmenter: Option<Segmenter>,
    pub(super) segments: Vec<Segment>,
    /// Capture time minus PTS of the latest clip that had one: segment boundaries on the
    /// wall clock.
    pub(super) capture_offset: Option<(i64, CaptureSource)>,
    /// The ids of a live stream's open segments, fixed when each started.
    pub(super) segment_ids: std::collections::HashMap<u64, String>,
    pub(super) interval: Interval,
}

pub(super) struct Worker<'a, 'h> {
    pub(super) model: &'a dyn Classifier,
    pub(super) model_name: &'a str,
    pub(super) device: &'a Device,
    pub(super) dev_name: String,
    pub(super) opts: &'a RuntimeOptions,
    pub(super) spec: ClipSpec,
    pub(super) sopts: SourceOptions,
    pub(super) sink: &'a mut dyn EventSink,
    pub(super) hooks: Hooks<'h>,
    pub(super) ev_tx: Sender<Event>,
    pub(super) ev_rx: Receiver<Event>,
    pub(super) streams: Vec<StreamState>,
    pub(super) controller: Option<Controller>,
    pub(super) summary: Summary,
    pub(super) t_start: Instant,
    pub(super) spawned: usize,
    pub(super) done: usize,
    pub(super) last_stats: Instant,
    /// The current stats interval's figures of streams that have ended.
    pub(super) retired: Interval,
    /// The last interval's figures of streams that ended during it, for the next stats event.
    pub(super) retired_streams: Vec<StreamStats>,
    /// When recent clips arrived (dropped ones included), for the arrival rate.
    pub(super) arrivals: VecDeque<Instant>,
    pub(super) control_closed: bool,
    /// Inputs not started yet (bounded batch runs start them as others end).
    pub(super) pending: VecDeque<StreamSpec>,
    /// With `yield_to_model` on the CPU: the decoding threads of finite inputs, lowered once
    /// the model is the bottleneck.
    pub(super) file_threads: Option<DecodeThreads>,
    pub(super) model_bound: ModelBound,
    /// With `decode_gate` on the CPU: finite inputs' decoding waits while a batch runs, as
    /// long as the model is the bottleneck (`gate_switch`).
    pub(super) file_gate: Option<ModelGate>,
    pub(super) gate_switch: GateSwitch,
    pub(super) last_batch_end: Option<Instant>,
}

impl Worker<'_, '_> {
    pub(super) fn target_ms(&self) -> Option<f64> {
        self.controller
            .as_ref()
            .map(|c| c.settings.latency_target_ms)
    }

    pub(super) fn capacity(&self) -> f64 {
        self.controller
            .as_ref()
            .map_or(self.opts.capacity, |c| c.capacity())
    }

    pub(super) fn progress(&mut self) {
        let p = Progress {
            clips: self.summary.clips,
            streams_done: self.done,
            streams: self.summary.inputs,
            elapsed: self.t_start.elapsed(),
        };
        if let Some(f) = self.hooks.progress.as_mut() {
            f(&p);
        }
    }

    /// Start pending (finite) inputs while fewer than `max_open` finite ones are open.
    pub(super) fn fill(&mut self) -> Result<(), RuntimeError> {
        if self.hooks.stop.load(Ordering::Relaxed) {
            self.summary.not_started += self.pending.len();
            self.pending.clear();
            return Ok(());
        }
        let limit = self.opts.max_open.unwrap_or(usize::MAX);
        let open = |w: &Self| {
            w.streams
                .iter()
                .filter(|s| !s.live.load(Ordering::Relaxed))
                .count()
        };
        while open(self) < limit {
            let Some(s) = self.pending.pop_front() else {
                break;
            };
            self.start(&s)?;
        }
        Ok(())
    }

    /// Start one input, or write why it cannot start.
    pub(super) fn start(&mut self, s: &StreamSpec) -> Result<(), RuntimeError> {
        if let Err(e) = self.add(s) {
            let f = match e {
                ControlError::BadInput(f) => f,
                other => Failure::new(ErrorClass::BadUri, other.to_string(), ""),
            };
            let live = Input::spec_is_live(&s.input);
            self.write(&Event::stream_error(&s.name, &f, live))?;
            // Every stream's last event is stream_ended, even one that never started.
            let time = now();
            self.write(&Event::StreamEnded {
                event_id: crate::events::lifecycle_id(&s.name, "stream_ended", live, &time),
                stream: s.name.clone(),
                clips: 0,
                frames: 0,
                dropped_clips: 0,
                time,
            })?;
            self.summary.failed.push((s.name.clone(), f));
            self.done += 1;
            self.progress();
        }
        Ok(())
    }

    /// Start a stream; errors (a bad input spec, a duplicate id) are returned and also written
    /// as `stream_error` + `stream_ended` for streams given at start-up.
    pub(super) fn add(&mut self, s: &StreamSpec) -> Result<(), ControlError> {
        if let Some(st) = self.streams.iter().find(|st| st.name == s.name) {
            return Err(if st.stop.load(Ordering::Relaxed) {
                ControlError::StillStopping(s.name.clone())
            } else {
                ControlError::Duplicate(s.name.clone())
            });
        }
        let input = Input::parse(&s.input).map_err(|e| {
            let f = e.failure();
            ControlError::BadInput(Failure {
                reason: f.reason.replace(&s.input, &s.name),
                ..f
            })
        })?;
        let cfg = self.model.config();
        let live = Arc::new(AtomicBool::new(input.is_live()));
        let finite = input.liveness_known() && !input.is_live();
        let threads = self.file_threads.clone().filter(|_| finite);
        let gate = self.file_gate.clone().filter(|_| finite);
        let (tx, rx) = bounded(self.opts.queue);
        let stop = Arc::new(AtomicBool::new(false));
        let frames_seen = Arc::new(AtomicU64::new(0));
        let dropped_live = Arc::new(AtomicU64::new(0));
        let ctx = StreamCtx {
            idx: self.spawned,
            name: s.name.clone(),
            input,
            origin_ns: s.origin_ns,
            live: live.clone(),
            sopts: SourceOptions {
                threads,
                gate,
                ..self.sopts.clone()
            },
            spec: self.spec,
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
                ControlError::BadInput(Failure::new(
                    ErrorClass::Internal,
                    format!("cannot start the stream's thread: {e}"),
                    "",
                ))
            })?;
        self.spawned += 1;
        if let Some(t) = &self.hooks.telemetry {
            t.set_stream(StreamInfo {
                id: s.name.clone(),
                uri: redact(&s.input),
                live: live.load(Ordering::Relaxed),
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
            interrupted: false,
            stop,
            stopping_since: None,
            frames_seen,
            dropped_live,
            dropped_seen: 0,
            dropped_here: 0,
            shed: 0,
            handle: Some(handle),
            clips: 0,
            prob_sum: vec![0.0; cfg.num_classes],
            segmenter: self
                .opts
                .segments
                .as_ref()
                .map(|s| Segmenter::new(s, self.model.labels())),
            segments: Vec::new(),
            capture_offset: None,
            segment_ids: Default::default(),
            interval: Interval::default(),
        });
        Ok(())
    }

    pub(super) fn remove(&mut self, id: &str) -> Result<(), ControlError> {
        match self.streams.iter().find(|s| s.name == id) {
            Some(s) => {
                s.stop.store(true, Ordering::Relaxed);
                if let Some(t) = &self.hooks.telemetry {
                    t.update_stream(id, |i| i.state = "stopping".into());
                }
                Ok(())
            }
            None => Err(ControlError::NotFound(id.to_string())),
        }
    }

    pub(super) fn write(&mut self, e: &Event) -> Result<(), RuntimeError> {
        if let Some(t) = &self.hooks.telemetry {
            let state = match e {
                Event::StreamStarted { stream, .. } | Event::Reconnected { stream, .. } => {
                    Some((stream, "running"))
                }
                Event::Offline { stream, .. } => Some((stream, "offline")),
                _ => None,
            };
            // A stopping stream stays `stopping` until it is gone.
            let stopping = |name: &str| {
                self.streams
                    .iter()
                    .any(|s| s.name == name && s.stop.load(Ordering::Relaxed))
            };
            if let Some((stream, st)) = state.filter(|(s, _)| !stopping(s)) {
                t.update_stream(stream, |i| i.state = st.into());
            }
            if let Event::StreamStarted { stream, live, .. } = e {
                t.update_stream(stream, |i| i.live = *live);
            }
        }
        self.sink.write(e)?;
        Ok(())
    }

    pub(super) fn drain_events(&mut self) -> Result<(), RuntimeError> {
        while let Ok(e) = self.ev_rx.try_recv() {
            self.write(&e)?;
            if let Event::Offline { stream, .. } = &e {
                if let Some(i) = self.streams.iter().position(|s| &s.name == stream) {
                    self.close_segments(i, "offline")?;
                }
            }
        }
        Ok(())
    }

    pub(super) fn dropped(&mut self, i: usize, count: u64, shed: bool) {
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

    /// A stream asked to stop whose source has not ended well after the EOS timeout (an element
    /// hung in GStreamer) ends as failed and its thread is left behind, so that stopping the
    /// run, or removing the stream, always completes.
    pub(super) fn abandon_stuck(&mut self) {
        let grace = self.opts.eos_timeout + Duration::from_secs(5);
        for st in &mut self.streams {
            if st.end.is_some() || !st.stop.load(Ordering::Relaxed) {
                continue;
            }
            let since = *st.stopping_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= grace {
                st.handle = None;
                st.interrupted = true;
                st.end = Some((
                    st.frames_seen.load(Ordering::Relaxed),
                    st.dropped_live.load(Ordering::Relaxed),
                    Some(Failure::new(
                        ErrorClass::Internal,
                        format!(
                            "the source did not stop within {:.1} s (a GStreamer element hung); left behind",
                            grace.as_secs_f64()
                        ),
                        "",
                    )),
                ));
            }
        }
    }

    /// Move clips from the streams' channels into their queues. Files: only while their queue
    /// has room (backpressure reaches the source). Live: everything, the oldest dropped beyond
    /// the queue size.
    pub(super) fn pull(&mut self) -> bool {
        let mut took = false;
        for i in 0..self.streams.len() {
            let cap = self.opts.queue;
            loop {
                let st = &mut self.streams[i];
                if st.end.is_some() || (!st.live.load(Ordering::Relaxed) && st.queue.len() >= cap) {
                    break;
                }
                match st.rx.try_recv() {
                    Ok(StreamMsg::Clip(c)) => {
                        took = true;
                        self.arrivals.push_back(c.arrived);
                        st.queue.push_back(c);
                        if st.live.load(Ordering::Relaxed) && st.queue.len() > cap {
                            st.queue.pop_front();
                            st.dropped_here += 1;
                            self.dropped(i, 1, false);
                        }
                    }
                    Ok(StreamMsg::End {
                        frames,
                        dropped,
                        error,
                        interrupted,
                    }) => {
                        took = true;
                        st.end = Some((frames, dropped, error));
                        st.interrupted = interrupted;
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        st.end = Some((
                            st.frames_seen.load(Ordering::Relaxed),
                            st.dropped_live.load(Ordering::Relaxed),
                            Some(Failure::new(
                                ErrorClass::Internal,
                                "the source thread stopped unexpectedly",
                                "",
                            )),
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
    pub(super) fn queued(&self, now: Instant) -> Vec<(usize, f64)> {
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
    pub(super) fn flush_in_ms(&self, queued: &[(usize, f64)]) -> Option<f64> {
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

    pub(super) fn run_batch(&mut self, queued: &[(usize, f64)]) -> Result<(), RuntimeError> {
        let rate = super::stats::arrival_rate(&mut self.arrivals, Instant::now());
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
            if shed_left > 0 && self.streams[*i].live.load(Ordering::Relaxed) {
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
        if let Some(g) = &self.file_threads {
            // A file's clips queue in its channel and then here, `queue` each.
            let files = self.streams.iter();
            let files = files.filter(|s| !s.live.load(Ordering::Relaxed)).count();
            let full = batch.len() == self.opts.batch;
            if self
                .model_bound
                .batch(batch.len(), full, 2 * self.opts.queue * files)
            {
                // Once only: a lowered thread cannot be raised again without privileges.
                g.set_background();
            }
        }
        let started = Instant::now();
        let cfg = self.model.config();
        let (t, hw) = (cfg.frames, cfg.image_size);
        let refs: Vec<&[u8]> = batch.iter().map(|(_, c)| c.data.as_slice()).collect();
        let x = tokenizer::batch_normalized(&refs, t, hw, hw, cfg.mean, cfg.std, self.device)?;
        let Classified {
            probs,
            capacity: caps,
            experts,
        } = {
            let _running = self.file_gate.as_ref().map(|g| g.running());
            self.model.classify_detailed(&x, capacity)?
        };
        let busy = started.elapsed();
        let inference_ms = busy.as_secs_f64() * 1e3;
        if let Some(g) = &self.file_gate {
            let now = Instant::now();
            let since = now - self.last_batch_end.replace(now).unwrap_or(started);
            if let Some(on) = self.gate_switch.batch(busy, since) {
                g.set_enabled(on);
            }
        }
        let target = self.target_ms();
        for (k, (i, c)) in batch.iter().enumerate() {
            let labels = LabelScore::topk(&probs[k], self.model.labels(), self.opts.topk);
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
                event_id: match c.capture {
                    Some((t, _)) if st.live.load(Ordering::Relaxed) => {
                        format!("{}#clip@{t}", st.name)
                    }
                    _ => format!("{}#{}", st.name, c.clip_index),
                },
                stream: st.name.clone(),
                clip_index: c.clip_index,
                pts_start_ns: c.pts[0],
                pts_end_ns: c.pts[1],
                frames: c.frames,
                padded_frames: c.padded,
                labels,
                capacity: ran_at,
                capture_time: c.capture.map(|(t, _)| crate::events::rfc3339_ns(t)),
                capture_time_source: c.capture.map(|(_, s)| s),
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
            if let Some((t, src)) = c.capture {
                self.streams[*i].capture_offset = Some((t - c.pts[0] as i64, src));
            }
            self.segment(*i, &probs[k], c.pts)?;
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
    pub(super) fn finish_streams(&mut self) -> Result<(), RuntimeError> {
        let mut i = 0;
        while i < self.streams.len() {
            let st = &self.streams[i];
            if st.end.is_none() || !st.queue.is_empty() {
                i += 1;
                continue;
            }
            let (frames, dropped, error) = self.streams[i].end.take().unwrap_or((0, 0, None));
            let live = self.streams[i].live.load(Ordering::Relaxed);
            if let Some(f) = error {
                let name = self.streams[i].name.clone();
                self.write(&Event::stream_error(&name, &f, live))?;
                self.summary.failed.push((name, f));
            }
            self.close_segments(i, "stream_ended")?;
            let mut st = self.streams.remove(i);
            if let Some(h) = st.handle.take() {
                let _ = h.join();
            }
            let dropped_total = dropped.max(st.dropped_seen) + st.dropped_here;
            self.summary.frames += frames;
            self.summary.dropped_clips += dropped_total;
            // A file stopped part-way (the run stopping, the stream removed) gets no summary:
            // it would pass part of the file for the whole, and its event id would make a
            // broker drop the complete summary of a later run as a duplicate.
            if !st.live.load(Ordering::Relaxed) && !st.interrupted && st.clips > 0 {
                let avg: Vec<f32> = st
                    .prob_sum
                    .iter()
                    .map(|p| (*p / st.clips as f64) as f32)
                    .collect();
                self.write(&Event::Video {
                    event_id: format!("{}#video", st.name),
                    stream: st.name.clone(),
                    clips: st.clips,
                    labels: LabelScore::topk(&avg, self.model.labels(), self.opts.topk),
                    segments: std::mem::take(&mut st.segments),
                    model: self.model_name.to_string(),
                    time: now(),
                })?;
            }
            let time = now();
            self.write(&Event::StreamEnded {
                event_id: crate::events::lifecycle_id(&st.name, "stream_ended", live, &time),
                stream: st.name.clone(),
                clips: st.clips,
                frames,
                dropped_clips: dropped_total,
                time,
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

    pub(super) fn handle_control(&mut self) -> bool {
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
                    if r.is_ok() {
                        self.summary.inputs += 1;
                    }
                    let _ = reply.send(r);
                }
                Control::Remove { id, reply } => {
                    let _ = reply.send(self.remove(&id));
                }
                Control::Emit(e) => {
                    let _ = self.ev_tx.send(*e);
                }
            }
        }
        any
    }

    pub(super) fn wait(&self, timeout: Duration) {
        let mut sel = Select::new();
        for st in &self.streams {
            if st.end.is_none()
                && (st.live.load(Ordering::Relaxed) || st.queue.len() < self.opts.queue)
            {
                sel.recv(&st.rx);
            }
        }
        sel.recv(&self.ev_rx);
        if let Some(c) = self.hooks.control.as_ref().filter(|_| !self.control_closed) {
            sel.recv(c);
        }
        let _ = sel.ready_timeout(timeout);
    }

    pub(super) fn main_loop(&mut self) -> Result<(), RuntimeError> {
        loop {
            self.drain_events()?;
            let controlled = self.handle_control();
            if self.hooks.stop.load(Ordering::Relaxed) {
                for s in &self.streams {
                    s.stop.store(true, Ordering::Relaxed);
                }
            }
            self.abandon_stuck();
            let took = self.pull();
            let now = Instant::now();
            let queued = self.queued(now);
            let flush_in = self.flush_in_ms(&queued);
            let flushed = flush_in == Some(0.0);
            if flushed {
                self.run_batch(&queued)?;
                // A busy worker is never idle: the API's gauges are refreshed per batch too.
                self.update_gauges();
            }
            self.drain_events()?;
            self.finish_streams()?;
            self.fill()?;
            if let Some(iv) = self.opts.stats_interval {
                if self.last_stats.elapsed() >= iv {
                    self.stats()?;
                }
            }
            let stopping = self.hooks.stop.load(Ordering::Relaxed);
            if self.streams.is_empty()
                && self.pending.is_empty()
                && (self.hooks.control.is_none() || stopping)
            {
                return Ok(());
            }
            if !took && !flushed && !controlled {
                self.update_gauges();
                let mut wait = flush_in.unwrap_or(100.0).min(100.0);
                if let Some(iv) = self.opts.stats_interval {
                    wait =
                        wait.min(iv.saturating_sub(self.last_stats.elapsed()).as_secs_f64() * 1e3);
                }
                self.model_bound.waited();
                self.wait(Duration::from_secs_f64(wait.max(0.5) / 1e3));
            }
        }
    }
}
