//! Container to host PIDs, without the container runtime's socket.
//!
//! The pod's `containerStatuses[].containerID` (`containerd://<id>`, `cri-o://<id>`,
//! `docker://<id>`) names the container; every process of it sits in a cgroup whose path names
//! that id, in one of the layouts the kubelet and the runtimes use:
//!
//! | driver  | runtime    | path (v1: every hierarchy; v2: the `0::` line)                                         |
//! |---------|------------|-----------------------------------------------------------------------------------------|
//! | systemd | containerd | `/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice/cri-containerd-<id>.scope` |
//! | systemd | CRI-O      | `…/kubepods-burstable-pod<uid_>.slice/crio-<id>.scope` (its monitor: `crio-conmon-<id>.scope`, not the container) |
//! | systemd | Docker     | `…/kubepods-pod<uid_>.slice/docker-<id>.scope`                                          |
//! | cgroupfs| containerd, Docker | `/kubepods/besteffort/pod<uid>/<id>`                                            |
//! | cgroupfs| CRI-O      | `/kubepods/burstable/pod<uid>/crio-<id>`                                                |
//!
//! (`<uid_>`: the pod UID with `_` for `-`; guaranteed pods have no QoS level in the path.)
//!
//! A process belongs to the container when a path component is exactly one of those names
//! (never a prefix or substring match). When the path names a pod (`pod<uid>` component, or the
//! `-pod<uid_>.slice` unit) above the container, the pod UID must be the task's: a process of
//! another pod is refused even if the ids were to collide. Processes are then filtered to the
//! ones whose running executable (`/proc/PID/exe`) has the bundle's GNU build id and, when the
//! task names a path, whose `/proc/PID/root/<path>` (resolved inside the container's root) is
//! the very file of `/proc/PID/exe`. Each process is identified by (PID, start time), and
//! [`Discovery::recheck`] repeats every test right before the engine touches it.
//!
//! The proc root is configurable: the unit tests run on captured `/proc` trees in temporary
//! directories.

use std::{
    fmt,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// What discovery looks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    /// The bare container id (runtime prefix stripped, see [`parse_container_id`]).
    pub container_id: String,
    /// The pod UID (`metadata.uid`), with dashes.
    pub pod_uid: String,
    /// GNU build id the executable must have (lowercase hex); `None`: any executable.
    pub build_id: Option<String>,
    /// GNU build id of the fixed executable (the bundle's new build): a process running it is
    /// skipped as [`SkipKind::Fixed`], not as another build.
    pub fixed_build_id: Option<String>,
    /// Absolute path of the executable inside the container, if the task names one.
    pub path: Option<String>,
    /// The cgroup path must name the pod (its UID) above the container: set when nothing but
    /// the task vouches for the container id (a revert of a container the pod's status no
    /// longer names), so that an id of a container outside Kubernetes (`/docker/<id>`, a bare
    /// `ctr run`) never reaches the engine.
    pub pod_in_cgroup: bool,
}

/// A process of the container, as identified for the engine.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Target {
    pub pid: i32,
    /// Start time in clock ticks since boot (`/proc/PID/stat` field 22): guards against PID reuse.
    pub start_time: u64,
    /// GNU build id of its executable, if it has one.
    pub build_id: Option<String>,
}

/// A process of the container that is not patched, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub pid: i32,
    /// Why, for the program.
    pub kind: SkipKind,
    /// Why, for people.
    pub reason: String,
}

/// Why a process of the container is not a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SkipKind {
    /// It exited, is a kernel thread, or its `stat` cannot be read.
    NotRunning,
    /// The agent may not read its executable (`EACCES`/`EPERM`: no `CAP_SYS_PTRACE`, or no
    /// `hostPID`).
    PermissionDenied,
    /// Its executable cannot be read or is not an executable the engine reads.
    Unreadable,
    /// It runs another build: another GNU build id than the bundle's, or none.
    OtherBuild,
    /// It runs the fixed build already (the bundle's new build id, at the task's path).
    Fixed,
    /// It does not run the task's path.
    OtherPath,
    /// Its cgroup names the container under another pod's UID.
    OtherPod,
}

/// The outcome of a scan.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Found {
    /// Processes of the container that fit the query: the engine may work on these.
    pub targets: Vec<Target>,
    /// Processes of the container that do not fit (other executable, other path).
    pub skipped: Vec<Skipped>,
    /// Processes whose cgroup names the container id under another pod's UID: never touched.
    pub other_pod: Vec<Skipped>,
}

impl Found {
    /// No process of the container at all on this node.
    pub fn container_absent(&self) -> bool {
        self.targets.is_empty() && self.skipped.is_empty()
    }
}

/// Errors that stop a scan.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("invalid container id {0:?}: expected <runtime>://<hex id> as in the pod's containerStatuses")]
    BadContainerId(String),
    #[error("invalid pod uid {0:?}")]
    BadPodUid(String),
    #[error("cannot list {path}: {source}")]
    ProcUnreadable { path: PathBuf, source: std::io::Error },
}

/// Strip the runtime prefix (`containerd://`, `cri-o://`, `docker://`, or any `<scheme>://`)
/// and check the id: 1 to 128 ASCII letters and digits (runtimes use 64 hex digits).
pub fn parse_container_id(s: &str) -> Result<String, DiscoveryError> {
    let id = match s.split_once("://") {
        Some((scheme, rest)) if !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') => rest,
        Some(_) => return Err(DiscoveryError::BadContainerId(s.to_string())),
        None => s,
    };
    if id.is_empty() || id.len() > 128 || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(DiscoveryError::BadContainerId(s.to_string()));
    }
    Ok(id.to_string())
}

/// Pod UIDs are `[0-9a-f-]`; the systemd layout writes `_` for `-`.
fn normalize_uid(uid: &str) -> String {
    uid.replace('_', "-").to_ascii_lowercase()
}

fn valid_uid(uid: &str) -> bool {
    uid.len() >= 8 && uid.len() <= 64 && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-' || c == '_')
}

/// Whether one cgroup path component is the container `id`'s own cgroup (every layout above).
fn is_container_component(component: &str, id: &str) -> bool {
    if component == id {
        return true;
    }
    let unit = component.strip_suffix(".scope").unwrap_or(component);
    ["cri-containerd-", "crio-", "docker-"].iter().any(|prefix| unit.strip_prefix(prefix) == Some(id))
}

/// The pod UID a cgroup path component names, if any: `pod<uid>` (cgroupfs) or
/// `kubepods[-<qos>]-pod<uid_>.slice` (systemd).
fn pod_uid_of_component(component: &str) -> Option<String> {
    let candidate = if let Some(slice) = component.strip_suffix(".slice") {
        slice.rsplit('-').next()?.strip_prefix("pod")?
    } else {
        component.strip_prefix("pod")?
    };
    valid_uid(candidate).then(|| normalize_uid(candidate))
}

/// How a process's cgroups relate to the container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Membership {
    /// The cgroup names the container (and the task's pod, or no pod at all).
    Member,
    /// The cgroup names the container id under another pod's UID.
    OtherPod(String),
    /// Not in the container.
    NotMember,
}

/// Classify `/proc/PID/cgroup` content (v1 `N:controllers:/path` lines and the v2 `0::/path`
/// line) for container `id` of the pod `pod_uid`.
pub fn membership(cgroup: &str, id: &str, pod_uid: &str) -> Membership {
    classify(cgroup, id, pod_uid, false)
}

/// [`membership`]; with `pod_in_cgroup`, a path that names the container but no pod above it is
/// not a member.
pub fn classify(cgroup: &str, id: &str, pod_uid: &str, pod_in_cgroup: bool) -> Membership {
    let want_uid = normalize_uid(pod_uid);
    let mut member = false;
    for line in cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_hierarchy), Some(_controllers), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        let Some(at) = components.iter().position(|c| is_container_component(c, id)) else {
            continue;
        };
        match components[..at].iter().rev().find_map(|c| pod_uid_of_component(c)) {
            Some(uid) if uid != want_uid => return Membership::OtherPod(uid),
            Some(_) => member = true,
            None if pod_in_cgroup => {}
            None => member = true,
        }
    }
    if member {
        Membership::Member
    } else {
        Membership::NotMember
    }
}

/// Finds the host processes of a container under a proc root.
#[derive(Clone, Debug)]
pub struct Discovery {
    proc_root: PathBuf,
}

impl Default for Discovery {
    fn default() -> Self {
        Self::new("/proc")
    }
}

/// A process's identity read from `<proc>/PID/stat`: start time, and whether it can run code.
fn read_start_time(proc_pid: &Path) -> Result<u64, String> {
    let stat = fs::read_to_string(proc_pid.join("stat")).map_err(|e| format!("cannot read its stat: {e}"))?;
    let st = livepatch::process::parse_stat(&stat).ok_or("unreadable stat")?;
    if st.state == 'Z' || st.state == 'X' {
        return Err("exited (zombie)".into());
    }
    if st.flags & 0x0020_0000 != 0 {
        return Err("kernel thread".into());
    }
    Ok(st.start_time)
}

impl Discovery {
    pub fn new(proc_root: impl Into<PathBuf>) -> Self {
        Self { proc_root: proc_root.into() }
    }

    pub fn proc_root(&self) -> &Path {
        &self.proc_root
    }

    fn pid_dir(&self, pid: i32) -> PathBuf {
        self.proc_root.join(pid.to_string())
    }

    /// Every process (thread-group leader) under the proc root.
    fn pids(&self) -> Result<Vec<i32>, DiscoveryError> {
        let entries = fs::read_dir(&self.proc_root)
            .map_err(|source| DiscoveryError::ProcUnreadable { path: self.proc_root.clone(), source })?;
        let mut pids: Vec<i32> = entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|pid: &i32| *pid > 0)
            .collect();
        pids.sort_unstable();
        Ok(pids)
    }

    /// Scan for the processes of `query`'s container and sort them into targets, skipped ones
    /// and refusals.
    pub fn find(&self, query: &Query) -> Result<Found, DiscoveryError> {
        if !valid_uid(&query.pod_uid) {
            return Err(DiscoveryError::BadPodUid(query.pod_uid.clone()));
        }
        parse_container_id(&query.container_id)?;
        let mut found = Found::default();
        for pid in self.pids()? {
            let dir = self.pid_dir(pid);
            // A process that exits during the scan simply drops out.
            let Ok(cgroup) = fs::read_to_string(dir.join("cgroup")) else { continue };
            match classify(&cgroup, &query.container_id, &query.pod_uid, query.pod_in_cgroup) {
                Membership::NotMember => continue,
                Membership::OtherPod(uid) => {
                    found.other_pod.push(Skipped {
                        pid,
                        kind: SkipKind::OtherPod,
                        reason: format!("its cgroup names container {} under pod {uid}, not pod {}", query.container_id, query.pod_uid),
                    });
                    continue;
                }
                Membership::Member => {}
            }
            let start_time = match read_start_time(&dir) {
                Ok(t) => t,
                Err(reason) => {
                    found.skipped.push(Skipped { pid, kind: SkipKind::NotRunning, reason });
                    continue;
                }
            };
            match self.check_executable(pid, query) {
                Ok(build_id) => found.targets.push(Target { pid, start_time, build_id }),
                Err((kind, reason)) => found.skipped.push(Skipped { pid, kind, reason }),
            }
        }
        Ok(found)
    }

    /// The executable tests: build id, and the path inside the container's root. Returns the
    /// build id.
    fn check_executable(&self, pid: i32, query: &Query) -> Result<Option<String>, (SkipKind, String)> {
        let dir = self.pid_dir(pid);
        let exe = dir.join("exe");
        let build_id = livepatch::elf::build_id_of(&exe).map_err(|e| {
            // The engine's error says what went wrong in words; whether the agent was refused
            // access comes from the OS error of opening the file again.
            if fs::File::open(&exe).is_err_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied) {
                (SkipKind::PermissionDenied, format!("cannot read its executable ({e}); the agent needs CAP_SYS_PTRACE (securityContext.capabilities.add: [SYS_PTRACE]) and hostPID: true"))
            } else {
                (SkipKind::Unreadable, format!("cannot read its executable: {e}"))
            }
        })?;
        if let Some(want) = &query.build_id {
            match &build_id {
                Some(have) if have == want => {}
                Some(have) if query.fixed_build_id.as_ref() == Some(have) => {
                    Self::check_path(&dir, &exe, query)?;
                    return Err((SkipKind::Fixed, format!("runs the fixed build {have} already")));
                }
                Some(have) => return Err((SkipKind::OtherBuild, format!("runs build id {have}, the bundle is for {want}"))),
                None => return Err((SkipKind::OtherBuild, format!("its executable has no GNU build id, the bundle is for {want}"))),
            }
        }
        Self::check_path(&dir, &exe, query)?;
        Ok(build_id)
    }

    /// The task's path inside the container's root is the process's executable (same file).
    fn check_path(dir: &Path, exe: &Path, query: &Query) -> Result<(), (SkipKind, String)> {
        if let Some(path) = &query.path {
            let exe_meta = fs::metadata(exe).map_err(|e| (SkipKind::Unreadable, format!("cannot stat its executable: {e}")))?;
            let in_root = stat_in_root(&dir.join("root"), path).map_err(|e| (SkipKind::OtherPath, format!("{path} inside its root: {e}")))?;
            if (in_root.dev, in_root.ino) != (exe_meta.dev(), exe_meta.ino()) {
                return Err((SkipKind::OtherPath, format!("does not run {path} (its executable is another file)")));
            }
        }
        Ok(())
    }

    /// Repeat every test of [`Discovery::find`] for one target, right before the engine touches
    /// it: same process (start time), still in the container of the pod, same executable.
    pub fn recheck(&self, target: &Target, query: &Query) -> Result<(), String> {
        let dir = self.pid_dir(target.pid);
        let start_time = read_start_time(&dir)?;
        if start_time != target.start_time {
            return Err(format!(
                "process {} is not the one discovered (start time {start_time}, expected {}): the PID was reused",
                target.pid, target.start_time
            ));
        }
        let cgroup = fs::read_to_string(dir.join("cgroup")).map_err(|e| format!("process {}: cannot read its cgroup: {e}", target.pid))?;
        match classify(&cgroup, &query.container_id, &query.pod_uid, query.pod_in_cgroup) {
            Membership::Member => {}
            Membership::OtherPod(uid) => return Err(format!("process {} belongs to pod {uid}", target.pid)),
            Membership::NotMember => return Err(format!("process {} is no longer in container {}", target.pid, query.container_id)),
        }
        let build_id = self.check_executable(target.pid, query).map_err(|(_, e)| format!("process {}: {e}", target.pid))?;
        if build_id != target.build_id {
            return Err(format!("process {} changed executable (exec) since discovery", target.pid));
        }
        Ok(())
    }
}

/// The identity of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

/// `stat` of `path` resolved inside `root` (a `/proc/PID/root` link): `openat2` with
/// `RESOLVE_IN_ROOT`, so absolute symbolic links inside the container resolve against the
/// container's root, never the agent's. Falls back to a plain lookup where `openat2` is missing
/// (Linux before 5.6).
fn stat_in_root(root: &Path, path: &str) -> std::io::Result<FileId> {
    use std::{ffi::CString, os::fd::FromRawFd, os::unix::ffi::OsStrExt};
    let relative = path.trim_start_matches('/');
    let root_c = CString::new(root.as_os_str().as_bytes()).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    let rel_c = CString::new(relative).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: open(2) on a NUL-terminated path; the descriptor is owned by `dir` below.
    let dirfd = unsafe { libc::open(root_c.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
    if dirfd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `dirfd` is a fresh descriptor we own.
    let dir = unsafe { std::fs::File::from_raw_fd(dirfd) };
    // SAFETY: `open_how` is plain data; all-zero is its documented default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2(2) with a valid descriptor, path and `open_how` of the size passed.
    let fd = unsafe {
        libc::syscall(libc::SYS_openat2, dirfd, rel_c.as_ptr(), &how as *const libc::open_how, std::mem::size_of::<libc::open_how>())
    };
    let meta = if fd < 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ENOSYS) {
            return Err(err);
        }
        fs::metadata(root.join(relative))?
    } else {
        // SAFETY: a fresh descriptor from openat2 that we own.
        let file = unsafe { std::fs::File::from_raw_fd(fd as i32) };
        file.metadata()?
    };
    drop(dir);
    Ok(FileId { dev: meta.dev(), ino: meta.ino() })
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.pid)
    }
}

#[cfg(test)]
pub(crate) mod tests;
#[cfg(test)]
mod skip_kinds;
