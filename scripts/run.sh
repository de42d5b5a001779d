#!/usr/bin/env bash
# Builds the agent (installing the eBPF toolchain if missing) and runs it on this host.
# Arguments go to `tracer run`; without OTEL_EXPORTER_OTLP_ENDPOINT spans print to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "scripts/run.sh: the agent loads eBPF programs; run it as root: sudo $0 $*" >&2
  exit 1
fi
bash scripts/setup-toolchain.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked -p tracer >&2
exec ./target/release/tracer run "$@"
