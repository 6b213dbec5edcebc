#!/usr/bin/env bash
# Proves the container set-up the agent tests rely on, with the private containerd of
# scripts/containerd.sh:
#   - `ctr run --rm --rootfs DIR ID cmd` runs a container from a plain rootfs directory
#     (a static C program, no image, no registry);
#   - the container's host PID is found by scanning /proc/*/cgroup for the container id,
#     and matches the PID containerd reports for the task;
#   - the process runs in its own PID and mount namespaces, and its executable is
#     readable from the host through /proc/PID/exe and /proc/PID/root.
# Prints the cgroup lines seen, and a final "N passed, M failed" line; exits non-zero on failure.
#
# Usage: tests/cluster/containerd-smoke.sh   (root; starts containerd if needed and stops
#        it again if it started it)
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
eval "$("$ROOT/scripts/containerd.sh" env)"
SOCK="$CONTAINERD_ADDRESS"
NS="livepatch-smoke"
CTR=(ctr --address "$SOCK" -n "$NS")
ID="lp-smoke-$$-$(date +%s)"
WORK="$(mktemp -d /tmp/lp-containerd-smoke.XXXXXX)"
passed=0; failed=0
check() {  # check NAME CMD...
    local name="$1"; shift
    if "$@"; then echo "PASS $name"; passed=$((passed + 1)); else echo "FAIL $name"; failed=$((failed + 1)); fi
}

started_here=0
if ! "$ROOT/scripts/containerd.sh" status >/dev/null 2>&1; then
    "$ROOT/scripts/containerd.sh" start || exit 1
    started_here=1
fi
cleanup() {
    "${CTR[@]}" tasks kill -s SIGKILL "$ID" >/dev/null 2>&1 || true
    sleep 0.3
    "${CTR[@]}" tasks delete "$ID" >/dev/null 2>&1 || true
    "${CTR[@]}" containers delete "$ID" >/dev/null 2>&1 || true
    "${CTR[@]}" tasks kill -s SIGKILL "$ID-kubelet" >/dev/null 2>&1 || true
    sleep 0.3
    "${CTR[@]}" tasks delete "$ID-kubelet" >/dev/null 2>&1 || true
    "${CTR[@]}" containers delete "$ID-kubelet" >/dev/null 2>&1 || true
    [ -n "${CTR_PID:-}" ] && wait "$CTR_PID" 2>/dev/null
    rm -rf "$WORK"
    # runc removes the container's own cgroup but leaves the empty parents it created.
    # rmdir only removes empty directories, so a concurrent user of these paths is safe.
    for c in /sys/fs/cgroup/*/ /sys/fs/cgroup/unified/; do
        for d in "kubepods/besteffort/pod${POD_UID:-none}" kubepods/besteffort kubepods "$NS"; do
            [ -d "$c$d" ] && rmdir "$c$d" 2>/dev/null
        done
    done
    "${CTR[@]}" namespaces rm "$NS" >/dev/null 2>&1 || true
    [ "$started_here" = 1 ] && "$ROOT/scripts/containerd.sh" stop
}
trap cleanup EXIT

# A tiny rootfs: one static C program that prints a line every 100 ms until killed.
mkdir -p "$WORK/rootfs/bin"
cat > "$WORK/ticker.c" <<'EOF'
#include <stdio.h>
#include <unistd.h>
int main(void) {
    for (unsigned long n = 0;; n++) {
        printf("tick %lu pid-in-container %d\n", n, (int)getpid());
        fflush(stdout);
        usleep(100000);
    }
}
EOF
gcc -static -O2 -o "$WORK/rootfs/bin/ticker" "$WORK/ticker.c" || { echo "FAIL gcc -static"; echo "0 passed, 1 failed"; exit 1; }

# (--rootfs is a flag: the directory takes the place of the image argument)
"${CTR[@]}" run --rm --rootfs "$WORK/rootfs" "$ID" /bin/ticker > "$WORK/out" 2>&1 &
CTR_PID=$!

task_pid=""
for _ in $(seq 1 100); do
    task_pid="$("${CTR[@]}" tasks ls 2>/dev/null | awk -v id="$ID" '$1 == id && $3 == "RUNNING" {print $2}')"
    [ -n "$task_pid" ] && grep -q tick "$WORK/out" && break
    sleep 0.1
done
check "container runs from a plain rootfs (ctr run --rootfs)" grep -q '^tick' "$WORK/out"
check "containerd reports the task's host pid" test -n "$task_pid"

# What the agent does: scan /proc/*/cgroup for the container id.
found=()
for f in /proc/[0-9]*/cgroup; do
    if grep -q -- "$ID" "$f" 2>/dev/null; then
        p="${f#/proc/}"; found+=("${p%/cgroup}")
    fi
done
echo "host pids whose cgroup names $ID: ${found[*]:-none}"
check "the /proc/*/cgroup scan finds exactly the task pid" test -n "$task_pid" -a "${found[*]:-}" = "$task_pid"
if [ -n "$task_pid" ]; then
    echo "--- /proc/$task_pid/cgroup"
    cat "/proc/$task_pid/cgroup"
    echo "---"
    check "every cgroup line of the task names the container id" \
        bash -c "! grep -v -- '$ID' /proc/$task_pid/cgroup | grep -q ."
    check "own pid namespace (pid 1 inside)" grep -q 'pid-in-container 1$' "$WORK/out"
    check "own pid namespace (host view)" test "$(readlink /proc/$task_pid/ns/pid)" != "$(readlink /proc/self/ns/pid)"
    check "own mount namespace" test "$(readlink /proc/$task_pid/ns/mnt)" != "$(readlink /proc/self/ns/mnt)"
    check "/proc/PID/exe is the container's program" cmp -s "/proc/$task_pid/exe" "$WORK/rootfs/bin/ticker"
    check "/proc/PID/root shows the rootfs" test -x "/proc/$task_pid/root/bin/ticker"
    check "process is still ticking" bash -c "a=\$(wc -l < '$WORK/out'); sleep 0.5; b=\$(wc -l < '$WORK/out'); [ \$b -gt \$a ]"
fi

"${CTR[@]}" tasks kill -s SIGKILL "$ID" >/dev/null 2>&1
wait "$CTR_PID" 2>/dev/null
CTR_PID=""
for _ in $(seq 1 50); do
    "${CTR[@]}" containers ls -q 2>/dev/null | grep -qx -- "$ID" || break
    sleep 0.1
done
check "--rm removed the container after the kill" bash -c "! ${CTR[*]} containers ls -q | grep -qx -- '$ID'"

# The kubelet's cgroupfs layout, as the end-to-end tests reproduce it for the agent's pod UID
# cross-check: ctr --cgroup /kubepods/besteffort/pod<UID>/<container id>.
POD_UID="$(cat /proc/sys/kernel/random/uuid)"
ID2="${ID}-kubelet"
CG="/kubepods/besteffort/pod$POD_UID/$ID2"
"${CTR[@]}" run --rm --rootfs --cgroup "$CG" "$WORK/rootfs" "$ID2" /bin/ticker > "$WORK/out2" 2>&1 &
CTR_PID2=$!
pid2=""
for _ in $(seq 1 100); do
    pid2="$("${CTR[@]}" tasks ls 2>/dev/null | awk -v id="$ID2" '$1 == id && $3 == "RUNNING" {print $2}')"
    [ -n "$pid2" ] && break
    sleep 0.1
done
if [ -n "$pid2" ]; then
    echo "--- /proc/$pid2/cgroup (--cgroup $CG)"
    cat "/proc/$pid2/cgroup"
    echo "---"
fi
check "kubelet-style cgroup path (--cgroup) names pod UID and container id" \
    bash -c "[ -n '$pid2' ] && grep -q -- ':$CG\$' /proc/$pid2/cgroup"
"${CTR[@]}" tasks kill -s SIGKILL "$ID2" >/dev/null 2>&1
wait "$CTR_PID2" 2>/dev/null

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
