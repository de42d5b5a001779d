//! TLS plaintext of Go programs: uprobes on `crypto/tls.(*Conn).Read` and `Write` (Go 1.17 and
//! later on x86-64, whose register ABI passes arguments and results in registers).
//!
//! At entry RAX holds the `*tls.Conn`, RBX and RCX the buffer's pointer and length; at a RET, RAX
//! holds the byte count. The socket comes from the `tls.Conn` itself (see [`GoTlsLayout`]), so the
//! plaintext carries the identity, tuple and role of the connection the syscalls see.
//!
//! Write is emitted at entry, with the whole buffer (Write sends all of it or fails): emitted at
//! return, a request could reach userspace after its response, because a goroutine coming back
//! from the write syscall may wait for a scheduler slot while another goroutine already reads the
//! answer. Read is emitted when it returns. A uretprobe rewrites the return address on the stack,
//! and Go moves goroutine stacks: a Go program probed that way crashes. So the entry probe of Read
//! records the call, keyed by goroutine (the current `g` is in R14) because a goroutine blocked in
//! Read resumes on another thread, and userspace attaches the return program at every RET
//! instruction of the function instead.

use core::ptr::read_volatile;

use aya_ebpf::EbpfContext as _;
use aya_ebpf::helpers::generated::{bpf_get_attach_cookie, bpf_ktime_get_ns};
use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_user as read_user,
};
use aya_ebpf::macros::{map, uprobe};
use aya_ebpf::maps::LruHashMap;
use aya_ebpf::programs::ProbeContext;
use tracer_ebpf::abi::*;

use super::tls::tls_advance;
use super::{
    CAPTURE_LIMIT, conn_advance, copy_user, count, fill_tuple, opaque, output, port_wanted,
    scratch, sock_of_fd, traced,
};

/// Go TLS reads in progress, keyed by (`g` address, tgid).
#[map]
static GO_READS: LruHashMap<[u64; 2], GoCall> = LruHashMap::with_max_entries(16384, 0);

#[repr(C)]
#[derive(Clone, Copy)]
struct GoCall {
    buf: u64,
    len: u64,
    sock: u64,
    enter_ns: u64,
    fd: i32,
    _pad: u32,
}

/// The socket (and fd) under the `*tls.Conn` at `conn`, laid out as `layout` says; `ip` is the
/// address of the probed function, to which the itab check is relative.
#[inline(always)]
fn socket_of(conn: u64, layout: GoTlsLayout, ip: u64) -> Option<(u64, i32)> {
    let iface = conn + layout.conn as u64;
    // SAFETY: user pointers read through the fault-tolerant helper.
    let itab: u64 = unsafe { read_user(iface as *const u64) }.ok()?;
    if layout.itab_delta != 0 && itab != ip.wrapping_add(layout.itab_delta as i64 as u64) {
        return None;
    }
    // SAFETY: as above.
    let tcp_conn: u64 = unsafe { read_user((iface + 8) as *const u64) }.ok()?;
    let netfd: u64 =
        unsafe { read_user((tcp_conn + layout.tcp_conn_fd as u64) as *const u64) }.ok()?;
    let fd: i64 = unsafe { read_user((netfd + layout.netfd_sysfd as u64) as *const i64) }.ok()?;
    let sock = sock_of_fd(fd)?;
    Some((sock, fd as i32))
}

/// Emits a Write's plaintext, or records a Read of the current goroutine, on entry.
#[inline(always)]
fn go_enter(ctx: &ProbeContext, direction: u8) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if !traced(tgid) {
        return 0;
    }
    // SAFETY: the probe context is the task's saved user registers.
    let (conn, buf, len, g, ip) = unsafe {
        let r = &*ctx.regs;
        (r.rax, r.rbx, r.rcx, r.r14, r.rip)
    };
    // SAFETY: reads the cookie userspace attached this probe with.
    let layout = GoTlsLayout::from_cookie(unsafe { bpf_get_attach_cookie(ctx.as_ptr()) });
    let Some((sock, fd)) = socket_of(conn, layout, ip) else {
        count(CNT_GO_TLS_NO_SOCKET);
        return 0;
    };
    if !port_wanted(sock) {
        return 0;
    }
    let call = GoCall {
        buf,
        len,
        sock,
        // SAFETY: reads the monotonic clock.
        enter_ns: unsafe { bpf_ktime_get_ns() },
        fd,
        _pad: 0,
    };
    if direction == DIR_SEND {
        if len > 0 {
            emit(pid_tgid, direction, &call, len);
        }
        return 0;
    }
    // The stack-growth path re-enters the function from its start: the second entry replaces the
    // first. An LRU map forgets calls that never returned (a panic).
    let _ = GO_READS.insert([g, tgid as u64], call, 0);
    0
}

/// Emits the plaintext of the current goroutine's Read that is returning.
#[inline(always)]
fn go_read_return(ctx: &ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: the probe context is the task's saved user registers.
    let (n, g) = unsafe {
        let r = &*ctx.regs;
        (r.rax as i64, r.r14)
    };
    let key = [g, tgid as u64];
    // SAFETY: copied out before removal; only this goroutine touches its own key.
    let Some(call) = (unsafe { GO_READS.get(key) }).copied() else {
        return 0;
    };
    let _ = GO_READS.remove(key);
    if n > 0 && n as u64 <= call.len {
        emit(pid_tgid, DIR_RECV, &call, n as u64);
    }
    0
}

/// Emits `bytes` plaintext bytes of `call`'s buffer moved in `direction`.
#[inline(always)]
fn emit(pid_tgid: u64, direction: u8, call: &GoCall, bytes: u64) {
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: reads the monotonic clock.
    let now = unsafe { bpf_ktime_get_ns() };
    let (conn, _) = conn_advance(call.sock, tgid, now, direction, 0);
    let offset = tls_advance(call.sock, conn.conn_id, direction, bytes);

    let Some(scratch) = scratch() else { return };
    // SAFETY: the per-CPU scratch slot belongs to this program invocation until it returns.
    let scratch = unsafe { &mut *scratch };
    let h = &mut scratch.header;
    h.kind = KIND_DATA;
    h.direction = direction;
    h.role = conn.role;
    h.source = if direction == DIR_SEND {
        SRC_GO_TLS_WRITE
    } else {
        SRC_GO_TLS_READ
    };
    h.flags = 0;
    h._pad0 = [0; 2];
    h.tgid = tgid;
    h.tid = pid_tgid as u32;
    h.fd = call.fd;
    h.enter_ns = call.enter_ns;
    h.exit_ns = now;
    h.conn_id = conn.conn_id;
    h.sock = call.sock;
    h.bytes = bytes;
    h.tcp_seq = 0;
    h.stream_offset = offset;
    h.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    fill_tuple(h, &mut scratch.tuple, call.sock);

    // SAFETY: plain read of a global set before load.
    let mut limit = unsafe { read_volatile(&CAPTURE_LIMIT) } as u64;
    if limit > MAX_CAPTURE as u64 {
        limit = MAX_CAPTURE as u64;
    }
    if conn.flags & CONN_F_NO_TLS_PAYLOAD != 0 {
        limit = 0;
    }
    let want = if bytes < limit { bytes } else { limit };
    let mut captured = copy_user(&mut scratch.data, 0, call.buf, want);
    if bytes > captured as u64 {
        count(CNT_TRUNCATED);
    }
    captured = opaque(captured);
    if captured > MAX_CAPTURE {
        captured = MAX_CAPTURE;
    }
    scratch.header.captured = captured as u32;
    output(scratch, HEADER_SIZE + captured);
}

/// `func (c *Conn) Read(b []byte) (int, error)` entry.
#[uprobe]
pub fn go_tls_read_enter(ctx: ProbeContext) -> u32 {
    go_enter(&ctx, DIR_RECV)
}

/// A RET instruction of `(*Conn).Read`.
#[uprobe]
pub fn go_tls_read_return(ctx: ProbeContext) -> u32 {
    go_read_return(&ctx)
}

/// `func (c *Conn) Write(b []byte) (int, error)` entry.
#[uprobe]
pub fn go_tls_write_enter(ctx: ProbeContext) -> u32 {
    go_enter(&ctx, DIR_SEND)
}
