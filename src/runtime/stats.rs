//! The worker's figures: per-interval latencies, capacity, drops and fps per stream, the
//! `stats` events and the API's gauges.

use super::worker::{StreamState, Worker};
use super::*;

/// Clips per millisecond over the last two seconds of `arrivals` (pruned here).
pub(super) fn arrival_rate(arrivals: &mut VecDeque<Instant>, now: Instant) -> Option<f64> {
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

#[derive(Default)]
pub(super) struct Interval {
    pub(super) latencies: Vec<f64>,
    pub(super) capacity_sum: f64,
    pub(super) clips: u64,
    pub(super) within: u64,
    pub(super) dropped: u64,
    pub(super) shed: u64,
    pub(super) frames_at_start: u64,
    /// Frames decoded in the interval by streams that have ended since it began.
    pub(super) retired_frames: u64,
}

impl Interval {
    pub(super) fn merge(&mut self, o: &Interval) {
        self.latencies.extend_from_slice(&o.latencies);
        self.capacity_sum += o.capacity_sum;
        self.clips += o.clips;
        self.within += o.within;
        self.dropped += o.dropped;
        self.shed += o.shed;
        self.retired_frames += o.retired_frames;
    }
}

pub(super) fn summarize(
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

impl Worker<'_, '_> {
    pub(super) fn stream_stats(&self, st: &StreamState, secs: f64) -> StreamStats {
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

    pub(super) fn stats(&mut self) -> Result<(), RuntimeError> {
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
        let time = now();
        let e = Event::Stats {
            event_id: format!("stats@{time}#{}", crate::events::instance()),
            interval_s: secs,
            latency_target_ms: self.target_ms(),
            capacity: self.capacity(),
            slowdown: self.controller.as_ref().map(|c| c.slowdown.factor()),
            events_dropped: self.sink.dropped(),
            streams,
            total,
            time,
        };
        self.write(&e)
    }

    /// Refresh the per-stream gauges (between stats events).
    pub(super) fn update_gauges(&self) {
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
}
