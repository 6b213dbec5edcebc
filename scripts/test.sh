#!/usr/bin/env bash
# The project's test command: installs what the tests need (scripts/setup.sh, idempotent and
# cached under ~/.cache/livepatch), then runs every suite and prints one summary line.
#
#   scripts/test.sh              everything
#   scripts/test.sh --quick      Rust tests only (no containerd, no API server)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1

export PATH="$HOME/.cache/livepatch/bin:$HOME/.cargo/bin:$PATH"
passed=0; failed=0; failures=()
step() {  # step NAME CMD...
    local name="$1"; shift
    echo "=== $name: $*"
    local t0=$SECONDS
    if "$@"; then
        passed=$((passed + 1)); echo "=== $name: ok ($((SECONDS - t0)) s)"
    else
        failed=$((failed + 1)); failures+=("$name"); echo "=== $name: FAILED ($((SECONDS - t0)) s)"
    fi
}

if [ $QUICK = 0 ]; then
    step setup bash scripts/setup.sh
fi
step cargo-test cargo test --workspace --release --no-fail-fast
if [ $QUICK = 0 ]; then
    # Debian's nginx security fixes applied live under load (tests/corpus; built by setup.sh).
    step corpus python3 tests/corpus/run.py --json target/corpus.json --markdown target/corpus.md
    step cluster-smoke bash tests/cluster/smoke.sh
    step containerd-smoke bash tests/cluster/containerd-smoke.sh
    step chart bash tests/e2e/chart.sh
    step e2e bash tests/e2e/e2e.sh
    # A real node: kubelet + containerd CRI run the chart's pods from images built here.
    step node python3 tests/node/run.py
fi

echo
echo "suites: ${passed} passed, ${failed} failed${failures:+ (${failures[*]})}"
[ "$failed" = 0 ]
