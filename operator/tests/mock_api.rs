//! The HTTP-level steps of a reconcile against a mock API server (tower-test): the exact requests
//! (method, path and query, content type, body) for the finalizer, the tasks, the status and
//! the events, in order.

use std::{sync::Arc, time::Duration};

use http::StatusCode;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use livepatch_api::LivePatch;
use livepatch_operator::{
    controller::{reconcile, Context, Error},
    metrics::Metrics,
    plan::{self, Observed},
    pods::PodView,
};
use livepatch_testkit::mock_api::{self, expect_get, next, not_found, respond, ApiHandle};
use serde_json::{json, Value};

const LP_PATH: &str = "/apis/livepatch.dev/v1alpha1/namespaces/shop/livepatches/cart-fix";
const TASKS_PATH: &str = "/apis/livepatch.dev/v1alpha1/namespaces/shop/livepatchtasks";
const SSA_QUERY: &str = "?&force=true&fieldManager=livepatch-operator";
const PODS_LIST: &str = "/api/v1/namespaces/shop/pods?&labelSelector=app%3Dcart";
const TASKS_LIST: &str =
    "/apis/livepatch.dev/v1alpha1/namespaces/shop/livepatchtasks?&labelSelector=livepatch.dev%2Flivepatch%3Dcart-fix";
const EVENTS_PATH: &str = "/apis/events.k8s.io/v1/namespaces/shop/events?";
const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

fn fixed_now() -> Timestamp {
    Timestamp::from_second(1_800_000_000).unwrap()
}

fn context(client: Client) -> Arc<Context> {
    let mut ctx = Context::new(client, Arc::new(Metrics::default()), "operator-0");
    ctx.clock = fixed_now;
    Arc::new(ctx)
}

fn livepatch_json(finalizers: &[&str]) -> Value {
    json!({
        "apiVersion": "livepatch.dev/v1alpha1",
        "kind": "LivePatch",
        "metadata": {
            "name": "cart-fix", "namespace": "shop", "uid": "lp-uid-1", "generation": 1,
            "resourceVersion": "100", "finalizers": finalizers
        },
        "spec": {
            "selector": {"matchLabels": {"app": "cart"}},
            "container": "cart",
            "target": {"buildID": "0123456789abcdef", "path": "/usr/local/bin/cart"},
            "patch": {"configMapRef": {"name": "cart-fix", "key": "patch.lpatch"}, "sha256": SHA},
            "safety": {"strategy": "Trap", "timeoutSeconds": 30},
            "rollout": {"maxConcurrent": 1}
        }
    })
}

fn livepatch(value: Value) -> Arc<LivePatch> {
    Arc::new(serde_json::from_value(value).unwrap())
}

fn deleting(mut value: Value) -> Value {
    value["metadata"]["deletionTimestamp"] = json!("2027-01-15T08:00:00Z");
    value
}

fn pod_json(name: &str, node: &str, container_id: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"), "labels": {"app": "cart"}},
        "spec": {"nodeName": node, "containers": [{"name": "cart", "image": "cart:1"}]},
        "status": {
            "phase": "Running",
            "containerStatuses": [{
                "name": "cart", "containerID": container_id, "ready": true, "restartCount": 0,
                "image": "cart:1", "imageID": "sha256:1", "state": {"running": {"startedAt": "2027-01-15T07:00:00Z"}}
            }]
        }
    })
}

fn list(kind: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": "1"}, "items": items})
}

fn task_spec(pod: &str, node: &str, container_id: &str, action: &str) -> Value {
    json!({
        "podName": pod, "podUid": format!("uid-{pod}"), "nodeName": node,
        "containerName": "cart", "containerId": container_id,
        "bundle": {"configMapRef": {"name": "cart-fix", "key": "patch.lpatch"}, "sha256": SHA},
        "target": {"buildID": "0123456789abcdef", "path": "/usr/local/bin/cart"},
        "strategy": "Trap", "timeoutSeconds": 30, "action": action, "livePatchGeneration": 1
    })
}

/// The object the operator applies for a task.
fn task_apply_body(pod: &str, node: &str, container_id: &str, action: &str) -> Value {
    json!({
        "apiVersion": "livepatch.dev/v1alpha1",
        "kind": "LivePatchTask",
        "metadata": {
            "name": format!("cart-fix-{pod}"),
            "namespace": "shop",
            "labels": {
                "app.kubernetes.io/managed-by": "livepatch-operator",
                "livepatch.dev/livepatch": "cart-fix",
                "livepatch.dev/node": node
            },
            "ownerReferences": [{
                "apiVersion": "livepatch.dev/v1alpha1", "kind": "LivePatch", "name": "cart-fix",
                "uid": "lp-uid-1", "controller": true, "blockOwnerDeletion": true
            }]
        },
        "spec": task_spec(pod, node, container_id, action)
    })
}

/// A task as the API server returns it, with the agent's status.
fn task_json(pod: &str, node: &str, action: &str, phase: Option<&str>) -> Value {
    let mut task = task_apply_body(pod, node, "containerd://a1", action);
    task["metadata"]["uid"] = json!(format!("task-uid-{pod}"));
    task["metadata"]["generation"] = json!(2);
    if let Some(phase) = phase {
        task["status"] = json!({"observedGeneration": 2, "phase": phase, "containerId": "containerd://a1", "attempts": 1});
    }
    task
}

/// Expect an event with this reason and type; answer it.
async fn expect_event(handle: &mut ApiHandle, reason: &str, type_: &str) -> Value {
    let (method, uri, _, body, send) = next(handle).await;
    assert_eq!((method.as_str(), uri.as_str()), ("POST", EVENTS_PATH));
    assert_eq!(body["reason"], reason, "{body}");
    assert_eq!(body["type"], type_);
    assert_eq!(body["reportingController"], "livepatch-operator");
    assert_eq!(body["reportingInstance"], "operator-0");
    assert_eq!(body["regarding"]["kind"], "LivePatch");
    assert_eq!(body["regarding"]["name"], "cart-fix");
    respond(send, StatusCode::CREATED, &body);
    body
}

/// Expect the finalizer's JSON patch; answer it.
async fn expect_finalizer_patch(handle: &mut ApiHandle, expected: Value, answer: Value) {
    let (method, uri, content_type, body, send) = next(handle).await;
    assert_eq!((method.as_str(), uri.as_str()), ("PATCH", format!("{LP_PATH}?").as_str()));
    assert_eq!(content_type.as_deref(), Some("application/json-patch+json"));
    assert_eq!(body, expected);
    respond(send, StatusCode::OK, &answer);
}

/// Expect a server-side apply of a task; answer it; return the body.
async fn expect_task_apply(handle: &mut ApiHandle, task: &str, expected: Value) {
    let (method, uri, content_type, body, send) = next(handle).await;
    assert_eq!(method, "PATCH");
    assert_eq!(uri, format!("{TASKS_PATH}/{task}{SSA_QUERY}"));
    assert_eq!(content_type.as_deref(), Some("application/apply-patch+yaml"));
    assert_eq!(body, expected);
    let mut answer = body.clone();
    answer["metadata"]["uid"] = json!("task-uid");
    answer["metadata"]["generation"] = json!(1);
    respond(send, StatusCode::OK, &answer);
}

/// Expect a server-side apply of the LivePatch status; answer it; return the status sent.
async fn expect_status_apply(handle: &mut ApiHandle, lp: &Value) -> Value {
    mock_api::expect_status_apply(handle, &format!("{LP_PATH}/status{SSA_QUERY}"), "LivePatch", lp).await
}

/// The reconcile's result, failing on any request it sends before it ends.
async fn finish<T>(mut run: tokio::task::JoinHandle<T>, handle: &mut ApiHandle) -> T {
    tokio::select! {
        biased;
        result = &mut run => result.unwrap(),
        request = handle.next_request() => match request {
            Some((request, _)) => panic!("unexpected request {} {}", request.method(), request.uri()),
            None => run.await.unwrap(),
        },
    }
}

#[tokio::test]
async fn finalizer_is_added_first_with_a_json_patch() {
    let (client, mut handle) = mock_api::client();
    let lp = livepatch_json(&[]);
    let run = tokio::spawn(reconcile(livepatch(lp.clone()), context(client)));

    let expected = json!([
        {"op": "test", "path": "/metadata/finalizers", "value": null},
        {"op": "add", "path": "/metadata/finalizers", "value": ["livepatch.dev/revert"]}
    ]);
    // The LivePatch as read has `finalizers: []`; kube's helper treats empty as absent.
    expect_finalizer_patch(&mut handle, expected, livepatch_json(&["livepatch.dev/revert"])).await;
    finish(run, &mut handle).await.expect("reconcile succeeds");
}

#[tokio::test]
async fn apply_creates_tasks_with_server_side_apply_and_writes_the_status() {
    let (client, mut handle) = mock_api::client();
    let lp = livepatch_json(&["livepatch.dev/revert"]);
    let run = tokio::spawn(reconcile(livepatch(lp.clone()), context(client)));

    let pods = list("PodList", vec![pod_json("cart-a", "node-1", "containerd://a1"), pod_json("cart-b", "node-2", "containerd://b1")]);
    expect_get(&mut handle, PODS_LIST, pods).await;
    expect_get(&mut handle, TASKS_LIST, list("LivePatchTaskList", vec![])).await;
    // maxConcurrent 1: one task now.
    expect_task_apply(&mut handle, "cart-fix-cart-a", task_apply_body("cart-a", "node-1", "containerd://a1", "Apply")).await;
    let status = expect_status_apply(&mut handle, &lp).await;
    assert_eq!(status["phase"], "Progressing");
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(
        status["counts"],
        json!({"targets": 2, "patched": 0, "pending": 2, "failed": 0, "blocked": 0, "restartRequired": 0, "reverted": 0})
    );
    let conditions = status["conditions"].as_array().unwrap();
    let types: Vec<_> = conditions.iter().map(|c| c["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["Ready", "Progressing", "Degraded", "RestartRequired"]);
    assert_eq!(
        conditions[1],
        json!({
            "type": "Progressing", "status": "True", "reason": "Dispatching",
            "message": "1 target(s) in progress, 1 waiting for a rollout slot",
            "observedGeneration": 1, "lastTransitionTime": "2027-01-15T08:00:00Z"
        })
    );
    let event = expect_event(&mut handle, "Dispatched", "Normal").await;
    assert_eq!(event["note"], "dispatched the patch to pod cart-a on node node-1");
    assert_eq!(event["related"], json!({"apiVersion": "v1", "kind": "Pod", "name": "cart-a", "namespace": "shop", "uid": "uid-cart-a"}));
    assert_eq!(event["action"], "Dispatch");

    let action = finish(run, &mut handle).await.expect("reconcile succeeds");
    assert_eq!(action, kube::runtime::controller::Action::requeue(Duration::from_secs(300)));
}

#[tokio::test]
async fn nothing_is_written_when_nothing_changed() {
    let (client, mut handle) = mock_api::client();
    let pods = vec![pod_json("cart-a", "node-1", "containerd://a1")];
    let tasks = vec![task_json("cart-a", "node-1", "Apply", Some("Applied"))];
    // The status the operator computed last time.
    let mut lp = livepatch_json(&["livepatch.dev/revert"]);
    let observed = Observed {
        pods: pods.iter().map(|p| PodView::from_pod(&serde_json::from_value(p.clone()).unwrap()).unwrap()).collect(),
        tasks: tasks.iter().map(|t| serde_json::from_value(t.clone()).unwrap()).collect(),
        ..Observed::default()
    };
    let status = plan::plan_apply(&livepatch(lp.clone()), &observed, fixed_now()).status;
    assert_eq!(status.counts.patched, 1);
    lp["status"] = serde_json::to_value(&status).unwrap();

    let run = tokio::spawn(reconcile(livepatch(lp), context(client)));
    expect_get(&mut handle, PODS_LIST, list("PodList", pods)).await;
    expect_get(&mut handle, TASKS_LIST, list("LivePatchTaskList", tasks)).await;
    finish(run, &mut handle).await.expect("reconcile succeeds");
}

#[tokio::test]
async fn the_task_of_a_deleted_pod_is_deleted() {
    let (client, mut handle) = mock_api::client();
    let lp = livepatch_json(&["livepatch.dev/revert"]);
    let run = tokio::spawn(reconcile(livepatch(lp.clone()), context(client)));
    expect_get(&mut handle, PODS_LIST, list("PodList", vec![])).await;
    expect_get(&mut handle, TASKS_LIST, list("LivePatchTaskList", vec![task_json("cart-a", "node-1", "Apply", Some("Applied"))])).await;
    // Not among the matching pods: is it gone?
    let (method, uri, _, _, send) = next(&mut handle).await;
    assert_eq!((method.as_str(), uri.as_str()), ("GET", "/api/v1/namespaces/shop/pods/cart-a"));
    not_found(send, "pods", "cart-a");
    let (method, uri, _, body, send) = next(&mut handle).await;
    assert_eq!((method.as_str(), uri.as_str()), ("DELETE", format!("{TASKS_PATH}/cart-fix-cart-a?").as_str()));
    assert_eq!(body, json!({"propagationPolicy": "Background"}));
    respond(send, StatusCode::OK, &task_json("cart-a", "node-1", "Apply", Some("Applied")));
    let status = expect_status_apply(&mut handle, &lp).await;
    assert_eq!(status["phase"], "Pending");
    finish(run, &mut handle).await.expect("reconcile succeeds");
}

#[tokio::test]
async fn delete_asks_the_agents_to_revert_and_keeps_the_finalizer() {
    let (client, mut handle) = mock_api::client();
    let lp = deleting(livepatch_json(&["livepatch.dev/revert"]));
    let run = tokio::spawn(reconcile(livepatch(lp.clone()), context(client)));
    expect_get(&mut handle, PODS_LIST, list("PodList", vec![pod_json("cart-a", "node-1", "containerd://a1")])).await;
    expect_get(&mut handle, TASKS_LIST, list("LivePatchTaskList", vec![task_json("cart-a", "node-1", "Apply", Some("Applied"))])).await;
    // The pod is there: is its node?
    expect_get(&mut handle, "/api/v1/nodes/node-1", json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"}})).await;
    expect_task_apply(&mut handle, "cart-fix-cart-a", task_apply_body("cart-a", "node-1", "containerd://a1", "Revert")).await;
    let status = expect_status_apply(&mut handle, &lp).await;
    assert_eq!(status["phase"], "Reverting");
    assert_eq!(status["counts"]["pending"], 1);
    expect_event(&mut handle, "Reverting", "Normal").await;
    match finish(run, &mut handle).await {
        Err(Error::RevertPending(1)) => {}
        other => panic!("expected RevertPending(1), got {other:?}"),
    }
}

#[tokio::test]
async fn delete_removes_the_finalizer_once_every_target_is_reverted_or_gone() {
    let (client, mut handle) = mock_api::client();
    let lp = deleting(livepatch_json(&["livepatch.dev/revert"]));
    let run = tokio::spawn(reconcile(livepatch(lp.clone()), context(client)));
    let pods = vec![pod_json("cart-a", "node-1", "containerd://a1"), pod_json("cart-b", "node-2", "containerd://a1")];
    let tasks = vec![
        task_json("cart-a", "node-1", "Revert", Some("Reverted")),
        task_json("cart-b", "node-2", "Revert", None),
    ];
    expect_get(&mut handle, PODS_LIST, list("PodList", pods)).await;
    expect_get(&mut handle, TASKS_LIST, list("LivePatchTaskList", tasks)).await;
    // cart-b is not reverted yet, but its node is gone for good.
    let (method, uri, _, _, send) = next(&mut handle).await;
    assert_eq!((method.as_str(), uri.as_str()), ("GET", "/api/v1/nodes/node-2"));
    not_found(send, "nodes", "node-2");
    let event = expect_event(&mut handle, "Released", "Normal").await;
    assert_eq!(event["note"], "2 of 2 targets reverted or gone: released");
    expect_finalizer_patch(
        &mut handle,
        json!([
            {"op": "test", "path": "/metadata/finalizers/0", "value": "livepatch.dev/revert"},
            {"op": "remove", "path": "/metadata/finalizers/0"}
        ]),
        lp.clone(),
    )
    .await;
    finish(run, &mut handle).await.expect("reconcile succeeds");
}

#[tokio::test]
async fn forced_release_removes_the_finalizer_without_waiting() {
    let (client, mut handle) = mock_api::client();
    let mut lp = deleting(livepatch_json(&["other.example/keep", "livepatch.dev/revert"]));
    lp["metadata"]["annotations"] = json!({"livepatch.dev/force-release": "true"});
    let run = tokio::spawn(reconcile(livepatch(lp.clone()), context(client)));
    expect_get(&mut handle, TASKS_LIST, list("LivePatchTaskList", vec![task_json("cart-a", "node-1", "Revert", None)])).await;
    let event = expect_event(&mut handle, "ForceReleased", "Warning").await;
    assert!(event["note"].as_str().unwrap().contains("without waiting for 1 target(s)"));
    expect_finalizer_patch(
        &mut handle,
        json!([
            {"op": "test", "path": "/metadata/finalizers/1", "value": "livepatch.dev/revert"},
            {"op": "remove", "path": "/metadata/finalizers/1"}
        ]),
        lp.clone(),
    )
    .await;
    finish(run, &mut handle).await.expect("reconcile succeeds");
}

#[tokio::test]
async fn api_errors_are_reported_by_kind() {
    let (client, mut handle) = mock_api::client();
    let ctx = context(client);
    let lp = livepatch_json(&["livepatch.dev/revert"]);
    let run = tokio::spawn(reconcile(livepatch(lp.clone()), ctx.clone()));
    let (_, uri, _, _, send) = next(&mut handle).await;
    assert_eq!(uri, PODS_LIST);
    let forbidden = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403, "message": "no"});
    respond(send, StatusCode::FORBIDDEN, &forbidden);
    let error = finish(run, &mut handle).await.expect_err("the reconcile fails");
    assert_eq!(error.kind(), "forbidden");
    let action = livepatch_operator::controller::error_policy(livepatch(lp), &error, ctx.clone());
    assert_eq!(action, kube::runtime::controller::Action::requeue(Duration::from_secs(15)));
    assert!(ctx.metrics.encode().contains("livepatch_reconcile_errors_total{kind=\"forbidden\"} 1"));
}
