//! Capture: loads the kernel programs, attaches them, and hands out the ring buffer of events.

pub mod btf;
pub mod events;
mod gotls;
pub mod ring;
pub mod tcp_option;
pub mod tls;

use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, ProgramArray};
use aya::programs::{BtfTracePoint, ProgramError, RawTracePoint, TracePoint};
use aya::{Btf, Ebpf, EbpfLoader, Pod};
use thiserror::Error;
use tracer_ebpf::abi::{self, ConnState, KernelOffsets};

pub use ring::EventRing;

/// The kernel object, built by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer-ebpf"));

/// Syscall tracepoints the agent attaches (program name = tracepoint name); `sched_process_exit`
/// and `sched_process_exec` come on top.
const SYSCALL_TRACEPOINTS: &[&str] = &[
    "sys_enter_read",
    "sys_exit_read",
    "sys_enter_write",
    "sys_exit_write",
    "sys_enter_readv",
    "sys_exit_readv",
    "sys_enter_writev",
    "sys_exit_writev",
    "sys_enter_recvfrom",
    "sys_exit_recvfrom",
    "sys_enter_sendto",
    "sys_exit_sendto",
    "sys_enter_recvmsg",
    "sys_exit_recvmsg",
    "sys_enter_sendmsg",
    "sys_exit_sendmsg",
    "sys_enter_recvmmsg",
    "sys_exit_recvmmsg",
    "sys_enter_sendmmsg",
    "sys_exit_sendmmsg",
    "sys_enter_sendfile64",
    "sys_exit_sendfile64",
    "sys_enter_connect",
    "sys_exit_connect",
    "sys_exit_accept",
    "sys_exit_accept4",
    "sys_enter_close",
];

/// Read exits whose trace-context program (`<name>_trace`) is attached in their place when the TCP
/// option runs, with the `AFTER_CONTEXT` slot where it finds the exit program to tail-call. The
/// other reads' exit programs (`read`, `recvfrom`: one plain buffer, no copy loop) find the
/// context themselves.
const READ_CONTEXT: &[(&str, u32)] = &[
    ("sys_exit_readv", abi::AFTER_CONTEXT_READV),
    ("sys_exit_recvmsg", abi::AFTER_CONTEXT_RECVMSG),
    ("sys_exit_recvmmsg", abi::AFTER_CONTEXT_RECVMMSG),
];

/// Syscall programs whose calls the socket-layer programs take (`sock_hooks.rs`) where the kernel
/// has their tracepoints: reads, then writes.
const SOCKET_READS: &[&str] = &[
    "sys_enter_read",
    "sys_exit_read",
    "sys_enter_readv",
    "sys_exit_readv",
    "sys_enter_recvfrom",
    "sys_exit_recvfrom",
    "sys_enter_recvmsg",
    "sys_exit_recvmsg",
];
const SOCKET_WRITES: &[&str] = &[
    "sys_enter_write",
    "sys_exit_write",
    "sys_enter_writev",
    "sys_exit_writev",
    "sys_enter_sendto",
    "sys_exit_sendto",
    "sys_enter_sendmsg",
    "sys_exit_sendmsg",
];

/// The exits of [`SOCKET_WRITES`]: where the kernel has `sock_send_length` but not
/// `tcp_sendmsg_locked`, a write's syscall entry still records its start and chooses its TCP
/// option's trace id, and `sock_send_length` takes its end.
const SOCKET_WRITE_EXITS: &[&str] = &[
    "sys_exit_write",
    "sys_exit_writev",
    "sys_exit_sendto",
    "sys_exit_sendmsg",
];

/// A group of socket-layer programs: the calls it takes, where (as logged), whether its programs
/// are BTF tracepoints (else raw ones, named `<program>_raw`), the tracepoints it attaches (in
/// attach order; the program of a tracepoint is named after it), the program that copies through
/// iovecs with the tracepoint it runs in (tail-called there) and its slot in the program array of
/// its kind, and the syscall programs it replaces.
struct SocketHooks {
    calls: &'static str,
    at: &'static str,
    btf: bool,
    tracepoints: &'static [&'static str],
    iov: (&'static str, &'static str, u32),
    replaces: &'static [&'static str],
}

impl SocketHooks {
    /// The name of the program of this group that `name` (a tracepoint, or the iovec copy) stands
    /// for.
    fn program(&self, name: &str) -> String {
        if self.btf {
            name.to_owned()
        } else {
            format!("{name}_raw")
        }
    }

    /// The program array the group's readers and writers tail-call its iovec copy through.
    fn iov_map(&self) -> &'static str {
        if self.btf { "SOCK_IOV_BTF" } else { "SOCK_IOV" }
    }
}

/// Reads, then writes: each a list of groups, the first one that attaches wins. The BTF
/// tracepoints come first: their socket pointers are typed, so the fields they read (sequence
/// numbers, a send's length) are plain loads instead of `bpf_probe_read_kernel` calls.
const SOCKET_HOOKS: [&[SocketHooks]; 2] = {
    const READS: SocketHooks = SocketHooks {
        calls: "reads",
        at: "socket layer",
        btf: true,
        tracepoints: &["sock_recv_length"],
        iov: ("sock_recv_iov", "sock_recv_length", abi::SOCK_IOV_RECV),
        replaces: SOCKET_READS,
    };
    const WRITES: SocketHooks = SocketHooks {
        calls: "writes",
        at: "socket layer",
        btf: true,
        // The call's start before its end: a send that finds no start is not taken.
        tracepoints: &["tcp_sendmsg_locked", "sock_send_length"],
        iov: ("sock_send_iov", "sock_send_length", abi::SOCK_IOV_SEND),
        replaces: SOCKET_WRITES,
    };
    // Kernels without `tcp_sendmsg_locked`: the same writes' ends, their starts at syscalls.
    const WRITE_EXITS: SocketHooks = SocketHooks {
        at: "syscall entries, socket-layer exits",
        tracepoints: &["sock_send_length"],
        replaces: SOCKET_WRITE_EXITS,
        ..WRITES
    };
    const fn raw(hooks: SocketHooks) -> SocketHooks {
        SocketHooks {
            btf: false,
            ..hooks
        }
    }
    [
        &[READS, raw(READS)],
        &[WRITES, raw(WRITES), WRITE_EXITS, raw(WRITE_EXITS)],
    ]
};

/// Exit programs that have a `<name>_small` variant with a shorter iovec loop.
const SMALL_VARIANTS: &[&str] = &[
    "sys_exit_readv",
    "sys_exit_writev",
    "sys_exit_recvmsg",
    "sys_exit_sendmsg",
    "sys_exit_recvmmsg",
    "sys_exit_sendmmsg",
];

/// Names of the kernel's counters, indexed by `abi::CNT_*`.
pub const COUNTER_NAMES: [&str; abi::NUM_COUNTERS as usize] = [
    "ringbuf_full",
    "copy_fault",
    "inflight_full",
    "conn_map_full",
    "events",
    "truncated",
    "tls_unattributed",
    "go_tls_no_socket",
    "tcp_option_written",
    "tcp_option_read",
    "tcp_option_no_room",
    "tcp_option_stopped",
    "tail_call_failed",
];

/// What the capture needs from the configuration.
#[derive(Debug, Clone)]
pub struct CaptureOptions {
    /// Payload bytes copied per syscall.
    pub capture_bytes: u32,
    /// Ring buffer size in bytes (a power of two, at least one page).
    pub ring_buffer_bytes: u32,
    /// When non-empty, only these processes are traced.
    pub pids: Vec<u32>,
    /// When non-empty, only connections with one of these local or remote ports are traced.
    pub ports: Vec<u16>,
    /// Carry trace ids between hosts in a TCP header option, where the kernel can.
    pub tcp_option: bool,
}

/// Why the capture could not start.
#[derive(Debug, Error)]
pub enum CaptureError {
    /// The configuration asks for something the programs cannot do.
    #[error("invalid capture option: {0}")]
    Invalid(String),
    /// The kernel refused the object (verifier, missing map type, permissions).
    #[error("loading the eBPF programs failed: {0}")]
    Load(#[source] aya::EbpfError),
    /// A program or tracepoint could not be attached.
    #[error("attaching {name} failed: {source}")]
    Attach {
        /// Program name.
        name: &'static str,
        /// Cause.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A map operation failed.
    #[error("eBPF map {name}: {source}")]
    Map {
        /// Map name.
        name: &'static str,
        /// Cause.
        #[source]
        source: aya::maps::MapError,
    },
    /// The event ring buffer could not be mapped.
    #[error("cannot map the event ring buffer: {0}")]
    Ring(#[source] std::io::Error),
}

/// The kernel map `name`, as the typed map `M` (a hash map, an array, ...).
fn typed_map<'a, M>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<M, CaptureError>
where
    M: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .map_mut(name)
        .ok_or_else(|| CaptureError::Invalid(format!("no {name} map")))?;
    M::try_from(map).map_err(|source| CaptureError::Map { name, source })
}

/// Puts `keys` into the kernel hash map `name` (a set: values are 1).
fn fill_set<K: Pod>(ebpf: &mut Ebpf, name: &'static str, keys: &[K]) -> Result<(), CaptureError> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut set: BpfHashMap<_, K, u8> = typed_map(ebpf, name)?;
    for key in keys {
        set.insert(key, 1, 0)
            .map_err(|source| CaptureError::Map { name, source })?;
    }
    Ok(())
}

/// Number of possible CPUs: the kernel programs index their staging area by CPU id.
/// Bytes waiting in the ring buffer before the kernel wakes the agent: an eighth of the ring, so a
/// burst wakes it long before the ring fills; below that the agent drains on its own timer.
fn wakeup_bytes(ring_buffer_bytes: u32) -> u64 {
    u64::from(ring_buffer_bytes / 8)
}

fn possible_cpus() -> Result<u32, CaptureError> {
    let n = aya::util::nr_cpus()
        .map_err(|(path, err)| CaptureError::Invalid(format!("cannot read {path}: {err}")))?;
    u32::try_from(n).map_err(|_| CaptureError::Invalid(format!("{n} CPUs")))
}

#[derive(Clone, Copy)]
#[repr(transparent)]
struct OffsetsPod(KernelOffsets);
// SAFETY: KernelOffsets is repr(C), all u32 fields, no padding.
unsafe impl Pod for OffsetsPod {}

/// The verifier's reason for refusing a program: the last line of its log before the statistics
/// it prints at the end.
fn verifier_reason(log: &str) -> &str {
    log.lines()
        .rev()
        .map(str::trim)
        .find(|l| {
            !l.is_empty()
                && !l.starts_with("verification time")
                && !l.starts_with("stack depth")
                && !l.starts_with("processed ")
        })
        .unwrap_or("")
}

#[derive(Clone, Copy)]
#[repr(transparent)]
struct ConnStatePod(ConnState);
// SAFETY: ConnState is repr(C) with explicit padding fields.
unsafe impl Pod for ConnStatePod {}

/// Loaded and attached kernel programs. Dropping it detaches every program, the TLS library
/// probes included.
pub struct Capture {
    ebpf: Ebpf,
    attached: usize,
    tls: tls::TlsProbes,
    tcp_option: bool,
}

/// Whether the fd walk loads through typed task pointers (`bpf_get_current_task_btf`, Linux 5.11):
/// three fault-tolerant loads instead of three `bpf_probe_read_kernel` calls on every read and
/// write on the host, on a `kernel` (major, minor) that has it. `TRACER_TASK_BTF=0` turns them
/// off.
fn typed_task_loads(kernel: Option<(u32, u32)>) -> bool {
    if std::env::var_os("TRACER_TASK_BTF").is_some_and(|v| v == "0") {
        tracing::info!("typed task loads turned off by TRACER_TASK_BTF=0");
        return false;
    }
    kernel.is_some_and(|v| v >= (5, 11))
}

/// Which socket-layer groups may be tried (see `sock_hooks.rs`): all of them unless
/// `TRACER_SOCKET_HOOKS=0` keeps socket calls on the syscall programs, or
/// `TRACER_SOCKET_HOOKS=exits` leaves `tcp_sendmsg_locked` out, as kernels without it do;
/// `TRACER_SOCKET_BTF=0` leaves the BTF tracepoints out (the raw ones take their place).
fn socket_hooks_wanted(hooks: &SocketHooks) -> bool {
    if hooks.btf && std::env::var_os("TRACER_SOCKET_BTF").is_some_and(|v| v == "0") {
        return false;
    }
    match std::env::var("TRACER_SOCKET_HOOKS").as_deref() {
        Ok("0") => false,
        Ok("exits") => !hooks.tracepoints.contains(&"tcp_sendmsg_locked"),
        _ => true,
    }
}

/// Whether connections may open and close at their TCP state changes (`inet_sock_set_state`)
/// instead of at their syscalls: unless `TRACER_SOCKET_STATES=0`.
fn socket_states_wanted() -> bool {
    let off = std::env::var_os("TRACER_SOCKET_STATES").is_some_and(|v| v == "0");
    if off {
        tracing::info!("connections open and close at their syscalls (TRACER_SOCKET_STATES=0)");
    }
    !off
}

/// Loads and attaches `inet_sock_set_state` and `tcp_destroy_sock` in place of the syscall
/// programs left once reads and whole writes are taken at the socket layer (connect, accept,
/// close, sendfile, the mmsg calls; see `sock_hooks.rs`), then tells the socket-layer programs
/// that they take sendfile and the mmsg calls too. On failure nothing of it stays attached.
fn attach_socket_states(ebpf: &mut Ebpf) -> Result<(), String> {
    let names = ["inet_sock_set_state", "tcp_destroy_sock"];
    let unload = |ebpf: &mut Ebpf, done: &[&str]| {
        for name in done {
            unload_socket_program(ebpf, name, false);
        }
    };
    for (i, name) in names.into_iter().enumerate() {
        let attached = load_socket_program(ebpf, name, name, None)
            .and_then(|()| attach_socket_program(ebpf, name, name, false));
        if let Err(e) = attached {
            unload(ebpf, &names[..i]);
            return Err(format!("{name}: {e}"));
        }
    }
    let set = typed_map::<Array<&mut MapData, u32>>(ebpf, "SOCKET_STATES")
        .map_err(|e| e.to_string())
        .and_then(|mut on| on.set(0, 1, 0).map_err(|e| format!("SOCKET_STATES: {e}")));
    if set.is_err() {
        unload(ebpf, &names);
    }
    set
}

/// Whether connections within the host carry the trace-context TCP option too
/// (`TRACER_TCP_OPTION_LOCAL=1`), instead of their client writes handing the trace id to the
/// receiving socket in the kernel's memory (the default: the agent sees both ends, and the option
/// costs every segment a sock_ops run and the receiver TCP's slow path).
fn local_tcp_option() -> bool {
    let on = std::env::var_os("TRACER_TCP_OPTION_LOCAL").is_some_and(|v| v == "1");
    if on {
        tracing::info!(
            "connections within the host carry the TCP option (TRACER_TCP_OPTION_LOCAL=1)"
        );
    }
    on
}

/// The raw tracepoint program `program` of the object.
fn raw_tracepoint_program<'a>(
    ebpf: &'a mut Ebpf,
    program: &str,
) -> Result<&'a mut RawTracePoint, ProgramError> {
    typed_program(ebpf, program)
}

/// Program `program` of the object as its type `P` (a tracepoint, a raw tracepoint, ...).
pub(super) fn typed_program<'a, P>(
    ebpf: &'a mut Ebpf,
    program: &str,
) -> Result<&'a mut P, ProgramError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(program)
        .ok_or(ProgramError::UnexpectedProgramType)?
        .try_into()
}

/// Loads socket-layer program `program` of tracepoint `tracepoint` unless it is loaded already (an
/// earlier group may have loaded it): as a BTF tracepoint with the kernel's `btf`, else as a raw
/// one.
fn load_socket_program(
    ebpf: &mut Ebpf,
    program: &str,
    tracepoint: &str,
    btf: Option<&Btf>,
) -> Result<(), ProgramError> {
    let loaded = match btf {
        Some(btf) => typed_program::<BtfTracePoint>(ebpf, program)?.load(tracepoint, btf),
        None => raw_tracepoint_program(ebpf, program)?.load(),
    };
    match loaded {
        Err(ProgramError::AlreadyLoaded) => Ok(()),
        other => other,
    }
}

/// Attaches the loaded socket-layer program `program` to `tracepoint`.
fn attach_socket_program(
    ebpf: &mut Ebpf,
    program: &str,
    tracepoint: &str,
    btf: bool,
) -> Result<(), ProgramError> {
    if btf {
        typed_program::<BtfTracePoint>(ebpf, program)?.attach()?;
    } else {
        raw_tracepoint_program(ebpf, program)?.attach(tracepoint)?;
    }
    Ok(())
}

/// Unloads socket-layer program `program` (detaching it), if it was loaded.
fn unload_socket_program(ebpf: &mut Ebpf, program: &str, btf: bool) {
    if btf {
        if let Ok(prog) = typed_program::<BtfTracePoint>(ebpf, program) {
            let _ = prog.unload();
        }
    } else if let Ok(prog) = raw_tracepoint_program(ebpf, program) {
        let _ = prog.unload();
    }
}

/// Loads and attaches the socket-layer programs of `hooks`, the long iovec loop only where
/// `long_iovec_loop` says the verifier may take it; BTF tracepoints need the kernel's `btf`. On
/// failure nothing of the group stays attached and the caller tries the next group, or uses the
/// syscall programs.
fn attach_socket_hooks(
    ebpf: &mut Ebpf,
    hooks: &SocketHooks,
    long_iovec_loop: bool,
    btf: Option<&Btf>,
) -> Result<(), String> {
    let btf = match (hooks.btf, btf) {
        (true, None) => return Err("the kernel's BTF could not be read".to_owned()),
        (true, btf) => btf,
        (false, _) => None,
    };
    let (iov, at, slot) = hooks.iov;
    let long = hooks.program(iov);
    let small = hooks.program(&format!("{iov}_small"));
    let loaded = if long_iovec_loop && load_socket_program(ebpf, &long, at, btf).is_ok() {
        long
    } else {
        load_socket_program(ebpf, &small, at, btf).map_err(|e| format!("loading {small}: {e}"))?;
        small
    };
    let fd = ebpf
        .program(&loaded)
        .ok_or(ProgramError::UnexpectedProgramType)
        .and_then(|prog| prog.fd())
        .and_then(|fd| fd.try_clone().map_err(ProgramError::from))
        .map_err(|e| format!("{loaded}: {e}"))?;
    let map = hooks.iov_map();
    let mut slots: ProgramArray<&mut MapData> = typed_map(ebpf, map).map_err(|e| e.to_string())?;
    slots.set(slot, &fd, 0).map_err(|e| format!("{map}: {e}"))?;
    for (i, &name) in hooks.tracepoints.iter().enumerate() {
        let program = hooks.program(name);
        let attached = load_socket_program(ebpf, &program, name, btf)
            .and_then(|()| attach_socket_program(ebpf, &program, name, hooks.btf));
        if let Err(err) = attached {
            let reason = match &err {
                ProgramError::LoadError { verifier_log, .. } => {
                    let log = verifier_log.to_string();
                    tracing::debug!(%program, %log, "verifier log");
                    verifier_reason(&log).to_owned()
                }
                other => other.to_string(),
            };
            for &done in &hooks.tracepoints[..i] {
                unload_socket_program(ebpf, &hooks.program(done), hooks.btf);
            }
            return Err(format!("{program}: {reason}"));
        }
    }
    Ok(())
}

/// The tracepoint program `program` of the object.
fn tracepoint_program<'a>(
    ebpf: &'a mut Ebpf,
    program: &str,
) -> Result<&'a mut TracePoint, ProgramError> {
    typed_program(ebpf, program)
}

/// Puts the loaded exit program `program` of tracepoint `name` in slot `slot` of
/// `AFTER_CONTEXT`, where its trace-context program finds it.
fn after_context(
    ebpf: &mut Ebpf,
    program: &str,
    slot: u32,
    name: &'static str,
) -> Result<(), CaptureError> {
    let attach_err = |source| CaptureError::Attach { name, source };
    let fd = tracepoint_program(ebpf, program)
        .and_then(|prog| prog.fd())
        .and_then(|fd| fd.try_clone().map_err(ProgramError::from))
        .map_err(attach_err)?;
    let mut slots: ProgramArray<&mut MapData> = typed_map(ebpf, "AFTER_CONTEXT")?;
    slots.set(slot, &fd, 0).map_err(|source| CaptureError::Map {
        name: "AFTER_CONTEXT",
        source,
    })
}

/// Creates the maps and relocates the programs (loading each program into the kernel comes later).
fn load_object(
    opts: &CaptureOptions,
    offsets: KernelOffsets,
    trace_context: bool,
    task_btf: bool,
) -> Result<Ebpf, CaptureError> {
    let agent = std::process::id();
    let offsets = OffsetsPod(offsets);
    let filter_pids = u8::from(!opts.pids.is_empty());
    let filter_ports = u8::from(!opts.ports.is_empty());
    let trace_context = u8::from(trace_context);
    let task_btf = u8::from(task_btf);
    let local_option = u8::from(trace_context != 0 && local_tcp_option());
    let cpus = possible_cpus()?;
    let mut ebpf = EbpfLoader::new()
        .override_global("AGENT_TGID", &agent, true)
        .override_global("WAKEUP_BYTES", &wakeup_bytes(opts.ring_buffer_bytes), true)
        .override_global("CAPTURE_LIMIT", &opts.capture_bytes, true)
        .override_global("FILTER_PIDS", &filter_pids, true)
        .override_global("FILTER_PORTS", &filter_ports, true)
        .override_global("TRACE_CONTEXT", &trace_context, true)
        .override_global("LOCAL_OPTION", &local_option, true)
        .override_global("TASK_BTF", &task_btf, true)
        .override_global("OFFSETS", &offsets, true)
        .override_global("NR_CPUS", &cpus, true)
        .map_max_entries("EVENTS", opts.ring_buffer_bytes)
        // Two slots per CPU: see `scratch_interrupting` in the kernel programs.
        .map_max_entries("SCRATCH", 2 * cpus)
        .load(EBPF_OBJECT)
        .map_err(CaptureError::Load)?;
    fill_set(&mut ebpf, "PIDS", &opts.pids)?;
    fill_set(&mut ebpf, "PORTS", &opts.ports)?;
    Ok(ebpf)
}

/// The object with the trace-context TCP option attached when `opts` asks for it and the kernel
/// allows; otherwise (said once, in the log) the object without it. The syscall programs choose
/// trace ids only when the option runs, so the object is made again if attaching fails.
fn load_with_tcp_option(
    opts: &CaptureOptions,
    offsets: KernelOffsets,
    task_btf: bool,
) -> Result<(Ebpf, bool), CaptureError> {
    if !opts.tcp_option {
        tracing::info!("trace-context TCP option turned off by configuration");
        return Ok((load_object(opts, offsets, false, task_btf)?, false));
    }
    let without = |err: tcp_option::TcpOptionError| {
        tracing::warn!(%err, "running without the trace-context TCP option");
        Ok((load_object(opts, offsets, false, task_btf)?, false))
    };
    let cgroup = match tcp_option::prepare() {
        Ok(cgroup) => cgroup,
        Err(err) => return without(err),
    };
    let mut ebpf = load_object(opts, offsets, true, task_btf)?;
    if let Err(err) = tcp_option::attach(&mut ebpf, &cgroup) {
        drop(ebpf);
        return without(err);
    }
    tracing::info!(
        cgroup = %cgroup.path().display(),
        "trace ids travel in a TCP header option (kind {}, experiment id {:#06x})",
        abi::TCP_OPT_KIND,
        abi::TCP_OPT_EXID
    );
    Ok((ebpf, true))
}

impl Capture {
    /// Loads the programs with this kernel's offsets and attaches every syscall tracepoint.
    pub fn start(opts: &CaptureOptions, offsets: KernelOffsets) -> Result<Capture, CaptureError> {
        if opts.capture_bytes as usize > abi::MAX_CAPTURE {
            return Err(CaptureError::Invalid(format!(
                "capture size {} exceeds the maximum of {} bytes",
                opts.capture_bytes,
                abi::MAX_CAPTURE
            )));
        }
        let page = 4096;
        if opts.ring_buffer_bytes < page || !opts.ring_buffer_bytes.is_power_of_two() {
            return Err(CaptureError::Invalid(format!(
                "ring buffer size {} must be a power of two of at least {page} bytes",
                opts.ring_buffer_bytes
            )));
        }
        let kernel = crate::check::kernel_release().and_then(|r| crate::check::kernel_version(&r));
        let task_btf = typed_task_loads(kernel);
        match Self::start_with(opts, offsets, kernel, task_btf) {
            // The typed loads are checked by the verifier against the kernel's own types; should a
            // kernel refuse them, the probe-read walk works everywhere.
            Err(CaptureError::Attach {
                name,
                source: ProgramError::LoadError { verifier_log, .. },
            }) if task_btf => {
                let log = verifier_log.to_string();
                tracing::warn!(
                    program = name,
                    reason = verifier_reason(&log),
                    "the kernel's verifier refused the typed task loads; walking the fd table with probe reads instead"
                );
                tracing::debug!(program = name, %log, "verifier log");
                Self::start_with(opts, offsets, kernel, false)
            }
            other => other,
        }
    }

    /// [`Capture::start`] on `kernel` (major, minor) with the fd walk's typed task loads on or off.
    fn start_with(
        opts: &CaptureOptions,
        offsets: KernelOffsets,
        kernel: Option<(u32, u32)>,
        task_btf: bool,
    ) -> Result<Capture, CaptureError> {
        let (mut ebpf, tcp_option) = load_with_tcp_option(opts, offsets, task_btf)?;

        // Verifiers before 6.8 spend their whole budget on the long iovec loop and reject it (after
        // seconds of work), so those kernels get the short loop straight away.
        let long_iovec_loop = kernel.is_some_and(|v| v >= (6, 8));
        let mut attached = 0;
        let mut replaced: Vec<&str> = Vec::new();
        // Where reads and writes are taken.
        let mut taken_at = ["syscalls"; 2];
        // The socket-layer tracepoints came in 6.3 (`tcp_sendmsg_locked` later); older kernels
        // need not try.
        let mut kinds = ["none"; 2];
        if std::env::var_os("TRACER_SOCKET_BTF").is_some_and(|v| v == "0") {
            tracing::info!("socket-layer programs as raw tracepoints (TRACER_SOCKET_BTF=0)");
        }
        if task_btf && kernel.is_some_and(|v| v >= (6, 3)) {
            let btf = Btf::from_sys_fs()
                .inspect_err(|err| tracing::debug!(%err, "reading the kernel's BTF"))
                .ok();
            for ((at, kind), groups) in taken_at.iter_mut().zip(&mut kinds).zip(SOCKET_HOOKS) {
                let mut failed = Vec::new();
                for hooks in groups.iter().filter(|h| socket_hooks_wanted(h)) {
                    match attach_socket_hooks(&mut ebpf, hooks, long_iovec_loop, btf.as_ref()) {
                        Ok(()) => {
                            replaced.extend(hooks.replaces);
                            attached += hooks.tracepoints.len();
                            *at = hooks.at;
                            *kind = if hooks.btf { "BTF" } else { "raw" };
                            break;
                        }
                        Err(reason) => failed.push(reason),
                    }
                }
                if *at == "syscalls" && !failed.is_empty() {
                    tracing::warn!(
                        reason = failed.join("; "),
                        "socket {} stay on the syscall tracepoints, which run on every read and write of the host",
                        groups[0].calls
                    );
                } else if *kind == "raw" && !failed.is_empty() {
                    tracing::warn!(
                        reason = failed.join("; "),
                        "socket {} are taken by raw tracepoints, which read the socket through a helper: the BTF tracepoints did not load or attach",
                        groups[0].calls
                    );
                } else if !failed.is_empty() {
                    tracing::debug!(reason = failed.join("; "), "socket {}", groups[0].calls);
                }
            }
        }
        tracing::info!(
            reads = taken_at[0],
            writes = taken_at[1],
            read_tracepoints = kinds[0],
            write_tracepoints = kinds[1],
            "socket reads and writes are taken at"
        );
        // With reads and whole writes at the socket layer, the syscall programs left are those
        // of connect, accept, close, sendfile and the mmsg calls; their tracepoints alone would
        // cost every syscall of the host the slow path.
        let mut opened_at = "syscalls";
        if taken_at == ["socket layer"; 2] && offsets.sk_shutdown != 0 && socket_states_wanted() {
            match attach_socket_states(&mut ebpf) {
                Ok(()) => {
                    // Every syscall program: reads and writes were replaced above already.
                    replaced.extend(SYSCALL_TRACEPOINTS);
                    attached += 2;
                    opened_at = "TCP state changes";
                }
                Err(reason) => tracing::warn!(
                    %reason,
                    "connections open and close at their syscalls, whose tracepoints slow every syscall of the host"
                ),
            }
        }
        tracing::info!(at = opened_at, "where connections open and close");

        let tracepoints = SYSCALL_TRACEPOINTS
            .iter()
            .filter(|name| !replaced.contains(name))
            .map(|&name| ("syscalls", name))
            .chain([
                ("sched", "sched_process_exit"),
                ("sched", "sched_process_exec"),
            ]);
        for (category, name) in tracepoints {
            let load = |ebpf: &mut Ebpf, program: &str| tracepoint_program(ebpf, program)?.load();
            let attach = |ebpf: &mut Ebpf, program: &str| -> Result<(), ProgramError> {
                tracepoint_program(ebpf, program)?.attach(category, name)?;
                Ok(())
            };
            let first = if SMALL_VARIANTS.contains(&name) && !long_iovec_loop {
                format!("{name}_small")
            } else {
                name.to_owned()
            };
            let program = match load(&mut ebpf, &first) {
                Ok(()) => first,
                // Older verifiers reject the long iovec copy loop as too complex; these syscalls
                // have a variant with a shorter loop.
                Err(ProgramError::LoadError { .. })
                    if long_iovec_loop && SMALL_VARIANTS.contains(&name) =>
                {
                    let small = format!("{name}_small");
                    tracing::warn!(
                        program = name,
                        "the kernel's verifier rejected the {}-iovec copy; copying at most {} iovecs per call",
                        abi::MAX_IOVECS,
                        abi::SMALL_IOVECS
                    );
                    load(&mut ebpf, &small)
                        .map_err(|source| CaptureError::Attach { name, source })?;
                    small
                }
                Err(source) => return Err(CaptureError::Attach { name, source }),
            };
            let context = READ_CONTEXT
                .iter()
                .find(|(exit, _)| *exit == name)
                .filter(|_| tcp_option);
            if let Some(&(_, slot)) = context {
                // The trace-context program runs first and tail-calls the exit program.
                after_context(&mut ebpf, &program, slot, name)?;
                let trace = format!("{name}_trace");
                load(&mut ebpf, &trace)
                    .and_then(|()| attach(&mut ebpf, &trace))
                    .map_err(|source| CaptureError::Attach { name, source })?;
            } else {
                attach(&mut ebpf, &program)
                    .map_err(|source| CaptureError::Attach { name, source })?;
            }
            attached += 1;
        }
        tls::load_programs(&mut ebpf)
            .map_err(|(name, source)| CaptureError::Attach { name, source })?;
        let tls = tls::TlsProbes::new("/proc", &opts.pids);
        Ok(Capture {
            ebpf,
            attached,
            tls,
            tcp_option,
        })
    }

    /// Whether the trace-context TCP option runs (see `abi::TCP_OPT_KIND`).
    pub fn tcp_option(&self) -> bool {
        self.tcp_option
    }

    /// Attaches the TLS probes to SSL libraries in processes not looked at yet (see
    /// [`tls::TlsProbes::scan`]); returns how many probes are attached in all.
    pub fn scan_tls(&mut self) -> usize {
        self.tls.scan(&mut self.ebpf);
        self.tls.attached()
    }

    /// Attaches the TLS probes to SSL libraries of processes that just executed a new program.
    pub fn scan_tls_execs(&mut self, pids: &[u32]) {
        self.tls.scan_execs(&mut self.ebpf, pids);
    }

    /// How many programs are attached.
    pub fn attached(&self) -> usize {
        self.attached
    }

    /// Takes the event ring buffer (once).
    pub fn take_ring_buffer(&mut self) -> Result<EventRing, CaptureError> {
        let map = self
            .ebpf
            .take_map("EVENTS")
            .ok_or(CaptureError::Invalid("no EVENTS map".into()))?;
        let aya::maps::Map::RingBuf(data) = map else {
            return Err(CaptureError::Invalid("EVENTS is not a ring buffer".into()));
        };
        EventRing::new(data).map_err(CaptureError::Ring)
    }

    /// The kernel's counters summed over CPUs, indexed by `abi::CNT_*`.
    pub fn counters(&self) -> Result<[u64; abi::NUM_COUNTERS as usize], CaptureError> {
        let map = self
            .ebpf
            .map("COUNTERS")
            .ok_or(CaptureError::Invalid("no COUNTERS map".into()))?;
        let arr: PerCpuArray<_, u64> =
            PerCpuArray::try_from(map).map_err(|source| CaptureError::Map {
                name: "COUNTERS",
                source,
            })?;
        let mut out = [0u64; abi::NUM_COUNTERS as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let values = arr
                .get(&(i as u32), 0)
                .map_err(|source| CaptureError::Map {
                    name: "COUNTERS",
                    source,
                })?;
            *slot = values.iter().sum();
        }
        Ok(out)
    }

    /// Ends the recovery of syscalls that were already blocked when the programs attached: from
    /// now on a read or write exit without an entry record (every non-socket fd) returns at
    /// once. A call blocked since before the agent started and still not returned by now (an idle
    /// keep-alive connection) loses that one read; the parsers pick the connection up at its next
    /// request.
    pub fn end_recovery(&mut self) -> Result<(), CaptureError> {
        let mut done: Array<_, u32> = typed_map(&mut self.ebpf, "RECOVERY_DONE")?;
        done.set(0, 1, 0).map_err(|source| CaptureError::Map {
            name: "RECOVERY_DONE",
            source,
        })
    }

    /// Sets `flags` on the kernel's state of connection `sock` (e.g. stop copying payload).
    pub fn set_conn_flags(
        &mut self,
        sock: u64,
        conn_id: u64,
        flags: u8,
    ) -> Result<(), CaptureError> {
        let mut conns: BpfHashMap<_, u64, ConnStatePod> = typed_map(&mut self.ebpf, "CONNS")?;
        let Ok(ConnStatePod(mut state)) = conns.get(&sock, 0) else {
            return Ok(());
        };
        // The socket address may have been reused by a newer connection since.
        if state.conn_id != conn_id {
            return Ok(());
        }
        state.flags |= flags;
        if flags & abi::CONN_F_NO_PAYLOAD != 0 && state.flags & abi::CONN_F_TLS == 0 {
            // Once userspace ignores a connection the kernel chooses no new trace id for it;
            // without this its last one would go on riding in the TCP option of every segment.
            // With it gone, the sock_ops program stops running for the socket. A TLS connection
            // keeps its ids: its plaintext makes the spans.
            state.out_origin = 0;
        }
        conns
            .insert(sock, ConnStatePod(state), 0)
            .map_err(|source| CaptureError::Map {
                name: "CONNS",
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifier_reason_is_the_line_before_the_statistics() {
        let log = "0: R1=ctx() R10=fp0\n152: (79) r8 = *(u64 *)(r1 +0)\nR1 invalid mem access 'scalar'\n\
                   verification time 1708 usec\nstack depth 160\n\
                   processed 98 insns (limit 1000000) max_states_per_insn 0 total_states 5\n";
        assert_eq!(verifier_reason(log), "R1 invalid mem access 'scalar'");
        assert_eq!(verifier_reason(""), "");
    }
}
