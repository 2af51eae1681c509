#!/usr/bin/env bash
# bench-vs-etcd.sh - Keel and etcd 3.4 (Debian) side by side on this machine, same disk, same
# workloads, interleaved (etcd, keel, etcd, keel, ...), a fresh server for every run so neither
# carries the other's history. Prints a markdown table of medians and Keel/etcd ratios.
#
# Usage: scripts/bench-vs-etcd.sh [REPS]   (default 3)
# Env:   WORK_DIR (default /tmp/keel-vs-etcd), WORKLOADS (space-separated names to run),
#        KEEL_BIN and BENCH_BIN (binaries to use instead of building this tree's: compares two
#        builds, e.g. before and after a change)
set -euo pipefail
cd "$(dirname "$0")/.."
REPS="${1:-3}"
WORK="${WORK_DIR:-/tmp/keel-vs-etcd}"
scripts/setup.sh
if [ -z "${KEEL_BIN:-}" ] || [ -z "${BENCH_BIN:-}" ]; then
  cargo build --release -q --bin keel --bin keel-bench
fi
KEEL="${KEEL_BIN:-target/release/keel}"
BENCH="${BENCH_BIN:-target/release/keel-bench}"
mkdir -p "$WORK"
ETCD_PORT=23890; KEEL_PORT=23892

# name|setup (put: one key first; load:N: N distinct 32 B keys first; -: nothing)|bench arguments
WORKLOADS_ALL=(
  "put-1x1|-|--conns 1 --clients 1 put --total 3000 --key-size 8 --val-size 256"
  "put-10x100|-|--conns 10 --clients 100 --threads 2 put --total 30000 --key-size 8 --val-size 256"
  "put-100x1000|-|--conns 100 --clients 1000 --threads 2 put --total 100000 --key-size 8 --val-size 256"
  "put-100k-keys-100x1000|-|--conns 100 --clients 1000 --threads 2 put --total 100000 --key-size 8 --val-size 256 --key-space-size 100000 --sequential-keys"
  "range-l-1x1|put|--conns 1 --clients 1 range foo --total 5000 --consistency l"
  "range-s-1x1|put|--conns 1 --clients 1 range foo --total 5000 --consistency s"
  "range-l-100x1000|put|--conns 100 --clients 1000 --threads 2 range foo --total 100000 --consistency l"
  "range-s-100x1000|put|--conns 100 --clients 1000 --threads 2 range foo --total 100000 --consistency s"
  "put-300k-history-100x1000|-|--conns 100 --clients 1000 --threads 2 put --total 300000 --key-size 8 --val-size 256 --key-space-size 10"
  "list-200k-by-500|load:200000|--conns 1 --clients 1 list k l --total 3 --page-size 500"
  "put-1m-keys-100x1000|-|--conns 100 --clients 1000 --threads 2 put --total 1000000 --key-size 32 --val-size 256 --key-space-size 1000000 --sequential-keys"
  "watch-10x100-fanout|-|--conns 10 watch --streams 10 --watchers-per-stream 100 --put-total 2000 --put-rate 200"
  "watch-1key-1000-fanout|-|--conns 10 watch --streams 10 --watchers-per-stream 100 --watched-key-total 1 --put-total 2000 --put-rate 200"
  "lease-keepalive-10x100|-|--conns 10 --clients 100 lease-keepalive --total 20000"
  "put-100x1000-100-slow-watchers|-|--slow-watchers 100 --conns 100 --clients 1000 --threads 2 put --total 100000 --key-size 8 --val-size 256"
)

PID=""
start() { # which
  local which="$1"
  rm -rf "$WORK/$which.data"
  if [ "$which" = etcd ]; then
    etcd --name bench --data-dir "$WORK/etcd.data" \
      --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
      --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT+1))" --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT+1))" \
      --initial-cluster "bench=http://127.0.0.1:$((ETCD_PORT+1))" > "$WORK/etcd.log" 2>&1 &
    PID=$!; PORT=$ETCD_PORT
  else
    "$KEEL" --data-dir "$WORK/keel.data" \
      --listen-client-urls "http://127.0.0.1:$KEEL_PORT" --advertise-client-urls "http://127.0.0.1:$KEEL_PORT" \
      --listen-peer-urls "http://127.0.0.1:$((KEEL_PORT+1))" > "$WORK/keel.log" 2>&1 &
    PID=$!; PORT=$KEEL_PORT
  fi
  for _ in $(seq 1 100); do
    ETCDCTL_API=3 etcdctl --endpoints "127.0.0.1:$PORT" --dial-timeout 1s endpoint health >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "$which did not start" >&2; exit 1
}
stop() { kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; }
trap stop EXIT

cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }

RESULTS="$WORK/results.tsv"; : > "$RESULTS"
selected=" ${WORKLOADS:-} "
for spec in "${WORKLOADS_ALL[@]}"; do
  IFS='|' read -r name setup args <<< "$spec"
  if [ -n "${WORKLOADS:-}" ] && [[ "$selected" != *" $name "* ]]; then continue; fi
  for rep in $(seq 1 "$REPS"); do
    for which in etcd keel; do
      start "$which"
      if [ "$setup" = put ]; then
        ETCDCTL_API=3 etcdctl --endpoints "127.0.0.1:$PORT" put foo "$(head -c 256 /dev/zero | tr '\0' v)" >/dev/null
      elif [[ "$setup" == load:* ]]; then
        n="${setup#load:}"
        $BENCH --endpoints "127.0.0.1:$PORT" --conns 10 --clients 100 --threads 2 put --total "$n" \
          --key-size 32 --val-size 256 --key-space-size "$n" --sequential-keys >/dev/null
      fi
      t0=$(cpu_ticks "$PID")
      # shellcheck disable=SC2086
      json=$($BENCH --endpoints "127.0.0.1:$PORT" --json $args)
      t1=$(cpu_ticks "$PID")
      rss_kib=$(awk '/VmRSS/{print $2}' "/proc/$PID/status")
      stop
      python3 - "$name" "$which" "$rep" "$((t1-t0))" "$rss_kib" "$json" >> "$RESULTS" <<'PY'
import json, sys, os
name, which, rep, ticks, rss, js = sys.argv[1:7]
d = json.loads(js)
hz = os.sysconf("SC_CLK_TCK")
cpu_s = int(ticks) / hz
errs = sum(d["errors"].values())
print("\t".join(map(str, [name, which, rep, round(d["requests_per_sec"], 1), d["latency_ms"]["p50"],
      d["latency_ms"]["p99"], round(cpu_s / max(d["seconds"], 1e-9), 2), int(rss) // 1024, errs,
      round(d["client_cpu_cores"], 2)])))
PY
    done
  done
done

python3 - "$RESULTS" "$REPS" <<'PY'
import sys, statistics as st, collections
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
by = collections.OrderedDict()
for name, which, rep, rps, p50, p99, cores, rss, errs, bench in rows:
    by.setdefault(name, {}).setdefault(which, []).append((float(rps), float(p50), float(p99), float(cores), int(rss), int(errs), float(bench)))
med = lambda xs, i: st.median(x[i] for x in xs)
print(f"reps per cell: {sys.argv[2]} (medians); cores = server CPU cores used while loaded; bench = the harness's own cores; RSS after the run")
print()
print("| workload | etcd req/s | keel req/s | ratio | etcd p99 ms | keel p99 ms | p99 ratio | etcd cores | keel cores | bench cores etcd/keel | etcd RSS MiB | keel RSS MiB | RSS ratio | errors |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for name, d in by.items():
    e, k = d["etcd"], d["keel"]
    er, kr = med(e, 0), med(k, 0)
    ep, kp = med(e, 2), med(k, 2)
    ers, krs = med(e, 4), med(k, 4)
    errs = sum(x[5] for x in e + k)
    ratio = lambda a, b: f"{a/b:.2f}x" if b else "n/a"
    print(f"| {name} | {er:.0f} | {kr:.0f} | {ratio(kr, er)} | {ep:.2f} | {kp:.2f} | {ratio(kp, ep)} | {med(e,3):.2f} | {med(k,3):.2f} | {med(e,6):.2f}/{med(k,6):.2f} | {ers:.0f} | {krs:.0f} | {ratio(krs, ers)} | {errs} |")
PY
