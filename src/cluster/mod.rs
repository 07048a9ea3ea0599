//! Beyond one machine, on NATS JetStream: file jobs on a work-queue stream that workers pull
//! (`mone submit`, `mone worker`), and events on a durable stream (`mone events`), published
//! through the `nats` sink with stable message ids so that a redone job's copies are dropped.
//! Pixels never travel: each worker decodes what it pulls. Written to nats-server 2.9.

pub mod jobs;

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
