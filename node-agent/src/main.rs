//! `node-agent`: the livepatch DaemonSet entry point.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use clap::Parser;
use node_agent::{
    controller::{self, Context},
    discovery::Discovery,
    engine::LiveEngine,
    fetch::{self, Fetcher},
    metrics::Metrics,
    preflight,
};
use livepatch_runtime::{telemetry, Endpoints, Health, LogFormat, Server, Shutdown};
use tracing::{error, info};

#[derive(Parser, Debug)]
#[command(name = "node-agent", version, about = "livepatch node agent: applies the LivePatchTasks of this node to the pods' processes")]
struct Args {
    /// Name of this node (from the downward API: fieldRef spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,

    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "LIVEPATCH_METRICS_ADDR", default_value = "0.0.0.0:8081")]
    metrics_addr: SocketAddr,

    /// Where the host's processes are listed. Must be the /proc of the host PID namespace
    /// (hostPID: true): the engine itself always works through /proc.
    #[arg(long, env = "LIVEPATCH_PROC_ROOT", default_value = "/proc")]
    proc_root: PathBuf,

    /// Tasks worked on at once.
    #[arg(long, alias = "concurrency", env = "LIVEPATCH_MAX_PARALLEL_TASKS", default_value_t = 8)]
    max_parallel_tasks: u16,

    /// Processes being patched or reverted at once (over all tasks).
    #[arg(long, env = "LIVEPATCH_MAX_PARALLEL_PROCESSES", default_value_t = 4)]
    max_parallel_processes: usize,

    /// Attempts per task generation before a retryable failure is final.
    #[arg(long, env = "LIVEPATCH_MAX_ATTEMPTS", default_value_t = 5)]
    max_attempts: i32,

    /// First retry delay in seconds (doubles per attempt, capped at --resync-seconds).
    #[arg(long, env = "LIVEPATCH_RETRY_SECONDS", default_value_t = 5)]
    retry_seconds: u64,

    /// Re-check applied tasks this often (seconds): new processes of the container get the patch.
    #[arg(long, env = "LIVEPATCH_RESYNC_SECONDS", default_value_t = 300)]
    resync_seconds: u64,

    /// Largest accepted bundle, in bytes.
    #[arg(long, alias = "max-bundle-bytes", env = "LIVEPATCH_BUNDLE_MAX_BYTES", default_value_t = fetch::DEFAULT_MAX_BYTES)]
    bundle_max_bytes: usize,

    /// Timeout of an https bundle download, in seconds.
    #[arg(long, env = "LIVEPATCH_BUNDLE_URL_TIMEOUT_SECONDS", default_value_t = 60)]
    bundle_url_timeout_seconds: u64,

    /// PEM file of extra CA certificates trusted for https bundle URLs (besides the system's).
    #[arg(long, alias = "bundle-ca", env = "LIVEPATCH_BUNDLE_CA_FILE")]
    bundle_ca_file: Option<PathBuf>,

    /// Trusted ed25519 public keys for bundle signatures: a directory of `*.pub` files (one
    /// base64 line each, as `livepatch keygen` writes and the chart mounts), or one key file.
    /// A bundle's signature (`<key>.sig` next to it in its ConfigMap or Secret, or `<url>.sig`)
    /// is checked whenever it is present.
    #[arg(long, env = "LIVEPATCH_TRUSTED_KEYS_DIR")]
    trusted_keys_dir: Option<PathBuf>,

    /// Refuse bundles that are not signed by a trusted key (needs --trusted-keys-dir).
    #[arg(long, env = "LIVEPATCH_REQUIRE_SIGNATURE", default_value_t = false)]
    require_signature: bool,

    /// Log format.
    #[arg(long, env = "LIVEPATCH_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,

    /// Run even when a start-up check fails (the failures are logged).
    /// Sidecar mode: act only on the tasks of this agent's own pod (`POD_NAMESPACE`, `POD_UID`),
    /// reading its namespace only; the pod shares its PID namespace (no `hostPID`).
    #[arg(long, env = "LIVEPATCH_SIDECAR", default_value_t = false)]
    sidecar: bool,
    #[arg(long, env = "POD_NAMESPACE", required_if_eq("sidecar", "true"))]
    pod_namespace: Option<String>,
    #[arg(long, env = "POD_UID", required_if_eq("sidecar", "true"))]
    pod_uid: Option<String>,

    #[arg(long, env = "LIVEPATCH_SKIP_PREFLIGHT", default_value_t = false)]
    skip_preflight: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    telemetry::init(args.log_format);
    let problems = preflight::check(&args.proc_root, &[std::path::Path::new("/run/livepatch"), &std::env::temp_dir()]);
    for p in &problems {
        if p.fatal {
            error!(problem = %p, "start-up check failed");
        } else {
            tracing::warn!(problem = %p, "start-up check");
        }
    }
    let fatal: Vec<&str> = problems.iter().filter(|p| p.fatal).map(|p| p.text.as_str()).collect();
    if !fatal.is_empty() && !args.skip_preflight {
        anyhow::bail!("{} start-up check(s) failed: {}", fatal.len(), fatal.join("; "));
    }
    let signatures = fetch::signature_policy(args.trusted_keys_dir.as_deref(), args.require_signature)?;
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run(args, signatures))
}

async fn run(args: Args, signatures: fetch::Signatures) -> anyhow::Result<()> {
    let client = kube::Client::try_default().await?;
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::default());
    let shutdown = Shutdown::on_signal();

    let mut fetcher = Fetcher::new(client.clone(), fetch::tls_config(args.bundle_ca_file.as_deref())?);
    fetcher.max_bytes = args.bundle_max_bytes;
    fetcher.url_timeout = Duration::from_secs(args.bundle_url_timeout_seconds);
    fetcher.signatures = signatures;
    let scope = match (args.sidecar, args.pod_namespace.clone(), args.pod_uid.clone()) {
        (true, Some(namespace), Some(uid)) => {
            info!(%namespace, %uid, "sidecar mode: this pod's tasks only");
            controller::Scope::Pod { namespace, uid }
        }
        (true, _, _) => anyhow::bail!("--sidecar needs POD_NAMESPACE and POD_UID (the webhook sets them from the downward API)"),
        (false, _, _) => controller::Scope::Node,
    };
    let task_controller = controller::task_controller(client.clone(), &args.node_name, &scope);
    let store = task_controller.store();
    let mut ctx = Context::new(
        client,
        args.node_name.clone(),
        Arc::new(LiveEngine),
        Discovery::new(&args.proc_root),
        fetcher,
        metrics.clone(),
        store.clone(),
    );
    ctx.processes = Arc::new(tokio::sync::Semaphore::new(args.max_parallel_processes.max(1)));
    ctx.max_attempts = args.max_attempts.max(1);
    ctx.backoff = Duration::from_secs(args.retry_seconds.max(1));
    ctx.resync = Duration::from_secs(args.resync_seconds.max(10));
    ctx.scope = scope;
    let ctx = Arc::new(ctx);
    // The task gauges are counted from the watch cache at each scrape.
    let (scrape_store, scrape_metrics) = (store.clone(), metrics.clone());
    let endpoints = Endpoints::new(health.clone(), move || {
        scrape_metrics.set_tasks(scrape_store.state().iter().map(|t| t.status.as_ref().map(|s| s.phase)));
        scrape_metrics.encode()
    });
    let server = Server::spawn(args.metrics_addr, endpoints, &shutdown);
    let on_ready = move || {
        health.set_ready(true);
        info!("task watch synced: ready");
    };
    controller::run(task_controller, ctx, args.max_parallel_tasks.max(1), on_ready, shutdown.requested()).await;
    shutdown.request();
    server.join().await;
    Ok(())
}
