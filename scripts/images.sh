#!/usr/bin/env bash
# Build the project's image and a pause image here, as OCI image tarballs (no base image, no
# registry), and optionally import them into a containerd for its kubelet (namespace k8s.io).
#
#   scripts/images.sh [--import ADDRESS] [OUT_DIR]
#
# OUT_DIR (default target/images) receives:
#   livepatch-<version>.oci.tar  livepatch:<version>: /usr/local/bin/{livepatch-operator,
#                                node-agent,livepatch} + exactly the shared libraries they load,
#                                entrypoint the operator, user 65532 (as the Dockerfile's image)
#   pause.oci.tar                livepatch-pause:1: images/pause.c, static
#
# The binaries are the workspace's release build (cargo build --release --locked, as the
# Dockerfile and the tests); users with a Docker engine build the same image with
# `docker build -t livepatch:<version> .`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
ADDRESS=""
if [ "${1:-}" = "--import" ]; then ADDRESS="$2"; shift 2; fi
OUT="${1:-$ROOT/target/images}"
mkdir -p "$OUT"
say() { echo "images.sh: $*" >&2; }

VERSION="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/livepatch/Chart.yaml)"
[ -n "$VERSION" ] || { say "cannot read appVersion from charts/livepatch/Chart.yaml"; exit 1; }

say "cargo build --release (operator, node agent, CLI)"
cargo build --release --locked -q -p livepatch-operator -p node-agent -p livepatch-cli
python3 scripts/oci-image.py --name "livepatch:$VERSION" --out "$OUT/livepatch-$VERSION.oci.tar" \
    --file target/release/livepatch-operator:/usr/local/bin/livepatch-operator \
    --file target/release/node-agent:/usr/local/bin/node-agent \
    --file target/release/livepatch:/usr/local/bin/livepatch \
    --entrypoint /usr/local/bin/livepatch-operator --user 65532:65532 \
    --label org.opencontainers.image.title=livepatch >&2

cc="${CC:-gcc}"
"$cc" -static -Os -s -o "$OUT/pause" images/pause.c
python3 scripts/oci-image.py --name livepatch-pause:1 --out "$OUT/pause.oci.tar" \
    --file "$OUT/pause:/pause" --entrypoint /pause >&2

if [ -n "$ADDRESS" ]; then
    for t in "$OUT/livepatch-$VERSION.oci.tar" "$OUT/pause.oci.tar"; do
        ctr --address "$ADDRESS" -n k8s.io images import "$t" >&2
    done
    say "imported livepatch:$VERSION and livepatch-pause:1 into $ADDRESS (k8s.io)"
fi
echo "$OUT"
