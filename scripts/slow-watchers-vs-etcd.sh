#!/usr/bin/env bash
# slow-watchers-vs-etcd.sh - what 100 watchers that never read do to writers, Keel and etcd 3.4
# (Debian) side by side: put 100x1000 on a fresh server, alone and beside WATCHERS stalled
# watchers (each on its own connection, watching every key), interleaved
# (etcd alone, etcd with watchers, keel alone, keel with watchers) REPS times.
#
# Each server's figures are against its own run without watchers: rate, p99 over the whole
# run, p99 from the second second on (the first second is when every stalled client's
# flow-control window fills: about 1 MiB per watcher goes out once, and from then on a stalled
# stream costs nothing), and RSS after the run.
#
# Usage: scripts/slow-watchers-vs-etcd.sh [REPS]   (default 3)
# Env:   WATCHERS (100), TOTAL (puts per run, 200000), WORK_DIR (default /tmp/keel-slow-watchers),
#        KEEL_BIN, BENCH_BIN
set -euo pipefail
cd "$(dirname "$0")/.."
REPS="${1:-3}"
WATCHERS="${WATCHERS:-100}"
TOTAL="${TOTAL:-200000}"
WORK="${WORK_DIR:-/tmp/keel-slow-watchers}"
. scripts/common.sh
keel_bins
PORT=23910
mkdir -p "$WORK"
PID=""
trap '[ -n "$PID" ] && kill "$PID" 2>/dev/null; true' EXIT
RESULTS="$WORK/results.tsv"; : > "$RESULTS"

for rep in $(seq 1 "$REPS"); do
  for which in etcd keel; do
    for w in 0 "$WATCHERS"; do
      start_server "$which" "$WORK/$which.data" "$PORT"
      $BENCH --endpoints "127.0.0.1:$PORT" --slow-watchers "$w" --conns 100 --clients 1000 \
        --threads 2 put --total "$TOTAL" --key-size 8 --val-size 256 --json > "$WORK/run.json"
      rss=$(rss_mib "$PID")
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

python3 - "$RESULTS" "$REPS" "$WATCHERS" <<'PY'
import sys, statistics as st
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
reps, watchers = sys.argv[2], sys.argv[3]
cell = {}
for which, w, rps, p99, steady, rss, errs in rows:
    cell.setdefault((which, int(w) > 0), []).append((float(rps), float(p99), float(steady), int(rss), int(errs)))
med = lambda xs, i: st.median(x[i] for x in xs)
print(f"medians of {reps}; put 100x1000, with and without {watchers} stalled watchers; RSS after the run")
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
