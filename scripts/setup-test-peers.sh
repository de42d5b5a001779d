#!/usr/bin/env bash
# Installs the real servers and clients the end-to-end tests run against. Idempotent.
set -euo pipefail

need=()
# android-libboringssl(-dev): BoringSSL as a shared library, for the C client in
# integration/c/boringssl_client.c, which the TLS tests build with gcc. golang-google-grpc-dev:
# grpc-go's source, for the gRPC-over-TLS peer in integration/go/gogrpc (built in GOPATH mode).
# bpftool: lists the tracepoints the agent's programs are attached to (e2e_http1).
for p in nginx-light curl python3 nghttp2-client bpftool postgresql-15 postgresql-client-15 golang-go \
  golang-google-grpc-dev android-libboringssl android-libboringssl-dev gcc libc6-dev; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "[setup-test-peers] installing ${need[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# The gRPC test runs grpcio in the python3 found first in PATH: Debian's own python3 is
# externally managed (PEP 668) and gets Debian's package, any other (pyenv, venv) gets pip's.
if ! python3 -c 'import grpc' 2>/dev/null; then
  echo "[setup-test-peers] installing grpcio for $(command -v python3)" >&2
  if [ "$(command -v python3)" = /usr/bin/python3 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-grpcio >/dev/null
  else
    python3 -m pip install --quiet grpcio
  fi
fi
# OpenSSL 1.1: psycopg2-binary's wheel carries libpq with its own libssl.so.1.1 (Debian 12 ships
# only OpenSSL 3). Installed beside the repository, for the python3 found first in PATH.
openssl11="$(cd "$(dirname "$0")/.." && pwd)/target/test-peers/openssl11"
if ! ls "$openssl11"/psycopg2_binary.libs/libssl-*.so.1.1 >/dev/null 2>&1; then
  if ! python3 -m pip --version >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
  fi
  echo "[setup-test-peers] installing psycopg2-binary 2.9.9 (OpenSSL 1.1) into $openssl11" >&2
  PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --no-deps --only-binary=:all: \
    --target "$openssl11" psycopg2-binary==2.9.9
fi
# Debian starts nginx and a PostgreSQL cluster on install; the tests run their own instances
# on their own ports.
if command -v systemctl >/dev/null 2>&1; then systemctl disable --now nginx postgresql >/dev/null 2>&1 || true; fi
if command -v pg_lsclusters >/dev/null 2>&1; then
  pg_lsclusters -h | while read -r ver name _ status _; do
    [ "$status" = online ] && pg_ctlcluster "$ver" "$name" stop || true
  done
fi
pkill -f 'nginx: master process /usr/sbin/nginx -g daemon on' 2>/dev/null || true
