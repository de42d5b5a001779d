//! Socket reads and writes taken inside the socket layer (Linux ≥ 6.3) instead of at every read
//! and write syscall of the host.
//!
//! The syscall programs run on every `read` and `write` of every process, pipes and files
//! included, only to find out that most of them are not on a socket. The `sock_recv_length` and
//! `sock_send_length` tracepoints fire inside `sock_recvmsg` and `sock_sendmsg` only, after the
//! bytes moved, with the `struct sock` and the byte count; the call's fd and buffer come from the
//! user registers the syscall saved (`bpf_task_pt_regs`). A client write must choose the trace id
//! of its TCP option before the kernel sends a byte: `tcp_sendmsg_locked` fires inside TCP's send
//! before it queues each buffer, and its first firing in a call does what the syscall entry did.
//! Userspace attaches these in place of the syscall programs of `read`, `readv`, `recvfrom` and
//! `recvmsg` where the kernel has `sock_recv_length`, and of `write`, `writev`, `sendto` and
//! `sendmsg` where it has the other two; where it lacks `tcp_sendmsg_locked`, only those writes'
//! exits are replaced and their syscall entry records the start (`sock_send_length` takes either
//! record). `recvmmsg`, `sendmmsg` (one tracepoint firing per message) and `sendfile` stay on
//! their syscall programs, and these programs leave those calls alone, except where
//! `inet_sock_set_state` takes connections' opens and closes (below): then no syscall program is
//! left, and these programs count those calls' bytes per firing, without copying them.
//!
//! Any syscall tracepoint attached sends every syscall of every process on the host down the
//! kernel's slow syscall path (~65 ns each). Where reads and whole writes are taken here, the
//! syscall programs left were connect, accept, close, sendfile and the mmsg calls; the
//! `inet_sock_set_state` tracepoint fires at a TCP socket's state changes instead: `SYN_SENT` in
//! the connecting task (a client connection starts), `SYN_RECV` to `ESTABLISHED` where the
//! kernel completes a handshake for a listener (a server connection starts, before accept(2)
//! returns it), and the close: `FIN_WAIT1` or `LAST_ACK` in the task that closes the socket
//! with both directions shut (not a `shutdown(SHUT_WR)`). A socket that reaches `CLOSE` before
//! its process lets go (a reset, or the peer's FIN after a `shutdown(SHUT_WR)`) may still hold
//! bytes to read, so its close is taken when the kernel destroys it instead
//! (`tcp:tcp_destroy_sock`: in close(2) for such a socket). A close is per socket, not per file
//! descriptor: it comes when the last one goes, and its event goes to the process that last read
//! or wrote the socket (its `ConnState::owner`), once.

use core::ptr::read_volatile;

use aya_ebpf::EbpfContext;
use aya_ebpf::helpers::bpf_get_current_pid_tgid;
use aya_ebpf::helpers::generated::{bpf_get_current_task_btf, bpf_ktime_get_ns, bpf_task_pt_regs};
use aya_ebpf::macros::{btf_tracepoint, map, raw_tracepoint};
use aya_ebpf::maps::ProgramArray;
use aya_ebpf::programs::{BtfTracePointContext, RawTracePointContext};
use tracer_ebpf::abi::*;

use super::{
    BUF_IOVEC, BUF_KERNEL, BUF_MSGHDR, BUF_PLAIN, CONNS, Conn, Inflight, OFFSETS, PT_REGS_DI,
    PT_REGS_DX, PT_REGS_ORIG_AX, PT_REGS_SI, ROLE_CLIENT, ROLE_SERVER, Scratch, THREADS, Thread,
    call_of, choose_read_context, client_write, conn_open, count, emit_header, emit_io, hand_over,
    inflight_take, kload, kread, offset_at, port_wanted_at, scratch, scratch_interrupting,
    serve_write, socket_states, tcp_sock, tcp_sock_at, thread_of, tls, trace_context, traced,
    wants_trace,
};

/// x86-64 syscall numbers of the calls these programs take.
const NR_READ: u64 = 0;
const NR_WRITE: u64 = 1;
const NR_READV: u64 = 19;
const NR_WRITEV: u64 = 20;
const NR_SENDTO: u64 = 44;
const NR_RECVFROM: u64 = 45;
const NR_SENDMSG: u64 = 46;
const NR_RECVMSG: u64 = 47;
/// Calls whose syscall programs record the call at entry (see the module's doc).
const NR_SENDFILE: u64 = 40;
const NR_SENDMMSG: u64 = 307;
const NR_RECVMMSG: u64 = 299;

/// `recv` flag: the bytes stay queued and will be read again.
const MSG_PEEK: u32 = 2;

/// The programs that copy through iovecs, by `SOCK_IOV_*` slot: the programs taking a call
/// tail-call them, so the verifier checks their copy loop apart.
#[map]
static SOCK_IOV: ProgramArray = ProgramArray::with_max_entries(SOCK_IOV_SLOTS, 0);

/// The same for the BTF tracepoint programs: a program array holds programs of one type.
#[map]
static SOCK_IOV_BTF: ProgramArray = ProgramArray::with_max_entries(SOCK_IOV_SLOTS, 0);

/// What the socket-layer programs take from their context, a raw or a BTF tracepoint's.
trait SockCtx: EbpfContext {
    /// Whether the tracepoint's pointer arguments are BTF pointers, which the verifier lets the
    /// program load through.
    const TYPED: bool;

    /// Argument `n`: both kinds of context are an array of 64-bit arguments.
    #[inline(always)]
    fn arg_u64(&self, n: usize) -> u64 {
        // SAFETY: `n` is below the tracepoint's argument count at every call; the verifier
        // checks the load against the context's size.
        unsafe { read_volatile((self.as_ptr() as *const u64).add(n)) }
    }

    /// The programs that copy through iovecs, of this context's program type.
    fn iov() -> &'static ProgramArray;

    /// Socket `sk`, an argument of this context, as `tcp_u32` and `emit_io` take it: `Some`
    /// where the context types it.
    #[inline(always)]
    fn typed(sk: u64) -> Option<u64> {
        Self::TYPED.then_some(sk)
    }
}

impl SockCtx for RawTracePointContext {
    const TYPED: bool = false;

    #[inline(always)]
    fn iov() -> &'static ProgramArray {
        &SOCK_IOV
    }
}

impl SockCtx for BtfTracePointContext {
    const TYPED: bool = true;

    #[inline(always)]
    fn iov() -> &'static ProgramArray {
        &SOCK_IOV_BTF
    }
}

/// The current syscall's number and first three arguments, from the user registers it saved.
#[inline(always)]
fn syscall_args() -> (u64, [u64; 3]) {
    // SAFETY: both helpers take the current task as the kernel types it; the verifier checks
    // each load from the returned `struct pt_regs` against the kernel's type and makes it a load
    // that cannot fault.
    unsafe {
        let regs = bpf_task_pt_regs(bpf_get_current_task_btf()) as u64;
        let at = |off: u64| read_volatile((regs + off) as *const u64);
        (
            at(PT_REGS_ORIG_AX),
            [at(PT_REGS_DI), at(PT_REGS_SI), at(PT_REGS_DX)],
        )
    }
}

/// The `SRC_*` and buffer kind of read syscall `nr`, when these programs take it.
#[inline(always)]
fn recv_call(nr: u64) -> Option<(u8, u8)> {
    match nr {
        NR_READ => Some((SRC_READ, BUF_PLAIN)),
        NR_RECVFROM => Some((SRC_RECVFROM, BUF_PLAIN)),
        NR_READV => Some((SRC_READV, BUF_IOVEC)),
        NR_RECVMSG => Some((SRC_RECVMSG, BUF_MSGHDR)),
        _ => None,
    }
}

/// The `SRC_*` and buffer kind of write syscall `nr`, when these programs take it.
#[inline(always)]
fn send_call(nr: u64) -> Option<(u8, u8)> {
    match nr {
        NR_WRITE => Some((SRC_WRITE, BUF_PLAIN)),
        NR_SENDTO => Some((SRC_SENDTO, BUF_PLAIN)),
        NR_WRITEV => Some((SRC_WRITEV, BUF_IOVEC)),
        NR_SENDMSG => Some((SRC_SENDMSG, BUF_MSGHDR)),
        _ => None,
    }
}

/// The return value of `sock_recv_length`/`sock_send_length` (an `int`, zero-extended).
#[inline(always)]
fn length_ret<C: SockCtx>(ctx: &C) -> i64 {
    ctx.arg_u64(1) as u32 as i32 as i64
}

/// A read on a socket returned: emits its bytes, as the syscall exit programs do.
#[inline(always)]
fn recv_length<C: SockCtx>(ctx: &C) -> u32 {
    let rc = length_ret(ctx);
    // Most failed reads are EAGAIN on a non-blocking socket: nothing to do. A read of zero
    // bytes is the peer's end of stream, which the event path reports.
    if rc < 0 || ctx.arg_u64(2) as u32 & MSG_PEEK != 0 {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    if !traced((pid_tgid >> 32) as u32) {
        return 0;
    }
    let sk = ctx.arg_u64(0);
    let found = CONNS.get_ptr_mut(sk);
    // SAFETY: copied out of the map, from a successful lookup.
    let conn = found.map(|c| unsafe { *c });
    // These tracepoints fire for sockets of every kind.
    if conn.is_none() && !tcp_sock_at(sk, C::TYPED) {
        return 0;
    }
    if !port_wanted_at(sk, C::TYPED) {
        return 0;
    }
    if let Some(conn) = conn
        && !wants_trace(conn.flags)
    {
        // As the syscall entry does for a connection userspace ignores (see `enter_io`).
        tls::socket_io(pid_tgid, sk, || syscall_args().1[0] as i32, conn.conn_id);
        return 0;
    }
    let (nr, args) = syscall_args();
    // A recvmmsg's messages, one firing each, are counted uncopied where no syscall program is
    // left (see the module's doc).
    let Some((source, buf_kind)) = recv_call(nr)
        .or_else(|| (nr == NR_RECVMMSG && socket_states()).then_some((SRC_RECVMMSG, BUF_KERNEL)))
    else {
        return 0;
    };
    let mut call = call_of(args, sk, source, DIR_RECV, buf_kind);
    // A read's time is its exit's; non-zero keeps the record live.
    call.enter_ns = 1;
    let thread = THREADS.get_ptr_mut(pid_tgid);
    if call.buf_kind == BUF_PLAIN || call.buf_kind == BUF_KERNEL {
        return emit_io::<0>(
            pid_tgid,
            call,
            thread,
            found,
            C::typed(sk),
            rc,
            DIR_RECV,
            true,
        );
    }
    // Through iovecs: the trace context here, the copy in the tail-called program, which finds
    // the call in the thread's record.
    let Some(thread) = thread.or_else(|| thread_of(pid_tgid)) else {
        return 0;
    };
    // SAFETY: the thread's own record, from a successful lookup; only this thread writes it.
    unsafe {
        (*thread).call = call;
        if trace_context() {
            choose_read_context(thread, core::ptr::addr_of_mut!((*thread).call), rc);
        }
        C::iov().tail_call(ctx, SOCK_IOV_RECV);
    }
    count(CNT_TAIL_CALL_FAILED);
    0
}

/// The copy of a socket read or write (`DIRECTION`) through iovecs, tail-called by
/// `sock_recv_length` or `sock_send_length`, which left the call in the thread's record.
#[inline(always)]
fn copy_iov<const IOVECS: usize, C: SockCtx, const DIRECTION: u8>(ctx: &C) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some((call, thread)) = inflight_take(pid_tgid) else {
        return 0;
    };
    emit_io::<IOVECS>(
        pid_tgid,
        call,
        Some(thread),
        None,
        C::typed(ctx.arg_u64(0)),
        length_ret(ctx),
        DIRECTION,
        true,
    )
}

/// The first firing in a TCP send call (it fires before each buffer the call queues): what the
/// syscall entry does for a client's write, before the kernel sends a byte, so that a client's
/// TCP option carries the trace id of the request it sends. A server's write needs nothing
/// before its bytes leave: `sock_send_length` takes it whole (see [`server_send`]).
#[inline(always)]
fn sendmsg_locked<C: SockCtx>(ctx: &C) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !traced((pid_tgid >> 32) as u32) {
        return 0;
    }
    let sk = ctx.arg_u64(0);
    let found = CONNS.get_ptr_mut(sk);
    // SAFETY: copied out of the map, from a successful lookup.
    let conn = found.map(|c| unsafe { Conn::at(c) });
    if conn.is_some_and(|c| c.role == ROLE_SERVER || !wants_trace(c.flags))
        || !port_wanted_at(sk, C::TYPED)
    {
        return 0;
    }
    let thread = THREADS.get_ptr_mut(pid_tgid);
    // SAFETY: the thread's own record, from a successful lookup.
    if let Some(t) = thread
        && unsafe { (*t).call.enter_ns != 0 && (*t).call.sock == sk }
    {
        // A later buffer of the same call, or a call a syscall program recorded (sendmmsg,
        // sendfile).
        return 0;
    }
    let Some(thread) = thread.or_else(|| thread_of(pid_tgid)) else {
        return 0;
    };
    // SAFETY: all-zero bytes are a valid record (plain integers). Its source stays 0, which
    // tells `sock_send_length` that this program recorded it.
    let mut call: Inflight = unsafe { core::mem::zeroed() };
    call.sock = sk;
    call.direction = DIR_SEND;
    // SAFETY: reads the monotonic clock. The event's one time: a request's span starts here,
    // and nothing reads when its write ended (see `emit_io`).
    call.enter_ns = unsafe { bpf_ktime_get_ns() };
    if trace_context()
        && let (Some(conn), Some(c)) = (conn, found)
        && conn.role == ROLE_CLIENT
    {
        let chosen = client_write(thread, c);
        if conn.flags & CONN_F_LOCAL != 0 {
            hand_over(
                sk,
                C::typed(sk),
                Some(c),
                chosen.map_or([0, 0], |(id, _)| id),
                send_len(ctx),
            );
        }
        if let Some((id, origin)) = chosen {
            call.trace_id = id;
            call.trace_flags = EV_F_TRACE | origin;
        }
    }
    // SAFETY: the thread's own record, from a successful lookup; only this thread writes it.
    unsafe { (*thread).call = call };
    0
}

/// A send on socket `sk` that `tcp_sendmsg_locked` did not record, by the current thread
/// (`thread`, its record, when it has one): the start of a traced server connection's send,
/// untimed (its event's time is the send's end: when the response left), with the socket's
/// state; `None` for any other socket, whose SSL call running on this thread still learns it
/// (see `enter_io`). A server's write costs one lookup of its thread and one of its socket
/// fewer, and one clock read fewer, this way than through a record made at its start.
#[inline(always)]
fn server_send<C: SockCtx>(
    pid_tgid: u64,
    sk: u64,
    thread: Option<*mut Thread>,
) -> Option<(Inflight, *mut ConnState)> {
    if !traced((pid_tgid >> 32) as u32) || (C::TYPED && !tcp_sock_at(sk, true)) {
        return None;
    }
    let found = CONNS.get_ptr_mut(sk)?;
    // SAFETY: copied out of the map, from a successful lookup.
    let conn = unsafe { Conn::at(found) };
    if conn.role != ROLE_SERVER || !wants_trace(conn.flags) || !port_wanted_at(sk, C::TYPED) {
        // SAFETY: the thread's own record, from a successful lookup.
        if thread.is_some_and(|t| unsafe { (*t).ssl } != 0) {
            tls::socket_io(pid_tgid, sk, || syscall_args().1[0] as i32, conn.conn_id);
        }
        return None;
    }
    if trace_context()
        && let Some(t) = thread
    {
        serve_write(t, sk);
    }
    // SAFETY: all-zero bytes are a valid record (plain integers); source 0 as for a record
    // `tcp_sendmsg_locked` made. Non-zero keeps the record live.
    let mut call: Inflight = unsafe { core::mem::zeroed() };
    call.sock = sk;
    call.direction = DIR_SEND;
    call.enter_ns = 1;
    Some((call, found))
}

/// The bytes the send of this `tcp_sendmsg_locked` firing has left to queue (at its first firing,
/// the call's length); 0 when not known.
#[inline(always)]
fn send_len<C: SockCtx>(ctx: &C) -> u64 {
    let member = off!(msg_iter_count);
    if member == 0 {
        return 0;
    }
    // A BTF pointer to a `struct msghdr` where the context types it (null reads as 0).
    kload::<u64>(C::TYPED, ctx.arg_u64(1), member).unwrap_or(0)
}

/// A write on a socket returned: emits its bytes, with the time and trace context that
/// `tcp_sendmsg_locked`, or the syscall entry where that is not attached, recorded at a client
/// call's start; a server's send is taken here whole (see [`server_send`]).
#[inline(always)]
fn send_length<C: SockCtx>(ctx: &C) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let sk = ctx.arg_u64(0);
    let thread = THREADS.get_ptr_mut(pid_tgid);
    // SAFETY: the thread's own record, from a successful lookup; only this thread writes it.
    let recorded = thread
        .map(|t| unsafe { (*t).call })
        .filter(|c| c.enter_ns != 0 && c.sock == sk);
    // The thread whose record holds the call's start, which the call's end clears.
    let (started, found, holder) = match recorded {
        Some(started) => (started, None, thread),
        None => {
            if let Some(t) = thread
                // SAFETY: as above.
                && unsafe { (*t).call.enter_ns != 0 && (*t).call.source == 0 }
            {
                // A start `tcp_sendmsg_locked` recorded (it sets no source) for a send that
                // ended without this tracepoint on its socket: it must not pass for the next
                // send's.
                // SAFETY: as above.
                unsafe { (*t).call.enter_ns = 0 };
            }
            let Some((started, found)) = server_send::<C>(pid_tgid, sk, thread) else {
                return 0;
            };
            (started, Some(found), None)
        }
    };
    let (nr, args) = syscall_args();
    // With no syscall program left (see the module's doc), a sendfile's or sendmmsg's bytes
    // count here, one firing per buffer or message, uncopied: the file's pages never pass
    // through user memory, and a message's iovecs are not at hand here.
    let uncopied = (nr == NR_SENDMMSG || nr == NR_SENDFILE) && started.source == 0;
    let uncopied = uncopied && socket_states();
    let Some((source, buf_kind)) = send_call(nr).or_else(|| {
        uncopied.then_some((
            if nr == NR_SENDFILE {
                SRC_SENDFILE
            } else {
                SRC_SENDMMSG
            },
            BUF_KERNEL,
        ))
    }) else {
        // A send these programs do not take. Unless a syscall program recorded it, the record
        // `tcp_sendmsg_locked` made for it (a send from io_uring) ends here.
        if let Some(t) = holder
            && (started.source == 0 || (nr != NR_SENDMMSG && nr != NR_SENDFILE))
        {
            // SAFETY: as above.
            unsafe { (*t).call.enter_ns = 0 };
        }
        return 0;
    };
    let mut call = call_of(args, sk, source, DIR_SEND, buf_kind);
    call.enter_ns = started.enter_ns;
    call.trace_id = started.trace_id;
    call.trace_flags = started.trace_flags;
    let rc = length_ret(ctx);
    if call.buf_kind == BUF_PLAIN || call.buf_kind == BUF_KERNEL {
        if let Some(t) = holder {
            // SAFETY: as above.
            unsafe { (*t).call.enter_ns = 0 };
        }
        return emit_io::<0>(
            pid_tgid,
            call,
            thread,
            found,
            C::typed(sk),
            rc,
            DIR_SEND,
            true,
        );
    }
    let Some(thread) = thread.or_else(|| thread_of(pid_tgid)) else {
        return 0;
    };
    // SAFETY: as above; the tail-called program takes the record.
    unsafe {
        (*thread).call = call;
        C::iov().tail_call(ctx, SOCK_IOV_SEND);
        (*thread).call.enter_ns = 0;
    }
    count(CNT_TAIL_CALL_FAILED);
    0
}

/// The socket-layer programs, each twice: as a BTF tracepoint (the default; its pointer
/// arguments are typed, so the TCP socket's fields it reads are plain loads) and as a raw
/// tracepoint (`_raw`, where the kernel refuses the first). Userspace attaches one set.
macro_rules! socket_programs {
    ($($tracepoint:literal: $btf:ident, $raw:ident => $body:path;)*) => {$(
        #[btf_tracepoint(function = $tracepoint)]
        pub fn $btf(ctx: BtfTracePointContext) -> u32 {
            $body(&ctx)
        }
        #[raw_tracepoint(tracepoint = $tracepoint)]
        pub fn $raw(ctx: RawTracePointContext) -> u32 {
            $body(&ctx)
        }
    )*};
}

// The `_iov` programs are never attached: userspace puts one of each pair in `SOCK_IOV` (or
// `SOCK_IOV_BTF`), the long loop where the verifier takes it (from 6.8 on).
socket_programs! {
    "sock_recv_length": sock_recv_length, sock_recv_length_raw => recv_length;
    "tcp_sendmsg_locked": tcp_sendmsg_locked, tcp_sendmsg_locked_raw => sendmsg_locked;
    "sock_send_length": sock_send_length, sock_send_length_raw => send_length;
    "sock_recv_length": sock_recv_iov, sock_recv_iov_raw => copy_iov::<MAX_IOVECS, _, DIR_RECV>;
    "sock_recv_length": sock_recv_iov_small, sock_recv_iov_small_raw =>
        copy_iov::<SMALL_IOVECS, _, DIR_RECV>;
    "sock_send_length": sock_send_iov, sock_send_iov_raw => copy_iov::<MAX_IOVECS, _, DIR_SEND>;
    "sock_send_length": sock_send_iov_small, sock_send_iov_small_raw =>
        copy_iov::<SMALL_IOVECS, _, DIR_SEND>;
}

/// TCP states (`include/net/tcp_states.h`).
const TCP_ESTABLISHED: u32 = 1;
const TCP_SYN_SENT: u32 = 2;
const TCP_SYN_RECV: u32 = 3;
const TCP_FIN_WAIT1: u32 = 4;
const TCP_LAST_ACK: u32 = 9;

/// `sock.sk_shutdown` with both directions shut, as close(2) sets it before its state change.
const SHUTDOWN_MASK: u8 = 3;

/// A TCP socket changed state: connections open and close here instead of at connect(2),
/// accept(2) and close(2) where userspace attaches this (see the module's doc).
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: RawTracePointContext) -> u32 {
    let sk: u64 = ctx.arg(0);
    let old = ctx.arg::<u64>(1) as u32;
    let new = ctx.arg::<u64>(2) as u32;
    match new {
        // In the connecting task, before the SYN leaves (its local port may not be chosen yet;
        // the addresses are).
        TCP_SYN_SENT => {
            if traced((bpf_get_current_pid_tgid() >> 32) as u32) && tcp_sock(sk) {
                conn_open(sk, ROLE_CLIENT);
            }
        }
        // Where the handshake completes (usually the softirq that took the ACK): no process to
        // filter on yet; the socket's reads and writes are filtered.
        TCP_ESTABLISHED if old == TCP_SYN_RECV => {
            if tcp_sock(sk) {
                conn_open(sk, ROLE_SERVER);
            }
        }
        // Only close(2) and shutdown(2) set these, in the task that calls them.
        TCP_FIN_WAIT1 | TCP_LAST_ACK => {
            let member = off!(sk_shutdown);
            // Only a close (or a shutdown of both directions) has shut reading too.
            if member != 0 && kread::<u8>(sk + member as u64) == Some(SHUTDOWN_MASK) {
                conn_closed(sk, scratch());
            }
        }
        _ => {}
    }
    0
}

/// A TCP socket is destroyed: the close of one that reached `CLOSE` without a close(2) state
/// change above (see the module's doc). Also fires for sockets whose close was taken already,
/// which find no owner.
#[raw_tracepoint(tracepoint = "tcp_destroy_sock")]
pub fn tcp_destroy_sock(ctx: RawTracePointContext) -> u32 {
    let sk: u64 = ctx.arg(0);
    // In close(2), or in the softirq or timer that ends an orphaned socket, which may have
    // interrupted another program on this CPU.
    conn_closed(sk, scratch_interrupting());
    // The socket is gone for every process that held it; a new one at this address is opened
    // afresh (at its own state changes).
    let _ = CONNS.remove(sk);
    0
}

/// Socket `sk` was closed: a close event for its owner, once, staged in `slot`.
#[inline(always)]
fn conn_closed(sk: u64, slot: Option<*mut Scratch>) {
    let Some(c) = CONNS.get_ptr_mut(sk) else {
        return;
    };
    // SAFETY: copied out of the map, from a successful lookup.
    let (conn, owner) = unsafe { (Conn::at(c), (*c).owner) };
    // Never read nor written by a traced process (or closed already): nothing to flush.
    if owner == 0 {
        return;
    }
    // SAFETY: as above. The socket's destruction after a close taken here finds no owner.
    unsafe { (*c).owner = 0 };
    let owner = owner as u64;
    let Some(slot) = slot else { return };
    // SAFETY: the caller's per-CPU slot belongs to this program invocation until it returns.
    emit_header(
        unsafe { &mut *slot },
        KIND_CLOSE,
        SRC_CLOSE,
        owner << 32 | owner,
        -1,
        sk,
        conn,
        0,
    );
}
