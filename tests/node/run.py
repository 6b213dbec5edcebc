#!/usr/bin/env python3
"""Scenarios on a real node (tests/node/node.sh): the chart's operator Deployment and agent
DaemonSet run as pods from the image built here (scripts/images.sh), and the target Deployment's
pods are created, scheduled, started, restarted and deleted by the kubelet, the scheduler and
the controllers. Nothing plays the kubelet here.

The target is built the way distributions build (-O2 -fstack-protector-strong
-D_FORTIFY_SOURCE=2, PIE, relro/now), no live-patching flags.

Scenarios, in order (each needs the previous ones):
  install        helm install the chart: operator and agent pods Running and Ready
  apply          a Deployment of 2 pods at v1; `livepatch build --emit-manifest` + kubectl apply:
                 both pods patched, their own logs continue the counter with v2's output
  crash          a target container killed: the kubelet restarts it on v1, the patch is
                 re-applied to the new process without anyone asking
  probe          a failing liveness probe: the kubelet restarts the container, re-patched
  agent-restart  the agent pod deleted while a new pod waits to be patched: the DaemonSet's new
                 agent pod patches it
  drain          kubectl drain evicts the targets and the operator; after uncordon the new pods
                 are patched
  rollout        the Deployment rolled to the fixed image (v2): its new pods run the fixed build
                 and count as patched (UpToDate), not Failed/BuildIDMismatch
  sidecar        sidecar mode: the webhook injects an agent into an opted-in pod, which patches
                 its own pod only (its PID namespace holds nothing else) and reverts on delete
  sha_mismatch   a LivePatch pinning another sha256 than the bundle's: Failed, nothing patched
  restart_required  a data-layout change: RestartRequired, pod labelled; the rollout to the fixed
                 image clears it
  revert         deleting the LivePatch reverts the patched pods

Usage: tests/node/run.py [--keep] [--only NAME...]   (prints "N passed, M failed" last)
"""
import argparse
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.environ.get("LIVEPATCH_CACHE", os.path.expanduser("~/.cache/livepatch"))
HELM = os.environ.get("HELM", os.path.join(CACHE, "bin", "helm"))
KUBECTL = os.environ.get("KUBECTL", shutil.which("kubectl") or os.path.join(CACHE, "bin", "kubectl"))
NODE_SH = os.path.join(ROOT, "tests", "node", "node.sh")
BIN = os.path.join(ROOT, "target", "release")
CC = os.environ.get("CC", "cc")
# As Debian builds (dpkg-buildflags with hardening=+all): no live-patching flags.
CFLAGS = ["-g", "-O2", "-fstack-protector-strong", "-D_FORTIFY_SOURCE=2", "-fPIE", "-pie",
          "-Wl,-z,relro,-z,now", "-Wl,--build-id"]
RELEASE_NS = "livepatch-system"
APP_NS = "shop"
SOLO_NS = "solo"  # pods with their own agent (sidecar mode)
TARGET_PATH = "/app/greeter"
LP = "livepatches.livepatch.dev"
LPT = "livepatchtasks.livepatch.dev"


ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Fail(Exception):
    pass


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd, check=True, input=None, timeout=180, env=None):
    p = subprocess.run(cmd, capture_output=True, text=True, input=input, timeout=timeout, env=env)
    if check and p.returncode != 0:
        raise Fail(f"{' '.join(map(str, cmd))} -> exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return p


def wait_until(what, fn, timeout=90.0, interval=0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            v = fn()
            if v:
                return v
        except Fail as e:
            last = e
        time.sleep(interval)
    raise Fail(f"timed out after {timeout:.0f}s waiting for {what}" + (f" (last error: {last})" if last else ""))


class Node:
    def __init__(self, work):
        self.work = work
        self.env = {}

    def start(self, images):
        p = subprocess.run(["bash", NODE_SH, "start", self.work], env={**os.environ, "NODE_IMAGES": " ".join(images)},
                           capture_output=True, text=True, timeout=600)
        sys.stderr.write(p.stderr[-4000:])
        if p.returncode != 0:
            raise Fail("tests/node/node.sh start failed")
        for line in open(os.path.join(self.work, "env")):
            k, _, v = line.rstrip("\n").partition("=")
            self.env[k] = v

    def stop(self):
        subprocess.run(["bash", NODE_SH, "stop", self.work], capture_output=True, timeout=180)

    def kubectl(self, *args, check=True, input=None, timeout=120):
        return run([KUBECTL, "--kubeconfig", self.env["KUBECONFIG"], *args], check=check, input=input, timeout=timeout)

    def get(self, kind, name=None, ns=None, selector=None):
        args = ["get", kind, "-o", "json"]
        if name:
            args.insert(2, name)
        if ns:
            args += ["-n", ns]
        if selector:
            args += ["-l", selector]
        return json.loads(self.kubectl(*args).stdout)

    def pods(self, ns, selector):
        return self.get("pods", ns=ns, selector=selector)["items"]

    def container_log(self, pod, container, restart=None):
        """The kubelet's log file of a container (CRI format), as lines of the program's output."""
        uid = pod["metadata"]["uid"]
        d = os.path.join(self.env["POD_LOGS"], f"{pod['metadata']['namespace']}_{pod['metadata']['name']}_{uid}", container)
        if restart is None:
            files = sorted(glob.glob(os.path.join(d, "*.log")), key=lambda f: int(os.path.basename(f).split(".")[0]))
            if not files:
                return []
            f = files[-1]
        else:
            f = os.path.join(d, f"{restart}.log")
        try:
            with open(f, errors="replace") as fh:
                return [ANSI.sub("", line.split(" ", 3)[3].rstrip("\n")) for line in fh if line.count(" ") >= 3]
        except FileNotFoundError:
            return []


def safe_readlink(path):
    try:
        return os.readlink(path)
    except OSError:
        return None


def host_pid(container_id, exe_name="greeter"):
    """The host PID of a container's process, from the cgroups the kubelet's CRI made."""
    cid = container_id.split("://", 1)[-1]
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cgroup") as f:
                cg = f.read()
            exe = os.readlink(f"/proc/{d}/exe")
        except OSError:
            continue
        if cid in cg and exe.endswith(exe_name):
            return int(d)
    return None


def build_id(path):
    m = re.search(r"Build ID:\s*([0-9a-f]+)", run(["readelf", "-n", path]).stdout)
    if not m:
        raise Fail(f"{path}: no build id")
    return m.group(1)


class Test:
    def __init__(self, args):
        self.keep = args.keep
        self.work = tempfile.mkdtemp(prefix="lp-node.")
        self.node = Node(os.path.join(self.work, "node"))
        self.exe = {}
        self.build_ids = {}
        self.bundle = None

    def prepare(self):
        # The target, two versions, each as an image with exactly its libraries.
        images = []
        for v in ("v1", "v2", "v3"):
            exe = os.path.join(self.work, "bin", v, "greeter")
            os.makedirs(os.path.dirname(exe), exist_ok=True)
            run([CC, *CFLAGS, "-o", exe, os.path.join(ROOT, "tests", "e2e", "targets", f"greeter-{v}.c")])
            self.exe[v], self.build_ids[v] = exe, build_id(exe)
            tar = os.path.join(self.work, f"greeter-{v}.oci.tar")
            run([sys.executable, os.path.join(ROOT, "scripts", "oci-image.py"), "--name", f"lp-greeter:{v}", "--out", tar,
                 "--file", f"{exe}:{TARGET_PATH}", "--entrypoint", TARGET_PATH])
            images.append(tar)
        out = run(["bash", os.path.join(ROOT, "scripts", "images.sh"), os.path.join(self.work, "images")], timeout=1800).stdout.strip()
        images += sorted(glob.glob(os.path.join(out, "*.oci.tar")))
        version = re.search(r'^appVersion:\s*"?([^"\n]+)"?', open(os.path.join(ROOT, "charts", "livepatch", "Chart.yaml")).read(), re.M).group(1)
        self.image_tag = version
        log(f"images: {[os.path.basename(i) for i in images]}")
        return images

    def livepatch(self, *args, env=None):
        return run([os.path.join(BIN, "livepatch"), *args], env=env)

    # --- helpers over the cluster ---------------------------------------------------------
    def lp(self, name):
        return self.node.get(LP, name, APP_NS)

    def wait_lp(self, name, want, timeout=120):
        def ok():
            o = self.lp(name)
            st = o.get("status") or {}
            return o if want(st) else None
        try:
            return wait_until(f"LivePatch {name}", ok, timeout=timeout)
        except Fail as e:
            tasks = self.node.kubectl("get", LPT, "-n", APP_NS, "-o", "wide", check=False).stdout
            raise Fail(f"{e}\nstatus: {json.dumps(self.lp(name).get('status'))}\ntasks:\n{tasks}") from None

    def running_pods(self, selector, n):
        def ok():
            pods = [p for p in self.node.pods(APP_NS, selector) if not p["metadata"].get("deletionTimestamp")]
            ready = [p for p in pods if p["status"].get("phase") == "Running"
                     and all(c.get("ready") for c in p["status"].get("containerStatuses") or [{}])]
            return ready if len(ready) == n and len(pods) == n else None
        return wait_until(f"{n} running pods {selector}", ok, timeout=120)

    def wait_output(self, pod, prefix, count=3, after=None, timeout=60, namespace=APP_NS):
        """`count` lines starting with `prefix` in the pod's current container log (after line `after`)."""
        def ok():
            p = self.node.get("pod", pod["metadata"]["name"], namespace)
            lines = self.node.container_log(p, "app")
            if after is not None:
                lines = lines[after:]
            hits = [l for l in lines if l.startswith(prefix)]
            return hits if len(hits) >= count else None
        return wait_until(f"{pod['metadata']['name']}: {count} lines '{prefix}'", ok, timeout=timeout)

    # --- scenarios ------------------------------------------------------------------------
    def s_install(self):
        k = self.node.kubectl
        k("create", "namespace", RELEASE_NS)
        k("create", "namespace", SOLO_NS)  # sidecar mode: its service account is bound by the chart
        k("create", "namespace", APP_NS)
        k("label", "namespace", RELEASE_NS, "pod-security.kubernetes.io/enforce=privileged")
        api = [{"name": "KUBERNETES_SERVICE_HOST", "value": self.node.env["NODE_IP"]},
               {"name": "KUBERNETES_SERVICE_PORT", "value": self.node.env["APISERVER_PORT"]}]
        values = {
            "image": {"repository": "livepatch", "tag": self.image_tag, "pullPolicy": "Never"},
            "operator": {"replicas": 1, "extraEnv": api, "leaderElection": {"enabled": False}},
            "agent": {"extraEnv": api},
            "sidecar": {"webhook": {"enabled": True}, "extraEnv": api,
                        "serviceAccounts": [{"namespace": SOLO_NS, "name": "default"}]},
        }
        vf = os.path.join(self.work, "values-node.yaml")
        with open(vf, "w") as f:
            json.dump(values, f)  # JSON is YAML
        run([HELM, "install", "livepatch", os.path.join(ROOT, "charts", "livepatch"), "-n", RELEASE_NS,
             "--kubeconfig", self.node.env["KUBECONFIG"], "-f", vf, "--wait", "--timeout", "180s"], timeout=240)
        # helm --wait may return before the DaemonSet controller made its pod: wait for both.
        def up():
            ps = self.node.pods(RELEASE_NS, "app.kubernetes.io/instance=livepatch")
            ready = [p for p in ps if p["status"].get("phase") == "Running"
                     and all(c.get("ready") for c in p["status"].get("containerStatuses") or [{}])]
            return ps if len(ps) == 2 and len(ready) == 2 else None
        pods = wait_until("the operator and agent pods Running and Ready", up, timeout=120)
        comps = sorted(p["metadata"]["labels"].get("app.kubernetes.io/component", "?") for p in pods)
        images = sorted({c["image"] for p in pods for c in p["spec"]["containers"]})
        if comps != ["agent", "operator"]:
            raise Fail(f"pods of the release: {comps}")
        for p in pods:
            if p["spec"]["nodeName"] != self.node.env["NODE_NAME"] or p["status"]["phase"] != "Running":
                raise Fail(f"{p['metadata']['name']}: {p['spec'].get('nodeName')} {p['status'].get('phase')}")
        return f"operator and agent pods Running on {self.node.env['NODE_NAME']} from {images}"

    def deployment(self, image_version, replicas=2):
        return {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "greeter", "namespace": APP_NS},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": "greeter"}},
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                "template": {
                    "metadata": {"labels": {"app": "greeter"}},
                    "spec": {
                        "terminationGracePeriodSeconds": 2,
                        "containers": [{"name": "app", "image": f"lp-greeter:{image_version}", "imagePullPolicy": "Never"}],
                    },
                },
            },
        }

    def s_apply(self):
        k = self.node.kubectl
        k("apply", "-f", "-", input=json.dumps(self.deployment("v1")))
        pods = self.running_pods("app=greeter", 2)
        for p in pods:
            self.wait_output(p, "v1 hello", count=2)
        out = os.path.join(self.work, "bundles", "greeter-fix.lpatch")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        info = json.loads(self.livepatch("build", "--old", self.exe["v1"], "--new", self.exe["v2"], "-o", out,
                                         "--emit-manifest", "--namespace", APP_NS, "--selector", "app=greeter",
                                         "--container", "app", "--target-path", TARGET_PATH, "--json").stdout)
        self.bundle = info
        marks = {p["metadata"]["name"]: len(self.node.container_log(p, "app")) for p in pods}
        k("apply", "--dry-run=server", "-f", info["manifest"])
        k("apply", "-f", info["manifest"])
        o = self.wait_lp("greeter-fix", lambda st: st.get("phase") == "Applied" and (st.get("counts") or {}).get("patched") == 2)
        for p in pods:
            name = p["metadata"]["name"]
            before = [l for l in self.node.container_log(p, "app")[:marks[name]] if l.startswith("v1 hello")]
            after = self.wait_output(p, "v2 hello", count=3, after=marks[name])
            b = int(re.search(r"served=(\d+)", before[-1]).group(1))
            a = int(re.search(r"served=(\d+)", after[0]).group(1))
            if a <= b:
                raise Fail(f"{name}: the patched code does not continue the counter ({before[-1]!r} -> {after[0]!r})")
        return f"2/2 pods of a real Deployment patched (status {o['status']['counts']}), counters kept"

    def s_crash(self):
        pods = self.running_pods("app=greeter", 2)
        victim = pods[0]
        name = victim["metadata"]["name"]
        cs = victim["status"]["containerStatuses"][0]
        pid = host_pid(cs["containerID"])
        if not pid:
            raise Fail(f"{name}: no host process for {cs['containerID']}")
        restarts = cs.get("restartCount", 0)
        os.kill(pid, signal.SIGKILL)

        def restarted():
            p = self.node.get("pod", name, APP_NS)
            c = (p["status"].get("containerStatuses") or [{}])[0]
            return p if c.get("restartCount", 0) > restarts and c.get("state", {}).get("running") else None
        p = wait_until(f"{name} restarted by the kubelet", restarted, timeout=90)
        # The kubelet ran v1 again; the agent patches the new process: its own log turns to v2.
        self.wait_output(p, "v1 hello", count=1, timeout=30)
        lines = self.wait_output(p, "v2 hello", count=3, timeout=90)
        self.wait_lp("greeter-fix", lambda st: st.get("phase") == "Applied" and (st.get("counts") or {}).get("patched") == 2)
        newpid = host_pid(p["status"]["containerStatuses"][0]["containerID"])
        return f"{name} killed (pid {pid}), restarted by the kubelet (pid {newpid}), re-patched: {lines[0]!r}"

    def s_probe(self):
        """A liveness probe that fails (nothing listens on its port): the kubelet restarts the container, the patch follows."""
        k = self.node.kubectl
        probe = {"spec": {"template": {"spec": {"containers": [{"name": "app", "livenessProbe": {
            "tcpSocket": {"port": 8080}, "initialDelaySeconds": 3, "periodSeconds": 2, "failureThreshold": 1}}]}}}}
        k("-n", APP_NS, "patch", "deployment/greeter", "--type=strategic", "-p", json.dumps(probe))
        k("-n", APP_NS, "rollout", "status", "deployment/greeter", "--timeout=120s", timeout=150)

        def restarted():
            ps = [p for p in self.node.pods(APP_NS, "app=greeter") if not p["metadata"].get("deletionTimestamp")]
            done = [p for p in ps if (p["status"].get("containerStatuses") or [{}])[0].get("restartCount", 0) >= 1
                    and (p["status"].get("containerStatuses") or [{}])[0].get("state", {}).get("running")]
            return done[0] if done else None
        p = wait_until("a container restarted by its failing liveness probe", restarted, timeout=90)
        reason = ((p["status"]["containerStatuses"][0].get("lastState") or {}).get("terminated") or {}).get("reason")
        lines = self.wait_output(p, "v2 hello", count=2, timeout=60)
        # Take the probe out again (a rollout: new pods, patched on start).
        k("-n", APP_NS, "patch", "deployment/greeter", "--type=json", "-p",
          json.dumps([{"op": "remove", "path": "/spec/template/spec/containers/0/livenessProbe"}]))
        k("-n", APP_NS, "rollout", "status", "deployment/greeter", "--timeout=120s", timeout=150)
        self.wait_lp("greeter-fix", lambda st: st.get("phase") == "Applied" and (st.get("counts") or {}).get("patched") == 2, timeout=120)
        return f"{p['metadata']['name']} restarted by the kubelet (last state {reason}), re-patched: {lines[0]!r}"

    def s_drain(self):
        """`kubectl drain` evicts the targets (and the operator); uncordon brings them back, patched."""
        k = self.node.kubectl
        node = self.node.env["NODE_NAME"]
        before = {p["metadata"]["uid"] for p in self.running_pods("app=greeter", 3)}
        operator = {p["metadata"]["uid"] for p in self.node.pods(RELEASE_NS, "app.kubernetes.io/component=operator")}
        k("drain", node, "--ignore-daemonsets", "--delete-emptydir-data", "--timeout=120s", timeout=150)
        wait_until("the drained targets gone", lambda: not [p for p in self.node.pods(APP_NS, "app=greeter")
                                                            if p["status"].get("phase") == "Running"], timeout=90)
        k("uncordon", node)
        pods = self.running_pods("app=greeter", 3)
        if {p["metadata"]["uid"] for p in pods} & before:
            raise Fail("a target pod survived the drain")
        now = {p["metadata"]["uid"] for p in self.node.pods(RELEASE_NS, "app.kubernetes.io/component=operator")}
        if not now or now & operator:
            raise Fail(f"the operator pod was not evicted and recreated: {operator} -> {now}")
        self.wait_lp("greeter-fix", lambda st: st.get("phase") == "Applied" and (st.get("counts") or {}).get("patched") == 3, timeout=180)
        for p in pods:
            self.wait_output(p, "v2 hello", count=2)
        return "drained (targets and operator evicted), uncordoned: 3 new pods patched"

    def s_agent_restart(self):
        k = self.node.kubectl
        agent = [p for p in self.node.pods(RELEASE_NS, "app.kubernetes.io/component=agent")][0]
        # Scale up and delete the agent at once: the new pod's task waits for an agent.
        k("-n", APP_NS, "scale", "deployment/greeter", "--replicas=3")
        k("-n", RELEASE_NS, "delete", "pod", agent["metadata"]["name"], "--wait=false")

        def new_agent():
            ps = [p for p in self.node.pods(RELEASE_NS, "app.kubernetes.io/component=agent")
                  if p["metadata"]["uid"] != agent["metadata"]["uid"] and p["status"].get("phase") == "Running"]
            return ps[0] if ps else None
        a2 = wait_until("the DaemonSet's new agent pod", new_agent, timeout=120)
        pods = self.running_pods("app=greeter", 3)
        self.wait_lp("greeter-fix", lambda st: st.get("phase") == "Applied" and (st.get("counts") or {}).get("patched") == 3, timeout=180)
        for p in pods:
            self.wait_output(p, "v2 hello", count=2)
        return f"agent {agent['metadata']['name']} deleted, {a2['metadata']['name']} created by the DaemonSet; 3/3 patched"

    def s_rollout(self):
        k = self.node.kubectl
        k("-n", APP_NS, "set", "image", "deployment/greeter", "app=lp-greeter:v2")
        k("-n", APP_NS, "rollout", "status", "deployment/greeter", "--timeout=180s", timeout=200)
        pods = self.running_pods("app=greeter", 3)
        for p in pods:
            if p["spec"]["containers"][0]["image"] != "lp-greeter:v2":
                raise Fail(f"{p['metadata']['name']} runs {p['spec']['containers'][0]['image']}")
            self.wait_output(p, "v2 hello", count=2)
        o = self.wait_lp("greeter-fix", lambda st: st.get("phase") == "Applied" and (st.get("counts") or {}).get("patched") == 3
                         and (st.get("counts") or {}).get("failed", 0) == 0, timeout=120)
        tasks = self.node.get(LPT, ns=APP_NS)["items"]
        reasons = sorted({(t.get("status") or {}).get("reason") or "" for t in tasks})
        if "UpToDate" not in reasons:
            raise Fail(f"the tasks of the fixed pods do not say UpToDate: {reasons}")
        return f"rolled to the fixed image: {o['status']['counts']}, task reasons {reasons}"

    def s_sidecar(self):
        """Sidecar mode: the webhook injects an agent into an opted-in pod; that agent patches its
        own pod (the node agent leaves it alone) and shares a PID namespace with it only."""
        k = self.node.kubectl
        dep = self.deployment("v1", replicas=1)
        dep["metadata"] = {"name": "solo", "namespace": SOLO_NS}
        dep["spec"]["selector"]["matchLabels"] = {"app": "solo"}
        dep["spec"]["template"]["metadata"]["labels"] = {"app": "solo", "livepatch.dev/sidecar": "enabled"}
        k("apply", "-f", "-", input=json.dumps(dep))

        def running():
            ps = [p for p in self.node.pods(SOLO_NS, "app=solo") if p["status"].get("phase") == "Running"
                  and all(c.get("ready") for c in p["status"].get("containerStatuses") or [{}])]
            return ps[0] if ps else None
        pod = wait_until("the opted-in pod running", running, timeout=120)
        spec = pod["spec"]
        init = [c for c in spec.get("initContainers") or [] if c["name"] == "livepatch-agent"]
        if not (init and init[0].get("restartPolicy") == "Always" and spec.get("shareProcessNamespace") is True
                and pod["metadata"]["labels"].get("livepatch.dev/agent") == "sidecar"):
            raise Fail(f"the webhook did not inject the sidecar: init {init}, shareProcessNamespace {spec.get('shareProcessNamespace')}")
        caps = init[0]["securityContext"]["capabilities"]
        if caps != {"drop": ["ALL"], "add": ["SYS_PTRACE"]} or spec.get("hostPID"):
            raise Fail(f"the sidecar's privileges: {caps}, hostPID {spec.get('hostPID')}")
        # Isolation: the agent's PID namespace holds exactly this pod's processes.
        statuses = {c["name"]: c for c in pod["status"].get("initContainerStatuses", []) + pod["status"]["containerStatuses"]}
        agent_pid, app_pid = host_pid(statuses["livepatch-agent"]["containerID"], "node-agent"), host_pid(statuses["app"]["containerID"])
        other = self.node.pods(RELEASE_NS, "app.kubernetes.io/component=operator")[0]
        other_pid = host_pid(other["status"]["containerStatuses"][0]["containerID"], "livepatch-operator")
        ns = lambda pid: os.readlink(f"/proc/{pid}/ns/pid")
        if not agent_pid or ns(agent_pid) != ns(app_pid) or ns(agent_pid) == ns(other_pid):
            raise Fail(f"PID namespaces: agent {agent_pid}, app {app_pid}, another pod's {other_pid}")
        members = sorted(os.readlink(f"/proc/{d}/exe").rsplit("/", 1)[-1] for d in os.listdir("/proc") if d.isdigit()
                         and os.path.exists(f"/proc/{d}/ns/pid") and safe_readlink(f"/proc/{d}/ns/pid") == ns(agent_pid))
        if members != sorted(["greeter", "node-agent", "pause"]):
            raise Fail(f"the agent's PID namespace holds {members}")
        self.wait_output(pod, "v1 hello", count=2, namespace=SOLO_NS)
        out = os.path.join(self.work, "bundles", "solo-fix.lpatch")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        info = json.loads(self.livepatch("build", "--old", self.exe["v1"], "--new", self.exe["v2"], "-o", out,
                                         "--emit-manifest", "--namespace", SOLO_NS, "--selector", "app=solo",
                                         "--container", "app", "--json").stdout)
        mark = len(self.node.container_log(pod, "app"))
        k("apply", "-f", info["manifest"])

        def applied():
            o = self.node.get(LP, "solo-fix", SOLO_NS)
            st = o.get("status") or {}
            return o if st.get("phase") == "Applied" and (st.get("counts") or {}).get("patched") == 1 else None
        wait_until("LivePatch solo-fix Applied", applied, timeout=120)
        self.wait_output(pod, "v2 hello", count=3, after=mark, namespace=SOLO_NS)
        # The sidecar wrote the task's status; the node agent never did (its reconciles are logged
        # with the task's namespace).
        wrote = lambda lines: [l for l in lines if f"namespace={SOLO_NS}" in l and "task status" in l]
        sidecar_lines = wrote(self.node.container_log(self.node.get("pod", pod["metadata"]["name"], SOLO_NS), "livepatch-agent"))
        if not any(info["patch_id"] in l and "Applied" in l for l in sidecar_lines):
            raise Fail(f"the sidecar did not report the patch applied: {sidecar_lines[-5:]}")
        node_agent = self.node.pods(RELEASE_NS, "app.kubernetes.io/component=agent")[0]
        if wrote(self.node.container_log(node_agent, "agent")):
            raise Fail(f"the node agent acted on the sidecar's pod: {wrote(self.node.container_log(node_agent, 'agent'))[:3]}")
        # The application restarts: its sidecar re-applies the patch to the new process.
        os.kill(host_pid(pod["status"]["containerStatuses"][0]["containerID"]), signal.SIGKILL)

        def restarted():
            p = self.node.get("pod", pod["metadata"]["name"], SOLO_NS)
            c = p["status"]["containerStatuses"][0]
            return p if c.get("restartCount", 0) >= 1 and c.get("state", {}).get("running") else None
        pod = wait_until("the opted-in pod's application restarted", restarted, timeout=90)
        self.wait_output(pod, "v2 hello", count=3, namespace=SOLO_NS, timeout=90)
        k("-n", SOLO_NS, "delete", LP, "solo-fix", "--timeout=120s", timeout=150)
        self.wait_output(pod, "v1 hello", count=3, namespace=SOLO_NS,
                         after=len(self.node.container_log(self.node.get("pod", pod["metadata"]["name"], SOLO_NS), "app")))
        return f"sidecar injected (SYS_PTRACE only, shared PID namespace of {members}), patched its pod to v2, re-patched it after a crash, reverted it"

    def small(self, name, version):
        dep = self.deployment(version, replicas=1)
        dep["metadata"]["name"] = name
        dep["spec"]["selector"]["matchLabels"] = {"app": name}
        dep["spec"]["template"]["metadata"]["labels"] = {"app": name}
        self.node.kubectl("apply", "-f", "-", input=json.dumps(dep))
        (pod,) = self.running_pods(f"app={name}", 1)
        self.wait_output(pod, f"{version} hello", count=2)
        return pod

    def manifest(self, name, old, new, selector, *extra):
        out = os.path.join(self.work, "bundles", f"{name}.lpatch")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        return json.loads(self.livepatch("build", "--old", self.exe[old], "--new", self.exe[new], "-o", out, *extra,
                                         "--emit-manifest", "--namespace", APP_NS, "--selector", selector,
                                         "--container", "app", "--json").stdout)

    def s_sha_mismatch(self):
        """A LivePatch whose sha256 is not the bundle's: Failed/BundleDigestMismatch, nothing patched."""
        pod = self.small("sha", "v1")
        info = self.manifest("sha-fix", "v1", "v2", "app=sha")
        wrong = "f" * 64
        text = open(info["manifest"]).read().replace(f"sha256: {info['sha256']}", f"sha256: {wrong}")
        if wrong not in text:
            raise Fail("the emitted manifest has no sha256 line to change")
        mark = len(self.node.container_log(pod, "app"))
        self.node.kubectl("apply", "-f", "-", input=text)
        o = self.wait_lp("sha-fix", lambda st: st.get("phase") == "Degraded")
        (task,) = [x for x in self.node.get(LPT, ns=APP_NS)["items"] if x["spec"]["podName"] == pod["metadata"]["name"]]
        s = task.get("status") or {}
        if (s.get("phase"), s.get("reason")) != ("Failed", "BundleDigestMismatch") or wrong not in (s.get("message") or ""):
            raise Fail(f"task status: {s}")
        self.wait_output(pod, "v1 hello", count=5, after=mark)
        self.node.kubectl("-n", APP_NS, "delete", LP, "sha-fix", "--timeout=120s", timeout=150)
        self.node.kubectl("-n", APP_NS, "delete", "deployment", "sha")
        return f"Failed/BundleDigestMismatch, LivePatch {o['status']['phase']}, output still v1"

    def s_restart_required(self):
        """A data-layout change (v3's struct grows): the bundle records the refusal; the pod is
        flagged RestartRequired and labelled; rolled to the fixed image, the flag clears."""
        pod = self.small("layout", "v1")
        info = self.manifest("layout-fix", "v1", "v3", "app=layout", "--record-refusal")
        mark = len(self.node.container_log(pod, "app"))
        self.node.kubectl("apply", "-f", info["manifest"])
        o = self.wait_lp("layout-fix", lambda st: st.get("phase") == "RestartRequired")
        reasons = [r.get("reason") for r in o["status"].get("restartRequired") or []]
        wait_until("the pod labelled restart-required", lambda: (self.node.get("pod", pod["metadata"]["name"], APP_NS)["metadata"]
                                                                   .get("labels") or {}).get("livepatch.dev/restart-required") == "true", timeout=60)
        self.wait_output(pod, "v1 hello", count=5, after=mark)
        # The offline restart the flag asks for: the Deployment rolled to the fixed image.
        self.node.kubectl("-n", APP_NS, "set", "image", "deployment/layout", "app=lp-greeter:v3")
        self.node.kubectl("-n", APP_NS, "rollout", "status", "deployment/layout", "--timeout=120s", timeout=150)
        (new,) = self.running_pods("app=layout", 1)
        self.wait_output(new, "v3 hello", count=2)
        o = self.wait_lp("layout-fix", lambda st: st.get("phase") == "Applied" and not st.get("restartRequired"), timeout=120)
        if "livepatch.dev/restart-required" in (new["metadata"].get("labels") or {}):
            raise Fail("the new pod carries the restart-required label")
        self.node.kubectl("-n", APP_NS, "delete", LP, "layout-fix", "--timeout=120s", timeout=150)
        self.node.kubectl("-n", APP_NS, "delete", "deployment", "layout")
        return f"RestartRequired ({reasons}), pod labelled, output unchanged; rolled to v3: {o['status']['counts']}"

    def s_revert(self):
        pods = self.running_pods("app=greeter", 3)
        k = self.node.kubectl
        k("-n", APP_NS, "set", "image", "deployment/greeter", "app=lp-greeter:v1")
        k("-n", APP_NS, "rollout", "status", "deployment/greeter", "--timeout=180s", timeout=200)
        pods = self.running_pods("app=greeter", 3)
        self.wait_lp("greeter-fix", lambda st: st.get("phase") == "Applied" and (st.get("counts") or {}).get("patched") == 3, timeout=180)
        marks = {p["metadata"]["name"]: len(self.node.container_log(p, "app")) for p in pods}
        k("-n", APP_NS, "delete", LP, "greeter-fix", "--timeout=120s", timeout=150)
        for p in pods:
            self.wait_output(p, "v1 hello", count=3, after=marks[p["metadata"]["name"]])
        return "rolled back to v1 (re-patched), LivePatch deleted: 3/3 pods reverted to v1's output"

    def teardown(self, failed):
        if failed or self.keep:
            for f in ("kubelet.log", "containerd.log", "controller-manager.log", "scheduler.log", "apiserver.log"):
                path = os.path.join(self.node.work, f)
                if os.path.exists(path):
                    log(f"--- last lines of {path}")
                    print("".join(open(path, errors="replace").readlines()[-15:]))
            if self.node.env.get("KUBECONFIG"):
                for comp in ("operator", "agent"):
                    print(self.node.kubectl("-n", RELEASE_NS, "logs", "-l", f"app.kubernetes.io/component={comp}", "--tail=30", check=False).stdout)
                print(self.node.kubectl("get", "pods", "-A", "-o", "wide", check=False).stdout)
        self.node.stop()
        if not failed and not self.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            log(f"work directory kept: {self.work}")


SCENARIOS = ["install", "apply", "crash", "probe", "agent_restart", "drain", "rollout", "sidecar", "sha_mismatch",
             "restart_required", "revert"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    t = Test(args)
    passed = failed = 0
    try:
        images = t.prepare()
        t0 = time.monotonic()
        t.node.start(images)
        log(f"node Ready in {time.monotonic() - t0:.1f}s")
        for name in SCENARIOS:
            if args.only and name not in args.only:
                continue
            t1 = time.monotonic()
            try:
                msg = getattr(t, f"s_{name}")()
                passed += 1
                log(f"PASS {name} ({time.monotonic() - t1:.1f}s): {msg}")
            except Exception as e:  # noqa: BLE001 - a scenario's failure is reported, the rest is skipped
                failed += 1
                log(f"FAIL {name} ({time.monotonic() - t1:.1f}s): {e}")
                if not isinstance(e, Fail):
                    traceback.print_exc()
                break  # the scenarios build on each other
    except Exception as e:  # noqa: BLE001
        failed += 1
        log(f"FAIL setup: {e}")
        if not isinstance(e, Fail):
            traceback.print_exc()
    finally:
        t.teardown(failed > 0)
    print(f"{passed} passed, {failed} failed")
    sys.exit(0 if failed == 0 and passed > 0 else 1)


if __name__ == "__main__":
    main()
