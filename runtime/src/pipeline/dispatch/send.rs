//! What an outcome sends: a record through the partition's fence (once,
//! for the finalizer to await), and the dead letter of a record no handler
//! can take.

use super::*;

impl PartitionWorker {
    /// Dead-letters a record no handler can take.
    pub(in crate::pipeline) fn dead_letter_unrouted(
        &mut self,
        record: &Record,
        parent: &TraceContext,
        message: &str,
    ) -> Option<Delivery> {
        let topic = self
            .shared
            .retry_topics
            .get(&record.topic)
            .cloned()
            .unwrap_or_else(|| deadletter::default_topic(&record.topic));
        let group = self.shared.config.kafka.group_id.clone();
        let cx = self.shared.tracing().start(parent, || {
            telemetry::consumer_span(record, None, "", "", &group)
        });
        let (position, correlation, causation) = (
            record.position_id(),
            record
                .header_str(envelope::header::CORRELATION_ID)
                .unwrap_or_default(),
            record
                .header_str(envelope::header::CAUSATION_ID)
                .unwrap_or_default(),
        );
        let fields = EventFields {
            cx: &cx,
            handler: "",
            version: "",
            event_id: &position,
            correlation_id: &correlation,
            causation_id: &causation,
            record,
        };
        Happened::Unroutable {
            reason: message,
            dead_letter_topic: &topic,
        }
        .emit(&fields, &Default::default(), &self.shared.stats);
        let now = OffsetDateTime::now_utc();
        let dl = DeadLetter {
            record,
            kind: FailureKind::Undecodable,
            message: message.to_owned(),
            handler: String::new(),
            handler_version: String::new(),
            attempts: 1,
            group_id: &group,
            first_failure: now,
            last_failure: now,
        };
        let counter = self.shared.obs.metrics.as_ref().map(|m| m.unrouted());
        let d = self.send_dead_letter(dl, topic, &cx, counter, "");
        telemetry::end(&cx);
        d
    }

    /// Gives a record sent for an event its producer span (and trace
    /// headers), then enqueues it: the acknowledgement and the span the
    /// finalizer awaits. None when cancelled.
    pub(in crate::pipeline) fn send_for_event(
        &self,
        p: &mut Produce,
        cx: &TraceContext,
        correlation_id: &str,
        dead_letter_reason: Option<&str>,
    ) -> Option<(Ack, Option<TraceContext>)> {
        let span = publish_span(
            self.shared.tracing(),
            cx,
            p,
            correlation_id,
            dead_letter_reason,
        );
        if self.shared.txn.is_some() {
            return Some((self.hold(p), span));
        }
        Some((self.shared.publisher.send(p, &self.fence)?, span))
    }

    /// Publishes a dead letter (its acknowledgement makes the event final).
    pub(in crate::pipeline) fn send_dead_letter(
        &self,
        dl: DeadLetter<'_>,
        topic: String,
        cx: &TraceContext,
        counter: Option<IntCounter>,
        correlation_id: &str,
    ) -> Option<Delivery> {
        let kind = dl.kind;
        let mut produce = dl.into_produce(topic.clone());
        self.shared
            .stats
            .dead_lettered
            .fetch_add(1, Ordering::Relaxed);
        let (ack, span) =
            self.send_for_event(&mut produce, cx, correlation_id, Some(kind.name()))?;
        Some(Delivery {
            ack,
            span,
            counter,
            on_refused: OnRefused::Stop(topic),
            output: false,
        })
    }
}
