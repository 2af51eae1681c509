#!/usr/bin/env bash
# defrag-under-load.sh - Keel's put rate and p99 while `etcdctl defrag` rewrites a >= 1 GiB
# backend, against its own steady rate in the same run (etcd 3.4 holds every write for its whole
# defrag, so its figure is no rate at all). Loads N keys of VAL B (default ~1.2 GiB), then ROUNDS
# times: put 100x1000 for SECS s steady; put 100x1000 for SECS s with `etcdctl defrag` started
# 1 s in. Prints one markdown row per round and the medians.
#
# Usage: scripts/defrag-under-load.sh [N] [VAL]   (default 280000 keys of 4096 B)
# Env:   ROUNDS (3), SECS (12), WORK_DIR (default /tmp/keel-defrag), KEEL_BIN, BENCH_BIN
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-280000}"
VAL="${2:-4096}"
ROUNDS="${ROUNDS:-3}"
SECS="${SECS:-12}"
WORK="${WORK_DIR:-/tmp/keel-defrag}"
. scripts/common.sh
keel_bins
PORT=23899
mkdir -p "$WORK"
EP="127.0.0.1:$PORT"

load() { # out.json: put 100x1000 for SECS s on keys apart from the loaded ones
  $BENCH --endpoints "$EP" --conns 100 --clients 1000 --threads 2 --duration "$SECS" put \
    --key-size 16 --val-size 256 --key-space-size 100000 --json > "$1"
}
field() { python3 -c "import json,sys; j=json.load(open('$1')); print($2)"; }

start_server keel "$WORK/keel.data" "$PORT" --quota-backend-bytes 8589934592
$BENCH --endpoints "$EP" --conns 20 --clients 200 --threads 2 put --total "$N" \
  --key-size 32 --val-size "$VAL" --key-space-size "$N" --sequential-keys --json >/dev/null
sleep 3
echo "| round | db MiB | steady req/s | p99 ms | during defrag req/s | p99 ms | rate ratio | p99 ratio | defrag s |"
echo "|---|---|---|---|---|---|---|---|---|"
ratios=()
p99s=()
for r in $(seq 1 "$ROUNDS"); do
  db=$(( $(stat -c %s "$WORK/keel.data/member/snap/keel.db") / 1048576 ))
  load "$WORK/steady.json"
  load "$WORK/defrag.json" &
  BENCH_PID=$!
  sleep 1
  t0=$(date +%s.%N)
  etcdctl --endpoints "$EP" --command-timeout 300s defrag >/dev/null
  t1=$(date +%s.%N)
  wait "$BENCH_PID"
  s_rps=$(field "$WORK/steady.json" 'round(j["requests_per_sec"])')
  s_p99=$(field "$WORK/steady.json" 'j["latency_ms"]["p99"]')
  d_rps=$(field "$WORK/defrag.json" 'round(j["requests_per_sec"])')
  d_p99=$(field "$WORK/defrag.json" 'j["latency_ms"]["p99"]')
  ratio=$(echo "scale=2; $d_rps / $s_rps" | bc)
  p99r=$(echo "scale=2; $d_p99 / $s_p99" | bc)
  ratios+=("$ratio"); p99s+=("$p99r")
  echo "| $r | $db | $s_rps | $s_p99 | $d_rps | $d_p99 | $ratio | $p99r | $(echo "$t1 - $t0" | bc) |"
done
med() { printf '%s\n' "$@" | sort -n | sed -n "$(( ($# + 1) / 2 ))p"; }
echo
echo "median rate ratio $(med "${ratios[@]}"), median p99 ratio $(med "${p99s[@]}")"
kill "$PID"; wait "$PID" 2>/dev/null || true
rm -rf "$WORK/keel.data"
