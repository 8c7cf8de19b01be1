//! A handler call with its limits: the fuel budget, the call itself, and
//! in-place retries with backoff; the outcome as a [`Verdict`].

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use opentelemetry::trace::SpanKind;
use opentelemetry::{Context as TraceContext, KeyValue};

use time::OffsetDateTime;

use super::observe::{EventFields, Happened};
use super::worker::PartitionWorker;
use crate::config::RetryMode;
use crate::envelope::{self, Produce, Record};
use crate::failure::FailureKind;
use crate::handler::CallOutcome;
use crate::retry_topic::RetryInfo;
use crate::telemetry::{self, attr};

/// What became of one handler's call for one event.
pub(super) enum Verdict {
    /// The outputs, and the call's state writes.
    Outputs(Vec<Produce>, Vec<crate::state::Write>),
    /// Retriable in `topic` mode: send to the retry topic for `attempt`.
    Retry {
        attempt: u32,
        delay: Duration,
        message: String,
        first_failure: OffsetDateTime,
    },
    Failed {
        kind: FailureKind,
        message: String,
        attempts: u32,
        first_failure: OffsetDateTime,
    },
}

impl PartitionWorker {
    /// Calls handler `i`, retrying `retriable` failures with exponential
    /// backoff and full jitter, in place (the partition waits, in order).
    /// Each attempt is a child span of `cx`.
    pub(super) fn call(
        &mut self,
        i: usize,
        event: &envelope::Event,
        record: &Record,
        retry: Option<&RetryInfo>,
        cx: &TraceContext,
    ) -> Option<Verdict> {
        let metrics = self.handlers[i].2.clone();
        let mut first_failure = retry.map(|r| r.first_failure);
        let mut attempt = retry.map_or(1, |r| r.attempt);
        let trace_id = telemetry::trace_id(cx);
        loop {
            let handler = self.handlers[i].0.clone();
            if self.handlers[i].1.is_none() {
                match handler.instantiate() {
                    Ok(inst) => self.handlers[i].1 = Some(inst),
                    Err(e) => {
                        // Instantiation was checked at load; failing now is a
                        // resource problem: treat like a trap of this event.
                        return Some(Verdict::Failed {
                            kind: FailureKind::Trap,
                            message: format!("cannot instantiate handler: {e:#}"),
                            attempts: attempt,
                            first_failure: OffsetDateTime::now_utc(),
                        });
                    }
                }
            }
            if let Some(budget) = handler.budget() {
                // Spent budget: this partition waits (and, its queue full,
                // pauses), so an expensive handler slows only its own input.
                loop {
                    let wait = budget.wait_time();
                    if wait.is_zero() {
                        break;
                    }
                    self.shared
                        .stats
                        .budget_waits
                        .fetch_add(1, Ordering::Relaxed);
                    if !self.fence.sleep(wait) {
                        return None;
                    }
                    self.throttled += wait;
                }
            }
            let call_cx = self.shared.tracing().start(cx, || {
                (
                    format!("call {}", handler.name),
                    SpanKind::Internal,
                    vec![
                        KeyValue::new(attr::HANDLER, handler.name.clone()),
                        KeyValue::new(attr::HANDLER_VERSION, handler.version.clone()),
                        KeyValue::new(attr::ATTEMPT, attempt as i64),
                    ],
                )
            });
            let started = Instant::now();
            let state = self.call_state(i);
            let instance = self.handlers[i].1.as_mut().expect("instantiated above");
            let outcome = instance.call(event, record, attempt, &trace_id, state);
            self.shared.stats.record_handle(started.elapsed());
            let fuel = instance.last_fuel_used();
            self.shared
                .stats
                .fuel_used
                .fetch_add(fuel, Ordering::Relaxed);
            metrics.fuel(fuel);
            telemetry::set(&call_cx, || KeyValue::new(attr::FUEL, fuel as i64));
            match &outcome {
                CallOutcome::Ok(..) => {}
                CallOutcome::Failed(kind, message) => {
                    telemetry::fail(&call_cx, kind.name(), message)
                }
                CallOutcome::Retriable(message) => telemetry::fail(&call_cx, "retriable", message),
            }
            telemetry::end(&call_cx);
            if let Some(budget) = handler.budget() {
                budget.debit(fuel);
            }
            if instance.is_poisoned() {
                self.handlers[i].1 = None;
            }
            // The clock is read for a failure only, not for every call.
            if !matches!(outcome, CallOutcome::Ok(..)) {
                first_failure.get_or_insert_with(OffsetDateTime::now_utc);
            }
            let failed_at = || first_failure.unwrap_or_else(OffsetDateTime::now_utc);
            match outcome {
                CallOutcome::Ok(outputs, writes) => {
                    let mut produced = Vec::with_capacity(outputs.len());
                    for o in outputs {
                        match envelope::encode_output(o, event, self.max_record_bytes) {
                            Ok(p) => produced.push(p),
                            Err(message) => {
                                return Some(Verdict::Failed {
                                    kind: FailureKind::InvalidOutput,
                                    message,
                                    attempts: attempt,
                                    first_failure: failed_at(),
                                })
                            }
                        }
                    }
                    return Some(Verdict::Outputs(produced, writes));
                }
                CallOutcome::Failed(kind, message) => {
                    return Some(Verdict::Failed {
                        kind,
                        message,
                        attempts: attempt,
                        first_failure: failed_at(),
                    })
                }
                CallOutcome::Retriable(message) => {
                    if attempt >= handler.config_entry.max_attempts {
                        return Some(Verdict::Failed {
                            kind: FailureKind::RetriesExhausted,
                            message,
                            attempts: attempt,
                            first_failure: failed_at(),
                        });
                    }
                    let delay = handler.backoff(attempt);
                    if handler.config_entry.retry_mode == RetryMode::Topic {
                        return Some(Verdict::Retry {
                            attempt: attempt + 1,
                            delay,
                            message,
                            first_failure: failed_at(),
                        });
                    }
                    Happened::Retrying {
                        attempt,
                        delay,
                        reason: &message,
                    }
                    .emit(
                        &EventFields::of(cx, &handler, event, record),
                        &metrics,
                        &self.shared.stats,
                    );
                    if !self.sleep(delay) {
                        return None;
                    }
                    // A version deployed meanwhile takes the next attempt
                    // (the first took the version the event started with).
                    self.refresh(i);
                    attempt += 1;
                }
            }
        }
    }
}
