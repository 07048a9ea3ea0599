//! NATS JetStream: each event is published to `<prefix>.<stream>.<event type>` with its stable
//! id as the message id, and counts as delivered when the server's publish ack arrives. The
//! stream's de-duplication window drops the copy a retry (or a redone file job) publishes.
//! Written to nats-server 2.9's feature set.

use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};

use super::{Deliver, DeliveryError};

/// The JetStream stream the events go to, and its de-duplication window.
pub const EVENTS_STREAM: &str = "MONE_EVENTS";
pub const DEDUP_WINDOW: Duration = Duration::from_secs(30 * 60);

/// A stream id as one subject token, reversibly: every byte outside `[A-Za-z0-9_-]` becomes
/// `%XX` (`.`, `*`, `>` and spaces would split or match subjects).
pub fn subject_token(s: &str) -> String {
    escape(s, b'%')
}

/// The inverse of [`subject_token`]; None for a token it cannot have written.
pub fn from_subject_token(t: &str) -> Option<String> {
    unescape(t, b'%')
}

/// A stream id as a KV key, reversibly: as [`subject_token`] with `=XX` (KV keys take no `%`).
pub fn kv_key(s: &str) -> String {
    escape(s, b'=')
}

pub fn from_kv_key(t: &str) -> Option<String> {
    unescape(t, b'=')
}

fn escape(s: &str, esc: u8) -> String {
    if s.is_empty() {
        return (esc as char).to_string();
    }
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push(esc as char);
            out.push_str(&format!("{b:02X}"));
        }
    }
    out
}

fn unescape(t: &str, esc: u8) -> Option<String> {
    if t.len() == 1 && t.as_bytes()[0] == esc {
        return Some(String::new());
    }
    let b = t.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == esc {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// An id that names what the event describes, the same whichever worker or attempt produced
/// it: the event's own `event_id` (every mone event has one); for other JSON, its stream and
/// type (the per-stream events), else its stream, type and time.
pub fn stable_id(event: &serde_json::Value) -> String {
    if let Some(id) = event.get("event_id").and_then(|v| v.as_str()) {
        return id.to_string();
    }
    let (stream, ty) = super::stream_and_type(event);
    match ty {
        "stream_started" | "stream_ended" | "stream_error" => format!("{stream}#{ty}"),
        _ => {
            let t = event.get("time").and_then(|v| v.as_str()).unwrap_or("");
            format!("{stream}#{ty}#{t}")
        }
    }
}

/// Creates the events stream when it is missing (limits retention, the de-duplication
/// window above).
pub async fn ensure_events_stream(
    js: &jetstream::Context,
    prefix: &str,
) -> Result<jetstream::stream::Stream, String> {
    js.get_or_create_stream(jetstream::stream::Config {
        name: EVENTS_STREAM.into(),
        subjects: vec![format!("{prefix}.>")],
        duplicate_window: DEDUP_WINDOW,
        ..Default::default()
    })
    .await
    .map_err(|e| format!("cannot open the JetStream stream {EVENTS_STREAM}: {e}"))
}

pub struct Nats {
    url: String,
    prefix: String,
    timeout: Duration,
    rt: tokio::runtime::Runtime,
    js: Option<jetstream::Context>,
}

impl Nats {
    pub fn new(url: &str, prefix: String, timeout: Duration) -> Result<Self, String> {
        if !url.starts_with("nats://") {
            return Err(format!("a nats url starts with nats:// (got {url:?})"));
        }
        if prefix.is_empty() || prefix.contains(['*', '>', ' ']) || prefix.ends_with('.') {
            return Err("subject_prefix must be a plain subject (no *, > or spaces)".into());
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            url: url.to_string(),
            prefix,
            timeout,
            rt,
            js: None,
        })
    }

    pub fn subject(&self, event: &serde_json::Value) -> String {
        let (stream, ty) = super::stream_and_type(event);
        format!(
            "{}.{}.{}",
            self.prefix,
            subject_token(stream),
            subject_token(ty)
        )
    }

    async fn connect(
        url: &str,
        prefix: &str,
        timeout: Duration,
    ) -> Result<jetstream::Context, String> {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(timeout)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connect(url)
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let mut js = jetstream::new(client);
        js.set_timeout(timeout);
        ensure_events_stream(&js, prefix).await?;
        Ok(js)
    }
}

impl Deliver for Nats {
    fn deliver(&mut self, event: &serde_json::Value, line: &str) -> Result<(), DeliveryError> {
        match self.deliver_many(&[(event.clone(), line.to_string())]) {
            (_, Some(e)) => Err(e),
            (_, None) => Ok(()),
        }
    }
    fn describe(&self) -> String {
        format!(
            "nats {} {}.>",
            crate::events::redact(&self.url),
            self.prefix
        )
    }
    /// Publishes pipelined: one ack wait per window instead of one per event.
    fn window(&self) -> usize {
        256
    }
    fn deliver_many(
        &mut self,
        events: &[(serde_json::Value, String)],
    ) -> (usize, Option<DeliveryError>) {
        let (url, prefix, timeout) = (self.url.clone(), self.prefix.clone(), self.timeout);
        let js = self.js.clone();
        let msgs: Vec<(String, String, String)> = events
            .iter()
            .map(|(v, l)| (self.subject(v), stable_id(v), l.clone()))
            .collect();
        let (done, r) = self.rt.block_on(async move {
            let js = match js {
                Some(js) => js,
                None => match tokio::time::timeout(timeout, Self::connect(&url, &prefix, timeout))
                    .await
                {
                    Ok(Ok(js)) => js,
                    Ok(Err(e)) => return (0, Err(e)),
                    Err(_) => return (0, Err("timed out connecting".to_string())),
                },
            };
            let mut acks = Vec::with_capacity(msgs.len());
            for (subject, id, payload) in msgs {
                let m = PublishMessage::build()
                    .payload(payload.into())
                    .message_id(id);
                match js.send_publish(subject, m).await {
                    Ok(a) => acks.push(a),
                    // Those sent before it may still be confirmed: a retry repeats them, and
                    // the stream's de-duplication drops the copies.
                    Err(e) => return (0, Err(e.to_string())),
                }
            }
            // In order: everything before the first failure is confirmed.
            let mut done = 0;
            for a in acks {
                match tokio::time::timeout(timeout, a).await {
                    Ok(Ok(_)) => done += 1,
                    Ok(Err(e)) => return (done, Err(e.to_string())),
                    Err(_) => return (done, Err("no publish ack in time".to_string())),
                }
            }
            (done, Ok(js))
        });
        match r {
            Ok(js) => {
                self.js = Some(js);
                (done, None)
            }
            Err(e) => {
                self.js = None;
                let why = format!("nats {}: {e}", crate::events::redact(&self.url));
                (done, Some(DeliveryError::Retry(why)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_tokens_round_trip_and_are_single_tokens() {
        for s in ["door", "rtsp://cam/x", "a.b*c>d e", "", "ünï%"] {
            let t = subject_token(s);
            assert!(!t.contains(['.', '*', '>', ' ']), "{t}");
            assert_eq!(from_subject_token(&t).as_deref(), Some(s));
        }
        assert_eq!(subject_token("rtsp://cam/x"), "rtsp%3A%2F%2Fcam%2Fx");
        assert_eq!(from_subject_token("%G1"), None);
        for s in ["door", "rtsp://u@cam:554/x?y=1", "", "a=b", "ünï%"] {
            let k = kv_key(s);
            assert!(
                k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_=".contains(&b)),
                "{k}"
            );
            assert_eq!(from_kv_key(&k).as_deref(), Some(s));
        }
    }

    #[test]
    fn stable_ids_name_what_the_event_describes() {
        let clip = serde_json::json!({"type": "clip", "event_id": "cam#3", "stream": "cam"});
        assert_eq!(stable_id(&clip), "cam#3");
        let ended = serde_json::json!({"type": "stream_ended", "stream": "cam", "time": "t1"});
        assert_eq!(stable_id(&ended), "cam#stream_ended");
        let off = serde_json::json!({"type": "offline", "stream": "cam", "time": "t1"});
        assert_eq!(stable_id(&off), "cam#offline#t1");
    }
}
