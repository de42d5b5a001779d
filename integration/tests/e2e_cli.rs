//! End-to-end tests of the agent's command line: `tracer check`, and how a bad setting is reported.

mod common;

use common::*;

#[test]
fn check_prints_capture_mode_and_succeeds() {
    require_root();
    let dir = TempDir::new("check");
    let run = run_tracer(&dir, &["check"], &[]);
    assert!(
        run.status.success(),
        "tracer check failed ({}); stdout:\n{}\nstderr:\n{}",
        run.status,
        run.stdout,
        run.stderr
    );
    assert!(
        run.stdout.contains("capture mode"),
        "no capture mode in:\n{}",
        run.stdout
    );
}

#[test]
fn invalid_otlp_endpoint_fails_with_one_clear_line() {
    require_root();
    let dir = TempDir::new("bad-endpoint");
    // Even with backtraces requested, a configuration error is one sentence, not a crash report.
    let run = run_tracer(
        &dir,
        &["run", "--otlp-endpoint", "not-a-url"],
        &[("RUST_BACKTRACE", "1")],
    );
    assert!(
        !run.status.success(),
        "tracer accepted endpoint `not-a-url`; stderr:\n{}",
        run.stderr
    );
    let lines: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one line on stderr:\n{}",
        run.stderr
    );
    let line = lines[0];
    assert!(
        line.contains("not-a-url"),
        "the error names the bad value: {line}"
    );
    for noise in [
        "panicked",
        "backtrace",
        "RUST_BACKTRACE",
        "Error {",
        "Caused by",
    ] {
        assert!(!line.contains(noise), "{noise:?} in {line}");
    }
    assert_eq!(run.stdout, "", "nothing on stdout");
}
