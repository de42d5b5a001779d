#!/usr/bin/env bash
# The project's test command: installs what the tests need (idempotent), then runs every test,
# including the end-to-end tests that load the eBPF programs (they need root).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[test] %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  echo "scripts/test.sh: run as root (the end-to-end tests load eBPF programs): sudo $0" >&2
  exit 1
fi

bash scripts/setup-toolchain.sh
bash scripts/setup-test-peers.sh

log "deployment manifests and Helm chart"
bash deploy/validate.sh


export PATH="$HOME/.cargo/bin:$PATH"
log "cargo build"
cargo build --workspace --all-targets --locked
export TRACER_BIN="$PWD/target/debug/tracer"

log "cargo test"
# One test binary at a time: the end-to-end tests each start an agent that traces the whole host.
cargo test --workspace --locked -- --test-threads=1
