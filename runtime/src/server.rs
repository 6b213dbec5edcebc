//! `/healthz` (the process serves), `/readyz` (the binary says when) and `/metrics` (Prometheus
//! text format), until shutdown.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Router};
use tokio::task::JoinHandle;
use tracing::error;

use crate::{metrics::CONTENT_TYPE, shutdown::Shutdown};

/// Readiness of the process: `/readyz` answers 200 while set, 503 otherwise.
#[derive(Default)]
pub struct Health {
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

/// What the endpoints serve.
#[derive(Clone)]
pub struct Endpoints {
    pub health: Arc<Health>,
    /// The exposition, made at each scrape (a binary may refresh gauges from its caches first).
    pub metrics: Arc<dyn Fn() -> String + Send + Sync>,
}

impl Endpoints {
    pub fn new(health: Arc<Health>, metrics: impl Fn() -> String + Send + Sync + 'static) -> Self {
        Self { health, metrics: Arc::new(metrics) }
    }
}

pub fn router(endpoints: Endpoints) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(endpoints)
}

async fn readyz(State(endpoints): State<Endpoints>) -> impl IntoResponse {
    if endpoints.health.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn metrics(State(endpoints): State<Endpoints>) -> impl IntoResponse {
    ([("content-type", CONTENT_TYPE)], (endpoints.metrics)())
}

/// Serve until `shutdown` resolves.
pub async fn serve(addr: SocketAddr, endpoints: Endpoints, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
    axum::serve(listener, router(endpoints)).with_graceful_shutdown(shutdown).await
}

/// The server running on its own task.
pub struct Server(JoinHandle<std::io::Result<()>>);

impl Server {
    /// Start serving until `shutdown` is requested.
    pub fn spawn(addr: SocketAddr, endpoints: Endpoints, shutdown: &Shutdown) -> Self {
        Self(tokio::spawn(serve(addr, endpoints, shutdown.requested())))
    }

    /// Wait for the server to stop (request the shutdown first) and log why it failed, if it did.
    pub async fn join(self) {
        match self.0.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!(error = %e, "metrics server failed"),
            Err(e) => error!(error = %e, "metrics server task"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn get(endpoints: &Endpoints, path: &str) -> (StatusCode, String) {
        let response = router(endpoints.clone())
            .oneshot(axum::http::Request::get(path).body(axum::body::Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn endpoints() {
        let scrapes = Arc::new(AtomicUsize::new(0));
        let counted = scrapes.clone();
        let endpoints = Endpoints::new(Arc::new(Health::default()), move || {
            let n = counted.fetch_add(1, Ordering::Relaxed) + 1;
            format!("scrapes_total {n}\n# EOF\n")
        });
        assert_eq!(get(&endpoints, "/healthz").await, (StatusCode::OK, "ok".into()));
        assert_eq!(get(&endpoints, "/readyz").await.0, StatusCode::SERVICE_UNAVAILABLE);
        endpoints.health.set_ready(true);
        assert_eq!(get(&endpoints, "/readyz").await, (StatusCode::OK, "ready".into()));
        // The exposition is made anew at each scrape.
        assert_eq!(get(&endpoints, "/metrics").await, (StatusCode::OK, "scrapes_total 1\n# EOF\n".into()));
        assert_eq!(get(&endpoints, "/metrics").await.1, "scrapes_total 2\n# EOF\n");
        assert_eq!(scrapes.load(Ordering::Relaxed), 2);
        assert_eq!(get(&endpoints, "/nope").await.0, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn serves_until_shutdown() {
        let shutdown = Shutdown::new();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let server = Server::spawn(addr, Endpoints::new(Arc::new(Health::default()), String::new), &shutdown);
        // Connect once it listens.
        let mut connected = false;
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                connected = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(connected, "the server never listened on {addr}");
        shutdown.request();
        tokio::time::timeout(std::time::Duration::from_secs(5), server.join()).await.expect("stopped on shutdown");
    }
}
