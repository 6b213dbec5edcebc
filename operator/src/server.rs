//! The HTTP endpoints: `/metrics` (Prometheus text format), `/healthz`, `/readyz`.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use futures::Future;

use crate::metrics::Metrics;

/// Liveness and readiness of the process.
#[derive(Default)]
pub struct Health {
    /// Set once the operator has reached the API server (lease manager built, or controller
    /// started without election); cleared while it cannot.
    ready: AtomicBool,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

/// Shared state of the endpoints.
#[derive(Clone)]
pub struct AppState {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        state.metrics.encode(),
    )
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.health.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

/// Serve until `shutdown` resolves.
pub async fn serve(addr: SocketAddr, state: AppState, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn get(state: &AppState, path: &str) -> (StatusCode, String) {
        let response = router(state.clone())
            .oneshot(axum::http::Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn endpoints() {
        let state = AppState { metrics: Arc::new(Metrics::default()), health: Arc::new(Health::default()) };
        assert_eq!(get(&state, "/healthz").await, (StatusCode::OK, "ok".to_string()));
        assert_eq!(get(&state, "/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
        state.health.set_ready(true);
        assert_eq!(get(&state, "/readyz").await.0, StatusCode::OK);
        state.metrics.reconciles.inc();
        let (status, text) = get(&state, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(text.contains("livepatch_reconciles_total 1"), "{text}");
        assert!(text.ends_with("# EOF\n"));
        assert_eq!(get(&state, "/nope").await.0, StatusCode::NOT_FOUND);
    }
}
