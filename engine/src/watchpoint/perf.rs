//! Hardware execute breakpoints owned by a file descriptor (`perf_event_open`, type
//! PERF_TYPE_BREAKPOINT, `sigtrap`): a thread that reaches one gets a SIGTRAP (si_code
//! TRAP_PERF), which we as its tracer see as a signal stop. Unlike debug registers written
//! with ptrace, which stay in the thread after its tracer is gone, these vanish with the
//! descriptor: a tool killed in the middle of a trap wait leaves no breakpoint behind.
//! `LIVEPATCH_BREAKPOINTS=debugreg` forces debug registers (as when perf is refused).
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

const PERF_TYPE_BREAKPOINT: u32 = 5;
const HW_BREAKPOINT_X: u32 = 4;
/// PERF_ATTR_SIZE_VER7: the first layout with `sig_data`.
const ATTR_SIZE: usize = 128;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
/// Bits of the flags word of `perf_event_attr`.
const EXCLUDE_KERNEL: u64 = 1 << 5;
const EXCLUDE_HV: u64 = 1 << 6;
const REMOVE_ON_EXEC: u64 = 1 << 36;
const SIGTRAP: u64 = 1 << 37;
/// si_code of a SIGTRAP sent by a perf event.
pub const TRAP_PERF: i32 = 6;

/// Set once the kernel refused perf breakpoints for a reason that will not change (no
/// permission: seccomp, perf_event_paranoid without CAP_PERFMON; too old a kernel): later
/// rounds go straight to debug registers.
static REFUSED: AtomicBool = AtomicBool::new(false);

/// An execute breakpoint at `addr` in thread `tid`. Errors are the kernel's; the caller falls
/// back to debug registers.
pub fn breakpoint(tid: i32, addr: u64) -> std::io::Result<OwnedFd> {
    if REFUSED.load(Ordering::Relaxed) || std::env::var_os("LIVEPATCH_BREAKPOINTS").is_some_and(|v| v == "debugreg") {
        return Err(std::io::Error::from_raw_os_error(libc::EPERM));
    }
    let mut attr = [0u8; ATTR_SIZE];
    let mut put = |off: usize, v: &[u8]| attr[off..off + v.len()].copy_from_slice(v);
    put(0, &PERF_TYPE_BREAKPOINT.to_le_bytes());
    put(4, &(ATTR_SIZE as u32).to_le_bytes());
    put(16, &1u64.to_le_bytes()); // sample_period: every hit
    put(40, &(EXCLUDE_KERNEL | EXCLUDE_HV | REMOVE_ON_EXEC | SIGTRAP).to_le_bytes());
    put(52, &HW_BREAKPOINT_X.to_le_bytes());
    put(56, &addr.to_le_bytes()); // bp_addr
    put(64, &8u64.to_le_bytes()); // bp_len: sizeof(long) for execute breakpoints
    put(120, &addr.to_le_bytes()); // sig_data: si_perf_data of the SIGTRAP
    // SAFETY: perf_event_open reads `size` bytes of the attribute buffer, which outlives the
    // call; the result is a new descriptor we own, or -1.
    let fd = unsafe { libc::syscall(libc::SYS_perf_event_open, attr.as_ptr(), tid, -1i32, -1i32, PERF_FLAG_FD_CLOEXEC) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES | libc::ENOSYS | libc::E2BIG | libc::ENOENT | libc::EINVAL)) {
            REFUSED.store(true, Ordering::Relaxed);
        }
        return Err(e);
    }
    // SAFETY: fd is a descriptor perf_event_open just returned, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
