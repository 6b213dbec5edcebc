//! Fault injection for the fault campaign: `LIVEPATCH_FAULT=<point>` makes the tool kill
//! itself with SIGKILL when it reaches that point, so tests can prove that a tool dying at any
//! step leaves the target running its old or new code. Points: `attached`, `injected`,
//! `mapped`, `stopped`, `jump` (after the first of several jumps, in apply and in revert),
//! `trap-armed`, `revert-stopped`, `syscall` (a thread holds the registers of an injected
//! system call: the first one, memfd_create, of an apply), `frames-switched` and
//! `revert-frames-switched` (return addresses and registers of switched frames written, the
//! switch not yet recorded or committed). Unset, this costs one environment lookup per process.
//!
//! Only with the cargo feature `fault-injection` (the CLI enables it by default, for its
//! tests); without it [`point`] is an empty inline function: the calls compile to nothing and
//! the variable is never read, so an embedder such as the agent cannot be made to kill itself.
#[cfg(feature = "fault-injection")]
static POINT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

/// Die here if the fault campaign asked for it.
#[cfg(feature = "fault-injection")]
pub fn point(name: &str) {
    if POINT.get_or_init(|| std::env::var("LIVEPATCH_FAULT").ok()).as_deref() == Some(name) {
        // SAFETY: raise() with a valid signal number; SIGKILL does not return.
        unsafe {
            libc::raise(libc::SIGKILL);
        }
    }
}

/// Without the `fault-injection` feature: nothing.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_name: &str) {}
