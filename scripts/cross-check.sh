#!/usr/bin/env bash
# cross-check.sh - keel-bench against an independent load generator on etcd's own Go client
# (scripts/goload, built with Debian's Go and Debian's packaged etcd sources, no download), on
# the same etcd and Keel, same workloads. Prints both tools' figures side by side.
# Usage: scripts/cross-check.sh [REPS]
set -euo pipefail
cd "$(dirname "$0")/.."
REPS="${1:-2}"
WORK="${WORK_DIR:-/tmp/keel-cross-check}"
scripts/setup.sh
if ! command -v go >/dev/null || [ ! -d /usr/share/gocode/src/go.etcd.io/etcd/clientv3 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq golang-go golang-etcd-server-dev >/dev/null
fi
mkdir -p "$WORK"
GOPATH=/usr/share/gocode GO111MODULE=off GOCACHE="$WORK/gocache" GOFLAGS= \
  go build -o "$WORK/goload" scripts/goload/main.go
cargo build --release -q --bin keel --bin keel-bench
BENCH=target/release/keel-bench

EP_ETCD=127.0.0.1:23990; EP_KEEL=127.0.0.1:23992
rm -rf "$WORK/etcd.data" "$WORK/keel.data"
etcd --name x --data-dir "$WORK/etcd.data" --listen-client-urls "http://$EP_ETCD" \
  --advertise-client-urls "http://$EP_ETCD" --listen-peer-urls http://127.0.0.1:23991 \
  --initial-advertise-peer-urls http://127.0.0.1:23991 --initial-cluster x=http://127.0.0.1:23991 \
  > "$WORK/etcd.log" 2>&1 & EPID=$!
target/release/keel --data-dir "$WORK/keel.data" --listen-client-urls "http://$EP_KEEL" \
  --listen-peer-urls http://127.0.0.1:23993 > "$WORK/keel.log" 2>&1 & KPID=$!
trap 'kill $EPID $KPID 2>/dev/null || true' EXIT
for ep in $EP_ETCD $EP_KEEL; do
  for _ in $(seq 1 100); do
    ETCDCTL_API=3 etcdctl --endpoints "$ep" --dial-timeout 1s endpoint health >/dev/null 2>&1 && break
    sleep 0.1
  done
done

echo "| server | workload | goload req/s | keel-bench req/s | goload p99 ms | keel-bench p99 ms |"
echo "|---|---|---|---|---|---|"
for rep in $(seq 1 "$REPS"); do
  for ep in $EP_ETCD $EP_KEEL; do
    name=$([ "$ep" = "$EP_ETCD" ] && echo etcd || echo keel)
    for w in "1 1 3000" "100 1000 100000"; do
      read -r conns clients total <<< "$w"
      g=$("$WORK/goload" -endpoint "$ep" -conns "$conns" -clients "$clients" -total "$total" -val-size 256)
      k=$($BENCH --endpoints "$ep" --threads 2 --conns "$conns" --clients "$clients" --json put --total "$total" --val-size 256)
      python3 - "$name" "${conns}x${clients}" "$g" "$k" <<'PY'
import json, sys
name, w, g, k = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
print(f"| {name} | put {w} | {g['requests_per_sec']:.0f} | {k['requests_per_sec']:.0f} | {g['p99_ms']:.2f} | {k['latency_ms']['p99']:.2f} |")
PY
    done
  done
done
