#!/usr/bin/env python3
"""Apply every security fix of the corpus (tests/corpus/build.sh) live to a running daemon.

The corpus holds two Debian daemons: nginx (tests/corpus/build.sh) and dnsmasq
(tests/corpus/build-dnsmasq.sh); every package's pairs are run, each with its own start, load and
liveness check (DAEMONS below). For each pair (one Debian security patch, one build variant):

  1. start the OLD daemon on 127.0.0.1: nginx (master + 2 workers) serving a static directory;
     dnsmasq (main process + its script helper child) answering for a local zone,
  2. keep it under a bounded load (threads: keep-alive HTTP clients for nginx; DNS queries over
     UDP, and over TCP from one thread (a forked child per connection), for dnsmasq),
  3. `livepatch build --old OLD --new NEW --source-diff fix.patch` (the patch file exactly as
     Debian ships it in debian/patches),
  4. `livepatch apply --pid P` to the main process and each of its children, then
     `livepatch status --pid P`,
  5. stop the load and check: no failed request, requests served after the update, every
     process alive and reporting the patch.

The outcome of each pair is one of: applied, nothing-to-patch (the fix compiles to the same
machine code in this build, or touches files not compiled in), refused (with its typed
refusal kind), blocked, failed. Refusals and nothing-to-patch are answers; `failed` (a harmed
target, a failed request, an apply that errors) makes this script exit 1.

    tests/corpus/run.py [--livepatch target/release/livepatch] [--only NAME] [--json OUT]
                        [--markdown OUT] [--variant hardened|lto]...
"""
import argparse
import glob
import http.client
import json
import os
import pwd
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CACHE = os.environ.get("LIVEPATCH_CACHE", os.path.expanduser("~/.cache/livepatch"))
LOAD_THREADS = 4
LOAD_MAX_SECONDS = 60  # hard bound of one load phase
LOAD_MAX_REQUESTS = 200_000


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def rss_kib(pid):
    """The process's resident memory (VmRSS, KiB), or None."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def children(pid):
    out = []
    for task in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            out += [int(x) for x in open(task).read().split()]
        except OSError:
            pass
    return sorted(set(out))


class Load:
    """Keep-alive GET requests from a few threads until stopped (or the bounds are hit)."""

    def __init__(self, port):
        self.port = port
        self.ok = 0
        self.failed = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(LOAD_THREADS)]
        self.t0 = time.monotonic()

    def start(self):
        for t in self.threads:
            t.start()

    def run(self):
        conn = None
        paths = ["/", "/index.html", "/big.bin", "/missing"]
        i = 0
        while not self.stop.is_set() and time.monotonic() - self.t0 < LOAD_MAX_SECONDS:
            with self.lock:
                if self.ok + len(self.failed) >= LOAD_MAX_REQUESTS:
                    return
            path = paths[i % len(paths)]
            i += 1
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("GET", path)
                r = conn.getresponse()
                body = r.read()
                want = 404 if path == "/missing" else 200
                good = r.status == want and (path != "/big.bin" or len(body) == 256 * 1024)
                with self.lock:
                    if good:
                        self.ok += 1
                    else:
                        self.failed.append(f"{path}: status {r.status}, {len(body)} bytes")
            except (OSError, http.client.HTTPException) as e:
                with self.lock:
                    self.failed.append(f"{path}: {type(e).__name__}: {e}")
                conn = None

    def count(self):
        with self.lock:
            return self.ok

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=15)


def livepatch(lp, *args):
    r = subprocess.run([lp, *args], capture_output=True, text=True, timeout=300)
    data = None
    text = r.stdout.strip()
    try:
        data = json.loads(text)
    except ValueError:
        # A human line before the JSON object: take the last line that is an object.
        for line in reversed(text.splitlines()):
            try:
                v = json.loads(line)
            except ValueError:
                continue
            if isinstance(v, dict):
                data = v
                break
    if not isinstance(data, dict):
        data = None
    return r.returncode, data, r.stderr.strip()


def start_nginx(exe, prefix, port):
    root = os.path.join(prefix, "html")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "index.html"), "w") as f:
        f.write("<html><body>livepatch corpus</body></html>\n")
    with open(os.path.join(root, "big.bin"), "wb") as f:
        f.write(os.urandom(256 * 1024))
    for n in ("index.html", "big.bin"):
        os.chmod(os.path.join(root, n), 0o644)
    os.chmod(root, 0o755)
    user = pwd.getpwuid(os.getuid()).pw_name if os.getuid() != 0 else "nobody nogroup"
    conf = open(os.path.join(HERE, "nginx.conf.in")).read()
    for k, v in {"@PREFIX@": prefix, "@ROOT@": root, "@PORT@": str(port), "@USER@": user}.items():
        conf = conf.replace(k, v)
    if os.getuid() == 0:
        os.chmod(prefix, 0o755)
    with open(os.path.join(prefix, "nginx.conf"), "w") as f:
        f.write(conf)
    p = subprocess.Popen([exe, "-p", prefix, "-c", os.path.join(prefix, "nginx.conf"), "-e", os.path.join(prefix, "error.log")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"nginx exited at start: {p.stderr.read().decode(errors='replace')[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            if len(children(p.pid)) >= 2:
                return p
        except OSError:
            pass
        time.sleep(0.05)
    p.kill()
    raise RuntimeError("nginx did not start listening within 20 s")


def stop_nginx(p):
    if p.poll() is None:
        p.send_signal(signal.SIGQUIT)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def get(port, path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read().decode(errors="replace")
    finally:
        c.close()


def check_42945(port):
    """The capture of a rewrite with arguments is no longer escaped."""
    status, _, body = get(port, "/rw/a%3Cb%3E")
    return None if (status, body) == (200, "/rw/a<b>") else f"GET /rw/a%3Cb%3E answered {status} {body!r}, want 200 '/rw/a<b>'"


def check_9256(port):
    """Overlapping captures in a redirect: a complete answer with both captures."""
    n = 30
    status, headers, _ = get(port, "/rd/" + "+" * n)
    loc = headers.get("Location", "")
    pluses = loc.count("+") + loc.count("%2B")
    if status == 302 and loc.startswith("http://127.0.0.1:8080/") and pluses == 2 * n:
        return None
    return f"GET /rd/{'+' * n} answered {status} Location {loc!r}, want 302 with both captures ({2 * n} pluses)"


# Fixes whose behaviour is checked after the live update: the request is sent only to patched
# processes (to the old code it is the CVE's trigger), several times so every worker answers.
TRIGGERS = {"CVE-2026-42945": check_42945, "CVE-2026-9256": check_9256}

# --- dnsmasq -------------------------------------------------------------------------------------
DNS_ZONE = "lp.test"
DNS_A = ("a.lp.test", "10.1.2.3")
DNS_TXT = ("t.lp.test", "livepatch-corpus." * 12)  # one 204-byte string (no space, comma or quote)
DNS_QUERY_GAP = 0.002  # seconds between two queries of one thread
DNS_QUERIES = [("a.lp.test", 1, 0), ("t.lp.test", 16, 0), ("missing.lp.test", 1, 3)]  # name, type, rcode


def dns_query(qid, name, qtype):
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    return q + struct.pack(">HH", qtype, 1)


def dns_check(reply, qid, name, qtype, rcode):
    """None if the reply is the expected answer, else why not."""
    if len(reply) < 12:
        return f"{name}: short reply ({len(reply)} bytes)"
    rid, flags, _, ancount = struct.unpack(">HHHH", reply[:8])
    if rid != qid or not flags & 0x8000:
        return f"{name}: reply id {rid} flags {flags:#x}, want id {qid} and a response"
    if flags & 0xF != rcode:
        return f"{name}: rcode {flags & 0xF}, want {rcode}"
    if rcode == 0:
        want = socket.inet_aton(DNS_A[1]) if qtype == 1 else bytes([len(DNS_TXT[1])]) + DNS_TXT[1].encode()
        if ancount != 1 or not reply.endswith(want):
            return f"{name}: {ancount} answers, rdata does not end with the record"
    return None


class DnsLoad(Load):
    """DNS queries from a few threads, paced: UDP (a socket per thread, one query in flight, a 5 s
    timeout, no retry), and from thread 0 over TCP, one connection per query (dnsmasq forks a
    child for each, from the patched main process once the update is in)."""

    def __init__(self, port):
        super().__init__(port)
        self.next_thread = 0

    def run(self):
        with self.lock:
            me = self.next_thread
            self.next_thread += 1
        sock = None
        i = 0
        while not self.stop.is_set() and time.monotonic() - self.t0 < LOAD_MAX_SECONDS:
            with self.lock:
                if self.ok + len(self.failed) >= LOAD_MAX_REQUESTS:
                    return
            name, qtype, rcode = DNS_QUERIES[i % len(DNS_QUERIES)]
            i += 1
            qid = (me * 7919 + i) & 0xFFFF
            tcp = me == 0
            try:
                if tcp:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=5) as c:
                        q = dns_query(qid, name, qtype)
                        c.sendall(struct.pack(">H", len(q)) + q)
                        buf = b""
                        while len(buf) < 2 or len(buf) < 2 + struct.unpack(">H", buf[:2])[0]:
                            chunk = c.recv(4096)
                            if not chunk:
                                raise ConnectionError(f"closed after {len(buf)} bytes")
                            buf += chunk
                        reply = buf[2:]
                else:
                    if sock is None:
                        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                        sock.settimeout(5)
                        sock.connect(("127.0.0.1", self.port))
                    sock.send(dns_query(qid, name, qtype))
                    reply = sock.recv(4096)
                why = dns_check(reply, qid, name, qtype, rcode)
                with self.lock:
                    if why is None:
                        self.ok += 1
                    else:
                        self.failed.append(("tcp " if tcp else "udp ") + why)
            except OSError as e:
                with self.lock:
                    self.failed.append(f"{'tcp' if tcp else 'udp'} {name}: {type(e).__name__}: {e}")
                if sock is not None:
                    sock.close()
                    sock = None
            # Paced (about 400 queries/s per thread): a blocked apply waits up to its timeout
            # (30 s) and the load must still be running, under LOAD_MAX_REQUESTS, after it.
            time.sleep(DNS_QUERY_GAP)
        if sock is not None:
            sock.close()


def start_dnsmasq(exe, prefix, port):
    """dnsmasq in the foreground (-k) on 127.0.0.1:port, no upstream, answering for a local zone;
    --dhcp-script with --script-arp makes it fork its script helper at start (a long-lived child,
    and helper.c is one of the patched files). As root, the main process drops to nobody and the
    helper stays root, as in Debian's service."""
    args = [exe, "-k", "--conf-file=/dev/null", f"--port={port}", "--listen-address=127.0.0.1", "--bind-interfaces",
            "--no-resolv", "--no-hosts", f"--local=/{DNS_ZONE}/", f"--host-record={DNS_A[0]},{DNS_A[1]}",
            f"--txt-record={DNS_TXT[0]},{DNS_TXT[1]}", f"--pid-file={prefix}/dnsmasq.pid",
            f"--log-facility={prefix}/dnsmasq.log", "--dhcp-script=/bin/true", "--script-arp"]
    if os.getuid() != 0:
        args.append(f"--user={pwd.getpwuid(os.getuid()).pw_name}")
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"dnsmasq exited at start: {p.stderr.read().decode(errors='replace')[-2000:]}")
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(0.5)
                s.sendto(dns_query(1, DNS_A[0], 1), ("127.0.0.1", port))
                if dns_check(s.recv(4096), 1, DNS_A[0], 1, 0) is None and len(children(p.pid)) >= 1:
                    return p
        except OSError:
            pass
        time.sleep(0.05)
    p.kill()
    raise RuntimeError("dnsmasq did not answer (with its helper started) within 20 s")


def stop_dnsmasq(p):
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# How each package of the corpus is run: start(exe, prefix, port) -> Popen of the main process (its
# children at that point are the other processes to patch), stop(Popen), the load class, and the
# fixed-behaviour checks by patch name (run after the update; see TRIGGERS).
DAEMONS = {
    "nginx": {"start": start_nginx, "stop": stop_nginx, "load": Load, "triggers": TRIGGERS},
    "dnsmasq": {"start": start_dnsmasq, "stop": stop_dnsmasq, "load": DnsLoad, "triggers": {}},
}


def run_pair(lp, pair_dir, keep_going):
    manifest = json.load(open(os.path.join(pair_dir, "manifest.json")))
    package = manifest.get("package", "nginx")
    daemon = DAEMONS[package]
    row = {"package": package, "patch": manifest.get("name"), "cve": manifest.get("cve", []),
           "variant": manifest.get("variant"), "subject": manifest.get("subject", "")}
    old, new, fix = (os.path.join(pair_dir, n) for n in ("old", "new", "fix.patch"))
    work = tempfile.mkdtemp(prefix="lp-corpus-")
    os.chmod(work, 0o755)  # the workers run as nobody and serve files from here
    try:
        bundle = os.path.join(work, "fix.lpatch")
        code, data, err = livepatch(lp, "build", "--old", old, "--new", new, "--source-diff", fix, "-o", bundle, "--json")
        if code != 0:
            msg = (data or {}).get("error") or err
            if "nothing to patch" in (msg or ""):
                row.update(outcome="nothing-to-patch", detail=msg)
            elif code == 3:
                row.update(outcome="refused", kind=(data or {}).get("refusal_kind"), detail=msg)
            else:
                row.update(outcome="failed", detail=f"build exit {code}: {msg}")
            return row
        row["functions"] = data.get("functions", [])
        port = free_port()
        prefix = os.path.join(work, "prefix")
        os.makedirs(prefix, mode=0o755)
        nginx = daemon["start"](old, prefix, port)
        try:
            pids = [nginx.pid] + children(nginx.pid)
            load = daemon["load"](port)
            load.start()
            # Let the workers be busy when the update lands.
            while load.count() < 200 and time.monotonic() - load.t0 < 10:
                time.sleep(0.01)
            pauses, problems = [], []
            for pid in pids:
                rss_before = rss_kib(pid)
                c, rep, e = livepatch(lp, "apply", "--pid", str(pid), bundle, "--json", "--timeout", "30")
                if c == 0 and rep:
                    pauses.append(rep.get("pause_us", 0))
                    # What a patch costs the target: the region it maps, its resident growth.
                    if rep.get("region") and pid == pids[0]:
                        lo, hi = (int(x, 16) for x in rep["region"].split("-"))
                        row["region_kib"] = (hi - lo) // 1024
                        after = rss_kib(pid)
                        if rss_before is not None and after is not None:
                            row["rss_growth_kib"] = after - rss_before
                    # Switched through the gates (one commit word), or jump by jump and why.
                    if not rep.get("already_applied"):
                        row["gated"] = row.get("gated", True) and bool(rep.get("gated"))
                        if rep.get("ungated"):
                            row["ungated"] = rep["ungated"]
                elif c == 3:
                    row.update(outcome="refused", kind=(rep or {}).get("refusal_kind"), detail=(rep or {}).get("error") or e)
                elif c == 4:
                    row.update(outcome="blocked", detail=(rep or {}).get("error") or e)
                else:
                    problems.append(f"apply to {pid}: exit {c}: {(rep or {}).get('error') or e}")
            served_at_apply = load.count()
            t_end = time.monotonic() + 1.0
            while time.monotonic() < t_end and load.count() < served_at_apply + 500:
                time.sleep(0.01)
            load.finish()
            for pid in pids:
                if not os.path.exists(f"/proc/{pid}"):
                    problems.append(f"process {pid} is gone")
                    continue
                if row.get("outcome") in ("refused", "blocked"):
                    continue
                c, st, e = livepatch(lp, "status", "--pid", str(pid), "--json")
                if c != 0 or not st or not st.get("patches"):
                    problems.append(f"status of {pid}: exit {c}, {st or e}")
            trigger = daemon["triggers"].get(row["patch"])
            if trigger and row.get("outcome") is None and not problems:
                for _ in range(6):
                    why = trigger(port)
                    if why:
                        problems.append(f"fixed behaviour: {why}")
                        break
                else:
                    row["behaviour_checked"] = True
                if sorted([nginx.pid] + children(nginx.pid)) != sorted(pids):
                    problems.append(f"worker processes changed after the trigger: {pids} -> {[nginx.pid] + children(nginx.pid)}")
            if nginx.poll() is not None:
                problems.append(f"{package} {'master' if package == 'nginx' else 'main process'} exited with {nginx.returncode}")
            if load.failed:
                problems.append(f"{len(load.failed)} failed requests, first: {load.failed[0]}")
            if load.count() <= served_at_apply:
                problems.append("no request served after the update")
            row["requests"] = load.count()
            row["processes"] = len(pids)
            if pauses:
                row["pause_us_median"] = int(statistics.median(pauses))
                row["pause_us_max"] = max(pauses)
            if problems:
                row.update(outcome="failed", detail="; ".join(problems))
            elif "outcome" not in row:
                row["outcome"] = "applied"
        finally:
            daemon["stop"](nginx)
    except Exception as e:  # noqa: BLE001 - every pair reports, whatever happened
        row.update(outcome="failed", detail=f"{type(e).__name__}: {e}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return row


def markdown(rows):
    out = ["| package | patch | CVE | build | outcome | functions | pause median / max (us) | requests | fixed behaviour checked |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        outcome = r["outcome"] + (f" ({r['kind']})" if r.get("kind") else "") + (" (no gates)" if r.get("gated") is False else "")
        pause = f"{r['pause_us_median']} / {r['pause_us_max']}" if "pause_us_median" in r else "-"
        out.append(f"| {r.get('package', 'nginx')} | {r['patch']} | {', '.join(r['cve'])} | {r['variant']} | {outcome} | {', '.join(r.get('functions', [])) or '-'} | {pause} | {r.get('requests', '-')} | {'yes' if r.get('behaviour_checked') else '-'} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--livepatch", default=os.path.join(ROOT, "target", "release", "livepatch"))
    ap.add_argument("--only", action="append", default=[])
    ap.add_argument("--variant", action="append", default=[])
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    ap.add_argument("--keep-going", action="store_true")
    a = ap.parse_args()
    if not os.access(a.livepatch, os.X_OK):
        sys.exit(f"corpus: {a.livepatch} missing: cargo build --release -p livepatch-cli")
    # <pkg>-<debver>/<patch>/<variant>/manifest.json of every package run.py knows how to run
    pairs = []
    for m in sorted(glob.glob(os.path.join(CACHE, "corpus", "*-*", "*", "*", "manifest.json"))):
        try:
            package = json.load(open(m)).get("package", "nginx")
        except (OSError, ValueError):
            continue
        if package in DAEMONS and os.path.basename(os.path.dirname(os.path.dirname(os.path.dirname(m)))).startswith(package + "-"):
            pairs.append(os.path.dirname(m))
    if a.only:
        pairs = [p for p in pairs if os.path.basename(os.path.dirname(p)) in a.only]
    if a.variant:
        pairs = [p for p in pairs if os.path.basename(p) in a.variant]
    if not pairs:
        sys.exit(f"corpus: no corpus pairs under {CACHE}/corpus: run tests/corpus/build.sh first")
    rows = []
    for p in pairs:
        t0 = time.monotonic()
        row = run_pair(a.livepatch, p, a.keep_going)
        row["seconds"] = round(time.monotonic() - t0, 1)
        rows.append(row)
        print(f"corpus: {row['package']:<8} {row['patch']:<22} {row['variant']:<9} {row['outcome']:<17} {row.get('kind') or ''} "
              f"{','.join(row.get('functions', []))} {row.get('detail', '')[:300]}", flush=True)
    counts = {}
    for r in rows:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    summary = {"pairs": len(rows), "counts": counts, "rows": rows}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=2)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(markdown(rows) + "\n")
    failed = counts.get("failed", 0)
    print(f"corpus: {len(rows)} pairs: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    print(f"{len(rows) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
