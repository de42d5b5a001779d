//! PostgreSQL frontend/backend protocol v3 (being written).

use crate::{ConnectionParser, Detection, Direction, Output, Protocol, Timing};

/// One executed statement and its result.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PgExchange {
    /// SQL text, when known.
    pub query: Option<String>,
    /// Database from the startup message, when seen.
    pub database: Option<String>,
    /// User from the startup message, when seen.
    pub user: Option<String>,
    /// CommandComplete tag (`SELECT 3`), when the statement succeeded.
    pub command_tag: Option<String>,
    /// SQLSTATE of an ErrorResponse.
    pub sqlstate: Option<String>,
    /// Error message of an ErrorResponse.
    pub error_message: Option<String>,
}

/// Whether the bytes start a PostgreSQL connection or look like its message framing.
pub fn probe(_dir: Direction, _data: &[u8]) -> Detection {
    Detection::Unknown
}

/// PostgreSQL connection parser.
#[derive(Debug, Default)]
pub struct PgParser;

impl ConnectionParser for PgParser {
    fn protocol(&self) -> Protocol {
        Protocol::Postgres
    }
    fn feed(&mut self, _dir: Direction, _data: &[u8], _timing: Timing, _out: &mut Vec<Output>) {}
    fn gap(&mut self, _dir: Direction, _len: u64, _timing: Timing, _out: &mut Vec<Output>) {}
    fn close(&mut self, _ts_ns: u64, _out: &mut Vec<Output>) {}
}
