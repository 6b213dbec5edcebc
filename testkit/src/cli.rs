//! Running the CLI under test (`livepatch`) and reading its `--json` output.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

/// `--timeout` for updates of functions that are idle: a correct tool needs milliseconds;
/// a wrong "active" verdict should fail the test soon rather than after the default timeout.
pub const IDLE: &[&str] = &["--timeout", "10"];
/// How long one `livepatch` command may run before the test kills it and fails.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

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

/// The `livepatch` binary under test: `CARGO_BIN_EXE_livepatch` from the environment (Cargo
/// sets it when it runs the tests of the `livepatch-cli` package), else `livepatch` in the
/// profile directory the running test executable was built in (`<target>/<profile>/deps/<test>`
/// next to `<target>/<profile>/livepatch`, the layout Cargo builds; Cargo builds the package's
/// binaries before its integration tests).
pub fn livepatch_bin() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("CARGO_BIN_EXE_livepatch") {
            return bin.to_string_lossy().into_owned();
        }
        let exe = std::env::current_exe().expect("the test executable's path");
        let bin: PathBuf = exe
            .ancestors()
            .nth(2)
            .unwrap_or_else(|| panic!("{} is not in <target>/<profile>/deps/", exe.display()))
            .join("livepatch");
        assert!(
            bin.is_file(),
            "no livepatch binary at {} (set CARGO_BIN_EXE_livepatch, or run the tests with cargo test -p livepatch-cli)",
            bin.display()
        );
        bin.display().to_string()
    })
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
    /// The command's arguments, joined by spaces (for failure messages).
    pub fn command_line(&self) -> String {
        self.args.join(" ")
    }

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
