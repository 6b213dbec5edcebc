//! Activation safety with the wait strategy, refusals and failures: several threads calling
//! the function; a function active on a stack (apply waits, then succeeds; or times out with
//! exit 4 and the target untouched); revert waiting for the new code; a target that exits
//! during the update; a bundle for another executable (build-id mismatch, exit 3).
//!
//! The `active` scenario's stuck() returns once released, so these tests ask for
//! `--frames wait` (every call that started in old code ends in old code); switching frames at
//! return sites, the default, is tested in `engine_frames.rs`.
//!
//! Run in two builds: -O2 PIE, and -O3 -fomit-frame-pointer non-PIE without relocations
//! (unwinding without frame pointers, absolute addresses).

#[macro_use]
mod support;

use std::thread;
use std::time::{Duration, Instant};
use support::*;

/// Watch a background command for `period` while the target must keep answering `cmd` with
/// `want` (proof that it is running its old code and is not held stopped): fails if the
/// command ends during that time.
#[track_caller]
fn assert_still_waiting(
    p: &mut Pending,
    t: &mut Target,
    cmd: &str,
    want: &str,
    period: Duration,
) {
    let deadline = Instant::now() + period;
    loop {
        if !cmd.is_empty() {
            t.expect(cmd, want);
        }
        assert!(
            p.is_running(),
            "livepatch {} ended while the function was still active (it must wait)",
            p.command_line()
        );
        if Instant::now() >= deadline {
            return;
        }
        // Not synchronisation: this only gives a wrong tool the time to finish too early.
        thread::sleep(Duration::from_millis(100));
    }
}

/// Four threads call work() all the time (outside it, they sleep 200 us).
fn several_threads(v: Variant) {
    let old = compile("threads", "v1", v);
    let bundle = build_bundle(&old, &compile("threads", "v2", v), &[]);
    let mut t = Target::start(&old);
    t.expect("round", "round 1001 1002 1003 1004");
    let a = apply(t.pid, &bundle, &["--strategy", "wait", "--timeout", "30"])
        .assert_ok()
        .applied();
    assert_functions(&a.functions, &["work"]);
    t.expect("round", "round 2001 2002 2003 2004");
    t.expect("call", "work=2000");
    assert_not_traced(t.pid);
    revert(t.pid, &["--timeout", "30"]).assert_ok();
    t.expect("round", "round 1001 1002 1003 1004");
}
variant_tests!(several_threads => several_threads: o2_pie, o3_nopie);

/// A thread sits inside stuck() (blocked on a pipe the test controls). apply must wait: the
/// target keeps running its old code meanwhile, not held stopped. Once released, the old call
/// finishes in old code, and the update goes through.
fn active_function_waits_then_succeeds(v: Variant) {
    let old = compile("active", "v1", v);
    let bundle = build_bundle(&old, &compile("active", "v2", v), &[]);
    let mut t = Target::start(&old);
    t.expect("call", "v1 call");
    t.expect("enter", "v1 entered");

    let mut p = spawn_livepatch(apply_args(
        t.pid,
        &bundle,
        &["--strategy", "wait", "--frames", "wait", "--timeout", "60"],
    ));
    assert_still_waiting(
        &mut p,
        &mut t,
        "call",
        "v1 call",
        Duration::from_millis(1500),
    );
    t.expect("release", "v1 left");
    let run = p.finish(TOOL_TIMEOUT);
    let a = run.assert_ok().applied();
    assert_functions(&a.functions, &["stuck"]);
    assert!(
        run.elapsed >= Duration::from_millis(1500),
        "apply cannot have finished before the release"
    );

    t.expect("call", "v2 call");
    t.expect("enter", "v2 entered");
    t.expect("release", "v2 left");
    assert_not_traced(t.pid);
}
variant_tests!(active_function_waits_then_succeeds => active_function_waits_then_succeeds: o2_pie, o3_nopie);

/// The function stays active: exit 4 at the timeout, naming the thread and the function; the
/// target runs its old code, its text, mappings and debug registers are as before.
fn active_function_blocks_until_timeout(v: Variant) {
    let old = compile("active", "v1", v);
    let bundle = build_bundle(&old, &compile("active", "v2", v), &[]);
    let mut t = Target::start(&old);
    t.expect("enter", "v1 entered");
    let worker = worker_threads(t.pid);
    assert_eq!(worker.len(), 1, "one worker thread expected");
    let before = Untouched::take(t.pid);

    let run = apply(t.pid, &bundle, &["--strategy", "wait", "--frames", "wait", "--timeout", "2"]);
    run.assert_code(4)
        .assert_stderr_mentions("stuck")
        .assert_stderr_mentions(&worker[0].to_string());
    assert!(
        run.elapsed >= Duration::from_millis(1500),
        "gave up before the timeout: {:?}",
        run.elapsed
    );
    assert!(
        run.elapsed < Duration::from_secs(30),
        "took far longer than the timeout: {:?}",
        run.elapsed
    );

    t.expect("call", "v1 call");
    before.check(t.pid);
    assert!(
        status(t.pid).patches.is_empty(),
        "a blocked update left a patch"
    );
    t.expect("release", "v1 left");
    t.expect("call", "v1 call");
}
variant_tests!(active_function_blocks_until_timeout => active_function_blocks_until_timeout: o2_pie, o3_nopie);

/// Revert checks the code being removed: while a thread is inside the new stuck(), revert
/// times out (exit 4) and the patch stays; after the release, revert succeeds.
fn revert_waits_for_the_new_code(v: Variant) {
    let old = compile("active", "v1", v);
    let bundle = build_bundle(&old, &compile("active", "v2", v), &[]);
    let mut t = Target::start(&old);
    apply(t.pid, &bundle, &["--strategy", "wait", "--timeout", "30"]).assert_ok();
    t.expect("call", "v2 call");
    t.expect("enter", "v2 entered");

    revert(t.pid, &["--frames", "wait", "--timeout", "2"])
        .assert_code(4)
        .assert_stderr_mentions("stuck");
    t.expect("call", "v2 call");
    assert_eq!(status(t.pid).stacked, 1, "the patch must still be there");
    assert_not_traced(t.pid);

    t.expect("release", "v2 left");
    revert(t.pid, &["--timeout", "30"]).assert_ok();
    t.expect("call", "v1 call");
    t.expect("enter", "v1 entered");
    t.expect("release", "v1 left");
}
variant_tests!(revert_waits_for_the_new_code => revert_waits_for_the_new_code: o2_pie, o3_nopie);

/// The target exits (on its own, or killed) while apply waits for it: apply fails (exit 1)
/// promptly, without waiting for its timeout.
fn target_exits_during_update(v: Variant, kill: bool) {
    let old = compile("active", "v1", v);
    let bundle = build_bundle(&old, &compile("active", "v2", v), &[]);
    let mut t = Target::start(&old);
    t.expect("enter", "v1 entered");
    let mut p = spawn_livepatch(apply_args(
        t.pid,
        &bundle,
        &["--strategy", "wait", "--frames", "wait", "--timeout", "100"],
    ));
    assert_still_waiting(
        &mut p,
        &mut t,
        "call",
        "v1 call",
        Duration::from_millis(800),
    );
    if kill {
        t.signal(libc::SIGKILL);
    } else {
        t.expect("exit", "exiting");
    }
    t.wait_exit(Duration::from_secs(10))
        .expect("target did not exit");
    let run = p.finish(Duration::from_secs(60));
    run.assert_code(1);
    assert!(!run.stderr.trim().is_empty(), "a failure must say why");
    assert!(
        run.elapsed < Duration::from_secs(60),
        "apply hung after the target exited"
    );
}

fn target_exits_during_update_by_itself(v: Variant) {
    target_exits_during_update(v, false);
}
variant_tests!(target_exits_during_update_by_itself => target_exits_during_update_by_itself: o2_pie, o3_nopie);

fn target_killed_during_update(v: Variant) {
    target_exits_during_update(v, true);
}
variant_tests!(target_killed_during_update => target_killed_during_update: o2_pie);

/// A bundle built for another executable: refused with exit 3 (build id), target untouched.
#[test]
fn build_id_mismatch_same_program_other_build() {
    let bundle = build_bundle(
        &compile("plain", "v1", Variant::O2_PIE),
        &compile("plain", "v2", Variant::O2_PIE),
        &[],
    );
    // The same source, another build: same function names, different build id.
    let other = compile("plain", "v1", Variant::named("o0_pie"));
    let mut t = Target::start(&other);
    t.expect("call 5", "result v1 10");
    let before = Untouched::take(t.pid);
    apply(t.pid, &bundle, IDLE)
        .assert_code(3)
        .assert_stderr_mentions("build");
    t.expect("call 5", "result v1 10");
    before.check(t.pid);
    assert!(status(t.pid).patches.is_empty());
}

#[test]
fn build_id_mismatch_other_program() {
    let bundle = build_bundle(
        &compile("plain", "v1", Variant::O3_NOPIE),
        &compile("plain", "v2", Variant::O3_NOPIE),
        &[],
    );
    let mut t = Target::start(&compile("counter", "v1", Variant::O3_NOPIE));
    let before = Untouched::take(t.pid);
    apply(t.pid, &bundle, IDLE)
        .assert_code(3)
        .assert_stderr_mentions("build");
    t.expect("call", "v1 count=1 total=1");
    before.check(t.pid);
}

/// Six functions at once with the wait strategy (workers call them in a tight loop).
fn many_functions_wait(v: Variant) {
    let old = compile("many", "v1", v);
    let bundle = build_bundle(&old, &compile("many", "v2", v), &[]);
    let mut t = Target::start(&old);
    t.expect("call", "many 110 120 130 140 150 160");
    let a = apply(t.pid, &bundle, &["--strategy", "wait", "--timeout", "30"])
        .assert_ok()
        .applied();
    assert_functions(&a.functions, &["f1", "f2", "f3", "f4", "f5", "f6"]);
    t.expect("call", "many 210 220 230 240 250 260");
    t.expect("round", "round 1410 1410");
    t.expect("hold", "v2 f3 holding");
    t.expect("release", "v2 f3 released");
}
variant_tests!(many_functions_wait => many_functions_wait: o2_pie);
