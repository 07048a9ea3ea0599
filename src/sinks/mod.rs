//! Where events go beyond the JSON Lines output: alert sinks (HTTP webhook, MQTT) and NATS
//! JetStream, each with
//! its own event filter, durable spool (`spool`) and delivery thread, so that a slow or dead
//! receiver never blocks inference or the other sinks and an outage loses nothing.
//!
//! The pipeline writes each event once into [`Fanout`]; the JSON Lines output gets it at once,
//! and every alert sink whose filter takes it appends it to its spool. A sink's thread delivers
//! its spool in order, one event at a time, with back-off and jitter between failed attempts,
//! and advances the spool only when the receiver has confirmed the event (a 2xx answer; an MQTT
//! PUBACK). An event the receiver refuses for good (an HTTP 4xx other than 408 and 429) goes to
//! `rejected.jsonl` beside the spool instead of blocking the rest.

pub mod config;
pub mod mqtt;
pub mod nats;
pub mod spool;
pub mod webhook;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use config::{SinkKind, SinkSpec};
pub use spool::{Spool, SpoolError};

use crate::events::{Event, EventSink, JsonLinesSink};

/// The event types a filter may name (the `type` of each event).
pub const EVENT_TYPES: &[&str] = &[
    "stream_started",
    "clip",
    "video",
    "segment_started",
    "segment_ended",
    "stream_ended",
    "stream_error",
    "offline",
    "reconnected",
    "stream_moved",
    "stats",
];

/// An event's `stream` and `type` ("" and "event" when it has none).
pub(crate) fn stream_and_type(event: &serde_json::Value) -> (&str, &str) {
    let field = |k| event.get(k).and_then(|v: &serde_json::Value| v.as_str());
    (
        field("stream").unwrap_or(""),
        field("type").unwrap_or("event"),
    )
}

/// Why one delivery attempt failed.
#[derive(Debug)]
pub enum DeliveryError {
    /// Try again later (the receiver is down, slow or overloaded).
    Retry(String),
    /// The receiver will never take this event.
    Reject(String),
}

/// One receiver: delivers a single event (its JSON line) and returns once it is confirmed.
pub trait Deliver: Send {
    fn deliver(&mut self, event: &serde_json::Value, line: &str) -> Result<(), DeliveryError>;
    fn describe(&self) -> String;
    /// Events a receiver may have in flight at once (1: one at a time).
    fn window(&self) -> usize {
        1
    }
    /// Delivers events in order with up to `window` in flight; returns how many, from the
    /// first, were confirmed, and the error that stopped the rest.
    fn deliver_many(
        &mut self,
        events: &[(serde_json::Value, String)],
    ) -> (usize, Option<DeliveryError>) {
        for (i, (v, l)) in events.iter().enumerate() {
            if let Err(e) = self.deliver(v, l) {
                return (i, Some(e));
            }
        }
        (events.len(), None)
    }
}

/// Back-off between failed attempts: doubling from `base` up to `max`, each wait drawn
/// uniformly from [d/2, d] so that many senders do not retry in step.
#[derive(Clone, Debug)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    failures: u32,
    rng: u64,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration, seed: u64) -> Self {
        Self {
            base,
            max: max.max(base),
            failures: 0,
            rng: seed | 1,
        }
    }
    /// The wait after one more failure.
    pub fn fail(&mut self) -> Duration {
        let d = self
            .base
            .saturating_mul(1u32 << self.failures.min(20))
            .min(self.max);
        self.failures += 1;
        // xorshift64: jitter needs no quality, and no clock.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let u = (self.rng >> 11) as f64 / (1u64 << 53) as f64;
        d.mul_f64(0.5 + 0.5 * u)
    }
    pub fn succeed(&mut self) {
        self.failures = 0;
    }
}

/// A sink's counters, shared with its delivery thread.
#[derive(Default, Debug)]
pub struct SinkCounters {
    pub delivered: AtomicU64,
    pub retries: AtomicU64,
    pub rejected: AtomicU64,
}

/// What became of one sink's events, at close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkReport {
    pub name: String,
    pub target: String,
    pub delivered: u64,
    pub retries: u64,
    pub rejected: u64,
    /// Left in the spool, delivered by the next run that uses it.
    pub pending: u64,
    /// Refused because the spool was full.
    pub dropped: u64,
}

pub struct AlertSink {
    name: String,
    target: String,
    types: Option<Vec<String>>,
    spool: Arc<Spool>,
    counters: Arc<SinkCounters>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AlertSink {
    /// Opens the spool and starts the delivery thread.
    pub fn start(
        spec: &SinkSpec,
        spool_root: &std::path::Path,
        deliver: Box<dyn Deliver>,
    ) -> Result<Self, SpoolError> {
        let spool = Arc::new(Spool::open_with(
            &spool_root.join(&spec.name),
            spec.spool_max_bytes(),
            spec.when_full.unwrap_or_default(),
        )?);
        let counters = Arc::new(SinkCounters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let target = deliver.describe();
        let backoff = Backoff::new(
            Duration::from_secs_f64(spec.retry_initial_s.unwrap_or(0.5)),
            Duration::from_secs_f64(spec.retry_max_s.unwrap_or(30.0)),
            spool_root.as_os_str().len() as u64 ^ std::process::id() as u64,
        );
        let thread = {
            let (spool, counters, stop) = (spool.clone(), counters.clone(), stop.clone());
            let name = spec.name.clone();
            std::thread::Builder::new()
                .name(format!("sink-{name}"))
                .spawn(move || deliver_loop(&name, &spool, deliver, backoff, &counters, &stop))
                .map_err(|source| SpoolError::Io {
                    dir: spool_root.to_path_buf(),
                    source,
                })?
        };
        Ok(Self {
            name: spec.name.clone(),
            target,
            types: spec.events.clone(),
            spool,
            counters,
            stop,
            thread: Some(thread),
        })
    }

    pub fn wants(&self, event_type: &str) -> bool {
        self.types
            .as_ref()
            .is_none_or(|t| t.iter().any(|x| x == event_type))
    }

    /// Events this sink has finished with since it started.
    pub fn settled(&self) -> u64 {
        settled(&self.spool, &self.counters)
    }

    /// Events given to this sink and not yet settled (from the counters: no file read).
    pub fn pending(&self) -> u64 {
        pending(&self.spool, &self.counters)
    }

    /// Waits up to `drain` for the spool to empty, then stops the thread; what is left stays in
    /// the spool for the next run.
    pub fn close(mut self, drain: Duration) -> SinkReport {
        let deadline = Instant::now() + drain;
        while self.pending() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop.store(true, Ordering::SeqCst);
        self.spool.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.report()
    }

    /// Its counters now.
    pub fn report(&self) -> SinkReport {
        SinkReport {
            name: self.name.clone(),
            target: self.target.clone(),
            delivered: self.counters.delivered.load(Ordering::Relaxed),
            retries: self.counters.retries.load(Ordering::Relaxed),
            rejected: self.counters.rejected.load(Ordering::Relaxed),
            pending: self.pending(),
            dropped: self.spool.dropped(),
        }
    }
}

fn deliver_loop(
    name: &str,
    spool: &Spool,
    mut deliver: Box<dyn Deliver>,
    mut backoff: Backoff,
    counters: &SinkCounters,
    stop: &AtomicBool,
) {
    let mut pos = spool.acked();
    let mut warned = false;
    while !stop.load(Ordering::SeqCst) {
        // A full drop-oldest spool may have evicted what this thread was retrying.
        pos = pos.max(spool.acked());
        let first = match spool.next(pos, Duration::from_millis(200)) {
            Ok(Some(e)) => e,
            Ok(None) => continue,
            Err(e) => {
                eprintln!("mone: sink {name}: {e}");
                sleep_unless(stop, Duration::from_secs(1));
                continue;
            }
        };
        // What is already spooled, up to the receiver's window, goes out together.
        let mut batch = vec![first];
        while batch.len() < deliver.window() {
            let end = batch.last().map_or(pos, |e| e.end);
            match spool.next(end, Duration::ZERO) {
                Ok(Some(e)) => batch.push(e),
                _ => break,
            }
        }
        let mut events = Vec::with_capacity(batch.len());
        let mut ends = Vec::with_capacity(batch.len());
        for entry in batch {
            match serde_json::from_str::<serde_json::Value>(&entry.line) {
                Ok(v) => {
                    ends.push(entry.end);
                    events.push((v, entry.line));
                }
                Err(e) if events.is_empty() => {
                    reject(
                        name,
                        spool,
                        &entry.line,
                        &format!("not JSON: {e}"),
                        counters,
                    );
                    pos = ack(name, spool, entry.end);
                }
                // Sent on its own at the next turn.
                Err(_) => break,
            }
        }
        if events.is_empty() {
            continue;
        }
        let (done, err) = deliver.deliver_many(&events);
        if done > 0 {
            counters.delivered.fetch_add(done as u64, Ordering::Relaxed);
            backoff.succeed();
            if warned {
                eprintln!("mone: sink {name}: delivering again");
                warned = false;
            }
            pos = ack(name, spool, ends[done - 1]);
        }
        match err {
            None => {}
            Some(DeliveryError::Reject(why)) => {
                reject(name, spool, &events[done].1, &why, counters);
                pos = ack(name, spool, ends[done]);
            }
            Some(DeliveryError::Retry(why)) => {
                counters.retries.fetch_add(1, Ordering::Relaxed);
                let wait = backoff.fail();
                if !warned {
                    eprintln!(
                        "mone: sink {name}: {} (events are spooled in {}; retrying)",
                        crate::events::redact_text(&why),
                        spool.dir().display()
                    );
                    warned = true;
                }
                sleep_unless(stop, wait);
            }
        }
    }
}

fn ack(name: &str, spool: &Spool, end: u64) -> u64 {
    match spool.ack(end) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("mone: sink {name}: {e}");
            end
        }
    }
}

fn reject(name: &str, spool: &Spool, line: &str, why: &str, counters: &SinkCounters) {
    counters.rejected.fetch_add(1, Ordering::Relaxed);
    let why = crate::events::redact_text(why);
    eprintln!(
        "mone: sink {name}: an event was refused for good ({why}); kept in {}",
        spool.dir().join("rejected.jsonl").display()
    );
    let rec = serde_json::json!({ "reason": why, "event": line });
    let kept = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(spool.dir().join("rejected.jsonl"))
        .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{rec}\n").as_bytes()));
    if let Err(e) = kept {
        eprintln!("mone: sink {name}: cannot keep the refused event: {e}");
    }
}

fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let end = Instant::now() + d;
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now >= end {
            return;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

/// The pipeline's sink: the JSON Lines output plus the alert sinks.
/// Events a sink has finished with: delivered, refused, or evicted from a full drop-oldest
/// spool.
fn settled(spool: &Spool, c: &SinkCounters) -> u64 {
    c.delivered.load(Ordering::Relaxed) + c.rejected.load(Ordering::Relaxed) + spool.evicted()
}

fn pending(spool: &Spool, c: &SinkCounters) -> u64 {
    spool.appended().saturating_sub(settled(spool, c))
}

/// Totals over a [`Fanout`]'s sinks, read while it runs.
#[derive(Clone)]
pub struct SinkProbe(Vec<(Arc<Spool>, Arc<SinkCounters>)>);

impl SinkProbe {
    /// Per sink, the events delivered, refused or evicted: compare with [`Fanout::mark`].
    pub fn settled(&self) -> Vec<u64> {
        self.0.iter().map(|(s, c)| settled(s, c)).collect()
    }
    /// Sink `i` alone.
    pub fn only(&self, i: usize) -> SinkProbe {
        SinkProbe(self.0.get(i).cloned().into_iter().collect())
    }
    /// Sink `i`'s spool, as a fraction of its bound (0 when there is none).
    pub fn fill_at(&self, i: usize) -> f64 {
        self.0.get(i).map_or(0.0, |(s, _)| s.fill())
    }
    pub fn delivered(&self) -> u64 {
        self.0
            .iter()
            .map(|(_, c)| c.delivered.load(Ordering::Relaxed))
            .sum()
    }
    /// Events in the spools not yet delivered, refused or evicted.
    pub fn pending(&self) -> u64 {
        self.0.iter().map(|(s, c)| pending(s, c)).sum()
    }
    /// Refused or evicted because a spool was full.
    pub fn dropped(&self) -> u64 {
        self.0.iter().map(|(s, _)| s.dropped()).sum()
    }
}

pub struct Fanout {
    pub primary: JsonLinesSink,
    sinks: Vec<AlertSink>,
    drain: Duration,
}

impl Fanout {
    pub fn new(primary: JsonLinesSink, sinks: Vec<AlertSink>, drain: Duration) -> Self {
        Self {
            primary,
            sinks,
            drain,
        }
    }

    /// Starts every configured sink under `spool_root`.
    pub fn start(
        primary: JsonLinesSink,
        specs: &[SinkSpec],
        spool_root: &std::path::Path,
        drain: Duration,
    ) -> Result<Self, SinkError> {
        let mut sinks = Vec::new();
        for s in specs {
            let d = s.connect()?;
            sinks.push(AlertSink::start(s, spool_root, d)?);
        }
        Ok(Self::new(primary, sinks, drain))
    }

    pub fn describe(&self) -> String {
        let mut d = self.primary.describe();
        for s in &self.sinks {
            d.push_str(&format!(", {} ({})", s.name, s.target));
        }
        d
    }

    /// The fullest sink's spool, as a fraction of its bound (0 without sinks).
    pub fn fill(&self) -> f64 {
        self.sinks
            .iter()
            .map(|s| s.spool.fill())
            .fold(0.0, f64::max)
    }

    /// How many events each sink has been given so far (for [`Fanout::wait_settled`]).
    pub fn mark(&self) -> Vec<u64> {
        self.sinks.iter().map(|s| s.spool.appended()).collect()
    }

    /// Waits until every sink has delivered (or refused) the events up to `mark`; false when
    /// `timeout` passed first.
    pub fn wait_settled(&self, mark: &[u64], timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        loop {
            if self.sinks.iter().zip(mark).all(|(s, m)| s.settled() >= *m) {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Each sink's counters now (for metrics).
    pub fn reports(&self) -> Vec<SinkReport> {
        self.sinks.iter().map(AlertSink::report).collect()
    }

    /// A handle that reads the sinks' counters from another thread while this one writes.
    pub fn probe(&self) -> SinkProbe {
        SinkProbe(
            self.sinks
                .iter()
                .map(|s| (s.spool.clone(), s.counters.clone()))
                .collect(),
        )
    }

    /// Gives each sink up to the drain time to deliver what it holds.
    pub fn close(self) -> Vec<SinkReport> {
        let drain = self.drain;
        // Drain in parallel: one dead receiver does not multiply the wait.
        let handles: Vec<_> = self
            .sinks
            .into_iter()
            .map(|s| std::thread::spawn(move || s.close(drain)))
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    }
}

impl EventSink for Fanout {
    fn write(&mut self, e: &Event) -> std::io::Result<()> {
        self.primary.write(e)?;
        if self.sinks.is_empty() {
            return Ok(());
        }
        let line = serde_json::to_string(e).map_err(std::io::Error::other)?;
        let ty = event_type(&line);
        for s in &self.sinks {
            if !s.wants(ty) {
                continue;
            }
            match s.spool.append(&line) {
                Ok(true) => {}
                Ok(false) => {
                    // Counted in the report; said once so a dead receiver does not flood stderr.
                    if s.spool.dropped() == 1 {
                        eprintln!(
                            "mone: sink {}: spool full ({} undelivered events); dropping events",
                            s.name,
                            s.pending()
                        );
                    }
                }
                Err(err) => eprintln!("mone: sink {}: {err}", s.name),
            }
        }
        Ok(())
    }
    fn written(&self) -> u64 {
        self.primary.written
    }
    fn dropped(&self) -> u64 {
        self.sinks.iter().map(|s| s.spool.dropped()).sum()
    }
}

/// The `type` of a serialised event (serde writes the tag first).
fn event_type(line: &str) -> &str {
    line.strip_prefix("{\"type\":\"")
        .and_then(|r| r.split('"').next())
        .unwrap_or("")
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("sink {name}: {reason}")]
    Config { name: String, reason: String },
}

/// Prints what each sink did, one line each (stderr).
pub fn print_reports(reports: &[SinkReport]) {
    for r in reports {
        let mut line = format!(
            "mone: sink {} ({}): {} delivered",
            r.name, r.target, r.delivered
        );
        if r.retries > 0 {
            line.push_str(&format!(", {} failed attempts", r.retries));
        }
        if r.rejected > 0 {
            line.push_str(&format!(", {} refused (rejected.jsonl)", r.rejected));
        }
        if r.pending > 0 {
            line.push_str(&format!(
                ", {} still spooled (delivered at the next start)",
                r.pending
            ));
        }
        if r.dropped > 0 {
            line.push_str(&format!(", {} dropped: spool full", r.dropped));
        }
        eprintln!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_in_the_upper_half() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1), 7);
        let caps = [100, 200, 400, 800, 1000, 1000];
        for cap in caps {
            let d = b.fail().as_millis() as u64;
            assert!(d >= cap / 2 && d <= cap, "{d} for cap {cap}");
        }
        b.succeed();
        assert!(b.fail() <= Duration::from_millis(100));
    }

    #[test]
    fn event_type_reads_the_serialised_tag() {
        let e = Event::Reconnected {
            event_id: "cam#reconnected@t".into(),
            stream: "cam".into(),
            attempt: 1,
            offline_ms: 5,
            time: "t".into(),
        };
        let line = serde_json::to_string(&e).unwrap();
        assert_eq!(event_type(&line), "reconnected");
        assert!(EVENT_TYPES.contains(&event_type(&line)));
    }

    struct Flaky {
        seen: Arc<std::sync::Mutex<Vec<String>>>,
        fail_first: usize,
        calls: usize,
    }
    impl Deliver for Flaky {
        fn deliver(&mut self, v: &serde_json::Value, _: &str) -> Result<(), DeliveryError> {
            self.calls += 1;
            if self.calls <= self.fail_first {
                return Err(DeliveryError::Retry("down".into()));
            }
            if v["bad"] == true {
                return Err(DeliveryError::Reject("400".into()));
            }
            self.seen.lock().unwrap().push(v["i"].to_string());
            Ok(())
        }
        fn describe(&self) -> String {
            "flaky".into()
        }
    }

    #[test]
    fn a_sink_delivers_in_order_after_failures_and_sets_refused_events_aside() {
        let root = std::env::temp_dir().join(format!("mone-sink-order-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let spec: SinkSpec = toml::from_str(
            "name='t'\nkind='webhook'\nurl='http://127.0.0.1:9/'\nretry_initial_s=0.001\nretry_max_s=0.01",
        )
        .unwrap();
        let d = Flaky {
            seen: seen.clone(),
            fail_first: 5,
            calls: 0,
        };
        let s = AlertSink::start(&spec, &root, Box::new(d)).unwrap();
        for i in 0..20 {
            let line = if i == 7 {
                format!("{{\"i\":{i},\"bad\":true}}")
            } else {
                format!("{{\"i\":{i}}}")
            };
            s.spool.append(&line).unwrap();
        }
        let r = s.close(Duration::from_secs(10));
        let want: Vec<String> = (0..20).filter(|i| *i != 7).map(|i| i.to_string()).collect();
        assert_eq!(*seen.lock().unwrap(), want);
        assert_eq!(
            (r.delivered, r.rejected, r.retries, r.pending),
            (19, 1, 5, 0)
        );
        let kept = std::fs::read_to_string(root.join("t/rejected.jsonl")).unwrap();
        assert!(kept.contains("\\\"i\\\":7"), "{kept}");
        let _ = std::fs::remove_dir_all(&root);
    }
}
