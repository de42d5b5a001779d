//! Configuration: one typed struct from a TOML file, the environment and command-line flags.
//! Flags override the environment, which overrides the file, which overrides the defaults.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::export::ExportConfig;
use crate::linking::LinkConfig;

/// Why the configuration is unusable.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// An exporter setting is invalid.
    #[error("{0}")]
    Export(String),
    /// A value is out of range.
    #[error("{0}")]
    Invalid(String),
}

/// The config file's schema. Every field is optional; see [`Config`] for meanings and defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// See [`Config::capture_bytes`].
    pub capture_bytes: Option<u32>,
    /// See [`Config::ring_buffer_bytes`].
    pub ring_buffer_bytes: Option<u32>,
    /// See [`Config::pids`].
    #[serde(default)]
    pub pids: Vec<u32>,
    /// See [`Config::ports`].
    #[serde(default)]
    pub ports: Vec<u16>,
    /// See [`Config::exes`].
    #[serde(default)]
    pub exes: Vec<String>,
    /// See [`Config::idle_timeout`], in seconds.
    pub idle_timeout_secs: Option<u64>,
    /// See [`Config::max_connections`].
    pub max_connections: Option<usize>,
    /// See [`Config::metrics_addr`].
    pub metrics_addr: Option<SocketAddr>,
    /// See [`Config::metrics_log_interval`], in seconds.
    pub metrics_log_interval_secs: Option<u64>,
    /// See [`Config::sanitize_query_text`].
    pub sanitize_query_text: Option<bool>,
    /// See [`LinkConfig::enabled`].
    pub linking: Option<bool>,
    /// See [`LinkConfig::window`], in milliseconds.
    pub link_window_ms: Option<u64>,
    /// See [`LinkConfig::max_spans`].
    pub link_max_spans: Option<usize>,
    /// See [`Config::tcp_option`].
    pub tcp_option: Option<bool>,
    /// See [`Config::recover_blocked`], in seconds.
    pub recover_blocked_secs: Option<u64>,
    /// Standard OpenTelemetry variables (`OTEL_EXPORTER_OTLP_ENDPOINT` = "...", ...), used when
    /// the environment does not set them.
    #[serde(default)]
    pub otel: HashMap<String, String>,
}

/// Values given on the command line or through `TRACER_*` variables (clap merges those two).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// Config file.
    pub config: Option<PathBuf>,
    /// `--capture-bytes`.
    pub capture_bytes: Option<u32>,
    /// `--ring-buffer-bytes`.
    pub ring_buffer_bytes: Option<u32>,
    /// `--pid`.
    pub pids: Vec<u32>,
    /// `--port`.
    pub ports: Vec<u16>,
    /// `--exe`.
    pub exes: Vec<String>,
    /// `--metrics-addr`.
    pub metrics_addr: Option<SocketAddr>,
    /// `--otlp-endpoint`.
    pub otlp_endpoint: Option<String>,
    /// `--otlp-protocol`.
    pub otlp_protocol: Option<String>,
    /// `--raw-query-text`.
    pub raw_query_text: bool,
    /// `--no-linking`.
    pub no_linking: bool,
    /// `--link-window-ms`.
    pub link_window_ms: Option<u64>,
    /// `--no-tcp-option`.
    pub no_tcp_option: bool,
    /// `--recover-blocked-secs`.
    pub recover_blocked_secs: Option<u64>,
}

/// The agent's configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Payload bytes copied per syscall (default 4096, at most 16384).
    pub capture_bytes: u32,
    /// Kernel ring buffer size in bytes (power of two; default 8 MiB).
    pub ring_buffer_bytes: u32,
    /// Only these processes (empty: all).
    pub pids: Vec<u32>,
    /// Only connections with one of these local or remote ports (empty: all).
    pub ports: Vec<u16>,
    /// Only processes whose executable name is one of these (empty: all).
    pub exes: Vec<String>,
    /// Connections idle this long are forgotten (default 300 s).
    pub idle_timeout: Duration,
    /// Most connections tracked at once (default 65536).
    pub max_connections: usize,
    /// Where to serve Prometheus metrics (default: not served).
    pub metrics_addr: Option<SocketAddr>,
    /// How often non-zero counters are logged (default 60 s).
    pub metrics_log_interval: Duration,
    /// Replace literals in database query text (`db.query.text`) by `?` (default true).
    pub sanitize_query_text: bool,
    /// Span linking (default on, 1 s window, 50000 spans).
    pub linking: LinkConfig,
    /// Carry trace ids to other hosts in a TCP header option and read theirs (default true, where
    /// the kernel can).
    pub tcp_option: bool,
    /// How long after attaching the kernel programs still recover the socket calls that were
    /// already blocked at attach time (a server waiting in `recv` on an old connection), at a
    /// few tens of ns per read or write exit on the host while it lasts (default 60 s; 0: none).
    pub recover_blocked: Duration,
    /// Span export.
    pub export: ExportConfig,
}

impl Config {
    /// Builds the configuration from the file named in `o.config` (if any), the process environment
    /// and the overrides.
    pub fn load(o: &Overrides) -> Result<Config, ConfigError> {
        let file = match &o.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let env = |k: &str| std::env::var(k).ok();
        Config::build(file, o, &env)
    }

    /// Builds the configuration from parsed parts; `env` looks up environment variables.
    pub fn build(
        file: FileConfig,
        o: &Overrides,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let lookup = |k: &str| env(k).or_else(|| file.otel.get(k).cloned());
        let flagged = o.otlp_endpoint.is_some() || o.otlp_protocol.is_some();
        let merged = |k: &str| match k {
            "OTEL_EXPORTER_OTLP_ENDPOINT" if o.otlp_endpoint.is_some() => o.otlp_endpoint.clone(),
            "OTEL_EXPORTER_OTLP_PROTOCOL" if o.otlp_protocol.is_some() => o.otlp_protocol.clone(),
            // A flag replaces the generic variable, so it must also shadow the specific one.
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT" if o.otlp_endpoint.is_some() => None,
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL" if o.otlp_protocol.is_some() => None,
            _ => lookup(k),
        };
        let export = ExportConfig::from_lookup(&merged).map_err(|e| {
            let by = if flagged {
                " (given by --otlp-endpoint/--otlp-protocol)"
            } else {
                ""
            };
            ConfigError::Export(format!("{e}{by}"))
        })?;
        let cfg = Config {
            capture_bytes: o
                .capture_bytes
                .or(file.capture_bytes)
                .unwrap_or(tracer_ebpf::abi::DEFAULT_CAPTURE),
            ring_buffer_bytes: o
                .ring_buffer_bytes
                .or(file.ring_buffer_bytes)
                .unwrap_or(8 << 20),
            pids: pick(&o.pids, file.pids),
            ports: pick(&o.ports, file.ports),
            exes: pick(&o.exes, file.exes),
            idle_timeout: Duration::from_secs(file.idle_timeout_secs.unwrap_or(300)),
            max_connections: file.max_connections.unwrap_or(65536),
            metrics_addr: o.metrics_addr.or(file.metrics_addr),
            metrics_log_interval: Duration::from_secs(file.metrics_log_interval_secs.unwrap_or(60)),
            sanitize_query_text: !o.raw_query_text && file.sanitize_query_text.unwrap_or(true),
            linking: {
                let d = LinkConfig::default();
                LinkConfig {
                    enabled: !o.no_linking && file.linking.unwrap_or(d.enabled),
                    window: o
                        .link_window_ms
                        .or(file.link_window_ms)
                        .map_or(d.window, Duration::from_millis),
                    max_spans: file.link_max_spans.unwrap_or(d.max_spans),
                }
            },
            tcp_option: !o.no_tcp_option && file.tcp_option.unwrap_or(true),
            recover_blocked: Duration::from_secs(
                o.recover_blocked_secs
                    .or(file.recover_blocked_secs)
                    .unwrap_or(60),
            ),
            export,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let max = tracer_ebpf::abi::MAX_CAPTURE as u32;
        if self.capture_bytes > max {
            return Err(ConfigError::Invalid(format!(
                "capture_bytes {} is larger than the maximum {max}",
                self.capture_bytes
            )));
        }
        if self.ring_buffer_bytes < 4096 || !self.ring_buffer_bytes.is_power_of_two() {
            return Err(ConfigError::Invalid(format!(
                "ring_buffer_bytes {} must be a power of two of at least 4096",
                self.ring_buffer_bytes
            )));
        }
        if self.linking.window.is_zero() || self.linking.max_spans == 0 {
            return Err(ConfigError::Invalid(
                "link_window_ms and link_max_spans must be positive".into(),
            ));
        }
        if self.max_connections == 0 || self.idle_timeout.is_zero() {
            return Err(ConfigError::Invalid(
                "max_connections and idle_timeout_secs must be positive".into(),
            ));
        }
        Ok(())
    }
}

/// Repeatable flags replace the file's list when given at all.
fn pick<T: Clone>(flag: &[T], file: Vec<T>) -> Vec<T> {
    if flag.is_empty() { file } else { flag.to_vec() }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source: Box::new(source),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn flags_override_env_override_file() {
        let file: FileConfig = toml::from_str(
            "capture_bytes = 1024\nports = [80]\n[otel]\nOTEL_EXPORTER_OTLP_ENDPOINT = \"http://file:4318\"\n",
        )
        .expect("toml");
        let o = Overrides {
            capture_bytes: Some(2048),
            ..Default::default()
        };
        let env = env_of(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4318")]);
        let cfg = Config::build(file, &o, &env).expect("config");
        assert_eq!(cfg.capture_bytes, 2048);
        assert_eq!(cfg.ports, vec![80]);
        let endpoint = format!("{:?}", cfg.export);
        assert!(endpoint.contains("env:4318"), "{endpoint}");
    }

    #[test]
    fn endpoint_flag_wins() {
        let o = Overrides {
            otlp_endpoint: Some("http://flag:4317".into()),
            ..Default::default()
        };
        let env = env_of(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4318")]);
        let cfg = Config::build(FileConfig::default(), &o, &env).expect("config");
        assert!(format!("{:?}", cfg.export).contains("flag:4317"));
    }

    #[test]
    fn query_text_is_sanitised_unless_turned_off() {
        let on = Config::build(FileConfig::default(), &Overrides::default(), &|_| None);
        assert!(on.expect("config").sanitize_query_text);
        let file: FileConfig = toml::from_str("sanitize_query_text = false").expect("toml");
        let off = Config::build(file, &Overrides::default(), &|_| None).expect("config");
        assert!(!off.sanitize_query_text);
        let o = Overrides {
            raw_query_text: true,
            ..Default::default()
        };
        let off = Config::build(FileConfig::default(), &o, &|_| None).expect("config");
        assert!(!off.sanitize_query_text);
    }

    #[test]
    fn recovery_of_blocked_calls_lasts_a_minute_unless_set() {
        let d = Config::build(FileConfig::default(), &Overrides::default(), &|_| None);
        assert_eq!(d.expect("config").recover_blocked, Duration::from_secs(60));
        let file: FileConfig = toml::from_str("recover_blocked_secs = 5").expect("toml");
        let o = Overrides {
            recover_blocked_secs: Some(0),
            ..Default::default()
        };
        let from_file = Config::build(file, &Overrides::default(), &|_| None);
        assert_eq!(
            from_file.expect("config").recover_blocked,
            Duration::from_secs(5)
        );
        let file: FileConfig = toml::from_str("recover_blocked_secs = 5").expect("toml");
        let flag = Config::build(file, &o, &|_| None).expect("config");
        assert_eq!(flag.recover_blocked, Duration::ZERO);
    }

    #[test]
    fn linking_settings() {
        let on = Config::build(FileConfig::default(), &Overrides::default(), &|_| None);
        let on = on.expect("config").linking;
        assert!(on.enabled);
        assert_eq!(on.window, Duration::from_secs(1));
        let file: FileConfig =
            toml::from_str("linking = false\nlink_window_ms = 500\nlink_max_spans = 10")
                .expect("toml");
        let off = Config::build(file, &Overrides::default(), &|_| None).expect("config");
        assert!(!off.linking.enabled);
        assert_eq!(
            (off.linking.window, off.linking.max_spans),
            (Duration::from_millis(500), 10)
        );
        let o = Overrides {
            no_linking: true,
            link_window_ms: Some(0),
            ..Default::default()
        };
        assert!(Config::build(FileConfig::default(), &o, &|_| None).is_err());
    }

    #[test]
    fn tcp_option_is_on_unless_turned_off() {
        let on = Config::build(FileConfig::default(), &Overrides::default(), &|_| None);
        assert!(on.expect("config").tcp_option);
        let file: FileConfig = toml::from_str("tcp_option = false").expect("toml");
        assert!(
            !Config::build(file, &Overrides::default(), &|_| None)
                .expect("config")
                .tcp_option
        );
        let o = Overrides {
            no_tcp_option: true,
            ..Default::default()
        };
        let file: FileConfig = toml::from_str("tcp_option = true").expect("toml");
        assert!(
            !Config::build(file, &o, &|_| None)
                .expect("config")
                .tcp_option
        );
    }

    #[test]
    fn rejects_out_of_range_values() {
        let o = Overrides {
            capture_bytes: Some(1 << 20),
            ..Default::default()
        };
        assert!(Config::build(FileConfig::default(), &o, &|_| None).is_err());
        let o = Overrides {
            ring_buffer_bytes: Some(5000),
            ..Default::default()
        };
        assert!(Config::build(FileConfig::default(), &o, &|_| None).is_err());
        assert!(toml::from_str::<FileConfig>("bogus = 1").is_err());
    }
}
