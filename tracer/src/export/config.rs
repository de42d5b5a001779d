//! Exporter configuration from the standard `OTEL_*` environment variables.
//!
//! Choices where the OpenTelemetry specification leaves room:
//! - The default protocol is `http/protobuf`, as the specification recommends for SDKs.
//! - A signal-specific variable (`OTEL_EXPORTER_OTLP_TRACES_*`) replaces the generic one entirely,
//!   headers included (they are not merged).
//! - An empty value counts as unset.
//! - `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` larger than `OTEL_BSP_MAX_QUEUE_SIZE` is lowered to it.
//! - Only `http://` endpoints are accepted: this build has no TLS client.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use hyper::Uri;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};

/// A configuration value that cannot be used; the message names its variable (or flag).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The value does not parse or is out of range.
    #[error("{var}: invalid value {value:?}: {reason}")]
    Invalid {
        /// Variable or flag name.
        var: String,
        /// The offending value.
        value: String,
        /// Why it was refused.
        reason: String,
    },
    /// An `https://` endpoint was given.
    #[error(
        "{var}: TLS export not supported yet ({value:?}); use an http:// endpoint, e.g. a local collector"
    )]
    TlsUnsupported {
        /// Variable or flag name.
        var: String,
        /// The offending value.
        value: String,
    },
}

impl ConfigError {
    fn invalid(var: &str, value: &str, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            var: var.to_string(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

/// OTLP wire protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/gRPC.
    Grpc,
    /// OTLP/HTTP with protobuf bodies.
    HttpProtobuf,
}

/// A protocol name other than `grpc` or `http/protobuf`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown OTLP protocol {0:?} (expected \"grpc\" or \"http/protobuf\")")]
pub struct UnknownProtocol(String);

impl FromStr for Protocol {
    type Err = UnknownProtocol;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "grpc" => Ok(Protocol::Grpc),
            "http/protobuf" => Ok(Protocol::HttpProtobuf),
            other => Err(UnknownProtocol(other.to_string())),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http/protobuf",
        })
    }
}

/// Where the collector is, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A base URL (`OTEL_EXPORTER_OTLP_ENDPOINT`, `--otlp-endpoint`): HTTP appends `/v1/traces`.
    Base(Uri),
    /// The full traces URL (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), used as-is.
    Traces(Uri),
}

impl Endpoint {
    /// Parses a base endpoint; `var` names its source in errors.
    pub fn base(var: &str, value: &str) -> Result<Self, ConfigError> {
        parse_http_uri(var, value).map(Endpoint::Base)
    }

    /// Parses a full traces endpoint; `var` names its source in errors.
    pub fn traces(var: &str, value: &str) -> Result<Self, ConfigError> {
        parse_http_uri(var, value).map(Endpoint::Traces)
    }

    /// The URL requests go to: the full URL for HTTP, the origin (scheme and authority) for gRPC.
    pub fn resolve(&self, protocol: Protocol) -> String {
        let uri = match self {
            Endpoint::Base(u) | Endpoint::Traces(u) => u,
        };
        // Both constructors checked that scheme and authority exist.
        let scheme = uri.scheme_str().unwrap_or("http");
        let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
        match (protocol, self) {
            (Protocol::Grpc, _) => format!("{scheme}://{authority}"),
            (Protocol::HttpProtobuf, Endpoint::Traces(u)) => u.to_string(),
            (Protocol::HttpProtobuf, Endpoint::Base(u)) => {
                format!(
                    "{scheme}://{authority}{}/v1/traces",
                    u.path().trim_end_matches('/')
                )
            }
        }
    }
}

fn parse_http_uri(var: &str, value: &str) -> Result<Uri, ConfigError> {
    let uri: Uri = value
        .trim()
        .parse()
        .map_err(|e| ConfigError::invalid(var, value, format!("not a URL: {e}")))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(ConfigError::TlsUnsupported {
                var: var.to_string(),
                value: value.to_string(),
            });
        }
        Some(other) => {
            return Err(ConfigError::invalid(
                var,
                value,
                format!("unsupported scheme {other:?}, expected http"),
            ));
        }
        None => {
            return Err(ConfigError::invalid(
                var,
                value,
                "missing scheme, expected http://host:port",
            ));
        }
    }
    match uri.host() {
        Some(h) if !h.is_empty() => Ok(uri),
        _ => Err(ConfigError::invalid(var, value, "missing host")),
    }
}

/// Exporter settings. Fields may be overridden after [`ExportConfig::from_lookup`] (CLI flags).
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// Collector endpoint; `None` prints spans on stdout instead.
    pub endpoint: Option<Endpoint>,
    /// OTLP protocol.
    pub protocol: Protocol,
    /// Extra request headers (gRPC metadata).
    pub headers: HeaderMap,
    /// Time allowed for one batch export, retries included.
    pub timeout: Duration,
    /// Longest time a span waits in a partial batch.
    pub schedule_delay: Duration,
    /// Spans per export request.
    pub max_export_batch_size: usize,
    /// Spans buffered before new ones are dropped. The default, 65536, is 32 times the SDKs'
    /// 2048: one agent exports for every process of a node, and when it catches up on a ring
    /// buffer that filled while it was short of CPU, tens of thousands of spans arrive at once
    /// (docs/performance.md). A queued span takes about 1 KB, so a full queue ~64 MB.
    pub max_queue_size: usize,
}

impl Default for ExportConfig {
    fn default() -> Self {
        ExportConfig {
            endpoint: None,
            protocol: Protocol::HttpProtobuf,
            headers: HeaderMap::new(),
            timeout: Duration::from_millis(10_000),
            schedule_delay: Duration::from_millis(5_000),
            max_export_batch_size: 512,
            max_queue_size: 65_536,
        }
    }
}

impl ExportConfig {
    /// Where spans go, for the startup log: `stdout` or `<url> (<protocol>)`.
    pub fn describe(&self) -> String {
        match &self.endpoint {
            None => "stdout".to_string(),
            Some(e) => format!("{} ({})", e.resolve(self.protocol), self.protocol),
        }
    }

    /// Reads the `OTEL_*` variables through `lookup` (the process environment or a test map).
    pub fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &'static str| {
            lookup(name)
                .filter(|v| !v.trim().is_empty())
                .map(|v| (name, v))
        };
        let either =
            |signal: &'static str, generic: &'static str| get(signal).or_else(|| get(generic));
        let endpoint = match (
            get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            get("OTEL_EXPORTER_OTLP_ENDPOINT"),
        ) {
            (Some((var, v)), _) => Some(Endpoint::traces(var, &v)?),
            (None, Some((var, v))) => Some(Endpoint::base(var, &v)?),
            (None, None) => None,
        };
        let mut cfg = ExportConfig {
            endpoint,
            ..ExportConfig::default()
        };
        if let Some((var, v)) = either(
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ) {
            cfg.protocol = v
                .parse()
                .map_err(|e: UnknownProtocol| ConfigError::invalid(var, &v, e.to_string()))?;
        }
        if let Some((var, v)) = either(
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
            "OTEL_EXPORTER_OTLP_HEADERS",
        ) {
            cfg.headers = parse_headers(var, &v)?;
        }
        if let Some((var, v)) = either(
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
            "OTEL_EXPORTER_OTLP_TIMEOUT",
        ) {
            cfg.timeout = Duration::from_millis(parse_number(var, &v, 1)?);
        }
        if let Some((var, v)) = get("OTEL_BSP_SCHEDULE_DELAY") {
            cfg.schedule_delay = Duration::from_millis(parse_number(var, &v, 0)?);
        }
        if let Some((var, v)) = get("OTEL_BSP_MAX_QUEUE_SIZE") {
            cfg.max_queue_size = to_usize(var, &v, parse_number(var, &v, 1)?)?;
        }
        if let Some((var, v)) = get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE") {
            cfg.max_export_batch_size = to_usize(var, &v, parse_number(var, &v, 1)?)?;
        }
        cfg.max_export_batch_size = cfg.max_export_batch_size.min(cfg.max_queue_size);
        Ok(cfg)
    }
}

fn parse_number(var: &str, value: &str, min: u64) -> Result<u64, ConfigError> {
    let n: u64 = value
        .trim()
        .parse()
        .map_err(|_| ConfigError::invalid(var, value, "expected a non-negative integer"))?;
    if n < min {
        return Err(ConfigError::invalid(
            var,
            value,
            format!("must be at least {min}"),
        ));
    }
    Ok(n)
}

fn to_usize(var: &str, value: &str, n: u64) -> Result<usize, ConfigError> {
    usize::try_from(n).map_err(|_| ConfigError::invalid(var, value, "too large"))
}

/// Parses `k=v,k2=v2` with percent-encoded keys and values (the W3C baggage form the spec uses).
fn parse_headers(var: &str, value: &str) -> Result<HeaderMap, ConfigError> {
    let mut map = HeaderMap::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (k, v) = item.split_once('=').ok_or_else(|| {
            ConfigError::invalid(var, value, format!("{item:?} is not key=value"))
        })?;
        let k = percent_decode(k.trim()).ok_or_else(|| {
            ConfigError::invalid(var, value, format!("bad percent-encoding in {k:?}"))
        })?;
        let v = percent_decode(v.trim()).ok_or_else(|| {
            ConfigError::invalid(var, value, format!("bad percent-encoding in {v:?}"))
        })?;
        let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| {
            ConfigError::invalid(var, value, format!("{k:?} is not a valid header name"))
        })?;
        let mut val = HeaderValue::from_str(&v).map_err(|_| {
            ConfigError::invalid(
                var,
                value,
                format!("value of {k:?} is not a valid header value"),
            )
        })?;
        // Header values are often credentials: keep them out of Debug output (and HPACK tables).
        val.set_sensitive(true);
        map.append(name, val);
    }
    Ok(map)
}

/// Decodes `%XX` escapes; `None` on a malformed escape or non-UTF-8 result.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(vars: &[(&str, &str)]) -> Result<ExportConfig, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ExportConfig::from_lookup(&|name| map.get(name).cloned())
    }

    #[test]
    fn defaults_without_variables_mean_stdout() {
        let cfg = parse(&[]).unwrap();
        assert_eq!(cfg.endpoint, None);
        assert_eq!(cfg.protocol, Protocol::HttpProtobuf);
        assert!(cfg.headers.is_empty());
        assert_eq!(cfg.timeout, Duration::from_secs(10));
        assert_eq!(cfg.schedule_delay, Duration::from_secs(5));
        assert_eq!(cfg.max_export_batch_size, 512);
        assert_eq!(cfg.max_queue_size, 65_536);
    }

    #[test]
    fn all_variables_are_read() {
        let cfg = parse(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "api-key=se%20cret, x-tenant=a%2Cb",
            ),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "64"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "256"),
        ])
        .unwrap();
        assert_eq!(cfg.protocol, Protocol::Grpc);
        assert_eq!(
            cfg.endpoint.as_ref().unwrap().resolve(cfg.protocol),
            "http://collector:4317"
        );
        assert_eq!(cfg.headers.get("api-key").unwrap(), "se cret");
        assert_eq!(cfg.headers.get("x-tenant").unwrap(), "a,b");
        assert!(
            !format!("{cfg:?}").contains("se cret"),
            "credentials must not show in Debug output"
        );
        assert_eq!(cfg.timeout, Duration::from_millis(2500));
        assert_eq!(cfg.schedule_delay, Duration::from_millis(100));
        assert_eq!(cfg.max_export_batch_size, 64);
        assert_eq!(cfg.max_queue_size, 256);
    }

    #[test]
    fn http_base_endpoint_gets_signal_path() {
        for (base, want) in [
            ("http://c:4318", "http://c:4318/v1/traces"),
            ("http://c:4318/", "http://c:4318/v1/traces"),
            ("http://c:4318/otlp/", "http://c:4318/otlp/v1/traces"),
        ] {
            let cfg = parse(&[("OTEL_EXPORTER_OTLP_ENDPOINT", base)]).unwrap();
            assert_eq!(
                cfg.endpoint.unwrap().resolve(Protocol::HttpProtobuf),
                want,
                "{base}"
            );
        }
    }

    #[test]
    fn signal_specific_variables_win() {
        let cfg = parse(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://generic:4318"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://traces:9999/custom/path",
            ),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "a=1,b=2"),
            ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "c=3"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "1000"),
            ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "3000"),
        ])
        .unwrap();
        assert_eq!(cfg.protocol, Protocol::HttpProtobuf);
        let endpoint = cfg.endpoint.unwrap();
        assert_eq!(
            endpoint.resolve(Protocol::HttpProtobuf),
            "http://traces:9999/custom/path"
        );
        assert_eq!(endpoint.resolve(Protocol::Grpc), "http://traces:9999");
        assert_eq!(cfg.headers.len(), 1);
        assert_eq!(cfg.headers.get("c").unwrap(), "3");
        assert_eq!(cfg.timeout, Duration::from_secs(3));
    }

    #[test]
    fn empty_values_count_as_unset() {
        let cfg = parse(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", " "),
        ])
        .unwrap();
        assert_eq!(cfg.endpoint, None);
        assert_eq!(cfg.protocol, Protocol::HttpProtobuf);
    }

    #[test]
    fn batch_size_is_capped_by_queue_size() {
        let cfg = parse(&[("OTEL_BSP_MAX_QUEUE_SIZE", "100")]).unwrap();
        assert_eq!(cfg.max_export_batch_size, 100);
    }

    #[test]
    fn bad_values_name_their_variable() {
        let cases = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "not a url"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "ftp://c/x"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "udp"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "novalue"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "k=%zz"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "bad key=v"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "10s"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "0"),
            ("OTEL_BSP_SCHEDULE_DELAY", "-1"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "0"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "lots"),
        ];
        for (var, value) in cases {
            let err = parse(&[(var, value)]).expect_err(var);
            let msg = err.to_string();
            assert!(msg.starts_with(var), "{msg}");
            assert!(matches!(err, ConfigError::Invalid { .. }), "{msg}");
        }
    }

    #[test]
    fn https_is_refused_clearly() {
        let err = parse(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4318")]).unwrap_err();
        assert!(matches!(err, ConfigError::TlsUnsupported { .. }));
        assert!(
            err.to_string().contains("TLS export not supported yet"),
            "{err}"
        );
        assert!(
            err.to_string().starts_with("OTEL_EXPORTER_OTLP_ENDPOINT"),
            "{err}"
        );
    }

    #[test]
    fn description_names_destination() {
        assert_eq!(parse(&[]).unwrap().describe(), "stdout");
        let cfg = parse(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")]).unwrap();
        assert_eq!(cfg.describe(), "http://c:4318/v1/traces (http/protobuf)");
    }

    #[test]
    fn flag_values_parse_like_variables() {
        assert_eq!("grpc".parse::<Protocol>(), Ok(Protocol::Grpc));
        assert!("GRPC".parse::<Protocol>().is_err());
        let e = Endpoint::base("--otlp-endpoint", "http://127.0.0.1:4318").unwrap();
        assert_eq!(
            e.resolve(Protocol::HttpProtobuf),
            "http://127.0.0.1:4318/v1/traces"
        );
        let err = Endpoint::base("--otlp-endpoint", "http://").unwrap_err();
        assert!(err.to_string().starts_with("--otlp-endpoint"), "{err}");
    }
}
