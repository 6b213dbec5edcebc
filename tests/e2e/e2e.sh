#!/usr/bin/env bash
# The end-to-end suite as scripts/test.sh runs it: build (or reuse) the three binaries with the
# Dockerfile's command, then run every scenario of tests/e2e/run.py (root; needs scripts/setup.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
nice -n 10 cargo build --release --locked -p livepatch-operator -p node-agent -p livepatch-cli
exec timeout --kill-after=30 1800 python3 tests/e2e/run.py "$@"
