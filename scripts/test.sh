#!/usr/bin/env bash
# test.sh - what CI runs: installs the test dependencies, checks formatting and lints, and runs
# every test (unit, WAL recovery, end-to-end against the real keel binary with etcdctl 3.4,
# the etcd-client crate, a live etcd 3.4 for the error table, and the kill -9 crash cycles).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
