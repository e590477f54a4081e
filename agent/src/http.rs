//! The HTTP endpoints: `/metrics`, `/healthz`, `/readyz`.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use tokio::net::TcpListener;

use crate::{metrics::Exporter, tracker::Tracker};

/// What the handlers share.
#[derive(Clone)]
pub struct App {
    /// The metrics registry.
    pub exporter: Arc<Exporter>,
    /// For readiness.
    pub tracker: Arc<Tracker>,
    /// A cgroup scan older than this makes `/readyz` fail.
    pub max_scan_age: Duration,
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    app: App,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(app);
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn index() -> impl IntoResponse {
    "podmeter: per-pod CPU, memory and network from eBPF\n\n/metrics  Prometheus metrics\n/healthz  liveness (scrapes and the background refresh make progress)\n/readyz   readiness (programs attached, cgroup scan fresh, pod names synced)\n"
}

async fn metrics(State(app): State<App>) -> impl IntoResponse {
    // Map reads are syscalls: keep them off the async workers.
    let exporter = app.exporter.clone();
    match tokio::task::spawn_blocking(move || exporter.render()).await {
        Ok(body) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
            body,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            format!("scrape failed: {e}\n"),
        ),
    }
}

async fn healthz(State(app): State<App>) -> impl IntoResponse {
    match app.tracker.live(Instant::now()) {
        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {why}\n"),
        ),
    }
}

async fn readyz(State(app): State<App>) -> impl IntoResponse {
    match app.tracker.ready(app.max_scan_age, Instant::now()) {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}
