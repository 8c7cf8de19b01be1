//! One record through the handlers of its topic: retry state (on retry
//! topics only), the envelope, routing by event type, the idempotency
//! check, the call, and what the outcome sends: outputs, a retry record or
//! a dead letter, each with what to do should the broker refuse it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::Context as TraceContext;
use prometheus::IntCounter;

use time::OffsetDateTime;

use super::finalizer::{Delivery, Fallback, OnRefused, Pending};
use super::invoke::Verdict;
use super::observe::{EventFields, Happened};
use super::worker::PartitionWorker;
use crate::config::RetryMode;
use crate::deadletter::{self, DeadLetter};
use crate::dedup::{self};
use crate::envelope::Produce;
use crate::envelope::{self, Record};
use crate::failure::FailureKind;
use crate::publish::{publish_span, Ack};
use crate::replay;
use crate::retry_topic::{self};
use crate::telemetry;

mod send;

impl PartitionWorker {
    pub(super) fn process(&mut self, consumed: Record) -> Option<Pending> {
        // Retry state is honoured only on retry topics; elsewhere the
        // headers are ordinary headers.
        let retry = if self.is_retry {
            retry_topic::take_retry(&consumed)
        } else {
            None
        };
        let offset = consumed.offset;
        if self.is_retry && retry.is_none() {
            let parent = self.shared.tracing().extract(&consumed.headers);
            let d = self.dead_letter_unrouted(
                &consumed,
                &parent,
                "a record in a retry topic without valid retry headers",
            )?;
            return Some(Pending {
                offset,
                deliveries: vec![d],
                marks: Vec::new(),
                state: Vec::new(),
            });
        }
        let (record_arc, retry, consumed) = match retry {
            Some((original, info)) => (Arc::new(original), Some(info), Some(consumed)),
            None => (Arc::new(consumed), None, None),
        };
        let record: &Record = &record_arc;
        let retry = retry.as_ref();
        // The context the event arrived with (for a retry record: the
        // context of the span that sent it to the retry topic).
        let parent = self.shared.tracing().extract(&record.headers);
        let mut deliveries = Vec::new();
        let mut marks = Vec::new();
        let mut state = Vec::new();
        self.sweep(offset, &mut state);
        let shared = self.shared.clone();
        let group = shared.config.kafka.group_id.as_str();
        let dedup_on = shared.dedup.is_some();
        let done = |deliveries, marks, state| {
            Some(Pending {
                offset,
                deliveries,
                marks,
                state,
            })
        };
        let mut event = match envelope::decode(record) {
            Ok(event) => event,
            Err(undecodable) => {
                let position = replay::position_id(record);
                let keys: Vec<Vec<u8>> = self
                    .handlers
                    .iter()
                    .map(|(h, _, _)| {
                        dedup::key(&h.name, &replay::dedup_id(&position, record, &h.name))
                    })
                    .collect();
                if let (true, Some(first)) = (dedup_on, keys.first()) {
                    if self.already_done(first, self.recent.digest(first))? {
                        self.shared.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                        if let Some((_, _, m)) = self.handlers.first() {
                            m.duplicate();
                        }
                        return done(deliveries, marks, state);
                    }
                    for k in &keys {
                        self.recent.insert(self.recent.digest(k));
                    }
                    marks = keys;
                }
                let names: Vec<&str> = self
                    .handlers
                    .iter()
                    .map(|(h, _, _)| h.name.as_str())
                    .collect();
                let versions: Vec<&str> = self
                    .handlers
                    .iter()
                    .map(|(h, _, _)| h.version.as_str())
                    .collect();
                let topic = self.handlers.first().map_or_else(
                    || deadletter::default_topic(&record.topic),
                    |(h, _, _)| h.config_entry.dead_letter_topic_of(&record.topic),
                );
                let handler = names.join(",");
                let cx = self.shared.tracing().start(&parent, || {
                    telemetry::consumer_span(record, None, &handler, &versions.join(","), group)
                });
                let correlation = record
                    .header_str(envelope::header::CORRELATION_ID)
                    .unwrap_or_default();
                let causation = record
                    .header_str(envelope::header::CAUSATION_ID)
                    .unwrap_or_default();
                let version = versions.join(",");
                let fields = EventFields {
                    cx: &cx,
                    handler: &handler,
                    version: &version,
                    event_id: &position,
                    correlation_id: &correlation,
                    causation_id: &causation,
                    record,
                };
                // Counted against the handler whose dead-letter topic takes it.
                let metrics = self
                    .handlers
                    .first()
                    .map(|(_, _, m)| m.clone())
                    .unwrap_or_default();
                Happened::DeadLettered {
                    kind: FailureKind::Undecodable,
                    reason: &undecodable.0,
                    attempts: 1,
                    dead_letter_topic: &topic,
                    took: None,
                }
                .emit(&fields, &metrics, &self.shared.stats);
                let now = OffsetDateTime::now_utc();
                let dl = DeadLetter {
                    record,
                    kind: FailureKind::Undecodable,
                    message: undecodable.0,
                    handler: handler.clone(),
                    handler_version: versions.join(","),
                    attempts: 1,
                    group_id: group,
                    first_failure: now,
                    last_failure: now,
                };
                deliveries.push(self.send_dead_letter(
                    dl,
                    topic,
                    &cx,
                    metrics.dead_letter_counter(),
                    &correlation,
                )?);
                telemetry::end(&cx);
                return done(deliveries, marks, state);
            }
        };
        if record.header(replay::REPLAY_HEADER).is_some() && event.id == record.position_id() {
            // A replayed event without an envelope id keeps its first one.
            event.id = replay::position_id(record);
        }
        // An event that starts a trace and goes to several handlers gets one
        // `receive` span over theirs, so it is one trace, not one per handler.
        let receive = (self.handlers.len() > 1
            && self.shared.tracing().enabled()
            && !opentelemetry::trace::TraceContextExt::span(&parent)
                .span_context()
                .is_valid())
        .then(|| {
            self.shared.tracing().start(&parent, || {
                let (_, kind, attributes) =
                    telemetry::consumer_span(record, Some(&event), "", "", group);
                (format!("receive {}", record.topic), kind, attributes)
            })
        });
        let parent = receive.clone().unwrap_or(parent);
        let mut routed = false;
        for i in 0..self.handlers.len() {
            self.refresh(i);
            let handler = self.handlers[i].0.clone();
            let metrics = self.handlers[i].2.clone();
            if !handler.config_entry.accepts(&event.event_type)
                || retry.is_some_and(|r| r.handler != handler.name)
            {
                continue;
            }
            routed = true;
            let cx = self.shared.tracing().start(&parent, || {
                telemetry::consumer_span(
                    record,
                    Some(&event),
                    &handler.name,
                    &handler.version,
                    group,
                )
            });
            let id = replay::dedup_id(&event.id, record, &handler.name);
            let key = dedup::key(&handler.name, &id);
            let digest = dedup_on.then(|| self.recent.digest(&key));
            let duplicate = match digest {
                Some(digest) => self.already_done(&key, digest)?,
                None => false,
            };
            if duplicate {
                Happened::Duplicate.emit(
                    &EventFields::of(&cx, &handler, &event, record),
                    &metrics,
                    &self.shared.stats,
                );
                continue;
            }
            // In topic retry mode, this attempt may already have been handed
            // on to the retry topic before a crash: one retry chain only.
            let consumed_attempt = retry.map_or(1, |r| r.attempt);
            let hop = (dedup_on && handler.config_entry.retry_mode == RetryMode::Topic)
                .then(|| dedup::key(&handler.name, &retry_topic::hop_id(&id, consumed_attempt)));
            let hop = hop.map(|hop| {
                let digest = self.recent.digest(&hop);
                (hop, digest)
            });
            if let Some((hop, digest)) = &hop {
                if self.already_done(hop, *digest)? {
                    Happened::RetryAlreadyScheduled {
                        attempt: consumed_attempt,
                    }
                    .emit(
                        &EventFields::of(&cx, &handler, &event, record),
                        &metrics,
                        &self.shared.stats,
                    );
                    continue;
                }
            }
            let started = Instant::now();
            self.throttled = Duration::ZERO;
            let verdict = self.call(i, &event, record, retry, &cx)?;
            // The version of the last attempt (a deploy may have come
            // between attempts) is the one the outcome names.
            let handler = self.handlers[i].0.clone();
            match &verdict {
                Verdict::Outputs(..) => self.outcome(i, true),
                Verdict::Failed { .. } => self.outcome(i, false),
                Verdict::Retry { .. } => {}
            }
            // Waiting for the fuel budget is throttling, not handling.
            let took = started.elapsed().saturating_sub(self.throttled);
            let fallback = |mark: Option<Vec<u8>>, attempts: u32, first_failure| {
                Arc::new(Fallback {
                    record: record_arc.clone(),
                    handler: handler.clone(),
                    metrics: metrics.clone(),
                    attempts,
                    first_failure,
                    correlation_id: event.correlation_id.clone(),
                    cx: cx.clone(),
                    mark,
                    used: AtomicBool::new(false),
                })
            };
            let final_key = dedup_on.then(|| key.clone());
            match (&verdict, hop) {
                (Verdict::Retry { .. }, Some((hop, digest))) => {
                    self.recent.insert(digest);
                    marks.push(hop);
                }
                (Verdict::Retry { .. }, None) => {}
                _ if dedup_on => {
                    self.recent
                        .insert(digest.expect("made when idempotency is on"));
                    marks.push(key);
                }
                _ => {}
            }
            match verdict {
                Verdict::Outputs(outputs, writes) => {
                    // Visible to the partition's next events at once; in the
                    // store with the event's mark.
                    if let Some(scope) = &self.scopes[i] {
                        self.overlay.put(&scope.handler, &writes, offset);
                    }
                    state.extend(writes);
                    let handled = Happened::Handled {
                        outputs: outputs.len(),
                        took,
                    };
                    // One fallback for all the call's outputs: the event is
                    // dead-lettered once, whichever of them is refused.
                    if !outputs.is_empty() {
                        // (An event from a retry topic: its failures began
                        // with its first attempt; otherwise at the refusal.)
                        let f = fallback(None, consumed_attempt, retry.map(|r| r.first_failure));
                        for mut o in outputs {
                            o.headers.push((
                                deadletter::header::HANDLER_VERSION.to_owned(),
                                handler.version.as_bytes().to_vec(),
                            ));
                            let (ack, span) =
                                self.send_for_event(&mut o, &cx, &event.correlation_id, None)?;
                            deliveries.push(Delivery {
                                ack,
                                span,
                                counter: metrics.output_counter(),
                                on_refused: OnRefused::DeadLetter(f.clone()),
                                output: true,
                            });
                        }
                    }
                    handled.emit(
                        &EventFields::of(&cx, &handler, &event, record),
                        &metrics,
                        &self.shared.stats,
                    );
                }
                Verdict::Retry {
                    attempt,
                    delay,
                    message,
                    first_failure,
                } => {
                    let topic = handler
                        .config_entry
                        .retry_topic_of(&record.topic)
                        .expect("topic retry mode has a retry topic");
                    let mut p = retry_topic::retry_record(
                        record,
                        &event.correlation_id,
                        &handler.name,
                        attempt,
                        delay,
                        first_failure,
                        topic.clone(),
                    );
                    let (ack, span) =
                        self.send_for_event(&mut p, &cx, &event.correlation_id, None)?;
                    deliveries.push(Delivery {
                        ack,
                        span,
                        counter: None,
                        on_refused: OnRefused::DeadLetter(fallback(
                            final_key,
                            attempt - 1,
                            Some(first_failure),
                        )),
                        output: false,
                    });
                    Happened::RetryScheduled {
                        attempt,
                        delay,
                        reason: &message,
                        retry_topic: &topic,
                        took,
                    }
                    .emit(
                        &EventFields::of(&cx, &handler, &event, record),
                        &metrics,
                        &self.shared.stats,
                    );
                }
                Verdict::Failed {
                    kind,
                    message,
                    attempts,
                    first_failure,
                } => {
                    let topic = handler.config_entry.dead_letter_topic_of(&record.topic);
                    Happened::DeadLettered {
                        kind,
                        reason: &message,
                        attempts,
                        dead_letter_topic: &topic,
                        took: Some(took),
                    }
                    .emit(
                        &EventFields::of(&cx, &handler, &event, record),
                        &metrics,
                        &self.shared.stats,
                    );
                    let dl = DeadLetter {
                        record,
                        kind,
                        message,
                        handler: handler.name.clone(),
                        handler_version: handler.version.clone(),
                        attempts,
                        group_id: group,
                        first_failure,
                        last_failure: OffsetDateTime::now_utc(),
                    };
                    deliveries.push(self.send_dead_letter(
                        dl,
                        topic,
                        &cx,
                        metrics.dead_letter_counter(),
                        &event.correlation_id,
                    )?);
                }
            }
            telemetry::end(&cx);
        }
        if let (false, Some(info)) = (routed, retry) {
            // The handler was renamed, removed or no longer takes this
            // event type: dead-letter rather than drop it.
            let message = format!(
                "retry record for handler {:?}, which no longer handles {} events of {}",
                info.handler, event.event_type, record.topic
            );
            let consumed = consumed.as_ref().unwrap_or(record);
            deliveries.push(self.dead_letter_unrouted(consumed, &parent, &message)?);
        }
        if let Some(cx) = receive {
            telemetry::end(&cx);
        }
        done(deliveries, marks, state)
    }
}
