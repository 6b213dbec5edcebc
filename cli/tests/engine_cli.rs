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
