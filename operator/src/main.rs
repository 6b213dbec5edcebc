//! `livepatch-operator`: the LivePatch controller (with leader election, metrics and health
//! endpoints), and `livepatch-operator crdgen` to print the CRDs.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use clap::{Parser, Subcommand};
use futures::FutureExt;
use livepatch_operator::{
    controller::{self, Context},
    crdgen, leader,
    metrics::Metrics,
    server::{self, AppState, Health},
    telemetry::{self, LogFormat},
};
use tokio::sync::watch;
use tracing::{error, info};

#[derive(Parser, Debug)]
#[command(name = "livepatch-operator", version, about = "Dispatches LivePatch resources to the node agents")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the CustomResourceDefinitions (YAML) and exit.
    Crdgen,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(long, env = "LIVEPATCH_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,

    /// Log format.
    #[arg(long, env = "LIVEPATCH_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,

    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "LIVEPATCH_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,

    /// Elect a leader through a Lease so that several replicas are safe (only the leader reconciles).
    #[arg(long, env = "LIVEPATCH_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,

    /// Name of the Lease.
    #[arg(long, env = "LIVEPATCH_LEASE_NAME", default_value = "livepatch-operator")]
    lease_name: String,

    /// Namespace of the Lease (default: the operator's own namespace, from its service account,
    /// else the kubeconfig context's namespace).
    #[arg(long, env = "LIVEPATCH_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,

    /// This replica's identity in the Lease (default: $POD_NAME, else $HOSTNAME).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,

    /// Lease duration in seconds: a leader that has not renewed for this long is replaced.
    #[arg(long, env = "LIVEPATCH_LEASE_DURATION_SECONDS", default_value_t = 15)]
    lease_duration_seconds: u64,

    /// The leader renews this many seconds before the lease expires.
    #[arg(long, env = "LIVEPATCH_LEASE_GRACE_SECONDS", default_value_t = 5)]
    lease_grace_seconds: u64,

    /// Re-reconcile every LivePatch at least this often (seconds).
    #[arg(long, env = "LIVEPATCH_RESYNC_SECONDS", default_value_t = 300)]
    resync_seconds: u64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Crdgen) = cli.command {
        for (_, yaml) in crdgen::render() {
            print!("{yaml}");
        }
        return Ok(());
    }
    telemetry::init(cli.run.log_format);
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run(cli.run))
}

/// Resolves on SIGTERM or Ctrl-C.
async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.lease_grace_seconds == 0 || args.lease_grace_seconds >= args.lease_duration_seconds {
        anyhow::bail!("--lease-grace-seconds must be more than 0 and less than --lease-duration-seconds");
    }
    let client = kube::Client::try_default().await?;
    let identity = args
        .identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("livepatch-operator-{}", std::process::id()));
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::default());

    // One shutdown signal for everything.
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        signal().await;
        info!("shutting down");
        let _ = stop_tx.send(true);
    });
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };

    let state = AppState { metrics: metrics.clone(), health: health.clone() };
    let http = tokio::spawn(server::serve(args.metrics_addr, state, stopped()));

    let mut ctx = Context::new(client.clone(), metrics.clone(), &identity);
    ctx.resync = Duration::from_secs(args.resync_seconds);
    let ctx = Arc::new(ctx);
    let namespace = args.watch_namespace.clone();

    let result = if args.leader_election {
        let cfg = leader::LeaseConfig {
            name: args.lease_name.clone(),
            namespace: args.lease_namespace.clone().unwrap_or_else(|| client.default_namespace().to_string()),
            identity: identity.clone(),
            duration_seconds: args.lease_duration_seconds,
            grace_seconds: args.lease_grace_seconds,
        };
        let start = {
            let ctx = ctx.clone();
            move || tokio::spawn(controller::run(ctx.clone(), namespace.clone(), futures::future::pending()))
        };
        leader::run(client, cfg, health, metrics, start, stopped()).await
    } else {
        health.set_ready(true);
        metrics.leader.set(1);
        controller::run(ctx, namespace, stopped()).await;
        Ok(())
    };
    if let Err(e) = &result {
        error!(error = %e, "operator failed");
    }
    if let Some(Ok(Err(e))) = http.now_or_never() {
        error!(error = %e, "metrics server failed");
    }
    result
}
