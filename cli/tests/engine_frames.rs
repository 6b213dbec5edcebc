//! Functions that never return: frames of an old function stopped at a call's return address
//! are switched to the new function at the proven return site (`--frames switch`, the
//! default), judged by what the live process prints afterwards:
//! - main's command loop with the fix inlined into it (a local counter must go on),
//! - four worker threads in their loops, some in read(), some sleeping,
//! - recursion: every frame of rec() on a stack is switched at once,
//! - a change of the frame (a new buffer): refused precisely, the target unchanged,
//! - revert switches the frames back;
//! - values kept elsewhere by the new code (another register allocation) are moved.
//!
//! Real builds (Debian hardening, -Os, LTO, plain -O2/-Os, all with debug info; bundles from the
//! source diff) and the labelled live-patching builds without debug info (PIE and non-PIE).

mod support;

use serde_json::Value;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use support::*;

/// The frames `apply --json` (or `revert --json`) says it switched: (tid, function).
fn switched(v: &Value) -> Vec<(i64, String)> {
    v.get("switched_frames")
        .or_else(|| v.get("switched"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|f| {
                    let tid = f.get("tid").and_then(Value::as_i64).expect("switched frame without tid");
                    let function = f.get("function").and_then(Value::as_str).expect("switched frame without function").to_string();
                    let old = f.get("old").and_then(Value::as_u64).expect("switched frame without old");
                    let new = f.get("new").and_then(Value::as_u64).expect("switched frame without new");
                    assert_ne!(old, new, "a switched frame returns where it did");
                    (tid, function)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Builds where the optimiser inlines the fixed function into its caller's loop.
fn inlines(v: Variant) -> bool {
    v.is_real() || v.opt != Opt::O0
}

/// main's command loop: the fix lands inside main, whose frame is always in fgets().
fn main_loop_with_the_fix_inlined(v: Variant) {
    let old = compile("mainloop", "v1", v);
    let bundle = build_scenario_bundle("mainloop", "v1", "v2", v);
    let mut t = Target::start(&old);
    t.expect("call 5", "v1 answer=10 n=1");
    t.expect("call 6", "v1 answer=12 n=2");
    let run = apply(t.pid, &bundle, IDLE);
    let a = run.assert_ok().applied();
    if inlines(v) {
        assert!(a.functions.iter().any(|f| f == "main"), "answer() should be inlined into main in this build: {:?}", a.functions);
    }
    if a.functions.iter().any(|f| f == "main") {
        let frames = switched(&a.raw);
        assert_eq!(frames.len(), 1, "main's frame (and nothing else) must be switched\n{}", run.describe());
        assert_eq!(frames[0].0, t.pid as i64, "main's frame is on the main thread");
        assert_eq!(frames[0].1, "main");
        let s = status(t.pid).raw;
        assert_eq!(switched(&s["patches"][0]).len(), 1, "status must show the switched frame: {s}");
    }
    // The very next command runs the new code, and the counter in main's frame goes on.
    t.expect("call 7", "v2 answer=21 n=3");
    t.expect("call 1", "v2 answer=3 n=4");
    let r = revert(t.pid, IDLE);
    r.assert_ok();
    if a.functions.iter().any(|f| f == "main") {
        assert_eq!(switched(&r.json()).len(), 1, "revert must switch main's frame back\n{}", r.describe());
    }
    t.expect("call 2", "v1 answer=4 n=5");
    assert!(status(t.pid).patches.is_empty());
    t.expect("ping", "pong");
}
real_build_tests!(main_loop_real => main_loop_with_the_fix_inlined);
variant_tests!(main_loop => main_loop_with_the_fix_inlined: o0_pie, o2_pie, o2_nopie, o3_pie, o3_nopie_relocs);

/// Four workers that never leave worker_loop(): two in read(), two sleeping between polls.
fn worker_loops(v: Variant, strategy: &str) {
    let old = compile("workers", "v1", v);
    let bundle = build_scenario_bundle("workers", "v1", "v2", v);
    let mut t = Target::start(&old);
    for i in 0..4 {
        t.expect(&format!("call {i}"), &format!("w{i} v1 n=1 weight={}", i + 1));
    }
    t.expect("call 0", "w0 v1 n=2 weight=1");
    let run = apply(t.pid, &bundle, &["--strategy", strategy, "--timeout", "20"]);
    let a = run.assert_ok().applied();
    assert!(a.functions.iter().any(|f| f == "worker_loop"), "serve() is inlined into worker_loop: {:?}", a.functions);
    let frames = switched(&a.raw);
    let mut tids: Vec<i64> = frames.iter().filter(|(_, f)| f == "worker_loop").map(|(t, _)| *t).collect();
    tids.sort();
    tids.dedup();
    assert_eq!(tids.len(), 4, "every worker's frame must be switched\n{}", run.describe());
    for i in 0..4 {
        let n = if i == 0 { 3 } else { 2 };
        t.expect(&format!("call {i}"), &format!("w{i} v2 n={n} weight={}", i + 100));
    }
    assert_not_traced(t.pid);
}
fn worker_loops_trap(v: Variant) {
    worker_loops(v, "trap")
}
fn worker_loops_wait(v: Variant) {
    worker_loops(v, "wait")
}
real_build_tests!(worker_loops_real => worker_loops_trap);
variant_tests!(worker_loops_live_flags => worker_loops_trap: o2_pie, o3_nopie);
variant_tests!(worker_loops_wait_strategy => worker_loops_wait: real_hardened, o2_pie);

/// Two workers 41 frames deep in rec(): every frame on a stack is switched at once, and the
/// rounds started afterwards compute v2's answer.
fn recursion(v: Variant) {
    let old = compile("recursive", "v1", v);
    let bundle = build_scenario_bundle("recursive", "v1", "v2", v);
    let mut t = Target::start(&old);
    t.expect("round", "round 1040 1040");
    let run = apply(t.pid, &bundle, &["--timeout", "20"]);
    let a = run.assert_ok().applied();
    let frames = switched(&a.raw);
    let mut per_thread = std::collections::BTreeMap::new();
    for (tid, f) in &frames {
        if f == "rec" {
            *per_thread.entry(*tid).or_insert(0) += 1;
        }
    }
    assert!(per_thread.values().any(|n| *n > 1), "several frames of rec() on one stack must be switched: {per_thread:?}\n{}", run.describe());
    t.expect("round", "round 2080 2080");
    t.expect("call 3", "rec=2006");
}
variant_tests!(recursion_switches_every_frame => recursion: real_hardened, o2_pie, o3_nopie);

/// v3 adds a buffer to serve_forever()'s frame: the frame stopped in read() cannot continue in
/// v3. Exit 4 at the timeout, naming the function and saying why the frame cannot be switched;
/// the target is untouched and goes on with v1.
fn frame_change_is_refused(v: Variant) {
    let old = compile("forever", "v1", v);
    let bundle = build_scenario_bundle("forever", "v1", "v3", v);
    let mut t = Target::start(&old);
    t.expect("call", "v1 served 1");
    let before = Untouched::take(t.pid);
    let run = apply(t.pid, &bundle, &["--timeout", "2"]);
    run.assert_code(4).assert_stderr_mentions("serve_forever").assert_stderr_mentions("not switchable").assert_stderr_mentions("return site");
    t.expect("call", "v1 served 2");
    before.check(t.pid);
    assert!(status(t.pid).patches.is_empty());
    assert_not_traced(t.pid);
}
real_build_tests!(frame_change_refused_real => frame_change_is_refused);
variant_tests!(frame_change_refused => frame_change_is_refused: o2_pie, o3_nopie);

/// `--frames wait` keeps the old behaviour: a frame that never returns blocks (exit 4).
fn frames_wait_blocks(v: Variant) {
    let old = compile("forever", "v1", v);
    let bundle = build_scenario_bundle("forever", "v1", "v2", v);
    let mut t = Target::start(&old);
    t.expect("call", "v1 served 1");
    apply(t.pid, &bundle, &["--frames", "wait", "--timeout", "1"]).assert_code(4).assert_stderr_mentions("serve_forever");
    t.expect("call", "v1 served 2");
    let a = apply(t.pid, &bundle, &["--timeout", "10"]);
    assert_eq!(switched(&a.assert_ok().applied().raw).len(), 1, "{}", a.describe());
    t.expect("call", "v2 served 3");
    // Revert with --frames wait cannot take the frame back: blocked, patch kept.
    revert(t.pid, &["--frames", "wait", "--timeout", "1"]).assert_code(4);
    t.expect("call", "v2 served 4");
    assert_eq!(status(t.pid).stacked, 1);
}
variant_tests!(frames_wait_policy => frames_wait_blocks: real_hardened, o2_pie);

/// The tool SIGKILLed at each step of an update that switches frames (`LIVEPATCH_FAULT`):
/// before the switch the workers go on with v1, after it with v2 (every frame and entry was
/// written while they were stopped); their counters go on either way; `revert --all` then
/// brings v1 back, switching the frames back.
fn killed_tool_at_every_step(v: Variant) {
    let old = compile("workers", "v1", v);
    let bundle = build_scenario_bundle("workers", "v1", "v2", v);
    for (point, op) in [("mapped", "apply"), ("stopped", "apply"), ("frames-switched", "apply"), ("revert-stopped", "revert"), ("revert-frames-switched", "revert")] {
        let mut t = Target::start(&old);
        for i in 0..4 {
            t.expect(&format!("call {i}"), &format!("w{i} v1 n=1 weight={}", i + 1));
        }
        if op == "revert" {
            apply(t.pid, &bundle, IDLE).assert_ok();
        }
        let args: Vec<String> = if op == "apply" {
            apply_args(t.pid, &bundle, IDLE)
        } else {
            vec!["revert".into(), "--pid".into(), t.pid.to_string(), "--timeout".into(), "10".into()]
        };
        let out = Command::new(livepatch_bin()).args(&args).env("LIVEPATCH_FAULT", point).stdin(Stdio::null()).output().expect("run livepatch");
        assert_eq!(out.status.signal(), Some(libc::SIGKILL), "LIVEPATCH_FAULT={point} was not reached: {}", String::from_utf8_lossy(&out.stderr));
        // Switched (v2) exactly when the kill came after the frames were written on apply, or
        // before they were written back on revert.
        let new = matches!(point, "frames-switched" | "revert-stopped");
        for i in 0..4 {
            let want = if new { format!("w{i} v2 n=2 weight={}", i + 100) } else { format!("w{i} v1 n=2 weight={}", i + 1) };
            t.expect(&format!("call {i}"), &want);
        }
        assert_not_traced(t.pid);
        revert(t.pid, &["--all", "--timeout", "10"]).assert_ok();
        for i in 0..4 {
            t.expect(&format!("call {i}"), &format!("w{i} v1 n=3 weight={}", i + 1));
        }
        assert!(status(t.pid).patches.is_empty(), "{point}: patches left after revert --all");
    }
}
variant_tests!(killed_tool => killed_tool_at_every_step: real_hardened, o2_pie);

/// Another register allocation: v2 keeps the request count in %r12 instead of %rbx and its
/// double at 8(%rsp) instead of 0(%rsp). The frame stopped in wait_request() is switched with
/// both values moved to where v2 reads them (the register where the callee saved it or the
/// thread's own, the slot in the frame), and moved back by revert: the counts go on.
fn values_moved_to_another_allocation(v: Variant) {
    let old = compile("renamed", "v1", v);
    // Top-level assembly has no DWARF lines for a source diff to find: name the function.
    let bundle = build_bundle(&old, &compile("renamed", "v2", v), &["spin"]);
    let mut t = Target::start(&old);
    t.expect("call", "v1 n=1 m=2");
    t.expect("call", "v1 n=2 m=4");
    let run = apply(t.pid, &bundle, IDLE);
    let a = run.assert_ok().applied();
    let frames = a.raw["switched_frames"].as_array().cloned().unwrap_or_default();
    assert_eq!(frames.len(), 1, "spin's frame must be switched\n{}", run.describe());
    let regs = frames[0]["regs"].as_array().map(|r| r.len()).unwrap_or(0);
    let slots = frames[0]["slots"].as_array().map(|s| s.len()).unwrap_or(0);
    assert_eq!((regs, slots), (1, 1), "one register and one slot moved\n{}", run.describe());
    assert_eq!(frames[0]["regs"][0]["reg"], 12, "n goes to %r12\n{}", run.describe());
    assert_eq!(frames[0]["regs"][0]["value"], 2, "n is 2 when the frame is switched\n{}", run.describe());
    t.expect("call", "v2 n=3 m=6");
    t.expect("call", "v2 n=4 m=8");
    let r = revert(t.pid, IDLE);
    r.assert_ok();
    assert_eq!(switched(&r.json()).len(), 1, "revert must move spin's frame back\n{}", r.describe());
    t.expect("call", "v1 n=5 m=10");
    t.expect("ping", "pong");
}
variant_tests!(values_moved => values_moved_to_another_allocation: real_hardened, o2_pie, o3_nopie);
