//! One stop signal for the whole process: SIGTERM (what the kubelet sends) or Ctrl-C, or the
//! process itself when its main work ends, so that the HTTP server stops with it.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;
use tracing::info;

/// Resolves on SIGTERM or Ctrl-C.
pub async fn signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// A shutdown request that any number of parts wait for. Cloning shares it.
#[derive(Clone)]
pub struct Shutdown {
    tx: Arc<watch::Sender<bool>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// Requested only by [`Shutdown::request`].
    pub fn new() -> Self {
        Self { tx: Arc::new(watch::channel(false).0) }
    }

    /// Also requested on SIGTERM or Ctrl-C. Spawns the listener: call inside a Tokio runtime.
    pub fn on_signal() -> Self {
        let shutdown = Self::new();
        let on_signal = shutdown.clone();
        tokio::spawn(async move {
            signal().await;
            info!("shutting down");
            on_signal.request();
        });
        shutdown
    }

    /// Ask every waiter to stop (again: no effect).
    pub fn request(&self) {
        self.tx.send_replace(true);
    }

    /// Resolves once shutdown is requested (at once if it already was). Each waiter takes its own.
    pub fn requested(&self) -> impl Future<Output = ()> + Send + Sync + 'static {
        let mut rx = self.tx.subscribe();
        async move {
            // An error means the sender is gone, which cannot happen while `self` lives; stop then too.
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn every_waiter_wakes_on_one_request() {
        let shutdown = Shutdown::new();
        let (a, b) = (shutdown.requested(), shutdown.clone().requested());
        let early = tokio::time::timeout(Duration::from_millis(20), shutdown.requested()).await;
        assert!(early.is_err(), "resolved before any request");
        shutdown.request();
        tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(a, b) }).await.expect("both waiters woke");
        // Asked after the request: resolves at once; a second request changes nothing.
        shutdown.request();
        tokio::time::timeout(Duration::from_secs(5), shutdown.requested()).await.expect("late waiter");
    }
}
