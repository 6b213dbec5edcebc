//! Attaching to a process's threads, stopping them and waiting for their stops: the
//! [`Stopped`] session and the events it reports (signal stops, new threads, exits, exec,
//! forks while they are followed).
//!
//! [`Stopped`] is the side effect "these threads are stopped": dropping it detaches every
//! thread, passing back any signal that arrived meanwhile, so an error path can never leave
//! the target stopped. Every call must come from the OS thread that attached (a ptrace rule);
//! callers keep a session on one thread.
use crate::error::{Error, Result};
use crate::process::Process;
use nix::errno::Errno;
use nix::sys::ptrace::{self, Options};
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

pub type Regs = libc::user_regs_struct;

#[derive(Debug, Default, Clone)]
struct Thread {
    stopped: bool,
    /// Its last stop was a SIGTRAP signal stop (a breakpoint or single-step).
    trapped: bool,
    /// Signals that arrived while we held the thread, oldest first; delivered again when it
    /// is resumed or detached. Raw numbers: real-time signals have no `Signal` name. More than
    /// one can arrive while we run it (an injected call, a single-step), and none may be lost.
    pending: Vec<i32>,
    /// The signal of the signal-delivery-stop the thread is in; None in any other stop. Only
    /// there does PTRACE_CONT/DETACH deliver a signal (elsewhere the kernel ignores it).
    stop_sig: Option<i32>,
}

/// A set of threads of one process, attached and stopped.
pub struct Stopped {
    pub pid: i32,
    threads: BTreeMap<i32, Thread>,
    since: Instant,
    /// Children the target forked while we followed forks (see [`Stopped::follow_forks`]),
    /// whose first stop we have seen.
    fork_stops: BTreeSet<i32>,
    /// What to do with each forked child before it is let go (see [`Stopped::follow_forks`]).
    on_fork: Option<OnFork>,
}

/// Called with a child the target forked (its own copy of the target's memory; not for a
/// vfork child, which shares the parent's), stopped and traced by us; it is detached after.
pub type OnFork = Box<dyn FnMut(i32) + Send>;

fn pid(t: i32) -> Pid {
    Pid::from_raw(t)
}

// TRACESYSGOOD: the syscall stops of injected code are told apart from SIGTRAPs.
const OPTIONS: Options = Options::PTRACE_O_TRACECLONE.union(Options::PTRACE_O_TRACEEXEC).union(Options::PTRACE_O_TRACESYSGOOD);

impl Stopped {
    fn new(pid: i32) -> Stopped {
        Stopped { pid, threads: BTreeMap::new(), since: Instant::now(), fork_stops: BTreeSet::new(), on_fork: None }
    }

    /// Stop every thread of the process, including threads created while stopping.
    pub(crate) fn all(proc: &Process, timeout: Duration) -> Result<Stopped> {
        let mut s = Stopped::new(proc.pid);
        let deadline = Instant::now() + timeout;
        let mut first = true;
        loop {
            // Attach first (the threads keep running), then interrupt them all in one sweep:
            // the pause starts with the first interrupt, not with the first attach.
            let mut fresh = Vec::new();
            for tid in proc.threads()? {
                if !s.threads.contains_key(&tid) && s.attach(tid)? {
                    fresh.push(tid);
                }
            }
            if first {
                s.since = Instant::now();
                first = false;
            }
            for &tid in &fresh {
                match ptrace::interrupt(pid(tid)) {
                    Ok(()) | Err(Errno::ESRCH) => {}
                    Err(e) => return Err(Error::ptrace("interrupt", tid, e)),
                }
            }
            s.wait_stopped(deadline)?;
            if fresh.is_empty() {
                break;
            }
        }
        if s.threads.is_empty() {
            return Err(Error::Process { pid: proc.pid, msg: "exited during the operation".into() });
        }
        Ok(s)
    }

    /// Stop one thread (for injecting a syscall while the others keep running).
    pub(crate) fn one(proc: &Process, tid: i32, timeout: Duration) -> Result<Stopped> {
        let mut s = Stopped::new(proc.pid);
        if !s.seize(tid)? {
            return Err(Error::Process { pid: proc.pid, msg: format!("thread {tid} exited") });
        }
        s.wait_stopped(Instant::now() + timeout)?;
        if !s.threads.contains_key(&tid) {
            return Err(Error::Process { pid: proc.pid, msg: format!("thread {tid} exited") });
        }
        s.since = Instant::now();
        Ok(s)
    }

    /// When stopping began (the start of the target's pause).
    pub(crate) fn since(&self) -> Instant {
        self.since
    }

    pub(crate) fn tids(&self) -> Vec<i32> {
        self.threads.keys().copied().collect()
    }

    /// Attach without stopping; false when the thread is already gone.
    fn attach(&mut self, tid: i32) -> Result<bool> {
        match ptrace::seize(pid(tid), OPTIONS) {
            Ok(()) => {}
            Err(Errno::ESRCH) => return Ok(false),
            Err(Errno::EPERM) if traced_by_us(tid) => {
                // Auto-attached through PTRACE_O_TRACECLONE; its stop is on the way.
                self.threads.entry(tid).or_default();
                return Ok(true);
            }
            Err(e) => {
                if e == Errno::EPERM {
                    if let Some(tracer) = tracer_of(tid).filter(|t| *t != 0) {
                        return Err(Error::Process {
                            pid: self.pid,
                            msg: format!("thread {tid} is already traced by process {tracer} (a debugger?); detach it and retry"),
                        });
                    }
                }
                return Err(Error::ptrace("seize", tid, e));
            }
        }
        self.threads.insert(tid, Thread::default());
        Ok(true)
    }

    /// Attach and interrupt; false when the thread is already gone.
    fn seize(&mut self, tid: i32) -> Result<bool> {
        if !self.attach(tid)? {
            return Ok(false);
        }
        match ptrace::interrupt(pid(tid)) {
            Ok(()) | Err(Errno::ESRCH) => Ok(true),
            Err(e) => Err(Error::ptrace("interrupt", tid, e)),
        }
    }

    fn wait_stopped(&mut self, deadline: Instant) -> Result<()> {
        let mut spins = 0u32;
        loop {
            if self.threads.values().all(|t| t.stopped) {
                return Ok(());
            }
            // Any of this thread's tracees (__WNOTHREAD: not another session's), one event per call.
            match self.wait(None, WaitPidFlag::__WALL | WaitPidFlag::WNOHANG | WaitPidFlag::__WNOTHREAD) {
                Ok(WaitStatus::StillAlive) | Err(Errno::EINTR) => {}
                Ok(st) => {
                    if let Some(p) = st.pid() {
                        self.on_status(p.as_raw(), st)?;
                        spins = 0;
                        continue;
                    }
                }
                Err(Errno::ECHILD) => {
                    // Nothing left to report: the threads we wait for are gone.
                    self.threads.retain(|_, t| t.stopped);
                    continue;
                }
                Err(e) => return Err(Error::ptrace("wait", self.pid, e)),
            }
            if Instant::now() > deadline {
                let tid = self.threads.iter().find(|(_, t)| !t.stopped).map(|(k, _)| *k).unwrap_or(0);
                return Err(Error::Process {
                    pid: self.pid,
                    msg: format!("thread {tid} did not stop in time (uninterruptible sleep?); retry later"),
                });
            }
            spins += 1;
            if spins < 200 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    fn on_status(&mut self, tid: i32, st: WaitStatus) -> Result<()> {
        match st {
            WaitStatus::Exited(..) | WaitStatus::Signaled(..) => {
                self.threads.remove(&tid);
                if tid == self.pid && self.threads.is_empty() {
                    return Err(Error::Process { pid: self.pid, msg: "exited during the operation".into() });
                }
            }
            WaitStatus::PtraceEvent(_, _, ev) if ev == libc::PTRACE_EVENT_CLONE => {
                if let Ok(child) = ptrace::getevent(pid(tid)) {
                    self.threads.entry(child as i32).or_default();
                }
                self.mark_stopped(tid, None);
            }
            WaitStatus::PtraceEvent(_, _, ev) if ev == libc::PTRACE_EVENT_FORK || ev == libc::PTRACE_EVENT_VFORK => {
                self.adopt_fork(tid, ev == libc::PTRACE_EVENT_VFORK);
                self.mark_stopped(tid, None);
            }
            WaitStatus::PtraceEvent(_, _, ev) if ev == libc::PTRACE_EVENT_EXEC => {
                self.mark_stopped(tid, None);
                return Err(Error::Process { pid: self.pid, msg: "called exec during the operation; it runs another program now".into() });
            }
            WaitStatus::PtraceEvent(..) => self.mark_stopped(tid, None),
            WaitStatus::Stopped(_, sig) => self.mark_stopped(tid, Some(sig)),
            _ => self.mark_stopped(tid, None),
        }
        Ok(())
    }

    fn mark_stopped(&mut self, tid: i32, sig: Option<Signal>) {
        let t = self.threads.entry(tid).or_default();
        t.stopped = true;
        t.trapped = sig == Some(Signal::SIGTRAP);
        if sig.is_some() && sig != Some(Signal::SIGSTOP) && sig != Some(Signal::SIGTRAP) {
            t.pending.extend(sig.map(|s| s as i32));
        }
    }

    pub(crate) fn regs(&self, tid: i32) -> Result<Regs> {
        ptrace::getregs(pid(tid)).map_err(|e| Error::ptrace("getregs", tid, e))
    }

    pub(crate) fn set_regs(&self, tid: i32, r: Regs) -> Result<()> {
        ptrace::setregs(pid(tid), r).map_err(|e| Error::ptrace("setregs", tid, e))
    }

    /// Resume one thread until its next system call stop (or other stop); the stop status
    /// is returned.
    pub(crate) fn run_until_stop(&mut self, tid: i32) -> Result<WaitStatus> {
        ptrace::syscall(pid(tid), None).map_err(|e| Error::ptrace("syscall", tid, e))?;
        loop {
            match self.wait(Some(tid), WaitPidFlag::__WALL) {
                Ok(st @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => {
                    self.threads.remove(&tid);
                    return Err(Error::Process { pid: self.pid, msg: format!("thread {tid} died while running injected code ({st:?})") });
                }
                Ok(st) => return Ok(st),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(Error::ptrace("wait", tid, e)),
            }
        }
    }

    /// Move a thread out of the signal-delivery-stop of a signal we caused (the SIGSEGV that
    /// ends an injected call) into a plain PTRACE_EVENT_STOP, giving it registers `regs` on
    /// the way: it is resumed with no signal and interrupted before it returns to user space,
    /// so it runs none of its code. A tracer that dies while a thread rests in such a
    /// signal-delivery-stop makes the kernel deliver the signal; from a PTRACE_EVENT_STOP it
    /// simply runs on. A real signal that arrives meanwhile stops it first: that stop is kept
    /// (delivered on detach, or by the kernel if we die). The interrupt comes
    /// first: from then on the way out of the kernel passes the signal code, which restarts
    /// a system call the restored registers were interrupted in, even if we die before the
    /// thread settles.
    pub(super) fn settle_with(&mut self, tid: i32, regs: Option<Regs>) -> Result<()> {
        match ptrace::interrupt(pid(tid)) {
            Ok(()) => {}
            Err(Errno::ESRCH) => return Ok(()),
            Err(e) => return Err(Error::ptrace("interrupt", tid, e)),
        }
        if let Some(r) = regs {
            self.set_regs(tid, r)?;
        }
        for _ in 0..16 {
            match ptrace::cont(pid(tid), None) {
                Ok(()) => {}
                Err(Errno::ESRCH) => return Ok(()),
                Err(e) => return Err(Error::ptrace("cont", tid, e)),
            }
            loop {
                match self.wait(Some(tid), WaitPidFlag::__WALL) {
                    Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) => {
                        self.threads.remove(&tid);
                        return Err(Error::Process { pid: self.pid, msg: format!("thread {tid} exited") });
                    }
                    Ok(WaitStatus::Stopped(_, Signal::SIGTRAP)) => break, // another trap of ours: again
                    Ok(WaitStatus::Stopped(_, sig)) => {
                        let t = self.threads.entry(tid).or_default();
                        t.pending.push(sig as i32);
                        t.trapped = false;
                        return Ok(());
                    }
                    Ok(_) => {
                        // PTRACE_EVENT_STOP (or another event stop): nothing to deliver.
                        if let Some(t) = self.threads.get_mut(&tid) {
                            t.trapped = false;
                        }
                        return Ok(());
                    }
                    Err(Errno::EINTR) => continue,
                    Err(e) => return Err(Error::ptrace("wait", tid, e)),
                }
            }
        }
        Err(Error::Process { pid: self.pid, msg: format!("thread {tid} would not settle in a stop") })
    }

    /// Keep a signal the thread stopped for (it is delivered when the thread goes on).
    pub(crate) fn keep_signal(&mut self, tid: i32, sig: i32) {
        self.threads.entry(tid).or_default().pending.push(sig);
    }

    /// A PTRACE_EVENT_FORK/VFORK stop of `parent`: hand the child to `on_fork` and let it
    /// go (a vfork child shares the parent's memory: nothing of its own to handle).
    fn adopt_fork(&mut self, parent: i32, vfork: bool) {
        match self.take_fork_child(parent, Duration::from_secs(2)) {
            Ok(Some(child)) => {
                if !vfork {
                    if let Some(on_child) = self.on_fork.as_mut() {
                        on_child(child);
                    }
                }
                let _ = raw_request(libc::PTRACE_DETACH, child, None);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(parent, "a forked child: {e}"),
        }
    }

    /// The child of a PTRACE_EVENT_FORK stop of `parent`, stopped and traced by us. None if
    /// it is gone.
    fn take_fork_child(&mut self, parent: i32, timeout: Duration) -> Result<Option<i32>> {
        let child = ptrace::getevent(pid(parent)).map_err(|e| Error::ptrace("getevent", parent, e))? as i32;
        let deadline = Instant::now() + timeout;
        while !self.fork_stops.remove(&child) {
            let mut status = 0;
            // SAFETY: waitpid with a valid pointer to an int.
            let r = unsafe { libc::waitpid(child, &mut status, libc::__WALL | libc::WNOHANG) };
            if r == child {
                if libc::WIFSTOPPED(status) {
                    break;
                }
                return Ok(None); // it died at once
            }
            if r < 0 {
                return Ok(None);
            }
            if Instant::now() > deadline {
                return Err(Error::Process { pid: self.pid, msg: format!("forked child {child} did not report its first stop") });
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        Ok(Some(child))
    }

    /// waitpid(2), decoded as nix decodes it, except that a stop for a signal `Signal` cannot
    /// name (a real-time signal: the program's own, or glibc's SIGCANCEL/SIGSETXID) is no
    /// error (nix answers EINVAL, and the stop and its signal would be lost): the signal is
    /// kept as the thread's pending signal (delivered when it is resumed or detached) and the
    /// stop is reported as `PtraceEvent(tid, SIGTRAP, 0)`, a stop with nothing to handle. The
    /// first stop of a forked child is taken aside and reported as `StillAlive`.
    fn wait(&mut self, who: Option<i32>, flags: WaitPidFlag) -> nix::Result<WaitStatus> {
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid with a valid pointer to an int.
        let r = unsafe { libc::waitpid(who.unwrap_or(-1), &mut status, flags.bits()) };
        if r < 0 {
            return Err(Errno::last());
        }
        if r == 0 {
            return Ok(WaitStatus::StillAlive);
        }
        if libc::WIFSTOPPED(status) && !self.threads.contains_key(&r) && !is_task_of(self.pid, r) {
            // The first stop of a child the target forked (PTRACE_O_TRACEFORK), not one of our
            // threads: kept for `take_fork_child`, and nothing to report.
            self.fork_stops.insert(r);
            return Ok(WaitStatus::StillAlive);
        }
        if libc::WIFSTOPPED(status) {
            let t = self.threads.entry(r).or_default();
            t.stop_sig = (status >> 16 == 0 && libc::WSTOPSIG(status) != libc::SIGTRAP | 0x80).then(|| libc::WSTOPSIG(status));
        }
        if libc::WIFSTOPPED(status) && status >> 16 == 0 {
            let sig = libc::WSTOPSIG(status);
            // SIGTRAP | 0x80 is a syscall stop (PTRACE_O_TRACESYSGOOD), not a signal.
            if sig != libc::SIGTRAP | 0x80 && Signal::try_from(sig).is_err() {
                let t = self.threads.entry(r).or_default();
                t.stopped = true;
                t.trapped = false;
                t.pending.push(sig);
                return Ok(WaitStatus::PtraceEvent(pid(r), Signal::SIGTRAP, 0));
            }
        }
        WaitStatus::from_raw(pid(r), status)
    }

    /// Resume everything now (consumes the guard).
    pub(crate) fn detach(mut self) {
        self.detach_all();
    }

    fn detach_all(&mut self) {
        // PTRACE_DETACH only works on a stopped tracee: a thread attached but still running
        // (an error while attaching the others, a round cut short) would stay traced by this
        // process, which in a long-running embedder (the agent) holds it for good.
        let running: Vec<i32> = self.threads.iter().filter(|(_, t)| !t.stopped).map(|(k, _)| *k).collect();
        if !running.is_empty() {
            for &tid in &running {
                let _ = ptrace::interrupt(pid(tid));
            }
            let _ = self.wait_stopped(Instant::now() + Duration::from_secs(2));
        }
        for (tid, mut t) in std::mem::take(&mut self.threads) {
            let sig = take_signals(self.pid, tid, &mut t);
            let _ = raw_request(libc::PTRACE_DETACH, tid, sig);
        }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        self.detach_all();
    }
}

/// The kept signal to pass with PTRACE_CONT or PTRACE_DETACH: the one the thread is stopped
/// for, if it is kept (delivered with its original siginfo). The others are queued again to
/// the thread (tgkill), to be delivered (or reported to us) in turn: a signal passed from any
/// other stop would be dropped by the kernel.
fn take_signals(tgid: i32, tid: i32, t: &mut Thread) -> Option<i32> {
    let mut sigs = std::mem::take(&mut t.pending);
    let now = t.stop_sig.take().and_then(|s| sigs.iter().position(|x| *x == s)).map(|i| sigs.remove(i));
    for s in sigs {
        // SAFETY: tgkill(2) with plain integers.
        unsafe {
            libc::syscall(libc::SYS_tgkill, tgid, tid, s);
        }
    }
    now
}

/// PTRACE_CONT / PTRACE_DETACH with a raw signal number (nix takes only named signals).
fn raw_request(request: libc::c_uint, tid: i32, sig: Option<i32>) -> nix::Result<()> {
    // SAFETY: a ptrace request that takes no address and a signal number as data.
    let r = unsafe { libc::ptrace(request, tid, std::ptr::null_mut::<libc::c_void>(), sig.unwrap_or(0) as libc::c_long as *mut libc::c_void) };
    if r < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

fn tracer_of(tid: i32) -> Option<i32> {
    let s = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix("TracerPid:")).and_then(|v| v.trim().parse().ok())
}

fn traced_by_us(tid: i32) -> bool {
    // TracerPid names the tracing *thread*: the engine may run on any thread of an embedder.
    // SAFETY: gettid() has no preconditions.
    tracer_of(tid) == Some(unsafe { libc::gettid() })
}

/// A signal set of a thread from /proc (`key`: `SigPnd:` pending, `SigBlk:` blocked).
pub(super) fn signal_set(tgid: i32, tid: i32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{tgid}/task/{tid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// Whether `tid` is a thread of process `tgid`.
fn is_task_of(tgid: i32, tid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{tgid}/task/{tid}")).exists()
}
