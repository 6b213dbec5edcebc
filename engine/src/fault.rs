//! Fault injection for the fault campaign: `LIVEPATCH_FAULT=<point>` makes the tool kill
//! itself with SIGKILL when it reaches that point, so tests can prove that a tool dying at any
//! step leaves the target running its old or new code. Points: `attached`, `injected`,
//! `mapped`, `stopped`, `jump` (after the first of several jumps, in apply and in revert),
//! `trap-armed`, `revert-stopped`, `syscall` (a thread holds the registers of an injected
//! system call: the first one, memfd_create, of an apply), `frames-switched` and
//! `revert-frames-switched` (return addresses and registers of switched frames written, the
//! switch not yet recorded or committed). Unset, this costs one environment lookup per process.
use std::sync::OnceLock;

static POINT: OnceLock<Option<String>> = OnceLock::new();

/// Die here if the fault campaign asked for it.
pub fn point(name: &str) {
    if POINT.get_or_init(|| std::env::var("LIVEPATCH_FAULT").ok()).as_deref() == Some(name) {
        // SAFETY: raise() with a valid signal number; SIGKILL does not return.
        unsafe {
            libc::raise(libc::SIGKILL);
        }
    }
}
