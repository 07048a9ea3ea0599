//! `[[output.sinks]]`: one table per alert sink.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{Deliver, SinkError, EVENT_TYPES};

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    Webhook,
    Mqtt,
    Nats,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkSpec {
    /// Names the spool folder; unique per pipeline.
    pub name: String,
    pub kind: SinkKind,
    /// webhook: the http(s) URL events are POSTed to; mqtt: `mqtt://host:port`; nats:
    /// `nats://host:port`.
    pub url: String,
    /// Event types this sink gets (default: all).
    pub events: Option<Vec<String>>,
    /// webhook: a bearer token, or the environment variable holding one (preferred: the
    /// pipeline file then holds no secret).
    pub token: Option<String>,
    pub token_env: Option<String>,
    /// Seconds one attempt may take (default 5).
    pub timeout_s: Option<f64>,
    /// First wait after a failed attempt (default 0.5 s), doubling up to `retry_max_s` (30 s).
    pub retry_initial_s: Option<f64>,
    pub retry_max_s: Option<f64>,
    /// mqtt: topics are `<topic_prefix>/<stream>/<event type>` (default prefix "mone").
    pub topic_prefix: Option<String>,
    /// nats: subjects are `<subject_prefix>.<stream>.<event type>` (default "mone.events").
    pub subject_prefix: Option<String>,
    /// mqtt: the client id (default `mone-<name>`).
    pub client_id: Option<String>,
    /// Undelivered events kept at most, in MiB (default 1024).
    pub spool_max_mib: Option<f64>,
    /// Beyond `spool_max_mib`: `drop_newest` (the default) refuses new events, `drop_oldest`
    /// evicts the oldest undelivered ones; either way they are counted as dropped.
    pub when_full: Option<super::spool::WhenFull>,
}

impl SinkSpec {
    /// A sink of `kind` to `url` with every other setting at its default.
    pub fn new(name: &str, kind: SinkKind, url: &str) -> Self {
        Self {
            name: name.into(),
            kind,
            url: url.into(),
            events: None,
            token: None,
            token_env: None,
            timeout_s: None,
            retry_initial_s: None,
            retry_max_s: None,
            topic_prefix: None,
            subject_prefix: None,
            client_id: None,
            spool_max_mib: None,
            when_full: None,
        }
    }

    pub fn spool_max_bytes(&self) -> u64 {
        (self.spool_max_mib.unwrap_or(1024.0).max(0.001) * 1024.0 * 1024.0) as u64
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout_s.unwrap_or(5.0).clamp(0.05, 600.0))
    }

    fn err(&self, reason: impl Into<String>) -> SinkError {
        SinkError::Config {
            name: self.name.clone(),
            reason: reason.into(),
        }
    }

    /// Checks the table; says what is wrong with it.
    pub fn validate(&self) -> Result<(), SinkError> {
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(self.err("name must be letters, digits, '-' or '_' (it names a folder)"));
        }
        if let Some(ev) = &self.events {
            for e in ev {
                if !EVENT_TYPES.contains(&e.as_str()) {
                    return Err(self.err(format!(
                        "unknown event type {e:?}; known: {}",
                        EVENT_TYPES.join(", ")
                    )));
                }
            }
        }
        for (what, v) in [
            ("timeout_s", self.timeout_s),
            ("retry_initial_s", self.retry_initial_s),
            ("retry_max_s", self.retry_max_s),
            ("spool_max_mib", self.spool_max_mib),
        ] {
            if v.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
                return Err(self.err(format!("{what} must be a positive number")));
            }
        }
        match self.kind {
            SinkKind::Webhook => {
                if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
                    return Err(self.err("a webhook url starts with http:// or https://"));
                }
                if self.topic_prefix.is_some() || self.client_id.is_some() {
                    return Err(self.err("topic_prefix and client_id are for mqtt sinks"));
                }
            }
            SinkKind::Mqtt => {
                super::mqtt::parse_url(&self.url).map_err(|r| self.err(r))?;
                if self.token.is_some() || self.token_env.is_some() {
                    return Err(self.err("token and token_env are for webhook sinks"));
                }
            }
            SinkKind::Nats => {
                if !self.url.starts_with("nats://") {
                    return Err(self.err("a nats url starts with nats://"));
                }
                if self.token.is_some() || self.token_env.is_some() || self.client_id.is_some() {
                    return Err(self.err("token, token_env and client_id are not for nats sinks"));
                }
            }
        }
        if self.subject_prefix.is_some() && self.kind != SinkKind::Nats {
            return Err(self.err("subject_prefix is for nats sinks"));
        }
        if self.token.is_some() && self.token_env.is_some() {
            return Err(self.err("give token or token_env, not both"));
        }
        Ok(())
    }

    /// The bearer token, read from its environment variable when named so.
    pub fn bearer(&self) -> Result<Option<String>, SinkError> {
        match (&self.token, &self.token_env) {
            (Some(t), _) => Ok(Some(t.clone())),
            (None, Some(var)) => std::env::var(var)
                .map(Some)
                .map_err(|_| self.err(format!("token_env {var} is not set"))),
            (None, None) => Ok(None),
        }
    }

    /// The receiver this table describes.
    pub fn connect(&self) -> Result<Box<dyn Deliver>, SinkError> {
        self.validate()?;
        Ok(match self.kind {
            SinkKind::Webhook => Box::new(
                super::webhook::Webhook::new(&self.url, self.bearer()?, self.timeout())
                    .map_err(|r| self.err(r))?,
            ),
            SinkKind::Mqtt => Box::new(
                super::mqtt::Mqtt::new(
                    &self.url,
                    self.client_id
                        .clone()
                        .unwrap_or_else(|| format!("mone-{}", self.name)),
                    self.topic_prefix.clone().unwrap_or_else(|| "mone".into()),
                    self.timeout(),
                )
                .map_err(|r| self.err(r))?,
            ),
            SinkKind::Nats => Box::new(
                super::nats::Nats::new(
                    &self.url,
                    self.subject_prefix
                        .clone()
                        .unwrap_or_else(|| "mone.events".into()),
                    self.timeout(),
                )
                .map_err(|r| self.err(r))?,
            ),
        })
    }
}

/// Where spools live by default: `$XDG_STATE_HOME/mone/spool`, else `~/.local/state/mone/spool`,
/// else a folder under the system's temporary directory.
pub fn default_spool_root() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("mone/spool");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(h).join(".local/state/mone/spool");
    }
    std::env::temp_dir().join("mone-spool")
}

/// Checks a list of sinks: each valid, names unique.
pub fn validate_all(specs: &[SinkSpec]) -> Result<(), SinkError> {
    for (i, s) in specs.iter().enumerate() {
        s.validate()?;
        if specs[..i].iter().any(|o| o.name == s.name) {
            return Err(s.err("two sinks have this name"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(t: &str) -> Result<SinkSpec, String> {
        let s: SinkSpec = toml::from_str(t).map_err(|e| e.to_string())?;
        s.validate().map_err(|e| e.to_string())?;
        Ok(s)
    }

    #[test]
    fn valid_tables_parse_and_bad_ones_say_why() {
        assert!(
            spec("name='a'\nkind='webhook'\nurl='https://x/y'\nevents=['segment_ended']").is_ok()
        );
        assert!(spec("name='m'\nkind='mqtt'\nurl='mqtt://127.0.0.1:1883'").is_ok());
        let e =
            spec("name='a'\nkind='webhook'\nurl='https://x'\nevents=['segment_end']").unwrap_err();
        assert!(
            e.contains("unknown event type") && e.contains("segment_ended"),
            "{e}"
        );
        let e = spec("name='a b'\nkind='webhook'\nurl='https://x'").unwrap_err();
        assert!(e.contains("name"), "{e}");
        let e = spec("name='a'\nkind='webhook'\nurl='ftp://x'").unwrap_err();
        assert!(e.contains("http"), "{e}");
        let e = spec("name='a'\nkind='mqtt'\nurl='tcp://x'").unwrap_err();
        assert!(e.contains("mqtt://"), "{e}");
        let e = spec("name='a'\nkind='webhook'\nurl='http://x'\ntimeout_s=0").unwrap_err();
        assert!(e.contains("timeout_s"), "{e}");
        assert!(spec("name='a'\nkind='webhook'\nurl='http://x'\nretries=3").is_err());
    }

    #[test]
    fn duplicate_names_are_refused() {
        let a = spec("name='a'\nkind='webhook'\nurl='http://x'").unwrap();
        let e = validate_all(&[a.clone(), a]).unwrap_err().to_string();
        assert!(e.contains("two sinks"), "{e}");
    }
}
