//! Beyond one machine, on NATS JetStream: cameras that workers lease from KV buckets
//! ([`cameras`], the plan in [`leases`]; `mone streams`), file jobs on a work-queue stream
//! that workers pull ([`jobs`]; `mone submit`, `mone worker`), and events on a durable stream
//! (`mone events`), published through the `nats` sink with stable message ids so that a
//! redone job's or a moved camera's copies are dropped. Pixels never travel: each worker
//! decodes what it runs. Written to nats-server 2.9.

pub mod cameras;
pub mod jobs;
pub mod leases;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream;

/// The work queue of file jobs.
pub const JOBS_STREAM: &str = "MONE_JOBS";
pub const JOBS_SUBJECT: &str = "mone.jobs";
/// The durable pull consumer every worker shares.
pub const WORKERS_CONSUMER: &str = "workers";
/// The events' subjects: `<EVENTS_PREFIX>.<stream>.<type>`.
pub const EVENTS_PREFIX: &str = "mone.events";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("nats {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("nats: {0}")]
    Nats(String),
    #[error("{0}")]
    Other(String),
}

/// What a worker's `/metrics` shows besides its cameras' stream figures.
#[derive(Default, Debug)]
pub struct Gauges {
    /// Camera leases held, cameras wanted in the bucket, workers with a live heartbeat.
    pub held: AtomicU64,
    pub desired: AtomicU64,
    pub live_workers: AtomicU64,
    /// Cameras taken over from another worker; leases lost to another.
    pub moved_in: AtomicU64,
    pub lost: AtomicU64,
    /// 1 while the broker answers the camera loop.
    pub connected: AtomicU64,
    pub cam_published: AtomicU64,
    pub cam_spooled: AtomicU64,
    pub cam_dropped: AtomicU64,
    pub jobs_done: AtomicU64,
    pub jobs_failed: AtomicU64,
    pub jobs_redelivered: AtomicU64,
    /// Jobs queued and not yet handed to any worker (the queue's lag).
    pub jobs_queued: AtomicU64,
    pub job_published: AtomicU64,
    pub job_spooled: AtomicU64,
    pub job_dropped: AtomicU64,
}

impl Gauges {
    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let rows: [(&str, &str, &str, u64); 16] = [
            (
                "mone_worker_leases",
                "gauge",
                "camera leases this worker holds",
                g(&self.held),
            ),
            (
                "mone_worker_cameras_wanted",
                "gauge",
                "cameras in the streams bucket this worker may run",
                g(&self.desired),
            ),
            (
                "mone_worker_live_workers",
                "gauge",
                "workers with a live heartbeat",
                g(&self.live_workers),
            ),
            (
                "mone_worker_cameras_moved_in_total",
                "counter",
                "cameras taken over from another worker",
                g(&self.moved_in),
            ),
            (
                "mone_worker_leases_lost_total",
                "counter",
                "leases lost to another worker",
                g(&self.lost),
            ),
            (
                "mone_worker_broker_connected",
                "gauge",
                "1 while the broker answers",
                g(&self.connected),
            ),
            (
                "mone_worker_camera_events_published_total",
                "counter",
                "camera events the server confirmed",
                g(&self.cam_published),
            ),
            (
                "mone_worker_camera_events_spooled",
                "gauge",
                "camera events waiting in the spool",
                g(&self.cam_spooled),
            ),
            (
                "mone_worker_camera_events_dropped_total",
                "counter",
                "camera events evicted from a full spool (oldest first)",
                g(&self.cam_dropped),
            ),
            (
                "mone_worker_jobs_done_total",
                "counter",
                "file jobs finished and acked",
                g(&self.jobs_done),
            ),
            (
                "mone_worker_jobs_failed_total",
                "counter",
                "finished jobs whose input failed",
                g(&self.jobs_failed),
            ),
            (
                "mone_worker_jobs_redelivered_total",
                "counter",
                "jobs this worker got on a second or later attempt",
                g(&self.jobs_redelivered),
            ),
            (
                "mone_worker_jobs_queued",
                "gauge",
                "jobs queued and not yet handed to a worker",
                g(&self.jobs_queued),
            ),
            (
                "mone_worker_job_events_published_total",
                "counter",
                "file-job events the server confirmed",
                g(&self.job_published),
            ),
            (
                "mone_worker_job_events_spooled",
                "gauge",
                "file-job events waiting in the spool",
                g(&self.job_spooled),
            ),
            (
                "mone_worker_job_events_dropped_total",
                "counter",
                "file-job events refused by a full spool",
                g(&self.job_dropped),
            ),
        ];
        let mut out = String::new();
        for (name, kind, help, v) in rows {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
            ));
        }
        out
    }
}

/// A worker part's sinks: the events stream (its spool `nats_name`), and the pipeline's alert
/// sinks, each spool named for the part (`<name>-jobs`, `<name>-cameras`: the two parts run
/// side by side and a spool has one writer).
pub fn worker_fanout(
    url: &str,
    nats_name: &str,
    when_full: crate::sinks::spool::WhenFull,
    alerts: &[crate::sinks::SinkSpec],
    part: &str,
    spool_root: &std::path::Path,
    drain: Duration,
) -> Result<crate::sinks::Fanout, ClusterError> {
    use crate::sinks::{SinkKind, SinkSpec};
    let mut specs = vec![SinkSpec {
        subject_prefix: Some(EVENTS_PREFIX.into()),
        retry_max_s: Some(5.0),
        when_full: Some(when_full),
        ..SinkSpec::new(nats_name, SinkKind::Nats, url)
    }];
    for a in alerts {
        let mut a = a.clone();
        a.name = format!("{}-{part}", a.name);
        specs.push(a);
    }
    crate::sinks::Fanout::start(
        crate::events::JsonLinesSink::null(),
        &specs,
        spool_root,
        drain,
    )
    .map_err(|e| ClusterError::Other(e.to_string()))
}

/// A tokio runtime for the cluster commands' NATS calls (the pipeline itself is threads).
pub fn runtime() -> Result<tokio::runtime::Runtime, ClusterError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| ClusterError::Other(format!("cannot start the async runtime: {e}")))
}

/// Connects within `timeout`; a bad URL or an unreachable server is an error, not a hang.
pub async fn connect(url: &str, timeout: Duration) -> Result<jetstream::Context, ClusterError> {
    let err = |reason: String| ClusterError::Connect {
        url: crate::events::redact(url),
        reason,
    };
    if !url.starts_with("nats://") {
        return Err(err("the url must start with nats://".into()));
    }
    let client = tokio::time::timeout(
        timeout,
        async_nats::ConnectOptions::new()
            .connection_timeout(timeout)
            .connect(url),
    )
    .await
    .map_err(|_| err(format!("no answer within {timeout:?}")))?
    .map_err(|e| err(e.to_string()))?;
    let mut js = jetstream::new(client);
    js.set_timeout(timeout);
    Ok(js)
}

/// The jobs stream (work-queue retention: a job leaves once acked) and its consumer.
pub async fn jobs_consumer(
    js: &jetstream::Context,
    ack_wait: Duration,
) -> Result<jetstream::consumer::Consumer<jetstream::consumer::pull::Config>, ClusterError> {
    let stream = jobs_stream(js).await?;
    stream
        .get_or_create_consumer(
            WORKERS_CONSUMER,
            jetstream::consumer::pull::Config {
                durable_name: Some(WORKERS_CONSUMER.into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait,
                max_deliver: 5,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| ClusterError::Nats(format!("consumer {WORKERS_CONSUMER}: {e}")))
}

pub async fn jobs_stream(
    js: &jetstream::Context,
) -> Result<jetstream::stream::Stream, ClusterError> {
    js.get_or_create_stream(jetstream::stream::Config {
        name: JOBS_STREAM.into(),
        subjects: vec![JOBS_SUBJECT.into()],
        retention: jetstream::stream::RetentionPolicy::WorkQueue,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .map_err(|e| ClusterError::Nats(format!("stream {JOBS_STREAM}: {e}")))
}
