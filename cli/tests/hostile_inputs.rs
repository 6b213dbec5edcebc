//! Hostile inputs, one table: every malformed, lying or unsuitable input the CLI can be given
//! (bundles, executables, target processes) with the exact outcome it gets: the exit code and
//! the key words of the error. A panic (exit 101), an abort, a hang or a vague message is a
//! failure. Where a bundle is applied, the target must be untouched afterwards (text, maps,
//! debug registers, not traced) and still run v1.
//!
//! The table is printed (`--nocapture`) as the one in `docs/safety.md`.

mod support;
use livepatch_testkit::skip;

use serde_json::Value;
use sha2::{Digest, Sha256};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use support::*;

const V: Variant = Variant::O2_PIE;

/// One row: what is given, the command, what must come out.
struct Case {
    input: String,
    args: Vec<OsString>,
    code: i32,
    words: Vec<&'static str>,
    /// The command is applied to the running v1 target: check it is untouched.
    touches_target: bool,
}

fn os(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<OsString> {
    args.iter().map(|a| a.as_ref().to_os_string()).collect()
}

/// The parts of a bundle file (see `node-agent/src/bundle.rs`).
struct Parts {
    version: u32,
    manifest: Value,
    blob: Vec<u8>,
}

fn split(bytes: &[u8]) -> Parts {
    let mlen = u32::from_le_bytes(bytes[12..16].try_into().unwrap()) as usize;
    let manifest = serde_json::from_slice(&bytes[16..16 + mlen]).unwrap();
    let blen = u64::from_le_bytes(bytes[16 + mlen..24 + mlen].try_into().unwrap()) as usize;
    Parts {
        version: u32::from_le_bytes(bytes[8..12].try_into().unwrap()),
        manifest,
        blob: bytes[24 + mlen..24 + mlen + blen].to_vec(),
    }
}

/// A bundle whose trailer is re-sealed over whatever was put in: the digest is right for the
/// content, the content lies.
fn seal(version: u32, manifest_json: &[u8], mlen: u32, blob: &[u8]) -> Vec<u8> {
    let mut out = b"LPBUNDL\0".to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&mlen.to_le_bytes());
    out.extend_from_slice(manifest_json);
    out.extend_from_slice(&(blob.len() as u64).to_le_bytes());
    out.extend_from_slice(blob);
    let d = Sha256::digest(&out);
    out.extend_from_slice(&d);
    out
}

fn reseal(p: &Parts, edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut m = p.manifest.clone();
    edit(&mut m);
    let j = serde_json::to_vec(&m).unwrap();
    seal(p.version, &j, j.len() as u32, &p.blob)
}

/// A copy of an executable with one `.symtab` entry changed (value, size, section index).
fn patch_symbol(src: &Path, dst: &Path, name: &str, value: Option<u64>, size: Option<u64>, shndx: Option<u16>) {
    let elf = Elf::read(src);
    let secs = elf.sections();
    let symtab = secs.iter().find(|s| s.kind == 2).expect(".symtab");
    let i = elf
        .symbols()
        .iter()
        .position(|s| s.name == name)
        .unwrap_or_else(|| panic!("no symbol {name}"));
    let e = (symtab.offset + i as u64 * 24) as usize;
    let mut d = std::fs::read(src).unwrap();
    if let Some(v) = value {
        d[e + 8..e + 16].copy_from_slice(&v.to_le_bytes());
    }
    if let Some(s) = size {
        d[e + 16..e + 24].copy_from_slice(&s.to_le_bytes());
    }
    if let Some(x) = shndx {
        d[e + 6..e + 8].copy_from_slice(&x.to_le_bytes());
    }
    std::fs::write(dst, d).unwrap();
}

fn cc(out: &Path, cc: &str, src: &Path, extra: &[&str]) -> bool {
    Command::new(cc)
        .args(["-O2", "-g0", "-Wl,--build-id", "-pthread", "-flive-patching=inline-clone"])
        .args(extra)
        .arg("-o")
        .arg(out)
        .arg(src)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// The whole table. Rows run one after the other against one running v1 target.
#[test]
fn hostile_input_table() {
    let old = compile("faults", "v1", V);
    let new = compile("faults", "v2", V);
    let good = build_bundle(&old, &new, &["f", "g"]);
    let bytes = std::fs::read(&good.path).unwrap();
    let parts = split(&bytes);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let file = |name: &str, data: &[u8]| -> PathBuf {
        let p = d.join(name);
        std::fs::write(&p, data).unwrap();
        p
    };
    let mut t = Target::start(&old);
    let pid = t.pid.to_string();
    let apply_args = |b: &Path| os(&[&"apply", &"--pid", &pid, &b, &"--timeout", &"5"]);

    let mut cases: Vec<Case> = Vec::new();
    let mut bundle_case = |input: &str, data: Vec<u8>, code: i32, words: Vec<&'static str>| {
        let p = file(&format!("{}.lpatch", cases.len()), &data);
        cases.push(Case { input: input.into(), args: apply_args(&p), code, words, touches_target: true });
    };

    // --- bundles ---
    bundle_case("empty file", vec![], 1, vec!["bad bundle", "too short"]);
    bundle_case("truncated to 10 bytes", bytes[..10].to_vec(), 1, vec!["bad bundle", "too short", "truncated"]);
    bundle_case("truncated to half", bytes[..bytes.len() / 2].to_vec(), 1, vec!["bad bundle", "digest mismatch", "truncated"]);
    let mut flipped = bytes.clone();
    flipped[40] ^= 1;
    bundle_case("one bit flipped in the manifest", flipped, 1, vec!["bad bundle", "digest mismatch", "corrupted"]);
    let mut padded = bytes.clone();
    padded.extend_from_slice(&[0; 100]);
    bundle_case("100 bytes appended", padded, 1, vec!["bad bundle", "digest mismatch"]);
    bundle_case("not a bundle (an ELF executable)", std::fs::read(&old).unwrap(), 1, vec!["bad bundle", "bad magic"]);
    bundle_case(
        "format version 2 (re-sealed)",
        {
            let j = serde_json::to_vec(&parts.manifest).unwrap();
            seal(2, &j, j.len() as u32, &parts.blob)
        },
        1,
        vec!["bad bundle", "version 2 is not supported"],
    );
    bundle_case("manifest not JSON (re-sealed)", seal(1, b"{\"format_version\": 1, ", 22, &parts.blob), 1, vec!["bad bundle", "manifest is not valid"]);
    bundle_case(
        "manifest length past the end (re-sealed)",
        {
            let j = serde_json::to_vec(&parts.manifest).unwrap();
            seal(1, &j, u32::MAX, &parts.blob)
        },
        1,
        vec!["bad bundle", "manifest length runs past the end"],
    );
    bundle_case("architecture aarch64 (re-sealed)", reseal(&parts, |m| m["arch"] = "aarch64".into()), 1, vec!["bad bundle", "architecture aarch64"]);
    bundle_case("a piece runs past the blob (re-sealed)", reseal(&parts, |m| m["pieces"][0]["len"] = (1u64 << 20).into()), 1, vec!["bad bundle", "runs past the blob"]);
    bundle_case("span of 1 TiB (re-sealed)", reseal(&parts, |m| m["span"]["len"] = (1u64 << 40).into()), 1, vec!["bad bundle", "not a sane page-aligned range"]);
    bundle_case("fixup outside the carried code (re-sealed)", reseal(&parts, |m| m["fixups"][0]["at"] = 0x10u64.into()), 1, vec!["bad bundle", "outside the carried code"]);
    bundle_case(
        "old function of 1 TiB (re-sealed)",
        reseal(&parts, |m| m["functions"][0]["old_size"] = (1u64 << 40).into()),
        1,
        vec!["bad bundle", "over the 16777216 byte limit"],
    );
    bundle_case(
        "old address near 2^64 (re-sealed)",
        reseal(&parts, |m| m["functions"][0]["old_svma"] = 0xffff_ffff_ffff_0000u64.into()),
        1,
        vec!["bad bundle", "old address overflows"],
    );
    bundle_case(
        "the same function twice (re-sealed)",
        reseal(&parts, |m| {
            let f = m["functions"][0].clone();
            m["functions"][1] = f;
        }),
        1,
        vec!["bad bundle", "overlap"],
    );
    bundle_case(
        "old code digest lies (re-sealed)",
        reseal(&parts, |m| m["functions"][1]["old_digest"] = "00".repeat(32).into()),
        3,
        vec!["refused", "`g`", "differs from the executable", "digest mismatch"],
    );
    bundle_case(
        "target build id lies (re-sealed)",
        reseal(&parts, |m| m["target"]["build_id"] = "ab".repeat(20).into()),
        3,
        vec!["refused", "build id mismatch", &*Box::leak("abab".repeat(10).into_boxed_str())],
    );
    let huge = d.join("huge.lpatch");
    std::fs::File::create(&huge).unwrap().set_len(600 << 20).unwrap();
    cases.push(Case {
        input: "oversized: 600 MiB (sparse)".into(),
        args: apply_args(&huge),
        code: 1,
        words: vec!["bad bundle", "over the 536870912 byte limit"],
        touches_target: true,
    });

    // --- executables (build --old X --new Y) ---
    let build = |o: &Path, n: &Path| os(&[&"build", &"--old", &o, &"--new", &n, &"-o", &d.join("out.lpatch")]);
    let mut elf_case = |input: &str, o: &Path, n: &Path, code: i32, words: Vec<&'static str>| {
        cases.push(Case { input: input.into(), args: build(o, n), code, words, touches_target: false });
    };
    let text = file("notes.txt", b"hello, this is not a program\n");
    elf_case("non-ELF file", &text, &new, 1, vec!["not an ELF file"]);
    let obj = d.join("v1.o");
    assert!(Command::new("cc").args(["-c", "-O2", "-o"]).arg(&obj).arg(source("faults", "v1")).status().unwrap().success());
    elf_case("relocatable object (.o)", &obj, &new, 1, vec!["not an executable", "ELF type 1"]);
    let mut c32 = std::fs::read(&old).unwrap();
    c32[4] = 1;
    let c32 = file("class32", &c32);
    elf_case("ELF class byte says 32-bit", &c32, &new, 1, vec!["only 64-bit"]);
    let cut = file("cut", &std::fs::read(&old).unwrap()[..3000]);
    elf_case("truncated ELF (3000 bytes)", &cut, &new, 1, vec!["malformed ELF"]);
    let (s1, s2) = (d.join("stripped1"), d.join("stripped2"));
    std::fs::copy(&old, &s1).unwrap();
    std::fs::copy(&new, &s2).unwrap();
    assert!(Command::new("strip").arg(&s1).arg(&s2).status().unwrap().success());
    elf_case("stripped old executable", &s1, &new, 1, vec!["no function symbols", "stripped"]);
    elf_case("stripped new executable", &old, &s2, 1, vec!["no function symbols", "stripped"]);
    let (nb1, nb2) = (d.join("nobid1"), d.join("nobid2"));
    assert!(cc(&nb1, "cc", &source("faults", "v1"), &["-fPIE", "-pie", "-Wl,--build-id=none"]));
    assert!(cc(&nb2, "cc", &source("faults", "v2"), &["-fPIE", "-pie", "-Wl,--build-id=none"]));
    elf_case("no GNU build id", &nb1, &nb2, 1, vec!["no GNU build id"]);
    elf_case("the same executable twice", &old, &old, 1, vec!["no function changed"]);
    let elf = Elf::read(&old);
    let (fa, _) = elf.function("f").unwrap();
    let (ga, gs) = elf.function("g").unwrap();
    let ov = d.join("overlap");
    patch_symbol(&old, &ov, "f", None, Some(ga - fa + gs), None);
    elf_case("overlapping symbols: f's size covers g", &ov, &new, 1, vec!["bad bundle", "functions f and g overlap"]);
    let far = d.join("far");
    patch_symbol(&old, &far, "g", Some(0xffff_ffff_ffff_0000), Some(u64::MAX), None);
    elf_case("absurd symbol: g at 2^64-64K, size 2^64-1", &far, &new, 1, vec!["function g", "has no bytes in the file"]);
    let big = d.join("big");
    patch_symbol(&old, &big, "g", None, Some(1 << 48), None);
    elf_case("absurd symbol: g of 2^48 bytes", &big, &new, 1, vec!["function g", "has no bytes in the file"]);
    // Static glibc: its main calls the IFUNC'd string functions through .iplt stubs that
    // belong to no function symbol; the diff cannot tell where such a call goes.
    let (st1, st2) = (d.join("static1"), d.join("static2"));
    if cc(&st1, "cc", &source("faults", "v1"), &["-static"]) && cc(&st2, "cc", &source("faults", "v2"), &["-static"]) {
        elf_case("static glibc executable (cc -static)", &st1, &st2, 3, vec!["refused", ".plt", "belongs to no function"]);
    } else {
        skip::missing("cannot link a static glibc executable (cc -static): no libc.a", "apt-get install libc6-dev");
    }

    // --- target processes ---
    let bundle = good.path.clone();
    let mut pid_case = |input: &str, p: &str, code: i32, words: Vec<&'static str>| {
        for cmd in ["apply", "status", "revert"] {
            let mut args = os(&[&cmd, &"--pid", &p]);
            if cmd == "apply" {
                args.push(bundle.clone().into());
            }
            cases.push(Case { input: format!("{input} ({cmd})"), args, code, words: words.clone(), touches_target: false });
        }
    };
    pid_case("kernel thread (PID 2, kthreadd)", "2", 1, vec!["is a kernel thread", "only user processes"]);
    let mut zombie = Command::new("true").spawn().unwrap();
    let zpid = zombie.id() as i32;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(format!("/proc/{zpid}/stat")).unwrap_or_default().contains(") Z ") {
        assert!(std::time::Instant::now() < deadline, "no zombie");
        std::thread::sleep(Duration::from_millis(5));
    }
    pid_case("zombie", &zpid.to_string(), 1, vec!["is a zombie"]);
    pid_case("no such process", "4194303", 1, vec!["no such process"]);
    pid_case("PID 0", "0", 1, vec!["is not a process id"]);

    // --- run the table ---
    let before = Untouched::take(t.pid);
    let mut failures = Vec::new();
    let mut table = String::from("| input | command | exit | error (key words) |\n|---|---|---|---|\n");
    for c in &cases {
        let run = livepatch(&c.args);
        let stderr = run.stderr.trim().to_string();
        let first = stderr.lines().last().unwrap_or("").to_string();
        table.push_str(&format!(
            "| {} | `{}` | {} | {} |\n",
            c.input,
            c.args[0].to_string_lossy(),
            run.code.map(|c| c.to_string()).unwrap_or_else(|| format!("signal {:?}", run.signal)),
            first.replace('|', "\\|")
        ));
        let lower = stderr.to_lowercase();
        let missing: Vec<&&str> = c.words.iter().filter(|w| !lower.contains(&w.to_lowercase())).collect();
        if run.code != Some(c.code) || !missing.is_empty() || stderr.lines().count() > 3 {
            failures.push(format!(
                "{}: want exit {} and {:?}; got exit {:?} signal {:?} (missing {missing:?}):\n  {}",
                c.input,
                c.code,
                c.words,
                run.code,
                run.signal,
                stderr.replace('\n', "\n  ")
            ));
        }
        if run.elapsed > Duration::from_secs(10) {
            failures.push(format!("{}: took {:?}", c.input, run.elapsed));
        }
        if c.touches_target {
            before.check(t.pid);
            t.expect("call", "call 11111");
        }
    }
    zombie.wait().unwrap();
    eprintln!("{table}");
    assert!(failures.is_empty(), "{} hostile input(s) got the wrong answer:\n{}", failures.len(), failures.join("\n"));
    assert!(status(t.pid).patches.is_empty());
}

/// The running process is a stripped copy of the executable (as distributions ship it, with
/// the symbols in a separate debug file): the bundle built from the unstripped build applies,
/// because the build id is the same and the engine needs no symbol of the running file.
#[test]
fn stripped_running_executable_is_patched() {
    let old = compile("faults", "v1", V);
    let new = compile("faults", "v2", V);
    let bundle = build_bundle(&old, &new, &["f", "g"]);
    let dir = tempfile::tempdir().unwrap();
    let stripped = dir.path().join("faults-v1-stripped");
    std::fs::copy(&old, &stripped).unwrap();
    assert!(Command::new("strip").arg(&stripped).status().unwrap().success());
    let mut t = Target::start(&stripped);
    t.expect("call", "call 11111");
    apply(t.pid, &bundle, IDLE).assert_ok();
    t.expect("call", "call 22111");
    revert(t.pid, &[]).assert_ok();
    t.expect("call", "call 11111");
}

/// musl executables (`musl-gcc`, dynamic and static; `scripts/setup.sh` installs musl-tools):
/// built, applied, reverted like glibc ones.
#[test]
fn musl_executables_are_patched() {
    if !skip::have("musl-gcc") {
        return skip::missing("musl-gcc is not installed", "apt-get install musl-tools");
    }
    let dir = tempfile::tempdir().unwrap();
    for (name, extra) in [("musl-dynamic", vec!["-fPIE", "-pie"]), ("musl-static", vec!["-static"])] {
        let (o, n) = (dir.path().join(format!("{name}-v1")), dir.path().join(format!("{name}-v2")));
        assert!(cc(&o, "musl-gcc", &source("faults", "v1"), &extra), "musl-gcc {name} v1");
        assert!(cc(&n, "musl-gcc", &source("faults", "v2"), &extra), "musl-gcc {name} v2");
        let bundle = build_bundle(&o, &n, &["f", "g"]);
        for strategy in ["trap", "wait"] {
            let mut t = Target::start(&o);
            t.expect("round", "round 11111 11111 11111 11111");
            apply(t.pid, &bundle, &["--strategy", strategy, "--timeout", "10"]).assert_ok();
            t.expect("round", "round 22111 22111 22111 22111");
            assert_not_traced(t.pid);
            revert(t.pid, &["--strategy", strategy, "--timeout", "10"]).assert_ok();
            t.expect("round", "round 11111 11111 11111 11111");
            assert!(status(t.pid).patches.is_empty(), "{name}");
        }
    }
}
