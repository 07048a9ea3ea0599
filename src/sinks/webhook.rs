//! HTTP webhook: each event is POSTed as JSON. A 2xx answer confirms it; 408, 429 and 5xx,
//! a timeout or no connection mean "try again"; any other status means the receiver will
//! never take it. `Idempotency-Key` carries the event's `event_id` (when it has one) so a
//! receiver can drop the duplicates a retry may cause.

use std::time::Duration;

use super::{Deliver, DeliveryError};

pub struct Webhook {
    url: String,
    token: Option<String>,
    client: reqwest::blocking::Client,
}

impl Webhook {
    pub fn new(url: &str, token: Option<String>, timeout: Duration) -> Result<Self, String> {
        reqwest::Url::parse(url).map_err(|e| format!("bad url: {e}"))?;
        let client = reqwest::blocking::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("mone/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Self {
            url: url.to_string(),
            token,
            client,
        })
    }
}

/// What a status code means for the event.
pub fn classify_status(code: u16) -> Option<bool> {
    match code {
        200..=299 => None,
        408 | 425 | 429 | 500..=599 => Some(true),
        _ => Some(false),
    }
}

impl Deliver for Webhook {
    fn deliver(&mut self, event: &serde_json::Value, line: &str) -> Result<(), DeliveryError> {
        let mut req = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(line.to_string());
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(id) = event.get("event_id").and_then(|v| v.as_str()) {
            req = req.header("Idempotency-Key", id);
        }
        let resp = req.send().map_err(|e| {
            let why = if e.is_timeout() {
                "timed out".to_string()
            } else if e.is_connect() {
                "cannot connect".to_string()
            } else {
                e.to_string()
            };
            DeliveryError::Retry(format!("{}: {why}", crate::events::redact(&self.url)))
        })?;
        let code = resp.status().as_u16();
        match classify_status(code) {
            None => Ok(()),
            Some(retry) => {
                let why = format!("{} answered {code}", crate::events::redact(&self.url));
                Err(if retry {
                    DeliveryError::Retry(why)
                } else {
                    DeliveryError::Reject(why)
                })
            }
        }
    }
    fn describe(&self) -> String {
        format!("webhook {}", crate::events::redact(&self.url))
    }
}

#[cfg(test)]
mod tests {
    use super::classify_status;

    #[test]
    fn statuses_split_into_done_retry_and_refused() {
        assert_eq!(classify_status(204), None);
        for c in [408, 429, 500, 503] {
            assert_eq!(classify_status(c), Some(true), "{c}");
        }
        for c in [400, 401, 404, 413] {
            assert_eq!(classify_status(c), Some(false), "{c}");
        }
    }
}
