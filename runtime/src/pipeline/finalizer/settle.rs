//! One record's delivery settled for its event: awaited (sent again while
//! the broker cannot take it), and on a refusal for good what the event
//! needs instead: a `produce-failed` dead letter, or a stop of the
//! partition when the dead letter itself is refused.

use super::*;

impl Finalizer {
    /// Awaits one record; on a refusal for good, does what its event needs.
    pub(in crate::pipeline) async fn settle(&self, delivery: Delivery) -> Settled {
        let shared = &self.shared;
        match shared
            .publisher
            .acknowledged(delivery.ack, &self.fence, delivery.span.as_ref())
            .await
        {
            Acked::Yes => {
                // Exactly-once counts them when their transaction commits.
                if shared.txn.is_none() {
                    if delivery.output {
                        shared.stats.outputs.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Some(c) = delivery.counter {
                        c.inc();
                    }
                }
                if let Some(span) = delivery.span {
                    telemetry::end(&span);
                }
                Settled::Done(None)
            }
            Acked::Abandoned => Settled::Abandoned,
            Acked::Failed {
                reason,
                permanent,
                size,
            } => {
                if let Some(span) = &delivery.span {
                    telemetry::end(span);
                }
                Settled::Failed {
                    reason,
                    permanent,
                    size,
                }
            }
            Acked::Refused(reason) => {
                if let Some(span) = &delivery.span {
                    telemetry::end(span);
                }
                match delivery.on_refused {
                    OnRefused::Stop(topic) => Settled::Stop(format!(
                        "the dead-letter topic {topic} refused a record for good: {reason}"
                    )),
                    OnRefused::DeadLetter(f) => {
                        if f.used.swap(true, Ordering::SeqCst) {
                            return Settled::Done(None);
                        }
                        let Some(d) = self.dead_letter(&f, &reason).await else {
                            return Settled::Abandoned;
                        };
                        match Box::pin(self.settle(d)).await {
                            Settled::Done(_) => Settled::Done(f.mark.clone()),
                            other => other,
                        }
                    }
                }
            }
        }
    }

    /// The dead letter of an event one of whose records was refused.
    /// None when cancelled before it was enqueued.
    pub(in crate::pipeline) async fn dead_letter(
        &self,
        f: &Fallback,
        reason: &str,
    ) -> Option<Delivery> {
        let (produce, span, topic) = produce_failed(&self.shared, f, reason);
        let ack = self
            .shared
            .publisher
            .send_now(&produce, &self.fence)
            .await?;
        Some(Delivery {
            ack,
            span,
            counter: f.metrics.dead_letter_counter(),
            on_refused: OnRefused::Stop(topic),
            output: false,
        })
    }
}

/// The `produce-failed` dead letter of an event one of whose records was
/// refused (logged and counted): the record, its span and its topic.
pub(in crate::pipeline) fn produce_failed(
    shared: &Shared,
    f: &Fallback,
    reason: &str,
) -> (Produce, Option<TraceContext>, String) {
    let h = &f.handler;
    let topic = h.config_entry.dead_letter_topic_of(&f.record.topic);
    let message = format!("the broker refused a record of this event for good: {reason}");
    // The event's ids, for the log line (this path is rare: decode again).
    let (event_id, causation_id) = match envelope::decode(&f.record) {
        Ok(e) => (e.id, e.causation_id.unwrap_or_default()),
        Err(_) => (f.record.position_id(), String::new()),
    };
    let fields = EventFields {
        cx: &f.cx,
        handler: &h.name,
        version: &h.version,
        event_id: &event_id,
        correlation_id: &f.correlation_id,
        causation_id: &causation_id,
        record: &f.record,
    };
    Happened::DeadLettered {
        kind: FailureKind::ProduceFailed,
        reason: &message,
        attempts: f.attempts,
        dead_letter_topic: &topic,
        took: None,
    }
    .emit(&fields, &f.metrics, &shared.stats);
    let now = OffsetDateTime::now_utc();
    let dl = DeadLetter {
        record: &f.record,
        kind: FailureKind::ProduceFailed,
        message,
        handler: h.name.clone(),
        handler_version: h.version.clone(),
        attempts: f.attempts,
        group_id: &shared.config.kafka.group_id,
        first_failure: f.first_failure.unwrap_or(now),
        last_failure: now,
    };
    let mut produce = dl.into_produce(topic.clone());
    let span = publish_span(
        shared.tracing(),
        &f.cx,
        &mut produce,
        &f.correlation_id,
        Some(FailureKind::ProduceFailed.name()),
    );
    shared.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
    (produce, span, topic)
}

/// How one record's delivery ended for its event.
pub(in crate::pipeline) enum Settled {
    /// Acknowledged (or dead-lettered instead): maybe one more key to mark.
    Done(Option<Vec<u8>>),
    /// A dead letter was refused for good.
    Stop(String),
    /// Cancelled or halting.
    Abandoned,
    /// Exactly-once: the delivery failed, so its transaction aborts.
    Failed {
        reason: String,
        permanent: bool,
        size: bool,
    },
}
