//! Running code in a stopped thread without the target's cooperation: one system call
//! ([`Stopped::syscall`]) or one function call ([`Stopped::call`]), through code of the
//! target ([`Gadgets`]), with a signal frame below the thread's red zone that restores it
//! exactly, by us at the system call stop or by the kernel's `rt_sigreturn` should we die
//! meanwhile (`docs/safety.md`).
use super::session::{signal_set, Regs, Stopped};
use crate::arch::x86_64::sigframe;
use crate::error::{Error, Result};
use crate::process::Process;
use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;

const NT_X86_XSTATE: usize = 0x202;
const SYSCALL_LEN: u64 = 2;
/// Stack below the red zone left to callers of an injection (for data the system call reads,
/// such as a memfd name) before the restore frame.
pub const INJECT_SCRATCH: u64 = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Injected {
    Syscall,
    Call,
}

/// Code of the target that injected code runs through (found by [`crate::map::find_gadgets`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gadgets {
    /// `syscall; ret`
    pub syscall_ret: u64,
    /// `mov $15, %rax; syscall`: rt_sigreturn
    pub sigreturn: u64,
}

impl Stopped {
    /// Execute one system call in thread `tid` and return its result. The thread's registers
    /// are restored afterwards (a system call it was interrupted in restarts as usual). Should
    /// we die meanwhile, the thread restores itself: see [`Stopped::inject`].
    pub fn syscall(&mut self, tid: i32, g: Gadgets, nr: i64, args: [u64; 6]) -> Result<i64> {
        let (v, _) = self.inject(tid, g, Injected::Syscall, |r, sp| {
            r.rip = g.syscall_ret;
            r.rsp = sp;
            r.rax = nr as u64;
            (r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9) = (args[0], args[1], args[2], args[3], args[4], args[5]);
            Ok(None)
        })?;
        Ok(v as i64)
    }

    /// Call a function of the target in thread `tid` (System V ABI) and return its result.
    /// The function returns into the `syscall; ret` sequence with its result as the system
    /// call number: we take the result at that call's entry stop and skip the call. Should we
    /// die meanwhile, the thread restores itself (see [`Stopped::inject`]; the bogus system
    /// call fails with ENOSYS first).
    pub fn call(&mut self, tid: i32, g: Gadgets, func: u64, args: [u64; 6]) -> Result<u64> {
        let (_, ret) = self.inject(tid, g, Injected::Call, |r, sp| {
            r.rip = func;
            // As after a `call`: the return address on top, 16-byte alignment above it.
            r.rsp = sp - 8;
            r.rax = 0;
            (r.rdi, r.rsi, r.rdx, r.rcx, r.r8, r.r9) = (args[0], args[1], args[2], args[3], args[4], args[5]);
            Ok(Some((sp - 8, g.syscall_ret)))
        })?;
        Ok(ret)
    }

    /// Run injected code in stopped thread `tid` until it reaches the `syscall` of
    /// `g.syscall_ret`, and return that system call's result and the value it was entered
    /// with (`orig_rax`). `setup` gets the registers to start from (the thread's own) and the
    /// stack pointer to use, and may name one more word to write (a return address).
    ///
    /// First a signal frame ([`sigframe`]) that restores the thread as it is now is written
    /// below its stack's red zone, and `ret` after the `syscall` pops the frame's return
    /// address: the target's `rt_sigreturn` sequence. While we live, we stop the thread at
    /// the system call (ptrace syscall stops, which a dying tracer simply lets go on) and
    /// restore it ourselves; if we are killed at any point, the thread finishes the call,
    /// returns into `rt_sigreturn`, and the kernel restores every register, the signal mask
    /// and the extended state from the frame. The target runs on either way.
    fn inject(&mut self, tid: i32, g: Gadgets, kind: Injected, setup: impl FnOnce(&mut Regs, u64) -> Result<Option<(u64, u64)>>) -> Result<(u64, u64)> {
        let saved = self.regs(tid)?;
        let mem = crate::process::ProcMem::open(self.pid)?;
        let frame = self.restoring_frame(tid, &saved, g)?;
        let mut r = saved;
        r.orig_rax = u64::MAX; // not in a system call: no restart logic when it goes on
        let extra = setup(&mut r, frame.sp)?;
        mem.write(frame.base, &frame.bytes)?;
        if let Some((at, word)) = extra {
            mem.write(at, &word.to_le_bytes())?;
        }
        self.set_regs(tid, r)?;
        // The thread holds the injected registers until they are restored below.
        crate::fault::point("syscall");
        let result = self.run_to_gadget(tid, g, kind, &mem, frame.sp);
        let restored = self.settle_with(tid, Some(saved));
        let v = result?;
        restored?;
        Ok(v)
    }

    /// Resume the injected thread with syscall stops until the exit of the system call at
    /// `g.syscall_ret`; returns (its result, the number it was entered with).
    fn run_to_gadget(&mut self, tid: i32, g: Gadgets, kind: Injected, mem: &crate::process::ProcMem, frame_sp: u64) -> Result<(u64, u64)> {
        let at = g.syscall_ret + SYSCALL_LEN;
        let mut entered: Option<u64> = None;
        for _ in 0..256 {
            match self.run_until_stop(tid)? {
                WaitStatus::PtraceSyscall(_) => {
                    let now = self.regs(tid)?;
                    if now.rip != at {
                        continue; // a system call of the injected function itself
                    }
                    match entered {
                        None => {
                            entered = Some(now.orig_rax);
                            // The thread is past any restore of a temporary signal mask
                            // (ppoll, pselect, sigsuspend) now: the frame gets the real one.
                            if let Some(mask) = signal_set(self.pid, tid, "SigBlk:") {
                                mem.write(frame_sp + sigframe::SIGMASK_OFFSET as u64, &mask.to_le_bytes())?;
                            }
                            if kind == Injected::Call {
                                // A function's result, not a system call: skip it.
                                let mut skip = now;
                                skip.orig_rax = u64::MAX;
                                skip.rax = now.orig_rax;
                                self.set_regs(tid, skip)?;
                            }
                        }
                        Some(nr) => return Ok((self.regs(tid)?.rax, nr)),
                    }
                }
                WaitStatus::Stopped(_, sig @ (Signal::SIGSEGV | Signal::SIGBUS | Signal::SIGILL | Signal::SIGFPE)) => {
                    let now = self.regs(tid)?;
                    return Err(Error::Process { pid: self.pid, msg: format!("injected code faulted ({sig}) at {:#x}", now.rip) });
                }
                WaitStatus::Stopped(_, sig) => {
                    // A signal arrived first; keep it for later and go on.
                    self.keep_signal(tid, sig as i32);
                }
                _ => {}
            }
        }
        Err(Error::Process { pid: self.pid, msg: "injected code kept being interrupted".into() })
    }

    /// A frame that restores thread `tid` to `saved` (see [`Stopped::inject`]), placed below
    /// the red zone and the scratch space callers use, checked to lie in the stack's mapping.
    fn restoring_frame(&self, tid: i32, saved: &Regs, g: Gadgets) -> Result<sigframe::Frame> {
        let xstate = self.xstate(tid)?;
        let ctx = sigframe::Context {
            r8: saved.r8,
            r9: saved.r9,
            r10: saved.r10,
            r11: saved.r11,
            r12: saved.r12,
            r13: saved.r13,
            r14: saved.r14,
            r15: saved.r15,
            rdi: saved.rdi,
            rsi: saved.rsi,
            rbp: saved.rbp,
            rbx: saved.rbx,
            rdx: saved.rdx,
            rax: saved.rax,
            rcx: saved.rcx,
            rsp: saved.rsp,
            rip: saved.rip,
            eflags: saved.eflags,
            cs: saved.cs as u16,
            ss: saved.ss as u16,
            orig_rax: saved.orig_rax,
        };
        let mask = signal_set(self.pid, tid, "SigBlk:").unwrap_or(0);
        let no_room = || Error::Process { pid: self.pid, msg: format!("no room on the stack of thread {tid} for the injection's restore frame") };
        let top = saved.rsp.checked_sub(INJECT_SCRATCH).ok_or_else(no_room)?;
        let frame = sigframe::build(top, &ctx, mask, &xstate, g.sigreturn).ok_or_else(no_room)?;
        let lowest = frame.base.checked_sub(8).ok_or_else(no_room)?;
        let maps = Process::open(self.pid)?.maps()?;
        if !maps.iter().any(|m| m.contains(lowest) && m.contains(saved.rsp)) {
            return Err(no_room());
        }
        Ok(frame)
    }

    /// The thread's extended register state (XSAVE area, PTRACE_GETREGSET NT_X86_XSTATE).
    fn xstate(&self, tid: i32) -> Result<sigframe::XState> {
        let mut buf = vec![0u8; 32 << 10];
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        // SAFETY: PTRACE_GETREGSET writes at most iov_len bytes into the buffer iov points to,
        // both alive for the call, and sets iov_len to what it wrote.
        let r = unsafe { libc::ptrace(libc::PTRACE_GETREGSET, tid, NT_X86_XSTATE as *mut libc::c_void, &mut iov as *mut libc::iovec) };
        if r < 0 {
            return Err(Error::ptrace("getregset (xstate)", tid, Errno::last()));
        }
        buf.truncate(iov.iov_len);
        sigframe::XState::new(buf, xsave_component_end).ok_or_else(|| Error::Process { pid: self.pid, msg: format!("thread {tid}: unexpected extended register state layout") })
    }
}

/// Where XSAVE state component `i` ends in the standard format (CPUID leaf 0xD: EAX size,
/// EBX offset). The same on every thread: the format is the CPU's.
fn xsave_component_end(i: u32) -> usize {
    let r = std::arch::x86_64::__cpuid_count(0xd, i);
    (r.ebx as usize).saturating_add(r.eax as usize)
}
