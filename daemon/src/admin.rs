//! The admin HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (the process answers),
//! `/readyz` (every connector snapshotting or streaming, none failing) and `/status` (JSON per
//! connector).
//!
//! With a token configured, every path but `/healthz` needs `Authorization: Bearer <token>`;
//! the configuration refuses a non-loopback address without one.

use crate::status::Status;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
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
}

/// Binds `addr` and serves until the process ends; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    token: Option<String>,
    status: Arc<Status>,
    metrics: PrometheusHandle,
) -> std::io::Result<SocketAddr> {
    let state = AdminState {
        status,
        metrics,
        token: token.map(Arc::from),
        started: Instant::now(),
    };
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/readyz", get(readyz))
        .route("/status", get(status_json))
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
