//! Inputs that once crashed the process or leaked what they carried: a source element whose
//! properties have other types than rtspsrc's (srtsrc), and credentials in a URI that
//! GStreamer quotes in its error text.
//! Needs GStreamer (the default feature `gst`).
#![cfg(feature = "gst")]

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn dead_port() -> u16 {
    // Bound then released: nothing listens there afterwards.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn model() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/mone-vivit-tiny-motion")
}

#[test]
fn an_srt_source_keeps_running_instead_of_aborting_the_process() {
    let uri = format!("srt://user:secret@127.0.0.1:{}", dead_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_mone"))
        .args(["classify", &uri, "--model"])
        .arg(model())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // srtsrc takes `latency` as a gint, rtspsrc as a guint: setting the wrong type aborted the
    // whole process (exit 134) within a second.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(4) {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("exited early with {status}: {err}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Still running (a live input waits for its peer and is retried); SIGTERM drains it.
    // SAFETY: signalling our own child.
    unsafe {
        libc_kill(child.id() as i32, 15);
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {stdout}\n{stderr}", out.status);
    assert!(stdout.contains("\"stream_ended\""), "{stdout}\n{stderr}");
    assert!(
        !stdout.contains("secret") && !stderr.contains("secret"),
        "{stdout}\n{stderr}"
    );
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn credentials_in_a_failing_uri_never_reach_events_or_the_summary() {
    let uri = format!("rtmp://user:secret@127.0.0.1:{}/live", dead_port());
    let out = Command::new(env!("CARGO_BIN_EXE_mone"))
        .args(["classify", &uri, "--model"])
        .arg(model())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("stream_error"), "{stdout}");
    for text in [&stdout, &stderr] {
        assert!(!text.contains("secret"), "{text}");
    }
    assert!(stdout.contains("***@127.0.0.1"), "{stdout}");
}

mod common;

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::Device;
use mone::events::Event;
use mone::failure::ErrorClass;
use mone::runtime::{self, RuntimeOptions, StreamSpec};

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("mone-hardening-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn gst_write(desc: &str) {
    use gstreamer::prelude::*;
    gstreamer::init().unwrap();
    let p = gstreamer::parse::launch(desc).unwrap();
    p.set_state(gstreamer::State::Playing).unwrap();
    let bus = p.bus().unwrap();
    let msg = bus
        .timed_pop_filtered(
            gstreamer::ClockTime::from_seconds(30),
            &[gstreamer::MessageType::Eos, gstreamer::MessageType::Error],
        )
        .unwrap();
    assert!(
        matches!(msg.view(), gstreamer::MessageView::Eos(_)),
        "{desc}"
    );
    p.set_state(gstreamer::State::Null).unwrap();
}

/// Run `specs` through the runtime with no retries; every event, as JSON text too.
fn run_once(specs: &[StreamSpec], opts: RuntimeOptions) -> (Vec<Event>, String) {
    let loaded = mone::model::load_model_dir(&model(), &Device::Cpu).unwrap();
    let mut events: Vec<Event> = Vec::new();
    runtime::run(
        &loaded,
        "tiny",
        &Device::Cpu,
        specs,
        &opts,
        &mut events,
        runtime::Hooks::new(Arc::new(AtomicBool::new(false))),
    )
    .unwrap();
    let text = events
        .iter()
        .map(|e| serde_json::to_string(e).unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    (events, text)
}

#[test]
fn real_failing_inputs_end_in_the_error_class_a_user_can_act_on() {
    let dir = tmpdir("classes");
    let audio = dir.join("audio.ogg");
    gst_write(&format!(
        "audiotestsrc num-buffers=40 ! audioconvert ! vorbisenc ! oggmux ! filesink location={}",
        audio.display()
    ));
    let text = dir.join("notes.mp4");
    std::fs::write(&text, "not a video at all\n").unwrap();
    let good = dir.join("good.mp4");
    mone::source::write_test_video(&good, "ball", 40, 25, 64, 64, "mp4").unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let truncated = dir.join("truncated.mp4");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let server = common::rtsp::Server::start_with(0, Some(("viewer", "right")));
    let port = dead_port();
    let inputs = [
        (audio.display().to_string(), ErrorClass::NoVideo),
        (text.display().to_string(), ErrorClass::NoVideo),
        (truncated.display().to_string(), ErrorClass::CorruptData),
        (
            format!("http://user:secret@127.0.0.1:{port}/x.mp4"),
            ErrorClass::ConnectionRefused,
        ),
        (
            format!("rtsp://viewer:wrongpass@127.0.0.1:{}/cam", server.port),
            ErrorClass::AuthFailed,
        ),
        (
            format!("rtsp://127.0.0.1:{}/cam", server.port),
            ErrorClass::AuthFailed,
        ),
        (
            "rtsp://onlyuser@127.0.0.1:1/cam".to_string(),
            ErrorClass::BadUri,
        ),
        (
            dir.join("missing.mp4").display().to_string(),
            ErrorClass::NotFound,
        ),
    ];
    let specs: Vec<StreamSpec> = inputs
        .iter()
        .map(|(i, _)| StreamSpec::from_input(i))
        .collect();
    let opts = RuntimeOptions {
        max_reconnects: Some(0),
        watchdog: Duration::from_secs(3),
        // The truncated MP4 sometimes wedges qtdemux (no error, no end): a stall.
        stall_timeout: Duration::from_secs(4),
        ..RuntimeOptions::default()
    };
    let t0 = Instant::now();
    let (events, text) = run_once(&specs, opts);
    // Permanent errors are never retried, and the transient one has no retries here.
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "{:?}\n{text}",
        t0.elapsed()
    );
    let classes: HashMap<&str, (ErrorClass, &str, &str)> = events
        .iter()
        .filter_map(|e| match e {
            Event::StreamError {
                stream,
                error_class,
                reason,
                detail,
                ..
            } => Some((
                stream.as_str(),
                (*error_class, reason.as_str(), detail.as_str()),
            )),
            _ => None,
        })
        .collect();
    for (spec, (_, want)) in specs.iter().zip(&inputs) {
        let got = classes.get(spec.name.as_str());
        assert_eq!(
            got.map(|g| g.0),
            Some(*want),
            "{}: {got:?}\n{text}",
            spec.name
        );
        assert!(!got.unwrap().1.is_empty());
    }
    // Only the refused connection was transient: it alone went offline first.
    let offline: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            Event::Offline { stream, .. } => Some(stream.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(offline, [specs[3].name.as_str()], "{text}");
    for secret in ["secret", "wrongpass"] {
        assert!(!text.contains(secret), "{text}");
    }
    drop(server);
    std::fs::remove_dir_all(&dir).ok();
}

/// An HTTP camera: multipart JPEG with no length, paced at about 25 frames a second.
fn mjpeg_camera(data: Vec<u8>, stop: Arc<AtomicBool>) -> (u16, std::thread::JoinHandle<()>) {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let t = std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let Ok((mut s, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            s.set_nonblocking(false).unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(
                b"HTTP/1.0 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary=frame\r\n\r\n",
            );
            // Frames are about 1 kB each: 1 kB every 40 ms is real time.
            'send: while !stop.load(Ordering::Relaxed) {
                for chunk in data.chunks(1024) {
                    if stop.load(Ordering::Relaxed) || s.write_all(chunk).is_err() {
                        break 'send;
                    }
                    std::thread::sleep(Duration::from_millis(40));
                }
            }
        }
    });
    (port, t)
}

#[test]
fn an_http_camera_is_live_and_an_http_file_is_not() {
    use std::sync::atomic::Ordering;
    let dir = tmpdir("http-live");
    let mjpeg = dir.join("cam.mjpeg");
    mone::source::write_test_video(&mjpeg, "ball", 50, 25, 64, 64, "mjpeg").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (port, server) = mjpeg_camera(std::fs::read(&mjpeg).unwrap(), stop.clone());
    let file = dir.join("file.mp4");
    mone::source::write_test_video(&file, "ball", 40, 25, 64, 64, "mp4").unwrap();
    let bytes = std::fs::read(&file).unwrap();
    let fl = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let fport = fl.local_addr().unwrap().port();
    let files = std::thread::spawn(move || {
        use std::io::{Read, Write};
        if let Ok((mut s, _)) = fl.accept() {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let head = format!(
                "HTTP/1.0 200 OK\r\nContent-Type: video/mp4\r\nContent-Length: {}\r\n\r\n",
                bytes.len()
            );
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(&bytes);
        }
    });
    let camera = format!("http://127.0.0.1:{port}/video.mjpg");
    let served = format!("http://127.0.0.1:{fport}/file.mp4");
    let specs = [
        StreamSpec::from_input(&camera),
        StreamSpec::from_input(&served),
    ];
    let run_stop = Arc::new(AtomicBool::new(false));
    let rs = run_stop.clone();
    let stopper = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(5));
        rs.store(true, Ordering::Relaxed);
    });
    let loaded = mone::model::load_model_dir(&model(), &Device::Cpu).unwrap();
    let mut events: Vec<Event> = Vec::new();
    let opts = RuntimeOptions {
        max_reconnects: Some(0),
        ..RuntimeOptions::default()
    };
    runtime::run(
        &loaded,
        "tiny",
        &Device::Cpu,
        &specs,
        &opts,
        &mut events,
        runtime::Hooks::new(run_stop),
    )
    .unwrap();
    stopper.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
    files.join().unwrap();
    let live: HashMap<&str, bool> = events
        .iter()
        .filter_map(|e| match e {
            Event::StreamStarted { stream, live, .. } => Some((stream.as_str(), *live)),
            _ => None,
        })
        .collect();
    assert_eq!(live.get(camera.as_str()), Some(&true), "{events:#?}");
    assert_eq!(live.get(served.as_str()), Some(&false), "{events:#?}");
    // The file ran to its end (a video event); the camera until stopped, with clips.
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::Video { stream, .. } if stream == &served)));
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::Clip { stream, .. } if stream == &camera)));
    // A live camera's clips are stamped when their frames arrived.
    assert!(events.iter().all(|e| match e {
        Event::Clip {
            stream,
            capture_time_source,
            capture_time,
            ..
        } if stream == &camera => {
            *capture_time_source == Some(mone::events::CaptureSource::Arrival)
                && capture_time.is_some()
        }
        _ => true,
    }));
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::StreamError { .. })),
        "{events:#?}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn an_http_camera_that_refuses_is_reconnected_up_to_max_reconnects() {
    let specs = [StreamSpec::from_input(&format!(
        "http://127.0.0.1:{}/video.mjpg",
        dead_port()
    ))];
    let opts = RuntimeOptions {
        max_reconnects: Some(2),
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(100),
        ..RuntimeOptions::default()
    };
    let (events, text) = run_once(&specs, opts);
    match events
        .iter()
        .find(|e| matches!(e, Event::StreamError { .. }))
    {
        Some(Event::StreamError {
            error_class,
            reason,
            ..
        }) => {
            assert_eq!(*error_class, ErrorClass::ConnectionRefused, "{text}");
            assert!(
                reason.contains("gave up after 2 reconnect attempts"),
                "{text}"
            );
        }
        _ => panic!("no stream_error: {text}"),
    }
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Event::Offline { .. }))
            .count(),
        1,
        "{text}"
    );
}

/// Peak thread count of a child until it exits, and its output.
fn run_sampled(mut cmd: Command) -> (std::process::Output, u64) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut peak = 0u64;
    // Read stdout on a thread so a full pipe never blocks the child.
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        out.read_to_string(&mut s).unwrap();
        s
    });
    while child.try_wait().unwrap().is_none() {
        if let Ok(st) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            if let Some(n) = st
                .lines()
                .find(|l| l.starts_with("Threads:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse::<u64>().ok())
            {
                peak = peak.max(n);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let stdout = reader.join().unwrap();
    let mut output = child.wait_with_output().unwrap();
    output.stdout = stdout.into_bytes();
    (output, peak)
}

#[test]
fn classify_takes_folders_and_lists_and_keeps_few_inputs_open() {
    let dir = tmpdir("folders");
    let base = dir.join("base.mp4");
    mone::source::write_test_video(&base, "ball", 16, 25, 64, 64, "mp4").unwrap();
    let videos = dir.join("videos");
    std::fs::create_dir_all(videos.join("sub")).unwrap();
    for i in 0..48 {
        let sub = if i % 4 == 0 { "sub/" } else { "" };
        std::os::unix::fs::symlink(&base, videos.join(format!("{sub}v{i:02}.mp4"))).unwrap();
    }
    std::fs::write(videos.join("README.txt"), "not an input").unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mone"));
    cmd.arg("classify")
        .arg(&videos)
        .args(["--jobs", "2", "--model"])
        .arg(model());
    let (out, threads) = run_sampled(cmd);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("48 inputs, at most 2 files open at once"),
        "{stderr}"
    );
    assert_eq!(stdout.matches("\"type\":\"video\"").count(), 48, "{stderr}");
    assert!(!stdout.contains("README"), "{stdout}");
    // Opened all at once, 48 inputs ran about 300 threads (about 6.5 each).
    assert!(threads < 60, "{threads} threads at peak");
    // A list file (and stdin), with a comment, a repeat and a missing file.
    let list = dir.join("list.txt");
    let first = videos.join("v01.mp4").display().to_string();
    std::fs::write(
        &list,
        format!(
            "# batch\n{first}\n{first}\n{}\n{}\n",
            videos.join("sub").display(),
            dir.join("missing.mp4").display()
        ),
    )
    .unwrap();
    for from in [list.display().to_string(), "-".to_string()] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mone"))
            .args(["classify", "--from-file", &from, "--model"])
            .arg(model())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            if from == "-" {
                stdin.write_all(&std::fs::read(&list).unwrap()).unwrap();
            }
        }
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{from}: {stderr}");
        // v01 once, the 12 files of sub/, and the missing one failed.
        assert!(stderr.contains("14 inputs"), "{from}: {stderr}");
        assert_eq!(stdout.matches("\"type\":\"video\"").count(), 13, "{from}");
        assert!(
            stdout.contains("\"error_class\":\"not_found\""),
            "{from}: {stdout}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Every URI scheme GStreamer here has a source for (as `gst-inspect-1.0 --uri-handlers`
/// lists them), sorted.
fn source_schemes() -> Vec<String> {
    gstreamer::init().unwrap();
    let mut schemes: Vec<String> = gstreamer::ElementFactory::factories_with_type(
        gstreamer::ElementFactoryType::SRC,
        gstreamer::Rank::NONE,
    )
    .into_iter()
    .filter(|f| f.uri_type() == gstreamer::URIType::Src)
    .flat_map(|f| {
        f.uri_protocols()
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
    })
    .collect();
    schemes.sort();
    schemes.dedup();
    schemes
}

#[test]
fn every_uri_scheme_fails_cleanly_and_never_shows_its_password() {
    let schemes = source_schemes();
    // The usual network schemes at least (the registry of a bare machine has these).
    for s in ["file", "http", "rtsp", "udp"] {
        assert!(schemes.iter().any(|x| x == s), "{s} not in {schemes:?}");
    }
    let dir = tmpdir("sweep");
    let port = dead_port();
    let mut uris = vec!["test:pattern=ball,frames=32,live=false".to_string()];
    for s in &schemes {
        uris.push(format!("{s}://127.0.0.1:{port}/x"));
        uris.push(format!("{s}://user:secret@127.0.0.1:{port}/x"));
    }
    let events = dir.join("events.jsonl");
    let mut cfg = format!(
        "[model]\ndir = '{}'\n[sources]\nwatchdog_s = 2\nstall_timeout_s = 3\nmax_reconnects = 0\nbackoff_initial_s = 0.1\n[output]\npath = '{}'\nstats_interval_s = 0\n",
        model().display(),
        events.display()
    );
    for u in &uris {
        cfg.push_str(&format!("[[streams]]\nuri = \"{u}\"\n"));
    }
    let cfg_path = dir.join("sweep.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mone"))
        .arg("run")
        .arg(&cfg_path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Sources that wait for a peer forever (a UDP listener, an appsrc) end at their watchdog or
    // stall timeout; one that plays forever would be stopped here.
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() && t0.elapsed() < Duration::from_secs(25) {
        std::thread::sleep(Duration::from_millis(100));
    }
    if child.try_wait().unwrap().is_none() {
        // SAFETY: signalling our own child.
        unsafe {
            libc_kill(child.id() as i32, 15);
        }
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let text = std::fs::read_to_string(&events).unwrap_or_default();
    // Exited, not killed by a signal or an abort.
    assert!(
        matches!(out.status.code(), Some(0) | Some(1)),
        "{}: {stderr}",
        out.status
    );
    for (name, text) in [("events", &text), ("stderr", &stderr.to_string())] {
        assert!(!text.contains("secret"), "{name}: {text}");
    }
    let ended: Vec<mone::events::Event> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for u in &uris {
        let name = mone::events::redact(u);
        assert!(
            ended.iter().any(
                |e| matches!(e, mone::events::Event::StreamEnded { stream, .. } if *stream == name)
            ),
            "{name} has no stream_ended\n{stderr}"
        );
    }
    // The healthy input ran to its end among all of them.
    assert!(text.contains("\"type\":\"video\""), "{text}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_default_model_is_found_from_anywhere() {
    let dir = tmpdir("anywhere");
    // The binary alone, away from the repository: only its embedded model is near it.
    let bin = dir.join("mone");
    if std::fs::hard_link(env!("CARGO_BIN_EXE_mone"), &bin).is_err() {
        std::fs::copy(env!("CARGO_BIN_EXE_mone"), &bin).unwrap();
    }
    let home = dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let run = |args: &[&str], model_env: Option<&std::path::Path>| {
        let mut c = Command::new(&bin);
        c.args(args)
            .current_dir(&dir)
            .env("HOME", &home)
            .env_remove("XDG_DATA_HOME")
            .env_remove("XDG_CACHE_HOME")
            .env_remove("MONE_MODEL_DIR");
        if let Some(m) = model_env {
            c.env("MONE_MODEL_DIR", m);
        }
        c.output().unwrap()
    };
    let list = run(&["model", "list"], None);
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(text.contains("* embedded in the binary"), "{text}");
    let input = "test:pattern=ball,frames=32,live=false";
    let out = run(&["classify", input], None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("(embedded in the binary)"), "{stderr}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\"type\":\"video\""),
        "{stderr}"
    );
    // The embedded copy went into the cache under HOME.
    assert!(home.join(".cache/mone/models").is_dir());
    // $MONE_MODEL_DIR comes first.
    let out = run(&["classify", input], Some(&model()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("($MONE_MODEL_DIR)"), "{stderr}");
    // A --model that is not a model folder says so.
    let out = run(&["classify", input, "--model", "/no/such/model"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no model folder at /no/such/model"));
    std::fs::remove_dir_all(&dir).ok();
}
