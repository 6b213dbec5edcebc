#!/usr/bin/env bash
# Smoke test of the real control plane of tests/cluster/harness.sh, runnable by CI:
#   - start etcd + kube-apiserver, admin kubeconfig works, system namespaces exist
#   - a CRD with a CEL rule (x-kubernetes-validations) and a schema: a valid object is
#     accepted, invalid ones are rejected with the rule's message / the schema error
#   - the test plays the kubelet: creates a Node and a Pod bound to it, then writes the pod's
#     status subresource with a containerID
#   - RBAC with a ServiceAccount token from the TokenRequest API: allowed and denied verbs
#   - stop: both processes gone
# Prints "N passed, M failed" last; exits non-zero unless every check passed.
#
# Usage: tests/cluster/smoke.sh [WORKDIR]   (needs scripts/setup.sh or build-apiserver.sh first)
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HARNESS="$HERE/harness.sh"
CACHE="${LIVEPATCH_CACHE:-$HOME/.cache/livepatch}"
export PATH="$CACHE/bin:$PATH"
if [ -n "${1:-}" ]; then WORK="$1"; own_work=0; else WORK="$(mktemp -d /tmp/lp-cluster-smoke.XXXXXX)"; own_work=1; fi
passed=0; failed=0
pass() { echo "PASS $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1"; failed=$((failed + 1)); }
check() { local n="$1"; shift; if "$@"; then pass "$n"; else fail "$n"; fi; }
finish() {
    if [ "$failed" = 0 ] && [ "$passed" -gt 0 ]; then
        [ "$own_work" = 1 ] && [ "$started" = 0 ] && rm -rf "$WORK"
        echo "$passed passed, $failed failed"
        exit 0
    fi
    echo "logs: $WORK/apiserver.log $WORK/etcd.log"
    echo "$passed passed, $failed failed"
    exit 1
}

started=0
cleanup() { [ "$started" = 1 ] && "$HARNESS" stop "$WORK" >/dev/null 2>&1; }
trap cleanup EXIT

t0=$(date +%s.%N)
if "$HARNESS" start "$WORK"; then
    started=1
    pass "harness start (etcd + kube-apiserver ready)"
else
    fail "harness start"
    finish
fi
# shellcheck disable=SC1091
. "$WORK/env"
export KUBECONFIG
K=(kubectl --kubeconfig "$KUBECONFIG")
echo "start-up: ${STARTUP_SECONDS}s (API server $APISERVER_URL, etcd $ETCD_URL)"

server_version() { "${K[@]}" get --raw /version | grep -q "\"gitVersion\": *\"$("$K8S_BIN/kube-apiserver" --version | awk '{print $2}')\""; }
check "admin kubeconfig: server version is the built one" server_version
check "system namespaces exist" "${K[@]}" get namespace default kube-system kube-public -o name
check "RBAC bootstrap roles exist" "${K[@]}" get clusterrole cluster-admin view -o name
check "harness status" "$HARNESS" status "$WORK"

# --- CRD with a CEL rule ------------------------------------------------------------------
cat > "$WORK/crd.yaml" <<'EOF'
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.smoke.livepatch.test
spec:
  group: smoke.livepatch.test
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [minReplicas, maxReplicas]
            x-kubernetes-validations:
            - rule: self.minReplicas <= self.maxReplicas
              message: minReplicas must not exceed maxReplicas
            properties:
              minReplicas: {type: integer, minimum: 0}
              maxReplicas: {type: integer}
EOF
check "apply CRD with x-kubernetes-validations" "${K[@]}" apply -f "$WORK/crd.yaml"
check "CRD established" "${K[@]}" wait --for condition=Established --timeout 30s crd/widgets.smoke.livepatch.test

widget() {  # widget NAME MIN MAX
    printf 'apiVersion: smoke.livepatch.test/v1\nkind: Widget\nmetadata: {name: %s, namespace: default}\nspec: {minReplicas: %s, maxReplicas: %s}\n' "$@"
}
# Discovery of a fresh CRD can lag a moment behind Established.
ok=0
for _ in $(seq 1 50); do
    if widget good 1 3 | "${K[@]}" apply -f - >"$WORK/good.out" 2>&1; then ok=1; break; fi
    sleep 0.2
done
if [ "$ok" = 1 ]; then pass "valid Widget accepted"; else fail "valid Widget accepted"; cat "$WORK/good.out"; fi

if widget bad 5 2 | "${K[@]}" apply -f - >"$WORK/bad.out" 2>&1; then
    fail "CEL rule rejects an invalid Widget (it was accepted)"
else
    cat "$WORK/bad.out"
    check "CEL rule rejects an invalid Widget with its message" grep -q 'minReplicas must not exceed maxReplicas' "$WORK/bad.out"
fi
if widget negative -1 2 | "${K[@]}" apply -f - >"$WORK/neg.out" 2>&1; then
    fail "schema rejects minimum violation (it was accepted)"
else
    check "schema rejects a minimum violation" grep -q 'spec.minReplicas' "$WORK/neg.out"
fi
not_stored() { ! "${K[@]}" get widget bad -n default >/dev/null 2>&1; }
check "the invalid Widget was not stored" not_stored

# --- the test plays the kubelet: Node, Pod, status with a container id ---------------------
NODE="smoke-node"
cat > "$WORK/node.yaml" <<EOF
apiVersion: v1
kind: Node
metadata:
  name: $NODE
  labels: {kubernetes.io/hostname: $NODE, kubernetes.io/os: linux}
EOF
check "create Node" "${K[@]}" apply -f "$WORK/node.yaml"
cat > "$WORK/pod.yaml" <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: target
  namespace: default
  labels: {app: target}
spec:
  nodeName: $NODE
  containers:
  - name: target
    image: local/target:v1
EOF
check "create Pod bound to the Node" "${K[@]}" apply -f "$WORK/pod.yaml"
CID="$(printf '%064x' $$)"
NOW="$(date -u +%FT%TZ)"
status_patch=$(cat <<EOF
{"status":{"phase":"Running","hostIP":"127.0.0.1","podIP":"127.0.0.1","startTime":"$NOW",
 "conditions":[{"type":"Ready","status":"True","lastTransitionTime":"$NOW"}],
 "containerStatuses":[{"name":"target","image":"local/target:v1","imageID":"","ready":true,
   "restartCount":0,"started":true,"containerID":"containerd://$CID",
   "state":{"running":{"startedAt":"$NOW"}}}]}}
EOF
)
check "patch pod status subresource with a containerID" \
    "${K[@]}" patch pod target -n default --subresource status --type merge -p "$status_patch"
got="$("${K[@]}" get pod target -n default -o jsonpath='{.status.containerStatuses[0].containerID} {.status.phase}')"
check "pod status reads back containerd://<id> Running" test "$got" = "containerd://$CID Running"
uid="$("${K[@]}" get pod target -n default -o jsonpath='{.metadata.uid}')"
check "pod has a UID (for the agent's cgroup cross-check)" test -n "$uid"

# --- RBAC with a ServiceAccount token (TokenRequest) ------------------------------------------
"${K[@]}" create serviceaccount smoke-reader -n default >/dev/null 2>&1
"${K[@]}" create role pod-reader -n default --verb get,list,watch --resource pods >/dev/null 2>&1
"${K[@]}" create rolebinding smoke-reader -n default --role pod-reader \
    --serviceaccount default:smoke-reader >/dev/null 2>&1
tok="$("$HARNESS" token "$WORK" default smoke-reader 2>"$WORK/token.err")"
check "TokenRequest token for a ServiceAccount" test -n "$tok"
# An empty kubeconfig, so that nothing of the admin's (client certificate) leaks in.
printf 'apiVersion: v1\nkind: Config\n' > "$WORK/empty.kubeconfig"
SAK=(kubectl --kubeconfig "$WORK/empty.kubeconfig" --server "$APISERVER_URL" --certificate-authority "$CA_CERT" --token "$tok" -n default)
sa_is_user() { "${SAK[@]}" auth whoami -o jsonpath='{.status.userInfo.username}' | grep -qx 'system:serviceaccount:default:smoke-reader'; }
sa_no_secrets() { ! "${SAK[@]}" get secrets >/dev/null 2>&1; }
check "token authenticates as system:serviceaccount:default:smoke-reader" sa_is_user
check "SA may list pods" "${SAK[@]}" get pods -o name
check "SA may not list secrets (RBAC denies)" sa_no_secrets
sakc="$("$HARNESS" kubeconfig "$WORK" default smoke-reader 2>/dev/null)"
check "SA kubeconfig works" kubectl --kubeconfig "$sakc" get pod target -o name
sa_kc_no_secrets() { ! KUBECONFIG= kubectl --kubeconfig "$sakc" get secrets >/dev/null 2>&1; }
check "SA kubeconfig has only the SA's permissions" sa_kc_no_secrets

# --- stop -------------------------------------------------------------------------------------
apid="$APISERVER_PID"; epid="$ETCD_PID"
"$HARNESS" stop "$WORK"
started=0
gone() { [ ! -r "/proc/$1/stat" ] || grep -q ') [ZX] ' "/proc/$1/stat"; }
both_gone() { gone "$apid" && gone "$epid"; }
check "stop: kube-apiserver and etcd exited" both_gone
check "stop: state removed" test ! -e "$WORK/env" -a ! -e "$WORK/etcd-data"
echo "total smoke time: $(python3 -c "import time; print(f'{time.time() - $t0:.1f}')")s"
finish
