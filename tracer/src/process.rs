//! Process metadata: the OpenTelemetry Resource of each traced process, read from `/proc` and cached.
//!
//! `service.name` is chosen by the first rule that yields a name:
//! 1. `OTEL_SERVICE_NAME` in the process's own initial environment (`/proc/<pid>/environ`);
//! 2. `service.name` in its `OTEL_RESOURCE_ATTRIBUTES` (whose other entries become resource
//!    attributes too);
//! 3. for an interpreter, the program it runs (rules on `program_name`);
//! 4. the basename of `/proc/<pid>/exe`, else `/proc/<pid>/comm`;
//! 5. for a process that is already gone, the comm the caller saw, else `unknown_service`.
//!
//! Variables a process sets after it started are not visible in `/proc/<pid>/environ`.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::metrics;
use crate::span::{KeyValue, Resource};

/// How long a cached entry is served before its start time is read again to catch pid reuse.
const RECHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Most bytes of `/proc/<pid>/environ` read.
const MAX_ENVIRON_BYTES: u64 = 256 * 1024;
/// Most bytes of `/proc/<pid>/cmdline` read.
const MAX_CMDLINE_BYTES: u64 = 64 * 1024;
/// Longest `process.command_line` kept, in bytes.
const MAX_COMMAND_LINE: usize = 1024;
/// Longest resource attribute value (and `service.name`) kept, in bytes.
const MAX_VALUE: usize = 1024;
/// Most attributes taken from one process's `OTEL_RESOURCE_ATTRIBUTES`.
const MAX_ENV_ATTRIBUTES: usize = 64;
/// Most distinct attribute keys taken from `OTEL_RESOURCE_ATTRIBUTES` across all processes: keys
/// are `&'static str`, so each new one is leaked once and this bounds that memory.
const MAX_INTERNED_KEYS: usize = 512;
/// Longest attribute key taken from `OTEL_RESOURCE_ATTRIBUTES`.
const MAX_KEY_LEN: usize = 256;
/// Service name when nothing at all is known about the process (the spec's fallback prefix).
const UNKNOWN_SERVICE: &str = "unknown_service";

/// Cache of per-process resources, keyed by pid (the thread-group id).
pub struct ProcessTable {
    proc_root: PathBuf,
    capacity: usize,
    host_name: Option<String>,
    recheck: Duration,
    inner: Mutex<Inner>,
}

struct Inner {
    entries: HashMap<u32, Entry>,
    /// The program each recently exec'd process runs, from the kernel's exec event: names a
    /// process that is gone before its /proc entry was read.
    exec_paths: HashMap<u32, String>,
    /// Use counter; the entry with the smallest `last_used` is evicted first.
    tick: u64,
}

struct Entry {
    /// Start time (clock ticks since boot) of the process the entry was built for.
    start_time: u64,
    checked_at: Instant,
    last_used: u64,
    exe_name: Option<String>,
    resource: Arc<Resource>,
}

impl ProcessTable {
    /// A table reading `<proc_root>/<pid>/...` (normally `/proc`) and keeping at most `capacity` processes.
    pub fn new(proc_root: impl Into<PathBuf>, capacity: usize) -> Self {
        ProcessTable {
            proc_root: proc_root.into(),
            capacity: capacity.max(1),
            host_name: host_name(),
            recheck: RECHECK_INTERVAL,
            inner: Mutex::new(Inner {
                entries: HashMap::new(),
                exec_paths: HashMap::new(),
                tick: 0,
            }),
        }
    }

    /// The resource of process `pid`; `comm` (the thread name the capture saw) names it if it is gone.
    ///
    /// A process that exits after being cached keeps its resource, so its last spans are attributed
    /// correctly. A pid reused by a new process is noticed through its start time within
    /// [`RECHECK_INTERVAL`]; an `exec` keeps pid and start time, so the caller reports it with
    /// [`ProcessTable::invalidate`].
    pub fn resource(&self, pid: u32, comm: &str) -> Arc<Resource> {
        match self.lookup(pid) {
            Some((resource, _)) => resource,
            None => {
                metrics::add("process_resource_fallback_total", "", 1);
                let path = self.lock().exec_paths.get(&pid).cloned();
                Arc::new(fallback_resource(
                    pid,
                    comm,
                    path.as_deref(),
                    self.host_name.as_deref(),
                ))
            }
        }
    }

    /// Process `pid` exec'd `path` (from the kernel's exec event): forgets what was cached, reads
    /// /proc at once while the process most likely still runs, and keeps `path` for the fallback.
    pub fn exec(&self, pid: u32, path: &str) {
        {
            let mut inner = self.lock();
            inner.entries.remove(&pid);
            if inner.exec_paths.len() >= self.capacity
                && let Some(&old) = inner.exec_paths.keys().next()
            {
                inner.exec_paths.remove(&old);
            }
            inner.exec_paths.insert(pid, path.to_owned());
        }
        let _ = self.lookup(pid);
    }

    /// Basename of the executable of process `pid`, when the process is (or was, when cached) known.
    pub fn exe_name(&self, pid: u32) -> Option<String> {
        self.lookup(pid).and_then(|(_, exe)| exe).or_else(|| {
            let path = self.lock().exec_paths.get(&pid).cloned()?;
            Some(basename(&path).to_owned())
        })
    }

    #[cfg(test)]
    /// Forgets process `pid`, e.g. after it called `exec`: the next lookup reads `/proc` again.
    pub fn invalidate(&self, pid: u32) {
        self.lock().entries.remove(&pid);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The map stays consistent even if a holder panicked: every update is a single insert/remove.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Cached or freshly read resource and executable name; `None` when the process is gone and was
    /// never cached.
    fn lookup(&self, pid: u32) -> Option<(Arc<Resource>, Option<String>)> {
        let now = Instant::now();
        let cached = {
            let mut inner = self.lock();
            inner.tick += 1;
            let tick = inner.tick;
            match inner.entries.get_mut(&pid) {
                Some(e) => {
                    e.last_used = tick;
                    if now.duration_since(e.checked_at) < self.recheck {
                        return Some((e.resource.clone(), e.exe_name.clone()));
                    }
                    Some(e.start_time)
                }
                None => None,
            }
        };
        // /proc is read without holding the lock so concurrent lookups of other pids don't wait.
        let start_time = read_start_time(&self.proc_root.join(pid.to_string()));
        match (cached, start_time) {
            (Some(old), Some(new)) if old != new => {}
            (Some(_), _) => {
                let mut inner = self.lock();
                if let Some(e) = inner.entries.get_mut(&pid) {
                    e.checked_at = now;
                    return Some((e.resource.clone(), e.exe_name.clone()));
                }
                // Invalidated meanwhile: read it again below.
            }
            (None, None) => return None,
            (None, Some(_)) => {}
        }
        let start_time = start_time?;
        let (resource, exe_name, settled) = self.read_process(pid);
        // Every live process has a `comm`: with neither it nor an executable readable, the
        // process went away between the reads (a short-lived client, reaped). The caller's
        // fallback names it after the kernel's `comm` instead of `unknown_service`, uncached.
        exe_name.as_ref()?;
        let resource = Arc::new(resource);
        if !settled {
            metrics::add("process_resource_unsettled_total", "", 1);
            return Some((resource, exe_name));
        }
        let mut inner = self.lock();
        if !inner.entries.contains_key(&pid) && inner.entries.len() >= self.capacity {
            evict_least_recently_used(&mut inner.entries);
        }
        let last_used = inner.tick;
        inner.entries.insert(
            pid,
            Entry {
                start_time,
                checked_at: now,
                last_used,
                exe_name: exe_name.clone(),
                resource: resource.clone(),
            },
        );
        Some((resource, exe_name))
    }

    /// Builds the resource of a live process from `/proc/<pid>`; also returns the executable name and
    /// whether the process looked settled enough to cache.
    fn read_process(&self, pid: u32) -> (Resource, Option<String>, bool) {
        let dir = self.proc_root.join(pid.to_string());
        let exe_path = std::fs::read_link(dir.join("exe"))
            .ok()
            .map(|p| exe_path_string(&p))
            .filter(|p| !p.is_empty());
        let exe_name = exe_path
            .as_deref()
            .map(basename)
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .or_else(|| read_comm(&dir));
        let args = read_cmdline(&dir);
        let env = read_otel_env(&dir);

        let env_attrs = env
            .resource_attributes
            .as_deref()
            .map(parse_resource_attributes)
            .unwrap_or_default();
        let env_service = env_attrs
            .iter()
            .find(|(k, _)| *k == "service.name")
            .map(|(_, v)| v.as_str());
        let service_name = [env.service_name.as_deref(), env_service]
            .into_iter()
            .flatten()
            .map(str::trim)
            .find(|s| !s.is_empty())
            .map(|s| bounded(s, MAX_VALUE).to_owned())
            .or_else(|| {
                exe_name
                    .as_deref()
                    .and_then(|exe| program_name(exe, args.get(1..).unwrap_or(&[])))
            })
            .or_else(|| exe_name.clone())
            .unwrap_or_else(|| UNKNOWN_SERVICE.to_owned());

        let mut attributes = vec![
            KeyValue::str("service.name", service_name.clone()),
            KeyValue::int("process.pid", i64::from(pid)),
        ];
        if let Some(name) = &exe_name {
            attributes.push(KeyValue::str("process.executable.name", name.clone()));
        }
        if let Some(path) = &exe_path {
            attributes.push(KeyValue::str(
                "process.executable.path",
                bounded(path, MAX_VALUE),
            ));
        }
        if !args.is_empty() {
            attributes.push(KeyValue::str("process.command_line", command_line(&args)));
        }
        push_common(&mut attributes, self.host_name.as_deref());
        for (key, value) in env_attrs {
            if key == "service.name" || key.starts_with("process.") || key.starts_with("telemetry.")
            {
                // service.name was settled above; process.* and telemetry.* are observed facts.
                continue;
            }
            match attributes.iter_mut().find(|kv| kv.key == key) {
                Some(kv) => *kv = KeyValue::str(key, value),
                None => attributes.push(KeyValue::str(key, value)),
            }
        }
        // Right after execve the new executable is visible before the kernel has published argv and
        // the environment; a user process (one with an executable) with no argv is caught in that
        // window, and is read again on its next lookup rather than cached without its environment.
        let settled = exe_path.is_none() || !args.is_empty();
        (
            Resource {
                service_name,
                pid,
                attributes,
            },
            exe_name,
            settled,
        )
    }
}

/// Resource of a process that is gone before it could be read: named after `comm`.
fn fallback_resource(
    pid: u32,
    comm: &str,
    exec_path: Option<&str>,
    host_name: Option<&str>,
) -> Resource {
    let comm = comm.trim();
    let exe = exec_path.map(basename).filter(|e| !e.is_empty());
    let service_name = match exe {
        Some(exe) => exe.to_owned(),
        None if comm.is_empty() => UNKNOWN_SERVICE.to_owned(),
        None => comm.to_owned(),
    };
    let mut attributes = vec![
        KeyValue::str("service.name", service_name.clone()),
        KeyValue::int("process.pid", i64::from(pid)),
    ];
    if let (Some(exe), Some(path)) = (exe, exec_path) {
        attributes.push(KeyValue::str("process.executable.name", exe));
        attributes.push(KeyValue::str("process.executable.path", path));
    }
    push_common(&mut attributes, host_name);
    Resource {
        service_name,
        pid,
        attributes,
    }
}

/// Attributes every resource carries: the host and the agent that produced the telemetry.
fn push_common(attributes: &mut Vec<KeyValue>, host_name: Option<&str>) {
    if let Some(host) = host_name {
        attributes.push(KeyValue::str("host.name", host));
    }
    attributes.extend([
        KeyValue::str("telemetry.sdk.name", "tracer"),
        KeyValue::str("telemetry.sdk.language", "rust"),
        KeyValue::str("telemetry.sdk.version", env!("CARGO_PKG_VERSION")),
        KeyValue::str("telemetry.distro.name", "tracer"),
        KeyValue::str("telemetry.distro.version", env!("CARGO_PKG_VERSION")),
    ]);
}

fn evict_least_recently_used(entries: &mut HashMap<u32, Entry>) {
    if let Some(pid) = entries
        .iter()
        .min_by_key(|(_, e)| e.last_used)
        .map(|(pid, _)| *pid)
    {
        entries.remove(&pid);
        metrics::add("process_cache_evictions_total", "", 1);
    }
}

/// This host's name, read once: `TRACER_HOST_NAME` when set (a DaemonSet passes the node name
/// there, since a pod's own hostname is the pod's), else the kernel's hostname.
fn host_name() -> Option<String> {
    if let Ok(name) = std::env::var("TRACER_HOST_NAME")
        && !name.is_empty()
    {
        return Some(name);
    }

    let mut buf = [0u8; 256];
    // SAFETY: the pointer and length describe `buf`, which gethostname writes at most `len` bytes into.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..len]).into_owned();
    (!name.is_empty()).then_some(name)
}

/// Field 22 (`starttime`) of `<dir>/stat`; `None` when the process is gone.
fn read_start_time(dir: &Path) -> Option<u64> {
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    // The command name (field 2) is in parentheses and may itself contain spaces and ')'.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm
        .split_ascii_whitespace()
        .nth(22 - 3)?
        .parse()
        .ok()
}

fn read_comm(dir: &Path) -> Option<String> {
    let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
    let comm = comm.trim_end_matches('\n');
    (!comm.is_empty()).then(|| comm.to_owned())
}

/// Up to `cap` bytes of a file, and whether the file was longer.
fn read_capped(path: &Path, cap: u64) -> Option<(Vec<u8>, bool)> {
    let mut buf = Vec::new();
    File::open(path)
        .ok()?
        .take(cap + 1)
        .read_to_end(&mut buf)
        .ok()?;
    let truncated = buf.len() as u64 > cap;
    if truncated {
        buf.truncate(usize::try_from(cap).unwrap_or(usize::MAX));
    }
    Some((buf, truncated))
}

/// NUL-separated strings; a last string cut by truncation is dropped.
fn split_nul(buf: &[u8], truncated: bool) -> Vec<String> {
    let mut parts: Vec<&[u8]> = buf.split(|&b| b == 0).collect();
    if truncated || parts.last().is_some_and(|p| p.is_empty()) {
        parts.pop();
    }
    parts
        .into_iter()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect()
}

fn read_cmdline(dir: &Path) -> Vec<String> {
    read_capped(&dir.join("cmdline"), MAX_CMDLINE_BYTES)
        .map(|(buf, truncated)| split_nul(&buf, truncated))
        .unwrap_or_default()
}

/// The OpenTelemetry variables of a process's initial environment.
#[derive(Default)]
struct OtelEnv {
    service_name: Option<String>,
    resource_attributes: Option<String>,
}

fn read_otel_env(dir: &Path) -> OtelEnv {
    let mut env = OtelEnv::default();
    let Some((buf, truncated)) = read_capped(&dir.join("environ"), MAX_ENVIRON_BYTES) else {
        return env;
    };
    for var in split_nul(&buf, truncated) {
        match var.split_once('=') {
            Some(("OTEL_SERVICE_NAME", v)) => env.service_name = Some(v.to_owned()),
            Some(("OTEL_RESOURCE_ATTRIBUTES", v)) => env.resource_attributes = Some(v.to_owned()),
            _ => {}
        }
    }
    env
}

/// `OTEL_RESOURCE_ATTRIBUTES` entries (`key=value,...`, values percent-encoded).
///
/// As the SDK specification asks, a value that fails to decode discards the whole variable.
fn parse_resource_attributes(raw: &str) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    for item in raw.split(',') {
        if item.trim().is_empty() {
            continue;
        }
        let Some((key, value)) = item.split_once('=') else {
            metrics::add(
                "resource_attributes_dropped_total",
                "reason=\"malformed\"",
                1,
            );
            return Vec::new();
        };
        let key = key.trim();
        let Some(value) = percent_decode(value.trim()) else {
            metrics::add(
                "resource_attributes_dropped_total",
                "reason=\"malformed\"",
                1,
            );
            return Vec::new();
        };
        if key.is_empty() {
            metrics::add(
                "resource_attributes_dropped_total",
                "reason=\"malformed\"",
                1,
            );
            return Vec::new();
        }
        if out.len() >= MAX_ENV_ATTRIBUTES {
            metrics::add(
                "resource_attributes_dropped_total",
                "reason=\"too_many\"",
                1,
            );
            break;
        }
        match intern_key(key) {
            Some(key) => out.push((key, bounded(&value, MAX_VALUE).to_owned())),
            None => metrics::add(
                "resource_attributes_dropped_total",
                "reason=\"key_limit\"",
                1,
            ),
        }
    }
    out
}

/// Decodes `%XX` escapes; `None` for a bad escape or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A `'static` copy of an attribute key, shared by all processes using it; `None` past the bound.
fn intern_key(key: &str) -> Option<&'static str> {
    static KEYS: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    if key.len() > MAX_KEY_LEN {
        return None;
    }
    let mut keys = KEYS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(k) = keys.get(key) {
        return Some(k);
    }
    if keys.len() >= MAX_INTERNED_KEYS {
        return None;
    }
    let leaked: &'static str = Box::leak(key.to_owned().into_boxed_str());
    keys.insert(leaked);
    Some(leaked)
}

/// The executable path as a string, without the ` (deleted)` the kernel appends for a replaced binary.
fn exe_path_string(path: &Path) -> String {
    let s = path.to_string_lossy();
    s.strip_suffix(" (deleted)").unwrap_or(&s).to_owned()
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn bounded(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The argument vector joined by spaces, cut to [`MAX_COMMAND_LINE`] bytes.
fn command_line(args: &[String]) -> String {
    let joined = args.join(" ");
    bounded(&joined, MAX_COMMAND_LINE).to_owned()
}

/// How an interpreter's command line names the program it runs.
struct Interpreter {
    /// Short options taking a value, attached (`-Wall`) or as the next argument (`-W all`).
    value_flags: &'static str,
    /// Short options whose value, if any, is always attached: the rest of the argument.
    attached_flags: &'static str,
    /// Short options running inline code or a REPL: there is no program file to name.
    code_flags: &'static str,
    /// Short option naming a module to run (`python -m pkg.mod`).
    module_flag: Option<char>,
    /// Long options taking the next argument as value unless written `--opt=value`.
    long_value_opts: &'static [&'static str],
    /// Long options running inline code.
    long_code_opts: &'static [&'static str],
    /// File extensions stripped from the program's name.
    extensions: &'static [&'static str],
}

const PYTHON: Interpreter = Interpreter {
    value_flags: "WX",
    attached_flags: "",
    code_flags: "c",
    module_flag: Some('m'),
    long_value_opts: &["--check-hash-based-pycs"],
    long_code_opts: &[],
    extensions: &[".py", ".pyc", ".pyz"],
};

const NODE: Interpreter = Interpreter {
    value_flags: "rC",
    attached_flags: "",
    code_flags: "epi",
    module_flag: None,
    long_value_opts: &[
        "--require",
        "--import",
        "--loader",
        "--experimental-loader",
        "--conditions",
        "--title",
    ],
    long_code_opts: &["--eval", "--print", "--interactive"],
    extensions: &[".js", ".mjs", ".cjs", ".ts", ".mts", ".cts"],
};

const RUBY: Interpreter = Interpreter {
    value_flags: "rICE",
    attached_flags: "Fx0KW",
    code_flags: "e",
    module_flag: None,
    long_value_opts: &["--encoding", "--external-encoding", "--internal-encoding"],
    long_code_opts: &[],
    extensions: &[".rb"],
};

const PERL: Interpreter = Interpreter {
    value_flags: "",
    attached_flags: "IMmxlF0CdDi",
    code_flags: "eE",
    module_flag: None,
    long_value_opts: &[],
    long_code_opts: &[],
    extensions: &[".pl"],
};

/// Java options whose value is the next argument.
const JAVA_VALUE_OPTS: &[&str] = &[
    "-cp",
    "-classpath",
    "--class-path",
    "-p",
    "--module-path",
    "--upgrade-module-path",
    "--add-modules",
    "--add-reads",
    "--add-exports",
    "--add-opens",
    "--limit-modules",
    "--patch-module",
    "--enable-native-access",
    "--source",
];

/// Service name for an interpreter from its arguments (`args` excludes argv\[0\]), or `None` when the
/// executable is not a known interpreter or the command line names no program file.
///
/// Rules, applied to the executable's basename:
/// - `python*`, `pypy*`: `-m mod` gives `mod` (`python3 -m http.server` → `http.server`); a script
///   gives its file name without `.py` (`python3 /srv/app/worker.py` → `worker`);
/// - `node`, `nodejs`: the script without its `.js`-like extension;
/// - `ruby*`, `perl*`: the script without `.rb` / `.pl`;
/// - `java`: `-jar x.jar` gives `x`; `-m mod/pkg.Main` and a main class `pkg.Main` give `Main`; a
///   source file `Main.java` gives `Main`.
///
/// A script named `__main__` or `index` is named after its directory (`node /srv/shop/index.js` →
/// `shop`). Inline code (`-c`, `-e`, ...) or a REPL give `None`, so the executable name is used.
fn program_name(exe: &str, args: &[String]) -> Option<String> {
    let name = if exe == "java" {
        java_program(args)
    } else {
        let interp = if versioned(exe, "python") || versioned(exe, "pypy") {
            &PYTHON
        } else if exe == "node" || exe == "nodejs" {
            &NODE
        } else if versioned(exe, "ruby") {
            &RUBY
        } else if versioned(exe, "perl") {
            &PERL
        } else {
            return None;
        };
        script_program(interp, args)
    }?;
    let name = bounded(name.trim(), MAX_VALUE);
    (!name.is_empty()).then(|| name.to_owned())
}

/// `name` is `prefix` optionally followed by a version (`python3.12`, `perl5.36.0`).
fn versioned(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .is_some_and(|rest| rest.chars().all(|c| c.is_ascii_digit() || c == '.'))
}

fn script_program(interp: &Interpreter, args: &[String]) -> Option<String> {
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == "--" {
            return it.next().and_then(|s| script_name(s, interp.extensions));
        }
        if let Some(long) = arg.strip_prefix("--") {
            let opt = format!("--{}", long.split('=').next().unwrap_or(long));
            if interp.long_code_opts.contains(&opt.as_str()) {
                return None;
            }
            if interp.long_value_opts.contains(&opt.as_str()) && !long.contains('=') {
                it.next();
            }
            continue;
        }
        let Some(flags) = arg.strip_prefix('-') else {
            return script_name(arg, interp.extensions);
        };
        if flags.is_empty() {
            // `-` reads the program from stdin.
            return None;
        }
        for (i, flag) in flags.char_indices() {
            let rest = &flags[i + flag.len_utf8()..];
            if interp.code_flags.contains(flag) {
                return None;
            }
            if interp.module_flag == Some(flag) {
                let module = if rest.is_empty() {
                    it.next()?.as_str()
                } else {
                    rest
                };
                return Some(module.to_owned());
            }
            if interp.value_flags.contains(flag) {
                if rest.is_empty() {
                    it.next();
                }
                break;
            }
            if interp.attached_flags.contains(flag) {
                break;
            }
        }
    }
    None
}

fn java_program(args: &[String]) -> Option<String> {
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "-jar" => return it.next().and_then(|jar| script_name(jar, &[".jar"])),
            "-m" | "--module" => return it.next().and_then(|m| java_module(m)),
            a if a.starts_with("--module=") => return java_module(&a["--module=".len()..]),
            a if JAVA_VALUE_OPTS.contains(&a) => {
                it.next();
            }
            a if a.starts_with('-') || a.starts_with('@') => {}
            a if a.ends_with(".java") => return script_name(a, &[".java"]),
            class => return simple_class_name(class),
        }
    }
    None
}

/// `module/pkg.Main` → `Main`; a bare `module` → `module`.
fn java_module(spec: &str) -> Option<String> {
    match spec.split_once('/') {
        Some((_, class)) => simple_class_name(class),
        None => (!spec.is_empty()).then(|| spec.to_owned()),
    }
}

fn simple_class_name(class: &str) -> Option<String> {
    let name = class.rsplit('.').next().unwrap_or(class);
    (!name.is_empty()).then(|| name.to_owned())
}

/// A script path's file name without extension; a generic `__main__` / `index` gives its directory.
fn script_name(path: &str, extensions: &[&str]) -> Option<String> {
    let path = path.trim_end_matches('/');
    let file = basename(path);
    let stem = extensions
        .iter()
        .find_map(|ext| file.strip_suffix(ext))
        .unwrap_or(file);
    if stem == "__main__" || stem == "index" {
        let dir = basename(path.strip_suffix(file)?.trim_end_matches('/'));
        if !dir.is_empty() && dir != "." && dir != ".." {
            return Some(dir.to_owned());
        }
    }
    (!stem.is_empty()).then(|| stem.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::span::Value;
    use std::process::{Child, Command};
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A fake `/proc` tree in a temporary directory, removed on drop.
    struct FakeProc {
        root: PathBuf,
    }

    impl FakeProc {
        fn new() -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let root = std::env::temp_dir().join(format!(
                "tracer-proc-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&root).expect("create fake proc root");
            FakeProc { root }
        }

        /// Writes process `pid`: start time, executable, argv and environment.
        fn process(&self, pid: u32, start: u64, exe: &str, argv: &[&str], env: &[&str]) {
            let dir = self.root.join(pid.to_string());
            std::fs::create_dir_all(&dir).expect("create pid dir");
            let comm = basename(exe);
            let stat = format!(
                "{pid} ({comm}) S 1 {pid} {pid} 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 {start} 1000 100 \
                 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0"
            );
            std::fs::write(dir.join("stat"), stat).expect("write stat");
            std::fs::write(dir.join("comm"), format!("{comm}\n")).expect("write comm");
            let _ = std::fs::remove_file(dir.join("exe"));
            std::os::unix::fs::symlink(exe, dir.join("exe")).expect("symlink exe");
            let nul_list =
                |items: &[&str]| items.iter().map(|a| format!("{a}\0")).collect::<String>();
            std::fs::write(dir.join("cmdline"), nul_list(argv)).expect("write cmdline");
            std::fs::write(dir.join("environ"), nul_list(env)).expect("write environ");
        }

        fn remove(&self, pid: u32) {
            std::fs::remove_dir_all(self.root.join(pid.to_string())).expect("remove pid dir");
        }

        fn table(&self, capacity: usize) -> ProcessTable {
            let mut table = ProcessTable::new(&self.root, capacity);
            table.recheck = Duration::ZERO;
            table
        }
    }

    impl Drop for FakeProc {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    fn attr<'a>(r: &'a Resource, key: &str) -> Option<&'a Value> {
        r.attributes
            .iter()
            .find(|kv| kv.key == key)
            .map(|kv| &kv.value)
    }

    fn attr_str<'a>(r: &'a Resource, key: &str) -> Option<&'a str> {
        match attr(r, key) {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn otel_service_name_wins_and_resource_attributes_are_added() {
        let fake = FakeProc::new();
        fake.process(
            42,
            1000,
            "/usr/bin/python3.12",
            &["python3", "-m", "http.server", "8000"],
            &[
                "PATH=/bin",
                "OTEL_RESOURCE_ATTRIBUTES=service.name=from-attrs, deployment.environment.name=prod%2Ceu,service.version=1.2",
                "OTEL_SERVICE_NAME=orders",
            ],
        );
        let r = fake.table(16).resource(42, "python3");
        assert_eq!(r.service_name, "orders");
        assert_eq!(r.pid, 42);
        assert_eq!(attr_str(&r, "service.name"), Some("orders"));
        assert_eq!(attr_str(&r, "deployment.environment.name"), Some("prod,eu"));
        assert_eq!(attr_str(&r, "service.version"), Some("1.2"));
        assert_eq!(attr(&r, "process.pid"), Some(&Value::Int(42)));
        assert_eq!(attr_str(&r, "process.executable.name"), Some("python3.12"));
        assert_eq!(
            attr_str(&r, "process.executable.path"),
            Some("/usr/bin/python3.12")
        );
        assert_eq!(
            attr_str(&r, "process.command_line"),
            Some("python3 -m http.server 8000")
        );
        assert_eq!(attr_str(&r, "telemetry.sdk.name"), Some("tracer"));
        assert_eq!(attr_str(&r, "telemetry.sdk.language"), Some("rust"));
        assert_eq!(
            attr_str(&r, "telemetry.distro.version"),
            Some(env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(
            r.attributes
                .iter()
                .filter(|kv| kv.key == "service.name")
                .count(),
            1
        );
    }

    #[test]
    fn resource_attributes_service_name_and_interpreter_fallbacks() {
        let fake = FakeProc::new();
        fake.process(
            1,
            5,
            "/usr/bin/node",
            &["node", "server.js"],
            &["OTEL_RESOURCE_ATTRIBUTES=service.name=cart,host.name=node-7"],
        );
        fake.process(
            2,
            5,
            "/usr/bin/python3.11",
            &["python3", "-m", "http.server"],
            &[],
        );
        fake.process(
            3,
            5,
            "/usr/sbin/nginx",
            &["nginx: master process /usr/sbin/nginx"],
            &[],
        );
        fake.process(
            4,
            5,
            "/usr/bin/node",
            &["node", "-e", "console.log(1)"],
            &[],
        );
        let table = fake.table(16);
        let cart = table.resource(1, "node");
        assert_eq!(cart.service_name, "cart");
        assert_eq!(
            attr_str(&cart, "host.name"),
            Some("node-7"),
            "user-supplied host.name overrides"
        );
        assert_eq!(table.resource(2, "python3").service_name, "http.server");
        assert_eq!(table.resource(3, "nginx").service_name, "nginx");
        assert_eq!(table.resource(4, "node").service_name, "node");
        assert_eq!(table.exe_name(3).as_deref(), Some("nginx"));
    }

    #[test]
    fn malformed_resource_attributes_are_discarded_whole() {
        let fake = FakeProc::new();
        fake.process(
            7,
            5,
            "/usr/bin/app",
            &["app"],
            &["OTEL_RESOURCE_ATTRIBUTES=service.version=1,bad%zz=x,a=%G1"],
        );
        let r = fake.table(4).resource(7, "app");
        assert_eq!(r.service_name, "app");
        assert_eq!(attr_str(&r, "service.version"), None);
        assert_eq!(parse_resource_attributes("a=1,novalue"), Vec::new());
        assert_eq!(
            parse_resource_attributes("a=1, ,b = x%20y"),
            vec![("a", "1".to_owned()), ("b", "x y".to_owned())]
        );
    }

    #[test]
    fn process_owned_attributes_cannot_be_overridden() {
        let fake = FakeProc::new();
        fake.process(
            8,
            5,
            "/usr/bin/app",
            &["app"],
            &["OTEL_RESOURCE_ATTRIBUTES=process.pid=1,telemetry.sdk.name=x"],
        );
        let r = fake.table(4).resource(8, "app");
        assert_eq!(attr(&r, "process.pid"), Some(&Value::Int(8)));
        assert_eq!(attr_str(&r, "telemetry.sdk.name"), Some("tracer"));
    }

    #[test]
    fn program_name_rules() {
        let cases: &[(&str, &[&str], Option<&str>)] = &[
            (
                "python3",
                &["-m", "http.server", "8000"],
                Some("http.server"),
            ),
            (
                "python3.12",
                &["-u", "-W", "ignore", "/srv/app/worker.py"],
                Some("worker"),
            ),
            ("python3", &["-mflask", "run"], Some("flask")),
            (
                "python3",
                &["-X", "dev", "-B", "/usr/local/bin/gunicorn", "app:app"],
                Some("gunicorn"),
            ),
            ("python3", &["-c", "print(1)"], None),
            ("python3", &["-uc", "print(1)"], None),
            ("python3", &[], None),
            ("python3", &["/srv/tool/__main__.py"], Some("tool")),
            ("pypy3", &["bench.py"], Some("bench")),
            ("python3-config", &["x.py"], None),
            (
                "node",
                &["--require", "otel.js", "--inspect=9229", "dist/server.mjs"],
                Some("server"),
            ),
            ("node", &["/srv/shop/index.js"], Some("shop")),
            (
                "node",
                &["-r", "ts-node/register", "src/app.ts"],
                Some("app"),
            ),
            ("node", &["--eval=1+1"], None),
            ("node", &["--", "main.cjs"], Some("main")),
            (
                "java",
                &["-Xmx1g", "-Dx=y", "-jar", "/opt/orders-service.jar"],
                Some("orders-service"),
            ),
            (
                "java",
                &[
                    "-cp",
                    "a.jar:b.jar",
                    "com.acme.billing.BillingMain",
                    "--port",
                    "1",
                ],
                Some("BillingMain"),
            ),
            ("java", &["-m", "acme.app/com.acme.App"], Some("App")),
            ("java", &["--module=acme.app"], Some("acme.app")),
            ("java", &["Hello.java"], Some("Hello")),
            ("java", &["-version"], None),
            (
                "ruby",
                &["-I", "lib", "-rjson", "bin/rails", "server"],
                Some("rails"),
            ),
            ("ruby3.2", &["-W0", "app.rb"], Some("app")),
            ("ruby", &["-e", "puts 1"], None),
            (
                "perl",
                &["-Ilib", "-MData::Dumper", "/usr/bin/cron.pl"],
                Some("cron"),
            ),
            ("perl", &["-E", "say 1"], None),
            ("sleep", &["30"], None),
        ];
        for (exe, argv, want) in cases {
            assert_eq!(
                program_name(exe, &args(argv)).as_deref(),
                *want,
                "{exe} {argv:?}"
            );
        }
    }

    #[test]
    fn start_time_change_rebuilds_and_same_start_time_reuses() {
        let fake = FakeProc::new();
        fake.process(9, 100, "/usr/bin/first", &["first"], &[]);
        let table = fake.table(4);
        let a = table.resource(9, "first");
        let b = table.resource(9, "first");
        assert!(
            Arc::ptr_eq(&a, &b),
            "unchanged process is served from the cache"
        );
        // Same pid, new process: different start time.
        fake.process(9, 200, "/usr/bin/second", &["second"], &[]);
        let c = table.resource(9, "second");
        assert_eq!(c.service_name, "second");
        assert_eq!(table.exe_name(9).as_deref(), Some("second"));
    }

    #[test]
    fn recheck_interval_serves_cache_without_reading_proc() {
        let fake = FakeProc::new();
        fake.process(9, 100, "/usr/bin/first", &["first"], &[]);
        let mut table = fake.table(4);
        table.recheck = Duration::from_secs(3600);
        assert_eq!(table.resource(9, "").service_name, "first");
        fake.process(9, 200, "/usr/bin/second", &["second"], &[]);
        assert_eq!(table.resource(9, "").service_name, "first");
        table.invalidate(9);
        assert_eq!(table.resource(9, "").service_name, "second");
    }

    #[test]
    fn exec_with_same_start_time_needs_invalidate() {
        let fake = FakeProc::new();
        fake.process(10, 100, "/bin/sh", &["sh", "-c", "exec app"], &[]);
        let table = fake.table(4);
        assert_eq!(table.resource(10, "sh").service_name, "sh");
        fake.process(10, 100, "/usr/bin/app", &["app"], &[]);
        assert_eq!(
            table.resource(10, "app").service_name,
            "sh",
            "exec keeps pid and start time"
        );
        table.invalidate(10);
        assert_eq!(table.resource(10, "app").service_name, "app");
    }

    #[test]
    fn vanished_processes() {
        let fake = FakeProc::new();
        fake.process(
            11,
            100,
            "/usr/bin/api",
            &["api"],
            &["OTEL_SERVICE_NAME=api-svc"],
        );
        let table = fake.table(4);
        assert_eq!(table.resource(11, "api").service_name, "api-svc");
        fake.remove(11);
        let kept = table.resource(11, "tokio-runtime-w");
        assert_eq!(
            kept.service_name, "api-svc",
            "an exited process keeps its cached resource"
        );

        let never_seen = table.resource(12, "worker");
        assert_eq!(never_seen.service_name, "worker");
        assert_eq!(attr(&never_seen, "process.pid"), Some(&Value::Int(12)));
        assert_eq!(attr_str(&never_seen, "telemetry.sdk.name"), Some("tracer"));
        assert_eq!(table.resource(12, " ").service_name, "unknown_service");
        assert_eq!(table.exe_name(12), None);
        assert!(
            !table.lock().entries.contains_key(&12),
            "fallbacks are not cached"
        );
    }

    /// A process reaped while it is read (its `stat` read, then nothing) is named after the
    /// kernel's `comm`, not `unknown_service`, and not cached.
    #[test]
    fn process_gone_while_read_takes_the_kernel_comm() {
        let fake = FakeProc::new();
        fake.process(15, 1, "/usr/bin/curl", &["curl"], &[]);
        let dir = fake.root.join("15");
        for file in ["comm", "exe", "cmdline", "environ"] {
            std::fs::remove_file(dir.join(file)).expect("remove");
        }
        let table = fake.table(4);
        assert_eq!(table.resource(15, "curl").service_name, "curl");
        assert!(!table.lock().entries.contains_key(&15));
    }

    #[test]
    fn process_caught_mid_exec_is_not_cached() {
        let fake = FakeProc::new();
        fake.process(14, 1, "/usr/bin/api", &[], &[]);
        let table = fake.table(4);
        assert_eq!(table.resource(14, "api").service_name, "api");
        assert!(!table.lock().entries.contains_key(&14));
        fake.process(
            14,
            1,
            "/usr/bin/api",
            &["api"],
            &["OTEL_SERVICE_NAME=api-svc"],
        );
        assert_eq!(table.resource(14, "api").service_name, "api-svc");
        assert!(table.lock().entries.contains_key(&14));
    }

    #[test]
    fn cache_is_bounded_and_evicts_least_recently_used() {
        let fake = FakeProc::new();
        for pid in 1..=3 {
            fake.process(pid, 1, &format!("/bin/p{pid}"), &["p"], &[]);
        }
        let table = fake.table(2);
        table.resource(1, "");
        table.resource(2, "");
        table.resource(1, "");
        table.resource(3, "");
        let inner = table.lock();
        let mut pids: Vec<u32> = inner.entries.keys().copied().collect();
        pids.sort_unstable();
        assert_eq!(pids, vec![1, 3]);
    }

    #[test]
    fn command_line_is_bounded_and_deleted_exe_is_cleaned() {
        let fake = FakeProc::new();
        let long = "é".repeat(MAX_COMMAND_LINE);
        fake.process(13, 1, "/opt/app (deleted)", &["app", &long], &[]);
        let r = fake.table(4).resource(13, "");
        let cmd = attr_str(&r, "process.command_line").expect("command line");
        assert!(
            cmd.len() <= MAX_COMMAND_LINE && cmd.starts_with("app é"),
            "{}",
            cmd.len()
        );
        assert_eq!(attr_str(&r, "process.executable.path"), Some("/opt/app"));
        assert_eq!(r.service_name, "app");
    }

    #[test]
    fn truncated_environ_drops_the_cut_variable() {
        let buf = b"A=1\0OTEL_SERVICE_NAME=cu";
        assert_eq!(split_nul(buf, true), vec!["A=1".to_owned()]);
        assert_eq!(
            split_nul(b"A=1\0B=2\0", false),
            vec!["A=1".to_owned(), "B=2".to_owned()]
        );
    }

    #[test]
    fn stat_start_time_survives_odd_comm() {
        let fake = FakeProc::new();
        let dir = fake.root.join("5");
        std::fs::create_dir_all(&dir).expect("dir");
        let stat = "5 (a) b) c) S 1 5 5 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 777 1000 100";
        std::fs::write(dir.join("stat"), stat).expect("write");
        assert_eq!(read_start_time(&dir), Some(777));
        std::fs::write(dir.join("stat"), "5 (a) S 1").expect("write");
        assert_eq!(read_start_time(&dir), None);
    }

    /// Kills and reaps the child on drop so a failing assertion leaves no process behind.
    struct Reap(Child);

    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// Waits until a just-spawned child's environment is published: spawn returns once execve has
    /// replaced the image, which is before the kernel fills in the new argv and environment.
    fn wait_for_environment(pid: u32) {
        let environ = Path::new("/proc").join(pid.to_string()).join("environ");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read(&environ).map_or(true, |e| e.is_empty()) {
            assert!(
                Instant::now() < deadline,
                "child environment never appeared"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn real_process_service_name_from_environment() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30").env("OTEL_SERVICE_NAME", "svc-x");
        let child = Reap(cmd.spawn().expect("spawn sleep"));
        let pid = child.0.id();
        wait_for_environment(pid);
        let table = ProcessTable::new("/proc", 16);
        let r = table.resource(pid, "sleep");
        assert_eq!(r.service_name, "svc-x");
        assert_eq!(attr(&r, "process.pid"), Some(&Value::Int(i64::from(pid))));
        assert_eq!(attr_str(&r, "process.executable.name"), Some("sleep"));
        let path = attr_str(&r, "process.executable.path");
        assert!(path.is_some_and(|p| p.ends_with("/sleep")), "{path:?}");
        assert_eq!(attr_str(&r, "process.command_line"), Some("sleep 30"));
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
        assert_eq!(attr_str(&r, "host.name"), Some(host.trim()));
        assert_eq!(table.exe_name(pid).as_deref(), Some("sleep"));
    }

    #[test]
    fn real_process_exec_is_seen_after_invalidate() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "sleep 0.3; exec sleep 30"]);
        let child = Reap(cmd.spawn().expect("spawn sh"));
        let pid = child.0.id();
        wait_for_environment(pid);
        let table = ProcessTable::new("/proc", 16);
        let before = table.resource(pid, "sh");
        assert_ne!(before.service_name, "sleep");
        let exe = Path::new("/proc").join(pid.to_string()).join("exe");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_link(&exe).is_ok_and(|p| p.ends_with("sleep")) {
            assert!(Instant::now() < deadline, "child never exec'd sleep");
            std::thread::sleep(Duration::from_millis(20));
        }
        let stale = table.resource(pid, "sleep");
        assert_eq!(
            stale.service_name, before.service_name,
            "exec keeps pid and start time"
        );
        table.invalidate(pid);
        assert_eq!(table.resource(pid, "sleep").service_name, "sleep");
    }
}
