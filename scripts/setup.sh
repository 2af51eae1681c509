#!/usr/bin/env bash
# setup.sh - installs what building and testing Keel needs on a fresh Debian machine:
#   etcd-server (real etcd 3.4, for side-by-side checks), etcd-client (etcdctl 3.4, the e2e
#   tests' client), protobuf-compiler (protoc, needed to build the etcd-client crate used by
#   the tests; Keel itself compiles its protos with protox), rustfmt and clippy.
# Idempotent: installs only what is missing.
set -euo pipefail

need=()
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
for c in rustfmt clippy; do
  rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
done
