//! The trap (watched area) strategy, issue 3: functions that polling can rarely catch idle.
//!
//! - a hot function called by eight threads in a tight loop,
//! - a recursive function active deep in the stack,
//! - a function that sleeps inside itself,
//!   all switched within a few seconds with `--strategy trap`;
//! - a function that never returns: exit 4, the target keeps its old code;
//! - more than four functions at once;
//! - after success, timeout and error (the tool interrupted by SIGTERM/SIGINT while it waits,
//!   once its gates are armed: its debug log says so and the entries show them) every entry
//!   byte is restored (the text, read from /proc/PID/mem, is what it was except the 5-byte
//!   jumps on success), no debug register is set, and no thread is left traced or stopped;
//! - a tool SIGKILLed with its gates armed: the target runs on (old code), and the next
//!   command repairs.
//!
//! Run in two builds: -O2 PIE, and -O3 -fomit-frame-pointer non-PIE without relocations.

#[macro_use]
mod support;

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use support::*;

/// How long a trap update may take, command start to exit (the goal is "a second or two";
/// this leaves room for a loaded two-core machine).
const SWITCH_LIMIT: Duration = Duration::from_secs(5);

const TRAP: &[&str] = &["--strategy", "trap", "--timeout", "20"];

/// Apply with the trap strategy; check it succeeded in time, patched `functions`, changed the
/// text only at their entries and left no breakpoint, debug register or tracer behind.
fn trap_apply(
    t: &mut Target,
    old: &std::path::Path,
    bundle: &Bundle,
    functions: &[&str],
) -> Applied {
    let before = text_snapshot(t.pid);
    let run = apply(t.pid, bundle, TRAP);
    let a = run.assert_ok().applied();
    eprintln!(
        "trap apply of {functions:?} in {}: {:?}, pause {} us",
        old.display(),
        run.elapsed,
        a.pause_us
    );
    assert!(
        run.elapsed < SWITCH_LIMIT,
        "trap update took {:?}",
        run.elapsed
    );
    assert_functions(&a.functions, functions);
    assert_not_traced(t.pid);
    let entries = live_entries(t.pid, old, &a.functions);
    assert_text_changed_only_at(&before, t.pid, &entries);
    assert_debug_registers_clear(t.pid);
    assert_no_wx(t.pid);
    a
}

/// Eight threads call hot() in a tight loop.
fn hot_function_eight_threads(v: Variant) {
    let old = compile("hot", "v1", v);
    let bundle = build_bundle(&old, &compile("hot", "v2", v), &[]);
    let mut t = Target::start(&old);
    t.expect("round", "round 1001 1002 1003 1004 1005 1006 1007 1008");
    trap_apply(&mut t, &old, &bundle, &["hot"]);
    t.expect("round", "round 2001 2002 2003 2004 2005 2006 2007 2008");
    t.expect("call", "hot=2000");
}
variant_tests!(hot_function_eight_threads => hot_function_eight_threads: o2_pie, o3_nopie);

/// Two threads are 41 frames deep in rec() nearly all the time.
fn recursive_function_deep_in_the_stack(v: Variant) {
    let old = compile("recursive", "v1", v);
    let bundle = build_bundle(&old, &compile("recursive", "v2", v), &[]);
    let mut t = Target::start(&old);
    t.expect("round", "round 1040 1040");
    trap_apply(&mut t, &old, &bundle, &["rec"]);
    t.expect("round", "round 2080 2080");
    t.expect("call 3", "rec=2006");
}
variant_tests!(recursive_function_deep_in_the_stack => recursive_function_deep_in_the_stack: o2_pie, o3_nopie);

/// Two threads sleep inside nap() nearly all the time.
fn function_that_sleeps_inside_itself(v: Variant) {
    let old = compile("sleeper", "v1", v);
    let bundle = build_bundle(&old, &compile("sleeper", "v2", v), &[]);
    let mut t = Target::start(&old);
    t.expect("round", "round 1001 1002");
    trap_apply(&mut t, &old, &bundle, &["nap"]);
    t.expect("round", "round 2001 2002");
}
variant_tests!(function_that_sleeps_inside_itself => function_that_sleeps_inside_itself: o2_pie, o3_nopie);

/// serve_forever() never returns and v3 changes its frame, so its frame cannot be switched:
/// exit 4 at the timeout, naming it; the target goes on with its old code, and nothing is left
/// behind (hardware breakpoint case: one function).
fn function_that_never_returns(v: Variant) {
    let old = compile("forever", "v1", v);
    let bundle = build_bundle(&old, &compile("forever", "v3", v), &[]);
    let mut t = Target::start(&old);
    t.expect("call", "v1 served 1");
    let before = Untouched::take(t.pid);
    let run = apply(t.pid, &bundle, &["--strategy", "trap", "--timeout", "2"]);
    run.assert_code(4).assert_stderr_mentions("serve_forever");
    assert!(
        run.elapsed >= Duration::from_millis(1500),
        "gave up before the timeout: {:?}",
        run.elapsed
    );
    t.expect("call", "v1 served 2");
    t.expect("ping", "pong");
    before.check(t.pid);
    assert!(status(t.pid).patches.is_empty());
    t.expect("call", "v1 served 3");
}
variant_tests!(function_that_never_returns => function_that_never_returns: o2_pie, o3_nopie);

/// Six functions: more than the four debug registers, so software breakpoints; two threads
/// call all six in a tight loop. Success: only the six jumps differ, every int3 is gone.
fn more_than_four_functions(v: Variant) {
    let old = compile("many", "v1", v);
    let bundle = build_bundle(&old, &compile("many", "v2", v), &[]);
    let mut t = Target::start(&old);
    t.expect("call", "many 110 120 130 140 150 160");
    t.expect("round", "round 810 810");
    trap_apply(&mut t, &old, &bundle, &["f1", "f2", "f3", "f4", "f5", "f6"]);
    t.expect("call", "many 210 220 230 240 250 260");
    t.expect("round", "round 1410 1410");
    t.expect("hold", "v2 f3 holding");
    t.expect("release", "v2 f3 released");
}
variant_tests!(more_than_four_functions => more_than_four_functions: o2_pie, o3_nopie);

/// Software breakpoints and a timeout: a thread is parked inside f3 for good; exit 4, every
/// breakpoint byte restored, the threads that were held at the entries go on in old code.
fn software_breakpoints_restored_after_timeout(v: Variant) {
    let old = compile("many", "v1", v);
    let bundle = build_bundle(&old, &compile("many", "v2", v), &[]);
    let mut t = Target::start(&old);
    t.expect("hold", "v1 f3 holding");
    let before = Untouched::take(t.pid);
    let run = apply(t.pid, &bundle, &["--strategy", "trap", "--timeout", "2"]);
    run.assert_code(4).assert_stderr_mentions("f3");
    before.check(t.pid);
    t.expect("call", "many 110 120 130 140 150 160");
    t.expect("round", "round 810 810");
    t.expect("release", "v1 f3 released");
    t.expect("round", "round 810 810");
}
variant_tests!(software_breakpoints_restored_after_timeout => software_breakpoints_restored_after_timeout: o2_pie, o3_nopie);

/// `livepatch ARGS...` with its debug log (`LIVEPATCH_LOG`) read line by line while it runs, so
/// a test can wait for what the tool did before acting.
struct Logged {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Logged {
    fn spawn(args: &[String], env: &[(&str, &str)]) -> Logged {
        let mut child = Command::new(livepatch_bin())
            .args(args)
            .envs(env.iter().copied())
            .env("LIVEPATCH_LOG", "livepatch=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", livepatch_bin()));
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Logged { child, lines, log: Vec::new() }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The first log line containing `needle`; fails after `limit` or if the tool's log ends.
    #[track_caller]
    fn wait_for(&mut self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) => {
                    self.log.push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(e) => panic!("no {needle:?} in the tool's log ({e:?}):\n{}", self.log.join("\n")),
            }
        }
    }

    /// Wait for the exit (kill and fail after `limit`): the status and the whole log.
    fn finish(mut self, limit: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(st) = self.child.try_wait().expect("waiting for livepatch") {
                break st;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("livepatch did not finish within {limit:?} (killed):\n{}", self.log.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        // The reader thread ends with the pipe.
        self.log.extend(self.lines.iter());
        (status, self.log.join("\n"))
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether the entry at `at` of `pid` jumps into a livepatch region (a gate, while a switch is
/// pending).
fn jumps_into_region(pid: i32, at: u64) -> bool {
    let b = read_mem(pid, at, 5);
    if b[0] != 0xe9 {
        return false;
    }
    let to = (at as i64 + 5 + i32::from_le_bytes(b[1..5].try_into().unwrap()) as i64) as u64;
    memfd_regions(pid).iter().any(|(lo, hi)| to >= *lo && to < *hi)
}

/// The livepatch regions mapped in `pid`.
fn memfd_regions(pid: i32) -> Vec<(u64, u64)> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("/memfd:livepatch:"))
        .filter_map(|l| {
            let (lo, hi) = l.split_whitespace().next()?.split_once('-')?;
            Some((u64::from_str_radix(lo, 16).ok()?, u64::from_str_radix(hi, 16).ok()?))
        })
        .collect()
}

/// The tool is interrupted (SIGTERM / SIGINT, as when an agent is shut down) while it waits
/// with the entries led to their gates: it must take them back, exit with 1, and leave the
/// target running its old code. The signal comes only once the gates are armed: the tool
/// logs it, and the target shows it (the entries jump into the patch region).
fn interrupted_while_waiting(v: Variant, scenario: &str, sig: i32) {
    let old = compile(scenario, "v1", v);
    // forever's v3 changes the frame: the frame cannot be switched, the wait goes on.
    let to = if scenario == "forever" { "v3" } else { "v2" };
    let bundle = build_bundle(&old, &compile(scenario, to, v), &[]);
    let mut t = Target::start(&old);
    let functions: Vec<String> = match scenario {
        "forever" => {
            t.expect("call", "v1 served 1");
            vec!["serve_forever".into()]
        }
        _ => {
            t.expect("hold", "v1 f3 holding");
            (1..=6).map(|i| format!("f{i}")).collect()
        }
    };
    let before = Untouched::take(t.pid);
    let mut p = Logged::spawn(&apply_args(t.pid, &bundle, &["--strategy", "trap", "--timeout", "60"]), &[]);
    p.wait_for("gates armed", Duration::from_secs(20));
    let entries = live_entries(t.pid, &old, &functions);
    assert!(
        entries.iter().all(|(_, e)| jumps_into_region(t.pid, *e)),
        "the tool says it armed the gates, but not every entry of {functions:?} leads into the patch region"
    );
    // SAFETY: kill() of our own child with a valid signal.
    unsafe { libc::kill(p.pid(), sig) };
    let (exit, log) = p.finish(Duration::from_secs(30));
    assert_eq!(exit.signal(), None, "livepatch died of signal {sig} instead of cleaning up:\n{log}");
    assert_eq!(exit.code(), Some(1), "livepatch interrupted by signal {sig}:\n{log}");
    before.check(t.pid);
    match scenario {
        "forever" => {
            t.expect("call", "v1 served 2");
        }
        _ => {
            t.expect("call", "many 110 120 130 140 150 160");
            t.expect("round", "round 810 810");
            t.expect("release", "v1 f3 released");
        }
    }
    assert!(status(t.pid).patches.is_empty());
}

fn gates_taken_back_after_sigint(v: Variant) {
    interrupted_while_waiting(v, "forever", libc::SIGINT);
}
variant_tests!(gates_taken_back_after_sigint => gates_taken_back_after_sigint: o2_pie, o3_nopie);

/// A tool SIGKILLed while its gates are armed: the thread that calls the function again
/// waits at the gate until the heartbeat has stopped long enough, then runs the old code; the
/// target never dies of a trap. `status` says the patch was interrupted, and the next command
/// takes the gates back and unmaps the region.
fn gates_give_way_after_a_killed_tool(v: Variant) {
    let old = compile("forever", "v1", v);
    let bundle = build_bundle(&old, &compile("forever", "v3", v), &[]); // v3: the frame cannot be switched
    let mut t = Target::start(&old);
    t.expect("call", "v1 served 1");
    let before = text_snapshot(t.pid);
    let mut p = Logged::spawn(&apply_args(t.pid, &bundle, &["--strategy", "trap", "--timeout", "60"]), &[]);
    p.wait_for("gates armed", Duration::from_secs(20));
    let entry = live_entries(t.pid, &old, &["serve_forever".to_string()])[0].1;
    assert!(jumps_into_region(t.pid, entry), "gates armed, but the entry does not lead into the region");
    // SAFETY: kill() of our own child with a valid signal.
    unsafe { libc::kill(p.pid(), libc::SIGKILL) };
    let (exit, _) = p.finish(Duration::from_secs(30));
    assert_eq!(exit.signal(), Some(libc::SIGKILL));
    // The function is reached again, through the gate: old code, and alive.
    t.expect("call", "v1 served 2");
    t.expect("call", "v1 served 3");
    assert_not_traced(t.pid);
    let st = status(t.pid);
    assert_eq!(st.patches.len(), 1, "{st:?}");
    assert_eq!(st.raw["patches"][0]["state"], "interrupted", "{st:?}");
    // The next command repairs: the entry back, the region gone.
    let out = revert(t.pid, &["--all"]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_text_unchanged(&before, t.pid);
    assert!(memfd_regions(t.pid).is_empty(), "the interrupted patch's region is still mapped: {}", out.stderr);
    t.expect("call", "v1 served 4");
}
variant_tests!(gates_give_way_after_a_killed_tool => gates_give_way_after_a_killed_tool: o2_pie);

fn gates_taken_back_after_sigterm(v: Variant) {
    interrupted_while_waiting(v, "many", libc::SIGTERM);
}
variant_tests!(gates_taken_back_after_sigterm => gates_taken_back_after_sigterm: o2_pie, o3_nopie);

/// The trap strategy on the issue-2 "several threads" target (calls with pauses between).
fn several_threads_trap(v: Variant) {
    let old = compile("threads", "v1", v);
    let bundle = build_bundle(&old, &compile("threads", "v2", v), &[]);
    let mut t = Target::start(&old);
    t.expect("round", "round 1001 1002 1003 1004");
    trap_apply(&mut t, &old, &bundle, &["work"]);
    t.expect("round", "round 2001 2002 2003 2004");
}
variant_tests!(several_threads_trap => several_threads_trap: o2_pie);
