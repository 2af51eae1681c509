#!/usr/bin/env bash
# snapshot-vs-etcd.sh - etcd 3.4 (Debian) and Keel side by side: load N keys (32 B keys, VAL B
# values; the default makes a state over 1 GiB) into a fresh server, then time `etcdctl
# snapshot save` against it and sample the server's RSS every 50 ms while it runs. Prints one
# markdown table: load rate, state size, save time, server RSS before, peak RSS during the save
# (growth = peak - before), snapshot size; and checks each file with `etcdctl snapshot status`.
#
# Usage: scripts/snapshot-vs-etcd.sh [N] [VAL]   (default 280000 keys of 4096 B: ~1.2 GiB)
# Env:   WORK_DIR (default /tmp/keel-snapshot), KEEL_BIN, BENCH_BIN (as bench-vs-etcd.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-280000}"
VAL="${2:-4096}"
WORK="${WORK_DIR:-/tmp/keel-snapshot}"
. scripts/common.sh
keel_bins
PORT=23897
mkdir -p "$WORK"

echo "| server | keys x value | load req/s | save s | RSS before MiB | peak RSS during save MiB | growth MiB | snapshot MiB | etcdctl snapshot status |"
echo "|---|---|---|---|---|---|---|---|---|"
for which in etcd keel; do
  rm -f "$WORK/$which.snap.db"
  start_server "$which" "$WORK/$which.data" "$PORT" --quota-backend-bytes 8589934592
  rps=$($BENCH --endpoints "127.0.0.1:$PORT" --conns 20 --clients 200 --threads 2 put --total "$N" \
    --key-size 32 --val-size "$VAL" --key-space-size "$N" --sequential-keys --json | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["requests_per_sec"]))')
  sleep 3
  before=$(rss_mib "$PID")
  peak="$before"
  t0=$(date +%s.%N)
  etcdctl --endpoints "127.0.0.1:$PORT" --command-timeout 600s snapshot save "$WORK/$which.snap.db" >/dev/null 2>&1 &
  SAVE=$!
  while kill -0 "$SAVE" 2>/dev/null; do
    r=$(rss_mib "$PID"); [ "$r" -gt "$peak" ] && peak="$r"
    sleep 0.05
  done
  wait "$SAVE"
  t1=$(date +%s.%N)
  secs=$(echo "$t1 - $t0" | bc)
  size=$(( $(stat -c %s "$WORK/$which.snap.db") / 1048576 ))
  status=$(etcdctl snapshot status "$WORK/$which.snap.db" 2>/dev/null | tr -d '\n')
  echo "| $which | $N x $VAL B | $rps | $secs | $before | $peak | $((peak - before)) | $size | $status |"
  kill "$PID"; wait "$PID" 2>/dev/null || true
  rm -rf "$WORK/$which.data" "$WORK/$which.snap.db"
done
