#!/usr/bin/env bash
# Proves the agent image works on this host with podman:
#   1. `check` in a --privileged container reports a usable capture mode (syscall or socket tracepoints);
#   2. `check` with only the capabilities and mounts the DaemonSet grants does too;
#   3. `run` with those capabilities traces a curl to a local python http.server running as
#      another user (SERVER span named from that server's own OTEL_SERVICE_NAME, CLIENT span of
#      curl, on stdout), serves Prometheus metrics, and exits 0 on SIGTERM;
#   4. `run` exports the same traffic over OTLP/HTTP to a receiver on loopback, configured only
#      through the standard OTEL_* variables, with this host's name as host.name.
#
#   deploy/test-image.sh [IMAGE]      (default: tracer:<crate version>, built if missing)
#
# Needs root, podman and runc (deploy/build-image.sh installs them). Not part of CI: it needs the
# image built first, which takes a full release build. Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[test-image] %s\n' "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }

[ "$(id -u)" = 0 ] || fail "run as root: the agent loads eBPF programs"
command -v podman >/dev/null || fail "podman missing: run deploy/build-image.sh first"
command -v curl >/dev/null || fail "curl missing"

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
image=${1:-tracer:$version}
if ! podman image exists "$image"; then
  log "$image not found: building it"
  bash deploy/build-image.sh --image "$image" >/dev/null
fi
runtime=(--runtime "$(command -v runc || echo /usr/sbin/runc)")

# Exactly what deploy/kubernetes/daemonset.yaml grants when privileged is false. Podman's default
# seccomp profile allows bpf(2) and perf_event_open(2) only with CAP_SYS_ADMIN, hence unconfined.
caps=(--cap-drop ALL --security-opt seccomp=unconfined --security-opt no-new-privileges --read-only)
for cap in BPF PERFMON SYS_PTRACE DAC_READ_SEARCH SYS_RESOURCE; do caps+=(--cap-add "$cap"); done
mounts=(-v /sys/kernel/tracing:/sys/kernel/tracing:ro -v /sys/fs/bpf:/sys/fs/bpf:ro
  -v /sys/kernel/btf:/sys/kernel/btf:ro)
# --uts=host: the agent reports gethostname() as host.name, so it must see the host's UTS namespace
# (hostNetwork does the same in Kubernetes).
host_ns=(--pid=host --uts=host)

work=$(mktemp -d)
containers=()
pids=()
cleanup() {
  local c p
  for c in "${containers[@]}"; do podman rm -f "$c" >/dev/null 2>&1 || true; done
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_for SECONDS COMMAND...: retries COMMAND every 0.5 s until it succeeds or time runs out.
wait_for() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@"; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.5
  done
}

expect_capture_mode() {
  local name=$1 out
  shift
  out=$(podman run --rm "${runtime[@]}" --network=none "$@" "$image" check 2>&1) \
    || { printf '%s\n' "$out" >&2; fail "$name: check exited non-zero"; }
  printf '%s\n' "$out" | sed "s/^/[test-image]   /" >&2
  grep -Eq '^capture mode: (syscall|socket) tracepoints' <<<"$out" || fail "$name: no usable capture mode"
  grep -Eq '^privileges +yes' <<<"$out" || fail "$name: privileges not sufficient"
  log "ok: $name"
}

log "1. check, privileged"
expect_capture_mode "check --privileged" --privileged "${host_ns[@]}" -v /sys:/sys
log "2. check, capabilities only"
expect_capture_mode "check with capabilities" "${caps[@]}" "${host_ns[@]}" "${mounts[@]}"

# A traced server on loopback, run as nobody so that reading its /proc/<pid>/environ (mode 0400)
# needs the DAC_READ_SEARCH the DaemonSet grants; spans are filtered to its port so other host
# traffic stays out.
app_port=$(free_port)
service=deploy-test-svc-$$
chmod 755 "$work"
mkdir -m 755 "$work/www"
(cd "$work/www" && exec setpriv --reuid=65534 --regid=65534 --clear-groups \
  env OTEL_SERVICE_NAME="$service" python3 -m http.server "$app_port" --bind 127.0.0.1 \
  >"$work/http.log" 2>&1) &
pids+=($!)
wait_for 10 curl -sf -o /dev/null "http://127.0.0.1:$app_port/" || fail "python http.server did not start"

logs_contain() { podman logs "$1" 2>&1 | grep -q -- "$2"; }

# start_agent NAME ARGS...: starts `run` detached with the DaemonSet's privileges; waits until ready.
start_agent() {
  local name=$1
  shift
  containers+=("$name")
  podman run -d --name "$name" "${runtime[@]}" --network=host "${caps[@]}" "${host_ns[@]}" \
    "${mounts[@]}" -e NO_COLOR=1 -e OTEL_BSP_SCHEDULE_DELAY=200 -e TRACER_LOG=info "$@" >/dev/null
  wait_for 60 logs_contain "$name" "tracer ready" \
    || { podman logs "$name" >&2 || true; fail "$name: agent not ready within 60 s"; }
}

# stop_agent NAME: SIGTERM, then the exit code must be 0 and the shutdown logged.
stop_agent() {
  local name=$1 code
  podman stop -t 30 "$name" >/dev/null
  code=$(podman inspect --format '{{.State.ExitCode}}' "$name")
  [ "$code" = 0 ] || { podman logs "$name" >&2; fail "$name: exit code $code after SIGTERM"; }
  logs_contain "$name" "tracer stopped" || fail "$name: no orderly shutdown logged"
  log "ok: $name exited 0 on SIGTERM"
}

log "3. run, spans on stdout"
metrics_port=$(free_port)
stdout_agent=tracer-test-stdout-$$
start_agent "$stdout_agent" "$image" run --port "$app_port" --metrics-addr "127.0.0.1:$metrics_port"
path=/deploy-test-stdout-$$
for _ in 1 2 3; do curl -s -o /dev/null "http://127.0.0.1:$app_port$path"; done
span_logged() { podman logs "$stdout_agent" 2>/dev/null | grep -F "$path" | grep -q " $1 "; }
wait_for 20 span_logged "$service SERVER" \
  || { podman logs "$stdout_agent" >&2; fail "no SERVER span of $service for $path"; }
# curl may exit before the agent reads its /proc entry, so its service name is not checked.
wait_for 20 span_logged "CLIENT" \
  || { podman logs "$stdout_agent" >&2; fail "no CLIENT span for $path"; }
podman logs "$stdout_agent" 2>/dev/null | grep -F "$path" | head -n2 | sed 's/^/[test-image]   /' >&2
log "ok: SERVER span of $service and a CLIENT span for $path on stdout"
metrics=$(curl -sf "http://127.0.0.1:$metrics_port/metrics") || fail "metrics endpoint did not answer"
grep -q '^[a-z_]*_total' <<<"$metrics" || fail "metrics endpoint served no counters"
log "ok: metrics on 127.0.0.1:$metrics_port ($(grep -c '^[a-z]' <<<"$metrics") series)"
stop_agent "$stdout_agent"

log "4. run, OTLP/HTTP export"
otlp_port=$(free_port)
# Writes each request's path, content type and body to one file per request.
cat >"$work/receiver.py" <<'EOF'
import http.server, os, sys
out = sys.argv[2]
class Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        n = len(os.listdir(out))
        with open(os.path.join(out, "%04d" % n), "wb") as f:
            f.write(("%s %s\n" % (self.path, self.headers.get("content-type"))).encode() + body)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Receiver).serve_forever()
EOF
mkdir "$work/otlp"
python3 "$work/receiver.py" "$otlp_port" "$work/otlp" &
pids+=($!)
otlp_agent=tracer-test-otlp-$$
start_agent "$otlp_agent" \
  -e OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$otlp_port" \
  -e OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf \
  "$image" run --port "$app_port"
path=/deploy-test-otlp-$$
for _ in 1 2 3; do curl -s -o /dev/null "http://127.0.0.1:$app_port$path"; done
# Protobuf carries strings as raw bytes, so the path, service and host names show in the body.
host=$(hostname)
exported() {
  grep -rlaF "$path" "$work/otlp" 2>/dev/null | xargs -r grep -laF "$service" \
    | xargs -r grep -laF "$host" | grep -q .
}
wait_for 20 exported \
  || { podman logs "$otlp_agent" >&2; fail "no OTLP export naming $path, $service and host $host"; }
head -n1 "$(grep -rlaF "$path" "$work/otlp" | head -n1)" | grep -q '^/v1/traces application/x-protobuf' \
  || fail "export was not a protobuf POST to /v1/traces"
log "ok: OTLP/HTTP export to /v1/traces with $path, service.name $service, host.name $host"
stop_agent "$otlp_agent"

log "all image checks passed"
