//! Bundle fixtures (`livepatch build` of two builds of a target) and the commands of the CLI
//! contract (`apply`, `revert`, `status`, `diff`), each returning what its `--json` says.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::cli::{livepatch, names, Run, Status};
use crate::matrix::{cache_dir, compile, source, unique, Variant};

/// A bundle file in its own temporary directory.
pub struct Bundle {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

/// `livepatch build --old OLD --new NEW -o BUNDLE [--function F]...`, which must succeed.
#[track_caller]
pub fn build_bundle(old: &Path, new: &Path, functions: &[&str]) -> Bundle {
    let (run, bundle) = try_build_bundle(old, new, functions);
    run.assert_ok();
    assert!(
        bundle.path.is_file(),
        "build succeeded but wrote no {}",
        bundle.path.display()
    );
    bundle
}

/// The fix between two versions of a scenario as a unified diff (`diff -u`), as a user would
/// hand it to `livepatch build --source-diff`.
pub fn source_diff(scenario: &str, from: &str, to: &str) -> PathBuf {
    let out = cache_dir().join(format!("{scenario}-{from}-{to}.diff"));
    let r = Command::new("diff")
        .arg("-u")
        .arg(source(scenario, from))
        .arg(source(scenario, to))
        .output()
        .expect("cannot run diff (diffutils)");
    assert_eq!(r.status.code(), Some(1), "diff -u of {scenario} {from} {to}: {}", String::from_utf8_lossy(&r.stderr));
    let tmp = out.with_extension(format!("tmp{}-{}", std::process::id(), unique()));
    fs::write(&tmp, &r.stdout).expect("write source diff");
    fs::rename(&tmp, &out).expect("place source diff");
    out
}

/// The bundle for `scenario` from `from` to `to` in build `v`: real builds take the changed set
/// from the source diff (they have debug info and no live-patching flags).
#[track_caller]
pub fn build_scenario_bundle(scenario: &str, from: &str, to: &str, v: Variant) -> Bundle {
    let old = compile(scenario, from, v);
    let new = compile(scenario, to, v);
    if !v.is_real() {
        return build_bundle(&old, &new, &[]);
    }
    let diff = source_diff(scenario, from, to);
    let (run, bundle) = try_build_bundle_args(&old, &new, &["--source-diff".to_string(), diff.display().to_string()]);
    run.assert_ok();
    bundle
}

/// `livepatch build ...` whatever its outcome; the bundle path may not exist.
pub fn try_build_bundle(old: &Path, new: &Path, functions: &[&str]) -> (Run, Bundle) {
    let mut extra = Vec::new();
    for f in functions {
        extra.push("--function".to_string());
        extra.push((*f).to_string());
    }
    try_build_bundle_args(old, new, &extra)
}

/// `livepatch build --old OLD --new NEW -o BUNDLE EXTRA...` whatever its outcome.
pub fn try_build_bundle_args(old: &Path, new: &Path, extra: &[String]) -> (Run, Bundle) {
    let dir = tempfile::Builder::new()
        .prefix("livepatch-test-")
        .tempdir()
        .expect("tempdir");
    let path = dir.path().join("patch.lpatch");
    let mut args: Vec<String> = vec![
        "build".into(),
        "--old".into(),
        old.display().to_string(),
        "--new".into(),
        new.display().to_string(),
        "-o".into(),
        path.display().to_string(),
    ];
    args.extend(extra.iter().cloned());
    let run = livepatch(&args);
    (run, Bundle { path, _dir: dir })
}

/// `livepatch apply --pid PID BUNDLE --json EXTRA...`
pub fn apply(pid: i32, bundle: &Bundle, extra: &[&str]) -> Run {
    livepatch(apply_args(pid, bundle, extra))
}

pub fn apply_args(pid: i32, bundle: &Bundle, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "apply".into(),
        "--pid".into(),
        pid.to_string(),
        bundle.path.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push("--json".into());
    args
}

/// `livepatch revert --pid PID --json EXTRA...`
pub fn revert(pid: i32, extra: &[&str]) -> Run {
    let mut args: Vec<String> = vec!["revert".into(), "--pid".into(), pid.to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push("--json".into());
    livepatch(args)
}

/// `livepatch status --pid PID --json`, which must succeed.
#[track_caller]
pub fn status(pid: i32) -> Status {
    let run = livepatch(["status", "--pid", &pid.to_string(), "--json"]);
    run.assert_ok();
    let st = run.status();
    // Orphan and interrupted regions are listed but not stacked.
    let in_effect = st.raw["patches"].as_array().map_or(0, |p| p.iter().filter(|p| p["state"] == "applied").count());
    assert_eq!(st.stacked as usize, in_effect, "status --json: `stacked` does not count the patches in effect\n{}", run.describe());
    st
}

/// `livepatch diff OLD NEW --json`, which must succeed.
#[track_caller]
pub fn diff(old: &Path, new: &Path) -> Diff {
    let run = livepatch([
        OsStr::new("diff"),
        old.as_os_str(),
        new.as_os_str(),
        OsStr::new("--json"),
    ]);
    run.assert_ok();
    let v = run.json();
    let field = |k: &str| -> Vec<String> {
        names(
            v.get(k)
                .unwrap_or_else(|| panic!("diff --json: no {k}\n{}", run.describe())),
        )
    };
    Diff {
        changed_functions: field("changed_functions"),
        added_functions: field("added_functions"),
        changed_data: field("changed_data"),
        raw: v.clone(),
    }
}

#[derive(Debug, Clone)]
pub struct Diff {
    pub changed_functions: Vec<String>,
    pub added_functions: Vec<String>,
    pub changed_data: Vec<String>,
    pub raw: Value,
}

