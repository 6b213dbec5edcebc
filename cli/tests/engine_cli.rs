//! The command-line contract around the engine: usage errors (exit 2), failures (exit 1),
//! what a wrong target gets.

mod support;

use std::ffi::OsStr;
use support::*;

#[test]
fn usage_errors_exit_2() {
    for args in [
        vec![],
        vec!["no-such-command"],
        vec!["apply"],
        vec!["apply", "--pid"],
        vec!["apply", "--pid", "not-a-number", "x.lpatch"],
        vec!["apply", "--pid", "1", "x.lpatch", "--strategy", "sometimes"],
        vec!["apply", "--pid", "1", "x.lpatch", "--timeout", "soon"],
        vec!["status"],
        vec!["revert"],
        vec!["build", "--old", "a"],
        vec!["diff", "only-one"],
        vec!["inspect"],
    ] {
        let run = livepatch(&args);
        run.assert_code(2);
        assert!(
            !run.stderr.trim().is_empty(),
            "usage error without a message: {args:?}"
        );
    }
}

#[test]
fn missing_files_fail() {
    let exe = compile("plain", "v1", Variant::O2_PIE);
    let run = livepatch([
        OsStr::new("diff"),
        OsStr::new("/nonexistent/old"),
        exe.as_os_str(),
    ]);
    run.assert_code(1)
        .assert_stderr_mentions("/nonexistent/old");
    let run = livepatch(["inspect", "/nonexistent/bundle.lpatch"]);
    run.assert_code(1);
}

/// A file that is not a bundle is rejected by inspect and by apply; the target is untouched.
#[test]
fn not_a_bundle() {
    let exe = compile("plain", "v1", Variant::O2_PIE);
    let run = livepatch([OsStr::new("inspect"), exe.as_os_str()]);
    run.assert_code(1);

    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.lpatch");
    std::fs::write(&junk, b"this is not a patch bundle\n").unwrap();
    let mut t = Target::start(&exe);
    let before = Untouched::take(t.pid);
    let run = livepatch([
        OsStr::new("apply"),
        OsStr::new("--pid"),
        OsStr::new(&t.pid.to_string()),
        junk.as_os_str(),
    ]);
    // A bad bundle is a failure (1), not a refusal: nothing was decided about the target.
    run.assert_code(1).assert_stderr_mentions("bad bundle");
    t.expect("call 5", "result v1 10");
    before.check(t.pid);
}

/// A truncated bundle (cut anywhere) is rejected, never half-applied.
#[test]
fn truncated_bundle() {
    let v = Variant::O2_PIE;
    let old = compile("plain", "v1", v);
    let bundle = build_bundle(&old, &compile("plain", "v2", v), &[]);
    let bytes = std::fs::read(&bundle.path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.lpatch");
    let mut t = Target::start(&old);
    let before = Untouched::take(t.pid);
    for len in [0, 1, bytes.len() / 3, bytes.len() / 2, bytes.len() - 1] {
        std::fs::write(&cut, &bytes[..len]).unwrap();
        let run = livepatch([OsStr::new("inspect"), cut.as_os_str()]);
        run.assert_code(1);
        let run = livepatch([
            OsStr::new("apply"),
            OsStr::new("--pid"),
            OsStr::new(&t.pid.to_string()),
            cut.as_os_str(),
        ]);
        run.assert_code(1).assert_stderr_mentions("bad bundle");
        t.expect("call 5", "result v1 10");
    }
    before.check(t.pid);
}

/// A process that does not exist: apply, status and revert fail (1).
#[test]
fn no_such_process() {
    let v = Variant::O2_PIE;
    let old = compile("plain", "v1", v);
    let bundle = build_bundle(&old, &compile("plain", "v2", v), &[]);
    let mut t = Target::start(&old);
    let pid = t.pid;
    t.expect("quit", "bye");
    t.wait_exit(LINE_TIMEOUT).expect("exit");
    apply(pid, &bundle, IDLE).assert_code(1).assert_stderr_mentions("no such process");
    livepatch(["status", "--pid", &pid.to_string()]).assert_code(1).assert_stderr_mentions("no such process");
    livepatch(["revert", "--pid", &pid.to_string()]).assert_code(1).assert_stderr_mentions("no such process");
}

/// The README's main job: `livepatch demo` builds a service as a distribution would (hardening
/// flags, no live-patching flags), takes the changed set from the source diff (only `price`;
/// `main` differs by register allocation and is not patched), updates it live, reverts.
#[test]
fn demo_runs_end_to_end() {
    let run = livepatch([OsStr::new("demo")]);
    run.assert_ok();
    let out = &run.stdout;
    assert!(out.contains("from the source diff") && out.contains("patches price"), "{out}");
    assert!(!out.contains("patches price, main") && !out.contains("patches main"), "main patched: {out}");
    assert!(out.contains("== applied lp-") && out.contains("== reverted lp-"), "{out}");
    // After the update, orders of 10 or more get the discount: 10 x 10 = 90 ... 12 x 10 = 108.
    let after = &out[out.find("== applied").unwrap()..out.find("== status").unwrap()];
    assert!(after.contains(" x 10 = 90") || after.contains("x 10 = 99") || after.contains("x 10 = 108"), "{after}");
    let reverted = &out[out.find("== reverted").unwrap()..];
    assert!(reverted.contains("10 x 10 = 100") || reverted.contains("11 x 10 = 110") || reverted.contains("12 x 10 = 120"), "{reverted}");
}

/// `build --emit-manifest`: a ConfigMap holding exactly the bundle and a LivePatch naming it with
/// its digest and the old build id; stable names; the same file for the same fix under
/// `SOURCE_DATE_EPOCH`; bad rollout flags are refused before anything is written.
#[test]
fn build_emits_a_manifest() {
    let old = compile("plain", "v1", Variant::REAL[0]);
    let new = compile("plain", "v2", Variant::REAL[0]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("Plain_Fix.lpatch");
    let args = |extra: &[&str]| {
        let mut a: Vec<String> = vec!["build".into(), "--old".into(), old.display().to_string(), "--new".into(), new.display().to_string(), "-o".into(), out.display().to_string()];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let flags = ["--emit-manifest", "--namespace", "shop", "--selector", "app=cart,tier=web", "--container", "app", "--json"];
    let run = spawn_livepatch_env(args(&flags), &[("SOURCE_DATE_EPOCH", "1700000000")]).finish(TOOL_TIMEOUT);
    run.assert_code(0);
    let info: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let yaml_path = dir.path().join("plain-fix.yaml");
    assert_eq!(info["manifest"].as_str().map(std::path::PathBuf::from), Some(yaml_path.clone()));
    let yaml = std::fs::read_to_string(&yaml_path).unwrap();
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&yaml).unwrap();
    assert_eq!(docs.len(), 2, "{yaml}");
    let (cm, lp) = (&docs[0], &docs[1]);
    assert_eq!((cm["kind"].as_str(), cm["metadata"]["name"].as_str(), cm["metadata"]["namespace"].as_str()), (Some("ConfigMap"), Some("plain-fix-bundle"), Some("shop")));
    let b64 = cm["binaryData"]["patch.lpatch"].as_str().unwrap();
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64).unwrap(), bytes, "the ConfigMap holds another file than the bundle");
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
    assert_eq!(info["sha256"].as_str(), Some(digest.as_str()));
    assert_eq!((lp["apiVersion"].as_str(), lp["kind"].as_str(), lp["metadata"]["name"].as_str()), (Some("livepatch.dev/v1alpha1"), Some("LivePatch"), Some("plain-fix")));
    let spec = &lp["spec"];
    assert_eq!(spec["patch"]["sha256"].as_str(), Some(digest.as_str()));
    assert_eq!(spec["patch"]["configMapRef"], serde_json::json!({"name": "plain-fix-bundle", "key": "patch.lpatch"}));
    assert_eq!(spec["target"]["buildID"].as_str(), Elf::read(&old).build_id().as_deref());
    assert_eq!(spec["selector"], serde_json::json!({"matchLabels": {"app": "cart", "tier": "web"}}));
    assert_eq!(spec["container"].as_str(), Some("app"));
    for generated in ["status", "uid", "resourceVersion", "creationTimestamp", "generation"] {
        assert!(lp.get(generated).is_none() && lp["metadata"].get(generated).is_none(), "{generated} written:\n{yaml}");
    }

    // The same fix built again: the same bundle and manifest, byte for byte.
    spawn_livepatch_env(args(&flags), &[("SOURCE_DATE_EPOCH", "1700000000")]).finish(TOOL_TIMEOUT).assert_code(0);
    assert_eq!(std::fs::read(&out).unwrap(), bytes);
    assert_eq!(std::fs::read_to_string(&yaml_path).unwrap(), yaml);

    // A URL source: no ConfigMap.
    livepatch(args(&["--emit-manifest", "-n", "shop", "-l", "app=cart", "--name", "by-url", "--bundle-url", "https://patches.example.com/fix.lpatch"])).assert_code(0);
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&std::fs::read_to_string(dir.path().join("by-url.yaml")).unwrap()).unwrap();
    assert_eq!(docs.len(), 1);
    assert_eq!(docs[0]["spec"]["patch"]["url"].as_str(), Some("https://patches.example.com/fix.lpatch"));

    // Refused before the build: nothing new is written.
    let fresh = dir.path().join("fresh.lpatch");
    for bad in [
        vec!["--emit-manifest", "-l", "app=cart"],
        vec!["--emit-manifest", "-n", "shop"],
        vec!["--emit-manifest", "-n", "shop", "-l", "app in (a,b)"],
        vec!["--emit-manifest", "-n", "Shop", "-l", "app=cart"],
        vec!["--emit-manifest", "-n", "shop", "-l", "app=cart", "--bundle-url", "http://insecure/x"],
    ] {
        let mut a = args(&bad);
        let o = a.iter().position(|x| x == "-o").unwrap();
        a[o + 1] = fresh.display().to_string();
        let run = livepatch(&a);
        run.assert_code(1);
        assert!(!fresh.exists(), "{bad:?}: a bundle was written although the flags were refused");
    }
    let run = livepatch(args(&["--namespace", "shop"]));
    run.assert_code(2); // --namespace without --emit-manifest: a usage error
}
