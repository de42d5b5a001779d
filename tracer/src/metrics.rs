//! The agent's own metrics: counters and gauges kept in one process-wide registry, rendered in the
//! Prometheus text format and logged periodically. Every drop anywhere in the pipeline lands here.

use std::fmt::Write as _;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;

use crate::fxhash::FxBuild;

/// A metric series: name plus a preformatted label set such as `reason="queue_full"` (may be empty).
type Series = (&'static str, &'static str);

/// Series and their values. A value lives for the process (series are never removed, and come
/// from a closed set), so a thread can keep a reference to it ([`add`]).
type Cells = DashMap<Series, &'static AtomicU64, FxBuild>;

#[derive(Default)]
struct Registry {
    counters: Cells,
    gauges: Cells,
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(Registry::default)
}

/// A `key="value",...` label set with a static lifetime, interned so each distinct set is allocated
/// once. Only for values from a small closed set (protocol names, reasons), never from input data.
pub fn labels(pairs: &[(&'static str, &'static str)]) -> &'static str {
    type Interned = DashMap<Vec<(&'static str, &'static str)>, &'static str, FxBuild>;
    static LABELS: OnceLock<Interned> = OnceLock::new();
    let interned = LABELS.get_or_init(Interned::default);
    if let Some(l) = interned.get(pairs) {
        return *l;
    }
    let text: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    *interned
        .entry(pairs.to_vec())
        .or_insert_with(|| Box::leak(text.join(",").into_boxed_str()))
}

/// The value of series `name{labels}` in `cells`, created at first use.
fn cell(cells: &Cells, name: &'static str, labels: &'static str) -> &'static AtomicU64 {
    if let Some(c) = cells.get(&(name, labels)) {
        return *c;
    }
    *cells
        .entry((name, labels))
        .or_insert_with(|| Box::leak(Box::new(AtomicU64::new(0))))
}

/// Where a series' text is: static strings do not move, so their addresses name them.
type SeriesAt = (usize, usize, usize, usize);

thread_local! {
    /// The counters this thread added to, by where their name and labels are: a span adds to
    /// several, and finding them by address costs four words hashed, where the registry hashes
    /// and compares the text under a shard lock. Bounded by the distinct static strings and
    /// interned label sets, a closed set.
    static CELLS: std::cell::RefCell<crate::fxhash::FastMap<SeriesAt, &'static AtomicU64>> =
        std::cell::RefCell::default();
}

/// Adds `n` to the counter `name{labels}`. Names end in `_total` by convention.
pub fn add(name: &'static str, labels: &'static str, n: u64) {
    if n == 0 {
        return;
    }
    let at = (
        name.as_ptr() as usize,
        name.len(),
        labels.as_ptr() as usize,
        labels.len(),
    );
    let cell = CELLS.with_borrow_mut(|cells| {
        *cells
            .entry(at)
            .or_insert_with(|| cell(&registry().counters, name, labels))
    });
    cell.fetch_add(n, Ordering::Relaxed);
}

/// A counter series found once, at its first use, for call sites that add to it for every span:
/// an add is then one atomic add, where [`add`] finds the series in a thread-local map first
/// (~3 % of the agent's samples at saturation, a few adds per span).
pub struct Counter {
    name: &'static str,
    labels: &'static str,
    cell: OnceLock<&'static AtomicU64>,
}

impl Counter {
    pub const fn new(name: &'static str, labels: &'static str) -> Self {
        Counter {
            name,
            labels,
            cell: OnceLock::new(),
        }
    }

    /// Adds `n`, as [`add`] does.
    pub fn add(&self, n: u64) {
        if n == 0 {
            return;
        }
        self.cell
            .get_or_init(|| cell(&registry().counters, self.name, self.labels))
            .fetch_add(n, Ordering::Relaxed);
    }
}

/// Sets the counter `name{labels}` to an absolute value read from elsewhere (e.g. kernel counters).
pub fn set_counter(name: &'static str, labels: &'static str, v: u64) {
    cell(&registry().counters, name, labels).store(v, Ordering::Relaxed);
}

/// Sets the gauge `name{labels}`.
pub fn set_gauge(name: &'static str, labels: &'static str, v: u64) {
    cell(&registry().gauges, name, labels).store(v, Ordering::Relaxed);
}

#[cfg(test)]
/// Current value of a counter (0 when never touched).
pub fn counter(name: &'static str, labels: &'static str) -> u64 {
    registry()
        .counters
        .get(&(name, labels))
        .map(|c| c.load(Ordering::Relaxed))
        .unwrap_or(0)
}

/// The series of `cells` with their values, in order.
fn values(cells: &Cells) -> Vec<(Series, u64)> {
    let mut v: Vec<_> = cells
        .iter()
        .map(|e| (*e.key(), e.value().load(Ordering::Relaxed)))
        .collect();
    v.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    v
}

fn series(name: &str, labels: &str) -> String {
    if labels.is_empty() {
        format!("tracer_{name}")
    } else {
        format!("tracer_{name}{{{labels}}}")
    }
}

/// All metrics in the Prometheus text exposition format.
pub fn render_prometheus() -> String {
    let mut out = String::new();
    let reg = registry();
    for (kind, cells) in [("counter", &reg.counters), ("gauge", &reg.gauges)] {
        let mut last = "";
        for ((name, labels), v) in values(cells) {
            if name != last {
                let _ = writeln!(out, "# TYPE tracer_{name} {kind}");
                last = name;
            }
            let _ = writeln!(out, "{} {v}", series(name, labels));
        }
    }
    out
}

/// Non-zero counters as `name{labels}=value` pairs, for the periodic log line.
pub fn summary() -> Vec<(String, u64)> {
    values(&registry().counters)
        .into_iter()
        .filter(|(_, v)| *v > 0)
        .map(|((n, l), v)| (series(n, l), v))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counters are found by the text of their name and labels, wherever it is stored.
    #[test]
    fn equal_series_at_other_addresses_are_one_counter() {
        let elsewhere: &'static str = Box::leak(String::from("reason=\"y\"").into_boxed_str());
        add("test_where_total", elsewhere, 1);
        add("test_where_total", "reason=\"y\"", 2);
        std::thread::spawn(|| add("test_where_total", "reason=\"y\"", 4))
            .join()
            .expect("adding thread");
        assert_eq!(counter("test_where_total", "reason=\"y\""), 7);
        let text = render_prometheus();
        assert_eq!(
            text.matches("tracer_test_where_total{reason=\"y\"} 7")
                .count(),
            1
        );
    }

    #[test]
    fn counters_render_with_labels() {
        add("test_events_total", "reason=\"x\"", 2);
        add("test_events_total", "reason=\"x\"", 3);
        assert_eq!(counter("test_events_total", "reason=\"x\""), 5);
        let text = render_prometheus();
        assert!(text.contains("# TYPE tracer_test_events_total counter"));
        assert!(text.contains("tracer_test_events_total{reason=\"x\"} 5"));
    }

    #[test]
    fn labels_are_interned() {
        let a = labels(&[("protocol", "http1"), ("reason", "gap")]);
        assert_eq!(a, "protocol=\"http1\",reason=\"gap\"");
        assert!(std::ptr::eq(
            a,
            labels(&[("protocol", "http1"), ("reason", "gap")])
        ));
    }
}
