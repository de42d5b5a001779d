//! `tracer run`: start-up checks, the event loop, and an orderly shutdown.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::io::AsyncWriteExt as _;
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{SignalKind, signal};
use tracer_ebpf::abi::KernelOffsets;
use tracing::{info, warn};

use crate::capture::events::Event;
use crate::capture::{COUNTER_NAMES, Capture, CaptureOptions, EventRing, btf};
use crate::check;
use crate::config::{Config, Overrides};
use crate::connections::{Connections, Filters};
use crate::export::Exporter;
use crate::linking::{Finished, Linker};
use crate::metrics;
use crate::process::ProcessTable;
use crate::span::Span;
use crate::spans::Clock;

const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";
/// How often idle connections are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// How often the ring buffer is drained without a wake-up from the kernel, which wakes the agent
/// only when much is waiting (`WAKEUP_BYTES`): one wake-up per batch instead of one per event.
/// Spans wait a linking window (1 s) anyway; 25 ms instead of 10 cut the agent's context
/// switches at 10k req/s from ~210 to ~175 per second (docs/performance.md).
const DRAIN_EVERY: Duration = Duration::from_millis(25);
/// How often the linking window releases the spans whose time has come: each release goes to the
/// exporter, which encodes it at once, so a longer tick makes longer bursts of work that keep a
/// CPU from the traced processes (at 100 ms, ~1 ms bursts at 10k req/s on this project's machine,
/// which showed in their p99 latency).
const LINK_TICK: Duration = Duration::from_millis(25);
/// How often new processes are looked at for SSL libraries to probe.
const TLS_SCAN_EVERY: Duration = Duration::from_secs(1);

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(overrides: Overrides) -> anyhow::Result<()> {
    let cfg = Config::load(&overrides)?;
    check::require_privileges().map_err(anyhow::Error::msg)?;
    check::ensure_mounts()?;
    // The parsed BTF (several MiB) is dropped once the offsets are read from it.
    let offsets = {
        let btf = btf::Btf::from_file(BTF_PATH).with_context(|| {
            format!("cannot read kernel BTF at {BTF_PATH}; the agent needs a kernel built with CONFIG_DEBUG_INFO_BTF=y")
        })?;
        btf::resolve_offsets(&btf)
            .context("this kernel's BTF lacks a struct member the agent reads")?
    };
    raise_memlock_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tracer")
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    // The loop runs as a task on the runtime's workers, not on this thread: a worker that wakes
    // for a timer or the ring buffer then runs it at once, where a loop on this thread had to be
    // woken by that worker in turn (two context switches per tick instead of one).
    runtime.block_on(async {
        tokio::spawn(serve(cfg, offsets))
            .await
            .context("the agent's main task ended abnormally")?
    })
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; later ones ignore it.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK; fine on kernels >= 5.11");
    }
}

async fn serve(cfg: Config, offsets: KernelOffsets) -> anyhow::Result<()> {
    let (exporter, export_task) =
        Exporter::start(cfg.export.clone()).context("cannot start the span exporter")?;
    let opts = CaptureOptions {
        capture_bytes: cfg.capture_bytes,
        ring_buffer_bytes: cfg.ring_buffer_bytes,
        pids: cfg.pids.clone(),
        ports: cfg.ports.clone(),
        tcp_option: cfg.tcp_option,
    };
    let mut capture = Capture::start(&opts, offsets)?;
    // Probe the SSL libraries of the processes already running before saying ready.
    let tls_probes = capture.scan_tls();
    let ring = capture.take_ring_buffer()?;
    // SAFETY: the EventRing owns its map fd and keeps it open, unchanged, for as long as the
    // AsyncFd owns the EventRing.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(std::io::Error::from)
        .context("cannot poll the ring buffer")?;

    let processes = Arc::new(ProcessTable::new("/proc", 4096));
    let filters = Filters {
        ports: cfg.ports.clone(),
        exes: cfg.exes.clone(),
    };
    let mut conns = Connections::new(
        cfg.max_connections,
        cfg.idle_timeout,
        filters,
        processes,
        Clock::new(),
        cfg.sanitize_query_text,
    );
    if let Some(addr) = cfg.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        tokio::spawn(serve_metrics(listener));
    }

    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    let mut report = tokio::time::interval(cfg.metrics_log_interval);
    let mut kernel_counters = tokio::time::interval(Duration::from_secs(1));
    let mut link_tick = tokio::time::interval(LINK_TICK);
    let mut drain_tick = tokio::time::interval(DRAIN_EVERY);
    drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut linker = Linker::new(cfg.linking);
    let mut tls_scan = tokio::time::interval(TLS_SCAN_EVERY);
    tls_scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    info!(
        programs = capture.attached(),
        tls_probes,
        tcp_option = capture.tcp_option(),
        endpoint = %cfg.export.describe(),
        capture_bytes = cfg.capture_bytes,
        linking = cfg.linking.enabled,
        link_window_ms = cfg.linking.window.as_millis() as u64,
        recover_blocked_secs = cfg.recover_blocked.as_secs(),
        "tracer ready"
    );
    crate::release_startup_memory();

    // Spans leave for the exporter once per turn of the loop, in one batch.
    let mut ready: Vec<Span> = Vec::new();
    // Recovery of syscalls blocked at attach time ends then (`Capture::end_recovery`).
    let recovery_end = tokio::time::sleep(cfg.recover_blocked);
    tokio::pin!(recovery_end);
    let mut recovering = true;
    loop {
        tokio::select! {
            () = &mut recovery_end, if recovering => {
                recovering = false;
                if let Err(err) = capture.end_recovery() {
                    warn!(%err, "cannot end the recovery of blocked syscalls");
                }
            }
            guard = ring.readable_mut() => {
                let mut guard = guard.context("ring buffer poll failed")?;
                intake(guard.get_inner_mut(), &mut conns, &mut linker, &mut capture, &mut ready);
                guard.clear_ready();
            }
            _ = drain_tick.tick() => {
                intake(ring.get_mut(), &mut conns, &mut linker, &mut capture, &mut ready);
            }
            _ = sweep.tick() => {
                let now = monotonic_ns();
                conns.sweep(now, &mut |f: Finished| linker.submit(f, now, &mut |s| ready.push(s)));
            }
            _ = link_tick.tick() => linker.advance(monotonic_ns(), &mut |s| ready.push(s)),
            _ = kernel_counters.tick() => publish_kernel_counters(&capture),
            _ = tls_scan.tick() => { capture.scan_tls(); }
            _ = report.tick() => log_metrics(),
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = sigint.recv() => { info!("SIGINT: shutting down"); break; }
        }
        exporter.submit_all(&mut ready);
    }

    // Detach every program first so nothing new arrives, then take what is still queued.
    publish_kernel_counters(&capture);
    drop(capture);
    let now = monotonic_ns();
    let mut held = ready;
    let mut hold = |span| held.push(span);
    drain(
        ring.get_mut(),
        &mut conns,
        &mut Vec::new(),
        &mut |f: Finished| linker.submit(f, now, &mut hold),
    );
    linker.flush(&mut hold);
    // The linking window holds up to `link_max_spans`, more than the export queue: queue them
    // past its bound (they are in memory already) instead of dropping the last second of spans.
    exporter.submit_unbounded(held);
    exporter.shutdown().await;
    if let Err(err) = export_task.await {
        warn!(%err, "exporter task ended abnormally");
    }
    log_metrics();
    info!("tracer stopped");
    Ok(())
}

/// Takes everything queued in the ring buffer: events to the connection table, finished spans
/// to the linking window, payload stops and exec'd processes to the kernel side.
fn intake(
    ring: &mut EventRing,
    conns: &mut Connections,
    linker: &mut Linker,
    capture: &mut Capture,
    ready: &mut Vec<Span>,
) {
    let mut execs = Vec::new();
    let now = monotonic_ns();
    drain(ring, conns, &mut execs, &mut |f: Finished| {
        linker.submit(f, now, &mut |s| ready.push(s))
    });
    apply_stop_payload(capture, conns);
    if !execs.is_empty() {
        capture.scan_tls_execs(&execs);
    }
}

/// Events the drain handles between two offers of its CPU to the host's other runnable threads.
const YIELD_EVERY: u64 = 128;

/// How old an event may be for the drain to still offer its CPU every `YIELD_EVERY` events. The
/// offers keep the traced processes' waits behind the agent short while it keeps up (events are
/// then at most a drain tick old when read). An older event means the ring is filling faster than
/// the agent empties it: offering the CPU then kept the agent behind until the ring overflowed
/// (saturated nginx lost 23k-150k events in each of seven 8-second runs, most of them in the first
/// seconds, while the agent's memory was still cold; none in eleven runs since), so it drains
/// without offers until it has caught up. The default ring holds ~175 ms of saturated nginx's
/// events. The lag is read from the clock at each offer: from the drain's start it never shows, as
/// a drain that keeps finding new events runs for hundreds of milliseconds.
const YIELD_MAX_LAG_NS: u64 = 50_000_000;

/// Whether the drain offers its CPU after its `n`th event, stamped `exit_ns`; `now` reads the
/// clock, only at every `YIELD_EVERY`th event.
fn offers_cpu(n: u64, exit_ns: u64, now: impl FnOnce() -> u64) -> bool {
    n.is_multiple_of(YIELD_EVERY) && now().saturating_sub(exit_ns) < YIELD_MAX_LAG_NS
}

/// Hands every queued event to the connection table; the processes that executed a new program
/// go to `execs`.
fn drain(
    ring: &mut EventRing,
    conns: &mut Connections,
    execs: &mut Vec<u32>,
    emit: &mut dyn FnMut(Finished),
) {
    let mut n = 0u64;
    while let Some(item) = ring.next() {
        n += 1;
        let ev = Event::decode(item);
        if let Ok(ev) = &ev
            && offers_cpu(n, ev.header.exit_ns, monotonic_ns)
        {
            std::thread::yield_now();
        }
        match ev {
            Ok(ev) if ev.header.kind == tracer_ebpf::abi::KIND_EXEC => {
                execs.push(ev.header.tgid);
                conns.exec(&ev);
            }

            Ok(ev) => {
                log_trace_context(&ev);
                conns.handle(&ev, emit);
            }
            Err(err) => {
                metrics::add(
                    "events_dropped_total",
                    metrics::labels(&[("reason", "undecodable")]),
                    1,
                );
                tracing::debug!(%err, "undecodable ring buffer record");
            }
        }
    }
    metrics::add("events_received_total", "", n);
}

/// One debug line (target `tracer::trace_context`) per event that carries a trace context, until
/// span linking uses them.
fn log_trace_context(ev: &Event<'_>) {
    let Some(trace) = ev.trace() else { return };
    let h = &ev.header;
    let role = match h.role {
        tracer_ebpf::abi::ROLE_CLIENT => "client",
        tracer_ebpf::abi::ROLE_SERVER => "server",
        _ => "unknown",
    };
    let direction = if h.direction == tracer_ebpf::abi::DIR_SEND {
        "send"
    } else {
        "recv"
    };
    tracing::debug!(
        target: "tracer::trace_context",
        pid = h.tgid,
        tid = h.tid,
        fd = h.fd,
        role,
        direction,
        local = %ev.local(),
        remote = %ev.remote(),
        bytes = h.bytes,
        stream_offset = h.stream_offset,
        trace_id = %trace,
        in_band = trace.in_band,
        generated = trace.generated,
        "trace context"
    );
}

fn apply_stop_payload(capture: &mut Capture, conns: &mut Connections) {
    for stop in conns.take_stop_payload() {
        if let Err(err) = capture.set_conn_flags(stop.sock, stop.conn_id, stop.flags) {
            tracing::debug!(%err, "could not mark connection as payload-free");
        }
    }
}

fn publish_kernel_counters(capture: &Capture) {
    match capture.counters() {
        Ok(values) => {
            for (name, v) in COUNTER_NAMES.iter().zip(values) {
                metrics::set_counter("kernel_events_total", metrics::labels(&[("what", name)]), v);
            }
        }
        Err(err) => tracing::debug!(%err, "cannot read kernel counters"),
    }
}

fn log_metrics() {
    let summary: Vec<String> = metrics::summary()
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    info!(metrics = %summary.join(" "), "agent metrics");
}

async fn serve_metrics(listener: tokio::net::TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let body = metrics::render_prometheus();
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            // The request itself does not matter: every path serves the metrics.
            let mut buf = [0u8; 1024];
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::io::AsyncReadExt::read(&mut stream, &mut buf),
            )
            .await;
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
        });
    }
}

/// CLOCK_MONOTONIC in ns: the clock the kernel programs stamp events with.
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drain_offers_its_cpu_only_while_it_keeps_up() {
        let now = 10_000_000_000;
        // Every `YIELD_EVERY`th event, when the event is recent.
        assert!(offers_cpu(YIELD_EVERY, now - 1_000_000, || now));
        assert!(offers_cpu(3 * YIELD_EVERY, now, || now));
        // An event stamped after the clock was read (another CPU) is recent too.
        assert!(offers_cpu(YIELD_EVERY, now + 5, || now));
        // Behind: the event waited longer than `YIELD_MAX_LAG_NS` in the ring.
        assert!(!offers_cpu(YIELD_EVERY, now - YIELD_MAX_LAG_NS, || now));
        assert!(!offers_cpu(
            2 * YIELD_EVERY,
            now - 2 * YIELD_MAX_LAG_NS,
            || now
        ));
        // Between offers the clock is not read.
        assert!(!offers_cpu(YIELD_EVERY + 1, now, || unreachable!()));
        assert!(!offers_cpu(1, now, || unreachable!()));
    }
}
