//! Cancellation by SIGINT/SIGTERM/SIGHUP: the long waits of an update (the `wait` and `trap`
//! strategies) check it and unwind through the usual restore paths, so a tool that is told to
//! stop (Ctrl-C, an agent shut down) leaves the target exactly as it was.
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicBool, Ordering};

static CANCELLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    CANCELLED.store(true, Ordering::SeqCst);
}

/// Turn SIGINT, SIGTERM and SIGHUP into a cancellation request (for the CLI).
pub fn install_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe; the
        // sigaction struct is fully initialised (zeroed, then the handler set).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

pub fn cancelled() -> bool {
    CANCELLED.load(Ordering::SeqCst)
}

/// Ask running operations to stop (for embedders such as the agent on shutdown).
pub fn cancel() {
    CANCELLED.store(true, Ordering::SeqCst);
}

pub fn check() -> Result<()> {
    if cancelled() {
        return Err(Error::Other("interrupted by a signal; the target was left on its previous code and running".into()));
    }
    Ok(())
}
