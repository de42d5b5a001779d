//! The event ABI between the kernel programs and userspace. Version [`ABI_VERSION`]; every type is
//! `#[repr(C)]`, 8-byte aligned, and read by userspace with an unaligned copy of the ring-buffer record.

/// Bumped on any layout change of the types in this module.
pub const ABI_VERSION: u32 = 7;

/// Compile-time ceiling of payload bytes copied per syscall. The runtime limit (`CAPTURE_LIMIT`) is
/// at most this.
pub const MAX_CAPTURE: usize = 16 * 1024;
/// Default runtime payload copy limit per syscall.
pub const DEFAULT_CAPTURE: u32 = 4096;
/// How many iovecs of one readv/writev/sendmsg/recvmsg are copied (gRPC writes 20-30 at once);
/// bytes in further iovecs become a gap.
pub const MAX_IOVECS: usize = 32;
/// The same where the kernel's verifier rejects the `MAX_IOVECS` loop (6.1).
pub const SMALL_IOVECS: usize = 8;

/// [`EventHeader::kind`]: bytes transferred on a socket; the payload follows the header.
pub const KIND_DATA: u8 = 1;
/// [`EventHeader::kind`]: the traced process closed its socket fd, or read end-of-stream from it
/// (`source` tells which).
pub const KIND_CLOSE: u8 = 2;
/// [`EventHeader::kind`]: the process exited (its sockets close without close(2)); only `tgid`,
/// `tid`, `comm` and the timestamps are set.
pub const KIND_EXIT: u8 = 3;
/// [`EventHeader::kind`]: the process executed a new program; the payload is its file name (up to
/// 255 bytes). Userspace names short-lived processes with it and looks at the new program's
/// libraries for TLS probes.
pub const KIND_EXEC: u8 = 4;

/// [`EventHeader::direction`]: the process wrote.
pub const DIR_SEND: u8 = 0;
/// [`EventHeader::direction`]: the process read.
pub const DIR_RECV: u8 = 1;

/// [`EventHeader::role`] / connection role: not seen connecting or accepting (opened before the agent).
pub const ROLE_UNKNOWN: u8 = 0;
/// The process connected (client end).
pub const ROLE_CLIENT: u8 = 1;
/// The process accepted (server end).
pub const ROLE_SERVER: u8 = 2;

/// [`EventHeader::source`] values: which hook produced the event.
pub const SRC_READ: u8 = 1;
/// write(2)
pub const SRC_WRITE: u8 = 2;
/// readv(2)
pub const SRC_READV: u8 = 3;
/// writev(2)
pub const SRC_WRITEV: u8 = 4;
/// recvfrom(2) / recv
pub const SRC_RECVFROM: u8 = 5;
/// sendto(2) / send
pub const SRC_SENDTO: u8 = 6;
/// recvmsg(2)
pub const SRC_RECVMSG: u8 = 7;
/// sendmsg(2)
pub const SRC_SENDMSG: u8 = 8;
/// recvmmsg(2), first message
pub const SRC_RECVMMSG: u8 = 9;
/// sendmmsg(2), first message
pub const SRC_SENDMMSG: u8 = 10;
/// close(2)
pub const SRC_CLOSE: u8 = 11;
/// sendfile(2): bytes counted, payload never copied (it does not pass through user memory).
pub const SRC_SENDFILE: u8 = 12;
/// sched_process_exit
pub const SRC_EXIT: u8 = 13;
/// SSL_read / SSL_read_ex return: TLS plaintext the process read. Its `stream_offset` counts the
/// connection's plaintext, a stream of its own beside the ciphertext the syscalls carry.
pub const SRC_SSL_READ: u8 = 14;
/// SSL_write / SSL_write_ex return: TLS plaintext the process wrote (see [`SRC_SSL_READ`]).
pub const SRC_SSL_WRITE: u8 = 15;
/// sched_process_exec
pub const SRC_EXEC: u8 = 16;
/// Return of Go's `crypto/tls.(*Conn).Read`: TLS plaintext a Go program read. Its `stream_offset`
/// counts the connection's plaintext, as for [`SRC_SSL_READ`].
pub const SRC_GO_TLS_READ: u8 = 17;
/// Return of Go's `crypto/tls.(*Conn).Write`: TLS plaintext a Go program wrote (see
/// [`SRC_GO_TLS_READ`]).
pub const SRC_GO_TLS_WRITE: u8 = 18;

/// Index into the `COUNTERS` per-CPU array: events lost because the ring buffer was full.
pub const CNT_RINGBUF_FULL: u32 = 0;
/// Payload copies from user memory that faulted (event sent without payload).
pub const CNT_COPY_FAULT: u32 = 1;
/// Syscalls whose entry could not be recorded (in-flight map full).
pub const CNT_INFLIGHT_FULL: u32 = 2;
/// Connections that could not be added to the connection map.
pub const CNT_CONN_FULL: u32 = 3;
/// Records emitted (data and control events).
pub const CNT_EVENTS: u32 = 4;
/// Syscalls whose payload was larger than the copy limit (event truncated, not lost).
pub const CNT_TRUNCATED: u32 = 5;
/// TLS plaintext events dropped because no socket was known for the SSL object.
pub const CNT_TLS_UNATTRIBUTED: u32 = 6;
/// Go TLS calls on a `tls.Conn` whose socket could not be found (not over a `*net.TCPConn`, or
/// not a TCP socket).
pub const CNT_GO_TLS_NO_SOCKET: u32 = 7;
/// TCP header options carrying a trace id written on outgoing data segments (see
/// [`TCP_OPT_KIND`]). Counted by the sock_ops program for every socket on the host it wrote to.
pub const CNT_TCP_OPT_WRITTEN: u32 = 8;
/// Trace-id TCP options read from incoming segments.
pub const CNT_TCP_OPT_READ: u32 = 9;
/// Data segments of a socket with a trace to send that had no room left for the option (other
/// options, such as SACK blocks, took the 40 bytes TCP allows): the segment went without it.
pub const CNT_TCP_OPT_NO_ROOM: u32 = 10;
/// Client sockets whose option callbacks were turned off because userspace ignores their
/// connection (unknown protocol, filtered out): no trace id will be sent on them.
pub const CNT_TCP_OPT_STOPPED: u32 = 11;
/// Reads whose trace-context program could not hand over to the exit program (an empty
/// `AFTER_CONTEXT` slot): the read went without an event.
pub const CNT_TAIL_CALL_FAILED: u32 = 12;
/// Number of counters.
pub const NUM_COUNTERS: u32 = 13;

/// Slots of `AFTER_CONTEXT`: the exit program of a read through iovecs, which its trace-context
/// program (`sys_exit_*_trace`, attached to the read's exit tracepoint in its place when the TCP
/// option runs) tail-calls once it stored the read's context. Reads into one plain buffer (`read`,
/// `recvfrom`) have no copy loop, and their exit programs find the context themselves.
pub const AFTER_CONTEXT_READV: u32 = 0;
/// See [`AFTER_CONTEXT_READV`].
pub const AFTER_CONTEXT_RECVMSG: u32 = 1;
/// See [`AFTER_CONTEXT_READV`].
pub const AFTER_CONTEXT_RECVMMSG: u32 = 2;
/// Number of `AFTER_CONTEXT` slots.
pub const AFTER_CONTEXT_SLOTS: u32 = 3;
/// Slots of `SOCK_IOV`: the program that copies a socket read through iovecs, which
/// `sock_recv_length` tail-calls (see `sock_hooks.rs`).
pub const SOCK_IOV_RECV: u32 = 0;
/// The same for a socket write, tail-called by `sock_send_length`.
pub const SOCK_IOV_SEND: u32 = 1;
/// Number of `SOCK_IOV` slots.
pub const SOCK_IOV_SLOTS: u32 = 2;

/// Header of every ring-buffer record. A data event is followed by `captured` payload bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    /// `KIND_*`.
    pub kind: u8,
    /// `DIR_*`.
    pub direction: u8,
    /// `ROLE_*` of the connection as the kernel knows it.
    pub role: u8,
    /// Address family of the socket: 2 (AF_INET) or 10 (AF_INET6).
    pub family: u8,
    /// `SRC_*`: the hook that produced the event.
    pub source: u8,
    /// `EV_F_*` flags.
    pub flags: u8,
    /// Reserved, zero.
    pub _pad0: [u8; 2],
    /// Process id (thread group id).
    pub tgid: u32,
    /// Thread id.
    pub tid: u32,
    /// File descriptor in the process.
    pub fd: i32,
    /// Payload bytes that follow this header.
    pub captured: u32,
    /// Monotonic ns (bpf_ktime_get_ns) at syscall entry for a client's send (where a request
    /// span starts); for a receive, whose entry is not timed (a read's start is when its bytes
    /// arrive, not when it began to wait), and a server's send (whose span time is its end, when
    /// the response left), the same as `exit_ns`. TLS plaintext events (SSL and Go probes): the
    /// call's entry either way.
    pub enter_ns: u64,
    /// Monotonic ns at syscall exit; for a send taken at the socket layer with its start timed
    /// (a client's), the same as `enter_ns`: one clock read per send. For a TCP read taken at
    /// the socket layer, TCP's own time of the read's last copy (`tcp_sock.tcp_clock_cache`, the
    /// same clock): no clock read.
    pub exit_ns: u64,
    /// Connection identity: monotonic ns at which the kernel first saw this socket. With `sock` and
    /// `tgid` it is unique across fd and socket reuse.
    pub conn_id: u64,
    /// Kernel address of the `struct sock`: the same on every process sharing the socket.
    pub sock: u64,
    /// Bytes the syscall actually transferred (its return value).
    pub bytes: u64,
    /// Local address (IPv4 in the first 4 bytes), network order.
    pub local_addr: [u8; 16],
    /// Remote address (IPv4 in the first 4 bytes), network order.
    pub remote_addr: [u8; 16],
    /// Local port, host order.
    pub local_port: u16,
    /// Remote port, host order.
    pub remote_port: u16,
    /// With [`EV_F_TCP_SEQ`]: the TCP sequence number of this event's first byte (the sender's
    /// sequence space, so both ends of a connection number the same byte alike). Read from
    /// `tcp_sock.write_seq` (send) or `copied_seq` (receive) at syscall exit, minus `bytes`.
    pub tcp_seq: u32,
    /// Position of this event's first byte in the connection's stream in `direction`, counted by
    /// the kernel from when it first saw the connection. A jump tells userspace events were lost.
    pub stream_offset: u64,
    /// The thread's command name (NUL-padded), for processes gone before userspace looks them up.
    /// Data events carry it only at the start of each direction of a connection (`stream_offset`
    /// 0), where userspace takes it (zeros on the others).
    pub comm: [u8; 16],
    /// With [`EV_F_TRACE`]: a W3C-sized trace id (16 bytes, never all zero). On a data event read
    /// from a server socket (`role` [`ROLE_SERVER`], [`DIR_RECV`]) it is the trace of the request
    /// being read; on a data event written to a client socket ([`ROLE_CLIENT`], [`DIR_SEND`]) it
    /// is the trace id the kernel put in the TCP option of the segments carrying these bytes
    /// ([`TCP_OPT_KIND`]). All zero without [`EV_F_TRACE`].
    pub trace_id: [u8; 16],
}

/// [`EventHeader::flags`]: `tcp_seq` holds the TCP sequence number of the first byte.
pub const EV_F_TCP_SEQ: u8 = 1;
/// [`EventHeader::flags`]: `trace_id` is set (see [`EventHeader::trace_id`]).
pub const EV_F_TRACE: u8 = 2;
/// [`EventHeader::flags`], with [`EV_F_TRACE`]: the trace id arrived in band, in the TCP option of
/// the segments that carried the request this thread serves (for a server read: this request's
/// bytes; for a client write: the request being served when the call was made).
pub const EV_F_TRACE_IN_BAND: u8 = 4;
/// [`EventHeader::flags`], with [`EV_F_TRACE`]: the trace id was generated by the kernel programs
/// on this host (a request that arrived without the option, or a client call made while the
/// thread served no request: the start of a trace).
pub const EV_F_TRACE_GENERATED: u8 = 8;

/// The trace-context TCP option: experimental kind 253 (RFC 4727), shared by experiments through a
/// 16-bit experiment id (RFC 6994). Layout, 20 bytes: kind (253), length (20), the experiment id
/// [`TCP_OPT_EXID`] in network order, then the 16-byte trace id.
pub const TCP_OPT_KIND: u8 = 253;
/// Experiment id of the option (RFC 6994 ExID, not registered with IANA): ASCII "Tr".
pub const TCP_OPT_EXID: u16 = 0x5472;
/// Total length of the option in bytes.
pub const TCP_OPT_LEN: usize = 20;

/// Size of [`EventHeader`] in bytes.
pub const HEADER_SIZE: usize = core::mem::size_of::<EventHeader>();

/// Struct member offsets (bytes) of the running kernel, resolved by userspace from BTF and written
/// into the `OFFSETS` global before the programs load.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `task_struct.files`
    pub task_files: u32,
    /// `files_struct.fdt`
    pub files_fdt: u32,
    /// `fdtable.max_fds`
    pub fdt_max_fds: u32,
    /// `fdtable.fd`
    pub fdt_fd: u32,
    /// `file.f_inode`
    pub file_inode: u32,
    /// `file.private_data`
    pub file_private_data: u32,
    /// `inode.i_mode`
    pub inode_mode: u32,
    /// `socket.sk`
    pub socket_sk: u32,
    /// `sock.__sk_common.skc_family`
    pub sk_family: u32,
    /// `sock.__sk_common.skc_daddr`
    pub sk_daddr: u32,
    /// `sock.__sk_common.skc_rcv_saddr`
    pub sk_rcv_saddr: u32,
    /// `sock.__sk_common.skc_dport` (network order)
    pub sk_dport: u32,
    /// `sock.__sk_common.skc_num` (host order)
    pub sk_num: u32,
    /// `sock.__sk_common.skc_v6_daddr`
    pub sk_v6_daddr: u32,
    /// `sock.__sk_common.skc_v6_rcv_saddr`
    pub sk_v6_rcv_saddr: u32,
    /// `sock.sk_type` (u16)
    pub sk_type: u32,
    /// `sock.sk_protocol` (u16)
    pub sk_protocol: u32,
    /// `task_struct.stack`: the kernel stack, whose top holds the task's saved user registers.
    pub task_stack: u32,
    /// `tcp_sock.write_seq`: sequence number after the last byte the process queued to send.
    pub tcp_write_seq: u32,
    /// `tcp_sock.copied_seq`: sequence number after the last byte the process read.
    pub tcp_copied_seq: u32,
    /// `file.f_op`
    pub file_f_op: u32,
    /// `msghdr.msg_iter.count`: the bytes a send has left to queue; 0 when BTF lacks it.
    pub msg_iter_count: u32,
    /// `sock.sk_shutdown` (u8): which directions are shut; 0 when BTF has no such byte, and then
    /// connections open and close at their syscalls.
    pub sk_shutdown: u32,
    /// `tcp_sock.tcp_clock_cache` (u64): the monotonic time TCP last read for the socket; 0 when
    /// BTF lacks it.
    pub tcp_clock_cache: u32,
    /// `sock.sk_user_data` (a pointer): set on a user's TCP socket where a sockmap's psock reads
    /// it for the process instead of TCP (and then TCP's clock above may be stale); 0 when BTF
    /// lacks it.
    pub sk_user_data: u32,
    /// Reserved, zero.
    pub _pad: u32,
}

const _: () = assert!(HEADER_SIZE.is_multiple_of(8));
const _: () = assert!(core::mem::size_of::<ConnState>().is_multiple_of(8));
const _: () = assert!(core::mem::size_of::<KernelOffsets>().is_multiple_of(8));

/// Value of the kernel's connection map (`CONNS`, keyed by `struct sock` address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnState {
    /// See [`EventHeader::conn_id`].
    pub conn_id: u64,
    /// `ROLE_*`.
    pub role: u8,
    /// `CONN_F_*` flags; userspace may set them.
    pub flags: u8,
    /// Address family of the tuple below (2 or 10), kept by the kernel programs from the first
    /// event that saw the connection's whole tuple; 0 until then.
    pub family: u8,
    /// Reserved, zero.
    pub _pad: u8,
    /// Process id (tgid) of the last process that read or wrote the connection, 0 before that:
    /// where the kernel programs take a connection's close from its TCP state changes rather than
    /// from close(2), the close event goes to this process's connection.
    pub owner: u32,
    /// Bytes the kernel saw sent on this connection (next send event's `stream_offset`).
    pub sent: u64,
    /// Bytes the kernel saw received on this connection.
    pub received: u64,
    /// With `family`: the connection's tuple, so that its events copy it from here rather than
    /// read the socket each time.
    pub tuple: ConnTuple,
    /// A client connection's outgoing trace context: the trace id its current request carries
    /// (in the TCP option of its segments, or handed over to a peer on this host), chosen by the
    /// write that starts the request and kept by its later writes until a response byte is read.
    pub out_trace_id: [u64; 2],
    /// Origin of `out_trace_id` (`EV_F_TRACE_IN_BAND` or `EV_F_TRACE_GENERATED`); 0 when none is
    /// chosen. Userspace clears it when it ignores the connection.
    pub out_origin: u8,
    /// Non-zero once a byte of the response to the request was read: the next write is a new
    /// request.
    pub out_responded: u8,
    /// Reserved, zero.
    pub _pad2: [u8; 6],
}

/// A connection's addresses and ports, as [`EventHeader`] carries them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnTuple {
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    /// Reserved, zero.
    pub _pad: u32,
}

/// [`ConnState::flags`]: userspace decided the connection's bytes on the wire carry nothing it
/// parses; its syscall data events are no longer sent (close events still are).
pub const CONN_F_NO_PAYLOAD: u8 = 1;
/// [`ConnState::flags`]: as [`CONN_F_NO_PAYLOAD`], for the TLS plaintext events of the connection.
pub const CONN_F_NO_TLS_PAYLOAD: u8 = 2;
/// [`ConnState::flags`]: the connection carries TLS (its plaintext comes from the SSL probes):
/// its client writes still choose a trace id for the TCP option, which the SSL probes report.
pub const CONN_F_TLS: u8 = 4;
/// [`ConnState::flags`], set by the kernel programs: a client connection whose other end is on
/// this host (a loopback address, or the connection's own local address). Its writes hand their
/// trace id to the receiving socket's in-band entry directly instead of through the TCP option.
pub const CONN_F_LOCAL: u8 = 8;

/// Where a Go program keeps the socket of a `crypto/tls.Conn`, and how to check that the
/// connection is a TCP one. Userspace chooses it per executable (by its Go version) and passes it
/// as the BPF cookie of the entry probes of `crypto/tls.(*Conn).Read` and `Write`; the kernel
/// follows `tls.Conn.conn` (a `net.Conn` interface: itab, data) -> `*net.TCPConn` -> `conn.fd`
/// (`*net.netFD`) -> `pfd.Sysfd` (an `int`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GoTlsLayout {
    /// Offset of `conn` (the `net.Conn` interface) in `crypto/tls.Conn`.
    pub conn: u16,
    /// Offset of `conn.fd` (a `*net.netFD`) in `net.TCPConn`.
    pub tcp_conn_fd: u8,
    /// Offset of `pfd.Sysfd` in `net.netFD`.
    pub netfd_sysfd: u8,
    /// Address of the itab of `*net.TCPConn` as a `net.Conn` minus the address of the probed
    /// function (the same in every process, position-independent or not); 0 when unknown, and
    /// then the interface's type is not checked.
    pub itab_delta: i32,
}

impl GoTlsLayout {
    /// The 64-bit cookie that carries this layout.
    pub const fn cookie(self) -> u64 {
        (self.conn as u64)
            | (self.tcp_conn_fd as u64) << 16
            | (self.netfd_sysfd as u64) << 24
            | (self.itab_delta as u32 as u64) << 32
    }

    /// The layout a cookie carries.
    pub const fn from_cookie(cookie: u64) -> GoTlsLayout {
        GoTlsLayout {
            conn: cookie as u16,
            tcp_conn_fd: (cookie >> 16) as u8,
            netfd_sysfd: (cookie >> 24) as u8,
            itab_delta: (cookie >> 32) as u32 as i32,
        }
    }
}
