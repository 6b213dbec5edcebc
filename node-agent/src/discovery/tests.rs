//! Discovery on captured `/proc` trees: every cgroup layout (v1 and v2, systemd and cgroupfs)
//! of containerd, CRI-O and Docker, plus the refusals (host processes, other pods, other
//! executables, PID reuse, exec).
//!
//! Each fake process is a directory `<root>/<pid>` with `cgroup` and `stat` as the kernel writes
//! them, `exe` a symbolic link to a real ELF file (so build ids are read by the engine's reader)
//! and `root` a symbolic link to a rootfs directory.

use super::*;
use std::os::unix::fs::symlink;

use livepatch_testkit::skip;

pub(crate) const ID: &str = "4f2c8e1d9a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d";
pub(crate) const OTHER_ID: &str = "9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6f5e4d3c2b1a0f9e8d";
pub(crate) const UID: &str = "ba9860c8-36e9-4b0b-8461-d09d639b09c8";
pub(crate) const OTHER_UID: &str = "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b";

/// A fake proc root plus the rootfs directories its processes point into.
pub(crate) struct Tree {
    pub(crate) dir: tempfile::TempDir,
}

impl Tree {
    pub(crate) fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("proc")).unwrap();
        // Non-process entries of a real /proc are ignored.
        fs::create_dir(dir.path().join("proc/sys")).unwrap();
        fs::write(dir.path().join("proc/uptime"), "1.0 1.0\n").unwrap();
        Tree { dir }
    }

    pub(crate) fn proc_root(&self) -> PathBuf {
        self.dir.path().join("proc")
    }

    pub(crate) fn discovery(&self) -> Discovery {
        Discovery::new(self.proc_root())
    }

    /// A rootfs with `/usr/local/bin/app` a copy of `elf`; returns the rootfs path.
    pub(crate) fn rootfs(&self, name: &str, elf: &str) -> PathBuf {
        let root = self.dir.path().join(name);
        fs::create_dir_all(root.join("usr/local/bin")).unwrap();
        fs::copy(elf, root.join("usr/local/bin/app")).unwrap();
        root
    }

    /// A process running `exe` (a file) in `root`, with this cgroup file.
    pub(crate) fn process(&self, pid: i32, cgroup: &str, exe: &Path, root: &Path) {
        let dir = self.proc_root().join(pid.to_string());
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("cgroup"), cgroup).unwrap();
        self.set_stat(pid, 'S', 0, 1000 + pid as u64);
        symlink(exe, dir.join("exe")).unwrap();
        symlink(root, dir.join("root")).unwrap();
    }

    pub(crate) fn set_stat(&self, pid: i32, state: char, flags: u64, start: u64) {
        let stat = format!("{pid} (app (v1)) {state} 1 1 1 0 -1 {flags} 0 0 0 0 0 0 0 0 20 0 1 0 {start} 1000 100 18446744073709551615\n");
        fs::write(self.proc_root().join(pid.to_string()).join("stat"), stat).unwrap();
    }
}

pub(crate) fn build_id(path: &str) -> String {
    livepatch::elf::build_id_of(Path::new(path)).unwrap().expect("system binaries have a build id")
}

fn query(build_id: Option<String>, path: Option<&str>) -> Query {
    Query { container_id: ID.into(), pod_uid: UID.into(), build_id, fixed_build_id: None, path: path.map(String::from), pod_in_cgroup: false }
}

fn underscored(uid: &str) -> String {
    uid.replace('-', "_")
}

/// Every v1 hierarchy of a hybrid host plus the v2 line, all with `path`.
pub(crate) fn v1(path: &str) -> String {
    let controllers = ["name=systemd", "pids", "memory", "freezer", "devices", "cpuset", "cpu,cpuacct", "blkio", "net_cls,net_prio", "perf_event", "hugetlb", "misc"];
    let mut out = String::new();
    for (i, c) in controllers.iter().enumerate().rev() {
        out.push_str(&format!("{}:{c}:{path}\n", i + 1));
    }
    out.push_str(&format!("0::{path}\n"));
    out
}

/// Pure cgroup v2.
pub(crate) fn v2(path: &str) -> String {
    format!("0::{path}\n")
}

/// The layouts: (name, cgroup file content for the container `id` of pod `uid`).
pub(crate) fn layouts(id: &str, uid: &str) -> Vec<(&'static str, String)> {
    let u = underscored(uid);
    vec![
        ("v1 cgroupfs containerd", v1(&format!("/kubepods/besteffort/pod{uid}/{id}"))),
        ("v2 cgroupfs containerd", v2(&format!("/kubepods/besteffort/pod{uid}/{id}"))),
        (
            "v1 systemd containerd",
            v1(&format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/cri-containerd-{id}.scope")),
        ),
        (
            "v2 systemd containerd",
            v2(&format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/cri-containerd-{id}.scope")),
        ),
        ("v1 cgroupfs cri-o", v1(&format!("/kubepods/burstable/pod{uid}/crio-{id}"))),
        (
            "v2 systemd cri-o",
            v2(&format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/crio-{id}.scope")),
        ),
        (
            "v1 systemd cri-o",
            v1(&format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/crio-{id}.scope")),
        ),
        ("v1 cgroupfs docker", v1(&format!("/kubepods/pod{uid}/{id}"))),
        ("v2 systemd docker (guaranteed)", v2(&format!("/kubepods.slice/kubepods-pod{u}.slice/docker-{id}.scope"))),
        ("v1 systemd docker", v1(&format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/docker-{id}.scope"))),
        // A process that made its own sub-cgroup inside the container's (cgroup v2 delegation).
        ("v2 systemd containerd, nested", v2(&format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/cri-containerd-{id}.scope/worker"))),
    ]
}

#[test]
fn container_ids_of_the_three_runtimes() {
    assert_eq!(parse_container_id(&format!("containerd://{ID}")).unwrap(), ID);
    assert_eq!(parse_container_id(&format!("cri-o://{ID}")).unwrap(), ID);
    assert_eq!(parse_container_id(&format!("docker://{ID}")).unwrap(), ID);
    assert_eq!(parse_container_id(ID).unwrap(), ID);
    for bad in ["", "containerd://", "containerd://../etc", "containerd://a/b", "://abc", "containerd://abc.scope", "x://a b"] {
        assert!(parse_container_id(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn every_layout_is_recognised_and_cross_checked() {
    for (name, cgroup) in layouts(ID, UID) {
        assert_eq!(membership(&cgroup, ID, UID), Membership::Member, "{name}");
        // The pod UID as the API server writes it, in either case, matches the underscored form.
        assert_eq!(membership(&cgroup, ID, &UID.to_uppercase()), Membership::Member, "{name}");
        // The same path under another pod's UID is refused.
        assert_eq!(membership(&cgroup, ID, OTHER_UID), Membership::OtherPod(UID.into()), "{name}");
        // Another container of the same pod is not this one.
        assert_eq!(membership(&cgroup, OTHER_ID, UID), Membership::NotMember, "{name}");
    }
}

#[test]
fn near_misses_are_not_members() {
    let u = underscored(UID);
    for cgroup in [
        // CRI-O's monitor process for the container: not the container.
        v2(&format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/crio-conmon-{ID}.scope")),
        // The pod's own cgroup (the sandbox, other containers' parent).
        v2(&format!("/kubepods/besteffort/pod{UID}")),
        // Substrings and prefixes of the id.
        v2(&format!("/kubepods/besteffort/pod{UID}/{}", &ID[..12])),
        v2(&format!("/evil-{ID}")),
        v2(&format!("/kubepods/besteffort/pod{UID}/{ID}x")),
        v2(&format!("/system.slice/containerd.service/{ID}-shim")),
        // Host processes.
        v1("/"),
        v2("/system.slice/kubelet.service"),
        "garbage without colons\n\n".to_string(),
    ] {
        assert_eq!(membership(&cgroup, ID, UID), Membership::NotMember, "{cgroup}");
    }
    // `ctr run` without --cgroup: /<namespace>/<id>, no pod in the path: the id alone decides,
    // unless the pod must be in the path (the id is only the task's word).
    assert_eq!(membership(&v2(&format!("/k8s.io/{ID}")), ID, UID), Membership::Member);
    assert_eq!(classify(&v2(&format!("/k8s.io/{ID}")), ID, UID, true), Membership::NotMember);
    assert_eq!(classify(&v1(&format!("/docker/{ID}")), ID, UID, true), Membership::NotMember);
    for (name, cgroup) in layouts(ID, UID) {
        assert_eq!(classify(&cgroup, ID, UID, true), Membership::Member, "{name}");
    }
}

#[test]
fn finds_the_container_processes_in_every_layout() {
    let bid = build_id("/bin/true");
    for (name, cgroup) in layouts(ID, UID) {
        let tree = Tree::new();
        let root = tree.rootfs("rootfs", "/bin/true");
        let exe = root.join("usr/local/bin/app");
        tree.process(1, &v1("/"), Path::new("/bin/false"), Path::new("/"));
        tree.process(4242, &cgroup, &exe, &root);
        tree.process(4250, &cgroup, &exe, &root);
        let (other_name, other_cgroup) = &layouts(OTHER_ID, OTHER_UID)[0];
        tree.process(5000, other_cgroup, &exe, &root);
        let found = tree.discovery().find(&query(Some(bid.clone()), Some("/usr/local/bin/app"))).unwrap();
        assert_eq!(
            found.targets,
            vec![
                Target { pid: 4242, start_time: 5242, build_id: Some(bid.clone()) },
                Target { pid: 4250, start_time: 5250, build_id: Some(bid.clone()) }
            ],
            "{name} (other pod: {other_name})"
        );
        assert!(found.skipped.is_empty() && found.other_pod.is_empty(), "{name}: {found:?}");
    }
}

#[test]
fn refuses_host_processes_and_other_pods() {
    let tree = Tree::new();
    let root = tree.rootfs("rootfs", "/bin/true");
    let exe = root.join("usr/local/bin/app");
    let bid = build_id("/bin/true");
    // Host processes running the very same executable.
    tree.process(1, &v1("/"), &exe, Path::new("/"));
    tree.process(77, &v2("/system.slice/kubelet.service"), &exe, Path::new("/"));
    // A process of another pod (other container id, other pod UID).
    tree.process(300, &layouts(OTHER_ID, OTHER_UID)[3].1, &exe, &root);
    // A process whose cgroup names our container id under another pod's UID.
    tree.process(301, &layouts(ID, OTHER_UID)[0].1, &exe, &root);
    let found = tree.discovery().find(&query(Some(bid.clone()), None)).unwrap();
    assert!(found.targets.is_empty(), "{found:?}");
    assert!(found.container_absent());
    assert_eq!(found.other_pod.len(), 1);
    assert_eq!(found.other_pod[0].pid, 301);
    assert!(found.other_pod[0].reason.contains(OTHER_UID), "{:?}", found.other_pod);

    // And a PID of another pod given to recheck (as if discovery had been fooled) is refused.
    let forged = Target { pid: 300, start_time: 1300, build_id: Some(bid.clone()) };
    let err = tree.discovery().recheck(&forged, &query(Some(bid.clone()), None)).unwrap_err();
    assert!(err.contains("no longer in container"), "{err}");
    let forged = Target { pid: 301, start_time: 1301, build_id: Some(bid.clone()) };
    let err = tree.discovery().recheck(&forged, &query(Some(bid), None)).unwrap_err();
    assert!(err.contains(OTHER_UID), "{err}");
}

#[test]
fn filters_by_build_id_and_path() {
    let tree = Tree::new();
    let root = tree.rootfs("rootfs", "/bin/true");
    fs::copy("/bin/false", root.join("usr/local/bin/other")).unwrap();
    // An absolute symbolic link inside the container resolves inside the container's root.
    symlink("/usr/local/bin/app", root.join("usr/local/bin/link")).unwrap();
    let cgroup = &layouts(ID, UID)[1].1;
    tree.process(10, cgroup, &root.join("usr/local/bin/app"), &root);
    tree.process(11, cgroup, &root.join("usr/local/bin/other"), &root);
    // Same build id, but a copy at another path than the task names.
    fs::copy("/bin/true", root.join("usr/local/bin/copy")).unwrap();
    tree.process(12, cgroup, &root.join("usr/local/bin/copy"), &root);
    let bid = build_id("/bin/true");
    let d = tree.discovery();

    let found = d.find(&query(Some(bid.clone()), None)).unwrap();
    assert_eq!(found.targets.iter().map(|t| t.pid).collect::<Vec<_>>(), vec![10, 12]);
    assert_eq!(found.skipped.len(), 1);
    assert_eq!(found.skipped[0].pid, 11);
    assert!(found.skipped[0].reason.contains(&build_id("/bin/false")), "{:?}", found.skipped);

    let found = d.find(&query(Some(bid.clone()), Some("/usr/local/bin/app"))).unwrap();
    assert_eq!(found.targets.iter().map(|t| t.pid).collect::<Vec<_>>(), vec![10]);
    let reasons: Vec<_> = found.skipped.iter().map(|s| (s.pid, s.reason.clone())).collect();
    assert!(reasons.iter().any(|(pid, r)| *pid == 12 && r.contains("does not run /usr/local/bin/app")), "{reasons:?}");

    let found = d.find(&query(Some(bid.clone()), Some("/usr/local/bin/link"))).unwrap();
    assert_eq!(found.targets.iter().map(|t| t.pid).collect::<Vec<_>>(), vec![10]);

    let found = d.find(&query(Some(bid), Some("/no/such/file"))).unwrap();
    assert!(found.targets.is_empty());
    let missing: Vec<i32> = found.skipped.iter().filter(|s| s.reason.contains("/no/such/file")).map(|s| s.pid).collect();
    assert_eq!(missing, vec![10, 12], "{:?}", found.skipped);

    // Without a build id every process of the container is a target (revert uses the patch
    // headers, not the build id).
    let found = d.find(&query(None, None)).unwrap();
    assert_eq!(found.targets.len(), 3);
}

#[test]
fn zombies_kernel_threads_and_vanished_processes() {
    let tree = Tree::new();
    let root = tree.rootfs("rootfs", "/bin/true");
    let exe = root.join("usr/local/bin/app");
    let cgroup = &layouts(ID, UID)[0].1;
    tree.process(20, cgroup, &exe, &root);
    tree.set_stat(20, 'Z', 0, 1020);
    tree.process(21, cgroup, &exe, &root);
    tree.set_stat(21, 'S', 0x0020_0000, 1021);
    // A process that vanished between readdir and reading its files.
    fs::create_dir(tree.proc_root().join("22")).unwrap();
    let found = tree.discovery().find(&query(Some(build_id("/bin/true")), None)).unwrap();
    assert!(found.targets.is_empty());
    let reasons: Vec<_> = found.skipped.iter().map(|s| (s.pid, s.reason.as_str())).collect();
    assert_eq!(reasons, vec![(20, "exited (zombie)"), (21, "kernel thread")]);
}

#[test]
fn recheck_guards_pid_reuse_and_exec() {
    let tree = Tree::new();
    let root = tree.rootfs("rootfs", "/bin/true");
    let exe = root.join("usr/local/bin/app");
    let cgroup = &layouts(ID, UID)[3].1;
    tree.process(30, cgroup, &exe, &root);
    let d = tree.discovery();
    let q = query(Some(build_id("/bin/true")), None);
    let target = d.find(&q).unwrap().targets.remove(0);
    assert_eq!(d.recheck(&target, &q), Ok(()));

    // The PID now names another process (another start time).
    tree.set_stat(30, 'S', 0, 99_999);
    let err = d.recheck(&target, &q).unwrap_err();
    assert!(err.contains("PID was reused"), "{err}");
    tree.set_stat(30, 'S', 0, target.start_time);

    // The process moved out of the container's cgroup.
    fs::write(tree.proc_root().join("30/cgroup"), v2("/")).unwrap();
    assert!(d.recheck(&target, &q).unwrap_err().contains("no longer in container"));
    fs::write(tree.proc_root().join("30/cgroup"), cgroup).unwrap();

    // The process exec'd another executable.
    fs::remove_file(tree.proc_root().join("30/exe")).unwrap();
    symlink("/bin/false", tree.proc_root().join("30/exe")).unwrap();
    assert!(d.recheck(&target, &q).unwrap_err().contains("build id"));

    // The process exited.
    fs::remove_dir_all(tree.proc_root().join("30")).unwrap();
    assert!(d.recheck(&target, &q).is_err());
}

#[test]
fn bad_queries_and_unreadable_proc() {
    let tree = Tree::new();
    let mut q = query(None, None);
    q.pod_uid = "../x".into();
    assert!(matches!(tree.discovery().find(&q), Err(DiscoveryError::BadPodUid(_))));
    let mut q = query(None, None);
    q.container_id = "a/b".into();
    assert!(matches!(tree.discovery().find(&q), Err(DiscoveryError::BadContainerId(_))));
    let missing = Discovery::new(tree.dir.path().join("nope"));
    assert!(matches!(missing.find(&query(None, None)), Err(DiscoveryError::ProcUnreadable { .. })));
}

/// The real /proc of this machine: this test process is in no container of that pod.
#[test]
fn the_real_proc_has_no_such_container() {
    let found = Discovery::default().find(&query(None, None)).unwrap();
    assert!(found.targets.is_empty() && found.other_pod.is_empty());
}

/// Real cgroups for the real-process test: a private directory in the first writable hierarchy
/// (removed, with the processes in it killed, on drop).
struct TestCgroups {
    base: PathBuf,
    dirs: Vec<PathBuf>,
    children: Vec<std::process::Child>,
    raw_children: Vec<i32>,
}

impl TestCgroups {
    fn new() -> Option<TestCgroups> {
        let name = format!("livepatch-discovery-test-{}-{}", std::process::id(), unique());
        for root in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup/systemd", "/sys/fs/cgroup/pids", "/sys/fs/cgroup"] {
            let root = Path::new(root);
            if !root.join("cgroup.procs").exists() {
                continue;
            }
            if fs::create_dir(root.join(&name)).is_ok() {
                let base = root.join(&name);
                return Some(TestCgroups { dirs: vec![base.clone()], base, children: vec![], raw_children: vec![] });
            }
        }
        None
    }

    /// A cgroup at `path` below the private directory.
    fn make(&mut self, path: &str) -> PathBuf {
        let mut dir = self.base.clone();
        for part in path.split('/') {
            dir = dir.join(part);
            if !dir.exists() {
                fs::create_dir(&dir).unwrap();
                self.dirs.push(dir.clone());
            }
        }
        dir
    }

    fn enter(&self, cgroup: &Path, pid: i32) {
        fs::write(cgroup.join("cgroup.procs"), pid.to_string()).unwrap();
    }

    /// `sleep 60`, in `cgroup` if given.
    fn sleep(&mut self, cgroup: Option<&Path>) -> i32 {
        let child = std::process::Command::new(sleep_path()).arg("60").spawn().unwrap();
        let pid = child.id() as i32;
        self.children.push(child);
        if let Some(c) = cgroup {
            self.enter(c, pid);
        }
        pid
    }
}

impl Drop for TestCgroups {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for pid in &self.raw_children {
            // SAFETY: plain syscalls on our own child.
            unsafe {
                libc::kill(*pid, libc::SIGKILL);
                libc::waitpid(*pid, std::ptr::null_mut(), 0);
            }
        }
        for d in self.dirs.iter().rev() {
            let _ = fs::remove_dir(d);
        }
    }
}

fn unique() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

fn sleep_path() -> PathBuf {
    fs::canonicalize("/bin/sleep").unwrap()
}

/// Start `exe 60` with exactly PID `pid` (clone3 with set_tid: needs CAP_SYS_ADMIN).
fn spawn_with_pid(pid: i32, exe: &Path) -> std::io::Result<i32> {
    use std::{ffi::CString, os::unix::ffi::OsStrExt};
    #[repr(C)]
    #[derive(Default)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
    }
    let path = CString::new(exe.as_os_str().as_bytes()).unwrap();
    let (arg0, arg1) = (CString::new("sleep").unwrap(), CString::new("60").unwrap());
    let argv = [arg0.as_ptr(), arg1.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    let tids = [pid as libc::pid_t];
    let args = CloneArgs { exit_signal: libc::SIGCHLD as u64, set_tid: tids.as_ptr() as u64, set_tid_size: 1, ..Default::default() };
    // SAFETY: clone3 without CLONE_VM is a fork; the child only calls execve and _exit.
    let r = unsafe { libc::syscall(libc::SYS_clone3, &args as *const CloneArgs, std::mem::size_of::<CloneArgs>()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if r == 0 {
        // SAFETY: async-signal-safe calls only, in the child.
        unsafe {
            libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
            libc::_exit(127);
        }
    }
    Ok(r as i32)
}

/// Real processes in real cgroups, on this machine's `/proc` (needs root, a writable cgroup
/// hierarchy and clone3 with set_tid; without them it fails unless LIVEPATCH_ALLOW_SKIP=1): discovery and the re-check find exactly the process placed in the container's
/// cgroup under the pod's UID, and refuse a host process, a process of another pod (another
/// namespace's, say), a process of the same container id under another pod's UID, all running
/// the same executable, and finally a PID reused by a new process (same PID, same cgroup, same
/// executable: only the start time differs).
#[test]
fn real_processes_host_other_pod_and_pid_reuse() {
    if !skip::root() {
        return skip::missing("the real-process discovery test needs root (cgroups, clone3 with set_tid)", "run the tests as root");
    }
    let Some(mut cg) = TestCgroups::new() else {
        return skip::missing("no writable cgroup hierarchy under /sys/fs/cgroup", "run as root on a host or privileged container with cgroupfs mounted read-write");
    };
    // Ids of this run only (another run of this test at the same time has its own).
    let n = unique();
    let id = format!("{:064x}", n ^ 0x1f);
    let other_id = format!("{:064x}", n ^ 0x2e);
    let h = format!("{:032x}", n.wrapping_mul(31));
    let uid = format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..]);
    let h = format!("{:032x}", n.wrapping_mul(37));
    let other_uid = format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..]);

    let ours = cg.make(&format!("kubepods/besteffort/pod{uid}/{id}"));
    let theirs = cg.make(&format!("kubepods/besteffort/pod{other_uid}/{other_id}"));
    let clash = cg.make(&format!("kubepods/burstable/pod{other_uid}/{id}"));
    let pid = cg.sleep(Some(&ours));
    let host = cg.sleep(None);
    let other = cg.sleep(Some(&theirs));
    let same_id_other_pod = cg.sleep(Some(&clash));

    let exe = sleep_path();
    let q = Query {
        container_id: id.clone(),
        pod_uid: uid.clone(),
        build_id: Some(build_id(exe.to_str().unwrap())),
        fixed_build_id: None,
        path: Some(exe.to_str().unwrap().into()),
        pod_in_cgroup: true,
    };
    let d = Discovery::default();
    let found = d.find(&q).unwrap();
    assert_eq!(found.targets.iter().map(|t| t.pid).collect::<Vec<_>>(), vec![pid], "{found:?}");
    assert!(found.skipped.is_empty(), "{found:?}");
    assert_eq!(found.other_pod.iter().map(|s| s.pid).collect::<Vec<_>>(), vec![same_id_other_pod], "{found:?}");
    let target = found.targets[0].clone();
    assert_eq!(d.recheck(&target, &q), Ok(()));

    // PIDs that did not come from discovery, with their true start times: refused.
    let proc = Path::new("/proc");
    for (forged, expect) in [(host, "no longer in container".to_string()), (other, "no longer in container".to_string()), (same_id_other_pod, format!("belongs to pod {other_uid}"))] {
        let t = Target { pid: forged, start_time: read_start_time(&proc.join(forged.to_string())).unwrap(), build_id: target.build_id.clone() };
        let err = d.recheck(&t, &q).unwrap_err();
        assert!(err.contains(&expect), "pid {forged}: {err}");
    }

    // The process exits and a new one gets its PID, in the same cgroup, running the same file.
    let mut first = cg.children.remove(0);
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(d.recheck(&target, &q).is_err(), "gone");
    std::thread::sleep(std::time::Duration::from_millis(30)); // another clock tick
    match spawn_with_pid(pid, &exe) {
        Ok(again) => {
            cg.raw_children.push(again);
            assert_eq!(again, pid);
            cg.enter(&ours, again);
            // Wait for the exec.
            for _ in 0..200 {
                if fs::read_link(format!("/proc/{again}/exe")).ok() == Some(exe.clone()) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            let err = d.recheck(&target, &q).unwrap_err();
            assert!(err.contains("PID was reused"), "{err}");
            // A fresh discovery finds the new process, under its own start time.
            let found = d.find(&q).unwrap();
            assert_eq!(found.targets.len(), 1, "{found:?}");
            assert_eq!(found.targets[0].pid, pid);
            assert!(found.targets[0].start_time > target.start_time);
        }
        Err(e) => skip::missing(&format!("PID reuse on real processes: clone3 with set_tid failed: {e}"), "run as root in the initial PID namespace on Linux 5.5 or later"),
    }
}
