//! Span export: a bounded queue feeding one batching task that sends OTLP (gRPC or HTTP/protobuf),
//! up to [`MAX_IN_FLIGHT`] batches at once, or prints spans on stdout when no endpoint is
//! configured.
//!
//! Metrics: `spans_exported_total`, `spans_dropped_total{reason=queue_full|export_failed|rejected|shutdown}`,
//! `export_failures_total{reason=...}` (per failed batch), `export_retries_total`, gauge `export_queue_spans`.

mod config;
mod otlp;
mod stdout;
mod transport;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinError, JoinHandle, JoinSet};
use tokio::time::Instant;

pub use config::{ConfigError, ExportConfig, Protocol};

use crate::metrics;
use crate::span::Span;
use stdout::LineWriter;
use transport::{ExportError, Transport};

/// OTLP batches sent at once: one slow round trip does not stall the queue behind it.
const MAX_IN_FLIGHT: usize = 4;
/// Minimum time between two export-failure warnings; failures in between are summed into the next.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// What one exporter did over its lifetime.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ExportStats {
    /// Spans delivered (or printed).
    pub exported: u64,
    /// Spans dropped because the queue was full.
    pub dropped_queue_full: u64,
    /// Spans dropped because their batch could not be delivered.
    pub dropped_export_failed: u64,
    /// Spans the collector reported as rejected.
    pub rejected: u64,
    /// Batches that could not be delivered.
    pub failed_batches: u64,
}

impl std::fmt::Display for ExportStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exported={} dropped_queue_full={} dropped_export_failed={} rejected={} failed_batches={}",
            self.exported,
            self.dropped_queue_full,
            self.dropped_export_failed,
            self.rejected,
            self.failed_batches
        )
    }
}

/// Handle to the export task; cheap to clone, [`Exporter::submit`] never blocks.
#[derive(Clone)]
pub struct Exporter {
    spans: mpsc::Sender<Span>,
    shutdown: mpsc::Sender<oneshot::Sender<ExportStats>>,
    queue_full: Arc<AtomicU64>,
}

impl Exporter {
    /// Starts the export task for `cfg` (must run inside a tokio runtime). Nothing is sent until the
    /// first batch; gRPC connects lazily.
    pub fn start(cfg: ExportConfig) -> Result<(Exporter, JoinHandle<()>), ConfigError> {
        let sink = match &cfg.endpoint {
            None => {
                tracing::info!("no OTLP endpoint configured: printing spans on stdout");
                Sink::Stdout(LineWriter::new(Box::new(tokio::io::stdout())))
            }
            Some(endpoint) => {
                let url = endpoint.resolve(cfg.protocol);
                tracing::info!(%url, protocol = %cfg.protocol, "exporting spans over OTLP");
                Sink::Otlp(match cfg.protocol {
                    Protocol::Grpc => Transport::grpc(&url, &cfg.headers, cfg.timeout)?,
                    Protocol::HttpProtobuf => Transport::http(&url, &cfg.headers, cfg.timeout)?,
                })
            }
        };
        Ok(Self::spawn(&cfg, sink))
    }

    fn spawn(cfg: &ExportConfig, sink: Sink) -> (Exporter, JoinHandle<()>) {
        let (spans_tx, spans_rx) = mpsc::channel(cfg.max_queue_size.max(1));
        let (shutdown_tx, shutdown_rx) = mpsc::channel(1);
        let queue_full = Arc::new(AtomicU64::new(0));
        let task = Batcher {
            sink,
            max_batch: cfg.max_export_batch_size.max(1),
            schedule_delay: cfg.schedule_delay,
            timeout: cfg.timeout,
            stats: ExportStats::default(),
            queue_full: Arc::clone(&queue_full),
            warn: WarnLimiter::default(),
            encoder: otlp::RequestEncoder::default(),
            buffers: Vec::new(),
            in_flight: JoinSet::new(),
        };
        let handle = tokio::spawn(task.run(spans_rx, shutdown_rx));
        (
            Exporter {
                spans: spans_tx,
                shutdown: shutdown_tx,
                queue_full,
            },
            handle,
        )
    }

    /// Queues a finished span; drops it (counted) when the queue is full.
    pub fn submit(&self, span: Span) {
        match self.spans.try_send(span) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.queue_full.fetch_add(1, Ordering::Relaxed);
                metrics::add("spans_dropped_total", "reason=\"queue_full\"", 1);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                metrics::add("spans_dropped_total", "reason=\"shutdown\"", 1)
            }
        }
    }

    /// Queues a finished span, waiting for room when the queue is full (shutdown: the linking
    /// window may hold more spans than the queue, and nothing else competes for it then).
    pub async fn submit_wait(&self, span: Span) {
        if self.spans.send(span).await.is_err() {
            metrics::add("spans_dropped_total", "reason=\"shutdown\"", 1);
        }
    }

    /// Stops accepting spans, sends everything queued (bounded by the export timeout after the batch in
    /// flight, if any) and returns the totals; `None` when the task had already stopped.
    pub async fn shutdown(&self) -> Option<ExportStats> {
        let (tx, rx) = oneshot::channel();
        self.shutdown.send(tx).await.ok()?;
        rx.await.ok()
    }
}

/// Where batches go.
enum Sink {
    Stdout(LineWriter),
    Otlp(Transport),
}

/// The export task's state.
struct Batcher {
    sink: Sink,
    max_batch: usize,
    schedule_delay: Duration,
    timeout: Duration,
    stats: ExportStats,
    queue_full: Arc<AtomicU64>,
    warn: WarnLimiter,
    /// Encodes OTLP requests, reusing its scratch space.
    encoder: otlp::RequestEncoder,
    /// Buffers of finished exports, reused for the next requests (at most [`MAX_IN_FLIGHT`]).
    buffers: Vec<BytesMut>,
    /// OTLP exports under way.
    in_flight: JoinSet<Sent>,
}

/// An OTLP export that ended.
struct Sent {
    /// Spans in the batch.
    spans: u64,
    /// The encoded request, whose buffer can be reused.
    payload: Bytes,
    /// Its outcome.
    result: Result<transport::Accepted, ExportError>,
}

impl Batcher {
    async fn run(
        mut self,
        mut spans: mpsc::Receiver<Span>,
        mut shutdown: mpsc::Receiver<oneshot::Sender<ExportStats>>,
    ) {
        let mut batch: Vec<Span> = Vec::with_capacity(self.max_batch);
        // Set when the first span of a batch arrives: no span waits longer than the schedule delay.
        let mut due: Option<Instant> = None;
        let reply = loop {
            // `send` empties a full batch, so there is always room for one more span (at least
            // one in any case: `recv_many` with no room would read as a closed queue).
            let room = self.max_batch.saturating_sub(batch.len()).max(1);
            tokio::select! {
                biased;
                // `None`: every handle was dropped without a shutdown call; flush all the same.
                req = shutdown.recv() => break req,
                // Everything queued up to a full batch at once, not one select per span.
                n = spans.recv_many(&mut batch, room) => {
                    if n == 0 { break None };
                    if due.is_none() {
                        due = Some(Instant::now() + self.schedule_delay);
                    }
                    if batch.len() >= self.max_batch {
                        due = None;
                        self.send(&mut batch, &spans, Instant::now() + self.timeout).await;
                    }
                }
                () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    due = None;
                    self.send(&mut batch, &spans, Instant::now() + self.timeout).await;
                }
                Some(done) = self.in_flight.join_next(), if !self.in_flight.is_empty() => {
                    self.finished(done);
                }
            }
        };

        spans.close();
        let deadline = Instant::now() + self.timeout;
        while let Some(span) = spans.recv().await {
            batch.push(span);
            if batch.len() >= self.max_batch {
                self.send(&mut batch, &spans, deadline).await;
            }
        }
        self.send(&mut batch, &spans, deadline).await;
        while let Some(done) = self.in_flight.join_next().await {
            self.finished(done);
        }
        self.stats.dropped_queue_full = self.queue_full.load(Ordering::Relaxed);
        tracing::info!(stats = %self.stats, "span exporter stopped");
        if let Some(reply) = reply {
            let _ = reply.send(self.stats);
        }
    }

    /// Exports and empties `batch`, counting the outcome.
    async fn send(
        &mut self,
        batch: &mut Vec<Span>,
        queue: &mpsc::Receiver<Span>,
        deadline: Instant,
    ) {
        if batch.is_empty() {
            return;
        }
        metrics::set_gauge("export_queue_spans", "", queue.len() as u64);
        let n = batch.len() as u64;
        let transport = match &mut self.sink {
            Sink::Stdout(w) => {
                let result = w
                    .write_batch(batch)
                    .await
                    .map(|()| transport::Accepted::default())
                    .map_err(ExportError::from);
                batch.clear();
                return self.account(n, result);
            }
            Sink::Otlp(t) => t.clone(),
        };
        while self.in_flight.len() >= MAX_IN_FLIGHT {
            match self.in_flight.join_next().await {
                Some(done) => self.finished(done),
                None => break,
            }
        }
        let mut buf = self.buffers.pop().unwrap_or_default();
        self.encoder.encode(batch, &mut buf);
        batch.clear();
        let payload = buf.freeze();
        let mut transport = transport;
        self.in_flight.spawn(async move {
            let result = transport.export(&payload, deadline).await;
            Sent {
                spans: n,
                payload,
                result,
            }
        });
    }

    /// Counts an export that ended and keeps its buffer.
    fn finished(&mut self, done: Result<Sent, JoinError>) {
        match done {
            Ok(sent) => {
                if self.buffers.len() < MAX_IN_FLIGHT
                    && let Some(buf) = reclaim(sent.payload)
                {
                    self.buffers.push(buf);
                }
                self.account(sent.spans, sent.result);
            }
            Err(err) => tracing::error!(%err, "span export task failed"),
        }
    }

    /// Counts the outcome of one batch of `n` spans.
    fn account(&mut self, n: u64, result: Result<transport::Accepted, ExportError>) {
        match result {
            Ok(accepted) => {
                let rejected = accepted.rejected.min(n);
                self.stats.exported += n - rejected;
                metrics::add("spans_exported_total", "", n - rejected);
                if rejected > 0 {
                    self.stats.rejected += rejected;
                    metrics::add("spans_dropped_total", "reason=\"rejected\"", rejected);
                    self.warn.note(rejected, |suppressed| {
                        tracing::warn!(rejected, message = %accepted.message, suppressed, "collector rejected spans");
                    });
                }
            }
            Err(error) => {
                self.stats.failed_batches += 1;
                self.stats.dropped_export_failed += n;
                metrics::add("export_failures_total", error.reason_label(), 1);
                metrics::add("spans_dropped_total", "reason=\"export_failed\"", n);
                self.warn.note(n, |suppressed| {
                    tracing::warn!(%error, spans = n, suppressed, "span export failed, batch dropped");
                });
            }
        }
    }
}

/// The emptied buffer of a sent payload, unless something still holds the payload.
fn reclaim(payload: Bytes) -> Option<BytesMut> {
    let mut buf = payload.try_into_mut().ok()?;
    buf.clear();
    Some(buf)
}

/// Logs at most one warning per [`WARN_INTERVAL`], reporting how many spans the silent ones covered.
#[derive(Default)]
struct WarnLimiter {
    last: Option<Instant>,
    suppressed_spans: u64,
}

impl WarnLimiter {
    fn note(&mut self, spans: u64, log: impl FnOnce(u64)) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < WARN_INTERVAL)
        {
            self.suppressed_spans += spans;
            return;
        }
        log(self.suppressed_spans);
        self.suppressed_spans = 0;
        self.last = Some(now);
    }
}

#[cfg(test)]
mod tests;
