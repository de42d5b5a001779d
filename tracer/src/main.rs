//! `tracer`: a zero-code distributed tracing agent. eBPF captures every process's socket traffic;
//! userspace parses it into requests and responses and exports OpenTelemetry spans.
//!
//! The data path, in module order: capture → connections (streams, protocols) → spans → export.

mod agent;
mod capture;
mod check;
mod config;
mod connections;
mod export;
mod fxhash;
mod linking;
mod metrics;
mod process;
mod span;
mod spans;
mod streams;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// mimalloc instead of glibc's malloc: spans are built on one runtime thread and freed on
/// another, which glibc's per-thread arenas answer with fragmentation, and allocation is a
/// quarter of the agent's CPU at saturation (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in the mimalloc built by `libmimalloc-sys` (pinned in Cargo.lock;
/// the index is the same in its v2 and v3 sources): how long freed pages stay committed.
const MI_OPTION_PURGE_DELAY: i32 = 15;

unsafe extern "C" {
    fn mi_option_set(option: i32, value: std::ffi::c_long);
    fn mi_collect(force: bool);
    #[cfg(test)]
    fn mi_option_get(option: i32) -> std::ffi::c_long;
}

/// How long freed pages stay committed, in ms, instead of the 1 s of the mimalloc built here
/// (v3). The window and the export queue free and reuse memory continuously: with 1 s the
/// agent held ~15 MiB more at 10k req/s, and 100 ms cost no CPU that could be measured
/// (docs/performance.md); with 0 pages would be faulted and zeroed again and again.
const PURGE_DELAY_MS: std::ffi::c_long = 100;

/// Allocator settings, each overridable from the environment:
/// - freed pages stay committed for [`PURGE_DELAY_MS`] (`MIMALLOC_PURGE_DELAY`);
/// - no transparent huge pages (`MIMALLOC_ALLOW_THP=1` keeps them): mimalloc advises its arena
///   for huge pages, and each 2 MiB page the agent touches a little of counts whole in its RSS
///   (~20 MiB of a 108 MiB peak at 10k req/s).
fn tune_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a process-wide integer option; mimalloc reads it on its next purge.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // SAFETY: prctl with integer arguments; it only sets a flag of this process's memory.
        let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
        if rc != 0 {
            // Logging is not up yet; the agent works the same, with a larger RSS.
            eprintln!(
                "tracer: could not turn transparent huge pages off: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Gives back what start-up freed: parsing the kernel's BTF and loading the eBPF object free
/// ~37 MiB, which mimalloc kept committed, no purge coming while the agent is idle: the idle
/// agent's RSS was 72 MiB with it, 35 MiB without.
pub(crate) fn release_startup_memory() {
    // SAFETY: no arguments to check; mimalloc frees what it holds unused.
    unsafe { mi_collect(true) };
}

/// Zero-code distributed tracing: eBPF capture of every process's traffic, exported as OpenTelemetry spans.
#[derive(Debug, Parser)]
#[command(name = "tracer", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Trace every process on this host and export spans (the default).
    Run(Box<RunArgs>),

    /// Print what this kernel supports and which capture mode the agent will use.
    Check,
}

#[derive(Debug, Args, Clone, Default)]
struct RunArgs {
    /// TOML config file (flags and environment override it).
    #[arg(long, env = "TRACER_CONFIG")]
    config: Option<PathBuf>,
    /// Only trace this process id (repeatable).
    #[arg(long = "pid", value_name = "PID")]
    pids: Vec<u32>,
    /// Only trace connections with this local or remote port (repeatable).
    #[arg(long = "port", value_name = "PORT")]
    ports: Vec<u16>,
    /// Only trace processes whose executable has this name (repeatable).
    #[arg(long = "exe", value_name = "NAME")]
    exes: Vec<String>,
    /// Payload bytes copied per syscall (default 4096, at most 16384).
    #[arg(long, env = "TRACER_CAPTURE_BYTES")]
    capture_bytes: Option<u32>,
    /// Kernel ring buffer size in bytes (power of two; default 8388608).
    #[arg(long, env = "TRACER_RING_BUFFER_BYTES")]
    ring_buffer_bytes: Option<u32>,
    /// Serve the agent's own metrics in Prometheus format on this address (e.g. 127.0.0.1:9464).
    #[arg(long, env = "TRACER_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// OTLP endpoint (overrides OTEL_EXPORTER_OTLP_ENDPOINT); without any, spans print to stdout.
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// OTLP protocol: grpc or http/protobuf (overrides OTEL_EXPORTER_OTLP_PROTOCOL).
    #[arg(long)]
    otlp_protocol: Option<String>,
    /// Export database query text as captured, literals included (default: literals become `?`).
    #[arg(long)]
    raw_query_text: bool,
    /// Export spans as they finish, without linking them into traces (header contexts still apply).
    #[arg(long, env = "TRACER_NO_LINKING")]
    no_linking: bool,
    /// How long finished spans wait for their parents and children before export (default 1000).
    #[arg(long, env = "TRACER_LINK_WINDOW_MS", value_name = "MS")]
    link_window_ms: Option<u64>,
    /// Do not carry trace ids to other hosts in a TCP header option (nor read them).
    #[arg(long)]
    no_tcp_option: bool,
    /// For how long after start-up the kernel programs recover reads and writes already blocked
    /// at start (default 60; 0: not at all).
    #[arg(long, env = "TRACER_RECOVER_BLOCKED_SECS", value_name = "SECS")]
    recover_blocked_secs: Option<u64>,
}

impl RunArgs {
    fn overrides(self) -> config::Overrides {
        config::Overrides {
            config: self.config,
            capture_bytes: self.capture_bytes,
            ring_buffer_bytes: self.ring_buffer_bytes,
            pids: self.pids,
            ports: self.ports,
            exes: self.exes,
            metrics_addr: self.metrics_addr,
            otlp_endpoint: self.otlp_endpoint,
            otlp_protocol: self.otlp_protocol,
            raw_query_text: self.raw_query_text,
            no_linking: self.no_linking,
            link_window_ms: self.link_window_ms,
            no_tcp_option: self.no_tcp_option,
            recover_blocked_secs: self.recover_blocked_secs,
        }
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("TRACER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        Some(Command::Check) => {
            let report = check::probe();
            println!("{}", report.to_string().trim_end());
            match report.capture_mode() {
                check::CaptureMode::SyscallTracepoints | check::CaptureMode::SocketLayer { .. } => {
                    Ok(())
                }
                check::CaptureMode::Unavailable(missing) => Err(anyhow::anyhow!(
                    "the agent cannot run here (kernel or privileges): missing {}",
                    missing.join(", ")
                )),
            }
        }
        Some(Command::Run(args)) => agent::run(args.overrides()),
        None => agent::run(cli.run.overrides()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tracer: {err:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purge_delay_is_the_option_we_set() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        // SAFETY: reads a process-wide integer option.
        let default = unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) };
        // mimalloc's default purge delay (v2: 10 ms, v3: 1 s), or ours when another test set it
        // first; a different index would read another option's value.
        assert!(
            [10, 1000, PURGE_DELAY_MS].contains(&default),
            "option {MI_OPTION_PURGE_DELAY} = {default}"
        );
        tune_allocator();
        // SAFETY: as above.
        assert_eq!(
            unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) },
            PURGE_DELAY_MS
        );
    }

    #[test]
    fn transparent_huge_pages_are_off() {
        if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
            return;
        }
        tune_allocator();
        // SAFETY: prctl with integer arguments, reading a flag of this process.
        assert_eq!(
            unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) },
            1
        );
    }
}
