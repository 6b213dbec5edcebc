//! Checks of the test targets and of the test support itself. These need no engine: they
//! guard the ground the engine tests stand on (the C sources, the compiler, the protocol,
//! the readers of /proc and of the debug registers).

mod support;
use livepatch_testkit::skip;

use std::fs;
use support::*;

const BEGIN: &str = "/* ==== BEGIN VERSIONED ==== */";
const END: &str = "/* ==== END VERSIONED ==== */";

/// Everything outside the versioned block, which must be the same in every version.
fn outside_versioned_block(text: &str, file: &str) -> String {
    assert_eq!(
        text.matches(BEGIN).count(),
        1,
        "{file}: one BEGIN VERSIONED marker"
    );
    assert_eq!(
        text.matches(END).count(),
        1,
        "{file}: one END VERSIONED marker"
    );
    let b = text.find(BEGIN).unwrap();
    let e = text.find(END).unwrap();
    assert!(b < e, "{file}: markers out of order");
    format!("{}{}", &text[..b], &text[e..])
}

/// Skip the leading comment of a file: it documents every version's answers.
fn without_leading_comment(text: &str) -> &str {
    match (text.find("/*"), text.find("*/")) {
        (Some(0), Some(end)) => &text[end + 2..],
        _ => text,
    }
}

#[test]
fn versions_differ_only_inside_the_versioned_block() {
    let scenarios = scenarios();
    assert!(
        scenarios.len() >= 15,
        "expected all scenarios under tests/targets, found {scenarios:?}"
    );
    for sc in scenarios {
        let versions = versions(&sc);
        assert!(
            versions.len() >= 2 && versions[0] == "v1",
            "{sc}: needs v1.c and v2.c, has {versions:?}"
        );
        let base_file = source(&sc, "v1");
        let base_text = fs::read_to_string(&base_file).unwrap();
        let base = outside_versioned_block(
            without_leading_comment(&base_text),
            &base_file.display().to_string(),
        );
        for v in &versions[1..] {
            let f = source(&sc, v);
            let text = fs::read_to_string(&f).unwrap();
            let other =
                outside_versioned_block(without_leading_comment(&text), &f.display().to_string());
            if other != base {
                let line = base
                    .lines()
                    .zip(other.lines())
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                panic!(
                    "{sc}/{v}.c differs from {sc}/v1.c outside the versioned block (around line {} of that part)",
                    line + 1
                );
            }
            assert_ne!(base_text, text, "{sc}/{v}.c is the same as v1.c");
        }
    }
}

/// Every scenario builds in the default variant and speaks the protocol.
#[test]
fn every_target_starts_and_answers() {
    for sc in scenarios() {
        for v in versions(&sc) {
            let exe = compile(&sc, &v, Variant::O2_PIE);
            let mut t = Target::start(&exe);
            t.expect("ping", "pong");
            t.expect("no-such-command", "error unknown no-such-command");
            t.expect("quit", "bye");
            let st = t
                .wait_exit(LINE_TIMEOUT)
                .expect("target did not exit after quit");
            assert!(st.success(), "{sc}/{v} exited with {st:?}");
        }
    }
}

/// The reference outputs the engine tests rely on, from the targets themselves (not patched).
#[test]
fn reference_outputs() {
    let v = Variant::O3_NOPIE;
    let mut t = Target::start(&compile("plain", "v3", v));
    t.expect("call 5", "result v3 20");
    let mut t = Target::start(&compile("counter", "v2", v));
    t.expect("call", "v2 count=100 total=1");
    let mut t = Target::start(&compile("literals", "v2", v));
    let want = format!("v2 greetings world (len 5, pid {})", t.pid);
    t.expect("call world", &want);
    let mut t = Target::start(&compile("callee_unchanged", "v2", v));
    t.expect("call 3", "v2 helper=10 next=17 calls=2");
    t.expect("banner", "v2 banner calls=2 twice=4 thrice=6 sign=1");
    let mut t = Target::start(&compile("tls", "v2", v));
    t.expect("tcall 2", "v2 w2 tls=10");
    let mut t = Target::start(&compile("hot", "v1", v));
    t.expect("round", "round 1001 1002 1003 1004 1005 1006 1007 1008");
    let mut t = Target::start(&compile("recursive", "v2", v));
    t.expect("round", "round 2080 2080");
    let mut t = Target::start(&compile("many", "v1", v));
    t.expect("call", "many 110 120 130 140 150 160");
    t.expect("hold", "v1 f3 holding");
    t.expect("round", "round 810 810");
    t.expect("release", "v1 f3 released");
    let mut t = Target::start(&compile("active", "v1", v));
    t.expect("enter", "v1 entered");
    t.expect("call", "v1 call");
    t.expect("release", "v1 left");
    t.expect("exit", "exiting");
    assert!(t.wait_exit(LINE_TIMEOUT).expect("exit").success());
}

/// The jump-table scenario really has a jump table, and the patched functions are real
/// calls (not inlined) in every build.
#[test]
fn targets_have_the_code_shapes_the_tests_need() {
    for v in Variant::ALL {
        for ver in ["v1", "v2"] {
            let exe = compile("jumptable", ver, v);
            if let Some(dis) = objdump_function(&exe, "dispatch") {
                assert!(
                    dis.lines().any(|l| l.contains("jmp") && l.contains('*')),
                    "no indirect jump (jump table) in dispatch of jumptable/{ver} {}:\n{dis}",
                    v.name()
                );
            }
        }
        for (sc, f) in [
            ("plain", "compute"),
            ("callee_unchanged", "helper"),
            ("recursive", "rec"),
        ] {
            let exe = compile(sc, "v1", v);
            let elf = Elf::read(&exe);
            let (_, size) = elf
                .function(f)
                .unwrap_or_else(|| panic!("{sc}: no {f} in {}", v.name()));
            assert!(
                size >= 5,
                "{sc}: {f} is {size} bytes in {}, too short for a jump",
                v.name()
            );
            if let Some(all) = objdump_all(&exe) {
                let target = format!("<{f}>");
                assert!(
                    all.lines()
                        .any(|l| l.contains("call") && l.trim_end().ends_with(&target)),
                    "{sc}: {f} is never called in {}",
                    v.name()
                );
            }
        }
        // helper() must sit at a different address in v2 than in v1, or the unchanged-callee
        // test would not show that calls bind to the live address.
        let a = Elf::read(&compile("callee_unchanged", "v1", v))
            .function("helper")
            .unwrap()
            .0;
        let b = Elf::read(&compile("callee_unchanged", "v2", v))
            .function("helper")
            .unwrap()
            .0;
        assert_ne!(
            a,
            b,
            "helper did not move between v1 and v2 in {}",
            v.name()
        );
    }
}

/// `objdump -d` of `exe`; `None` only when objdump is missing and skipping is allowed.
fn objdump_all(exe: &std::path::Path) -> Option<String> {
    if !skip::have("objdump") {
        skip::missing("objdump is not installed: the code-shape checks need it", "apt-get install binutils");
        return None;
    }
    let o = std::process::Command::new("objdump")
        .args(["-d", "--no-show-raw-insn"])
        .arg(exe)
        .output()
        .unwrap_or_else(|e| panic!("objdump -d {}: {e}", exe.display()));
    assert!(o.status.success(), "objdump -d {}: {}", exe.display(), String::from_utf8_lossy(&o.stderr));
    Some(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn objdump_function(exe: &std::path::Path, function: &str) -> Option<String> {
    let all = objdump_all(exe)?;
    let head = format!("<{function}>:");
    let mut out = String::new();
    let mut inside = false;
    for l in all.lines() {
        if l.ends_with(&head) {
            inside = true;
        } else if inside && l.trim().is_empty() {
            break;
        }
        if inside {
            out.push_str(l);
            out.push('\n');
        }
    }
    Some(out)
}

/// The readers the engine tests use see what is really in the process.
#[test]
fn harness_reads_the_process_correctly() {
    for v in [Variant::O2_PIE, Variant::O3_NOPIE] {
        let exe = compile("plain", "v1", v);
        let mut t = Target::start(&exe);
        t.expect("call 1", "result v1 2");

        // Symbols + load bias + /proc/PID/mem agree with the file.
        let elf = Elf::read(&exe);
        let (addr, size) = elf.function("compute").unwrap();
        let entry = live_entries(t.pid, &exe, &["compute".to_string()])[0].1;
        let live = read_mem(t.pid, entry, size as usize);
        let file = fs::read(&exe).unwrap();
        let text = elf
            .sections()
            .into_iter()
            .find(|s| s.name == ".text")
            .unwrap();
        let off = (addr - text.addr + text.offset) as usize;
        assert_eq!(
            live,
            &file[off..off + size as usize],
            "live bytes of compute differ from the file"
        );
        assert_eq!(
            elf.build_id().map(|b| b.len()),
            Some(40),
            "GNU build id (sha1) expected"
        );

        // Two snapshots of an idle process are equal; the process is not traced; no W+X.
        let before = Untouched::take(t.pid);
        before.check(t.pid);
        assert_no_wx(t.pid);

        // A breakpoint byte written into the text is seen, and so is its removal.
        write_mem(t.pid, entry, &[0xcc]);
        let diffs = text_differences(&before.text, &text_snapshot(t.pid));
        assert_eq!(diffs, vec![(entry, live[0], 0xcc)]);
        write_mem(t.pid, entry, &live[..1]);
        assert_text_unchanged(&before.text, t.pid);
        t.expect("call 2", "result v1 4");

        // A hardware breakpoint enabled in DR7 is seen, and so is its removal.
        set_dr7(t.pid, entry, 1);
        let regs = debug_registers(t.pid).unwrap();
        assert_eq!(
            (regs[0], regs[7] & 1),
            (entry, 1),
            "DR0/DR7 not read back: {regs:x?}"
        );
        set_dr7(t.pid, 0, 0);
        assert_debug_registers_clear(t.pid);
        t.expect("call 3", "result v1 6");
    }
}

fn write_mem(pid: i32, addr: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .unwrap();
    f.write_all_at(bytes, addr).unwrap();
}

fn set_dr7(tid: i32, dr0: u64, dr7: u64) {
    use std::ptr::null_mut;
    let base = std::mem::offset_of!(libc::user, u_debugreg);
    unsafe {
        assert_eq!(
            libc::ptrace(
                libc::PTRACE_SEIZE,
                tid,
                null_mut::<libc::c_void>(),
                null_mut::<libc::c_void>()
            ),
            0
        );
        assert_eq!(
            libc::ptrace(
                libc::PTRACE_INTERRUPT,
                tid,
                null_mut::<libc::c_void>(),
                null_mut::<libc::c_void>()
            ),
            0
        );
        let mut status = 0;
        assert_eq!(libc::waitpid(tid, &mut status, libc::__WALL), tid);
        if dr7 == 0 {
            assert_eq!(
                libc::ptrace(
                    libc::PTRACE_POKEUSER,
                    tid,
                    (base + 7 * 8) as *mut libc::c_void,
                    null_mut::<libc::c_void>()
                ),
                0
            );
        }
        assert_eq!(
            libc::ptrace(
                libc::PTRACE_POKEUSER,
                tid,
                base as *mut libc::c_void,
                dr0 as *mut libc::c_void
            ),
            0
        );
        if dr7 != 0 {
            assert_eq!(
                libc::ptrace(
                    libc::PTRACE_POKEUSER,
                    tid,
                    (base + 7 * 8) as *mut libc::c_void,
                    dr7 as *mut libc::c_void
                ),
                0
            );
        }
        libc::ptrace(
            libc::PTRACE_DETACH,
            tid,
            null_mut::<libc::c_void>(),
            null_mut::<libc::c_void>(),
        );
    }
}
