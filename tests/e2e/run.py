#!/usr/bin/env python3
"""End-to-end scenarios of livepatch on a real Kubernetes API server (issue 6).

    tests/e2e/run.py [--keep] [--only NAME[,NAME...]] [--list]

What is real: etcd and kube-apiserver v1.34 (tests/cluster/harness.sh: RBAC, Pod Security and
CEL validation on), the chart installed with `helm install` (CRDs from charts/livepatch/crds),
the operator (two replicas) and the node agent as processes started with the command, args and
env of the chart's rendered Deployment and DaemonSet and with the tokens of the chart's
ServiceAccounts (so a permission missing from the chart fails a scenario), and the target
containers (containerd + runc, `ctr run --rootfs`, in the kubelet's cgroup layout).

What the test plays: the kubelet. It creates the Node and the Pods, starts their containers and
writes the pods' status (`containerd://<id>`), restarts containers and recreates pods. There is
no garbage collector either: after a LivePatch is gone the test deletes its orphaned tasks.

Every scenario asserts on the API objects and on the targets' own output (each container logs
one line per request, "v1 hello ..." before the patch, "v2 hello ..." after it).

Python 3 standard library only, plus kubectl/helm/ctr subprocesses. Needs root (containers,
ptrace) and scripts/setup.sh. Ends with "N passed, M failed"; exits 1 unless all passed.
Everything it starts (API server, etcd, containerd if it was not running, containers,
operator and agent processes) is stopped on any exit; --keep keeps the work directory
(always kept on failure).
"""

import argparse
import base64
import glob
import hashlib
import random
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
E2E = os.path.join(ROOT, "tests", "e2e")
CACHE = os.environ.get("LIVEPATCH_CACHE", os.path.expanduser("~/.cache/livepatch"))
HELM = os.environ.get("HELM", os.path.join(CACHE, "bin", "helm"))
KUBECTL = os.environ.get("KUBECTL", shutil.which("kubectl") or os.path.join(CACHE, "bin", "kubectl"))
HARNESS = os.path.join(ROOT, "tests", "cluster", "harness.sh")
CONTAINERD_SH = os.path.join(ROOT, "scripts", "containerd.sh")
CHART = os.path.join(ROOT, "charts", "livepatch")
BIN = os.environ.get("LIVEPATCH_BIN_DIR", os.path.join(ROOT, "target", "release"))
CC = os.environ.get("CC", "cc")
CFLAGS = ["-O2", "-flive-patching=inline-clone", "-fPIE", "-pie", "-Wl,--build-id"]

RELEASE = "livepatch"
RELEASE_NS = "livepatch-system"
APP_NS = "shop"
NODE = "node-1"
CTR_NS = "livepatch-e2e"
TARGET_PATH = "/app/greeter"
# Fully qualified resource names (see the kubectl-names scenario for the short ones).
LP = "livepatches.livepatch.dev"
LPT = "livepatchtasks.livepatch.dev"
T0 = time.monotonic()


def log(msg):
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


class Fail(Exception):
    """A failed assertion: the message says what was expected and what was seen."""


class Blocked(Exception):
    """A scenario cannot run because a component lacks a capability it needs (reported)."""


def run(cmd, check=True, input=None, env=None, timeout=120, cwd=None):
    p = subprocess.run(cmd, input=input, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
    if check and p.returncode != 0:
        raise Fail(f"command failed (exit {p.returncode}): {' '.join(cmd)}\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
    return p


def wait_until(what, fn, timeout=60.0, interval=0.25):
    """Poll fn() until it returns something truthy; Fail with the last value seen."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            v = fn()
            if v:
                return v
            last = v
        except Fail as e:
            last = f"error: {e}"
        if time.monotonic() > deadline:
            raise Fail(f"timed out after {timeout:.0f}s waiting for {what}; last seen: {str(last)[:1500]}")
        time.sleep(interval)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=3):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return None, str(e)


def metric(text, name, labels=None):
    """The value of one OpenMetrics sample (None when absent)."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if not m or m.group(1) != name:
            continue
        if labels and not all(f'{k}="{v}"' in (m.group(2) or "") for k, v in labels.items()):
            continue
        return float(m.group(3))
    return None


# ---------------------------------------------------------------------------------------------
# Kubernetes access


class Kube:
    def __init__(self, kubeconfig, who="admin"):
        self.kubeconfig = kubeconfig
        self.who = who

    def __call__(self, *args, check=True, input=None, timeout=60):
        return run([KUBECTL, "--kubeconfig", self.kubeconfig, *args], check=check, input=input, timeout=timeout)

    def get(self, kind, name=None, ns=None, selector=None):
        args = ["get", kind, "-o", "json"]
        if name:
            # (kubectl 1.32 answers a missing object with "you must specify only one
            # resource" under -o json unless --ignore-not-found: then it prints nothing)
            args += [name, "--ignore-not-found"]
        if ns:
            args += ["-n", ns]
        if selector:
            args += ["-l", selector]
        p = self(*args, check=False)
        if p.returncode != 0:
            raise Fail(f"kubectl get {kind} {name or ''} as {self.who}: {p.stderr.strip()}")
        if name and not p.stdout.strip():
            return None
        obj = json.loads(p.stdout)
        return obj if name else obj["items"]

    def apply(self, obj, ns=None):
        args = ["apply", "-f", "-"] + (["-n", ns] if ns else [])
        return self(*args, input=json.dumps(obj) if isinstance(obj, dict) else obj)

    def can_i(self, verb, resource, ns=None, subresource=None, name=None):
        args = ["auth", "can-i", verb, resource + (f"/{name}" if name else "")]
        if subresource:
            args += ["--subresource", subresource]
        args += ["-n", ns] if ns else ["--all-namespaces"]
        p = self(*args, check=False)
        return p.stdout.strip() == "yes"


def condition(obj, ctype):
    for c in (obj or {}).get("status", {}).get("conditions", []) or []:
        if c["type"] == ctype:
            return c
    return {}


def now_rfc3339():
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------------------------------------
# Targets: compiled C programs, one rootfs directory per container


class Targets:
    """Compiles tests/e2e/targets/greeter-vN.c and builds a rootfs template per version."""

    def __init__(self, work):
        self.work = work
        self.exe = {}
        self.rootfs = {}
        self.build_id = {}

    def compile(self, version, extra=()):
        src = os.path.join(E2E, "targets", f"greeter-{version}.c")
        exe = os.path.join(self.work, "bin", f"greeter-{version}")
        os.makedirs(os.path.dirname(exe), exist_ok=True)
        run([CC, *CFLAGS, "-o", exe, src, *extra])
        self.exe[version] = exe
        self.build_id[version] = read_build_id(exe)
        root = os.path.join(self.work, "rootfs-template", version)
        os.makedirs(os.path.join(root, "app"))
        for d in ("proc", "dev", "sys", "tmp", "etc"):
            os.makedirs(os.path.join(root, d), exist_ok=True)
        shutil.copy2(exe, os.path.join(root, TARGET_PATH.lstrip("/")))
        for lib in shared_libs(exe):
            dst = os.path.join(root, lib.lstrip("/"))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(os.path.realpath(lib), dst)
        self.rootfs[version] = root
        return exe

    def rootfs_copy(self, version, dst):
        # Hard links: the files are never written; each container gets its own directories.
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        run(["cp", "-al", self.rootfs[version], dst])
        return dst


def read_build_id(path):
    out = run(["readelf", "-n", path]).stdout
    m = re.search(r"Build ID:\s*([0-9a-f]+)", out)
    if not m:
        raise Fail(f"{path} has no GNU build id")
    return m.group(1)


def shared_libs(exe):
    libs = []
    for line in run(["ldd", exe]).stdout.splitlines():
        m = re.search(r"(/\S+)\s+\(0x", line)
        if m:
            libs.append(m.group(1))
    return libs


# ---------------------------------------------------------------------------------------------
# Containers (containerd/runc through ctr) and the kubelet's part


class Containers:
    def __init__(self, work):
        self.work = work
        self.sock = run([CONTAINERD_SH, "env"]).stdout.strip().split("=", 1)[1]
        self.started_containerd = False
        self.live = {}  # id -> Container
        self.pod_uids = set()

    def ctr(self, *args, check=True, timeout=30):
        return run(["ctr", "--address", self.sock, "-n", CTR_NS, *args], check=check, timeout=timeout)

    def start_containerd(self):
        if run([CONTAINERD_SH, "status"], check=False).returncode != 0:
            run([CONTAINERD_SH, "start"], timeout=60)
            self.started_containerd = True

    def start(self, pod_uid, rootfs, name):
        cid = secrets.token_hex(32)  # like containerd's ids: 64 hex digits
        cgroup = f"/kubepods/besteffort/pod{pod_uid}/{cid}"
        logf = os.path.join(self.work, "logs", f"{name}-{cid[:12]}.out")
        os.makedirs(os.path.dirname(logf), exist_ok=True)
        out = open(logf, "w")
        # Flags before the rootfs directory and the id (--rootfs is a flag: DIR takes the image's place).
        p = subprocess.Popen(
            ["ctr", "--address", self.sock, "-n", CTR_NS, "run", "--rm", "--rootfs", "--cgroup", cgroup, rootfs, cid, TARGET_PATH],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        c = Container(self, cid, name, logf, p, pod_uid)
        self.live[cid] = c
        self.pod_uids.add(pod_uid)
        wait_until(f"container {name} ({cid[:12]}) to run and print", lambda: c.poll_failed() or (c.host_pid() and c.lines()), timeout=30)
        return c

    def cleanup(self):
        for c in list(self.live.values()):
            c.kill(quiet=True)
        try:
            for cid in self.ctr("containers", "ls", "-q", check=False).stdout.split():
                self.ctr("containers", "delete", cid, check=False)
            run(["ctr", "--address", self.sock, "namespaces", "rm", CTR_NS], check=False)
        except Exception:
            pass
        # runc removes each container's cgroup and leaves the empty parents it created; rmdir
        # removes only empty directories, so other users of /kubepods are safe.
        for base in glob.glob("/sys/fs/cgroup/*/") + ["/sys/fs/cgroup/"]:
            for rel in [f"kubepods/besteffort/pod{uid}" for uid in self.pod_uids] + ["kubepods/besteffort", "kubepods"]:
                try:
                    os.rmdir(base + rel)
                except OSError:
                    pass
        if self.started_containerd:
            # `containerd.sh stop` kills every container of every namespace: leave containerd
            # running if someone else started containers in it meanwhile.
            others = [ns for ns in run(["ctr", "--address", self.sock, "namespaces", "ls", "-q"], check=False).stdout.split()
                      if ns != CTR_NS and run(["ctr", "--address", self.sock, "-n", ns, "tasks", "ls", "-q"], check=False).stdout.strip()]
            if others:
                log(f"leaving containerd running: namespaces {others} have tasks")
            else:
                run([CONTAINERD_SH, "stop"], check=False, timeout=60)


class Container:
    def __init__(self, mgr, cid, name, logf, popen, pod_uid):
        self.mgr, self.id, self.name, self.logf, self.popen, self.pod_uid = mgr, cid, name, logf, popen, pod_uid
        self._pid = None

    def poll_failed(self):
        if self.popen.poll() is not None:
            raise Fail(f"container {self.name} exited ({self.popen.returncode}): {open(self.logf).read()[-1000:]}")
        return None

    def host_pid(self):
        if self._pid:
            return self._pid
        for line in self.mgr.ctr("tasks", "ls", check=False).stdout.splitlines()[1:]:
            f = line.split()
            if len(f) >= 3 and f[0] == self.id and f[2] == "RUNNING":
                self._pid = int(f[1])
        return self._pid

    def lines(self):
        with open(self.logf, errors="replace") as f:
            return f.read().splitlines()

    def mark(self):
        return len(self.lines())

    def wait_output(self, prefix, since=0, count=3, timeout=60):
        """Wait for `count` consecutive lines starting with prefix after line `since`, and
        no other kind of line after the first of them (the switch is atomic)."""
        def ok():
            new = [l for l in self.lines()[since:] if "hello" in l]
            if self.popen.poll() is not None:
                raise Fail(f"container {self.name} exited: {new[-5:]}")
            for i, l in enumerate(new):
                if l.startswith(prefix):
                    rest = new[i:]
                    bad = [x for x in rest if not x.startswith(prefix)]
                    if bad:
                        raise Fail(f"{self.name}: after switching to {prefix!r} it printed {bad[:3]}")
                    return len(rest) >= count and rest
            return None
        return wait_until(f"{self.name} to print {count} lines starting with {prefix!r}", ok, timeout=timeout)

    def last_hello(self):
        h = [l for l in self.lines() if "hello" in l]
        return h[-1] if h else ""

    def kill(self, quiet=False):
        if self.id not in self.mgr.live:
            return
        self.mgr.ctr("tasks", "kill", "-s", "SIGKILL", self.id, check=False)
        try:
            self.popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            if not quiet:
                raise Fail(f"ctr run of {self.name} did not end after SIGKILL")
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.mgr.ctr("tasks", "delete", self.id, check=False)
        self.mgr.ctr("containers", "delete", self.id, check=False)
        del self.mgr.live[self.id]


class Kubelet:
    """Plays the kubelet of NODE: pods' containers and status."""

    def __init__(self, kube, containers, targets, work):
        self.kube, self.containers, self.targets, self.work = kube, containers, targets, work
        self.pods = {}  # name -> dict(uid, container, restarts, version, labels)
        self.ip = 10

    def create_node(self):
        self.kube.apply({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}},
        })
        self.kube("patch", "node", NODE, "--subresource", "status", "--type", "merge", "-p", json.dumps({"status": {
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "e2e kubelet",
                            "lastHeartbeatTime": now_rfc3339(), "lastTransitionTime": now_rfc3339()}],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": NODE}]}}))

    def create_pod(self, name, labels, version):
        pod = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": APP_NS, "labels": labels},
            "spec": {"nodeName": NODE, "containers": [{"name": "app", "image": f"registry.invalid/greeter:{version}"}]},
        }
        self.kube.apply(pod)
        obj = self.kube.get("pod", name, APP_NS)
        self.pods[name] = {"uid": obj["metadata"]["uid"], "container": None, "restarts": 0, "version": version, "labels": labels}
        self._start(name, version)
        return self.pods[name]

    def _start(self, name, version, last_state=None):
        p = self.pods[name]
        rootfs = self.targets.rootfs_copy(version, os.path.join(self.work, "rootfs", f"{name}-{secrets.token_hex(4)}"))
        c = self.containers.start(p["uid"], rootfs, name)
        p["container"], p["version"] = c, version
        self.ip += 1
        status = {"name": "app", "image": f"registry.invalid/greeter:{version}", "imageID": f"registry.invalid/greeter@sha256:{'0' * 64}",
                  "containerID": f"containerd://{c.id}", "ready": True, "started": True, "restartCount": p["restarts"],
                  "state": {"running": {"startedAt": now_rfc3339()}}}
        if last_state:
            status["lastState"] = last_state
        self.kube("patch", "pod", name, "-n", APP_NS, "--subresource", "status", "--type", "merge", "-p", json.dumps({"status": {
            "phase": "Running", "hostIP": "127.0.0.1", "podIP": f"10.244.0.{self.ip}", "startTime": now_rfc3339(),
            "conditions": [{"type": t, "status": "True"} for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")],
            "containerStatuses": [status]}}))
        return c

    def restart_container(self, name, version=None):
        """The container died and the kubelet started it again (same pod, new container id)."""
        p = self.pods[name]
        old = p["container"]
        old.kill()
        p["restarts"] += 1
        return self._start(name, version or p["version"], last_state={"terminated": {
            "exitCode": 137, "reason": "Error", "containerID": f"containerd://{old.id}",
            "startedAt": now_rfc3339(), "finishedAt": now_rfc3339()}})

    def delete_pod(self, name):
        p = self.pods.pop(name)
        p["container"].kill()
        self.kube("delete", "pod", name, "-n", APP_NS, "--grace-period=0", "--force", "--wait=false", check=False)
        wait_until(f"pod {name} to be gone", lambda: self.kube.get("pod", name, APP_NS) is None, timeout=30)

    def recreate_pod(self, name, version):
        """A new pod of the same name (a StatefulSet's rollout to a new image)."""
        labels = self.pods[name]["labels"]
        self.delete_pod(name)
        return self.create_pod(name, labels, version)


# ---------------------------------------------------------------------------------------------
# The operator and the agent, started as the chart's pod templates say


class Component:
    def __init__(self, name, argv, env, logf, metrics_port):
        self.name, self.argv, self.env, self.logf, self.port = name, argv, env, logf, metrics_port
        self.popen = None

    def start(self):
        out = open(self.logf, "a")
        out.write(f"---- start {time.strftime('%H:%M:%S')}: {' '.join(self.argv)}\n")
        out.flush()
        self.popen = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True)
        out.close()
        return self

    def alive(self):
        return self.popen is not None and self.popen.poll() is None

    def wait_ready(self, timeout=60):
        def ready():
            if not self.alive():
                raise Fail(f"{self.name} exited ({self.popen.returncode}): {self.tail()}")
            code, _ = http_get(f"http://127.0.0.1:{self.port}/readyz")
            return code == 200
        wait_until(f"{self.name} /readyz", ready, timeout=timeout)

    def metrics(self):
        code, body = http_get(f"http://127.0.0.1:{self.port}/metrics")
        if code != 200:
            raise Fail(f"{self.name} /metrics: {code} {body[:200]}")
        return body

    def stop(self, sig=signal.SIGTERM, timeout=20):
        if not self.alive():
            return
        os.killpg(self.popen.pid, sig)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)

    def tail(self, n=30):
        try:
            return "\n".join(open(self.logf, errors="replace").read().splitlines()[-n:])
        except OSError:
            return ""


def expand(value, env):
    """Kubernetes $(VAR) expansion ($$ escapes)."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)


def mount_volumes(workload, c, kube, vol_dir):
    """The kubelet's part for the container's volumes: a ConfigMap is written into a directory
    under vol_dir, a hostPath is the host path itself (this host is the node). Returns
    {mountPath: local directory}."""
    vols = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}
    mounts = {}
    for m in c.get("volumeMounts", []):
        v = vols[m["name"]]
        if "hostPath" in v:
            os.makedirs(v["hostPath"]["path"], exist_ok=True)  # DirectoryOrCreate
            mounts[m["mountPath"]] = v["hostPath"]["path"]
        elif "configMap" in v:
            cm = kube.get("configmap", v["configMap"]["name"], workload["metadata"]["namespace"])
            if cm is None:
                raise Fail(f"volume {m['name']}: configmap {v['configMap']['name']} missing")
            d = os.path.join(vol_dir, m["name"])
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
            files = {k: val.encode() for k, val in (cm.get("data") or {}).items()}
            files.update({k: base64.b64decode(val) for k, val in (cm.get("binaryData") or {}).items()})
            items = v["configMap"].get("items") or [{"key": k, "path": k} for k in files]
            for it in items:
                with open(os.path.join(d, it["path"]), "wb") as f:
                    f.write(files[it["key"]])
            mounts[m["mountPath"]] = d
        else:
            raise Fail(f"volume {m['name']}: only configMap and hostPath volumes are played by this test: {v}")
    return mounts


def from_pod_template(workload, pod_name, node, kubeconfig, metrics_port, logf, name, kube, vol_dir):
    """argv and env of the first container of a Deployment/DaemonSet pod template, as the
    kubelet would start it on `node` as pod `pod_name`; the binary is target/release's one of
    the same name. The metrics address is moved to a free loopback port (several replicas
    share this host's network), and paths under a volume's mountPath to where the test put
    the volume."""
    tpl = workload["spec"]["template"]
    c = tpl["spec"]["containers"][0]
    mounts = mount_volumes(workload, c, kube, vol_dir)

    def remap(a):
        for mp, local in mounts.items():
            a = re.sub(r"(^|=)" + re.escape(mp) + r"(?=/|$)", lambda m: m.group(1) + local, a)
        return a
    fields = {"metadata.name": pod_name, "metadata.namespace": workload["metadata"]["namespace"], "spec.nodeName": node}
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = expand(e["value"], env)
        elif "fieldRef" in e.get("valueFrom", {}):
            env[e["name"]] = fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            raise Fail(f"{name}: env {e['name']}: unsupported source {e}")
    cmd = c["command"]
    exe = os.path.join(BIN, os.path.basename(cmd[0]))
    if not (cmd[0].startswith("/usr/local/bin/") and os.access(exe, os.X_OK)):
        raise Fail(f"{name}: the chart runs {cmd[0]}, but {exe} (the Dockerfile's copy source) does not exist")
    env = {k: remap(v) for k, v in env.items()}
    args = [remap(expand(a, env)) for a in c.get("args", [])]
    addr = [i for i, a in enumerate(args) if a.startswith("--metrics-addr=")]
    if len(addr) != 1:
        raise Fail(f"{name}: expected one --metrics-addr in the chart's args: {args}")
    args[addr[0]] = f"--metrics-addr=127.0.0.1:{metrics_port}"
    # In a pod the token would be mounted (in-cluster config); here KUBECONFIG carries the
    # same ServiceAccount's token. Nothing else of this shell's environment leaks in.
    penv = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "KUBECONFIG": kubeconfig, **env}
    return Component(name, [exe, *cmd[1:], *args], penv, logf, metrics_port)


# ---------------------------------------------------------------------------------------------
# The test environment


class Env:
    def __init__(self, args):
        self.args = args
        self.work = tempfile.mkdtemp(prefix="livepatch-e2e.")
        self.hdir = os.path.join(self.work, "cluster")
        self.targets = Targets(self.work)
        self.containers = Containers(self.work)
        self.components = {}
        self.harness_started = False
        self.bundles = {}
        self.kube = None

    # -- setup
    def start_cluster(self):
        log(f"work directory {self.work}")
        os.makedirs(self.hdir)
        self.harness_started = True
        run([HARNESS, "start", self.hdir], timeout=180)
        self.kube = Kube(os.path.join(self.hdir, "admin.kubeconfig"))
        self.containers.start_containerd()

    def livepatch(self, *args, check=True):
        return run([os.path.join(BIN, "livepatch"), *args], check=check, timeout=120)

    def build_bundle(self, name, old, new, *extra):
        out = os.path.join(self.work, "bundles", f"{name}.lpatch")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        p = self.livepatch("build", "--old", self.targets.exe[old], "--new", self.targets.exe[new], "-o", out, "--json", *extra, check=False)
        if p.returncode != 0:
            return None, p.stderr.strip()
        info = json.loads(p.stdout)
        self.bundles[name] = {"path": out, "sha256": info["sha256"], "patch_id": info["patch_id"], "manifest": info.get("manifest")}
        return self.bundles[name], None

    def bundle_configmap(self, name, bundle):
        self.kube("create", "configmap", name, "-n", APP_NS, f"--from-file=patch.lpatch={bundle['path']}")
        cm = self.kube.get("configmap", name, APP_NS)
        if "patch.lpatch" not in (cm.get("binaryData") or {}):
            raise Fail(f"configmap {name}: the bundle is not in binaryData: {list(cm)}")

    def livepatch_object(self, name, selector, build_id, cm, sha256, max_concurrent=1, strategy="Trap", timeout=20):
        return {
            "apiVersion": "livepatch.dev/v1alpha1", "kind": "LivePatch",
            "metadata": {"name": name, "namespace": APP_NS},
            "spec": {
                "selector": {"matchLabels": selector},
                "container": "app",
                "target": {"buildID": build_id, "path": TARGET_PATH},
                "patch": {"configMapRef": {"name": cm, "key": "patch.lpatch"}, "sha256": sha256},
                "safety": {"strategy": strategy, "timeoutSeconds": timeout},
                "rollout": {"maxConcurrent": max_concurrent},
            },
        }

    def lp(self, name):
        return self.kube.get(LP, name, APP_NS)

    def tasks(self, lp_name):
        return self.kube.get(LPT, ns=APP_NS, selector=f"livepatch.dev/livepatch={lp_name}")

    def events(self, lp_name):
        evs = self.kube.get("events.events.k8s.io", ns=APP_NS) or []
        return [e for e in evs if (e.get("regarding") or {}).get("kind") == "LivePatch" and e["regarding"]["name"] == lp_name]

    def wait_phase(self, name, phases, timeout=90, what=None):
        phases = [phases] if isinstance(phases, str) else phases
        def ok():
            o = self.lp(name)
            st = (o or {}).get("status") or {}
            if st.get("phase") in phases and st.get("observedGeneration") == o["metadata"]["generation"]:
                return o
            return None
        try:
            return wait_until(what or f"LivePatch {name} phase {phases}", ok, timeout=timeout)
        except Fail as e:
            raise Fail(f"{e}\nLivePatch status: {json.dumps((self.lp(name) or {}).get('status'), indent=1)[:2500]}\n"
                       f"tasks: {self.task_summary(name)}") from None

    def task_summary(self, lp_name):
        out = []
        for t in self.tasks(lp_name) or []:
            st = t.get("status") or {}
            out.append(f"{t['spec']['podName']}: action={t['spec']['action']} gen={t['metadata']['generation']} "
                       f"observed={st.get('observedGeneration')} phase={st.get('phase')} reason={st.get('reason')} msg={st.get('message')}")
        return "\n  " + "\n  ".join(out) if out else "(none)"

    def patches_in(self, container):
        """The patches `livepatch status` reads from the process itself."""
        st = json.loads(self.livepatch("status", "--pid", str(container.host_pid()), "--json").stdout)
        return [p for p in st["patches"] if p["state"] == "applied"], st

    def install_chart(self):
        self.kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": RELEASE_NS, "labels": {
            "pod-security.kubernetes.io/enforce": "privileged", "pod-security.kubernetes.io/enforce-version": "latest"}}})
        self.kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": APP_NS}})
        run([HELM, "--kubeconfig", self.kube.kubeconfig, "install", RELEASE, CHART, "-n", RELEASE_NS,
             "-f", os.path.join(E2E, "values-e2e.yaml")], timeout=120)

    def workloads(self):
        return (self.kube.get("deployment", f"{RELEASE}-operator", RELEASE_NS),
                self.kube.get("daemonset", f"{RELEASE}-agent", RELEASE_NS))

    def sa_kubeconfigs(self):
        """Kubeconfigs with tokens of the ServiceAccounts the chart's pod templates name."""
        if not hasattr(self, "opkube"):
            op, ds = self.workloads()
            self.opkube, self.agkube = (
                Kube(run([HARNESS, "kubeconfig", self.hdir, RELEASE_NS, w["spec"]["template"]["spec"]["serviceAccountName"]]).stdout.strip(), who)
                for w, who in ((op, "operator"), (ds, "agent")))
        return self.opkube, self.agkube

    def start_components(self):
        op, ds = self.workloads()
        opk, agk = self.sa_kubeconfigs()
        opkc, agkc = opk.kubeconfig, agk.kubeconfig
        logs = os.path.join(self.work, "logs")
        os.makedirs(logs, exist_ok=True)
        for r in ("a", "b"):
            pod = f"{RELEASE}-operator-7c9d5-{r}"
            self.components[f"operator-{r}"] = from_pod_template(op, pod, NODE, opkc, free_port(), os.path.join(logs, f"operator-{r}.log"),
                                                                 f"operator-{r}", self.kube, os.path.join(self.work, "volumes", f"operator-{r}"))
        self.components["agent"] = self.agent_from_chart()
        for c in self.components.values():
            c.start()
        for c in self.components.values():
            c.wait_ready()

    def agent_from_chart(self):
        """The agent as the DaemonSet's current pod template says (after an install or upgrade)."""
        _, ds = self.workloads()
        return from_pod_template(ds, f"{RELEASE}-agent-x7k2p", NODE, self.sa_kubeconfigs()[1].kubeconfig, free_port(),
                                 os.path.join(self.work, "logs", "agent.log"), "agent", self.kube, os.path.join(self.work, "volumes", "agent"))

    def leader(self):
        lease = self.kube.get("lease", "livepatch-operator", RELEASE_NS)
        return ((lease or {}).get("spec") or {}).get("holderIdentity")

    def component_of(self, identity):
        for k, c in self.components.items():
            if k.startswith("operator") and c.env.get("POD_NAME") == identity:
                return k, c
        raise Fail(f"lease holder {identity!r} is none of the operator replicas")

    def teardown(self, failed):
        log("teardown")
        for c in self.components.values():
            try:
                c.stop(signal.SIGTERM, timeout=10)
            except Exception as e:
                log(f"stopping {c.name}: {e}")
        try:
            self.containers.cleanup()
        except Exception as e:
            log(f"container cleanup: {e}")
        if self.harness_started:
            run([HARNESS, "stop", self.hdir], check=False, timeout=60)
        if failed or self.args.keep:
            log(f"kept {self.work} (logs/: operator-a.log operator-b.log agent.log, container outputs; cluster/: apiserver.log)")
        else:
            shutil.rmtree(self.work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Scenarios (in order; each may use what earlier ones set up)

SCENARIOS = []


def scenario(name, needs=()):
    def deco(fn):
        SCENARIOS.append((name, fn, tuple(needs)))
        return fn
    return deco


@scenario("install")
def s_install(t):
    """helm install into the test API server; the CRDs come from the chart."""
    t.install_chart()
    for crd in ("livepatches.livepatch.dev", "livepatchtasks.livepatch.dev"):
        wait_until(f"CRD {crd} Established", lambda: condition(t.kube.get("crd", crd), "Established").get("status") == "True", timeout=30)
    crd = t.kube.get("crd", "livepatches.livepatch.dev")
    labels = crd["metadata"].get("labels") or {}
    if labels.get("app.kubernetes.io/managed-by") == "Helm":
        raise Fail("CRDs should come from the chart's crds/ directory (not templated)")
    for kind, name in (("serviceaccount", f"{RELEASE}-operator"), ("serviceaccount", f"{RELEASE}-agent"),
                       ("deployment", f"{RELEASE}-operator"), ("daemonset", f"{RELEASE}-agent")):
        if not t.kube.get(kind, name, RELEASE_NS):
            raise Fail(f"{kind}/{name} not installed")
    # The chart refuses a namespace whose Pod Security level would reject the agent.
    t.kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "lp-baseline", "labels": {
        "pod-security.kubernetes.io/enforce": "baseline"}}})
    p = run([HELM, "--kubeconfig", t.kube.kubeconfig, "install", "lp2", CHART, "-n", "lp-baseline", "--dry-run=server", "--skip-crds"], check=False)
    if p.returncode == 0 or "pod-security.kubernetes.io/enforce=privileged" not in p.stderr:
        raise Fail(f"helm install into a baseline namespace should fail with the label to set; got {p.returncode}: {p.stderr[-500:]}")
    return "chart installed; CRDs Established; install into a 'baseline' namespace refused with the fix"


@scenario("pod-security", needs=["install"])
def s_pod_security(t):
    """The rendered pod templates against the API server's Pod Security admission."""
    op, ds = t.workloads()

    def pod_from(workload, ns):
        spec = json.loads(json.dumps(workload["spec"]["template"]["spec"]))
        spec["nodeName"] = NODE
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "pss-", "namespace": ns,
                "labels": workload["spec"]["template"]["metadata"]["labels"]}, "spec": spec}

    def create(pod):
        return t.kube("create", "--dry-run=server", "-f", "-", "-o", "name", input=json.dumps(pod), check=False)

    p = create(pod_from(ds, RELEASE_NS))
    if p.returncode != 0:
        raise Fail(f"the agent pod is rejected in the release namespace (enforce=privileged): {p.stderr}")
    p = create(pod_from(ds, "lp-baseline"))
    if p.returncode == 0 or "violates PodSecurity" not in p.stderr:
        raise Fail(f"the agent pod should be rejected under 'baseline': {p.returncode} {p.stderr}")
    for word in ("hostPID", "SYS_PTRACE"):
        if word not in p.stderr:
            raise Fail(f"the baseline rejection should name {word}: {p.stderr}")
    t.kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "lp-restricted", "labels": {
        "pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/warn": "restricted"}}})
    p = create(pod_from(op, "lp-restricted"))
    if p.returncode != 0 or "Warning" in p.stderr:
        raise Fail(f"the operator pod must pass the 'restricted' level: {p.returncode} {p.stderr}")
    return "agent admitted under privileged, rejected under baseline (hostPID, SYS_PTRACE); operator passes restricted"


@scenario("rbac", needs=["install"])
def s_rbac(t):
    """What the chart's ServiceAccounts may and may not do (SelfSubjectAccessReview with their tokens)."""
    opk, agk = t.sa_kubeconfigs()
    who = json.loads(opk("auth", "whoami", "-o", "json").stdout)["status"]["userInfo"]["username"]
    if who != f"system:serviceaccount:{RELEASE_NS}:{RELEASE}-operator":
        raise Fail(f"operator kubeconfig is {who}")
    expect = [
        # (kube, verb, resource, ns, subresource, allowed)
        (opk, "watch", "livepatches.livepatch.dev", None, None, True),
        (opk, "patch", "livepatches.livepatch.dev", APP_NS, "status", True),
        (opk, "create", "livepatchtasks.livepatch.dev", APP_NS, None, True),
        (opk, "delete", "livepatchtasks.livepatch.dev", APP_NS, None, True),
        (opk, "list", "pods", None, None, True),
        (opk, "get", "nodes", None, None, True),
        (opk, "create", "events.events.k8s.io", APP_NS, None, True),
        (opk, "create", "leases.coordination.k8s.io", RELEASE_NS, None, True),
        (opk, "get", "secrets", APP_NS, None, False),
        (opk, "get", "configmaps", APP_NS, None, False),
        (opk, "patch", "livepatchtasks.livepatch.dev", APP_NS, "status", False),
        (opk, "update", "livepatches.livepatch.dev", APP_NS, None, False),
        (opk, "delete", "livepatches.livepatch.dev", APP_NS, None, False),
        (opk, "list", "nodes", None, None, False),
        (opk, "patch", "pods", APP_NS, None, False),
        (opk, "create", "leases.coordination.k8s.io", APP_NS, None, False),
        (opk, "create", "pods", APP_NS, None, False),
        (agk, "watch", "livepatchtasks.livepatch.dev", None, None, True),
        (agk, "patch", "livepatchtasks.livepatch.dev", APP_NS, "status", True),
        (agk, "get", "configmaps", APP_NS, None, True),
        (agk, "get", "secrets", APP_NS, None, True),
        (agk, "watch", "pods", None, None, True),
        (agk, "patch", "pods", APP_NS, None, True),
        (agk, "patch", "livepatchtasks.livepatch.dev", APP_NS, None, False),
        (agk, "update", "livepatchtasks.livepatch.dev", APP_NS, "status", False),
        (agk, "create", "livepatchtasks.livepatch.dev", APP_NS, None, False),
        (agk, "delete", "livepatchtasks.livepatch.dev", APP_NS, None, False),
        (agk, "get", "livepatches.livepatch.dev", APP_NS, None, False),
        (agk, "list", "secrets", APP_NS, None, False),
        (agk, "list", "configmaps", APP_NS, None, False),
        (agk, "delete", "pods", APP_NS, None, False),
        (agk, "create", "pods", APP_NS, "exec", False),
        (agk, "update", "nodes", None, None, False),
        (agk, "create", "leases.coordination.k8s.io", RELEASE_NS, None, False),
    ]
    wrong = []
    for k, verb, res, ns, sub, allowed in expect:
        if k.can_i(verb, res, ns, sub) != allowed:
            wrong.append(f"{k.who} {'cannot' if allowed else 'CAN'} {verb} {res}{'/' + sub if sub else ''} in {ns or 'all namespaces'}")
    if wrong:
        raise Fail("RBAC differs from the least-privilege lists:\n  " + "\n  ".join(wrong))
    # What RBAC cannot narrow, the chart's ValidatingAdmissionPolicy does: the agent's
    # "patch pods" is good for the restart-required label only.
    t.kube.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "policy-probe", "namespace": APP_NS, "labels": {"app": "probe"}},
                  "spec": {"nodeName": "no-such-node", "containers": [{"name": "app", "image": "registry.invalid/probe:1"}]}})
    label = "livepatch.dev/restart-required"
    probes = [
        ("set the label", "merge", {"metadata": {"labels": {label: "true"}}}, None),
        ("remove the label", "merge", {"metadata": {"labels": {label: None}}}, None),
        ("change another label", "merge", {"metadata": {"labels": {"app": "evil"}}}, "only set livepatch.dev/restart-required=true"),
        ("set the label to another value", "merge", {"metadata": {"labels": {label: "yes"}}}, "only set livepatch.dev/restart-required=true"),
        ("change an image", "json", [{"op": "replace", "path": "/spec/containers/0/image", "value": "registry.invalid/evil:1"}], "may not change a pod's spec"),
        ("add an annotation", "merge", {"metadata": {"annotations": {"x": "y"}}}, "may not change a pod's spec, annotations"),
    ]
    for what, kind, patch, denied in probes:
        p = agk("patch", "pod", "policy-probe", "-n", APP_NS, "--type", kind, "-p", json.dumps(patch), check=False)
        if denied is None and p.returncode != 0:
            raise Fail(f"the agent cannot {what}: {p.stderr.strip()}")
        if denied is not None and (p.returncode == 0 or denied not in p.stderr or "ValidatingAdmissionPolicy" not in p.stderr):
            raise Fail(f"the agent could {what} (or was denied without the policy's message): {p.returncode} {p.stderr.strip()}")
    t.kube("delete", "pod", "policy-probe", "-n", APP_NS, "--grace-period=0", "--force", check=False)
    return f"{len(expect)} permission checks with the chart's ServiceAccount tokens; the agent's pod patches limited to the restart-required label ({len(probes)} probes)"


@scenario("start", needs=["install"])
def s_start(t):
    """Node, 2 operator replicas and the agent, as the chart's pod templates, with the SA tokens."""
    for b in ("livepatch-operator", "node-agent", "livepatch"):
        if not os.access(os.path.join(BIN, b), os.X_OK):
            raise Fail(f"{BIN}/{b} missing: cargo build --release --locked -p livepatch-operator -p node-agent -p livepatch-cli")
    t.kubelet = Kubelet(t.kube, t.containers, t.targets, t.work)
    t.kubelet.create_node()
    for v in ("v1", "v2", "v3"):
        t.targets.compile(v)
    t.targets.compile("v4", extra=["-lm"])  # the only version that calls into libm
    t.start_components()
    holder = wait_until("an operator replica to hold the Lease", t.leader, timeout=30)
    t.component_of(holder)
    return f"operators a/b and the agent ready; lease held by {holder}"


@scenario("leader", needs=["start"])
def s_leader(t):
    """Two replicas: exactly one leads (metrics), the other does not reconcile."""
    holder = t.leader()
    lead_key, lead = t.component_of(holder)
    other = [c for k, c in t.components.items() if k.startswith("operator") and k != lead_key][0]
    ml, mo = lead.metrics(), other.metrics()
    if metric(ml, "livepatch_leader") != 1 or metric(mo, "livepatch_leader") != 0:
        raise Fail(f"livepatch_leader: leader {metric(ml, 'livepatch_leader')}, follower {metric(mo, 'livepatch_leader')}")
    reconciles = metric(mo, "livepatch_reconciles_total") or 0
    if reconciles:
        raise Fail(f"the follower reconciled {reconciles} times")
    return f"leader {lead.name} (livepatch_leader 1), follower {other.name} (0, no reconcile)"


@scenario("malformed", needs=["install"])
def s_malformed(t):
    """The API server rejects invalid LivePatches with the CRD's CEL/schema messages."""
    base = t.livepatch_object("bad", {"app": "greeter"}, "0123456789abcdef", "cm", "0" * 64)
    cases = []
    b = json.loads(json.dumps(base)); b["spec"]["patch"]["url"] = "https://example.com/p.lpatch"
    cases.append(("two sources", b, "exactly one of configMapRef, secretRef and url must be set"))
    b = json.loads(json.dumps(base)); b["spec"]["patch"]["sha256"] = "ABC"
    cases.append(("bad sha256", b, "sha256 must be 64 lowercase hex characters"))
    b = json.loads(json.dumps(base)); b["spec"]["selector"] = {"matchLabels": {}}
    cases.append(("empty selector", b, "selector must not be empty"))
    b = json.loads(json.dumps(base)); b["spec"]["target"]["path"] = "app/greeter"
    cases.append(("relative path", b, "path must be absolute"))
    b = json.loads(json.dumps(base)); b["metadata"]["name"] = "x" * 70
    cases.append(("name too long", b, "at most 63 characters"))
    b = json.loads(json.dumps(base)); b["spec"]["rollout"]["maxConcurrent"] = 0
    cases.append(("maxConcurrent 0", b, "maxConcurrent must be at least 1"))
    for what, obj, msg in cases:
        p = t.kube("apply", "-f", "-", input=json.dumps(obj), check=False)
        if p.returncode == 0:
            raise Fail(f"{what}: accepted by the API server")
        if msg not in p.stderr or "is invalid" not in p.stderr:
            raise Fail(f"{what}: rejected without the rule's message {msg!r}: {p.stderr.strip()}")
        log(f"  {what}: {p.stderr.strip()}")
    if t.kube.get(LP, "bad", APP_NS):
        raise Fail("an invalid LivePatch exists")
    return f"{len(cases)} invalid LivePatches rejected with their messages"


@scenario("kubectl-names", needs=["install"])
def s_kubectl_names(t):
    """The names users type: kubectl get/delete livepatch NAME, lp, lpt."""
    probs = []
    for args in (["get", "livepatch", "nosuch"], ["delete", "livepatch", "nosuch"], ["get", "lp", "nosuch"],
                 ["get", "livepatchtask", "nosuch"], ["get", "lpt", "nosuch"]):
        p = t.kube(*args, "-n", APP_NS, check=False)
        if "NotFound" not in p.stderr:
            probs.append(f"`kubectl {' '.join(args)}` -> {p.stderr.strip()!r} (expected NotFound)")
    p = t.kube("get", "livepatch", "-n", APP_NS, check=False)  # the category: both kinds
    if p.returncode != 0:
        probs.append(f"`kubectl get livepatch` (list) -> {p.stderr.strip()!r}")
    if probs:
        cats = t.kube.get("crd", "livepatches.livepatch.dev")["spec"]["names"].get("categories")
        raise Fail("short names do not resolve to one resource (CRD categories "
                   f"{cats} shadow the singular name 'livepatch'):\n  " + "\n  ".join(probs))
    return "kubectl get/delete livepatch NAME, lp, livepatchtask, lpt resolve to one resource"


@scenario("apply", needs=["start"])
def s_apply(t):
    """kubectl apply a LivePatch: every matching container is patched, the rest untouched."""
    kl = t.kubelet
    for name in ("greeter-0", "greeter-1"):
        kl.create_pod(name, {"app": "greeter"}, "v1")
    kl.create_pod("other-0", {"app": "other"}, "v1")  # runs the same executable, not selected
    for name in ("greeter-0", "greeter-1", "other-0"):
        kl.pods[name]["container"].wait_output("v1 hello", count=2)
    # The one-step path: `livepatch build --emit-manifest` writes the ConfigMap and the LivePatch;
    # the API server accepts them (server-side dry run) and `kubectl apply -f` rolls the fix out.
    b, err = t.build_bundle("greeter-fix", "v1", "v2", "--emit-manifest", "--namespace", APP_NS,
                            "--selector", "app=greeter", "--container", "app", "--target-path", TARGET_PATH)
    if not b:
        raise Fail(f"livepatch build v1 -> v2 --emit-manifest: {err}")
    manifest = os.path.join(os.path.dirname(b["path"]), "greeter-fix.yaml")
    if b.get("manifest") != manifest:
        raise Fail(f"build --emit-manifest wrote {b.get('manifest')!r}, expected {manifest!r}")
    t.kube("apply", "--dry-run=server", "-f", manifest)
    if t.kube("get", LP, "greeter-fix", "-n", APP_NS, check=False).returncode == 0:
        raise Fail("a server-side dry run created the LivePatch")
    served_before = {n: kl.pods[n]["container"].last_hello() for n in ("greeter-0", "greeter-1")}
    marks = {n: kl.pods[n]["container"].mark() for n in kl.pods}
    t.kube("apply", "-f", manifest)
    o = t.wait_phase("greeter-fix", "Applied", timeout=120)
    st = o["status"]
    c = st.get("counts") or {}
    if (c.get("targets"), c.get("patched"), c.get("failed", 0), c.get("pending", 0)) != (2, 2, 0, 0):
        raise Fail(f"counts: {c}")
    ready = condition(o, "Ready")
    if ready.get("status") != "True" or ready.get("reason") != "AllTargetsPatched":
        raise Fail(f"Ready condition: {ready}")
    if "livepatch.dev/revert" not in o["metadata"].get("finalizers", []):
        raise Fail(f"finalizer missing: {o['metadata'].get('finalizers')}")
    # The targets' own output: both switched to v2 and kept their state; other-0 did not.
    for n in ("greeter-0", "greeter-1"):
        con = kl.pods[n]["container"]
        lines = con.wait_output("v2 hello", since=marks[n], count=3)
        before = int(re.search(r"served=(\d+)", served_before[n]).group(1))
        after = int(re.search(r"served=(\d+)", lines[0]).group(1))
        if after <= before:
            raise Fail(f"{n}: the patched code does not continue the process's counter ({served_before[n]!r} -> {lines[0]!r})")
        patches, _ = t.patches_in(con)
        if [p["patch_id"] for p in patches] != [b["patch_id"]]:
            raise Fail(f"{n}: livepatch status shows {[p['patch_id'] for p in patches]}, expected exactly [{b['patch_id']}]")
    other = kl.pods["other-0"]["container"]
    other.wait_output("v1 hello", since=marks["other-0"], count=5)
    if t.patches_in(other)[0]:
        raise Fail("other-0 (not selected) was patched")
    tasks = t.tasks("greeter-fix")
    if sorted(x["spec"]["podName"] for x in tasks) != ["greeter-0", "greeter-1"]:
        raise Fail(f"tasks: {t.task_summary('greeter-fix')}")
    for x in tasks:
        s = x.get("status") or {}
        pod = kl.pods[x["spec"]["podName"]]
        if (s.get("phase"), s.get("containerId"), s.get("pids"), x["metadata"]["labels"].get("livepatch.dev/node")) != \
                ("Applied", f"containerd://{pod['container'].id}", [pod["container"].host_pid()], NODE):
            raise Fail(f"task {x['metadata']['name']}: {s} labels {x['metadata']['labels']}")
    reasons = [e["reason"] for e in t.events("greeter-fix")]
    for r in ("Dispatched", "Applied"):
        if r not in reasons:
            raise Fail(f"event {r} missing: {reasons}")
    log("kubectl get livepatches:\n" + t.kube("get", LP, "-n", APP_NS).stdout + t.kube("get", LPT, "-n", APP_NS, "-o", "wide").stdout)
    return f"2/2 targets Applied, outputs v1 -> v2 (counters kept), other-0 untouched; events {sorted(set(reasons))}"


@scenario("leader-acts", needs=["apply", "leader"])
def s_leader_acts(t):
    """Only the leader acted: its events, its reconciles; the follower did nothing."""
    holder = t.leader()
    lead_key, lead = t.component_of(holder)
    other = [c for k, c in t.components.items() if k.startswith("operator") and k != lead_key][0]
    instances = {e.get("reportingInstance") for e in t.events("greeter-fix")}
    controllers = {e.get("reportingController") for e in t.events("greeter-fix")}
    if instances != {holder}:
        raise Fail(f"events reported by {instances}, expected only the leader {holder}")
    if controllers != {"livepatch-operator"}:
        raise Fail(f"reporting controller {controllers}")
    if (metric(other.metrics(), "livepatch_reconciles_total") or 0) != 0:
        raise Fail("the follower reconciled")
    if not metric(lead.metrics(), "livepatch_reconciles_total"):
        raise Fail("the leader has no reconciles")
    return f"all events from {holder}; follower reconciles 0"


@scenario("container-restart", needs=["apply"])
def s_container_restart(t):
    """A container restarts on the old executable: the patch is applied to it again."""
    kl = t.kubelet
    old = kl.pods["greeter-0"]["container"]
    task_name = [x for x in t.tasks("greeter-fix") if x["spec"]["podName"] == "greeter-0"][0]["metadata"]["name"]
    new = kl.restart_container("greeter-0")
    new.wait_output("v2 hello", count=3, timeout=90)
    first = [l for l in new.lines() if "hello" in l][0]
    if not first.startswith("v1 hello #0 served=1"):
        raise Fail(f"the restarted container should start over on the old code: first line {first!r}")

    def task_settled():
        x = t.kube.get(LPT, task_name, APP_NS)
        s = x.get("status") or {}
        return s.get("phase") == "Applied" and s.get("containerId") == f"containerd://{new.id}" and \
            s.get("observedGeneration") == x["metadata"]["generation"] and x
    x = wait_until("the task to be Applied to the new container", task_settled, timeout=60)
    if x["spec"]["containerId"] != f"containerd://{new.id}":
        raise Fail(f"task spec containerId {x['spec']['containerId']}")
    patches, _ = t.patches_in(new)
    if len(patches) != 1:
        raise Fail(f"new container: {len(patches)} patches applied")
    t.wait_phase("greeter-fix", "Applied", timeout=60)
    if "Redispatched" not in [e["reason"] for e in t.events("greeter-fix")]:
        raise Fail("no Redispatched event")
    return f"container {old.id[:12]} -> {new.id[:12]}: started on v1, patched to v2 again (1 patch); event Redispatched"


@scenario("sha256-mismatch", needs=["start"])
def s_sha_mismatch(t):
    """A bundle whose sha256 does not match: nothing patched, the status says why."""
    kl = t.kubelet
    kl.create_pod("sha-0", {"app": "sha"}, "v1")
    b = t.bundles.get("fix") or t.build_bundle("fix", "v1", "v2")[0]
    t.bundle_configmap("sha-fix", b)
    wrong = "f" * 64
    mark = kl.pods["sha-0"]["container"].mark()
    t.kube.apply(t.livepatch_object("sha-fix", {"app": "sha"}, t.targets.build_id["v1"], "sha-fix", wrong))
    o = t.wait_phase("sha-fix", "Degraded", timeout=120)
    (task,) = t.tasks("sha-fix")
    s = task.get("status") or {}
    file_sha = hashlib.sha256(open(b["path"], "rb").read()).hexdigest()
    msg = s.get("message") or ""
    if s.get("phase") != "Failed" or s.get("reason") != "BundleDigestMismatch" or wrong not in msg or \
            not (b["sha256"] in msg or file_sha in msg):
        raise Fail(f"task status should be Failed/BundleDigestMismatch naming both digests: {s}")
    deg = condition(o, "Degraded")
    if deg.get("status") != "True" or "sha256" not in deg.get("message", ""):
        raise Fail(f"Degraded condition should say why: {deg}")
    c = o["status"].get("counts") or {}
    if (c.get("targets"), c.get("failed"), c.get("patched", 0)) != (1, 1, 0):
        raise Fail(f"counts: {c}")
    con = kl.pods["sha-0"]["container"]
    con.wait_output("v1 hello", since=mark, count=5)
    if t.patches_in(con)[0]:
        raise Fail("sha-0 was patched despite the digest mismatch")
    if "Degraded" not in [e["reason"] for e in t.events("sha-fix")]:
        raise Fail("no Degraded event")
    delete_livepatch(t, "sha-fix")
    return f"task Failed/BundleDigestMismatch, LivePatch Degraded ({deg['message'][:80]}...), output still v1, no patch"


def delete_livepatch(t, name, timeout=90):
    """kubectl delete, wait until the object is gone, then play the garbage collector."""
    o = t.lp(name)
    uid = o["metadata"]["uid"]
    t.kube("delete", LP, name, "-n", APP_NS, "--wait=false")
    try:
        wait_until(f"LivePatch {name} to disappear", lambda: t.lp(name) is None, timeout=timeout)
    except Fail as e:
        raise Fail(f"{e}\ntasks: {t.task_summary(name)}") from None
    for x in t.tasks(name) or []:
        owners = [r["uid"] for r in x["metadata"].get("ownerReferences", [])]
        if owners != [uid]:
            raise Fail(f"task {x['metadata']['name']} owners {owners}, expected [{uid}]")
        t.kube("delete", LPT, x["metadata"]["name"], "-n", APP_NS, "--wait=false", check=False)


@scenario("restart-required", needs=["start"])
def s_restart_required(t):
    """An update that cannot be made live (v4's handle() needs libm, which the running v1
    process never loaded): RestartRequired + pod label; the pod restarted on v4 clears it."""
    kl = t.kubelet
    kl.create_pod("lib-0", {"app": "lib"}, "v1")
    b, err = t.build_bundle("needs-libm", "v1", "v4")
    if not b:
        raise Fail(f"livepatch build v1 -> v4: {err}")
    t.bundle_configmap("lib-fix", b)
    mark = kl.pods["lib-0"]["container"].mark()
    t.kube.apply(t.livepatch_object("lib-fix", {"app": "lib"}, t.targets.build_id["v1"], "lib-fix", b["sha256"]))
    return restart_required_flow(t, "lib-fix", "lib-0", mark, "v4", expect_reason=None)


def restart_required_flow(t, lp_name, pod, mark, new_version, expect_reason):
    kl = t.kubelet
    o = t.wait_phase(lp_name, "RestartRequired", timeout=120)
    (task,) = t.tasks(lp_name)
    s = task.get("status") or {}
    if s.get("phase") != "RestartRequired" or (expect_reason and s.get("reason") != expect_reason):
        raise Fail(f"task status: {s}")
    rr = o["status"].get("restartRequired") or []
    if [r.get("pod") for r in rr] != [pod] or not rr[0].get("reason"):
        raise Fail(f"status.restartRequired: {rr}")
    cond = condition(o, "RestartRequired")
    if cond.get("status") != "True":
        raise Fail(f"RestartRequired condition: {cond}")
    if condition(o, "Ready").get("status") != "False":
        raise Fail("Ready should be False")
    wait_until(f"pod {pod} labelled livepatch.dev/restart-required",
               lambda: (t.kube.get("pod", pod, APP_NS)["metadata"].get("labels") or {}).get("livepatch.dev/restart-required") == "true", timeout=30)
    con = kl.pods[pod]["container"]
    con.wait_output("v1 hello", since=mark, count=5)
    if t.patches_in(con)[0]:
        raise Fail(f"{pod} was changed although the update needs a restart")
    if "RestartRequired" not in [e["reason"] for e in t.events(lp_name)]:
        raise Fail("no RestartRequired event")
    reason = s.get("reason")
    # The offline restart: the pod comes back on the new version.
    kl.recreate_pod(pod, new_version)
    kl.pods[pod]["container"].wait_output(f"{new_version} hello", count=2)

    def cleared():
        o = t.lp(lp_name)
        st = o.get("status") or {}
        p = t.kube.get("pod", pod, APP_NS)
        return (condition(o, "RestartRequired").get("status") == "False" and not st.get("restartRequired")
                and "livepatch.dev/restart-required" not in (p["metadata"].get("labels") or {})
                and st.get("observedGeneration") == o["metadata"]["generation"]) and o
    wait_until("the restart-required flag to clear", cleared, timeout=90)
    # ... and stay clear once the new pod's target has settled.
    o = t.wait_phase(lp_name, ["Applied", "Degraded", "RestartRequired"], timeout=90)
    if not cleared():
        raise Fail(f"the flag came back after the restart: {o['status']}")
    (task,) = t.tasks(lp_name)
    after = (task.get("status") or {})
    note = f"; the new pod's target then settled {after.get('phase')}/{after.get('reason')}, LivePatch {o['status'].get('phase')}"
    if after.get("phase") != "Applied":
        log(f"NOTE {lp_name}: a pod restarted on the fixed version ends {after.get('phase')}/{after.get('reason')}: {after.get('message')}")
    delete_livepatch(t, lp_name)
    return f"RestartRequired ({reason}), pod labelled, output unchanged; restart on {new_version} cleared the flag{note}"


@scenario("data-layout", needs=["start"])
def s_data_layout(t):
    """A data-layout change (struct stats grows in v3): RestartRequired + pod label, cleared
    after the pod runs v3."""
    # The pipeline still ships a bundle: it records that the change cannot be applied live.
    b, err = t.build_bundle("layout", "v1", "v3", "--record-refusal")
    if not b:
        raise Fail(f"`livepatch build --record-refusal --old v1 --new v3` wrote no bundle: {err!r}")
    kl = t.kubelet
    kl.create_pod("layout-0", {"app": "layout"}, "v1")
    t.bundle_configmap("layout-fix", b)
    mark = kl.pods["layout-0"]["container"].mark()
    t.kube.apply(t.livepatch_object("layout-fix", {"app": "layout"}, t.targets.build_id["v1"], "layout-fix", b["sha256"]))
    return restart_required_flow(t, "layout-fix", "layout-0", mark, "v3", expect_reason="DataLayoutChanged")


@scenario("agent-killed", needs=["start"])
def s_agent_killed(t):
    """SIGKILL the agent in the middle of a rollout, start it again: the rollout completes and
    no process carries the patch twice."""
    kl = t.kubelet
    pods = [f"worker-{i}" for i in range(6)]
    for n in pods:
        kl.create_pod(n, {"app": "worker"}, "v1")
    b = t.bundles.get("fix") or t.build_bundle("fix", "v1", "v2")[0]
    t.bundle_configmap("worker-fix", b)
    agent = t.components["agent"]
    # Watch the tasks as the agent does and SIGKILL it twice while it works: (1) a random
    # 0-4 ms after it reports "Applying" for the second target (inside the engine call, or
    # between the call and the status write), (2) a random 0-150 ms after the fourth target's
    # task appears (fetch, discovery). Restart it at once each time.
    watch = subprocess.Popen([KUBECTL, "--kubeconfig", t.kube.kubeconfig, "get", LPT, "-n", APP_NS, "--watch",
                              "-l", "livepatch.dev/livepatch=worker-fix", "-o",
                              "jsonpath={.metadata.name} {.status.reason}{\"\\n\"}"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    t.kube.apply(t.livepatch_object("worker-fix", {"app": "worker"}, t.targets.build_id["v1"], "worker-fix", b["sha256"], max_concurrent=1))
    kills = []
    seen = []
    try:
        deadline = time.monotonic() + 90
        while len(kills) < 2 and time.monotonic() < deadline:
            if not select.select([watch.stdout], [], [], 1.0)[0]:
                continue
            line = watch.stdout.readline()
            if not line:
                raise Fail("the task watch ended")
            name, _, reason = line.strip().partition(" ")
            if name not in seen:
                seen.append(name)
            if not kills and seen.index(name) == 1 and reason == "Applying":
                delay = random.uniform(0, 0.004)
            elif len(kills) == 1 and seen.index(name) == 3 and reason == "":
                delay = random.uniform(0, 0.15)
            else:
                continue
            time.sleep(delay)
            agent.stop(signal.SIGKILL)
            x = t.kube.get(LPT, name, APP_NS)
            st = x.get("status") or {}
            # Did the engine already change the process? (then only the status was lost)
            in_process = len(t.patches_in(kl.pods[x["spec"]["podName"]]["container"])[1]["patches"])
            kills.append(f"{name} {'Applying' if reason else 'new'}+{delay * 1000:.0f}ms: status then {st.get('phase') or 'none'}"
                         f"{'/' + st['reason'] if st.get('reason') else ''}, {in_process} patch region(s) in the process")
            log(f"agent SIGKILLed: {kills[-1]}")
            for n in pods:
                if kl.pods[n]["container"].popen.poll() is not None:
                    raise Fail(f"{n} died with the agent")
            agent.start()
            agent.wait_ready()
    finally:
        os.killpg(watch.pid, signal.SIGKILL)
        watch.wait()
    if len(kills) < 2:
        raise Fail(f"the rollout went too fast to kill the agent twice ({kills}): {t.task_summary('worker-fix')}")
    o = t.wait_phase("worker-fix", "Applied", timeout=150)
    if (o["status"]["counts"].get("patched")) != len(pods):
        raise Fail(f"counts {o['status']['counts']}")
    for n in pods:
        con = kl.pods[n]["container"]
        con.wait_output("v2 hello", count=2)
        patches, st = t.patches_in(con)
        if len(patches) != 1 or len(st["patches"]) != 1:
            raise Fail(f"{n}: {len(patches)} applied / {len(st['patches'])} regions after the agent's restart: {st}")
    return f"agent SIGKILLed twice mid-rollout ({'; '.join(kills)}); {len(pods)}/{len(pods)} Applied, each process exactly 1 patch"


@scenario("failover", needs=["apply", "leader"])
def s_failover(t):
    """The leader stops (SIGTERM releases the Lease): the other replica takes over and acts."""
    holder = t.leader()
    lead_key, lead = t.component_of(holder)
    other_key = "operator-b" if lead_key == "operator-a" else "operator-a"
    other = t.components[other_key]
    lead.stop(signal.SIGTERM)
    new = wait_until("the other replica to take the Lease", lambda: (t.leader() == other.env["POD_NAME"]) and t.leader(), timeout=30)
    wait_until("the new leader's livepatch_leader metric", lambda: metric(other.metrics(), "livepatch_leader") == 1, timeout=20)
    # The new leader acts: a new pod matching greeter-fix gets patched.
    kl = t.kubelet
    kl.create_pod("greeter-2", {"app": "greeter"}, "v1")

    def three_applied():
        o = t.lp("greeter-fix")
        st = o.get("status") or {}
        c = st.get("counts") or {}
        return st.get("phase") == "Applied" and c.get("targets") == 3 and c.get("patched") == 3 and o
    try:
        wait_until("greeter-fix Applied on 3 targets (greeter-2 added)", three_applied, timeout=90)
    except Fail as e:
        raise Fail(f"{e}\ntasks: {t.task_summary('greeter-fix')}") from None
    kl.pods["greeter-2"]["container"].wait_output("v2 hello", count=2)
    evs = [e for e in t.events("greeter-fix") if e.get("reportingInstance") == new]
    if not evs:
        raise Fail(f"no event from the new leader {new}")
    lead.start()  # back to two replicas; it must stay a follower
    lead.wait_ready()
    time.sleep(2)
    if t.leader() != new or metric(lead.metrics(), "livepatch_leader") != 0:
        raise Fail("the restarted replica took the lease from a healthy leader")
    return f"lease {holder} -> {new}; greeter-2 patched by the new leader; the old one rejoined as follower"


@scenario("delete", needs=["apply"])
def s_delete(t):
    """kubectl delete livepatch: the finalizer reverts every target (output back to v1), then
    the object disappears."""
    kl = t.kubelet
    names = [n for n in kl.pods if n.startswith("greeter-")]
    marks = {n: kl.pods[n]["container"].mark() for n in names}
    delete_livepatch(t, "greeter-fix", timeout=120)
    for n in names:
        con = kl.pods[n]["container"]
        con.wait_output("v1 hello", since=marks[n], count=3, timeout=30)
        if t.patches_in(con)[0]:
            raise Fail(f"{n}: a patch is still applied after the LivePatch is gone")
    evs = [e["reason"] for e in t.kube.get("events.events.k8s.io", ns=APP_NS) if (e.get("regarding") or {}).get("name") == "greeter-fix"]
    for r in ("Reverting", "Released"):
        if r not in evs:
            raise Fail(f"event {r} missing: {evs}")
    return f"{len(names)} targets reverted (outputs back to v1, no patch left), LivePatch gone; events Reverting, Released"


@scenario("signatures", needs=["start"])
def s_signatures(t):
    """helm upgrade with a trusted ed25519 key and enforcement: unsigned and wrongly signed
    bundles are refused before any process is touched, a signed one is applied."""
    help_text = run([os.path.join(BIN, "node-agent"), "--help"]).stdout
    if "--trusted-keys-dir" not in help_text or "--require-signature" not in help_text:
        raise Blocked("node-agent has no --trusted-keys-dir/--require-signature flags (the chart's agent.signatures)")
    keys = os.path.join(t.work, "keys")
    os.makedirs(keys)
    for k in ("release", "other"):
        t.livepatch("keygen", "--out", os.path.join(keys, k))
    pub = open(os.path.join(keys, "release.pub")).read().strip()
    run([HELM, "--kubeconfig", t.kube.kubeconfig, "upgrade", RELEASE, CHART, "-n", RELEASE_NS, "-f", os.path.join(E2E, "values-e2e.yaml"),
         "--set", "agent.signatures.enforce=true",
         "--set-json", f"agent.signatures.trustedKeys={json.dumps([{'name': 'release', 'key': pub}])}"], timeout=120)
    # The DaemonSet rolls its pod: the old agent stops, the new one starts with the key mounted.
    t.components["agent"].stop(signal.SIGTERM)
    t.components["agent"] = t.agent_from_chart().start()
    t.components["agent"].wait_ready()
    if "--require-signature" not in t.components["agent"].argv:
        raise Fail(f"the upgraded DaemonSet does not enforce signatures: {t.components['agent'].argv}")
    b = t.bundles.get("fix") or t.build_bundle("fix", "v1", "v2")[0]
    kl = t.kubelet
    cases = [("unsigned", None, "Failed", "BundleUnsigned"), ("untrusted", "other", "Failed", "BundleSignerUntrusted"),
             ("signed", "release", "Applied", None)]
    marks = {}
    for case, key, _, _ in cases:
        kl.create_pod(f"sig-{case}", {"app": f"sig-{case}"}, "v1")
        marks[case] = kl.pods[f"sig-{case}"]["container"].mark()
        args = ["create", "configmap", f"sig-{case}", "-n", APP_NS, f"--from-file=patch.lpatch={b['path']}"]
        if key:
            sig = os.path.join(keys, f"{case}.sig")
            t.livepatch("sign", b["path"], "--key", os.path.join(keys, f"{key}.key"), "-o", sig)
            args.append(f"--from-file=patch.lpatch.sig={sig}")
        t.kube(*args)
        t.kube.apply(t.livepatch_object(f"sig-{case}", {"app": f"sig-{case}"}, t.targets.build_id["v1"], f"sig-{case}", b["sha256"]))
    out = []
    for case, _, phase, reason in cases:
        t.wait_phase(f"sig-{case}", "Applied" if phase == "Applied" else "Degraded", timeout=90)
        (task,) = t.tasks(f"sig-{case}")
        st = task.get("status") or {}
        if st.get("phase") != phase or (reason and st.get("reason") != reason):
            raise Fail(f"sig-{case}: task {st}, expected {phase}/{reason}")
        con = kl.pods[f"sig-{case}"]["container"]
        patches, _ = t.patches_in(con)
        if phase == "Applied":
            con.wait_output("v2 hello", since=marks[case], count=2)
            if len(patches) != 1:
                raise Fail(f"sig-{case}: {len(patches)} patches")
        else:
            con.wait_output("v1 hello", since=marks[case], count=3)
            if patches:
                raise Fail(f"sig-{case}: patched although the signature was refused")
        out.append(f"{case}: {st.get('phase')}{'/' + st['reason'] if st.get('reason') else ''}")
    for case, _, _, _ in cases:
        delete_livepatch(t, f"sig-{case}")
    return "; ".join(out) + " (refused ones untouched, output v1)"


# ---------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--only", help="comma-separated scenarios (plus what they need)")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    if args.list:
        for name, fn, needs in SCENARIOS:
            print(f"{name:18} {fn.__doc__.strip().splitlines()[0]}")
        return 0
    if os.geteuid() != 0:
        print("run.py: needs root (containers, ptrace)", file=sys.stderr)
        return 2
    for tool in (HELM, KUBECTL, HARNESS, shutil.which("ctr") or "ctr", shutil.which(CC) or CC):
        if not os.path.exists(tool):
            print(f"run.py: {tool} missing: run scripts/setup.sh", file=sys.stderr)
            return 2
    selected = None
    if args.only:
        want = set(args.only.split(","))
        deps = {n: needs for n, _, needs in SCENARIOS}
        stack = list(want)
        while stack:
            for d in deps.get(stack.pop(), ()):
                if d not in want:
                    want.add(d)
                    stack.append(d)
        selected = want

    t = Env(args)
    results = []  # (name, status, detail, seconds)

    def on_signal(signum, _frame):
        raise SystemExit(f"signal {signum}")
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)
    failed = True
    try:
        t.start_cluster()
        ok = set()
        for name, fn, needs in SCENARIOS:
            if selected is not None and name not in selected:
                continue
            missing = [n for n in needs if n not in ok]
            if missing:
                results.append((name, "SKIP", f"needs {', '.join(missing)}", 0))
                log(f"SKIP {name}: needs {', '.join(missing)}")
                continue
            log(f"---- {name}: {fn.__doc__.strip().splitlines()[0]}")
            t1 = time.monotonic()
            try:
                detail = fn(t)
                ok.add(name)
                results.append((name, "PASS", detail, time.monotonic() - t1))
                log(f"PASS {name} ({time.monotonic() - t1:.1f}s): {detail}")
            except Blocked as e:
                results.append((name, "BLOCKED", str(e), time.monotonic() - t1))
                log(f"BLOCKED {name}: {e}")
            except Fail as e:
                results.append((name, "FAIL", str(e), time.monotonic() - t1))
                log(f"FAIL {name} ({time.monotonic() - t1:.1f}s): {e}")
                for c in t.components.values():
                    log(f"  last lines of {c.name} ({c.logf}):\n" + "\n".join("    " + l for l in c.tail(15).splitlines()))
            except Exception:
                results.append((name, "FAIL", traceback.format_exc(), time.monotonic() - t1))
                log(f"FAIL {name}: {traceback.format_exc()}")
        failed = any(r[1] in ("FAIL", "SKIP") for r in results)
    except (Fail, SystemExit, Exception) as e:
        # The cluster did not start, or a signal arrived: everything started is stopped below.
        log(f"aborted: {e}")
        results.append(("aborted", "FAIL", str(e), 0))
    finally:
        t.teardown(failed)
    print()
    for name, status, detail, secs in results:
        print(f"{status:7} {name:18} {secs:6.1f}s  {detail.splitlines()[0] if detail else ''}")
    n_pass = sum(r[1] == "PASS" for r in results)
    n_fail = sum(r[1] in ("FAIL", "SKIP") for r in results)
    blocked = [r[0] for r in results if r[1] == "BLOCKED"]
    print(f"\ne2e: {n_pass} passed, {n_fail} failed" + (f", {len(blocked)} blocked ({', '.join(blocked)})" if blocked else "")
          + f" in {time.monotonic() - T0:.0f}s")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
