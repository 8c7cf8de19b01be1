//! What the pipeline reports: its counters ([`Stats`], for benchmarks,
//! tests and the progress log line) and where it reports to operators
//! ([`Observability`]: spans, metrics, readiness).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::info;

use super::suspects::Suspects;
use crate::handler::LoadedHandler;
use crate::metrics::{HandlerMetrics, Health, Metrics};
use crate::telemetry::Tracing;

/// Counters of what the pipeline did, shared with whoever runs it.
#[derive(Debug, Default)]
pub struct Stats {
    /// When the pipeline subscribed (handlers compiled, clients made), for
    /// benchmarks that time the pipeline, not the start-up.
    pub subscribed: std::sync::OnceLock<Instant>,
    /// Events whose outcome is final (handled, skipped or dead-lettered).
    pub events_final: AtomicU64,
    /// Handler calls that succeeded.
    pub handled: AtomicU64,
    /// Records sent to a dead-letter topic.
    pub dead_lettered: AtomicU64,
    /// Output records acknowledged by the broker.
    pub outputs: AtomicU64,
    /// Retries of `retriable` failures.
    pub retries: AtomicU64,
    /// Handler calls skipped because the event was already handled.
    pub duplicates: AtomicU64,
    /// Fuel used by handler calls.
    pub fuel_used: AtomicU64,
    /// Times a worker waited for its handler's fuel budget to refill.
    pub budget_waits: AtomicU64,
    /// Partitions resumed after a pause.
    pub resumes: AtomicU64,
    /// Handler call durations in microseconds (for benchmarks).
    pub handle_micros: Option<Mutex<hdrhistogram::Histogram<u64>>>,
    /// Partitions paused for backpressure, since start.
    pub pauses: AtomicU64,
    /// Times the poll loop held off taking records over the total bound.
    pub holds: AtomicU64,
    /// Exactly-once: events whose records were refused for good, kept
    /// across rewinds.
    pub suspects: Arc<Suspects>,
}

impl Stats {
    /// One log line with the counters, for operators without a metrics scraper.
    pub fn log_progress(&self) {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        info!(
            final_events = g(&self.events_final),
            handled = g(&self.handled),
            outputs = g(&self.outputs),
            dead_lettered = g(&self.dead_lettered),
            retries = g(&self.retries),
            duplicates = g(&self.duplicates),
            fuel_used = g(&self.fuel_used),
            holds = g(&self.holds),
            pauses = g(&self.pauses),
            resumes = g(&self.resumes),
            budget_waits = g(&self.budget_waits),
            "progress"
        );
    }

    pub(super) fn record_handle(&self, d: Duration) {
        if let Some(h) = &self.handle_micros {
            let _ = h.lock().unwrap().record(d.as_micros() as u64);
        }
    }
}

/// What the pipeline reports to operators: spans, metrics, readiness.
#[derive(Clone, Default)]
pub struct Observability {
    pub tracing: Arc<Tracing>,
    /// None when metrics are off (nothing is recorded).
    pub metrics: Option<Arc<Metrics>>,
    pub health: Arc<Health>,
}

impl Observability {
    /// No spans, no metrics (trace context is still propagated).
    pub fn off() -> Self {
        Self::default()
    }

    pub(super) fn handler_metrics(&self, h: &LoadedHandler) -> HandlerMetrics {
        match &self.metrics {
            Some(m) => m.handler(&h.name, &h.version),
            None => HandlerMetrics::off(),
        }
    }
}
