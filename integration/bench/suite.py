#!/usr/bin/env python3
"""Overhead benchmark suite of the tracer agent; run it through run.sh, which installs and builds
what it needs and passes the paths here.

Every scenario alternates runs without and with the agent (the order flips each round, so drift in
the machine's background load falls on both sides), for ROUNDS rounds, and reports the median and
the min-max range. Ratios are taken within a round, then summarised. Only 127.0.0.1 is used; every
load is bounded in requests and in time.

Standard library only, so it runs with whichever python3 the machine has.
"""

import argparse
import datetime
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
READY_LINE = "tracer ready"
AGENT_READY_TIMEOUT = 120
AGENT_STOP_TIMEOUT = 60
# A machine whose CPUs are busier than this before a scenario starts gives noisy figures.
NOISY_BUSY = 0.10

KNOBS = ("ROUNDS", "DURATION", "RATES", "COST_RATE", "SOAK_SECONDS", "RSS_EVERY", "WRK_THREADS", "WRK_CONNS",
         "NGINX_WORKERS", "LOADGEN_CONNS", "GUNICORN_THREADS", "SYSCALL_MODES", "SYSCALL_ITERS",
         "SYSCALL_SECONDS", "AGENT_ARGS", "AGENT_ENV", "QUIET_WAIT")

TARGETS = {
    "syscall_ns": 250.0,
    "nginx_ratio": 0.90,
    "span_fraction": 0.99,
    "p99_increase": 0.05,
    "millicores": 100.0,
    "rss_mib": 100.0,
}


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def env_int(name, default):
    return int(os.environ.get(name, default))


def env_float(name, default):
    return float(os.environ.get(name, default))


# --------------------------------------------------------------------------------------------
# processes and /proc


def clean_env(extra=None):
    """The environment minus OTEL_*/TRACER_* (so nothing leaks into a run), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "TRACER_"))}
    env.update(extra or {})
    return env


class Proc:
    """A child in its own session; stop() signals its whole process group (only what we started)."""

    def __init__(self, name, args, env=None, cwd=None, stdout=subprocess.DEVNULL, stderr=None):
        self.name = name
        self.stderr_path = stderr
        err = open(stderr, "w") if stderr else subprocess.DEVNULL
        self.p = subprocess.Popen(
            args, env=env or clean_env(), cwd=cwd, stdin=subprocess.DEVNULL, stdout=stdout,
            stderr=err, start_new_session=True)
        if stderr:
            err.close()
        STARTED.append(self)

    @property
    def pid(self):
        return self.p.pid

    def running(self):
        return self.p.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.running():
            try:
                os.killpg(self.p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop within {timeout}s; killing it")
                try:
                    os.killpg(self.p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.p.wait(10)
        if self in STARTED:
            STARTED.remove(self)
        return self.p.returncode


STARTED = []


def stop_all():
    for p in list(reversed(STARTED)):
        p.stop(signal.SIGKILL, 10)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.running():
            raise RuntimeError(f"{proc.name} exited before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{proc.name} not listening on {port} after {timeout}s")


def cpu_seconds(pid):
    """utime + stime of a process (all its threads), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After the comm: state is field 3, utime 14 and stime 15 (1-based) -> indexes 11 and 12.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_kib(pid):
    """(VmRSS, VmHWM) in KiB."""
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return rss, hwm


def context_switches(pid):
    """Voluntary + involuntary context switches of all a process's threads (its wake-ups)."""
    n = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if "ctxt_switches:" in line:
                    n += int(line.split()[1])
        except OSError:
            pass
    return n


def cpu_snapshot():
    """(all CPUs' time, their idle time) from /proc/stat, in ticks."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    return sum(vals[:8]), vals[3] + vals[4]


def idle_between(a, b):
    """Fraction of the CPUs' time spent idle between two `cpu_snapshot`s."""
    return (b[1] - a[1]) / max(1, b[0] - a[0])


def machine_busy(seconds=2.0):
    """Fraction of all CPUs' time spent busy over `seconds` (before a scenario: background load)."""
    a = cpu_snapshot()
    time.sleep(seconds)
    return 1 - idle_between(a, cpu_snapshot())


def other_agents():
    """Pids of `tracer` processes this suite did not start (another agent skews every figure)."""
    ours = {p.pid for p in STARTED}
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) not in ours:
            try:
                if Path(f"/proc/{d}/comm").read_text().strip() == "tracer":
                    found.append(int(d))
            except OSError:
                pass
    return found


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


class Sampler(threading.Thread):
    """Samples a process's VmRSS every `every` seconds."""

    def __init__(self, pid, every=1.0):
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.samples = []  # (seconds since start, rss KiB)
        self.halt = threading.Event()

    def run(self):
        t0 = time.monotonic()
        while not self.halt.is_set():
            try:
                self.samples.append((time.monotonic() - t0, memory_kib(self.pid)[0]))
            except OSError:
                return
            self.halt.wait(self.every)

    def stop(self):
        self.halt.set()
        self.join()


# --------------------------------------------------------------------------------------------
# the agent and the receiver


METRIC_RE = re.compile(r'(tracer_\w+(?:\{[^}]*\})?)=(\d+)')
DROP_PREFIXES = (
    'tracer_kernel_events_total{what="ringbuf_full"}',
    'tracer_kernel_events_total{what="copy_fault"}',
    'tracer_kernel_events_total{what="inflight_full"}',
    'tracer_kernel_events_total{what="conn_map_full"}',
    "tracer_events_dropped_total",
    "tracer_spans_dropped_total",
    "tracer_exchanges_dropped_total",
    "tracer_parser_skipped_total",
)


class Agent:
    """`tracer run` exporting to the counting receiver, with its metrics endpoint on."""

    def __init__(self, ctx, tag, extra=(), env=None):
        self.ctx = ctx
        self.log_path = ctx.work / f"agent-{tag}.log"
        metrics_port = free_port()
        args = [str(ctx.tracer), "run", "--otlp-endpoint", ctx.receiver_url,
                "--otlp-protocol", "http/protobuf", "--metrics-addr", f"127.0.0.1:{metrics_port}"]
        args += ctx.agent_args + list(extra)
        self.proc = Proc("tracer", args, env=clean_env({**ctx.agent_env, **(env or {})}),
                         stderr=self.log_path)
        deadline = time.monotonic() + AGENT_READY_TIMEOUT
        while READY_LINE not in self.log_path.read_text(errors="replace"):
            if not self.proc.running():
                raise RuntimeError(f"tracer exited before ready:\n{self.log_path.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"tracer not ready after {AGENT_READY_TIMEOUT}s")
            time.sleep(0.05)
        self.sampler = None
        self.cpu0 = self.t0 = None
        self.result = {}

    def begin(self):
        """Marks the start of the measured load."""
        self.cpu0 = cpu_seconds(self.proc.pid)
        self.csw0 = context_switches(self.proc.pid)
        self.t0 = time.monotonic()
        self.sampler = Sampler(self.proc.pid, self.ctx.rss_every)
        self.sampler.start()

    def end(self):
        """Marks the end of the measured load: CPU, memory."""
        cpu = cpu_seconds(self.proc.pid) - self.cpu0
        switches = context_switches(self.proc.pid) - self.csw0
        seconds = time.monotonic() - self.t0
        self.sampler.stop()
        rss, hwm = memory_kib(self.proc.pid)
        self.result.update(cpu_s=cpu, load_s=seconds, millicores=1000 * cpu / seconds,
                           switches_per_s=switches / seconds,
                           rss_kib=rss, hwm_kib=hwm, rss_samples=self.sampler.samples)

    def stop(self):
        """SIGTERM (the agent drains and flushes), then the counters of its last log line."""
        rc = self.proc.stop(signal.SIGTERM, AGENT_STOP_TIMEOUT)
        text = self.log_path.read_text(errors="replace")
        last = [line for line in text.splitlines() if "agent metrics" in line]
        metrics = dict((k, int(v)) for k, v in METRIC_RE.findall(last[-1])) if last else {}
        drops = {k: v for k, v in metrics.items() if k.startswith(DROP_PREFIXES) and v > 0}
        self.result.update(exit_code=rc, metrics=metrics, drops=drops)
        return self.result


class Receiver:
    def __init__(self, ctx):
        self.proc = Proc("otlp-count", [str(ctx.otlp_count), "--listen", "127.0.0.1:0"],
                         stdout=subprocess.PIPE)
        line = self.proc.p.stdout.readline().decode()
        m = re.match(r"listening on (\S+)", line)
        if not m:
            raise RuntimeError(f"otlp-count did not start: {line!r}")
        self.url = f"http://{m.group(1)}"

    def counts(self):
        with urllib.request.urlopen(self.url + "/counts", timeout=10) as r:
            return json.load(r)

    @staticmethod
    def delta(before, after, service, kind="server"):
        b = before["services"].get(service, {}).get(kind, 0)
        return after["services"].get(service, {}).get(kind, 0) - b


# --------------------------------------------------------------------------------------------
# statistics and formatting


def med(values):
    return statistics.median(values) if values else float("nan")


def fmt(values, digits=0, unit=""):
    """`median (min–max)` of a list."""
    if not values:
        return "n/a"
    m, lo, hi = med(values), min(values), max(values)
    f = f"{{:,.{digits}f}}"
    if len(values) == 1:
        return f.format(m) + unit
    return f"{f.format(m)}{unit} ({f.format(lo)}–{f.format(hi)})"


def pct(values, digits=1):
    return fmt([100 * v for v in values], digits, " %")


def orders(names, rounds):
    """Run order per round: rotates so each configuration goes first as often as the others."""
    return [names[r % len(names):] + names[:r % len(names)] for r in range(rounds)]


def short(metric):
    return metric.replace("tracer_", "", 1)


def verdict(ok):
    return "met" if ok else "**not met**"


# --------------------------------------------------------------------------------------------
# scenarios


class Ctx:
    pass


def nginx_start(ctx, name="nginx", proxy_to=None, cpus=None):
    """nginx serving a 200-byte static file, or with `proxy_to` a reverse proxy to that port with
    a keep-alive upstream; with `cpus` (a taskset list), its processes run only there."""
    root = ctx.work / name
    (root / "www").mkdir(parents=True, exist_ok=True)
    (root / "tmp").mkdir(exist_ok=True)
    # A small static response: 200 bytes of text.
    (root / "www" / "index.html").write_text("x" * 199 + "\n")
    port = free_port()
    conf = root / "nginx.conf"
    if proxy_to is None:
        upstream, location = "", f"root {root}/www;"
    else:
        upstream = f"upstream backend {{ server 127.0.0.1:{proxy_to}; keepalive 32; }}"
        location = ("location / { proxy_pass http://backend; proxy_http_version 1.1; "
                    'proxy_set_header Connection ""; }')
    conf.write_text(f"""
worker_processes {ctx.nginx_workers};
daemon off;
user root;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 10000000;
  keepalive_timeout 300s;
  client_body_temp_path {root}/tmp;
  proxy_temp_path {root}/tmp;
  fastcgi_temp_path {root}/tmp;
  uwsgi_temp_path {root}/tmp;
  scgi_temp_path {root}/tmp;
  {upstream}
  server {{
    listen 127.0.0.1:{port};
    {location}
  }}
}}
""")
    pin = ["taskset", "-c", cpus] if cpus else []
    proc = Proc("nginx", pin + [ctx.nginx, "-p", str(root), "-c", str(conf), "-e", str(root / "error.log")])
    wait_port(port, proc)
    return proc, port


WRK_REQ = re.compile(r"(\d+) requests in ([\d.]+)(\w+)")
WRK_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
WRK_LAT = re.compile(r"^\s+(50|99)(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", re.M)


def wrk(ctx, url, seconds, cpus=None):
    """wrk against `url` for `seconds` (only on `cpus`, a taskset list, when given); with the share
    of the CPUs' time that was idle meanwhile."""
    pin = ["taskset", "-c", cpus] if cpus else []
    args = pin + [ctx.wrk, f"-t{ctx.wrk_threads}", f"-c{ctx.wrk_conns}", f"-d{seconds}s", "--latency", url]
    before = cpu_snapshot()
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    idle = idle_between(before, cpu_snapshot())
    req, rps = WRK_REQ.search(out), WRK_RPS.search(out)
    if not req or not rps:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    lat = {p: float(v) * {"us": 1, "ms": 1e3, "s": 1e6}[u] for p, v, u in WRK_LAT.findall(out)}
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    return {"requests": int(req.group(1)), "rps": float(rps.group(1)), "errors": errors,
            "p50_us": lat.get("50"), "p99_us": lat.get("99"), "idle": idle}


def quiet_gate(ctx):
    """With QUIET_WAIT > 0, waits (at most that many seconds) until no other agent runs and the CPUs
    are mostly idle, so each run starts on a machine as quiet as it gets. Returns the busy fraction."""
    deadline = time.monotonic() + ctx.quiet_wait
    while True:
        busy = machine_busy(1.0)
        if ctx.quiet_wait <= 0 or (busy < NOISY_BUSY and not other_agents()) or time.monotonic() > deadline:
            return busy
        time.sleep(2)


def with_agent(ctx, tag, on, load, extra=(), env=None):
    """Runs `load()` with or without a fresh agent; returns (load result, agent result or None).
    Other agents seen at the start or end of the run are recorded in the result's `others`."""
    busy = quiet_gate(ctx)
    others = set(other_agents())
    before = ctx.receiver.counts()
    agent = Agent(ctx, tag, extra, env) if on else None
    try:
        if agent:
            agent.begin()
        res = load()
        if agent:
            agent.end()
    finally:
        a = agent.stop() if agent else None
    after = ctx.receiver.counts()
    if a is not None:
        a["counts_before"], a["counts_after"] = before, after
    others |= set(other_agents())
    res["others"], res["busy_before"] = sorted(others), busy
    if others:
        CONTAMINATED[tag.split("-")[0]] = CONTAMINATED.get(tag.split("-")[0], 0) + 1
    return res, a


# Runs during which another agent was seen, by scenario.
CONTAMINATED = {}


# Per-syscall modes run as another mode of the loop with the agent's environment changed:
# `http-option` puts the loop's trace ids in the TCP option, as connections between hosts carry
# them (on loopback they are handed over in the kernel's memory).
SYSCALL_VARIANTS = {"http-option": ("http", {"TRACER_TCP_OPTION_LOCAL": "1"})}


def scenario_syscall(ctx):
    rows = {}
    for mode in ctx.syscall_modes:
        loop_mode, agent_env = SYSCALL_VARIANTS.get(mode, (mode, None))
        runs = {"off": [], "on": []}
        for r, order in enumerate(orders(["off", "on"], ctx.rounds)):
            for cfg in order:
                def load():
                    out = subprocess.run(
                        [str(ctx.syscall_loop), loop_mode, str(ctx.syscall_iters), str(ctx.syscall_seconds)],
                        capture_output=True, text=True, timeout=ctx.syscall_seconds + 60, check=True).stdout
                    return {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", out)}
                # The steady state: an agent stops recovering calls blocked at its start after
                # a minute (--recover-blocked-secs), which costs every exit without an entry
                # one more map lookup while it lasts; each run here is seconds long.
                res, a = with_agent(ctx, f"syscall-{mode}-{r}", cfg == "on", load,
                                    extra=("--recover-blocked-secs", "0"), env=agent_env)
                res["agent"] = a
                runs[cfg].append(res)
                log(f"syscall {mode} round {r} {cfg}: {res['ns_per_syscall']:.0f} ns/syscall")
        added = [on["ns_per_syscall"] - off["ns_per_syscall"] for off, on in zip(runs["off"], runs["on"])]
        rows[mode] = {"runs": runs, "added": added}
    return rows


def scenario_nginx(ctx, pinned=False):
    """Saturated nginx; `pinned`: nginx on CPU 0 and wrk on CPU 1 (the agent anywhere), which
    takes the scheduler's placement of the two out of the comparison."""
    tag = "pinned" if pinned else "nginx"
    if pinned and (os.cpu_count() or 1) < 2:
        raise RuntimeError("pinning nginx and wrk apart needs 2 CPUs")
    nginx_cpus, wrk_cpus = ("0", "1") if pinned else (None, None)
    nginx, port = nginx_start(ctx, cpus=nginx_cpus)
    url = f"http://127.0.0.1:{port}/index.html"
    try:
        wrk(ctx, url, 2, wrk_cpus)  # warm-up, not measured
        runs = {"off": [], "on": []}
        for r, order in enumerate(orders(["off", "on"], ctx.rounds)):
            for cfg in order:
                res, a = with_agent(ctx, f"{tag}-{r}", cfg == "on",
                                    lambda: wrk(ctx, url, ctx.duration, wrk_cpus))
                res["agent"] = a
                if a:
                    res["server_spans"] = Receiver.delta(a["counts_before"], a["counts_after"], "nginx")
                runs[cfg].append(res)
                log(f"{tag} round {r} {cfg}: {res['rps']:.0f} req/s, {100 * res['idle']:.1f} % idle"
                    + (f", {res['server_spans']} server spans of {res['requests']}" if a else ""))
    finally:
        nginx.stop(signal.SIGQUIT)
    ratio = [on["rps"] / off["rps"] for off, on in zip(runs["off"], runs["on"])]
    spans = [min(1.0, x["server_spans"] / x["requests"]) for x in runs["on"]]
    return {"runs": runs, "ratio": ratio, "span_fraction": spans}


def scenario_chain(ctx):
    """wrk → nginx reverse proxy → nginx static server: without the agent, with it, and with it
    but linking turned off. Each request makes 3 spans (2 SERVER, 1 CLIENT) and 2 links."""
    back, back_port = nginx_start(ctx)
    front, port = nginx_start(ctx, "nginx-proxy", proxy_to=back_port)
    url = f"http://127.0.0.1:{port}/index.html"
    configs = {"off": None, "linking": [], "no-linking": ["--no-linking"]}
    try:
        wrk(ctx, url, 2)  # warm-up, not measured
        runs = {k: [] for k in configs}
        for r, order in enumerate(orders(list(configs), ctx.rounds)):
            for cfg in order:
                res, a = with_agent(ctx, f"chain-{cfg}-{r}", configs[cfg] is not None,
                                    lambda: wrk(ctx, url, ctx.duration), configs[cfg] or ())
                res["agent"] = a
                if a:
                    res["server_spans"] = Receiver.delta(a["counts_before"], a["counts_after"], "nginx")
                    res["links"] = sum(v for k, v in a["metrics"].items()
                                       if k.startswith("tracer_spans_linked_total"))
                runs[cfg].append(res)
                log(f"chain round {r} {cfg}: {res['rps']:.0f} req/s"
                    + (f", {res['server_spans']} server spans, {res['links']} links, "
                       f"agent {a['millicores']:.0f} mcores" if a else ""))
    finally:
        front.stop(signal.SIGQUIT)
        back.stop(signal.SIGQUIT)
    ratio = {cfg: [on["rps"] / off["rps"] for off, on in zip(runs["off"], runs[cfg])]
             for cfg in ("linking", "no-linking")}
    return {"runs": runs, "ratio": ratio}


def loadgen(ctx, port, rate, seconds, warmup=None, cpus=None):
    """The open-loop load generator (only on `cpus`, a taskset list, when given)."""
    warmup = ctx.warmup if warmup is None else warmup
    pin = ["taskset", "-c", cpus] if cpus else []
    args = pin + [str(ctx.loadgen), "-p", str(port), "-r", str(rate), "-d", str(seconds), "-c",
                  str(ctx.loadgen_conns), "-w", str(warmup), "-u", "/index.html"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 90, check=True).stdout
    return json.loads(out)


def scenario_latency(ctx, pinned=False):
    """Fixed-rate latency at each rate; `pinned`: at `COST_RATE` only, nginx and the load
    generator on CPU 0 and the span receiver on CPU 1 (the agent anywhere), which takes the
    scheduler's placement of the two and the receiver's work (a stand-in for a collector, which
    production runs elsewhere) out of the comparison."""
    tag = "latency-pinned" if pinned else "latency"
    if pinned and (os.cpu_count() or 1) < 2:
        raise RuntimeError("pinning nginx and the receiver apart needs 2 CPUs")
    cpus = "0" if pinned else None
    nginx, port = nginx_start(ctx, cpus=cpus)
    receiver_cpus = os.sched_getaffinity(ctx.receiver.proc.pid)
    if pinned:
        os.sched_setaffinity(ctx.receiver.proc.pid, {1})
    rows = {}
    try:
        loadgen(ctx, port, 1000, 2, warmup=0, cpus=cpus)  # warm-up, not measured
        for rate in [ctx.cost_rate] if pinned else ctx.rates:
            runs = {"off": [], "on": []}
            for r, order in enumerate(orders(["off", "on"], ctx.rounds)):
                for cfg in order:
                    res, a = with_agent(ctx, f"{tag}-{rate}-{r}", cfg == "on",
                                        lambda: loadgen(ctx, port, rate, ctx.duration, cpus=cpus))
                    res["agent"] = a
                    if a:
                        res["server_spans"] = Receiver.delta(a["counts_before"], a["counts_after"], "nginx")
                    runs[cfg].append(res)
                    log(f"{tag} {rate}/s round {r} {cfg}: p50 {res['p50_us']:.0f} us p99 "
                        f"{res['p99_us']:.0f} us, {res['achieved_rps']:.0f} req/s, errors {res['errors']}"
                        + (f", agent {a['millicores']:.0f} mcores" if a else ""))
            inc = [on["p99_us"] / off["p99_us"] - 1 for off, on in zip(runs["off"], runs["on"])]
            inc50 = [on["p50_us"] / off["p50_us"] - 1 for off, on in zip(runs["off"], runs["on"])]
            rows[rate] = {"runs": runs, "p99_increase": inc, "p50_increase": inc50}
    finally:
        nginx.stop(signal.SIGQUIT)
        os.sched_setaffinity(ctx.receiver.proc.pid, receiver_cpus)
    return rows


def rss_growth_kib(samples):
    """RSS at the end minus RSS a quarter into the run (after start-up allocations settle)."""
    if len(samples) < 4:
        return 0
    total = samples[-1][0]
    early = [rss for t, rss in samples if t >= total / 4]
    return samples[-1][1] - early[0]


def scenario_soak(ctx):
    nginx, port = nginx_start(ctx)
    try:
        res, a = with_agent(ctx, "soak", True, lambda: loadgen(ctx, port, ctx.cost_rate, ctx.soak_seconds))
    finally:
        nginx.stop(signal.SIGQUIT)
    res["agent"] = a
    log(f"soak {ctx.soak_seconds}s at {ctx.cost_rate}/s: {a['millicores']:.0f} mcores, HWM {a['hwm_kib']} KiB,"
        f" growth {rss_growth_kib(a['rss_samples'])} KiB")
    return res


APP_PY = '''\
"""The benchmark's WSGI app: one route answering a short text, as small as nginx's static file."""
from flask import Flask

app = Flask(__name__)


@app.route("/")
def index():
    return "x" * 199 + "\\n"
'''


def scenario_python(ctx):
    appdir = ctx.work / "wsgi"
    appdir.mkdir(exist_ok=True)
    (appdir / "app.py").write_text(APP_PY)
    venv = ctx.venv / "bin"
    service = "bench-wsgi"
    runs = {"bare": [], "sdk": [], "agent": []}
    for r, order in enumerate(orders(["bare", "sdk", "agent"], ctx.rounds)):
        for cfg in order:
            port = free_port()
            gunicorn = [str(venv / "gunicorn"), "--workers", "1", "--worker-class", "gthread", "--threads",
                        str(ctx.gunicorn_threads), "--bind", f"127.0.0.1:{port}", "--log-level", "warning",
                        "app:app"]
            env = {"OTEL_SERVICE_NAME": service}
            if cfg == "sdk":
                gunicorn = [str(venv / "opentelemetry-instrument")] + gunicorn
                env.update({
                    "OTEL_TRACES_EXPORTER": "otlp",
                    "OTEL_METRICS_EXPORTER": "none",
                    "OTEL_LOGS_EXPORTER": "none",
                    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ctx.receiver_url + "/v1/traces",
                })
            before = ctx.receiver.counts()
            server = Proc(f"gunicorn-{cfg}", gunicorn, env=clean_env(env), cwd=appdir,
                          stderr=ctx.work / f"gunicorn-{cfg}-{r}.log")
            try:
                wait_port(port, server, 60)
                url = f"http://127.0.0.1:{port}/"
                res, a = with_agent(ctx, f"python-{r}", cfg == "agent", lambda: wrk(ctx, url, ctx.duration))
            finally:
                # SIGTERM: gunicorn stops gracefully and the SDK flushes its batch at exit.
                server.stop(signal.SIGTERM, 60)
            after = ctx.receiver.counts()
            res["agent"] = a
            res["server_spans"] = Receiver.delta(before, after, service)
            runs[cfg].append(res)
            log(f"python round {r} {cfg}: {res['rps']:.0f} req/s, {res['server_spans']} server spans "
                f"of {res['requests']}")
    ratio = {cfg: [x["rps"] / b["rps"] for x, b in zip(runs[cfg], runs["bare"])] for cfg in ("sdk", "agent")}
    spans = {cfg: [min(1.0, x["server_spans"] / x["requests"]) for x in runs[cfg]] for cfg in ("sdk", "agent")}
    return {"runs": runs, "ratio": ratio, "span_fraction": spans}


THRPT = re.compile(r"thrpt:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]")
UNIT = {"B/s": 1 / 1e6, "KiB/s": 1024 / 1e6, "MiB/s": 1024 ** 2 / 1e6, "GiB/s": 1024 ** 3 / 1e6}


def scenario_parsers(ctx):
    out = subprocess.run(["cargo", "bench", "--locked", "-p", "protocols"], cwd=ctx.repo,
                         capture_output=True, text=True, timeout=3600)
    (ctx.work / "parsers.log").write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        raise RuntimeError(f"cargo bench failed; see {ctx.work / 'parsers.log'}")
    rows, prev = {}, ""
    name = None
    for line in out.stdout.splitlines():
        if "time:" in line:
            name = line.split("time:")[0].strip() or prev.strip()
        m = THRPT.search(line)
        if m and name:
            rows[name] = float(m.group(1)) * UNIT.get(m.group(2), float("nan"))
        if line.strip():
            prev = line
    return rows


def bpf_prog_stats(pid):
    """{prog_id: (run_time_ns, run_cnt)} of the BPF programs a process holds open."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-prog":
                continue
            info = dict(line.split(":", 1) for line in open(f"/proc/{pid}/fdinfo/{fd}") if ":" in line)
        except OSError:
            continue
        if "prog_id" in info and "run_cnt" in info:
            out[int(info["prog_id"])] = (int(info["run_time_ns"]), int(info["run_cnt"]))
    return out


def perf_report(data, *extra):
    """(percent, name) rows of `perf report --stdio` (self cost unless `--children` is passed)."""
    mode = [] if "--children" in extra else ["--no-children"]
    out = subprocess.run(["perf", "report", "-i", str(data), "--stdio", *mode, "-g", "none",
                          "--percent-limit", "0.3", *extra], capture_output=True, text=True, timeout=600).stdout
    rows = []
    for line in out.splitlines():
        # `children% [self%] [dso] [k|.] symbol`: keep the first figure and the name.
        m = re.match(r"\s*([\d.]+)%\s+(?:[\d.]+%\s+)?(.*\S)", line)
        if m and not line.lstrip().startswith("#"):
            rows.append((float(m.group(1)), re.sub(r"^\[[k.]\]\s+", "", m.group(2))))
    return rows


# Frames that say where the agent's own work is, not the runtime around it.
AGENT_FRAMES = re.compile(r"tracer::|protocols::|prost::|opentelemetry_proto|hyper::|httparse|aya::|dashmap|malloc|free|memmove")


def scenario_profile(ctx):
    """Saturated nginx with the agent, kernel BPF run-time statistics on and a system-wide perf
    profile (cpu-clock): where the agent's cost goes. Not a target; evidence for optimisation."""
    stats_path = Path("/proc/sys/kernel/bpf_stats_enabled")
    previous = stats_path.read_text().strip()
    nginx, port = nginx_start(ctx)
    url = f"http://127.0.0.1:{port}/index.html"
    data = ctx.work / "perf.data"
    agent_data = ctx.work / "perf-agent.data"
    res = {}
    try:
        wrk(ctx, url, 2)
        agent = Agent(ctx, "profile")
        try:
            stats_path.write_text("1")
            s0 = bpf_prog_stats(agent.proc.pid)
            agent.begin()
            # System-wide without stacks (who uses the CPUs), and the agent alone with DWARF stacks
            # (release builds have no frame pointers) for inclusive costs.
            perfs = [
                Proc("perf", ["perf", "record", "-q", "-e", "cpu-clock", "-F", "999", "-a", "-o", str(data),
                              "--", "sleep", str(ctx.duration)]),
                Proc("perf", ["perf", "record", "-q", "-e", "cpu-clock", "-F", "199", "--call-graph",
                              "dwarf,16384", "-p", str(agent.proc.pid), "-o", str(agent_data), "--", "sleep",
                              str(ctx.duration)]),
            ]
            w = wrk(ctx, url, ctx.duration)
            for perf in perfs:
                perf.p.wait(ctx.duration + 120)
                perf.stop()
            agent.end()
            s1 = bpf_prog_stats(agent.proc.pid)
            names = {}
            for pid in s1:
                out = subprocess.run(["bpftool", "prog", "show", "id", str(pid), "--json"], capture_output=True,
                                     text=True)
                try:
                    names[pid] = json.loads(out.stdout).get("name", str(pid))
                except ValueError:
                    names[pid] = str(pid)
        finally:
            stats_path.write_text(previous)
            a = agent.stop()
    finally:
        nginx.stop(signal.SIGQUIT)
    seconds = a["load_s"]
    progs = []
    for pid, (ns1, n1) in s1.items():
        ns0, n0 = s0.get(pid, (0, 0))
        if n1 > n0:
            progs.append({"name": names[pid], "runs_per_s": (n1 - n0) / seconds,
                          "ns_per_run": (ns1 - ns0) / (n1 - n0), "millicores": (ns1 - ns0) / seconds / 1e6})
    progs.sort(key=lambda p: -p["millicores"])
    res["wrk"], res["agent"], res["bpf"] = w, a, progs
    res["by_comm"] = perf_report(data, "--sort", "comm")[:12]
    res["agent_symbols"] = perf_report(data, "--comm", "tracer", "--sort", "dso,sym")[:20]
    res["agent_inclusive"] = [r for r in perf_report(agent_data, "--children", "--sort", "sym")
                              if AGENT_FRAMES.search(r[1]) and "(inlined)" not in r[1]][:30]
    log(f"profile: {w['rps']:.0f} req/s, agent {a['millicores']:.0f} mcores, BPF programs "
        f"{sum(p['millicores'] for p in progs):.0f} mcores")
    return res


# --------------------------------------------------------------------------------------------
# report


LATENCY_HEAD = ["| rate | p50 without | p50 with | p99 without | p99 with | p99 increase | p99.9 without | "
                "p99.9 with | errors |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]


def latency_line(rate, row):
    """A fixed-rate latency table's row: percentiles without and with the agent, errors."""
    off, on = row["runs"]["off"], row["runs"]["on"]
    errs = sum(x["errors"] + x["timeouts"] + x["unsent"] for x in off + on)
    return (f"| {rate:,}/s | {fmt([x['p50_us'] for x in off], 0, ' µs')} | "
            f"{fmt([x['p50_us'] for x in on], 0, ' µs')} | {fmt([x['p99_us'] for x in off], 0, ' µs')} | "
            f"{fmt([x['p99_us'] for x in on], 0, ' µs')} | {pct(row['p99_increase'])} | "
            f"{fmt([x['p999_us'] for x in off], 0, ' µs')} | {fmt([x['p999_us'] for x in on], 0, ' µs')} | {errs} |")


def report(ctx, res, meta):
    L = []
    L.append(f"Run {meta['date']} · commit `{meta['commit']}` · {meta['machine']}")
    L.append("")
    L.append(f"Command: `{meta['command']}` · ROUNDS={ctx.rounds} · DURATION={ctx.duration}s · "
             f"agent flags: `{' '.join(ctx.agent_args) or '(defaults: every process on the host)'}`"
             + (f" · agent environment: `{' '.join(f'{k}={v}' for k, v in ctx.agent_env.items())}`"
                if ctx.agent_env else ""))
    L.append("")
    L.append("Background load before each scenario (CPU busy while the suite was idle; load average): "
             + "; ".join(f"{k} {100 * v[0]:.0f} % ({v[1]})" for k, v in meta["background"].items())
             + (" — **noisy: other work was running**" if meta["noisy"] else ""))
    if CONTAMINATED:
        L.append("")
        L.append("**Another tracer agent was running during some runs** ("
                 + ", ".join(f"{k}: {v} runs" for k, v in CONTAMINATED.items())
                 + "): it traces this suite's processes too, so those figures overstate the cost.")
    L.append("")
    L.append("Figures are median (min–max) over the rounds; ratios and differences are taken within a "
             "round, then summarised.")
    L.append("")
    targets = []

    if "syscall" in res:
        L += ["### 1. Per-syscall cost (tight write/read loop, 4 syscalls per iteration)", "",
              "| payload | without agent, ns/syscall | with agent, ns/syscall | added ns/syscall | agent CPU | agent drops (sum over runs) |",
              "| --- | --- | --- | --- | --- | --- |"]
        for mode, row in res["syscall"].items():
            off = [x["ns_per_syscall"] for x in row["runs"]["off"]]
            on = [x["ns_per_syscall"] for x in row["runs"]["on"]]
            mc = [x["agent"]["millicores"] for x in row["runs"]["on"]]
            drops = {}
            for x in row["runs"]["on"]:
                for k, v in x["agent"]["drops"].items():
                    drops[k] = drops.get(k, 0) + v
            label = {"http": "TCP, HTTP/1.1 request+response (copied, parsed, 2 spans per iteration)",
                     "http-option": "the same, trace ids in the TCP option as between hosts "
                                    "(`TRACER_TCP_OPTION_LOCAL=1`; on loopback they go in memory)",
                     "opaque": "TCP, unknown protocol (payload copying stops after detection)",
                     "pipe": "pipe (not a socket: fd-type check only)",
                     "untraced": "getppid, a syscall the agent does not trace (dispatch only)"}.get(mode, mode)
            dropped = ", ".join(f"{short(k)}={v}" for k, v in drops.items()) or "none"
            L.append(f"| {label} | {fmt(off)} | {fmt(on)} | {fmt(row['added'])} | {fmt(mc)} mcores | {dropped} |")
        if "http" in res["syscall"]:
            added = med(res["syscall"]["http"]["added"])
            targets.append(("added ns per hooked syscall (HTTP payload)", f"≤ {TARGETS['syscall_ns']:.0f} ns",
                            f"{added:.0f} ns", added <= TARGETS["syscall_ns"]))
        L.append("")

    if "nginx" in res:
        n = res["nginx"]
        off, on = n["runs"]["off"], n["runs"]["on"]
        L += [f"### 2. Saturated nginx (wrk -t{ctx.wrk_threads} -c{ctx.wrk_conns}, keep-alive, 200-byte static file, "
              f"nginx {ctx.nginx_workers} worker)", "",
              "| | without agent | with agent |", "| --- | --- | --- |",
              f"| req/s | {fmt([x['rps'] for x in off])} | {fmt([x['rps'] for x in on])} |",
              f"| wrk p50 latency | {fmt([x['p50_us'] for x in off if x['p50_us']], 0, ' µs')} | "
              f"{fmt([x['p50_us'] for x in on if x['p50_us']], 0, ' µs')} |",
              f"| wrk p99 latency | {fmt([x['p99_us'] for x in off if x['p99_us']], 0, ' µs')} | "
              f"{fmt([x['p99_us'] for x in on if x['p99_us']], 0, ' µs')} |",
              f"| CPUs idle during the run | {pct([x['idle'] for x in off])} | {pct([x['idle'] for x in on])} |",
              f"| throughput ratio with ÷ without | | {fmt(n['ratio'], 3)} |",
              f"| nginx SERVER spans received ÷ requests wrk completed | | {pct(n['span_fraction'], 2)} |",
              f"| agent CPU | | {fmt([x['agent']['millicores'] for x in on])} mcores |",
              f"| agent peak RSS (VmHWM) | | {fmt([x['agent']['hwm_kib'] / 1024 for x in on], 1, ' MiB')} |"]
        drops = {}
        for x in on:
            for k, v in x["agent"]["drops"].items():
                drops.setdefault(k, []).append(v)
        dropped = "; ".join(f"{short(k)}: {' / '.join(str(n) for n in v)}" for k, v in drops.items()) or "all zero"
        L.append(f"| agent drop counters (per run) | | {dropped} |")
        L.append("")
        r = med(n["ratio"])
        targets.append(("nginx req/s with ÷ without", f"≥ {TARGETS['nginx_ratio']:.2f}", f"{r:.3f}",
                        r >= TARGETS["nginx_ratio"]))
        s = min(n["span_fraction"])
        targets.append(("requests exported as server spans (worst round)", "≥ 99 %", f"{100 * s:.2f} %",
                        s >= TARGETS["span_fraction"]))

    if "pinned" in res:
        n = res["pinned"]
        off, on = n["runs"]["off"], n["runs"]["on"]
        L += ["### 2c. Saturated nginx, nginx pinned to CPU 0 and wrk to CPU 1 (diagnostic: the agent runs anywhere)",
              "",
              "| | without agent | with agent |", "| --- | --- | --- |",
              f"| req/s | {fmt([x['rps'] for x in off])} | {fmt([x['rps'] for x in on])} |",
              f"| CPUs idle during the run | {pct([x['idle'] for x in off])} | {pct([x['idle'] for x in on])} |",
              f"| throughput ratio with ÷ without | | {fmt(n['ratio'], 3)} |",
              f"| nginx SERVER spans received ÷ requests wrk completed | | {pct(n['span_fraction'], 2)} |",
              f"| agent CPU | | {fmt([x['agent']['millicores'] for x in on])} mcores |", ""]

    if "chain" in res:
        c = res["chain"]
        runs = c["runs"]
        L += [f"### 2b. Proxy chain, linking on and off (wrk -t{ctx.wrk_threads} -c{ctx.wrk_conns} → nginx "
              "reverse proxy, keep-alive upstream → nginx static file; each request makes 3 spans and 2 links)", "",
              "| | req/s | ÷ without agent | links made per request | SERVER spans ÷ (2 × requests) | agent CPU |",
              "| --- | --- | --- | --- | --- | --- |",
              f"| without agent | {fmt([x['rps'] for x in runs['off']])} | 1 | — | — | — |"]
        for cfg in ("linking", "no-linking"):
            xs = runs[cfg]
            links = [x["links"] / max(1, x["requests"]) for x in xs]
            spans = [min(1.0, x["server_spans"] / max(1, 2 * x["requests"])) for x in xs]
            L.append(f"| agent, {cfg} | {fmt([x['rps'] for x in xs])} | {fmt(c['ratio'][cfg], 3)} | "
                     f"{fmt(links, 2)} | {pct(spans, 2)} | {fmt([x['agent']['millicores'] for x in xs])} mcores |")
        L.append("")

    if "latency" in res:
        L += [f"### 3. Fixed-rate latency (open loop, {ctx.loadgen_conns} keep-alive connections, latency from "
              "the scheduled send time)", "", *LATENCY_HEAD]
        for rate, row in res["latency"].items():
            L.append(latency_line(rate, row))
            inc = med(row["p99_increase"])
            targets.append((f"p99 increase at {rate:,} req/s", "≤ 5 %", f"{100 * inc:.1f} %",
                            inc <= TARGETS["p99_increase"]))
        L.append("")

    if "latency-pinned" in res:
        L += ["### 3c. Fixed-rate latency, nginx and the load generator pinned to CPU 0 and the span "
              "receiver to CPU 1 (diagnostic: the agent runs anywhere)", "", *LATENCY_HEAD]
        for rate, row in res["latency-pinned"].items():
            L.append(latency_line(rate, row))
        L.append("")

    if "latency" in res:
        L += ["### 4. Agent cost under fixed-rate load (agent process only: CPU from /proc/<pid>/stat, "
              "memory from /proc/<pid>/status)", "",
              "| rate | agent CPU | CPU s per 100k requests | agent context switches/s | spans per request | peak RSS (VmHWM) | RSS growth, ¼ run → end |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
        for rate, row in res["latency"].items():
            on = row["runs"]["on"]
            mc = [x["agent"]["millicores"] for x in on]
            per100k = [x["agent"]["cpu_s"] / (x["completed"] / 1e5) for x in on if x["completed"]]
            spans = [x["agent"]["metrics"].get("tracer_spans_exported_total", 0) / max(1, x["completed"]) for x in on]
            hwm = [x["agent"]["hwm_kib"] / 1024 for x in on]
            growth = [rss_growth_kib(x["agent"]["rss_samples"]) / 1024 for x in on]
            csw = [x["agent"]["switches_per_s"] for x in on]
            L.append(f"| {rate:,}/s | {fmt(mc)} mcores | {fmt(per100k, 2)} | {fmt(csw)} | {fmt(spans, 2)} | "
                     f"{fmt(hwm, 1, ' MiB')} | {fmt(growth, 1, ' MiB')} |")
            if rate == ctx.cost_rate:
                targets.append((f"agent CPU at {rate:,} req/s", "≤ 100 millicores", f"{med(mc):.0f} mcores",
                                med(mc) <= TARGETS["millicores"]))
                targets.append(("agent peak RSS", "≤ 100 MiB", f"{max(hwm):.1f} MiB", max(hwm) <= TARGETS["rss_mib"]))
        if "soak" not in res:
            growth = [rss_growth_kib(x["agent"]["rss_samples"]) / 1024
                      for x in res["latency"].get(ctx.cost_rate, {"runs": {"on": []}})["runs"]["on"]]
            if growth:
                targets.append((f"RSS flat over {ctx.duration}s runs (10-minute soak: --soak)", "growth < 5 MiB",
                                f"{max(growth):.1f} MiB", max(growth) < 5))
        L.append("")

    if "soak" in res:
        a = res["soak"]["agent"]
        samples = a["rss_samples"]
        g = rss_growth_kib(samples) / 1024
        L += [f"### 4b. Soak: {ctx.soak_seconds} s at {ctx.cost_rate:,} req/s with the agent", "",
              "| agent CPU | CPU s per 100k requests | context switches/s | RSS at ¼ run | RSS at end | peak RSS (VmHWM) | growth |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
        early = next((rss for t, rss in samples if t >= samples[-1][0] / 4), 0) if samples else 0
        L.append(f"| {a['millicores']:.0f} mcores | {a['cpu_s'] / max(1, res['soak']['completed']) * 1e5:.2f} | "
                 f"{a['switches_per_s']:,.0f} | {early / 1024:.1f} MiB | {a['rss_kib'] / 1024:.1f} MiB | "
                 f"{a['hwm_kib'] / 1024:.1f} MiB | {g:.1f} MiB |")
        L.append("")
        targets.append((f"RSS flat over a {ctx.soak_seconds} s soak", "growth < 5 MiB", f"{g:.1f} MiB", g < 5))
        targets.append(("agent peak RSS in the soak", "≤ 100 MiB", f"{a['hwm_kib'] / 1024:.1f} MiB",
                        a["hwm_kib"] / 1024 <= TARGETS["rss_mib"]))

    if "python" in res:
        p = res["python"]
        runs = p["runs"]
        L += [f"### 5. Versus in-process instrumentation (Flask on gunicorn gthread, 1 worker × "
              f"{ctx.gunicorn_threads} threads; wrk -t{ctx.wrk_threads} -c{ctx.wrk_conns})", "",
              "| | req/s | ÷ bare app | server spans ÷ requests |", "| --- | --- | --- | --- |",
              f"| bare app | {fmt([x['rps'] for x in runs['bare']])} | 1 | — |",
              f"| OpenTelemetry Python SDK auto-instrumentation, OTLP/HTTP | {fmt([x['rps'] for x in runs['sdk']])} | "
              f"{fmt(p['ratio']['sdk'], 3)} | {pct(p['span_fraction']['sdk'], 2)} |",
              f"| bare app + this agent | {fmt([x['rps'] for x in runs['agent']])} | {fmt(p['ratio']['agent'], 3)} | "
              f"{pct(p['span_fraction']['agent'], 2)} |", ""]
        a, s = med(p["ratio"]["agent"]), med(p["ratio"]["sdk"])
        targets.append(("agent costs less than the in-process SDK", "agent ratio > SDK ratio",
                        f"{a:.3f} vs {s:.3f}", a > s))

    if "parsers" in res:
        L += ["### 6. Parsers (`cargo bench -p protocols`, criterion, one core)", "",
              "| benchmark | MB/s |", "| --- | --- |"]
        L += [f"| {k} | {v:,.0f} |" for k, v in res["parsers"].items()]
        L.append("")

    if "profile" in res:
        p = res["profile"]
        L += ["### Profile: saturated nginx with the agent (kernel BPF statistics + system-wide perf, cpu-clock)", "",
              f"{p['wrk']['rps']:,.0f} req/s (statistics on add a little to every program run); "
              f"agent process {p['agent']['millicores']:.0f} mcores; "
              f"BPF programs {sum(x['millicores'] for x in p['bpf']):.0f} mcores in all (run in the traced "
              "processes' syscalls, so they are not in the agent's CPU).", "",
              "| BPF program | runs/s | ns per run | mcores |", "| --- | --- | --- | --- |"]
        L += [f"| {x['name']} | {x['runs_per_s']:,.0f} | {x['ns_per_run']:,.0f} | {x['millicores']:.0f} |"
              for x in p["bpf"]]
        L += ["", "CPU by command (share of all samples, both CPUs):", "",
              "| % | command |", "| --- | --- |"]
        L += [f"| {pc:.1f} | {name} |" for pc, name in p["by_comm"]]
        L += ["", "Hottest symbols in the agent process (share of all samples):", "",
              "| % | dso, symbol |", "| --- | --- |"]
        L += [f"| {pc:.1f} | `{name}` |" for pc, name in p["agent_symbols"]]
        L += ["", "Inclusive cost in the agent process (share of the agent's samples, DWARF stacks):", "",
              "| % | symbol |", "| --- | --- |"]
        L += [f"| {pc:.1f} | `{name[:160]}` |" for pc, name in p["agent_inclusive"]]
        L.append("")

    L += ["### Targets", "", "| target | goal | measured | |", "| --- | --- | --- | --- |"]
    L += [f"| {t} | {g} | {m} | {verdict(ok)} |" for t, g, m, ok in targets]
    for name, err in meta["failed"].items():
        L.append(f"| scenario {name} | | failed: {err} | **not measured** |")
    L.append("")
    return "\n".join(L)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repo", required=True, type=Path)
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--tracer", required=True, type=Path)
    ap.add_argument("--otlp-count", required=True, type=Path)
    ap.add_argument("--syscall-loop", required=True, type=Path)
    ap.add_argument("--loadgen", required=True, type=Path)
    ap.add_argument("--venv", required=True, type=Path)
    ap.add_argument("--results", required=True, type=Path)
    ap.add_argument("--command", default="sudo integration/bench/run.sh")
    ap.add_argument("--only", default="syscall,nginx,pinned,chain,latency,latency-pinned,python,parsers")
    ap.add_argument("--soak", action="store_true")
    args = ap.parse_args()

    ctx = Ctx()
    # Absolute: some children run in other directories.
    ctx.repo, ctx.work = args.repo.resolve(), args.work.resolve()
    ctx.tracer, ctx.otlp_count = args.tracer.resolve(), args.otlp_count.resolve()
    ctx.syscall_loop, ctx.loadgen, ctx.venv = args.syscall_loop.resolve(), args.loadgen.resolve(), args.venv.resolve()
    ctx.rounds = env_int("ROUNDS", 3)
    ctx.duration = env_int("DURATION", 20)
    ctx.warmup = min(2, ctx.duration / 4)
    ctx.rates = [int(x) for x in os.environ.get("RATES", "5000,10000,20000").split(",")]
    ctx.cost_rate = env_int("COST_RATE", 10000)
    ctx.soak_seconds = env_int("SOAK_SECONDS", 600)
    ctx.rss_every = env_float("RSS_EVERY", 1.0)
    ctx.wrk_threads = env_int("WRK_THREADS", 1)
    ctx.wrk_conns = env_int("WRK_CONNS", 16)
    ctx.nginx_workers = env_int("NGINX_WORKERS", 1)
    ctx.loadgen_conns = env_int("LOADGEN_CONNS", 64)
    ctx.gunicorn_threads = env_int("GUNICORN_THREADS", 4)
    ctx.syscall_modes = os.environ.get("SYSCALL_MODES", "http,http-option,opaque,pipe,untraced").split(",")
    ctx.syscall_iters = env_int("SYSCALL_ITERS", 5_000_000)
    ctx.syscall_seconds = env_float("SYSCALL_SECONDS", 5)
    ctx.agent_args = os.environ.get("AGENT_ARGS", "").split()
    # NAME=VALUE pairs for the agent's environment (the rest of TRACER_* is kept from it).
    ctx.agent_env = dict(kv.split("=", 1) for kv in os.environ.get("AGENT_ENV", "").split() if "=" in kv)
    ctx.quiet_wait = env_float("QUIET_WAIT", 0)
    ctx.nginx = os.environ.get("NGINX", "/usr/sbin/nginx")
    ctx.wrk = os.environ.get("WRK", "wrk")
    if ctx.cost_rate not in ctx.rates:
        ctx.rates.append(ctx.cost_rate)
    ctx.work.mkdir(parents=True, exist_ok=True)

    only = [s for s in args.only.split(",") if s]
    # BPF run-time statistics add two clock reads to every program run: left on (by a profile
    # run that was interrupted, or by hand), they would inflate every figure with the agent.
    stats = Path("/proc/sys/kernel/bpf_stats_enabled")
    if stats.exists() and stats.read_text().strip() != "0":
        log("kernel.bpf_stats_enabled was on; turning it off for the measurements")
        stats.write_text("0")
    scenarios = {"syscall": scenario_syscall, "nginx": scenario_nginx,
                 "pinned": lambda c: scenario_nginx(c, pinned=True), "chain": scenario_chain,
                 "latency": scenario_latency,
                 "latency-pinned": lambda c: scenario_latency(c, pinned=True),
                 "python": scenario_python, "parsers": scenario_parsers}
    scenarios["profile"] = scenario_profile
    if args.soak:
        scenarios["soak"] = scenario_soak
        if "soak" not in only:
            only.append("soak")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.machine())
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ctx.repo, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ctx.repo,
                           capture_output=True, text=True).stdout.strip()
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit + (" + uncommitted changes" if dirty else ""),
        "machine": f"{os.cpu_count()} CPUs ({cpu}), {mem_gib:.0f} GiB, Linux {platform.release()}",
        "command": " ".join([f"{k}={os.environ[k]}" for k in KNOBS if k in os.environ] + [args.command]),
        "background": {},
        "noisy": False,
        "failed": {},
    }

    res = {}
    try:
        ctx.receiver = Receiver(ctx)
        ctx.receiver_url = ctx.receiver.url
        for name in only:
            if name not in scenarios:
                raise SystemExit(f"unknown scenario {name}; known: {', '.join(scenarios)}")
            busy = machine_busy()
            meta["background"][name] = (busy, loadavg())
            meta["noisy"] |= busy > NOISY_BUSY
            others = other_agents()
            if others:
                log(f"warning: other tracer agents are running ({others}); they trace this suite too")
            log(f"scenario {name} (background CPU busy {100 * busy:.0f} %, load {loadavg()})")
            try:
                res[name] = scenarios[name](ctx)
            except (RuntimeError, subprocess.SubprocessError, OSError) as e:
                log(f"scenario {name} failed: {e}")
                meta["failed"][name] = str(e).splitlines()[0] if str(e) else type(e).__name__
    finally:
        stop_all()

    table = report(ctx, res, meta)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(table)
    args.results.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": res}, indent=1, default=str))
    print(table)
    return 1 if meta["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
