#!/usr/bin/env bash
# watch-memory-vs-etcd.sh - etcd 3.4 (Debian) and Keel side by side: memory per watcher.
# Starts a fresh server, notes its RSS, then runs keel-bench's watch fan-out (W watchers on 10
# streams over KEYS keys, PUT_RATE puts/s for 10 s) while sampling the server's RSS every 250 ms;
# per watcher = (median RSS while watching - RSS before) / W. Interleaved, REPS times each;
# prints one markdown row per run and the medians.
#
# Usage: scripts/watch-memory-vs-etcd.sh [W] [REPS]   (default 10000 watchers, 3 reps)
# Env:   KEYS (1000; 1 is issue 8's fan-out: every watcher on one key), PUT_RATE (150),
#        WORK_DIR (default /tmp/keel-watchmem), KEEL_BIN, BENCH_BIN (as bench-vs-etcd.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
W="${1:-10000}"
REPS="${2:-3}"
WORK="${WORK_DIR:-/tmp/keel-watchmem}"
KEYS="${KEYS:-1000}"
PUT_RATE="${PUT_RATE:-150}"
. scripts/common.sh
keel_bins
PORT=23899
mkdir -p "$WORK"

per_stream=$((W / 10))
declare -A results
echo "| server | run | RSS before MiB | RSS watching MiB | bytes per watcher |"
echo "|---|---|---|---|---|"
for rep in $(seq 1 "$REPS"); do
  for which in etcd keel; do
    start_server "$which" "$WORK/$which.data" "$PORT"
    sleep 2
    before=$(rss_kib "$PID")
    "$BENCH" --endpoints "127.0.0.1:$PORT" --conns 10 watch --streams 10 \
      --watchers-per-stream "$per_stream" --watched-key-total "$KEYS" --put-total $((PUT_RATE * 10)) --put-rate "$PUT_RATE" \
      > "$WORK/bench.out" 2>&1 &
    B=$!
    samples=()
    sleep 3
    while kill -0 "$B" 2>/dev/null; do
      samples+=("$(rss_kib "$PID")")
      sleep 0.25
    done
    wait "$B" || true
    med=$(printf '%s\n' "${samples[@]}" | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}')
    per=$(( (med - before) * 1024 / W ))
    results[$which]+="$per "
    echo "| $which | $rep | $((before / 1024)) | $((med / 1024)) | $per |"
    kill "$PID"; wait "$PID" 2>/dev/null || true
  done
done
for which in etcd keel; do
  m=$(printf '%s\n' ${results[$which]} | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}')
  echo "median $which: $m bytes per watcher"
done
