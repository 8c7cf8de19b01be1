//! What the pipeline says about an event. Each thing that can happen to
//! an event for a handler is a [`Happened`], whose `emit` writes its log
//! line, marks the event's span and counts it in the metrics, so the three
//! never drift apart. A log line about an event carries one list of fields
//! (README "Logs": `trace_id`, `handler`, `handler_version`, `event_id`,
//! `correlation_id`, `causation_id`, `topic`, `partition`, `offset`), so no
//! line misses one; the trace id is formatted only when the line is
//! written.

use std::sync::atomic::Ordering;
use std::time::Duration;

use opentelemetry::{Context as TraceContext, KeyValue};

use super::stats::Stats;
use crate::envelope::{Event, Record};
use crate::failure::FailureKind;
use crate::handler::LoadedHandler;
use crate::metrics::HandlerMetrics;
use crate::telemetry::{self, attr};

/// The fields of a line about one event and one handler.
pub(super) struct EventFields<'a> {
    pub(super) cx: &'a TraceContext,
    pub(super) handler: &'a str,
    pub(super) version: &'a str,
    pub(super) event_id: &'a str,
    pub(super) correlation_id: &'a str,
    pub(super) causation_id: &'a str,
    pub(super) record: &'a Record,
}

impl<'a> EventFields<'a> {
    /// A decoded event.
    pub(super) fn of(
        cx: &'a TraceContext,
        handler: &'a LoadedHandler,
        event: &'a Event,
        record: &'a Record,
    ) -> Self {
        Self {
            cx,
            handler: &handler.name,
            version: &handler.version,
            event_id: &event.id,
            correlation_id: &event.correlation_id,
            causation_id: event.causation_id.as_deref().unwrap_or(""),
            record,
        }
    }
}

/// Logs a line about an event at `level`: its [`EventFields`], then the
/// line's own fields and message, as `tracing` takes them.
macro_rules! event_log {
    ($level:ident, $f:expr, $($rest:tt)*) => {{
        let f = &$f;
        tracing::$level!(
            trace_id = %$crate::telemetry::trace_id(f.cx),
            handler = %f.handler,
            handler_version = %f.version,
            event_id = %f.event_id,
            correlation_id = %f.correlation_id,
            causation_id = %f.causation_id,
            topic = %f.record.topic,
            partition = f.record.partition,
            offset = f.record.offset,
            $($rest)*
        )
    }};
}

/// What happened to an event for one handler.
pub(super) enum Happened<'a> {
    /// Its idempotency key was marked already: skipped.
    Duplicate,
    /// Topic retry mode: this attempt was handed to the retry topic
    /// already (before a crash): skipped.
    RetryAlreadyScheduled { attempt: u32 },
    /// The handler returned `outputs` outputs, in `took`.
    Handled { outputs: usize, took: Duration },
    /// The handler failed; it is called again in place after `delay`
    /// (`attempt` is the attempt that failed).
    Retrying {
        attempt: u32,
        delay: Duration,
        reason: &'a str,
    },
    /// The handler failed; attempt `attempt` was sent to the retry topic,
    /// due after `delay`.
    RetryScheduled {
        attempt: u32,
        delay: Duration,
        reason: &'a str,
        retry_topic: &'a str,
        took: Duration,
    },
    /// Sent to the dead-letter topic: the handler failed for good (`took`
    /// is the last call's time), the event did not decode, or the broker
    /// refused one of its records for good.
    DeadLettered {
        kind: FailureKind,
        reason: &'a str,
        attempts: u32,
        dead_letter_topic: &'a str,
        took: Option<Duration>,
    },
    /// A record of a retry topic that names no handler of it: dead-lettered
    /// (counted when its dead letter is acknowledged).
    Unroutable {
        reason: &'a str,
        dead_letter_topic: &'a str,
    },
}

impl Happened<'_> {
    /// Logs it with the event's fields, marks the span of the event's
    /// handling and counts it.
    pub(super) fn emit(&self, f: &EventFields<'_>, metrics: &HandlerMetrics, stats: &Stats) {
        match *self {
            Happened::Duplicate => {
                event_log!(debug, f, "duplicate skipped");
                telemetry::event(f.cx, || ("duplicate skipped", Vec::new()));
                stats.duplicates.fetch_add(1, Ordering::Relaxed);
                metrics.duplicate();
            }
            Happened::RetryAlreadyScheduled { attempt } => {
                event_log!(debug, f, attempt, "retry already scheduled; skipped");
                telemetry::event(f.cx, || ("retry already scheduled", Vec::new()));
            }
            Happened::Handled { outputs, took } => {
                event_log!(debug, f, outputs, "handled");
                stats.handled.fetch_add(1, Ordering::Relaxed);
                metrics.handled(took);
            }
            Happened::Retrying {
                attempt,
                delay,
                reason,
            } => {
                event_log!(debug, f, attempt, ?delay, reason = %reason, "retrying");
                telemetry::event(f.cx, || {
                    (
                        "retry",
                        vec![
                            KeyValue::new(attr::ATTEMPT, attempt as i64 + 1),
                            KeyValue::new("weir.retry.delay_ms", delay.as_millis() as i64),
                            KeyValue::new("weir.retry.reason", reason.to_owned()),
                        ],
                    )
                });
                stats.retries.fetch_add(1, Ordering::Relaxed);
                metrics.retried();
            }
            Happened::RetryScheduled {
                attempt,
                delay,
                reason,
                retry_topic,
                took,
            } => {
                event_log!(debug, f, attempt, ?delay, reason = %reason,
                    retry_topic = %retry_topic, "sent to the retry topic");
                telemetry::event(f.cx, || {
                    (
                        "retry scheduled",
                        vec![
                            KeyValue::new(attr::ATTEMPT, attempt as i64),
                            KeyValue::new("weir.retry.delay_ms", delay.as_millis() as i64),
                            KeyValue::new("weir.retry.reason", reason.to_owned()),
                        ],
                    )
                });
                stats.retries.fetch_add(1, Ordering::Relaxed);
                metrics.sent_to_retry(took);
            }
            Happened::DeadLettered {
                kind,
                reason,
                attempts,
                dead_letter_topic,
                took,
            } => {
                telemetry::fail(f.cx, kind.name(), reason);
                match kind {
                    FailureKind::Undecodable => event_log!(warn, f, kind = %kind, reason = %reason,
                        attempts, dead_letter_topic = %dead_letter_topic,
                        "undecodable event dead-lettered"),
                    FailureKind::ProduceFailed => {
                        event_log!(warn, f, kind = %kind, reason = %reason,
                        attempts, dead_letter_topic = %dead_letter_topic,
                        "event dead-lettered: produce failed")
                    }
                    _ => event_log!(warn, f, kind = %kind, reason = %reason,
                        attempts, dead_letter_topic = %dead_letter_topic,
                        "event dead-lettered"),
                }
                metrics.failed(kind, took);
            }
            Happened::Unroutable {
                reason,
                dead_letter_topic,
            } => {
                telemetry::fail(f.cx, FailureKind::Undecodable.name(), reason);
                event_log!(error, f, reason, dead_letter_topic = %dead_letter_topic,
                    "unroutable record dead-lettered");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::metrics::Metrics;

    /// The value of `name` (with the handler's label) in the exposition.
    fn sample(text: &str, name: &str, labels: &str) -> f64 {
        text.lines()
            .find(|l| l.starts_with(name) && l.contains(labels))
            .and_then(|l| l.rsplit(' ').next())
            .map_or(0.0, |v| v.parse().unwrap())
    }

    #[test]
    fn each_happening_counts_what_it_says() {
        let metrics = Arc::new(Metrics::new());
        let handler = metrics.handler("echo", "v1");
        let stats = Stats::default();
        let cx = TraceContext::new();
        let record = Record {
            topic: "orders".into(),
            partition: 1,
            offset: 7,
            timestamp_ms: 0,
            key: None,
            value: Vec::new(),
            headers: Vec::new(),
        };
        let f = EventFields {
            cx: &cx,
            handler: "echo",
            version: "v1",
            event_id: "e-1",
            correlation_id: "c-1",
            causation_id: "",
            record: &record,
        };
        let took = Duration::from_millis(2);
        for happened in [
            Happened::Duplicate,
            Happened::RetryAlreadyScheduled { attempt: 2 },
            Happened::Handled { outputs: 1, took },
            Happened::Retrying {
                attempt: 1,
                delay: took,
                reason: "down",
            },
            Happened::RetryScheduled {
                attempt: 2,
                delay: took,
                reason: "down",
                retry_topic: "orders.retry",
                took,
            },
            Happened::DeadLettered {
                kind: FailureKind::Fatal,
                reason: "bad",
                attempts: 1,
                dead_letter_topic: "orders.dlq",
                took: Some(took),
            },
            Happened::DeadLettered {
                kind: FailureKind::Undecodable,
                reason: "not JSON",
                attempts: 1,
                dead_letter_topic: "orders.dlq",
                took: None,
            },
            // Counted when its dead letter is acknowledged, not here.
            Happened::Unroutable {
                reason: "no handler",
                dead_letter_topic: "orders.dlq",
            },
        ] {
            happened.emit(&f, &handler, &stats);
        }
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        assert_eq!(load(&stats.duplicates), 1);
        assert_eq!(load(&stats.handled), 1);
        assert_eq!(load(&stats.retries), 2, "in place and through the topic");
        let text = metrics.render();
        let echo = "handler=\"echo\"";
        assert_eq!(sample(&text, "weir_duplicates_skipped_total", echo), 1.0);
        assert_eq!(sample(&text, "weir_events_handled_total", echo), 1.0);
        assert_eq!(sample(&text, "weir_events_retried_total", echo), 2.0);
        assert_eq!(
            sample(&text, "weir_events_failed_total", "class=\"fatal\""),
            1.0
        );
        assert_eq!(
            sample(&text, "weir_events_failed_total", "class=\"undecodable\""),
            1.0
        );
    }
}
