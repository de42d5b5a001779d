//! HTTP/2 (RFC 9113) with HPACK (RFC 7541), and gRPC on top of it (being written).

use crate::{ConnectionParser, Detection, Direction, Output, Protocol, Timing};

/// One HTTP/2 stream's request and response (a gRPC call when the content type says so).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Http2Exchange {
    /// Stream id.
    pub stream_id: u32,
    /// `:method`, when decoded.
    pub method: Option<String>,
    /// `:path`, when decoded.
    pub path: Option<String>,
    /// `:authority`, when decoded.
    pub authority: Option<String>,
    /// `:status` of the final response.
    pub status: Option<u16>,
    /// Request headers (regular, not pseudo-headers), bounded.
    pub request_headers: Vec<(String, String)>,
    /// Response headers, bounded.
    pub response_headers: Vec<(String, String)>,
    /// Trailers, bounded.
    pub trailers: Vec<(String, String)>,
    /// Request DATA bytes.
    pub request_body_size: u64,
    /// Response DATA bytes.
    pub response_body_size: u64,
}

/// Whether the bytes start an HTTP/2 connection (client preface) or look like HTTP/2 frames.
pub fn probe(_dir: Direction, _data: &[u8]) -> Detection {
    Detection::Unknown
}

/// HTTP/2 connection parser.
#[derive(Debug, Default)]
pub struct Http2Parser;

impl ConnectionParser for Http2Parser {
    fn protocol(&self) -> Protocol {
        Protocol::Http2
    }
    fn feed(&mut self, _dir: Direction, _data: &[u8], _timing: Timing, _out: &mut Vec<Output>) {}
    fn gap(&mut self, _dir: Direction, _len: u64, _timing: Timing, _out: &mut Vec<Output>) {}
    fn close(&mut self, _ts_ns: u64, _out: &mut Vec<Output>) {}
}
