#!/usr/bin/env bash
# test.sh - what CI runs: installs the test dependencies, checks formatting and lints, and runs
# every test (unit, WAL recovery, end-to-end against the real keel binary with etcdctl 3.4,
# the etcd-client crate, a live etcd 3.4 for the error table and the harness, and the kill -9
# crash cycles). Ends with one summary line: "tests: N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all --check
# The fail-stop tests need the node's test-only fail points.
features=(--features keel-node/failpoints)
cargo clippy --workspace --all-targets "${features[@]}" -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --all-targets "${features[@]}" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
passed=$(awk '/^test result:/ {p += $4} END {print p + 0}' "$log")
failed=$(awk '/^test result:/ {f += $6} END {print f + 0}' "$log")
ignored=$(awk '/^test result:/ {i += $8} END {print i + 0}' "$log")
echo "tests: $passed passed, $failed failed, $ignored skipped"
exit "$status"
