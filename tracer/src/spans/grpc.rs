//! Spans for HTTP/2 streams and gRPC calls.
//!
//! A stream whose content type is `application/grpc*` becomes an RPC span (OpenTelemetry RPC and
//! gRPC semantic conventions, v1.37 attribute names): named `package.Service/Method` after `:path`,
//! with `rpc.system`, `rpc.service`, `rpc.method` and `rpc.grpc.status_code`. Any other stream
//! becomes an HTTP span built like the HTTP/1 one (same attributes and status rules), with
//! `network.protocol.version` `2` and the URL scheme taken from `:scheme`.
//!
//! The gRPC status is `grpc-status` (trailers, or a trailers-only response); without it, a final
//! HTTP status other than 200 maps to a gRPC code as gRPC clients do (`doc/http-grpc-status-mapping`
//! of the gRPC project). Span status: a CLIENT span is an error for any code but OK; a SERVER span
//! only for UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE and DATA_LOSS. A call
//! that ended without a status is an error on both sides.
//!
//! `error.type` values of gRPC spans: the status code name (`UNAVAILABLE`, or the number for codes
//! gRPC does not define) when the status marks an error; `no_response` when no response head was
//! seen; `response_incomplete` when the response started but no status came. A stream whose header
//! fields could not all be decoded (capture joined mid-connection) and whose response ended gets no
//! status rather than a guessed one.

use std::sync::Arc;

use protocols::http1::HttpExchange;
use protocols::http2::Http2Exchange;
use protocols::{Exchange, Outcome, Role};

use super::{
    Clock, ConnAddrs, ERROR_NO_RESPONSE, ERROR_RESPONSE_INCOMPLETE, Target, client_attributes,
    exchange_attributes, extract_context, ip_string, known_methods, parse_authority,
    push_endpoints, random_id, server_attributes,
};
use crate::metrics;
use crate::span::{Attributes, Resource, Span, SpanKind, Status};

/// Span name of a gRPC call whose method is not known.
const UNKNOWN_METHOD_NAME: &str = "grpc";

/// gRPC status code names, indexed by code (grpc `doc/statuscodes.md`).
const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// Codes that make a SERVER span an error.
const SERVER_ERROR_CODES: [u32; 6] = [2, 4, 12, 13, 14, 15];

/// HTTP/2 error code names (RFC 9113 section 7), indexed by code.
const H2_ERRORS: [&str; 14] = [
    "NO_ERROR",
    "PROTOCOL_ERROR",
    "INTERNAL_ERROR",
    "FLOW_CONTROL_ERROR",
    "SETTINGS_TIMEOUT",
    "STREAM_CLOSED",
    "FRAME_SIZE_ERROR",
    "REFUSED_STREAM",
    "CANCEL",
    "COMPRESSION_ERROR",
    "CONNECT_ERROR",
    "ENHANCE_YOUR_CALM",
    "INADEQUATE_SECURITY",
    "HTTP_1_1_REQUIRED",
];

/// The span for one HTTP/2 stream: a gRPC span when the content type is `application/grpc*`,
/// else an HTTP span with `network.protocol.version` "2".
pub fn http2_span(
    ex: &Exchange,
    h2: &Http2Exchange,
    addrs: Option<&ConnAddrs>,
    resource: Arc<Resource>,
    clock: &Clock,
) -> Span {
    let kind = match ex.role {
        Role::Server => SpanKind::Server,
        Role::Client => SpanKind::Client,
    };
    let parts = if h2.grpc {
        grpc_parts(ex, h2, kind, addrs)
    } else {
        http_parts(ex, h2, kind, addrs)
    };
    finish(ex, h2, kind, parts, resource, clock)
}

/// What differs between gRPC and HTTP spans.
struct Parts {
    name: String,
    attributes: Attributes,
    status: Status,
}

/// Name, attributes and status of an HTTP span for a non-gRPC stream.
fn http_parts(
    ex: &Exchange,
    h2: &Http2Exchange,
    kind: SpanKind,
    addrs: Option<&ConnAddrs>,
) -> Parts {
    let mut attrs = Attributes::scratch();
    let method = h2.method.as_deref();
    let known = method.filter(|m| known_methods().iter().any(|k| k == m));
    let name = known.unwrap_or("HTTP").to_owned();
    attrs.push_str("http.request.method", known.unwrap_or("_OTHER"));
    if let Some(m) = method.filter(|_| known.is_none()) {
        attrs.push_str("http.request.method_original", m);
    }

    // The HTTP/1 attribute builders read headers from an HttpExchange and the URL from a Target.
    let view = HttpExchange {
        request_headers: h2.request_headers.iter().map(|(k, v)| (k, v)).collect(),
        ..HttpExchange::default()
    };
    let (path, query) = match h2.path.as_deref() {
        Some("*") | None => (None, None),
        Some(p) => match p.split_once('?') {
            Some((path, query)) => (Some(path), Some(query)),
            None => (Some(p), None),
        },
    };
    let target = Target {
        scheme: h2.scheme.as_deref().map(str::to_ascii_lowercase),
        authority: h2.authority.as_deref().and_then(parse_authority),
        credentials: None,
        path,
        query,
    };
    let client_is_peer = match kind {
        SpanKind::Server => server_attributes(&view, &target, addrs, &mut attrs),
        SpanKind::Client => {
            client_attributes(&view, &target, addrs, &mut attrs);
            false
        }
    };
    if h2.path.is_none() {
        // A URL without its (undecoded) path would name another resource.
        attrs.remove("url.full");
    }

    attrs.push_str("network.protocol.name", "http");
    attrs.push_str("network.protocol.version", "2");
    if let Some(a) = addrs {
        push_endpoints(&mut attrs, a, client_is_peer);
    }
    let status = exchange_attributes(
        &mut attrs,
        kind,
        ex.outcome,
        h2.request_header("user-agent"),
        h2.status,
        (h2.request_body_size, h2.response_body_size),
    );
    Parts {
        name,
        attributes: attrs,
        status,
    }
}

/// Name, attributes and status of a gRPC span.
fn grpc_parts(
    ex: &Exchange,
    h2: &Http2Exchange,
    kind: SpanKind,
    addrs: Option<&ConnAddrs>,
) -> Parts {
    let mut attrs = Attributes::scratch();
    let call = h2.path.as_deref().and_then(service_method);
    let name = match call {
        Some((service, method)) => format!("{service}/{method}"),
        None => UNKNOWN_METHOD_NAME.to_owned(),
    };
    attrs.push_str("rpc.system", "grpc");
    if let Some((service, method)) = call {
        attrs.push_str("rpc.service", service);
        attrs.push_str("rpc.method", method);
    }
    let code = grpc_code(h2);
    if let Some(code) = code {
        attrs.push_int("rpc.grpc.status_code", i64::from(code));
    }

    // The server the client addressed: :authority, else the connection's server end.
    let server_end = addrs.map(|a| match kind {
        SpanKind::Client => a.remote,
        SpanKind::Server => a.local,
    });
    let authority = h2.authority.as_deref().and_then(parse_authority);
    let server = match (authority, server_end) {
        (Some(a), end) => Some((a.host.into(), a.port.or(end.map(|e| e.port())))),
        (None, Some(end)) => Some((ip_string(end.ip()), Some(end.port()))),
        (None, None) => None,
    };
    if let Some((host, port)) = server {
        attrs.push_str("server.address", &host);
        if let Some(port) = port {
            attrs.push_int("server.port", i64::from(port));
        }
    }
    attrs.push_str("network.protocol.name", "http");
    attrs.push_str("network.protocol.version", "2");
    if let Some(a) = addrs {
        push_endpoints(&mut attrs, a, kind == SpanKind::Server);
    }

    let (status, error_type) = grpc_status(kind, h2, code, ex.outcome);
    if let Some(error_type) = error_type {
        attrs.push_str("error.type", &error_type);
    }
    Parts {
        name,
        attributes: attrs,
        status,
    }
}

/// `("package.Service", "Method")` from a gRPC `:path` (`/package.Service/Method`).
fn service_method(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    let valid = |s: &str| !s.is_empty() && !s.contains(['/', '?', '#']);
    (valid(service) && valid(method)).then_some((service, method))
}

/// The call's status code: `grpc-status`, else one derived from a non-200 HTTP status.
fn grpc_code(h2: &Http2Exchange) -> Option<u32> {
    h2.grpc_status.or_else(|| {
        h2.status.filter(|&s| s != 200).map(|s| match s {
            400 => 13,
            401 => 16,
            403 => 7,
            404 => 12,
            429 | 502 | 503 | 504 => 14,
            _ => 2,
        })
    })
}

fn code_name(code: u32) -> String {
    usize::try_from(code)
        .ok()
        .and_then(|i| GRPC_CODES.get(i))
        .map_or_else(|| code.to_string(), |n| (*n).to_owned())
}

/// Span status and `error.type` of a gRPC call.
fn grpc_status(
    kind: SpanKind,
    h2: &Http2Exchange,
    code: Option<u32>,
    outcome: Outcome,
) -> (Status, Option<String>) {
    if let Some(code) = code {
        let error = match kind {
            SpanKind::Client => code != 0,
            SpanKind::Server => SERVER_ERROR_CODES.contains(&code),
        };
        return if error {
            (
                Status::Error(h2.grpc_message.clone().filter(|m| !m.is_empty())),
                Some(code_name(code)),
            )
        } else {
            (Status::Unset, None)
        };
    }
    if h2.degraded && outcome != Outcome::NoResponse {
        // The status may have been sent in fields that could not be decoded.
        return (Status::Unset, None);
    }
    let reset = h2.reset.map(|c| {
        let name = usize::try_from(c)
            .ok()
            .and_then(|i| H2_ERRORS.get(i))
            .copied()
            .unwrap_or("unknown error");
        format!("stream reset ({name})")
    });
    let (description, error_type) = if h2.status.is_none() {
        ("no response", ERROR_NO_RESPONSE)
    } else {
        ("no grpc-status", ERROR_RESPONSE_INCOMPLETE)
    };
    (
        Status::Error(Some(reset.unwrap_or_else(|| description.to_owned()))),
        Some(error_type.to_owned()),
    )
}

/// Assembles the span: trace context from the request headers (gRPC metadata are headers).
fn finish(
    ex: &Exchange,
    h2: &Http2Exchange,
    kind: SpanKind,
    parts: Parts,
    resource: Arc<Resource>,
    clock: &Clock,
) -> Span {
    let (trace_id, parent_span_id, trace_state) = match extract_context(|h| h2.request_header(h)) {
        Some(ctx) => {
            metrics::add("spans_with_remote_parent_total", "", 1);
            (ctx.trace_id, Some(ctx.span_id), ctx.trace_state)
        }
        None => (random_id(), None, String::new()),
    };
    let start_unix_ns = clock.to_unix_ns(ex.start_ns);
    Span {
        trace_id,
        span_id: random_id(),
        parent_span_id,
        trace_state,
        name: parts.name.into(),
        kind,
        start_unix_ns,
        end_unix_ns: clock.to_unix_ns(ex.end_ns).max(start_unix_ns),
        attributes: parts.attributes.finish(),
        status: parts.status,
        resource,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::span::ValueRef;
    use protocols::Detail;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00f067aa0ba902b7";

    fn resource() -> Arc<Resource> {
        Arc::new(Resource {
            service_name: "svc".to_owned(),
            pid: 1,
            attributes: Vec::new(),
        })
    }

    fn conn() -> ConnAddrs {
        ConnAddrs {
            local: "10.0.0.1:41000".parse().expect("local"),
            remote: "10.0.0.2:50051".parse().expect("remote"),
            tls: false,
        }
    }

    fn grpc_call(path: &str, grpc_status: Option<u32>) -> Http2Exchange {
        Http2Exchange {
            stream_id: 1,
            method: Some("POST".to_owned()),
            scheme: Some("http".to_owned()),
            path: Some(path.to_owned()),
            authority: Some("greeter.internal:50051".to_owned()),
            status: Some(200),
            request_headers: vec![
                ("content-type".to_owned(), "application/grpc".to_owned()),
                ("te".to_owned(), "trailers".to_owned()),
            ],
            grpc: true,
            grpc_status,
            ..Http2Exchange::default()
        }
    }

    fn span(role: Role, outcome: Outcome, h2: &Http2Exchange, addrs: Option<&ConnAddrs>) -> Span {
        let ex = Exchange {
            role,
            start_ns: 1_000,
            end_ns: 5_000,
            outcome,
            request_offset: 0,
            request_thread: 0,
            detail: Detail::Http2(h2.clone()),
        };
        http2_span(&ex, h2, addrs, resource(), &Clock::new())
    }

    fn int(span: &Span, key: &str) -> Option<i64> {
        match span.attributes.get(key) {
            Some(ValueRef::Int(i)) => Some(i),
            _ => None,
        }
    }

    #[test]
    fn grpc_client_span() {
        let call = grpc_call("/helloworld.Greeter/SayHello", Some(0));
        let s = span(Role::Client, Outcome::Complete, &call, Some(&conn()));
        assert_eq!(s.kind, SpanKind::Client);
        assert_eq!(s.name, "helloworld.Greeter/SayHello");
        assert_eq!(s.attr_str("rpc.system"), Some("grpc"));
        assert_eq!(s.attr_str("rpc.service"), Some("helloworld.Greeter"));
        assert_eq!(s.attr_str("rpc.method"), Some("SayHello"));
        assert_eq!(int(&s, "rpc.grpc.status_code"), Some(0));
        assert_eq!(s.attr_str("server.address"), Some("greeter.internal"));
        assert_eq!(int(&s, "server.port"), Some(50051));
        assert_eq!(s.attr_str("client.address"), None);
        assert_eq!(s.attr_str("network.protocol.name"), Some("http"));
        assert_eq!(s.attr_str("network.protocol.version"), Some("2"));
        assert_eq!(s.attr_str("network.peer.address"), Some("10.0.0.2"));
        assert_eq!(int(&s, "network.peer.port"), Some(50051));
        assert_eq!(s.attr_str("http.request.method"), None);
        assert_eq!(s.attr_str("error.type"), None);
        assert_eq!(s.status, Status::Unset);
        assert!(s.start_unix_ns < s.end_unix_ns);
    }

    #[test]
    fn grpc_server_span_uses_the_connection_when_authority_is_missing() {
        let mut call = grpc_call("/pkg.v1.Store/Get", Some(0));
        call.authority = None;
        let s = span(Role::Server, Outcome::Complete, &call, Some(&conn()));
        assert_eq!(s.kind, SpanKind::Server);
        assert_eq!(s.name, "pkg.v1.Store/Get");
        assert_eq!(s.attr_str("server.address"), Some("10.0.0.1"));
        assert_eq!(int(&s, "server.port"), Some(41000));
        assert_eq!(s.attr_str("client.address"), Some("10.0.0.2"));
        assert_eq!(int(&s, "client.port"), Some(50051));
    }

    #[test]
    fn grpc_status_rules_by_side() {
        for code in 0..=17u32 {
            let mut call = grpc_call("/a.B/C", Some(code));
            call.grpc_message = Some("why".to_owned());
            let client = span(Role::Client, Outcome::Complete, &call, None);
            let server = span(Role::Server, Outcome::Complete, &call, None);
            assert_eq!(int(&client, "rpc.grpc.status_code"), Some(i64::from(code)));
            let name = if code < 17 {
                GRPC_CODES[code as usize].to_owned()
            } else {
                "17".to_owned()
            };
            if code == 0 {
                assert_eq!(client.status, Status::Unset);
                assert_eq!(client.attr_str("error.type"), None);
            } else {
                assert_eq!(
                    client.status,
                    Status::Error(Some("why".to_owned())),
                    "{code}"
                );
                assert_eq!(client.attr_str("error.type"), Some(name.as_str()));
            }
            let server_error = matches!(code, 2 | 4 | 12 | 13 | 14 | 15);
            assert_eq!(
                matches!(server.status, Status::Error(_)),
                server_error,
                "server, code {code}"
            );
            assert_eq!(
                server.attr_str("error.type"),
                server_error.then_some(name.as_str())
            );
        }
        assert_eq!(GRPC_CODES[4], "DEADLINE_EXCEEDED");
        assert_eq!(GRPC_CODES[14], "UNAVAILABLE");
    }

    #[test]
    fn missing_grpc_status_is_an_error_on_both_sides() {
        // Reset before any response.
        let mut call = grpc_call("/a.B/C", None);
        call.status = None;
        call.reset = Some(8);
        for role in [Role::Client, Role::Server] {
            let s = span(role, Outcome::NoResponse, &call, None);
            assert_eq!(
                s.status,
                Status::Error(Some("stream reset (CANCEL)".to_owned()))
            );
            assert_eq!(s.attr_str("error.type"), Some("no_response"));
            assert_eq!(int(&s, "rpc.grpc.status_code"), None);
        }
        // Response head, then the connection closed.
        let call = grpc_call("/a.B/C", None);
        for role in [Role::Client, Role::Server] {
            let s = span(role, Outcome::NoResponse, &call, None);
            assert_eq!(s.attr_str("error.type"), Some("response_incomplete"));
            assert!(matches!(s.status, Status::Error(Some(_))));
        }
        // Fields that could not be decoded may have held the status: no guess.
        let mut call = grpc_call("/a.B/C", None);
        call.degraded = true;
        let s = span(Role::Client, Outcome::Complete, &call, None);
        assert_eq!(s.status, Status::Unset);
        assert_eq!(s.attr_str("error.type"), None);
    }

    #[test]
    fn http_status_without_grpc_status_maps_to_a_code() {
        for (http, code, name) in [
            (503, 14, "UNAVAILABLE"),
            (404, 12, "UNIMPLEMENTED"),
            (401, 16, "UNAUTHENTICATED"),
            (418, 2, "UNKNOWN"),
        ] {
            let mut call = grpc_call("/a.B/C", None);
            call.status = Some(http);
            let s = span(Role::Client, Outcome::Complete, &call, None);
            assert_eq!(int(&s, "rpc.grpc.status_code"), Some(code));
            assert_eq!(s.attr_str("error.type"), Some(name));
        }
    }

    #[test]
    fn unknown_grpc_method_names() {
        assert_eq!(service_method("/a.B/C"), Some(("a.B", "C")));
        for bad in [
            "", "/", "a.B/C", "/a.B", "/a.B/", "//C", "/a/B/C", "/a.B/C?x",
        ] {
            assert_eq!(service_method(bad), None, "{bad}");
        }
        let mut call = grpc_call("/", Some(0));
        call.path = None;
        let s = span(Role::Client, Outcome::Complete, &call, None);
        assert_eq!(s.name, "grpc");
        assert_eq!(s.attr_str("rpc.method"), None);
    }

    #[test]
    fn trace_context_from_grpc_metadata() {
        let mut call = grpc_call("/a.B/C", Some(0));
        call.request_headers
            .push(("traceparent".to_owned(), format!("00-{TRACE}-{PARENT}-01")));
        let s = span(Role::Server, Outcome::Complete, &call, None);
        assert_eq!(
            s.parent_span_id.map(hex),
            Some(PARENT.to_owned()),
            "parent from traceparent"
        );
        assert_eq!(hex(s.trace_id), TRACE);
        let fresh = span(
            Role::Server,
            Outcome::Complete,
            &grpc_call("/a.B/C", Some(0)),
            None,
        );
        assert_eq!(fresh.parent_span_id, None);
    }

    fn hex<const N: usize>(id: [u8; N]) -> String {
        id.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn http_get(path: Option<&str>, status: Option<u16>) -> Http2Exchange {
        Http2Exchange {
            stream_id: 3,
            method: Some("GET".to_owned()),
            scheme: Some("https".to_owned()),
            path: path.map(str::to_owned),
            authority: Some("example.com:8443".to_owned()),
            status,
            request_headers: vec![("user-agent".to_owned(), "curl/8".to_owned())],
            request_body_size: 0,
            response_body_size: 42,
            ..Http2Exchange::default()
        }
    }

    #[test]
    fn http2_server_span() {
        let h = http_get(Some("/a/b?sig=secret&x=1"), Some(200));
        let s = span(Role::Server, Outcome::Complete, &h, Some(&conn()));
        assert_eq!(s.name, "GET");
        assert_eq!(s.attr_str("http.request.method"), Some("GET"));
        assert_eq!(s.attr_str("url.scheme"), Some("https"));
        assert_eq!(s.attr_str("url.path"), Some("/a/b"));
        assert_eq!(s.attr_str("url.query"), Some("sig=REDACTED&x=1"));
        assert_eq!(s.attr_str("server.address"), Some("example.com"));
        assert_eq!(int(&s, "server.port"), Some(8443));
        assert_eq!(s.attr_str("client.address"), Some("10.0.0.2"));
        assert_eq!(s.attr_str("network.protocol.name"), Some("http"));
        assert_eq!(s.attr_str("network.protocol.version"), Some("2"));
        assert_eq!(s.attr_str("user_agent.original"), Some("curl/8"));
        assert_eq!(int(&s, "http.response.status_code"), Some(200));
        assert_eq!(int(&s, "http.response.body.size"), Some(42));
        assert_eq!(s.attr_str("rpc.system"), None);
        assert_eq!(s.status, Status::Unset);
    }

    #[test]
    fn http2_client_span_and_status_rules() {
        let h = http_get(Some("/a?b=1"), Some(404));
        let client = span(Role::Client, Outcome::Complete, &h, Some(&conn()));
        assert_eq!(
            client.attr_str("url.full"),
            Some("https://example.com:8443/a?b=1")
        );
        assert_eq!(client.status, Status::Error(None));
        assert_eq!(client.attr_str("error.type"), Some("404"));
        let server = span(Role::Server, Outcome::Complete, &h, None);
        assert_eq!(server.status, Status::Unset);
        let h = http_get(Some("/"), Some(503));
        let server = span(Role::Server, Outcome::Complete, &h, None);
        assert_eq!(server.attr_str("error.type"), Some("503"));
        let h = http_get(Some("/"), None);
        let reset = span(Role::Client, Outcome::NoResponse, &h, None);
        assert_eq!(reset.attr_str("error.type"), Some("no_response"));
    }

    #[test]
    fn undecoded_method_and_path_are_left_out() {
        let mut h = http_get(None, Some(200));
        h.method = None;
        h.degraded = true;
        let s = span(Role::Client, Outcome::Complete, &h, Some(&conn()));
        assert_eq!(s.name, "HTTP");
        assert_eq!(s.attr_str("http.request.method"), Some("_OTHER"));
        assert_eq!(s.attr_str("http.request.method_original"), None);
        assert_eq!(s.attr_str("url.full"), None);
        assert_eq!(s.attr_str("url.path"), None);
        assert_eq!(s.attr_str("server.address"), Some("example.com"));
        let mut h = http_get(Some("/"), Some(200));
        h.method = Some("PURGE".to_owned());
        let s = span(Role::Server, Outcome::Complete, &h, None);
        assert_eq!(s.name, "HTTP");
        assert_eq!(s.attr_str("http.request.method_original"), Some("PURGE"));
    }
}
