//! Decoding ring-buffer records into typed events.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use thiserror::Error;
use tracer_ebpf::abi::{self, EventHeader};

/// One decoded ring-buffer record; borrows the payload from the ring buffer.
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    /// The fixed header.
    pub header: EventHeader,
    /// The captured payload (empty for close events).
    pub payload: &'a [u8],
}

/// The trace context the kernel attached to a data event (`abi::EV_F_TRACE`): on a read from a
/// server socket, the trace of the request read; on a write to a client socket, the trace id sent
/// in the TCP option with those bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    /// The trace id (never all zero).
    pub trace_id: [u8; 16],
    /// It arrived in the TCP option of the request this thread serves (`abi::EV_F_TRACE_IN_BAND`).
    pub in_band: bool,
    /// The kernel generated it on this host (`abi::EV_F_TRACE_GENERATED`).
    pub generated: bool,
}

impl fmt::Display for TraceContext {
    /// The trace id in lowercase hex, as W3C `traceparent` writes it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.trace_id.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// Why a record could not be decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than the header.
    #[error("record of {0} bytes is shorter than the event header")]
    Short(usize),
    /// The header claims more payload than the record holds.
    #[error("record claims {claimed} payload bytes but holds {held}")]
    Truncated {
        /// Claimed by the header.
        claimed: u32,
        /// Present in the record.
        held: usize,
    },
    /// An event kind this build does not know.
    #[error("unknown event kind {0}")]
    UnknownKind(u8),
}

impl<'a> Event<'a> {
    /// Decodes a record.
    pub fn decode(record: &'a [u8]) -> Result<Event<'a>, DecodeError> {
        if record.len() < abi::HEADER_SIZE {
            return Err(DecodeError::Short(record.len()));
        }
        // SAFETY: the record holds at least HEADER_SIZE bytes and EventHeader is plain old data
        // (every bit pattern is valid); read_unaligned copes with any alignment.
        let header: EventHeader = unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) };
        if !matches!(
            header.kind,
            abi::KIND_DATA | abi::KIND_CLOSE | abi::KIND_EXIT | abi::KIND_EXEC
        ) {
            return Err(DecodeError::UnknownKind(header.kind));
        }
        let rest = &record[abi::HEADER_SIZE..];
        let payload = rest
            .get(..header.captured as usize)
            .ok_or(DecodeError::Truncated {
                claimed: header.captured,
                held: rest.len(),
            })?;
        Ok(Event { header, payload })
    }

    /// The trace context of a data event, if the kernel attached one.
    pub fn trace(&self) -> Option<TraceContext> {
        let flags = self.header.flags;
        (self.header.kind == abi::KIND_DATA && flags & abi::EV_F_TRACE != 0).then_some(
            TraceContext {
                trace_id: self.header.trace_id,
                in_band: flags & abi::EV_F_TRACE_IN_BAND != 0,
                generated: flags & abi::EV_F_TRACE_GENERATED != 0,
            },
        )
    }

    /// Local end of the connection.
    pub fn local(&self) -> SocketAddr {
        sockaddr(
            self.header.family,
            &self.header.local_addr,
            self.header.local_port,
        )
    }

    /// Remote end of the connection.
    pub fn remote(&self) -> SocketAddr {
        sockaddr(
            self.header.family,
            &self.header.remote_addr,
            self.header.remote_port,
        )
    }
}

fn sockaddr(family: u8, addr: &[u8; 16], port: u16) -> SocketAddr {
    const AF_INET6: u8 = 10;
    let ip = if family == AF_INET6 {
        let v6 = Ipv6Addr::from(*addr);
        // Dual-stack sockets talking IPv4 show up as ::ffff:a.b.c.d; report the IPv4 address.
        v6.to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6))
    } else {
        IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
    };
    SocketAddr::new(ip, port)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(h: EventHeader, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; abi::HEADER_SIZE];
        // SAFETY: v holds HEADER_SIZE bytes.
        unsafe { std::ptr::write_unaligned(v.as_mut_ptr().cast(), h) };
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn decodes_data_event_and_addresses() {
        let mut h = EventHeader {
            kind: abi::KIND_DATA,
            family: 2,
            captured: 3,
            ..Default::default()
        };
        h.local_addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        h.remote_addr[..4].copy_from_slice(&[10, 1, 2, 3]);
        h.local_port = 8080;
        h.remote_port = 40000;
        let rec = record(h, b"GET");
        let ev = Event::decode(&rec).expect("decodes");
        assert_eq!(ev.payload, b"GET");
        assert_eq!(ev.local(), "127.0.0.1:8080".parse().expect("addr"));
        assert_eq!(ev.remote(), "10.1.2.3:40000".parse().expect("addr"));
    }

    #[test]
    fn maps_v4_mapped_v6_to_v4() {
        let mut h = EventHeader {
            kind: abi::KIND_CLOSE,
            family: 10,
            ..Default::default()
        };
        h.remote_addr = Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped().octets();
        h.remote_port = 5;
        let rec = record(h, b"");
        assert_eq!(
            Event::decode(&rec).expect("decodes").remote(),
            "192.0.2.1:5".parse().expect("a")
        );
    }

    #[test]
    fn decodes_trace_context() {
        let mut h = EventHeader {
            kind: abi::KIND_DATA,
            flags: abi::EV_F_TCP_SEQ | abi::EV_F_TRACE | abi::EV_F_TRACE_IN_BAND,
            ..Default::default()
        };
        h.trace_id[0] = 0x0a;
        h.trace_id[15] = 0xff;
        let rec = record(h, b"");
        let t = Event::decode(&rec)
            .expect("decodes")
            .trace()
            .expect("trace");
        assert!(t.in_band && !t.generated);
        assert_eq!(t.to_string(), "0a0000000000000000000000000000ff");

        h.flags = abi::EV_F_TRACE | abi::EV_F_TRACE_GENERATED;
        let rec = record(h, b"");
        let t = Event::decode(&rec)
            .expect("decodes")
            .trace()
            .expect("trace");
        assert!(!t.in_band && t.generated);

        h.flags = abi::EV_F_TCP_SEQ;
        assert_eq!(
            Event::decode(&record(h, b"")).expect("decodes").trace(),
            None
        );
        // Only data events carry one.
        h.kind = abi::KIND_CLOSE;
        h.flags = abi::EV_F_TRACE;
        assert_eq!(
            Event::decode(&record(h, b"")).expect("decodes").trace(),
            None
        );
    }

    #[test]
    fn rejects_bad_records() {
        assert_eq!(Event::decode(&[0u8; 8]).unwrap_err(), DecodeError::Short(8));
        let h = EventHeader {
            kind: abi::KIND_DATA,
            captured: 10,
            ..Default::default()
        };
        assert_eq!(
            Event::decode(&record(h, b"abc")).unwrap_err(),
            DecodeError::Truncated {
                claimed: 10,
                held: 3
            }
        );
        let h = EventHeader {
            kind: 99,
            ..Default::default()
        };
        assert_eq!(
            Event::decode(&record(h, b"")).unwrap_err(),
            DecodeError::UnknownKind(99)
        );
    }
}
