//! Trace context in band: a sock_ops program, attached to the cgroup v2 root, that writes the
//! trace id the syscall programs chose for a client socket (kept in its `CONNS` entry, see
//! `ConnState::out_trace_id`) into a TCP header option of the socket's data segments, and on the
//! receiving host reads it into `IN_CTX`, where the server's read finds it. `CONNS` is keyed by
//! the socket's `struct sock` address (the context's `sk` here, the socket the syscall programs
//! see there), `IN_CTX` by the socket's tuple, built here from the `bpf_sock_ops` context and
//! there from `sock_common`.
//!
//! Option layout ([`TCP_OPT_KIND`]): kind 253, length 20, the 16-bit experiment id
//! [`TCP_OPT_EXID`], the 16-byte trace id. Requests flow from the connecting side, so only active
//! (client) sockets ask for the write callbacks and only passive (server) sockets for the parse
//! callback: the program runs for no other segment. Connections whose two ends are on this host
//! ask for neither (unless `LOCAL_OPTION`): their client writes put the id into `IN_CTX` themselves
//! (`hand_over`).

use core::ffi::c_void;
use core::ptr::{addr_of, read_volatile};

use aya_ebpf::bindings::{
    BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_HDR_OPT_LEN_CB, BPF_SOCK_OPS_PARSE_HDR_OPT_CB,
    BPF_SOCK_OPS_PARSE_UNKNOWN_HDR_OPT_CB_FLAG, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
    BPF_SOCK_OPS_WRITE_HDR_OPT_CB, BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG, bpf_sock_ops,
};
use aya_ebpf::helpers::generated::{bpf_load_hdr_opt, bpf_reserve_hdr_opt, bpf_store_hdr_opt};
use aya_ebpf::macros::sock_ops;
use aya_ebpf::programs::SockOpsContext;
use tracer_ebpf::abi::*;

use super::{
    AF_INET6, CONNS, IN_CTX, TraceId, TupleKey, canonical, count, in_ctx_record, is_local,
    local_hand_over, trace_bytes, wants_trace,
};

/// `args[0]` of `BPF_SOCK_OPS_HDR_OPT_LEN_CB` when the kernel computes the MSS: no segment is
/// sent, but the room reserved now is taken off every segment's payload.
const BPF_WRITE_HDR_TCP_CURRENT_MSS: u32 = 1;
/// Size of the fixed TCP header.
const TCP_HEADER: usize = 20;

/// Entry point for every sock_ops callback. Returns 1: a 0 would make the kernel ignore the
/// reservation.
#[sock_ops]
pub fn trace_tcp_opt(ctx: SockOpsContext) -> u32 {
    let ops = ctx.ops;
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            // A new connection at the address of an older socket, whose entry outlived it: no
            // write has chosen an id for this one yet. Without this, its segments would carry
            // the old socket's id (a process this agent does not trace, or whose writes bypass
            // the syscalls, never replaces it).
            if let Some(c) = CONNS.get_ptr_mut(&sock(ops)) {
                // SAFETY: pointer from a successful lookup; one byte's store.
                unsafe { (*c).out_origin = 0 };
            }
            // Both ends on this host: the client's writes hand their ids over in memory
            // (`hand_over`), and no segment of the connection runs this program.
            if !(local_hand_over() && is_local(&tuple(ops))) {
                let flags = ctx.cb_flags() | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG;
                let _ = ctx.set_cb_flags(flags as i32);
            }
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            // A new connection on a tuple an older one used: nothing received on it yet.
            let key = tuple(ops);
            let _ = IN_CTX.remove(&key);
            if !(local_hand_over() && is_local(&key)) {
                let flags = ctx.cb_flags() | BPF_SOCK_OPS_PARSE_UNKNOWN_HDR_OPT_CB_FLAG;
                let _ = ctx.set_cb_flags(flags as i32);
            }
        }
        BPF_SOCK_OPS_HDR_OPT_LEN_CB => reserve(&ctx),
        BPF_SOCK_OPS_WRITE_HDR_OPT_CB => write(ops),
        BPF_SOCK_OPS_PARSE_HDR_OPT_CB => parse(ops),
        _ => {}
    }
    1
}

/// One 32-bit context field. Volatile, so the compiler never merges two into a wider load, which
/// the verifier rejects for this context.
#[inline(always)]
fn field(p: *const u32) -> u32 {
    // SAFETY: `p` points into the program's context.
    unsafe { read_volatile(p) }
}

/// The socket's tuple as the syscall programs build it (`tuple_of`): addresses in network order,
/// ports in host order, an IPv4-mapped pair as IPv4 (`canonical`).
#[inline(always)]
fn tuple(ops: *mut bpf_sock_ops) -> TupleKey {
    canonical(raw_tuple(ops))
}

/// [`tuple`] as the socket's family gives it.
#[inline(always)]
fn raw_tuple(ops: *mut bpf_sock_ops) -> TupleKey {
    // SAFETY: field addresses inside the context; each is read with one 32-bit load.
    unsafe {
        let family = field(addr_of!((*ops).family)) as u16;
        // Network order in the upper half on little-endian kernels (the kernel shifts it there);
        // older documentation places it in the lower half: take whichever half is set.
        let remote = field(addr_of!((*ops).remote_port));
        let remote = if remote >> 16 != 0 {
            (remote >> 16) as u16
        } else {
            remote as u16
        };
        let mut t = TupleKey {
            family,
            local_port: field(addr_of!((*ops).local_port)) as u16,
            remote_port: u16::from_be(remote),
            _pad: 0,
            local_addr: [0; 16],
            remote_addr: [0; 16],
        };
        if family == AF_INET6 {
            let l = [
                field(addr_of!((*ops).local_ip6[0])),
                field(addr_of!((*ops).local_ip6[1])),
                field(addr_of!((*ops).local_ip6[2])),
                field(addr_of!((*ops).local_ip6[3])),
            ];
            let r = [
                field(addr_of!((*ops).remote_ip6[0])),
                field(addr_of!((*ops).remote_ip6[1])),
                field(addr_of!((*ops).remote_ip6[2])),
                field(addr_of!((*ops).remote_ip6[3])),
            ];
            // Each word holds its 4 address bytes in memory order.
            t.local_addr = core::mem::transmute::<[u32; 4], [u8; 16]>(l);
            t.remote_addr = core::mem::transmute::<[u32; 4], [u8; 16]>(r);
        } else {
            let l = field(addr_of!((*ops).local_ip4)).to_ne_bytes();
            let r = field(addr_of!((*ops).remote_ip4)).to_ne_bytes();
            t.local_addr[..4].copy_from_slice(&l);
            t.remote_addr[..4].copy_from_slice(&r);
        }
        t
    }
}

/// The `struct sock` address of the context's socket, the key of `CONNS`; 0 when
/// there is none.
#[inline(always)]
fn sock(ops: *mut bpf_sock_ops) -> u64 {
    // SAFETY: context field read; the verifier checks the access.
    unsafe { read_volatile(addr_of!((*ops).__bindgen_anon_2.sk)) as u64 }
}

/// The segment's sequence number and payload length, from its TCP header (received segments; and
/// outgoing ones in the write callback, whose header is written by then).
#[inline(always)]
fn segment(ops: *mut bpf_sock_ops) -> Option<(u32, u32)> {
    // SAFETY: `skb_data` and `skb_data_end` are 64-bit context fields (packet pointers); the
    // header bytes are read only after the bounds check the verifier requires.
    unsafe {
        let data = read_volatile(addr_of!((*ops).__bindgen_anon_3) as *const u64) as usize;
        let end = read_volatile(addr_of!((*ops).__bindgen_anon_4) as *const u64) as usize;
        if data + TCP_HEADER > end {
            return None;
        }
        let b = data as *const u8;
        let seq = u32::from_be_bytes([*b.add(4), *b.add(5), *b.add(6), *b.add(7)]);
        let header = (*b.add(12) >> 4) as u32 * 4;
        let len = field(addr_of!((*ops).skb_len));
        Some((seq, len.saturating_sub(header)))
    }
}

/// `BPF_SOCK_OPS_HDR_OPT_LEN_CB`: room for the option on data segments of a socket with a trace
/// to send, and in the MSS computed for it (so full-sized segments still fit the path MTU).
#[inline(always)]
fn reserve(ctx: &SockOpsContext) {
    let ops = ctx.ops;
    // SAFETY: a field of the context.
    let mss = field(unsafe { addr_of!((*ops).__bindgen_anon_1.args[0]) })
        == BPF_WRITE_HDR_TCP_CURRENT_MSS;
    // Before the header is written the length is the payload's: zero for pure ACKs.
    // SAFETY: a field of the context.
    let data = field(unsafe { addr_of!((*ops).skb_len) }) != 0;
    if !mss && !data {
        return;
    }
    let sk = sock(ops);
    // SAFETY: copied out of the map; the key is the `struct sock` address, as the syscall
    // programs key it.
    let conn = if sk == 0 {
        None
    } else {
        unsafe { CONNS.get(&sk) }
    };
    if conn.is_none_or(|c| c.out_origin == 0) {
        if data && conn.is_some_and(|c| !wants_trace(c.flags)) {
            // No write on this connection will choose a trace id (userspace cleared the one its
            // first writes chose): stop running for its segments. A new connection, even at the
            // same address, sets the flag again when it is established.
            let flags = ctx.cb_flags() & !BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG;
            let _ = ctx.set_cb_flags(flags as i32);
            count(CNT_TCP_OPT_STOPPED);
        }
        return;
    }
    // SAFETY: the context pointer is the program's own.
    let rc = unsafe { bpf_reserve_hdr_opt(ops, TCP_OPT_LEN as u32, 0) };
    if rc != 0 && !mss {
        count(CNT_TCP_OPT_NO_ROOM);
    }
}

/// `BPF_SOCK_OPS_WRITE_HDR_OPT_CB`: the option itself, in the room reserved for this segment.
#[inline(always)]
fn write(ops: *mut bpf_sock_ops) {
    let sk = sock(ops);
    if sk == 0 {
        return;
    }
    // SAFETY: copied out of the map.
    let Some(out) = (unsafe { CONNS.get(&sk) }).map(|c| (c.out_trace_id, c.out_origin)) else {
        return;
    };
    if out.1 == 0 {
        return;
    }
    // Another program may have reserved room on a segment this one skipped.
    if !matches!(segment(ops), Some((_, len)) if len > 0) {
        return;
    }
    let mut opt = [0u8; TCP_OPT_LEN];
    opt[0] = TCP_OPT_KIND;
    opt[1] = TCP_OPT_LEN as u8;
    opt[2..4].copy_from_slice(&TCP_OPT_EXID.to_be_bytes());
    opt[4..].copy_from_slice(&trace_bytes(out.0));
    // SAFETY: `opt` is TCP_OPT_LEN bytes on the stack.
    let rc =
        unsafe { bpf_store_hdr_opt(ops, opt.as_ptr() as *const c_void, TCP_OPT_LEN as u32, 0) };
    if rc == 0 {
        count(CNT_TCP_OPT_WRITTEN);
    }
}

/// `BPF_SOCK_OPS_PARSE_HDR_OPT_CB` (segments with an option the kernel does not know): a trace id
/// for the receiving socket, with the sequence range of the bytes it came with.
#[inline(always)]
fn parse(ops: *mut bpf_sock_ops) {
    let Some((seq, len)) = segment(ops) else {
        return;
    };
    if len == 0 {
        return;
    }
    // Search by kind and experiment id: kind, "length" 4 (kind, length and the 2-byte id), id.
    let mut opt = [0u8; TCP_OPT_LEN];
    opt[0] = TCP_OPT_KIND;
    opt[1] = 4;
    opt[2..4].copy_from_slice(&TCP_OPT_EXID.to_be_bytes());
    // SAFETY: `opt` is TCP_OPT_LEN writable bytes on the stack.
    let rc =
        unsafe { bpf_load_hdr_opt(ops, opt.as_mut_ptr() as *mut c_void, TCP_OPT_LEN as u32, 0) };
    if rc != TCP_OPT_LEN as i64 || opt[1] != TCP_OPT_LEN as u8 {
        return;
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&opt[4..]);
    // SAFETY: 16 plain bytes are two u64.
    let trace_id = unsafe { core::mem::transmute::<[u8; 16], TraceId>(id) };
    in_ctx_record(&tuple(ops), trace_id, seq, seq.wrapping_add(len));
    count(CNT_TCP_OPT_READ);
}
