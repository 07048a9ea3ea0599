//! The HTTP API, off unless configured: `GET /healthz`, `GET /metrics` (Prometheus text),
//! `GET /streams`, `POST /streams` (`{"uri": ..., "id": ...}`), `DELETE /streams/{id}`. It runs
//! on its own thread with a one-thread tokio runtime, reads [`Telemetry`] and asks the runtime
//! to add or remove streams through [`Control`] messages.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use crossbeam_channel::Sender;
use serde::Deserialize;

use crate::metrics::Telemetry;
use crate::runtime::{Control, ControlError, StreamSpec};

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("HTTP API: bad listen address `{0}` (want IP:PORT, e.g. 127.0.0.1:9464)")]
    Address(String),
    #[error("HTTP API: cannot listen on {0}: {1}")]
    Bind(String, std::io::Error),
    #[error("HTTP API: {0}")]
    Runtime(std::io::Error),
}

#[derive(Clone)]
struct AppState {
    telemetry: Arc<Telemetry>,
    control: Sender<Control>,
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
    (status, Json(serde_json::json!({ "error": message }))).into_response()
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
                ControlError::Duplicate(_) => StatusCode::CONFLICT,
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
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.telemetry.render(),
    )
        .into_response()
}

async fn list(State(s): State<AppState>) -> Response {
    Json(s.telemetry.streams()).into_response()
}

async fn add(State(s): State<AppState>, body: Option<Json<AddStream>>) -> Response {
    let Some(Json(a)) = body else {
        return error(
            StatusCode::BAD_REQUEST,
            "send JSON: {\"uri\": \"rtsp://...\", \"id\": \"name\"}".into(),
        );
    };
    let mut spec = StreamSpec::from_input(&a.uri);
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
        Ok(()) => Json(serde_json::json!({ "removed": id })).into_response(),
        Err(r) => r,
    }
}

/// Bind `listen` and serve on a background thread.
pub fn serve(
    listen: &str,
    telemetry: Arc<Telemetry>,
    control: Sender<Control>,
) -> Result<HttpServer, HttpError> {
    let addr: SocketAddr = listen
        .parse()
        .map_err(|_| HttpError::Address(listen.to_string()))?;
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
        .with_state(AppState { telemetry, control });
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
