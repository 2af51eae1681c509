#!/usr/bin/env bash
# cluster-vs-etcd.sh - a 3-member Keel cluster and a 3-member etcd 3.4 cluster (Debian) side by
# side on this machine: members on 127.0.0.1-3, same disk, same defaults (heartbeat 100 ms,
# election 1000 ms), interleaved runs, fresh clusters each time.
#
#   throughput: put 1x1, put 100x1000, linearizable range 100x1000, loading every member
#               (keel-bench spreads its connections over the endpoints); RSS per member after.
#   failover:   a client writes through a follower one request at a time while the leader is
#               killed (-9); "new leader" is the time from the kill until a write through the
#               survivors succeeds (etcdctl in a loop, the same for both); "longest wait" is
#               the follower client's slowest answer, a success or an error (keel-bench's
#               max_answer_ms: a write lost with the old leader counts for as long as it
#               hung before it failed); "failed" is how many of its writes got an error.
#
# Usage: scripts/cluster-vs-etcd.sh [REPS] [FAILOVER_ROUNDS]   (defaults 3 and 5)
# Env:   WORK_DIR (default /tmp/keel-cluster-vs-etcd), WORKLOADS (names to run), SKIP_FAILOVER=1
set -euo pipefail
cd "$(dirname "$0")/.."
REPS="${1:-3}"
ROUNDS="${2:-5}"
WORK="${WORK_DIR:-/tmp/keel-cluster-vs-etcd}"
scripts/setup.sh
cargo build --release -q --bin keel --bin keel-bench
KEEL=target/release/keel
BENCH=target/release/keel-bench
mkdir -p "$WORK"
export ETCDCTL_API=3

WORKLOADS_ALL=(
  "put-1x1|-|--conns 1 --clients 1 put --total 2000 --key-size 8 --val-size 256"
  "put-100x1000|-|--conns 100 --clients 1000 --threads 2 put --total 60000 --key-size 8 --val-size 256"
  "range-l-100x1000|put|--conns 100 --clients 1000 --threads 2 range foo --total 60000 --consistency l"
)

PIDS=()
port() { if [ "$1" = etcd ]; then echo 24379; else echo 24479; fi; }
eps() { local p; p=$(port "$1"); echo "127.0.0.1:$p,127.0.0.2:$p,127.0.0.3:$p"; }

start() { # which
  local which="$1" p; p=$(port "$which")
  local ic="m1=http://127.0.0.1:$((p+1)),m2=http://127.0.0.2:$((p+1)),m3=http://127.0.0.3:$((p+1))"
  PIDS=()
  for i in 1 2 3; do
    local ip="127.0.0.$i" dir="$WORK/$which-m$i"
    rm -rf "$dir"
    local bin=etcd; [ "$which" = keel ] && bin="$KEEL"
    "$bin" --name "m$i" --data-dir "$dir" \
      --listen-client-urls "http://$ip:$p" --advertise-client-urls "http://$ip:$p" \
      --listen-peer-urls "http://$ip:$((p+1))" --initial-advertise-peer-urls "http://$ip:$((p+1))" \
      --initial-cluster "$ic" --initial-cluster-token bench > "$WORK/$which-m$i.log" 2>&1 &
    PIDS+=($!)
  done
  for _ in $(seq 1 200); do
    if etcdctl --endpoints "$(eps "$which")" --dial-timeout 1s endpoint health >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.1
  done
  echo "$which cluster did not start" >&2; exit 1
}
stop() {
  for pid in "${PIDS[@]:-}"; do [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]:-}"; do [ -n "$pid" ] && wait "$pid" 2>/dev/null || true; done
  PIDS=()
}
trap stop EXIT

# Index (0-2) of the member that leads, from endpoint status.
leader_index() { # which
  etcdctl --endpoints "$(eps "$1")" endpoint status -w json 2>/dev/null | python3 -c '
import json, sys
st = json.load(sys.stdin)
for e in st:
    if e["Status"]["header"]["member_id"] == e["Status"]["leader"]:
        print(int(e["Endpoint"].split(":")[0].split(".")[3]) - 1)
        break'
}

RESULTS="$WORK/results.tsv"; : > "$RESULTS"
selected=" ${WORKLOADS:-} "
for spec in "${WORKLOADS_ALL[@]}"; do
  IFS='|' read -r name setup args <<< "$spec"
  if [ -n "${WORKLOADS:-}" ] && [[ "$selected" != *" $name "* ]]; then continue; fi
  for rep in $(seq 1 "$REPS"); do
    for which in etcd keel; do
      start "$which"
      if [ "$setup" = put ]; then
        etcdctl --endpoints "$(eps "$which")" put foo "$(head -c 256 /dev/zero | tr '\0' v)" >/dev/null
      fi
      # shellcheck disable=SC2086
      json=$($BENCH --endpoints "$(eps "$which")" --json $args)
      rss=0
      for pid in "${PIDS[@]}"; do
        r=$(awk '/VmRSS/{print $2}' "/proc/$pid/status"); [ "$r" -gt "$rss" ] && rss=$r
      done
      stop
      python3 - "$name" "$which" "$rep" "$rss" "$json" >> "$RESULTS" <<'PY'
import json, sys
name, which, rep, rss, js = sys.argv[1:6]
d = json.loads(js)
print("\t".join(map(str, [name, which, rep, round(d["requests_per_sec"], 1),
      d["latency_ms"]["p99"], int(rss) // 1024, sum(d["errors"].values())])))
PY
    done
  done
done

FAILOVER="$WORK/failover.tsv"; : > "$FAILOVER"
if [ -z "${SKIP_FAILOVER:-}" ]; then
  for round in $(seq 1 "$ROUNDS"); do
    for which in etcd keel; do
      start "$which"
      sleep 1
      l=$(leader_index "$which")
      f=$(( (l + 1) % 3 )); s=$(( (l + 2) % 3 ))
      p=$(port "$which")
      "$BENCH" --endpoints "127.0.0.$((f+1)):$p" --json --duration 8 put --key-size 8 --val-size 64 \
        > "$WORK/follower.json" 2>/dev/null &
      bench_pid=$!
      sleep 2
      kill -9 "${PIDS[$l]}"
      t0=$(date +%s.%N)
      until etcdctl --endpoints "127.0.0.$((f+1)):$p,127.0.0.$((s+1)):$p" --command-timeout 300ms \
        put failover x >/dev/null 2>&1; do :; done
      t1=$(date +%s.%N)
      wait "$bench_pid" || true
      maxms=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["max_answer_ms"])' "$WORK/follower.json")
      errs=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["error_count"])' "$WORK/follower.json")
      echo -e "$which\t$round\t$(python3 -c "print(round($t1-$t0, 3))")\t$maxms\t$errs" >> "$FAILOVER"
      stop
    done
  done
fi

python3 - "$RESULTS" "$FAILOVER" "$REPS" <<'PY'
import sys, statistics as st, collections
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
by = collections.OrderedDict()
for name, which, rep, rps, p99, rss, errs in rows:
    by.setdefault(name, {}).setdefault(which, []).append((float(rps), float(p99), int(rss), int(errs)))
med = lambda xs, i: st.median(x[i] for x in xs)
ratio = lambda a, b: f"{a/b:.2f}x" if b else "n/a"
print(f"3 members each; medians of {sys.argv[3]}; RSS = the largest member's after the run")
print()
print("| workload | etcd req/s | keel req/s | ratio | etcd p99 ms | keel p99 ms | p99 ratio | etcd RSS MiB | keel RSS MiB | RSS ratio | errors |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for name, d in by.items():
    e, k = d.get("etcd", []), d.get("keel", [])
    if not e or not k:
        continue
    print(f"| {name} | {med(e,0):.0f} | {med(k,0):.0f} | {ratio(med(k,0), med(e,0))} | {med(e,1):.2f} | {med(k,1):.2f} | {ratio(med(k,1), med(e,1))} | {med(e,2):.0f} | {med(k,2):.0f} | {ratio(med(k,2), med(e,2))} | {sum(x[3] for x in e + k)} |")
fo = [l.rstrip("\n").split("\t") for l in open(sys.argv[2]) if l.strip()]
if fo:
    print()
    print("| failover | rounds | new leader s (median) | longest follower wait ms, any answer (median / max) | failed writes (median) |")
    print("|---|---|---|---|---|")
    for which in ("etcd", "keel"):
        r = [x for x in fo if x[0] == which]
        if r:
            t = [float(x[2]) for x in r]; w = [float(x[3]) for x in r]; f = [int(x[4]) for x in r]
            print(f"| {which} | {len(r)} | {st.median(t):.2f} | {st.median(w):.0f} / {max(w):.0f} | {st.median(f):.0f} |")
PY
