//! A running target and its line protocol (`tests/targets/common/target.h`): the target prints
//! `ready <pid>` first, then answers each command line with one line (or, for commands whose
//! lines come from several threads, a known number of lines).

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long a test waits for one line from a target before failing.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(20);

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

