//! Video sources: the only code that touches GStreamer. Every input runs in its own pipeline
//! ending in an appsink that delivers RGB frames at the model's size with their PTS.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;
use gstreamer_video::prelude::*;

use crate::clip::Frame;
use crate::failure::{self, ErrorClass, Failure, Probe, RawError};

mod convert;
mod diagnose;
mod files;
mod gate;
mod priority;

use diagnose::{check_uri, code_of, domain_of, probe, set_checked, without_position};
pub use files::{decode_file, decode_input, write_rgb_video, write_test_video};
pub use gate::ModelGate;
pub use priority::{is_lowered, DecodeThreads, Registered};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{0}: no such file")]
    NotFound(String),
    #[error("invalid input `{0}`: {1}")]
    Invalid(String, String),
    #[error("GStreamer: {0}")]
    Gst(String),
}

impl SourceError {
    /// The failure a stream reports when its pipeline cannot even be built.
    pub fn failure(&self) -> Failure {
        let class = match self {
            SourceError::NotFound(_) => ErrorClass::NotFound,
            SourceError::Invalid(..) => ErrorClass::BadUri,
            SourceError::Gst(_) => ErrorClass::Internal,
        };
        Failure::new(class, self.to_string(), "")
    }
}

/// How frames are fitted to the model's square input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resize {
    /// Crop the centre to the target aspect ratio, then scale.
    #[default]
    Crop,
    /// Scale the whole frame and pad with black borders.
    Letterbox,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RtspTransport {
    /// Interleaved in the RTSP TCP connection: works through NAT and firewalls.
    #[default]
    Tcp,
    Udp,
    /// Let rtspsrc try UDP, then TCP.
    Auto,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SourceOptions {
    pub width: u32,
    pub height: u32,
    /// Frame rate the model expects (frames are dropped or duplicated by `videorate`);
    /// None keeps the input's rate.
    pub fps: Option<f64>,
    pub resize: Resize,
    pub rtsp_transport: RtspTransport,
    /// Threads of a libav (`avdec_*`) decoder; None: libav's own choice, one per core (the
    /// runtime passes [`threads_per_decoder`]'s share instead).
    pub decode_threads: Option<u32>,
    /// A group whose threads the pipeline's streaming threads join, so that the runtime can
    /// lower a file's decoding below the model (see [`DecodeThreads`]); None: GStreamer's own.
    pub threads: Option<DecodeThreads>,
    /// Decode only while the model does not run (see [`ModelGate`]); None: decode freely.
    pub gate: Option<ModelGate>,
}

/// A `test:` source: `test:pattern=ball,frames=64,fps=25,live=false,width=320,height=240`.
#[derive(Clone, Debug, PartialEq)]
pub struct TestSpec {
    pub pattern: String,
    /// Frames before EOS; None: endless.
    pub frames: Option<u64>,
    pub fps: u32,
    pub live: bool,
    pub width: u32,
    pub height: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    Uri(String),
    Test(TestSpec),
}

impl Input {
    /// A file path (checked to exist), a URI, or a `test:` source.
    pub fn parse(s: &str) -> Result<Self, SourceError> {
        crate::events::register_secrets(s);
        if let Some(rest) = s.strip_prefix("test:") {
            let mut t = TestSpec {
                pattern: "ball".into(),
                frames: None,
                fps: 25,
                live: true,
                width: 320,
                height: 240,
            };
            for kv in rest.split([',', '&']).filter(|p| !p.is_empty()) {
                let (k, v) = kv.split_once('=').ok_or_else(|| {
                    SourceError::Invalid(s.into(), format!("`{kv}` is not key=value"))
                })?;
                let bad = |e: String| SourceError::Invalid(s.into(), format!("{k}: {e}"));
                match k {
                    "pattern" => t.pattern = v.to_string(),
                    "frames" => {
                        t.frames = Some(
                            v.parse()
                                .map_err(|e: std::num::ParseIntError| bad(e.to_string()))?,
                        )
                    }
                    "fps" => {
                        t.fps = v
                            .parse()
                            .map_err(|e: std::num::ParseIntError| bad(e.to_string()))?
                    }
                    "live" => {
                        t.live = v
                            .parse()
                            .map_err(|e: std::str::ParseBoolError| bad(e.to_string()))?
                    }
                    "width" => {
                        t.width = v
                            .parse()
                            .map_err(|e: std::num::ParseIntError| bad(e.to_string()))?
                    }
                    "height" => {
                        t.height = v
                            .parse()
                            .map_err(|e: std::num::ParseIntError| bad(e.to_string()))?
                    }
                    _ => {
                        return Err(bad(
                            "unknown key (pattern, frames, fps, live, width, height)".into(),
                        ))
                    }
                }
            }
            if t.fps == 0 || t.width == 0 || t.height == 0 {
                return Err(SourceError::Invalid(
                    s.into(),
                    "fps, width and height must be positive".into(),
                ));
            }
            return Ok(Input::Test(t));
        }
        if s.contains("://") {
            // fdsrc reads any descriptor of this process by number, GStreamer's own wake-up
            // pipes included (reading one hung the bus): only stdin is an input.
            if s.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("fd://")) && &s[5..] != "0" {
                return Err(SourceError::Invalid(
                    crate::events::redact_text(s),
                    "fd:// inputs read a descriptor of mone's own: only fd://0 (stdin) is accepted"
                        .into(),
                ));
            }
            if let Some(path) = s.strip_prefix("file://") {
                if !Path::new(path).exists() {
                    return Err(SourceError::NotFound(s.into()));
                }
            }
            return Ok(Input::Uri(s.to_string()));
        }
        let p = Path::new(s);
        if !p.exists() {
            return Err(SourceError::NotFound(s.into()));
        }
        if p.is_dir() {
            return Err(SourceError::Invalid(s.into(), "is a directory".into()));
        }
        let abs =
            std::fs::canonicalize(p).map_err(|e| SourceError::Invalid(s.into(), e.to_string()))?;
        let uri = gst::glib::filename_to_uri(&abs, None)
            .map_err(|e| SourceError::Invalid(s.into(), e.to_string()))?;
        Ok(Input::Uri(uri.to_string()))
    }

    /// The URI scheme, lower case (`test` for a test source).
    pub fn scheme(&self) -> String {
        match self {
            Input::Test(_) => "test".into(),
            Input::Uri(u) => u
                .split_once(':')
                .map_or(String::new(), |(s, _)| s.to_ascii_lowercase()),
        }
    }

    /// Live inputs run in real time, reconnect when they fail and may drop clips. An HTTP input
    /// is live only when it turns out to have no duration (a camera's stream, live HLS): see
    /// [`Input::liveness_known`] and [`SourcePipeline::has_duration`].
    pub fn is_live(&self) -> bool {
        match self {
            Input::Test(t) => t.live,
            Input::Uri(_) => LIVE_SCHEMES.contains(&self.scheme().as_str()),
        }
    }

    /// [`Input::is_live`] of an input spec, without touching the file system: a path is never
    /// live, so a list of 100,000 files is not stat'ed twice.
    pub fn spec_is_live(spec: &str) -> bool {
        (spec.contains("://") || spec.starts_with("test:"))
            && Input::parse(spec).is_ok_and(|i| i.is_live())
    }

    /// False for inputs whose liveness shows only once they play (HTTP).
    pub fn liveness_known(&self) -> bool {
        !matches!(self.scheme().as_str(), "http" | "https")
    }

    /// Inputs read over a network: transient failures (refused, lost, timed out) reconnect.
    pub fn is_network(&self) -> bool {
        let s = self.scheme();
        LIVE_SCHEMES.contains(&s.as_str()) || matches!(s.as_str(), "http" | "https")
    }
}

/// Schemes whose sources are live streams (no duration, real time).
const LIVE_SCHEMES: &[&str] = &[
    "rtsp", "rtspu", "rtspt", "rtsph", "rtsps", "rtspsu", "rtspst", "rtspsh", "udp", "rtp", "srt",
    "rist", "rtmp", "rtmps", "rtmpt", "rtmpe", "rtmpte", "rtmpts", "rtmfp", "icy", "icyx", "rfb",
];

/// The elements of mone's own pipelines and the usual demuxers and decoders, loaded at start.
/// A plugin is loaded on first use, under the dynamic loader's process-wide lock: a third-party
/// plugin whose load hangs (a URI check of a scheme someone configured) would otherwise block
/// every healthy stream that loads its first element after it.
const PRELOAD: &[&str] = &[
    "queue",
    "capsfilter",
    "videotestsrc",
    "videorate",
    "videocrop",
    "videoscale",
    "videoconvert",
    "appsink",
    "uridecodebin",
    "decodebin",
    "typefind",
    "filesrc",
    "qtdemux",
    "matroskademux",
    "h264parse",
    "avdec_h264",
    "jpegdec",
    "multipartdemux",
];

/// Threads per libav decoder when `open` inputs decode at once beside the model on `cores`
/// cores: an equal share of the cores with one share left for the model, at least 1. On 2
/// cores one thread each beat libav's one per core both for one 720p stream (full pipeline
/// 3-9% faster) and for four files open at once (`mone classify` 11-12% faster, 15% less
/// memory).
pub fn threads_per_decoder(cores: usize, open: usize) -> u32 {
    (cores / (open.max(1) + 1)).max(1).min(u32::MAX as usize) as u32
}

/// [`threads_per_decoder`] on this machine's cores.
pub fn default_decode_threads(open: usize) -> u32 {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    threads_per_decoder(cores, open)
}

pub fn init() -> Result<(), SourceError> {
    gst::init().map_err(|e| SourceError::Gst(format!("cannot initialise GStreamer: {e}")))?;
    static PRELOADED: std::sync::Once = std::sync::Once::new();
    PRELOADED.call_once(|| {
        for name in PRELOAD {
            // A missing one is reported where it is used (`make`), with its package.
            if let Some(f) = gst::ElementFactory::find(name) {
                let _ = f.load();
            }
        }
    });
    Ok(())
}

/// What a pull from a running source gives.
#[derive(Debug)]
pub enum Pulled {
    Frame(Frame),
    /// Nothing within the timeout.
    Idle,
    Eos,
    Error(Failure),
}

/// One running pipeline.
pub struct SourcePipeline {
    pipeline: gst::Pipeline,
    sink: gst_app::AppSink,
    bus: gst::Bus,
    width: usize,
    height: usize,
    index: u64,
    /// The URI, for probing its host when a network source fails without saying why.
    uri: Option<String>,
    /// The pipeline already ended (EOS or an error): stopping it waits for no EOS.
    ended: bool,
    /// The container's creation time (its `datetime` tag), Unix nanoseconds.
    created_unix_ns: Option<i64>,
    /// An RTSP sender's wall clock minus the stream's PTS (nanoseconds), from the NTP times of
    /// its RTCP sender reports; None until the first report (or for other inputs).
    ntp_offset: Arc<std::sync::Mutex<Option<i64>>>,
}

/// 1900-01-01 (NTP's epoch) to 1970-01-01, nanoseconds.
const NTP_TO_UNIX_NS: i64 = 2_208_988_800 * 1_000_000_000;

/// rtspsrc: its rtpbin attaches each RTP packet's sender wall-clock time (from the RTCP sender
/// reports, as `timestamp/x-ntp` reference timestamp meta), and a probe on rtspsrc's output
/// keeps sender time minus PTS. Read there, it does not depend on depayloaders and decoders
/// passing the meta on; they keep the PTS, so a decoded frame's capture time is its PTS plus
/// that offset.
fn track_rtcp_time(src: &gst::Element, offset: Arc<std::sync::Mutex<Option<i64>>>) {
    src.connect("new-manager", false, |args| {
        if let Some(bin) = args.get(1).and_then(|v| v.get::<gst::Element>().ok()) {
            set_checked(&bin, "add-reference-timestamp-meta", "true");
        }
        None
    });
    let ntp_caps = gst::Caps::new_empty_simple("timestamp/x-ntp");
    src.connect_pad_added(move |_, pad| {
        let (offset, ntp_caps) = (offset.clone(), ntp_caps.clone());
        pad.add_probe(gst::PadProbeType::BUFFER, move |_, info| {
            if let Some(buf) = info.buffer() {
                let ntp = buf
                    .iter_meta::<gst::ReferenceTimestampMeta>()
                    .find(|m| m.reference().can_intersect(&ntp_caps))
                    .map(|m| m.timestamp().nseconds() as i64);
                if let (Some(ntp), Some(pts)) = (ntp, buf.pts()) {
                    if let Ok(mut o) = offset.lock() {
                        *o = Some(ntp - NTP_TO_UNIX_NS - pts.nseconds() as i64);
                    }
                }
            }
            gst::PadProbeReturn::Ok
        });
    });
}

/// The longest a frame waits for the model, so that a batch that hangs cannot stall decoding.
const GATE_WAIT: Duration = Duration::from_millis(200);

fn fraction(fps: f64) -> gst::Fraction {
    // Rational with a denominator of 1000 is exact for the usual 12.5, 29.97, ...
    let num = (fps * 1000.0).round() as i32;
    gst::Fraction::new(num.max(1), 1000)
}

fn make(factory: &str) -> Result<gst::Element, SourceError> {
    gst::ElementFactory::make(factory)
        .build()
        .map_err(|_| SourceError::Gst(format!("element `{factory}` is missing (is the GStreamer plugin package installed? see scripts/setup.sh)")))
}

impl SourcePipeline {
    pub fn new(input: &Input, opts: &SourceOptions) -> Result<Self, SourceError> {
        init()?;
        let gerr = |e: gst::glib::BoolError| SourceError::Gst(e.to_string());
        let ntp_offset = Arc::new(std::sync::Mutex::new(None));
        let pipeline = gst::Pipeline::new();
        let (chain, sink) = convert::chain(opts)?;
        let queue = chain[0].clone();
        if let Some(g) = &opts.gate {
            // The decoder's thread pushes into the queue, the conversion's into the appsink.
            for pad in [queue.static_pad("sink"), sink.static_pad("sink")]
                .into_iter()
                .flatten()
            {
                let g = g.clone();
                pad.add_probe(gst::PadProbeType::BUFFER, move |_, _| {
                    g.wait(GATE_WAIT);
                    gst::PadProbeReturn::Ok
                });
            }
        }
        pipeline.add_many(&chain).map_err(gerr)?;
        // Link without the caps check: the crop's caps depend on the input's size, unknown
        // until uridecodebin adds its pad.
        for w in chain.windows(2) {
            w[0].link_pads_full(Some("src"), &w[1], Some("sink"), gst::PadLinkCheck::empty())
                .map_err(|e| {
                    SourceError::Gst(format!(
                        "cannot link {} to {}: {e}",
                        w[0].name(),
                        w[1].name()
                    ))
                })?;
        }

        match input {
            Input::Test(t) => {
                let src = make("videotestsrc")?;
                src.set_property_from_str("pattern", &t.pattern);
                src.set_property("is-live", t.live);
                if let Some(n) = t.frames {
                    src.set_property("num-buffers", n.min(i32::MAX as u64) as i32);
                }
                let cf = make("capsfilter")?;
                cf.set_property(
                    "caps",
                    gst::Caps::builder("video/x-raw")
                        .field("width", t.width as i32)
                        .field("height", t.height as i32)
                        .field("framerate", gst::Fraction::new(t.fps as i32, 1))
                        .build(),
                );
                pipeline.add_many([&src, &cf]).map_err(gerr)?;
                gst::Element::link_many([&src, &cf, &queue]).map_err(gerr)?;
            }
            Input::Uri(uri) => {
                check_uri(uri)?;
                let dec = make("uridecodebin")?;
                dec.set_property("uri", uri);
                let transport = opts.rtsp_transport;
                let rtcp = ntp_offset.clone();
                dec.connect("source-setup", false, move |args| {
                    // The source element depends on the URI scheme (rtspsrc, srtsrc, souphttpsrc,
                    // ...), and a property of one name has other types in each (srtsrc's
                    // latency is a gint, rtspsrc's a guint); this runs inside GStreamer, where a
                    // panic cannot unwind and would abort every stream.
                    let setup = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        if let Some(src) = args.get(1).and_then(|v| v.get::<gst::Element>().ok()) {
                            let p = match transport {
                                RtspTransport::Tcp => "tcp",
                                RtspTransport::Udp => "udp",
                                RtspTransport::Auto => "udp+tcp",
                            };
                            set_checked(&src, "protocols", p);
                            set_checked(&src, "latency", "200");
                            if src.factory().is_some_and(|f| f.name() == "rtspsrc") {
                                track_rtcp_time(&src, rtcp.clone());
                            }
                        }
                    }));
                    if setup.is_err() {
                        eprintln!("warning: the source element could not be configured");
                    }
                    None
                });
                // An HTTP camera's MJPEG (multipart/x-mixed-replace) never says it has no more
                // parts, and decodebin waits for that before it exposes the video.
                let decode_threads = opts.decode_threads;
                if let Some(bin) = dec.dynamic_cast_ref::<gst::Bin>() {
                    bin.connect_deep_element_added(move |_, _, el| {
                        let Some(factory) = el.factory() else {
                            return;
                        };
                        if factory.name() == "multipartdemux" {
                            set_checked(el, "single-stream", "true");
                        }
                        if let Some(n) = decode_threads {
                            if factory.name().starts_with("avdec_") {
                                set_checked(el, "max-threads", &n.to_string());
                            }
                        }
                    });
                }
                let queue_weak = queue.downgrade();
                dec.connect_pad_added(move |_, pad| {
                    let Some(queue) = queue_weak.upgrade() else {
                        return;
                    };
                    let is_video = pad
                        .current_caps()
                        .or_else(|| Some(pad.query_caps(None)))
                        .and_then(|c| c.structure(0).map(|s| s.name().starts_with("video/")))
                        .unwrap_or(false);
                    if let Some(sinkpad) = queue.static_pad("sink") {
                        if is_video && !sinkpad.is_linked() {
                            let _ = pad.link(&sinkpad);
                        }
                    }
                });
                pipeline.add(&dec).map_err(gerr)?;
            }
        }
        let bus = pipeline
            .bus()
            .ok_or_else(|| SourceError::Gst("pipeline without a bus".into()))?;
        if let Some(g) = &opts.threads {
            g.adopt_streaming_threads(&bus);
        }
        Ok(Self {
            pipeline,
            sink,
            bus,
            width: opts.width as usize,
            height: opts.height as usize,
            index: 0,
            uri: match input {
                Input::Uri(u) => Some(u.clone()),
                Input::Test(_) => None,
            },
            ended: false,
            created_unix_ns: None,
            ntp_offset,
        })
    }

    /// When the sender captured the frame with this (source) PTS, on its wall clock as its
    /// RTCP sender reports give it (Unix nanoseconds); None without sender reports.
    pub fn sender_time_ns(&self, pts_ns: u64) -> Option<i64> {
        let o = (*self.ntp_offset.lock().ok()?)?;
        Some(pts_ns as i64 + o)
    }

    pub fn start(&self) -> Result<(), SourceError> {
        self.pipeline
            .set_state(gst::State::Playing)
            .map(|_| ())
            .map_err(|_| SourceError::Gst("the pipeline refused to start".into()))
    }

    fn bus_error(&mut self) -> Option<Failure> {
        while let Some(msg) = self
            .bus
            .pop_filtered(&[gst::MessageType::Error, gst::MessageType::Tag])
        {
            if let gst::MessageView::Tag(t) = msg.view() {
                if self.created_unix_ns.is_none() {
                    self.created_unix_ns = t
                        .tags()
                        .get::<gst::tags::DateTime>()
                        .and_then(|d| d.get().to_g_date_time().ok())
                        .map(|d| d.to_unix() * 1_000_000_000 + d.microsecond() as i64 * 1000);
                }
                continue;
            }
            if let gst::MessageView::Error(e) = msg.view() {
                let dbg = e.debug().map(|d| d.to_string()).unwrap_or_default();
                let debug = dbg
                    .lines()
                    .map(without_position)
                    .filter(|l| !l.is_empty())
                    .collect::<Vec<_>>()
                    .join(" ")
                    .chars()
                    .take(300)
                    .collect::<String>();
                let raw = RawError {
                    domain: domain_of(&e.error()),
                    code: code_of(&e.error()),
                    message: e.error().message().to_string(),
                    debug,
                    element: e.src().map(|s| s.name().to_string()).unwrap_or_default(),
                };
                let uri = self.uri.clone();
                return Some(failure::classify(&raw, self.index > 0, move || {
                    uri.as_deref().map_or(Probe::Skipped, probe)
                }));
            }
        }
        None
    }

    /// When the file was made, from its container's `datetime` tag (Unix nanoseconds), once the
    /// demuxer has posted it.
    pub fn created_unix_ns(&self) -> Option<i64> {
        self.created_unix_ns
    }

    /// Whether the pipeline knows the input's duration (asked once it plays): an HTTP input
    /// without one is a live stream.
    pub fn has_duration(&self) -> bool {
        self.pipeline
            .query_duration::<gst::ClockTime>()
            .is_some_and(|d| d > gst::ClockTime::ZERO)
    }

    /// Start without waiting: some elements (an HTTP source whose server stalls, say) block the
    /// state change itself, and the caller's watchdog must keep running meanwhile. A failure
    /// shows up as an error on the bus, or as no frames.
    pub fn start_in_background(&self) -> Result<(), SourceError> {
        let p = self.pipeline.clone();
        std::thread::Builder::new()
            .name("source-start".into())
            .spawn(move || {
                if p.set_state(gst::State::Playing).is_err() {
                    gst::element_error!(
                        p,
                        gst::CoreError::StateChange,
                        ["the pipeline refused to start"]
                    );
                }
            })
            .map(|_| ())
            .map_err(|e| SourceError::Gst(format!("cannot start a thread: {e}")))
    }

    /// Wait up to `timeout` for the next frame.
    pub fn pull(&mut self, timeout: Duration) -> Pulled {
        let p = self.pull_inner(timeout);
        if matches!(p, Pulled::Eos | Pulled::Error(_)) {
            self.ended = true;
        }
        p
    }

    fn pull_inner(&mut self, timeout: Duration) -> Pulled {
        if let Some(e) = self.bus_error() {
            return Pulled::Error(e);
        }
        match self
            .sink
            .try_pull_sample(gst::ClockTime::from_nseconds(timeout.as_nanos() as u64))
        {
            Some(sample) => match self.frame(&sample) {
                Ok(f) => Pulled::Frame(f),
                Err(e) => Pulled::Error(Failure::new(
                    ErrorClass::Internal,
                    "a decoded frame could not be read",
                    e,
                )),
            },
            None => {
                if let Some(e) = self.bus_error() {
                    Pulled::Error(e)
                } else if self.sink.current_state() >= gst::State::Paused && self.sink.is_eos() {
                    // appsink reports EOS before it has started, too.
                    Pulled::Eos
                } else {
                    Pulled::Idle
                }
            }
        }
    }

    fn frame(&mut self, sample: &gst::Sample) -> Result<Frame, String> {
        let buffer = sample.buffer().ok_or("sample without buffer")?;
        let caps = sample.caps().ok_or("sample without caps")?;
        let info = gst_video::VideoInfo::from_caps(caps).map_err(|e| e.to_string())?;
        let vf = gst_video::VideoFrameRef::from_buffer_ref_readable(buffer, &info)
            .map_err(|e| e.to_string())?;
        let (w, h) = (self.width, self.height);
        if vf.width() as usize != w || vf.height() as usize != h {
            return Err(format!(
                "frame is {}x{}, expected {w}x{h}",
                vf.width(),
                vf.height()
            ));
        }
        let stride = vf.plane_stride()[0] as usize;
        let data = vf.plane_data(0).map_err(|e| e.to_string())?;
        // Rows can be padded: copy row by row using the plane stride.
        let mut rgb = Vec::with_capacity(w * h * 3);
        for row in 0..h {
            rgb.extend_from_slice(&data[row * stride..row * stride + w * 3]);
        }
        let f = Frame {
            rgb: Arc::new(rgb),
            width: w,
            height: h,
            index: self.index,
            pts_ns: buffer.pts().map_or(0, |t| t.nseconds()),
            duration_ns: buffer.duration().map_or(0, |t| t.nseconds()),
        };
        self.index += 1;
        Ok(f)
    }

    /// Send EOS, wait for it on the bus at most `timeout` (a dead source never sends it), then
    /// stop the pipeline. A pipeline that has ended already is stopped at once: its EOS
    /// message is gone (reading errors off the bus discards the rest), and waiting for it cost
    /// the full timeout, 2 s, per file.
    pub fn stop(self, timeout: Duration) {
        if !self.ended && self.pipeline.current_state() == gst::State::Playing {
            self.pipeline.send_event(gst::event::Eos::new());
            let deadline = std::time::Instant::now() + timeout;
            loop {
                // Keep draining the appsink so upstream is never blocked on a full queue.
                while self.sink.try_pull_sample(gst::ClockTime::ZERO).is_some() {}
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                let wait = left.min(Duration::from_millis(50));
                if let Some(m) = self.bus.timed_pop_filtered(
                    gst::ClockTime::from_nseconds(wait.as_nanos() as u64),
                    &[gst::MessageType::Eos, gst::MessageType::Error],
                ) {
                    let _ = m;
                    break;
                }
            }
        }
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

impl Drop for SourcePipeline {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoders_share_the_cores_with_the_model() {
        assert_eq!(threads_per_decoder(2, 1), 1);
        assert_eq!(threads_per_decoder(2, 4), 1);
        assert_eq!(threads_per_decoder(16, 1), 8);
        assert_eq!(threads_per_decoder(16, 3), 4);
        assert_eq!(threads_per_decoder(32, 16), 1);
        assert_eq!(threads_per_decoder(64, 7), 8);
        assert_eq!(threads_per_decoder(1, 0), 1);
    }

    #[test]
    fn parses_inputs() {
        assert!(matches!(
            Input::parse("/no/such/file.mp4"),
            Err(SourceError::NotFound(_))
        ));
        assert!(matches!(
            Input::parse("file:///no/such/file.mp4"),
            Err(SourceError::NotFound(_))
        ));
        let t = Input::parse("test:pattern=ball,frames=10,live=false").unwrap();
        assert!(!t.is_live());
        match t {
            Input::Test(t) => assert_eq!(
                (t.pattern.as_str(), t.frames, t.fps),
                ("ball", Some(10), 25)
            ),
            _ => panic!(),
        }
        assert!(Input::parse("test:frames=x").is_err());
        assert!(Input::parse("test:bogus=1").is_err());
        assert!(Input::parse("rtsp://127.0.0.1:8554/x").unwrap().is_live());
        assert!(!Input::parse("http://example.invalid/a.mp4")
            .unwrap()
            .is_live());
        assert!(Input::parse("/tmp").is_err());
        assert!(Input::parse("fd://0").is_ok());
        assert!(matches!(
            Input::parse("fd://127.0.0.1:1/x"),
            Err(SourceError::Invalid(..))
        ));
    }

    #[test]
    fn init_loads_the_plugins_of_our_own_elements() {
        init().unwrap();
        for name in [
            "videotestsrc",
            "videoconvert",
            "appsink",
            "uridecodebin",
            "queue",
        ] {
            let plugin = gst::ElementFactory::find(name)
                .and_then(|f| f.plugin())
                .unwrap_or_else(|| panic!("{name} has no plugin"));
            assert!(plugin.is_loaded(), "{name}'s plugin is not loaded");
        }
    }
}
