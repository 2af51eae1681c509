#!/usr/bin/env bash
# fuzz-smoke.sh - a bounded fuzz run of the decoders that read untrusted bytes: backend pages
# (random bodies with valid checksums), WAL payloads (batch, member meta, MVCC record) and the
# HTTP/2 :authority layer (random HPACK blocks and frame streams). Each is a seeded random-input
# test that must never panic; this runs them with many more cases than CI does.
#
# cargo-fuzz needs a nightly toolchain, which this workplace cannot download; these stable
# tests stand in for it.
#
# Usage: scripts/fuzz-smoke.sh [ITERS]   (default 200000 cases per target)
set -euo pipefail
cd "$(dirname "$0")/.."
export KEEL_FUZZ_ITERS="${1:-200000}"
cargo test --release -p keel-storage --lib -- random_sealed_pages_never_panic decoders_take_random_bytes
cargo test --release -p keel-net --lib -- random_blocks_and_streams_never_panic
