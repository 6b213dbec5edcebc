//! `/healthz` (the process serves), `/readyz` (pre-flight checks passed and the task watch has
//! its first list) and `/metrics` (Prometheus text format).

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};

use crate::metrics::Metrics;

/// Shared state of the endpoints.
#[derive(Clone)]
pub struct Endpoints {
    pub metrics: Arc<Metrics>,
    pub ready: Arc<AtomicBool>,
    /// Called before each scrape (refreshes the task gauges from the watch cache).
    pub refresh: Arc<dyn Fn() + Send + Sync>,
}

pub fn router(state: Endpoints) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<Endpoints>) -> impl IntoResponse {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn metrics(State(state): State<Endpoints>) -> impl IntoResponse {
    (state.refresh)();
    ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.metrics.encode())
}

/// Serve until `shutdown` resolves.
pub async fn serve(addr: SocketAddr, state: Endpoints, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn get(state: &Endpoints, path: &str) -> (StatusCode, String) {
        let response = router(state.clone())
            .oneshot(axum::http::Request::get(path).body(axum::body::Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn endpoints() {
        let refreshed = Arc::new(AtomicBool::new(false));
        let flag = refreshed.clone();
        let state = Endpoints {
            metrics: Arc::new(Metrics::default()),
            ready: Arc::new(AtomicBool::new(false)),
            refresh: Arc::new(move || flag.store(true, Ordering::Relaxed)),
        };
        assert_eq!(get(&state, "/healthz").await, (StatusCode::OK, "ok".into()));
        assert_eq!(get(&state, "/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
        state.ready.store(true, Ordering::Relaxed);
        assert_eq!(get(&state, "/readyz").await.0, StatusCode::OK);
        let (code, text) = get(&state, "/metrics").await;
        assert_eq!(code, StatusCode::OK);
        assert!(text.contains("livepatch_agent_tasks"), "{text}");
        assert!(refreshed.load(Ordering::Relaxed));
    }
}
