//! The live runtime under a latency target with a deliberately slow model (bounded latency and
//! queues, counted drops, capacity that comes down), and the HTTP API (add and remove a stream,
//! Prometheus text). Assertions are on events and counts with wide margins, never on exact
//! timing.

#![cfg(feature = "gst")]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use mone::controller::{ControllerSettings, LatencyProfile};
use mone::events::Event;
use mone::http::ApiAccess;
use mone::metrics::{parse_prometheus, Telemetry};
use mone::model::{self, Config, LoadedModel};
use mone::runtime::{self, Classifier, ControlOptions, Hooks, RuntimeOptions, StreamSpec};

static SERIAL: Mutex<()> = Mutex::new(());

fn tiny() -> LoadedModel {
    let cfg = Config::preset("vivit-fe-tiny").unwrap();
    let m = model::random_model(&cfg, &Device::Cpu).unwrap();
    LoadedModel {
        dir: "tiny".into(),
        labels: (0..cfg.num_classes).map(|i| format!("c{i}")).collect(),
        config: cfg,
        model: m,
    }
}

/// A model that takes `base + per_clip * n * capacity` ms per batch: a device far slower than
/// the streams at full capacity and fast enough at the lowest.
struct Slow {
    inner: LoadedModel,
    base_ms: f64,
    per_clip_ms: f64,
}

impl Slow {
    fn ms(&self, n: usize, c: f64) -> f64 {
        self.base_ms + self.per_clip_ms * n as f64 * c
    }
    fn profile(&self, caps: &[f64], batches: &[usize]) -> LatencyProfile {
        LatencyProfile {
            capacities: caps.to_vec(),
            batches: batches.to_vec(),
            ms: caps
                .iter()
                .map(|c| batches.iter().map(|n| self.ms(*n, *c)).collect())
                .collect(),
            key: "slow".into(),
        }
    }
}

impl Classifier for Slow {
    fn config(&self) -> &Config {
        &self.inner.config
    }
    fn labels(&self) -> &[String] {
        &self.inner.labels
    }
    fn classify(
        &self,
        x: &Tensor,
        capacity: f64,
    ) -> candle_core::Result<(Vec<Vec<f32>>, Vec<f64>)> {
        let t0 = Instant::now();
        let r = self.inner.classify(x, capacity)?;
        let want = Duration::from_secs_f64(self.ms(x.dim(0)?, capacity) / 1e3);
        std::thread::sleep(want.saturating_sub(t0.elapsed()));
        Ok(r)
    }
}

fn live(i: usize) -> StreamSpec {
    let mut s = StreamSpec::from_input(&format!(
        "test:pattern={},fps=25,live=true,width=32,height=32",
        ["ball", "snow", "smpte"][i % 3]
    ));
    s.name = format!("cam{i}");
    s
}

fn settings(adaptive: bool, c: f64) -> ControllerSettings {
    ControllerSettings {
        latency_target_ms: 400.0,
        min_capacity: if adaptive { 0.125 } else { c },
        max_capacity: c,
        adaptive,
        levels: vec![0.125, 0.25, 0.5, 1.0],
        ..ControllerSettings::default()
    }
}

/// Three live streams at 25 clips/s each (75 clips/s) against a model that manages about 50
/// clips/s at full capacity and several hundred at the lowest.
fn run_slow(adaptive: bool, secs: f64) -> (Vec<Event>, runtime::Summary) {
    let slow = Slow {
        inner: tiny(),
        base_ms: 5.0,
        per_clip_ms: 20.0,
    };
    let s = settings(adaptive, 1.0);
    let profile = slow.profile(&[0.125, 0.25, 0.5, 1.0], &[1, 2, 4, 8]);
    let opts = RuntimeOptions {
        batch: 8,
        stride: Some(1),
        queue: 4,
        max_wait: Duration::from_millis(400),
        controller: Some(ControlOptions {
            settings: s,
            profile,
        }),
        stats_interval: Some(Duration::from_secs(1)),
        ..RuntimeOptions::default()
    };
    let stop = Arc::new(AtomicBool::new(false));
    let stopper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs_f64(secs));
            stop.store(true, Ordering::Relaxed);
        })
    };
    let mut events: Vec<Event> = Vec::new();
    let streams: Vec<StreamSpec> = (0..3).map(live).collect();
    let summary = runtime::run(
        &slow,
        "slow",
        &Device::Cpu,
        &streams,
        &opts,
        &mut events,
        Hooks::new(stop),
    )
    .unwrap();
    stopper.join().unwrap();
    (events, summary)
}

fn clip_latencies(events: &[Event]) -> Vec<(f64, f64)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Clip {
                latency_ms,
                capacity,
                ..
            } => Some((latency_ms.end_to_end_ms, *capacity)),
            _ => None,
        })
        .collect()
}

#[test]
fn an_overloaded_live_pipeline_keeps_latency_bounded_and_counts_drops() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // Fixed full capacity: the model cannot keep up. Queues are bounded, so latency stays
    // bounded too (it does not grow with the run's length), and every lost clip is counted.
    let (events, summary) = run_slow(false, 6.0);
    let lat = clip_latencies(&events);
    assert!(lat.len() > 50, "{} clips", lat.len());
    assert!(lat.iter().all(|(_, c)| *c == 1.0));
    // (How many depends on the machine's load: 17 to several dozen were seen in 6 s.)
    assert!(
        summary.dropped_clips > 5,
        "dropped {}",
        summary.dropped_clips
    );
    let late: Vec<f64> = lat.iter().skip(lat.len() / 2).map(|l| l.0).collect();
    let worst = late.iter().cloned().fold(0.0, f64::max);
    // 3 streams x (4 queued + 4 in the channel) clips at 20 ms each, plus a batch: ~0.7 s.
    assert!(worst < 2500.0, "latency kept growing: {worst} ms");
    let ended: u64 = events
        .iter()
        .filter_map(|e| match e {
            Event::StreamEnded { dropped_clips, .. } => Some(*dropped_clips),
            _ => None,
        })
        .sum();
    assert_eq!(ended, summary.dropped_clips);
    let stats: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e, Event::Stats { .. }))
        .collect();
    assert!(stats.len() >= 4, "{} stats events", stats.len());
    for e in &stats {
        if let Event::Stats { total, streams, .. } = e {
            assert!(
                total.queue_depth <= 3 * 8,
                "queue depth {}",
                total.queue_depth
            );
            let sum: u64 = streams.iter().map(|s| s.clips).sum();
            assert!(sum <= total.clips);
        }
    }
    // The last stats event, after the streams ended, still carries each one's final interval.
    let Some(Event::Stats { total, streams, .. }) = stats.last() else {
        unreachable!()
    };
    assert_eq!(streams.len(), 3, "{streams:?}");
    assert_eq!(streams.iter().map(|s| s.clips).sum::<u64>(), total.clips);

    // Adaptive: capacity comes down and nearly every clip makes the 400 ms target.
    let (events, _) = run_slow(true, 6.0);
    let lat = clip_latencies(&events);
    let tail = &lat[lat.len() / 3..];
    let mean_c = tail.iter().map(|l| l.1).sum::<f64>() / tail.len() as f64;
    assert!(mean_c < 0.75, "capacity stayed at {mean_c}");
    let within = tail.iter().filter(|l| l.0 <= 400.0).count();
    assert!(
        within * 100 >= tail.len() * 95,
        "{within} of {} clips within the target",
        tail.len()
    );
    let Some(Event::Stats { total, .. }) = events
        .iter()
        .rev()
        .find(|e| matches!(e, Event::Stats { .. }))
    else {
        panic!("no stats event")
    };
    assert!(total.slo_attainment.is_some());
    assert!(total.latency_ms.is_some());
}

fn http(addr: std::net::SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    http_as(addr, method, path, body, None)
}

fn http_as(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    // A refused body may be answered before it is all sent.
    let _ = write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

#[test]
fn streams_are_added_and_removed_through_the_http_api() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let model = tiny();
    let telemetry = Arc::new(Telemetry::new(None));
    let (tx, rx) = crossbeam_channel::unbounded();
    let files = std::env::temp_dir().join(format!("mone-api-files-{}", std::process::id()));
    std::fs::create_dir_all(&files).unwrap();
    let files = std::fs::canonicalize(&files).unwrap();
    let access = ApiAccess {
        allow_dirs: vec![files.clone()],
        ..ApiAccess::default()
    };
    let server = mone::http::serve("127.0.0.1:0", access, telemetry.clone(), tx).unwrap();
    let addr = server.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let events = Arc::new(Mutex::new(Vec::<Event>::new()));
    let worker = {
        let stop = stop.clone();
        let events = events.clone();
        let telemetry = telemetry.clone();
        std::thread::spawn(move || {
            let mut sink: Vec<Event> = Vec::new();
            let mut hooks = Hooks::new(stop);
            hooks.control = Some(rx);
            hooks.telemetry = Some(telemetry);
            let opts = RuntimeOptions {
                batch: 2,
                max_wait: Duration::from_millis(50),
                ..RuntimeOptions::default()
            };
            // No streams at start: the API adds them.
            let s = runtime::run(&model, "tiny", &Device::Cpu, &[], &opts, &mut sink, hooks);
            events.lock().unwrap().extend(sink);
            s.unwrap()
        })
    };
    assert_eq!(http(addr, "GET", "/healthz", ""), (200, "ok\n".into()));
    assert_eq!(http(addr, "GET", "/streams", "").1, "[]");
    let (code, body) = http(
        addr,
        "POST",
        "/streams",
        r#"{"uri": "test:pattern=ball,fps=25,live=true,width=32,height=32", "id": "door"}"#,
    );
    assert_eq!(code, 201, "{body}");
    let (code, _) = http(
        addr,
        "POST",
        "/streams",
        r#"{"uri": "test:pattern=snow,live=true", "id": "door"}"#,
    );
    assert_eq!(code, 409, "a second stream with the same id");
    // Outside the allowed folder a path is refused without saying whether it exists.
    let (code, body) = http(addr, "POST", "/streams", r#"{"uri": "/no/such/file.mp4"}"#);
    assert_eq!(code, 403, "{body}");
    assert_eq!(
        http(addr, "POST", "/streams", r#"{"uri": "/etc/passwd"}"#),
        (code, body)
    );
    let missing = serde_json::json!({ "uri": files.join("missing.mp4") }).to_string();
    let (code, body) = http(addr, "POST", "/streams", &missing);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("no such file"), "{body}");
    let (code, _) = http(addr, "POST", "/streams", "not json");
    assert!(code == 400 || code == 415 || code == 422, "{code}");
    // It runs: clips are classified, and it is listed with its state.
    let t0 = Instant::now();
    loop {
        let list: serde_json::Value =
            serde_json::from_str(&http(addr, "GET", "/streams", "").1).unwrap();
        let running =
            list.as_array().unwrap().iter().any(|s| {
                s["id"] == "door" && s["state"] == "running" && s["clips"].as_u64() > Some(0)
            });
        if running {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "never ran: {list}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, metrics) = http(addr, "GET", "/metrics", "");
    assert_eq!(code, 200);
    let samples = parse_prometheus(&metrics).unwrap_or_else(|e| panic!("{e}\n{metrics}"));
    assert!(samples
        .iter()
        .any(|(n, l, v)| n == "mone_stream_clips_total" && l["stream"] == "door" && *v > 0.0));
    assert!(samples
        .iter()
        .any(|(n, l, v)| n == "mone_stage_latency_ms_count"
            && l["stage"] == "end_to_end"
            && *v > 0.0));
    assert_eq!(http(addr, "DELETE", "/streams/nope", "").0, 404);
    let (code, body) = http(addr, "DELETE", "/streams/door", "");
    assert_eq!(code, 202, "{body}");
    assert!(body.contains(r#""state":"stopping""#), "{body}");
    // Removal releases it: gone from the list, the run keeps going with no streams.
    let t0 = Instant::now();
    while http(addr, "GET", "/streams", "").1 != "[]" {
        assert!(t0.elapsed() < Duration::from_secs(15), "not removed");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!worker.is_finished());
    stop.store(true, Ordering::Relaxed);
    let summary = worker.join().unwrap();
    drop(server);
    std::fs::remove_dir_all(&files).ok();
    assert_eq!(summary.inputs, 1);
    assert!(summary.failed.is_empty(), "{:?}", summary.failed);
    let ev = events.lock().unwrap();
    let kinds: Vec<&str> = ev
        .iter()
        .filter_map(|e| match e {
            Event::StreamStarted { .. } => Some("started"),
            Event::StreamEnded { .. } => Some("ended"),
            _ => None,
        })
        .collect();
    assert_eq!(kinds, ["started", "ended"]);
    let Some(Event::StreamEnded { clips, .. }) =
        ev.iter().find(|e| matches!(e, Event::StreamEnded { .. }))
    else {
        unreachable!()
    };
    let clip_events = ev
        .iter()
        .filter(|e| matches!(e, Event::Clip { .. }))
        .count() as u64;
    assert_eq!(
        *clips, clip_events,
        "every queued clip was classified before the end"
    );
}

#[test]
fn delete_answers_stopping_until_the_stream_is_gone() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // 400 ms a batch of 2 and a queue of 8 kept full (6 after a batch): draining takes three
    // batches, and the worker answers between batches, so each request below sees it stopping.
    let model = Slow {
        inner: tiny(),
        base_ms: 400.0,
        per_clip_ms: 0.0,
    };
    let telemetry = Arc::new(Telemetry::new(None));
    let (tx, rx) = crossbeam_channel::unbounded();
    let server =
        mone::http::serve("127.0.0.1:0", ApiAccess::default(), telemetry.clone(), tx).unwrap();
    let addr = server.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let stop = stop.clone();
        let telemetry = telemetry.clone();
        std::thread::spawn(move || {
            let mut sink: Vec<Event> = Vec::new();
            let mut hooks = Hooks::new(stop);
            hooks.control = Some(rx);
            hooks.telemetry = Some(telemetry);
            let opts = RuntimeOptions {
                batch: 2,
                queue: 8,
                max_wait: Duration::from_millis(10),
                ..RuntimeOptions::default()
            };
            runtime::run(&model, "slow", &Device::Cpu, &[], &opts, &mut sink, hooks).unwrap();
            sink
        })
    };
    let add = r#"{"uri": "test:pattern=ball,fps=400,live=true,width=32,height=32", "id": "yard"}"#;
    assert_eq!(http(addr, "POST", "/streams", add).0, 201);
    let state = || -> Option<String> {
        let list: serde_json::Value =
            serde_json::from_str(&http(addr, "GET", "/streams", "").1).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == "yard")
            .map(|s| s["state"].as_str().unwrap().to_string())
    };
    let queued = || -> u64 {
        let list: serde_json::Value =
            serde_json::from_str(&http(addr, "GET", "/streams", "").1).unwrap();
        list[0]["queue_depth"].as_u64().unwrap_or(0)
    };
    let t0 = Instant::now();
    while !(state().as_deref() == Some("running") && queued() >= 6) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "never filled its queue: {}",
            http(addr, "GET", "/streams", "").1
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, body) = http(addr, "DELETE", "/streams/yard", "");
    assert_eq!(code, 202, "{body}");
    assert!(body.contains(r#""state":"stopping""#), "{body}");
    assert_eq!(state().as_deref(), Some("stopping"));
    // Idempotent while stopping, and the id is not free yet.
    assert_eq!(http(addr, "DELETE", "/streams/yard", "").0, 202);
    let (code, body) = http(addr, "POST", "/streams", add);
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("still stopping"), "{body}");
    let t0 = Instant::now();
    while state().is_some() {
        assert!(t0.elapsed() < Duration::from_secs(30), "never went");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(http(addr, "DELETE", "/streams/yard", "").0, 404);
    assert_eq!(http(addr, "POST", "/streams", add).0, 201);
    stop.store(true, Ordering::Relaxed);
    let events = worker.join().unwrap();
    drop(server);
    let ended = events
        .iter()
        .filter(|e| matches!(e, Event::StreamEnded { .. }))
        .count();
    assert_eq!(ended, 2, "one stream_ended per stream");
}

#[test]
fn the_api_wants_its_token_and_takes_only_allowed_inputs() {
    let telemetry = Arc::new(Telemetry::new(None));
    let (tx, _rx) = crossbeam_channel::unbounded();
    // Without a token the API may not listen beyond loopback.
    assert!(mone::http::serve(
        "0.0.0.0:0",
        ApiAccess::default(),
        telemetry.clone(),
        tx.clone()
    )
    .is_err());
    let token = "correct horse battery staple";
    let access = ApiAccess {
        token: Some(token.into()),
        ..ApiAccess::default()
    };
    let server =
        mone::http::serve("127.0.0.1:0", access.clone(), telemetry.clone(), tx.clone()).unwrap();
    let addr = server.addr;
    assert_eq!(http(addr, "GET", "/healthz", "").0, 200);
    for path in ["/streams", "/metrics"] {
        assert_eq!(http(addr, "GET", path, "").0, 401, "{path}");
        assert_eq!(
            http_as(addr, "GET", path, "", Some("wrong")).0,
            401,
            "{path}"
        );
        assert_eq!(
            http_as(addr, "GET", path, "", Some(&token[..10])).0,
            401,
            "{path}"
        );
        assert_eq!(http_as(addr, "GET", path, "", Some(token)).0, 200, "{path}");
    }
    assert_eq!(http(addr, "DELETE", "/streams/x", "").0, 401);
    assert_eq!(
        http(addr, "POST", "/streams", r#"{"uri": "test:pattern=ball"}"#).0,
        401
    );
    let post = |uri: &str| {
        http_as(
            addr,
            "POST",
            "/streams",
            &serde_json::json!({ "uri": uri }).to_string(),
            Some(token),
        )
    };
    // Schemes outside the allow-list, and files (no folder is allowed).
    for uri in ["udp://0.0.0.0:5000", "fd://0", "v4l2:///dev/video0"] {
        let (code, body) = post(uri);
        assert_eq!(code, 403, "{uri}: {body}");
        assert!(body.contains("allow_schemes"), "{body}");
    }
    let passwd = post("file:///etc/passwd");
    assert_eq!(passwd.0, 403);
    assert_eq!(post("file:///etc/no-such-file"), passwd);
    assert_eq!(post("/etc/passwd"), passwd);
    // An oversized body.
    let big = format!(
        r#"{{"uri": "test:pattern=ball", "id": "{}"}}"#,
        "x".repeat(70_000)
    );
    assert_eq!(http_as(addr, "POST", "/streams", &big, Some(token)).0, 413);
    drop(server);
    // Metrics left open for scrapers; the rest still wants the token.
    let open = ApiAccess {
        open_metrics: true,
        ..access
    };
    let server = mone::http::serve("0.0.0.0:0", open, telemetry, tx).unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], server.addr.port()));
    assert_eq!(http(addr, "GET", "/metrics", "").0, 200);
    assert_eq!(http(addr, "GET", "/streams", "").0, 401);
}
