//! File jobs: `submit` queues one job per input; `work` pulls them one at a time, runs each
//! through the same runtime as `mone run`, keeps the job alive with in-progress acks while it
//! runs, and acks it only once the server has confirmed every one of its events. A worker
//! that dies leaves its job unacked: after the ack wait the server hands it to another, and
//! the events the dead worker did publish come again with the same ids and are dropped by
//! the events stream's de-duplication.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::{
    connect, jobs_consumer, jobs_stream, runtime, ClusterError, EVENTS_PREFIX, JOBS_SUBJECT,
};
use crate::events::JsonLinesSink;
use crate::runtime::{self as rt, Classifier, Hooks, RuntimeOptions, StreamSpec};
use crate::sinks::{Fanout, SinkKind, SinkSpec};

/// One file to classify: a URI every worker can read, and the stream id its events carry.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Job {
    pub uri: String,
    pub id: String,
}

impl Job {
    /// A local path becomes absolute (workers may run elsewhere); URIs stay as given. The
    /// stream id is the URI with credentials redacted: two files of one name in different
    /// folders must not share event ids.
    pub fn for_input(input: &str) -> Self {
        let uri = if input.contains("://") {
            input.to_string()
        } else {
            std::path::absolute(input)
                .map_or_else(|_| input.to_string(), |p| p.display().to_string())
        };
        Self {
            id: crate::events::redact(&uri),
            uri,
        }
    }
}

/// Queues one job per input; a job resubmitted within two minutes is dropped as a duplicate.
/// Returns how many the server stored anew.
pub fn submit(url: &str, inputs: &[String]) -> Result<usize, ClusterError> {
    let rt = runtime()?;
    rt.block_on(async {
        let js = connect(url, Duration::from_secs(5)).await?;
        jobs_stream(&js).await?;
        let mut fresh = 0;
        for input in inputs {
            let job = Job::for_input(input);
            let payload =
                serde_json::to_vec(&job).map_err(|e| ClusterError::Other(e.to_string()))?;
            let ack = js
                .send_publish(
                    JOBS_SUBJECT,
                    jetstream::message::PublishMessage::build()
                        .payload(payload.into())
                        .message_id(&job.uri),
                )
                .await
                .map_err(|e| ClusterError::Nats(e.to_string()))?
                .await
                .map_err(|e| ClusterError::Nats(e.to_string()))?;
            if !ack.duplicate {
                fresh += 1;
            }
        }
        Ok(fresh)
    })
}

/// A worker pulls no new job while its event spool is fuller than this.
const SPOOL_HIGH: f64 = 0.5;

pub struct WorkerOptions {
    pub url: String,
    /// Names the worker in its log lines.
    pub id: String,
    /// How long a job may go without an ack or in-progress ack before the server redelivers it.
    pub ack_wait: Duration,
    /// Exit once no job is queued or held by any worker.
    pub until_idle: bool,
    /// The nats sink's spool (events wait there while the server is away).
    pub spool_root: PathBuf,
    pub gauges: Arc<super::Gauges>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WorkerReport {
    pub jobs: u64,
    pub failed: u64,
    pub redelivered: u64,
}

/// Pulls and runs jobs until `stop` (or, with `until_idle`, until none is left).
pub fn work(
    model: &dyn Classifier,
    model_name: &str,
    device: &candle_core::Device,
    opts: &RuntimeOptions,
    w: &WorkerOptions,
    stop: Arc<AtomicBool>,
) -> Result<WorkerReport, ClusterError> {
    let rt = runtime()?;
    let js = rt.block_on(connect(&w.url, Duration::from_secs(5)))?;
    let consumer = rt.block_on(jobs_consumer(&js, w.ack_wait))?;
    let spec = SinkSpec {
        subject_prefix: Some(EVENTS_PREFIX.into()),
        retry_max_s: Some(5.0),
        ..SinkSpec::new("nats", SinkKind::Nats, &w.url)
    };
    let mut fanout = Fanout::start(
        JsonLinesSink::null(),
        std::slice::from_ref(&spec),
        &w.spool_root,
        Duration::from_secs(30),
    )
    .map_err(|e| ClusterError::Other(e.to_string()))?;
    let mut report = WorkerReport::default();
    let probe = fanout.probe();
    let g = &w.gauges;
    let update = |report: &WorkerReport| {
        g.jobs_done.store(report.jobs, Ordering::Relaxed);
        g.jobs_failed.store(report.failed, Ordering::Relaxed);
        g.jobs_redelivered
            .store(report.redelivered, Ordering::Relaxed);
        g.job_published.store(probe.delivered(), Ordering::Relaxed);
        g.job_spooled.store(probe.pending(), Ordering::Relaxed);
        g.job_dropped.store(probe.dropped(), Ordering::Relaxed);
        let mut c = consumer.clone();
        if let Ok(i) = rt.block_on(c.info()) {
            g.jobs_queued.store(i.num_pending, Ordering::Relaxed);
        }
    };
    eprintln!(
        "mone worker {}: pulling jobs from {}",
        w.id,
        crate::events::redact(&w.url)
    );
    let mut held_back = false;
    while !stop.load(Ordering::SeqCst) {
        update(&report);
        // Backpressure: while the server does not take the events, take no new work.
        if fanout.fill() > SPOOL_HIGH {
            if !held_back {
                eprintln!(
                    "mone worker {}: the event spool is over {:.0}% full; no new jobs until it drains",
                    w.id,
                    SPOOL_HIGH * 100.0
                );
                held_back = true;
            }
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        held_back = false;
        let next = rt.block_on(async {
            let mut batch = consumer
                .fetch()
                .max_messages(1)
                .expires(Duration::from_secs(1))
                .messages()
                .await
                .map_err(|e| ClusterError::Nats(e.to_string()))?;
            match batch.next().await {
                Some(m) => m.map(Some).map_err(|e| ClusterError::Nats(e.to_string())),
                None => Ok(None),
            }
        });
        let msg = match next {
            Ok(Some(m)) => m,
            Ok(None) => {
                if w.until_idle && idle(&rt, &consumer) {
                    break;
                }
                continue;
            }
            Err(e) => {
                eprintln!("mone worker {}: {e}; retrying", w.id);
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        let attempt = msg.info().map_or(1, |i| i.delivered);
        let job: Job = match serde_json::from_slice(&msg.payload) {
            Ok(j) => j,
            Err(e) => {
                eprintln!(
                    "mone worker {}: a job that is not a job ({e}); dropped",
                    w.id
                );
                let _ = rt.block_on(msg.ack_with(AckKind::Term));
                continue;
            }
        };
        if attempt > 1 {
            report.redelivered += 1;
        }
        eprintln!("mone worker {}: job {} (attempt {attempt})", w.id, job.id);
        let done = AtomicBool::new(false);
        let outcome = std::thread::scope(|s| {
            // In-progress acks well inside the ack wait, until the job is settled.
            s.spawn(|| {
                let every = w.ack_wait / 3;
                let mut last = Instant::now();
                while !done.load(Ordering::SeqCst) {
                    if last.elapsed() >= every {
                        let _ = rt.handle().block_on(msg.ack_with(AckKind::Progress));
                        last = Instant::now();
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            });
            let spec = StreamSpec {
                name: job.id.clone(),
                input: job.uri.clone(),
                origin_ns: None,
            };
            let r = rt::run(
                model,
                model_name,
                device,
                &[spec],
                opts,
                &mut fanout,
                Hooks::new(stop.clone()),
            );
            let mark = fanout.mark();
            // Stopping mid-job: what was not confirmed is redone elsewhere.
            let settled = loop {
                if fanout.wait_settled(&mark, Duration::from_millis(500)) {
                    break true;
                }
                if stop.load(Ordering::SeqCst)
                    && !fanout.wait_settled(&mark, Duration::from_secs(5))
                {
                    break false;
                }
            };
            done.store(true, Ordering::SeqCst);
            (r, settled)
        });
        match outcome {
            // A stop mid-file leaves the file partly classified: its job goes back to the queue.
            (Ok(summary), true) if !stop.load(Ordering::SeqCst) => {
                report.jobs += 1;
                if !summary.failed.is_empty() {
                    // The input itself is bad: its stream_error is published, and running it
                    // again elsewhere would fail the same way.
                    report.failed += 1;
                }
                match rt.block_on(msg.double_ack()) {
                    Ok(()) => eprintln!(
                        "mone worker {}: job {} done ({} clips{})",
                        w.id,
                        job.id,
                        summary.clips,
                        if summary.failed.is_empty() {
                            ""
                        } else {
                            ", failed"
                        }
                    ),
                    Err(e) => eprintln!(
                        "mone worker {}: job {} done but its ack failed ({e}); it will be redone",
                        w.id, job.id
                    ),
                }
            }
            (r, _) => {
                if let Err(e) = &r {
                    eprintln!("mone worker {}: job {}: {e}", w.id, job.id);
                }
                // Give it back at once rather than after the ack wait.
                let _ = rt.block_on(msg.ack_with(AckKind::Nak(None)));
            }
        }
    }
    crate::sinks::print_reports(&fanout.close());
    Ok(report)
}

/// Nothing queued and nothing held by a worker.
fn idle(
    rt: &tokio::runtime::Runtime,
    consumer: &jetstream::consumer::Consumer<jetstream::consumer::pull::Config>,
) -> bool {
    let mut c = consumer.clone();
    rt.block_on(async {
        c.info()
            .await
            .map(|i| i.num_pending == 0 && i.num_ack_pending == 0)
    })
    .unwrap_or(false)
}

/// Prints the events stream as JSON Lines: everything it holds (then returns), or with
/// `follow` also what arrives later. `stream` keeps one stream's events.
pub fn print_events(
    url: &str,
    follow: bool,
    stream: Option<&str>,
    out: &mut dyn Write,
) -> Result<u64, ClusterError> {
    let rt = runtime()?;
    rt.block_on(async {
        let js = connect(url, Duration::from_secs(5)).await?;
        let s = crate::sinks::nats::ensure_events_stream(&js, EVENTS_PREFIX)
            .await
            .map_err(ClusterError::Nats)?;
        let filter = match stream {
            Some(id) => format!(
                "{EVENTS_PREFIX}.{}.>",
                crate::sinks::nats::subject_token(id)
            ),
            None => format!("{EVENTS_PREFIX}.>"),
        };
        let consumer = s
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: filter,
                ..Default::default()
            })
            .await
            .map_err(|e| ClusterError::Nats(e.to_string()))?;
        let mut info = consumer.clone();
        let total = info
            .info()
            .await
            .map_err(|e| ClusterError::Nats(e.to_string()))?
            .num_pending;
        if total == 0 && !follow {
            return Ok(0);
        }
        let mut msgs = consumer
            .messages()
            .await
            .map_err(|e| ClusterError::Nats(e.to_string()))?;
        let mut n = 0;
        while let Some(m) = msgs.next().await {
            let m = m.map_err(|e| ClusterError::Nats(e.to_string()))?;
            out.write_all(&m.payload)
                .and_then(|_| out.write_all(b"\n"))
                .map_err(|e| ClusterError::Other(e.to_string()))?;
            n += 1;
            let pending = m.info().map_or(0, |i| i.pending);
            if !follow && pending == 0 {
                break;
            }
        }
        let _ = out.flush();
        Ok(n)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_path_becomes_absolute_and_uris_stay() {
        let j = Job::for_input("some/clip.mp4");
        assert!(
            j.uri.starts_with('/') && j.uri.ends_with("some/clip.mp4"),
            "{j:?}"
        );
        assert_eq!(j.id, j.uri);
        let j = Job::for_input("https://u:pw@host/v.mp4");
        assert_eq!(j.uri, "https://u:pw@host/v.mp4");
        assert!(!j.id.contains("pw"), "{j:?}");
    }
}
