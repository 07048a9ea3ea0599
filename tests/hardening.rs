//! Inputs that once crashed the process or leaked what they carried: a source element whose
//! properties have other types than rtspsrc's (srtsrc), and credentials in a URI that
//! GStreamer quotes in its error text.

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
