//! A real container: the agent's discovery finds a C program running under containerd by
//! container id + pod UID, and the engine (through the agent's per-process path: re-check,
//! status first, apply / revert) patches it across the container's PID and mount namespaces.
//! The container's own stdout (a file on the host) shows the new code running, then the old one
//! again after the revert.
//!
//! Needs root (containerd, ptrace). The test starts the project's private containerd itself
//! (`scripts/containerd.sh start`) and stops it again if it started it; if containerd or runc is
//! missing it installs the distribution's packages (`apt-get install containerd runc`) and fails
//! if that does not work. Run as non-root it fails too, unless `LIVEPATCH_ALLOW_SKIP=1` says to
//! skip it (printed as SKIPPED): it never passes silently without a container.

use std::{
    fs,
    io::Read,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use livepatch::{apply, bundle::Bundle, elf::ElfFile, watchpoint::Strategy};
use node_agent::{
    discovery::{Discovery, Query},
    engine::{self, LiveEngine, Outcome},
};

use livepatch_testkit::skip;

const NS: &str = "livepatch-agent-test";

const V1: &str = r#"#include <stdio.h>
#include <unistd.h>
long ticks;
__attribute__((noinline)) const char *greeting(long n) {
    return (n % 2) ? "hello from v1" : "hello from v1 again";
}
int main(void) {
    for (;;) {
        ticks++;
        printf("%ld %s pid-in-container %d\n", ticks, greeting(ticks), (int)getpid());
        fflush(stdout);
        usleep(50000);
    }
}
"#;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().unwrap()
}

fn sh(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// containerd and runc from the distribution's packages, installed if missing.
fn ensure_containerd() {
    if skip::have("containerd") && skip::have("runc") && skip::have("ctr") {
        return;
    }
    eprintln!("containerd/runc missing: installing the distribution's packages");
    let (_, update) = sh(Command::new("apt-get").arg("update"));
    let (ok, out) = sh(Command::new("apt-get").args(["install", "-y", "--no-install-recommends", "containerd", "runc"]).env("DEBIAN_FRONTEND", "noninteractive"));
    assert!(ok && skip::have("containerd") && skip::have("runc"), "cannot install containerd and runc:\n{update}\n{out}");
}

/// Everything to undo, undone on drop (also when an assertion fails).
struct Cleanup {
    script: PathBuf,
    socket: String,
    started_containerd: bool,
    container: Option<String>,
    ctr: Option<Child>,
    host_child: Option<Child>,
    pod_uid: String,
}

impl Cleanup {
    fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.args(["--address", &self.socket, "-n", NS]);
        c
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut child) = self.host_child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(id) = self.container.take() {
            let _ = self.ctr().args(["tasks", "kill", "-s", "SIGKILL", &id]).output();
            if let Some(mut ctr) = self.ctr.take() {
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline && matches!(ctr.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = ctr.kill();
                let _ = ctr.wait();
            }
            let _ = self.ctr().args(["tasks", "delete", &id]).output();
            let _ = self.ctr().args(["containers", "delete", &id]).output();
        }
        // runc leaves the empty parents of the container's cgroup.
        if let Ok(entries) = fs::read_dir("/sys/fs/cgroup") {
            let mut hierarchies: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
            hierarchies.push(PathBuf::from("/sys/fs/cgroup"));
            for h in hierarchies {
                for d in [format!("kubepods/besteffort/pod{}", self.pod_uid), "kubepods/besteffort".into(), "kubepods".into()] {
                    let _ = fs::remove_dir(h.join(d));
                }
            }
        }
        let _ = self.ctr().args(["namespaces", "rm", NS]).output();
        if self.started_containerd {
            let _ = Command::new("bash").arg(&self.script).arg("stop").status();
        }
    }
}

fn compile(dir: &Path, name: &str, src: &str) -> PathBuf {
    let c = dir.join(format!("{name}.c"));
    fs::write(&c, src).unwrap();
    let out = dir.join(name);
    let (ok, text) = sh(Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args(["-O2", "-g0", "-flive-patching=inline-clone", "-fPIE", "-pie", "-Wl,--build-id", "-o"])
        .arg(&out)
        .arg(&c));
    assert!(ok, "cc failed: {text}");
    out
}

/// A rootfs with the program at /usr/local/bin/app and the shared libraries it needs (ldd).
fn rootfs(dir: &Path, program: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    fs::create_dir_all(root.join("usr/local/bin")).unwrap();
    fs::copy(program, root.join("usr/local/bin/app")).unwrap();
    let (ok, ldd) = sh(Command::new("ldd").arg(program));
    assert!(ok, "ldd: {ldd}");
    for line in ldd.lines() {
        let path = line.split_whitespace().find(|w| w.starts_with('/'));
        if let Some(path) = path {
            let dest = root.join(path.trim_start_matches('/'));
            fs::create_dir_all(dest.parent().unwrap()).unwrap();
            fs::copy(path, &dest).unwrap_or_else(|e| panic!("copying {path}: {e}"));
        }
    }
    root
}

/// The lines the container printed so far.
fn output(path: &Path) -> Vec<String> {
    let mut s = String::new();
    fs::File::open(path).unwrap().read_to_string(&mut s).unwrap();
    s.lines().map(String::from).collect()
}

/// Wait until a line printed after `from` lines contains `needle`.
fn wait_for(path: &Path, from: usize, needle: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let lines = output(path);
        if lines.iter().skip(from).any(|l| l.contains(needle)) {
            return lines;
        }
        assert!(Instant::now() < deadline, "no line with {needle:?} after line {from}; output:\n{}", lines.join("\n"));
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn patches_a_container_found_by_container_id_and_pod_uid() {
    let t0 = Instant::now();
    let step = |what: &str| eprintln!("[{:>6.2} s] {what}", t0.elapsed().as_secs_f64());
    if !skip::root() {
        return skip::missing("the container test needs root (containerd, ptrace)", "run the tests as root");
    }
    ensure_containerd();
    let script = repo_root().join("scripts/containerd.sh");
    assert!(script.exists(), "{} is missing", script.display());
    let (_, env) = sh(Command::new("bash").arg(&script).arg("env"));
    let socket = env.trim().strip_prefix("CONTAINERD_ADDRESS=").expect("containerd.sh env").to_string();
    // (`ctr version` on a missing socket waits for its dial timeout: look for the socket first.)
    let running = Path::new(&socket).exists() && Command::new("bash").arg(&script).arg("status").stderr(Stdio::null()).status().unwrap().success();
    let pod_uid = fs::read_to_string("/proc/sys/kernel/random/uuid").unwrap().trim().to_string();
    let mut cleanup = Cleanup { script: script.clone(), socket, started_containerd: false, container: None, ctr: None, host_child: None, pod_uid: pod_uid.clone() };
    if !running {
        let (ok, out) = sh(Command::new("bash").arg(&script).arg("start"));
        assert!(ok, "scripts/containerd.sh start failed:\n{out}");
        cleanup.started_containerd = true;
    }

    step("containerd up");
    // v1 and v2 of the program, the bundle, the rootfs.
    let work = tempfile::tempdir().unwrap();
    let v1 = compile(work.path(), "v1", V1);
    let v2 = compile(work.path(), "v2", &V1.replace("\"hello from v1\" : \"hello from v1 again\"", "\"hello from v2\" : \"hello from v2 again\""));
    let (manifest, blob, _) = livepatch::extract::build(&ElfFile::open(&v1).unwrap(), &ElfFile::open(&v2).unwrap(), &Default::default()).unwrap();
    let bundle = Bundle::write(&manifest, &blob, &work.path().join("fix.lpatch")).unwrap();
    let root = rootfs(work.path(), &v1);

    step("compiled v1/v2, bundle and rootfs built");
    // The container, in the kubelet's cgroupfs layout for pod `pod_uid`; its stdout to a file.
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let id = format!("lpagent{:x}{:x}", std::process::id(), nanos);
    let cgroup = format!("/kubepods/besteffort/pod{pod_uid}/{id}");
    let out_path = work.path().join("container.out");
    let out_file = fs::File::create(&out_path).unwrap();
    let ctr = cleanup
        .ctr()
        .args(["run", "--rm", "--rootfs", "--cgroup", &cgroup])
        .arg(&root)
        .args([&id, "/usr/local/bin/app"])
        .stdout(out_file.try_clone().unwrap())
        .stderr(out_file)
        .stdin(Stdio::null())
        .spawn()
        .expect("ctr run");
    cleanup.ctr = Some(ctr);
    cleanup.container = Some(id.clone());
    let lines = wait_for(&out_path, 0, "hello from v1");
    assert!(lines[0].ends_with("pid-in-container 1"), "own PID namespace: {lines:?}");

    step("container prints v1");
    // The same executable running on the host: never the container's.
    let host = Command::new(&v1).stdout(Stdio::null()).spawn().unwrap();
    let host_pid = host.id() as i32;
    cleanup.host_child = Some(host);

    // containerd's view of the task's host PID.
    let (_, tasks) = sh(cleanup.ctr().args(["tasks", "ls"]));
    let task_pid: i32 = tasks
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&id.as_str())).then(|| f[1].parse().unwrap())
        })
        .unwrap_or_else(|| panic!("task {id} not in {tasks}"));

    // Discovery: by container id (as the pod status writes it) and pod UID.
    let discovery = Discovery::default();
    let query = Query {
        container_id: node_agent::discovery::parse_container_id(&format!("containerd://{id}")).unwrap(),
        pod_uid: pod_uid.clone(),
        build_id: Some(bundle.manifest.target.build_id.clone()),
        path: Some("/usr/local/bin/app".into()),
        fixed_build_id: None,
        pod_in_cgroup: false,
    };
    let found = discovery.find(&query).unwrap();
    assert_eq!(found.targets.iter().map(|t| t.pid).collect::<Vec<_>>(), vec![task_pid], "{found:?}");
    assert!(found.targets.iter().all(|t| t.pid != host_pid));
    let target = found.targets[0].clone();
    // The kubelet-style cgroup names the pod: found under the strict rule of reverts too.
    let strict = Query { pod_in_cgroup: true, ..query.clone() };
    assert_eq!(discovery.find(&strict).unwrap().targets, found.targets);
    assert_ne!(fs::read_link(format!("/proc/{task_pid}/ns/pid")).unwrap(), fs::read_link("/proc/self/ns/pid").unwrap());
    assert_ne!(fs::read_link(format!("/proc/{task_pid}/ns/mnt")).unwrap(), fs::read_link("/proc/self/ns/mnt").unwrap());
    // Another pod's UID: the container's process is refused, not found.
    let other = Query { pod_uid: "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b".into(), ..query.clone() };
    let refused = discovery.find(&other).unwrap();
    assert!(refused.targets.is_empty() && refused.other_pod.iter().any(|s| s.pid == task_pid), "{refused:?}");
    // The host process is never attributed to the container, even when asked for by PID.
    let forged = node_agent::discovery::Target { pid: host_pid, ..target.clone() };
    assert!(discovery.recheck(&forged, &query).is_err());

    step("discovery checks done");
    // Apply through the agent's per-process path.
    let opts = apply::Options { strategy: Strategy::Trap, timeout: Duration::from_secs(30), ..Default::default() };
    let before = output(&out_path).len();
    let outcome = engine::apply_one(&LiveEngine, &discovery, &query, &target, &bundle, &opts);
    match &outcome {
        Outcome::Applied { pid, already: false, pause_us, .. } => {
            assert_eq!(*pid, task_pid);
            eprintln!("applied {} to container pid {pid} (host), paused {pause_us} us", bundle.patch_id());
        }
        other => panic!("apply: {other:?}"),
    }
    let lines = wait_for(&out_path, before, "hello from v2");
    // Same process, state kept: the tick counter went on.
    let ticks = |l: &str| l.split_whitespace().next().unwrap().parse::<u64>().unwrap();
    let first_v2 = lines.iter().find(|l| l.contains("hello from v2")).unwrap();
    assert!(ticks(first_v2) > ticks(&lines[before - 1]), "{lines:?}");
    assert!(lines.iter().skip(before).all(|l| l.ends_with("pid-in-container 1")));

    step("container prints v2");
    // Idempotent: read from the process, not applied twice.
    match engine::apply_one(&LiveEngine, &discovery, &query, &target, &bundle, &opts) {
        Outcome::Applied { already: true, .. } => {}
        other => panic!("second apply: {other:?}"),
    }
    let st = livepatch::status::status(task_pid).unwrap();
    assert_eq!(st.patches.iter().filter(|p| p.state == "applied").count(), 1);
    // The host process still runs v1, untouched.
    assert!(livepatch::status::status(host_pid).unwrap().patches.is_empty());

    step("idempotence checked");
    // Revert: the container prints v1 again.
    let before = output(&out_path).len();
    let patch_id = bundle.patch_id();
    match engine::revert_one(&LiveEngine, &discovery, &query, &target, &patch_id, &bundle.digest, Strategy::Trap, Duration::from_secs(30)) {
        Outcome::Reverted { was_applied: true, .. } => {}
        other => panic!("revert: {other:?}"),
    }
    wait_for(&out_path, before + 1, "hello from v1");
    match engine::revert_one(&LiveEngine, &discovery, &query, &target, &patch_id, &bundle.digest, Strategy::Trap, Duration::from_secs(30)) {
        Outcome::Reverted { was_applied: false, .. } => {}
        other => panic!("second revert: {other:?}"),
    }
    step("reverted; cleaning up");
    drop(cleanup);
    step("cleaned up");
}
