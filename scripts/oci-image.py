#!/usr/bin/env python3
"""Build an OCI image layout tarball from files of this machine, with no base image and no
registry: one gzip layer holding the given files plus exactly the shared libraries their ELF
binaries need (as `ldd` resolves them here), a config, a manifest and an `index.json` naming the
image, ready for `ctr -n k8s.io images import`. Reproducible: sorted entries, zero times and
owners, so the same inputs give the same digests.

    oci-image.py --name livepatch:0.1.0 --out livepatch.oci.tar \
        --file target/release/node-agent:/usr/local/bin/node-agent \
        --entrypoint /usr/local/bin/livepatch-operator --user 65532:65532

--file SRC:DST may repeat; ELF files among them bring their libraries (and the dynamic loader).
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile


def elf(path):
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def libraries(path):
    """Absolute paths of the shared objects `path` loads, the loader included."""
    p = subprocess.run(["ldd", path], capture_output=True, text=True)
    if p.returncode != 0 or "not a dynamic executable" in p.stdout + p.stderr:
        return []  # static
    libs = []
    for line in p.stdout.splitlines():
        if "not found" in line:
            sys.exit(f"oci-image: {path} needs a library this machine does not have: {line.strip()}")
        m = re.search(r"(/\S+)\s+\(0x", line)
        if m:
            libs.append(m.group(1))
    return libs


def normalize(name):
    """`livepatch:0.1.0` -> `docker.io/library/livepatch:0.1.0`, as the kubelet resolves it."""
    repo, _, tag = name.rpartition(":") if ":" in name.split("/")[-1] else (name, "", "latest")
    first = repo.split("/")[0]
    if "." not in first and ":" not in first and first != "localhost":
        repo = ("docker.io/library/" if "/" not in repo else "docker.io/") + repo
    return f"{repo}:{tag}", tag


def layer(files, dirs):
    """The uncompressed tar of the layer: directories, then files, sorted, owned by root."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        all_dirs = set(dirs)
        for dst in files:
            d = os.path.dirname(dst)
            while d not in ("", "/"):
                all_dirs.add(d)
                d = os.path.dirname(d)
        for d in sorted(all_dirs):
            ti = tarfile.TarInfo(d.lstrip("/"))
            ti.type = tarfile.DIRTYPE
            ti.mode = 0o1777 if d == "/tmp" else 0o755
            tar.addfile(ti)
        for dst in sorted(files):
            src, mode = files[dst]
            with open(src, "rb") as f:
                data = f.read()
            ti = tarfile.TarInfo(dst.lstrip("/"))
            ti.size = len(data)
            ti.mode = mode
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="image name, e.g. livepatch:0.1.0")
    ap.add_argument("--out", required=True, help="the tarball to write")
    ap.add_argument("--file", action="append", default=[], metavar="SRC:DST")
    ap.add_argument("--dir", action="append", default=["/tmp"], metavar="DST", help="an empty directory")
    ap.add_argument("--entrypoint", action="append", default=[])
    ap.add_argument("--cmd", action="append", default=[])
    ap.add_argument("--user", default="")
    ap.add_argument("--env", action="append", default=["PATH=/usr/local/bin:/usr/bin:/bin"])
    ap.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    a = ap.parse_args()

    files = {}
    for spec in a.file:
        src, sep, dst = spec.partition(":")
        if not sep or not dst.startswith("/"):
            sys.exit(f"oci-image: --file {spec!r}: want SRC:/ABSOLUTE/DST")
        if not os.path.isfile(src):
            sys.exit(f"oci-image: --file {spec!r}: {src} is not a file")
        files[dst] = (src, os.stat(src).st_mode & 0o777)
        if elf(src):
            for lib in libraries(src):
                files.setdefault(lib, (os.path.realpath(lib), 0o755))
    if not files:
        sys.exit("oci-image: no --file given")

    tar = layer(files, a.dir)
    diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
    gz = gzip.compress(tar, compresslevel=6, mtime=0)
    blobs = {}

    def blob(data):
        d = hashlib.sha256(data).hexdigest()
        blobs[d] = data
        return {"digest": f"sha256:{d}", "size": len(data)}

    full, tag = normalize(a.name)
    labels = dict(kv.split("=", 1) for kv in a.label)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {k: v for k, v in {
            "Entrypoint": a.entrypoint or None, "Cmd": a.cmd or None, "User": a.user or None,
            "Env": a.env, "WorkingDir": "/", "Labels": labels or None,
        }.items() if v is not None},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "scripts/oci-image.py " + " ".join(sorted(files))}],
    }
    cfg = blob(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())
    lay = blob(gz)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **cfg},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **lay}],
    }
    man = blob(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode())
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", **man,
            "annotations": {"io.containerd.image.name": full, "org.opencontainers.image.ref.name": tag},
        }],
    }
    tmp = a.out + ".tmp"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as out:
        def add(name, data):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mode = 0o644
            out.addfile(ti, io.BytesIO(data))
        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add("index.json", json.dumps(index, sort_keys=True).encode())
        for d in sorted(blobs):
            add(f"blobs/sha256/{d}", blobs[d])
    os.replace(tmp, a.out)
    print(json.dumps({"image": full, "manifest": man["digest"], "layer_bytes": len(gz),
                      "files": len(files), "out": a.out}))


if __name__ == "__main__":
    main()
