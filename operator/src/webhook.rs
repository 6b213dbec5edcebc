//! Sidecar mode: the mutating admission webhook that gives an opted-in pod its own agent.
//!
//! A pod labelled `livepatch.dev/sidecar=enabled` gets, at creation, a native sidecar (an init
//! container with `restartPolicy: Always`) running `node-agent --sidecar` with `SYS_PTRACE`
//! for that container only, `shareProcessNamespace: true` (the agent sees its pod's processes
//! and no others), a memory volume for the engine's locks, and the label
//! `livepatch.dev/agent=sidecar` (node agents leave its tasks to it). No `hostPID`, no host
//! mount: for clusters whose policy forbids the node agent's DaemonSet.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context as _;
use axum::{extract::State, routing::post, Json, Router};
use base64::Engine as _;
use livepatch_api::{AGENT_LABEL, SIDECAR_CONTAINER, SIDECAR_LABEL};
use serde_json::{json, Value};
use tracing::{info, warn};

/// Path the API server posts `AdmissionReview`s to.
pub const PATH: &str = "/mutate-pod";
/// Where the sidecar serves its health and metrics (the pod's network is the application's:
/// loopback only, and a port applications rarely take).
pub const SIDECAR_METRICS_ADDR: &str = "127.0.0.1:18081";

/// What an injected sidecar looks like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sidecar {
    pub image: String,
    pub pull_policy: String,
    /// Extra environment (`NAME=VALUE`), e.g. the API server's address where there is no kube-proxy.
    pub env: Vec<(String, String)>,
}

/// The `AdmissionReview` answer to `review`: the pod's patch, or an unchanged pod when it did not
/// opt in or already has the sidecar (a reinvocation). Never refuses a pod.
pub fn review(review: &Value, sidecar: &Sidecar) -> Value {
    let request = &review["request"];
    let uid = request["uid"].clone();
    let mut response = json!({"uid": uid, "allowed": true});
    if let Some(ops) = patch(&request["object"], sidecar) {
        let bytes = serde_json::to_vec(&Value::Array(ops)).unwrap_or_default();
        response["patchType"] = "JSONPatch".into();
        response["patch"] = base64::engine::general_purpose::STANDARD.encode(bytes).into();
        info!(pod = %pod_name(&request["object"], request), "injecting the agent sidecar");
    }
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response})
}

fn pod_name(pod: &Value, request: &Value) -> String {
    let ns = request["namespace"].as_str().unwrap_or_default();
    let name = pod["metadata"]["name"].as_str().or(pod["metadata"]["generateName"].as_str()).unwrap_or_default();
    format!("{ns}/{name}")
}

/// The JSON patch that adds the sidecar to `pod`, if it wants one and lacks it.
pub fn patch(pod: &Value, sidecar: &Sidecar) -> Option<Vec<Value>> {
    let labels = &pod["metadata"]["labels"];
    if labels[SIDECAR_LABEL].as_str() != Some("enabled") {
        return None;
    }
    let spec = &pod["spec"];
    let has = |list: &str| spec[list].as_array().is_some_and(|cs| cs.iter().any(|c| c["name"] == SIDECAR_CONTAINER));
    if has("initContainers") || has("containers") {
        return None;
    }
    let mut ops = vec![json!({"op": "add", "path": "/spec/shareProcessNamespace", "value": true})];
    let container = container(sidecar);
    match spec["initContainers"].as_array() {
        // A native sidecar first: it runs before the application's init containers and the
        // application, and stays for the pod's life.
        Some(_) => ops.push(json!({"op": "add", "path": "/spec/initContainers/0", "value": container})),
        None => ops.push(json!({"op": "add", "path": "/spec/initContainers", "value": [container]})),
    }
    let volume = json!({"name": "livepatch-locks", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}});
    match spec["volumes"].as_array() {
        Some(_) => ops.push(json!({"op": "add", "path": "/spec/volumes/-", "value": volume})),
        None => ops.push(json!({"op": "add", "path": "/spec/volumes", "value": [volume]})),
    }
    // `/` in a label key is `~1` in a JSON pointer.
    ops.push(json!({"op": "add", "path": format!("/metadata/labels/{}", AGENT_LABEL.replace('/', "~1")), "value": "sidecar"}));
    Some(ops)
}

fn container(s: &Sidecar) -> Value {
    let field = |name: &str, path: &str| json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}});
    let mut env = vec![
        field("NODE_NAME", "spec.nodeName"),
        field("POD_NAME", "metadata.name"),
        field("POD_NAMESPACE", "metadata.namespace"),
        field("POD_UID", "metadata.uid"),
        json!({"name": "LIVEPATCH_SIDECAR", "value": "true"}),
        json!({"name": "LIVEPATCH_METRICS_ADDR", "value": SIDECAR_METRICS_ADDR}),
    ];
    env.extend(s.env.iter().map(|(k, v)| json!({"name": k, "value": v})));
    json!({
        "name": SIDECAR_CONTAINER,
        "image": s.image,
        "imagePullPolicy": s.pull_policy,
        "restartPolicy": "Always",
        "command": ["/usr/local/bin/node-agent"],
        "env": env,
        // uid 0 keeps the added capability across exec (no ambient capabilities in Kubernetes);
        // every other capability is dropped and nothing can be gained.
        "securityContext": {
            "runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": false,
            "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"], "add": ["SYS_PTRACE"]},
            "seccompProfile": {"type": "RuntimeDefault"}
        },
        "volumeMounts": [{"name": "livepatch-locks", "mountPath": "/run/livepatch"}],
        "resources": {"requests": {"cpu": "5m", "memory": "24Mi"}, "limits": {"memory": "128Mi"}}
    })
}

/// Where the webhook listens and its TLS key pair (PEM files, from the chart's Secret).
#[derive(Clone, Debug)]
pub struct Serve {
    pub addr: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Serve the webhook over TLS until `shutdown` resolves.
pub async fn serve(cfg: Serve, sidecar: Sidecar, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    // One crypto provider for the process (kube's client brings its own config).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(&cfg.cert, &cfg.key)
        .await
        .with_context(|| format!("webhook certificate {} / key {}", cfg.cert.display(), cfg.key.display()))?;
    let app = Router::new().route(PATH, post(handle)).with_state(Arc::new(sidecar));
    let handle_ = axum_server::Handle::new();
    let stopper = handle_.clone();
    tokio::spawn(async move {
        shutdown.await;
        stopper.graceful_shutdown(Some(std::time::Duration::from_secs(5)));
    });
    info!(addr = %cfg.addr, "sidecar webhook serving");
    axum_server::bind_rustls(cfg.addr, tls).handle(handle_).serve(app.into_make_service()).await.context("webhook server")
}

async fn handle(State(sidecar): State<Arc<Sidecar>>, Json(body): Json<Value>) -> Json<Value> {
    if body["request"]["uid"].is_null() {
        warn!("an AdmissionReview without a request");
    }
    Json(review(&body, &sidecar))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sidecar() -> Sidecar {
        Sidecar { image: "livepatch:0.1.0".into(), pull_policy: "IfNotPresent".into(), env: vec![("KUBERNETES_SERVICE_HOST".into(), "10.0.0.1".into())] }
    }

    fn pod(labels: Value, spec: Value) -> Value {
        json!({"metadata": {"generateName": "cart-", "labels": labels}, "spec": spec})
    }

    #[test]
    fn opted_in_pods_get_the_sidecar() {
        let p = pod(json!({"app": "cart", "livepatch.dev/sidecar": "enabled"}), json!({"containers": [{"name": "app", "image": "cart"}]}));
        let ops = patch(&p, &sidecar()).unwrap();
        let paths: Vec<&str> = ops.iter().map(|o| o["path"].as_str().unwrap()).collect();
        assert_eq!(paths, ["/spec/shareProcessNamespace", "/spec/initContainers", "/spec/volumes", "/metadata/labels/livepatch.dev~1agent"]);
        let c = &ops[1]["value"][0];
        assert_eq!((c["name"].as_str(), c["restartPolicy"].as_str()), (Some("livepatch-agent"), Some("Always")));
        assert_eq!(c["securityContext"]["capabilities"], json!({"drop": ["ALL"], "add": ["SYS_PTRACE"]}));
        let env: Vec<&str> = c["env"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
        for want in ["POD_UID", "POD_NAMESPACE", "NODE_NAME", "LIVEPATCH_SIDECAR", "KUBERNETES_SERVICE_HOST"] {
            assert!(env.contains(&want), "{want} missing: {env:?}");
        }
    }

    #[test]
    fn existing_lists_are_extended_not_replaced() {
        let p = pod(
            json!({"livepatch.dev/sidecar": "enabled"}),
            json!({"initContainers": [{"name": "migrate"}], "containers": [{"name": "app"}], "volumes": [{"name": "data"}]}),
        );
        let ops = patch(&p, &sidecar()).unwrap();
        assert_eq!(ops[1]["path"], "/spec/initContainers/0");
        assert_eq!(ops[2]["path"], "/spec/volumes/-");
    }

    #[test]
    fn others_are_left_alone() {
        let no = pod(json!({"app": "cart"}), json!({"containers": [{"name": "app"}]}));
        assert!(patch(&no, &sidecar()).is_none());
        let off = pod(json!({"livepatch.dev/sidecar": "disabled"}), json!({"containers": [{"name": "app"}]}));
        assert!(patch(&off, &sidecar()).is_none());
        let again = pod(json!({"livepatch.dev/sidecar": "enabled"}), json!({"initContainers": [{"name": "livepatch-agent"}], "containers": [{"name": "app"}]}));
        assert!(patch(&again, &sidecar()).is_none());
    }

    #[test]
    fn the_review_answers_with_a_base64_json_patch() {
        let r = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": "u-1", "namespace": "shop",
            "object": pod(json!({"livepatch.dev/sidecar": "enabled"}), json!({"containers": [{"name": "app"}]}))}});
        let out = review(&r, &sidecar());
        assert_eq!((out["response"]["uid"].as_str(), out["response"]["allowed"].as_bool()), (Some("u-1"), Some(true)));
        let patch = base64::engine::general_purpose::STANDARD.decode(out["response"]["patch"].as_str().unwrap()).unwrap();
        let ops: Vec<Value> = serde_json::from_slice(&patch).unwrap();
        assert_eq!(ops.len(), 4);
        let plain = review(&json!({"request": {"uid": "u-2", "object": pod(json!({}), json!({"containers": []}))}}), &sidecar());
        assert!(plain["response"].get("patch").is_none());
    }
}
