//! Start-up checks: the agent refuses to run (with the securityContext fix in the message)
//! rather than fail on every task later.
//!
//! * host PID namespace (`hostPID: true`): `/proc/self/status` `NSpid:` lists one PID only in
//!   the initial PID namespace;
//! * `CAP_SYS_PTRACE` in the effective set (`CapEff:` bit 19);
//! * `/proc/1/root` readable (a ptrace access check: fails without `SYS_PTRACE`, or under an
//!   LSM profile that forbids it). Only a warning: some hosts protect their PID 1 (not dumpable,
//!   or more capabilities than the agent) while the pods' processes are still reachable;
//! * a writable lock directory for the engine (`/run/livepatch`, else the temporary directory):
//!   with `readOnlyRootFilesystem: true` mount a volume there.

use std::path::Path;

const CAP_SYS_PTRACE: u32 = 19;

/// One failed check, with what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{text}")]
pub struct Problem {
    pub text: String,
    /// The agent cannot work at all (else: a warning; some targets may still work).
    pub fatal: bool,
}

fn fatal(text: impl Into<String>) -> Problem {
    Problem { text: text.into(), fatal: true }
}

/// The PIDs of `NSpid:` in a `/proc/PID/status` text.
fn nspid(status: &str) -> Option<Vec<&str>> {
    status.lines().find_map(|l| l.strip_prefix("NSpid:")).map(|rest| rest.split_whitespace().collect())
}

/// The effective capability set of a `/proc/PID/status` text.
fn cap_eff(status: &str) -> Option<u64> {
    status.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// Run every check against `proc_root` (normally `/proc`) and the lock directories.
pub fn check(proc_root: &Path, lock_dirs: &[&Path]) -> Vec<Problem> {
    let mut problems = vec![];
    match std::fs::read_to_string(proc_root.join("self/status")) {
        Ok(status) => {
            if nspid(&status).is_some_and(|p| p.len() > 1) {
                problems.push(fatal(
                    "the agent runs in its own PID namespace, so it cannot see or trace the pods' processes: set hostPID: true in the DaemonSet's pod spec",
                ));
            }
            if cap_eff(&status).is_some_and(|caps| caps & (1 << CAP_SYS_PTRACE) == 0) {
                problems.push(fatal(
                    "the agent lacks CAP_SYS_PTRACE: add it to the container's securityContext (capabilities: {add: [SYS_PTRACE]})",
                ));
            }
        }
        Err(e) => problems.push(fatal(format!("cannot read {}/self/status: {e}", proc_root.display()))),
    }
    if let Err(e) = std::fs::read_link(proc_root.join("1/root")) {
        let advice = match e.raw_os_error() {
            Some(libc::EACCES) | Some(libc::EPERM) => {
                ": ptrace access to the host's processes is denied; add SYS_PTRACE to the container's securityContext.capabilities, set hostPID: true, and check that no AppArmor/SELinux profile forbids ptrace (e.g. appArmorProfile: {type: Unconfined} if the runtime's default profile denies it)"
            }
            _ => "",
        };
        problems.push(Problem { text: format!("cannot read {}/1/root ({e}){advice}", proc_root.display()), fatal: false });
    }
    if !lock_dirs.iter().any(|d| writable(d)) {
        problems.push(fatal(format!(
            "none of {} is writable for the engine's per-process locks: with readOnlyRootFilesystem: true, mount a volume at /run/livepatch (hostPath /run/livepatch, type DirectoryOrCreate, so the host's livepatch CLI shares the locks)",
            lock_dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(" and ")
        )));
    }
    problems
}

fn writable(dir: &Path) -> bool {
    if std::fs::create_dir_all(dir).is_err() {
        return false;
    }
    let probe = dir.join(format!(".livepatch-agent-probe-{}", std::process::id()));
    let ok = std::fs::write(&probe, b"").is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_proc(status: &str, init_root: bool) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("self")).unwrap();
        std::fs::write(dir.path().join("self/status"), status).unwrap();
        std::fs::create_dir_all(dir.path().join("1")).unwrap();
        if init_root {
            std::os::unix::fs::symlink("/", dir.path().join("1/root")).unwrap();
        }
        dir
    }

    #[test]
    fn all_good() {
        let proc = fake_proc("Name:\tnode-agent\nNSpid:\t4242\nCapEff:\t00000000a80c25fb\n", true);
        let locks = tempfile::tempdir().unwrap();
        assert_eq!(check(proc.path(), &[locks.path()]), vec![]);
    }

    #[test]
    fn missing_host_pid_ptrace_and_lock_dir() {
        // In a pod without hostPID (two PID namespaces), default capabilities (no SYS_PTRACE).
        let proc = fake_proc("NSpid:\t4242\t1\nCapEff:\t00000000a80425fb\n", false);
        let problems = check(proc.path(), &[Path::new("/proc/no-such-dir/locks")]);
        let text: Vec<&str> = problems.iter().map(|p| p.text.as_str()).collect();
        assert_eq!(text.len(), 4, "{text:?}");
        assert_eq!(problems.iter().map(|p| p.fatal).collect::<Vec<_>>(), vec![true, true, false, true]);
        assert!(text[0].contains("set hostPID: true"));
        assert!(text[1].contains("capabilities: {add: [SYS_PTRACE]}"));
        assert!(text[2].contains("1/root"));
        assert!(text[3].contains("mount a volume at /run/livepatch"));
    }

    #[test]
    fn this_machine() {
        // The test runs as root on the host: nothing but possibly the lock directory may fail.
        let locks = tempfile::tempdir().unwrap();
        let problems = check(Path::new("/proc"), &[locks.path()]);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            // Root in the host PID namespace: nothing fatal (this machine's PID 1 may be protected).
            assert!(problems.iter().all(|p| !p.fatal), "{problems:?}");
        }
    }
}
