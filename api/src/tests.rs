//! Schema tests: the shape of the generated CRDs and their CEL rules, evaluated client-side with
//! kube's CEL evaluator (the same rules the API server runs).

use kube::core::cel::{compile_schema, estimate_rule_cost, Validator};
use kube::CustomResourceExt;
use serde_json::{json, Value};

use super::*;

fn schema_of(crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition) -> Value {
    let version = &crd.spec.versions[0];
    serde_json::to_value(version.schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap()).unwrap()
}

/// A LivePatch with every field set.
fn full_livepatch() -> Value {
    json!({
        "apiVersion": "livepatch.dev/v1alpha1",
        "kind": "LivePatch",
        "metadata": {"name": "cart-fix", "namespace": "shop"},
        "spec": {
            "selector": {"matchLabels": {"app": "cart"}},
            "container": "cart",
            "target": {"buildID": "0123456789abcdef0123456789abcdef01234567", "path": "/usr/local/bin/cart"},
            "patch": {
                "configMapRef": {"name": "cart-fix", "key": "patch.lpatch"},
                "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
            },
            "safety": {"strategy": "Trap", "timeoutSeconds": 30},
            "rollout": {"maxConcurrent": 2}
        }
    })
}

fn validate(object: &Value) -> Result<(), Vec<String>> {
    Validator::new()
        .validate(&schema_of(&LivePatch::crd()), object, None)
        .map_err(|errors| errors.iter().map(|e| e.to_string()).collect())
}

fn with(mut object: Value, pointer: &str, value: Value) -> Value {
    *object.pointer_mut(pointer).unwrap_or_else(|| panic!("no {pointer}")) = value;
    object
}

fn expect_rejected(object: Value, message: &str) {
    let errors = validate(&object).expect_err("the object must be rejected");
    assert!(
        errors.iter().any(|e| e.contains(message)),
        "expected an error containing {message:?}, got {errors:?}"
    );
}

#[test]
fn livepatch_crd_names_columns_and_subresources() {
    let crd = LivePatch::crd();
    assert_eq!(crd.metadata.name.as_deref(), Some("livepatches.livepatch.dev"));
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(crd.spec.names.short_names, Some(vec!["lp".to_string()]));
    let version = &crd.spec.versions[0];
    assert_eq!(version.name, VERSION);
    assert!(version.subresources.as_ref().unwrap().status.is_some());
    let columns: Vec<_> = version
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| (c.name.as_str(), c.json_path.as_str()))
        .collect();
    assert_eq!(
        columns,
        [
            ("Phase", ".status.phase"),
            ("Targets", ".status.counts.targets"),
            ("Patched", ".status.counts.patched"),
            ("Restart-Required", ".status.counts.restartRequired"),
            ("Age", ".metadata.creationTimestamp"),
        ]
    );
}

#[test]
fn task_crd_is_selectable_by_node() {
    let crd = LivePatchTask::crd();
    assert_eq!(crd.metadata.name.as_deref(), Some("livepatchtasks.livepatch.dev"));
    let version = &crd.spec.versions[0];
    assert!(version.subresources.as_ref().unwrap().status.is_some());
    let fields: Vec<_> = version.selectable_fields.as_ref().unwrap().iter().map(|f| f.json_path.as_str()).collect();
    assert_eq!(fields, [".spec.nodeName", ".spec.podName"]);
}

/// Every object in both schemas has a description (the doc comments), so `kubectl explain` explains.
#[test]
fn every_property_is_documented() {
    fn walk(path: &str, schema: &Value, missing: &mut Vec<String>) {
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (name, prop) in props {
                let here = format!("{path}.{name}");
                let top_level = path.is_empty() && matches!(name.as_str(), "apiVersion" | "kind" | "metadata");
                if prop.get("description").is_none() && !top_level {
                    missing.push(here.clone());
                }
                walk(&here, prop, missing);
            }
        }
        if let Some(items) = schema.get("items") {
            walk(&format!("{path}[]"), items, missing);
        }
    }
    let mut missing = vec![];
    walk("", &schema_of(&LivePatch::crd()), &mut missing);
    walk("", &schema_of(&LivePatchTask::crd()), &mut missing);
    assert!(missing.is_empty(), "fields without a description: {missing:?}");
}

/// All rules compile, and none is estimated over the API server's cost budget.
#[test]
fn cel_rules_compile_within_budget() {
    fn walk(schema: &Value, rules: &mut usize) {
        if let Some(validations) = schema.get("x-kubernetes-validations").and_then(Value::as_array) {
            let compiled = compile_schema(schema);
            assert!(!compiled.has_errors(), "{:?}", compiled.compilation_errors());
            for v in validations {
                let rule = v["rule"].as_str().unwrap();
                assert!(v["message"].is_string(), "rule {rule} has no message");
                let warnings = estimate_rule_cost(rule, &compiled);
                assert!(warnings.is_empty(), "{rule}: {warnings:?}");
                *rules += 1;
            }
        }
        for key in ["properties", "additionalProperties", "items"] {
            match schema.get(key) {
                Some(Value::Object(map)) if key == "properties" => map.values().for_each(|s| walk(s, rules)),
                Some(s @ Value::Object(_)) => walk(s, rules),
                _ => {}
            }
        }
    }
    let mut rules = 0;
    walk(&schema_of(&LivePatch::crd()), &mut rules);
    walk(&schema_of(&LivePatchTask::crd()), &mut rules);
    assert!(rules >= 10, "only {rules} rules");
}

#[test]
fn full_example_is_valid_and_round_trips() {
    validate(&full_livepatch()).unwrap();
    let lp: LivePatch = serde_json::from_value(full_livepatch()).unwrap();
    assert_eq!(lp.spec.rollout.max_concurrent, 2);
    assert_eq!(lp.spec.safety.strategy, Strategy::Trap);
    let mut back = serde_json::to_value(&lp).unwrap();
    back.as_object_mut().unwrap().remove("status");
    assert_eq!(back, full_livepatch());
}

#[test]
fn minimal_example_gets_defaults() {
    let mut minimal = full_livepatch();
    let spec = minimal["spec"].as_object_mut().unwrap();
    spec.remove("safety");
    spec.remove("rollout");
    spec.remove("container");
    validate(&minimal).unwrap();
    let lp: LivePatch = serde_json::from_value(minimal).unwrap();
    assert_eq!(lp.spec.safety.timeout_seconds, DEFAULT_TIMEOUT_SECONDS);
    assert_eq!(lp.spec.rollout.max_concurrent, DEFAULT_MAX_CONCURRENT);
}

#[test]
fn malformed_sha256_is_rejected() {
    expect_rejected(
        with(full_livepatch(), "/spec/patch/sha256", json!("9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08")),
        "sha256 must be 64 lowercase hex characters",
    );
    expect_rejected(
        with(full_livepatch(), "/spec/patch/sha256", json!("z".repeat(64))),
        "sha256 must be 64 lowercase hex characters",
    );
}

#[test]
fn empty_selector_is_rejected() {
    expect_rejected(with(full_livepatch(), "/spec/selector", json!({})), "selector must not be empty");
    expect_rejected(
        with(full_livepatch(), "/spec/selector", json!({"matchLabels": {}, "matchExpressions": []})),
        "selector must not be empty",
    );
    let expressions = json!({"matchExpressions": [{"key": "app", "operator": "Exists"}]});
    validate(&with(full_livepatch(), "/spec/selector", expressions)).unwrap();
}

#[test]
fn bundle_url_must_be_https() {
    let url = |u: &str| {
        json!({"url": u, "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"})
    };
    validate(&with(full_livepatch(), "/spec/patch", url("https://example.com/cart.lpatch"))).unwrap();
    expect_rejected(
        with(full_livepatch(), "/spec/patch", url("http://example.com/cart.lpatch")),
        "url must be an https URL",
    );
    expect_rejected(with(full_livepatch(), "/spec/patch", url("cart.lpatch")), "url must be an https URL");
}

#[test]
fn exactly_one_bundle_source() {
    let two = json!({
        "configMapRef": {"name": "a", "key": "b"},
        "url": "https://example.com/x",
        "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    });
    expect_rejected(with(full_livepatch(), "/spec/patch", two), "exactly one of configMapRef, secretRef and url");
    let none = json!({"sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"});
    expect_rejected(with(full_livepatch(), "/spec/patch", none), "exactly one of configMapRef, secretRef and url");
    let secret = json!({
        "secretRef": {"name": "a", "key": "b"},
        "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    });
    validate(&with(full_livepatch(), "/spec/patch", secret)).unwrap();
}

#[test]
fn rollout_limit_at_least_one() {
    expect_rejected(
        with(full_livepatch(), "/spec/rollout/maxConcurrent", json!(0)),
        "maxConcurrent must be at least 1",
    );
}

#[test]
fn build_id_and_path_rules() {
    expect_rejected(with(full_livepatch(), "/spec/target/buildID", json!("ABCDEF0123")), "buildID must be lowercase hex");
    expect_rejected(with(full_livepatch(), "/spec/target/path", json!("bin/cart")), "path must be absolute");
}

#[test]
fn task_status_round_trips() {
    let status = LivePatchTaskStatus {
        observed_generation: Some(3),
        phase: TargetPhase::RestartRequired,
        container_id: Some("containerd://abc".into()),
        pids: vec![4242, 4250],
        attempts: 2,
        reason: Some("DataLayoutChanged".into()),
        message: Some("global `cart_table` changed size".into()),
        pause_micros: Some(180),
        patch_id: Some("cart-fix-1".into()),
    };
    let value = serde_json::to_value(&status).unwrap();
    assert_eq!(value["phase"], "RestartRequired");
    assert_eq!(value["pauseMicros"], 180);
    assert_eq!(serde_json::from_value::<LivePatchTaskStatus>(value).unwrap(), status);
    assert!(TargetPhase::Blocked.is_settled_apply());
    assert!(!TargetPhase::Pending.is_settled_apply());
    assert!(!TargetPhase::Reverted.is_settled_apply());
}
