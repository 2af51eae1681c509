#!/usr/bin/env bash
# slow-watchers-vs-etcd.sh - what 100 watchers that never read do to writers, Keel and etcd 3.4
# (Debian) side by side: put 100x1000 on a fresh server, alone and beside WATCHERS stalled
# watchers (each on its own connection, watching every key), interleaved
# (etcd alone, etcd with watchers, keel alone, keel with watchers) REPS times.
#
# The stalled watchers are another client: a harness process of their own (`keel-bench hold`)
# opens them before the puts start and holds them until the run ends, so the data they take
# in before their windows fill is not processed by the runtime that times the puts.
# WATCHERS_IN=harness puts them in the measuring process instead (the harness's
# --slow-watchers): then its own receiving shows in the first second's p99. Each stalled
# watcher holds WINDOW bytes unread: its stream's and connection's flow-control window,
# 65535 by default as grpc-go, grpcio and tonic clients start. With WINDOW=1048576 (the
# harness's own window) 100 watchers take ~125 MB before they stall, and on this 2-core
# machine the client receiving it slows the puts for ~0.4 s.
#
# Each server's figures are against its own run without watchers: rate, p99 over the whole
# run, p99 from the second second on (without the warm-up: 1000 clients opening, and every
# stalled client's flow-control window filling once; from then on a stalled stream costs
# nothing), and RSS after the run.
#
# Usage: scripts/slow-watchers-vs-etcd.sh [REPS]   (default 3)
# Env:   WATCHERS (100), TOTAL (puts per run, 200000), WORK_DIR (default /tmp/keel-slow-watchers),
#        WATCHERS_IN (own-process | harness), WINDOW (65535), KEEL_BIN, BENCH_BIN
set -euo pipefail
cd "$(dirname "$0")/.."
REPS="${1:-3}"
WATCHERS="${WATCHERS:-100}"
TOTAL="${TOTAL:-200000}"
WORK="${WORK_DIR:-/tmp/keel-slow-watchers}"
WATCHERS_IN="${WATCHERS_IN:-own-process}"
WINDOW="${WINDOW:-65535}"
. scripts/common.sh
keel_bins
PORT=23910
mkdir -p "$WORK"
PID=""
HOLDER=""
trap '[ -n "$HOLDER" ] && kill "$HOLDER" 2>/dev/null; [ -n "$PID" ] && kill "$PID" 2>/dev/null; true' EXIT
RESULTS="$WORK/results.tsv"; : > "$RESULTS"

for rep in $(seq 1 "$REPS"); do
  for which in etcd keel; do
    for w in 0 "$WATCHERS"; do
      start_server "$which" "$WORK/$which.data" "$PORT"
      inline=0
      if [ "$w" -gt 0 ] && [ "$WATCHERS_IN" = harness ]; then
        inline="$w"
      elif [ "$w" -gt 0 ]; then
        $BENCH --endpoints "127.0.0.1:$PORT" --slow-watchers "$w" --slow-watcher-window "$WINDOW" hold > "$WORK/hold.out" &
        HOLDER=$!
        for _ in $(seq 1 300); do
          grep -q holding "$WORK/hold.out" 2>/dev/null && break
          kill -0 "$HOLDER" 2>/dev/null || { echo "slow watchers not opened" >&2; exit 1; }
          sleep 0.1
        done
        grep -q holding "$WORK/hold.out" || { echo "slow watchers not opened in 30 s" >&2; exit 1; }
      fi
      $BENCH --endpoints "127.0.0.1:$PORT" --slow-watchers "$inline" --slow-watcher-window "$WINDOW" --conns 100 --clients 1000 \
        --threads 2 put --total "$TOTAL" --key-size 8 --val-size 256 --json > "$WORK/run.json"
      rss=$(rss_mib "$PID")
      if [ -n "$HOLDER" ]; then
        kill "$HOLDER"; wait "$HOLDER" 2>/dev/null || true
        HOLDER=""
      fi
      kill "$PID"; wait "$PID" 2>/dev/null || true
      PID=""
      python3 - "$which" "$w" "$rss" "$WORK/run.json" >> "$RESULTS" <<'PY'
import json, sys
which, w, rss, path = sys.argv[1:5]
d = json.load(open(path))
errs = sum(d["errors"].values())
steady = d["p99_ms_after_first_second"]  # None for a run shorter than a second
print("\t".join(map(str, [which, w, round(d["requests_per_sec"], 1), d["latency_ms"]["p99"],
      "nan" if steady is None else steady, rss, errs])))
PY
    done
  done
done

python3 - "$RESULTS" "$REPS" "$WATCHERS" "$WATCHERS_IN" "$WINDOW" <<'PY'
import sys, statistics as st
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
reps, watchers = sys.argv[2], sys.argv[3]
cell = {}
for which, w, rps, p99, steady, rss, errs in rows:
    cell.setdefault((which, int(w) > 0), []).append((float(rps), float(p99), float(steady), int(rss), int(errs)))
med = lambda xs, i: st.median(x[i] for x in xs)
print(f"medians of {reps}; put 100x1000, with and without {watchers} stalled watchers ({sys.argv[4]}, {sys.argv[5]}-byte windows); RSS after the run")
print()
print("| server | rate alone | rate with | ratio | p99 alone | p99 with | ratio | p99 after 1st s alone | with | ratio | RSS alone | RSS with | errors |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for which in ("etcd", "keel"):
    a, b = cell[(which, False)], cell[(which, True)]
    r = lambda i: f"{med(b, i) / med(a, i):.2f}x"
    errs = sum(x[4] for x in a + b)
    print(f"| {which} | {med(a,0):.0f} | {med(b,0):.0f} | {r(0)} | {med(a,1):.1f} | {med(b,1):.1f} | {r(1)} "
          f"| {med(a,2):.1f} | {med(b,2):.1f} | {r(2)} | {med(a,3):.0f} | {med(b,3):.0f} | {errs} |")
PY
