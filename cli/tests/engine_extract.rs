//! Extract: `livepatch diff`, `build` and `inspect` on the test targets, and the refusals of
//! data-layout changes at build time.

#[macro_use]
mod support;

use std::ffi::OsStr;
use std::fs;
use support::*;

/// Functions of the common header and of the unchanged parts of the targets: never "changed".
/// (gcc may clone some of them, e.g. `say.constprop.0` with a literal of a changed caller
/// baked in; a clone may change, the originals never do.)
const NEVER_CHANGED: &[&str] = &[
    "main",
    "say",
    "next_command",
    "command_is",
    "target_pid",
    "announce_ready",
    "sleep_us",
    "must_pipe",
    "put_byte",
    "get_byte",
    "start_thread",
    "round_current",
    "round_publish",
    "round_run_and_report",
    "worker",
    "holder",
    "helper",
    "all_six",
    "_start",
    "frame_dummy",
    "register_tm_clones",
    "deregister_tm_clones",
    "__do_global_dtors_aux",
];

/// (scenario, new version, the functions that changed, the data objects that changed)
const EXPECTED: &[(&str, &str, &[&str], &[&str])] = &[
    ("plain", "v2", &["compute"], &[]),
    ("plain", "v3", &["compute"], &[]),
    ("counter", "v2", &["bump"], &[]),
    ("literals", "v2", &["greet"], &[]),
    ("literals", "v3", &["greet"], &[]),
    ("jumptable", "v2", &["dispatch"], &[]),
    ("callee_changed", "v2", &["leaf", "caller"], &[]),
    ("callee_unchanged", "v2", &["caller", "banner"], &[]),
    ("tls", "v2", &["tick"], &[]),
    ("threads", "v2", &["work"], &[]),
    ("active", "v2", &["stuck"], &[]),
    ("datalayout", "v2", &["show"], &["cfg"]),
    ("datalayout", "v3", &["show"], &["table"]),
    ("hot", "v2", &["hot"], &[]),
    ("recursive", "v2", &["rec"], &[]),
    ("sleeper", "v2", &["nap"], &[]),
    ("forever", "v2", &["serve_forever"], &[]),
    ("many", "v2", &["f1", "f2", "f3", "f4", "f5", "f6"], &[]),
];

const CORE: &[&str] = &[
    "plain",
    "counter",
    "literals",
    "jumptable",
    "callee_changed",
    "callee_unchanged",
    "tls",
];

fn check_diff(v: Variant, scenario: &str, version: &str, changed: &[&str], data: &[&str]) {
    let old = compile(scenario, "v1", v);
    let new = compile(scenario, version, v);
    let d = diff(&old, &new);
    let ctx = format!("diff {scenario} v1 {version} ({}): {}", v.name(), d.raw);
    for f in changed {
        assert!(
            d.changed_functions.iter().any(|c| c == f),
            "{f} not reported changed\n{ctx}"
        );
    }
    for f in NEVER_CHANGED {
        assert!(
            !d.changed_functions.iter().any(|c| c == f),
            "{f} reported changed but is the same\n{ctx}"
        );
    }
    // Anything else reported must be a compiler-made piece of a changed function or a clone
    // of a header function (`dispatch.cold`, `say.constprop.0`): never a plain name.
    for c in &d.changed_functions {
        assert!(
            changed.contains(&c.as_str()) || c.contains('.'),
            "{c} reported changed\n{ctx}"
        );
    }
    assert!(
        d.added_functions.is_empty(),
        "no function was added (imports are not functions)\n{ctx}"
    );
    for o in data {
        assert!(
            d.changed_data.iter().any(|c| c == o),
            "data object {o} not reported changed\n{ctx}"
        );
    }
    if data.is_empty() {
        assert!(d.changed_data.is_empty(), "no data object changed\n{ctx}");
    }
}

/// The core scenarios' diffs in every build.
fn diff_core_scenarios(v: Variant) {
    for (sc, ver, changed, data) in EXPECTED.iter().filter(|e| CORE.contains(&e.0)) {
        check_diff(v, sc, ver, changed, data);
    }
}
matrix_tests!(diff_core_scenarios => diff_core_scenarios);

/// Every other scenario's diff in two builds.
fn diff_other_scenarios(v: Variant) {
    for (sc, ver, changed, data) in EXPECTED.iter().filter(|e| !CORE.contains(&e.0)) {
        check_diff(v, sc, ver, changed, data);
    }
}
variant_tests!(diff_other_scenarios => diff_other_scenarios: o2_pie, o3_nopie);

/// Two builds of the same source: nothing changed.
fn diff_of_identical_programs_is_empty(v: Variant) {
    let a = compile("plain", "v1", v);
    let dir = tempfile::tempdir().unwrap();
    let b = dir.path().join("copy");
    fs::copy(&a, &b).unwrap();
    let d = diff(&a, &b);
    assert!(
        d.changed_functions.is_empty() && d.added_functions.is_empty() && d.changed_data.is_empty(),
        "{}",
        d.raw
    );
}
variant_tests!(diff_of_identical_programs_is_empty => diff_of_identical_programs_is_empty: o2_pie, o3_nopie);

/// Text output of diff names the changed function too.
#[test]
fn diff_text_output_names_the_function() {
    let v = Variant::O2_PIE;
    let old = compile("callee_changed", "v1", v);
    let new = compile("callee_changed", "v2", v);
    let run = livepatch([OsStr::new("diff"), old.as_os_str(), new.as_os_str()]);
    run.assert_ok();
    assert!(
        run.stdout.contains("leaf") && run.stdout.contains("caller"),
        "{}",
        run.stdout
    );
}

/// A change of nothing but a string literal is a change: the code is the same instruction
/// for instruction, only what a relocated operand points to differs. Applied, the target
/// prints the new literal.
fn literal_only_change(v: Variant) {
    let old = compile("literals", "v1", v);
    let new = compile("literals", "v3", v);
    let d = diff(&old, &new);
    assert!(
        d.changed_functions.iter().any(|f| f == "greet"),
        "literal-only change missed: {}",
        d.raw
    );
    let bundle = build_bundle(&old, &new, &[]);
    let mut t = Target::start(&old);
    t.expect("call world", "v1 hello world");
    let a = apply(t.pid, &bundle, IDLE).assert_ok().applied();
    assert_functions(&a.functions, &["greet"]);
    t.expect("call world", "v3 howdy, world");
    revert(t.pid, IDLE).assert_ok();
    t.expect("call world", "v1 hello world");
}
variant_tests!(literal_only_change => literal_only_change: o2_pie, o3_nopie);

/// `inspect` shows the target identity (OLD's GNU build id) and the functions.
fn inspect_shows_identity_and_functions(v: Variant) {
    let old = compile("callee_changed", "v1", v);
    let new = compile("callee_changed", "v2", v);
    let bundle = build_bundle(&old, &new, &[]);
    let build_id = Elf::read(&old).build_id().expect("build id");

    let text = livepatch([OsStr::new("inspect"), bundle.path.as_os_str()]);
    text.assert_ok();
    for w in ["leaf", "caller"] {
        assert!(
            text.stdout.contains(w),
            "inspect does not name {w}:\n{}",
            text.stdout
        );
    }
    assert!(
        text.stdout.to_lowercase().contains(&build_id),
        "inspect does not show OLD's build id {build_id}:\n{}",
        text.stdout
    );

    let json = livepatch([
        OsStr::new("inspect"),
        bundle.path.as_os_str(),
        OsStr::new("--json"),
    ]);
    json.assert_ok();
    let v = json.json();
    let flat = v.to_string().to_lowercase();
    assert!(
        flat.contains(&build_id),
        "inspect --json lacks OLD's build id {build_id}: {v}"
    );
    assert!(
        flat.contains("\"leaf\"") && flat.contains("\"caller\""),
        "inspect --json lacks the functions: {v}"
    );
}
variant_tests!(inspect_shows_identity_and_functions => inspect_shows_identity_and_functions: o2_pie, o3_nopie);

/// `build --function NAME` puts only that function in the bundle.
fn build_selected_function_only(v: Variant) {
    let old = compile("callee_changed", "v1", v);
    let new = compile("callee_changed", "v2", v);
    let bundle = build_bundle(&old, &new, &["caller"]);
    let mut t = Target::start(&old);
    let a = apply(t.pid, &bundle, IDLE).assert_ok().applied();
    assert_eq!(
        a.functions,
        vec!["caller".to_string()],
        "only the selected function: {}",
        a.raw
    );
    // The new caller calls the live, unpatched leaf.
    t.expect("call 5", "v2 caller leaf=6");
    t.expect("leaf 5", "leaf=6");
}
variant_tests!(build_selected_function_only => build_selected_function_only: o2_pie, o3_nopie);

/// `build --function` with a name that did not change (or does not exist) fails; no bundle.
#[test]
fn build_unknown_function_fails() {
    let v = Variant::O2_PIE;
    let old = compile("plain", "v1", v);
    let new = compile("plain", "v2", v);
    let (run, bundle) = try_build_bundle(&old, &new, &["no_such_function"]);
    // A failure (1): not a usage error (the arguments parse) and not a refusal (nothing about
    // the update is unsafe; the request names no changed function).
    run.assert_code(1).assert_stderr_mentions("no_such_function");
    assert!(!bundle.path.exists(), "a bundle was written anyway");
}

/// Data that cannot change live: build refuses with exit 3, names the variable, says an
/// offline restart is needed, writes no bundle; the running v1 is of course untouched.
fn refuse(v: Variant, version: &str, variable: &str) {
    let old = compile("datalayout", "v1", v);
    let new = compile("datalayout", version, v);
    let (run, bundle) = try_build_bundle(&old, &new, &[]);
    run.assert_code(3)
        .assert_stderr_mentions(variable)
        .assert_stderr_mentions("restart");
    assert!(
        !bundle.path.exists(),
        "a refused build wrote {}",
        bundle.path.display()
    );
    let mut t = Target::start(&old);
    t.expect("call", "v1 a=1 b=2 sum=10");
}

fn refused_struct_grows(v: Variant) {
    refuse(v, "v2", "cfg");
}
variant_tests!(refused_struct_grows => refused_struct_grows: o0_nopie_relocs, o2_pie, o3_nopie);

fn refused_array_grows(v: Variant) {
    refuse(v, "v3", "table");
}
variant_tests!(refused_array_grows => refused_array_grows: o2_pie, o3_nopie);

fn refused_new_writable_data(v: Variant) {
    refuse(v, "v4", "extra_hits");
}
variant_tests!(refused_new_writable_data => refused_new_writable_data: o2_pie, o3_nopie);

/// `build --record-refusal`: a data-layout change still yields a bundle (for pipelines and
/// the cluster), which records the refusal and carries no code; applying it refuses (exit 3)
/// before touching the process, which keeps running v1.
fn recorded_refusal_is_refused_at_apply(v: Variant) {
    let old = compile("datalayout", "v1", v);
    let new = compile("datalayout", "v2", v);
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("layout.lpatch");
    let b = bundle.to_str().unwrap();
    livepatch(["build", "--old", old.to_str().unwrap(), "--new", new.to_str().unwrap(), "-o", b, "--record-refusal"])
        .assert_code(0)
        .assert_stderr_mentions("cannot be applied live");
    let shown = livepatch(["inspect", b]);
    shown.assert_code(0);
    assert!(shown.stdout.contains("REFUSAL") && shown.stdout.contains("cfg"), "{}", shown.stdout);
    let mut t = Target::start(&old);
    t.expect("call", "v1 a=1 b=2 sum=10");
    livepatch(["apply", "--pid", &t.pid.to_string(), b])
        .assert_code(3)
        .assert_stderr_mentions("cfg")
        .assert_stderr_mentions("restart");
    t.expect("call", "v1 a=1 b=2 sum=10");
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", t.pid)).unwrap();
    assert!(!maps.contains("livepatch:"), "a refused apply mapped a region:\n{maps}");
}
variant_tests!(recorded_refusal_is_refused_at_apply => recorded_refusal_is_refused_at_apply: o2_pie, o3_nopie);

/// A struct that only lives on the heap changes layout: no global changes size, the DWARF of
/// both builds shows it, and the build refuses with the typed kind, naming the struct.
fn heap_struct_layout_refused(v: Variant) {
    let old = compile("heaplayout", "v1", v);
    let new = compile("heaplayout", "v2", v);
    let diff = source_diff("heaplayout", "v1", "v2");
    let (run, bundle) = try_build_bundle_args(&old, &new, &["--source-diff".into(), diff.display().to_string(), "--json".into()]);
    assert_eq!(run.code, Some(3), "{}", run.describe());
    let v: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {}", run.describe()));
    assert_eq!(v["refusal_kind"], "DataLayout", "{v}");
    assert_eq!(v["restart_required"], true, "{v}");
    let msg = v["error"].as_str().unwrap();
    assert!(msg.contains("struct session") && msg.contains("member `packets` added"), "{msg}");
    assert!(!bundle.path.exists(), "a refused build wrote a bundle");
}
real_build_tests!(heap_struct_layout_refused_real => heap_struct_layout_refused);

/// With the source diff, `diff` explains each machine-code difference: the function that holds
/// the changed lines is patched; `main`, changed only by register allocation or inlining
/// choices, is listed as not patched, with that reason.
fn source_diff_explains(v: Variant) {
    for (scenario, patched) in [("plain", &["compute"][..]), ("callee_changed", &["leaf", "caller"][..]), ("many", &["f1", "f2", "f3", "f4", "f5", "f6"][..])] {
        let old = compile(scenario, "v1", v);
        let new = compile(scenario, "v2", v);
        let diff = source_diff(scenario, "v1", "v2");
        let run = livepatch([
            OsStr::new("diff"),
            old.as_os_str(),
            new.as_os_str(),
            OsStr::new("--source-diff"),
            diff.as_os_str(),
            OsStr::new("--json"),
        ]);
        run.assert_ok();
        let d: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
        let src = &d["source"];
        let base = |n: &str| n.split('.').next().unwrap().to_string();
        let got: Vec<String> = src["patched"].as_array().unwrap().iter().map(|e| base(e["name"].as_str().unwrap())).collect();
        for f in patched {
            assert!(got.iter().any(|g| g == f), "{scenario} {}: {f} not patched: {src}", v.name());
        }
        assert!(!got.iter().any(|g| g == "main"), "{scenario} {}: main patched: {src}", v.name());
        for e in src["not_patched"].as_array().unwrap().iter().filter(|e| e["name"] == "main") {
            assert_eq!(e["why"], "no_changed_line", "{scenario} {}: {e}", v.name());
        }
        for c in d["changed_functions"].as_array().unwrap() {
            let name = c["name"].as_str().unwrap();
            let explained = src["patched"].as_array().unwrap().iter().chain(src["not_patched"].as_array().unwrap()).any(|e| e["name"] == name);
            assert!(explained, "{scenario} {}: changed {name} is not explained: {src}", v.name());
        }
    }
}
real_build_tests!(source_diff_explains_real => source_diff_explains);

/// A fix that only changes a macro: no changed line holds code, the function using the macro
/// differs; the build says so and names it, instead of writing an empty or partial bundle.
#[test]
fn macro_only_fix_names_the_functions_using_it() {
    let dir = tempfile::tempdir().unwrap();
    let src = "#include <stdio.h>\n#define LIMIT 10\n__attribute__((noinline)) int check(int n) { return n < LIMIT; }\nint main(void) { char b[64]; while (fgets(b, sizeof b, stdin)) printf(\"%d\\n\", check(b[0] - '0')); return 0; }\n";
    let mut exes = Vec::new();
    for (v, s) in [("v1", src.to_string()), ("v2", src.replace("#define LIMIT 10", "#define LIMIT 5"))] {
        let tree = dir.path().join(v);
        fs::create_dir_all(&tree).unwrap();
        fs::write(tree.join("limits.c"), s).unwrap();
        let exe = dir.path().join(format!("limits-{v}"));
        let r = std::process::Command::new("cc").args(["-g", "-O2", "-Wl,--build-id", "-o"]).arg(&exe).arg(tree.join("limits.c")).output().expect("cc");
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        exes.push(exe);
    }
    let patch = dir.path().join("fix.patch");
    fs::write(&patch, "--- a/limits.c\n+++ b/limits.c\n@@ -2 +2 @@\n-#define LIMIT 10\n+#define LIMIT 5\n").unwrap();
    let (run, bundle) = try_build_bundle_args(&exes[0], &exes[1], &["--source-diff".into(), patch.display().to_string()]);
    assert_eq!(run.code, Some(1), "{}", run.describe());
    assert!(run.stderr.contains("nothing to patch") && run.stderr.contains("a macro") && run.stderr.contains("check"), "{}", run.describe());
    assert!(!bundle.path.exists());
    // Named explicitly, the function is patched.
    let (run, bundle) = try_build_bundle_args(&exes[0], &exes[1], &["--function".into(), "check".into()]);
    run.assert_ok();
    assert!(bundle.path.exists());
}
