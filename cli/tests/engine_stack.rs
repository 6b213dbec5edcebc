//! Stacked patches, revert, and status read from the process itself by other `livepatch`
//! processes (every command here is a new process: nothing is remembered by the tool).

#[macro_use]
mod support;

use std::ffi::OsStr;
use support::*;

/// v1 -> v2 bundle, then a v1 -> v3 bundle over it, then revert twice:
/// the target prints v1, v2, v3, v2, v1.
fn apply_apply_revert_revert(v: Variant) {
    let v1 = compile("plain", "v1", v);
    let b2 = build_bundle(&v1, &compile("plain", "v2", v), &[]);
    let b3 = build_bundle(&v1, &compile("plain", "v3", v), &[]);
    let mut t = Target::start(&v1);
    let text_before = text_snapshot(t.pid);
    t.expect("call 5", "result v1 10");
    assert_eq!(status(t.pid).stacked, 0);

    let a2 = apply(t.pid, &b2, IDLE).assert_ok().applied();
    t.expect("call 5", "result v2 15");
    let st = status(t.pid);
    assert_eq!(st.ids(), vec![a2.patch_id.clone()]);

    let a3 = apply(t.pid, &b3, IDLE).assert_ok().applied();
    assert_ne!(a2.patch_id, a3.patch_id, "two patches, two ids");
    t.expect("call 5", "result v3 20");
    let st = status(t.pid);
    assert_eq!(st.stacked, 2);
    assert!(
        st.ids().contains(&a2.patch_id) && st.ids().contains(&a3.patch_id),
        "{:?}",
        st.raw
    );
    // One jump per function, always at the original entry.
    let entries = live_entries(t.pid, &v1, &["compute".to_string()]);
    assert_text_changed_only_at(&text_before, t.pid, &entries);
    assert_no_wx(t.pid);

    revert(t.pid, IDLE).assert_ok();
    t.expect("call 5", "result v2 15");
    assert_eq!(
        status(t.pid).ids(),
        vec![a2.patch_id.clone()],
        "the newest patch goes first"
    );

    revert(t.pid, IDLE).assert_ok();
    t.expect("call 5", "result v1 10");
    let st = status(t.pid);
    assert!(st.patches.is_empty() && st.stacked == 0, "{:?}", st.raw);
    assert_text_unchanged(&text_before, t.pid);

    // Nothing left to revert: done (exit 0, nothing reverted), and the target is as it was.
    nothing_to_revert(t.pid, &[]);
    nothing_to_revert(t.pid, &["--all"]);
    t.expect("call 5", "result v1 10");
    assert_text_unchanged(&text_before, t.pid);
    assert_not_traced(t.pid);
}

/// `revert [--all]` on a process with nothing applied: exit 0, "nothing applied" in the text,
/// an empty `reverted` list in the JSON report.
#[track_caller]
fn nothing_to_revert(pid: i32, extra: &[&str]) {
    let run = revert(pid, &[extra, IDLE].concat());
    let v = run.assert_ok().json();
    assert_eq!(v["reverted"], serde_json::json!([]), "{v}");
    assert_eq!(v["remaining"], 0, "{v}");
    let mut args = vec!["revert".to_string(), "--pid".into(), pid.to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let text = livepatch(&args);
    text.assert_ok();
    assert!(text.stdout.contains("nothing applied"), "{}", text.stdout);
}

/// A process that was never patched: revert and revert --all are no-ops that succeed.
#[test]
fn revert_with_nothing_applied_succeeds() {
    let mut t = Target::start(&compile("plain", "v1", Variant::O2_PIE));
    let before = Untouched::take(t.pid);
    nothing_to_revert(t.pid, &[]);
    nothing_to_revert(t.pid, &["--all"]);
    t.expect("call 5", "result v1 10");
    before.check(t.pid);
}
variant_tests!(apply_apply_revert_revert => apply_apply_revert_revert: o2_pie, o3_nopie, o0_nopie_relocs);

/// `revert --all` restores the original code under any number of patches.
fn revert_all(v: Variant) {
    let v1 = compile("plain", "v1", v);
    let b2 = build_bundle(&v1, &compile("plain", "v2", v), &[]);
    let b3 = build_bundle(&v1, &compile("plain", "v3", v), &[]);
    let mut t = Target::start(&v1);
    let text_before = text_snapshot(t.pid);
    apply(t.pid, &b2, IDLE).assert_ok();
    apply(t.pid, &b3, IDLE).assert_ok();
    t.expect("call 5", "result v3 20");
    assert_eq!(status(t.pid).stacked, 2);
    revert(t.pid, &["--all", "--timeout", "10"]).assert_ok();
    t.expect("call 5", "result v1 10");
    assert_eq!(status(t.pid).stacked, 0);
    assert_text_unchanged(&text_before, t.pid);
}
variant_tests!(revert_all => revert_all: o2_pie, o3_nopie);

/// Partial and full bundles stacked: the newest wins for the functions both touch.
fn stacked_partial_and_full(v: Variant) {
    let v1 = compile("callee_changed", "v1", v);
    let v2 = compile("callee_changed", "v2", v);
    let only_caller = build_bundle(&v1, &v2, &["caller"]);
    let full = build_bundle(&v1, &v2, &[]);
    let mut t = Target::start(&v1);
    apply(t.pid, &only_caller, IDLE).assert_ok();
    t.expect("call 5", "v2 caller leaf=6");
    apply(t.pid, &full, IDLE).assert_ok();
    t.expect("call 5", "v2 caller leaf=500");
    t.expect("leaf 5", "leaf=500");
    revert(t.pid, IDLE).assert_ok();
    t.expect("call 5", "v2 caller leaf=6");
    t.expect("leaf 5", "leaf=6");
    revert(t.pid, IDLE).assert_ok();
    t.expect("call 5", "v1 caller leaf=6");
}
variant_tests!(stacked_partial_and_full => stacked_partial_and_full: o2_pie, o3_nopie);

/// Status is read from the target by a process other than the one that applied, and agrees
/// with what apply reported; the text form says the same.
fn status_from_a_second_process(v: Variant) {
    let v1 = compile("counter", "v1", v);
    let bundle = build_bundle(&v1, &compile("counter", "v2", v), &[]);
    let mut t = Target::start(&v1);

    let st = status(t.pid);
    assert!(
        st.patches.is_empty() && st.stacked == 0,
        "unpatched process: {:?}",
        st.raw
    );

    let a = apply(t.pid, &bundle, IDLE).assert_ok().applied();
    t.expect("call", "v2 count=100 total=1");

    let st = status(t.pid);
    assert_eq!(st.stacked, 1);
    let p = &st.patches[0];
    assert_eq!(p.patch_id, a.patch_id);
    assert_functions(&p.functions, &["bump"]);
    assert!(!p.applied_at.is_null(), "applied_at missing: {:?}", st.raw);

    let text = livepatch([
        OsStr::new("status"),
        OsStr::new("--pid"),
        OsStr::new(&t.pid.to_string()),
    ]);
    text.assert_ok();
    assert!(
        text.stdout.contains(&a.patch_id),
        "status text lacks the patch id:\n{}",
        text.stdout
    );
    assert!(
        text.stdout.contains("bump"),
        "status text lacks the function:\n{}",
        text.stdout
    );
    // The time: Unix seconds in the JSON, and RFC 3339 (UTC) there and in the text.
    let unix = p.applied_at.as_u64().unwrap_or_else(|| panic!("applied_at is not a number: {:?}", st.raw));
    let rfc = st.raw["patches"][0]["applied_at_rfc3339"].as_str().unwrap_or_else(|| panic!("no applied_at_rfc3339: {:?}", st.raw));
    assert_eq!(rfc, rfc3339(unix), "{:?}", st.raw);
    assert!(text.stdout.contains(&format!("applied at {rfc}")), "status text lacks the RFC 3339 time:\n{}", text.stdout);

    // And yet another process reverts it.
    revert(t.pid, IDLE).assert_ok();
    t.expect("call", "v1 count=101 total=2");
    assert!(status(t.pid).patches.is_empty());
}
variant_tests!(status_from_a_second_process => status_from_a_second_process: o2_pie, o3_nopie);

/// Applying the same bundle twice: the second is a no-op that says "already applied" (exit 0);
/// the target runs v2 with one patch, and revert --all restores v1.
#[test]
fn same_bundle_twice() {
    let v = Variant::O2_PIE;
    let v1 = compile("plain", "v1", v);
    let bundle = build_bundle(&v1, &compile("plain", "v2", v), &[]);
    let mut t = Target::start(&v1);
    let first = apply(t.pid, &bundle, IDLE).assert_ok().applied();
    let second = apply(t.pid, &bundle, IDLE).assert_ok().applied();
    assert_eq!(second.patch_id, first.patch_id);
    assert_eq!(second.raw["already_applied"], true, "{}", second.raw);
    t.expect("call 5", "result v2 15");
    assert_eq!(status(t.pid).stacked, 1);
    revert(t.pid, &["--all", "--timeout", "10"]).assert_ok();
    t.expect("call 5", "result v1 10");
}

/// Unix seconds as RFC 3339 UTC, computed here independently of the tool (days to a civil date
/// by walking years and months).
fn rfc3339(unix: u64) -> String {
    let (mut days, rem) = (unix / 86_400, unix % 86_400);
    let leap = |y: u64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let mut y = 1970;
    while days >= if leap(y) { 366 } else { 365 } {
        days -= if leap(y) { 366 } else { 365 };
        y += 1;
    }
    let lens = [31, if leap(y) { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    let mut m = 0;
    while days >= lens[m] {
        days -= lens[m];
        m += 1;
    }
    format!("{y:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z", m + 1, days + 1, rem / 3600, rem / 60 % 60, rem % 60)
}
