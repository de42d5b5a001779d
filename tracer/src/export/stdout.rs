//! Stdout mode: one human-readable line per span, e.g.
//! `2023-11-14T22:13:20.123Z checkout SERVER "GET /orders/{id}" OK 12.345ms method=GET path=/orders/42
//! status=200 server=10.0.0.2:8080 client=10.0.0.9:51234 trace=0af7651916cd43dd8448eb211c80319c`.

use std::fmt::Write as _;

use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};

use crate::span::{Span, SpanKind, Status, ValueRef};

/// Writes formatted spans through a buffer flushed once per batch.
pub(crate) struct LineWriter {
    out: BufWriter<Box<dyn AsyncWrite + Send + Unpin>>,
    line: String,
}

impl LineWriter {
    /// Wraps `out` (stdout in production).
    pub(crate) fn new(out: Box<dyn AsyncWrite + Send + Unpin>) -> Self {
        LineWriter {
            out: BufWriter::new(out),
            line: String::new(),
        }
    }

    /// Writes one line per span and flushes.
    pub(crate) async fn write_batch(&mut self, spans: &[Span]) -> std::io::Result<()> {
        for span in spans {
            self.line.clear();
            format_span(span, &mut self.line);
            self.line.push('\n');
            self.out.write_all(self.line.as_bytes()).await?;
        }
        self.out.flush().await
    }
}

/// Appends the one-line form of `span` (no newline).
pub(crate) fn format_span(span: &Span, out: &mut String) {
    write_rfc3339_ms(span.start_unix_ns, out);
    out.push(' ');
    push_text(out, &span.resource.service_name);
    out.push_str(match span.kind {
        SpanKind::Server => " SERVER ",
        SpanKind::Client => " CLIENT ",
    });
    push_quoted(out, &span.name);
    match &span.status {
        Status::Unset => out.push_str(" OK"),
        Status::Error(None) => out.push_str(" ERROR"),
        Status::Error(Some(msg)) => {
            out.push_str(" ERROR(");
            push_quoted(out, msg);
            out.push(')');
        }
    }
    let dur_ns = span.end_unix_ns.saturating_sub(span.start_unix_ns);
    let _ = write!(
        out,
        " {}.{:03}ms",
        dur_ns / 1_000_000,
        (dur_ns % 1_000_000) / 1_000
    );

    let attr = |key: &str| span.attributes.get(key);
    push_attr(out, "method", attr("http.request.method"));
    push_attr(out, "url", attr("url.full"));
    if attr("url.full").is_none() {
        push_attr(out, "path", attr("url.path"));
    }
    push_attr(out, "status", attr("http.response.status_code"));
    push_address(out, "server", attr("server.address"), attr("server.port"));
    if attr("client.address").is_some() {
        push_address(out, "client", attr("client.address"), attr("client.port"));
    } else {
        push_address(
            out,
            "peer",
            attr("network.peer.address"),
            attr("network.peer.port"),
        );
    }
    out.push_str(" trace=");
    for b in span.trace_id {
        let _ = write!(out, "{b:02x}");
    }
}

fn push_attr(out: &mut String, label: &str, value: Option<ValueRef<'_>>) {
    if let Some(v) = value {
        out.push(' ');
        out.push_str(label);
        out.push('=');
        push_value(out, v);
    }
}

fn push_address(
    out: &mut String,
    label: &str,
    addr: Option<ValueRef<'_>>,
    port: Option<ValueRef<'_>>,
) {
    let Some(addr) = addr else { return };
    out.push(' ');
    out.push_str(label);
    out.push('=');
    push_value(out, addr);
    if let Some(port) = port {
        out.push(':');
        push_value(out, port);
    }
}

fn push_value(out: &mut String, v: ValueRef<'_>) {
    let _ = match v {
        ValueRef::Str(s) => {
            push_text(out, s);
            Ok(())
        }
        ValueRef::Int(i) => write!(out, "{i}"),
        ValueRef::Bool(b) => write!(out, "{b}"),
    };
}

/// Captured text goes to a terminal: anything but plain visible ASCII is quoted and escaped so a
/// traced request cannot inject newlines or escape sequences.
fn push_text(out: &mut String, s: &str) {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic() && b != b'"') {
        out.push_str(s);
    } else {
        push_quoted(out, s);
    }
}

fn push_quoted(out: &mut String, s: &str) {
    let _ = write!(out, "{s:?}");
}

/// Writes `YYYY-MM-DDThh:mm:ss.mmmZ` for a Unix time in ns.
fn write_rfc3339_ms(unix_ns: u64, out: &mut String) {
    let secs = unix_ns / 1_000_000_000;
    let millis = (unix_ns % 1_000_000_000) / 1_000_000;
    let days = secs / 86_400;
    let sod = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    let _ = write!(
        out,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    );
}

/// Gregorian date of a day count since 1970-01-01 (proleptic calendar, 400-year eras).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Shift the epoch to 0000-03-01 so leap days fall at the end of each year.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::export::otlp::tests::{resource, span};
    use crate::span::KeyValue;

    fn time(ns: u64) -> String {
        let mut s = String::new();
        write_rfc3339_ms(ns, &mut s);
        s
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_millis() {
        assert_eq!(time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(time(1_700_000_000_123_456_789), "2023-11-14T22:13:20.123Z");
        // 2024-02-29T23:59:59.999Z, a leap day.
        assert_eq!(time(1_709_251_199_999_000_000), "2024-02-29T23:59:59.999Z");
        assert_eq!(time(1_709_251_200_000_000_000), "2024-03-01T00:00:00.000Z");
        assert_eq!(time(951_782_400_000_000_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn server_span_line_has_key_fields() {
        let res = resource("checkout", 10);
        let mut s = span(1, &res);
        s.name = "GET /orders/{id}".into();
        s.start_unix_ns = 1_700_000_000_123_000_000;
        s.end_unix_ns = s.start_unix_ns + 12_345_678;
        s.attributes = vec![
            KeyValue::str("http.request.method", "GET"),
            KeyValue::str("url.path", "/orders/42"),
            KeyValue::int("http.response.status_code", 200),
            KeyValue::str("server.address", "10.0.0.2"),
            KeyValue::int("server.port", 8080),
            KeyValue::str("client.address", "10.0.0.9"),
            KeyValue::int("client.port", 51234),
            KeyValue::str("network.peer.address", "10.0.0.1"),
        ]
        .into();
        let mut line = String::new();
        format_span(&s, &mut line);
        assert_eq!(
            line,
            "2023-11-14T22:13:20.123Z checkout SERVER \"GET /orders/{id}\" OK 12.345ms method=GET path=/orders/42 \
             status=200 server=10.0.0.2:8080 client=10.0.0.9:51234 trace=01010101010101010101010101010101"
        );
    }

    #[test]
    fn client_error_span_prefers_full_url_and_peer() {
        let res = resource("web", 10);
        let mut s = span(2, &res);
        s.kind = SpanKind::Client;
        s.status = Status::Error(Some("timed out".into()));
        s.end_unix_ns = s.start_unix_ns + 1_500;
        s.attributes = vec![
            KeyValue::str("url.full", "http://api/x?q=1"),
            KeyValue::str("url.path", "/x"),
            KeyValue::str("network.peer.address", "10.1.1.1"),
            KeyValue::int("network.peer.port", 80),
        ]
        .into();
        let mut line = String::new();
        format_span(&s, &mut line);
        assert!(line.contains(" web CLIENT \"GET /item/2\" ERROR(\"timed out\") 0.001ms url=http://api/x?q=1 peer=10.1.1.1:80 "), "{line}");
        assert!(!line.contains("path="), "{line}");
    }

    #[test]
    fn captured_text_cannot_break_the_line() {
        let res = Arc::new(crate::span::Resource {
            service_name: "evil\x1b[2J".into(),
            pid: 1,
            attributes: Vec::new(),
        });
        let mut s = span(3, &res);
        s.name = "GET /\r\nforged line".into();
        s.attributes = vec![KeyValue::str("url.path", "/a b\n")].into();
        let mut line = String::new();
        format_span(&s, &mut line);
        assert!(
            !line.contains('\n') && !line.contains('\r') && !line.contains('\x1b'),
            "{line}"
        );
        assert!(line.contains("path=\"/a b\\n\""), "{line}");
        assert!(line.contains("\"evil\\u{1b}[2J\""), "{line}");
    }

    #[tokio::test]
    async fn batch_lines_are_flushed() {
        let (w, mut r) = tokio::io::duplex(1 << 16);
        let mut writer = LineWriter::new(Box::new(w));
        let res = resource("svc", 1);
        writer
            .write_batch(&[span(1, &res), span(2, &res)])
            .await
            .unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let n = tokio::io::AsyncReadExt::read(&mut r, &mut buf)
            .await
            .unwrap();
        let text = String::from_utf8(buf[..n].to_vec()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].contains("\"GET /item/1\"") && lines[1].contains("\"GET /item/2\""),
            "{text}"
        );
    }
}
