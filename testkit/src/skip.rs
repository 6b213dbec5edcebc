//! Tests that need something the machine may lack (musl-gcc, a static libc, objdump, root) never
//! pass by doing nothing: without it they fail, saying what to install (`scripts/setup.sh`
//! installs all of it). Only `LIVEPATCH_ALLOW_SKIP=1`, for a local run, turns the failure into
//! a skip, printed as `SKIPPED: reason`.
//!
//! Shared by the test crates of the workspace: `use livepatch_testkit::skip;`.

/// The opt-out variable.
pub const ALLOW_SKIP: &str = "LIVEPATCH_ALLOW_SKIP";

/// Whether skipping was asked for.
pub fn allowed() -> bool {
    std::env::var(ALLOW_SKIP).as_deref() == Ok("1")
}

/// `what` is missing and `install` says how to get it: fail, or with `LIVEPATCH_ALLOW_SKIP=1`
/// print `SKIPPED: ...` and return (the caller then skips the check: `return skip::missing(..)`).
#[track_caller]
pub fn missing(what: &str, install: &str) {
    if allowed() {
        eprintln!("SKIPPED: {what} ({install})");
        return;
    }
    panic!("{what}: {install} (scripts/setup.sh does it); set {ALLOW_SKIP}=1 to skip this check on a local machine");
}

/// Whether `cmd` is a command on PATH.
pub fn have(cmd: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether this process runs as root.
pub fn root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
