//! `mone submit`, `mone worker` and `mone events`: the cluster commands.

use std::path::PathBuf;
use std::time::Duration;

use crate::cluster::jobs::{self, WorkerOptions};
use crate::runtime::RuntimeOptions;

#[derive(clap::Args)]
pub struct SubmitArgs {
    /// NATS server (nats://host:port).
    #[arg(long)]
    pub nats: String,
    /// Files, folders (all videos under them) or URIs every worker can read.
    pub inputs: Vec<String>,
    /// Also read inputs from this file, one per line ("-": stdin).
    #[arg(long)]
    pub from_file: Option<String>,
}

#[derive(clap::Args)]
pub struct WorkerArgs {
    /// NATS server (nats://host:port).
    #[arg(long)]
    pub nats: String,
    /// Names the worker in its log lines (default: host name and process id).
    #[arg(long)]
    pub id: Option<String>,
    /// Model folder (default: the shipped model, found as `mone model list` shows).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Clips per forward.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Seconds a job may go unconfirmed before the server gives it to another worker (this
    /// worker sends in-progress acks every third of it while it works).
    #[arg(long, default_value_t = 30.0)]
    pub ack_wait_s: f64,
    /// Exit once no job is queued or held by any worker.
    #[arg(long)]
    pub until_idle: bool,
    /// Where events wait while the server is away (default $XDG_STATE_HOME/mone/spool/worker-<id>).
    #[arg(long)]
    pub spool_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct EventsArgs {
    /// NATS server (nats://host:port).
    #[arg(long)]
    pub nats: String,
    /// Keep printing events as they arrive.
    #[arg(long)]
    pub follow: bool,
    /// Only this stream's events (its id, as in the events' `stream`).
    #[arg(long)]
    pub stream: Option<String>,
}

pub fn submit(a: &SubmitArgs) -> anyhow::Result<i32> {
    let inputs = crate::inputs::expand(&a.inputs, a.from_file.as_deref())?;
    if inputs.is_empty() {
        anyhow::bail!("nothing to submit: give files, folders or --from-file");
    }
    let fresh = jobs::submit(&a.nats, &inputs)?;
    eprintln!(
        "mone: {fresh} jobs queued on {} ({} already queued)",
        crate::cluster::JOBS_STREAM,
        inputs.len() - fresh
    );
    Ok(0)
}

pub fn worker(a: &WorkerArgs) -> anyhow::Result<i32> {
    if !(a.ack_wait_s.is_finite() && a.ack_wait_s >= 1.0) {
        anyhow::bail!("--ack-wait-s must be at least 1");
    }
    let id = a.id.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "worker".into());
        format!("{host}-{}", std::process::id())
    });
    let (found, source) = crate::model::locate::resolve(a.model.as_deref())?;
    if source != "given" {
        eprintln!("mone: model {} ({source})", found.display());
    }
    let device = crate::device::open(&a.device)?;
    let loaded = super::load_model(&found, &device, candle_core::DType::F32)?;
    let opts = RuntimeOptions {
        batch: a.batch,
        ..RuntimeOptions::default()
    };
    let w = WorkerOptions {
        url: a.nats.clone(),
        ack_wait: Duration::from_secs_f64(a.ack_wait_s),
        until_idle: a.until_idle,
        spool_root: a.spool_dir.clone().unwrap_or_else(|| {
            crate::sinks::config::default_spool_root().join(format!("worker-{id}"))
        }),
        id,
    };
    let stop = super::install_signal_handlers()?;
    let r = jobs::work(
        &loaded,
        &super::model_name(&found),
        &device,
        &opts,
        &w,
        stop,
    )?;
    eprintln!(
        "mone worker {}: {} jobs ({} of them redelivered to this worker, {} failed inputs)",
        w.id, r.jobs, r.redelivered, r.failed
    );
    Ok(0)
}

pub fn events(a: &EventsArgs) -> anyhow::Result<i32> {
    let mut out = std::io::stdout().lock();
    jobs::print_events(&a.nats, a.follow, a.stream.as_deref(), &mut out)?;
    Ok(0)
}
