# common.sh - sourced by the side-by-side scripts (etcd 3.4 from Debian beside Keel): what a
# fresh machine needs, the binaries, and one server at a time on loopback.
#
# Env: KEEL_BIN and BENCH_BIN (binaries to use instead of building this tree's).

# Installs what is missing and sets KEEL and BENCH (building them unless both are given).
keel_bins() {
  scripts/setup.sh
  if [ -z "${KEEL_BIN:-}" ] || [ -z "${BENCH_BIN:-}" ]; then
    cargo build --release -q --bin keel --bin keel-bench
  fi
  KEEL="${KEEL_BIN:-target/release/keel}"
  BENCH="${BENCH_BIN:-target/release/keel-bench}"
  export ETCDCTL_API=3
}

# start_server etcd|keel DATA_DIR PORT [EXTRA_FLAG...]: a fresh server (DATA_DIR wiped) with
# its client URL on 127.0.0.1:PORT (etcd's peer URL on PORT+1), logging to DATA_DIR.log; sets
# PID and returns once a get succeeds (at most 30 s).
start_server() {
  local which="$1" data="$2" port="$3"
  shift 3
  rm -rf "$data"
  if [ "$which" = etcd ]; then
    etcd --name r --data-dir "$data" "$@" \
      --listen-client-urls "http://127.0.0.1:$port" --advertise-client-urls "http://127.0.0.1:$port" \
      --listen-peer-urls "http://127.0.0.1:$((port+1))" --initial-advertise-peer-urls "http://127.0.0.1:$((port+1))" \
      --initial-cluster "r=http://127.0.0.1:$((port+1))" >> "$data.log" 2>&1 &
  else
    "$KEEL" --data-dir "$data" "$@" \
      --listen-client-urls "http://127.0.0.1:$port" --advertise-client-urls "http://127.0.0.1:$port" \
      --listen-peer-urls "http://127.0.0.1:$((port+1))" >> "$data.log" 2>&1 &
  fi
  PID=$!
  for _ in $(seq 1 300); do
    etcdctl --endpoints "127.0.0.1:$port" --dial-timeout 1s get probe >/dev/null 2>&1 && return
    sleep 0.1
  done
  echo "$which did not start (log: $data.log)" >&2
  exit 1
}

rss_kib() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }
rss_mib() { awk '/VmRSS/{printf "%d", $2/1024}' "/proc/$1/status"; }
