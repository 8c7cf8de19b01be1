//! Prometheus metrics and the HTTP server of `/metrics`, `/healthz` and
//! `/readyz`.
//!
//! Label sets are bounded: `handler` takes the configured handler names,
//! `class` the failure kinds, `topic`/`partition` the assigned partitions.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use tracing::info;

use crate::failure::FailureKind;

mod server;

pub use server::{serve, Health};

/// Buckets of the handling duration, in seconds: from a 10 µs call to a
/// retried one of several seconds.
const DURATION_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Every metric the runtime exports.
pub struct Metrics {
    registry: Registry,
    consumer_lag: IntGaugeVec,
    /// The (topic, partition) series of `consumer_lag` now set.
    lag_series: std::sync::Mutex<std::collections::HashSet<(String, String)>>,
    duration: HistogramVec,
    handled: IntCounterVec,
    failed: IntCounterVec,
    retried: IntCounterVec,
    dead_lettered: IntCounterVec,
    duplicates: IntCounterVec,
    outputs: IntCounterVec,
    fuel: IntCounterVec,
    handler_info: IntGaugeVec,
    /// Deploys of handler versions by result (`ok`, `unchanged`, `refused`).
    deploys: IntCounterVec,
    /// Rollbacks by kind (`manual`, `automatic`).
    rollbacks: IntCounterVec,
    /// Failed attempts to publish a record (each record is retried;
    /// nothing is committed past it).
    pub produce_errors: IntCounter,
    /// Errors of the Kafka clients by operation (`commit`, `store_offset`,
    /// `consume`, `rebalance`).
    pub kafka_errors: IntCounterVec,
    /// Partitions stopped because their dead letters cannot be written.
    pub stopped_partitions: IntGauge,
    /// Events fetched whose outcome is not final yet.
    pub in_flight: IntGauge,
    /// Partitions paused for backpressure now.
    pub paused_partitions: IntGauge,
    /// Rebalances by kind (`assign`, `revoke`, `lost`).
    pub rebalances: IntCounterVec,
    /// Partitions assigned to this instance now.
    pub partitions_owned: IntGauge,
    /// Time to restore one changelog partition's idempotency marks.
    pub restore_seconds: Histogram,
    /// Idempotency marks restored from the changelog.
    pub restored_marks: IntCounter,
    /// Exactly-once transactions by result (`committed`, `aborted`).
    pub transactions: IntCounterVec,
    /// Time to commit one transaction (offsets, flush, commit).
    pub transaction_seconds: Histogram,
    /// Keys of each handler's state in this instance's store.
    pub state_keys: IntGaugeVec,
    /// Bytes (keys and values) of each handler's state in this store.
    pub state_bytes: IntGaugeVec,
    /// Time to restore one input partition's state from its changelog.
    pub state_restore_seconds: Histogram,
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry.register(Box::new(g.clone())).expect("unique name");
    g
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric");
    registry.register(Box::new(c.clone())).expect("unique name");
    c
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        .expect("a valid metric");
    registry.register(Box::new(h.clone())).expect("unique name");
    h
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("a valid metric");
    registry.register(Box::new(g.clone())).expect("unique name");
    g
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let consumer_lag = IntGaugeVec::new(
            Opts::new(
                "weir_consumer_lag",
                "Records between the committed offset and the high watermark, per assigned partition",
            ),
            &["topic", "partition"],
        )
        .expect("a valid metric");
        r.register(Box::new(consumer_lag.clone()))
            .expect("unique name");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "weir_handling_duration_seconds",
                "Time one handler took over one event (retries in place included, fuel-budget waits not), by outcome (ok, failed, retry)",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["handler", "outcome"],
        )
        .expect("a valid metric");
        r.register(Box::new(duration.clone())).expect("unique name");
        let handler_info = IntGaugeVec::new(
            Opts::new(
                "weir_handler_info",
                "1 for the handler version serving, 0 for versions it replaced",
            ),
            &["handler", "version"],
        )
        .expect("a valid metric");
        r.register(Box::new(handler_info.clone()))
            .expect("unique name");
        let build = IntGaugeVec::new(
            Opts::new("weir_build_info", "1, labelled with the runtime's version"),
            &["version"],
        )
        .expect("a valid metric");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        r.register(Box::new(build)).expect("unique name");
        Self {
            consumer_lag,
            lag_series: Default::default(),
            duration,
            handled: counter(
                &r,
                "weir_events_handled_total",
                "Events a handler handled successfully",
                &["handler"],
            ),
            failed: counter(
                &r,
                "weir_events_failed_total",
                "Events a handler failed on for good, by failure class",
                &["handler", "class"],
            ),
            retried: counter(
                &r,
                "weir_events_retried_total",
                "Retries of retriable failures",
                &["handler"],
            ),
            dead_lettered: counter(
                &r,
                "weir_events_dead_lettered_total",
                "Dead letters published (acknowledged)",
                &["handler"],
            ),
            duplicates: counter(
                &r,
                "weir_duplicates_skipped_total",
                "Events skipped because the handler already handled them",
                &["handler"],
            ),
            outputs: counter(
                &r,
                "weir_outputs_published_total",
                "Handler outputs published (acknowledged)",
                &["handler"],
            ),
            fuel: counter(
                &r,
                "weir_fuel_consumed_total",
                "Wasm fuel consumed by handler calls",
                &["handler"],
            ),
            handler_info,
            deploys: counter(
                &r,
                "weir_handler_deploys_total",
                "Deploys of a handler version, by result (ok, unchanged, refused)",
                &["handler", "result"],
            ),
            rollbacks: counter(
                &r,
                "weir_handler_rollbacks_total",
                "Rollbacks to a handler's previous version, by kind (manual, automatic)",
                &["handler", "kind"],
            ),
            produce_errors: gauge_counter(
                &r,
                "weir_produce_errors_total",
                "Records the broker or the producer refused (retriable ones are sent again; permanent ones dead-letter their event, or stop the partition for a dead letter)",
            ),
            kafka_errors: counter(
                &r,
                "weir_kafka_errors_total",
                "Errors of the Kafka clients, by operation (commit, store_offset, consume, rebalance)",
                &["operation"],
            ),
            stopped_partitions: gauge(
                &r,
                "weir_stopped_partitions",
                "Partitions stopped because a dead letter was refused for good (nothing is committed past it)",
            ),
            in_flight: gauge(
                &r,
                "weir_events_in_flight",
                "Events fetched whose outcome is not final yet",
            ),
            paused_partitions: gauge(
                &r,
                "weir_paused_partitions",
                "Partitions paused for backpressure",
            ),
            rebalances: counter(
                &r,
                "weir_rebalances_total",
                "Rebalances that gave this instance partitions (assign) or took some away (revoke; lost: taken away without a revoke, e.g. after the group lost this member)",
                &["kind"],
            ),
            partitions_owned: gauge(
                &r,
                "weir_partitions_owned",
                "Partitions assigned to this instance",
            ),
            restore_seconds: histogram(
                &r,
                "weir_idempotency_restore_seconds",
                "Time to restore the idempotency marks of a changelog partition before its first event",
                vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0],
            ),
            restored_marks: gauge_counter(
                &r,
                "weir_idempotency_restored_marks_total",
                "Idempotency marks restored from the changelog topic",
            ),
            state_keys: gauge_vec(
                &r,
                "weir_state_keys",
                "Keys of each handler's state in this instance's store",
                &["handler"],
            ),
            state_bytes: gauge_vec(
                &r,
                "weir_state_bytes",
                "Bytes (keys and values) of each handler's state in this instance's store",
                &["handler"],
            ),
            state_restore_seconds: histogram(
                &r,
                "weir_state_restore_seconds",
                "Time to restore an input partition's handler state from the state changelog before its first event",
                vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0],
            ),
            transactions: counter(
                &r,
                "weir_transactions_total",
                "Exactly-once transactions, by result (committed; aborted: its events are handled again)",
                &["result"],
            ),
            transaction_seconds: histogram(
                &r,
                "weir_transaction_commit_seconds",
                "Time to commit one exactly-once transaction (offsets, flush of its records, commit)",
                vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0],
            ),
            registry: r,
        }
    }

    /// The metrics of one handler, with their label values resolved once;
    /// the handler's version is reported in `weir_handler_info`.
    pub fn handler(self: &Arc<Self>, name: &str, version: &str) -> HandlerMetrics {
        self.handler_info.with_label_values(&[name, version]).set(1);
        self.counters(name)
    }

    /// `weir_handler_info`: 1 for the version serving, 0 for the one it replaced.
    pub fn handler_version(&self, name: &str, old: Option<&str>, new: &str) {
        if let Some(old) = old.filter(|o| *o != new) {
            self.handler_info.with_label_values(&[name, old]).set(0);
        }
        self.handler_info.with_label_values(&[name, new]).set(1);
    }

    /// `weir_handler_info` of a handler removed by a reload: 0.
    pub fn handler_removed(&self, name: &str, version: &str) {
        self.handler_info.with_label_values(&[name, version]).set(0);
    }

    /// Counts a deploy by its result.
    pub fn deploy(&self, name: &str, result: &str) {
        self.deploys.with_label_values(&[name, result]).inc();
    }

    /// Counts a rollback by its kind.
    pub fn rollback(&self, name: &str, kind: &str) {
        self.rollbacks.with_label_values(&[name, kind]).inc();
    }

    /// Counts the failure of a record no handler can take (a retry record
    /// for a removed handler, say) under `handler="(unrouted)"`, and returns
    /// the counter its acknowledged dead letter increments.
    pub fn unrouted(&self) -> IntCounter {
        const UNROUTED: &str = "(unrouted)";
        self.failed
            .with_label_values(&[UNROUTED, FailureKind::Undecodable.name()])
            .inc();
        self.dead_lettered.with_label_values(&[UNROUTED])
    }

    /// Counters and histograms under the label `handler=name`.
    fn counters(self: &Arc<Self>, name: &str) -> HandlerMetrics {
        let c = |v: &IntCounterVec| v.with_label_values(&[name]);
        HandlerMetrics(Some(Arc::new(Resolved {
            name: name.to_owned(),
            metrics: self.clone(),
            handled: c(&self.handled),
            retried: c(&self.retried),
            dead_lettered: c(&self.dead_lettered),
            duplicates: c(&self.duplicates),
            outputs: c(&self.outputs),
            fuel: c(&self.fuel),
            ok: self.duration.with_label_values(&[name, "ok"]),
            failed: self.duration.with_label_values(&[name, "failed"]),
            retry: self.duration.with_label_values(&[name, "retry"]),
        })))
    }

    /// Sets the lag gauges from a statistics report: assigned partitions
    /// with a committed offset or a position; series of partitions no longer reported are
    /// removed (after the others are set, so a scrape never sees none).
    pub fn record_lag(&self, stats: &rdkafka::Statistics) {
        let mut now = std::collections::HashSet::new();
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                if *partition < 0 || !p.desired {
                    continue;
                }
                // Against the committed offset; before the first commit,
                // against the position (the next offset to hand over).
                let lag = if p.consumer_lag >= 0 {
                    p.consumer_lag
                } else if p.hi_offset >= 0 && p.app_offset >= 0 {
                    (p.hi_offset - p.app_offset).max(0)
                } else {
                    continue;
                };
                let partition = partition.to_string();
                self.consumer_lag
                    .with_label_values(&[topic.as_str(), &partition])
                    .set(lag);
                now.insert((topic.clone(), partition));
            }
        }
        let mut reported = self.lag_series.lock().unwrap_or_else(|e| e.into_inner());
        for (topic, partition) in reported.difference(&now) {
            let _ = self
                .consumer_lag
                .remove_label_values(&[topic.as_str(), partition.as_str()]);
        }
        *reported = now;
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        prometheus::TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# cannot encode metrics: {e}\n"))
    }
}

fn gauge_counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("a valid metric");
    registry.register(Box::new(c.clone())).expect("unique name");
    c
}

struct Resolved {
    name: String,
    metrics: Arc<Metrics>,
    handled: IntCounter,
    retried: IntCounter,
    dead_lettered: IntCounter,
    duplicates: IntCounter,
    outputs: IntCounter,
    fuel: IntCounter,
    ok: Histogram,
    failed: Histogram,
    retry: Histogram,
}

/// How one handler's event ended, for the duration histogram.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    Ok,
    Failed,
    /// Sent to the retry topic.
    Retry,
}

/// One handler's metrics; every method is a no-op when metrics are off.
#[derive(Clone, Default)]
pub struct HandlerMetrics(Option<Arc<Resolved>>);

impl HandlerMetrics {
    /// Metrics off.
    pub fn off() -> Self {
        Self(None)
    }

    pub fn handled(&self, took: Duration) {
        if let Some(m) = &self.0 {
            m.handled.inc();
            m.ok.observe(took.as_secs_f64());
        }
    }

    pub fn failed(&self, class: FailureKind, took: Option<Duration>) {
        if let Some(m) = &self.0 {
            m.metrics
                .failed
                .with_label_values(&[m.name.as_str(), class.name()])
                .inc();
            if let Some(took) = took {
                m.failed.observe(took.as_secs_f64());
            }
        }
    }

    pub fn sent_to_retry(&self, took: Duration) {
        if let Some(m) = &self.0 {
            m.retried.inc();
            m.retry.observe(took.as_secs_f64());
        }
    }

    pub fn retried(&self) {
        if let Some(m) = &self.0 {
            m.retried.inc();
        }
    }

    pub fn duplicate(&self) {
        if let Some(m) = &self.0 {
            m.duplicates.inc();
        }
    }

    pub fn fuel(&self, used: u64) {
        if let Some(m) = &self.0 {
            m.fuel.inc_by(used);
        }
    }

    /// The counter an acknowledged output of this handler increments.
    pub fn output_counter(&self) -> Option<IntCounter> {
        self.0.as_ref().map(|m| m.outputs.clone())
    }

    /// The counter an acknowledged dead letter of this handler increments.
    pub fn dead_letter_counter(&self) -> Option<IntCounter> {
        self.0.as_ref().map(|m| m.dead_lettered.clone())
    }
}

#[cfg(test)]
mod tests;
