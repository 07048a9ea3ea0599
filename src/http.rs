//! The HTTP API, off unless configured: `GET /healthz`, `GET /metrics` (Prometheus text),
//! `GET /streams`, `POST /streams` (`{"uri": ..., "id": ...}`), `DELETE /streams/{id}`. It runs
//! on its own thread with a one-thread tokio runtime, reads [`Telemetry`] and asks the runtime
//! to add or remove streams through [`Control`] messages.
//!
//! Access ([`ApiAccess`]): with a token, every route but `/healthz` (and `/metrics` when left
//! open) wants `Authorization: Bearer <token>`; without one the API may bind loopback only. A
//! new stream's URI scheme must be allowed, a file only under an allowed folder, and the answer
//! to a path outside those never tells whether it exists.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use crossbeam_channel::Sender;
use serde::Deserialize;

use crate::events::redact_text;
use crate::metrics::Telemetry;
use crate::runtime::{Control, ControlError, StreamSpec};

/// Who may use the API and what it may add.
#[derive(Clone, Debug)]
pub struct ApiAccess {
    /// The bearer token; None: open, and loopback only.
    pub token: Option<String>,
    /// URI schemes `POST /streams` takes (`test` for test sources); files are governed by
    /// `allow_dirs` alone.
    pub allow_schemes: Vec<String>,
    /// Folders under which a file may be added (none: no files).
    pub allow_dirs: Vec<std::path::PathBuf>,
    /// Largest request body, bytes; beyond it: 413.
    pub body_limit: usize,
    /// `/metrics` without the token (for Prometheus scrapers).
    pub open_metrics: bool,
}

impl Default for ApiAccess {
    fn default() -> Self {
        Self {
            token: None,
            allow_schemes: ["rtsp", "rtsps", "http", "https", "srt", "test"]
                .map(String::from)
                .to_vec(),
            allow_dirs: Vec::new(),
            body_limit: 64 * 1024,
            open_metrics: false,
        }
    }
}

/// Equal bytes, in time that depends on the lengths only.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why `POST /streams` refuses an input by policy (403), or None.
pub(crate) fn refused_by_policy(access: &ApiAccess, input: &str) -> Option<String> {
    let scheme = if input.starts_with("test:") {
        "test".to_string()
    } else if let Some((s, _)) = input.split_once("://") {
        s.to_ascii_lowercase()
    } else {
        "file".to_string()
    };
    if scheme != "file" && !access.allow_schemes.iter().any(|a| a == &scheme) {
        return Some(format!(
            "`{scheme}` inputs are not allowed here (allowed: {}; see [http] allow_schemes)",
            access.allow_schemes.join(", ")
        ));
    }
    if scheme != "file" {
        return None;
    }
    let path = std::path::Path::new(input.strip_prefix("file://").unwrap_or(input));
    let outside =
        || Some("files may be added only under the folders in [http] allow_dirs".to_string());
    // Lexically first: no `..`, and relative paths are never under an absolute folder.
    if !path.is_absolute()
        || path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return outside();
    }
    let under = |p: &std::path::Path| access.allow_dirs.iter().any(|d| p.starts_with(d));
    if !under(path) {
        return outside();
    }
    // Then through symlinks, when it exists (inside an allowed folder, a missing file may say so).
    match std::fs::canonicalize(path) {
        Ok(real) if !under(&real) => outside(),
        _ => None,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("HTTP API: bad listen address `{0}` (want IP:PORT, e.g. 127.0.0.1:9464)")]
    Address(String),
    #[error("HTTP API: cannot listen on {0}: {1}")]
    Bind(String, std::io::Error),
    #[error("HTTP API: {0}")]
    Runtime(std::io::Error),
    #[error("HTTP API: {0} is not a loopback address, and no token is set: set [http] token_file or MONE_API_TOKEN, or listen on 127.0.0.1")]
    Open(String),
    #[error("HTTP API: the token is empty")]
    EmptyToken,
}

/// More Prometheus text for `/metrics` (a worker's cluster gauges).
pub type ExtraMetrics = Arc<dyn Fn() -> String + Send + Sync>;

#[derive(Clone)]
struct AppState {
    telemetry: Arc<Telemetry>,
    control: Sender<Control>,
    access: Arc<ApiAccess>,
    extra: Option<ExtraMetrics>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddStream {
    uri: String,
    id: Option<String>,
}

/// A running server; dropping it stops it.
pub struct HttpServer {
    pub addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn error(status: StatusCode, message: String) -> Response {
    (
        status,
        Json(serde_json::json!({ "error": redact_text(&message) })),
    )
        .into_response()
}

async fn authorize(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let open = path == "/healthz" || (path == "/metrics" && s.access.open_metrics);
    if let (Some(token), false) = (&s.access.token, open) {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !same(given.trim().as_bytes(), token.as_bytes()) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                Json(serde_json::json!({ "error": "a valid bearer token is required" })),
            )
                .into_response();
        }
    }
    next.run(req).await
}

/// Send a control message and wait for the runtime's answer (it answers between batches).
async fn ask(
    control: &Sender<Control>,
    make: impl FnOnce(Sender<Result<(), ControlError>>) -> Control,
) -> Result<(), Response> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    control.send(make(tx)).map_err(|_| {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the pipeline has stopped".into(),
        )
    })?;
    let answer = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
        .await
        .ok()
        .and_then(|r| r.ok());
    match answer {
        None => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the pipeline did not answer".into(),
        )),
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => {
            let status = match e {
                ControlError::Duplicate(_) | ControlError::StillStopping(_) => StatusCode::CONFLICT,
                ControlError::BadInput(_) => StatusCode::BAD_REQUEST,
                ControlError::NotFound(_) => StatusCode::NOT_FOUND,
                ControlError::Stopping => StatusCode::SERVICE_UNAVAILABLE,
            };
            Err(error(status, e.to_string()))
        }
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn metrics(State(s): State<AppState>) -> Response {
    let mut text = s.telemetry.render();
    if let Some(extra) = &s.extra {
        text.push_str(&extra());
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn list(State(s): State<AppState>) -> Response {
    let mut streams = s.telemetry.streams();
    for i in &mut streams {
        i.id = redact_text(&i.id);
        i.uri = redact_text(&i.uri);
    }
    Json(streams).into_response()
}

async fn add(
    State(s): State<AppState>,
    body: Result<Json<AddStream>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let a = match body {
        Ok(Json(a)) => a,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the request body is over {} bytes ([http] body_limit)",
                    s.access.body_limit
                ),
            )
        }
        Err(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "send JSON: {\"uri\": \"rtsp://...\", \"id\": \"name\"}".into(),
            )
        }
    };
    if let Some(why) = refused_by_policy(&s.access, a.uri.trim()) {
        return error(StatusCode::FORBIDDEN, why);
    }
    let mut spec = StreamSpec::from_input(a.uri.trim());
    if let Some(id) = a.id {
        if id.trim().is_empty() {
            return error(StatusCode::BAD_REQUEST, "id must not be empty".into());
        }
        spec.name = id;
    }
    let name = spec.name.clone();
    match ask(&s.control, |reply| Control::Add {
        stream: spec,
        reply,
    })
    .await
    {
        Ok(()) => (StatusCode::CREATED, Json(serde_json::json!({ "id": name }))).into_response(),
        Err(r) => r,
    }
}

async fn remove(State(s): State<AppState>, Path(id): Path<String>) -> Response {
    match ask(&s.control, |reply| Control::Remove {
        id: id.clone(),
        reply,
    })
    .await
    {
        Ok(()) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({ "id": id, "state": "stopping" })),
        )
            .into_response(),
        Err(r) => r,
    }
}

/// Bind `listen` and serve on a background thread.
pub fn serve(
    listen: &str,
    access: ApiAccess,
    telemetry: Arc<Telemetry>,
    control: Sender<Control>,
) -> Result<HttpServer, HttpError> {
    serve_with(listen, access, telemetry, control, None)
}

/// [`serve`], with `extra` appended to `/metrics`.
pub fn serve_with(
    listen: &str,
    access: ApiAccess,
    telemetry: Arc<Telemetry>,
    control: Sender<Control>,
    extra: Option<ExtraMetrics>,
) -> Result<HttpServer, HttpError> {
    let addr: SocketAddr = listen
        .parse()
        .map_err(|_| HttpError::Address(listen.to_string()))?;
    if access.token.is_none() && !addr.ip().is_loopback() {
        return Err(HttpError::Open(listen.to_string()));
    }
    if access.token.as_deref().is_some_and(|t| t.trim().is_empty()) {
        return Err(HttpError::EmptyToken);
    }
    let std_listener =
        std::net::TcpListener::bind(addr).map_err(|e| HttpError::Bind(listen.to_string(), e))?;
    std_listener
        .set_nonblocking(true)
        .map_err(HttpError::Runtime)?;
    let addr = std_listener.local_addr().map_err(HttpError::Runtime)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(HttpError::Runtime)?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/streams", get(list).post(add))
        .route("/streams/{id}", delete(remove))
        .layer(DefaultBodyLimit::max(access.body_limit));
    let state = AppState {
        telemetry,
        control,
        access: Arc::new(access),
        extra,
    };
    let app = app
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ))
        .with_state(state);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let listener = {
        let _guard = rt.enter();
        tokio::net::TcpListener::from_std(std_listener).map_err(HttpError::Runtime)?
    };
    let thread = std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            rt.block_on(async move {
                let server = axum::serve(listener, app).with_graceful_shutdown(async {
                    let _ = rx.await;
                });
                if let Err(e) = server.await {
                    eprintln!("mone: HTTP API stopped: {e}");
                }
            });
        })
        .map_err(HttpError::Runtime)?;
    Ok(HttpServer {
        addr,
        shutdown: Some(tx),
        thread: Some(thread),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"ab"));
        assert!(!same(b"", b"a"));
    }

    #[test]
    fn the_policy_takes_allowed_schemes_and_files_under_allowed_folders_only() {
        let dir = std::env::temp_dir().join(format!("mone-http-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dir = std::fs::canonicalize(&dir).unwrap();
        let access = ApiAccess {
            allow_dirs: vec![dir.clone()],
            ..ApiAccess::default()
        };
        assert_eq!(refused_by_policy(&access, "rtsp://cam/x"), None);
        assert_eq!(refused_by_policy(&access, "test:pattern=ball"), None);
        assert!(refused_by_policy(&access, "udp://0.0.0.0:5000").is_some());
        assert!(refused_by_policy(&access, "fd://0").is_some());
        let inside = dir.join("a.mp4");
        assert_eq!(
            refused_by_policy(&access, &inside.display().to_string()),
            None
        );
        let uri = format!("file://{}", inside.display());
        assert_eq!(refused_by_policy(&access, &uri), None);
        // Outside, existing or not, the same answer.
        let a = refused_by_policy(&access, "/etc/passwd");
        let b = refused_by_policy(&access, "/etc/no-such-file");
        assert!(a.is_some());
        assert_eq!(a, b);
        let escape = format!("{}/../../etc/passwd", dir.display());
        assert_eq!(refused_by_policy(&access, &escape), a);
        assert_eq!(refused_by_policy(&access, "relative.mp4"), a);
        // A symlink inside that points outside.
        let link = dir.join("link.mp4");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("/etc/passwd", &link).unwrap();
        assert_eq!(refused_by_policy(&access, &link.display().to_string()), a);
        std::fs::remove_dir_all(&dir).ok();
    }
}
