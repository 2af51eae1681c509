#!/usr/bin/env bash
# soak.sh - the heavy, #[ignore]d runs kept out of scripts/test.sh: 200 kill -9 cycles under
# 16 concurrent writers, each checking that every acknowledged write survived with its revision.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --release -p keel-node --test it -- --ignored --test-threads 1 --nocapture 2>&1 \
  | grep -E "kill -9 cycles|crash test seed|test result|panicked|FAILED"
