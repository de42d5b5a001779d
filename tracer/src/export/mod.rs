//! Span export: a bounded queue feeding one batching task that sends OTLP (gRPC or HTTP/protobuf),
//! up to [`MAX_IN_FLIGHT`] batches at once, or prints spans on stdout when no endpoint is
//! configured.
//!
//! Metrics: `spans_exported_total`, `spans_dropped_total{reason=queue_full|export_failed|rejected|shutdown}`,
//! `export_failures_total{reason=...}` (per failed batch), `export_retries_total`, gauge `export_queue_spans`.

mod config;
mod otlp;
pub mod own;
mod stdout;
mod transport;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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

/// Handle to the export task; cheap to clone, [`Exporter::submit_all`] never blocks.
///
/// Spans travel in batches (one per drain of the ring buffer or step of the linking window),
/// so the export task is woken once per batch, not once per span; the queue's bound counts
/// spans, shared by every handle.
#[derive(Clone)]
pub struct Exporter {
    spans: mpsc::UnboundedSender<Vec<Span>>,
    shutdown: mpsc::Sender<oneshot::Sender<ExportStats>>,
    queue_full: Arc<AtomicU64>,
    /// Spans queued and not yet taken by the export task.
    queued: Arc<AtomicUsize>,
    max_queue: usize,
    /// Emptied batch vectors coming back from the export task, so a batch of a few thousand
    /// spans does not grow a fresh vector (reallocations, page faults) every time.
    spare: Arc<Mutex<Vec<Vec<Span>>>>,
}

/// Emptied batch vectors kept for reuse.
const SPARE_VECS: usize = 4;
/// Largest vector kept for reuse, in spans (~1.5 MiB): a burst at saturation does not stay
/// allocated.
const SPARE_CAPACITY: usize = 8192;

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
        let (spans_tx, spans_rx) = mpsc::unbounded_channel();
        let (shutdown_tx, shutdown_rx) = mpsc::channel(1);
        let queue_full = Arc::new(AtomicU64::new(0));
        let queued = Arc::new(AtomicUsize::new(0));
        let spare = Arc::new(Mutex::new(Vec::new()));
        let task = Batcher {
            sink,
            max_batch: cfg.max_export_batch_size.max(1),
            schedule_delay: cfg.schedule_delay,
            timeout: cfg.timeout,
            stats: ExportStats::default(),
            queue_full: Arc::clone(&queue_full),
            queued: Arc::clone(&queued),
            spare: Arc::clone(&spare),
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
                queued,
                max_queue: cfg.max_queue_size.max(1),
                spare,
            },
            handle,
        )
    }

    /// Queues a finished span; drops it (counted) when the queue is full.
    #[cfg(test)]
    pub fn submit(&self, span: Span) {
        self.submit_all(&mut vec![span]);
    }

    /// Queues finished spans, emptying `spans`: as many as the queue has room for, in order;
    /// the rest are dropped (counted).
    pub fn submit_all(&self, spans: &mut Vec<Span>) {
        let n = spans.len();
        if n == 0 {
            return;
        }
        // Reserve room for as many as fit; the export task frees it as it takes them.
        let mut room = 0;
        let _ = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                room = self.max_queue.saturating_sub(queued).min(n);
                Some(queued + room)
            });
        if room < n {
            let lost = (n - room) as u64;
            spans.truncate(room);
            self.queue_full.fetch_add(lost, Ordering::Relaxed);
            metrics::add("spans_dropped_total", "reason=\"queue_full\"", lost);
        }
        if room > 0 {
            let empty = self
                .spare
                .lock()
                .ok()
                .and_then(|mut spare| spare.pop())
                .unwrap_or_default();
            self.send(std::mem::replace(spans, empty), room);
        }
    }

    /// Queues finished spans whatever the queue holds (shutdown: the linking window may hold
    /// more spans than the queue, they are in memory already, and nothing else competes then).
    pub fn submit_unbounded(&self, spans: Vec<Span>) {
        let n = spans.len();
        if n > 0 {
            self.queued.fetch_add(n, Ordering::AcqRel);
            self.send(spans, n);
        }
    }

    fn send(&self, spans: Vec<Span>, n: usize) {
        if self.spans.send(spans).is_err() {
            self.queued.fetch_sub(n, Ordering::AcqRel);
            metrics::add("spans_dropped_total", "reason=\"shutdown\"", n as u64);
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
    /// Spans queued, shared with the handles.
    queued: Arc<AtomicUsize>,
    /// Emptied vectors for the handles to reuse.
    spare: Arc<Mutex<Vec<Vec<Span>>>>,
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
        mut spans: mpsc::UnboundedReceiver<Vec<Span>>,
        mut shutdown: mpsc::Receiver<oneshot::Sender<ExportStats>>,
    ) {
        let mut batch: Vec<Span> = Vec::with_capacity(self.max_batch);
        // Set when the first span of a batch arrives: no span waits longer than the schedule delay.
        let mut due: Option<Instant> = None;
        let reply = loop {
            tokio::select! {
                biased;
                // `None`: every handle was dropped without a shutdown call; flush all the same.
                req = shutdown.recv() => break req,
                got = spans.recv() => {
                    let Some(got) = got else { break None };
                    self.take(got, &mut batch);
                    if self.send_full(&mut batch, None).await {
                        due = None;
                    }
                    if due.is_none() && !batch.is_empty() {
                        due = Some(Instant::now() + self.schedule_delay);
                    }
                }
                () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    due = None;
                    self.send(&batch, Instant::now() + self.timeout).await;
                    crate::span::recycle(batch.drain(..));
                    self.trim(&mut batch);
                }
                Some(done) = self.in_flight.join_next(), if !self.in_flight.is_empty() => {
                    self.finished(done);
                }
            }
        };

        spans.close();
        let deadline = Instant::now() + self.timeout;
        while let Some(got) = spans.recv().await {
            self.take(got, &mut batch);
            self.send_full(&mut batch, Some(deadline)).await;
        }
        self.send(&batch, deadline).await;
        batch.clear();
        while let Some(done) = self.in_flight.join_next().await {
            self.finished(done);
        }
        self.stats.dropped_queue_full = self.queue_full.load(Ordering::Relaxed);
        tracing::info!(stats = %self.stats, "span exporter stopped");
        if let Some(reply) = reply {
            let _ = reply.send(self.stats);
        }
    }

    /// Moves spans taken from the queue to the batch (the first ones of a batch without a copy).
    fn take(&mut self, mut got: Vec<Span>, batch: &mut Vec<Span>) {
        self.queued.fetch_sub(got.len(), Ordering::AcqRel);
        if batch.is_empty() {
            std::mem::swap(batch, &mut got);
        } else {
            batch.append(&mut got);
        }
        if (1..=SPARE_CAPACITY).contains(&got.capacity())
            && let Ok(mut spare) = self.spare.lock()
            && spare.len() < SPARE_VECS
        {
            spare.push(got);
        }
    }

    /// Exports every full batch at the front of `batch` and removes them; says whether it sent
    /// any. `deadline`: for each export, else the timeout from when it starts.
    async fn send_full(&mut self, batch: &mut Vec<Span>, deadline: Option<Instant>) -> bool {
        let mut sent = 0;
        while batch.len() - sent >= self.max_batch {
            let deadline = deadline.unwrap_or_else(|| Instant::now() + self.timeout);
            self.send(&batch[sent..sent + self.max_batch], deadline)
                .await;
            sent += self.max_batch;
        }
        crate::span::recycle(batch.drain(..sent));
        self.trim(batch);
        sent > 0
    }

    /// Gives back the room a burst made the batch vector take (it may be a whole queue's worth
    /// of spans, taken over from a handle without a copy).
    fn trim(&self, batch: &mut Vec<Span>) {
        if batch.capacity() > SPARE_CAPACITY {
            batch.shrink_to(self.max_batch.max(batch.len()));
        }
    }

    /// Exports `batch`, counting the outcome.
    async fn send(&mut self, batch: &[Span], deadline: Instant) {
        if batch.is_empty() {
            return;
        }
        metrics::set_gauge(
            "export_queue_spans",
            "",
            self.queued.load(Ordering::Relaxed) as u64,
        );
        let n = batch.len() as u64;
        let transport = match &mut self.sink {
            Sink::Stdout(w) => {
                let result = w
                    .write_batch(batch)
                    .await
                    .map(|()| transport::Accepted::default())
                    .map_err(ExportError::from);
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
