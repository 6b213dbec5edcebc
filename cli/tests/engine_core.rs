//! The core updates, in all twelve builds with the live-patching flags (-O0 / -O2 / -O3
//! -fomit-frame-pointer, PIE and non-PIE, with and without --emit-relocs) and in the four real
//! builds (Debian hardening at -O2, -Os, -O2 -flto, plain -O2; changed set from the source diff): a plain body change, a global counter whose state
//! survives, new string literals and libc calls, a jump table, thread-local data, a changed
//! callee called by a changed caller, and an unchanged callee.
//!
//! Every test checks what the target itself prints before the update, after it, and after the
//! revert; that the program text changed only at the jump sites of the reported functions; and
//! that the revert put every byte back.

#[macro_use]
mod support;

use std::ffi::OsStr;
use support::*;

/// The common shape of every core test.
fn update_and_revert(
    v: Variant,
    scenario: &str,
    functions: &[&str],
    never: &[&str],
    before: &dyn Fn(&mut Target),
    after: &dyn Fn(&mut Target),
    reverted: &dyn Fn(&mut Target),
) {
    let old = compile(scenario, "v1", v);
    let bundle = build_scenario_bundle(scenario, "v1", "v2", v);
    let mut t = Target::start(&old);
    before(&mut t);

    let text_before = text_snapshot(t.pid);
    let applied = apply(t.pid, &bundle, IDLE).assert_ok().applied();
    assert_functions(&applied.functions, functions);
    for f in never {
        assert!(
            !applied.functions.iter().any(|g| g == f),
            "{f} did not change but was patched: {:?}",
            applied.functions
        );
    }
    eprintln!("{scenario} {}: pause {} us", v.name(), applied.pause_us);
    after(&mut t);
    assert_not_traced(t.pid);
    assert_no_wx(t.pid);
    let entries = live_entries(t.pid, &old, &applied.functions);
    assert_text_changed_only_at(&text_before, t.pid, &entries);

    revert(t.pid, IDLE).assert_ok();
    reverted(&mut t);
    assert_not_traced(t.pid);
    assert_text_unchanged(&text_before, t.pid);
    t.expect("quit", "bye");
}

fn plain_body_change(v: Variant) {
    update_and_revert(
        v,
        "plain",
        &["compute"],
        &[],
        &|t| {
            t.expect("call 5", "result v1 10");
        },
        &|t| {
            t.expect("call 5", "result v2 15");
            t.expect("call 7", "result v2 21");
        },
        &|t| {
            t.expect("call 5", "result v1 10");
        },
    );
}
matrix_tests!(plain_body_change => plain_body_change);
real_build_tests!(plain_body_change_real => plain_body_change);

fn global_counter_survives(v: Variant) {
    update_and_revert(
        v,
        "counter",
        &["bump"],
        &[],
        &|t| {
            t.expect("call", "v1 count=1 total=1");
            t.expect("call", "v1 count=2 total=2");
        },
        &|t| {
            // The state of v1 goes on: count was 2, v2 adds 100; total goes on by one.
            t.expect("call", "v2 count=102 total=3");
            t.expect("get", "count=102 total=3");
            t.expect("call", "v2 count=202 total=4");
        },
        &|t| {
            t.expect("call", "v1 count=203 total=5");
            t.expect("get", "count=203 total=5");
        },
    );
}
matrix_tests!(global_counter_survives => global_counter_survives);
real_build_tests!(global_counter_survives_real => global_counter_survives);

fn new_literals_and_libc_calls(v: Variant) {
    update_and_revert(
        v,
        "literals",
        &["greet"],
        &[],
        &|t| {
            t.expect("call world", "v1 hello world");
        },
        &|t| {
            // New format string, and snprintf/strlen/getpid that v1 never imported.
            let pid = t.pid;
            t.expect(
                "call world",
                &format!("v2 greetings world (len 5, pid {pid})"),
            );
            t.expect(
                "call live patching",
                &format!("v2 greetings live patching (len 13, pid {pid})"),
            );
        },
        &|t| {
            t.expect("call world", "v1 hello world");
        },
    );
}
matrix_tests!(new_literals_and_libc_calls => new_literals_and_libc_calls);
real_build_tests!(new_literals_and_libc_calls_real => new_literals_and_libc_calls);

/// The commands of the jump-table checks: every case, the default, a negative argument.
fn jumptable_commands() -> Vec<String> {
    let mut cmds: Vec<String> = (0..=12).map(|op| format!("call {op} 7")).collect();
    cmds.extend((0..=12).map(|op| format!("call {op} -3")));
    cmds
}

fn answers(t: &mut Target, cmds: &[String]) -> Vec<String> {
    cmds.iter().map(|c| t.ask(c)).collect()
}

fn jump_table(v: Variant) {
    // What v1 and v2 answer, each from its own fresh process.
    let cmds = jumptable_commands();
    let want_v1 = answers(&mut Target::start(&compile("jumptable", "v1", v)), &cmds);
    let want_v2 = answers(&mut Target::start(&compile("jumptable", "v2", v)), &cmds);
    for (a, b) in want_v1.iter().zip(&want_v2) {
        assert_ne!(a, b, "test premise: v1 and v2 must answer differently");
    }
    let check = |want: Vec<String>| {
        let cmds = cmds.clone();
        move |t: &mut Target| {
            let got = answers(t, &cmds);
            assert_eq!(got, want, "{}", t.context());
        }
    };
    update_and_revert(
        v,
        "jumptable",
        &["dispatch"],
        &[],
        &check(want_v1.clone()),
        &check(want_v2),
        &check(want_v1),
    );
}
matrix_tests!(jump_table => jump_table);
real_build_tests!(jump_table_real => jump_table);

fn thread_local_data(v: Variant) {
    update_and_revert(
        v,
        "tls",
        &["tick"],
        &["worker"],
        &|t| {
            t.expect("call", "v1 tls=1");
            t.expect("tcall 1", "v1 tls=1");
            t.expect("tcall 1", "v1 tls=2");
        },
        &|t| {
            // Each thread's own counter goes on, and v2 reads tls_name, which v1's tick never did.
            t.expect("call", "v2 main tls=11");
            t.expect("tcall 1", "v2 w1 tls=12");
            t.expect("tcall 2", "v2 w2 tls=10");
            t.expect("get", "tls=11");
        },
        &|t| {
            t.expect("call", "v1 tls=12");
            t.expect("tcall 2", "v1 tls=11");
        },
    );
}
matrix_tests!(thread_local_data => thread_local_data);
real_build_tests!(thread_local_data_real => thread_local_data);

fn changed_callee_of_changed_caller(v: Variant) {
    update_and_revert(
        v,
        "callee_changed",
        &["leaf", "caller"],
        &[],
        &|t| {
            t.expect("call 5", "v1 caller leaf=6");
            t.expect("leaf 5", "leaf=6");
        },
        &|t| {
            t.expect("call 5", "v2 caller leaf=500");
            // main (unchanged) calls leaf through the jump at its old entry.
            t.expect("leaf 5", "leaf=500");
        },
        &|t| {
            t.expect("call 5", "v1 caller leaf=6");
            t.expect("leaf 5", "leaf=6");
        },
    );
}
matrix_tests!(changed_callee_of_changed_caller => changed_callee_of_changed_caller);
real_build_tests!(changed_callee_of_changed_caller_real => changed_callee_of_changed_caller);

fn unchanged_callee(v: Variant) {
    update_and_revert(
        v,
        "callee_unchanged",
        &["caller", "banner"],
        &["helper"],
        &|t| {
            t.expect("call 3", "v1 helper=10");
            t.expect("stats", "calls=1");
            t.expect("banner", "v1 banner");
        },
        &|t| {
            // The new caller calls the live helper (at its v1 address), which keeps counting.
            t.expect("call 3", "v2 helper=10 next=17 calls=3");
            t.expect("stats", "calls=3");
            t.expect("banner", "v2 banner calls=3 twice=6 thrice=9 sign=1");
        },
        &|t| {
            t.expect("call 3", "v1 helper=10");
            t.expect("stats", "calls=4");
        },
    );
}
matrix_tests!(unchanged_callee => unchanged_callee);
real_build_tests!(unchanged_callee_real => unchanged_callee);

fn library_variables_without_a_copy(v: Variant) {
    update_and_revert(
        v,
        "libdata",
        &["probe"],
        &[],
        &|t| {
            t.expect("call", "v1 probe");
        },
        &|t| {
            // optind and program_invocation_short_name live in libc; v1 never copied them.
            let name = t.exe.file_name().unwrap().to_string_lossy().chars().take(15).collect::<String>();
            let got = t.ask("call");
            assert!(got.starts_with("v2 probe ") && got.ends_with(" optind=2"), "{got}: {}", t.context());
            let shown = got.trim_start_matches("v2 probe ").trim_end_matches(" optind=2");
            assert!(t.exe.file_name().unwrap().to_string_lossy().starts_with(shown) && !shown.is_empty(), "{shown} vs {name}");
            t.expect("call", &format!("v2 probe {shown} optind=3"));
        },
        &|t| {
            t.expect("call", "v1 probe");
        },
    );
}
matrix_tests!(library_variables_without_a_copy => library_variables_without_a_copy);
real_build_tests!(library_variables_without_a_copy_real => library_variables_without_a_copy);

fn short_functions_through_a_trampoline(v: Variant) {
    update_and_revert(
        v,
        "tiny",
        &["inc", "dec"],
        &["spacer"],
        &|t| {
            t.expect("call 5", "inc=6 dec=4");
        },
        &|t| {
            t.expect("call 5", "inc=7 dec=3");
            t.expect("call -1", "inc=1 dec=-3");
        },
        &|t| {
            t.expect("call 5", "inc=6 dec=4");
        },
    );
}
matrix_tests!(short_functions_through_a_trampoline => short_functions_through_a_trampoline);
real_build_tests!(short_functions_through_a_trampoline_real => short_functions_through_a_trampoline);

/// Packed `-Os` code with no 5 bytes of padding within a short jump's reach: refused with the
/// typed kind, and the target is untouched (the build refuses before any process is seen).
#[test]
fn short_function_without_room_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let exe = |v: &str| {
        let out = dir.path().join(format!("tiny-{v}"));
        let r = std::process::Command::new("cc")
            .args(["-g", "-Os", "-DLIVEPATCH_REAL_BUILD", "-DLIVEPATCH_NO_SPACER", "-pthread", "-Wl,--build-id", "-o"])
            .arg(&out)
            .arg(source("tiny", v))
            .output()
            .expect("cc");
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        out
    };
    let (old, new) = (exe("v1"), exe("v2"));
    let diff = source_diff("tiny", "v1", "v2");
    let (run, bundle) = try_build_bundle_args(&old, &new, &["--source-diff".into(), diff.display().to_string(), "--json".into()]);
    assert_eq!(run.code, Some(3), "{}", run.describe());
    let v: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(v["refusal_kind"], "FunctionTooShort", "{v}");
    assert!(v["error"].as_str().unwrap().contains("no 5 bytes of padding between functions lie within the 127-byte reach"), "{v}");
    assert!(!bundle.path.exists());
}

/// IPA-RA: the unpatched `combine` keeps values in caller-saved registers across its call to
/// `leaf`, which v1 leaves alone and v2 (calling snprintf) clobbers. The answers after the
/// update prove the entry thunk keeps them; in the real builds the bundle must carry it.
fn register_contract_kept_for_unpatched_callers(v: Variant) {
    if v.is_real() {
        let bundle = build_scenario_bundle("ipara", "v1", "v2", v);
        let run = livepatch([OsStr::new("inspect"), bundle.path.as_os_str(), OsStr::new("--json")]);
        run.assert_ok();
        let m: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
        let leaf = m["functions"].as_array().unwrap().iter().find(|f| f["name"].as_str().unwrap().starts_with("leaf")).expect("leaf patched");
        assert!(leaf["preserve"].as_array().is_some_and(|p| !p.is_empty()), "{}: no register thunk for leaf: {leaf}", v.name());
    }
    update_and_revert(
        v,
        "ipara",
        &["leaf"],
        &["combine"],
        &|t| {
            t.expect("call 5 7", "combine=338");
        },
        &|t| {
            t.expect("call 5 7", "combine=343");
            t.expect("call -3 9", "combine=-123");
        },
        &|t| {
            t.expect("call 5 7", "combine=338");
        },
    );
}
matrix_tests!(register_contract_kept_for_unpatched_callers => register_contract_kept_for_unpatched_callers);
real_build_tests!(register_contract_kept_for_unpatched_callers_real => register_contract_kept_for_unpatched_callers);

/// main's direct call of compute() is retargeted to the new compute() at the switch (no extra
/// jump per call), `status` counts it, and revert --all puts the original bytes back.
fn direct_calls_retargeted(v: Variant) {
    let old = compile("plain", "v1", v);
    let bundle = build_scenario_bundle("plain", "v1", "v2", v);
    let mut t = Target::start(&old);
    let before = text_snapshot(t.pid);
    apply(t.pid, &bundle, IDLE).assert_ok();
    let st = status(t.pid);
    let n = st.raw["patches"][0]["calls_retargeted"].as_u64().unwrap_or(0);
    assert!(n >= 1, "main calls compute() directly: the call must lead straight to the new code\n{}", st.raw);
    t.expect("call 5", "result v2 15");
    revert(t.pid, &["--all"]).assert_ok();
    assert_text_unchanged(&before, t.pid);
    t.expect("call 5", "result v1 10");
}
variant_tests!(direct_calls_retargeted => direct_calls_retargeted: o2_pie, o3_nopie, real_hardened);

/// `apply` with `--pid` given several times patches every process, concurrently, and reports
/// each; a process that is not there gets its own verdict and the exit code of the first
/// failure, the others are patched all the same.
#[test]
fn apply_to_several_processes_at_once() {
    let v = Variant::O2_PIE;
    let old = compile("plain", "v1", v);
    let bundle = build_scenario_bundle("plain", "v1", "v2", v);
    let mut a = Target::start(&old);
    let mut b = Target::start(&old);
    let run = livepatch([
        "apply".to_string(), "--pid".into(), a.pid.to_string(), "--pid".into(), b.pid.to_string(), "--jobs".into(), "2".into(),
        bundle.path.to_string_lossy().into_owned(), "--json".into(),
    ]);
    run.assert_ok();
    let v = run.json();
    let results = v["results"].as_array().expect("results");
    assert_eq!(results.len(), 2, "{v}");
    assert!(results.iter().all(|r| r["already_applied"] == false && r["gated"] == true), "{v}");
    assert!(v["peak_rss_kib"].as_u64().is_some_and(|k| k > 0), "{v}");
    a.expect("call 5", "result v2 15");
    b.expect("call 5", "result v2 15");
    // A missing process: its own verdict, exit 1, the other one answered (already applied).
    let run = livepatch(["apply".to_string(), "--pid".into(), a.pid.to_string(), "--pid".into(), "999999999".into(), bundle.path.to_string_lossy().into_owned(), "--json".into()]);
    assert_eq!(run.code, Some(1), "{}", run.describe());
    let v = run.json();
    assert_eq!(v["results"][0]["already_applied"], true, "{v}");
    assert_eq!(v["results"][1]["pid"], 999999999, "{v}");
    assert!(v["results"][1]["error"].as_str().is_some(), "{v}");
}
