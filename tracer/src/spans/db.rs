//! Spans for database statements (being written).

use std::sync::Arc;

use protocols::Exchange;
use protocols::postgres::PgExchange;

use super::{Clock, ConnAddrs};
use crate::span::{Resource, Span};

/// The span for one PostgreSQL statement, by the database semantic conventions.
pub fn postgres_span(
    ex: &Exchange,
    pg: &PgExchange,
    addrs: Option<&ConnAddrs>,
    resource: Arc<Resource>,
    clock: &Clock,
) -> Span {
    let _ = (ex, pg, addrs, resource, clock);
    unimplemented!("PostgreSQL spans are being written")
}
