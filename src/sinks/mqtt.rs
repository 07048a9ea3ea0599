//! MQTT: each event is published with QoS 1 to `<prefix>/<stream>/<event type>` and counts as
//! delivered when the broker's PUBACK arrives. A failed attempt drops the connection (and with
//! it anything the client had queued), so a retry publishes the event exactly once more.

use std::time::{Duration, Instant};

use rumqttc::{Client, Connection, Event, MqttOptions, Packet, QoS};

use super::{Deliver, DeliveryError};

pub struct Mqtt {
    host: String,
    port: u16,
    client_id: String,
    prefix: String,
    timeout: Duration,
    conn: Option<(Client, Connection)>,
}

/// `mqtt://host[:port]` (1883 by default).
pub fn parse_url(url: &str) -> Result<(String, u16), String> {
    let rest = url.strip_prefix("mqtt://").ok_or_else(|| {
        format!("an mqtt url starts with mqtt:// (got {url:?}; TLS is not supported)")
    })?;
    let rest = rest.trim_end_matches('/');
    if rest.contains('@') || rest.contains('/') {
        return Err("an mqtt url is mqtt://host[:port], with no user or path".into());
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("bad port {p:?} in {url:?}"))?,
        ),
        None => (rest, 1883),
    };
    if host.is_empty() {
        return Err(format!("no host in {url:?}"));
    }
    Ok((
        host.trim_matches(|c| c == '[' || c == ']').to_string(),
        port,
    ))
}

/// A stream id as one topic level: `/`, `+`, `#`, `%` and control characters are
/// percent-encoded (they would split the level or act as wildcards); an empty id is `_`.
pub fn topic_level(s: &str) -> String {
    if s.is_empty() {
        return "_".into();
    }
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '/' | '+' | '#' | '%' | '\0'..='\x1f' | '\x7f' => {
                let mut b = [0u8; 4];
                for byte in c.encode_utf8(&mut b).bytes() {
                    out.push_str(&format!("%{byte:02X}"));
                }
            }
            c => out.push(c),
        }
    }
    out
}

impl Mqtt {
    pub fn new(
        url: &str,
        client_id: String,
        prefix: String,
        timeout: Duration,
    ) -> Result<Self, String> {
        let (host, port) = parse_url(url)?;
        if prefix.contains(['+', '#']) {
            return Err("topic_prefix may not hold + or #".into());
        }
        Ok(Self {
            host,
            port,
            client_id,
            prefix: prefix.trim_end_matches('/').to_string(),
            timeout,
            conn: None,
        })
    }

    pub fn topic(&self, event: &serde_json::Value) -> String {
        let (stream, ty) = super::stream_and_type(event);
        format!(
            "{}/{}/{}",
            self.prefix,
            topic_level(stream),
            topic_level(ty)
        )
    }

    fn connect(&mut self, deadline: Instant) -> Result<(), String> {
        let mut o = MqttOptions::new(&self.client_id, &self.host, self.port);
        o.set_keep_alive(Duration::from_secs(15));
        o.set_clean_session(true);
        o.set_max_packet_size(16 << 20, 16 << 20);
        let (client, mut conn) = Client::new(o, 16);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("timed out connecting".into());
            }
            match conn.recv_timeout(left) {
                Ok(Ok(Event::Incoming(Packet::ConnAck(a)))) => {
                    if a.code != rumqttc::ConnectReturnCode::Success {
                        return Err(format!("broker refused the connection: {:?}", a.code));
                    }
                    self.conn = Some((client, conn));
                    return Ok(());
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err("timed out connecting".into()),
            }
        }
    }
}

impl Deliver for Mqtt {
    fn deliver(&mut self, event: &serde_json::Value, line: &str) -> Result<(), DeliveryError> {
        let deadline = Instant::now() + self.timeout;
        let target = format!("{}:{}", self.host, self.port);
        if self.conn.is_none() {
            self.connect(deadline)
                .map_err(|e| DeliveryError::Retry(format!("mqtt {target}: {e}")))?;
        }
        let topic = self.topic(event);
        let result = (|| {
            let (client, conn) = self.conn.as_mut().ok_or("not connected")?;
            client
                .publish(topic, QoS::AtLeastOnce, false, line.as_bytes().to_vec())
                .map_err(|e| e.to_string())?;
            // One event in flight at a time, so the next PUBACK is this event's.
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match conn.recv_timeout(left.max(Duration::from_millis(1))) {
                    Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => return Ok(()),
                    Ok(Ok(_)) if !left.is_zero() => {}
                    Ok(Ok(_)) | Err(_) => return Err("no PUBACK in time".to_string()),
                    Ok(Err(e)) => return Err(e.to_string()),
                }
            }
        })();
        result.map_err(|e: String| {
            self.conn = None;
            DeliveryError::Retry(format!("mqtt {target}: {e}"))
        })
    }
    fn describe(&self) -> String {
        format!("mqtt {}:{} {}/...", self.host, self.port, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_a_default_port() {
        assert_eq!(parse_url("mqtt://h").unwrap(), ("h".into(), 1883));
        assert_eq!(
            parse_url("mqtt://127.0.0.1:1999/").unwrap(),
            ("127.0.0.1".into(), 1999)
        );
        assert!(parse_url("mqtts://h").is_err());
        assert!(parse_url("mqtt://u:p@h").is_err());
        assert!(parse_url("mqtt://h:x").is_err());
    }

    #[test]
    fn stream_ids_become_one_safe_topic_level() {
        assert_eq!(topic_level("door"), "door");
        assert_eq!(topic_level("rtsp://cam/1"), "rtsp:%2F%2Fcam%2F1");
        assert_eq!(topic_level("a+b#c%"), "a%2Bb%23c%25");
        assert_eq!(topic_level(""), "_");
        let m = Mqtt::new(
            "mqtt://h",
            "id".into(),
            "site/a/".into(),
            Duration::from_secs(1),
        )
        .unwrap();
        let v = serde_json::json!({"type": "segment_ended", "stream": "x/y"});
        assert_eq!(m.topic(&v), "site/a/x%2Fy/segment_ended");
    }
}
