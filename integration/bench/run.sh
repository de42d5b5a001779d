#!/usr/bin/env bash
# The overhead benchmark suite, in one command:
#
#   sudo integration/bench/run.sh [--soak] [--only syscall,nginx,pinned,chain,latency,latency-pinned,python,parsers]
#
# Installs what it needs (idempotent: wrk, nginx-light, gcc, the eBPF toolchain, a Python venv with
# Flask, gunicorn and the OpenTelemetry SDK), builds the agent and the helpers, runs every scenario
# alternating runs without and with the agent, and writes a markdown table to stdout and to
# integration/bench/results/latest.md (raw figures in latest.json; a partial run with --only
# writes results/only-<scenarios>.md instead).
#
# Knobs (environment): ROUNDS (3), DURATION seconds per run (20), RATES for the fixed-rate runs
# (5000,10000,20000), COST_RATE (10000), SOAK_SECONDS (600, with --soak), WRK_THREADS (1),
# WRK_CONNS (16), NGINX_WORKERS (1), LOADGEN_CONNS (64), GUNICORN_THREADS (4), SYSCALL_ITERS,
# SYSCALL_SECONDS (5), SYSCALL_MODES (http,opaque,pipe), AGENT_ARGS (extra `tracer run` flags),
# AGENT_ENV (NAME=VALUE pairs for the agent, e.g. TRACER_SOCKET_HOOKS=0; other TRACER_*/OTEL_*
# variables are not passed on),
# QUIET_WAIT (seconds each run may wait for a quiet machine: no other agent, CPUs < 10 % busy; 0).
# `--only profile` adds a kernel BPF run-time and perf profile of the agent under saturation.
# Everything runs on 127.0.0.1; every load is bounded in requests and time.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
bench=$repo/integration/bench

log() { printf '[bench] %s\n' "$*" >&2; }

if [ "$(id -u)" != 0 ]; then
  echo "integration/bench/run.sh: the agent loads eBPF programs; run it as root: sudo $0 $*" >&2
  exit 1
fi

suite_args=()
# A partial run (--only) does not replace the full suite's table.
results=latest
while [ $# -gt 0 ]; do
  case "$1" in
    --soak) suite_args+=(--soak) ;;
    --only) suite_args+=(--only "$2"); results="only-${2//,/-}"; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

target=${CARGO_TARGET_DIR:-$repo/target}
work=$target/bench
mkdir -p "$work"

# System packages.
need=()
for p in wrk nginx-light gcc curl bpftool linux-perf python3 python3-venv; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
# A python3 from elsewhere (pyenv) that already has venv needs no Debian python3.
if command -v python3 >/dev/null && python3 -c 'import venv, ensurepip' 2>/dev/null; then
  keep=()
  for p in "${need[@]}"; do case "$p" in python3|python3-venv) ;; *) keep+=("$p") ;; esac; done
  need=("${keep[@]}")
fi
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# The agent and the span-counting receiver.
bash scripts/setup-toolchain.sh
export PATH="$HOME/.cargo/bin:$PATH"
log "building the agent and otlp-count (release)"
CARGO_TARGET_DIR=$target cargo build --release --locked -p tracer -p integration \
  --bin tracer --bin otlp-count >&2

# Helpers in C: the syscall loop and the open-loop load generator.
for prog in syscall_loop loadgen; do
  if [ ! -x "$work/$prog" ] || [ "$bench/$prog.c" -nt "$work/$prog" ]; then
    log "compiling $prog"
    gcc -O2 -Wall -Wextra -o "$work/$prog" "$bench/$prog.c"
  fi
done

# The Python app's environment, for the comparison with in-process instrumentation.
venv=$work/venv
if [ ! -x "$venv/bin/python" ]; then
  log "creating $venv"
  python3 -m venv "$venv"
fi
if ! cmp -s "$bench/requirements.txt" "$venv/.bench-requirements"; then
  log "installing $bench/requirements.txt into the venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$bench/requirements.txt" >&2
  cp "$bench/requirements.txt" "$venv/.bench-requirements"
fi

log "load average before the suite: $(cut -d' ' -f1-3 /proc/loadavg)"
mkdir -p "$bench/results"
exec python3 "$bench/suite.py" \
  --repo "$repo" --work "$work" \
  --tracer "$target/release/tracer" --otlp-count "$target/release/otlp-count" \
  --syscall-loop "$work/syscall_loop" --loadgen "$work/loadgen" --venv "$venv" \
  --results "$bench/results/$results.md" \
  --command "sudo integration/bench/run.sh${suite_args[*]:+ ${suite_args[*]}}" \
  "${suite_args[@]}"
