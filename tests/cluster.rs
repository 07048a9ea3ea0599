//! File jobs through a real nats-server (JetStream, started on a free loopback port with a
//! temporary store): two workers, one killed mid-job, every file's events exactly once.
//! Workers run the GStreamer pipeline (the default feature `gst`).
#![cfg(feature = "gst")]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mone-cluster-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

mod common;
use common::{free_port, system_tool};

struct Server(Child);

/// A temporary folder and a nats-server on a free port with its store in it, and its URL.
fn with_server(name: &str) -> (PathBuf, Server, String) {
    let dir = tmpdir(name);
    let port = free_port();
    let server = Server::start(port, &dir.join("store"));
    (dir, server, format!("nats://127.0.0.1:{port}"))
}

impl Server {
    fn start(port: u16, store: &std::path::Path) -> Self {
        let child = Command::new(
            system_tool("nats-server").expect("nats-server is not installed: run scripts/setup.sh"),
        )
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(store)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "nats-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self(child)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/mone-vivit-tiny-motion")
}

fn worker(url: &str, id: &str, dir: &std::path::Path, until_idle: bool) -> Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mone"));
    c.args([
        "worker",
        "--nats",
        url,
        "--id",
        id,
        "--ack-wait-s",
        "3",
        "--model",
    ])
    .arg(model())
    .arg("--spool-dir")
    .arg(dir.join(format!("spool-{id}")))
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    if until_idle {
        c.arg("--until-idle");
    }
    c.spawn().unwrap()
}

/// A worker's stderr lines, as they come.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

#[test]
fn file_jobs_survive_a_killed_worker_and_each_file_reports_once() {
    let (dir, _server, url) = with_server("jobs");
    let mut files = Vec::new();
    for i in 0..19 {
        let p = dir.join(format!("v{i}.mp4"));
        mone::source::write_test_video(&p, "ball", 64, 16, 160, 120, "mp4").unwrap();
        files.push(p.display().to_string());
    }
    let missing = dir.join("missing.mp4").display().to_string();
    let mut inputs = files.clone();
    inputs.push(missing.clone());

    let o = Command::new(env!("CARGO_BIN_EXE_mone"))
        .args(["submit", "--nats", &url])
        .args(&inputs)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && err.contains("20 jobs queued"),
        "{err}"
    );
    // Submitting again within the window queues nothing new.
    let o = Command::new(env!("CARGO_BIN_EXE_mone"))
        .args(["submit", "--nats", &url])
        .args(&files[..2])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("0 jobs queued"), "{err}");

    let mut a = worker(&url, "a", &dir, false);
    let a_lines = lines(&mut a);
    // b works alongside a from the start, and stays to the end.
    let mut b = worker(&url, "b", &dir, true);
    let b_lines = lines(&mut b);
    // Kill worker a while it holds a job: after one job done, as it starts the next.
    let t0 = Instant::now();
    let mut done_one = false;
    let mut a_log = Vec::new();
    loop {
        let l = a_lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("worker a said: {a_log:#?}"));
        a_log.push(l.clone());
        if l.contains(" done (") {
            done_one = true;
        } else if done_one && l.contains(": job ") && l.contains("(attempt") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "{a_log:#?}");
    }
    a.kill().unwrap();
    a.wait().unwrap();
    // And a third takes a's place.
    let mut c = worker(&url, "c", &dir, true);
    let c_lines = lines(&mut c);
    let t0 = Instant::now();
    for (name, w) in [("b", &mut b), ("c", &mut c)] {
        let status = loop {
            if let Some(s) = w.try_wait().unwrap() {
                break s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(240),
                "worker {name} did not finish"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(status.success(), "worker {name} failed");
    }
    let log: Vec<String> = b_lines.try_iter().chain(c_lines.try_iter()).collect();
    assert!(
        log.iter().any(|l| l.contains("(attempt 2)")),
        "no job was redelivered: {log:#?}"
    );
    // Nothing left queued or held.
    let rt = mone::cluster::runtime().unwrap();
    let counts = rt.block_on(async {
        let js = mone::cluster::connect(&url, Duration::from_secs(5))
            .await
            .unwrap();
        let mut s = mone::cluster::jobs_stream(&js).await.unwrap();
        let queued = s.info().await.unwrap().state.messages;
        let mut c = mone::cluster::jobs_consumer(&js, Duration::from_secs(3))
            .await
            .unwrap();
        let i = c.info().await.unwrap();
        (queued, i.num_pending, i.num_ack_pending)
    });
    assert_eq!(counts, (0, 0, 0), "work queue, pending, ack pending");

    let o = Command::new(env!("CARGO_BIN_EXE_mone"))
        .args(["events", "--nats", &url])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for f in &files {
        let videos = events
            .iter()
            .filter(|e| e["type"] == "video" && e["stream"] == f.as_str())
            .count();
        assert_eq!(videos, 1, "{f}: {videos} video events");
        let clips: Vec<u64> = events
            .iter()
            .filter(|e| e["type"] == "clip" && e["stream"] == f.as_str())
            .map(|e| e["clip_index"].as_u64().unwrap())
            .collect();
        // Each clip once, in order, although worker a published some of them before it died.
        assert_eq!(clips, (0..clips.len() as u64).collect::<Vec<_>>(), "{f}");
        assert!(!clips.is_empty());
    }
    let errors = events
        .iter()
        .filter(|e| e["type"] == "stream_error" && e["stream"] == missing.as_str())
        .count();
    assert_eq!(errors, 1, "the missing file's error, once");
    let ids: Vec<&str> = events
        .iter()
        .filter_map(|e| e["event_id"].as_str())
        .collect();
    let unique: std::collections::HashSet<&&str> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "duplicate event ids in the stream");

    // --since: a span before now takes everything, the present takes nothing.
    let o = mone(&["events", "--nats", &url, "--since", "1h"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).lines().count(),
        events.len()
    );
    let now = humantime::format_rfc3339(std::time::SystemTime::now()).to_string();
    let o = mone(&["events", "--nats", &url, "--since", &now]);
    assert!(o.status.success() && o.stdout.is_empty());
    assert!(!mone(&["events", "--nats", &url, "--since", "soon"])
        .status
        .success());

    // One stream's events only.
    let o = Command::new(env!("CARGO_BIN_EXE_mone"))
        .args(["events", "--nats", &url, "--stream", &files[0]])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(!text.is_empty());
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["stream"], files[0].as_str());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unreachable_server_or_a_bad_url_is_a_clear_error_not_a_hang() {
    let dead = format!("nats://127.0.0.1:{}", free_port());
    let model = model().display().to_string();
    for (args, want) in [
        (vec!["submit", "--nats", &dead, "x.mp4"], "nats"),
        (vec!["submit", "--nats", "http://x", "x.mp4"], "nats://"),
        (vec!["events", "--nats", &dead], "nats"),
        (vec!["streams", "list", "--nats", &dead], "nats"),
        (
            vec!["streams", "add", "--nats", "tcp://x", "test:"],
            "nats://",
        ),
        (vec!["worker", "--nats", &dead, "--model", &model], "nats"),
    ] {
        let t0 = Instant::now();
        let o = Command::new(env!("CARGO_BIN_EXE_mone"))
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "{args:?} took {:?}",
            t0.elapsed()
        );
    }
}

#[test]
fn events_wait_in_the_spool_through_a_broker_restart_and_arrive_once() {
    use mone::events::{Event, EventSink, JsonLinesSink};
    let dir = tmpdir("outage");
    let port = free_port();
    let store = dir.join("store");
    let url = format!("nats://127.0.0.1:{port}");
    let mut server = Some(Server::start(port, &store));
    let spec: mone::sinks::SinkSpec = toml::from_str(&format!(
        "name = 'js'\nkind = 'nats'\nurl = '{url}'\ntimeout_s = 1\nretry_initial_s = 0.05\nretry_max_s = 0.5"
    ))
    .unwrap();
    let mut fan = mone::sinks::Fanout::start(
        JsonLinesSink::null(),
        &[spec],
        &dir.join("spool"),
        Duration::from_secs(30),
    )
    .unwrap();
    let t0 = Instant::now();
    let mut sent = 0;
    let mut restarted = false;
    // 1 s up, 4 s killed (SIGKILL: no clean shutdown), then up again on the same store.
    while t0.elapsed() < Duration::from_secs(7) {
        let t = t0.elapsed().as_secs_f64();
        if t > 1.0 && t < 5.0 {
            drop(server.take());
        } else if t >= 5.0 && !restarted {
            server = Some(Server::start(port, &store));
            restarted = true;
        }
        fan.write(&Event::SegmentStarted {
            event_id: format!("door#segment{sent}"),
            stream: "door".into(),
            label: "approaching".into(),
            start_pts_ns: sent,
            capture_time: None,
            score: 0.9,
            time: mone::events::now(),
        })
        .unwrap();
        sent += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    let r = fan.close();
    assert_eq!((r[0].pending, r[0].dropped), (0, 0), "{r:?}");
    assert!(r[0].retries > 0, "{r:?}");
    let o = Command::new(env!("CARGO_BIN_EXE_mone"))
        .args(["events", "--nats", &url, "--stream", "door"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ids: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["event_id"].as_str().unwrap().to_string()
        })
        .collect();
    let want: Vec<String> = (0..sent).map(|i| format!("door#segment{i}")).collect();
    assert_eq!(ids.len(), want.len(), "missing or duplicated events");
    assert_eq!(ids, want);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

fn mone(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mone"))
        .args(args)
        .output()
        .unwrap()
}

/// The events of one type and stream.
fn of<'a>(ev: &'a [serde_json::Value], ty: &str, stream: &str) -> Vec<&'a serde_json::Value> {
    ev.iter()
        .filter(|e| e["type"] == ty && e["stream"] == stream)
        .collect()
}

fn all_events(url: &str) -> Vec<serde_json::Value> {
    let o = mone(&["events", "--nats", url]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Camera id -> the worker holding its lease.
fn holders(url: &str) -> std::collections::BTreeMap<String, Option<String>> {
    let o = mone(&["streams", "list", "--nats", url]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["id"].as_str().unwrap().to_string(),
                v["worker"].as_str().map(str::to_string),
            )
        })
        .collect()
}

fn camera_worker(url: &str, id: &str, dir: &std::path::Path, listen: Option<&str>) -> Child {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mone"));
    c.args([
        "worker",
        "--nats",
        url,
        "--id",
        id,
        "--no-jobs",
        "--lease-ttl-s",
        "3",
        "--model",
    ])
    .arg(model())
    .arg("--spool-dir")
    .arg(dir.join(format!("spool-{id}")))
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    if let Some(l) = listen {
        c.args(["--listen", l]);
    }
    c.spawn().unwrap()
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn now_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1e3
}

fn unix_ms(rfc3339: &str) -> f64 {
    humantime::parse_rfc3339(rfc3339)
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1e3
}

#[test]
fn cameras_spread_move_off_a_killed_worker_and_ride_out_a_broker_outage() {
    let dir = tmpdir("cameras");
    let port = free_port();
    let store = dir.join("store");
    let url = format!("nats://127.0.0.1:{port}");
    let mut server = Some(Server::start(port, &store));
    for (id, pattern) in [("cam1", "ball"), ("cam2", "snow"), ("cam3", "smpte")] {
        let o = mone(&[
            "streams",
            "add",
            "--nats",
            &url,
            "--id",
            id,
            &format!("test:pattern={pattern},fps=25,width=96,height=96"),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    // A file is a job, not a camera.
    let o = mone(&["streams", "add", "--nats", &url, "test:live=false,frames=8"]);
    assert!(!o.status.success());

    let api = format!("127.0.0.1:{}", free_port());
    let mut a = camera_worker(&url, "a", &dir, Some(&api));
    let a_lines = lines(&mut a);
    wait_for("a to run all three", Duration::from_secs(60), || {
        holders(&url).values().all(|h| h.as_deref() == Some("a"))
    });
    let mut b = camera_worker(&url, "b", &dir, None);
    let b_lines = lines(&mut b);
    // Spread: ceil(3 / 2) = 2 at most each.
    wait_for(
        "the cameras to spread over a and b",
        Duration::from_secs(60),
        || {
            let h = holders(&url);
            let on = |w: &str| h.values().filter(|x| x.as_deref() == Some(w)).count();
            on("a") + on("b") == 3 && on("a") <= 2 && on("b") <= 2
        },
    );
    // Any worker's API manages every camera: it writes the bucket.
    let http = reqwest::blocking::Client::new();
    let metrics = http
        .get(format!("http://{api}/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        metrics.contains("mone_worker_live_workers 2") && metrics.contains("mone_worker_leases "),
        "{metrics}"
    );
    let r = http
        .post(format!("http://{api}/streams"))
        .header("content-type", "application/json")
        .body(
            serde_json::json!({"uri": "test:pattern=ball,fps=25,width=96,height=96", "id": "cam4"})
                .to_string(),
        )
        .send()
        .unwrap();
    assert!(r.status().is_success(), "{:?}", r.text());
    wait_for("a worker to run cam4", Duration::from_secs(30), || {
        holders(&url).get("cam4").is_some_and(|h| h.is_some())
    });
    let r = http
        .delete(format!("http://{api}/streams/cam4"))
        .send()
        .unwrap();
    assert!(r.status().is_success(), "{:?}", r.text());
    wait_for("cam4 to go", Duration::from_secs(30), || {
        !holders(&url).contains_key("cam4")
    });
    wait_for(
        "the cameras to settle at 2 and 1",
        Duration::from_secs(30),
        || {
            let h = holders(&url);
            let on = |w: &str| h.values().filter(|x| x.as_deref() == Some(w)).count();
            on("a") + on("b") == 3 && on("a") <= 2 && on("b") <= 2
        },
    );
    let before = holders(&url);
    let moving: Vec<String> = before
        .iter()
        .filter(|(_, w)| w.as_deref() == Some("a"))
        .map(|(c, _)| c.clone())
        .collect();
    // Let every camera produce clips, then kill a without a chance to release anything.
    wait_for("clips from every camera", Duration::from_secs(60), || {
        let ev = all_events(&url);
        before.keys().all(|c| {
            ev.iter()
                .any(|e| e["type"] == "clip" && e["stream"] == c.as_str())
        })
    });
    let killed_at = now_ms();
    a.kill().unwrap();
    a.wait().unwrap();
    wait_for(
        "b to take over a's cameras",
        Duration::from_secs(60),
        || holders(&url).values().all(|h| h.as_deref() == Some("b")),
    );
    wait_for(
        "clips of the moved cameras from b",
        Duration::from_secs(60),
        || {
            let ev = all_events(&url);
            moving.iter().all(|c| {
                ev.iter().any(|e| {
                    e["type"] == "clip"
                        && e["stream"] == c.as_str()
                        && unix_ms(e["time"].as_str().unwrap()) > killed_at
                })
            })
        },
    );
    let ev = all_events(&url);
    for c in &moving {
        let moved = ev
            .iter()
            .find(|e| e["type"] == "stream_moved" && e["stream"] == c.as_str() && e["to"] == "b")
            .unwrap_or_else(|| panic!("no stream_moved for {c}"));
        assert_eq!(moved["from"], "a");
        assert_eq!(moved["reason"], "lease_expired");
        let first = ev
            .iter()
            .filter(|e| e["type"] == "clip" && e["stream"] == c.as_str())
            .map(|e| unix_ms(e["time"].as_str().unwrap()))
            .find(|t| *t > killed_at)
            .unwrap();
        // The camera's frames that nobody classified: from the end of a's last clip to the
        // start of b's first, on the capture clock.
        let captured: Vec<(f64, f64)> = ev
            .iter()
            .filter(|e| e["type"] == "clip" && e["stream"] == c.as_str())
            .map(|e| {
                let start = unix_ms(e["capture_time"].as_str().unwrap());
                let len = (e["pts_end_ns"].as_u64().unwrap() - e["pts_start_ns"].as_u64().unwrap())
                    as f64
                    / 1e6;
                (start, start + len)
            })
            .collect();
        let last_a = captured
            .iter()
            .filter(|(s, _)| *s < killed_at)
            .map(|(_, e)| *e)
            .fold(f64::MIN, f64::max);
        let first_b = captured
            .iter()
            .map(|(s, _)| *s)
            .filter(|s| *s > killed_at)
            .fold(f64::MAX, f64::min);
        eprintln!(
            "failover of {c}: {:.2} s from a's death to its first clip on b (lease TTL 3 s); {:.2} s of the camera unclassified",
            (first - killed_at) / 1e3,
            (first_b - last_a) / 1e3
        );
    }

    // The broker dies for longer than the lease TTL, and comes back on its store: b keeps its
    // cameras throughout (nobody can claim them), re-validates the leases and goes on.
    drop(server.take());
    std::thread::sleep(Duration::from_secs(5));
    let restarted_at = now_ms();
    server = Some(Server::start(port, &store));
    wait_for(
        "clips from every camera after the outage",
        Duration::from_secs(60),
        || {
            let ev = all_events(&url);
            before.keys().all(|c| {
                ev.iter().any(|e| {
                    e["type"] == "clip"
                        && e["stream"] == c.as_str()
                        && unix_ms(e["time"].as_str().unwrap()) > restarted_at
                })
            })
        },
    );
    wait_for(
        "b to re-validate its leases",
        Duration::from_secs(30),
        || holders(&url).values().all(|h| h.as_deref() == Some("b")),
    );
    b.kill().unwrap();
    b.wait().unwrap();
    let b_log: Vec<String> = b_lines.try_iter().collect();
    let a_log: Vec<String> = a_lines.try_iter().collect();
    assert!(
        b_log.iter().any(|l| l.contains("does not answer"))
            && b_log.iter().any(|l| l.contains("answers again")),
        "{b_log:#?}"
    );
    assert!(
        !b_log.iter().any(|l| l.contains("lost its lease")),
        "b stopped a camera during the outage: {b_log:#?}"
    );

    let ev = all_events(&url);
    let ids: Vec<&str> = ev.iter().filter_map(|e| e["event_id"].as_str()).collect();
    assert_eq!(ids.len(), ev.len(), "every event has an id");
    let unique: std::collections::HashSet<&&str> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "duplicate event ids in the stream");
    // One timeline per camera across both workers and the outage.
    for c in before.keys() {
        let pts: Vec<u64> = ev
            .iter()
            .filter(|e| e["type"] == "clip" && e["stream"] == c.as_str())
            .map(|e| e["pts_start_ns"].as_u64().unwrap())
            .collect();
        assert!(
            pts.windows(2).all(|w| w[1] > w[0]),
            "{c}: clip PTS not monotonic: {pts:?}\na: {a_log:#?}\nb: {b_log:#?}"
        );
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// SIGTERM mid-file: the worker gives its unfinished jobs back at once, and publishes nothing
/// of them that would stand in for the redone file's events (a `video` of the clips so far
/// carries the same id as the complete one, which de-duplication would then drop).
#[test]
fn a_stopped_worker_gives_unfinished_files_back_and_their_events_stay_whole() {
    let (dir, _server, url) = with_server("sigterm");
    let mut files = Vec::new();
    for i in 0..2 {
        let p = dir.join(format!("long{i}.mp4"));
        mone::source::write_test_video(&p, "ball", 4000, 16, 96, 96, "mp4").unwrap();
        files.push(p.display().to_string());
    }
    let o = mone(
        &[
            &["submit", "--nats", &url][..],
            &files.iter().map(String::as_str).collect::<Vec<_>>(),
        ]
        .concat(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut a = worker(&url, "a", &dir, false);
    let a_lines = lines(&mut a);
    let mut started = 0;
    let mut log = Vec::new();
    while started < 2 {
        let l = a_lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("{log:#?}"));
        started += l.contains("(attempt 1)") as usize;
        log.push(l);
    }
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: signalling a child this test started.
    unsafe { libc::kill(a.id() as i32, libc::SIGTERM) };
    assert!(a.wait().unwrap().success());
    log.extend(a_lines.try_iter());
    let given_back = log.iter().filter(|l| l.contains("given back")).count();
    assert!(given_back > 0, "both files ended before the stop: {log:#?}");

    let mut b = worker(&url, "b", &dir, true);
    assert!(b.wait().unwrap().success());
    let ev = all_events(&url);
    for f in &files {
        let clips = of(&ev, "clip", f).len() as u64;
        assert_eq!(clips, 250, "{f}: 4000 frames make 250 clips of 16");
        let videos = of(&ev, "video", f);
        assert_eq!(videos.len(), 1, "{f}");
        assert_eq!(
            videos[0]["clips"], clips,
            "{f}: the video event covers the whole file"
        );
        let ended = of(&ev, "stream_ended", f);
        assert_eq!(ended.len(), 1, "{f}");
        assert_eq!(ended[0]["clips"], clips, "{f}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Anyone who can write the streams bucket could name any URI: a worker runs only what its
/// own allow-lists (its pipeline's `[http]` section) take, and leaves the rest unleased.
#[test]
fn a_worker_runs_only_cameras_its_allow_lists_take() {
    let (dir, _server, url) = with_server("allow");
    let cfg = dir.join("worker.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\ndir = '{}'\n[batch]\nsize = 2\n[http]\nlisten = '127.0.0.1:0'\nallow_schemes = ['rtsp']\n",
            model().display()
        ),
    )
    .unwrap();
    // A pipeline with [[streams]] is not a worker's.
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[model]\n[[streams]]\nuri = 'test:'\n").unwrap();
    let o = mone(&["worker", "--nats", &url, bad.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("mone streams add"));

    let o = mone(&[
        "streams",
        "add",
        "--nats",
        &url,
        "--id",
        "lab",
        "test:fps=25",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut w = Command::new(env!("CARGO_BIN_EXE_mone"))
        .args(["worker", "--nats", &url, "--id", "strict", "--no-jobs"])
        .arg(&cfg)
        .arg("--spool-dir")
        .arg(dir.join("spool"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines(&mut w);
    let t0 = Instant::now();
    let mut log = Vec::new();
    while !(log.iter().any(|l: &String| l.contains("will not run lab"))
        && log.iter().any(|l| l.contains("HTTP API on")))
    {
        assert!(t0.elapsed() < Duration::from_secs(60), "{log:#?}");
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            log.push(l);
        }
    }
    assert_eq!(holders(&url).get("lab"), Some(&None), "{log:#?}");
    w.kill().unwrap();
    w.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tiny HTTP receiver: answers 200 to every POST and hands over the bodies.
fn receiver() -> (u16, mpsc::Receiver<String>) {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Headers, then Content-Length bytes of body.
            let body = loop {
                let n = s.read(&mut chunk).unwrap_or(0);
                if n == 0 {
                    break None;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some(i) = text.find("\r\n\r\n") {
                    let len = text[..i]
                        .lines()
                        .find_map(|h| {
                            let (k, v) = h.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    if buf.len() >= i + 4 + len {
                        break Some(String::from_utf8_lossy(&buf[i + 4..i + 4 + len]).to_string());
                    }
                }
            };
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            if let Some(b) = body {
                let _ = tx.send(b);
            }
        }
    });
    (port, rx)
}

/// A worker's pipeline may add alert sinks: a file job's `video` event reaches the webhook as
/// well as the events stream.
#[test]
fn a_workers_pipeline_sinks_get_its_events_too() {
    let (dir, _server, url) = with_server("alerts");
    let (hook, bodies) = receiver();
    let cfg = dir.join("worker.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\ndir = '{}'\n[[output.sinks]]\nname = 'hook'\nkind = 'webhook'\nurl = 'http://127.0.0.1:{hook}/e'\nevents = ['video']\n",
            model().display()
        ),
    )
    .unwrap();
    let v = dir.join("v.mp4");
    mone::source::write_test_video(&v, "ball", 32, 16, 96, 96, "mp4").unwrap();
    assert!(mone(&["submit", "--nats", &url, v.to_str().unwrap()])
        .status
        .success());
    let o = Command::new(env!("CARGO_BIN_EXE_mone"))
        .args([
            "worker",
            "--nats",
            &url,
            "--max-streams",
            "0",
            "--until-idle",
        ])
        .arg(&cfg)
        .arg("--spool-dir")
        .arg(dir.join("spool"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got: serde_json::Value =
        serde_json::from_str(&bodies.recv_timeout(Duration::from_secs(30)).unwrap()).unwrap();
    assert_eq!(got["type"], "video");
    assert_eq!(got["stream"], v.to_str().unwrap());
    assert!(all_events(&url)
        .iter()
        .any(|e| e["type"] == "video" && e["event_id"] == got["event_id"]));
    let _ = std::fs::remove_dir_all(&dir);
}
