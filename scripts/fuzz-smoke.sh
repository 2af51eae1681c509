#!/usr/bin/env bash
# fuzz-smoke.sh - a bounded fuzz run of the decoders that read untrusted bytes: backend pages
# (random bodies with valid checksums), WAL payloads (batch, member meta, MVCC record) and the
# HTTP/2 :authority layer (random HPACK blocks and frame streams). Each is a seeded random-input
# test that must never panic; this runs them with many more cases than CI does.
#
# Then the libFuzzer targets (fuzz/, cargo-fuzz on nightly): the bbolt reader (etcd-format
# snapshot files, from anyone), the backend's page decoder and tree walker (sealed arbitrary
# pages behind valid metas, with a write transaction) and the WAL payload decoders. This
# installs nightly and cargo-fuzz when missing, seeds the bbolt corpus with files Keel's writer
# makes, and runs each target for FUZZ_SECONDS (default 120). The stable seeded tests run
# first, so the decoders are covered where nightly cannot be had.
#
# It also runs the backend's crash-image property test (random commits, a crash at every
# write or sync, torn and lost unsynced writes) with many more seeds per crash point.
#
# Usage: scripts/fuzz-smoke.sh [ITERS]   (default 200000 cases per target; 200 crash seeds)
# Env:   FUZZ_SECONDS (libFuzzer time per target; 0 skips them)
set -euo pipefail
cd "$(dirname "$0")/.."
export KEEL_FUZZ_ITERS="${1:-200000}"
export KEEL_CRASH_SEEDS="${KEEL_CRASH_SEEDS:-200}"
cargo test --release -p keel-storage --lib -- random_sealed_pages_never_panic decoders_take_random_bytes \
  a_crash_at_any_write_or_sync_keeps_the_last_acknowledged_commit random_bytes_never_panic
cargo test --release -p keel-net --lib -- random_blocks_and_streams_never_panic

FUZZ_SECONDS="${FUZZ_SECONDS:-120}"
if [ "$FUZZ_SECONDS" -gt 0 ]; then
  rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
  command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
  mkdir -p fuzz/corpus/bolt_reader fuzz/corpus/backend_pages fuzz/corpus/wal_payloads
  KEEL_FUZZ_SEEDS="$PWD/fuzz/corpus/bolt_reader" cargo test -q -p keel-storage --lib -- --ignored write_fuzz_seeds
  for target in bolt_reader backend_pages wal_payloads; do
    (cd fuzz && cargo +nightly fuzz run "$target" "corpus/$target" -- \
      -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048 -max_len=262144)
  done
fi
