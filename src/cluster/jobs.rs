//! File jobs: `submit` queues one job per input; `work` pulls them one at a time, runs each
//! through the same runtime as `mone run`, keeps the job alive with in-progress acks while it
//! runs, and acks it only once the server has confirmed every one of its events. A worker
//! that dies leaves its job unacked: after the ack wait the server hands it to another, and
//! the events the dead worker did publish come again with the same ids and are dropped by
//! the events stream's de-duplication.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::{
    connect, jobs_consumer, jobs_stream, runtime, worker_fanout, ClusterError, EVENTS_PREFIX,
    JOBS_SUBJECT,
};
use crate::events::{Event, EventSink};
use crate::runtime::{
    self as rt, Classifier, Control, ControlError, Hooks, RuntimeOptions, StreamSpec,
};
use crate::sinks::spool::WhenFull;
use crate::sinks::{Fanout, SinkSpec};

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
    /// Files run at once (their clips share batches).
    pub jobs: usize,
    /// The pipeline's alert sinks (webhook, MQTT), besides the events stream.
    pub alerts: Vec<SinkSpec>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WorkerReport {
    pub jobs: u64,
    pub failed: u64,
    pub redelivered: u64,
}

/// Passes events to the fanout and notes, when a stream's `stream_ended` is written, how many
/// events each sink had been given by then: once they have all settled, so has every event of
/// that stream (spools deliver in order).
struct Marking<'a> {
    inner: &'a mut Fanout,
    failed: HashSet<String>,
    ended: crossbeam_channel::Sender<Ended>,
    /// Jobs given back unfinished: what the runtime still writes of them (a `video` of the
    /// clips so far, a `stream_ended`) is not published, since the redone job's complete
    /// events carry the same ids and would be dropped as their duplicates.
    abandoned: Arc<std::sync::Mutex<HashSet<String>>>,
}

struct Ended {
    stream: String,
    mark: Vec<u64>,
    clips: u64,
    failed: bool,
}

impl EventSink for Marking<'_> {
    fn write(&mut self, e: &Event) -> std::io::Result<()> {
        if let Some(stream) = e.stream() {
            let gone = self
                .abandoned
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(stream);
            if gone {
                return Ok(());
            }
        }
        self.inner.write(e)?;
        match e {
            Event::StreamError { stream, .. } => {
                self.failed.insert(stream.clone());
            }
            Event::StreamEnded { stream, clips, .. } => {
                let _ = self.ended.send(Ended {
                    stream: stream.clone(),
                    mark: self.inner.mark(),
                    clips: *clips,
                    failed: self.failed.remove(stream),
                });
            }
            _ => {}
        }
        Ok(())
    }
    fn written(&self) -> u64 {
        self.inner.written()
    }
    fn dropped(&self) -> u64 {
        self.inner.dropped()
    }
}

/// The events stream (the first sink) has confirmed everything up to `mark`. The alert sinks
/// deliver on their own: a webhook that is down holds no job (its events wait in its spool).
fn confirmed(settled: &[u64], mark: &[u64]) -> bool {
    settled
        .first()
        .zip(mark.first())
        .is_none_or(|(s, m)| s >= m)
}

/// A job this worker holds.
struct Held {
    msg: jetstream::Message,
    last_progress: Instant,
    ended: Option<Ended>,
}

/// Pulls jobs and runs up to `w.jobs` files at once through one runtime (their clips share
/// batches), until `stop` (or, with `until_idle`, until none is left). Each job gets
/// in-progress acks while it runs and is acked once every one of its events is confirmed.
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
    // Files: the worker stops pulling jobs well before a full spool would refuse events.
    let mut fanout = worker_fanout(
        &w.url,
        "nats",
        WhenFull::DropNewest,
        &w.alerts,
        "jobs",
        &w.spool_root,
        Duration::from_secs(30),
    )?;
    let probe = fanout.probe();
    let mut report = WorkerReport::default();
    let (ctl_tx, ctl_rx) = crossbeam_channel::unbounded::<Control>();
    let (end_tx, end_rx) = crossbeam_channel::unbounded::<Ended>();
    let run_stop = Arc::new(AtomicBool::new(false));
    let abandoned = Arc::new(std::sync::Mutex::new(HashSet::new()));
    eprintln!(
        "mone worker {}: pulling jobs from {} ({} files at once)",
        w.id,
        crate::events::redact(&w.url),
        w.jobs
    );
    let result = std::thread::scope(|s| {
        let runner = {
            let run_stop = run_stop.clone();
            let fanout = &mut fanout;
            let abandoned = abandoned.clone();
            s.spawn(move || {
                let mut sink = Marking {
                    inner: fanout,
                    failed: HashSet::new(),
                    ended: end_tx,
                    abandoned,
                };
                let mut hooks = Hooks::new(run_stop);
                hooks.control = Some(ctl_rx);
                rt::run(model, model_name, device, &[], opts, &mut sink, hooks)
            })
        };
        let r = pull_loop(
            w,
            &rt,
            &consumer,
            &ctl_tx,
            &end_rx,
            &probe,
            &stop,
            &abandoned,
            &mut report,
        );
        run_stop.store(true, Ordering::SeqCst);
        match runner.join() {
            Ok(Err(e)) => eprintln!("mone worker {}: file jobs: {e}", w.id),
            Err(_) => eprintln!("mone worker {}: the job runtime panicked", w.id),
            Ok(Ok(_)) => {}
        }
        r
    });
    crate::sinks::print_reports(&fanout.close());
    result.map(|()| report)
}

#[allow(clippy::too_many_arguments)]
fn pull_loop(
    w: &WorkerOptions,
    rt: &tokio::runtime::Runtime,
    consumer: &jetstream::consumer::Consumer<jetstream::consumer::pull::Config>,
    ctl: &crossbeam_channel::Sender<Control>,
    ended: &crossbeam_channel::Receiver<Ended>,
    probe: &crate::sinks::SinkProbe,
    stop: &AtomicBool,
    abandoned: &std::sync::Mutex<HashSet<String>>,
    report: &mut WorkerReport,
) -> Result<(), ClusterError> {
    let g = &w.gauges;
    let mut held: HashMap<String, Held> = HashMap::new();
    let mut held_back = false;
    let mut last_info = Instant::now() - Duration::from_secs(1);
    while !stop.load(Ordering::SeqCst) {
        for e in ended.try_iter() {
            if let Some(h) = held.get_mut(&e.stream) {
                h.ended = Some(e);
            }
        }
        // Settled jobs are acked; the others are kept alive.
        let settled = probe.settled();
        let done: Vec<String> = held
            .iter()
            .filter(|(_, h)| {
                h.ended
                    .as_ref()
                    .is_some_and(|e| confirmed(&settled, &e.mark))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for id in done {
            let Some(h) = held.remove(&id) else { continue };
            let e = h.ended.as_ref().map_or((0, false), |e| (e.clips, e.failed));
            report.jobs += 1;
            // A bad input's stream_error is published; running it again would fail the same way.
            report.failed += e.1 as u64;
            match rt.block_on(h.msg.double_ack()) {
                Ok(()) => eprintln!(
                    "mone worker {}: job {id} done ({} clips{})",
                    w.id,
                    e.0,
                    if e.1 { ", failed" } else { "" }
                ),
                Err(err) => eprintln!(
                    "mone worker {}: job {id} done but its ack failed ({err}); it will be redone",
                    w.id
                ),
            }
        }
        for h in held.values_mut() {
            if h.last_progress.elapsed() >= w.ack_wait / 3 {
                let _ = rt.block_on(h.msg.ack_with(AckKind::Progress));
                h.last_progress = Instant::now();
            }
        }
        if last_info.elapsed() >= Duration::from_secs(1) {
            last_info = Instant::now();
            g.jobs_done.store(report.jobs, Ordering::Relaxed);
            g.jobs_failed.store(report.failed, Ordering::Relaxed);
            g.jobs_redelivered
                .store(report.redelivered, Ordering::Relaxed);
            g.job_published
                .store(probe.only(0).delivered(), Ordering::Relaxed);
            g.job_spooled
                .store(probe.only(0).pending(), Ordering::Relaxed);
            g.job_dropped
                .store(probe.only(0).dropped(), Ordering::Relaxed);
            let mut c = consumer.clone();
            if let Ok(i) = rt.block_on(c.info()) {
                g.jobs_queued.store(i.num_pending, Ordering::Relaxed);
            }
        }
        // Backpressure: while the server does not take the events, take no new work.
        if probe.fill_at(0) > SPOOL_HIGH {
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
        if held.len() >= w.jobs {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        // Short waits while jobs run, so that their acks are not held up.
        let wait = if held.is_empty() {
            Duration::from_secs(1)
        } else {
            Duration::from_millis(200)
        };
        let next = rt.block_on(async {
            let mut batch = consumer
                .fetch()
                .max_messages(1)
                .expires(wait)
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
                if w.until_idle && held.is_empty() && idle(rt, consumer) {
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
        if held.contains_key(&job.id) {
            // The same file again while it runs here (its ack wait ran out): it is still
            // being done; the copy goes back.
            let _ = rt.block_on(msg.ack_with(AckKind::Nak(Some(w.ack_wait))));
            continue;
        }
        if attempt > 1 {
            report.redelivered += 1;
        }
        eprintln!("mone worker {}: job {} (attempt {attempt})", w.id, job.id);
        let (tx, rx) = crossbeam_channel::bounded(1);
        let spec = StreamSpec {
            name: job.id.clone(),
            input: job.uri.clone(),
            origin_ns: None,
        };
        let _ = ctl.send(Control::Add {
            stream: spec,
            reply: tx,
        });
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(())) => {}
            Ok(Err(ControlError::BadInput(f))) => {
                // Published like any stream's failure, and the job settles with it.
                let time = crate::events::now();
                let _ = ctl.send(Control::Emit(Box::new(Event::stream_error(
                    &job.id, &f, false,
                ))));
                let _ = ctl.send(Control::Emit(Box::new(Event::StreamEnded {
                    event_id: crate::events::lifecycle_id(&job.id, "stream_ended", false, &time),
                    stream: job.id.clone(),
                    clips: 0,
                    frames: 0,
                    dropped_clips: 0,
                    time,
                })));
            }
            other => {
                eprintln!(
                    "mone worker {}: job {} cannot start ({}); giving it back",
                    w.id,
                    job.id,
                    match other {
                        Ok(Err(e)) => e.to_string(),
                        _ => "the runtime does not answer".into(),
                    }
                );
                let _ = rt.block_on(msg.ack_with(AckKind::Nak(None)));
                continue;
            }
        }
        held.insert(
            job.id.clone(),
            Held {
                msg,
                last_progress: Instant::now(),
                ended: None,
            },
        );
    }
    // Stopping: a job that is complete gets a few seconds for its events to be confirmed,
    // then its ack; what is not complete goes back to the queue at once, to be redone
    // elsewhere (a complete one still unconfirmed is left to its ack wait).
    let t0 = Instant::now();
    for e in ended.try_iter() {
        if let Some(h) = held.get_mut(&e.stream) {
            h.ended = Some(e);
        }
    }
    for (id, h) in &held {
        let Some(e) = &h.ended else { continue };
        while t0.elapsed() < Duration::from_secs(5) {
            if confirmed(&probe.settled(), &e.mark) {
                if rt.block_on(h.msg.double_ack()).is_ok() {
                    report.jobs += 1;
                    eprintln!("mone worker {}: job {id} done ({} clips)", w.id, e.clips);
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    for (id, h) in held {
        if h.ended.is_some() {
            continue;
        }
        abandoned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone());
        eprintln!("mone worker {}: job {id} given back", w.id);
        let _ = rt.block_on(h.msg.ack_with(AckKind::Nak(None)));
    }
    Ok(())
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
    since: Option<std::time::SystemTime>,
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
                deliver_policy: match since {
                    None => jetstream::consumer::DeliverPolicy::All,
                    Some(t) => {
                        let ns = t
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_nanos() as i128);
                        jetstream::consumer::DeliverPolicy::ByStartTime {
                            start_time: async_nats::datetime::from_nanos(ns)
                                .map_err(|e| ClusterError::Other(e.to_string()))?,
                        }
                    }
                },
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
