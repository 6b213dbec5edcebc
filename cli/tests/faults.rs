//! The fault campaign: the `livepatch` process is killed (SIGKILL) at every step of apply and
//! revert, and at random points over hundreds of apply/revert cycles, against a multi-threaded
//! target that checks its own invariants (`tests/targets/faults`: four workers call the
//! patched f and g over and over and count mixed observations that persist). After every kill
//! the target must be running, not stopped, not traced, answer, show its old or its new
//! behaviour (never a mix that persists), and a fresh `status` and `revert --all` must work
//! and bring v1 back with nothing left behind (no region, no memfd descriptor, no breakpoint
//! byte, no debug register, text byte for byte as before).
//!
//! Then the events a target can go through during an update: it exits, execs, forks, gets
//! signals (handled SIGUSR1 and a queued real-time signal, SIGSTOP/SIGCONT), creates and ends
//! threads during the stop, or is already traced by someone else.
//!
//! `LIVEPATCH_FAULT_CYCLES` (default 500) sets the number of random cycles,
//! `LIVEPATCH_FAULT_SEED` the seed (printed, so a failing run can be replayed).
//!
//! Windows that cannot be closed from inside the tool are measured and reported; when one
//! bites the test fails with the fault point and a reproduction (see `docs/safety.md`).

#[macro_use]
mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use support::*;

const V: Variant = Variant::O2_PIE;
const OLD: &str = "11111";

/// The scenario: v1, and bundles of one (f), two (f, g), four (f, g, h, k) and all five
/// functions, all switched through their gates.
struct Scene {
    old: PathBuf,
    one: Bundle,
    fg: Bundle,
    four: Bundle,
    all: Bundle,
}

fn scene() -> Scene {
    let old = compile("faults", "v1", V);
    let new = compile("faults", "v2", V);
    Scene {
        one: build_bundle(&old, &new, &["f"]),
        fg: build_bundle(&old, &new, &["f", "g"]),
        four: build_bundle(&old, &new, &["f", "g", "h", "k"]),
        all: build_bundle(&old, &new, &[]),
        old,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Which {
    /// f alone (watch mask 1): new pattern 21111.
    One,
    /// f and g (watch mask 3): new pattern 22111.
    Fg,
    /// f, g, h, k (watch mask 15): new pattern 22221.
    Four,
    /// f, g, h, k, m (watch mask 31): new pattern 22222.
    All,
}

impl Which {
    fn new_pattern(self) -> &'static str {
        match self {
            Which::One => "21111",
            Which::Fg => "22111",
            Which::Four => "22221",
            Which::All => "22222",
        }
    }
    fn mask(self) -> &'static str {
        match self {
            Which::One => "watch 1",
            Which::Fg => "watch 3",
            Which::Four => "watch 15",
            Which::All => "watch 31",
        }
    }
    fn bundle(self, s: &Scene) -> &Bundle {
        match self {
            Which::One => &s.one,
            Which::Fg => &s.fg,
            Which::Four => &s.four,
            Which::All => &s.all,
        }
    }
}

/// A target of the scenario with its text as it was at start.
struct Subject {
    t: Target,
    text0: TextSnapshot,
}

fn start(s: &Scene, which: Which) -> Subject {
    let mut t = Target::start(&s.old);
    t.expect(which.mask(), which.mask());
    t.expect("round", &format!("round {OLD} {OLD} {OLD} {OLD}"));
    let text0 = text_snapshot(t.pid);
    Subject { t, text0 }
}

/// The target's counters (`check`).
fn counters(t: &mut Target) -> BTreeMap<String, i64> {
    let line = t.ask("check");
    let rest = line
        .strip_prefix("check ")
        .unwrap_or_else(|| panic!("bad check answer {line:?}"));
    rest.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.parse().unwrap_or(-1)))
        .collect()
}

/// Each worker's pattern from an iteration that started after the command.
fn round(t: &mut Target) -> Vec<String> {
    let line = t.ask("round");
    line.strip_prefix("round ")
        .unwrap_or_else(|| panic!("bad round answer {line:?}"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn memfd_mappings(pid: i32) -> Vec<Mapping> {
    maps(pid)
        .into_iter()
        .filter(|m| m.path.contains("memfd:livepatch:"))
        .collect()
}

fn memfd_descriptors(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| {
            rd.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|l| l.to_string_lossy().contains("memfd:livepatch:"))
                .count()
        })
        .unwrap_or(0)
}

/// What a kill left in the target before anything repaired it (from `status` and /proc).
#[derive(Debug, Default, Clone)]
struct Left {
    /// A region mapped, never switched to, or switched back through its gates (interrupted).
    orphan: bool,
    /// A patch only partly switched (the tool died between two jumps).
    partial: bool,
    /// A patch applied (all entries switched).
    applied: bool,
    /// A memfd descriptor left open in the target.
    leaked_fd: bool,
    /// The pattern every worker showed right after the kill.
    pattern: String,
    /// Persistent mixes the target counted from the kill until the repair was complete.
    persisted: i64,
}

/// How a target was harmed (the campaign counts these; any one fails the test).
#[derive(Debug, Clone)]
struct Harm {
    kind: &'static str,
    detail: String,
}

fn harm(kind: &'static str, detail: impl Into<String>) -> Harm {
    Harm {
        kind,
        detail: detail.into(),
    }
}

/// The panic message of a failed check.
fn panic_text(e: Box<dyn std::any::Any + Send>) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

/// Everything that must hold after the tool was killed, and the repair by a fresh `status`
/// and `revert --all`. `new` is the pattern of the patch being applied or reverted.
fn after_kill(sub: &mut Subject, new: &str, persistent_before: i64) -> Result<Left, Harm> {
    let pid = sub.t.pid;
    if !sub.t.is_running() {
        let st = sub.t.wait_exit(Duration::from_secs(1));
        return Err(harm(
            "target died",
            format!(
                "exit {:?} signal {:?}",
                st.and_then(|s| s.code()),
                st.and_then(|s| s.signal())
            ),
        ));
    }
    let checked = catch_unwind(AssertUnwindSafe(|| {
        let t = &mut sub.t;
        let mut left = Left::default();
        // The first round runs a fresh iteration on every worker after the kill (a breakpoint
        // left armed, a thread left on injected registers shows here).
        let r = round(t);
        assert_not_traced(pid);
        t.expect("ping", "pong");
        let r2 = round(t);
        let c = counters(t);
        left.persisted = c["persistent"] - persistent_before;
        left.pattern = r2[0].clone();
        let same = r.iter().chain(r2.iter()).all(|p| *p == r2[0]);
        assert_eq!(c["bad"], 0, "the target computed a value that is neither v1 nor v2");
        // The state as the kill left it.
        left.leaked_fd = memfd_descriptors(pid) > 0;
        let st = livepatch(["status", "--pid", &pid.to_string(), "--json"]);
        st.assert_ok();
        let v = st.json();
        for p in v["patches"].as_array().cloned().unwrap_or_default() {
            match p["state"].as_str() {
                Some("orphan") | Some("interrupted") => left.orphan = true,
                Some("applied") => left.applied = true,
                other => panic!("status: patch state {other:?}"),
            }
        }
        left.partial = v["warnings"]
            .as_array()
            .is_some_and(|w| w.iter().any(|w| w.as_str().unwrap_or("").contains("partly switched")));
        if left.partial {
            left.applied = false;
        }
        if !left.partial {
            assert!(
                same && (r2[0] == OLD || r2[0] == new),
                "after the kill the workers show {r:?} then {r2:?}: neither all old ({OLD}) nor all new ({new})"
            );
        }
        // Repair: revert --all (exit 0 also with nothing to revert), then v1 everywhere,
        // nothing left.
        revert(pid, &["--all", "--timeout", "20"]).assert_ok();
        assert_eq!(round(t), vec![OLD; 4], "revert --all did not bring v1 back");
        assert_eq!(counters(t)["bad"], 0);
        let st = status(pid);
        assert!(st.patches.is_empty(), "patches left after revert --all: {:?}", st.raw);
        assert!(memfd_mappings(pid).is_empty(), "a region is left mapped");
        assert_eq!(memfd_descriptors(pid), 0, "a memfd descriptor is left open");
        assert_text_unchanged(&sub.text0, pid);
        assert_debug_registers_clear(pid);
        assert_not_traced(pid);
        // After the repair no mix may persist any more.
        let settled = counters(t)["persistent"];
        round(t);
        round(t);
        assert_eq!(counters(t)["persistent"], settled, "a mix persists after revert --all");
        left.persisted = settled - persistent_before;
        left
    }));
    match checked {
        Ok(left) => Ok(left),
        Err(e) => {
            let msg = panic_text(e);
            if !sub.t.is_running() {
                let st = sub.t.wait_exit(Duration::from_secs(1));
                return Err(harm(
                    "target died",
                    format!("signal {:?} ({msg})", st.and_then(|s| s.signal())),
                ));
            }
            Err(harm("check failed", msg))
        }
    }
}

/// Run one command with `LIVEPATCH_FAULT` set; it must kill itself there.
fn run_with_fault(args: Vec<String>, point: &str) -> Run {
    let started = Instant::now();
    let out = Command::new(livepatch_bin())
        .args(&args)
        .env("LIVEPATCH_FAULT", point)
        .stdin(Stdio::null())
        .output()
        .expect("run livepatch");
    Run {
        args,
        code: out.status.code(),
        signal: out.status.signal(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: started.elapsed(),
    }
}

// ---------------------------------------------------------------------------------------------
// (a) every fault point in turn
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Apply,
    Revert,
}

/// Kill the tool at `point` during `op` with `strategy`; `hold`: a worker sits inside f, so
/// the trap strategy arms its breakpoints (and the wait strategy would wait).
/// Each thread's blocked-signal mask (SigBlk).
fn signal_masks(pid: i32) -> BTreeMap<i32, String> {
    threads(pid).into_iter().filter_map(|tid| Some((tid, task_status_field(pid, tid, "SigBlk:")?))).collect()
}

fn kill_at(point: &str, op: Op, strategy: &str, which: Which, hold: bool) {
    let s = scene();
    let mut sub = start(&s, which);
    let pid = sub.t.pid;
    let bundle = which.bundle(&s);
    if op == Op::Revert {
        apply(pid, bundle, IDLE).assert_ok();
        assert_eq!(round(&mut sub.t), vec![which.new_pattern(); 4]);
    }
    if hold {
        sub.t.expect("hold", "holding");
    }
    let p0 = counters(&mut sub.t)["persistent"];
    let args = match op {
        Op::Apply => apply_args(pid, bundle, &["--strategy", strategy, "--timeout", "20"]),
        Op::Revert => vec![
            "revert".into(),
            "--pid".into(),
            pid.to_string(),
            "--all".into(),
            "--strategy".into(),
            strategy.into(),
            "--timeout".into(),
            "20".into(),
        ],
    };
    let masks0 = signal_masks(pid);
    let run = run_with_fault(args.clone(), point);
    assert_eq!(
        run.signal,
        Some(libc::SIGKILL),
        "LIVEPATCH_FAULT={point} was not reached: {run:?}"
    );
    if point == "syscall" {
        // The injected thread restored itself through rt_sigreturn: its signal mask too.
        let masks = signal_masks(pid);
        for (tid, m) in &masks0 {
            if let Some(now) = masks.get(tid) {
                assert_eq!(now, m, "thread {tid}: signal mask changed by a tool killed in an injected system call");
            }
        }
    }
    let repro = format!(
        "reproduce: start {} (`{}` then{} `livepatch {}` with LIVEPATCH_FAULT={point}, then `round` to the target",
        s.old.display(),
        which.mask(),
        if hold { " `hold`," } else { "" },
        args.join(" ")
    );
    if hold {
        // Let the held call go: breakpoints left behind bite now at the latest.
        let t = &mut sub.t;
        let _ = catch_unwind(AssertUnwindSafe(|| {
            if t.is_running() {
                t.send("release");
                let _ = t.read_line_within(Duration::from_secs(5));
            }
        }));
    }
    match after_kill(&mut sub, which.new_pattern(), p0) {
        Ok(left) => {
            eprintln!("fault {point} ({op:?}, {strategy}, {which:?}, hold {hold}): left {left:?}");
            // Through the gates nothing is ever partly switched, whatever the point.
            assert!(!left.partial, "a kill at {point} left a partly switched patch: {left:?}\n{repro}");
            assert_eq!(left.persisted, 0, "a mix persisted after the kill at {point}: {left:?}\n{repro}");
        }
        Err(h) => panic!(
            "TARGET HARMED by a kill at fault point `{point}` ({op:?}, strategy {strategy}, {which:?}{}): {}: {}\n{repro}\n{}",
            if hold { ", a worker held inside f" } else { "" },
            h.kind,
            h.detail,
            sub.t.context()
        ),
    }
}

macro_rules! fault_tests {
    ($($name:ident: $point:literal, $op:ident, $strategy:literal, $which:ident, $hold:literal;)+) => {
        $(
            #[test]
            fn $name() {
                kill_at($point, Op::$op, $strategy, Which::$which, $hold);
            }
        )+
    };
}

fault_tests! {
    apply_attached_wait: "attached", Apply, "wait", Fg, false;
    apply_attached_trap: "attached", Apply, "trap", Fg, false;
    apply_syscall_wait: "syscall", Apply, "wait", Fg, false;
    apply_injected_wait: "injected", Apply, "wait", Fg, false;
    apply_injected_trap: "injected", Apply, "trap", Fg, false;
    apply_mapped_wait: "mapped", Apply, "wait", Fg, false;
    apply_mapped_trap: "mapped", Apply, "trap", Fg, false;
    apply_stopped_wait: "stopped", Apply, "wait", Fg, false;
    apply_stopped_trap: "stopped", Apply, "trap", Fg, false;
    apply_stopped_trap_five: "stopped", Apply, "trap", All, false;
    apply_jump_wait: "jump", Apply, "wait", Fg, false;
    apply_jump_trap: "jump", Apply, "trap", Fg, false;
    apply_jump_trap_five: "jump", Apply, "trap", All, false;
    apply_committed_wait: "committed", Apply, "wait", Fg, false;
    apply_committed_trap_five: "committed", Apply, "trap", All, false;
    apply_trap_armed_two: "trap-armed", Apply, "trap", Fg, true;
    apply_trap_armed_five: "trap-armed", Apply, "trap", All, true;
    revert_stopped_wait: "revert-stopped", Revert, "wait", Fg, false;
    revert_stopped_trap: "revert-stopped", Revert, "trap", Fg, false;
    revert_jump_wait: "jump", Revert, "wait", Fg, false;
    revert_jump_trap: "jump", Revert, "trap", Fg, false;
    revert_jump_trap_five: "jump", Revert, "trap", All, false;
    revert_committed_trap_five: "committed", Revert, "trap", All, false;
    revert_trap_armed_two: "trap-armed", Revert, "trap", Fg, true;
    revert_trap_armed_five: "trap-armed", Revert, "trap", All, true;
}

/// Held threads (stopped on an entry breakpoint, then kept there while the trap round goes on)
/// used to rest in the signal-delivery-stop of their SIGTRAP: a kill then delivered it. Here a
/// worker is inside f when the update starts, the others reach f's entry and are held; the
/// tool is killed right after the switch decision (`stopped`) once the held call returned.
#[test]
fn apply_stopped_trap_with_held_threads() {
    let s = scene();
    let mut sub = start(&s, Which::Fg);
    let pid = sub.t.pid;
    sub.t.expect("hold", "holding");
    let p0 = counters(&mut sub.t)["persistent"];
    let args = apply_args(pid, &s.fg, &["--strategy", "trap", "--timeout", "20"]);
    let mut child = Command::new(livepatch_bin())
        .args(&args)
        .env("LIVEPATCH_FAULT", "stopped")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The trap round is running; the workers reach f's entry and are held there.
    thread::sleep(Duration::from_millis(500));
    sub.t.send("release");
    let st = wait_child(&mut child, Duration::from_secs(30));
    assert_eq!(st.signal(), Some(libc::SIGKILL), "fault point not reached: {st:?}");
    let _ = sub.t.read_line_within(Duration::from_secs(5)); // "released 1"
    match after_kill(&mut sub, Which::Fg.new_pattern(), p0) {
        Ok(left) => assert_eq!(left.persisted, 0, "{left:?}"),
        Err(h) => panic!("TARGET HARMED by a kill at `stopped` with held threads: {h:?}\n{}", sub.t.context()),
    }
}

fn wait_child(c: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            panic!("livepatch did not end within {limit:?}");
        }
        thread::sleep(Duration::from_millis(5));
    }
}

// ---------------------------------------------------------------------------------------------
// (b) random kills over many cycles
// ---------------------------------------------------------------------------------------------

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[derive(Default, Debug)]
struct Figures {
    cycles: u64,
    kills: u64,
    clean: u64,
    /// Kills that came too late (the command had finished): clean cycles.
    late: u64,
    harmed: u64,
    /// What the kills left (before the repair).
    left_nothing: u64,
    left_orphan: u64,
    left_applied: u64,
    left_partial: u64,
    left_fd: u64,
    /// Kills after which a mix persisted until the repair (the between-jumps window).
    mix_persisted: u64,
    harms: Vec<String>,
}

#[test]
fn random_kills_over_many_cycles() {
    let cycles: u64 = std::env::var("LIVEPATCH_FAULT_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let seed: u64 = std::env::var("LIVEPATCH_FAULT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("fault campaign: {cycles} cycles, LIVEPATCH_FAULT_SEED={seed}");
    let mut rng = Rng(seed);
    let s = scene();
    let mut which = Which::Fg;
    let mut sub = start(&s, which);
    let mut patched = false;
    let mut fig = Figures::default();
    // The window a kill instant is drawn from, per operation (apply, revert), taken from the
    // durations of this run's own commands: it starts at the first clean command's duration,
    // shrinks when a kill comes after the command ended and grows when one lands, so the kills
    // spread over the command as the machine runs it now, busy or quiet.
    let mut window: [Option<Duration>; 2] = [None, None];
    let mut attempted = 0u64;
    let t0 = Instant::now();
    for cycle in 0..cycles {
        fig.cycles += 1;
        let pid = sub.t.pid;
        let op = if patched { Op::Revert } else { Op::Apply };
        if op == Op::Apply {
            which = if rng.chance(25) { Which::All } else { Which::Fg };
            sub.t.expect(which.mask(), which.mask());
        }
        let strategy = if rng.chance(50) { "trap" } else { "wait" };
        let args = match op {
            Op::Apply => apply_args(pid, which.bundle(&s), &["--strategy", strategy, "--timeout", "20"]),
            Op::Revert => {
                let mut a: Vec<String> = vec!["revert".into(), "--pid".into(), pid.to_string()];
                a.extend(["--strategy".into(), strategy.into(), "--timeout".into(), "20".into(), "--json".into()]);
                a
            }
        };
        let slot = if op == Op::Apply { 0 } else { 1 };
        let kill = window[slot].is_some() && rng.chance(60);
        let delay = Duration::from_micros(rng.below(window[slot].unwrap_or_default().as_micros() as u64 + 1));
        if kill {
            attempted += 1;
        }
        let p0 = counters(&mut sub.t)["persistent"];
        let p = spawn_livepatch(&args);
        if kill {
            thread::sleep(delay);
            p.signal(libc::SIGKILL);
        }
        let run = p.finish(TOOL_TIMEOUT);
        let describe = format!(
            "cycle {cycle} (seed {seed}): {op:?} {which:?} strategy {strategy}, SIGKILL after {delay:?}"
        );
        if run.signal == Some(libc::SIGKILL) {
            fig.kills += 1;
            if let Some(w) = window[slot].as_mut() {
                *w = (*w * 21 / 20).min(Duration::from_secs(2));
            }
            match after_kill(&mut sub, which.new_pattern(), p0) {
                Ok(left) => {
                    match (&left.orphan, &left.applied, &left.partial) {
                        (_, _, true) => fig.left_partial += 1,
                        (_, true, _) => fig.left_applied += 1,
                        (true, _, _) => fig.left_orphan += 1,
                        _ => fig.left_nothing += 1,
                    }
                    if left.leaked_fd {
                        fig.left_fd += 1;
                    }
                    if left.persisted > 0 {
                        fig.mix_persisted += 1;
                        fig.harms.push(format!(
                            "{describe}: a mix persisted until the next livepatch command ({left:?})"
                        ));
                    }
                }
                Err(h) => {
                    fig.harmed += 1;
                    fig.harms.push(format!("{describe}: TARGET HARMED: {}: {}", h.kind, h.detail));
                    eprintln!("{describe}: TARGET HARMED: {h:?}\n{}", sub.t.context());
                    sub = start(&s, Which::Fg);
                }
            }
            patched = false; // after_kill reverted everything
            if which == Which::All {
                sub.t.expect("watch 3", "watch 3");
                which = Which::Fg;
            }
            continue;
        }
        if kill {
            fig.late += 1;
            if let Some(w) = window[slot].as_mut() {
                *w = (*w * 4 / 5).max(Duration::from_micros(200));
            }
        }
        fig.clean += 1;
        if run.code != Some(0) {
            fig.harms.push(format!("{describe}: a clean command failed: {:?} {}", run.code, run.stderr.trim()));
            break;
        }
        window[slot].get_or_insert(run.elapsed);
        patched = op == Op::Apply;
        let want = if patched { which.new_pattern() } else { OLD };
        let r = catch_unwind(AssertUnwindSafe(|| round(&mut sub.t)));
        match r {
            Ok(r) if r == vec![want; 4] => {}
            other => {
                fig.harms.push(format!("{describe}: after a clean command the workers show {other:?}, want {want}"));
                break;
            }
        }
        let c = counters(&mut sub.t);
        if c["persistent"] != p0 || c["bad"] != 0 {
            fig.harms.push(format!("{describe}: a clean command left a persistent mix: {c:?}"));
            break;
        }
    }
    // The campaign target must still be healthy and restorable at the end.
    if patched {
        revert(sub.t.pid, &["--all"]).assert_ok();
    }
    let end = catch_unwind(AssertUnwindSafe(|| {
        assert_eq!(round(&mut sub.t), vec![OLD; 4]);
        let c = counters(&mut sub.t);
        assert_eq!(c["bad"], 0);
        assert_not_traced(sub.t.pid);
        assert_text_unchanged(&sub.text0, sub.t.pid);
        assert!(memfd_mappings(sub.t.pid).is_empty());
        c
    }));
    eprintln!(
        "fault campaign figures ({:.1} s, seed {seed}): cycles run {}, kills {} ({} more came after the command ended), clean {}, targets harmed {}; \
         the kills left: nothing {}, an orphan region {}, the patch applied {}, a partly switched patch {} (mix until the next command: {}), a memfd descriptor {}",
        t0.elapsed().as_secs_f64(),
        fig.cycles,
        fig.kills,
        fig.late,
        fig.clean,
        fig.harmed,
        fig.left_nothing,
        fig.left_orphan,
        fig.left_applied,
        fig.left_partial,
        fig.mix_persisted,
        fig.left_fd,
    );
    if let Err(e) = end {
        panic!("the campaign target is not healthy at the end: {}", panic_text(e));
    }
    // No window is left (docs/safety.md): any harm fails.
    assert!(fig.harms.is_empty(), "the fault campaign found {} problem(s):\n{}", fig.harms.len(), fig.harms.join("\n"));
    // Most kills must land inside a command (the window adapts to this run's durations), and
    // there must be many of them.
    assert!(fig.kills * 2 >= attempted, "fewer than half of the {attempted} kills landed inside a command: {fig:?}");
    assert!(fig.kills * 5 >= cycles, "too few kills: {fig:?}");
}

// ---------------------------------------------------------------------------------------------
// 2. events in the target during an update
// ---------------------------------------------------------------------------------------------

/// Start an apply that waits in a trap round (or wait polling) because a worker is held in f.
fn held_update(sub: &mut Subject, bundle: &Bundle, strategy: &str) -> Pending {
    sub.t.expect("hold", "holding");
    let p = spawn_livepatch(apply_args(sub.t.pid, bundle, &["--strategy", strategy, "--timeout", "60"]));
    // Give it the time to map and start waiting (not synchronisation: every check below
    // holds whatever phase the tool is in).
    thread::sleep(Duration::from_millis(600));
    p
}

/// After `churn 0`: wait until the last short-lived thread has ended (the checks below read
/// every thread).
fn churn_settled(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while threads(pid).len() > 1 + 4 + 1 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
}

/// Nothing of the failed update is left in the (still running) target.
#[track_caller]
fn nothing_left(sub: &mut Subject) {
    let pid = sub.t.pid;
    assert_not_traced(pid);
    assert!(memfd_mappings(pid).is_empty(), "a region is left mapped: {:?}", memfd_mappings(pid));
    assert_eq!(memfd_descriptors(pid), 0, "a memfd descriptor is left open");
    assert_text_unchanged(&sub.text0, pid);
    assert_debug_registers_clear(pid);
    assert!(status(pid).patches.is_empty());
}

fn target_exits_during_update(strategy: &str) {
    let s = scene();
    let mut sub = start(&s, Which::Fg);
    let mut p = held_update(&mut sub, &s.fg, strategy);
    assert!(p.is_running(), "apply ended although f stays active");
    sub.t.expect("exit", "exiting");
    sub.t.wait_exit(Duration::from_secs(10)).expect("target did not exit");
    let run = p.finish(Duration::from_secs(15));
    run.assert_code(1).assert_stderr_mentions("exited");
    assert!(run.elapsed < Duration::from_secs(15), "apply hung after the target exited");
}

#[test]
fn target_exits_during_trap_wait() {
    target_exits_during_update("trap");
}

#[test]
fn target_exits_during_wait_polling() {
    target_exits_during_update("wait");
}

fn target_execs_during_update(strategy: &str, which: Which) {
    let s = scene();
    let mut sub = start(&s, which);
    let pid = sub.t.pid;
    let mut p = held_update(&mut sub, which.bundle(&s), strategy);
    assert!(p.is_running(), "apply ended although f stays active");
    sub.t.expect("exec", &format!("ready {pid}"));
    let run = p.finish(Duration::from_secs(20));
    run.assert_code(1);
    assert!(
        run.stderr.contains("exec") || run.stderr.contains("exited"),
        "the error must say that the process exec'd: {}",
        run.stderr
    );
    // The new image: running, not traced, no region, no debug register, plain v1.
    assert_not_traced(pid);
    sub.t.expect("ping", "pong");
    sub.t.expect(which.mask(), which.mask());
    assert_eq!(round(&mut sub.t), vec![OLD; 4]);
    assert!(memfd_mappings(pid).is_empty());
    assert_debug_registers_clear(pid);
    assert!(status(pid).patches.is_empty());
    // Its text is the program's own: the same as a fresh process of the same file.
    let fresh = Target::start(&s.old);
    let theirs = text_snapshot(fresh.pid);
    let ours = text_snapshot(pid);
    let exe_bytes = |t: &TextSnapshot| -> Vec<Vec<u8>> {
        t.regions.iter().filter(|(m, _)| m.path.ends_with(&*s.old.file_name().unwrap().to_string_lossy())).map(|(_, b)| b.clone()).collect()
    };
    assert_eq!(exe_bytes(&ours), exe_bytes(&theirs), "the exec'd image's text differs from the file's");
    // And it can be patched normally.
    apply(pid, which.bundle(&s), IDLE).assert_ok();
    assert_eq!(round(&mut sub.t), vec![which.new_pattern(); 4]);
}

#[test]
fn target_execs_during_trap_wait() {
    target_execs_during_update("trap", Which::Fg);
}

#[test]
fn target_execs_during_trap_wait_five() {
    target_execs_during_update("trap", Which::All);
}

#[test]
fn target_execs_during_wait_polling() {
    target_execs_during_update("wait", Which::Fg);
}

/// The target forks while the update waits with its gates armed: the child (a copy of the
/// address space, with its own copy of the control page) must run its parent's old code, not
/// follow the switch its parent makes later.
fn target_forks_during_update(which: Which) {
    let s = scene();
    let mut sub = start(&s, which);
    let mut p = held_update(&mut sub, which.bundle(&s), "trap");
    assert!(p.is_running(), "apply ended although f stays active");
    let mut forks = Vec::new();
    for _ in 0..5 {
        forks.push(sub.t.ask("fork"));
    }
    sub.t.send("release");
    let run = p.finish(Duration::from_secs(30));
    let released = sub.t.read_line();
    assert!(released.starts_with("released "), "{released}");
    run.assert_ok();
    for f in &forks {
        assert_eq!(
            f, "fork exit=11",
            "a child forked while the update waited was harmed (its parent was v1 then): all {forks:?}\n\
             reproduce: faults target, `{}`, `hold`, then `livepatch apply --strategy trap` and `fork` while it waits",
            which.mask()
        );
    }
    assert_eq!(round(&mut sub.t), vec![which.new_pattern(); 4]);
    assert_eq!(sub.t.ask("fork"), "fork exit=22");
    assert_not_traced(sub.t.pid);
}

#[test]
fn target_forks_during_trap_wait_two() {
    target_forks_during_update(Which::Fg);
}

#[test]
fn target_forks_during_trap_wait_five() {
    target_forks_during_update(Which::All);
}

/// Signals keep coming during apply/revert cycles (both strategies, some with a trap round):
/// the handled SIGUSR1 keeps arriving and no queued real-time signal is lost or added.
#[test]
fn signals_during_updates() {
    let s = scene();
    let mut sub = start(&s, Which::Fg);
    let pid = sub.t.pid;
    let stop = Arc::new(AtomicBool::new(false));
    let sent_rt = Arc::new(AtomicU64::new(0));
    let sent_usr1 = Arc::new(AtomicU64::new(0));
    let sender = {
        let (stop, sent_rt, sent_usr1) = (stop.clone(), sent_rt.clone(), sent_usr1.clone());
        thread::spawn(move || {
            let rt = libc::SIGRTMIN() + 1;
            while !stop.load(Ordering::SeqCst) {
                // SAFETY: plain kill(2) to the target (our child, alive while this runs).
                unsafe {
                    if libc::kill(pid, rt) == 0 {
                        sent_rt.fetch_add(1, Ordering::SeqCst);
                    }
                    if libc::kill(pid, libc::SIGUSR1) == 0 {
                        sent_usr1.fetch_add(1, Ordering::SeqCst);
                    }
                }
                thread::sleep(Duration::from_micros(700));
            }
        })
    };
    for i in 0..12 {
        let strategy = if i % 2 == 0 { "trap" } else { "wait" };
        if i % 3 == 0 {
            // A trap round (or polling) while signals arrive.
            let p = held_update(&mut sub, &s.fg, strategy);
            sub.t.send("release");
            p.finish(Duration::from_secs(30)).assert_ok();
            assert!(sub.t.read_line().starts_with("released "));
        } else {
            apply(pid, &s.fg, &["--strategy", strategy, "--timeout", "20"]).assert_ok();
        }
        assert_eq!(round(&mut sub.t), vec!["22111"; 4]);
        revert(pid, &["--strategy", strategy, "--timeout", "20"]).assert_ok();
        assert_eq!(round(&mut sub.t), vec![OLD; 4]);
    }
    stop.store(true, Ordering::SeqCst);
    sender.join().unwrap();
    // Let the last signals land (a few milliseconds), then compare.
    let deadline = Instant::now() + Duration::from_secs(5);
    let (mut c, want) = (counters(&mut sub.t), sent_rt.load(Ordering::SeqCst) as i64);
    while c["rt"] < want && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
        c = counters(&mut sub.t);
    }
    eprintln!(
        "signals: real-time sent {want} received {}, SIGUSR1 sent {} received {}",
        c["rt"],
        sent_usr1.load(Ordering::SeqCst),
        c["usr1"]
    );
    assert_eq!(c["rt"], want, "queued real-time signals were lost or duplicated during updates");
    assert!(c["usr1"] > 0 && c["usr1"] <= sent_usr1.load(Ordering::SeqCst) as i64);
    assert_eq!(c["persistent"], 0);
    nothing_left(&mut sub);
}

fn proc_state(pid: i32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next()).unwrap_or('?')
}

/// SIGSTOP then SIGCONT while the update waits in a trap round: the update finishes (or fails
/// clearly) in bounded time and the target ends up running, not stopped, not traced.
fn stop_and_continue_during_update(strategy: &str) {
    let s = scene();
    let mut sub = start(&s, Which::Fg);
    let pid = sub.t.pid;
    let p = held_update(&mut sub, &s.fg, strategy);
    sub.t.signal(libc::SIGSTOP);
    thread::sleep(Duration::from_millis(200));
    sub.t.signal(libc::SIGCONT);
    thread::sleep(Duration::from_millis(100));
    sub.t.send("release");
    let run = p.finish(Duration::from_secs(30));
    assert!(sub.t.read_line().starts_with("released "));
    assert_not_traced(pid);
    assert_ne!(proc_state(pid), 'T', "target left stopped");
    sub.t.expect("ping", "pong");
    match run.code {
        Some(0) => assert_eq!(round(&mut sub.t), vec!["22111"; 4]),
        _ => {
            assert!(!run.stderr.trim().is_empty(), "a failure must say why");
            assert_eq!(round(&mut sub.t), vec![OLD; 4]);
            nothing_left(&mut sub);
        }
    }
    assert_eq!(counters(&mut sub.t)["persistent"], 0);
}

#[test]
fn sigstop_sigcont_during_trap_wait() {
    stop_and_continue_during_update("trap");
}

#[test]
fn sigstop_sigcont_during_wait_polling() {
    stop_and_continue_during_update("wait");
}

/// The target is stopped (SIGSTOP) before the update: the update completes or fails clearly
/// in bounded time; the job-control stop is the owner's and stays; SIGCONT resumes it.
#[test]
fn update_of_a_stopped_target() {
    let s = scene();
    let mut sub = start(&s, Which::Fg);
    let pid = sub.t.pid;
    sub.t.signal(libc::SIGSTOP);
    let deadline = Instant::now() + Duration::from_secs(5);
    while proc_state(pid) != 'T' && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(5));
    }
    let run = livepatch(apply_args(pid, &s.fg, &["--timeout", "5"]));
    eprintln!("apply to a stopped target: {:?} {} {}", run.code, run.stderr.trim(), run.elapsed.as_millis());
    assert!(run.elapsed < Duration::from_secs(30));
    assert!(run.code == Some(0) || !run.stderr.trim().is_empty());
    let state = proc_state(pid);
    sub.t.signal(libc::SIGCONT);
    assert_not_traced(pid);
    sub.t.expect("ping", "pong");
    let want = if run.code == Some(0) { "22111" } else { OLD };
    assert_eq!(round(&mut sub.t), vec![want; 4]);
    assert_eq!(state, 'T', "the owner's SIGSTOP was lost: the target ran on after the update");
}

/// Threads are created and end all the time (one every ~300 us) while updates stop the
/// process: every update succeeds, the short-lived threads keep the invariant, none is left
/// traced or stopped.
#[test]
fn thread_churn_during_updates() {
    let s = scene();
    let mut sub = start(&s, Which::Fg);
    let pid = sub.t.pid;
    sub.t.expect("churn 1", "churn 1");
    let spawned0 = counters(&mut sub.t)["spawned"];
    for i in 0..16 {
        let strategy = if i % 2 == 0 { "trap" } else { "wait" };
        apply(pid, &s.fg, &["--strategy", strategy, "--timeout", "20"]).assert_ok();
        assert_eq!(round(&mut sub.t), vec!["22111"; 4]);
        assert_not_traced(pid);
        revert(pid, &["--strategy", strategy, "--timeout", "20"]).assert_ok();
        assert_eq!(round(&mut sub.t), vec![OLD; 4]);
        assert_not_traced(pid);
    }
    sub.t.expect("churn 0", "churn 0");
    churn_settled(pid);
    let c = counters(&mut sub.t);
    assert!(c["spawned"] > spawned0 + 20, "threads were not churning: {c:?}");
    assert_eq!(c["persistent"], 0);
    assert_eq!(c["bad"], 0);
    nothing_left(&mut sub);
}

const TRACER_C: &str = r#"
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ptrace.h>
#include <sys/wait.h>
#include <unistd.h>
/* tracer TID...: PTRACE_SEIZE each thread, print "traced", forward signal stops until stdin
   closes, then exit (the kernel detaches). */
int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        if (ptrace(PTRACE_SEIZE, atoi(argv[i]), 0, 0) != 0) {
            perror("PTRACE_SEIZE");
            return 1;
        }
    }
    printf("traced\n");
    fflush(stdout);
    for (;;) {
        struct pollfd p = { 0, POLLIN, 0 };
        int st;
        pid_t w;
        if (poll(&p, 1, 5) > 0)
            return 0;
        while ((w = waitpid(-1, &st, __WALL | WNOHANG)) > 0) {
            if (WIFSTOPPED(st))
                ptrace(PTRACE_CONT, w, 0, (void *)(long)((st >> 16) ? 0 : WSTOPSIG(st)));
        }
    }
}
"#;

fn tracer_exe() -> PathBuf {
    // Compiled once per test process: tests run in parallel, and rewriting an executable that
    // another test is running fails with ETXTBSY.
    static EXE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    EXE.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("livepatch-faults");
        std::fs::create_dir_all(&dir).unwrap();
        let exe = dir.join(format!("tracer-{}", std::process::id()));
        let src = dir.join(format!("tracer-{}.c", std::process::id()));
        std::fs::write(&src, TRACER_C).unwrap();
        let st = Command::new("cc").arg("-O2").arg("-o").arg(&exe).arg(&src).status().expect("cc");
        assert!(st.success(), "compiling the tracer helper");
        exe
    })
    .clone()
}

/// Someone else (a debugger) traces the target: the update is refused at once, naming the
/// tracer, and the target is untouched; once the debugger is gone, the update works.
fn traced_by_someone_else(all_threads: bool) {
    let s = scene();
    let mut sub = start(&s, Which::Fg);
    let pid = sub.t.pid;
    let victims: Vec<i32> = if all_threads { threads(pid) } else { vec![*worker_threads(pid).last().unwrap()] };
    let mut tracer = Command::new(tracer_exe())
        .args(victims.iter().map(|t| t.to_string()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(tracer.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "traced");
    let tracer_pid = tracer.id().to_string();
    for strategy in ["trap", "wait"] {
        let run = livepatch(apply_args(pid, &s.fg, &["--strategy", strategy, "--timeout", "10"]));
        run.assert_code(1).assert_stderr_mentions("already traced").assert_stderr_mentions(&tracer_pid);
        assert!(run.elapsed < Duration::from_secs(10), "took {:?}", run.elapsed);
        // The threads the tool could attach are detached again.
        for tid in threads(pid).into_iter().filter(|t| !victims.contains(t)) {
            let st = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
            assert!(st.contains("TracerPid:\t0"), "thread {tid} left traced:\n{st}");
        }
        assert_eq!(round(&mut sub.t), vec![OLD; 4]);
    }
    // status reads the process without attaching: it works while someone else traces it.
    assert!(status(pid).patches.is_empty());
    // The debugger goes away.
    drop(tracer.stdin.take());
    tracer.wait().unwrap();
    nothing_left(&mut sub);
    apply(pid, &s.fg, IDLE).assert_ok();
    assert_eq!(round(&mut sub.t), vec!["22111"; 4]);
    assert_eq!(counters(&mut sub.t)["persistent"], 0);
    let _ = std::io::stdout().flush();
}

#[test]
fn traced_by_someone_else_one_thread() {
    traced_by_someone_else(false);
}

#[test]
fn traced_by_someone_else_all_threads() {
    traced_by_someone_else(true);
}

/// In a long-running embedder (the node agent), a refused update must not leave the threads
/// it had already attached traced by the embedder: PTRACE_DETACH only works on a stopped
/// tracee, so attached-but-running threads must be stopped before they are let go.
#[test]
fn traced_by_someone_else_library_leaves_no_thread_attached() {
    let s = scene();
    let mut sub = start(&s, Which::Fg);
    let pid = sub.t.pid;
    let victim = *worker_threads(pid).last().unwrap();
    let mut tracer = Command::new(tracer_exe())
        .arg(victim.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(tracer.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "traced");
    let bundle = livepatch::bundle::Bundle::read(&s.fg.path).unwrap();
    for strategy in [livepatch::watchpoint::Strategy::Wait, livepatch::watchpoint::Strategy::Trap] {
        // The engine runs on a thread of its own: a thread that exits is detached from its
        // tracees by the kernel, so a leak shows as a failure here, not as a hang (the target
        // is also our child: its threads left traced by us could never be reaped).
        let b = bundle.clone();
        let (err, leaked) = thread::spawn(move || {
            let opts = livepatch::apply::Options { strategy, timeout: Duration::from_secs(5), ..Default::default() };
            let err = livepatch::apply::apply(pid, &b, &opts).err().map(|e| e.to_string());
            let me = unsafe { libc::gettid() };
            let leaked: Vec<i32> = threads(pid)
                .into_iter()
                .filter(|tid| {
                    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
                        .unwrap_or_default()
                        .lines()
                        .any(|l| l == format!("TracerPid:\t{me}"))
                })
                .collect();
            (err, leaked)
        })
        .join()
        .unwrap();
        let err = err.expect("apply must be refused");
        assert!(err.contains("already traced"), "{err}");
        assert!(
            leaked.is_empty(),
            "threads {leaked:?} of pid {pid} were still attached to the embedder after the refused apply ({strategy:?})"
        );
        assert_eq!(round(&mut sub.t), vec![OLD; 4]);
    }
    drop(tracer.stdin.take());
    tracer.wait().unwrap();
    nothing_left(&mut sub);
}

/// The engine embedded in a long-running program (the agent) runs on one of its threads, not
/// on its main thread: threads the target creates during the stop are auto-attached to that
/// thread and must be recognised as ours, not as "traced by someone else".
#[test]
fn thread_churn_library_on_a_worker_thread() {
    use livepatch::watchpoint::Strategy;
    let s = scene();
    let mut sub = start(&s, Which::Fg);
    let pid = sub.t.pid;
    sub.t.expect("churn 1", "churn 1");
    let bundle = livepatch::bundle::Bundle::read(&s.fg.path).unwrap();
    for i in 0..8 {
        let strategy = if i % 2 == 0 { Strategy::Trap } else { Strategy::Wait };
        let b = bundle.clone();
        let r = thread::spawn(move || {
            let opts = livepatch::apply::Options { strategy, timeout: Duration::from_secs(20), ..Default::default() };
            livepatch::apply::apply(pid, &b, &opts).map(|_| ()).map_err(|e| e.to_string())
        })
        .join()
        .unwrap();
        assert_eq!(r, Ok(()), "apply ({strategy:?}) on a non-main thread while threads come and go");
        assert_eq!(round(&mut sub.t), vec!["22111"; 4]);
        let r = thread::spawn(move || {
            livepatch::revert::revert(pid, false, strategy, Duration::from_secs(20), Default::default()).map(|_| ()).map_err(|e| e.to_string())
        })
        .join()
        .unwrap();
        assert_eq!(r, Ok(()), "revert ({strategy:?}) on a non-main thread while threads come and go");
        assert_eq!(round(&mut sub.t), vec![OLD; 4]);
    }
    sub.t.expect("churn 0", "churn 0");
    churn_settled(pid);
    assert_eq!(counters(&mut sub.t)["persistent"], 0);
    nothing_left(&mut sub);
}

/// Kills in the middle of a trap wait, measured: a worker holds f active, so apply (trap) leads
/// the entries to their gates and waits, while the other workers keep entering the functions;
/// the tool is killed at a random moment of that wait. The parked threads must see the
/// heartbeat stop and run the old code: any harm fails.
#[test]
fn random_kills_during_trap_wait() {
    let rounds: u64 = std::env::var("LIVEPATCH_FAULT_TRAP_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let s = scene();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut kills, mut harmed, mut harms) = (0u64, 0u64, Vec::new());
    for i in 0..rounds {
        let which = [Which::One, Which::Fg, Which::Four, Which::All][i as usize % 4];
        let mut sub = start(&s, which);
        sub.t.expect("hold", "holding");
        let p0 = counters(&mut sub.t)["persistent"];
        let p = spawn_livepatch(apply_args(sub.t.pid, which.bundle(&s), &["--strategy", "trap", "--timeout", "60"]));
        let delay = Duration::from_millis(50 + rng.below(400));
        thread::sleep(delay);
        p.signal(libc::SIGKILL);
        let run = p.finish(TOOL_TIMEOUT);
        if run.signal != Some(libc::SIGKILL) {
            harms.push(format!("round {i}: apply ended before the kill: {run:?}"));
            continue;
        }
        kills += 1;
        let t = &mut sub.t;
        let _ = catch_unwind(AssertUnwindSafe(|| {
            if t.is_running() {
                t.send("release");
                let _ = t.read_line_within(Duration::from_secs(5));
            }
        }));
        if let Err(h) = after_kill(&mut sub, which.new_pattern(), p0) {
            harmed += 1;
            harms.push(format!(
                "kill {delay:?} into a trap wait ({which:?}, new pattern {}): {}: {}",
                which.new_pattern(),
                h.kind,
                h.detail
            ));
        }
    }
    eprintln!("trap-wait kills: {kills} kills during a trap wait, {harmed} targets harmed");
    assert!(
        harms.is_empty(),
        "kills during a trap wait harmed {harmed} of {kills} targets:\n{}\n\
         reproduce: faults target, `hold` (a worker stays in f), `livepatch apply --strategy trap`, SIGKILL it while it waits, `release`",
        harms.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// 3. a changed contract across sixteen functions
// ---------------------------------------------------------------------------------------------

/// Sixteen functions that call each other with a changed contract (a new caller needs the new
/// callee, and the reverse; `tests/targets/contract`): over many apply/revert cycles through
/// the gates, some with the chain held active so the tool waits with its gates armed while
/// four threads keep entering it, some with the tool SIGKILLed at a random instant, the target
/// itself checks that no call ever ran a mix of old and new functions.
/// `LIVEPATCH_CONTRACT_CYCLES` (default 60) sets the number of cycles.
#[test]
fn contract_never_mixed_over_many_cycles() {
    let cycles: u64 = std::env::var("LIVEPATCH_CONTRACT_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(60);
    let old = compile("contract", "v1", V);
    let bundle = build_bundle(&old, &compile("contract", "v2", V), &[]);
    let inspect = livepatch([std::ffi::OsStr::new("inspect"), bundle.path.as_os_str(), std::ffi::OsStr::new("--json")]);
    inspect.assert_ok();
    let patched: Vec<String> = inspect.json()["functions"].as_array().map(|f| f.iter().filter_map(|f| f["name"].as_str().map(str::to_string)).collect()).unwrap_or_default();
    for i in 0..16 {
        assert!(patched.contains(&format!("c{i}")), "the contract patch does not hold c{i}: {patched:?}");
    }
    let mut t = Target::start(&old);
    t.expect("round", "round 1 1 1 1");
    let text0 = text_snapshot(t.pid);
    let mut rng = Rng(0x5851_f42d_4c95_7f2d);
    let (mut kills, mut held, mut applied) = (0u64, 0u64, false);
    for i in 0..cycles {
        let hold = rng.chance(50);
        let kill = rng.chance(40);
        let version = if applied { 2 } else { 1 };
        if hold {
            t.expect("hold", &format!("v{version} holding"));
            held += 1;
        }
        let args = if applied { vec!["revert".to_string(), "--pid".into(), t.pid.to_string(), "--strategy".into(), "trap".into(), "--timeout".into(), "20".into(), "--json".into()] } else { apply_args(t.pid, &bundle, &["--strategy", "trap", "--timeout", "20"]) };
        let p = spawn_livepatch(args);
        if kill {
            thread::sleep(Duration::from_millis(rng.below(if hold { 400 } else { 60 })));
            p.signal(libc::SIGKILL);
        } else if hold {
            thread::sleep(Duration::from_millis(rng.below(200)));
        }
        if hold {
            t.send("release");
            let released = t.read_line_within(Duration::from_secs(30)).unwrap_or_default();
            assert!(released.contains("released"), "cycle {i}: the held chain did not return: {released:?}");
        }
        let run = p.finish(TOOL_TIMEOUT);
        let killed = run.signal == Some(libc::SIGKILL);
        if killed {
            kills += 1;
        } else {
            assert_eq!(run.code, Some(0), "cycle {i} (hold {hold}): {run:?}");
            applied = !applied;
        }
        let r = round(&mut t);
        let c = counters(&mut t);
        assert_eq!(c["bad"], 0, "cycle {i} (hold {hold}, killed {killed}): a call ran new and old functions together; round {r:?}");
        assert!(r.iter().all(|v| *v == r[0]) && (r[0] == "1" || r[0] == "2"), "cycle {i}: workers disagree after the cycle: {r:?}");
        if killed {
            // The next command repairs whatever the kill left; then start again from v1.
            revert(t.pid, &["--all", "--timeout", "20"]).assert_ok();
            assert_eq!(round(&mut t), vec!["1"; 4], "cycle {i}: revert --all did not bring v1 back");
            assert_text_unchanged(&text0, t.pid);
            applied = false;
        }
    }
    revert(t.pid, &["--all", "--timeout", "20"]).assert_ok();
    assert_eq!(round(&mut t), vec!["1"; 4]);
    let c = counters(&mut t);
    eprintln!("contract campaign: {cycles} cycles, {held} with the chain held, {kills} kills, {} calls checked, {} mixed", c["iters"], c["bad"]);
    assert_eq!(c["bad"], 0);
    assert!(c["iters"] > 1000, "too few calls checked: {c:?}");
    assert_text_unchanged(&text0, t.pid);
    assert_not_traced(t.pid);
}
