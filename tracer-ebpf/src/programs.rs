//! The tracepoint programs and their maps.

use core::ffi::c_void;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::EbpfContext as _;
use aya_ebpf::bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP};
use aya_ebpf::helpers::generated::{
    bpf_get_current_task, bpf_get_current_task_btf, bpf_get_prandom_u32, bpf_get_smp_processor_id,
    bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user, bpf_ringbuf_output,
    bpf_ringbuf_query, bpf_skc_to_tcp_sock,
};
use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_kernel_str_bytes,
    bpf_probe_read_user as read_user,
};
use aya_ebpf::macros::{map, tracepoint};
use aya_ebpf::maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf};
use aya_ebpf::programs::TracePointContext;
use tracer_ebpf::abi::*;

#[path = "gotls.rs"]
mod gotls;
#[path = "tcp_option.rs"]
mod tcp_option;
#[path = "tls.rs"]
mod tls;

/// Set by userspace before load: the agent's own process, never traced.
#[unsafe(no_mangle)]
static AGENT_TGID: u32 = 0;
/// Set by userspace before load: payload bytes copied per syscall (at most `MAX_CAPTURE`).
#[unsafe(no_mangle)]
static CAPTURE_LIMIT: u32 = DEFAULT_CAPTURE;
/// Set by userspace before load: wake the reader only once this many bytes wait in the ring
/// buffer (it also drains on a short timer); 0 wakes it for every record.
#[unsafe(no_mangle)]
static WAKEUP_BYTES: u64 = 0;
/// Set by userspace before load: the number of possible CPUs. `SCRATCH` holds twice as many
/// slots: the second half for programs that may interrupt another one on their CPU (see
/// [`scratch_interrupting`]).
#[unsafe(no_mangle)]
static NR_CPUS: u32 = 0;
/// Set by userspace before load: non-zero when only the processes in `PIDS` are traced.
#[unsafe(no_mangle)]
static FILTER_PIDS: u8 = 0;
/// Set by userspace before load: non-zero when only connections with a local or remote port in
/// `PORTS` are traced.
#[unsafe(no_mangle)]
static FILTER_PORTS: u8 = 0;
/// Set by userspace before load: non-zero when the trace context runs, that is when the sock_ops
/// program carrying trace ids in TCP options (`tcp_option.rs`) is attached.
#[unsafe(no_mangle)]
static TRACE_CONTEXT: u8 = 0;
/// Set by userspace before load: non-zero when connections within the host carry the TCP option
/// too (`TRACER_TCP_OPTION_LOCAL=1`); by default a local client's write hands its trace id to the
/// receiving socket's `IN_CTX` entry itself (see [`hand_over`]).
#[unsafe(no_mangle)]
static LOCAL_OPTION: u8 = 0;
/// Set by userspace before load: non-zero when the kernel has `bpf_get_current_task_btf` (5.11),
/// so the fd walk loads through typed task pointers instead of calling `bpf_probe_read_kernel`
/// for each step.
#[unsafe(no_mangle)]
static TASK_BTF: u8 = 0;
/// Set by userspace before load: struct offsets of the running kernel, from BTF.
#[unsafe(no_mangle)]
static OFFSETS: KernelOffsets = KernelOffsets {
    task_files: 0,
    files_fdt: 0,
    fdt_max_fds: 0,
    fdt_fd: 0,
    file_inode: 0,
    file_private_data: 0,
    inode_mode: 0,
    socket_sk: 0,
    sk_family: 0,
    sk_daddr: 0,
    sk_rcv_saddr: 0,
    sk_dport: 0,
    sk_num: 0,
    sk_v6_daddr: 0,
    sk_v6_rcv_saddr: 0,
    sk_type: 0,
    sk_protocol: 0,
    task_stack: 0,
    tcp_write_seq: 0,
    tcp_copied_seq: 0,
    file_f_op: 0,
    msg_iter_count: 0,
    sk_shutdown: 0,
    tcp_clock_cache: 0,
    sk_user_data: 0,
    _pad: 0,
};

/// Events to userspace. Userspace resizes it at load time.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);

/// Per thread that made a socket syscall, keyed by pid_tgid: its syscall between entry and exit,
/// live from entry to exit (`enter_ns` non-zero) and rewritten in place by the thread's next one
/// (a hash map's update allocates a new element and frees the old one, and a delete takes the
/// bucket lock: both cost every captured syscall), and the request it serves (see `serve_read`),
/// found by the same lookup. A thread's record goes when it exits (`sched_process_exit`).
#[map]
static THREADS: HashMap<u64, Thread> = HashMap::with_max_entries(32768, 0);

/// Connections seen, keyed by `struct sock` address.
#[map]
static CONNS: LruHashMap<u64, ConnState> = LruHashMap::with_max_entries(65536, 0);

/// Threads whose first untracked syscall exit was examined (see `recover_inflight`).
#[map]
static SEEN: LruHashMap<u64, u8> = LruHashMap::with_max_entries(65536, 0);

/// Slot 0 is non-zero once userspace ended the recovery of calls that were blocked at attach
/// time (see `recover_inflight`): from then on an exit without an entry record costs an array
/// read instead of a lookup in `SEEN`.
#[map]
static RECOVERY_DONE: Array<u32> = Array::with_max_entries(1, 0);

/// Slot 0 is non-zero once userspace attached `inet_sock_set_state` in place of the connect,
/// accept and close syscall programs, with no syscall program left: the socket-layer programs
/// then take sendfile and the mmsg calls too (see `sock_hooks.rs`).
#[map]
static SOCKET_STATES: Array<u32> = Array::with_max_entries(1, 0);

/// The exit programs of reads through iovecs, by `AFTER_CONTEXT_*` slot, for their trace-context
/// programs to tail-call (see `read_context`).
#[map]
static AFTER_CONTEXT: ProgramArray = ProgramArray::with_max_entries(AFTER_CONTEXT_SLOTS, 0);

/// Slot 0: the address of the kernel's `socket_file_ops`, learned from the first socket the fd walk
/// meets (every socket file has these operations), so that later walks tell a socket by one read
/// of `file->f_op` instead of two (`file->f_inode->i_mode`). This kernel's kallsyms lists no data
/// symbols, so userspace cannot look the address up.
#[map]
static SOCKET_FOPS: Array<u64> = Array::with_max_entries(1, 0);

/// Processes to trace when `FILTER_PIDS` is set.
#[map]
static PIDS: HashMap<u32, u8> = HashMap::with_max_entries(4096, 0);

/// Ports to trace when `FILTER_PORTS` is set.
#[map]
static PORTS: HashMap<u16, u8> = HashMap::with_max_entries(1024, 0);

/// The trace id the sock_ops program last read from a TCP option on a socket, keyed by its tuple.
/// Keyed by the `struct sock` address instead, a server read once found the id an older
/// connection at the same address had left although the new request's option had been parsed
/// (`trace_ids_cross_hosts_in_tcp_options`, in CI): the parse callback's socket is apparently not
/// always the one the server accepts. Tuples of live connections are unique.
#[map]
static IN_CTX: LruHashMap<TupleKey, InCtx> = LruHashMap::with_max_entries(65536, 0);

/// A socket's tuple, built alike from `sock_common` in the syscall programs (`tuple_of`) and from
/// the `bpf_sock_ops` context in the sock_ops program: the key of `IN_CTX`. No implicit padding,
/// so every byte of the key is defined.
#[repr(C)]
#[derive(Clone, Copy)]
struct TupleKey {
    /// AF_INET or AF_INET6, as the socket's family (a dual-stack socket is AF_INET6 with
    /// IPv4-mapped addresses on both sides).
    family: u16,
    /// Host order.
    local_port: u16,
    /// Host order.
    remote_port: u16,
    /// Reserved, zero.
    _pad: u16,
    /// Network order; IPv4 in the first 4 bytes.
    local_addr: [u8; 16],
    /// Network order; IPv4 in the first 4 bytes.
    remote_addr: [u8; 16],
}

/// Drop and activity counters, indexed by `CNT_*`.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(NUM_COUNTERS, 0);

/// Staging area for one event per CPU (indexed by CPU id; userspace sizes it to the possible
/// CPUs): header plus room for a copy that starts below `MAX_CAPTURE` and is at most `MAX_CAPTURE`
/// long (the verifier needs both bounds). A per-CPU array cannot hold values this large.
#[map]
static SCRATCH: Array<Scratch> = Array::with_max_entries(1, 0);

#[repr(C)]
struct Scratch {
    header: EventHeader,
    data: [u8; 2 * MAX_CAPTURE],
    /// Where [`fill_tuple`] reads the start of a `struct sock`.
    tuple: [u8; TUPLE_AREA],
    /// Records this slot has output (see [`output`]).
    records: u64,
    /// Non-zero when the ring held less than `WAKEUP_BYTES` at this slot's last look.
    below_mark: u64,
}

/// This CPU's staging area. Programs run with migration disabled, so the slot stays this CPU's.
#[inline(always)]
fn scratch() -> Option<*mut Scratch> {
    // SAFETY: returns the current CPU id.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    SCRATCH.get_ptr_mut(cpu)
}

/// This CPU's second staging area, for a program that may run in a softirq: it may have
/// interrupted another program on this CPU halfway through that one's use of [`scratch`].
#[inline(always)]
fn scratch_interrupting() -> Option<*mut Scratch> {
    // SAFETY: returns the current CPU id; plain read of a global set before load.
    let cpu = unsafe { bpf_get_smp_processor_id() + read_volatile(&NR_CPUS) };
    SCRATCH.get_ptr_mut(cpu)
}

/// How the user buffer of an in-flight syscall is described.
const BUF_PLAIN: u8 = 0;
const BUF_IOVEC: u8 = 1;
/// A `struct msghdr *` (or the first `struct mmsghdr`) whose iovecs hold the bytes.
const BUF_MSGHDR: u8 = 2;
/// Bytes move without passing through user memory (sendfile): counted, never copied.
const BUF_KERNEL: u8 = 3;

#[repr(C)]
#[derive(Clone, Copy)]
struct Inflight {
    enter_ns: u64,
    sock: u64,
    /// Plain buffer or `struct iovec *`.
    buf: u64,
    /// Buffer length or iovec count.
    len: u64,
    /// For sendmmsg/recvmmsg: the `struct mmsghdr *` whose `msg_len` holds the first message's size.
    mmsg: u64,
    /// A write on a client socket: the trace id chosen at entry for the TCP option.
    trace_id: TraceId,
    fd: i32,
    source: u8,
    direction: u8,
    buf_kind: u8,
    /// `EV_F_TRACE | EV_F_TRACE_*` when `trace_id` is set, else 0.
    trace_flags: u8,
}

/// A thread's record in `THREADS`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Thread {
    call: Inflight,
    /// The request it serves; `sock` 0 when none.
    serving: Serving,
    /// Non-zero once the thread called the SSL library (`tls::ssl_enter`): only then do its
    /// socket syscalls look for its SSL call (`tls::socket_io`), a lookup that misses for every
    /// other thread.
    ssl: u8,
    _pad: [u8; 7],
}

/// A trace id as the programs keep it; its bytes in memory order are the id.
type TraceId = [u64; 2];

/// The request a thread serves: started by its first read on a server socket, answered by its
/// first write back on that socket.
#[repr(C)]
#[derive(Clone, Copy)]
struct Serving {
    sock: u64,
    trace_id: TraceId,
    /// `EV_F_TRACE_IN_BAND` or `EV_F_TRACE_GENERATED`.
    origin: u8,
    /// `SERVING_*` bits.
    state: u8,
    _pad: [u8; 6],
}

/// [`Serving::state`]: the thread began writing the response.
const SERVING_ANSWERED: u8 = 1;
/// [`Serving::state`]: the thread started reading this request while another one, on another
/// socket, was unanswered (an event loop): its outgoing calls cannot be attributed.
const SERVING_AMBIGUOUS: u8 = 2;

/// A trace id received in band. The sock_ops program rewrites an entry in place for each request
/// on its connection (an LRU map's update allocates a new element and frees the old one, which
/// cost every request): it first empties the range, then writes the id, then the new range, each
/// range in one 64-bit store; readers load the id before the range (see [`in_band`]). On x86-64,
/// whose stores and loads keep their order, a reader that finds the new range and a read inside
/// it comes after the whole write (those bytes were queued after their segment's options were
/// parsed, under the socket's locks), and a reader that finds the old range found the old id.
#[repr(C)]
#[derive(Clone, Copy)]
struct InCtx {
    trace_id: TraceId,
    /// [`seq_range`]: sequence numbers of the first byte and after the last byte of the segments
    /// that carried this id, so a read is attributed to it only when its bytes arrived with the
    /// option. Empty while the entry is rewritten.
    range: u64,
}

/// The packed sequence range `[first, end)` of [`InCtx::range`].
#[inline(always)]
fn seq_range(first: u32, end: u32) -> u64 {
    first as u64 | (end as u64) << 32
}

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const SOCK_STREAM: u16 = 1;
const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;
const EINPROGRESS: i64 = 115;
const BPF_NOEXIST: u64 = 1;

/// Offsets of the syscall tracepoint records: args start after the common header and syscall nr.
const ARG0: usize = 16;
const RET: usize = 16;

/// Field `$f` of [`OFFSETS`], read on its own: a volatile read of the whole struct loads every
/// field (22 loads and their spills, each time a program needs one), and a plain read would let the
/// compiler fold in the zero initialiser that userspace rewrites before load. The verifier knows
/// each value as a constant of the frozen read-only data.
macro_rules! off {
    ($f:ident) => {
        offset_at(core::ptr::addr_of!(OFFSETS.$f))
    };
}

/// See [`off!`].
#[inline(always)]
fn offset_at(field: *const u32) -> u32 {
    // SAFETY: `field` points into `OFFSETS`, a global.
    unsafe { read_volatile(field) }
}

#[inline(always)]
fn count(idx: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn kread<T: Copy>(addr: u64) -> Option<T> {
    let mut v = core::mem::MaybeUninit::<T>::uninit();
    // SAFETY: bpf_probe_read_kernel validates the address and fails instead of faulting.
    let rc = unsafe {
        bpf_probe_read_kernel(
            v.as_mut_ptr() as *mut c_void,
            core::mem::size_of::<T>() as u32,
            addr as *const c_void,
        )
    };
    // SAFETY: the helper filled all of `v` when it returned 0.
    if rc == 0 {
        Some(unsafe { v.assume_init() })
    } else {
        None
    }
}

/// Socket `typed` (a BTF pointer to a `struct sock`, where the caller has one) as the kernel
/// types a TCP socket: `Some(0)` for a socket of another kind, `None` without a BTF pointer.
#[inline(always)]
fn tcp_typed(typed: Option<u64>) -> Option<u64> {
    // SAFETY: `sk` is a BTF pointer to a `struct sock`; the helper returns it as a `tcp_sock`, or
    // null for a socket of another kind.
    typed.map(|sk| unsafe { bpf_skc_to_tcp_sock(sk as *mut c_void) } as u64)
}

/// The `u32` at offset `member` of TCP socket `sock`'s `struct tcp_sock`. Where the caller has
/// the socket typed as a TCP socket (`tp`, from [`tcp_typed`]), a plain load: the verifier checks
/// it against the kernel's type (`member` is a constant of the frozen read-only data) and makes
/// it one that cannot fault. Otherwise a `bpf_probe_read_kernel` call, ~25 ns more on every
/// captured syscall.
#[inline(always)]
fn tcp_u32(tp: Option<u64>, sock: u64, member: u32) -> Option<u32> {
    let Some(tp) = tp else {
        return kread(sock + member as u64);
    };
    if tp == 0 {
        return None;
    }
    // SAFETY: a load through a BTF pointer, checked by the verifier and made fault-tolerant.
    Some(unsafe { read_volatile((tp + member as u64) as *const u32) })
}

/// When TCP last read the monotonic clock for typed TCP socket `tp` (see [`tcp_typed`]), the
/// clock `bpf_ktime_get_ns` reads: after a read that returned bytes, the time of its last copy
/// (`tcp_recvmsg` refreshes `tcp_clock_cache` after each, in `tcp_rcv_space_adjust`, on every
/// kernel with the socket-layer tracepoints; `late_reads.c` checks it in the end-to-end tests).
/// `None` where BTF lacks the fields, for a socket in a sockmap, or before TCP read the clock.
#[inline(always)]
fn tcp_clock(tp: u64) -> Option<u64> {
    let (member, psock) = (off!(tcp_clock_cache), off!(sk_user_data));
    if member == 0 || psock == 0 {
        return None;
    }
    // SAFETY: loads through a BTF pointer (a `tcp_sock` begins with its `struct sock`), checked
    // by the verifier and made fault-tolerant.
    let (at, psock) = unsafe {
        (
            read_volatile((tp + member as u64) as *const u64),
            read_volatile((tp + psock as u64) as *const u64),
        )
    };
    // A socket in a sockmap is read through its psock, which may hand over bytes that never
    // passed this socket's TCP receive: its clock may be long stale.
    (at != 0 && psock == 0).then_some(at)
}

/// A field of the tracepoint record at constant offset `off`, loaded straight from the context
/// (tracepoint programs may read their record directly: one instruction instead of a
/// `bpf_probe_read_kernel` call, on every hooked syscall).
#[inline(always)]
fn ctx_field<T: Copy>(ctx: &TracePointContext, off: usize) -> T {
    // SAFETY: `off` is a constant inside the syscall tracepoint record and aligned for `T`; the
    // verifier checks both.
    unsafe { read_volatile((ctx.as_ptr() as *const u8).add(off) as *const T) }
}

#[inline(always)]
fn arg(ctx: &TracePointContext, n: usize) -> u64 {
    // Syscall tracepoint records hold six 8-byte arguments from offset 16.
    ctx_field::<u64>(ctx, ARG0 + 8 * n)
}

/// The return value of a sys_exit record. Exit programs read their record through the helper,
/// not with [`ctx_field`]: with the direct load, the 6.18 verifier rejects the 32-iovec exit
/// program of writev as too complex (the agent would fall back to copying 8 iovecs).
#[inline(always)]
fn ret(ctx: &TracePointContext) -> i64 {
    // SAFETY: sys_exit records hold the 8-byte return value at offset 16.
    unsafe { ctx.read_at::<i64>(RET) }.unwrap_or(-1)
}

/// Whether the current process is traced at all.
#[inline(always)]
fn traced(tgid: u32) -> bool {
    // SAFETY: plain reads of globals set before load.
    if tgid == unsafe { read_volatile(&AGENT_TGID) } {
        return false;
    }
    if unsafe { read_volatile(&FILTER_PIDS) } != 0 {
        // SAFETY: the value is a flag byte; aliasing does not matter.
        return unsafe { PIDS.get(tgid) }.is_some();
    }
    true
}

/// The `T` at offset `off` of kernel pointer `p`: a plain load where `typed` says `p` is a BTF
/// pointer (see [`tcp_u32`]) and `off` lies within its type, else a `bpf_probe_read_kernel` call.
#[inline(always)]
fn kload<T: Copy>(typed: bool, p: u64, off: u32) -> Option<T> {
    if typed {
        // SAFETY: a load through a BTF pointer, checked by the verifier against the kernel's
        // type and made fault-tolerant.
        return Some(unsafe { read_volatile((p + off as u64) as *const T) });
    }
    kread(p + off as u64)
}

/// Whether connection `sk` passes the port filter: filtering here keeps other traffic out of the
/// ring buffer altogether.
#[inline(always)]
fn port_wanted(sk: u64) -> bool {
    port_wanted_at(sk, false)
}

/// [`port_wanted`], through plain loads where `typed` says `sk` is a BTF pointer.
#[inline(always)]
fn port_wanted_at(sk: u64, typed: bool) -> bool {
    // SAFETY: plain read of a global set before load.
    if unsafe { read_volatile(&FILTER_PORTS) } == 0 {
        return true;
    }
    let local: u16 = kload(typed, sk, off!(sk_num)).unwrap_or(0);
    let remote = u16::from_be(kload(typed, sk, off!(sk_dport)).unwrap_or(0));
    // SAFETY: presence checks only.
    unsafe { PORTS.get(local).is_some() || PORTS.get(remote).is_some() }
}

/// The `struct sock` behind `fd` in the current task, when it is a TCP/IP stream socket.
#[inline(always)]
fn sock_of_fd(fd: i64) -> Option<u64> {
    let (sk, file, by_fops) = socket_of_fd(fd)?;
    tcp_stream(sk, file, by_fops).then_some(sk)
}

/// The `struct sock` behind `fd` in the current task when it is a socket of any kind, with its
/// `struct file` and whether its operations were matched against the learned `socket_file_ops`
/// (see [`tcp_stream`]).
#[inline(always)]
fn socket_of_fd(fd: i64) -> Option<(u64, u64, bool)> {
    if fd < 0 {
        return None;
    }
    // SAFETY: plain read of a global set before load.
    let (max_fds, fd_array) = if unsafe { read_volatile(&TASK_BTF) } != 0 {
        // SAFETY: the current task as a BTF pointer. The verifier checks each load from it
        // against the kernel's types (the offsets are constants of the frozen read-only data)
        // and turns it into a plain load that cannot fault; `files` and `fdt` are typed
        // pointers too, `fdt->fd` is not.
        unsafe {
            let task = bpf_get_current_task_btf() as u64;
            let files: u64 = read_volatile((task + off!(task_files) as u64) as *const u64);
            if files == 0 {
                return None;
            }
            let fdt: u64 = read_volatile((files + off!(files_fdt) as u64) as *const u64);
            if fdt == 0 {
                return None;
            }
            (
                read_volatile((fdt + off!(fdt_max_fds) as u64) as *const u32),
                read_volatile((fdt + off!(fdt_fd) as u64) as *const u64),
            )
        }
    } else {
        // SAFETY: returns the current task pointer; only dereferenced through probe reads.
        let task = unsafe { bpf_get_current_task() };
        let files: u64 = kread(task + off!(task_files) as u64)?;
        let fdt: u64 = kread(files + off!(files_fdt) as u64)?;
        let max_fds: u32 = kread(fdt + off!(fdt_max_fds) as u64)?;
        (max_fds, kread::<u64>(fdt + off!(fdt_fd) as u64)?)
    };
    if fd as u64 >= max_fds as u64 {
        return None;
    }
    let file: u64 = kread(fd_array + 8 * fd as u64)?;
    if file == 0 {
        return None;
    }
    let known = SOCKET_FOPS.get(0).copied().unwrap_or(0);
    if known != 0 {
        let f_op: u64 = kread(file + off!(file_f_op) as u64)?;
        if f_op != known {
            return None;
        }
    } else {
        let inode: u64 = kread(file + off!(file_inode) as u64)?;
        let mode: u16 = kread(inode + off!(inode_mode) as u64)?;
        if mode & S_IFMT != S_IFSOCK {
            return None;
        }
    }
    let socket: u64 = kread(file + off!(file_private_data) as u64)?;
    let sk: u64 = kread(socket + off!(socket_sk) as u64)?;
    if sk == 0 {
        return None;
    }
    Some((sk, file, known != 0))
}

/// Whether `sk` is a TCP/IP stream socket.
#[inline(always)]
fn tcp_sock(sk: u64) -> bool {
    tcp_sock_at(sk, false)
}

/// [`tcp_sock`], through plain loads where `typed` says `sk` is a BTF pointer.
#[inline(always)]
fn tcp_sock_at(sk: u64, typed: bool) -> bool {
    let family: u16 = kload(typed, sk, off!(sk_family)).unwrap_or(0);
    (family == AF_INET || family == AF_INET6)
        && kload::<u16>(typed, sk, off!(sk_type)) == Some(SOCK_STREAM)
}

/// Whether socket `sk` (of `file`) is a TCP/IP stream socket. The first one found teaches the
/// programs `socket_file_ops` unless `by_fops` says they know it already.
#[inline(always)]
fn tcp_stream(sk: u64, file: u64, by_fops: bool) -> bool {
    if !tcp_sock(sk) {
        return false;
    }
    // Learned only from a socket whose `struct sock` checked out: a file opened with O_PATH on a
    // socket's path has a socket inode but other operations (and no socket).
    if !by_fops
        && let (Some(f_op), Some(slot)) = (
            kread::<u64>(file + off!(file_f_op) as u64),
            SOCKET_FOPS.get_ptr_mut(0),
        )
    {
        // SAFETY: pointer from a successful lookup; racing writers store the same value.
        unsafe { *slot = f_op };
    }
    true
}

/// What the programs use of a connection's state after advancing it: a copy small enough for
/// the exit programs' stack, which holds no room for the whole [`ConnState`].
#[derive(Clone, Copy, Default)]
struct Conn {
    conn_id: u64,
    role: u8,
    flags: u8,
}

impl Conn {
    /// The state of connection `sk`, when the programs know it.
    #[inline(always)]
    fn of(sk: u64) -> Option<Conn> {
        // SAFETY: from a successful lookup.
        CONNS.get_ptr(sk).map(|c| unsafe { Conn::at(c) })
    }

    /// The fields of the state at `c`.
    ///
    /// # Safety
    /// `c` comes from a successful lookup in `CONNS`.
    #[inline(always)]
    unsafe fn at(c: *const ConnState) -> Conn {
        // SAFETY: the caller's pointer is into a live map value.
        unsafe {
            Conn {
                conn_id: (*c).conn_id,
                role: (*c).role,
                flags: (*c).flags,
            }
        }
    }
}

/// The connection state of `sk` (created, role unknown, on first sight) with the stream offset of
/// this event; advances that direction's byte count by `bytes`, and makes process `tgid` (the
/// current one) the connection's owner.
#[inline(always)]
fn conn_advance(sk: u64, tgid: u32, now: u64, direction: u8, bytes: u64) -> (Conn, u64) {
    let (conn, offset, _) = conn_advance_at(None, sk, tgid, now, direction, bytes);
    (conn, offset)
}

/// [`conn_advance`] with the state of `sk` when the caller looked it up already (`found`); also
/// returns where the state lives in the map, when it does.
#[inline(always)]
fn conn_advance_at(
    found: Option<*mut ConnState>,
    sk: u64,
    tgid: u32,
    now: u64,
    direction: u8,
    bytes: u64,
) -> (Conn, u64, Option<*mut ConnState>) {
    // One lookup for a known connection: every captured syscall comes here.
    let c = match found.or_else(|| CONNS.get_ptr_mut(sk)) {
        Some(c) => c,
        None => {
            let fresh = ConnState {
                conn_id: now,
                ..ConnState::default()
            };
            if CONNS.insert(sk, fresh, BPF_NOEXIST).is_err() && CONNS.get_ptr(sk).is_none() {
                count(CNT_CONN_FULL);
                return (
                    Conn {
                        conn_id: now,
                        ..Conn::default()
                    },
                    0,
                    None,
                );
            }
            let Some(c) = CONNS.get_ptr_mut(sk) else {
                return (Conn::default(), 0, None);
            };
            c
        }
    };
    // SAFETY: pointer from a successful lookup. Two threads writing one socket at once may race
    // on the counter; userspace then sees a small bogus gap, never a crash.
    unsafe {
        let counter = if direction == DIR_SEND {
            &mut (*c).sent
        } else {
            &mut (*c).received
        };
        let offset = *counter;
        *counter = offset + bytes;
        (*c).owner = tgid;
        (Conn::at(c), offset, Some(c))
    }
}

/// A new connection on `sk`: a fresh identity, whatever an earlier socket at this address had.
#[inline(always)]
fn conn_open(sk: u64, role: u8) {
    // SAFETY: reads the monotonic clock.
    let now = unsafe { bpf_ktime_get_ns() };
    // Only a client's writes choose trace ids (see `client_write`).
    let local =
        role == ROLE_CLIENT && trace_context() && local_hand_over() && is_local(&tuple_of(sk));
    let c = ConnState {
        conn_id: now,
        role,
        flags: if local { CONN_F_LOCAL } else { 0 },
        ..ConnState::default()
    };
    if CONNS.insert(sk, c, 0).is_err() {
        count(CNT_CONN_FULL);
    }
}

/// The tuple of `sk` as `IN_CTX`'s key: [`fill_tuple`]'s one read, into this CPU's scratch
/// header (which the exit program the caller tail-calls rewrites whole).
#[inline(always)]
fn tuple_of(sk: u64) -> TupleKey {
    let Some(scratch) = scratch() else {
        // SAFETY: all-zero bytes are a valid key (plain integers); it matches no entry.
        return unsafe { core::mem::zeroed() };
    };
    // SAFETY: the per-CPU scratch slot belongs to this program invocation until it returns.
    let scratch = unsafe { &mut *scratch };
    fill_tuple(&mut scratch.header, &mut scratch.tuple, sk);
    tuple_key(&scratch.header)
}

/// The family and tuple the connection's state (at `slot`) keeps, once an event has stored them
/// there (see [`conn_tuple`]).
#[inline(always)]
fn kept_tuple(slot: Option<*const ConnState>) -> Option<(u8, &'static ConnTuple)> {
    let c = slot?;
    // SAFETY: pointer from a successful lookup into a map value; the family, which writers
    // store last, says whether the tuple is whole.
    let family = unsafe { read_volatile(addr_of!((*c).family)) };
    // SAFETY: as above.
    (family != 0).then(|| (family, unsafe { &(*c).tuple }))
}

/// [`tuple_of`], from the tuple the connection's state keeps (at `slot`), when it does.
#[inline(always)]
fn conn_tuple_key(sk: u64, slot: Option<*const ConnState>) -> TupleKey {
    if let Some((family, t)) = kept_tuple(slot) {
        return canonical(TupleKey {
            family: family as u16,
            local_port: t.local_port,
            remote_port: t.remote_port,
            _pad: 0,
            local_addr: t.local_addr,
            remote_addr: t.remote_addr,
        });
    }
    tuple_of(sk)
}

/// The `IN_CTX` key of the tuple [`fill_tuple`] wrote into `h`.
#[inline(always)]
fn tuple_key(h: &EventHeader) -> TupleKey {
    canonical(TupleKey {
        family: h.family as u16,
        local_port: h.local_port,
        remote_port: h.remote_port,
        _pad: 0,
        local_addr: h.local_addr,
        remote_addr: h.remote_addr,
    })
}

/// The four 32-bit words of an address, in memory order.
#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    // SAFETY: 16 plain bytes are four u32.
    unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(*a) }
}

/// The third word of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), in memory order.
const V4_MAPPED: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// `t` with an IPv4-mapped pair (a dual-stack IPv6 socket talking IPv4) written as IPv4, so that
/// both ends of a connection key it alike whichever family each socket has.
#[inline(always)]
fn canonical(mut t: TupleKey) -> TupleKey {
    let (l, r) = (words(&t.local_addr), words(&t.remote_addr));
    if t.family == AF_INET6
        && l[0] | l[1] | r[0] | r[1] == 0
        && l[2] == V4_MAPPED
        && r[2] == V4_MAPPED
    {
        t.family = AF_INET;
        t.local_addr = [0; 16];
        t.remote_addr = [0; 16];
        t.local_addr[..4].copy_from_slice(&l[3].to_ne_bytes());
        t.remote_addr[..4].copy_from_slice(&r[3].to_ne_bytes());
    }
    t
}

/// Whether the other end of canonical tuple `t` is on this host: a loopback address, or the
/// connection's own local address (traffic to the host's own address goes through loopback too).
#[inline(always)]
fn is_local(t: &TupleKey) -> bool {
    let (l, r) = (words(&t.local_addr), words(&t.remote_addr));
    if t.family == AF_INET {
        return t.remote_addr[0] == 127 || r[0] == l[0];
    }
    let loopback = r[0] | r[1] | r[2] == 0 && r[3] == u32::from_ne_bytes([0, 0, 0, 1]);
    loopback || (r[0] == l[0] && r[1] == l[1] && r[2] == l[2] && r[3] == l[3])
}

/// Whether connections within the host carry the trace id in memory rather than in the TCP
/// option (see `LOCAL_OPTION`).
#[inline(always)]
fn local_hand_over() -> bool {
    // SAFETY: plain read of a global set before load.
    unsafe { read_volatile(&LOCAL_OPTION) == 0 }
}

/// Bytes of `struct sock` read at once for the tuple: `sock_common`'s addresses, ports and family
/// lie in its first 88 bytes on the kernels the agent supports (their offsets come from BTF; a
/// kernel where they do not fit takes one read per field).
const TUPLE_READ: usize = 96;
/// Size of [`Scratch::tuple`], a power of two above [`TUPLE_READ`]: offsets into it are masked
/// with `TUPLE_AREA - 1`, a bound the verifier sees whatever it knows of the offsets.
const TUPLE_AREA: usize = 128;

/// Writes the tuple of `sk` into the header: one `bpf_probe_read_kernel` of the start of
/// `sock_common` into `area` (the scratch's staging room, where the exit programs' copy loop, near
/// the verifier's limit, has no key on its stack to track), then loads from it.
#[inline(always)]
fn fill_tuple(h: &mut EventHeader, area: &mut [u8; TUPLE_AREA], sk: u64) {
    let fits = |off: u32, size: usize| off as usize + size <= TUPLE_READ;
    // Constants of the frozen read-only data: the verifier keeps one branch.
    if !(fits(off!(sk_family), 2)
        && fits(off!(sk_dport), 2)
        && fits(off!(sk_num), 2)
        && fits(off!(sk_rcv_saddr), 4)
        && fits(off!(sk_daddr), 4)
        && fits(off!(sk_v6_rcv_saddr), 16)
        && fits(off!(sk_v6_daddr), 16))
    {
        fill_tuple_by_field(h, sk);
        return;
    }
    // SAFETY: `TUPLE_READ` bytes fit in `area`; the helper fails instead of faulting.
    let rc = unsafe {
        bpf_probe_read_kernel(
            area.as_mut_ptr() as *mut c_void,
            TUPLE_READ as u32,
            sk as *const c_void,
        )
    };
    if rc != 0 {
        h.family = 0;
        h.local_port = 0;
        h.remote_port = 0;
        h.local_addr = [0; 16];
        h.remote_addr = [0; 16];
        return;
    }
    let base = area.as_ptr();
    // SAFETY: each offset is masked below `TUPLE_AREA` and checked above to end within
    // `TUPLE_READ`, so every load stays inside `area`; unaligned loads are fine in BPF.
    let at = |off: u32| unsafe { base.add(off as usize & (TUPLE_AREA - 1)) };
    // SAFETY: as above.
    unsafe {
        let family = (at(off!(sk_family)) as *const u16).read_unaligned();
        h.family = family as u8;
        h.remote_port = u16::from_be((at(off!(sk_dport)) as *const u16).read_unaligned());
        h.local_port = (at(off!(sk_num)) as *const u16).read_unaligned();
        if family == AF_INET6 {
            h.local_addr = (at(off!(sk_v6_rcv_saddr)) as *const [u8; 16]).read_unaligned();
            h.remote_addr = (at(off!(sk_v6_daddr)) as *const [u8; 16]).read_unaligned();
        } else {
            h.local_addr = [0; 16];
            h.remote_addr = [0; 16];
            h.local_addr[..4]
                .copy_from_slice(&(at(off!(sk_rcv_saddr)) as *const [u8; 4]).read_unaligned());
            h.remote_addr[..4]
                .copy_from_slice(&(at(off!(sk_daddr)) as *const [u8; 4]).read_unaligned());
        }
    }
}

/// Writes the tuple of `sk` into the header from its connection's state (at `slot`), else as
/// [`fill_tuple`] does, keeping it there once it is whole (a client's local port comes after its
/// first state change): a connection's tuple never changes, and reading it from the socket cost
/// every event a helper call.
#[inline(always)]
fn conn_tuple(
    h: &mut EventHeader,
    area: &mut [u8; TUPLE_AREA],
    sk: u64,
    slot: Option<*mut ConnState>,
) {
    if let Some((family, t)) = kept_tuple(slot.map(|c| c as *const ConnState)) {
        h.family = family;
        h.local_addr = t.local_addr;
        h.remote_addr = t.remote_addr;
        h.local_port = t.local_port;
        h.remote_port = t.remote_port;
        return;
    }
    fill_tuple(h, area, sk);
    if h.family != 0
        && h.local_port != 0
        && h.remote_port != 0
        && let Some(c) = slot
    {
        // SAFETY: as above. Racing writers store the same tuple.
        unsafe {
            let t = &mut (*c).tuple;
            t.local_addr = h.local_addr;
            t.remote_addr = h.remote_addr;
            t.local_port = h.local_port;
            t.remote_port = h.remote_port;
            core::ptr::write_volatile(core::ptr::addr_of_mut!((*c).family), h.family);
        }
    }
}

/// [`fill_tuple`] with one read per field.
#[inline(always)]
fn fill_tuple_by_field(h: &mut EventHeader, sk: u64) {
    let family: u16 = kread(sk + off!(sk_family) as u64).unwrap_or(0);
    h.family = family as u8;
    let dport: u16 = kread(sk + off!(sk_dport) as u64).unwrap_or(0);
    h.remote_port = u16::from_be(dport);
    h.local_port = kread(sk + off!(sk_num) as u64).unwrap_or(0);
    if family == AF_INET6 {
        h.local_addr = kread(sk + off!(sk_v6_rcv_saddr) as u64).unwrap_or([0; 16]);
        h.remote_addr = kread(sk + off!(sk_v6_daddr) as u64).unwrap_or([0; 16]);
    } else {
        let l: [u8; 4] = kread(sk + off!(sk_rcv_saddr) as u64).unwrap_or([0; 4]);
        let r: [u8; 4] = kread(sk + off!(sk_daddr) as u64).unwrap_or([0; 4]);
        h.local_addr = [0; 16];
        h.remote_addr = [0; 16];
        h.local_addr[..4].copy_from_slice(&l);
        h.remote_addr[..4].copy_from_slice(&r);
    }
}

/// Whether the trace context runs (see `TRACE_CONTEXT`).
#[inline(always)]
fn trace_context() -> bool {
    // SAFETY: plain read of a global set before load.
    unsafe { read_volatile(&TRACE_CONTEXT) != 0 }
}

/// 16 random bytes, never all zero (an invalid W3C trace id).
#[inline(always)]
fn random_trace_id() -> TraceId {
    // SAFETY: the helper has no preconditions.
    let r = || unsafe { bpf_get_prandom_u32() } as u64;
    let a = r() | r() << 32;
    let b = r() | r() << 32;
    [a, if a | b == 0 { 1 } else { b }]
}

/// The bytes of a trace id as events and the TCP option carry them.
#[inline(always)]
fn trace_bytes(id: TraceId) -> [u8; 16] {
    // SAFETY: two u64 are 16 plain bytes.
    unsafe { core::mem::transmute::<TraceId, [u8; 16]>(id) }
}

/// The trace id received in band on the socket with tuple `key`, when the bytes read from sequence
/// number `seq` on arrived with it (without a sequence number, the last one received).
#[inline(always)]
fn in_band(key: TupleKey, seq: Option<u32>) -> Option<TraceId> {
    let c = IN_CTX.get_ptr(&key)?;
    // SAFETY: pointer from a successful lookup; the id is loaded before the range (see `InCtx`).
    let (trace_id, range) = unsafe {
        let id = read_volatile(addr_of!((*c).trace_id));
        (id, read_volatile(addr_of!((*c).range)))
    };
    let (first, end) = (range as u32, (range >> 32) as u32);
    if first == end {
        // Being rewritten.
        return None;
    }
    match seq {
        Some(s) if s.wrapping_sub(first) >= end.wrapping_sub(first) => None,
        _ => Some(trace_id),
    }
}

/// Records that the bytes with sequence numbers `[first, end)` arriving on the socket with tuple
/// `key` carry trace id `trace_id`, rewriting the socket's entry in place in the order [`InCtx`]
/// describes for its readers: more bytes of the id it holds widen its range, another id replaces
/// it. Callers are the socket's only writers at the time: the sock_ops program parses one
/// segment at a time under the socket's lock, and [`hand_over`] runs in the sending call, before
/// the bytes are queued.
#[inline(always)]
fn in_ctx_record(key: &TupleKey, trace_id: TraceId, first: u32, end: u32) {
    match IN_CTX.get_ptr_mut(key) {
        // SAFETY: pointer from a successful lookup; volatile stores, in the order `InCtx`
        // describes.
        Some(c) => unsafe {
            let range = addr_of_mut!((*c).range);
            if read_volatile(addr_of!((*c).trace_id)) == trace_id {
                // More of the same request (or a retransmission): widen the range.
                let old = read_volatile(range);
                let (mut lo, mut hi) = (old as u32, (old >> 32) as u32);
                if (first.wrapping_sub(lo) as i32) < 0 || lo == hi {
                    lo = first;
                }
                if (end.wrapping_sub(hi) as i32) > 0 {
                    hi = end;
                }
                write_volatile(range, seq_range(lo, hi));
            } else {
                // A new request: empty range, id, then its range.
                write_volatile(range, seq_range(first, first));
                write_volatile(addr_of_mut!((*c).trace_id), trace_id);
                write_volatile(range, seq_range(first, end));
            }
        },
        None => {
            let entry = InCtx {
                trace_id,
                range: seq_range(first, end),
            };
            let _ = IN_CTX.insert(key, &entry, 0);
        }
    }
}

/// Bytes a local write's hand-over covers when the call's length is not known: later writes of
/// the connection rewrite the range before any byte beyond the call's is read.
const OPEN_RANGE: u32 = 1 << 30;

/// A write on a local client connection ([`CONN_F_LOCAL`], both ends on this host) that chose
/// trace id `id` (all zero: no id) for its next `len` bytes (0: not known): what the TCP option
/// would bring the receiving socket, written into that socket's `IN_CTX` entry (keyed by the
/// tuple seen from its side) before the kernel queues a byte. The option itself would cost every
/// segment the sock_ops program's runs and the receiver TCP's slow path; the agent sees both
/// ends here, so nothing needs to travel on the wire. `conn` is the socket's state and `typed`
/// the socket as a BTF pointer, when the caller has them (see [`tcp_u32`]).
#[inline(always)]
fn hand_over(sock: u64, typed: Option<u64>, conn: Option<*const ConnState>, id: TraceId, len: u64) {
    let member = off!(tcp_write_seq);
    if member == 0 {
        return;
    }
    // The sequence number of the first byte this call sends.
    let Some(first) = tcp_u32(tcp_typed(typed), sock, member) else {
        return;
    };
    let t = conn_tuple_key(sock, conn);
    let key = TupleKey {
        family: t.family,
        local_port: t.remote_port,
        remote_port: t.local_port,
        _pad: 0,
        local_addr: t.remote_addr,
        remote_addr: t.local_addr,
    };
    let span = if len == 0 || len > OPEN_RANGE as u64 {
        OPEN_RANGE
    } else {
        len as u32
    };
    if id[0] | id[1] != 0 {
        in_ctx_record(&key, id, first, first.wrapping_add(span));
    } else if let Some(c) = IN_CTX.get_ptr_mut(&key) {
        // No id for these bytes (an ambiguous thread): an empty range gives them none.
        // SAFETY: pointer from a successful lookup; one 64-bit store.
        unsafe { write_volatile(addr_of_mut!((*c).range), seq_range(first, first)) };
    }
}

/// A read of request bytes on server socket `sock` by the current thread (`thread`, its record):
/// the trace id of the request and its origin (`EV_F_TRACE_IN_BAND` or `EV_F_TRACE_GENERATED`).
/// Further reads of an unanswered request on the same socket belong to it; any other read starts
/// a new request, ambiguous when the thread still owes another socket an answer. `key` gives the
/// socket's tuple, asked for only when a new request starts.
#[inline(always)]
fn serve_read(
    thread: *mut Thread,
    sock: u64,
    seq: Option<u32>,
    key: impl FnOnce() -> TupleKey,
) -> (TraceId, u8) {
    // SAFETY: the thread's own record, from a successful lookup.
    let prev = unsafe { (*thread).serving };
    let mut state = 0;
    if prev.sock != 0 && prev.state & SERVING_ANSWERED == 0 {
        if prev.sock == sock {
            return (prev.trace_id, prev.origin);
        }
        state = SERVING_AMBIGUOUS;
    }
    let (trace_id, origin) = match in_band(key(), seq) {
        Some(id) => (id, EV_F_TRACE_IN_BAND),
        None => (random_trace_id(), EV_F_TRACE_GENERATED),
    };
    let entry = Serving {
        sock,
        trace_id,
        origin,
        state,
        _pad: [0; 6],
    };
    // SAFETY: as above; only this thread writes its own record.
    unsafe { (*thread).serving = entry };
    (trace_id, origin)
}

/// A write on server socket `sock`: the thread's request on it is being answered.
#[inline(always)]
fn serve_write(thread: *mut Thread, sock: u64) {
    // SAFETY: the thread's own record, from a successful lookup; only this thread writes it.
    unsafe {
        if (*thread).serving.sock == sock {
            (*thread).serving.state |= SERVING_ANSWERED;
        }
    }
}

/// A write on a client connection (`c`, its state) by the current thread, before the kernel
/// sends anything: picks the trace id for the TCP option of its segments and keeps it in the
/// connection's state, where the sock_ops program reads it. The request the thread serves gives
/// it; a thread that serves none starts a trace (later writes of the same request, before a
/// response byte is read, keep it); an ambiguous thread sends none.
#[inline(always)]
fn client_write(thread: *mut Thread, c: *mut ConnState) -> Option<(TraceId, u8)> {
    // SAFETY: the thread's own record, from a successful lookup.
    let serving = Some(unsafe { (*thread).serving }).filter(|s| s.sock != 0);
    // SAFETY: `c` is from a successful lookup in `CONNS`.
    let (current, origin, responded) =
        unsafe { ((*c).out_trace_id, (*c).out_origin, (*c).out_responded) };
    let chosen = match serving {
        Some(s) if s.state & SERVING_ANSWERED == 0 => {
            if s.state & SERVING_AMBIGUOUS != 0 {
                None
            } else {
                Some((s.trace_id, s.origin))
            }
        }
        _ if origin != 0 && responded == 0 => Some((current, origin)),
        _ => Some((random_trace_id(), EV_F_TRACE_GENERATED)),
    };
    // In place, in the connection's state: the sock_ops program may read it meanwhile on another
    // CPU (a segment of the previous request sent from softirq); it then writes a mix of the two
    // ids, which links that segment's request to nothing rather than to another trace.
    // SAFETY: as above; plain stores into a live map value.
    unsafe {
        match chosen {
            Some((trace_id, origin)) => {
                (*c).out_trace_id = trace_id;
                (*c).out_origin = origin;
                (*c).out_responded = 0;
            }
            None => (*c).out_origin = 0,
        }
    }
    chosen
}

/// Whether a connection with these `CONN_F_*` flags makes spans that a trace id could link: not
/// one userspace ignores (unknown protocol, filtered out), unless it is TLS (its ciphertext is
/// ignored, its plaintext makes the spans).
#[inline(always)]
fn wants_trace(flags: u8) -> bool {
    flags & CONN_F_NO_PAYLOAD == 0 || flags & CONN_F_TLS != 0
}

/// The trace context of TLS plaintext on `sock` moved by the current thread, as the syscall
/// programs chose it for the ciphertext underneath: for a read on a server socket, the request the
/// thread serves on it; for a write on a client socket, the id its TCP option carries, from the
/// connection's state (`slot`, where it lives in `CONNS`).
#[inline(always)]
fn tls_trace(
    pid_tgid: u64,
    sock: u64,
    conn: &Conn,
    slot: Option<*mut ConnState>,
    direction: u8,
) -> Option<(TraceId, u8)> {
    if !trace_context() {
        return None;
    }
    if conn.role == ROLE_SERVER && direction == DIR_RECV {
        // SAFETY: copied out of the map.
        let s = unsafe { THREADS.get(pid_tgid) }.copied()?.serving;
        if s.sock == sock && s.state & SERVING_AMBIGUOUS == 0 {
            return Some((s.trace_id, s.origin));
        }
    } else if conn.role == ROLE_CLIENT && direction == DIR_SEND {
        let c = slot?;
        // SAFETY: `c` is from a successful lookup in `CONNS`.
        let (trace_id, origin) = unsafe { ((*c).out_trace_id, (*c).out_origin) };
        if origin != 0 {
            return Some((trace_id, origin));
        }
    }
    None
}

/// A read of response bytes on a client connection (`c`, its state): its next write is a new
/// request.
#[inline(always)]
fn client_read(c: *mut ConnState) {
    // SAFETY: `c` is from a successful lookup in `CONNS`; one byte's store.
    unsafe { (*c).out_responded = 1 };
}

/// Records a data syscall's entry when its fd is a TCP socket.
#[inline(always)]
fn enter_io(ctx: &TracePointContext, source: u8, direction: u8, buf_kind: u8) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !traced((pid_tgid >> 32) as u32) {
        return 0;
    }
    let args = [arg(ctx, 0), arg(ctx, 1), arg(ctx, 2)];
    let Some((sock, file, by_fops)) = socket_of_fd(args[0] as i64) else {
        return 0;
    };
    let found = CONNS.get_ptr_mut(sock);
    // SAFETY: copied out of the map, from a successful lookup.
    let conn = found.map(|c| unsafe { Conn::at(c) });
    // A socket the programs know is a TCP one: its family and type need no reads. An entry can
    // outlive its socket, whose memory TCP's own slab cache then gives to the next TCP socket;
    // only a slab page returned to the page allocator could come back as another kind of socket
    // at the same address.
    if conn.is_none() && !tcp_stream(sock, file, by_fops) {
        return 0;
    }
    let Some(mut inflight) = inflight_of(args, sock, source, direction, buf_kind) else {
        return 0;
    };
    if let Some(conn) = conn
        && !wants_trace(conn.flags)
    {
        // A connection userspace ignores (unknown protocol, filtered out): nothing to record,
        // so no in-flight entry and nothing for the exit program to do. Its byte counts stop
        // advancing; only data events read them. An SSL call running on this thread still
        // learns its socket (a protocol upgraded to TLS after plaintext userspace ignored).
        tls::socket_io(pid_tgid, inflight.sock, || inflight.fd, conn.conn_id);
        return 0;
    }
    // Only a client's send's entry is timed: a read's span time is when its bytes arrived, its
    // exit, and a server's send's is when it ended, when the response left (the clock costs
    // ~50 ns per read here). 1 keeps a record live.
    let server = conn.is_some_and(|c| c.role == ROLE_SERVER);
    inflight.enter_ns = if direction == DIR_SEND && !server {
        // SAFETY: reads the monotonic clock.
        unsafe { bpf_ktime_get_ns() }
    } else {
        1
    };
    let Some(thread) = thread_of(pid_tgid) else {
        return 0;
    };
    // At entry, before the kernel sends a byte, so the option goes out with the request.
    if direction == DIR_SEND && trace_context() {
        // Every connection left here makes spans (a TLS one from its plaintext, whose client
        // writes still choose the trace id the SSL probes report).
        if let (Some(conn), Some(c)) = (conn, found) {
            if conn.role == ROLE_SERVER {
                serve_write(thread, inflight.sock);
            } else if conn.role == ROLE_CLIENT {
                let chosen = client_write(thread, c);
                if conn.flags & CONN_F_LOCAL != 0 {
                    // A plain buffer's length is the call's; through iovecs it is not known here.
                    let len = if buf_kind == BUF_PLAIN {
                        inflight.len
                    } else {
                        0
                    };
                    // An id travels as its value, none as zero: an `Option`'s `None` leaves
                    // the id's registers undefined, which the verifier refuses to see stored.
                    hand_over(
                        inflight.sock,
                        None,
                        Some(c),
                        chosen.map_or([0, 0], |(id, _)| id),
                        len,
                    );
                }
                if let Some((id, origin)) = chosen {
                    inflight.trace_id = id;
                    inflight.trace_flags = EV_F_TRACE | origin;
                }
            }
        }
    }
    // SAFETY: the thread's own record, from a successful lookup; only this thread uses its key.
    unsafe { (*thread).call = inflight };
    0
}

/// The current thread's record in `THREADS`, created (with nothing in flight or served) when it
/// has none.
#[inline(always)]
fn thread_of(pid_tgid: u64) -> Option<*mut Thread> {
    if let Some(t) = THREADS.get_ptr_mut(pid_tgid) {
        return Some(t);
    }
    // SAFETY: all-zero bytes are a valid `Thread` (plain integers).
    let fresh: Thread = unsafe { core::mem::zeroed() };
    if THREADS.insert(pid_tgid, fresh, 0).is_err() {
        count(CNT_INFLIGHT_FULL);
        return None;
    }
    THREADS.get_ptr_mut(pid_tgid)
}

/// The current thread's live syscall record, which stops being live, with its `THREADS` record.
#[inline(always)]
fn inflight_take(pid_tgid: u64) -> Option<(Inflight, *mut Thread)> {
    let t = THREADS.get_ptr_mut(pid_tgid)?;
    // SAFETY: pointer from a successful lookup; only this thread uses its own key.
    unsafe {
        if (*t).call.enter_ns == 0 {
            return None;
        }
        let inf = (*t).call;
        (*t).call.enter_ns = 0;
        Some((inf, t))
    }
}

/// The in-flight record of a data syscall with these first three arguments, whose fd is TCP
/// socket `sock`, when the port filter lets it through.
#[inline(always)]
fn inflight_of(
    args: [u64; 3],
    sock: u64,
    source: u8,
    direction: u8,
    buf_kind: u8,
) -> Option<Inflight> {
    if !port_wanted(sock) {
        return None;
    }
    Some(call_of(args, sock, source, direction, buf_kind))
}

/// The in-flight record of a data syscall with these first three arguments on TCP socket `sock`.
#[inline(always)]
fn call_of(args: [u64; 3], sock: u64, source: u8, direction: u8, buf_kind: u8) -> Inflight {
    let fd = args[0] as i64;
    let (buf, len, mmsg) = match buf_kind {
        BUF_PLAIN | BUF_IOVEC => (args[1], args[2], 0),
        BUF_KERNEL => (0, 0, 0),
        _ => {
            // sendmsg/recvmsg: struct msghdr; sendmmsg/recvmmsg: the first struct mmsghdr, which
            // starts with a msghdr. msg_iov is at 16 and msg_iovlen at 24 in the x86-64/arm64 ABI.
            let msg = args[1];
            // SAFETY: user pointer read through the fault-tolerant helper.
            let iov: u64 = unsafe { read_user((msg + 16) as *const u64) }.unwrap_or(0);
            let iovlen: u64 = unsafe { read_user((msg + 24) as *const u64) }.unwrap_or(0);
            let mmsg = if source == SRC_SENDMMSG || source == SRC_RECVMMSG {
                msg
            } else {
                0
            };
            (iov, iovlen, mmsg)
        }
    };
    Inflight {
        // Set by the caller once it keeps the record: most calls here are not kept.
        enter_ns: 0,
        sock,
        buf,
        len,
        mmsg,
        trace_id: [0; 2],
        fd: fd as i32,
        source,
        direction,
        buf_kind: if buf_kind == BUF_MSGHDR {
            BUF_IOVEC
        } else {
            buf_kind
        },
        trace_flags: 0,
    }
}

/// x86-64 `struct pt_regs`: size, and offsets of the saved argument registers and `orig_ax`.
const PT_REGS_SIZE: u64 = 168;
const PT_REGS_DI: u64 = 112;
const PT_REGS_SI: u64 = 104;
const PT_REGS_DX: u64 = 96;
const PT_REGS_ORIG_AX: u64 = 120;
/// Kernel stack sizes to try: 16 KiB normally, 32 KiB on KASAN kernels.
const THREAD_SIZES: [u64; 2] = [16 << 10, 32 << 10];

/// The first three syscall arguments of the current task, from the user registers saved at the
/// top of its kernel stack; checked against the syscall number the exit tracepoint reports.
#[inline(always)]
fn saved_args(ctx: &TracePointContext) -> Option<[u64; 3]> {
    // SAFETY: sys_exit records hold the syscall number (an int) at offset 8; through the
    // helper, as in `ret`.
    let nr = unsafe { ctx.read_at::<i32>(8) }.ok()? as i64;

    // SAFETY: returns the current task pointer; only dereferenced through probe reads.
    let task = unsafe { bpf_get_current_task() };
    let stack: u64 = kread(task + off!(task_stack) as u64)?;
    for size in THREAD_SIZES {
        let regs = stack + size - PT_REGS_SIZE;
        let orig_ax: i64 = kread(regs + PT_REGS_ORIG_AX)?;
        if orig_ax == nr {
            return Some([
                kread(regs + PT_REGS_DI)?,
                kread(regs + PT_REGS_SI)?,
                kread(regs + PT_REGS_DX)?,
            ]);
        }
    }
    None
}

/// Whether userspace ended the recovery of calls blocked at attach time.
#[inline(always)]
fn recovery_done() -> bool {
    RECOVERY_DONE.get(0).is_some_and(|done| *done != 0)
}

/// Whether connections open and close at their TCP state changes (see [`SOCKET_STATES`]).
#[inline(always)]
fn socket_states() -> bool {
    SOCKET_STATES.get(0).is_some_and(|on| *on != 0)
}

/// A syscall exit without a recorded entry: either not a socket, or a call that was already
/// blocked when the programs attached (a server waiting in recv on an old connection). Each
/// thread is looked at once; its arguments come from its saved registers.
#[inline(always)]
fn recover_inflight(
    ctx: &TracePointContext,
    pid_tgid: u64,
    source: u8,
    direction: u8,
    buf_kind: u8,
) -> Option<Inflight> {
    if recovery_done() {
        return None;
    }
    // SAFETY: presence check only.
    if unsafe { SEEN.get(pid_tgid) }.is_some() || !traced((pid_tgid >> 32) as u32) {
        return None;
    }
    let _ = SEEN.insert(pid_tgid, 1, 0);
    let args = saved_args(ctx)?;
    let sock = sock_of_fd(args[0] as i64)?;
    let mut inflight = inflight_of(args, sock, source, direction, buf_kind)?;
    // SAFETY: reads the monotonic clock.
    inflight.enter_ns = unsafe { bpf_ktime_get_ns() };
    Some(inflight)
}

/// `v`, through a volatile stack slot, so the compiler forgets what it knew about its range and
/// keeps the bounds checks that follow. Older verifiers (6.1) cannot follow the bounds the compiler
/// derives from loop conditions and reject the program otherwise.
#[inline(always)]
fn opaque(v: usize) -> usize {
    // SAFETY: a volatile read of a local.
    unsafe { read_volatile(&v) }
}

/// Copies up to `n` bytes from user `src` into `dst[off..]`, where the caller guarantees
/// `off < MAX_CAPTURE`; returns the bytes copied.
#[inline(always)]
fn copy_user(dst: &mut [u8; 2 * MAX_CAPTURE], off: usize, src: u64, n: u64) -> usize {
    let off = opaque(off) & (MAX_CAPTURE - 1);
    let mut len = opaque(n as usize);
    if len > MAX_CAPTURE {
        len = MAX_CAPTURE;
    }
    if len == 0 {
        return 0;
    }
    // SAFETY: off < MAX_CAPTURE and len <= MAX_CAPTURE keep the write inside `dst`; the helper
    // fails instead of faulting on a bad user address.
    let rc = unsafe {
        bpf_probe_read_user(
            dst.as_mut_ptr().add(off) as *mut c_void,
            len as u32,
            src as *const c_void,
        )
    };
    if rc == 0 {
        len
    } else {
        count(CNT_COPY_FAULT);
        0
    }
}

/// Emits a data event for a finished syscall recorded by `enter_io`.
#[inline(always)]
fn exit_io<const IOVECS: usize>(
    ctx: &TracePointContext,
    source: u8,
    direction: u8,
    buf_kind: u8,
) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let (inf, thread) = match inflight_take(pid_tgid) {
        Some((inf, t)) => (inf, Some(t)),
        None => match recover_inflight(ctx, pid_tgid, source, direction, buf_kind) {
            Some(inf) => (inf, None),
            None => return 0,
        },
    };
    emit_io::<IOVECS>(
        pid_tgid,
        inf,
        thread,
        None,
        None,
        ret(ctx),
        direction,
        false,
    )
}

/// Emits a data event for call `inf` of the current thread (`thread`, its record when the caller
/// has it; `conn`, its socket's state, likewise; `typed`, its socket as a BTF pointer, likewise:
/// see [`tcp_u32`]), which returned `rc`; `direction` is the call's, a constant of each program,
/// and so is `socket_layer`: whether a socket-layer program (not a syscall exit) emits it.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn emit_io<const IOVECS: usize>(
    pid_tgid: u64,
    inf: Inflight,
    thread: Option<*mut Thread>,
    conn: Option<*mut ConnState>,
    typed: Option<u64>,
    rc: i64,
    direction: u8,
    socket_layer: bool,
) -> u32 {
    if rc <= 0 {
        // A read of zero bytes is the peer's end of stream: responses read until close end here.
        if rc == 0 && inf.direction == DIR_RECV && inf.len > 0 {
            if let Some(conn) = Conn::of(inf.sock) {
                emit_control(KIND_CLOSE, inf.source, pid_tgid, inf.fd, inf.sock, conn);
            }
        }
        return 0;
    }
    let mut bytes = rc as u64;
    if inf.mmsg != 0 {
        // The return value counts messages; the first message's size is its mmsghdr.msg_len.
        // SAFETY: user pointer read through the fault-tolerant helper.
        let first: u32 = unsafe { read_user((inf.mmsg + 56) as *const u32) }.unwrap_or(0);
        if first == 0 {
            return 0;
        }
        bytes = first as u64;
    }
    let Some(scratch) = scratch() else { return 0 };
    // SAFETY: the per-CPU scratch slot belongs to this program invocation until it returns.
    let scratch = unsafe { &mut *scratch };
    // A send's start is timed (above 1) where a span may start with it: a client's request. At
    // the socket layer, where a client's send is timed before it queues a byte, that is the
    // event's one time (nothing reads when a request's write ended); every other event is
    // timed here, where it ends (a server's response: when it left). A read of a TCP socket
    // typed here ends within TCP's own reading of the clock, after its last copy (see
    // [`tcp_clock`]): that time costs a load instead of a clock read (~15 ns) of its own.
    let timed = inf.direction == DIR_SEND && inf.enter_ns > 1;
    let tp = tcp_typed(typed);
    let read_at = match tp {
        Some(tp) if tp != 0 && direction == DIR_RECV && socket_layer => tcp_clock(tp),
        _ => None,
    };
    let now = if timed && socket_layer {
        inf.enter_ns
    } else if let Some(at) = read_at {
        at
    } else {
        // SAFETY: reads the monotonic clock.
        unsafe { bpf_ktime_get_ns() }
    };
    let tgid = (pid_tgid >> 32) as u32;
    let (conn, offset, slot) = conn_advance_at(conn, inf.sock, tgid, now, inf.direction, bytes);
    // SAFETY: the thread's own record, from a successful lookup.
    if thread.is_none_or(|t| unsafe { (*t).ssl } != 0) {
        tls::socket_io(pid_tgid, inf.sock, || inf.fd, conn.conn_id);
    }
    // A read into one plain buffer has no copy loop, so its program finds its trace context
    // itself, with the sequence number and tuple (the key of `IN_CTX`) read for the event.
    let read_context = IOVECS == 0 && direction == DIR_RECV && trace_context();
    let read_context = read_context && wants_trace(conn.flags);
    if conn.flags & CONN_F_NO_PAYLOAD != 0 && !read_context {
        // Userspace wants nothing of this connection's bytes (filtered out, TLS ciphertext,
        // unknown protocol): no record at all. Its byte counts still advance above.
        return 0;
    }

    let h = &mut scratch.header;
    h.kind = KIND_DATA;
    h.direction = inf.direction;
    h.role = conn.role;
    h.source = inf.source;
    h.flags = 0;
    h._pad0 = [0; 2];
    h.tgid = (pid_tgid >> 32) as u32;
    h.tid = pid_tgid as u32;
    h.fd = inf.fd;
    // A read's entry is not timed (see `enter_io`), nor a server's send.
    h.enter_ns = if timed { inf.enter_ns } else { now };
    h.exit_ns = now;
    h.conn_id = conn.conn_id;
    h.sock = inf.sock;
    h.bytes = bytes;
    h.tcp_seq = 0;
    if inf.mmsg == 0 {
        // The sequence number after this call's bytes, minus them: the first byte's number.
        let member = if inf.direction == DIR_SEND {
            off!(tcp_write_seq)
        } else {
            off!(tcp_copied_seq)
        };
        if member != 0
            && let Some(after) = tcp_u32(tp, inf.sock, member)
        {
            h.tcp_seq = after.wrapping_sub(bytes as u32);
            h.flags = EV_F_TCP_SEQ;
        }
    }
    h.stream_offset = offset;
    // The trace context chosen at entry (client write) or by `read_context` (read through
    // iovecs): zero otherwise. Copied without a branch: every path into the copy loop below
    // multiplies the verifier's work on it, which is why those reads get theirs from a program of
    // their own.
    h.trace_id = trace_bytes(inf.trace_id);
    h.flags |= inf.trace_flags;
    if IOVECS == 0 || socket_layer {
        conn_tuple(h, &mut scratch.tuple, inf.sock, slot);
    } else {
        // Not before a syscall exit's copy loop: its branches multiplied the verifier's work on
        // the loop past its limit (`sys_exit_recvmmsg`).
        fill_tuple(h, &mut scratch.tuple, inf.sock);
    }
    if read_context {
        if conn.role == ROLE_SERVER
            && let Some(thread) = thread.or_else(|| thread_of(pid_tgid))
        {
            let seq = if h.flags & EV_F_TCP_SEQ != 0 {
                Some(h.tcp_seq)
            } else {
                None
            };
            let (id, origin) = serve_read(thread, inf.sock, seq, || tuple_key(h));
            h.trace_id = trace_bytes(id);
            h.flags |= EV_F_TRACE | origin;
        } else if conn.role == ROLE_CLIENT
            && let Some(c) = slot
        {
            client_read(c);
        }
    }
    if conn.flags & CONN_F_NO_PAYLOAD != 0 {
        // TLS ciphertext, whose context the SSL probes take: no record.
        return 0;
    }
    // Only where userspace takes it (see `EventHeader::comm`): the helper costs every event.
    h.comm = if offset == 0 {
        bpf_get_current_comm().unwrap_or([0; 16])
    } else {
        [0; 16]
    };

    // SAFETY: plain read of a global set before load.
    let mut limit = unsafe { read_volatile(&CAPTURE_LIMIT) } as u64;
    if limit > MAX_CAPTURE as u64 {
        limit = MAX_CAPTURE as u64;
    }
    let want = if bytes < limit { bytes } else { limit };
    let mut captured: usize = 0;
    if inf.buf_kind == BUF_PLAIN {
        captured = copy_user(&mut scratch.data, 0, inf.buf, want);
    } else if inf.buf_kind == BUF_IOVEC {
        let mut i: u64 = 0;
        while i < IOVECS as u64 {
            if i >= inf.len || captured as u64 >= want {
                break;
            }
            // SAFETY: user pointer read through the fault-tolerant helper.
            let iov: [u64; 2] =
                unsafe { read_user((inf.buf + 16 * i) as *const [u64; 2]) }.unwrap_or([0, 0]);
            let room = want - captured as u64;
            let n = if iov[1] < room { iov[1] } else { room };
            let got = copy_user(&mut scratch.data, captured, iov[0], n);
            if got as u64 != n {
                break;
            }
            captured += got;
            i += 1;
        }
    }
    if bytes > captured as u64 {
        count(CNT_TRUNCATED);
    }
    captured = opaque(captured);
    if captured > MAX_CAPTURE {
        captured = MAX_CAPTURE;
    }
    scratch.header.captured = captured as u32;
    output(scratch, HEADER_SIZE + captured);
    0
}

/// A CPU looks at how much waits in the ring buffer once per this many records it outputs: the
/// look reads the reader's position, a cache line the reader's CPU keeps writing, which cost
/// every record ~30 ns. Between two looks a CPU adds at most this many records (each at most
/// `HEADER_SIZE + MAX_CAPTURE` bytes, ~68 KiB in all) beyond the mark of an eighth of the ring.
const WAKEUP_LOOK_EVERY: u64 = 16;

/// Sends the first `size` bytes of `scratch` (at most its size) to userspace, waking the reader
/// only when enough has piled up (see `WAKEUP_BYTES`); counts the outcome.
#[inline(always)]
fn output(scratch: &mut Scratch, size: usize) {
    let ring = &EVENTS as *const RingBuf as *mut c_void;
    // SAFETY: plain read of a global set before load.
    let watermark = unsafe { read_volatile(&WAKEUP_BYTES) };
    let flags = if watermark == 0 {
        0
    } else {
        scratch.records = scratch.records.wrapping_add(1);
        if scratch.records % WAKEUP_LOOK_EVERY != 0 {
            BPF_RB_NO_WAKEUP as u64
        } else {
            // SAFETY: `ring` is the ring buffer map.
            let waiting = unsafe { bpf_ringbuf_query(ring, BPF_RB_AVAIL_DATA as u64) };
            let was_below = scratch.below_mark != 0;
            scratch.below_mark = (waiting + (size as u64) < watermark) as u64;
            // One wake-up per CPU when the ring crosses the mark between two of its looks; above
            // it the reader is already busy or its timer will come, and a wake-up per record
            // would cost every traced syscall.
            if was_below && scratch.below_mark == 0 {
                BPF_RB_FORCE_WAKEUP as u64
            } else {
                BPF_RB_NO_WAKEUP as u64
            }
        }
    };
    // SAFETY: the caller keeps `size` within `Scratch`, which lives in a map value.
    let rc = unsafe {
        bpf_ringbuf_output(
            ring,
            scratch as *mut Scratch as *mut c_void,
            size as u64,
            flags,
        )
    };
    if rc == 0 {
        count(CNT_EVENTS)
    } else {
        count(CNT_RINGBUF_FULL)
    }
}

macro_rules! io_tracepoints {
    ($($enter:ident, $exit:ident, $src:expr, $dir:expr, $kind:expr, $iovecs:expr;)*) => {$(
        #[tracepoint]
        pub fn $enter(ctx: TracePointContext) -> u32 {
            enter_io(&ctx, $src, $dir, $kind)
        }
        #[tracepoint]
        pub fn $exit(ctx: TracePointContext) -> u32 {
            exit_io::<{ $iovecs }>(&ctx, $src, $dir, $kind)
        }
    )*};
}

/// The trace context of a read through iovecs that returned bytes, stored in the thread's
/// in-flight record for the exit program that emits the event: the request a server socket's read
/// belongs to, or the end of a client socket's request. Runs in a program of its own, which then
/// tail-calls the read's exit program (`AFTER_CONTEXT`), so the verifier checks it apart from
/// their copy loops. (`read` and `recvfrom` exits, with no loop, do this themselves.)
/// Returns whether the exit program has anything to do: not when no entry was recorded (a read
/// that is not on a socket) and no blocked call is being recovered.
#[inline(always)]
fn read_context(ctx: &TracePointContext) -> bool {
    let pid_tgid = bpf_get_current_pid_tgid();
    let thread = match THREADS.get_ptr_mut(pid_tgid) {
        // SAFETY: pointer from a successful lookup; only this thread uses its own key.
        Some(t) if unsafe { (*t).call.enter_ns } != 0 => t,
        _ => return !recovery_done(),
    };
    // SAFETY: as above.
    let inf = unsafe { addr_of_mut!((*thread).call) };
    if !trace_context() {
        return true;
    }
    choose_read_context(thread, inf, ret(ctx));
    true
}

/// The trace context of read `inf` of the current thread (`thread`, its record), which returned
/// `rc`, stored in `inf` (see [`read_context`]).
#[inline(always)]
fn choose_read_context(thread: *mut Thread, inf: *mut Inflight, rc: i64) {
    if rc <= 0 {
        return;
    }
    // SAFETY: the thread's own record, from a successful lookup; only this thread writes it.
    let (sock, mmsg) = unsafe { ((*inf).sock, (*inf).mmsg) };
    let Some(c) = CONNS.get_ptr_mut(sock) else {
        return;
    };
    // SAFETY: from a successful lookup.
    let conn = unsafe { Conn::at(c) };
    // Requests on a connection userspace ignores make no span for anything to link to: the
    // thread is not serving one as far as linking goes (its outgoing calls start traces).
    if !wants_trace(conn.flags) {
        return;
    }
    if conn.role == ROLE_SERVER {
        // The sequence number of the first byte read, as the exit program computes it; recvmmsg
        // returns a message count, not bytes.
        let member = off!(tcp_copied_seq);
        let seq = if mmsg == 0 && member != 0 {
            kread::<u32>(sock + member as u64).map(|after| after.wrapping_sub(rc as u32))
        } else {
            None
        };
        let (id, origin) = serve_read(thread, sock, seq, || tuple_of(sock));
        // SAFETY: as above.
        unsafe {
            (*inf).trace_id = id;
            (*inf).trace_flags = EV_F_TRACE | origin;
        }
    } else if conn.role == ROLE_CLIENT {
        client_read(c);
    }
}

macro_rules! read_context_tracepoints {
    ($($name:ident, $after:expr;)*) => {$(
        #[tracepoint]
        pub fn $name(ctx: TracePointContext) -> u32 {
            if read_context(&ctx) {
                // SAFETY: the context is this program's own; userspace fills the slot with the
                // read's exit program before it attaches this one.
                unsafe { AFTER_CONTEXT.tail_call(&ctx, $after) };
                // Only reached when the tail call failed.
                count(CNT_TAIL_CALL_FAILED);
            }
            0
        }
    )*};
}

// Named `<exit program>_trace`; userspace attaches each to its exit program's tracepoint, in its
// place, and puts the exit program in its `AFTER_CONTEXT` slot.
read_context_tracepoints! {
    sys_exit_readv_trace, AFTER_CONTEXT_READV;
    sys_exit_recvmsg_trace, AFTER_CONTEXT_RECVMSG;
    sys_exit_recvmmsg_trace, AFTER_CONTEXT_RECVMMSG;
}

/// Exit programs for the iovec syscalls that copy at most `SMALL_IOVECS` iovecs: older verifiers
/// (6.1) reject the `MAX_IOVECS` loop as too complex, and userspace loads these instead there.
macro_rules! small_iovec_exits {
    ($($exit:ident, $src:expr, $dir:expr, $kind:expr;)*) => {$(
        #[tracepoint]
        pub fn $exit(ctx: TracePointContext) -> u32 {
            exit_io::<SMALL_IOVECS>(&ctx, $src, $dir, $kind)
        }
    )*};
}

small_iovec_exits! {
    sys_exit_readv_small, SRC_READV, DIR_RECV, BUF_IOVEC;
    sys_exit_writev_small, SRC_WRITEV, DIR_SEND, BUF_IOVEC;
    sys_exit_recvmsg_small, SRC_RECVMSG, DIR_RECV, BUF_MSGHDR;
    sys_exit_sendmsg_small, SRC_SENDMSG, DIR_SEND, BUF_MSGHDR;
    sys_exit_recvmmsg_small, SRC_RECVMMSG, DIR_RECV, BUF_MSGHDR;
    sys_exit_sendmmsg_small, SRC_SENDMMSG, DIR_SEND, BUF_MSGHDR;
}

// The last column is how many iovecs the exit program copies: none for plain buffers, so their
// programs carry no copy loop at all.
io_tracepoints! {
    sys_enter_read, sys_exit_read, SRC_READ, DIR_RECV, BUF_PLAIN, 0;
    sys_enter_write, sys_exit_write, SRC_WRITE, DIR_SEND, BUF_PLAIN, 0;
    sys_enter_readv, sys_exit_readv, SRC_READV, DIR_RECV, BUF_IOVEC, MAX_IOVECS;
    sys_enter_writev, sys_exit_writev, SRC_WRITEV, DIR_SEND, BUF_IOVEC, MAX_IOVECS;
    sys_enter_recvfrom, sys_exit_recvfrom, SRC_RECVFROM, DIR_RECV, BUF_PLAIN, 0;
    sys_enter_sendto, sys_exit_sendto, SRC_SENDTO, DIR_SEND, BUF_PLAIN, 0;
    sys_enter_recvmsg, sys_exit_recvmsg, SRC_RECVMSG, DIR_RECV, BUF_MSGHDR, MAX_IOVECS;
    sys_enter_sendmsg, sys_exit_sendmsg, SRC_SENDMSG, DIR_SEND, BUF_MSGHDR, MAX_IOVECS;
    sys_enter_recvmmsg, sys_exit_recvmmsg, SRC_RECVMMSG, DIR_RECV, BUF_MSGHDR, MAX_IOVECS;
    sys_enter_sendmmsg, sys_exit_sendmmsg, SRC_SENDMMSG, DIR_SEND, BUF_MSGHDR, MAX_IOVECS;
    sys_enter_sendfile64, sys_exit_sendfile64, SRC_SENDFILE, DIR_SEND, BUF_KERNEL, 0;
}

/// connect(2) entry: remember the fd until the exit tells whether it worked.
#[tracepoint]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !traced((pid_tgid >> 32) as u32) {
        return 0;
    }
    let inflight = Inflight {
        // Live; connect's exit needs no time.
        enter_ns: 1,
        sock: 0,
        buf: 0,
        len: 0,
        mmsg: 0,
        trace_id: [0; 2],
        fd: arg(&ctx, 0) as i32,
        source: 0,
        direction: 0,
        buf_kind: BUF_KERNEL,
        trace_flags: 0,
    };
    if let Some(thread) = thread_of(pid_tgid) {
        // SAFETY: the thread's own record, from a successful lookup.
        unsafe { (*thread).call = inflight };
    }
    0
}

/// connect(2) exit: a client connection starts (non-blocking connects return EINPROGRESS).
#[tracepoint]
pub fn sys_exit_connect(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some((inf, _)) = inflight_take(pid_tgid) else {
        return 0;
    };
    let rc = ret(&ctx);
    if rc != 0 && rc != -EINPROGRESS {
        return 0;
    }
    if let Some(sk) = sock_of_fd(inf.fd as i64) {
        conn_open(sk, ROLE_CLIENT);
    }
    0
}

#[inline(always)]
fn accepted(ctx: &TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !traced((pid_tgid >> 32) as u32) {
        return 0;
    }
    let fd = ret(ctx);
    if let Some(sk) = sock_of_fd(fd) {
        conn_open(sk, ROLE_SERVER);
    }
    0
}

/// accept(2) exit: a server connection starts.
#[tracepoint]
pub fn sys_exit_accept(ctx: TracePointContext) -> u32 {
    accepted(&ctx)
}

/// accept4(2) exit: a server connection starts.
#[tracepoint]
pub fn sys_exit_accept4(ctx: TracePointContext) -> u32 {
    accepted(&ctx)
}

/// close(2) entry: tell userspace the process let go of a connection it knows.
#[tracepoint]
pub fn sys_enter_close(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !traced((pid_tgid >> 32) as u32) {
        return 0;
    }
    let fd = arg(&ctx, 0) as i64;
    let Some(sk) = sock_of_fd(fd) else { return 0 };
    let Some(conn) = Conn::of(sk) else {
        return 0;
    };
    // The entry stays: after fork another process may still hold the socket (PostgreSQL's
    // postmaster closes its copy while the backend serves on). The next connect or accept on a
    // socket at this address replaces it, and the LRU map bounds what is left behind.
    emit_control(KIND_CLOSE, SRC_CLOSE, pid_tgid, fd as i32, sk, conn);

    0
}

/// Process exit: its sockets close without close(2), so userspace must flush them itself.
#[tracepoint]
pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // Every thread's: its record (call in flight, request served) goes with it (most threads
    // have none).
    let _ = THREADS.remove(pid_tgid);
    let tgid = (pid_tgid >> 32) as u32;
    // Only the main thread's exit; other threads leaving do not close the process's files.
    if tgid != pid_tgid as u32 || !traced(tgid) {
        return 0;
    }
    emit_control(KIND_EXIT, SRC_EXIT, pid_tgid, -1, 0, Conn::default());
    0
}

/// Emits a header-only event (close, end of stream, exit).
#[inline(always)]
fn emit_control(kind: u8, source: u8, pid_tgid: u64, fd: i32, sk: u64, conn: Conn) {
    let Some(scratch) = scratch() else { return };
    // SAFETY: the per-CPU scratch slot belongs to this program invocation until it returns.
    emit_header(
        unsafe { &mut *scratch },
        kind,
        source,
        pid_tgid,
        fd,
        sk,
        conn,
        0,
    );
}

/// Fills the header of `scratch` for a control event and emits it with the first `captured`
/// bytes of `scratch.data` (at most 256) as payload.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn emit_header(
    scratch: &mut Scratch,
    kind: u8,
    source: u8,
    pid_tgid: u64,
    fd: i32,
    sk: u64,
    conn: Conn,
    captured: usize,
) {
    // SAFETY: reads the monotonic clock.
    let now = unsafe { bpf_ktime_get_ns() };
    let h = &mut scratch.header;
    h.kind = kind;
    h.direction = DIR_RECV;
    h.role = conn.role;
    h.family = 0;
    h.source = source;
    h.flags = 0;
    h._pad0 = [0; 2];
    h.tgid = (pid_tgid >> 32) as u32;
    h.tid = pid_tgid as u32;
    h.fd = fd;
    let captured = opaque(captured) & (CONTROL_PAYLOAD - 1);
    h.captured = captured as u32;
    h.enter_ns = now;
    h.exit_ns = now;
    h.conn_id = conn.conn_id;
    h.sock = sk;
    h.bytes = 0;
    h.local_addr = [0; 16];
    h.remote_addr = [0; 16];
    h.local_port = 0;
    h.remote_port = 0;
    h.tcp_seq = 0;

    h.stream_offset = 0;
    h.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    h.trace_id = [0; 16];
    if sk != 0 {
        fill_tuple(h, &mut scratch.tuple, sk);
    }
    // Header and `captured` < CONTROL_PAYLOAD bytes lie inside the map value.
    output(scratch, HEADER_SIZE + captured);
}

/// Longest payload of a control event (an exec's file name), a power of two.
const CONTROL_PAYLOAD: usize = 256;

/// exec: the process now runs another program. The file name travels with the event, so a
/// process that exits before userspace reads its /proc entry is still named.
#[tracepoint]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !traced((pid_tgid >> 32) as u32) {
        return 0;
    }
    // SAFETY: the record's `__data_loc char[] filename` descriptor is at offset 8: the name's
    // offset in the record in the low 16 bits.
    let Ok(loc) = (unsafe { ctx.read_at::<u32>(8) }) else {
        return 0;
    };
    let Some(scratch) = scratch() else { return 0 };
    // SAFETY: the per-CPU scratch slot belongs to this program invocation until it returns.
    let scratch = unsafe { &mut *scratch };
    let name = ctx.as_ptr() as u64 + (loc & 0xffff) as u64;
    let dst = &mut scratch.data[..CONTROL_PAYLOAD];
    // SAFETY: reads a NUL-terminated kernel string into `dst`; fails instead of faulting.
    let len =
        unsafe { bpf_probe_read_kernel_str_bytes(name as *const u8, dst) }.map_or(0, |s| s.len());
    emit_header(
        scratch,
        KIND_EXEC,
        SRC_EXEC,
        pid_tgid,
        -1,
        0,
        Conn::default(),
        len,
    );
    0
}

// After the macros it uses (`off!`).
#[path = "sock_hooks.rs"]
mod sock_hooks;
