#!/usr/bin/env bash
# A real Kubernetes control plane for the end-to-end tests: etcd + kube-apiserver (the real
# binaries built by scripts/build-apiserver.sh) on free loopback ports, with certificates it
# generates, RBAC on, a service-account issuer, and an admin kubeconfig. No kubelet, no
# controller-manager, no scheduler: the tests play the kubelet.
#
#   harness.sh start DIR              start; writes DIR/admin.kubeconfig and DIR/env
#   harness.sh stop DIR               stop both, delete state (keeps DIR/*.log)
#   harness.sh token DIR NS SA [DUR]  print a ServiceAccount token (TokenRequest API)
#   harness.sh kubeconfig DIR NS SA   write DIR/sa-NS-SA.kubeconfig using such a token,
#                                     print its path (run a component with SA permissions)
#   harness.sh status DIR             exit 0 if the API server answers /readyz
#
# DIR/env (KEY=VALUE lines, sourceable by sh, easy to parse elsewhere):
#   KUBECONFIG APISERVER_URL APISERVER_PORT APISERVER_PID ETCD_URL ETCD_PORT ETCD_PID
#   CA_CERT SERVICE_ACCOUNT_ISSUER K8S_BIN STARTUP_SECONDS
#
# Environment: LIVEPATCH_K8S_BIN  directory with kube-apiserver and etcd
#                                 (default: where scripts/build-apiserver.sh puts them)
#              KUBECTL            kubectl to use (default: ~/.cache/livepatch/bin/kubectl or PATH)
#              HARNESS_READY_TIMEOUT  seconds to wait for /readyz (default 120)
#              HARNESS_NODE_IP    for a real node (tests/node/node.sh): also serve on all
#                                 addresses, advertise this one, admit service accounts
#
# Cluster facts the tests can rely on:
#   - authorization RBAC only (no Node authorizer); admin = CN livepatch-admin, O system:masters
#   - admission: the defaults minus ServiceAccount (there is no controller-manager to create
#     the "default" ServiceAccount of each namespace, so pods need none); PodSecurity is on
#   - namespaces default, kube-system, kube-public, kube-node-lease exist (the API server
#     creates them itself)
#   - tokens: TokenRequest API (`kubectl create token`), issuer $SERVICE_ACCOUNT_ISSUER
#   - service CIDR 10.96.0.0/16; etcd is plain HTTP on loopback
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
CACHE="${LIVEPATCH_CACHE:-$HOME/.cache/livepatch}"
ISSUER="https://kubernetes.default.svc.cluster.local"

say() { echo "harness: $*" >&2; }
die() { say "error: $*"; exit 1; }

kubectl_bin() {
    if [ -n "${KUBECTL:-}" ]; then echo "$KUBECTL"
    elif [ -x "$CACHE/bin/kubectl" ]; then echo "$CACHE/bin/kubectl"
    elif command -v kubectl >/dev/null; then command -v kubectl
    else die "no kubectl (run scripts/setup.sh)"; fi
}

# alive PID: running and not a zombie (pid 1 here may not reap orphans).
alive() {
    local st
    [ -n "${1:-}" ] && [ -r "/proc/$1/stat" ] || return 1
    st="$(sed 's/^.*) \(.\).*$/\1/' "/proc/$1/stat" 2>/dev/null)" || return 1
    [ "$st" != Z ] && [ "$st" != X ]
}

# stop_pid PID NAME: SIGTERM, wait up to 15 s, then SIGKILL.
stop_pid() {
    local pid="$1" name="$2"
    alive "$pid" || return 0
    say "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 150); do
        alive "$pid" || return 0
        sleep 0.1
    done
    say "$name did not exit after SIGTERM; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do alive "$pid" || return 0; sleep 0.1; done
}

free_ports() {  # free_ports N: N distinct free TCP ports on 127.0.0.1
    python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

gen_certs() {  # gen_certs DIR
    local d="$1/pki"
    mkdir -p "$d"
    (
        cd "$d"
        umask 077
        openssl ecparam -name prime256v1 -genkey -noout -out ca.key 2>/dev/null
        openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/CN=livepatch-test-ca" \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" -out ca.crt 2>/dev/null

        # API server serving certificate.
        openssl ecparam -name prime256v1 -genkey -noout -out apiserver.key 2>/dev/null
        openssl req -new -key apiserver.key -subj "/CN=kube-apiserver" -out apiserver.csr 2>/dev/null
        cat > apiserver.ext <<EOF
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:10.96.0.1${HARNESS_NODE_IP:+,IP:$HARNESS_NODE_IP},DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
EOF
        openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
            -sha256 -extfile apiserver.ext -out apiserver.crt 2>/dev/null

        # Admin client certificate (system:masters).
        openssl ecparam -name prime256v1 -genkey -noout -out admin.key 2>/dev/null
        openssl req -new -key admin.key -subj "/O=system:masters/CN=livepatch-admin" -out admin.csr 2>/dev/null
        printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' > client.ext
        openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
            -sha256 -extfile client.ext -out admin.crt 2>/dev/null

        # Service-account token signing key.
        openssl genrsa -out sa.key 2048 2>/dev/null
        openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
        rm -f ./*.csr
        chmod 0644 ca.crt apiserver.crt admin.crt sa.pub
    )
}

write_kubeconfig() {  # write_kubeconfig FILE SERVER USER-YAML-LINES...
    local file="$1" server="$2"; shift 2
    local ca
    ca="$(base64 -w0 < "$DIR/pki/ca.crt")"
    {
        cat <<EOF
apiVersion: v1
kind: Config
clusters:
- name: livepatch-test
  cluster:
    server: $server
    certificate-authority-data: $ca
users:
- name: user
  user:
EOF
        for l in "$@"; do echo "    $l"; done
        cat <<EOF
contexts:
- name: livepatch-test
  context:
    cluster: livepatch-test
    user: user
    namespace: default
current-context: livepatch-test
EOF
    } > "$file.tmp"
    chmod 0600 "$file.tmp"
    mv "$file.tmp" "$file"
}

load_env() {
    [ -f "$DIR/env" ] || die "$DIR/env not found: harness not started in $DIR"
    # shellcheck disable=SC1091
    . "$DIR/env"
}

readyz() {  # readyz URL: /readyz answers ok, with the admin client certificate
    curl -fsS --max-time 2 --cacert "$DIR/pki/ca.crt" --cert "$DIR/pki/admin.crt" \
        --key "$DIR/pki/admin.key" "$1/readyz" >/dev/null 2>&1
}

cmd_start() {
    local t0 bin etcd_port peer_port api_port etcd_pid api_pid url timeout
    t0=$(date +%s.%N)
    bin="${LIVEPATCH_K8S_BIN:-$("$ROOT/scripts/build-apiserver.sh" --print)}"
    [ -x "$bin/kube-apiserver" ] && [ -x "$bin/etcd" ] \
        || die "kube-apiserver/etcd not found in $bin (run scripts/build-apiserver.sh or scripts/setup.sh)"
    if [ -f "$DIR/env" ]; then
        # shellcheck disable=SC1091
        ( . "$DIR/env"; alive "${APISERVER_PID:-}" || alive "${ETCD_PID:-}" ) \
            && die "a harness is already running in $DIR (harness.sh stop $DIR first)"
    fi
    mkdir -p "$DIR"
    DIR="$(cd "$DIR" && pwd)"
    rm -rf "$DIR/etcd-data" "$DIR/pki" "$DIR/env"
    gen_certs "$DIR"

    read -r etcd_port peer_port api_port <<<"$(free_ports 3)"
    url="https://127.0.0.1:$api_port"

    say "starting etcd $("$bin/etcd" --version | awk '/etcd Version/ {print $3}') on 127.0.0.1:$etcd_port"
    setsid "$bin/etcd" --name livepatch-test --data-dir "$DIR/etcd-data" \
        --listen-client-urls "http://127.0.0.1:$etcd_port" \
        --advertise-client-urls "http://127.0.0.1:$etcd_port" \
        --listen-peer-urls "http://127.0.0.1:$peer_port" \
        --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
        --initial-cluster "livepatch-test=http://127.0.0.1:$peer_port" \
        --listen-metrics-urls "" \
        --unsafe-no-fsync --log-level warn \
        >"$DIR/etcd.log" 2>&1 </dev/null &
    etcd_pid=$!

    write_env() {
        cat > "$DIR/env" <<EOF
KUBECONFIG=$DIR/admin.kubeconfig
APISERVER_URL=$url
APISERVER_PORT=$api_port
APISERVER_PID=${api_pid:-}
ETCD_URL=http://127.0.0.1:$etcd_port
ETCD_PORT=$etcd_port
ETCD_PID=$etcd_pid
CA_CERT=$DIR/pki/ca.crt
SERVICE_ACCOUNT_ISSUER=$ISSUER
K8S_BIN=$bin
STARTUP_SECONDS=${startup:-}
EOF
    }
    write_env  # so that `stop` finds etcd if anything below fails

    fail() {
        say "error: $*"
        for f in etcd apiserver; do
            [ -s "$DIR/$f.log" ] && { say "--- last lines of $DIR/$f.log"; tail -15 "$DIR/$f.log" >&2; }
        done
        cmd_stop
        exit 1
    }

    for _ in $(seq 1 100); do
        curl -fsS --max-time 1 "http://127.0.0.1:$etcd_port/health" 2>/dev/null | grep -q '"health":"true"' && break
        alive "$etcd_pid" || fail "etcd exited"
        sleep 0.1
    done

    # With a real node (tests/node/node.sh: HARNESS_NODE_IP), pods reach the API server at the
    # node's address and the controller-manager creates service accounts, so the ServiceAccount
    # admission plugin can mount their tokens. Without one, loopback only and no such plugin.
    local bind=127.0.0.1 advertise=127.0.0.1 admission=(--disable-admission-plugins ServiceAccount)
    if [ -n "${HARNESS_NODE_IP:-}" ]; then
        # No kube-proxy: the API server reaches webhooks at their endpoints, not the Service IP.
        bind=0.0.0.0 advertise="$HARNESS_NODE_IP" admission=(--enable-aggregator-routing=true)
    fi
    say "starting kube-apiserver $("$bin/kube-apiserver" --version | awk '{print $2}') on $url"
    setsid "$bin/kube-apiserver" \
        --etcd-servers "http://127.0.0.1:$etcd_port" \
        --bind-address "$bind" --advertise-address "$advertise" --secure-port "$api_port" \
        --tls-cert-file "$DIR/pki/apiserver.crt" --tls-private-key-file "$DIR/pki/apiserver.key" \
        --client-ca-file "$DIR/pki/ca.crt" \
        --authorization-mode RBAC \
        --anonymous-auth=false \
        --service-account-issuer "$ISSUER" \
        --service-account-key-file "$DIR/pki/sa.pub" \
        --service-account-signing-key-file "$DIR/pki/sa.key" \
        --service-cluster-ip-range 10.96.0.0/16 \
        "${admission[@]}" \
        --allow-privileged=true \
        --enable-priority-and-fairness=false \
        --profiling=false \
        --endpoint-reconciler-type none \
        --v 1 \
        >"$DIR/apiserver.log" 2>&1 </dev/null &
    api_pid=$!
    write_env

    timeout="${HARNESS_READY_TIMEOUT:-120}"
    local deadline=$(( $(date +%s) + timeout ))
    until readyz "$url"; do
        alive "$api_pid" || fail "kube-apiserver exited"
        alive "$etcd_pid" || fail "etcd exited"
        [ "$(date +%s)" -lt "$deadline" ] || fail "kube-apiserver not ready within ${timeout}s"
        sleep 0.2
    done

    write_kubeconfig "$DIR/admin.kubeconfig" "$url" \
        "client-certificate-data: $(base64 -w0 < "$DIR/pki/admin.crt")" \
        "client-key-data: $(base64 -w0 < "$DIR/pki/admin.key")"

    # The API server creates the system namespaces itself; wait until they are there.
    local k
    k="$(kubectl_bin)"
    for _ in $(seq 1 100); do
        "$k" --kubeconfig "$DIR/admin.kubeconfig" get namespace default kube-system >/dev/null 2>&1 && break
        sleep 0.1
    done
    "$k" --kubeconfig "$DIR/admin.kubeconfig" get namespace default kube-system >/dev/null \
        || fail "namespaces default/kube-system missing"

    startup="$(python3 -c "import time; print(f'{time.time() - $t0:.1f}')")"
    write_env
    say "ready in ${startup}s: KUBECONFIG=$DIR/admin.kubeconfig ($url; pids etcd $etcd_pid, apiserver $api_pid)"
}

cmd_stop() {
    [ -f "$DIR/env" ] || { say "nothing to stop in $DIR"; return 0; }
    load_env
    stop_pid "${APISERVER_PID:-}" kube-apiserver
    stop_pid "${ETCD_PID:-}" etcd
    rm -rf "$DIR/etcd-data" "$DIR/pki" "$DIR/env" "$DIR"/*.kubeconfig
    say "stopped; logs kept in $DIR"
}

cmd_token() {  # NS SA [DURATION]
    load_env
    "$(kubectl_bin)" --kubeconfig "$KUBECONFIG" -n "$1" create token "$2" --duration "${3:-1h}"
}

cmd_kubeconfig() {  # NS SA
    local tok file
    load_env
    tok="$(cmd_token "$1" "$2" 24h)"
    file="$DIR/sa-$1-$2.kubeconfig"
    write_kubeconfig "$file" "$APISERVER_URL" "token: $tok"
    echo "$file"
}

cmd="${1:-}"
DIR="${2:-}"
[ -n "$cmd" ] && [ -n "$DIR" ] || { sed -n '2,14p' "$0" >&2; exit 2; }
case "$cmd" in
    start) cmd_start ;;
    stop) DIR="$(cd "$DIR" 2>/dev/null && pwd || echo "$DIR")"; cmd_stop ;;
    token) [ $# -ge 4 ] || die "usage: $0 token DIR NAMESPACE SERVICEACCOUNT [DURATION]"; cmd_token "$3" "$4" "${5:-}" ;;
    kubeconfig) [ $# -eq 4 ] || die "usage: $0 kubeconfig DIR NAMESPACE SERVICEACCOUNT"; cmd_kubeconfig "$3" "$4" ;;
    status) load_env; if readyz "$APISERVER_URL"; then say "ready at $APISERVER_URL"; else say "not ready"; exit 1; fi ;;
    *) sed -n '2,14p' "$0" >&2; exit 2 ;;
esac
