//! Shared libraries, the engine's part (issue 14): a bundle built from two builds of a library
//! (`tests/libraries/parse`, Debian's hardening flags, `-fPIC -shared`) applies to a running
//! program that maps it: the library is found among the process's mappings by its build id and
//! patched at its own load address; the library's state (a call counter, thread-local counters
//! reached through `__tls_get_addr`) is kept; `status`
//! names the library; `revert` restores it. A process that maps no object with the bundle's
//! build id is refused (`BuildIdMismatch`).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use support::*;

const HARDENED: [&str; 8] = [
    "-fstack-protector-strong",
    "-fstack-clash-protection",
    "-fcf-protection",
    "-Wformat",
    "-Werror=format-security",
    "-D_FORTIFY_SOURCE=2",
    "-Wl,-z,relro,-z,now",
    "-Wl,--build-id",
];

fn cc(args: &[&str], out: &Path) {
    let st = Command::new("cc").args(["-g", "-O2"]).args(HARDENED).args(args).arg("-o").arg(out).status().expect("run cc (a C compiler is required)");
    assert!(st.success(), "cc {args:?} failed");
}

/// The two library builds (each `libparse.so` in its own directory) and the program linked with
/// the first.
fn build(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/libraries/parse");
    let mut libs = Vec::new();
    for v in ["v1", "v2"] {
        let d = dir.join(v);
        std::fs::create_dir_all(&d).unwrap();
        let lib = d.join("libparse.so");
        cc(&["-fPIC", "-shared", "-Wl,-soname,libparse.so", src.join(format!("lib-{v}.c")).to_str().unwrap()], &lib);
        libs.push(lib);
    }
    let prog = dir.join("prog");
    let v1 = dir.join("v1");
    cc(&["-fPIE", "-pie", src.join("main.c").to_str().unwrap(), &format!("-L{}", v1.display()), "-lparse", &format!("-Wl,-rpath,{}", v1.display())], &prog);
    (libs.remove(0), libs.remove(0), prog)
}

#[test]
fn library_function_patched_in_a_running_program() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new, prog) = build(dir.path());
    let bundle = build_bundle(&old, &new, &[]);
    let mut t = Target::start(&prog);
    t.expect("call aaaaaaaaaaaa", "parse 12 count 1 tls 1012");
    let before = text_snapshot(t.pid);
    let run = apply(t.pid, &bundle, IDLE);
    run.assert_ok();
    assert_eq!(run.json()["gated"], true, "{}", run.stdout);
    // The fix, in the library's own code; its state (the counter, the thread-local counters
    // through the old library's TLS index pairs) carried on.
    t.expect("call aaaaaaaaaaaa", "parse -1 count 2 tls 2024");
    t.expect("call aaaa", "parse 4 count 3 tls 3028");
    let st = status(t.pid);
    let lib = st.raw["patches"][0]["library"].as_str().unwrap_or_default().to_string();
    assert!(lib.ends_with("/v1/libparse.so"), "status names the library: {}", st.raw);
    revert(t.pid, &["--all"]).assert_ok();
    assert_text_unchanged(&before, t.pid);
    t.expect("call aaaaaaaaaaaa", "parse 12 count 4 tls 4040");
}

#[test]
fn process_without_the_library_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new, _) = build(dir.path());
    let bundle = build_bundle(&old, &new, &[]);
    let mut t = Target::start(&compile("plain", "v1", Variant::O2_PIE));
    let run = apply(t.pid, &bundle, IDLE);
    assert_eq!(run.code, Some(3), "{}", run.describe());
    assert_eq!(run.json()["refusal_kind"], "BuildIdMismatch", "{}", run.stdout);
    t.expect("call 5", "result v1 10");
}

/// Two processes map the library at different addresses (ASLR): one `apply` with both pids
/// patches each at its own load address.
#[test]
fn library_mapped_at_different_addresses_in_two_processes() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new, prog) = build(dir.path());
    let bundle = build_bundle(&old, &new, &[]);
    let mut a = Target::start(&prog);
    let mut b = Target::start(&prog);
    let base = |pid: i32| maps(pid).into_iter().find(|m| m.path.ends_with("/v1/libparse.so")).map(|m| m.start).expect("the library is mapped");
    assert_ne!(base(a.pid), base(b.pid), "ASLR put the library at the same address in both processes");
    let run = livepatch(["apply".to_string(), "--pid".into(), a.pid.to_string(), "--pid".into(), b.pid.to_string(), bundle.path.to_string_lossy().into_owned(), "--json".into()]);
    run.assert_ok();
    a.expect("call aaaaaaaaaaaa", "parse -1 count 1 tls 1012");
    b.expect("call aaaaaaaaaaaa", "parse -1 count 1 tls 1012");
}
