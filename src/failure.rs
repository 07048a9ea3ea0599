//! Why an input failed, in classes a user can act on: each failure carries its class, a
//! sentence saying what happened and the raw (redacted) GStreamer text. Pure: the source turns
//! GStreamer's error (domain, code, message, debug) into a [`RawError`], [`classify`] does the
//! rest, and the runtime decides from [`ErrorClass::is_permanent`] whether to reconnect.

use serde::{Deserialize, Serialize};

use crate::events::redact_text;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// No such file, or the server has no such stream (HTTP or RTSP 404).
    NotFound,
    /// The input is malformed or no GStreamer source takes it.
    BadUri,
    ConnectionRefused,
    /// The connection or the stream was lost after it worked, or the peer ended it.
    NetworkLost,
    AuthFailed,
    /// No video stream in the input (audio only, or not a media file at all).
    NoVideo,
    /// A video stream no installed decoder handles.
    UnsupportedCodec,
    /// The container or the stream cannot be parsed or decoded.
    CorruptData,
    /// No frame, end or error for longer than the watchdog or stall timeout.
    Timeout,
    Internal,
}

impl ErrorClass {
    pub const ALL: [ErrorClass; 10] = [
        ErrorClass::NotFound,
        ErrorClass::BadUri,
        ErrorClass::ConnectionRefused,
        ErrorClass::NetworkLost,
        ErrorClass::AuthFailed,
        ErrorClass::NoVideo,
        ErrorClass::UnsupportedCodec,
        ErrorClass::CorruptData,
        ErrorClass::Timeout,
        ErrorClass::Internal,
    ];

    /// Retrying cannot help: the stream ends with a `stream_error` instead of reconnecting.
    pub fn is_permanent(self) -> bool {
        matches!(
            self,
            ErrorClass::NotFound
                | ErrorClass::BadUri
                | ErrorClass::AuthFailed
                | ErrorClass::NoVideo
                | ErrorClass::UnsupportedCodec
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::NotFound => "not_found",
            ErrorClass::BadUri => "bad_uri",
            ErrorClass::ConnectionRefused => "connection_refused",
            ErrorClass::NetworkLost => "network_lost",
            ErrorClass::AuthFailed => "auth_failed",
            ErrorClass::NoVideo => "no_video",
            ErrorClass::UnsupportedCodec => "unsupported_codec",
            ErrorClass::CorruptData => "corrupt_data",
            ErrorClass::Timeout => "timeout",
            ErrorClass::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A classified failure. Both texts are redacted when it is made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub class: ErrorClass,
    /// One sentence for people.
    pub reason: String,
    /// What GStreamer said (empty when the failure is our own finding).
    pub detail: String,
}

impl Failure {
    pub fn new(class: ErrorClass, reason: impl AsRef<str>, detail: impl AsRef<str>) -> Self {
        Self {
            class,
            reason: redact_text(reason.as_ref()),
            detail: redact_text(detail.as_ref()),
        }
    }

    /// `reason`, prefixed: "gave up after 3 reconnects: ...".
    pub fn context(mut self, prefix: &str) -> Self {
        self.reason = format!("{prefix}: {}", self.reason);
        self
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.reason, self.class)
    }
}

/// GStreamer's error domains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Domain {
    Core,
    Library,
    Resource,
    Stream,
    Other,
}

/// A GStreamer error as plain data: `code` is the error enum's variant in snake case
/// (`not_found`, `not_authorized`, `type_not_found`, `missing_plugin`, ...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawError {
    pub domain: Domain,
    pub code: String,
    pub message: String,
    pub debug: String,
    /// The element that posted it.
    pub element: String,
}

/// What a TCP connection to the input's host told, for failures a network source reports
/// only as a generic stream error (souphttpsrc says "Internal data stream error" for a
/// refused connection).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    Refused(String),
    Unresolved(String),
    TimedOut(String),
    /// The host accepts connections: the failure is further on.
    Reachable,
    /// Not probed (not a TCP input).
    Skipped,
}

/// `text` (lower case) contains one of `needles`.
fn has(text: &str, needles: &[&str]) -> bool {
    needles.iter().any(|n| text.contains(n))
}

/// Classify a GStreamer error. `probe` is asked only when the text leaves a network failure's
/// cause open; `had_frames` tells a lost stream from one that never started.
pub fn classify(e: &RawError, had_frames: bool, probe: impl FnOnce() -> Probe) -> Failure {
    let text = format!("{} {}", e.message, e.debug).to_ascii_lowercase();
    let detail = if e.debug.is_empty() {
        format!("{} ({})", e.message, e.element)
    } else {
        format!("{} ({}: {})", e.message, e.element, e.debug)
    };
    let f = |class, reason: &str| Failure::new(class, reason, &detail);
    let code = e.code.as_str();
    if has(
        &text,
        &[
            "no element accepted uri",
            "invalid rtsp uri",
            "no uri handler",
            "uri lacks",
            "invalid uri",
        ],
    ) {
        return f(ErrorClass::BadUri, "no GStreamer source takes this URI");
    }
    if code == "not_authorized"
        || has(
            &text,
            &[
                "unauthorized",
                "(401)",
                "forbidden",
                "(403)",
                "not authorized",
            ],
        )
    {
        return f(
            ErrorClass::AuthFailed,
            "the server refused the credentials (or none were given)",
        );
    }
    if (e.domain == Domain::Resource && code == "not_found") || has(&text, &["(404)"]) {
        return f(
            ErrorClass::NotFound,
            if has(&text, &["http", "rtsp", "url"]) {
                "the server has no such stream or file"
            } else {
                "no such file"
            },
        );
    }
    if has(&text, &["not-linked"]) {
        return f(ErrorClass::NoVideo, "the input has no video stream");
    }
    if e.domain == Domain::Stream && matches!(code, "type_not_found" | "wrong_type") {
        return f(
            ErrorClass::NoVideo,
            "not a video: GStreamer did not recognise its format",
        );
    }
    if code == "missing_plugin" || code == "codec_not_found" || has(&text, &["missing a plug-in"]) {
        return f(
            ErrorClass::UnsupportedCodec,
            "no installed decoder handles this input's video",
        );
    }
    if e.domain == Domain::Stream && matches!(code, "decode" | "demux" | "format" | "decrypt") {
        return f(
            ErrorClass::CorruptData,
            "the input is damaged or truncated: it could not be parsed or decoded",
        );
    }
    if has(&text, &["timed out", "timeout"]) {
        return f(ErrorClass::Timeout, "the connection timed out");
    }
    if has(&text, &["connection refused"]) {
        return f(ErrorClass::ConnectionRefused, "the connection was refused");
    }
    let network = e.domain == Domain::Resource
        || has(
            &text,
            &["connect", "socket", "streaming stopped, reason error"],
        );
    if network {
        return match probe() {
            Probe::Refused(at) => f(
                ErrorClass::ConnectionRefused,
                &format!("the connection to {at} was refused"),
            ),
            Probe::Unresolved(host) => f(
                ErrorClass::ConnectionRefused,
                &format!("the host name {host} does not resolve"),
            ),
            Probe::TimedOut(at) => f(
                ErrorClass::Timeout,
                &format!("the connection to {at} timed out"),
            ),
            Probe::Reachable | Probe::Skipped if had_frames => {
                f(ErrorClass::NetworkLost, "the stream was lost")
            }
            Probe::Reachable => f(
                ErrorClass::NetworkLost,
                "the host accepts connections, but the stream failed",
            ),
            Probe::Skipped if e.domain == Domain::Resource => f(
                ErrorClass::ConnectionRefused,
                "the source could not connect or open the input",
            ),
            Probe::Skipped => f(ErrorClass::Internal, "the pipeline failed"),
        };
    }
    f(ErrorClass::Internal, "the pipeline failed")
}

/// Host and port of a network URI, with the scheme's default port; None when there is no host.
pub fn host_port(uri: &str) -> Option<(String, u16)> {
    let (scheme, rest) = uri.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let hostport = authority.rsplit('@').next()?;
    let default = match scheme.to_ascii_lowercase().as_str() {
        "http" | "icy" | "icyx" => 80,
        "https" => 443,
        "rtsp" | "rtspt" | "rtsph" => 554,
        "rtsps" | "rtspst" | "rtspsh" => 322,
        "rtmp" | "rtmpt" => 1935,
        "rtmps" => 443,
        "rfb" => 5900,
        _ => return None,
    };
    let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
        let (h, p) = h.split_once(']')?;
        (
            h.to_string(),
            p.strip_prefix(':').and_then(|p| p.parse().ok()),
        )
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p.parse().ok()?)),
            None => (hostport.to_string(), None),
        }
    };
    if host.is_empty() {
        return None;
    }
    Some((host, port.unwrap_or(default)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(domain: Domain, code: &str, message: &str, debug: &str) -> RawError {
        RawError {
            domain,
            code: code.into(),
            message: message.into(),
            debug: debug.into(),
            element: "source".into(),
        }
    }

    fn class(e: &RawError, probe: Probe) -> ErrorClass {
        classify(e, false, || probe).class
    }

    #[test]
    fn classifies_what_gstreamer_reports() {
        // The messages GStreamer 1.22 posts for these inputs.
        let audio_only = raw(
            Domain::Stream,
            "failed",
            "Internal data stream error.",
            "streaming stopped, reason not-linked (-1)",
        );
        assert_eq!(class(&audio_only, Probe::Skipped), ErrorClass::NoVideo);
        let text_file = raw(
            Domain::Stream,
            "type_not_found",
            "Could not determine type of stream.",
            "",
        );
        assert_eq!(class(&text_file, Probe::Skipped), ErrorClass::NoVideo);
        let truncated = raw(
            Domain::Stream,
            "demux",
            "This file contains no playable streams.",
            "no known streams found",
        );
        assert_eq!(class(&truncated, Probe::Skipped), ErrorClass::CorruptData);
        let http_404 = raw(
            Domain::Resource,
            "not_found",
            "File not found",
            "File not found (404), URL: http://u:secret@h/x.mp4",
        );
        let f = classify(&http_404, false, || Probe::Skipped);
        assert_eq!(f.class, ErrorClass::NotFound);
        assert!(!f.detail.contains("secret"), "{}", f.detail);
        let invalid = raw(
            Domain::Core,
            "missing_plugin",
            "Invalid RTSP URI",
            "No element accepted URI 'rtsp://onlyuser@h/cam'",
        );
        assert_eq!(class(&invalid, Probe::Skipped), ErrorClass::BadUri);
        let unauthorized = raw(Domain::Resource, "not_authorized", "Unauthorized", "");
        assert_eq!(class(&unauthorized, Probe::Skipped), ErrorClass::AuthFailed);
        let codec = raw(
            Domain::Core,
            "missing_plugin",
            "Your GStreamer installation is missing a plug-in.",
            "",
        );
        assert_eq!(class(&codec, Probe::Skipped), ErrorClass::UnsupportedCodec);
    }

    #[test]
    fn a_generic_network_error_is_told_apart_by_the_probe() {
        let soup = raw(
            Domain::Stream,
            "failed",
            "Internal data stream error.",
            "streaming stopped, reason error (-5)",
        );
        assert_eq!(
            class(&soup, Probe::Refused("127.0.0.1:1".into())),
            ErrorClass::ConnectionRefused
        );
        assert_eq!(
            class(&soup, Probe::TimedOut("10.0.0.1:80".into())),
            ErrorClass::Timeout
        );
        assert_eq!(
            classify(&soup, true, || Probe::Reachable).class,
            ErrorClass::NetworkLost
        );
        let rtsp = raw(
            Domain::Resource,
            "open_read_write",
            "Could not open resource for reading and writing.",
            "Failed to connect. (Generic error)",
        );
        assert_eq!(
            class(&rtsp, Probe::Refused("127.0.0.1:1".into())),
            ErrorClass::ConnectionRefused
        );
        // Not a network error: the probe is never asked.
        let f = classify(
            &raw(Domain::Core, "negotiation", "not negotiated", ""),
            false,
            || panic!("probed"),
        );
        assert_eq!(f.class, ErrorClass::Internal);
    }

    #[test]
    fn permanent_and_transient_classes() {
        let permanent: Vec<_> = ErrorClass::ALL
            .iter()
            .filter(|c| c.is_permanent())
            .map(|c| c.as_str())
            .collect();
        assert_eq!(
            permanent,
            [
                "not_found",
                "bad_uri",
                "auth_failed",
                "no_video",
                "unsupported_codec"
            ]
        );
        for c in ErrorClass::ALL {
            assert_eq!(
                serde_json::to_string(&c).unwrap(),
                format!("\"{}\"", c.as_str())
            );
        }
    }

    #[test]
    fn host_and_port_of_network_uris() {
        assert_eq!(
            host_port("rtsp://u:p@cam.local/x"),
            Some(("cam.local".into(), 554))
        );
        assert_eq!(
            host_port("http://127.0.0.1:8080/a.mp4"),
            Some(("127.0.0.1".into(), 8080))
        );
        assert_eq!(host_port("https://[::1]/a"), Some(("::1".into(), 443)));
        assert_eq!(host_port("file:///a.mp4"), None);
        assert_eq!(host_port("srt://h:9000"), None);
    }
}
