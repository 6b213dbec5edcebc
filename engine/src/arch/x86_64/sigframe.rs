//! The x86-64 Linux signal frame (`struct rt_sigframe`), built by us so that code we inject
//! into a thread restores the thread by itself when we die: the injected code returns into
//! the target's own `rt_sigreturn` sequence with this frame on the stack, and the kernel puts
//! back every register, the signal mask and the FPU/SSE/AVX state exactly as a signal handler
//! return would. While we live we restore the thread with ptrace and the frame is never used.
//!
//! Layout (arch/x86/include/asm/sigframe.h, uapi/asm/sigcontext.h): `pretcode` (8), then
//! `struct ucontext` (flags 8, link 8, `stack_t` 24, `struct sigcontext` 256, sigmask 8),
//! then `siginfo` (128). The extended state (XSAVE standard format, 64-byte aligned) is
//! referenced by `sigcontext.fpstate`, with the software bytes the kernel checks
//! (`FP_XSTATE_MAGIC1` at byte 464, `FP_XSTATE_MAGIC2` right after the state).

/// `mov $15, %rax; syscall` and `mov $15, %eax; syscall`: an `rt_sigreturn` (glibc's and
/// musl's `__restore_rt`, Go's sigreturn).
pub const SIGRETURN_SEQUENCES: [&[u8]; 2] = [&[0x48, 0xc7, 0xc0, 0x0f, 0, 0, 0, 0x0f, 0x05], &[0xb8, 0x0f, 0, 0, 0, 0x0f, 0x05]];
/// `syscall; ret`: glibc's and musl's wrappers of system calls that cannot fail.
pub const SYSCALL_RET: [u8; 3] = [0x0f, 0x05, 0xc3];

const UCONTEXT: usize = 8;
const SIGCONTEXT: usize = UCONTEXT + 40;
/// sizeof(struct rt_sigframe)
pub const FRAME_LEN: usize = 8 + 304 + 128;
/// Offset of the signal mask from the frame's start (rewritten once the thread's mask is known
/// for sure, see the injection).
pub const SIGMASK_OFFSET: usize = UCONTEXT + 296;

const UC_FP_XSTATE: u64 = 1;
const UC_SIGCONTEXT_SS: u64 = 2;
const FP_XSTATE_MAGIC1: u32 = 0x4650_5853;
const FP_XSTATE_MAGIC2: u32 = 0x4650_5845;
/// Byte 464 of the XSAVE area: software-reserved. ptrace puts XCR0 there; a signal frame puts
/// `struct _fpx_sw_bytes` (magic1, extended_size, xfeatures, xstate_size).
const SW_BYTES: usize = 464;
/// Legacy area + XSAVE header: the smallest extended state.
pub const XSAVE_MIN: usize = 576;

/// Kernel-internal error codes of an interrupted system call (include/linux/errno.h).
const ERESTARTSYS: i64 = 512;
const ERESTARTNOINTR: i64 = 513;
const ERESTARTNOHAND: i64 = 514;
const ERESTART_RESTARTBLOCK: i64 = 516;
const EINTR: i64 = 4;

/// The registers a frame restores (the fields of `struct sigcontext`, in its order).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Context {
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub rdx: u64,
    pub rax: u64,
    pub rcx: u64,
    pub rsp: u64,
    pub rip: u64,
    pub eflags: u64,
    pub cs: u16,
    pub ss: u16,
    /// `orig_rax`: the system call the thread is in, or -1.
    pub orig_rax: u64,
}

impl Context {
    /// What the thread must resume with when it is let go with nothing to deliver: a system
    /// call it was interrupted in restarts (the kernel does this on the way out of a ptrace
    /// stop; `rt_sigreturn` does not, it clears `orig_rax`). `restart_syscall` cannot be
    /// emulated (`rt_sigreturn` resets the restart block): that call returns EINTR, as it
    /// would after a signal handler.
    pub fn resumed(mut self) -> Context {
        if (self.orig_rax as i64) < 0 {
            return self;
        }
        match -(self.rax as i64) {
            ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
                self.rax = self.orig_rax;
                self.rip = self.rip.wrapping_sub(2);
            }
            ERESTART_RESTARTBLOCK => self.rax = (-EINTR) as u64,
            _ => {}
        }
        self.orig_rax = u64::MAX;
        self
    }
}

/// The extended register state of a thread as ptrace reads it (NT_X86_XSTATE), and the
/// layout facts of this CPU needed to hand it to `rt_sigreturn`.
#[derive(Debug, Clone)]
pub struct XState {
    /// The XSAVE area (standard format).
    pub area: Vec<u8>,
    /// Size of the state to restore: the end of the highest component in `features`.
    pub size: usize,
    /// State components to restore.
    pub features: u64,
}

/// AMX tile config and data (XSAVE components 17, 18): only a process that asked for them
/// may restore them, so they are left out unless the thread uses them.
const AMX: u64 = 3 << 17;

impl XState {
    /// From the area ptrace returned; `component_end(i)` is where XSAVE component `i` ends in
    /// the standard format (CPUID 0xD). None when the area is too short to be one.
    pub fn new(area: Vec<u8>, component_end: impl Fn(u32) -> usize) -> Option<XState> {
        if area.len() < XSAVE_MIN {
            return None;
        }
        let xcr0 = u64::from_le_bytes(area[SW_BYTES..SW_BYTES + 8].try_into().ok()?);
        let xstate_bv = u64::from_le_bytes(area[512..520].try_into().ok()?);
        let features = (xcr0 & !AMX) | (xcr0 & xstate_bv & AMX) | 3;
        let size = (2..64).filter(|i| features & (1 << i) != 0).map(&component_end).fold(XSAVE_MIN, usize::max);
        (size <= area.len()).then_some(XState { area, size, features })
    }

    /// The state as a signal frame carries it: the software bytes set, `FP_XSTATE_MAGIC2`
    /// after the state.
    fn framed(&self) -> Vec<u8> {
        let mut b = self.area[..self.size].to_vec();
        b[SW_BYTES..SW_BYTES + 48].fill(0);
        b[SW_BYTES..SW_BYTES + 4].copy_from_slice(&FP_XSTATE_MAGIC1.to_le_bytes());
        b[SW_BYTES + 4..SW_BYTES + 8].copy_from_slice(&((self.size + 4) as u32).to_le_bytes());
        b[SW_BYTES + 8..SW_BYTES + 16].copy_from_slice(&self.features.to_le_bytes());
        b[SW_BYTES + 16..SW_BYTES + 20].copy_from_slice(&(self.size as u32).to_le_bytes());
        // Restore only what we include: clear header bits of components left out.
        let bv = u64::from_le_bytes(b[512..520].try_into().expect("8 bytes"));
        b[512..520].copy_from_slice(&(bv & self.features).to_le_bytes());
        b.extend_from_slice(&FP_XSTATE_MAGIC2.to_le_bytes());
        b
    }
}

/// A frame placed in the target's memory.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Lowest address of the whole block (frame, then the extended state above it).
    pub base: u64,
    /// The bytes to write at `base`.
    pub bytes: Vec<u8>,
    /// Address of `pretcode`: the stack pointer when the code before `rt_sigreturn` executes
    /// its `ret` (that `ret` pops `pretcode`, and the kernel finds the frame 8 bytes below).
    pub sp: u64,
}

/// Build a frame that restores `ctx.resumed()`, `sigmask` and `xstate`, placed below `top`
/// (exclusive), returning through `restorer` (an `rt_sigreturn` sequence). None when the
/// addresses underflow.
pub fn build(top: u64, ctx: &Context, sigmask: u64, xstate: &XState, restorer: u64) -> Option<Frame> {
    let fp = xstate.framed();
    let fp_at = top.checked_sub(fp.len() as u64)? & !63;
    let sp = fp_at.checked_sub(FRAME_LEN as u64)? & !15;
    let mut f = vec![0u8; FRAME_LEN];
    f[0..8].copy_from_slice(&restorer.to_le_bytes());
    let put = |f: &mut Vec<u8>, off: usize, v: u64| f[off..off + 8].copy_from_slice(&v.to_le_bytes());
    put(&mut f, UCONTEXT, UC_FP_XSTATE | UC_SIGCONTEXT_SS);
    // uc_stack: an invalid mode, so that rt_sigreturn's restore of the alternate signal stack
    // fails (its errors are ignored) and leaves the thread's own setting alone.
    f[UCONTEXT + 16 + 8..UCONTEXT + 16 + 12].copy_from_slice(&3u32.to_le_bytes());
    let c = ctx.resumed();
    for (i, v) in [c.r8, c.r9, c.r10, c.r11, c.r12, c.r13, c.r14, c.r15, c.rdi, c.rsi, c.rbp, c.rbx, c.rdx, c.rax, c.rcx, c.rsp, c.rip, c.eflags]
        .into_iter()
        .enumerate()
    {
        put(&mut f, SIGCONTEXT + 8 * i, v);
    }
    f[SIGCONTEXT + 144..SIGCONTEXT + 146].copy_from_slice(&c.cs.to_le_bytes());
    f[SIGCONTEXT + 150..SIGCONTEXT + 152].copy_from_slice(&c.ss.to_le_bytes());
    put(&mut f, SIGCONTEXT + 184, fp_at);
    put(&mut f, SIGMASK_OFFSET, sigmask);
    let mut bytes = f;
    bytes.resize((fp_at - sp) as usize, 0);
    bytes.extend_from_slice(&fp);
    Some(Frame { base: sp, bytes, sp })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn area(xcr0: u64, bv: u64, len: usize) -> Vec<u8> {
        let mut a = vec![0u8; len];
        a[SW_BYTES..SW_BYTES + 8].copy_from_slice(&xcr0.to_le_bytes());
        a[512..520].copy_from_slice(&bv.to_le_bytes());
        a
    }

    /// AVX (component 2) at 576..832, AVX-512 (5-7) up to 2688, AMX (17, 18) beyond.
    fn end(i: u32) -> usize {
        match i {
            2 => 832,
            5..=7 => 2688,
            17 => 2752,
            18 => 2752 + 8192,
            _ => 576,
        }
    }

    #[test]
    fn interrupted_syscalls_restart_like_the_kernel_does() {
        let c = Context { orig_rax: 7, rax: (-512i64) as u64, rip: 0x1002, ..Default::default() };
        let r = c.resumed();
        assert_eq!((r.rax, r.rip, r.orig_rax), (7, 0x1000, u64::MAX));
        let c = Context { orig_rax: 35, rax: (-516i64) as u64, rip: 0x1002, ..Default::default() };
        assert_eq!(c.resumed().rax as i64, -4);
        assert_eq!(c.resumed().rip, 0x1002);
        // A finished call keeps its result; outside a call nothing changes.
        let c = Context { orig_rax: 0, rax: 5, rip: 0x1002, ..Default::default() };
        assert_eq!(c.resumed().rax, 5);
        let c = Context { orig_rax: u64::MAX, rax: (-512i64) as u64, rip: 0x1002, ..Default::default() };
        assert_eq!(c.resumed().rip, 0x1002);
    }

    #[test]
    fn xstate_size_follows_the_components_in_use() {
        let x = XState::new(area(0x7, 0x7, 832), end).unwrap();
        assert_eq!((x.size, x.features), (832, 0x7));
        // AMX enabled in XCR0 but unused by the thread: left out.
        let x = XState::new(area(0x6_00e7, 0x7, 11_000), end).unwrap();
        assert_eq!((x.size, x.features), (2688, 0xe7));
        let x = XState::new(area(0x6_00e7, 0x4_0007, 11_000), end).unwrap();
        assert_eq!(x.size, 2752 + 8192);
        assert!(XState::new(vec![0; 100], end).is_none());
        assert!(XState::new(area(0xe7, 7, 832), end).is_none(), "area shorter than its components");
    }

    #[test]
    fn frame_layout() {
        let x = XState::new(area(0x7, 0x7, 832), end).unwrap();
        let ctx = Context { rip: 0x4010, rsp: 0x7fff_0000, rax: 9, r8: 1, eflags: 0x246, cs: 0x33, ss: 0x2b, orig_rax: u64::MAX, ..Default::default() };
        let top = 0x7ffe_f000;
        let f = build(top, &ctx, 0x4000, &x, 0xdead).unwrap();
        assert_eq!(f.sp % 16, 0);
        assert!(f.base + f.bytes.len() as u64 <= top);
        let u64_at = |off: usize| u64::from_le_bytes(f.bytes[off..off + 8].try_into().unwrap());
        assert_eq!(u64_at(0), 0xdead);
        assert_eq!(u64_at(SIGCONTEXT), 1);
        assert_eq!(u64_at(SIGCONTEXT + 13 * 8), 9);
        assert_eq!(u64_at(SIGCONTEXT + 15 * 8), 0x7fff_0000);
        assert_eq!(u64_at(SIGCONTEXT + 16 * 8), 0x4010);
        assert_eq!(u64_at(SIGMASK_OFFSET), 0x4000);
        let fp = u64_at(SIGCONTEXT + 184);
        assert_eq!(fp % 64, 0);
        let fo = (fp - f.base) as usize;
        assert_eq!(u32::from_le_bytes(f.bytes[fo + 464..fo + 468].try_into().unwrap()), FP_XSTATE_MAGIC1);
        assert_eq!(u32::from_le_bytes(f.bytes[fo + 832..fo + 836].try_into().unwrap()), FP_XSTATE_MAGIC2);
        assert!(build(100, &ctx, 0, &x, 0).is_none());
    }
}
