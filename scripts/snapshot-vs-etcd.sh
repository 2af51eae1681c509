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
scripts/setup.sh
if [ -z "${KEEL_BIN:-}" ] || [ -z "${BENCH_BIN:-}" ]; then
  cargo build --release -q --bin keel --bin keel-bench
fi
KEEL="${KEEL_BIN:-target/release/keel}"
BENCH="${BENCH_BIN:-target/release/keel-bench}"
PORT=23897
mkdir -p "$WORK"
export ETCDCTL_API=3

start() { # which
  if [ "$1" = etcd ]; then
    etcd --name r --data-dir "$WORK/etcd.data" --quota-backend-bytes 8589934592 \
      --listen-client-urls "http://127.0.0.1:$PORT" --advertise-client-urls "http://127.0.0.1:$PORT" \
      --listen-peer-urls "http://127.0.0.1:$((PORT+1))" --initial-advertise-peer-urls "http://127.0.0.1:$((PORT+1))" \
      --initial-cluster "r=http://127.0.0.1:$((PORT+1))" >> "$WORK/etcd.log" 2>&1 &
  else
    "$KEEL" --data-dir "$WORK/keel.data" --quota-backend-bytes 8589934592 \
      --listen-client-urls "http://127.0.0.1:$PORT" --advertise-client-urls "http://127.0.0.1:$PORT" \
      >> "$WORK/keel.log" 2>&1 &
  fi
  PID=$!
  for _ in $(seq 1 600); do
    etcdctl --endpoints "127.0.0.1:$PORT" --dial-timeout 1s get probe >/dev/null 2>&1 && return
    sleep 0.1
  done
  echo "$1 did not start" >&2; exit 1
}
rss_mib() { awk '/VmRSS/{printf "%d", $2/1024}' "/proc/$1/status"; }

echo "| server | keys x value | load req/s | save s | RSS before MiB | peak RSS during save MiB | growth MiB | snapshot MiB | etcdctl snapshot status |"
echo "|---|---|---|---|---|---|---|---|---|"
for which in etcd keel; do
  rm -rf "$WORK/$which.data" "$WORK/$which.snap.db"
  start "$which"
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
