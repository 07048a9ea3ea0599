//! Cameras across workers. The cameras wanted live in a KV bucket (`mone streams add`); a
//! worker runs a camera while it holds its lease, a key in a bucket whose entries expire after
//! the lease TTL: it takes one with `create` (which fails while another's is live) and renews
//! it with `update` at the revision it last wrote (which fails once anyone else wrote it). A
//! worker that dies stops renewing, its leases expire, and the others claim them at their next
//! poll. Heartbeats in a second TTL bucket count the live workers, so that cameras spread
//! evenly ([`super::leases`]). A last bucket remembers who ran each camera, for the
//! `stream_moved` event of the worker that takes it over. Written to nats-server 2.9: TTLs are
//! per bucket and expiries are not announced, so leases are renewed and polled.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use crossbeam_channel::{bounded, unbounded, Sender};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::leases::{self, View};
use super::{connect, runtime, worker_fanout, ClusterError, Gauges};
use crate::events::{lifecycle_id, now, Event, MoveReason};
use crate::http::ApiAccess;
use crate::runtime::{self as rt, Classifier, Control, ControlError, Hooks, RuntimeOptions};
use crate::sinks::nats::kv_key;
use crate::sinks::spool::WhenFull;
use crate::sinks::SinkSpec;

/// The cameras wanted: key = the stream id as a KV key, value = a [`Camera`].
pub const STREAMS_BUCKET: &str = "mone_streams";
/// Who runs each camera: key = camera, value = worker id; entries expire after the TTL.
pub const LEASES_BUCKET: &str = "mone_leases";
/// Live workers: key = worker, value = the cameras it runs; entries expire after the TTL.
pub const WORKERS_BUCKET: &str = "mone_workers";
/// Who ran each camera last (no TTL): names the `from` of `stream_moved`.
pub const PLACEMENT_BUCKET: &str = "mone_placement";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Camera {
    /// The stream id its events carry.
    pub id: String,
    pub uri: String,
    /// When it was added (Unix ns): every worker puts its PTS on one timeline from here, so
    /// they stay monotonic when it moves.
    pub origin_ns: i64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Placement {
    worker: String,
    released: bool,
}

fn nats_err(what: &str) -> impl Fn(String) -> ClusterError + '_ {
    move |e| ClusterError::Nats(format!("{what}: {e}"))
}

/// Opens a bucket, creating it when missing. An existing bucket keeps its own settings (the
/// leases' TTL is the one it was created with). The bucket's stream is made here with the
/// settings the client library's `create_key_value` uses, since that first asks for the
/// account's info, whose 2.9 form the library cannot read.
async fn bucket(
    js: &jetstream::Context,
    name: &str,
    max_age: Duration,
) -> Result<kv::Store, ClusterError> {
    if let Ok(s) = js.get_key_value(name).await {
        return Ok(s);
    }
    js.get_or_create_stream(jetstream::stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        max_age,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: jetstream::stream::DiscardPolicy::New,
        num_replicas: 1,
        ..Default::default()
    })
    .await
    .map_err(|e| nats_err(name)(e.to_string()))?;
    js.get_key_value(name)
        .await
        .map_err(|e| nats_err(name)(e.to_string()))
}

async fn entries(store: &kv::Store) -> Result<Vec<kv::Entry>, String> {
    let mut keys = store.keys().await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    while let Some(k) = keys.next().await {
        let k = k.map_err(|e| e.to_string())?;
        if let Some(e) = store.entry(k).await.map_err(|e| e.to_string())? {
            if e.operation == kv::Operation::Put {
                out.push(e);
            }
        }
    }
    Ok(out)
}

/// The camera's stream id: the given one, else the URI with credentials redacted.
pub fn camera(uri: &str, id: Option<&str>) -> Camera {
    crate::events::register_secrets(uri);
    Camera {
        id: id.map_or_else(|| crate::events::redact(uri), str::to_string),
        uri: uri.to_string(),
        origin_ns: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64),
    }
}

/// Adds (or replaces) cameras in the wanted set; a worker picks each up at its next poll.
pub fn add(url: &str, cams: &[Camera]) -> Result<(), ClusterError> {
    let rt = runtime()?;
    rt.block_on(async {
        let js = connect(url, Duration::from_secs(5)).await?;
        let streams = bucket(&js, STREAMS_BUCKET, Duration::ZERO).await?;
        for c in cams {
            let v = serde_json::to_vec(c).map_err(|e| ClusterError::Other(e.to_string()))?;
            streams
                .put(kv_key(&c.id), v.into())
                .await
                .map_err(|e| nats_err(&c.id)(e.to_string()))?;
        }
        Ok(())
    })
}

/// Removes cameras by id; their workers stop them at their next poll. Returns the ids that
/// were not there.
pub fn remove(url: &str, ids: &[String]) -> Result<Vec<String>, ClusterError> {
    let rt = runtime()?;
    rt.block_on(async {
        let js = connect(url, Duration::from_secs(5)).await?;
        let streams = bucket(&js, STREAMS_BUCKET, Duration::ZERO).await?;
        let mut missing = Vec::new();
        for id in ids {
            let k = kv_key(id);
            match streams.get(&k).await {
                Ok(Some(_)) => streams
                    .delete(&k)
                    .await
                    .map_err(|e| nats_err(id)(e.to_string()))?,
                Ok(None) => missing.push(id.clone()),
                Err(e) => return Err(nats_err(id)(e.to_string())),
            }
        }
        Ok(missing)
    })
}

/// Every wanted camera and the worker that holds its lease now, if any.
pub fn list(url: &str) -> Result<Vec<(Camera, Option<String>)>, ClusterError> {
    let rt = runtime()?;
    rt.block_on(async {
        let js = connect(url, Duration::from_secs(5)).await?;
        let streams = bucket(&js, STREAMS_BUCKET, Duration::ZERO).await?;
        let holders: HashMap<String, String> = match js.get_key_value(LEASES_BUCKET).await {
            Ok(l) => entries(&l)
                .await
                .map_err(nats_err(LEASES_BUCKET))?
                .into_iter()
                .map(|e| (e.key, String::from_utf8_lossy(&e.value).into_owned()))
                .collect(),
            Err(_) => HashMap::new(),
        };
        let mut out = Vec::new();
        for e in entries(&streams).await.map_err(nats_err(STREAMS_BUCKET))? {
            if let Ok(c) = serde_json::from_slice::<Camera>(&e.value) {
                out.push((c, holders.get(&e.key).cloned()));
            }
        }
        out.sort_by(|a, b| a.0.id.cmp(&b.0.id));
        Ok(out)
    })
}

pub struct CameraOptions {
    pub url: String,
    pub id: String,
    /// Cameras this worker runs at most (0: none).
    pub max_streams: usize,
    /// A new leases bucket's TTL (an existing bucket keeps its own).
    pub lease_ttl: Duration,
    /// Whose inputs this worker accepts: anyone who can write to the bucket could ask for
    /// any URI, so each worker applies its own allow-lists before it starts one.
    pub access: ApiAccess,
    pub spool_root: std::path::PathBuf,
    /// The camera runtime's per-stream figures (the worker's `/metrics` and `GET /streams`).
    pub telemetry: Arc<crate::metrics::Telemetry>,
    /// The pipeline's alert sinks (webhook, MQTT), besides the events stream.
    pub alerts: Vec<SinkSpec>,
}

/// A lease this worker holds: the revision it last wrote.
struct Held {
    revision: u64,
    camera: Camera,
    started: Instant,
}

/// A held camera whose stream ended for good (a `stream_error`: bad credentials, too many
/// reconnects) is started again this long after its last start.
const RESTART_AFTER: Duration = Duration::from_secs(30);

struct Buckets {
    streams: kv::Store,
    leases: kv::Store,
    workers: kv::Store,
    placement: kv::Store,
}

/// Runs the cameras this worker leases until `stop`: a runtime with a control channel for
/// the streams, and a poll loop (every third of the lease TTL) that renews, claims and gives
/// up leases and tells the runtime to start and stop streams.
pub fn run_cameras(
    model: &dyn Classifier,
    model_name: &str,
    device: &candle_core::Device,
    opts: &RuntimeOptions,
    c: &CameraOptions,
    stop: Arc<AtomicBool>,
    gauges: Arc<Gauges>,
) -> Result<(), ClusterError> {
    let tokio = runtime()?;
    let (js, b) = tokio.block_on(async {
        let mut js = connect(&c.url, Duration::from_secs(5)).await?;
        // Short requests: while the broker is away, a poll must not block for long.
        js.set_timeout((c.lease_ttl / 3).clamp(Duration::from_millis(500), Duration::from_secs(2)));
        let b = Buckets {
            streams: bucket(&js, STREAMS_BUCKET, Duration::ZERO).await?,
            leases: bucket(&js, LEASES_BUCKET, c.lease_ttl).await?,
            workers: bucket(&js, WORKERS_BUCKET, c.lease_ttl).await?,
            placement: bucket(&js, PLACEMENT_BUCKET, Duration::ZERO).await?,
        };
        Ok::<_, ClusterError>((js, b))
    })?;
    let ttl = tokio
        .block_on(b.leases.status())
        .map(|s| s.max_age())
        .ok()
        .filter(|t| !t.is_zero())
        .unwrap_or(c.lease_ttl);
    let poll = ttl / 3;
    drop(js);
    // Live events: while the broker is away, keep the newest.
    let mut fanout = worker_fanout(
        &c.url,
        "nats-cameras",
        WhenFull::DropOldest,
        &c.alerts,
        "cameras",
        &c.spool_root,
        Duration::from_secs(10),
    )?;
    let probe = fanout.probe();
    let (ctl_tx, ctl_rx) = unbounded::<Control>();
    let run_stop = Arc::new(AtomicBool::new(false));
    eprintln!(
        "mone worker {}: leasing cameras (at most {}, lease TTL {:.1} s)",
        c.id,
        c.max_streams,
        ttl.as_secs_f64()
    );
    std::thread::scope(|s| {
        let runner = {
            let run_stop = run_stop.clone();
            let fanout = &mut fanout;
            s.spawn(move || {
                let mut hooks = Hooks::new(run_stop);
                hooks.control = Some(ctl_rx);
                hooks.telemetry = Some(c.telemetry.clone());
                rt::run(model, model_name, device, &[], opts, fanout, hooks)
            })
        };
        let mut m = Manager {
            c,
            b: &b,
            tokio: &tokio,
            ctl: ctl_tx,
            held: BTreeMap::new(),
            refused: HashSet::new(),
            gauges: &gauges,
            connected: true,
        };
        let mut next = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            if Instant::now() >= next {
                m.poll();
                next = Instant::now() + poll;
                gauges
                    .cam_published
                    .store(probe.only(0).delivered(), Ordering::Relaxed);
                gauges
                    .cam_spooled
                    .store(probe.only(0).pending(), Ordering::Relaxed);
                gauges
                    .cam_dropped
                    .store(probe.only(0).dropped(), Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        m.shutdown();
        run_stop.store(true, Ordering::SeqCst);
        match runner.join() {
            Ok(Err(e)) => eprintln!("mone worker {}: cameras: {e}", c.id),
            Err(_) => eprintln!("mone worker {}: the camera runtime panicked", c.id),
            Ok(Ok(_)) => {}
        }
    });
    crate::sinks::print_reports(&fanout.close());
    Ok(())
}

fn spec_of(cam: &Camera) -> rt::StreamSpec {
    rt::StreamSpec {
        name: cam.id.clone(),
        input: cam.uri.clone(),
        origin_ns: Some(cam.origin_ns),
    }
}

struct Manager<'a> {
    c: &'a CameraOptions,
    b: &'a Buckets,
    tokio: &'a tokio::runtime::Runtime,
    ctl: Sender<Control>,
    held: BTreeMap<String, Held>,
    /// Cameras this worker's allow-lists refuse (said once).
    refused: HashSet<String>,
    gauges: &'a Gauges,
    connected: bool,
}

impl Manager<'_> {
    fn log(&self, msg: &str) {
        eprintln!("mone worker {}: {msg}", self.c.id);
    }

    fn ask(
        &self,
        make: impl FnOnce(Sender<Result<(), ControlError>>) -> Control,
    ) -> Result<(), ControlError> {
        let (tx, rx) = bounded(1);
        if self.ctl.send(make(tx)).is_err() {
            return Err(ControlError::Stopping);
        }
        rx.recv_timeout(Duration::from_secs(10))
            .unwrap_or(Err(ControlError::Stopping))
    }

    fn poll(&mut self) {
        let ok = self.renew();
        if ok {
            if !self.connected {
                self.log("the broker answers again; leases re-validated");
            }
            self.connected = true;
            if let Err(e) = self.rebalance() {
                self.log(&format!(
                    "cannot read the buckets ({e}); keeping what it runs"
                ));
            }
        } else if self.connected {
            self.connected = false;
            self.log("the broker does not answer; keeping its cameras until it does");
        }
        self.restart_ended();
        self.gauges
            .connected
            .store(self.connected as u64, Ordering::Relaxed);
        self.gauges
            .held
            .store(self.held.len() as u64, Ordering::Relaxed);
    }

    /// Renews every held lease. False when the broker did not answer (the cameras keep
    /// running: nobody else can claim them either, and they are re-validated on reconnect). A
    /// lease someone else wrote is lost: its camera stops. One that expired meanwhile (the
    /// broker was away longer than the TTL) is taken again when still free.
    fn renew(&mut self) -> bool {
        let me = self.c.id.clone();
        let mut reachable = true;
        let mut lost = Vec::new();
        for (key, h) in self.held.iter_mut() {
            if !reachable {
                break;
            }
            let r = self
                .tokio
                .block_on(self.b.leases.update(key, me.clone().into(), h.revision));
            match r {
                Ok(rev) => h.revision = rev,
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    match self
                        .tokio
                        .block_on(self.b.leases.create(key, me.clone().into()))
                    {
                        Ok(rev) => h.revision = rev,
                        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                            lost.push(key.clone())
                        }
                        Err(_) => reachable = false,
                    }
                }
                Err(_) => reachable = false,
            }
        }
        for key in lost {
            if let Some(h) = self.held.remove(&key) {
                self.log(&format!(
                    "lost its lease on {} to another worker; stopping it",
                    h.camera.id
                ));
                self.gauges.lost.fetch_add(1, Ordering::Relaxed);
                let _ = self.ask(|reply| Control::Remove {
                    id: h.camera.id.clone(),
                    reply,
                });
            }
        }
        let beat = serde_json::json!({"streams": self.held.len(), "time": now()}).to_string();
        let hb = self
            .tokio
            .block_on(self.b.workers.put(kv_key(&me), beat.into()));
        reachable && hb.is_ok()
    }

    /// Held cameras the runtime no longer runs (their stream failed for good) start again,
    /// with [`RESTART_AFTER`] between tries.
    fn restart_ended(&mut self) {
        let running: HashSet<String> = self
            .c
            .telemetry
            .streams()
            .into_iter()
            .map(|i| i.id)
            .collect();
        let due: Vec<(String, rt::StreamSpec)> = self
            .held
            .iter()
            .filter(|(_, h)| {
                !running.contains(&h.camera.id) && h.started.elapsed() >= RESTART_AFTER
            })
            .map(|(k, h)| (k.clone(), spec_of(&h.camera)))
            .collect();
        for (key, spec) in due {
            let id = spec.name.clone();
            let r = self.ask(|reply| Control::Add {
                stream: spec,
                reply,
            });
            self.log(&match r {
                Ok(()) => format!("{id} had ended; started again"),
                Err(e) => format!("{id} had ended and cannot start again ({e})"),
            });
            if let Some(h) = self.held.get_mut(&key) {
                h.started = Instant::now();
            }
        }
    }

    fn rebalance(&mut self) -> Result<(), String> {
        let (wanted, leases, workers) = self.tokio.block_on(async {
            Ok::<_, String>((
                entries(&self.b.streams).await?,
                entries(&self.b.leases).await?,
                entries(&self.b.workers).await?,
            ))
        })?;
        let mut cams: HashMap<String, Camera> = HashMap::new();
        for e in wanted {
            match serde_json::from_slice::<Camera>(&e.value) {
                Ok(cam) => {
                    if let Some(why) = crate::http::refused_by_policy(&self.c.access, &cam.uri) {
                        if self.refused.insert(e.key.clone()) {
                            self.log(&format!("will not run {}: {why}", cam.id));
                        }
                        continue;
                    }
                    cams.insert(e.key, cam);
                }
                Err(err) => {
                    if self.refused.insert(e.key.clone()) {
                        self.log(&format!("a camera entry {} that is not one ({err})", e.key));
                    }
                }
            }
        }
        let view = View {
            me: self.c.id.clone(),
            desired: cams.keys().cloned().collect::<BTreeSet<_>>(),
            holders: leases
                .into_iter()
                .map(|e| (e.key, String::from_utf8_lossy(&e.value).into_owned()))
                .collect(),
            live_workers: workers.len().max(1),
            max_streams: self.c.max_streams,
        };
        self.gauges
            .desired
            .store(view.desired.len() as u64, Ordering::Relaxed);
        self.gauges
            .live_workers
            .store(view.live_workers as u64, Ordering::Relaxed);
        let plan = leases::plan(&view);
        for key in plan.release {
            self.release(&key);
        }
        for key in plan.claim {
            if let Some(cam) = cams.remove(&key) {
                self.claim(&key, cam);
            }
        }
        Ok(())
    }

    fn claim(&mut self, key: &str, cam: Camera) {
        let me = self.c.id.clone();
        let Ok(revision) = self
            .tokio
            .block_on(self.b.leases.create(key, me.clone().into()))
        else {
            // Another worker was quicker (or the broker went away): next poll.
            return;
        };
        let before = self
            .tokio
            .block_on(self.b.placement.get(key))
            .ok()
            .flatten()
            .and_then(|v| serde_json::from_slice::<Placement>(&v).ok());
        match self.ask(|reply| Control::Add {
            stream: spec_of(&cam),
            reply,
        }) {
            Ok(()) => {}
            Err(e) => {
                self.log(&format!(
                    "cannot start {} ({e}); giving its lease back",
                    cam.id
                ));
                let _ = self.tokio.block_on(self.b.leases.delete(key));
                return;
            }
        }
        if let Some(p) = before.filter(|p| p.worker != me) {
            let time = now();
            let reason = if p.released {
                MoveReason::Released
            } else {
                MoveReason::LeaseExpired
            };
            self.gauges.moved_in.fetch_add(1, Ordering::Relaxed);
            self.log(&format!("took over {} from {}", cam.id, p.worker));
            let _ = self.ctl.send(Control::Emit(Box::new(Event::StreamMoved {
                event_id: lifecycle_id(&cam.id, "stream_moved", true, &time),
                stream: cam.id.clone(),
                from: p.worker,
                to: me.clone(),
                reason,
                time,
            })));
        } else {
            self.log(&format!("runs {}", cam.id));
        }
        self.place(key, false);
        self.held.insert(
            key.to_string(),
            Held {
                revision,
                camera: cam,
                started: Instant::now(),
            },
        );
    }

    fn place(&self, key: &str, released: bool) {
        let p = Placement {
            worker: self.c.id.clone(),
            released,
        };
        if let Ok(v) = serde_json::to_vec(&p) {
            let _ = self.tokio.block_on(self.b.placement.put(key, v.into()));
        }
    }

    /// Stops the camera, then gives the lease up at once (the next holder need not wait for
    /// it to expire).
    fn release(&mut self, key: &str) {
        let Some(h) = self.held.remove(key) else {
            return;
        };
        let _ = self.ask(|reply| Control::Remove {
            id: h.camera.id.clone(),
            reply,
        });
        self.place(key, true);
        let _ = self
            .tokio
            .block_on(self.b.leases.delete_expect_revision(key, Some(h.revision)));
        self.log(&format!("gave up {}", h.camera.id));
    }

    fn shutdown(&mut self) {
        let keys: Vec<String> = self.held.keys().cloned().collect();
        for k in keys {
            self.release(&k);
        }
        let _ = self
            .tokio
            .block_on(self.b.workers.delete(kv_key(&self.c.id)));
    }
}
