//! The agent on other kernels: boots Debian's 6.1 and 6.12 cloud kernels under qemu (software
//! emulation) with the agent in a busybox initramfs, and checks that the programs pass those
//! kernels' verifiers, `tracer check` reports their features, and busybox httpd/wget traffic
//! inside the guest becomes spans, with wget's trace ids reaching httpd in memory (both ends on
//! one host) and, in a second run, in the TCP option written and read; a static test program's
//! late reads (`kernels/late_reads.c`) give spans the times of the reads. The host kernel is
//! covered by the other end-to-end tests.

mod common;

use std::path::Path;
use std::process::Command;

/// Boots `meta` (a Debian kernel meta package) and returns the guest console output.
fn boot(meta: &str) -> String {
    common::require_root();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels/boot-test.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(meta)
        .arg(common::tracer_bin())
        .output()
        .expect("run boot-test.sh");
    let console = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "boot-test.sh {meta} failed ({}):\n{console}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    console
}

/// The lines between `== {name}` and the next `== ` marker.
fn section<'a>(console: &'a str, name: &str) -> Vec<&'a str> {
    let marker = format!("== {name}");
    console
        .lines()
        .skip_while(|l| l.trim_end() != marker)
        .skip(1)
        .take_while(|l| !l.starts_with("== "))
        .collect()
}

/// The one span line of `kind` ("SERVER"/"CLIENT") whose fields contain `needle`.
fn span_line<'a>(spans: &[&'a str], kind: &str, needle: &str, console: &str) -> &'a str {
    let found: Vec<&str> = spans
        .iter()
        .copied()
        .filter(|l| l.contains(&format!(" {kind} ")) && l.contains(needle))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {kind} span with {needle:?}; console:\n{console}"
    );
    found[0]
}

/// Boots `meta` and checks the agent there; `mode` is the capture mode `tracer check` reports and
/// `taken_at` what the agent logs as where it takes socket reads and writes.
fn check_kernel(meta: &str, version_prefix: &str, mode: &str, taken_at: &str) {
    let console = boot(meta);
    assert!(
        console.contains(&format!("== kernel {version_prefix}")),
        "guest did not run kernel {version_prefix}:\n{console}"
    );
    assert!(
        console.contains("== check rc=0"),
        "tracer check failed:\n{console}"
    );
    let check = section(&console, "check").join("\n");
    for feature in ["BTF + offsets", "ring buffer", "syscall tracepoints"] {
        let line = check.lines().find(|l| l.starts_with(feature)).unwrap_or("");
        assert!(
            line.contains(" yes "),
            "{feature} not available on {meta}:\n{check}"
        );
    }
    assert!(check.contains(&format!("capture mode: {mode}")), "{check}");
    // Both kernels have the TCP header option callbacks (5.10+); the guest has no cgroup2 mount,
    // so this also covers mounting one.
    let option = check
        .lines()
        .find(|l| l.starts_with("trace TCP option"))
        .unwrap_or("");
    assert!(
        option.contains(" yes "),
        "trace TCP option on {meta}:\n{check}"
    );
    assert!(
        console.contains("== agent rc=0"),
        "agent did not exit cleanly:\n{console}"
    );
    // The sock_ops program passed this verifier and attached, and wget's trace id reached httpd:
    // handed over in memory (both ends on this host), httpd's read got it in band...
    let log = section(&console, "agent log").join("\n");
    assert!(log.contains("tcp_option=true"), "{log}");
    let events = common::trace_events(&log);
    let of = |role: &str, direction: &str| -> Vec<&common::TraceEvent> {
        events
            .iter()
            .filter(|e| e.role == role && e.direction == direction)
            .collect()
    };
    let (sent, read) = (of("client", "send"), of("server", "recv"));
    assert!(
        read.len() >= 2,
        "httpd's reads of wget's two requests:\n{log}"
    );
    for r in &read {
        assert!(
            r.in_band && sent.iter().any(|s| s.trace_id == r.trace_id),
            "httpd read {} not in band from wget:\n{log}",
            r.trace_id
        );
    }
    assert!(
        log.lines()
            .any(|l| l.contains("socket reads and writes are taken at") && l.ends_with(taken_at)),
        "expected socket reads and writes taken at {taken_at}:\n{log}"
    );
    // The fd walk's typed task loads passed this verifier (no fall back to probe reads).
    assert!(!log.contains("refused the typed task loads"), "{log}");
    assert!(
        !log.contains("tcp_option_written"),
        "an option on a connection within the host:\n{log}"
    );
    // ...and in the TCP option with TRACER_TCP_OPTION_LOCAL=1: the kernel counters (logged at
    // exit when non-zero) saw it written and read.
    assert!(
        console.contains("== wire agent rc=0"),
        "the second agent did not exit cleanly:\n{console}"
    );
    let wire = section(&console, "wire agent log").join("\n");
    for what in ["tcp_option_written", "tcp_option_read"] {
        assert!(
            wire.contains(&format!("{{what=\"{what}\"}}=")),
            "no {what} on {meta}:\n{wire}"
        );
    }

    let spans = section(&console, "spans");
    let ok = span_line(&spans, "SERVER", "path=/index.html", &console);
    assert!(ok.contains("status=200") && ok.contains(" OK "), "{ok}");
    let ok = span_line(
        &spans,
        "CLIENT",
        "url=http://127.0.0.1:8080/index.html",
        &console,
    );
    assert!(ok.contains("status=200") && ok.contains(" OK "), "{ok}");
    let missing = span_line(&spans, "SERVER", "path=/missing", &console);
    assert!(
        missing.contains("status=404") && missing.contains(" OK "),
        "{missing}"
    );
    let missing = span_line(
        &spans,
        "CLIENT",
        "url=http://127.0.0.1:8080/missing",
        &console,
    );
    assert!(
        missing.contains("status=404") && missing.contains(" ERROR "),
        "{missing}"
    );
    // A span's times are those of its reads and writes, not of its bytes' arrivals: where reads
    // are taken at the socket layer, their time is TCP's clock of the read's last copy.
    assert!(
        console.contains("late_reads done"),
        "late_reads did not finish:\n{console}"
    );
    let server = span_line(&spans, "SERVER", "path=/late", &console);
    assert!(
        common::StdoutLine::parse(server).duration_ms < LATE_SERVER_MAX_MS,
        "the server span starts at the request's arrival, not its read: {server}"
    );
    let client = span_line(&spans, "CLIENT", "url=http://127.0.0.1/late", &console);
    assert!(
        common::StdoutLine::parse(client).duration_ms >= LATE_CLIENT_MIN_MS,
        "the client span ends at the response's arrival, not its read: {client}"
    );
    assert_eq!(
        spans
            .iter()
            .filter(|l| l.contains(" SERVER ") || l.contains(" CLIENT "))
            .count(),
        6
    );
}

/// late_reads.c's server reads the request 1000 ms after it arrived and answers at once: its span
/// (read to write) is far shorter, even on an emulated CPU.
const LATE_SERVER_MAX_MS: f64 = 800.0;
/// late_reads.c's client reads the response 2000 ms after it sent the request (the response
/// arrived after ~1000 ms).
const LATE_CLIENT_MIN_MS: f64 = 1900.0;

#[test]
fn debian_6_1_kernel() {
    // No socket-layer tracepoints before 6.3.
    check_kernel(
        "linux-image-cloud-amd64",
        "6.1.",
        "syscall tracepoints",
        "reads=\"syscalls\" writes=\"syscalls\" read_tracepoints=\"none\" write_tracepoints=\"none\"",
    );
}

#[test]
fn debian_6_12_kernel() {
    // The `sock` tracepoints (6.3) but no `tcp:tcp_sendmsg_locked` yet: reads at the socket
    // layer, writes from their syscall's entry to `sock_send_length`.
    check_kernel(
        "linux-image-6.12-cloud-amd64",
        "6.12.",
        "socket tracepoints for socket reads and the ends of socket writes, syscall tracepoints \
         for the rest",
        // Both as BTF tracepoints: their socket pointers are typed.
        "reads=\"socket layer\" writes=\"syscall entries, socket-layer exits\" \
         read_tracepoints=\"BTF\" write_tracepoints=\"BTF\"",
    );
}
