#!/usr/bin/env bash
# restart-vs-etcd.sh - etcd 3.4 (Debian) and Keel side by side: load N distinct keys (32 B keys,
# 256 B values) into a fresh server, note its RSS and on-disk size, kill -9 it, start it again on
# the same data and time the restart to its first answer (a linearizable get), then note the
# RSS again, then time one-shot counted reads over all the keys (keel-bench, median of 11):
# a range over all the keys ([k, l): every keel-bench key) with `--limit 5` (5 keys and the
# count of all) and with `--count-only`.
# Prints one markdown table.
#
# Usage: scripts/restart-vs-etcd.sh [N]   (default 1000000)
# Env:   WORK_DIR (default /tmp/keel-restart), KEEL_BIN, BENCH_BIN (as bench-vs-etcd.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-1000000}"
WORK="${WORK_DIR:-/tmp/keel-restart}"
. scripts/common.sh
keel_bins
PORT=23895
mkdir -p "$WORK"

start() { # which
  if [ "$1" = etcd ]; then
    etcd --name r --data-dir "$WORK/etcd.data" \
      --listen-client-urls "http://127.0.0.1:$PORT" --advertise-client-urls "http://127.0.0.1:$PORT" \
      --listen-peer-urls "http://127.0.0.1:$((PORT+1))" --initial-advertise-peer-urls "http://127.0.0.1:$((PORT+1))" \
      --initial-cluster "r=http://127.0.0.1:$((PORT+1))" >> "$WORK/etcd.log" 2>&1 &
  else
    "$KEEL" --data-dir "$WORK/keel.data" \
      --listen-client-urls "http://127.0.0.1:$PORT" --advertise-client-urls "http://127.0.0.1:$PORT" \
      --listen-peer-urls "http://127.0.0.1:$((PORT+1))" >> "$WORK/keel.log" 2>&1 &
  fi
  PID=$!
}
first_answer() { # seconds from now until a get succeeds (at most 120 s)
  local t0 t1
  t0=$(date +%s.%N)
  for _ in $(seq 1 6000); do
    etcdctl --endpoints "127.0.0.1:$PORT" --dial-timeout 1s --command-timeout 2s get probe >/dev/null 2>&1 && break
    sleep 0.02
  done
  t1=$(date +%s.%N)
  echo "$t1 - $t0" | bc
}

p50_ms() { # range options...: the median latency of 11 one-shot reads over every key
  $BENCH --endpoints "127.0.0.1:$PORT" range k l --total 11 --json "$@" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["latency_ms"]["p50"])'
}

echo "| server | keys | load req/s | RSS after load MiB | on disk MiB | restart to first answer s | RSS after restart MiB | get --limit 5 ms | get --count-only ms |"
echo "|---|---|---|---|---|---|---|---|---|"
for which in etcd keel; do
  rm -rf "$WORK/$which.data"
  start "$which"
  first_answer >/dev/null
  rps=$($BENCH --endpoints "127.0.0.1:$PORT" --conns 100 --clients 1000 --threads 2 put --total "$N" \
    --key-size 32 --val-size 256 --key-space-size "$N" --sequential-keys --json | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["requests_per_sec"]))')
  sleep 2
  rss1=$(rss_mib "$PID")
  kill -9 "$PID"; wait "$PID" 2>/dev/null || true
  disk=$(du -sm "$WORK/$which.data" | cut -f1)
  start "$which"
  secs=$(first_answer)
  sleep 1
  rss2=$(rss_mib "$PID")
  lim=$(p50_ms --limit 5)
  cnt=$(p50_ms --count-only)
  kill "$PID"; wait "$PID" 2>/dev/null || true
  echo "| $which | $N | $rps | $rss1 | $disk | $secs | $rss2 | $lim | $cnt |"
done
