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
//! their syscall programs, and these programs leave those calls alone.

use core::ptr::read_volatile;

use aya_ebpf::helpers::bpf_get_current_pid_tgid;
use aya_ebpf::helpers::generated::{bpf_get_current_task_btf, bpf_ktime_get_ns, bpf_task_pt_regs};
use aya_ebpf::macros::{map, raw_tracepoint};
use aya_ebpf::maps::ProgramArray;
use aya_ebpf::programs::RawTracePointContext;
use tracer_ebpf::abi::*;

use super::{
    BUF_IOVEC, BUF_MSGHDR, BUF_PLAIN, CONNS, Inflight, OFFSETS, PT_REGS_DI, PT_REGS_DX,
    PT_REGS_ORIG_AX, PT_REGS_SI, ROLE_CLIENT, ROLE_SERVER, THREADS, call_of, choose_read_context,
    client_write, count, emit_io, hand_over, inflight_take, kread, offset_at, port_wanted,
    serve_write, tcp_sock, thread_of, tls, trace_context, traced, wants_trace,
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

/// `recv` flag: the bytes stay queued and will be read again.
const MSG_PEEK: u32 = 2;

/// The programs that copy through iovecs, by `SOCK_IOV_*` slot: the programs taking a call
/// tail-call them, so the verifier checks their copy loop apart.
#[map]
static SOCK_IOV: ProgramArray = ProgramArray::with_max_entries(SOCK_IOV_SLOTS, 0);

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
fn length_ret(ctx: &RawTracePointContext) -> i64 {
    ctx.arg::<u64>(1) as u32 as i32 as i64
}

/// A read on a socket returned: emits its bytes, as the syscall exit programs do.
#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn sock_recv_length(ctx: RawTracePointContext) -> u32 {
    let rc = length_ret(&ctx);
    // Most failed reads are EAGAIN on a non-blocking socket: nothing to do. A read of zero
    // bytes is the peer's end of stream, which the event path reports.
    if rc < 0 || ctx.arg::<u64>(2) as u32 & MSG_PEEK != 0 {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    if !traced((pid_tgid >> 32) as u32) {
        return 0;
    }
    let sk: u64 = ctx.arg(0);
    let found = CONNS.get_ptr_mut(sk);
    // SAFETY: copied out of the map, from a successful lookup.
    let conn = found.map(|c| unsafe { *c });
    // These tracepoints fire for sockets of every kind.
    if conn.is_none() && !tcp_sock(sk) {
        return 0;
    }
    if !port_wanted(sk) {
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
    let Some((source, buf_kind)) = recv_call(nr) else {
        return 0;
    };
    let mut call = call_of(args, sk, source, DIR_RECV, buf_kind);
    // A read's time is its exit's; non-zero keeps the record live.
    call.enter_ns = 1;
    let thread = THREADS.get_ptr_mut(pid_tgid);
    if call.buf_kind == BUF_PLAIN {
        return emit_io::<0>(pid_tgid, call, thread, found, rc, DIR_RECV);
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
        SOCK_IOV.tail_call(&ctx, SOCK_IOV_RECV);
    }
    count(CNT_TAIL_CALL_FAILED);
    0
}

/// The copy of a socket read or write (`direction`) through iovecs, tail-called by
/// `sock_recv_length` or `sock_send_length`, which left the call in the thread's record.
#[inline(always)]
fn copy_iov<const IOVECS: usize>(ctx: &RawTracePointContext, direction: u8) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some((call, thread)) = inflight_take(pid_tgid) else {
        return 0;
    };
    emit_io::<IOVECS>(
        pid_tgid,
        call,
        Some(thread),
        None,
        length_ret(ctx),
        direction,
    )
}

/// The first firing in a TCP send call (it fires before each buffer the call queues): what the
/// syscall entry does for a write, before the kernel sends a byte, so that a client's TCP option
/// carries the trace id of the request it sends.
#[raw_tracepoint(tracepoint = "tcp_sendmsg_locked")]
pub fn tcp_sendmsg_locked(ctx: RawTracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !traced((pid_tgid >> 32) as u32) {
        return 0;
    }
    let sk: u64 = ctx.arg(0);
    let thread = THREADS.get_ptr_mut(pid_tgid);
    // SAFETY: the thread's own record, from a successful lookup.
    if let Some(t) = thread
        && unsafe { (*t).call.enter_ns != 0 && (*t).call.sock == sk }
    {
        // A later buffer of the same call, or a call a syscall program recorded (sendmmsg,
        // sendfile).
        return 0;
    }
    // SAFETY: copied out of the map.
    let conn = unsafe { CONNS.get(sk) }.copied();
    if conn.is_some_and(|c| !wants_trace(c.flags)) || !port_wanted(sk) {
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
    // SAFETY: reads the monotonic clock.
    call.enter_ns = unsafe { bpf_ktime_get_ns() };
    if trace_context()
        && let Some(conn) = conn
    {
        if conn.role == ROLE_SERVER {
            serve_write(thread, sk);
        } else if conn.role == ROLE_CLIENT {
            let chosen = client_write(thread, sk, conn.conn_id);
            if conn.flags & CONN_F_LOCAL != 0 {
                hand_over(sk, chosen.map_or([0, 0], |(id, _)| id), send_len(&ctx));
            }
            if let Some((id, origin)) = chosen {
                call.trace_id = id;
                call.trace_flags = EV_F_TRACE | origin;
            }
        }
    }
    // SAFETY: the thread's own record, from a successful lookup; only this thread writes it.
    unsafe { (*thread).call = call };
    0
}

/// The bytes the send of this `tcp_sendmsg_locked` firing has left to queue (at its first firing,
/// the call's length); 0 when not known.
#[inline(always)]
fn send_len(ctx: &RawTracePointContext) -> u64 {
    let member = off!(msg_iter_count);
    if member == 0 {
        return 0;
    }
    let msg: u64 = ctx.arg(1);
    kread::<u64>(msg + member as u64).unwrap_or(0)
}

/// A write on a socket returned: emits its bytes, with the time and trace context that
/// `tcp_sendmsg_locked`, or the syscall entry where that is not attached, recorded at the call's
/// start.
#[raw_tracepoint(tracepoint = "sock_send_length")]
pub fn sock_send_length(ctx: RawTracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    // A thread without a record never sent on a traced TCP socket nor called the SSL library.
    let Some(thread) = THREADS.get_ptr_mut(pid_tgid) else {
        return 0;
    };
    let sk: u64 = ctx.arg(0);
    // SAFETY: the thread's own record, from a successful lookup; only this thread writes it.
    let started: Inflight = unsafe { (*thread).call };
    if started.enter_ns == 0 || started.sock != sk {
        // Not a traced TCP send: another kind of socket, or a connection userspace ignores,
        // whose socket an SSL call running on this thread still learns (see `enter_io`).
        if started.enter_ns != 0 && started.source == 0 {
            // A start `tcp_sendmsg_locked` recorded (it sets no source) for a send that ended
            // without this tracepoint on its socket: it must not pass for the next send's.
            // SAFETY: as above.
            unsafe { (*thread).call.enter_ns = 0 };
        }
        // SAFETY: as above; copied out of the map.
        if unsafe { (*thread).ssl } != 0
            && let Some(conn) = unsafe { CONNS.get(sk) }
        {
            tls::socket_io(pid_tgid, sk, || syscall_args().1[0] as i32, conn.conn_id);
        }
        return 0;
    }
    let (nr, args) = syscall_args();
    let Some((source, buf_kind)) = send_call(nr) else {
        // A send these programs do not take. Unless a syscall program recorded it, the record
        // `tcp_sendmsg_locked` made for it (a send from io_uring) ends here.
        if nr != NR_SENDMMSG && nr != NR_SENDFILE {
            // SAFETY: as above.
            unsafe { (*thread).call.enter_ns = 0 };
        }
        return 0;
    };
    let mut call = call_of(args, sk, source, DIR_SEND, buf_kind);
    call.enter_ns = started.enter_ns;
    call.trace_id = started.trace_id;
    call.trace_flags = started.trace_flags;
    let rc = length_ret(&ctx);
    if call.buf_kind == BUF_PLAIN {
        // SAFETY: as above.
        unsafe { (*thread).call.enter_ns = 0 };
        return emit_io::<0>(pid_tgid, call, Some(thread), None, rc, DIR_SEND);
    }
    // SAFETY: as above; the tail-called program takes the record.
    unsafe {
        (*thread).call = call;
        SOCK_IOV.tail_call(&ctx, SOCK_IOV_SEND);
        (*thread).call.enter_ns = 0;
    }
    count(CNT_TAIL_CALL_FAILED);
    0
}

// Never attached: userspace puts one of each pair in `SOCK_IOV` (the long loop where the
// verifier takes it, from 6.8 on).
#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn sock_recv_iov(ctx: RawTracePointContext) -> u32 {
    copy_iov::<MAX_IOVECS>(&ctx, DIR_RECV)
}

#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn sock_recv_iov_small(ctx: RawTracePointContext) -> u32 {
    copy_iov::<SMALL_IOVECS>(&ctx, DIR_RECV)
}

#[raw_tracepoint(tracepoint = "sock_send_length")]
pub fn sock_send_iov(ctx: RawTracePointContext) -> u32 {
    copy_iov::<MAX_IOVECS>(&ctx, DIR_SEND)
}

#[raw_tracepoint(tracepoint = "sock_send_length")]
pub fn sock_send_iov_small(ctx: RawTracePointContext) -> u32 {
    copy_iov::<SMALL_IOVECS>(&ctx, DIR_SEND)
}
