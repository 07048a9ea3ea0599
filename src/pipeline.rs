//! Pipeline configs for `mone run` (TOML; see docs/pipelines.md).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::clip::Tail;
use crate::controller::ControllerSettings;
use crate::runtime::{RuntimeOptions, StreamSpec};
use crate::source::{Resize, RtspTransport};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

fn one() -> f64 {
    1.0
}
fn auto() -> String {
    "auto".into()
}
fn f32() -> String {
    "f32".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// The model folder; default: the shipped model, wherever `mone model list` finds it.
    pub dir: Option<PathBuf>,
    #[serde(default = "one")]
    pub capacity: f64,
    #[serde(default = "auto")]
    pub device: String,
    /// f32, or bf16/f16 on a GPU.
    #[serde(default = "f32")]
    pub dtype: String,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ClipsSection {
    pub stride: Option<usize>,
    pub step: Option<usize>,
    pub tail: Option<Tail>,
    pub fps: Option<f64>,
    pub resize: Option<Resize>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct BatchSection {
    pub size: Option<usize>,
    pub max_wait_ms: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    /// JSON Lines file (appended); stdout when absent.
    pub path: Option<PathBuf>,
    pub topk: Option<usize>,
    /// Seconds between `stats` events (default 10; 0 turns them off).
    pub stats_interval_s: Option<f64>,
    /// Alert sinks (webhook, MQTT), each with its filter and spool: `[[output.sinks]]`.
    #[serde(default)]
    pub sinks: Vec<crate::sinks::SinkSpec>,
    /// Where the sinks' spools live (default `$XDG_STATE_HOME/mone/spool`).
    pub spool_dir: Option<PathBuf>,
    /// At the end of a run, seconds each sink may take to deliver what it holds (default 10);
    /// the rest stays spooled for the next run.
    pub drain_s: Option<f64>,
}

/// A latency target and how capacity follows it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerSection {
    pub latency_target_ms: f64,
    /// Default: the model's smallest capacity.
    pub min_capacity: Option<f64>,
    pub max_capacity: Option<f64>,
    /// Latency percentile to hold (default 99).
    pub percentile: Option<f64>,
    /// false: stay at `[model] capacity` (shedding nothing) but report against the target.
    pub adaptive: Option<bool>,
    /// Measure the latency profile anew instead of using the cached one.
    #[serde(default)]
    pub reprofile: bool,
}

/// The HTTP API (health, Prometheus metrics, stream control). Off unless configured.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    /// Address to bind, e.g. "127.0.0.1:9464".
    pub listen: String,
    /// A file holding the bearer token (else the MONE_API_TOKEN variable; neither: loopback
    /// only, no token).
    pub token_file: Option<PathBuf>,
    /// URI schemes `POST /streams` takes; default rtsp, rtsps, http, https, srt, test.
    pub allow_schemes: Option<Vec<String>>,
    /// Folders under which `POST /streams` may add files; default none.
    #[serde(default)]
    pub allow_dirs: Vec<PathBuf>,
    /// Largest request body in bytes; default 65536.
    pub body_limit: Option<usize>,
    /// Serve /metrics without the token (Prometheus scrapers); default false.
    #[serde(default)]
    pub open_metrics: bool,
}

impl HttpSection {
    /// Who may use the API: the token read now (file, then MONE_API_TOKEN), folders resolved.
    pub fn access(&self) -> Result<crate::http::ApiAccess, String> {
        let token = match &self.token_file {
            Some(p) => {
                let t = std::fs::read_to_string(p)
                    .map_err(|e| format!("[http] token_file {}: {e}", p.display()))?;
                Some(t.trim().to_string())
            }
            None => std::env::var("MONE_API_TOKEN")
                .ok()
                .map(|t| t.trim().to_string()),
        };
        let mut a = crate::http::ApiAccess {
            token,
            ..Default::default()
        };
        if a.token.as_deref() == Some("") {
            return Err("[http] the API token is empty".into());
        }
        if let Some(s) = &self.allow_schemes {
            a.allow_schemes = s.iter().map(|s| s.to_ascii_lowercase()).collect();
        }
        a.allow_dirs = self
            .allow_dirs
            .iter()
            .map(|d| {
                std::fs::canonicalize(d)
                    .map_err(|e| format!("[http] allow_dirs {}: {e}", d.display()))
            })
            .collect::<Result<_, _>>()?;
        if let Some(n) = self.body_limit {
            if n == 0 {
                return Err("[http] body_limit must be at least 1".into());
            }
            a.body_limit = n;
        }
        a.open_metrics = self.open_metrics;
        let addr: std::net::SocketAddr = self
            .listen
            .parse()
            .map_err(|e| format!("[http] listen `{}`: {e} (want IP:PORT)", self.listen))?;
        if a.token.is_none() && !addr.ip().is_loopback() {
            return Err(format!(
                "[http] listen {} is not a loopback address, and no token is set: set [http] token_file or MONE_API_TOKEN, or listen on 127.0.0.1",
                self.listen
            ));
        }
        Ok(a)
    }
}

/// Action segments (on when the section is present; every field optional).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SegmentsSection {
    pub enter: Option<f32>,
    pub exit: Option<f32>,
    pub min_duration_s: Option<f64>,
    pub max_gap_s: Option<f64>,
    /// Weight of the newest clip in the moving average (1: none).
    pub smoothing: Option<f32>,
    /// Labels that form no segments; default ["static"] when the model has it.
    pub ignore: Option<Vec<String>>,
    #[serde(default)]
    pub labels: std::collections::HashMap<String, crate::segments::LabelOverride>,
}

impl SegmentsSection {
    pub fn settings(&self) -> crate::segments::SegmentSettings {
        let mut s = crate::segments::SegmentSettings::default();
        s.rule.enter = self.enter.unwrap_or(s.rule.enter);
        s.rule.exit = self.exit.unwrap_or(s.rule.exit);
        s.rule.min_duration_s = self.min_duration_s.unwrap_or(s.rule.min_duration_s);
        s.rule.max_gap_s = self.max_gap_s.unwrap_or(s.rule.max_gap_s);
        s.smoothing = self.smoothing.unwrap_or(s.smoothing);
        if let Some(i) = &self.ignore {
            s.ignore = i.clone();
        }
        s.labels = self.labels.clone();
        s
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SourcesSection {
    pub rtsp_transport: Option<RtspTransport>,
    /// Threads per libav decoder (default: the cores shared among the inputs and the model).
    pub decode_threads: Option<u32>,
    /// Files decode at the lowest priority once the model is the bottleneck (default false).
    pub yield_to_model: Option<bool>,
    /// Files pause decoding while a batch runs on the CPU, as long as the model is the
    /// bottleneck (default true).
    pub decode_gate: Option<bool>,
    pub watchdog_s: Option<f64>,
    pub stall_timeout_s: Option<f64>,
    pub queue: Option<usize>,
    pub backoff_initial_s: Option<f64>,
    pub backoff_max_s: Option<f64>,
    pub max_reconnects: Option<u32>,
    /// Files open at once (the next starts as one ends); default: all.
    pub max_open: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamEntry {
    /// Name used in events (default: the URI with credentials redacted).
    pub id: Option<String>,
    pub uri: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    pub model: ModelSection,
    #[serde(default)]
    pub clips: ClipsSection,
    #[serde(default)]
    pub batch: BatchSection,
    #[serde(default)]
    pub output: OutputSection,
    #[serde(default)]
    pub sources: SourcesSection,
    pub controller: Option<ControllerSection>,
    pub http: Option<HttpSection>,
    pub segments: Option<SegmentsSection>,
    /// May be empty when the HTTP API is on: streams are then added through it.
    #[serde(default)]
    pub streams: Vec<StreamEntry>,
}

/// An optional number of seconds from the config, or the default.
fn secs(v: Option<f64>, default: Duration, what: &str) -> Result<Duration, String> {
    match v {
        None => Ok(default),
        Some(v) if v.is_finite() && v >= 0.0 => Ok(Duration::from_secs_f64(v)),
        Some(v) => Err(format!(
            "{what} must be a non-negative number of seconds, got {v}"
        )),
    }
}

impl PipelineConfig {
    pub fn load(path: &Path) -> Result<Self, PipelineError> {
        let text = std::fs::read_to_string(path).map_err(|e| PipelineError::Io {
            path: path.into(),
            error: e,
        })?;
        Self::parse(&text).map_err(|message| PipelineError::Invalid {
            path: path.into(),
            message,
        })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let cfg: PipelineConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        if cfg.streams.is_empty() && cfg.http.is_none() {
            return Err(
                "no [[streams]] given (and no [http] listen address to add them through)".into(),
            );
        }
        cfg.check()?;
        Ok(cfg)
    }

    /// A `mone worker`'s config: model, clips, batch, sources, controller, segments and the
    /// `[http]` allow-lists; its cameras come from the cluster, not from `[[streams]]`.
    pub fn load_worker(path: &Path) -> Result<Self, PipelineError> {
        let invalid = |message: String| PipelineError::Invalid {
            path: path.into(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| PipelineError::Io {
            path: path.into(),
            error: e,
        })?;
        Self::parse_worker(&text).map_err(invalid)
    }

    fn parse_worker(text: &str) -> Result<Self, String> {
        let cfg: PipelineConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        if !cfg.streams.is_empty() {
            return Err(
                "a worker's cameras come from the cluster (`mone streams add`), not [[streams]]"
                    .into(),
            );
        }
        // A worker would silently ignore it: its events go to the cluster's stream.
        if let Some(p) = &cfg.output.path {
            return Err(format!(
                "[output] path `{}`: a worker publishes its events to the cluster's events \
                 stream (read them with `mone events`), not to a file; remove `path`",
                p.display()
            ));
        }
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), String> {
        let cfg = self;
        if let Some(h) = &cfg.http {
            h.listen
                .parse::<std::net::SocketAddr>()
                .map_err(|e| format!("[http] listen `{}`: {e} (want IP:PORT)", h.listen))?;
        }
        cfg.controller_settings()?;
        let mut names = std::collections::HashSet::new();
        for s in cfg.streams() {
            if !names.insert(s.name.clone()) {
                return Err(format!(
                    "two streams are named `{}`: give them distinct ids",
                    s.name
                ));
            }
        }
        cfg.options()?;
        crate::sinks::config::validate_all(&cfg.output.sinks)
            .map_err(|e| format!("[[output.sinks]] {e}"))?;
        if cfg
            .output
            .drain_s
            .is_some_and(|d| !(d.is_finite() && d >= 0.0))
        {
            return Err("[output] drain_s must be a number >= 0".into());
        }
        Ok(())
    }

    pub fn streams(&self) -> Vec<StreamSpec> {
        self.streams
            .iter()
            .map(|s| {
                let mut spec = StreamSpec::from_input(&s.uri);
                if let Some(id) = &s.id {
                    spec.name = id.clone();
                }
                spec
            })
            .collect()
    }

    pub fn options(&self) -> Result<RuntimeOptions, String> {
        let d = RuntimeOptions::default();
        let s = &self.sources;
        Ok(RuntimeOptions {
            capacity: self.model.capacity,
            topk: self.output.topk.unwrap_or(d.topk),
            batch: self.batch.size.unwrap_or(d.batch),
            max_wait: self
                .batch
                .max_wait_ms
                .map_or(d.max_wait, Duration::from_millis),
            stride: self.clips.stride,
            step: self.clips.step.unwrap_or(d.step),
            tail: self.clips.tail.unwrap_or(d.tail),
            fps: self.clips.fps,
            resize: self.clips.resize.unwrap_or(d.resize),
            rtsp_transport: s.rtsp_transport.unwrap_or(d.rtsp_transport),
            decode_threads: match s.decode_threads {
                Some(0) => {
                    return Err(
                        "decode_threads must be at least 1 (leave it out for a share of the cores)"
                            .into(),
                    )
                }
                n => n,
            },
            yield_to_model: s.yield_to_model.unwrap_or(d.yield_to_model),
            decode_gate: s.decode_gate.unwrap_or(d.decode_gate),
            queue: s.queue.unwrap_or(d.queue),
            watchdog: secs(s.watchdog_s, d.watchdog, "watchdog_s")?,
            stall_timeout: secs(s.stall_timeout_s, d.stall_timeout, "stall_timeout_s")?,
            backoff_initial: secs(s.backoff_initial_s, d.backoff_initial, "backoff_initial_s")?,
            backoff_max: secs(s.backoff_max_s, d.backoff_max, "backoff_max_s")?,
            max_reconnects: s.max_reconnects,
            max_open: s.max_open,
            segments: self.segments.as_ref().map(|s| s.settings()),
            eos_timeout: d.eos_timeout,
            controller: None,
            stats_interval: match self.output.stats_interval_s {
                Some(0.0) => None,
                v => Some(secs(v, Duration::from_secs(10), "stats_interval_s")?),
            },
        })
    }

    /// The controller's settings when a latency target is configured. `min_capacity` defaults
    /// to 0.125, the smallest for 4 experts; the runtime checks it against the model.
    pub fn controller_settings(&self) -> Result<Option<ControllerSettings>, String> {
        let Some(c) = &self.controller else {
            return Ok(None);
        };
        let d = ControllerSettings::default();
        let adaptive = c.adaptive.unwrap_or(true);
        let (min, max) = if adaptive {
            (
                c.min_capacity.unwrap_or(d.min_capacity),
                c.max_capacity.unwrap_or(d.max_capacity),
            )
        } else {
            (self.model.capacity, self.model.capacity)
        };
        let s = ControllerSettings {
            latency_target_ms: c.latency_target_ms,
            min_capacity: min,
            max_capacity: max,
            percentile: c.percentile.unwrap_or(d.percentile),
            adaptive,
            ..d
        };
        s.validate().map_err(|e| format!("[controller] {e}"))?;
        Ok(Some(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_config_rejects_what_a_worker_would_ignore() {
        let model = "[model]\ncapacity = 0.5\n";
        let ok = PipelineConfig::parse_worker(model).unwrap();
        assert_eq!(ok.model.capacity, 0.5);
        let e = PipelineConfig::parse_worker(&format!("{model}[output]\npath = \"out.jsonl\"\n"))
            .unwrap_err();
        assert!(
            e.contains("[output] path `out.jsonl`") && e.contains("mone events"),
            "{e}"
        );
        let e = PipelineConfig::parse_worker(&format!(
            "{model}[[streams]]\nuri = \"test:pattern=ball\"\n"
        ))
        .unwrap_err();
        assert!(e.contains("[[streams]]"), "{e}");
    }

    #[test]
    fn parses_a_full_config_and_rejects_bad_ones() {
        let c = PipelineConfig::parse(
            r#"
            [model]
            dir = "models/mone-vivit-tiny-motion"
            capacity = 0.5
            [clips]
            stride = 8
            tail = "drop"
            resize = "letterbox"
            [batch]
            size = 8
            max_wait_ms = 50
            [sources]
            rtsp_transport = "udp"
            decode_threads = 1
            yield_to_model = true
            decode_gate = false
            watchdog_s = 2.5
            [[streams]]
            id = "door"
            uri = "rtsp://user:pw@10.0.0.2/s"
            [[streams]]
            uri = "test:pattern=ball"
            "#,
        )
        .unwrap();
        let o = c.options().unwrap();
        assert_eq!(
            (o.capacity, o.batch, o.stride, o.tail),
            (0.5, 8, Some(8), Tail::Drop)
        );
        assert_eq!(o.watchdog, Duration::from_millis(2500));
        assert_eq!(o.rtsp_transport, RtspTransport::Udp);
        assert_eq!(o.decode_threads, Some(1));
        assert!(o.yield_to_model);
        assert!(!RuntimeOptions::default().yield_to_model);
        assert!(!o.decode_gate && RuntimeOptions::default().decode_gate);
        let s = c.streams();
        assert_eq!(s[0].name, "door");
        assert_eq!(s[1].name, "test:pattern=ball");
        assert!(PipelineConfig::parse("[model]\ndir='m'\n")
            .unwrap_err()
            .contains("streams"));
        assert!(
            PipelineConfig::parse("[model]\ndir='m'\ncapcity=1\n[[streams]]\nuri='x'")
                .unwrap_err()
                .contains("capcity")
        );
        assert!(PipelineConfig::parse(
            "[model]\ndir='m'\n[sources]\nwatchdog_s=-1\n[[streams]]\nuri='x'"
        )
        .is_err());
        assert!(PipelineConfig::parse(
            "[model]\ndir='m'\n[sources]\ndecode_threads=0\n[[streams]]\nuri='x'"
        )
        .unwrap_err()
        .contains("decode_threads"));
        assert!(PipelineConfig::parse(
            "[model]\ndir='m'\n[[streams]]\nuri='x'\n[[streams]]\nuri='x'"
        )
        .unwrap_err()
        .contains("distinct"));
    }

    #[test]
    fn shipped_pipeline_configs_parse() {
        for (name, text) in [
            ("cameras", include_str!("../pipelines/cameras.toml")),
            ("files", include_str!("../pipelines/files.toml")),
            (
                "test-pattern",
                include_str!("../pipelines/test-pattern.toml"),
            ),
            ("adaptive", include_str!("../pipelines/adaptive.toml")),
        ] {
            let c = PipelineConfig::parse(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!c.streams().is_empty());
        }
        let c = PipelineConfig::parse(include_str!("../pipelines/cameras.toml")).unwrap();
        assert_eq!(c.options().unwrap().fps, Some(12.5));
        let s = c.controller_settings().unwrap().unwrap();
        assert_eq!((s.latency_target_ms, s.min_capacity), (1000.0, 0.25));
        assert_eq!(c.http.unwrap().listen, "127.0.0.1:9464");
    }

    #[test]
    fn segments_and_an_optional_model_dir() {
        let c = PipelineConfig::parse(
            "[model]\n[segments]\nenter=0.7\nsmoothing=1.0\nignore=[]\n[segments.labels.walk]\nmin_duration_s=3\n[[streams]]\nuri='x'",
        )
        .unwrap();
        assert_eq!(c.model.dir, None);
        let s = c.options().unwrap().segments.unwrap();
        assert_eq!((s.rule.enter, s.rule.exit, s.smoothing), (0.7, 0.3, 1.0));
        assert!(s.ignore.is_empty());
        assert_eq!(s.rule_for("walk").min_duration_s, 3.0);
        assert_eq!(s.rule_for("run").min_duration_s, 1.0);
        let none = PipelineConfig::parse("[model]\n[[streams]]\nuri='x'").unwrap();
        assert!(none.options().unwrap().segments.is_none());
        assert!(
            PipelineConfig::parse("[model]\n[segments]\nbogus=1\n[[streams]]\nuri='x'").is_err()
        );
    }

    #[test]
    fn the_http_access_rules_come_from_the_config() {
        let dir = std::env::temp_dir().join(format!("mone-http-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let token = dir.join("token");
        std::fs::write(&token, "  abc123\n").unwrap();
        let section = |extra: &str| {
            let text = format!(
                "[model]\ndir='m'\n[http]\nlisten='0.0.0.0:9464'\n{extra}\n[[streams]]\nuri='x'"
            );
            PipelineConfig::parse(&text).unwrap().http.unwrap()
        };
        let a = section(&format!(
            "token_file='{}'\nallow_schemes=['RTSP']\nallow_dirs=['{}']\nbody_limit=100\nopen_metrics=true",
            token.display(),
            dir.display()
        ))
        .access()
        .unwrap();
        assert_eq!(a.token.as_deref(), Some("abc123"));
        assert_eq!(a.allow_schemes, ["rtsp"]);
        assert_eq!(a.allow_dirs, [std::fs::canonicalize(&dir).unwrap()]);
        assert_eq!((a.body_limit, a.open_metrics), (100, true));
        let missing = section("token_file='/no/such/token'").access().unwrap_err();
        assert!(missing.contains("token_file"), "{missing}");
        let bad_dir = section(&format!(
            "token_file='{}'\nallow_dirs=['/no/such/dir']",
            token.display()
        ))
        .access()
        .unwrap_err();
        assert!(bad_dir.contains("allow_dirs"), "{bad_dir}");
        if std::env::var_os("MONE_API_TOKEN").is_none() {
            let open = section("").access().unwrap_err();
            assert!(open.contains("loopback"), "{open}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn controller_and_http_sections() {
        let base = "[model]\ndir='m'\ncapacity=0.5\n";
        let c = PipelineConfig::parse(&format!(
            "{base}[controller]\nlatency_target_ms=200\nadaptive=false\n[http]\nlisten='127.0.0.1:0'\n"
        ))
        .unwrap();
        // Not adaptive: pinned at the model's capacity.
        let s = c.controller_settings().unwrap().unwrap();
        assert_eq!(
            (s.min_capacity, s.max_capacity, s.adaptive),
            (0.5, 0.5, false)
        );
        assert!(c.streams.is_empty(), "streams may come from the API");
        assert_eq!(
            c.options().unwrap().stats_interval,
            Some(Duration::from_secs(10))
        );
        let bad = |extra: &str| {
            PipelineConfig::parse(&format!("{base}{extra}\n[[streams]]\nuri='x'")).unwrap_err()
        };
        assert!(bad("[controller]\nlatency_target_ms=-5").contains("latency_target_ms"));
        assert!(
            bad("[controller]\nlatency_target_ms=100\nmin_capacity=0.9\nmax_capacity=0.5")
                .contains("min_capacity")
        );
        assert!(bad("[controller]\nlatency_target_ms=100\npercentile=100").contains("percentile"));
        assert!(bad("[controller]\nlatency_target_ms=100\ntarget=1").contains("target"));
        assert!(bad("[http]\nlisten='localhost'").contains("listen"));
        assert!(PipelineConfig::parse(&format!(
            "{base}[output]\nstats_interval_s=0\n[[streams]]\nuri='x'"
        ))
        .unwrap()
        .options()
        .unwrap()
        .stats_interval
        .is_none());
        assert!(PipelineConfig::parse(base).unwrap_err().contains("[http]"));
    }
}
