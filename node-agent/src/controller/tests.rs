//! The task -> status path against a mock API server (tower-test): the exact requests (method,
//! path and query, content type, body) for each outcome, with a fake engine over a captured
//! `/proc` tree (discovery runs for real on it). The fake engine records the calls it gets and
//! keeps a list of patch ids per PID: these tests check what the agent asks of the engine and
//! what it writes back, never a process's code. The real path (containers, the engine, a process
//! that changes its output) is `node-agent/tests/containerd.rs`.

use super::*;
use crate::discovery::tests::{build_id, layouts, v1, Tree, ID, OTHER_ID, OTHER_UID, UID};
use http::StatusCode;
use livepatch::{apply, bundle::Bundle, revert, status, watchpoint::Strategy};
use livepatch_testkit::mock_api::{self, expect_get, next, respond, ApiHandle};
use serde_json::Value;
use sha2::Digest;
use std::collections::HashMap;

const NODE: &str = "node-1";
const TASK: &str = "cart-fix-cart-a";
const TASK_STATUS: &str = "/apis/livepatch.dev/v1alpha1/namespaces/shop/livepatchtasks/cart-fix-cart-a/status?&force=true&fieldManager=livepatch-agent";
const POD: &str = "/api/v1/namespaces/shop/pods/cart-a";
const CONFIGMAP: &str = "/api/v1/namespaces/shop/configmaps/cart-fix";

/// A valid bundle for `build_id` (one replaced function; the fake engine never runs it).
pub(crate) fn bundle_bytes(build_id: &str) -> Vec<u8> {
    bundle_fixing(build_id, None)
}

/// A bundle for `build_id` whose new code comes from the build `fixed`.
fn bundle_fixing(build_id: &str, fixed: Option<&str>) -> Vec<u8> {
    let manifest: livepatch::bundle::Manifest = serde_json::from_value(json!({
        "format_version": 1, "arch": "x86_64",
        "target": {"build_id": build_id, "path": null, "pie": true},
        "new_build_id": fixed, "created_at": 0, "reference_source": "decoded",
        "span": {"lo": 4096, "len": 4096},
        "pieces": [{"name": "price", "kind": "code", "svma": 4096, "len": 16, "blob": 0}],
        "functions": [{"name": "price", "kind": "changed", "old_svma": 8192, "old_size": 16, "old_digest": "00", "new_svma": 4096, "new_size": 16}],
        "fixups": [], "changed_data": []
    }))
    .unwrap();
    Bundle::to_bytes(&manifest, &[0x90; 16])
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Engine double: patches are a list of ids per PID; every call is recorded.
#[derive(Default)]
struct FakeEngine {
    live: Mutex<HashMap<i32, Vec<String>>>,
    /// The bundle digest a region header records, by patch id.
    digests: Mutex<HashMap<String, String>>,
    calls: Mutex<Vec<String>>,
    fail_apply: Mutex<Option<fn() -> livepatch::Error>>,
}

impl FakeEngine {
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

impl Engine for FakeEngine {
    fn status(&self, pid: i32) -> livepatch::Result<status::Status> {
        self.calls.lock().unwrap().push(format!("status {pid}"));
        let live = self.live.lock().unwrap().get(&pid).cloned().unwrap_or_default();
        let patches = live
            .iter()
            .enumerate()
            .map(|(i, id)| status::PatchStatus {
                patch_id: id.clone(),
                seq: i as u32 + 1,
                applied_at: 0,
                applied_at_rfc3339: status::rfc3339_utc(0),
                bundle_sha256: self.digests.lock().unwrap().get(id).cloned().unwrap_or_default(),
                region: String::new(),
                functions: vec!["price".into()],
                entries: vec![],
                state: "applied".into(),
                switched: vec![],
                calls_retargeted: 0,
                library: None,
            })
            .collect();
        Ok(status::Status { pid, build_id: None, patches, stacked: live.len(), restart_recommended: live.len() > 4, warnings: vec![] })
    }

    fn apply(&self, pid: i32, bundle: &Bundle, opts: &apply::Options) -> livepatch::Result<apply::Report> {
        self.calls.lock().unwrap().push(format!("apply {pid} {:?} {}s", opts.strategy, opts.timeout.as_secs()));
        if let Some(fail) = *self.fail_apply.lock().unwrap() {
            return Err(fail());
        }
        let mut live = self.live.lock().unwrap();
        let list = live.entry(pid).or_default();
        list.push(bundle.patch_id());
        self.digests.lock().unwrap().insert(bundle.patch_id(), bundle.digest.clone());
        Ok(apply::Report {
            pid,
            patch_id: bundle.patch_id(),
            functions: vec!["price".into()],
            pause_us: 85,
            strategy: opts.strategy,
            attempts: 1,
            waited_ms: 0,
            map_us: 10,
            total_ms: 3,
            region: String::new(),
            already_applied: false,
            stacked: list.len(),
            restart_recommended: list.len() > 4,
            switched_frames: vec![],
            gated: true,
            ungated: None,
        })
    }

    fn revert_newest(&self, pid: i32, _strategy: Strategy, _timeout: Duration) -> livepatch::Result<revert::Report> {
        self.calls.lock().unwrap().push(format!("revert {pid}"));
        let removed = self.live.lock().unwrap().get_mut(&pid).and_then(|l| l.pop()).into_iter().collect();
        Ok(revert::Report { pid, reverted: removed, functions: vec![], pause_us: 40, attempts: 1, remaining: 0, total_ms: 1, switched_frames: vec![] })
    }
}

/// A proc tree with one process (PID 4242, running a copy of /bin/true) in the task's container,
/// a host process running the same file, and the same container id under another pod's UID.
struct Setup {
    tree: Tree,
    engine: Arc<FakeEngine>,
    bundle: Vec<u8>,
    signatures: crate::fetch::Signatures,
    /// Where discovery looks (the tree's proc root unless a test moves it).
    proc_root: std::path::PathBuf,
}

impl Setup {
    fn new() -> Self {
        let tree = Tree::new();
        let root = tree.rootfs("rootfs", "/bin/true");
        let exe = root.join("usr/local/bin/app");
        tree.process(1, &v1("/"), &exe, std::path::Path::new("/"));
        tree.process(4242, &layouts(ID, UID)[3].1, &exe, &root);
        tree.process(5555, &layouts(ID, OTHER_UID)[0].1, &exe, &root);
        let proc_root = tree.proc_root();
        let (engine, bundle) = (Arc::new(FakeEngine::default()), bundle_bytes(&build_id("/bin/true")));
        // Patches the tests put in a process were applied from this bundle.
        let b = Bundle::parse(&bundle).unwrap();
        engine.digests.lock().unwrap().insert(b.patch_id(), b.digest);
        Setup { tree, engine, bundle, signatures: Default::default(), proc_root }
    }

    fn context(&self, client: Client) -> Arc<Context> {
        let mut fetcher = Fetcher::new(client.clone(), crate::fetch::tls_config(None).unwrap());
        fetcher.signatures = self.signatures.clone();
        let (store, _writer) = kube::runtime::reflector::store();
        let discovery = crate::discovery::Discovery::new(&self.proc_root);
        let mut ctx = Context::new(client, NODE.into(), self.engine.clone(), discovery, fetcher, Arc::new(Metrics::default()), store);
        ctx.max_attempts = 3;
        Arc::new(ctx)
    }

    fn task(&self, action: &str, generation: i64, status: Option<Value>) -> Arc<LivePatchTask> {
        let mut t = json!({
            "apiVersion": "livepatch.dev/v1alpha1", "kind": "LivePatchTask",
            "metadata": {
                "name": TASK, "namespace": "shop", "uid": "task-uid", "generation": generation, "resourceVersion": "7",
                "labels": {"livepatch.dev/node": NODE, "livepatch.dev/livepatch": "cart-fix"}
            },
            "spec": {
                "podName": "cart-a", "podUid": UID, "nodeName": NODE, "containerName": "cart",
                "containerId": format!("containerd://{ID}"),
                "bundle": {"configMapRef": {"name": "cart-fix", "key": "patch.lpatch"}, "sha256": self.digest()},
                "target": {"buildID": build_id("/bin/true"), "path": "/usr/local/bin/app"},
                "strategy": "Trap", "timeoutSeconds": 30, "action": action, "livePatchGeneration": 1
            }
        });
        if let Some(s) = status {
            t["status"] = s;
        }
        Arc::new(serde_json::from_value(t).unwrap())
    }

    /// The digest `livepatch build` prints (the bundle's own).
    fn digest(&self) -> String {
        Bundle::parse(&self.bundle).unwrap().digest
    }

    fn patch_id(&self) -> String {
        Bundle::parse(&self.bundle).unwrap().patch_id()
    }
}

fn pod_json(container_id: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "cart-a", "namespace": "shop", "uid": UID, "labels": labels},
        "spec": {"nodeName": NODE, "containers": [{"name": "cart", "image": "cart:1"}]},
        "status": {"phase": "Running", "containerStatuses": [{
            "name": "cart", "containerID": container_id, "ready": true, "restartCount": 0,
            "image": "cart:1", "imageID": "sha256:1", "state": {"running": {"startedAt": "2027-01-15T07:00:00Z"}}
        }]}
    })
}

fn configmap_json(bytes: &[u8]) -> Value {
    use base64_engine::encode;
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cart-fix", "namespace": "shop"}, "binaryData": {"patch.lpatch": encode(bytes)}})
}

/// Minimal standard base64 (the test needs only the encoder).
mod base64_engine {
    pub fn encode(data: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

/// The pod, then the bundle's ConfigMap: the first two requests of every apply.
async fn expect_pod_and_bundle(handle: &mut ApiHandle, pod: Value, bundle: &[u8]) {
    expect_get(handle, POD, pod).await;
    expect_get(handle, CONFIGMAP, configmap_json(bundle)).await;
}

/// The pod running the task's container.
fn running_pod(labels: Value) -> Value {
    pod_json(&format!("containerd://{ID}"), labels)
}

/// Expect a server-side apply of the task status; answer it; return the status sent.
async fn expect_status(handle: &mut ApiHandle, task: &LivePatchTask) -> Value {
    mock_api::expect_status_apply(handle, TASK_STATUS, "LivePatchTask", &serde_json::to_value(task).unwrap()).await
}

/// Expect the merge patch of the pod's restart-required label; answer it; return the label value.
async fn expect_pod_label(handle: &mut ApiHandle, pod: Value) -> Value {
    let (method, uri, content_type, body, send) = next(handle).await;
    assert_eq!((method.as_str(), uri.as_str()), ("PATCH", format!("{POD}?").as_str()));
    assert_eq!(content_type.as_deref(), Some("application/merge-patch+json"));
    assert_eq!(body["metadata"]["uid"], UID, "the patch is conditional on the pod's UID: {body}");
    assert_eq!(body["metadata"].as_object().unwrap().len(), 2, "{body}");
    respond(send, StatusCode::OK, &pod);
    body["metadata"]["labels"][RESTART_REQUIRED_LABEL].clone()
}

/// Run one reconcile against the mock; `script` plays the API server (it gets the task, to
/// answer status writes with it).
async fn reconcile_with<F, Fut>(setup: &Setup, task: Arc<LivePatchTask>, script: F) -> (Result<Action, Error>, Arc<Context>)
where
    F: FnOnce(ApiHandle, Arc<LivePatchTask>) -> Fut,
    Fut: std::future::Future<Output = ApiHandle>,
{
    let (client, handle) = mock_api::client();
    let ctx = setup.context(client);
    let running = tokio::spawn(reconcile(task.clone(), ctx.clone()));
    let mut handle = script(handle, task).await;
    let result = tokio::time::timeout(Duration::from_secs(10), running).await.expect("reconcile finishes").unwrap();
    assert!(tokio::time::timeout(Duration::from_millis(50), handle.next_request()).await.is_err(), "no further request");
    (result, ctx)
}

/// One apply reconcile of a task with no status yet that goes as far as the engine: the pod,
/// the ConfigMap with `configmap`, the `Applying` status, then the outcome's status (and no pod
/// label change). Returns both statuses written.
async fn apply_through_the_engine(setup: &Setup, task: Arc<LivePatchTask>, configmap: Value) -> (Value, Value, Action, Arc<Context>) {
    let written = Arc::new(Mutex::new(vec![]));
    let w = written.clone();
    let (result, ctx) = reconcile_with(setup, task, |mut h, t| async move {
        expect_get(&mut h, POD, running_pod(json!({"app": "cart"}))).await;
        expect_get(&mut h, CONFIGMAP, configmap).await;
        for _ in 0..2 {
            let status = expect_status(&mut h, &t).await;
            w.lock().unwrap().push(status);
        }
        h
    })
    .await;
    let [applying, done]: [Value; 2] = std::mem::take(&mut *written.lock().unwrap()).try_into().unwrap();
    assert_eq!(applying["reason"], "Applying", "{applying}");
    (applying, done, result.unwrap(), ctx)
}

/// A reconcile that reads the pod (answered with `pod`) and writes one status, nothing else
/// (no bundle, no pod label). Returns that status.
async fn pod_then_status(setup: &Setup, task: Arc<LivePatchTask>, pod: Value) -> (Value, Action, Arc<Context>) {
    let written = Arc::new(Mutex::new(None));
    let w = written.clone();
    let (result, ctx) = reconcile_with(setup, task, |mut h, t| async move {
        expect_get(&mut h, POD, pod).await;
        w.lock().unwrap().replace(expect_status(&mut h, &t).await);
        h
    })
    .await;
    let status = written.lock().unwrap().take().expect("a status was written");
    (status, result.unwrap(), ctx)
}

/// A later attempt at an `Apply` whose task already reports on its content with `status` (so no
/// `Applying` write first): the pod, the ConfigMap, one status (no pod label change). Returns
/// that status.
async fn next_attempt(setup: &Setup, status: Value) -> (Value, Action) {
    let written = Arc::new(Mutex::new(None));
    let w = written.clone();
    let bundle = setup.bundle.clone();
    let (result, _) = reconcile_with(setup, setup.task("Apply", 1, Some(status)), |mut h, t| async move {
        expect_pod_and_bundle(&mut h, running_pod(json!({})), &bundle).await;
        w.lock().unwrap().replace(expect_status(&mut h, &t).await);
        h
    })
    .await;
    let status = written.lock().unwrap().take().expect("a status was written");
    (status, result.unwrap())
}

#[tokio::test]
async fn apply_asks_the_engine_for_the_container_process_only_and_reports() {
    let setup = Setup::new();
    let patch_id = setup.patch_id();
    let (pending, done, action, ctx) = apply_through_the_engine(&setup, setup.task("Apply", 1, None), configmap_json(&setup.bundle)).await;
    assert_eq!(
        pending,
        json!({
            "observedGeneration": 1, "phase": "Pending", "containerId": format!("containerd://{ID}"), "pids": [4242],
            "attempts": 1, "reason": "Applying", "message": format!("applying {patch_id} to 1 process(es)"), "patchId": patch_id
        })
    );
    assert_eq!(
        done,
        json!({
            "observedGeneration": 1, "phase": "Applied", "containerId": format!("containerd://{ID}"), "pids": [4242],
            "attempts": 1, "message": format!("{patch_id} applied in 1 process (pid 4242); stopped at most 85 us"),
            "pauseMicros": 85, "patchId": patch_id
        })
    );
    // Applied: looked at again after the re-check period.
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    // Only the container's process, status first, then the apply; never 1 (host) nor 5555
    // (same container id under another pod).
    assert_eq!(setup.engine.calls(), vec!["status 4242", "apply 4242 Trap 30s"]);
    let text = ctx.metrics.encode();
    assert!(text.contains("livepatch_agent_errors_total{kind=\"isolation\"} 1"), "{text}");
    assert!(text.contains("livepatch_agent_engine_duration_seconds_count{action=\"apply\"} 1"), "{text}");

    // A reconcile before the re-check time (a pod event: the agent's own status write does not
    // trigger one) does not work again.
    let again = setup.task("Apply", 1, Some(json!({"observedGeneration": 1, "phase": "Applied", "containerId": format!("containerd://{ID}"), "attempts": 1})));
    let left = ctx.not_yet(&again).expect("scheduled");
    assert!(left > Duration::from_secs(290));
}

#[tokio::test]
async fn after_an_agent_restart_the_engine_is_not_asked_to_apply_again() {
    let setup = Setup::new();
    // A killed predecessor applied the patch but never wrote the status.
    setup.engine.live.lock().unwrap().insert(4242, vec![setup.patch_id()]);
    // (This LivePatch names the bundle by `sha256sum` of the file: accepted too.)
    let mut task = (*setup.task("Apply", 1, None)).clone();
    task.spec.bundle.sha256 = sha256(&setup.bundle);
    let (_, done, _, _) = apply_through_the_engine(&setup, Arc::new(task), configmap_json(&setup.bundle)).await;
    assert_eq!(done["phase"], "Applied");
    assert_eq!(done["message"], format!("{} already applied in 1 process (pid 4242)", setup.patch_id()));
    assert_eq!(done.get("pauseMicros"), None);
    assert_eq!(setup.engine.calls(), vec!["status 4242"], "status read, no apply");
}

#[tokio::test]
async fn data_layout_refusal_is_restart_required_and_labels_the_pod() {
    let setup = Setup::new();
    *setup.engine.fail_apply.lock().unwrap() = Some(|| livepatch::Error::refused_kind(livepatch::error::RefusalKind::DataLayout, "data layout changed: variable `orders` grew from 8 to 16 bytes"));
    let task = setup.task("Apply", 2, None);
    let bundle = setup.bundle.clone();
    let (result, ctx) = reconcile_with(&setup, task, |mut h, t| async move {
        expect_pod_and_bundle(&mut h, running_pod(json!({"app": "cart"})), &bundle).await;
        expect_status(&mut h, &t).await;
        let done = expect_status(&mut h, &t).await;
        assert_eq!(done["phase"], "RestartRequired");
        assert_eq!(done["reason"], "DataLayoutChanged");
        assert!(done["message"].as_str().unwrap().starts_with("pid 4242: refused: data layout changed"), "{done}");
        assert_eq!(expect_pod_label(&mut h, pod_json("x", json!({}))).await, json!("true"));
        h
    })
    .await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert!(ctx.metrics.encode().contains("livepatch_agent_errors_total{kind=\"engine_refused\"} 1"));
}

#[tokio::test]
async fn a_new_container_that_is_patched_clears_the_label() {
    let setup = Setup::new();
    let task = setup.task("Apply", 3, None);
    let bundle = setup.bundle.clone();
    let (result, _) = reconcile_with(&setup, task, |mut h, t| async move {
        let labelled = running_pod(json!({"app": "cart", RESTART_REQUIRED_LABEL: "true"}));
        expect_pod_and_bundle(&mut h, labelled.clone(), &bundle).await;
        expect_status(&mut h, &t).await;
        assert_eq!(expect_status(&mut h, &t).await["phase"], "Applied");
        assert_eq!(expect_pod_label(&mut h, labelled).await, Value::Null, "label removed");
        h
    })
    .await;
    assert!(result.is_ok());
}

#[tokio::test]
async fn blocked_is_retried_then_restart_required() {
    let setup = Setup::new();
    *setup.engine.fail_apply.lock().unwrap() = Some(|| livepatch::Error::Blocked("old code stayed active for 30.0 s; the target is unchanged".into()));
    let cid = format!("containerd://{ID}");
    // Second attempt of three: Blocked, retried after the backoff (5 s doubled).
    let (s, action) = next_attempt(&setup, json!({"observedGeneration": 1, "phase": "Blocked", "containerId": cid, "attempts": 1})).await;
    assert_eq!((s["phase"].as_str(), s["reason"].as_str(), s["attempts"].as_i64()), (Some("Blocked"), Some("ProcedureActive"), Some(2)));
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));

    // Last attempt: RestartRequired, and the pod is labelled.
    let task = setup.task("Apply", 1, Some(json!({"observedGeneration": 1, "phase": "Blocked", "containerId": cid, "attempts": 2})));
    let bundle = setup.bundle.clone();
    let (result, _) = reconcile_with(&setup, task, |mut h, t| async move {
        expect_pod_and_bundle(&mut h, running_pod(json!({})), &bundle).await;
        let s = expect_status(&mut h, &t).await;
        assert_eq!((s["phase"].as_str(), s["attempts"].as_i64()), (Some("RestartRequired"), Some(3)));
        assert_eq!(expect_pod_label(&mut h, pod_json("x", json!({}))).await, json!("true"));
        h
    })
    .await;
    assert_eq!(result.unwrap(), Action::await_change());
}

#[tokio::test]
async fn revert_asks_the_engine_to_revert_the_recorded_patch_and_reports() {
    let setup = Setup::new();
    setup.engine.live.lock().unwrap().insert(4242, vec![setup.patch_id()]);
    let cid = format!("containerd://{ID}");
    let patch_id = setup.patch_id();
    let task = setup.task("Revert", 2, Some(json!({"observedGeneration": 1, "phase": "Applied", "containerId": cid, "attempts": 1, "pids": [4242], "patchId": patch_id})));
    let (s, action, _) = pod_then_status(&setup, task, pod_json(&cid, json!({}))).await;
    // No bundle fetch for a revert: the patch id is the one recorded when it was applied.
    assert_eq!(
        s,
        json!({
            "observedGeneration": 2, "phase": "Reverted", "containerId": cid, "pids": [4242], "attempts": 1,
            "message": format!("{patch_id} reverted in 1 process (pid 4242); stopped at most 40 us"),
            "pauseMicros": 40, "patchId": patch_id
        })
    );
    assert_eq!(action, Action::await_change());
    assert_eq!(setup.engine.calls(), vec!["status 4242", "revert 4242"]);
    assert!(setup.engine.live.lock().unwrap()[&4242].is_empty());
}

#[tokio::test]
async fn revert_does_not_ask_the_engine_to_revert_under_a_newer_patch() {
    let setup = Setup::new();
    setup.engine.live.lock().unwrap().insert(4242, vec![setup.patch_id(), "lp-0123456789ab".into()]);
    let task = setup.task("Revert", 2, None);
    let (s, action, _) = pod_then_status(&setup, task, running_pod(json!({}))).await;
    assert_eq!((s["phase"].as_str(), s["reason"].as_str()), (Some("Failed"), Some("PatchNotNewest")));
    assert!(s["message"].as_str().unwrap().contains("revert lp-0123456789ab first"));
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));
    assert_eq!(setup.engine.calls(), vec!["status 4242"]);
}

#[tokio::test]
async fn revert_of_a_deleted_pod_is_done() {
    let setup = Setup::new();
    let task = setup.task("Revert", 2, None);
    let (result, _) = reconcile_with(&setup, task, |mut h, t| async move {
        let (method, uri, _, _, send) = next(&mut h).await;
        assert_eq!((method.as_str(), uri.as_str()), ("GET", POD));
        let gone = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "pods \"cart-a\" not found"});
        respond(send, StatusCode::NOT_FOUND, &gone);
        let s = expect_status(&mut h, &t).await;
        assert_eq!((s["phase"].as_str(), s["reason"].as_str()), (Some("Reverted"), Some("PodGone")));
        h
    })
    .await;
    assert!(result.is_ok());
    assert!(setup.engine.calls().is_empty());
}

#[tokio::test]
async fn a_restarted_container_waits_for_the_operator() {
    let setup = Setup::new();
    let task = setup.task("Apply", 1, None);
    let (s, action, _) = pod_then_status(&setup, task, pod_json("containerd://ffff", json!({}))).await;
    assert_eq!((s["phase"].as_str(), s["reason"].as_str()), (Some("Pending"), Some("ContainerNotCurrent")));
    assert!(s["message"].as_str().unwrap().contains("is now containerd://ffff"));
    assert_eq!(action, Action::await_change());
    assert!(setup.engine.calls().is_empty());
}

#[tokio::test]
async fn only_other_pods_processes_means_no_engine_call() {
    let setup = Setup::new();
    // Our container's process is gone; what remains are the host process and the same container
    // id under another pod's UID.
    std::fs::remove_dir_all(setup.tree.proc_root().join("4242")).unwrap();
    let (s, action, ctx) = one_status(&setup, configmap_json(&setup.bundle)).await;
    assert_eq!((s["phase"].as_str(), s["reason"].as_str()), (Some("Pending"), Some("ContainerNotRunning")));
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));
    assert!(ctx.metrics.encode().contains("livepatch_agent_errors_total{kind=\"isolation\"} 1"));
}

#[tokio::test]
async fn a_bundle_with_the_wrong_digest_is_refused() {
    let setup = Setup::new();
    let mut tampered = setup.bundle.clone();
    tampered[20] ^= 1;
    let (s, action, _) = one_status(&setup, configmap_json(&tampered)).await;
    assert_eq!((s["phase"].as_str(), s["reason"].as_str()), (Some("Pending"), Some("BundleDigestMismatch")));
    assert!(s["message"].as_str().unwrap().contains("sha256 mismatch"), "{s}");
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));
}

#[tokio::test]
async fn tasks_of_other_nodes_and_settled_tasks_send_nothing() {
    let setup = Setup::new();
    let mut other = (*setup.task("Apply", 1, None)).clone();
    other.spec.node_name = "node-2".into();
    let (result, _) = reconcile_with(&setup, Arc::new(other), |h, _| async move { h }).await;
    assert_eq!(result.unwrap(), Action::await_change());

    let cid = format!("containerd://{ID}");
    for status in [
        json!({"observedGeneration": 1, "phase": "RestartRequired", "reason": "DataLayoutChanged", "containerId": cid, "attempts": 1}),
        json!({"observedGeneration": 1, "phase": "Failed", "reason": "BuildIDMismatch", "containerId": cid, "attempts": 1}),
        json!({"observedGeneration": 1, "phase": "Failed", "reason": "EngineError", "containerId": cid, "attempts": 3}),
    ] {
        let (result, _) = reconcile_with(&setup, setup.task("Apply", 1, Some(status)), |h, _| async move { h }).await;
        assert_eq!(result.unwrap(), Action::await_change());
    }
    let reverted = json!({"observedGeneration": 1, "phase": "Reverted", "containerId": cid, "attempts": 1});
    let (result, _) = reconcile_with(&setup, setup.task("Revert", 1, Some(reverted)), |h, _| async move { h }).await;
    assert_eq!(result.unwrap(), Action::await_change());
    assert!(setup.engine.calls().is_empty());
}

#[test]
fn pods_map_to_their_tasks() {
    let setup = Setup::new();
    let task = setup.task("Apply", 1, None);
    let mut other_ns = (*task).clone();
    other_ns.metadata.namespace = Some("other".into());
    let pod: Pod = serde_json::from_value(pod_json("x", json!({}))).unwrap();
    let refs = tasks_for_pod(&[task.clone(), Arc::new(other_ns)], &pod);
    assert_eq!(refs, vec![ObjectRef::from_obj(task.as_ref())]);
}

// ---- Trust: bundle signatures, and tasks that name what they must not reach. ----

use livepatch::signature::{self, SigningKey};

/// The ConfigMap with the bundle and, under `<key>.sig`, its signature (text).
fn configmap_signed(bytes: &[u8], sig: &str) -> Value {
    let mut cm = configmap_json(bytes);
    cm["data"] = json!({"patch.lpatch.sig": sig});
    cm
}

impl Setup {
    /// Trust `keys`; `required`: refuse unsigned bundles.
    fn trust(mut self, keys: &[&SigningKey], required: bool) -> Self {
        self.signatures = crate::fetch::Signatures {
            trusted: signature::TrustedKeys::new(keys.iter().enumerate().map(|(i, k)| (format!("key{i}.pub"), k.verifying_key()))),
            required,
        };
        self
    }

    /// The signature of this setup's bundle by `key`.
    fn signed_by(&self, key: &SigningKey) -> String {
        signature::sign(key, &signature::sha256_of(&self.bundle)).to_text()
    }
}

/// One apply reconcile that stops before any engine call: exactly the pod and the ConfigMap are
/// read, then one status write (no "Applying" first: no process is a target).
async fn one_status(setup: &Setup, configmap: Value) -> (Value, Action, Arc<Context>) {
    let task = setup.task("Apply", 1, None);
    let written = Arc::new(Mutex::new(None));
    let w = written.clone();
    let (result, ctx) = reconcile_with(setup, task, |mut h, t| async move {
        expect_get(&mut h, POD, running_pod(json!({}))).await;
        expect_get(&mut h, CONFIGMAP, configmap).await;
        let status = expect_status(&mut h, &t).await;
        w.lock().unwrap().replace(status);
        h
    })
    .await;
    let status = written.lock().unwrap().take().expect("a status was written");
    assert!(setup.engine.calls().is_empty(), "no engine call: {:?}", setup.engine.calls());
    (status, result.unwrap(), ctx)
}

/// [`one_status`] for a bundle refused by the signature policy: `Failed`, no process looked at.
async fn refused(setup: &Setup, configmap: Value) -> (Value, Action, Arc<Context>) {
    let (status, action, ctx) = one_status(setup, configmap).await;
    assert_eq!(status["phase"], "Failed", "{status}");
    assert_eq!(status.get("pids"), None, "no process was looked at: {status}");
    (status, action, ctx)
}

#[tokio::test]
async fn with_enforcement_an_unsigned_bundle_is_refused_before_any_process_is_looked_at() {
    let key = signature::generate().unwrap();
    let mut setup = Setup::new().trust(&[&key], true);
    // Discovery would fail loudly (ProcUnreadable) if it ran: it must not.
    setup.proc_root = setup.tree.dir.path().join("no-such-proc");
    let cm = configmap_json(&setup.bundle);
    let (s, action, ctx) = refused(&setup, cm.clone()).await;
    assert_eq!(s["reason"], "BundleUnsigned");
    let message = s["message"].as_str().unwrap();
    assert!(message.contains("not signed") && message.contains("configmap shop/cart-fix key patch.lpatch.sig") && message.contains("--require-signature"), "{message}");
    // The signature may arrive later (a separate upload): retried while attempts remain...
    assert_eq!(action, Action::requeue(Duration::from_secs(5)));
    assert!(ctx.metrics.encode().contains("livepatch_agent_errors_total{kind=\"signature\"} 1"));
    assert!(!ctx.metrics.encode().contains("kind=\"discovery\""));

    // ... and final on the last one.
    let cid = format!("containerd://{ID}");
    let (s, action) = next_attempt(&setup, json!({"observedGeneration": 1, "phase": "Failed", "reason": "BundleUnsigned", "containerId": cid, "attempts": 2})).await;
    assert_eq!((s["phase"].as_str(), s["reason"].as_str(), s["attempts"].as_i64()), (Some("Failed"), Some("BundleUnsigned"), Some(3)));
    assert_eq!(action, Action::await_change());
    assert!(setup.engine.calls().is_empty());
}

#[tokio::test]
async fn with_enforcement_a_wrongly_signed_bundle_is_refused() {
    let (key, other) = (signature::generate().unwrap(), signature::generate().unwrap());
    let setup = Setup::new().trust(&[&key], true);
    let good = setup.signed_by(&key);
    let by_other = setup.signed_by(&other);
    let other_id = signature::key_id(&other.verifying_key());
    let key_id = signature::key_id(&key.verifying_key());
    let for_another_bundle = signature::sign(&key, &[7; 32]).to_text();
    let cases = [
        // Signed with a key that is not trusted.
        (by_other.clone(), "BundleSignerUntrusted", format!("signed with key {other_id}, which is not a trusted key")),
        // Signed with another key, claiming the trusted key's id.
        (by_other.replace(&other_id, &key_id), "BundleSignatureInvalid", "does not verify".to_string()),
        // A valid signature of another bundle, put next to this one.
        (for_another_bundle, "BundleSignatureInvalid", "for another bundle".to_string()),
        // The signature line altered.
        (good.replace("signature: ", "signature: AA"), "BundleSignatureInvalid", "malformed".to_string()),
        // Not a signature at all.
        ("-----BEGIN PGP SIGNATURE-----\n".to_string(), "BundleSignatureInvalid", "malformed".to_string()),
    ];
    for (sig, reason, words) in cases {
        let (s, action, _) = refused(&setup, configmap_signed(&setup.bundle, &sig)).await;
        assert_eq!(s["reason"], reason, "{s}");
        let message = s["message"].as_str().unwrap();
        assert!(message.contains(&words) && message.contains("configmap shop/cart-fix key patch.lpatch.sig"), "{message}");
        // A signature that does not verify does not become valid later: final.
        assert_eq!(action, Action::await_change(), "{reason}");
        // And the next reconcile of that status sends nothing at all.
        let settled = setup.task("Apply", 1, Some(json!({"observedGeneration": 1, "phase": "Failed", "reason": reason, "containerId": format!("containerd://{ID}"), "attempts": 1})));
        let (result, _) = reconcile_with(&setup, settled, |h, _| async move { h }).await;
        assert_eq!(result.unwrap(), Action::await_change());
    }
    assert!(setup.engine.calls().is_empty());
}

#[tokio::test]
async fn with_enforcement_a_signed_bundle_reaches_the_engine() {
    let (key, other) = (signature::generate().unwrap(), signature::generate().unwrap());
    let setup = Setup::new().trust(&[&other, &key], true);
    let cm = configmap_signed(&setup.bundle, &setup.signed_by(&key));
    let (_, done, _, _) = apply_through_the_engine(&setup, setup.task("Apply", 1, None), cm).await;
    assert_eq!(done["phase"], "Applied");
    assert_eq!(setup.engine.calls(), vec!["status 4242", "apply 4242 Trap 30s"]);
}

#[tokio::test]
async fn without_enforcement_a_bad_signature_is_refused_and_a_missing_one_is_not() {
    let (key, other) = (signature::generate().unwrap(), signature::generate().unwrap());
    // Keys configured, not required; and no keys at all: a signature that is there must verify.
    for setup in [Setup::new().trust(&[&key], false), Setup::new()] {
        let (s, action, _) = refused(&setup, configmap_signed(&setup.bundle, &setup.signed_by(&other))).await;
        assert_eq!(s["reason"], "BundleSignerUntrusted");
        assert_eq!(action, Action::await_change());
    }
    let setup = Setup::new().trust(&[&key], false);
    let (s, _, _) = refused(&setup, configmap_signed(&setup.bundle, "garbage")).await;
    assert_eq!(s["reason"], "BundleSignatureInvalid");

    // Unsigned: accepted without enforcement.
    let (_, done, _, _) = apply_through_the_engine(&setup, setup.task("Apply", 1, None), configmap_json(&setup.bundle)).await;
    assert_eq!(done["phase"], "Applied");
    assert_eq!(setup.engine.calls(), vec!["status 4242", "apply 4242 Trap 30s"]);
}

/// The other namespace's pod `cart-b` (UID `OTHER_UID`, container `OTHER_ID`) runs on this node
/// too (PID 6000, same executable). A task of namespace `shop` that names it in any way is
/// never acted on: the agent reads the pod in the task's own namespace only, and every
/// identifier the task gives (name, UID, container id) must be that pod's.
#[tokio::test]
async fn a_task_cannot_reach_a_pod_of_another_namespace() {
    let setup = Setup::new();
    let root = setup.tree.dir.path().join("rootfs");
    setup.tree.process(6000, &layouts(OTHER_ID, OTHER_UID)[2].1, &root.join("usr/local/bin/app"), &root);
    let theirs = format!("containerd://{OTHER_ID}");

    // 1. The pod by its name and UID: not found in `shop`.
    let mut task = (*setup.task("Apply", 1, None)).clone();
    task.spec.pod_name = "cart-b".into();
    task.spec.pod_uid = OTHER_UID.into();
    task.spec.container_id = theirs.clone();
    let task = Arc::new(task);
    for action in [TaskAction::Apply, TaskAction::Revert] {
        let mut task = (*task).clone();
        task.spec.action = action;
        let task = Arc::new(task);
        let (result, _) = reconcile_with(&setup, task, |mut h, t| async move {
            let (method, uri, _, _, send) = next(&mut h).await;
            assert_eq!((method.as_str(), uri.as_str()), ("GET", "/api/v1/namespaces/shop/pods/cart-b"));
            let gone = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404});
            respond(send, StatusCode::NOT_FOUND, &gone);
            let s = expect_status(&mut h, &t).await;
            let expected = if action == TaskAction::Apply { ("Pending", "ContainerNotCurrent") } else { ("Reverted", "PodGone") };
            assert_eq!((s["phase"].as_str().unwrap(), s["reason"].as_str().unwrap()), expected);
            assert!(s["message"].as_str().unwrap().contains("does not exist in namespace shop"), "{s}");
            h
        })
        .await;
        assert_eq!(result.unwrap(), Action::await_change());
    }

    // 2. A pod of `shop` by name, with the other pod's UID and container id: another pod.
    let mut task = (*setup.task("Apply", 1, None)).clone();
    task.spec.pod_uid = OTHER_UID.into();
    task.spec.container_id = theirs.clone();
    let task = Arc::new(task);
    let (s, action, _) = pod_then_status(&setup, task, running_pod(json!({}))).await;
    assert_eq!((s["phase"].as_str(), s["reason"].as_str()), (Some("Pending"), Some("ContainerNotCurrent")));
    assert!(s["message"].as_str().unwrap().contains("is another pod now"), "{s}");
    assert_eq!(action, Action::await_change());

    // 3. The right pod of `shop`, with the other pod's container id: not its container.
    let mut task = (*setup.task("Apply", 1, None)).clone();
    task.spec.container_id = theirs.clone();
    let task = Arc::new(task);
    let (s, action, _) = pod_then_status(&setup, task, running_pod(json!({}))).await;
    assert_eq!((s["phase"].as_str(), s["reason"].as_str()), (Some("Pending"), Some("ContainerNotCurrent")));
    assert_eq!(action, Action::await_change());

    // 4. The same as a revert (the pod's status does not vouch for the id, so discovery runs):
    // the process's cgroup names the other pod, so it is refused and counted.
    let mut task = (*setup.task("Revert", 2, None)).clone();
    task.spec.container_id = theirs;
    let task = Arc::new(task);
    let (s, action, ctx) = pod_then_status(&setup, task, running_pod(json!({}))).await;
    assert_eq!(s["phase"], "Reverted", "nothing of this pod runs the patch: {s}");
    assert_eq!(s.get("pids"), None, "{s}");
    assert_eq!(action, Action::await_change());
    assert!(ctx.metrics.encode().contains("livepatch_agent_errors_total{kind=\"isolation\"} 1"), "{}", ctx.metrics.encode());
    assert!(setup.engine.calls().is_empty(), "{:?}", setup.engine.calls());
}

/// A revert task whose container id names a container outside Kubernetes (a cgroup with no pod
/// in its path, like `/docker/<id>`) on a pod that no longer runs that container: the id is only
/// the task's word, so the process is not a candidate.
#[tokio::test]
async fn a_revert_never_asks_the_engine_about_a_container_outside_kubernetes() {
    let setup = Setup::new();
    let root = setup.tree.dir.path().join("rootfs");
    setup.tree.process(7000, &v1(&format!("/docker/{OTHER_ID}")), &root.join("usr/local/bin/app"), &root);
    setup.engine.live.lock().unwrap().insert(7000, vec![setup.patch_id()]);
    let mut task = (*setup.task("Revert", 2, None)).clone();
    task.spec.container_id = format!("docker://{OTHER_ID}");
    let task = Arc::new(task);
    let (s, action, _) = pod_then_status(&setup, task, running_pod(json!({}))).await;
    assert_eq!(s["phase"], "Reverted");
    assert_eq!(s.get("pids"), None, "{s}");
    assert_eq!(action, Action::await_change());
    assert!(setup.engine.calls().is_empty(), "{:?}", setup.engine.calls());
}

/// The pod a task names runs on another node (even though a process with its container id and
/// UID is on this one): refused, nothing touched.
#[tokio::test]
async fn a_pod_on_another_node_is_refused() {
    let setup = Setup::new();
    let task = setup.task("Apply", 1, None);
    let mut elsewhere = running_pod(json!({}));
    elsewhere["spec"]["nodeName"] = json!("node-2");
    let (s, action, _) = pod_then_status(&setup, task, elsewhere).await;
    assert_eq!((s["phase"].as_str(), s["reason"].as_str()), (Some("Failed"), Some("PodOnAnotherNode")));
    assert!(s["message"].as_str().unwrap().contains("runs on node \"node-2\""), "{s}");
    assert_eq!(action, Action::await_change());
    assert!(setup.engine.calls().is_empty());
}

/// The agent's own status writes keep the generation: only the first sight of a task and a new
/// generation reach the reconciler.
#[tokio::test]
async fn only_new_generations_trigger_reconciles() {
    let setup = Setup::new();
    let cid = format!("containerd://{ID}");
    let applying = json!({"observedGeneration": 1, "phase": "Pending", "reason": "Applying", "containerId": cid, "attempts": 1});
    let applied = json!({"observedGeneration": 1, "phase": "Applied", "containerId": cid, "attempts": 1});
    let events = [setup.task("Apply", 1, None), setup.task("Apply", 1, Some(applying)), setup.task("Apply", 1, Some(applied)), setup.task("Revert", 2, None)];
    let events = futures::stream::iter(events.into_iter().map(|t| Ok((*t).clone())));
    let passed: Vec<(Option<i64>, bool)> = reconcile_triggers(events).map(|t| t.map(|t| (t.metadata.generation, t.status.is_some())).unwrap()).collect().await;
    assert_eq!(passed, vec![(Some(1), false), (Some(2), false)]);
}

/// Which statuses end the agent's work on an `Apply`, by typed reason.
#[test]
fn settled_by_reason() {
    let setup = Setup::new();
    let cid = format!("containerd://{ID}");
    let status = |phase: &str, reason: Option<Reason>, attempts: i32| {
        let mut s = json!({"observedGeneration": 1, "phase": phase, "containerId": cid, "attempts": attempts});
        if let Some(r) = reason {
            s["reason"] = json!(r.as_str());
        }
        setup.task("Apply", 1, Some(s))
    };
    for &r in Reason::ALL {
        assert_eq!(settled(&status("Failed", Some(r), 1), 5), is_final(r), "{r}");
        assert!(settled(&status("Failed", Some(r), 5), 5), "{r}: out of attempts");
        assert_eq!(settled(&status("RestartRequired", Some(r), 1), 5), r != Reason::TooManyPatches, "{r}");
    }
    // A reason of another agent version is not final (retried until the attempts run out).
    let mut unknown = (*status("Failed", None, 1)).clone();
    unknown.status.as_mut().unwrap().reason = Some("SomethingNew".into());
    assert!(!settled(&unknown, 5));
}

/// The container runs the fixed build (a rollout to the fixed image): `Applied` with `UpToDate`,
/// the process named, and no engine call.
#[tokio::test]
async fn a_container_running_the_fixed_build_is_up_to_date() {
    let mut setup = Setup::new();
    setup.bundle = bundle_fixing(&build_id("/bin/true"), Some(&build_id("/bin/false")));
    std::fs::remove_dir_all(setup.tree.proc_root().join("4242")).unwrap();
    let fixed = setup.tree.rootfs("rootfs-fixed", "/bin/false");
    setup.tree.process(4243, &layouts(ID, UID)[3].1, &fixed.join("usr/local/bin/app"), &fixed);
    let (s, action, _ctx) = one_status(&setup, configmap_json(&setup.bundle)).await;
    assert_eq!((s["phase"].as_str(), s["reason"].as_str()), (Some("Applied"), Some("UpToDate")), "{s}");
    assert_eq!(s["pids"], json!([4243]));
    // Checked again later like any applied target (the container may restart on another image).
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    assert!(setup.engine.calls().is_empty(), "{:?}", setup.engine.calls());
}

/// The container's only process runs another build: `BuildIDMismatch` (from the discovery's typed
/// skip, not from its text), final, and no engine call.
#[tokio::test]
async fn a_container_running_another_build_is_a_build_id_mismatch() {
    let setup = Setup::new();
    std::fs::remove_dir_all(setup.tree.proc_root().join("4242")).unwrap();
    let other = setup.tree.rootfs("rootfs-other", "/bin/false");
    setup.tree.process(4243, &layouts(ID, UID)[3].1, &other.join("usr/local/bin/app"), &other);
    let (s, action, ctx) = one_status(&setup, configmap_json(&setup.bundle)).await;
    assert_eq!((s["phase"].as_str(), s["reason"].as_str()), (Some("Failed"), Some("BuildIDMismatch")));
    assert!(s["message"].as_str().unwrap().contains("pid 4243: runs build id"), "{s}");
    assert_eq!(action, Action::await_change());
    assert!(ctx.metrics.encode().contains("livepatch_agent_errors_total{kind=\"build_id_mismatch\"} 1"));
}

/// The node agent leaves the tasks of a pod that carries its own agent; a sidecar acts on its
/// own pod's tasks only.
#[test]
fn scopes_split_the_tasks() {
    let setup = Setup::new();
    let task = setup.task("Apply", 1, None);
    let pod = |labels: Value| -> Pod { serde_json::from_value(json!({"metadata": {"name": "cart-0", "namespace": "shop", "labels": labels}})).unwrap() };
    let plain = pod(json!({"app": "cart"}));
    let with_sidecar = pod(json!({"app": "cart", "livepatch.dev/agent": "sidecar"}));
    let acts = |s: &Scope, pod: Option<&Pod>| s.takes(&task) && s.serves(pod);
    assert!(acts(&Scope::Node, Some(&plain)));
    assert!(!acts(&Scope::Node, Some(&with_sidecar)));
    assert!(acts(&Scope::Node, None), "a gone pod's revert stays the node agent's");
    let mine = Scope::Pod { namespace: "shop".into(), uid: task.spec.pod_uid.clone() };
    let other = Scope::Pod { namespace: "shop".into(), uid: "another-uid".into() };
    assert!(acts(&mine, Some(&with_sidecar)) && !acts(&other, Some(&with_sidecar)));
}
