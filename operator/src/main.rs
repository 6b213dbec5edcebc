//! `livepatch-operator`: the LivePatch controller (with leader election, metrics and health
//! endpoints), and `livepatch-operator crdgen` to print the CRDs.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use clap::{Parser, Subcommand};
use livepatch_operator::{
    controller::{self, Context},
    crdgen, leader,
    metrics::Metrics,
};
use livepatch_runtime::{telemetry, Endpoints, Health, LogFormat, Server, Shutdown};
use tracing::error;

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

    let shutdown = Shutdown::on_signal();
    let scrape = metrics.clone();
    let server = Server::spawn(args.metrics_addr, Endpoints::new(health.clone(), move || scrape.encode()), &shutdown);

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
        leader::run(client, cfg, health, metrics, start, shutdown.requested()).await
    } else {
        health.set_ready(true);
        metrics.leader.set(1);
        controller::run(ctx, namespace, shutdown.requested()).await;
        Ok(())
    };
    if let Err(e) = &result {
        error!(error = %e, "operator failed");
    }
    // The controller may have ended by itself (an error): stop the server too.
    shutdown.request();
    server.join().await;
    result
}
