//! The admin HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (the process answers),
//! `/readyz` (every connector snapshotting or streaming, none failing) and `/status` (JSON per
//! connector).
//!
//! `POST /connectors/NAME/pause` and `POST /connectors/NAME/resume` stop a connector (cleanly:
//! deliveries finished, checkpoint written) and start it again.
//! `POST /connectors/NAME/tables/SCHEMA.TABLE/resync` has a source read one table again (a
//! fresh snapshot of it, placed exactly in its change stream). Mutating endpoints always need
//! the token, and each call is logged as an audit line (`bitclone9::audit`).
//!
//! With a token configured, every path but `/healthz` needs `Authorization: Bearer <token>`;
//! the configuration refuses a non-loopback address without one.

use crate::status::Status;
use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

#[derive(Clone)]
struct AdminState {
    status: Arc<Status>,
    metrics: PrometheusHandle,
    token: Option<Arc<str>>,
    started: Instant,
    commands: tokio::sync::mpsc::Sender<AdminCommand>,
}

/// What an operator asks of a connector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminAction {
    Pause,
    Resume,
    /// Read this table of a source again.
    Resync(bitclone9_core::TableId),
}

impl AdminAction {
    fn verb(&self) -> &'static str {
        match self {
            AdminAction::Pause => "pause",
            AdminAction::Resume => "resume",
            AdminAction::Resync(_) => "resync",
        }
    }
}

/// Reads `schema.table` (a bare name means schema `public`).
pub fn parse_table(text: &str) -> Option<bitclone9_core::TableId> {
    let (schema, name) = text.split_once('.').unwrap_or(("public", text));
    (!schema.is_empty() && !name.is_empty()).then(|| bitclone9_core::TableId::new(schema, name))
}

/// An action for the daemon's main loop, which owns the running connectors.
#[derive(Debug)]
pub struct AdminCommand {
    pub action: AdminAction,
    pub connector: String,
    /// The outcome: `Ok(what happened)`, or `Err((HTTP status, why))`.
    pub reply: tokio::sync::oneshot::Sender<Result<String, (u16, String)>>,
}

/// Binds `addr` and serves until the process ends; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    token: Option<String>,
    status: Arc<Status>,
    metrics: PrometheusHandle,
    commands: tokio::sync::mpsc::Sender<AdminCommand>,
) -> std::io::Result<SocketAddr> {
    let state = AdminState {
        status,
        metrics,
        token: token.map(Arc::from),
        started: Instant::now(),
        commands,
    };
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/readyz", get(readyz))
        .route("/status", get(status_json))
        .route("/connectors/{name}/pause", post(pause))
        .route("/connectors/{name}/resume", post(resume))
        .route("/connectors/{name}/tables/{table}/resync", post(resync))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "admin endpoint stopped");
        }
    });
    Ok(bound)
}

async fn require_token(State(state): State<AdminState>, req: Request, next: Next) -> Response {
    if let Some(token) = &state.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(token) {
            tracing::warn!(path = %req.uri().path(), "admin request refused: missing or wrong bearer token");
            return (StatusCode::UNAUTHORIZED, "bearer token required\n").into_response();
        }
    }
    next.run(req).await
}

async fn metrics_text(State(state): State<AdminState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let ready = state.status.ready();
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(serde_json::json!({"ready": ready, "connectors": state.status.snapshot()})),
    )
        .into_response()
}

async fn status_json(State(state): State<AdminState>) -> Response {
    Json(serde_json::json!({
        "version": crate::VERSION,
        "uptime_s": state.started.elapsed().as_secs(),
        "ready": state.status.ready(),
        "connectors": state.status.snapshot(),
    }))
    .into_response()
}

async fn pause(state: State<AdminState>, name: Path<String>) -> Response {
    act(state, name, AdminAction::Pause).await
}

async fn resume(state: State<AdminState>, name: Path<String>) -> Response {
    act(state, name, AdminAction::Resume).await
}

async fn resync(state: State<AdminState>, Path((name, table)): Path<(String, String)>) -> Response {
    let Some(table) = parse_table(&table) else {
        tracing::warn!(target: "bitclone9::audit", action = "resync", connector = %name, table = %table, result = "refused: bad table name", "admin action");
        return (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({"connector": name, "error": format!("{table:?} is not a table name: write schema.table")})),
        )
            .into_response();
    };
    act(state, Path(name), AdminAction::Resync(table)).await
}

/// Runs a mutating action through the main loop and writes the audit line.
async fn act(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    action: AdminAction,
) -> Response {
    let verb = action.verb();
    let table = match &action {
        AdminAction::Resync(t) => t.to_string(),
        _ => String::new(),
    };
    if state.token.is_none() {
        tracing::warn!(target: "bitclone9::audit", action = verb, connector = %name, table = %table, result = "refused: no admin.token configured", "admin action");
        return (
            StatusCode::FORBIDDEN,
            "mutating admin endpoints need admin.token to be set\n",
        )
            .into_response();
    }
    let (reply, answer) = tokio::sync::oneshot::channel();
    let sent = state
        .commands
        .send(AdminCommand {
            action,
            connector: name.clone(),
            reply,
        })
        .await;
    let result = match sent {
        Ok(()) => answer
            .await
            .unwrap_or_else(|_| Err((503, "the daemon is stopping".into()))),
        Err(_) => Err((503, "the daemon is stopping".into())),
    };
    match result {
        Ok(done) => {
            tracing::info!(target: "bitclone9::audit", action = verb, connector = %name, table = %table, result = %done, "admin action");
            Json(serde_json::json!({"connector": name, "result": done})).into_response()
        }
        Err((code, why)) => {
            tracing::warn!(target: "bitclone9::audit", action = verb, connector = %name, table = %table, result = %why, "admin action");
            (
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                Json(serde_json::json!({"connector": name, "error": why})),
            )
                .into_response()
        }
    }
}
