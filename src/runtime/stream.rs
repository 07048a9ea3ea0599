//! One input's thread: source -> clip windows -> tokenizer, reconnecting live inputs with
//! back-off, into the stream's bounded queue.

use super::*;

fn unix_ns_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// When a clip's first frame was captured: a file's creation time plus the clip's PTS, or for a
/// live stream the sender's time of that frame (RTSP with sender reports) or else the wall
/// clock at which it reached us; None for a file without one.
fn capture_of(
    clip: &Clip,
    created: Option<i64>,
    live: bool,
    wall: &VecDeque<(u64, i64, CaptureSource)>,
) -> Option<(i64, CaptureSource)> {
    if !live {
        return created.map(|c| (c + clip.pts_start_ns() as i64, CaptureSource::Container));
    }
    let first = clip.first_frame();
    wall.iter()
        .find(|(i, _, _)| *i == first)
        .map(|(_, t, s)| (*t, *s))
}

/// Reconnects of a network file (an HTTP download) that failed before its first frame.
const FILE_RETRIES: u32 = 3;

pub(super) struct ClipMsg {
    pub(super) clip_index: u64,
    pub(super) frames: [u64; 2],
    pub(super) padded: usize,
    pub(super) pts: [u64; 2],
    /// Raw (C, T, H, W) RGB: normalised on the device with its batch.
    pub(super) data: Vec<u8>,
    /// When the clip's last frame was pulled from the source: latency runs from here.
    pub(super) arrived: Instant,
    /// When its first frame was captured (Unix nanoseconds), and how that is known.
    pub(super) capture: Option<(i64, CaptureSource)>,
}

pub(super) enum StreamMsg {
    Clip(ClipMsg),
    End {
        frames: u64,
        dropped: u64,
        error: Option<Failure>,
        /// Stopped before its end (the run stopping, the stream removed): a file's `video`
        /// summary would describe only part of it.
        interrupted: bool,
    },
}

pub(super) struct StreamCtx {
    pub(super) idx: usize,
    pub(super) name: String,
    pub(super) input: Input,
    pub(super) origin_ns: Option<i64>,
    /// Shared with the worker: an HTTP input turns out live (or not) at its first frame.
    pub(super) live: Arc<AtomicBool>,
    pub(super) sopts: SourceOptions,
    pub(super) spec: ClipSpec,
    pub(super) opts: RuntimeOptions,
    pub(super) tx: Sender<StreamMsg>,
    /// A second handle on the stream's own queue, to drop its oldest clip in live mode.
    pub(super) oldest: Receiver<StreamMsg>,
    pub(super) events: Sender<Event>,
    /// This stream's own stop flag (removal, or the run stopping).
    pub(super) stop: Arc<AtomicBool>,
    pub(super) frames_seen: Arc<AtomicU64>,
    pub(super) dropped_live: Arc<AtomicU64>,
    pub(super) model: String,
    pub(super) device: String,
}

pub(super) fn jitter(seed: &mut u64) -> f64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    (*seed >> 11) as f64 / (1u64 << 53) as f64
}

/// Stop a pipeline, but never wait on it for more than the EOS timeout plus two seconds: a
/// wedged element (seen with a truncated MP4) must not hang the stream's thread. A pipeline that
/// does not stop in time is left to its helper thread.
pub(super) fn stop_bounded(p: SourcePipeline, eos_timeout: Duration) {
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
pub(super) fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) -> bool {
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
    pub(super) fn emit(&self, e: Event) {
        let _ = self.events.send(e);
    }

    /// Queue a clip: files block (backpressure), live streams drop their oldest queued clip.
    /// Returns false when the worker is gone.
    pub(super) fn send_clip(
        &self,
        clip: Clip,
        arrived: Instant,
        capture: Option<(i64, CaptureSource)>,
        dropped: &mut u64,
    ) -> bool {
        let msg = StreamMsg::Clip(ClipMsg {
            clip_index: clip.index,
            frames: [clip.first_frame(), clip.last_frame()],
            padded: clip.padded,
            pts: [clip.pts_start_ns(), clip.pts_end_ns()],
            data: tokenizer::clip_to_chw_u8(&clip),
            arrived,
            capture,
        });
        if !self.live() {
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

    fn live(&self) -> bool {
        self.live.load(Ordering::Relaxed)
    }

    fn started(&self) {
        let time = now();
        self.emit(Event::StreamStarted {
            event_id: crate::events::lifecycle_id(&self.name, "stream_started", self.live(), &time),
            stream: self.name.clone(),
            time,
            model: self.model.clone(),
            device: self.device.clone(),
            live: self.live(),
        });
    }

    pub(super) fn run(self) {
        let _registered = self
            .sopts
            .threads
            .as_ref()
            .map(|g| g.register_this_thread());
        let mut asm = ClipAssembler::new(self.spec);
        let (mut frames, mut dropped) = (0u64, 0u64);
        let mut error: Option<Failure> = None;
        let mut reached_end = false;
        let mut attempt = 0u32;
        let mut offline_since: Option<Instant> = None;
        let mut started = false;
        // An HTTP input is live or a file: known at its first frame.
        let mut decided = self.input.liveness_known();
        let network = self.input.is_network();
        // The stream's own timeline: monotonic across reconnects.
        let mut timeline_end = 0u64;
        let mut last_pts: Option<u64> = None;
        let mut seed =
            0x2545_F491_4F6C_DD1Du64 ^ ((self.idx as u64 + 1) << 32) ^ std::process::id() as u64;
        let stop = &self.stop;
        // Wall-clock arrival of recent frames (index, Unix ns), and the file's creation time.
        let mut wall: VecDeque<(u64, i64, CaptureSource)> = VecDeque::new();
        let mut created: Option<i64> = None;
        'outer: loop {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let failure: Failure;
            let mut made = false;
            match SourcePipeline::new(&self.input, &self.sopts)
                .and_then(|p| p.start_in_background().map(|_| p))
            {
                Err(e) => failure = e.failure(),
                Ok(mut p) => {
                    made = true;
                    if decided && !started {
                        started = true;
                        self.started();
                    }
                    let mut last_frame_at = Instant::now();
                    let mut session_first: Option<u64> = None;
                    let mut session_offset = timeline_end;
                    failure = loop {
                        if stop.load(Ordering::Relaxed) {
                            stop_bounded(p, self.opts.eos_timeout);
                            break 'outer;
                        }
                        let live = self.live();
                        match p.pull(Duration::from_millis(100)) {
                            Pulled::Frame(mut f) => {
                                if !decided {
                                    decided = true;
                                    self.live.store(!p.has_duration(), Ordering::Relaxed);
                                }
                                if !started {
                                    started = true;
                                    self.started();
                                }
                                last_frame_at = Instant::now();
                                self.frames_seen.fetch_add(1, Ordering::Relaxed);
                                if let Some(t0) = offline_since.take() {
                                    let time = now();
                                    self.emit(Event::Reconnected {
                                        event_id: crate::events::lifecycle_id(
                                            &self.name,
                                            "reconnected",
                                            true,
                                            &time,
                                        ),
                                        stream: self.name.clone(),
                                        attempt,
                                        offline_ms: t0.elapsed().as_millis() as u64,
                                        time,
                                    });
                                    attempt = 0;
                                }
                                // First session: the input's own PTS, or the time since the
                                // stream's origin. After a reconnect: continue from where the
                                // previous session ended.
                                let sent = p.sender_time_ns(f.pts_ns);
                                let first = *session_first.get_or_insert(f.pts_ns);
                                if last_pts.is_none() {
                                    if let Some(o) = self.origin_ns {
                                        session_offset = (unix_ns_now() - o).max(0) as u64;
                                    }
                                }
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
                                if let Some(c) = p.created_unix_ns() {
                                    created = Some(c);
                                }
                                wall.push_back(match sent {
                                    Some(t) => (f.index, t, CaptureSource::Rtcp),
                                    None => (f.index, unix_ns_now(), CaptureSource::Arrival),
                                });
                                if wall.len() > 4096 {
                                    wall.pop_front();
                                }
                                if let Some(clip) = asm.push(f) {
                                    let capture = capture_of(&clip, created, live, &wall);
                                    if !self.send_clip(clip, last_frame_at, capture, &mut dropped) {
                                        stop_bounded(p, self.opts.eos_timeout);
                                        break 'outer;
                                    }
                                    // Time blocked on a full queue (backpressure) is not a stall.
                                    last_frame_at = Instant::now();
                                }
                            }
                            Pulled::Idle => {
                                let idle = last_frame_at.elapsed();
                                if live && idle >= self.opts.watchdog {
                                    break Failure::new(
                                        ErrorClass::Timeout,
                                        format!(
                                            "no frames for {:.1} s",
                                            self.opts.watchdog.as_secs_f64()
                                        ),
                                        "",
                                    );
                                }
                                if !live && idle >= self.opts.stall_timeout {
                                    // A local file does not wait on a network: when it stalls,
                                    // its demuxer has wedged on damaged data (GStreamer 1.22's
                                    // qtdemux does, now and then, on a truncated MP4).
                                    let class = if network {
                                        ErrorClass::Timeout
                                    } else {
                                        ErrorClass::CorruptData
                                    };
                                    break Failure::new(
                                        class,
                                        format!(
                                            "the input stalled: no frame, end or error for {:.1} s",
                                            self.opts.stall_timeout.as_secs_f64()
                                        ),
                                        "",
                                    );
                                }
                            }
                            Pulled::Eos => {
                                if live {
                                    break Failure::new(
                                        ErrorClass::NetworkLost,
                                        "the source ended",
                                        "",
                                    );
                                }
                                if frames == 0 {
                                    error = Some(Failure::new(
                                        ErrorClass::NoVideo,
                                        "no video frames decoded (not a video, or no video stream)",
                                        "",
                                    ));
                                }
                                reached_end = true;
                                stop_bounded(p, self.opts.eos_timeout);
                                break 'outer;
                            }
                            Pulled::Error(e) => break e,
                        }
                    };
                    stop_bounded(p, self.opts.eos_timeout);
                }
            }
            if made && !started {
                started = true;
                self.started();
            }
            // Live inputs reconnect after any failure retrying can cure; a network file only
            // before its first frame (starting it again would repeat its clips).
            let retry = !failure.class.is_permanent() && (self.live() || (network && frames == 0));
            if !retry {
                error = Some(failure);
                break;
            }
            if offline_since.is_none() {
                offline_since = Some(Instant::now());
                self.emit(Event::offline(&self.name, &failure));
            }
            attempt += 1;
            // A file over the network is retried a few times at most, however patient the
            // live streams are: a batch job must end.
            let limit = if self.live() {
                self.opts.max_reconnects
            } else {
                Some(
                    self.opts
                        .max_reconnects
                        .map_or(FILE_RETRIES, |m| m.min(FILE_RETRIES)),
                )
            };
            if limit.is_some_and(|m| attempt > m) {
                error = Some(
                    failure.context(&format!("gave up after {} reconnect attempts", attempt - 1)),
                );
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
            let capture = capture_of(&clip, created, self.live(), &wall);
            self.send_clip(clip, Instant::now(), capture, &mut dropped);
        }
        let _ = self.tx.send(StreamMsg::End {
            frames,
            dropped,
            error,
            interrupted: !reached_end && stop.load(Ordering::Relaxed),
        });
    }
}
