//! TLS plaintext: uprobes on the SSL library's read and write calls (OpenSSL and BoringSSL, as a
//! shared library or linked into the executable).
//!
//! The entry probe records the call per thread; the return probe emits what was really transferred
//! with the identity of the connection the `SSL *` uses. That socket is learned from the syscall
//! path: a socket syscall a thread makes while one of its SSL calls is active is the SSL object's
//! own I/O ([`socket_io`]), and is remembered per SSL object for calls that need no syscall
//! (plaintext already decrypted and buffered). Libraries that move ciphertext through memory BIOs
//! (node) make no syscall inside the call; their ciphertext was read from the socket just before
//! the SSL_read that decrypts it, so the thread's most recent socket stands in.

use core::ptr::read_volatile;

use aya_ebpf::helpers::generated::bpf_ktime_get_ns;
use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_user as read_user,
};
use aya_ebpf::macros::{map, uprobe, uretprobe};
use aya_ebpf::maps::LruHashMap;
use aya_ebpf::programs::{ProbeContext, RetProbeContext};
use tracer_ebpf::abi::*;

use super::{
    CAPTURE_LIMIT, CONNS, Conn, conn_advance_at, copy_user, count, fill_tuple, opaque, output,
    scratch, thread_of, tls_trace, trace_bytes, traced,
};

/// Per thread (pid_tgid): its SSL call in progress and the socket it last did I/O on.
#[map]
static SSL_THREADS: LruHashMap<u64, SslThread> = LruHashMap::with_max_entries(16384, 0);

/// The socket each SSL object uses, keyed by (`SSL *`, tgid).
#[map]
static SSL_SOCKS: LruHashMap<[u64; 2], SslSock> = LruHashMap::with_max_entries(65536, 0);

/// Plaintext stream offsets per connection, keyed by `struct sock` address. Apart from `CONNS`
/// because userspace rewrites a `CONNS` entry when it sets flags, which could lose an advance.
#[map]
static TLS_STREAMS: LruHashMap<u64, TlsStream> = LruHashMap::with_max_entries(65536, 0);

#[repr(C)]
#[derive(Clone, Copy)]
struct SslThread {
    ssl: u64,
    buf: u64,
    /// For SSL_read_ex/SSL_write_ex: the `size_t *` that receives the byte count.
    out: u64,
    enter_ns: u64,
    /// Socket of a syscall made during the active call (0: none yet).
    during_sock: u64,
    /// Socket of the thread's latest socket syscall (0: none seen), and its connection id.
    last_sock: u64,
    last_conn: u64,
    during_fd: i32,
    last_fd: i32,
    active: u8,
    direction: u8,
    ex: u8,
    _pad: [u8; 5],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct SslSock {
    sock: u64,
    /// The connection on `sock` at the time: a freed socket's address may be reused by another.
    conn_id: u64,
    fd: i32,
    _pad: u32,
}

/// Where the plaintext of an SSL call goes.
struct Target {
    sock: u64,
    fd: i32,
    /// Remember it as the SSL object's socket.
    pin: bool,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct TlsStream {
    /// `ConnState::conn_id` the offsets belong to: a reused socket address starts over.
    conn_id: u64,
    sent: u64,
    received: u64,
}

/// Called by the syscall exit programs for every socket syscall that moved bytes: ties the socket
/// to the thread's active SSL call, and remembers it as the thread's latest socket. The data exit
/// programs call it only for threads that called the SSL library (`Thread::ssl`); it costs one
/// lookup, which misses for the others. `fd` gives the socket's fd, asked for only on a hit.
#[inline(always)]
pub(super) fn socket_io(pid_tgid: u64, sock: u64, fd: impl FnOnce() -> i32, conn_id: u64) {
    let Some(t) = SSL_THREADS.get_ptr_mut(pid_tgid) else {
        return;
    };
    let fd = fd();
    // SAFETY: pointer from a successful lookup; only this thread writes its own entry.
    unsafe {
        if (*t).active != 0 {
            (*t).during_sock = sock;
            (*t).during_fd = fd;
        }
        (*t).last_sock = sock;
        (*t).last_conn = conn_id;
        (*t).last_fd = fd;
    }
}

/// [`SslThread::direction`] of an `SSL_do_handshake` call.
const HANDSHAKE: u8 = 2;

/// Records an SSL read or write call on entry.
#[inline(always)]
fn ssl_enter(ctx: &ProbeContext, direction: u8, ex: u8) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !traced((pid_tgid >> 32) as u32) {
        return 0;
    }
    let ssl: u64 = ctx.arg(0).unwrap_or(0);
    let buf: u64 = ctx.arg(1).unwrap_or(0);
    let out: u64 = if ex != 0 { ctx.arg(3).unwrap_or(0) } else { 0 };
    // SAFETY: reads the monotonic clock.
    let now = unsafe { bpf_ktime_get_ns() };
    // Its socket syscalls look for this call from now on (also after a thread of a reused id
    // found the entry an exited one left).
    if let Some(thread) = thread_of(pid_tgid) {
        // SAFETY: the thread's own record, from a successful lookup.
        unsafe { (*thread).ssl = 1 };
    }
    if let Some(t) = SSL_THREADS.get_ptr_mut(pid_tgid) {
        // SAFETY: pointer from a successful lookup; only this thread writes its own entry.
        unsafe {
            (*t).ssl = ssl;
            (*t).buf = buf;
            (*t).out = out;
            (*t).enter_ns = now;
            (*t).during_sock = 0;
            (*t).during_fd = -1;
            (*t).active = 1;
            (*t).direction = direction;
            (*t).ex = ex;
        }
        return 0;
    }
    let t = SslThread {
        ssl,
        buf,
        out,
        enter_ns: now,
        during_sock: 0,
        last_sock: 0,
        last_conn: 0,
        during_fd: -1,
        last_fd: -1,
        active: 1,
        direction,
        ex,
        _pad: [0; 5],
    };
    // An LRU map makes room by evicting the least recently active thread.
    let _ = SSL_THREADS.insert(pid_tgid, t, 0);
    0
}

/// The position of `bytes` plaintext bytes in `direction` of connection `conn_id` on `sk`;
/// advances the count. Shared with the Go TLS probes.
#[inline(always)]
pub(super) fn tls_advance(sk: u64, conn_id: u64, direction: u8, bytes: u64) -> u64 {
    if let Some(s) = TLS_STREAMS.get_ptr_mut(sk) {
        // SAFETY: pointer from a successful lookup. Concurrent writers of one connection may race
        // on the counter; userspace then sees a bogus gap, never a crash.
        unsafe {
            if (*s).conn_id == conn_id {
                let counter = if direction == DIR_SEND {
                    &mut (*s).sent
                } else {
                    &mut (*s).received
                };
                let offset = *counter;
                *counter = offset + bytes;
                return offset;
            }
        }
    }
    let mut fresh = TlsStream {
        conn_id,
        sent: 0,
        received: 0,
    };
    if direction == DIR_SEND {
        fresh.sent = bytes;
    } else {
        fresh.received = bytes;
    }
    let _ = TLS_STREAMS.insert(sk, fresh, 0);
    0
}

/// Whether `sock` still carries connection `conn_id`.
#[inline(always)]
fn same_conn(sock: u64, conn_id: u64) -> bool {
    // SAFETY: value read out of the map.
    unsafe { CONNS.get(sock) }.is_some_and(|c| c.conn_id == conn_id)
}

/// Remembers `sock` (connection `conn_id`, fd `fd`) as the socket of the SSL object `key`.
#[inline(always)]
fn remember_socket(key: [u64; 2], sock: u64, conn_id: u64, fd: i32) {
    let s = SslSock {
        sock,
        conn_id,
        fd,
        _pad: 0,
    };
    let _ = SSL_SOCKS.insert(key, s, 0);
}

/// The socket the SSL object of `call` uses, or `None` when nothing tells.
#[inline(always)]
fn socket_of(call: &SslThread, key: [u64; 2]) -> Option<Target> {
    if call.during_sock != 0 {
        return Some(Target {
            sock: call.during_sock,
            fd: call.during_fd,
            pin: true,
        });
    }
    // SAFETY: value copied out of the map.
    if let Some(s) = unsafe { SSL_SOCKS.get(key) }.copied()
        && same_conn(s.sock, s.conn_id)
    {
        return Some(Target {
            sock: s.sock,
            fd: s.fd,
            pin: false,
        });
    }
    if call.last_sock != 0 && same_conn(call.last_sock, call.last_conn) {
        // Only a read pins the guess: its ciphertext came in on that socket just before the call.
        return Some(Target {
            sock: call.last_sock,
            fd: call.last_fd,
            pin: call.direction == DIR_RECV,
        });
    }
    None
}

/// Emits the plaintext of the thread's SSL call that just returned `rc`.
#[inline(always)]
fn ssl_exit(ctx: &RetProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(t) = SSL_THREADS.get_ptr_mut(pid_tgid) else {
        return 0;
    };
    // SAFETY: pointer from a successful lookup; only this thread writes its own entry.
    let call = unsafe { *t };
    if call.active == 0 {
        return 0;
    }
    // SAFETY: as above.
    unsafe { (*t).active = 0 };
    let tgid = (pid_tgid >> 32) as u32;
    let key = [call.ssl, tgid as u64];
    if call.direction == HANDSHAKE {
        // Remember the socket the handshake used as the SSL object's.
        if call.during_sock != 0 {
            if let Some(conn) = Conn::of(call.during_sock) {
                remember_socket(key, call.during_sock, conn.conn_id, call.during_fd);
            }
        }
        return 0;
    }
    let rc: i32 = ctx.ret();
    let bytes = if call.ex != 0 {
        if rc != 1 {
            return 0;
        }
        // SAFETY: user pointer read through the fault-tolerant helper.
        unsafe { read_user(call.out as *const u64) }.unwrap_or(0)
    } else if rc > 0 {
        rc as u64
    } else {
        0
    };
    if bytes == 0 {
        return 0;
    }
    let Some(Target { sock, fd, pin }) = socket_of(&call, key) else {
        count(CNT_TLS_UNATTRIBUTED);
        return 0;
    };
    // SAFETY: reads the monotonic clock.
    let now = unsafe { bpf_ktime_get_ns() };
    let (conn, _, slot) = conn_advance_at(None, sock, tgid, now, call.direction, 0);
    if pin {
        remember_socket(key, sock, conn.conn_id, fd);
    }
    let offset = tls_advance(sock, conn.conn_id, call.direction, bytes);

    let Some(scratch) = scratch() else { return 0 };
    // SAFETY: the per-CPU scratch slot belongs to this program invocation until it returns.
    let scratch = unsafe { &mut *scratch };
    let h = &mut scratch.header;
    h.kind = KIND_DATA;
    h.direction = call.direction;
    h.role = conn.role;
    h.source = if call.direction == DIR_SEND {
        SRC_SSL_WRITE
    } else {
        SRC_SSL_READ
    };
    h.flags = 0;
    h._pad0 = [0; 2];
    h.tgid = tgid;
    h.tid = pid_tgid as u32;
    h.fd = fd;
    h.enter_ns = call.enter_ns;
    h.exit_ns = now;
    h.conn_id = conn.conn_id;
    h.sock = sock;
    h.bytes = bytes;
    h.tcp_seq = 0;

    h.stream_offset = offset;
    h.comm = bpf_get_current_comm().unwrap_or([0; 16]);
    h.trace_id = [0; 16];
    if let Some((id, origin)) = tls_trace(pid_tgid, sock, &conn, slot, call.direction) {
        h.trace_id = trace_bytes(id);
        h.flags = EV_F_TRACE | origin;
    }
    fill_tuple(h, &mut scratch.tuple, sock);

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
    0
}

/// `int SSL_read(SSL *ssl, void *buf, int num)` entry.
#[uprobe]
pub fn ssl_read_enter(ctx: ProbeContext) -> u32 {
    ssl_enter(&ctx, DIR_RECV, 0)
}

/// `int SSL_read_ex(SSL *ssl, void *buf, size_t num, size_t *readbytes)` entry.
#[uprobe]
pub fn ssl_read_ex_enter(ctx: ProbeContext) -> u32 {
    ssl_enter(&ctx, DIR_RECV, 1)
}

/// `int SSL_write(SSL *ssl, const void *buf, int num)` entry.
#[uprobe]
pub fn ssl_write_enter(ctx: ProbeContext) -> u32 {
    ssl_enter(&ctx, DIR_SEND, 0)
}

/// `int SSL_write_ex(SSL *ssl, const void *buf, size_t num, size_t *written)` entry.
#[uprobe]
pub fn ssl_write_ex_enter(ctx: ProbeContext) -> u32 {
    ssl_enter(&ctx, DIR_SEND, 1)
}

/// `int SSL_do_handshake(SSL *ssl)` entry (SSL_accept and SSL_connect call it): moves no
/// plaintext, but the socket it reads and writes is the SSL object's. With TLS 1.3 the first
/// request can arrive in the handshake's last read, and the `SSL_read` that returns it then makes
/// no socket call of its own.
#[uprobe]
pub fn ssl_handshake_enter(ctx: ProbeContext) -> u32 {
    ssl_enter(&ctx, HANDSHAKE, 0)
}

/// `void SSL_free(SSL *ssl)` entry: the object's socket is forgotten. Node and other users of
/// memory BIOs allocate the next connection's `SSL` at the same address, and would otherwise inherit
/// this connection's socket while it lingers in `CONNS`.
#[uprobe]
pub fn ssl_free_enter(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let ssl: u64 = ctx.arg(0).unwrap_or(0);
    let _ = SSL_SOCKS.remove(&[ssl, pid_tgid >> 32]);
    0
}

/// Return of any of the five calls: the entry recorded which one it was.
#[uretprobe]
pub fn ssl_return(ctx: RetProbeContext) -> u32 {
    ssl_exit(&ctx)
}

// The exec event (KIND_EXEC) comes from `sched_process_exec` in programs.rs; it carries the file
// name, which also names processes that exit before userspace reads their /proc entry.
