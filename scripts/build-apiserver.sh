#!/usr/bin/env bash
# Build the real Kubernetes binaries the tests run, from the Go module in
# tests/cluster/apiserver-build, into a cache outside the clone keyed by both versions:
#
#   ${LIVEPATCH_CACHE:-~/.cache/livepatch}/k8s-<k8s version>-etcd-<etcd version>/bin/
#       etcd, kube-apiserver                          (the control plane: tests/cluster, tests/e2e)
#       kubelet, kube-controller-manager, kube-scheduler   (the real node: tests/node)
#
# Exits at once when every binary is already there; builds only the missing ones. Safe to run concurrently (flock) and
# after an interrupted build (binaries are built in a temporary directory and moved in last).
#
#   scripts/build-apiserver.sh            build (or reuse) and print the bin directory
#   scripts/build-apiserver.sh --print    print the bin directory only (no build)
#   scripts/build-apiserver.sh --regen K8S_VERSION ETCD_VERSION
#                                         rewrite go.mod/go.sum for other versions, e.g.
#                                         --regen v1.34.4 v3.6.4 (then build and commit them)
#
# Heavy: about half an hour of CPU on 2 cores the first time. Runs with nice -n 15 and
# GOMAXPROCS=2 unless GOMAXPROCS is already set.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MOD="$ROOT/tests/cluster/apiserver-build"
CACHE="${LIVEPATCH_CACHE:-$HOME/.cache/livepatch}"

log() { echo "build-apiserver: $*" >&2; }
# The Kubernetes commands built, all from the same module version.
K8S_TOOLS="kube-apiserver kubelet kube-controller-manager kube-scheduler"

regen() {
    local k8s="$1" etcd="$2" upstream minor
    [[ "$k8s" =~ ^v1\.([0-9]+)\.([0-9]+)$ ]] || { log "bad Kubernetes version '$k8s' (want v1.N.M)"; exit 2; }
    minor="v0.${BASH_REMATCH[1]}.${BASH_REMATCH[2]}"
    [[ "$etcd" =~ ^v3\.[0-9]+\.[0-9]+$ ]] || { log "bad etcd version '$etcd' (want v3.N.M)"; exit 2; }
    # The upstream go.mod lists every staging module in its replace block.
    upstream="$(cd "$MOD" && go mod download -json "k8s.io/kubernetes@$k8s" | sed -n 's/^\s*"GoMod": "\(.*\)",\?$/\1/p')"
    [ -f "$upstream" ] || { log "could not fetch go.mod of k8s.io/kubernetes@$k8s"; exit 1; }
    {
        sed -n '1,/^module /p' "$MOD/go.mod"
        echo
        echo "go $(sed -n 's/^go //p' "$upstream")"
        echo
        for t in $K8S_TOOLS; do echo "tool k8s.io/kubernetes/cmd/$t"; done
        echo
        echo "require ("
        echo "	go.etcd.io/etcd/server/v3 $etcd"
        echo "	k8s.io/kubernetes $k8s"
        echo ")"
        echo
        echo "replace ("
        sed -n '/^replace (/,/^)/p' "$upstream" | awk -v v="$minor" '$3 ~ /^\.\/staging\// {printf "\t%s => %s %s\n", $1, $1, v}'
        echo ")"
    } > "$MOD/go.mod.new"
    mv "$MOD/go.mod.new" "$MOD/go.mod"
    rm -f "$MOD/go.sum"
    (cd "$MOD" && GOFLAGS=-mod=mod go mod tidy)
    log "go.mod regenerated for kubernetes $k8s (staging modules at $minor), etcd $etcd"
}

if [ "${1:-}" = "--regen" ]; then
    [ $# -eq 3 ] || { log "usage: $0 --regen K8S_VERSION ETCD_VERSION"; exit 2; }
    regen "$2" "$3"
    exit 0
fi

# Versions come from go.mod, so the cache key always follows what is committed.
modver() { awk -v m="$1" '$1 == "require" {$1 = ""; $0 = $0} $1 == m && $2 ~ /^v/ {print $2; exit}' "$MOD/go.mod"; }
K8S_VERSION="$(modver k8s.io/kubernetes)"
ETCD_VERSION="$(modver go.etcd.io/etcd/server/v3)"
[ -n "$K8S_VERSION" ] && [ -n "$ETCD_VERSION" ] || { log "cannot read versions from $MOD/go.mod"; exit 1; }
DIR="$CACHE/k8s-$K8S_VERSION-etcd-$ETCD_VERSION"
BIN="$DIR/bin"

have() {
    local t
    for t in etcd $K8S_TOOLS; do [ -x "$BIN/$t" ] || return 1; done
}

if [ "${1:-}" = "--print" ]; then
    echo "$BIN"
    exit 0
fi
if have; then
    log "cached: $BIN (kubernetes $K8S_VERSION, etcd $ETCD_VERSION)"
    echo "$BIN"
    exit 0
fi

command -v go >/dev/null || { log "go is not installed (Go >= 1.24 needed)"; exit 1; }
mkdir -p "$DIR"
exec 9>"$DIR/.lock"
if ! flock -n 9; then
    log "another build holds $DIR/.lock; waiting for it"
    flock 9
fi
if have; then
    log "built meanwhile by another process: $BIN"
    echo "$BIN"
    exit 0
fi

TMP="$(mktemp -d "$DIR/.build.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

export CGO_ENABLED=0
export GOMAXPROCS="${GOMAXPROCS:-2}"
# -buildvcs=false: the binaries must not depend on the state of the clone (reproducible).
export GOFLAGS="${GOFLAGS:-} -mod=readonly -buildvcs=false"
NICE=(nice -n 15)

minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
VER="k8s.io/component-base/version"
CVER="k8s.io/client-go/pkg/version"
k8s_ldflags="-s -w"
for p in "$VER" "$CVER"; do
    k8s_ldflags+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    k8s_ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
done

start=$(date +%s)
cd "$MOD"
log "go $(go env GOVERSION), GOMAXPROCS=$GOMAXPROCS, module cache $(go env GOMODCACHE)"
log "downloading modules"
"${NICE[@]}" go mod download
mkdir -p "$BIN"
if [ ! -x "$BIN/etcd" ]; then
    log "building etcd $ETCD_VERSION"
    "${NICE[@]}" go build -trimpath -ldflags "-s -w" -o "$TMP/etcd" ./cmd/etcd
    "$TMP/etcd" --version >&2
    mv -f "$TMP/etcd" "$BIN/etcd"
fi
for t in $K8S_TOOLS; do
    [ -x "$BIN/$t" ] && continue
    log "building $t $K8S_VERSION (the first one is slow; the others share its packages)"
    "${NICE[@]}" go build -trimpath -ldflags "$k8s_ldflags" -o "$TMP/$t" "k8s.io/kubernetes/cmd/$t"
    "$TMP/$t" --version >&2
    mv -f "$TMP/$t" "$BIN/$t"
done
elapsed=$(( $(date +%s) - start ))
printf 'kubernetes %s\netcd %s\ngo %s\nbuild_seconds %s\nbuilt %s\n' \
    "$K8S_VERSION" "$ETCD_VERSION" "$(go env GOVERSION)" "$elapsed" "$(date -u +%FT%TZ)" > "$DIR/BUILD-INFO"
log "built in ${elapsed}s: $BIN"
echo "$BIN"
