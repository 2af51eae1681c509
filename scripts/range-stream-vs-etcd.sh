#!/usr/bin/env bash
# range-stream-vs-etcd.sh - what one read of a whole large keyspace costs the server's memory,
# Keel and etcd 3.4 (Debian) side by side: KEYS keys (16-byte keys, VAL-byte values) loaded
# into a fresh server, then one client reads all of them while the server's RSS is sampled
# every 20 ms:
#   keel: etcd 3.7's KV.RangeStream (what kube-apiserver 1.37 lists and fills its watch cache
#         with), then the unary Range;
#   etcd: the unary Range (3.4 has no RangeStream; it answers Unimplemented, and clients fall
#         back to Range).
# Reports the RSS before each read and its peak growth during it, medians of REPS.
#
# Usage: scripts/range-stream-vs-etcd.sh [REPS]   (default 1)
# Env:   KEYS (1000000), VAL (100), WORK_DIR (default /tmp/keel-range-stream), KEEL_BIN, BENCH_BIN
set -euo pipefail
cd "$(dirname "$0")/.."
REPS="${1:-1}"
KEYS="${KEYS:-1000000}"
VAL="${VAL:-100}"
WORK="${WORK_DIR:-/tmp/keel-range-stream}"
. scripts/common.sh
keel_bins
PORT=23930
mkdir -p "$WORK"
PID=""
SAMPLER=""
trap '[ -n "$SAMPLER" ] && kill "$SAMPLER" 2>/dev/null; [ -n "$PID" ] && kill "$PID" 2>/dev/null; true' EXIT
RESULTS="$WORK/results.tsv"; : > "$RESULTS"

# peak_growth LABEL BENCH_ARGS...: runs one read with the server's RSS sampled; appends a row.
peak_growth() {
  local label="$1"
  shift
  local before
  before=$(rss_kib "$PID")
  ( peak=0
    while [ -r "/proc/$PID/status" ]; do
      r=$(rss_kib "$PID" 2>/dev/null || echo 0)
      [ "${r:-0}" -gt "$peak" ] && { peak=$r; echo "$peak" > "$WORK/peak"; }
      sleep 0.02
    done ) &
  SAMPLER=$!
  echo "$before" > "$WORK/peak"
  local t0 t1
  t0=$(date +%s.%N)
  "$BENCH" --endpoints "127.0.0.1:$PORT" --json "$@" > "$WORK/read.json"
  t1=$(date +%s.%N)
  sleep 0.1
  kill "$SAMPLER" 2>/dev/null; wait "$SAMPLER" 2>/dev/null || true
  SAMPLER=""
  python3 - "$label" "$before" "$(cat "$WORK/peak")" "$t0" "$t1" "$WORK/read.json" >> "$RESULTS" <<'PY'
import json, sys
label, before, peak, t0, t1, path = sys.argv[1:7]
d = json.load(open(path))
errs = sum(d["errors"].values())
print("\t".join(map(str, [label, int(before) // 1024, (int(peak) - int(before)) // 1024,
      round(float(t1) - float(t0), 2), errs])))
PY
}

load() {
  local txns=$(( (KEYS + 127) / 128 ))
  "$BENCH" --endpoints "127.0.0.1:$PORT" --conns 10 --clients 50 --threads 2 --json \
    txn-put --total "$txns" --txn-ops 128 --sequential-keys --key-space-size "$KEYS" \
    --key-size 16 --val-size "$VAL" > "$WORK/load.json"
  sleep 2
}

ALL=(range kkkkkkkk kkkkkkkl --total 1)
for rep in $(seq 1 "$REPS"); do
  start_server keel "$WORK/keel.data" "$PORT"
  load
  peak_growth keel-range-stream "${ALL[@]}" --stream
  peak_growth keel-range "${ALL[@]}"
  kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""
  start_server etcd "$WORK/etcd.data" "$PORT"
  load
  peak_growth etcd-range "${ALL[@]}"
  kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""
done

python3 - "$RESULTS" "$REPS" "$KEYS" "$VAL" <<'PY'
import sys, statistics as st
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
reps, keys, val = sys.argv[2:5]
print(f"medians of {reps}; one read of {keys} keys (16-byte keys, {val}-byte values)")
print()
print("| read | RSS before MiB | RSS growth MiB | seconds | errors |")
print("|---|---|---|---|---|")
for label in ("keel-range-stream", "keel-range", "etcd-range"):
    xs = [r for r in rows if r[0] == label]
    med = lambda i: st.median(float(x[i]) for x in xs)
    errs = sum(int(x[4]) for x in xs)
    print(f"| {label} | {med(1):.0f} | {med(2):.0f} | {med(3):.2f} | {errs} |")
PY
