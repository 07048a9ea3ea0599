//! `mone submit`, `mone worker`, `mone streams` and `mone events`: the cluster commands.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::cluster::cameras::{self, CameraOptions};
use crate::cluster::jobs::{self, WorkerOptions};
use crate::cluster::Gauges;
use crate::failure::{ErrorClass, Failure};
use crate::http::ApiAccess;
use crate::pipeline::PipelineConfig;
use crate::runtime::{Control, ControlError, RuntimeOptions};

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
    /// A pipeline config for the model, clips, batch, sources, controller and segments, and
    /// the `[http]` allow-lists cameras are checked against (its `[[streams]]` must be empty:
    /// cameras come from `mone streams add`; and it has no `[output] path`: events go to the
    /// events stream).
    pub pipeline: Option<PathBuf>,
    /// Names the worker in leases, logs and `stream_moved` events (default: host name and
    /// process id).
    #[arg(long)]
    pub id: Option<String>,
    /// Model folder (default: the pipeline's, else the shipped model, as `mone model list`
    /// shows).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// cpu, cuda, cuda:N (default: the pipeline's, else cpu).
    #[arg(long)]
    pub device: Option<String>,
    /// Clips per forward (default: the pipeline's, else 4).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Cameras this worker runs at most (0: file jobs only).
    #[arg(long, default_value_t = 8)]
    pub max_streams: usize,
    /// Lease TTL in seconds when this worker creates the leases bucket (an existing bucket
    /// keeps its own). A dead worker's cameras move within about TTL + TTL/3.
    #[arg(long, default_value_t = 6.0)]
    pub lease_ttl_s: f64,
    /// Pull no file jobs (cameras only).
    #[arg(long)]
    pub no_jobs: bool,
    /// Files run at once, their clips batched together (default: as `mone classify`: two per
    /// core, at most 16, within the memory available).
    #[arg(long)]
    pub jobs: Option<usize>,
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
    /// Serve the HTTP API here (IP:PORT; default: the pipeline's `[http] listen`, else none): /healthz, /metrics (with lease counts, queue lag,
    /// spool depth and events published), GET /streams (this worker's cameras), and POST and
    /// DELETE /streams, which write the cluster's streams bucket. Token and allow-lists: the
    /// pipeline's `[http]` section, else MONE_API_TOKEN and the defaults.
    #[arg(long)]
    pub listen: Option<String>,
}

#[derive(clap::Subcommand)]
pub enum StreamsCommand {
    /// Add cameras (or replace those with the same id); a worker starts each within a poll.
    Add {
        #[arg(long)]
        nats: String,
        /// The stream id in events (with one URI only; default: the URI, credentials redacted).
        #[arg(long)]
        id: Option<String>,
        /// rtsp://, http(s)://, srt:// or test: inputs every worker can reach.
        #[arg(required = true)]
        uris: Vec<String>,
    },
    /// Remove cameras by id; their workers stop them.
    Remove {
        #[arg(long)]
        nats: String,
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// The cameras wanted and the worker running each (JSON Lines).
    List {
        #[arg(long)]
        nats: String,
    },
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
    /// Only events the server stored since this time: RFC 3339 (`2026-12-02T13:00:00Z`) or a
    /// span before now (`10m`, `2h`).
    #[arg(long)]
    pub since: Option<String>,
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
    if !(a.lease_ttl_s.is_finite() && a.lease_ttl_s >= 1.0) {
        anyhow::bail!("--lease-ttl-s must be at least 1");
    }
    if a.jobs == Some(0) {
        anyhow::bail!("--jobs must be at least 1");
    }
    if a.no_jobs && a.max_streams == 0 {
        anyhow::bail!("--no-jobs with --max-streams 0 leaves this worker nothing to do");
    }
    let id = a.id.clone().unwrap_or_else(crate::events::instance);
    let cfg = match &a.pipeline {
        Some(p) => Some(PipelineConfig::load_worker(p)?),
        None => None,
    };
    let mut opts = match &cfg {
        Some(c) => c.options().map_err(anyhow::Error::msg)?,
        None => RuntimeOptions::default(),
    };
    if let Some(b) = a.batch {
        opts.batch = b;
    }
    let model_dir = a
        .model
        .clone()
        .or_else(|| cfg.as_ref().and_then(|c| c.model.dir.clone()));
    let (found, source) = crate::model::locate::resolve(model_dir.as_deref())?;
    if source != "given" {
        eprintln!("mone: model {} ({source})", found.display());
    }
    let device_name = a
        .device
        .clone()
        .or_else(|| cfg.as_ref().map(|c| c.model.device.clone()))
        .unwrap_or_else(|| "cpu".into());
    let device = crate::device::open(&device_name)?;
    let dtype = crate::device::parse_dtype(cfg.as_ref().map_or("f32", |c| &c.model.dtype))?;
    let loaded = super::load_model(&found, &device, dtype)?;
    if let Some(c) = &cfg {
        if let Some(settings) = c.controller_settings().map_err(anyhow::Error::msg)? {
            let reprofile = c.controller.as_ref().is_some_and(|c| c.reprofile);
            super::add_controller(&loaded, &device, &found, &mut opts, settings, reprofile)?;
        }
    }
    let access = match cfg.as_ref().and_then(|c| c.http.as_ref()) {
        Some(h) => h.access().map_err(anyhow::Error::msg)?,
        None => ApiAccess {
            token: std::env::var("MONE_API_TOKEN")
                .ok()
                .map(|t| t.trim().to_string()),
            ..ApiAccess::default()
        },
    };
    let spool_root = a
        .spool_dir
        .clone()
        .unwrap_or_else(|| crate::sinks::config::default_spool_root().join(format!("worker-{id}")));
    let alerts = cfg
        .as_ref()
        .map(|c| c.output.sinks.clone())
        .unwrap_or_default();
    let gauges = Arc::new(Gauges::default());
    let telemetry = Arc::new(crate::metrics::Telemetry::new(
        opts.controller
            .as_ref()
            .map(|c| c.settings.latency_target_ms),
    ));
    let stop = super::install_signal_handlers()?;
    let listen = a.listen.clone().or_else(|| {
        cfg.as_ref()
            .and_then(|c| c.http.as_ref())
            .map(|h| h.listen.clone())
    });
    let _server = match &listen {
        None => None,
        Some(listen) => Some(serve_api(
            listen,
            access.clone(),
            telemetry.clone(),
            gauges.clone(),
            &a.nats,
        )?),
    };
    let name = super::model_name(&found);
    let cams = CameraOptions {
        url: a.nats.clone(),
        id: id.clone(),
        max_streams: a.max_streams,
        lease_ttl: Duration::from_secs_f64(a.lease_ttl_s),
        access,
        spool_root: spool_root.clone(),
        telemetry,
        alerts: alerts.clone(),
    };
    let w = WorkerOptions {
        url: a.nats.clone(),
        ack_wait: Duration::from_secs_f64(a.ack_wait_s),
        until_idle: a.until_idle,
        spool_root,
        id,
        gauges: gauges.clone(),
        jobs: a.jobs.unwrap_or_else(|| super::default_jobs().0),
        alerts,
    };
    let (jobs_r, cams_r) = std::thread::scope(|s| {
        let cameras = (a.max_streams > 0).then(|| {
            let stop = stop.clone();
            let (loaded, device, opts, name, cams, gauges) =
                (&loaded, &device, &opts, &name, &cams, gauges.clone());
            s.spawn(move || cameras::run_cameras(loaded, name, device, opts, cams, stop, gauges))
        });
        let jobs_r = if a.no_jobs {
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
            }
            None
        } else {
            let r = jobs::work(&loaded, &name, &device, &opts, &w, stop.clone());
            // --until-idle (or an error) ends the cameras too.
            stop.store(true, Ordering::SeqCst);
            Some(r)
        };
        let cams_r = cameras.map(|h| {
            h.join().unwrap_or_else(|_| {
                Err(crate::cluster::ClusterError::Other(
                    "the camera loop panicked".into(),
                ))
            })
        });
        (jobs_r, cams_r)
    });
    if let Some(r) = jobs_r {
        let r = r?;
        eprintln!(
            "mone worker {}: {} jobs ({} of them redelivered to this worker, {} failed inputs)",
            w.id, r.jobs, r.redelivered, r.failed
        );
    }
    if let Some(r) = cams_r {
        r?;
    }
    Ok(0)
}

/// The worker's HTTP API: adding and removing streams writes the cluster's bucket (a bridge
/// thread answers the API's control requests), and /metrics adds the worker's gauges.
fn serve_api(
    listen: &str,
    access: ApiAccess,
    telemetry: Arc<crate::metrics::Telemetry>,
    gauges: Arc<Gauges>,
    url: &str,
) -> anyhow::Result<crate::http::HttpServer> {
    let (tx, rx) = crossbeam_channel::unbounded::<Control>();
    let url = url.to_string();
    std::thread::Builder::new()
        .name("streams-bridge".into())
        .spawn(move || {
            let fail = |e: crate::cluster::ClusterError| {
                ControlError::BadInput(Failure::new(ErrorClass::Internal, e.to_string(), ""))
            };
            for c in rx {
                match c {
                    Control::Add { stream, reply } => {
                        let cam = cameras::camera(&stream.input, Some(&stream.name));
                        let _ = reply.send(cameras::add(&url, &[cam]).map_err(fail));
                    }
                    Control::Remove { id, reply } => {
                        let r = match cameras::remove(&url, std::slice::from_ref(&id)) {
                            Ok(missing) if missing.is_empty() => Ok(()),
                            Ok(_) => Err(ControlError::NotFound(id)),
                            Err(e) => Err(fail(e)),
                        };
                        let _ = reply.send(r);
                    }
                    Control::Emit(_) => {}
                }
            }
        })?;
    let extra: crate::http::ExtraMetrics = Arc::new(move || gauges.render());
    let s = crate::http::serve_with(listen, access, telemetry, tx, Some(extra))?;
    eprintln!(
        "mone: HTTP API on http://{} (/healthz, /metrics, /streams)",
        s.addr
    );
    Ok(s)
}

pub fn streams(c: &StreamsCommand) -> anyhow::Result<i32> {
    match c {
        StreamsCommand::Add { nats, id, uris } => {
            if id.is_some() && uris.len() > 1 {
                anyhow::bail!("--id names one camera: give one URI with it");
            }
            let mut cams = Vec::new();
            for u in uris {
                // The same checks a local `mone run` makes, before any worker sees it.
                crate::source::Input::parse(u).map_err(|e| anyhow::anyhow!("{u}: {e}"))?;
                if !crate::source::Input::spec_is_live(u) {
                    anyhow::bail!(
                        "{}: not a live input (files are jobs: `mone submit`)",
                        crate::events::redact(u)
                    );
                }
                cams.push(cameras::camera(u, id.as_deref()));
            }
            cameras::add(nats, &cams)?;
            eprintln!(
                "mone: {} cameras in {}",
                cams.len(),
                cameras::STREAMS_BUCKET
            );
        }
        StreamsCommand::Remove { nats, ids } => {
            let missing = cameras::remove(nats, ids)?;
            if !missing.is_empty() {
                anyhow::bail!("no camera named {}", missing.join(", "));
            }
        }
        StreamsCommand::List { nats } => {
            let mut out = std::io::stdout().lock();
            for (cam, holder) in cameras::list(nats)? {
                let line = serde_json::json!({
                    "id": cam.id,
                    "uri": crate::events::redact(&cam.uri),
                    "worker": holder,
                });
                writeln!(out, "{line}")?;
            }
        }
    }
    Ok(0)
}

pub fn events(a: &EventsArgs) -> anyhow::Result<i32> {
    let mut out = std::io::stdout().lock();
    let since = match a.since.as_deref() {
        None => None,
        Some(t) => Some(match humantime::parse_rfc3339_weak(t) {
            Ok(at) => at,
            Err(_) => {
                let ago = humantime::parse_duration(t).map_err(|_| {
                    anyhow::anyhow!("--since {t:?}: want an RFC 3339 time or a span like 10m")
                })?;
                std::time::SystemTime::now() - ago
            }
        }),
    };
    jobs::print_events(&a.nats, a.follow, a.stream.as_deref(), since, &mut out)?;
    Ok(0)
}
