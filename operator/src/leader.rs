//! Leader election on a coordination.k8s.io/v1 Lease (with `kube-lease-manager`): every replica
//! campaigns; only the holder runs the controller. A replica that loses the lease, or cannot
//! renew it (any error while leader), stops its controller at once and campaigns again.

use std::{sync::Arc, time::Duration};

use futures::Future;
use kube::Client;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use livepatch_runtime::Health;

use crate::metrics::Metrics;

/// Which Lease, and who we are.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub name: String,
    pub namespace: String,
    /// Unique per replica: the pod name.
    pub identity: String,
    /// A holder that has not renewed for this long loses the lease.
    pub duration_seconds: u64,
    /// The holder renews this long before expiry (also the clock skew tolerated).
    pub grace_seconds: u64,
}

/// What `run` does with the controller: start it (a task) when elected, abort it when not.
pub trait Campaign {
    fn start(&mut self) -> JoinHandle<()>;
}

impl<F: FnMut() -> JoinHandle<()>> Campaign for F {
    fn start(&mut self) -> JoinHandle<()> {
        self()
    }
}

async fn build(client: &Client, cfg: &LeaseConfig) -> kube_lease_manager::Result<LeaseManager> {
    LeaseManagerBuilder::new(client.clone(), &cfg.name)
        .with_namespace(&cfg.namespace)
        .with_identity(&cfg.identity)
        .with_duration(cfg.duration_seconds)
        .with_grace(cfg.grace_seconds)
        .with_field_manager(format!("{}-{}", livepatch_api::OPERATOR_NAME, cfg.identity))
        .build()
        .await
}

fn stop(running: &mut Option<JoinHandle<()>>, metrics: &Metrics) {
    if let Some(handle) = running.take() {
        handle.abort();
        info!("controller stopped");
    }
    metrics.leader.set(0);
}

/// Campaign until `shutdown` resolves, running the controller while leader; release the lease
/// on shutdown. Returns an error if the controller task ends by itself.
pub async fn run(
    client: Client,
    cfg: LeaseConfig,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    mut campaign: impl Campaign,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    let retry = Duration::from_secs(2);
    let mut running: Option<JoinHandle<()>> = None;
    loop {
        let manager = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            m = build(&client, &cfg) => m,
        };
        let manager = match manager {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, lease = %cfg.name, namespace = %cfg.namespace, "cannot use the lease");
                health.set_ready(false);
                tokio::select! {
                    _ = &mut shutdown => return Ok(()),
                    _ = tokio::time::sleep(retry) => continue,
                }
            }
        };
        health.set_ready(true);
        info!(identity = %cfg.identity, lease = %cfg.name, namespace = %cfg.namespace, "campaigning for leadership");
        loop {
            let finished = async {
                match running.as_mut() {
                    Some(handle) => handle.await,
                    None => futures::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut shutdown => {
                    stop(&mut running, &metrics);
                    if let Err(e) = manager.release().await {
                        warn!(error = %e, "could not release the lease");
                    }
                    return Ok(());
                }
                result = finished => {
                    metrics.leader.set(0);
                    let _ = manager.release().await;
                    anyhow::bail!("the controller stopped by itself: {result:?}");
                }
                changed = manager.changed() => match changed {
                    Ok(true) => {
                        info!(identity = %cfg.identity, "became the leader");
                        metrics.leader.set(1);
                        if running.is_none() {
                            running = Some(campaign.start());
                        }
                    }
                    Ok(false) => {
                        info!(identity = %cfg.identity, "not the leader");
                        stop(&mut running, &metrics);
                    }
                    Err(e) => {
                        // The lease may lapse while we cannot renew it: step down now.
                        warn!(error = %e, "lease error: stepping down and campaigning again");
                        stop(&mut running, &metrics);
                        break;
                    }
                }
            }
        }
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tokio::time::sleep(retry) => {}
        }
    }
}
