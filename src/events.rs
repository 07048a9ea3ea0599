//! The events mone emits (JSON Lines) and the sinks that write them. Schema: docs/events.md
//! and docs/events.schema.json.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::failure::{ErrorClass, Failure};
use crate::segments::Segment;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LabelScore {
    pub label: String,
    pub score: f32,
}

impl LabelScore {
    /// The `k` highest of `probs`, highest first, named by `labels`.
    pub fn topk(probs: &[f32], labels: &[String], k: usize) -> Vec<LabelScore> {
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
}

/// One expert a V-MoE ran a clip through, with its router weight.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct ExpertUse {
    pub expert: usize,
    pub weight: f32,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    /// From the clip's last frame arriving to the start of its batch's forward.
    pub queue_ms: f64,
    /// The batch's model forward.
    pub inference_ms: f64,
    /// From the clip's last frame arriving to the event being written.
    pub end_to_end_ms: f64,
}

/// How a clip's `capture_time` is known.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CaptureSource {
    /// The file's creation time (its container's `datetime` tag) plus the clip's PTS.
    Container,
    /// When the frame reached mone (a live stream).
    Arrival,
    /// The RTSP sender's wall clock, from the NTP times of its RTCP sender reports.
    Rtcp,
}

/// Unix nanoseconds as RFC 3339 (UTC, milliseconds).
pub fn rfc3339_ns(unix_ns: i64) -> String {
    let t = if unix_ns >= 0 {
        std::time::UNIX_EPOCH + std::time::Duration::from_nanos(unix_ns as u64)
    } else {
        std::time::UNIX_EPOCH
    };
    humantime::format_rfc3339_millis(t).to_string()
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LatencyPercentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

/// One stream's figures over a stats interval (or all streams', named `*`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StreamStats {
    pub stream: String,
    /// Decoded frames per second.
    pub fps: f64,
    /// Clips classified.
    pub clips: u64,
    /// Clips waiting for the model at the end of the interval.
    pub queue_depth: usize,
    /// Clips dropped from a full queue.
    pub dropped_clips: u64,
    /// Clips shed by the controller because their deadline was out of reach.
    pub shed_clips: u64,
    pub mean_capacity: Option<f64>,
    /// End-to-end latency of the classified clips (last frame in to event out).
    pub latency_ms: Option<LatencyPercentiles>,
    /// Share of clips within the latency target, dropped and shed clips counting as misses;
    /// null without a target or without clips.
    pub slo_attainment: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    StreamStarted {
        /// A file's `<stream>#stream_started`; a live stream's `<stream>#stream_started@<time>`
        /// (see [`lifecycle_id`]).
        event_id: String,
        stream: String,
        time: String,
        model: String,
        device: String,
        live: bool,
    },
    Clip {
        /// A file's `<stream>#<clip_index>`: the same in every run of the file. A live
        /// stream's `<stream>#clip@<capture ns>`: its first frame's capture time, which does not
        /// restart when the camera moves to another worker or mone restarts.
        event_id: String,
        stream: String,
        clip_index: u64,
        pts_start_ns: u64,
        pts_end_ns: u64,
        /// First and last (real, not padded) frame index.
        frames: [u64; 2],
        padded_frames: usize,
        labels: Vec<LabelScore>,
        capacity: f64,
        /// When the clip's first frame was captured (RFC 3339 UTC), or null when unknown (a
        /// file without a creation time).
        capture_time: Option<String>,
        capture_time_source: Option<CaptureSource>,
        /// A V-MoE's experts for this clip, most probable first (absent for MoNE models).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        experts: Vec<ExpertUse>,
        model: String,
        latency_ms: Latency,
        time: String,
    },
    /// A finished file: top-k of the clip-averaged class probabilities.
    Video {
        event_id: String,
        stream: String,
        clips: u64,
        labels: Vec<LabelScore>,
        /// With segments on: the file's action segments, in start order (temporal action
        /// localisation of a long video).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        segments: Vec<Segment>,
        model: String,
        time: String,
    },
    /// A label's segment has lasted its minimum duration (it started at `start_pts_ns`).
    SegmentStarted {
        /// `<stream>#segment<index>`, the same in its `segment_ended`.
        event_id: String,
        stream: String,
        label: String,
        start_pts_ns: u64,
        /// `start_pts_ns` on the wall clock, as the stream's clips give it (null when unknown).
        capture_time: Option<String>,
        score: f32,
        time: String,
    },
    SegmentEnded {
        event_id: String,
        stream: String,
        #[serde(flatten)]
        segment: Segment,
        start_capture_time: Option<String>,
        end_capture_time: Option<String>,
        duration_s: f64,
        time: String,
    },
    StreamEnded {
        event_id: String,
        stream: String,
        clips: u64,
        frames: u64,
        dropped_clips: u64,
        time: String,
    },
    /// The stream failed for good: a permanent error, a file's error, or too many reconnects.
    StreamError {
        event_id: String,
        stream: String,
        error_class: ErrorClass,
        reason: String,
        /// GStreamer's own text, redacted (empty when the failure is mone's finding).
        detail: String,
        time: String,
    },
    /// A network input failed transiently and will be reconnected.
    Offline {
        event_id: String,
        stream: String,
        error_class: ErrorClass,
        reason: String,
        detail: String,
        time: String,
    },
    Reconnected {
        event_id: String,
        stream: String,
        attempt: u32,
        offline_ms: u64,
        time: String,
    },
    /// A cluster camera started on this worker after another held it: `from` died (its lease
    /// expired) or gave it up (rebalancing, shutdown).
    StreamMoved {
        event_id: String,
        stream: String,
        from: String,
        to: String,
        reason: MoveReason,
        time: String,
    },
    /// Every `stats_interval_s`: per-stream and overall figures for the interval just ended.
    Stats {
        /// `stats@<time>#<instance>`: the process that measured it (host name and process id).
        event_id: String,
        interval_s: f64,
        latency_target_ms: Option<f64>,
        /// The controller's capacity at the end of the interval.
        capacity: f64,
        /// The controller's estimate of measured over profiled forward time.
        slowdown: Option<f64>,
        /// Events the sinks have dropped so far from full spools (all sinks, since start).
        events_dropped: u64,
        streams: Vec<StreamStats>,
        total: StreamStats,
        time: String,
    },
}

/// Where events go.
pub trait EventSink {
    fn write(&mut self, e: &Event) -> std::io::Result<()>;
    /// Events written so far.
    fn written(&self) -> u64;
    /// Events an alert or NATS sink dropped so far because its spool was full (refused, or
    /// evicted oldest first).
    fn dropped(&self) -> u64 {
        0
    }
}

/// Events kept in memory (benchmarks, tests).
impl EventSink for Vec<Event> {
    fn write(&mut self, e: &Event) -> std::io::Result<()> {
        self.push(e.clone());
        Ok(())
    }
    fn written(&self) -> u64 {
        self.len() as u64
    }
}

/// Why a camera moved between workers.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MoveReason {
    /// The previous worker stopped renewing its lease (it died or lost the broker).
    LeaseExpired,
    /// The previous worker released it (rebalancing, or a clean shutdown).
    Released,
}

/// The id of a stream's lifecycle event. A file's happen once per file, so a redone job
/// repeats them with the same id (and the events stream drops the copy); a live stream's
/// happen once per moment, so the id carries the event's time.
pub fn lifecycle_id(stream: &str, ty: &str, live: bool, time: &str) -> String {
    if live {
        format!("{stream}#{ty}@{time}")
    } else {
        format!("{stream}#{ty}")
    }
}

/// This process among others: host name and process id (names `stats` events).
pub fn instance() -> String {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "host".into());
        format!("{host}-{}", std::process::id())
    })
    .clone()
}

impl Event {
    pub fn stream_error(stream: &str, f: &Failure, live: bool) -> Self {
        let time = now();
        Event::StreamError {
            event_id: lifecycle_id(stream, "stream_error", live, &time),
            stream: stream.to_string(),
            error_class: f.class,
            reason: f.reason.clone(),
            detail: f.detail.clone(),
            time,
        }
    }
    /// Only live streams go offline.
    pub fn offline(stream: &str, f: &Failure) -> Self {
        let time = now();
        Event::Offline {
            event_id: lifecycle_id(stream, "offline", true, &time),
            stream: stream.to_string(),
            error_class: f.class,
            reason: f.reason.clone(),
            detail: f.detail.clone(),
            time,
        }
    }
    /// The stream an event is about (None for `stats`).
    pub fn stream(&self) -> Option<&str> {
        match self {
            Event::StreamStarted { stream, .. }
            | Event::Clip { stream, .. }
            | Event::Video { stream, .. }
            | Event::SegmentStarted { stream, .. }
            | Event::SegmentEnded { stream, .. }
            | Event::StreamEnded { stream, .. }
            | Event::StreamError { stream, .. }
            | Event::Offline { stream, .. }
            | Event::Reconnected { stream, .. }
            | Event::StreamMoved { stream, .. } => Some(stream),
            Event::Stats { .. } => None,
        }
    }

    /// The id every event carries.
    pub fn event_id(&self) -> &str {
        match self {
            Event::StreamStarted { event_id, .. }
            | Event::Clip { event_id, .. }
            | Event::Video { event_id, .. }
            | Event::SegmentStarted { event_id, .. }
            | Event::SegmentEnded { event_id, .. }
            | Event::StreamEnded { event_id, .. }
            | Event::StreamError { event_id, .. }
            | Event::Offline { event_id, .. }
            | Event::Reconnected { event_id, .. }
            | Event::StreamMoved { event_id, .. }
            | Event::Stats { event_id, .. } => event_id,
        }
    }
}

/// Wall-clock time as RFC 3339 (UTC, milliseconds).
pub fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// Replace a URI's user-info (credentials) with `***`.
pub fn redact(uri: &str) -> String {
    redact_text(uri)
}

/// Credentials of the inputs seen so far: GStreamer also quotes parts of a URI without its
/// scheme (a path `/user:secret@host/x`, `'user:secret@host'`), which no URI pattern catches.
static SECRETS: std::sync::RwLock<Vec<String>> = std::sync::RwLock::new(Vec::new());

/// Remember the credentials in `uri` (`user:password`, and the password alone when it is at
/// least 4 characters), so that [`redact_text`] removes them wherever they appear.
pub fn register_secrets(uri: &str) {
    let Some((_, rest)) = uri.split_once("://") else {
        return;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let Some(at) = authority.rfind('@') else {
        return;
    };
    let userinfo = &authority[..at];
    let mut new = vec![userinfo.to_string()];
    if let Some((_, pass)) = userinfo.split_once(':') {
        if pass.chars().count() >= 4 {
            new.push(pass.to_string());
        }
    }
    let mut g = SECRETS.write().unwrap_or_else(|p| p.into_inner());
    for n in new {
        if !n.is_empty() && !g.contains(&n) {
            g.push(n);
        }
    }
    // Longest first, so `user:pass` goes before `pass`.
    g.sort_by_key(|s| std::cmp::Reverse(s.len()));
}

/// Redact the credentials of every URI inside free text (GStreamer's error messages quote
/// the location, user-info included): `scheme://user:pass@host` becomes `scheme://***@host`.
pub fn redact_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        // The authority ends at the path, or where the URI itself ends in the text (a space,
        // a quote or an angle bracket; commas and brackets may be in a password).
        let end = tail
            .find(|c: char| c == '/' || c.is_whitespace() || "\"'<>".contains(c))
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                out.push_str("***");
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    let secrets = SECRETS.read().unwrap_or_else(|p| p.into_inner());
    for secret in secrets.iter() {
        if out.contains(secret.as_str()) {
            out = out.replace(secret.as_str(), "***");
        }
    }
    out
}

/// Where events go: JSON Lines on stdout or appended to a file, flushed per event.
pub struct JsonLinesSink {
    out: Box<dyn Write + Send>,
    path: Option<PathBuf>,
    pub written: u64,
}

impl JsonLinesSink {
    pub fn stdout() -> Self {
        Self {
            out: Box::new(std::io::stdout()),
            path: None,
            written: 0,
        }
    }
    pub fn file(path: &Path) -> std::io::Result<Self> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Self {
            out: Box::new(std::io::BufWriter::new(f)),
            path: Some(path.to_path_buf()),
            written: 0,
        })
    }
    pub fn write(&mut self, e: &Event) -> std::io::Result<()> {
        let line = serde_json::to_string(e).map_err(std::io::Error::other)?;
        self.out.write_all(line.as_bytes())?;
        self.out.write_all(b"\n")?;
        self.out.flush()?;
        self.written += 1;
        Ok(())
    }
    /// Discard events (benchmarks).
    pub fn null() -> Self {
        Self {
            out: Box::new(std::io::sink()),
            path: None,
            written: 0,
        }
    }
    pub fn describe(&self) -> String {
        self.path
            .as_ref()
            .map_or("stdout".into(), |p| p.display().to_string())
    }
}

impl EventSink for JsonLinesSink {
    fn write(&mut self, e: &Event) -> std::io::Result<()> {
        JsonLinesSink::write(self, e)
    }
    fn written(&self) -> u64 {
        self.written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_every_uri_in_free_text() {
        let t = "Could not open resource for reading: rtmp://user:secret@127.0.0.1:1/live \
                 (debug: location \"rtsp://admin:pw@cam/x\"), then srt://a:b@h:9 and http://host/ok";
        let r = redact_text(t);
        assert!(
            !r.contains("secret") && !r.contains("pw@") && !r.contains("a:b"),
            "{r}"
        );
        assert!(r.contains("rtmp://***@127.0.0.1:1/live"), "{r}");
        assert!(r.contains("rtsp://***@cam/x"), "{r}");
        assert!(r.contains("srt://***@h:9"), "{r}");
        assert!(r.contains("http://host/ok"), "{r}");
        assert_eq!(redact_text("no uri here: a@b"), "no uri here: a@b");
        assert_eq!(redact_text("ends in file://"), "ends in file://");
        assert_eq!(redact_text("rtsp://u:p,a)ss@h/x"), "rtsp://***@h/x");
    }

    #[test]
    fn registered_credentials_are_redacted_wherever_they_appear() {
        register_secrets("rtsp://viewer:hunter22@cam/x");
        let t = "cannot open /viewer:hunter22@cam/x; 'viewer:hunter22@cam'; password hunter22";
        let r = redact_text(t);
        assert!(!r.contains("hunter22"), "{r}");
        assert_eq!(r, "cannot open /***@cam/x; '***@cam'; password ***");
    }

    #[test]
    fn redacts_credentials_only() {
        assert_eq!(
            redact("rtsp://admin:secret@10.0.0.5:554/stream1"),
            "rtsp://***@10.0.0.5:554/stream1"
        );
        assert_eq!(redact("rtsp://cam.local/stream"), "rtsp://cam.local/stream");
        assert_eq!(redact("/videos/a@b.mp4"), "/videos/a@b.mp4");
        assert_eq!(redact("file:///x/a@b.mp4"), "file:///x/a@b.mp4");
    }

    fn examples() -> Vec<Event> {
        let t = now();
        let labels = vec![LabelScore {
            label: "a".into(),
            score: 0.5,
        }];
        let segment = Segment {
            index: 0,
            label: "walk".into(),
            start_pts_ns: 0,
            end_pts_ns: 2_000_000_000,
            clips: 4,
            peak_score: 0.9,
            mean_score: 0.8,
            reason: "ended".into(),
        };
        vec![
            Event::StreamStarted {
                event_id: "s#stream_started".into(),
                stream: "s".into(),
                time: t.clone(),
                model: "m".into(),
                device: "cpu".into(),
                live: false,
            },
            Event::Clip {
                event_id: "s#0".into(),
                stream: "s".into(),
                clip_index: 0,
                pts_start_ns: 0,
                pts_end_ns: 1,
                frames: [0, 7],
                padded_frames: 0,
                labels: labels.clone(),
                capacity: 1.0,
                capture_time: Some(t.clone()),
                capture_time_source: Some(CaptureSource::Arrival),
                experts: vec![ExpertUse {
                    expert: 3,
                    weight: 0.5,
                }],
                model: "m".into(),
                latency_ms: Latency {
                    queue_ms: 1.0,
                    inference_ms: 2.0,
                    end_to_end_ms: 3.0,
                },
                time: t.clone(),
            },
            Event::Video {
                event_id: "s#video".into(),
                stream: "s".into(),
                clips: 1,
                labels,
                segments: vec![segment.clone()],
                model: "m".into(),
                time: t.clone(),
            },
            Event::SegmentStarted {
                event_id: "s#segment0".into(),
                stream: "s".into(),
                label: "walk".into(),
                start_pts_ns: 0,
                capture_time: Some(t.clone()),
                score: 0.9,
                time: t.clone(),
            },
            Event::SegmentEnded {
                event_id: "s#segment0".into(),
                stream: "s".into(),
                segment,
                start_capture_time: Some(t.clone()),
                end_capture_time: None,
                duration_s: 2.0,
                time: t.clone(),
            },
            Event::StreamEnded {
                event_id: "s#stream_ended".into(),
                stream: "s".into(),
                clips: 1,
                frames: 8,
                dropped_clips: 0,
                time: t.clone(),
            },
            Event::StreamError {
                event_id: "s#stream_error".into(),
                stream: "s".into(),
                error_class: ErrorClass::NoVideo,
                reason: "r".into(),
                detail: "d".into(),
                time: t.clone(),
            },
            Event::Offline {
                event_id: format!("s#offline@{t}"),
                stream: "s".into(),
                error_class: ErrorClass::ConnectionRefused,
                reason: "r".into(),
                detail: String::new(),
                time: t.clone(),
            },
            Event::Reconnected {
                event_id: format!("s#reconnected@{t}"),
                stream: "s".into(),
                attempt: 1,
                offline_ms: 5,
                time: t.clone(),
            },
            Event::StreamMoved {
                event_id: format!("s#stream_moved@{t}"),
                stream: "s".into(),
                from: "w1".into(),
                to: "w2".into(),
                reason: MoveReason::LeaseExpired,
                time: t.clone(),
            },
            Event::Stats {
                event_id: format!("stats@{t}#{}", instance()),
                interval_s: 10.0,
                latency_target_ms: Some(100.0),
                capacity: 0.5,
                slowdown: Some(1.1),
                events_dropped: 0,
                streams: vec![],
                total: StreamStats {
                    stream: "*".into(),
                    fps: 25.0,
                    clips: 3,
                    queue_depth: 0,
                    dropped_clips: 0,
                    shed_clips: 0,
                    mean_capacity: Some(0.5),
                    latency_ms: Some(LatencyPercentiles {
                        p50: 1.0,
                        p95: 2.0,
                        p99: 3.0,
                    }),
                    slo_attainment: Some(1.0),
                },
                time: t,
            },
        ]
    }

    #[test]
    fn the_json_schema_matches_every_event() {
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../docs/events.schema.json")).unwrap();
        let variants = schema["oneOf"].as_array().unwrap();
        let ex = examples();
        assert_eq!(variants.len(), ex.len(), "one schema entry per event type");
        for e in ex {
            let v = serde_json::to_value(&e).unwrap();
            let ty = v["type"].as_str().unwrap();
            let entry = variants
                .iter()
                .find(|s| s["properties"]["type"]["const"] == ty)
                .unwrap_or_else(|| panic!("{ty} is not in the schema"));
            let mut props: Vec<&String> = entry["properties"].as_object().unwrap().keys().collect();
            let mut keys: Vec<&String> = v.as_object().unwrap().keys().collect();
            props.sort();
            keys.sort();
            assert_eq!(props, keys, "{ty}: schema properties vs serialized fields");
            let mut req: Vec<&str> = entry["required"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_str().unwrap())
                .collect();
            req.sort();
            // Only a V-MoE's clip events carry `experts`, and only segmenting runs `segments`.
            assert_eq!(
                req,
                keys.iter()
                    .map(|k| k.as_str())
                    .filter(|k| !(ty == "clip" && *k == "experts"))
                    .filter(|k| !(ty == "video" && *k == "segments"))
                    .collect::<Vec<_>>(),
                "{ty}: every field but the optional ones is required"
            );
        }
    }

    #[test]
    fn events_round_trip_with_a_type_tag() {
        let e = Event::stream_error("s", &Failure::new(ErrorClass::Timeout, "r", ""), false);
        let j = serde_json::to_string(&e).unwrap();
        assert!(j.starts_with("{\"type\":\"stream_error\""));
        assert_eq!(serde_json::from_str::<Event>(&j).unwrap(), e);
    }
}
