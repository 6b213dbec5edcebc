//! Test support for the live-process tests of the `livepatch` engine.
//!
//! * [`compile`] builds a C target from `tests/targets/<scenario>/<version>.c` with the system
//!   C compiler in one [`Variant`] of the build matrix, cached on disk by content.
//! * [`Target`] runs a compiled target and speaks its line protocol (see
//!   `tests/targets/common/target.h`): `ready <pid>` first, then one answer line per command.
//! * [`livepatch`] / [`spawn_livepatch`] run the CLI under test (`CARGO_BIN_EXE_livepatch`).
//! * [`proc`](self) helpers read the target from outside: `/proc/PID/maps`, `/proc/PID/mem`,
//!   thread lists, tracer state, the debug registers of every thread (ptrace, briefly).
//! * A small ELF reader finds function symbols, the load bias and the GNU build id, so the
//!   tests can check bytes at known addresses without trusting the tool.
//!
//! Nothing here sleeps to synchronise with a target: every wait is for a line of output or a
//! process exit, with a deadline that fails the test instead of hanging it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::hash::{Hash, Hasher};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a test waits for one line from a target before failing.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(20);
/// `--timeout` for updates of functions that are idle: a correct tool needs milliseconds;
/// a wrong "active" verdict should fail the test soon rather than after the default timeout.
pub const IDLE: &[&str] = &["--timeout", "10"];
/// How long one `livepatch` command may run before the test kills it and fails.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// Build matrix
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Opt {
    /// `-O0`
    O0,
    /// `-O2`
    O2,
    /// `-O3 -fomit-frame-pointer`
    O3,
}

/// How a build is made: with the live-patching flags (`-flive-patching=inline-clone`, and the
/// sources' `noipa`), or as distributions and upstream Makefiles make them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Flavour {
    /// The labelled live-patching-friendly matrix (`-flive-patching=inline-clone`, `noipa`).
    LiveFlags,
    /// Debian's `dpkg-buildflags` with `hardening=+all`: `-g -O2 -fstack-protector-strong
    /// -fstack-clash-protection -fcf-protection -D_FORTIFY_SOURCE=2`, PIE, `-z relro -z now`.
    Hardened,
    /// `-Os` with the same hardening.
    Os,
    /// `-O2 -flto` with the same hardening.
    Lto,
    /// Plain `gcc -g -O2` (the compiler's defaults: PIE on Debian).
    PlainO2,
    /// Plain `gcc -g -Os`: no alignment padding between functions, no `endbr64`.
    PlainOs,
}

/// One build of a target: optimisation, PIE or not, linked with `--emit-relocs` or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Variant {
    pub opt: Opt,
    pub pie: bool,
    pub relocs: bool,
    pub flavour: Flavour,
}

impl Variant {
    pub const fn new(opt: Opt, pie: bool, relocs: bool) -> Variant {
        Variant { opt, pie, relocs, flavour: Flavour::LiveFlags }
    }

    const fn real(flavour: Flavour) -> Variant {
        Variant { opt: Opt::O2, pie: true, relocs: false, flavour }
    }

    /// The builds as the world makes them (no live-patching flags, debug info kept); their
    /// bundles are built with `--source-diff`.
    pub const REAL: [Variant; 5] = [
        Variant::real(Flavour::Hardened),
        Variant::real(Flavour::Os),
        Variant::real(Flavour::Lto),
        Variant::real(Flavour::PlainO2),
        Variant::real(Flavour::PlainOs),
    ];

    pub fn is_real(&self) -> bool {
        self.flavour != Flavour::LiveFlags
    }

    /// The typical distribution build: `-O2`, PIE, no relocations kept.
    pub const O2_PIE: Variant = Variant::new(Opt::O2, true, false);
    /// The hardest build for the engine: no frame pointers, absolute addresses, no relocations.
    pub const O3_NOPIE: Variant = Variant::new(Opt::O3, false, false);

    /// All twelve builds.
    pub const ALL: [Variant; 12] = [
        Variant::new(Opt::O0, true, false),
        Variant::new(Opt::O0, true, true),
        Variant::new(Opt::O0, false, false),
        Variant::new(Opt::O0, false, true),
        Variant::new(Opt::O2, true, false),
        Variant::new(Opt::O2, true, true),
        Variant::new(Opt::O2, false, false),
        Variant::new(Opt::O2, false, true),
        Variant::new(Opt::O3, true, false),
        Variant::new(Opt::O3, true, true),
        Variant::new(Opt::O3, false, false),
        Variant::new(Opt::O3, false, true),
    ];

    /// `o2_pie`, `o3_nopie_relocs`, `real_hardened`, ...: the names the test macros use.
    pub fn name(&self) -> String {
        match self.flavour {
            Flavour::LiveFlags => {}
            Flavour::Hardened => return "real_hardened".into(),
            Flavour::Os => return "real_os".into(),
            Flavour::Lto => return "real_o2_lto".into(),
            Flavour::PlainO2 => return "real_o2".into(),
            Flavour::PlainOs => return "real_os_plain".into(),
        }
        let opt = match self.opt {
            Opt::O0 => "o0",
            Opt::O2 => "o2",
            Opt::O3 => "o3",
        };
        format!(
            "{opt}_{}{}",
            if self.pie { "pie" } else { "nopie" },
            if self.relocs { "_relocs" } else { "" }
        )
    }

    pub fn named(name: &str) -> Variant {
        Variant::ALL
            .iter()
            .chain(Variant::REAL.iter())
            .copied()
            .find(|v| v.name() == name)
            .unwrap_or_else(|| panic!("no build variant named {name}"))
    }

    /// The compiler flags of this build (all builds: `-g0 -Wl,--build-id -pthread` and
    /// `-flive-patching=inline-clone`, the documented way to build patchable C with GCC: no
    /// interprocedural optimisation makes a caller depend on a changed callee's body).
    pub fn cflags(&self) -> Vec<&'static str> {
        // What `DEB_BUILD_MAINT_OPTIONS=hardening=+all dpkg-buildflags` gives on amd64
        // (CFLAGS, CPPFLAGS, LDFLAGS), less the build-path mapping.
        const DEBIAN: [&str; 9] = [
            "-fstack-protector-strong",
            "-fstack-clash-protection",
            "-fcf-protection",
            "-Wformat",
            "-Werror=format-security",
            "-D_FORTIFY_SOURCE=2",
            "-fPIE",
            "-pie",
            "-Wl,-z,relro,-z,now",
        ];
        let common = ["-g", "-Wl,--build-id", "-pthread", "-DLIVEPATCH_REAL_BUILD"];
        let real = |opt: &[&'static str], hardened: bool| -> Vec<&'static str> {
            let mut f: Vec<&'static str> = opt.to_vec();
            if hardened {
                f.extend(DEBIAN);
            }
            f.extend(common);
            f
        };
        match self.flavour {
            Flavour::LiveFlags => {}
            Flavour::Hardened => return real(&["-O2"], true),
            Flavour::Os => return real(&["-Os"], true),
            Flavour::Lto => return real(&["-O2", "-flto=auto"], true),
            Flavour::PlainO2 => return real(&["-O2"], false),
            Flavour::PlainOs => return real(&["-Os"], false),
        }
        let mut f = match self.opt {
            Opt::O0 => vec!["-O0"],
            Opt::O2 => vec!["-O2"],
            Opt::O3 => vec!["-O3", "-fomit-frame-pointer"],
        };
        if self.pie {
            f.extend(["-fPIE", "-pie"]);
        } else {
            f.extend(["-fno-pie", "-no-pie"]);
        }
        if self.relocs {
            f.push("-Wl,--emit-relocs");
        }
        f.extend(["-g0", "-Wl,--build-id", "-pthread", "-flive-patching=inline-clone"]);
        f
    }
}

/// Tests over all twelve builds: `matrix_tests!(module_name => body_fn);` makes
/// `module_name::o0_pie`, `module_name::o0_pie_relocs`, ... each calling `body_fn(variant)`.
#[macro_export]
macro_rules! matrix_tests {
    ($module:ident => $body:ident) => {
        $crate::variant_tests!($module => $body: o0_pie, o0_pie_relocs, o0_nopie, o0_nopie_relocs,
            o2_pie, o2_pie_relocs, o2_nopie, o2_nopie_relocs,
            o3_pie, o3_pie_relocs, o3_nopie, o3_nopie_relocs);
    };
}

/// Tests over the five real builds (`real_hardened`, `real_os`, `real_o2_lto`, `real_o2`,
/// `real_os_plain`).
#[macro_export]
macro_rules! real_build_tests {
    ($module:ident => $body:ident) => {
        $crate::variant_tests!($module => $body: real_hardened, real_os, real_o2_lto, real_o2, real_os_plain);
    };
}

/// Tests over chosen builds: `variant_tests!(module_name => body_fn: o2_pie, o3_nopie);`
#[macro_export]
macro_rules! variant_tests {
    ($module:ident => $body:ident: $($variant:ident),+ $(,)?) => {
        mod $module {
            $(
                #[test]
                fn $variant() {
                    super::$body($crate::support::Variant::named(stringify!($variant)))
                }
            )+
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Compiling targets
// ---------------------------------------------------------------------------------------------

/// `tests/targets` in the repository.
pub fn targets_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("tests")
        .join("targets")
}

/// `tests/targets/<scenario>/<version>.c`
pub fn source(scenario: &str, version: &str) -> PathBuf {
    targets_dir().join(scenario).join(format!("{version}.c"))
}

/// Every scenario directory (not `common`), sorted.
pub fn scenarios() -> Vec<String> {
    let mut out: Vec<String> = fs::read_dir(targets_dir())
        .expect("tests/targets")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "common")
        .collect();
    out.sort();
    out
}

/// The versions (`v1`, `v2`, ...) of a scenario, sorted.
pub fn versions(scenario: &str) -> Vec<String> {
    let mut out: Vec<String> = fs::read_dir(targets_dir().join(scenario))
        .expect("scenario dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('v') && n.ends_with(".c"))
        .map(|n| n.trim_end_matches(".c").to_string())
        .collect();
    out.sort();
    out
}

fn compiler() -> String {
    std::env::var("CC").unwrap_or_else(|_| "cc".to_string())
}

fn compiler_identity() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let out = Command::new(compiler())
            .arg("--version")
            .output()
            .unwrap_or_else(|e| panic!("cannot run the C compiler `{}`: {e}", compiler()));
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
}

fn cache_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("livepatch-targets");
    fs::create_dir_all(&dir).expect("create target cache dir");
    dir
}

/// Compile `tests/targets/<scenario>/<version>.c` in `variant` and return the executable.
///
/// Binaries are cached in `CARGO_TARGET_TMPDIR` under a key made of the compiler's identity,
/// the flags and the bytes of the source and the common header, so the test binaries of one
/// run (and later runs) share them. A cached binary is never replaced while it may be running.
pub fn compile(scenario: &str, version: &str, variant: Variant) -> PathBuf {
    static LOCKS: OnceLock<Mutex<HashMap<PathBuf, Arc<Mutex<()>>>>> = OnceLock::new();

    let src = source(scenario, version);
    let header = targets_dir().join("common").join("target.h");
    let src_bytes = fs::read(&src).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    let header_bytes = fs::read(&header).unwrap_or_else(|e| panic!("{}: {e}", header.display()));
    let flags = variant.cflags();

    let mut h = std::collections::hash_map::DefaultHasher::new();
    compiler_identity().hash(&mut h);
    flags.hash(&mut h);
    src_bytes.hash(&mut h);
    header_bytes.hash(&mut h);
    let key = h.finish();
    let out = cache_dir().join(format!(
        "{scenario}-{version}-{}-{key:016x}",
        variant.name()
    ));

    let lock = {
        let mut locks = LOCKS.get_or_init(Default::default).lock().unwrap();
        locks.entry(out.clone()).or_default().clone()
    };
    let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
    if out.exists() {
        return out;
    }

    let tmp = out.with_file_name(format!(
        ".tmp-{}-{}-{}",
        std::process::id(),
        unique(),
        out.file_name().unwrap().to_string_lossy()
    ));
    let result = Command::new(compiler())
        .args(&flags)
        .arg("-o")
        .arg(&tmp)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{}`: {e}", compiler()));
    if !result.status.success() {
        let _ = fs::remove_file(&tmp);
        panic!(
            "compiling {} ({}) failed: {} {}\n{}",
            src.display(),
            variant.name(),
            compiler(),
            flags.join(" "),
            String::from_utf8_lossy(&result.stderr)
        );
    }
    // hard_link never replaces an existing file: another test process may already have put
    // the same binary there and be running it.
    match fs::hard_link(&tmp, &out) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => panic!("caching {}: {e}", out.display()),
    }
    let _ = fs::remove_file(&tmp);
    out
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------------------
// Running a target
// ---------------------------------------------------------------------------------------------

/// A running target program, driven through its stdin/stdout. Killed on drop.
pub struct Target {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
    transcript: Vec<String>,
    exit: Option<ExitStatus>,
    pub pid: i32,
    pub exe: PathBuf,
}

impl Target {
    /// Start `exe` and wait for its `ready <pid>` line.
    pub fn start(exe: &Path) -> Target {
        let mut child = Command::new(exe)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
        let stdout = child.stdout.take().unwrap();
        let mut stderr_pipe = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => {
                        if tx.send(l).is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let pid = child.id() as i32;
        let mut t = Target {
            stdin: child.stdin.take(),
            child,
            lines: rx,
            stderr,
            transcript: Vec::new(),
            exit: None,
            pid,
            exe: exe.to_path_buf(),
        };
        let ready = t.read_line();
        assert_eq!(
            ready,
            format!("ready {pid}"),
            "first line of {}",
            exe.display()
        );
        t
    }

    /// Send one command line.
    pub fn send(&mut self, cmd: &str) {
        self.transcript.push(format!("> {cmd}"));
        let stdin = self.stdin.as_mut().expect("stdin closed");
        if let Err(e) = writeln!(stdin, "{cmd}").and_then(|_| stdin.flush()) {
            panic!(
                "sending {cmd:?} to pid {} failed: {e}\n{}",
                self.pid,
                self.context()
            );
        }
    }

    /// The next output line; fails the test after [`LINE_TIMEOUT`] or if the target exited.
    pub fn read_line(&mut self) -> String {
        match self.read_line_within(LINE_TIMEOUT) {
            Some(l) => l,
            None => panic!(
                "no line from pid {} within {:?}\n{}",
                self.pid,
                LINE_TIMEOUT,
                self.context()
            ),
        }
    }

    /// The next output line within `timeout`, or `None` on timeout. Fails if the target exited.
    pub fn read_line_within(&mut self, timeout: Duration) -> Option<String> {
        match self.lines.recv_timeout(timeout) {
            Ok(l) => {
                self.transcript.push(format!("< {l}"));
                Some(l)
            }
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.wait_exit(Duration::from_secs(5));
                panic!(
                    "target pid {} closed its output (exit: {status:?})\n{}",
                    self.pid,
                    self.context()
                )
            }
        }
    }

    /// Send a command and return its answer line.
    pub fn ask(&mut self, cmd: &str) -> String {
        self.send(cmd);
        self.read_line()
    }

    /// Send a command and check its answer line exactly.
    pub fn expect(&mut self, cmd: &str, want: &str) {
        let got = self.ask(cmd);
        if got != want {
            panic!(
                "pid {} answered {cmd:?} with {got:?}, expected {want:?}\n{}",
                self.pid,
                self.context()
            );
        }
    }

    /// Read the next `n` lines (for commands whose lines come from several threads).
    pub fn read_lines(&mut self, n: usize) -> Vec<String> {
        (0..n).map(|_| self.read_line()).collect()
    }

    /// Whether the process is still running (not exited, not reaped).
    pub fn is_running(&mut self) -> bool {
        if self.exit.is_some() {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(st)) => {
                self.exit = Some(st);
                false
            }
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// Wait for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.is_running() {
                return self.exit;
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Send a signal to the process.
    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid, sig);
        }
    }

    /// Commands and answers so far, and what the target wrote to stderr (for failure messages).
    pub fn context(&self) -> String {
        let mut s = format!(
            "target {} (pid {}) transcript:\n",
            self.exe.display(),
            self.pid
        );
        for l in self
            .transcript
            .iter()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
        {
            let _ = writeln!(s, "  {l}");
        }
        let err = self.stderr.lock().unwrap();
        if !err.is_empty() {
            let _ = writeln!(s, "target stderr:\n{err}");
        }
        s
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Running the tool
// ---------------------------------------------------------------------------------------------

/// The outcome of one `livepatch` command.
#[derive(Debug, Clone)]
pub struct Run {
    pub args: Vec<String>,
    /// The exit code; `None` if the tool was killed by a signal (see `signal`).
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    pub fn describe(&self) -> String {
        format!(
            "livepatch {}\n  exit code: {:?}, signal: {:?}, took {:?}\n  stdout:\n{}\n  stderr:\n{}",
            self.args.join(" "),
            self.code,
            self.signal,
            self.elapsed,
            indent(&self.stdout),
            indent(&self.stderr)
        )
    }

    /// Fail unless the tool exited with `code`.
    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Run {
        if self.code != Some(code) {
            panic!("expected exit code {code}\n{}", self.describe());
        }
        self
    }

    #[track_caller]
    pub fn assert_ok(&self) -> &Run {
        self.assert_code(0)
    }

    /// Fail unless stderr mentions `word` (case-insensitive).
    #[track_caller]
    pub fn assert_stderr_mentions(&self, word: &str) -> &Run {
        if !self.stderr.to_lowercase().contains(&word.to_lowercase()) {
            panic!("expected stderr to mention {word:?}\n{}", self.describe());
        }
        self
    }

    /// stdout parsed as JSON (the whole output, or else its last line that parses).
    #[track_caller]
    pub fn json(&self) -> Value {
        if let Ok(v) = serde_json::from_str::<Value>(self.stdout.trim()) {
            return v;
        }
        for line in self.stdout.lines().rev() {
            if let Ok(v) = serde_json::from_str::<Value>(line.trim()) {
                if v.is_object() {
                    return v;
                }
            }
        }
        panic!("stdout is not JSON\n{}", self.describe())
    }

    /// `apply --json` output: patch id, functions, pause.
    #[track_caller]
    pub fn applied(&self) -> Applied {
        let v = self.json();
        let patch_id = v
            .get("patch_id")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("apply --json: no string patch_id\n{}", self.describe()))
            .to_string();
        let functions = names(v.get("functions").unwrap_or(&Value::Null));
        let pause_us = v
            .get("pause_us")
            .and_then(Value::as_f64)
            .unwrap_or_else(|| panic!("apply --json: no number pause_us\n{}", self.describe()));
        assert!(pause_us >= 0.0, "negative pause\n{}", self.describe());
        Applied {
            patch_id,
            functions,
            pause_us,
            raw: v,
        }
    }

    /// `status --json` output.
    #[track_caller]
    pub fn status(&self) -> Status {
        let v = self.json();
        let patches = v
            .get("patches")
            .and_then(Value::as_array)
            .unwrap_or_else(|| panic!("status --json: no patches array\n{}", self.describe()))
            .iter()
            .map(|p| PatchInfo {
                patch_id: p
                    .get("patch_id")
                    .and_then(Value::as_str)
                    .unwrap_or_else(|| {
                        panic!("status --json: patch without patch_id\n{}", self.describe())
                    })
                    .to_string(),
                functions: names(p.get("functions").unwrap_or(&Value::Null)),
                applied_at: p.get("applied_at").cloned().unwrap_or(Value::Null),
            })
            .collect();
        let stacked = v
            .get("stacked")
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("status --json: no number stacked\n{}", self.describe()));
        Status {
            patches,
            stacked,
            raw: v,
        }
    }
}

fn indent(s: &str) -> String {
    if s.is_empty() {
        return "    (empty)".into();
    }
    s.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[derive(Debug, Clone)]
pub struct Applied {
    pub patch_id: String,
    pub functions: Vec<String>,
    pub pause_us: f64,
    pub raw: Value,
}

#[derive(Debug, Clone)]
pub struct PatchInfo {
    pub patch_id: String,
    pub functions: Vec<String>,
    pub applied_at: Value,
}

#[derive(Debug, Clone)]
pub struct Status {
    pub patches: Vec<PatchInfo>,
    pub stacked: u64,
    pub raw: Value,
}

impl Status {
    pub fn ids(&self) -> Vec<String> {
        self.patches.iter().map(|p| p.patch_id.clone()).collect()
    }
}

/// The names in a JSON array of names (or of objects with a `name`).
pub fn names(v: &Value) -> Vec<String> {
    match v {
        Value::Array(items) => items
            .iter()
            .filter_map(|i| match i {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o.get("name").and_then(Value::as_str).map(str::to_string),
                _ => None,
            })
            .collect(),
        _ => panic!("expected an array of names, got {v}"),
    }
}

pub fn livepatch_bin() -> &'static str {
    env!("CARGO_BIN_EXE_livepatch")
}

/// Run `livepatch ARGS...` to completion (killed and failed after [`TOOL_TIMEOUT`]).
pub fn livepatch<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    spawn_livepatch(args).finish(TOOL_TIMEOUT)
}

/// A `livepatch` command running in the background.
pub struct Pending {
    child: Option<Child>,
    args: Vec<String>,
    started: Instant,
    out: Option<thread::JoinHandle<String>>,
    err: Option<thread::JoinHandle<String>>,
}

/// Start `livepatch ARGS...` without waiting for it.
pub fn spawn_livepatch<I, S>(args: I) -> Pending
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    spawn_livepatch_env(args, &[])
}

/// [`spawn_livepatch`] with extra environment variables.
pub fn spawn_livepatch_env<I, S>(args: I, env: &[(&str, &str)]) -> Pending
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<String> = args
        .into_iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect();
    let started = Instant::now();
    let mut child = Command::new(livepatch_bin())
        .args(&args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", livepatch_bin()));
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let out = thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let err = thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    Pending {
        child: Some(child),
        args,
        started,
        out: Some(out),
        err: Some(err),
    }
}

impl Pending {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Still running?
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().unwrap().try_wait(), Ok(None))
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Wait for the command to end; kill it and fail the test after `timeout`.
    pub fn finish(mut self, timeout: Duration) -> Run {
        let deadline = Instant::now() + timeout;
        let mut child = self.child.take().unwrap();
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) => {}
                Err(e) => panic!("waiting for livepatch: {e}"),
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                let stdout = self.out.take().unwrap().join().unwrap_or_default();
                let stderr = self.err.take().unwrap().join().unwrap_or_default();
                panic!(
                    "livepatch {} did not finish within {timeout:?} (killed)\n  stdout:\n{}\n  stderr:\n{}",
                    self.args.join(" "),
                    indent(&stdout),
                    indent(&stderr)
                );
            }
            thread::sleep(Duration::from_millis(5));
        };
        let elapsed = self.started.elapsed();
        let stdout = self.out.take().unwrap().join().unwrap_or_default();
        let stderr = self.err.take().unwrap().join().unwrap_or_default();
        Run {
            args: std::mem::take(&mut self.args),
            code: status.code(),
            signal: status.signal(),
            stdout,
            stderr,
            elapsed,
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// --- the commands of the CLI contract --------------------------------------------------------

/// A bundle file in its own temporary directory.
pub struct Bundle {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

/// `livepatch build --old OLD --new NEW -o BUNDLE [--function F]...`, which must succeed.
#[track_caller]
pub fn build_bundle(old: &Path, new: &Path, functions: &[&str]) -> Bundle {
    let (run, bundle) = try_build_bundle(old, new, functions);
    run.assert_ok();
    assert!(
        bundle.path.is_file(),
        "build succeeded but wrote no {}",
        bundle.path.display()
    );
    bundle
}

/// The fix between two versions of a scenario as a unified diff (`diff -u`), as a user would
/// hand it to `livepatch build --source-diff`.
pub fn source_diff(scenario: &str, from: &str, to: &str) -> PathBuf {
    let out = cache_dir().join(format!("{scenario}-{from}-{to}.diff"));
    let r = Command::new("diff")
        .arg("-u")
        .arg(source(scenario, from))
        .arg(source(scenario, to))
        .output()
        .expect("cannot run diff (diffutils)");
    assert_eq!(r.status.code(), Some(1), "diff -u of {scenario} {from} {to}: {}", String::from_utf8_lossy(&r.stderr));
    let tmp = out.with_extension(format!("tmp{}-{}", std::process::id(), unique()));
    fs::write(&tmp, &r.stdout).expect("write source diff");
    fs::rename(&tmp, &out).expect("place source diff");
    out
}

/// The bundle for `scenario` from `from` to `to` in build `v`: real builds take the changed set
/// from the source diff (they have debug info and no live-patching flags).
#[track_caller]
pub fn build_scenario_bundle(scenario: &str, from: &str, to: &str, v: Variant) -> Bundle {
    let old = compile(scenario, from, v);
    let new = compile(scenario, to, v);
    if !v.is_real() {
        return build_bundle(&old, &new, &[]);
    }
    let diff = source_diff(scenario, from, to);
    let (run, bundle) = try_build_bundle_args(&old, &new, &["--source-diff".to_string(), diff.display().to_string()]);
    run.assert_ok();
    bundle
}

/// `livepatch build ...` whatever its outcome; the bundle path may not exist.
pub fn try_build_bundle(old: &Path, new: &Path, functions: &[&str]) -> (Run, Bundle) {
    let mut extra = Vec::new();
    for f in functions {
        extra.push("--function".to_string());
        extra.push((*f).to_string());
    }
    try_build_bundle_args(old, new, &extra)
}

/// `livepatch build --old OLD --new NEW -o BUNDLE EXTRA...` whatever its outcome.
pub fn try_build_bundle_args(old: &Path, new: &Path, extra: &[String]) -> (Run, Bundle) {
    let dir = tempfile::Builder::new()
        .prefix("livepatch-test-")
        .tempdir()
        .expect("tempdir");
    let path = dir.path().join("patch.lpatch");
    let mut args: Vec<String> = vec![
        "build".into(),
        "--old".into(),
        old.display().to_string(),
        "--new".into(),
        new.display().to_string(),
        "-o".into(),
        path.display().to_string(),
    ];
    args.extend(extra.iter().cloned());
    let run = livepatch(&args);
    (run, Bundle { path, _dir: dir })
}

/// `livepatch apply --pid PID BUNDLE --json EXTRA...`
pub fn apply(pid: i32, bundle: &Bundle, extra: &[&str]) -> Run {
    livepatch(apply_args(pid, bundle, extra))
}

pub fn apply_args(pid: i32, bundle: &Bundle, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "apply".into(),
        "--pid".into(),
        pid.to_string(),
        bundle.path.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push("--json".into());
    args
}

/// `livepatch revert --pid PID --json EXTRA...`
pub fn revert(pid: i32, extra: &[&str]) -> Run {
    let mut args: Vec<String> = vec!["revert".into(), "--pid".into(), pid.to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push("--json".into());
    livepatch(args)
}

/// `livepatch status --pid PID --json`, which must succeed.
#[track_caller]
pub fn status(pid: i32) -> Status {
    let run = livepatch(["status", "--pid", &pid.to_string(), "--json"]);
    run.assert_ok();
    let st = run.status();
    // Orphan and interrupted regions are listed but not stacked.
    let in_effect = st.raw["patches"].as_array().map_or(0, |p| p.iter().filter(|p| p["state"] == "applied").count());
    assert_eq!(st.stacked as usize, in_effect, "status --json: `stacked` does not count the patches in effect\n{}", run.describe());
    st
}

/// `livepatch diff OLD NEW --json`, which must succeed.
#[track_caller]
pub fn diff(old: &Path, new: &Path) -> Diff {
    let run = livepatch([
        OsStr::new("diff"),
        old.as_os_str(),
        new.as_os_str(),
        OsStr::new("--json"),
    ]);
    run.assert_ok();
    let v = run.json();
    let field = |k: &str| -> Vec<String> {
        names(
            v.get(k)
                .unwrap_or_else(|| panic!("diff --json: no {k}\n{}", run.describe())),
        )
    };
    Diff {
        changed_functions: field("changed_functions"),
        added_functions: field("added_functions"),
        changed_data: field("changed_data"),
        raw: v.clone(),
    }
}

#[derive(Debug, Clone)]
pub struct Diff {
    pub changed_functions: Vec<String>,
    pub added_functions: Vec<String>,
    pub changed_data: Vec<String>,
    pub raw: Value,
}

// ---------------------------------------------------------------------------------------------
// Looking at a process from outside
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    pub offset: u64,
    pub path: String,
}

impl Mapping {
    pub fn executable(&self) -> bool {
        self.perms.as_bytes().get(2) == Some(&b'x')
    }
    pub fn writable(&self) -> bool {
        self.perms.as_bytes().get(1) == Some(&b'w')
    }
}

/// `/proc/PID/maps`
pub fn maps(pid: i32) -> Vec<Mapping> {
    let text = fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/maps: {e}"));
    text.lines()
        .filter_map(|l| {
            let mut it = l.splitn(6, ' ');
            let range = it.next()?;
            let perms = it.next()?.to_string();
            let offset = u64::from_str_radix(it.next()?, 16).ok()?;
            let _dev = it.next()?;
            let _inode = it.next()?;
            let path = it.next().unwrap_or("").trim().to_string();
            let (s, e) = range.split_once('-')?;
            Some(Mapping {
                start: u64::from_str_radix(s, 16).ok()?,
                end: u64::from_str_radix(e, 16).ok()?,
                perms,
                offset,
                path,
            })
        })
        .collect()
}

/// The maps without the parts that move on their own (the main stack): what must be the same
/// after a refused, blocked or failed update.
pub fn stable_maps(pid: i32) -> Vec<Mapping> {
    maps(pid)
        .into_iter()
        .filter(|m| m.path != "[stack]")
        .collect()
}

/// Fail if any mapping of the process is writable and executable at once.
#[track_caller]
pub fn assert_no_wx(pid: i32) {
    for m in maps(pid) {
        assert!(
            !(m.writable() && m.executable()),
            "pid {pid} has a writable and executable mapping: {m:?}"
        );
    }
}

/// Read `len` bytes at `addr` of the process.
pub fn read_mem(pid: i32, addr: u64, len: usize) -> Vec<u8> {
    let f = fs::File::open(format!("/proc/{pid}/mem"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/mem: {e}"));
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, addr)
        .unwrap_or_else(|e| panic!("reading {len} bytes at {addr:#x} of pid {pid}: {e}"));
    buf
}

/// The thread ids of the process.
pub fn threads(pid: i32) -> Vec<i32> {
    let mut out: Vec<i32> = fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/task: {e}"))
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    out.sort();
    out
}

/// A field of a thread's /proc status (`key` with its colon, e.g. `SigBlk:`), trimmed.
pub fn task_status_field(pid: i32, tid: i32, key: &str) -> Option<String> {
    let status = fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix(key)).map(|s| s.trim().to_string())
}

/// Fail if any thread of the process is still traced (the tool must detach when it ends).
#[track_caller]
pub fn assert_not_traced(pid: i32) {
    for tid in threads(pid) {
        let tracer = task_status_field(pid, tid, "TracerPid:").unwrap_or_default();
        assert!(
            tracer.is_empty() || tracer == "0",
            "thread {tid} of pid {pid} is still traced by {tracer}"
        );
        let stat = fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap_or_default();
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next());
        assert!(
            !matches!(state, Some('t') | Some('T')),
            "thread {tid} of pid {pid} is left stopped (state {state:?})"
        );
    }
}

/// The executable text of every file-backed executable mapping (program and libraries; not
/// memfd regions, which are the tool's own).
#[derive(Debug, Clone)]
pub struct TextSnapshot {
    pub regions: Vec<(Mapping, Vec<u8>)>,
}

pub fn text_snapshot(pid: i32) -> TextSnapshot {
    let regions = maps(pid)
        .into_iter()
        .filter(|m| m.executable() && m.path.starts_with('/') && !m.path.starts_with("/memfd:"))
        .map(|m| {
            let bytes = read_mem(pid, m.start, (m.end - m.start) as usize);
            (m, bytes)
        })
        .collect();
    TextSnapshot { regions }
}

/// Every byte of the text in `before` that differs in `after`: (address, before, after).
/// A mapping of `before` that is gone or moved counts as a difference at its start address.
/// Mappings that only `after` has are not text of the program (the tool's regions); the
/// mapping checks of [`assert_untouched`] cover them where they must not exist.
pub fn text_differences(before: &TextSnapshot, after: &TextSnapshot) -> Vec<(u64, u8, u8)> {
    let mut out = Vec::new();
    for (m, bytes) in &before.regions {
        match after
            .regions
            .iter()
            .find(|(n, _)| n.start == m.start && n.end == m.end)
        {
            Some((_, other)) => {
                for (i, (a, b)) in bytes.iter().zip(other.iter()).enumerate() {
                    if a != b {
                        out.push((m.start + i as u64, *a, *b));
                    }
                }
            }
            None => out.push((m.start, 0, 0)),
        }
    }
    out
}

/// Fail unless the program's and libraries' text is byte for byte what it was.
#[track_caller]
pub fn assert_text_unchanged(before: &TextSnapshot, pid: i32) {
    let diffs = text_differences(before, &text_snapshot(pid));
    assert!(
        diffs.is_empty(),
        "text of pid {pid} changed at {} places (a breakpoint or jump left behind?): {}",
        diffs.len(),
        describe_diffs(&diffs)
    );
}

/// Fail unless the text differs from `before` only in the 5 bytes at each of `entries`,
/// each of which now starts with a `jmp rel32` (0xe9) into a mapping that is not the program's.
#[track_caller]
pub fn assert_text_changed_only_at(before: &TextSnapshot, pid: i32, entries: &[(String, u64)]) {
    let after = text_snapshot(pid);
    let diffs = text_differences(before, &after);
    let all_maps = maps(pid);
    // Each entry holds `jmp rel32` into a patch region, or (a function shorter than 5 bytes)
    // `jmp rel8` to a trampoline in inter-function padding that holds the `jmp rel32`.
    let mut sites: Vec<(u64, u64)> = Vec::new();
    // Where the entries' jumps go: the new functions (or their register-preserving thunks).
    let mut dests: Vec<u64> = Vec::new();
    for (name, entry) in entries {
        let b = read_mem(pid, *entry, 5);
        let (long_at, short) = match b[0] {
            0xe9 => (*entry, false),
            0xeb => ((*entry as i64 + 2 + b[1] as i8 as i64) as u64, true),
            _ => panic!("{name} at {entry:#x} does not start with a jump: {b:02x?}"),
        };
        if short {
            sites.push((*entry, *entry + 2));
        }
        sites.push((long_at, long_at + 5));
        let t = read_mem(pid, long_at, 5);
        assert_eq!(t[0], 0xe9, "{name}: the jump at {long_at:#x} (entry {entry:#x}) is not jmp rel32: {t:02x?}");
        let rel = i32::from_le_bytes([t[1], t[2], t[3], t[4]]) as i64;
        let dest = (long_at as i64 + 5 + rel) as u64;
        let m = all_maps
            .iter()
            .find(|m| dest >= m.start && dest < m.end)
            .unwrap_or_else(|| panic!("{name}'s jump goes to {dest:#x}, which is not mapped"));
        assert!(
            m.executable() && !m.writable(),
            "{name}'s jump goes to {dest:#x} in {m:?}, which is not read+execute"
        );
        dests.push(dest);
    }
    // Direct calls and jumps to the old functions may be retargeted to the same new code: a
    // rel32 field after `call`/`jmp`/`jcc` whose destination is where an entry's jump goes.
    let retargeted = |a: u64| -> Option<(u64, u64)> {
        (a.saturating_sub(3)..=a).find_map(|f| {
            let b = read_mem(pid, f - 2, 6);
            let branch = matches!(b[1], 0xe8 | 0xe9) || (b[0] == 0x0f && (0x80..=0x8f).contains(&b[1]));
            let dest = (f as i64 + 4 + i32::from_le_bytes([b[2], b[3], b[4], b[5]]) as i64) as u64;
            (branch && dests.contains(&dest)).then_some((f, f + 4))
        })
    };
    let stray: Vec<(u64, u8, u8)> = diffs
        .iter()
        .copied()
        .filter(|(a, _, _)| !sites.iter().any(|(lo, hi)| *a >= *lo && *a < *hi) && retargeted(*a).is_none())
        .collect();
    assert!(
        stray.is_empty(),
        "text of pid {pid} changed outside the jump sites {entries:x?}: {}",
        describe_diffs(&stray)
    );
}

fn describe_diffs(d: &[(u64, u8, u8)]) -> String {
    let mut s = String::new();
    for (a, b, c) in d.iter().take(20) {
        let _ = write!(s, "\n  {a:#x}: {b:02x} -> {c:02x}");
    }
    if d.len() > 20 {
        let _ = write!(s, "\n  ... and {} more", d.len() - 20);
    }
    s
}

/// The debug registers DR0..DR7 of a thread (DR4/DR5 read as 0), read by attaching briefly
/// with ptrace (PTRACE_SEIZE + PTRACE_INTERRUPT, PEEKUSER, detach).
pub fn debug_registers(tid: i32) -> Result<[u64; 8], String> {
    use std::ptr::null_mut;
    let base = std::mem::offset_of!(libc::user, u_debugreg);
    unsafe {
        if libc::ptrace(
            libc::PTRACE_SEIZE,
            tid,
            null_mut::<libc::c_void>(),
            null_mut::<libc::c_void>(),
        ) != 0
        {
            return Err(format!(
                "PTRACE_SEIZE {tid}: {}",
                std::io::Error::last_os_error()
            ));
        }
        let detach = || {
            libc::ptrace(
                libc::PTRACE_DETACH,
                tid,
                null_mut::<libc::c_void>(),
                null_mut::<libc::c_void>(),
            );
        };
        if libc::ptrace(
            libc::PTRACE_INTERRUPT,
            tid,
            null_mut::<libc::c_void>(),
            null_mut::<libc::c_void>(),
        ) != 0
        {
            let e = std::io::Error::last_os_error();
            detach();
            return Err(format!("PTRACE_INTERRUPT {tid}: {e}"));
        }
        let mut status = 0;
        if libc::waitpid(tid, &mut status, libc::__WALL) != tid {
            let e = std::io::Error::last_os_error();
            detach();
            return Err(format!("waitpid {tid}: {e}"));
        }
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            return Err(format!("thread {tid} exited"));
        }
        let mut regs = [0u64; 8];
        for (i, r) in regs.iter_mut().enumerate() {
            if i == 4 || i == 5 {
                continue;
            }
            *libc::__errno_location() = 0;
            let v = libc::ptrace(
                libc::PTRACE_PEEKUSER,
                tid,
                (base + i * 8) as *mut libc::c_void,
                null_mut::<libc::c_void>(),
            );
            if v == -1 && *libc::__errno_location() != 0 {
                let e = std::io::Error::last_os_error();
                detach();
                return Err(format!("PTRACE_PEEKUSER DR{i} of {tid}: {e}"));
            }
            *r = v as u64;
        }
        detach();
        Ok(regs)
    }
}

/// Fail unless DR7 (the enable bits of the hardware breakpoints) is zero in every thread.
#[track_caller]
pub fn assert_debug_registers_clear(pid: i32) {
    for tid in threads(pid) {
        match debug_registers(tid) {
            Ok(r) => assert_eq!(
                r[7], 0,
                "DR7 of thread {tid} (pid {pid}) is {:#x}: a hardware breakpoint is left (DR0-3 {:x?})",
                r[7], &r[..4]
            ),
            Err(e) => panic!("reading the debug registers of thread {tid} (pid {pid}): {e}"),
        }
    }
}

/// Everything that must hold after the tool gave up or failed: nothing left behind.
#[track_caller]
pub fn assert_untouched(pid: i32, text_before: &TextSnapshot, maps_before: &[Mapping]) {
    assert_not_traced(pid);
    assert_text_unchanged(text_before, pid);
    let now = stable_maps(pid);
    assert_eq!(
        now, maps_before,
        "the mappings of pid {pid} changed (memory left mapped?)"
    );
    assert_debug_registers_clear(pid);
}

// ---------------------------------------------------------------------------------------------
// A small ELF reader (x86-64 little endian): symbols, load bias, build id
// ---------------------------------------------------------------------------------------------

pub struct Elf {
    data: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct Section {
    pub name: String,
    pub kind: u32,
    pub addr: u64,
    pub offset: u64,
    pub size: u64,
    pub link: u32,
}

#[derive(Debug, Clone)]
pub struct Symbol {
    pub name: String,
    pub value: u64,
    pub size: u64,
    /// STT_* (2 = function, 1 = object, 6 = TLS)
    pub kind: u8,
    pub defined: bool,
}

impl Elf {
    pub fn read(path: &Path) -> Elf {
        let data = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            data.len() > 64 && &data[..4] == b"\x7fELF",
            "{} is not ELF",
            path.display()
        );
        assert_eq!(data[4], 2, "{} is not ELF64", path.display());
        Elf { data }
    }

    fn u16(&self, o: u64) -> u16 {
        let o = o as usize;
        u16::from_le_bytes(self.data[o..o + 2].try_into().unwrap())
    }
    fn u32(&self, o: u64) -> u32 {
        let o = o as usize;
        u32::from_le_bytes(self.data[o..o + 4].try_into().unwrap())
    }
    fn u64(&self, o: u64) -> u64 {
        let o = o as usize;
        u64::from_le_bytes(self.data[o..o + 8].try_into().unwrap())
    }
    fn cstr(&self, o: u64) -> String {
        let o = o as usize;
        let end = self.data[o..]
            .iter()
            .position(|&b| b == 0)
            .map(|p| o + p)
            .unwrap_or(self.data.len());
        String::from_utf8_lossy(&self.data[o..end]).into_owned()
    }

    /// ET_DYN: a position-independent executable.
    pub fn is_pie(&self) -> bool {
        self.u16(16) == 3
    }

    pub fn sections(&self) -> Vec<Section> {
        let shoff = self.u64(0x28);
        let shentsize = self.u16(0x3a) as u64;
        let shnum = self.u16(0x3c) as u64;
        let shstrndx = self.u16(0x3e) as u64;
        let raw: Vec<(u32, u32, u64, u64, u64, u32)> = (0..shnum)
            .map(|i| {
                let h = shoff + i * shentsize;
                (
                    self.u32(h),
                    self.u32(h + 4),
                    self.u64(h + 0x10),
                    self.u64(h + 0x18),
                    self.u64(h + 0x20),
                    self.u32(h + 0x28),
                )
            })
            .collect();
        let strtab_off = raw.get(shstrndx as usize).map(|r| r.3).unwrap_or(0);
        raw.iter()
            .map(|&(name, kind, addr, offset, size, link)| Section {
                name: self.cstr(strtab_off + name as u64),
                kind,
                addr,
                offset,
                size,
                link,
            })
            .collect()
    }

    /// The symbols of `.symtab`.
    pub fn symbols(&self) -> Vec<Symbol> {
        let secs = self.sections();
        let Some(symtab) = secs.iter().find(|s| s.kind == 2) else {
            return Vec::new();
        };
        let strtab = &secs[symtab.link as usize];
        (0..symtab.size / 24)
            .map(|i| {
                let e = symtab.offset + i * 24;
                Symbol {
                    name: self.cstr(strtab.offset + self.u32(e) as u64),
                    kind: self.data[e as usize + 4] & 0xf,
                    defined: self.u16(e + 6) != 0,
                    value: self.u64(e + 8),
                    size: self.u64(e + 16),
                }
            })
            .collect()
    }

    /// (address in the file's own address space, size) of a defined function.
    pub fn function(&self, name: &str) -> Option<(u64, u64)> {
        self.symbols()
            .into_iter()
            .find(|s| s.kind == 2 && s.defined && s.name == name)
            .map(|s| (s.value, s.size))
    }

    /// The lowest PT_LOAD address, page-aligned.
    pub fn first_load_vaddr(&self) -> u64 {
        let phoff = self.u64(0x20);
        let phentsize = self.u16(0x36) as u64;
        let phnum = self.u16(0x38) as u64;
        (0..phnum)
            .map(|i| phoff + i * phentsize)
            .filter(|&h| self.u32(h) == 1)
            .map(|h| self.u64(h + 0x10))
            .min()
            .unwrap_or(0)
            & !0xfff
    }

    /// The GNU build id, as lowercase hex.
    pub fn build_id(&self) -> Option<String> {
        let sec = self
            .sections()
            .into_iter()
            .find(|s| s.name == ".note.gnu.build-id")?;
        let namesz = self.u32(sec.offset) as u64;
        let descsz = self.u32(sec.offset + 4) as usize;
        let desc = (sec.offset + 12 + ((namesz + 3) & !3)) as usize;
        Some(
            self.data[desc..desc + descsz]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        )
    }
}

/// The load bias of the process's executable: 0 for non-PIE executables.
pub fn load_bias(pid: i32, exe: &Path) -> u64 {
    let elf = Elf::read(exe);
    if !elf.is_pie() {
        return 0;
    }
    let real = fs::read_link(format!("/proc/{pid}/exe")).expect("/proc/PID/exe");
    let real = real.to_string_lossy();
    let start = maps(pid)
        .into_iter()
        .filter(|m| m.path == real)
        .map(|m| m.start - m.offset)
        .min()
        .unwrap_or_else(|| panic!("no mapping of {real} in pid {pid}"));
    start - elf.first_load_vaddr()
}

/// The live entry addresses of functions of the process's executable (`exe` is its file).
pub fn live_entries(pid: i32, exe: &Path, functions: &[String]) -> Vec<(String, u64)> {
    let elf = Elf::read(exe);
    let bias = load_bias(pid, exe);
    functions
        .iter()
        .map(|f| {
            let (addr, _) = elf
                .function(f)
                .unwrap_or_else(|| panic!("no function {f} in {}", exe.display()));
            (f.clone(), addr + bias)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

/// The threads of `pid` other than the main thread.
pub fn worker_threads(pid: i32) -> Vec<i32> {
    threads(pid).into_iter().filter(|&t| t != pid).collect()
}

/// Watch a background command for `period` while the target must keep answering `cmd` with
/// `want` (proof that it is running its old code and is not held stopped): fails if the
/// command ends during that time.
#[track_caller]
pub fn assert_still_waiting(
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
            p.args.join(" ")
        );
        if Instant::now() >= deadline {
            return;
        }
        // Not synchronisation: this only gives a wrong tool the time to finish too early.
        thread::sleep(Duration::from_millis(100));
    }
}

/// Fail unless the update reports every function of `expected` and never `main`.
#[track_caller]
pub fn assert_functions(reported: &[String], expected: &[&str]) {
    // Optimising builds patch the compiler's clones (`greet.constprop.0`, `f.part.0`) of a
    // function: they are that function.
    let base = |r: &str| r.split('.').next().unwrap_or(r).to_string();
    for f in expected {
        assert!(
            reported.iter().any(|r| r == f || base(r) == *f),
            "{f} missing from the reported functions {reported:?}"
        );
    }
    assert!(
        !reported.iter().any(|r| r == "main"),
        "main reported as patched (it never returns, and it did not change): {reported:?}"
    );
}

/// Snapshot of what must not change when an update is refused, blocked or fails.
pub struct Untouched {
    pub text: TextSnapshot,
    pub maps: Vec<Mapping>,
}

impl Untouched {
    pub fn take(pid: i32) -> Untouched {
        Untouched {
            text: text_snapshot(pid),
            maps: stable_maps(pid),
        }
    }

    #[track_caller]
    pub fn check(&self, pid: i32) {
        assert_untouched(pid, &self.text, &self.maps);
    }
}
