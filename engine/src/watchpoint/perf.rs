//! Hardware execute breakpoints owned by a file descriptor (`perf_event_open`, type
//! PERF_TYPE_BREAKPOINT, `sigtrap`): a thread that reaches one gets a SIGTRAP (si_code
//! TRAP_PERF), which we as its tracer see as a signal stop. Unlike debug registers written
//! with ptrace, which stay in the thread after its tracer is gone, these vanish with the
//! descriptor: a tool killed in the middle of a trap wait leaves no breakpoint behind.
//! [`set_breakpoint_kind`] chooses, for the whole process, between these and debug registers.
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use perf_event_open_sys::bindings::{perf_event_attr, HW_BREAKPOINT_X, PERF_ATTR_SIZE_VER7, PERF_FLAG_FD_CLOEXEC, PERF_TYPE_BREAKPOINT};

/// si_code of a SIGTRAP sent by a perf event.
pub const TRAP_PERF: i32 = 6;

/// Set once the kernel refused perf breakpoints for a reason that will not change (no
/// permission: seccomp, perf_event_paranoid without CAP_PERFMON; too old a kernel): later
/// rounds go straight to debug registers.
static REFUSED: AtomicBool = AtomicBool::new(false);

/// Which hardware breakpoints the trap strategy uses when the watched addresses fit in the
/// four slots (beyond four it uses `int3` bytes whatever this says).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BreakpointKind {
    /// Perf events, or debug registers where the kernel refuses perf.
    #[default]
    Auto,
    /// Perf events only: a round the kernel refuses them for fails instead of leaving
    /// breakpoints that a killed tool cannot take back.
    Perf,
    /// Debug registers written with ptrace (what `Auto` falls back to), never perf.
    DebugRegisters,
}

impl std::str::FromStr for BreakpointKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(BreakpointKind::Auto),
            "perf" => Ok(BreakpointKind::Perf),
            "debugreg" => Ok(BreakpointKind::DebugRegisters),
            _ => Err(format!("unknown breakpoint kind `{s}` (auto, perf or debugreg)")),
        }
    }
}

/// The process-wide [`BreakpointKind`], as its discriminant. Process-wide because the trap
/// strategy's inputs come from the apply and revert sequences, which do not carry it; an
/// embedder sets it once at start.
static KIND: AtomicU8 = AtomicU8::new(BreakpointKind::Auto as u8);

/// Choose the hardware breakpoints of every later trap round in this process.
pub fn set_breakpoint_kind(kind: BreakpointKind) {
    KIND.store(kind as u8, Ordering::Relaxed);
}

/// The kind chosen with [`set_breakpoint_kind`] (`Auto` if never set).
pub fn breakpoint_kind() -> BreakpointKind {
    match KIND.load(Ordering::Relaxed) {
        k if k == BreakpointKind::Perf as u8 => BreakpointKind::Perf,
        k if k == BreakpointKind::DebugRegisters as u8 => BreakpointKind::DebugRegisters,
        _ => BreakpointKind::Auto,
    }
}

/// An execute breakpoint at `addr`, user space only, signalling every hit with SIGTRAP (the
/// address as si_perf_data), removed by an exec.
fn breakpoint_attr(addr: u64) -> perf_event_attr {
    let mut attr = perf_event_attr::default();
    attr.type_ = PERF_TYPE_BREAKPOINT;
    // The first layout with `sig_data`; the kernel reads only `size` bytes, so kernels that
    // predate later fields accept it.
    attr.size = PERF_ATTR_SIZE_VER7;
    attr.sample_period = 1;
    attr.set_exclude_kernel(1);
    attr.set_exclude_hv(1);
    attr.set_remove_on_exec(1);
    attr.set_sigtrap(1);
    attr.bp_type = HW_BREAKPOINT_X;
    attr.bp_addr = addr;
    attr.bp_len = 8; // sizeof(long) for execute breakpoints
    attr.sig_data = addr;
    attr
}

/// An execute breakpoint at `addr` in thread `tid`. Errors are the kernel's (EPERM when
/// debug registers are chosen); the caller falls back to debug registers unless perf is chosen.
pub fn breakpoint(tid: i32, addr: u64) -> std::io::Result<OwnedFd> {
    if breakpoint_kind() == BreakpointKind::DebugRegisters || (REFUSED.load(Ordering::Relaxed) && breakpoint_kind() == BreakpointKind::Auto) {
        return Err(std::io::Error::from_raw_os_error(libc::EPERM));
    }
    let mut attr = breakpoint_attr(addr);
    // SAFETY: perf_event_open reads `size` bytes of the attribute (a fully initialised struct
    // larger than that), which outlives the call; the result is a new descriptor we own, or -1.
    let fd = unsafe { perf_event_open_sys::perf_event_open(&mut attr, tid, -1, -1, PERF_FLAG_FD_CLOEXEC.into()) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES | libc::ENOSYS | libc::E2BIG | libc::ENOENT | libc::EINVAL)) {
            REFUSED.store(true, Ordering::Relaxed);
        }
        return Err(e);
    }
    // SAFETY: fd is a descriptor perf_event_open just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The attribute is byte for byte the perf_event_attr(2) layout this file wrote by hand
    /// before it used the crate's bindings (offsets of PERF_ATTR_SIZE_VER7).
    #[test]
    fn attribute_bytes_are_the_abi_layout() {
        let addr = 0x5555_1234_5678u64;
        let mut want = [0u8; 128];
        let mut put = |off: usize, v: &[u8]| want[off..off + v.len()].copy_from_slice(v);
        put(0, &5u32.to_le_bytes()); // type: PERF_TYPE_BREAKPOINT
        put(4, &128u32.to_le_bytes()); // size
        put(16, &1u64.to_le_bytes()); // sample_period
        put(40, &((1u64 << 5) | (1 << 6) | (1 << 36) | (1 << 37)).to_le_bytes()); // exclude_kernel, exclude_hv, remove_on_exec, sigtrap
        put(52, &4u32.to_le_bytes()); // bp_type: HW_BREAKPOINT_X
        put(56, &addr.to_le_bytes()); // bp_addr
        put(64, &8u64.to_le_bytes()); // bp_len
        put(120, &addr.to_le_bytes()); // sig_data
        let attr = breakpoint_attr(addr);
        assert!(std::mem::size_of::<perf_event_attr>() >= 128);
        // SAFETY: perf_event_attr is plain data at least 128 bytes long, zero-initialised by Default.
        let got = unsafe { std::slice::from_raw_parts((&attr as *const perf_event_attr).cast::<u8>(), 128) };
        assert_eq!(got, &want[..]);
        assert_eq!(PERF_FLAG_FD_CLOEXEC, 8);
    }
}
