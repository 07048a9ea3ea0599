//! The pipeline with real GStreamer: encoded files of three containers, bad inputs, the stream
//! path against the offline path, RTSP reconnects, a dying stream next to a live one, and a
//! SIGTERM drain. Real-time tests assert on events, never on timing.

#![cfg(feature = "gst")]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor, D};
use mone::clip::{clips_of, ClipAssembler, ClipSpec, Tail};
use mone::events::{CaptureSource, Event, JsonLinesSink};
use mone::model::{self, Config, ForwardOptions};
use mone::runtime::{self, RuntimeOptions, StreamSpec, Summary};
use mone::source;

/// The real-time tests share two cores with candle: run them one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mone-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn model_dir(dir: &Path, preset: &str) -> PathBuf {
    let cfg = Config::preset(preset).unwrap();
    let m = model::random_model(&cfg, &Device::Cpu).unwrap();
    let labels: Vec<String> = (0..cfg.num_classes).map(|i| format!("c{i}")).collect();
    let out = dir.join(preset);
    model::save_model_dir(&out, &cfg, &labels, &m.named_tensors()).unwrap();
    out
}

fn read_events(path: &Path) -> Vec<Event> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<Event>(l).unwrap_or_else(|e| panic!("bad event {l}: {e}")))
        .collect()
}

fn run_files(model: &Path, inputs: &[String], opts: &RuntimeOptions, out: &Path) -> Summary {
    let loaded = model::load_model_dir(model, &Device::Cpu).unwrap();
    let streams: Vec<StreamSpec> = inputs.iter().map(|i| StreamSpec::from_input(i)).collect();
    let mut sink = JsonLinesSink::file(out).unwrap();
    runtime::run(
        &loaded,
        "tiny",
        &Device::Cpu,
        &streams,
        opts,
        &mut sink,
        runtime::Hooks::new(Arc::new(AtomicBool::new(false))),
    )
    .unwrap()
}

/// Decode a file to `size` x `size` RGB frames through the project's source.
fn decode_each(path: &Path, size: u32, on_frame: impl FnMut(mone::clip::Frame)) {
    source::decode_file(path, size, usize::MAX)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .for_each(on_frame);
}

fn clips_of_stream<'a>(events: &'a [Event], stream: &str) -> Vec<&'a Event> {
    events
        .iter()
        .filter(|e| matches!(e, Event::Clip { stream: s, .. } if s == stream))
        .collect()
}

#[test]
fn classifies_three_containers_and_reports_bad_inputs_without_losing_the_rest() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tmpdir("files");
    let model = model_dir(&dir, "vivit-fe-tiny");
    let mut inputs = Vec::new();
    for fmt in ["mp4", "webm", "avi"] {
        let p = dir.join(format!("ball.{fmt}"));
        source::write_test_video(&p, "ball", 40, 25, 160, 120, fmt).unwrap();
        inputs.push(p.display().to_string());
    }
    // A truncated MP4 (its index is at the end), a text file and a missing file.
    let full = std::fs::read(&inputs[0]).unwrap();
    std::fs::write(dir.join("truncated.mp4"), &full[..full.len() / 3]).unwrap();
    std::fs::write(dir.join("notes.mp4"), "this is not a video\n".repeat(100)).unwrap();
    for bad in ["truncated.mp4", "notes.mp4", "missing.mp4"] {
        inputs.push(dir.join(bad).display().to_string());
    }
    let out = dir.join("events.jsonl");
    let opts = RuntimeOptions {
        batch: 3,
        ..RuntimeOptions::default()
    };
    let summary = run_files(&model, &inputs, &opts, &out);
    let events = read_events(&out);

    for good in &inputs[..3] {
        let clips = clips_of_stream(&events, good);
        assert_eq!(clips.len(), 5, "{good}: 40 frames make 5 clips of 8");
        let mut last_end = 0;
        for (k, e) in clips.iter().enumerate() {
            let Event::Clip {
                clip_index,
                frames,
                pts_start_ns,
                pts_end_ns,
                labels,
                event_id,
                capacity,
                ..
            } = e
            else {
                unreachable!()
            };
            assert_eq!(*clip_index, k as u64);
            assert_eq!(event_id, &format!("{good}#{k}"));
            assert_eq!(*frames, [8 * k as u64, 8 * k as u64 + 7]);
            assert!(
                *pts_start_ns >= last_end && pts_end_ns > pts_start_ns,
                "{good}: pts go forward"
            );
            last_end = *pts_end_ns;
            assert_eq!(labels.len(), 5);
            assert!(labels.windows(2).all(|w| w[0].score >= w[1].score));
            assert_eq!(*capacity, 1.0);
        }
        // 40 frames at 25 fps: the last clip ends at 1.6 s.
        assert!(
            (last_end as i64 - 1_600_000_000).abs() < 50_000_000,
            "{good}: last pts end {last_end}"
        );
        let pos = |f: &dyn Fn(&Event) -> bool| events.iter().position(f).unwrap();
        let started = pos(&|e| matches!(e, Event::StreamStarted { stream, .. } if stream == good));
        let first_clip = pos(&|e| matches!(e, Event::Clip { stream, .. } if stream == good));
        let video = pos(&|e| matches!(e, Event::Video { stream, clips: 5, .. } if stream == good));
        let ended = pos(
            &|e| matches!(e, Event::StreamEnded { stream, clips: 5, frames: 40, .. } if stream == good),
        );
        assert!(started < first_clip && first_clip < video && video < ended);
    }
    for bad in &inputs[3..] {
        assert!(
            clips_of_stream(&events, bad).is_empty(),
            "{bad} produced clips"
        );
        let reason = events
            .iter()
            .find_map(|e| match e {
                Event::StreamError { stream, reason, .. } if stream == bad => Some(reason.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no stream_error for {bad}"));
        assert!(!reason.is_empty());
        let last = events
            .iter()
            .rev()
            .find(|e| match e {
                Event::StreamStarted { stream, .. }
                | Event::StreamError { stream, .. }
                | Event::StreamEnded { stream, .. } => stream == bad,
                _ => false,
            })
            .unwrap();
        assert!(
            matches!(last, Event::StreamEnded { clips: 0, .. }),
            "{bad}: {last:?}"
        );
    }
    assert_eq!(summary.failed.len(), 3);
    assert_eq!(summary.clips, 15);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_vmoe_model_runs_through_the_pipeline_and_its_events_name_the_experts() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tmpdir("vmoe");
    let model = model_dir(&dir, "vmoe-fe-tiny");
    let mut inputs = Vec::new();
    for pattern in ["ball", "smpte"] {
        let p = dir.join(format!("{pattern}.mp4"));
        source::write_test_video(&p, pattern, 24, 25, 64, 48, "mp4").unwrap();
        inputs.push(p.display().to_string());
    }
    let out = dir.join("events.jsonl");
    let opts = RuntimeOptions {
        batch: 4,
        // Ignored by a V-MoE, which has no capacity to turn.
        capacity: 0.5,
        ..RuntimeOptions::default()
    };
    let summary = run_files(&model, &inputs, &opts, &out);
    assert_eq!(summary.clips, 6);
    let text = std::fs::read_to_string(&out).unwrap();
    let events = read_events(&out);
    let mut clips = 0;
    for e in &events {
        if let Event::Clip {
            experts, capacity, ..
        } = e
        {
            clips += 1;
            assert_eq!(*capacity, 1.0);
            assert_eq!(experts.len(), 1, "top-1 routing: one expert per clip");
            assert!(experts[0].expert < 3);
            assert!(experts[0].weight > 0.0 && experts[0].weight <= 1.0);
        }
    }
    assert_eq!(clips, 6);
    assert_eq!(
        text.matches("\"experts\":[{\"expert\":").count(),
        6,
        "{text}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_clip_from_the_stream_equals_the_same_clip_assembled_offline() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tmpdir("offline");
    let model = model_dir(&dir, "vivit-fe-tiny");
    let video = dir.join("ball.mp4");
    source::write_test_video(&video, "ball", 30, 25, 160, 120, "mp4").unwrap();
    let cfg = Config::preset("vivit-fe-tiny").unwrap();
    let spec = ClipSpec {
        frames: cfg.frames,
        stride: 5,
        step: 1,
        tail: Tail::Pad,
    };

    // Streamed: clips come out while frames are pulled.
    let (mut frames, mut streamed) = (Vec::new(), Vec::new());
    let mut asm = ClipAssembler::new(spec);
    decode_each(&video, 32, |f| {
        frames.push(f.clone());
        streamed.extend(asm.push(f));
    });
    streamed.extend(asm.finish());
    assert_eq!(frames.len(), 30);
    assert!(frames.iter().all(|f| f.rgb.len() == 32 * 32 * 3));
    let offline = clips_of(frames, spec);
    assert_eq!(streamed, offline);
    assert_eq!(offline.len(), 6); // starts 0, 5, 10, 15, 20, and the padded tail from 25

    // The runtime's events carry the model's output for exactly these clips.
    let loaded = model::load_model_dir(&model, &Device::Cpu).unwrap();
    let out = dir.join("events.jsonl");
    let opts = RuntimeOptions {
        stride: Some(5),
        topk: cfg.num_classes,
        batch: 2,
        ..RuntimeOptions::default()
    };
    run_files(&model, &[video.display().to_string()], &opts, &out);
    let events = read_events(&out);
    let clips = clips_of_stream(&events, &video.display().to_string());
    assert_eq!(clips.len(), offline.len());
    for (c, e) in offline.iter().zip(clips) {
        let x = mone::tokenizer::clip_to_chw(c, cfg.mean, cfg.std);
        let t = Tensor::from_vec(x, (1, 3, cfg.frames, 32, 32), &Device::Cpu).unwrap();
        let logits = loaded
            .model
            .forward(&t, &[1.0], &ForwardOptions::default())
            .unwrap()
            .logits;
        let probs = candle_nn::ops::softmax(&logits, D::Minus1)
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let Event::Clip { labels, .. } = e else {
            unreachable!()
        };
        for l in labels {
            let k: usize = l.label[1..].parse().unwrap();
            assert!(
                (probs[k] - l.score).abs() < 1e-5,
                "clip {}: {} vs {}",
                c.index,
                probs[k],
                l.score
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

mod common;
use common::rtsp;

fn wait_for(
    out: &Path,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&[Event]) -> bool,
) -> Vec<Event> {
    let end = Instant::now() + timeout;
    loop {
        let ev = read_events(out);
        if pred(&ev) {
            return ev;
        }
        assert!(
            Instant::now() < end,
            "timed out waiting for {what}; events: {ev:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn spawn_live(
    model: PathBuf,
    streams: Vec<StreamSpec>,
    opts: RuntimeOptions,
    out: PathBuf,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Summary> {
    std::thread::spawn(move || {
        let loaded = model::load_model_dir(&model, &Device::Cpu).unwrap();
        let mut sink = JsonLinesSink::file(&out).unwrap();
        runtime::run(
            &loaded,
            "tiny",
            &Device::Cpu,
            &streams,
            &opts,
            &mut sink,
            runtime::Hooks::new(stop),
        )
        .unwrap()
    })
}

fn live_opts() -> RuntimeOptions {
    RuntimeOptions {
        watchdog: Duration::from_secs(2),
        backoff_initial: Duration::from_millis(200),
        backoff_max: Duration::from_millis(800),
        max_wait: Duration::from_millis(50),
        batch: 2,
        ..RuntimeOptions::default()
    }
}

#[test]
fn rtsp_capture_time_is_the_senders_clock_from_its_sender_reports() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tmpdir("rtcp");
    let model = model_dir(&dir, "vivit-fe-tiny");
    // The sender's clock is a day and an hour behind ours.
    let offset_s = -90_000;
    let server = rtsp::Server::start_with_clock_offset(0, offset_s);
    let out = dir.join("events.jsonl");
    let stop = Arc::new(AtomicBool::new(false));
    let h = spawn_live(
        model,
        vec![StreamSpec::from_input(&server.url())],
        live_opts(),
        out.clone(),
        stop.clone(),
    );
    let rtcp = |e: &Event| {
        matches!(
            e,
            Event::Clip {
                capture_time_source: Some(CaptureSource::Rtcp),
                ..
            }
        )
    };
    let ev = wait_for(&out, "clips timed by RTCP", Duration::from_secs(40), |ev| {
        ev.iter().filter(|e| rtcp(e)).count() >= 2
    });
    stop.store(true, Ordering::Relaxed);
    h.join().unwrap();
    drop(server);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let mut last: Option<(f64, f64)> = None;
    for e in ev.iter().filter(|e| rtcp(e)) {
        let Event::Clip {
            capture_time: Some(t),
            pts_start_ns,
            ..
        } = e
        else {
            panic!("an rtcp clip without a capture time: {e:?}");
        };
        let t = humantime::parse_rfc3339(t)
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        // Within the run's length of now plus the sender's offset.
        let behind = now + offset_s as f64 - t;
        assert!(
            (0.0..40.0).contains(&behind),
            "capture {t} is {behind} s before the sender's now"
        );
        // Capture time moves with the PTS.
        if let Some((t0, p0)) = last {
            let dt = t - t0;
            let dp = (*pts_start_ns as f64 - p0) / 1e9;
            assert!((dt - dp).abs() < 0.1, "capture moved {dt} s, PTS {dp} s");
        }
        last = Some((t, *pts_start_ns as f64));
    }
}

#[test]
fn rtsp_client_goes_offline_and_reconnects_when_the_server_restarts() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tmpdir("rtsp");
    let model = model_dir(&dir, "vivit-fe-tiny");
    let server = rtsp::Server::start(0);
    let port = server.port;
    let url = server.url();
    let out = dir.join("events.jsonl");
    let stop = Arc::new(AtomicBool::new(false));
    let h = spawn_live(
        model,
        vec![StreamSpec::from_input(&url)],
        live_opts(),
        out.clone(),
        stop.clone(),
    );
    let n_clips = |ev: &[Event]| {
        ev.iter()
            .filter(|e| matches!(e, Event::Clip { .. }))
            .count()
    };
    wait_for(&out, "first clips", Duration::from_secs(30), |ev| {
        n_clips(ev) >= 2
    });
    drop(server);
    wait_for(&out, "offline", Duration::from_secs(30), |ev| {
        ev.iter().any(|e| matches!(e, Event::Offline { .. }))
    });
    let before = n_clips(&read_events(&out));
    let server = rtsp::Server::start(port);
    wait_for(
        &out,
        "reconnected and new clips",
        Duration::from_secs(40),
        |ev| ev.iter().any(|e| matches!(e, Event::Reconnected { .. })) && n_clips(ev) >= before + 2,
    );
    stop.store(true, Ordering::Relaxed);
    let summary = h.join().unwrap();
    drop(server);
    let ev = read_events(&out);
    assert!(summary.failed.is_empty(), "{:?}", summary.failed);
    // One timeline: clip indices consecutive, PTS strictly increasing across the reconnect.
    let clips: Vec<(u64, u64, u64)> = ev
        .iter()
        .filter_map(|e| match e {
            Event::Clip {
                clip_index,
                pts_start_ns,
                pts_end_ns,
                ..
            } => Some((*clip_index, *pts_start_ns, *pts_end_ns)),
            _ => None,
        })
        .collect();
    for w in clips.windows(2) {
        assert_eq!(w[1].0, w[0].0 + 1);
        // Live RTP durations jitter by microseconds, so a clip may end a hair after the next
        // one starts; the timeline itself must only move forward.
        assert!(w[1].1 > w[0].1 && w[1].2 > w[0].2, "pts went back: {w:?}");
    }
    let order: Vec<&str> = ev
        .iter()
        .filter_map(|e| match e {
            Event::StreamStarted { .. } => Some("started"),
            Event::Offline { .. } => Some("offline"),
            Event::Reconnected { .. } => Some("reconnected"),
            Event::StreamEnded { .. } => Some("ended"),
            _ => None,
        })
        .collect();
    assert_eq!(
        order,
        vec!["started", "offline", "reconnected", "ended"],
        "{ev:#?}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_dead_camera_does_not_stop_a_live_stream() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tmpdir("dead");
    let model = model_dir(&dir, "vivit-fe-tiny");
    // Nothing listens on this port: connecting fails at once.
    let dead_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dead = format!("rtsp://user:secret@127.0.0.1:{dead_port}/cam");
    let streams = vec![
        StreamSpec::from_input(&dead),
        StreamSpec::from_input("test:pattern=ball,fps=25,live=true"),
    ];
    let out = dir.join("events.jsonl");
    let stop = Arc::new(AtomicBool::new(false));
    let opts = RuntimeOptions {
        max_reconnects: Some(2),
        ..live_opts()
    };
    let h = spawn_live(model, streams, opts, out.clone(), stop.clone());
    let is_err =
        |e: &Event| matches!(e, Event::StreamError { stream, .. } if stream.contains("127.0.0.1"));
    let ev = wait_for(
        &out,
        "the dead camera's error",
        Duration::from_secs(30),
        |ev| ev.iter().any(is_err),
    );
    let err_at = ev.iter().position(is_err).unwrap();
    let live_clips = |ev: &[Event]| {
        ev.iter()
            .filter(|e| matches!(e, Event::Clip { stream, .. } if stream.starts_with("test:")))
            .count()
    };
    let clips_then = live_clips(&ev[..err_at]);
    wait_for(
        &out,
        "live clips after the error",
        Duration::from_secs(30),
        |ev| live_clips(ev) >= clips_then + 3,
    );
    stop.store(true, Ordering::Relaxed);
    let summary = h.join().unwrap();
    let ev = read_events(&out);
    // Credentials never reach an event.
    assert!(ev
        .iter()
        .all(|e| !serde_json::to_string(e).unwrap().contains("secret")));
    assert!(ev
        .iter()
        .any(|e| matches!(e, Event::Offline { stream, .. } if stream.contains("***@127.0.0.1"))));
    assert_eq!(summary.failed.len(), 1);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_live_stream_faster_than_the_model_drops_its_oldest_clips_and_counts_them() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tmpdir("drops");
    let model = model_dir(&dir, "vivit-fe-s16");
    let out = dir.join("events.jsonl");
    let stop = Arc::new(AtomicBool::new(false));
    // 6000 frames/s of 16-frame clips is 375 clips/s: far more than a 2-core CPU classifies
    // at batch 1 (a 2-core Zen 5 ran this model at about 100 clips/s, enough to keep up with
    // the 1500 frames/s this test once used).
    let streams = vec![StreamSpec::from_input(
        "test:pattern=ball,fps=6000,live=true,width=64,height=48",
    )];
    let opts = RuntimeOptions {
        batch: 1,
        queue: 1,
        ..live_opts()
    };
    let h = spawn_live(model, streams, opts, out.clone(), stop.clone());
    wait_for(&out, "clips", Duration::from_secs(60), |ev| {
        ev.iter()
            .filter(|e| matches!(e, Event::Clip { .. }))
            .count()
            >= 10
    });
    stop.store(true, Ordering::Relaxed);
    let summary = h.join().unwrap();
    let ev = read_events(&out);
    let idx: Vec<u64> = ev
        .iter()
        .filter_map(|e| match e {
            Event::Clip { clip_index, .. } => Some(*clip_index),
            _ => None,
        })
        .collect();
    let Some(Event::StreamEnded {
        dropped_clips,
        clips,
        ..
    }) = ev.last()
    else {
        panic!("no stream_ended last")
    };
    assert!(
        *dropped_clips > 0,
        "the model kept up with 6000 fps? {ev:#?}"
    );
    assert_eq!(*clips as usize, idx.len());
    assert!(
        idx.windows(2).all(|w| w[1] > w[0]),
        "oldest dropped first: the survivors stay in order"
    );
    // Every assembled clip was either classified or counted as dropped.
    assert_eq!(idx.last().unwrap() + 1, clips + dropped_clips);
    assert_eq!(summary.dropped_clips, *dropped_clips);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn sigterm_drains_every_queued_clip_and_exits_zero() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tmpdir("sigterm");
    let model = model_dir(&dir, "vivit-fe-s16");
    let video = dir.join("long.mp4");
    source::write_test_video(&video, "ball", 600, 25, 320, 240, "mp4").unwrap();
    let out = dir.join("events.jsonl");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mone"))
        .args([
            "classify",
            &video.display().to_string(),
            "--model",
            &model.display().to_string(),
            "--batch",
            "1",
            "--out",
            &out.display().to_string(),
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&out, "a first clip", Duration::from_secs(60), |ev| {
        ev.iter().any(|e| matches!(e, Event::Clip { .. }))
    });
    let rc = unsafe { libc_kill(child.id() as i32, 15) };
    assert_eq!(rc, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    let ev = read_events(&out);
    let clips: Vec<u64> = ev
        .iter()
        .filter_map(|e| match e {
            Event::Clip { clip_index, .. } => Some(*clip_index),
            _ => None,
        })
        .collect();
    let Some(Event::StreamEnded {
        frames, clips: n, ..
    }) = ev.last()
    else {
        panic!("last event is not stream_ended: {ev:#?}")
    };
    // Every frame the source delivered is in a classified clip (the tail padded), none lost.
    assert_eq!(clips, (0..*n).collect::<Vec<_>>());
    assert_eq!(*n, frames.div_ceil(16));
    assert!(
        *frames < 600,
        "the stop came too late to test anything ({frames} frames)"
    );
    // A summary of the clips so far would pass for the whole file's.
    assert!(
        !ev.iter().any(|e| matches!(e, Event::Video { .. })),
        "a file stopped part-way has no video event: {ev:#?}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn a_stalled_http_file_fails_with_stream_error_instead_of_hanging() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tmpdir("stall");
    let model = model_dir(&dir, "vivit-fe-tiny");
    // An HTTP server on loopback that sends headers and a few bytes, then goes silent while
    // holding the connection open.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let mut held = Vec::new();
        listener.set_nonblocking(true).unwrap();
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end && held.len() < 4 {
            if let Ok((mut s, _)) = listener.accept() {
                s.set_nonblocking(false).unwrap();
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: video/mp4\r\nContent-Length: 10000000\r\n\r\n\x00\x00\x00\x20ftypisom");
                held.push(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let url = format!("http://127.0.0.1:{port}/video.mp4");
    let out = dir.join("events.jsonl");
    let opts = RuntimeOptions {
        stall_timeout: Duration::from_secs(2),
        eos_timeout: Duration::from_millis(500),
        // One retry (a stall is transient), then the stream fails.
        max_reconnects: Some(1),
        backoff_initial: Duration::from_millis(100),
        ..RuntimeOptions::default()
    };
    let t0 = Instant::now();
    let summary = run_files(&model, std::slice::from_ref(&url), &opts, &out);
    assert!(
        t0.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t0.elapsed()
    );
    assert_eq!(summary.failed.len(), 1);
    let ev = read_events(&out);
    assert!(
        ev.iter().any(
            |e| matches!(e, Event::StreamError { stream, error_class, .. }
            if stream == &url && *error_class == mone::failure::ErrorClass::Timeout)
        ),
        "{ev:#?}"
    );
    assert!(matches!(
        ev.last(),
        Some(Event::StreamEnded { clips: 0, .. })
    ));
    drop(server);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn rendered_dataset_clips_decode_back_to_their_frames() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tmpdir("dataset");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_mone"))
        .args([
            "dataset",
            "render",
            "--out",
            &dir.display().to_string(),
            "--count",
            "3",
            "--seed",
            "4",
            "--frames",
            "8",
            "--size",
            "64",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let csv = std::fs::read_to_string(dir.join("labels.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows[0], "path,label");
    assert_eq!(rows.len(), 4);
    for (i, row) in rows[1..].iter().enumerate() {
        let (name, label) = row.split_once(',').unwrap();
        let plan = mone::dataset::plan(4, i as u64, 8);
        assert_eq!(label, mone::dataset::CLASSES[plan.label]);
        let want = mone::dataset::render(&plan, 64);
        let mut got = Vec::new();
        decode_each(&dir.join(name), 64, |f| got.push(f));
        assert_eq!(got.len(), 8, "{name}");
        // H.264 is lossy: compare on average.
        for (g, w) in got.iter().zip(&want) {
            let mad: f64 = g
                .rgb
                .iter()
                .zip(w)
                .map(|(a, b)| (*a as f64 - *b as f64).abs())
                .sum::<f64>()
                / w.len() as f64;
            assert!(mad < 12.0, "{name}: mean abs diff {mad}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn segments_of_a_long_video_fall_within_one_clip_of_the_truth() {
    use mone::dataset::{plan, render, CLASSES};
    let dir = tmpdir("segments");
    // 12 clips of approaching, 12 of moving_left, then 6 of static: held-out plans (seed 1),
    // 16 frames each at 12 fps, so clip windows (stride = clip length) meet plan boundaries.
    let (frames, fps, size) = (16usize, 12u32, 64usize);
    let parts = [(4usize, 12u64), (0, 12), (11, 6)];
    let mut video: Vec<Vec<u8>> = Vec::new();
    let mut k = 0u64;
    for (label, n) in parts {
        for _ in 0..n {
            video.extend(render(
                &plan(1, label as u64 + 12 * (100 + k), frames),
                size,
            ));
            k += 1;
        }
    }
    let path = dir.join("long.mp4");
    mone::source::write_rgb_video(&path, &video, size as u32, size as u32, fps, "mp4").unwrap();
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/mone-vivit-tiny-motion");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mone"))
        .arg("classify")
        .arg(&path)
        .args(["--segments", "--model"])
        .arg(&model)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<Event> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ended: Vec<&mone::segments::Segment> = events
        .iter()
        .filter_map(|e| match e {
            Event::SegmentEnded { segment, .. } => Some(segment),
            _ => None,
        })
        .collect();
    let clip_s = frames as f64 / fps as f64;
    let secs = |ns: u64| ns as f64 / 1e9;
    for (label, from, to) in [("approaching", 0.0, 12.0), ("moving_left", 12.0, 24.0)] {
        let (from, to) = (from * clip_s, to * clip_s);
        let s = ended
            .iter()
            .find(|s| s.label == label)
            .unwrap_or_else(|| panic!("no {label} segment: {ended:#?}"));
        assert!(
            (secs(s.start_pts_ns) - from).abs() <= clip_s + 1e-6
                && (secs(s.end_pts_ns) - to).abs() <= clip_s + 1e-6,
            "{label}: {:.2}-{:.2} s against {from:.2}-{to:.2}: {ended:#?}",
            secs(s.start_pts_ns),
            secs(s.end_pts_ns)
        );
    }
    // Nothing else lasted long enough to be reported, and the video event lists the same.
    assert_eq!(ended.len(), 2, "{ended:#?}");
    let Some(Event::Video { segments, .. }) =
        events.iter().find(|e| matches!(e, Event::Video { .. }))
    else {
        panic!("no video event")
    };
    assert_eq!(segments.len(), 2);
    assert_eq!(CLASSES[4], "approaching");
    // The MP4's creation time (mp4mux writes it) plus each clip's PTS is its capture time.
    let captures: Vec<(u64, String)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Clip {
                pts_start_ns,
                capture_time: Some(t),
                capture_time_source: Some(mone::events::CaptureSource::Container),
                ..
            } => Some((*pts_start_ns, t.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(captures.len(), 30, "{stdout}");
    let parse = |t: &str| humantime::parse_rfc3339(t).unwrap();
    let first = parse(&captures[0].1);
    let age = std::time::SystemTime::now().duration_since(first).unwrap();
    assert!(age < Duration::from_secs(600), "{age:?}");
    let (pts, t) = &captures[29];
    let step = parse(t).duration_since(first).unwrap();
    assert!(
        (step.as_secs_f64() - *pts as f64 / 1e9).abs() < 0.002,
        "{step:?} vs {pts}"
    );
    assert!(events.iter().any(|e| matches!(
        e,
        Event::SegmentEnded {
            start_capture_time: Some(_),
            ..
        }
    )));
    std::fs::remove_dir_all(&dir).ok();
}
