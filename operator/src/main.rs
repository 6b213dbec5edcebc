//! `livepatch-operator`: the LivePatch controller (with leader election, metrics and health
//! endpoints), and `livepatch-operator crdgen` to print the CRDs.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use clap::{Parser, Subcommand};
use livepatch_operator::{
    controller::{self, Context},
    crdgen, leader, webhook,
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

    /// Sidecar mode: serve the admission webhook that injects an agent into pods labelled
    /// `livepatch.dev/sidecar=enabled`, on this address (HTTPS; every replica serves it).
    #[arg(long, env = "LIVEPATCH_WEBHOOK_ADDR", requires_all = ["webhook_cert_dir", "sidecar_image"])]
    webhook_addr: Option<SocketAddr>,
    /// Directory with the webhook's `tls.crt` and `tls.key`.
    #[arg(long, env = "LIVEPATCH_WEBHOOK_CERT_DIR")]
    webhook_cert_dir: Option<std::path::PathBuf>,
    /// Image of the injected agent (the chart's image).
    #[arg(long, env = "LIVEPATCH_SIDECAR_IMAGE")]
    sidecar_image: Option<String>,
    #[arg(long, env = "LIVEPATCH_SIDECAR_PULL_POLICY", default_value = "IfNotPresent")]
    sidecar_pull_policy: String,
    /// Extra environment of the injected agent, `NAME=VALUE` (repeatable).
    #[arg(long = "sidecar-env", value_parser = name_value)]
    sidecar_env: Vec<(String, String)>,
}

fn name_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).filter(|(k, _)| !k.is_empty()).ok_or_else(|| format!("{s:?}: want NAME=VALUE"))
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

    let webhook = match (&args.webhook_addr, &args.webhook_cert_dir, &args.sidecar_image) {
        (Some(addr), Some(dir), Some(image)) => {
            let cfg = webhook::Serve { addr: *addr, cert: dir.join("tls.crt"), key: dir.join("tls.key") };
            let sidecar = webhook::Sidecar { image: image.clone(), pull_policy: args.sidecar_pull_policy.clone(), env: args.sidecar_env.clone() };
            let (stop, down) = (shutdown.requested(), shutdown.clone());
            Some(tokio::spawn(async move {
                let r = webhook::serve(cfg, sidecar, stop).await;
                if let Err(e) = &r {
                    // Without its webhook the operator is not what the chart installed: stop, so
                    // the pod restarts and its status shows it.
                    error!(error = %format!("{e:#}"), "sidecar webhook failed; stopping");
                    down.request();
                }
                r
            }))
        }
        _ => None,
    };

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
    if let Some(w) = webhook {
        if let Ok(Err(e)) = w.await {
            return Err(e.context("sidecar webhook"));
        }
    }
    result
}
