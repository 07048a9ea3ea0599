//! Alert sinks through outages: an in-process HTTP receiver that fails, stalls, goes away and
//! recovers, and a real mosquitto broker that is stopped and started again. Nothing may be
//! lost, order is kept, and only events in flight when the outage began may arrive twice.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mone::events::{Event, EventSink, JsonLinesSink};
use mone::sinks::{Fanout, SinkSpec};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mone-sinks-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

mod common;
use common::{free_port, system_tool};

fn event(i: usize) -> Event {
    Event::SegmentStarted {
        event_id: format!("door#segment{i}"),
        stream: "door".into(),
        label: "approaching".into(),
        start_pts_ns: i as u64 * 1_000_000,
        capture_time: None,
        score: 0.9,
        time: mone::events::now(),
    }
}

fn ids(bodies: &[String]) -> Vec<String> {
    bodies
        .iter()
        .map(|b| {
            let v: serde_json::Value = serde_json::from_str(b).unwrap();
            v["event_id"].as_str().unwrap().to_string()
        })
        .collect()
}

/// Every sent id arrives, first arrivals in order, and each repeat is in `may_repeat`.
fn check_delivery(sent: &[String], got: &[String], may_repeat: &dyn Fn(usize, &str) -> bool) {
    let mut seen = std::collections::HashSet::new();
    let mut first = Vec::new();
    for (k, id) in got.iter().enumerate() {
        if seen.insert(id.clone()) {
            first.push(id.clone());
        } else {
            assert!(may_repeat(k, id), "{id} arrived twice (arrival {k})");
        }
    }
    assert_eq!(
        first.len(),
        sent.len(),
        "lost: {} of {}",
        sent.len() - first.len(),
        sent.len()
    );
    assert_eq!(first, sent, "order");
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Ok,
    Fail,
    Stall,
    Down,
}

struct Received {
    mode: Mode,
    body: String,
    auth: Option<String>,
    idempotency_key: Option<String>,
}

/// An HTTP/1.1 receiver whose behaviour the test switches.
struct Receiver {
    port: u16,
    mode: Arc<Mutex<Mode>>,
    log: Arc<Mutex<Vec<Received>>>,
    done: Arc<AtomicBool>,
}

impl Receiver {
    fn start() -> Self {
        let port = free_port();
        let mode = Arc::new(Mutex::new(Mode::Ok));
        let log = Arc::new(Mutex::new(Vec::new()));
        let done = Arc::new(AtomicBool::new(false));
        let (m, l, d) = (mode.clone(), log.clone(), done.clone());
        std::thread::spawn(move || {
            let mut listener: Option<TcpListener> = None;
            while !d.load(Ordering::SeqCst) {
                let now = *m.lock().unwrap();
                if now == Mode::Down {
                    // Nothing listens: connections are refused.
                    listener = None;
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                let lis = listener.get_or_insert_with(|| {
                    let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
                    l.set_nonblocking(true).unwrap();
                    l
                });
                match lis.accept() {
                    Ok((s, _)) => {
                        let (m, l) = (m.clone(), l.clone());
                        std::thread::spawn(move || serve(s, &m, &l));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self {
            port,
            mode,
            log,
            done,
        }
    }
    fn set(&self, m: Mode) {
        *self.mode.lock().unwrap() = m;
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
    }
}

fn serve(s: TcpStream, mode: &Mutex<Mode>, log: &Mutex<Vec<Received>>) {
    s.set_nonblocking(false).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let (mut len, mut auth, mut key) = (0usize, None, None);
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            match k.to_ascii_lowercase().as_str() {
                "content-length" => len = v.trim().parse().unwrap_or(0),
                "authorization" => auth = Some(v.trim().to_string()),
                "idempotency-key" => key = Some(v.trim().to_string()),
                _ => {}
            }
        }
    }
    let mut body = vec![0; len];
    if r.read_exact(&mut body).is_err() {
        return;
    }
    let m = *mode.lock().unwrap();
    let body = String::from_utf8_lossy(&body).to_string();
    let mut s = s;
    match m {
        Mode::Fail => {
            let _ = s.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
        Mode::Stall => {
            // The receiver got it but never answers in time: the sender must try again.
            log.lock().unwrap().push(Received {
                mode: m,
                body,
                auth,
                idempotency_key: key,
            });
            std::thread::sleep(Duration::from_secs(5));
        }
        Mode::Ok | Mode::Down => {
            log.lock().unwrap().push(Received {
                mode: m,
                body,
                auth,
                idempotency_key: key,
            });
            let _ =
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    }
}

fn spec(toml_text: &str) -> SinkSpec {
    toml::from_str(toml_text).unwrap()
}

#[test]
fn webhook_loses_nothing_through_a_ten_second_outage() {
    let rx = Receiver::start();
    let dir = tmpdir("webhook");
    std::env::set_var("MONE_TEST_HOOK_TOKEN", "hook-secret");
    let s = spec(&format!(
        "name='hook'\nkind='webhook'\nurl='http://127.0.0.1:{}/events'\ntoken_env='MONE_TEST_HOOK_TOKEN'\n\
         timeout_s=0.5\nretry_initial_s=0.05\nretry_max_s=0.5\nevents=['segment_started']",
        rx.port
    ));
    let mut fan =
        Fanout::start(JsonLinesSink::null(), &[s], &dir, Duration::from_secs(30)).unwrap();
    let mut sent = Vec::new();
    let t0 = Instant::now();
    let mut i = 0;
    // 2 s fine, 3 s of 503, 3 s stalled, 4 s refused, then fine again.
    while t0.elapsed() < Duration::from_secs(14) {
        let t = t0.elapsed().as_secs_f64();
        rx.set(match t {
            t if t < 2.0 => Mode::Ok,
            t if t < 5.0 => Mode::Fail,
            t if t < 8.0 => Mode::Stall,
            t if t < 12.0 => Mode::Down,
            _ => Mode::Ok,
        });
        let e = event(i);
        fan.write(&e).unwrap();
        // A type the filter leaves out never reaches the receiver.
        fan.write(&Event::Reconnected {
            event_id: format!("door#reconnected@{i}"),
            stream: "door".into(),
            attempt: 1,
            offline_ms: 1,
            time: mone::events::now(),
        })
        .unwrap();
        sent.push(format!("door#segment{i}"));
        i += 1;
        std::thread::sleep(Duration::from_millis(40));
    }
    rx.set(Mode::Ok);
    let reports = fan.close();
    assert_eq!(reports.len(), 1);
    let r = &reports[0];
    assert_eq!((r.pending, r.rejected, r.dropped), (0, 0, 0), "{r:?}");
    assert!(r.retries > 0, "{r:?}");
    let log = rx.log.lock().unwrap();
    let bodies: Vec<String> = log.iter().map(|x| x.body.clone()).collect();
    let got = ids(&bodies);
    let stalled: Vec<String> = ids(&log
        .iter()
        .filter(|x| x.mode == Mode::Stall)
        .map(|x| x.body.clone())
        .collect::<Vec<_>>());
    check_delivery(&sent, &got, &|_, id| stalled.iter().any(|s| s == id));
    for x in log.iter() {
        assert_eq!(x.auth.as_deref(), Some("Bearer hook-secret"));
        let v: serde_json::Value = serde_json::from_str(&x.body).unwrap();
        assert_eq!(x.idempotency_key.as_deref(), v["event_id"].as_str());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_webhook_that_is_down_at_exit_gets_its_events_at_the_next_start() {
    let rx = Receiver::start();
    rx.set(Mode::Down);
    let dir = tmpdir("webhook-restart");
    let s = spec(&format!(
        "name='hook'\nkind='webhook'\nurl='http://127.0.0.1:{}/'\ntimeout_s=0.3\nretry_initial_s=0.05\nretry_max_s=0.2",
        rx.port
    ));
    let mut fan = Fanout::start(
        JsonLinesSink::null(),
        std::slice::from_ref(&s),
        &dir,
        Duration::from_millis(300),
    )
    .unwrap();
    for i in 0..5 {
        fan.write(&event(i)).unwrap();
    }
    let r = fan.close();
    assert_eq!(r[0].pending, 5, "{r:?}");
    assert!(rx.log.lock().unwrap().is_empty());
    rx.set(Mode::Ok);
    let mut fan =
        Fanout::start(JsonLinesSink::null(), &[s], &dir, Duration::from_secs(10)).unwrap();
    fan.write(&event(5)).unwrap();
    let r = fan.close();
    assert_eq!((r[0].delivered, r[0].pending), (6, 0), "{r:?}");
    let bodies: Vec<String> = rx
        .log
        .lock()
        .unwrap()
        .iter()
        .map(|x| x.body.clone())
        .collect();
    let want: Vec<String> = (0..6).map(|i| format!("door#segment{i}")).collect();
    assert_eq!(ids(&bodies), want);
    let _ = std::fs::remove_dir_all(&dir);
}

struct Mosquitto {
    child: Child,
}

impl Mosquitto {
    fn start(conf: &std::path::Path, port: u16) -> Option<Self> {
        let child = Command::new(system_tool("mosquitto")?)
            .arg("-c")
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let t0 = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "mosquitto did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Self { child })
    }
    /// SIGTERM: mosquitto saves its persistent sessions and exits.
    fn stop(mut self) {
        // SAFETY: signalling our own child.
        unsafe { kill(self.child.id() as i32, 15) };
        let _ = self.child.wait();
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn mqtt_loses_nothing_while_the_broker_restarts() {
    // The suite's setup (scripts/setup.sh) installs it; fail saying so rather than pass.
    assert!(
        system_tool("mosquitto").is_some(),
        "mosquitto is not installed: run scripts/setup.sh"
    );
    let dir = tmpdir("mqtt");
    let port = free_port();
    let conf = dir.join("mosquitto.conf");
    // Started as root, mosquitto runs as user mosquitto, which must write its database here.
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\nlog_dest file {}/mosquitto.log\n",
            dir.display(),
            dir.display()
        ),
    )
    .unwrap();
    let broker = Mosquitto::start(&conf, port).unwrap();

    // A subscriber with a persistent session: the broker keeps what arrives while it is away.
    let got = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let subscribed = Arc::new(AtomicBool::new(false));
    let sub = {
        let (got, stop, subscribed) = (got.clone(), stop.clone(), subscribed.clone());
        std::thread::spawn(move || {
            let mut o = rumqttc::MqttOptions::new("test-sub", "127.0.0.1", port);
            o.set_clean_session(false);
            o.set_keep_alive(Duration::from_secs(5));
            let (client, mut conn) = rumqttc::Client::new(o, 64);
            client
                .subscribe("site/#", rumqttc::QoS::AtLeastOnce)
                .unwrap();
            while !stop.load(Ordering::SeqCst) {
                match conn.recv_timeout(Duration::from_millis(200)) {
                    Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)))) => {
                        subscribed.store(true, Ordering::SeqCst)
                    }
                    Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) => {
                        got.lock().unwrap().push((
                            p.topic.clone(),
                            String::from_utf8_lossy(&p.payload).to_string(),
                        ));
                    }
                    Ok(Err(_)) => std::thread::sleep(Duration::from_millis(100)),
                    _ => {}
                }
            }
        })
    };
    let t0 = Instant::now();
    while !subscribed.load(Ordering::SeqCst) {
        assert!(t0.elapsed() < Duration::from_secs(10), "no SUBACK");
        std::thread::sleep(Duration::from_millis(20));
    }

    let s = spec(&format!(
        "name='broker'\nkind='mqtt'\nurl='mqtt://127.0.0.1:{port}'\ntopic_prefix='site'\n\
         timeout_s=1\nretry_initial_s=0.05\nretry_max_s=0.5"
    ));
    let mut fan = Fanout::start(
        JsonLinesSink::null(),
        &[s],
        &dir.join("spool"),
        Duration::from_secs(30),
    )
    .unwrap();
    let mut sent = Vec::new();
    let mut broker = Some(broker);
    let t0 = Instant::now();
    let mut i = 0;
    let mut restarted = false;
    // 2 s up, 10 s down, then up again.
    while t0.elapsed() < Duration::from_secs(14) {
        let t = t0.elapsed().as_secs_f64();
        if t > 2.0 && t < 12.0 {
            if let Some(b) = broker.take() {
                b.stop();
            }
        } else if t >= 12.0 && !restarted {
            broker = Mosquitto::start(&conf, port);
            restarted = true;
        }
        fan.write(&event(i)).unwrap();
        sent.push(format!("door#segment{i}"));
        i += 1;
        std::thread::sleep(Duration::from_millis(40));
    }
    let reports = fan.close();
    let r = &reports[0];
    assert_eq!((r.pending, r.rejected, r.dropped), (0, 0, 0), "{r:?}");
    assert!(r.retries > 0, "{r:?}");
    // The last events reach the subscriber shortly after their PUBACK.
    let t0 = Instant::now();
    while got.lock().unwrap().len() < sent.len() && t0.elapsed() < Duration::from_secs(15) {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::SeqCst);
    sub.join().unwrap();
    let got = got.lock().unwrap();
    for (topic, _) in got.iter() {
        assert_eq!(topic, "site/door/segment_started");
    }
    let bodies: Vec<String> = got.iter().map(|(_, b)| b.clone()).collect();
    let arrived = ids(&bodies);
    // At most the event in flight when the broker went away, and what the broker had not
    // yet passed on to the subscriber, come twice.
    let repeats = arrived.len() - sent.len().min(arrived.len());
    check_delivery(&sent, &arrived, &|_, _| true);
    assert!(repeats <= 3, "{repeats} repeats");
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[cfg(feature = "gst")]
fn a_pipeline_sends_only_the_filtered_events_to_its_webhook() {
    let rx = Receiver::start();
    let dir = tmpdir("pipeline");
    let video = dir.join("v.mp4");
    mone::source::write_test_video(&video, "ball", 48, 16, 160, 120, "mp4").unwrap();
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/mone-vivit-tiny-motion");
    let out = dir.join("events.jsonl");
    let pipeline = dir.join("p.toml");
    std::fs::write(
        &pipeline,
        format!(
            "[model]\ndir = '{}'\n[output]\npath = '{}'\nspool_dir = '{}'\n\
             [[output.sinks]]\nname = 'hook'\nkind = 'webhook'\nurl = 'http://127.0.0.1:{}/'\nevents = ['clip', 'stream_ended']\n\
             [[streams]]\nid = 'cam'\nuri = '{}'\n",
            model.display(),
            out.display(),
            dir.join("spool").display(),
            rx.port,
            video.display()
        ),
    )
    .unwrap();
    let run = || {
        let o = Command::new(env!("CARGO_BIN_EXE_mone"))
            .arg("run")
            .arg(&pipeline)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let (ok, stderr) = run();
    assert!(ok, "{stderr}");
    assert!(stderr.contains("sink hook"), "{stderr}");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let want: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|v| v["type"] == "clip" || v["type"] == "stream_ended")
        .collect();
    assert!(
        want.iter().filter(|v| v["type"] == "clip").count() >= 2,
        "{lines:?}"
    );
    let got: Vec<serde_json::Value> = rx
        .log
        .lock()
        .unwrap()
        .iter()
        .map(|x| serde_json::from_str(&x.body).unwrap())
        .collect();
    assert_eq!(got.iter().collect::<Vec<_>>(), want);
    // A bad sink table is refused before anything starts.
    std::fs::write(
        &pipeline,
        "[[output.sinks]]\nname='x'\nkind='webhook'\nurl='ftp://x'\n[[streams]]\nuri='x.mp4'\n[model]\n",
    )
    .unwrap();
    let (ok, stderr) = run();
    assert!(!ok && stderr.contains("http"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
