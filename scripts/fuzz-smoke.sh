#!/usr/bin/env bash
# fuzz-smoke.sh - a bounded fuzz run of the decoders that read untrusted bytes: backend pages
# (random bodies with valid checksums), WAL payloads (batch, member meta, MVCC record) and the
# HTTP/2 :authority layer (random HPACK blocks and frame streams). Each is a seeded random-input
# test that must never panic; this runs them with many more cases than CI does.
#
# cargo-fuzz needs a nightly toolchain, which this workplace cannot download; these stable
# tests stand in for it.
#
# It also runs the backend's crash-image property test (random commits, a crash at every
# write or sync, torn and lost unsynced writes) with many more seeds per crash point.
#
# Usage: scripts/fuzz-smoke.sh [ITERS]   (default 200000 cases per target; 200 crash seeds)
set -euo pipefail
cd "$(dirname "$0")/.."
export KEEL_FUZZ_ITERS="${1:-200000}"
export KEEL_CRASH_SEEDS="${KEEL_CRASH_SEEDS:-200}"
cargo test --release -p keel-storage --lib -- random_sealed_pages_never_panic decoders_take_random_bytes \
  a_crash_at_any_write_or_sync_keeps_the_last_acknowledged_commit
cargo test --release -p keel-net --lib -- random_blocks_and_streams_never_panic
