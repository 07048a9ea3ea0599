//! Live metrics shared between the runtime (which records) and the HTTP server (which renders
//! them in the Prometheus text format and lists the streams).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use serde::Serialize;

/// Upper bounds (ms) of the latency histograms' buckets.
pub const BUCKETS_MS: [f64; 14] = [
    1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
];

#[derive(Clone, Debug, Default)]
pub struct Histogram {
    /// Non-cumulative counts per bucket, the last one +Inf.
    counts: [u64; BUCKETS_MS.len() + 1],
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn observe(&mut self, v: f64) {
        let i = BUCKETS_MS.partition_point(|b| *b < v);
        self.counts[i] += 1;
        self.sum += v;
        self.count += 1;
    }
}

/// The stages whose latency is recorded per clip: last frame in to the start of the batch's
/// forward, the batch's forward, last frame in to the event written.
const STAGES: [&str; 3] = ["queue", "inference", "end_to_end"];

#[derive(Clone, Debug, Default, Serialize)]
pub struct StreamInfo {
    pub id: String,
    /// The input with credentials redacted.
    pub uri: String,
    pub live: bool,
    /// starting, running, offline, ended.
    pub state: String,
    pub clips: u64,
    pub frames: u64,
    pub dropped_clips: u64,
    pub shed_clips: u64,
    pub queue_depth: usize,
    pub fps: f64,
}

#[derive(Debug, Default)]
struct State {
    streams: BTreeMap<String, StreamInfo>,
    stages: [Histogram; 3],
    capacity: f64,
    capacity_hist: Vec<(f64, u64)>,
    slowdown: f64,
    target_ms: Option<f64>,
    slo_within: u64,
    slo_total: u64,
    batches: u64,
}

/// Thread-safe metrics; every method takes the lock briefly.
#[derive(Debug, Default)]
pub struct Telemetry {
    state: Mutex<State>,
}

impl Telemetry {
    pub fn new(target_ms: Option<f64>) -> Self {
        let t = Self::default();
        t.with(|s| {
            s.target_ms = target_ms;
            s.slowdown = 1.0;
            s.capacity = 1.0;
        });
        t
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        // A panic elsewhere while holding the lock leaves plain counters behind: keep going.
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    pub fn set_stream(&self, info: StreamInfo) {
        self.with(|s| {
            s.streams.insert(info.id.clone(), info);
        });
    }
    pub fn update_stream(&self, id: &str, f: impl FnOnce(&mut StreamInfo)) {
        self.with(|s| {
            if let Some(i) = s.streams.get_mut(id) {
                f(i)
            }
        });
    }
    pub fn remove_stream(&self, id: &str) {
        self.with(|s| {
            s.streams.remove(id);
        });
    }
    pub fn streams(&self) -> Vec<StreamInfo> {
        self.with(|s| s.streams.values().cloned().collect())
    }
    /// A classified clip: its latency per stage (in [`STAGES`] order) and, with a target,
    /// whether it was within it.
    pub fn clip(&self, stage_ms: [f64; 3], within: Option<bool>) {
        self.with(|s| {
            for (h, ms) in s.stages.iter_mut().zip(stage_ms) {
                h.observe(ms);
            }
            if let Some(w) = within {
                s.slo_total += 1;
                s.slo_within += w as u64;
            }
        });
    }
    /// Dropped or shed clips: misses against the target.
    pub fn slo_misses(&self, count: u64) {
        self.with(|s| s.slo_total += count);
    }
    pub fn batch(&self, capacity: f64, slowdown: f64) {
        self.with(|s| {
            s.batches += 1;
            s.capacity = capacity;
            s.slowdown = slowdown;
            match s
                .capacity_hist
                .iter_mut()
                .find(|(c, _)| (c - capacity).abs() < 1e-9)
            {
                Some((_, n)) => *n += 1,
                None => s.capacity_hist.push((capacity, 1)),
            }
        });
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        self.with(|s| {
            let mut o = String::new();
            let esc = |v: &str| {
                crate::events::redact_text(v)
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n")
            };
            o.push_str("# HELP mone_stage_latency_ms Latency of a pipeline stage per clip, in milliseconds.\n# TYPE mone_stage_latency_ms histogram\n");
            for (name, h) in STAGES.iter().zip(&s.stages) {
                let mut cum = 0;
                for (b, c) in BUCKETS_MS.iter().zip(&h.counts) {
                    cum += c;
                    let _ = writeln!(
                        o,
                        "mone_stage_latency_ms_bucket{{stage=\"{name}\",le=\"{b}\"}} {cum}"
                    );
                }
                let _ = writeln!(
                    o,
                    "mone_stage_latency_ms_bucket{{stage=\"{name}\",le=\"+Inf\"}} {}",
                    h.count
                );
                let _ = writeln!(o, "mone_stage_latency_ms_sum{{stage=\"{name}\"}} {}", h.sum);
                let _ = writeln!(
                    o,
                    "mone_stage_latency_ms_count{{stage=\"{name}\"}} {}",
                    h.count
                );
            }
            let _ = write!(
                o,
                "# HELP mone_capacity The capacity e_c of the last batch.\n# TYPE mone_capacity gauge\nmone_capacity {}\n",
                s.capacity
            );
            o.push_str("# HELP mone_batches_total Batches run, by capacity.\n# TYPE mone_batches_total counter\n");
            for (c, n) in &s.capacity_hist {
                let _ = writeln!(o, "mone_batches_total{{capacity=\"{c}\"}} {n}");
            }
            let _ = write!(
                o,
                "# HELP mone_slowdown Measured over profiled forward time (the controller's estimate).\n# TYPE mone_slowdown gauge\nmone_slowdown {}\n",
                s.slowdown
            );
            if let Some(t) = s.target_ms {
                let _ = write!(
                    o,
                    "# HELP mone_latency_target_ms The end-to-end latency target.\n# TYPE mone_latency_target_ms gauge\nmone_latency_target_ms {t}\n\
                     # HELP mone_slo_clips_total Clips judged against the target (dropped ones count as misses).\n# TYPE mone_slo_clips_total counter\nmone_slo_clips_total {}\n\
                     # HELP mone_slo_within_total Clips within the target.\n# TYPE mone_slo_within_total counter\nmone_slo_within_total {}\n\
                     # HELP mone_slo_attainment Fraction of clips within the target since start.\n# TYPE mone_slo_attainment gauge\nmone_slo_attainment {}\n",
                    s.slo_total,
                    s.slo_within,
                    if s.slo_total == 0 { 1.0 } else { s.slo_within as f64 / s.slo_total as f64 }
                );
            }
            let _ = write!(
                o,
                "# HELP mone_streams Streams in the pipeline.\n# TYPE mone_streams gauge\nmone_streams {}\n",
                s.streams.len()
            );
            type Field = fn(&StreamInfo) -> f64;
            let per_stream: [(&str, &str, &str, Field); 6] = [
                ("mone_stream_clips_total", "counter", "Clips classified.", |i| i.clips as f64),
                ("mone_stream_frames_total", "counter", "Frames decoded.", |i| i.frames as f64),
                ("mone_stream_dropped_clips_total", "counter", "Clips dropped from a full queue or shed by the controller.", |i| (i.dropped_clips + i.shed_clips) as f64),
                ("mone_stream_shed_clips_total", "counter", "Clips shed by the controller (deadline out of reach).", |i| i.shed_clips as f64),
                ("mone_stream_queue_depth", "gauge", "Clips waiting for the model.", |i| i.queue_depth as f64),
                ("mone_stream_fps", "gauge", "Decoded frames per second over the last stats interval.", |i| i.fps),
            ];
            for (name, ty, help, f) in per_stream {
                let _ = write!(o, "# HELP {name} {help}\n# TYPE {name} {ty}\n");
                for i in s.streams.values() {
                    let _ = writeln!(o, "{name}{{stream=\"{}\"}} {}", esc(&i.id), f(i));
                }
            }
            o
        })
    }
}

/// p-th percentile (0-100) of unsorted values by nearest rank; None when empty.
pub fn percentile(values: &mut [f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    Some(values[rank.clamp(1, values.len()) - 1])
}

/// One parsed sample: metric name, labels, value.
pub type Sample = (String, BTreeMap<String, String>, f64);

/// A minimal Prometheus text parser: (metric name with labels, value) per sample. Errors name
/// the offending line. Used by the tests and by anyone checking an exposition.
pub fn parse_prometheus(text: &str) -> Result<Vec<Sample>, String> {
    let mut out = Vec::new();
    let mut typed = std::collections::HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let err = |m: &str| format!("line {}: {m}: {line}", n + 1);
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let mut w = rest.split_whitespace();
            match w.next() {
                Some("TYPE") => {
                    let name = w.next().ok_or_else(|| err("TYPE without a name"))?;
                    let ty = w.next().ok_or_else(|| err("TYPE without a type"))?;
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&ty) {
                        return Err(err("unknown type"));
                    }
                    if !typed.insert(name.to_string()) {
                        return Err(err("a second TYPE line for the same metric"));
                    }
                }
                Some("HELP") => {
                    w.next().ok_or_else(|| err("HELP without a name"))?;
                }
                _ => {}
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).ok_or_else(|| err("no value"))?;
        let name = &line[..name_end];
        let ok_name = !name.is_empty()
            && name.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            });
        if !ok_name {
            return Err(err("bad metric name"));
        }
        let mut labels = BTreeMap::new();
        let mut rest = &line[name_end..];
        if let Some(r) = rest.strip_prefix('{') {
            let close = r.rfind('}').ok_or_else(|| err("unclosed label set"))?;
            let body = &r[..close];
            rest = &r[close + 1..];
            let mut chars = body.chars().peekable();
            loop {
                let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
                if key.is_empty() {
                    break;
                }
                if chars.next() != Some('"') {
                    return Err(err("label value not quoted"));
                }
                let mut val = String::new();
                loop {
                    match chars.next() {
                        Some('\\') => val.push(chars.next().ok_or_else(|| err("bad escape"))?),
                        Some('"') => break,
                        Some(c) => val.push(c),
                        None => return Err(err("unterminated label value")),
                    }
                }
                labels.insert(key.trim().to_string(), val);
                match chars.next() {
                    Some(',') | None => {}
                    Some(_) => return Err(err("expected , between labels")),
                }
            }
        }
        let mut parts = rest.split_whitespace();
        let v = parts.next().ok_or_else(|| err("no value"))?;
        let value = match v {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse::<f64>().map_err(|_| err("value is not a number"))?,
        };
        if let Some(ts) = parts.next() {
            ts.parse::<i64>().map_err(|_| err("bad timestamp"))?;
        }
        out.push((name.to_string(), labels, value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_parseable_prometheus_text() {
        let t = Telemetry::new(Some(100.0));
        t.set_stream(StreamInfo {
            id: "cam \"1\"".into(),
            uri: "rtsp://***@h/s".into(),
            live: true,
            state: "running".into(),
            clips: 3,
            ..Default::default()
        });
        for v in [0.5, 3.0, 40.0, 40.0, 1e6] {
            t.clip([1.0, 1.0, v], None);
        }
        t.clip([1.0, 1.0, 1.0], Some(true));
        t.slo_misses(1);
        t.batch(0.5, 1.2);
        let text = t.render();
        let samples = parse_prometheus(&text).unwrap();
        let get = |name: &str, label: Option<(&str, &str)>| {
            samples
                .iter()
                .find(|(n, l, _)| {
                    n == name && label.is_none_or(|(k, v)| l.get(k).map(String::as_str) == Some(v))
                })
                .map(|s| s.2)
        };
        assert_eq!(get("mone_slo_attainment", None), Some(0.5));
        assert_eq!(get("mone_capacity", None), Some(0.5));
        assert_eq!(
            get("mone_stream_clips_total", Some(("stream", "cam \"1\""))),
            Some(3.0)
        );
        // Buckets are cumulative and end at the count.
        let buckets: Vec<f64> = samples
            .iter()
            .filter(|(n, l, _)| n == "mone_stage_latency_ms_bucket" && l["stage"] == "end_to_end")
            .map(|s| s.2)
            .collect();
        assert!(buckets.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*buckets.last().unwrap(), 6.0);
        // 0.5, 3, 40, 40 and the 1 ms clip are at most 50 ms; 1e6 only in +Inf.
        let le50 = samples.iter().find(|(n, l, _)| {
            n == "mone_stage_latency_ms_bucket" && l["stage"] == "end_to_end" && l["le"] == "50"
        });
        assert_eq!(le50.map(|s| s.2), Some(5.0));
        assert!(parse_prometheus("bad name{} 1").is_err());
        assert!(parse_prometheus("x{a=1} 1").is_err());
        assert!(parse_prometheus("x one").is_err());
    }

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut v, 50.0), Some(50.0));
        assert_eq!(percentile(&mut v, 99.0), Some(99.0));
        assert_eq!(percentile(&mut v, 100.0), Some(100.0));
        assert_eq!(percentile(&mut [], 50.0), None);
    }
}
