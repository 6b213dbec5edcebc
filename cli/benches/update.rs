//! Figures of an update, measured by the targets themselves (`cargo bench -p livepatch-cli`).
//!
//! * pause: the longest gap each target observes in its own loop during apply/revert cycles,
//!   against the pause the tool reports (1, 8, 64 threads), next to the gap seen with no update
//!   and to the floor (the least any update does while the target is stopped, same run), with
//!   the ratios to that floor;
//! * functions that never return: 8 and 64 threads in a patched loop, every frame switched
//!   at each apply and back at each revert: pause, gap, and the ratio to the floor;
//! * time to patched: from the command's start to the target's first new output;
//! * call overhead: calls per second of a tiny function before and after patching, one run;
//! * many processes: 50 and 200 copies patched by concurrent invocations, total time and the
//!   peak memory of one tool process.
//!
//! Set LIVEPATCH_BENCH_QUICK=1 for fewer repetitions.
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

const TARGET: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <time.h>
#include <unistd.h>
static double now_us(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e6 + t.tv_nsec / 1e3; }
volatile long sink;
static volatile double maxgap[256];
static volatile int reset_flag[256];
__attribute__((noinline)) long tiny(long x) { return x + VERSION; }
__attribute__((noinline)) long idle(long x) { long s = x; for (int i = 0; i < 10; i++) s = s * 3 + VERSION; return s; }
__attribute__((noinline)) long hot(long x) { long s = 0; for (int i = 0; i < 100; i++) s += x ^ i; return s + VERSION; }
__attribute__((noinline)) long rec(long d) { if (d == 0) { usleep(50000); return VERSION; } return rec(d - 1); }
static void *gap_worker(void *a) {
    long i = (long)a; double last = now_us();
    for (;;) {
        for (int k = 0; k < 200; k++) sink += tiny(k);
        double t = now_us();
        if (reset_flag[i]) { reset_flag[i] = 0; maxgap[i] = 0; last = t; continue; }
        if (t - last > maxgap[i]) maxgap[i] = t - last;
        last = t;
        usleep(50);
    }
    return 0;
}
/* Never returns, and is patched (VERSION): its frames are switched at the return from usleep. */
__attribute__((noinline)) void loop_body(long i) {
    double last = now_us();
    for (;;) {
        for (int k = 0; k < 200; k++) sink += k + VERSION;
        double t = now_us();
        if (reset_flag[i]) { reset_flag[i] = 0; maxgap[i] = 0; last = t; continue; }
        if (t - last > maxgap[i]) maxgap[i] = t - last;
        last = t;
        usleep(50);
    }
}
static void *loop_worker(void *a) { loop_body((long)a); return 0; }
static void *hot_worker(void *a) { for (;;) sink += hot((long)a); return 0; }
static void *rec_worker(void *a) { (void)a; for (;;) { long v = rec(30); printf("rec v%ld\n", v); fflush(stdout); } return 0; }
int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "gap";
    int n = argc > 2 ? atoi(argv[2]) : 1;
    pthread_t t;
    if (!strcmp(mode, "gap")) for (long i = 0; i < n; i++) pthread_create(&t, 0, gap_worker, (void *)i);
    if (!strcmp(mode, "hot")) for (long i = 0; i < n; i++) pthread_create(&t, 0, hot_worker, (void *)i);
    if (!strcmp(mode, "loop")) for (long i = 0; i < n; i++) pthread_create(&t, 0, loop_worker, (void *)i);
    if (!strcmp(mode, "rec")) pthread_create(&t, 0, rec_worker, 0);
    printf("ready\n"); fflush(stdout);
    char line[64];
    if (!strcmp(mode, "calls")) {
        for (;;) {
            double t0 = now_us(); long c = 0;
            while (now_us() - t0 < 200000) { for (int k = 0; k < 1000; k++) sink += tiny(k); c += 1000; }
            printf("calls %.0f v%ld\n", c / 0.2, tiny(0)); fflush(stdout);
        }
    }
    if (!strcmp(mode, "idle") || !strcmp(mode, "hot")) {
        for (;;) { usleep(1000); printf("v%ld\n", idle(0) == idle(0) ? tiny(0) : 0); fflush(stdout); }
    }
    while (fgets(line, sizeof line, stdin)) {
        if (!strncmp(line, "reset", 5)) { for (int i = 0; i < n; i++) reset_flag[i] = 1; usleep(2000); printf("ok\n"); }
        else if (!strncmp(line, "gap", 3)) { double m = 0; for (int i = 0; i < n; i++) if (maxgap[i] > m) m = maxgap[i]; printf("%.0f\n", m); }
        fflush(stdout);
    }
    return 0;
}
"#;

struct Target {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl Target {
    fn spawn(exe: &Path, args: &[&str]) -> Target {
        let mut child = Command::new(exe).args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("spawn target");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(|l| l.ok()) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        let t = Target { child, stdin, lines: rx };
        assert_eq!(t.line(), "ready");
        t
    }
    fn pid(&self) -> String {
        self.child.id().to_string()
    }
    fn line(&self) -> String {
        self.lines.recv_timeout(Duration::from_secs(20)).expect("target output")
    }
    fn ask(&mut self, cmd: &str) -> String {
        writeln!(self.stdin.as_mut().unwrap(), "{cmd}").unwrap();
        self.line()
    }
    fn drain(&self) {
        while self.lines.try_recv().is_ok() {}
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tool() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_livepatch"))
}

fn run_tool(args: &[&str]) -> serde_json::Value {
    let out = Command::new(tool()).args(args).output().expect("run livepatch");
    assert!(out.status.success(), "livepatch {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

fn compile(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let src = dir.join("t.c");
    std::fs::write(&src, TARGET).unwrap();
    let mut outs = Vec::new();
    for v in [1, 2] {
        let exe = dir.join(format!("t{v}"));
        let st = Command::new("cc")
            .args(["-O2", "-flive-patching=inline-clone", "-pthread", "-Wl,--build-id", &format!("-DVERSION={v}"), "-o"])
            .arg(&exe)
            .arg(&src)
            .status()
            .unwrap();
        assert!(st.success());
        outs.push(exe);
    }
    let b = dir.join("all.lpatch");
    run_tool(&["build", "--old", outs[0].to_str().unwrap(), "--new", outs[1].to_str().unwrap(), "-o", b.to_str().unwrap(), "--json"]);
    (outs.remove(0), outs.remove(0), b)
}

fn stats(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[v.len() / 2], *v.last().unwrap())
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let quick = std::env::var("LIVEPATCH_BENCH_QUICK").is_ok();
    let cycles = if quick { 5 } else { 20 };
    let dir = tempdir();
    let (v1, _v2, bundle) = compile(&dir);
    let b = bundle.to_str().unwrap();
    println!("machine: {} cores; {cycles} apply/revert cycles per row\n", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0));

    // The floor: what any live update must do at the least while the target is stopped (seize
    // and interrupt every thread, read each one's registers and the top of its stack, write 5
    // bytes, let every thread go), measured on the same target in the same run.
    let tiny_svma = symbol_addr(&v1, "tiny");
    println!("| threads | target gap, no update (median / worst) | floor: pause / target gap (median) | livepatch: pause (median / worst) | livepatch: target gap (median / worst) | pause / floor | gap / floor |");
    println!("|---|---|---|---|---|---|---|");
    let mut floors = std::collections::BTreeMap::new();
    let mut json = serde_json::json!({ "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), "cycles": cycles, "pause": [], "frames": [] });
    for n in [1usize, 8, 64] {
        let mut t = Target::spawn(&v1, &["gap", &n.to_string()]);
        let (mut base, mut gaps, mut pauses, mut fpause, mut fgap) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let at = load_bias(t.child.id() as i32, &v1) + tiny_svma;
        for _ in 0..cycles {
            t.ask("reset");
            std::thread::sleep(Duration::from_millis(20));
            base.push(t.ask("gap").parse::<f64>().unwrap());
            t.ask("reset");
            fpause.push(floor_probe(t.child.id() as i32, at).as_secs_f64() * 1e6);
            fgap.push(t.ask("gap").parse::<f64>().unwrap());
            for op in ["apply", "revert"] {
                t.ask("reset");
                let r = if op == "apply" { run_tool(&["apply", "--pid", &t.pid(), b, "--json"]) } else { run_tool(&["revert", "--pid", &t.pid(), "--json"]) };
                pauses.push(r["pause_us"].as_f64().unwrap_or(f64::NAN));
                gaps.push(t.ask("gap").parse::<f64>().unwrap());
            }
        }
        let (bm, bw) = stats(&mut base);
        let (gm, gw) = stats(&mut gaps);
        let (pm, pw) = stats(&mut pauses);
        let (fpm, _) = stats(&mut fpause);
        let (fgm, _) = stats(&mut fgap);
        floors.insert(n, fpm);
        json["pause"].as_array_mut().unwrap().push(serde_json::json!({
            "threads": n, "no_update_gap_us": [bm, bw], "floor_pause_us": fpm, "floor_gap_us": fgm,
            "pause_us": [pm, pw], "gap_us": [gm, gw], "pause_over_floor": pm / fpm, "gap_over_floor": gm / fgm,
        }));
        println!(
            "| {n} | {bm:.0} / {bw:.0} us | {fpm:.0} / {fgm:.0} us | {pm:.0} / {pw:.0} us | {gm:.0} / {gw:.0} us | {:.2} | {:.2} |",
            pm / fpm,
            gm / fgm
        );
    }

    // Functions that never return: every thread sits in loop_body(), whose frames each apply
    // switches to the new code (and each revert back).
    println!("\n| threads in a loop that never returns | frames switched per update | livepatch: pause (median / worst) | livepatch: target gap (median / worst) | pause / floor (same thread count, above) |");
    println!("|---|---|---|---|---|");
    for n in [8usize, 64] {
        let mut t = Target::spawn(&v1, &["loop", &n.to_string()]);
        let (mut gaps, mut pauses, mut frames) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..cycles {
            for op in ["apply", "revert"] {
                t.ask("reset");
                let r = if op == "apply" { run_tool(&["apply", "--pid", &t.pid(), b, "--json"]) } else { run_tool(&["revert", "--pid", &t.pid(), "--json"]) };
                pauses.push(r["pause_us"].as_f64().unwrap_or(f64::NAN));
                frames.push(r["switched_frames"].as_array().map(|a| a.len()).unwrap_or(0) as f64);
                gaps.push(t.ask("gap").parse::<f64>().unwrap());
            }
        }
        let (gm, gw) = stats(&mut gaps);
        let (pm, pw) = stats(&mut pauses);
        let (fm, _) = stats(&mut frames);
        let floor = floors.get(&n).copied().unwrap_or(f64::NAN);
        json["frames"].as_array_mut().unwrap().push(serde_json::json!({ "threads": n, "frames_switched": fm, "pause_us": [pm, pw], "gap_us": [gm, gw], "pause_over_floor": pm / floor }));
        println!("| {n} | {fm:.0} | {pm:.0} / {pw:.0} us | {gm:.0} / {gw:.0} us | {:.2} |", pm / floor);
    }

    println!("\n| time to patched (command start to first new output) | wait | trap |");
    println!("|---|---|---|");
    for (name, mode, arg) in [("idle function", "idle", "1"), ("hot function, 8 threads", "hot", "8"), ("recursive, sleeping inside itself", "rec", "1")] {
        let mut cells = Vec::new();
        for strategy in ["wait", "trap"] {
            let t = Target::spawn(&v1, &[mode, arg]);
            t.line();
            let start = Instant::now();
            let out = Command::new(tool()).args(["apply", "--pid", &t.pid(), b, "--strategy", strategy, "--timeout", "5"]).output().unwrap();
            if !out.status.success() {
                cells.push(format!("blocked (exit {}) after {:.0} ms", out.status.code().unwrap_or(-1), start.elapsed().as_secs_f64() * 1e3));
                continue;
            }
            t.drain();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let l = t.line();
                if l.contains("v2") {
                    break;
                }
                assert!(Instant::now() < deadline, "no new output");
            }
            cells.push(format!("{:.1} ms", start.elapsed().as_secs_f64() * 1e3));
        }
        println!("| {name} | {} | {} |", cells[0], cells[1]);
    }

    let t = Target::spawn(&v1, &["calls"]);
    let mut before = Vec::new();
    for _ in 0..5 {
        before.push(t.line());
    }
    run_tool(&["apply", "--pid", &t.pid(), b, "--json"]);
    t.drain();
    let mut after = Vec::new();
    while after.len() < 5 {
        let l = t.line();
        if l.contains("v2") {
            after.push(l);
        }
    }
    let rate = |v: &[String]| -> f64 {
        let mut r: Vec<f64> = v.iter().map(|l| l.split_whitespace().nth(1).unwrap().parse().unwrap()).collect();
        stats(&mut r).0
    };
    let (rb, ra) = (rate(&before[1..]), rate(&after[1..]));
    println!("\ncall overhead: {rb:.3e} calls/s before, {ra:.3e} after patching: ratio {:.3} (the direct calls lead straight to the new code)", ra / rb);
    json["calls_per_s"] = serde_json::json!({ "before": rb, "after": ra, "ratio": ra / rb });

    json["processes"] = serde_json::json!([]);
    println!("\n| processes | total time (concurrent invocations, 4 at a time) | peak RSS of one livepatch process |");
    println!("|---|---|---|");
    for n in [50usize, if quick { 50 } else { 200 }] {
        let targets: Vec<Target> = (0..n).map(|_| Target::spawn(&v1, &["idle", "1"])).collect();
        let start = Instant::now();
        let mut peak_kb = 0i64;
        for chunk in targets.chunks(4) {
            let kids: Vec<Child> = chunk
                .iter()
                .map(|t| Command::new(tool()).args(["apply", "--pid", &t.pid(), b, "--json"]).stdout(Stdio::piped()).spawn().unwrap())
                .collect();
            for k in kids {
                let out = k.wait_with_output().unwrap();
                assert!(out.status.success(), "apply failed");
                // The tool's own high-water mark: wait4's ru_maxrss would count this (large)
                // bench process, whose resident size the kernel records at the child's exec.
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
                peak_kb = peak_kb.max(v["peak_rss_kib"].as_i64().expect("apply --json reports peak_rss_kib"));
            }
        }
        let total = start.elapsed();
        for t in &targets {
            t.drain();
        }
        for t in &targets {
            loop {
                if t.line().contains("v2") {
                    break;
                }
            }
        }
        println!("| {n} | {:.2} s ({:.1} ms per process) | {:.1} MiB |", total.as_secs_f64(), total.as_secs_f64() * 1e3 / n as f64, peak_kb as f64 / 1024.0);
        if let Some(rows) = json["processes"].as_array_mut() {
            rows.push(serde_json::json!({ "processes": n, "total_s": total.as_secs_f64(), "peak_rss_mib": peak_kb as f64 / 1024.0 }));
        }
    }
    // One invocation for every process, patched concurrently (one thread per process at a
    // time, as the node agent runs the engine): time and the tool's own peak memory.
    let n = if quick { 50 } else { 200 };
    let targets: Vec<Target> = (0..n).map(|_| Target::spawn(&v1, &["idle", "1"])).collect();
    let mut args: Vec<String> = vec!["apply".into()];
    for t in &targets {
        args.push("--pid".into());
        args.push(t.pid());
    }
    args.extend([b.to_string(), "--json".into()]);
    let start = Instant::now();
    let out = Command::new(tool()).args(&args).stdout(Stdio::piped()).output().unwrap();
    let total = start.elapsed();
    assert!(out.status.success(), "apply to {n} processes failed");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let peak = v["peak_rss_kib"].as_f64().unwrap_or(f64::NAN) / 1024.0;
    println!("| {n}, one invocation (`--pid` x {n}, one thread per CPU) | {:.2} s ({:.1} ms per process) | {peak:.1} MiB |", total.as_secs_f64(), total.as_secs_f64() * 1e3 / n as f64);
    json["one_invocation"] = serde_json::json!({ "processes": n, "total_s": total.as_secs_f64(), "peak_rss_mib": peak });
    drop(targets);
    // The same with quiet processes (their output to /dev/null, as idle servers): the rows
    // above share the 2 cores with 200 targets that each wake every millisecond and a bench
    // that reads every line they write.
    let quiet: Vec<Child> = (0..n).map(|_| Command::new(&v1).args(["idle", "1"]).stdin(Stdio::null()).stdout(Stdio::null()).spawn().unwrap()).collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut args: Vec<String> = vec!["apply".into()];
    for c in &quiet {
        args.push("--pid".into());
        args.push(c.id().to_string());
    }
    args.extend([b.to_string(), "--json".into()]);
    let start = Instant::now();
    let out = Command::new(tool()).args(&args).stdout(Stdio::piped()).output().unwrap();
    let total = start.elapsed();
    assert!(out.status.success(), "apply to {n} quiet processes failed");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let peak = v["peak_rss_kib"].as_f64().unwrap_or(f64::NAN) / 1024.0;
    println!("| {n} quiet (output to /dev/null), one invocation | {:.2} s ({:.1} ms per process) | {peak:.1} MiB |", total.as_secs_f64(), total.as_secs_f64() * 1e3 / n as f64);
    json["one_invocation_quiet"] = serde_json::json!({ "processes": n, "total_s": total.as_secs_f64(), "peak_rss_mib": peak });
    for mut c in quiet {
        let _ = c.kill();
        let _ = c.wait();
    }
    write_results(&json, quick);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The results as JSON and the pause plot as SVG, in `docs/figures/` (`update.json`,
/// `pause.svg`; `-quick` variants for a quick run), or in `LIVEPATCH_BENCH_OUT`.
fn write_results(json: &serde_json::Value, quick: bool) {
    let dir = std::env::var_os("LIVEPATCH_BENCH_OUT").map(PathBuf::from).unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/figures"));
    std::fs::create_dir_all(&dir).unwrap();
    let suffix = if quick { "-quick" } else { "" };
    let (j, svg) = (dir.join(format!("update{suffix}.json")), dir.join(format!("pause{suffix}.svg")));
    std::fs::write(&j, serde_json::to_string_pretty(json).unwrap()).unwrap();
    std::fs::write(&svg, pause_svg(json)).unwrap();
    println!("\nresults: {} and {}", j.display(), svg.display());
}

/// Pause against thread count, log-log: the tool's median pause (and with every frame switched),
/// the floor of the same run.
fn pause_svg(json: &serde_json::Value) -> String {
    let (w, h, l, r, t, b) = (640.0, 400.0, 70.0, 180.0, 30.0, 50.0);
    let rows = json["pause"].as_array().cloned().unwrap_or_default();
    let series = |key: &str, rows: &[serde_json::Value]| -> Vec<(f64, f64)> {
        rows.iter().filter_map(|r| Some((r["threads"].as_f64()?, if key == "floor" { r["floor_pause_us"].as_f64()? } else { r["pause_us"][0].as_f64()? }))).collect()
    };
    let tool = series("tool", &rows);
    let floor = series("floor", &rows);
    let frames = series("tool", json["frames"].as_array().map(|v| v.as_slice()).unwrap_or(&[]));
    let all: Vec<f64> = tool.iter().chain(&floor).chain(&frames).map(|p| p.1).filter(|v| *v > 0.0).collect();
    let lo = all.iter().cloned().fold(f64::INFINITY, f64::min).log10().floor();
    let hi = all.iter().cloned().fold(0.0, f64::max).log10().ceil().max(lo + 1.0);
    let x = |n: f64| l + (n.log2() / 6.0) * (w - l - r);
    let y = |v: f64| t + (hi - v.log10()) / (hi - lo) * (h - t - b);
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n");
    s += &format!("<text x=\"{}\" y=\"18\" text-anchor=\"middle\">pause while the target is stopped (median, log scale)</text>\n", (l + w - r) / 2.0);
    let mut d = lo;
    while d <= hi {
        let v = 10f64.powf(d);
        s += &format!("<line x1=\"{l}\" x2=\"{}\" y1=\"{y0:.1}\" y2=\"{y0:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{} us</text>\n", w - r, l - 6.0, y(v) + 4.0, v, y0 = y(v));
        d += 1.0;
    }
    for n in [1.0, 8.0, 64.0] {
        s += &format!("<line x1=\"{x0:.1}\" x2=\"{x0:.1}\" y1=\"{t}\" y2=\"{}\" stroke=\"#eee\"/><text x=\"{x0:.1}\" y=\"{}\" text-anchor=\"middle\">{n} thread{}</text>\n", h - b, h - b + 18.0, if n > 1.0 { "s" } else { "" }, x0 = x(n));
    }
    for (pts, color, label, dash) in [(&floor, "#888", "floor (same run)", "4 3"), (&tool, "#c33", "livepatch", ""), (&frames, "#36c", "livepatch, frames switched", "")] {
        if pts.is_empty() {
            continue;
        }
        let path: Vec<String> = pts.iter().map(|(n, v)| format!("{:.1},{:.1}", x(*n), y(*v))).collect();
        s += &format!("<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" stroke-dasharray=\"{dash}\" points=\"{}\"/>\n", path.join(" "));
        for (n, v) in pts.iter() {
            s += &format!("<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"/>\n", x(*n), y(*v));
        }
        let (n, v) = pts[pts.len() - 1];
        s += &format!("<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{color}\">{label}</text>\n", x(n) + 8.0, y(v) + 4.0);
    }
    s += "</svg>\n";
    s
}

/// Address of a function in the file (its SVMA).
fn symbol_addr(exe: &Path, name: &str) -> u64 {
    let elf = livepatch::elf::ElfFile::open(exe).expect("read the target");
    let addr = elf.functions().find(|f| f.name == name).map(|f| f.addr);
    addr.unwrap_or_else(|| panic!("no {name} in {}", exe.display()))
}

/// Load bias of `exe` in process `pid` (PIE: where its offset-0 mapping starts).
fn load_bias(pid: i32, exe: &Path) -> u64 {
    let exe = std::fs::canonicalize(exe).unwrap();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    for l in maps.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() >= 6 && f[2] == "00000000" && Path::new(f[5]) == exe {
            return u64::from_str_radix(f[0].split('-').next().unwrap(), 16).unwrap();
        }
    }
    panic!("{} not mapped in {pid}", exe.display());
}

/// The least a live update does while the target is stopped: seize and interrupt every thread,
/// collect the stops, read each thread's registers and the top of its stack, write 5 bytes (the
/// ones already there) at `at`, detach. Returns the time from the first seize to the last detach.
fn floor_probe(pid: i32, at: u64) -> Duration {
    use std::os::unix::fs::FileExt;
    let tids: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect();
    let mem = std::fs::OpenOptions::new().read(true).write(true).open(format!("/proc/{pid}/mem")).unwrap();
    let t0 = Instant::now();
    // SAFETY: plain ptrace requests on threads of our own child, with null or valid pointers.
    unsafe {
        for &t in &tids {
            assert_eq!(libc::ptrace(libc::PTRACE_SEIZE, t, 0usize, 0usize), 0, "seize {t}");
        }
        for &t in &tids {
            libc::ptrace(libc::PTRACE_INTERRUPT, t, 0usize, 0usize);
        }
        for &t in &tids {
            let mut st = 0;
            libc::waitpid(t, &mut st, libc::__WALL);
        }
    }
    let mut top = [0u8; 64];
    for &t in &tids {
        // SAFETY: user_regs_struct is plain data; PTRACE_GETREGS fills it for a stopped tracee.
        let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
        unsafe { libc::ptrace(libc::PTRACE_GETREGS, t, 0usize, &mut regs as *mut _ as usize) };
        let _ = mem.read_at(&mut top, regs.rsp);
    }
    let mut entry = [0u8; 5];
    mem.read_at(&mut entry, at).unwrap();
    mem.write_at(&entry, at).unwrap();
    for &t in &tids {
        // SAFETY: detaching a thread we seized, letting it go with no signal.
        unsafe { libc::ptrace(libc::PTRACE_DETACH, t, 0usize, 0usize) };
    }
    t0.elapsed()
}

fn tempdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("livepatch-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
