//! Publishing: the producer every output, retry record and dead letter goes
//! through, and what a refusal means.
//!
//! Errors are classed as librdkafka reports them. Retriable ones (a broker
//! away, a leader moving, a timeout) are sent again until acknowledged.
//! Permanent ones (a record too large, a topic that does not exist or may
//! not be written, a policy violation) are handed back to the caller, which
//! dead-letters the event (`produce-failed`) or, for a dead letter itself,
//! stops the partition. A record refused for its size is first sent once
//! more on its own: a topic's size limit bounds a whole record batch, so the
//! small records that shared a batch with a large one are refused with it.
//! A fatal producer error halts the runtime.

use futures::FutureExt;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use opentelemetry::{Context as TraceContext, KeyValue};
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tracing::{error, warn};

use crate::config::Config;
use crate::envelope::{Produce, Record};
use crate::fence::Fence;
use crate::halt::Halt;
use crate::kafka::producer_config;
use crate::metrics::Metrics;
use crate::telemetry::{self, Tracing};

mod errors;

pub use errors::{classify, fenced_hint, refused_for_size, refused_in_transaction, ErrorClass};

/// The producer's context: every client error wakes the fatal-error
/// watch (librdkafka reports a fatal error with its underlying code).
pub struct PublishContext {
    errors: Arc<tokio::sync::Notify>,
}

impl ClientContext for PublishContext {
    fn error(&self, error: KafkaError, reason: &str) {
        warn!(error = %error, reason, "Kafka producer error");
        self.errors.notify_one();
    }
}

/// Halts the runtime once `producer` has a fatal error. Holds the producer
/// weakly: the watch ends with it.
fn watch_fatal(
    producer: std::sync::Weak<FutureProducer<PublishContext>>,
    errors: Arc<tokio::sync::Notify>,
    halt: Halt,
    transactional_id: Option<String>,
) {
    tokio::spawn(async move {
        loop {
            errors.notified().await;
            let Some(producer) = producer.upgrade() else {
                return;
            };
            if let Some((code, reason)) = producer.client().fatal_error() {
                halt.halt_now(format!(
                    "the Kafka producer hit a fatal error ({code:?}): {reason}{}",
                    fenced_hint(code, transactional_id.as_deref())
                ));
                return;
            }
        }
    });
}

/// A record handed to the producer, or refused before it was sent.
pub enum Ack {
    Pending(DeliveryFuture),
    Refused(String),
    /// Exactly-once: held by the worker until the event's records are
    /// sent together (the index in its outbox).
    Held(usize),
}

/// How a record ended.
pub enum Acked {
    Yes,
    /// Refused for good, with the broker's (or producer's) reason.
    Refused(String),
    /// Given up on: cancelled, or the runtime is halting.
    Abandoned,
    /// Exactly-once: the delivery failed, so its transaction aborts
    /// (`permanent`: sending it again would fail the same way).
    Failed {
        reason: String,
        permanent: bool,
        /// Refused for its batch's size (maybe a batch-mate's fault).
        size: bool,
    },
}

/// The producers of one runtime.
#[derive(Clone)]
pub struct Publisher {
    producer: Arc<FutureProducer<PublishContext>>,
    /// Sends one record per request, for records refused for their size
    /// (at-least-once only: in exactly-once mode every record goes through
    /// the transactional producer).
    solo: Option<Arc<FutureProducer<PublishContext>>>,
    halt: Halt,
    metrics: Option<Arc<Metrics>>,
    /// Exactly-once: the producer refused a record because its transaction
    /// cannot take more (an abortable error, or no transaction open).
    unusable: Arc<std::sync::atomic::AtomicBool>,
}

/// How long to wait before enqueueing again into a full producer queue.
pub const QUEUE_FULL_WAIT: Duration = Duration::from_millis(5);

impl Publisher {
    pub fn new(config: &Config, halt: Halt, metrics: Option<Arc<Metrics>>) -> Result<Self> {
        let transactional = config.delivery.exactly_once();
        let create = |solo: bool| -> Result<Arc<FutureProducer<PublishContext>>> {
            let mut c = producer_config(config);
            if transactional {
                let timeout = config.delivery.transaction_timeout_ms;
                c.set("transactional.id", config.delivery.transactional_id()?)
                    .set("transaction.timeout.ms", timeout.to_string());
                // A record for a topic that does not exist fails (for good)
                // well before a commit gives up on it, so its event can be
                // dead-lettered instead of aborting every transaction.
                let user = |key: &str| {
                    config.kafka.producer_options.contains_key(key)
                        || config.kafka.options.contains_key(key)
                };
                if !user("topic.metadata.propagation.max.ms") {
                    c.set(
                        "topic.metadata.propagation.max.ms",
                        (timeout / 4).max(1000).to_string(),
                    );
                }
                // After a commit the coordinator answers "concurrent
                // transactions" until the markers are written; librdkafka
                // waits `retry.backoff.ms` (100 ms) before asking again,
                // which made every commit take ~110 ms here; 10 ms: ~4 ms
                // (docs/benchmarks.md). Later retries still back off
                // exponentially (up to `retry.backoff.max.ms`).
                if !user("retry.backoff.ms") {
                    c.set("retry.backoff.ms", "10");
                }
            }
            if solo {
                // Rarely used: a small queue.
                c.set("batch.num.messages", "1")
                    .set("linger.ms", "0")
                    .set("queue.buffering.max.kbytes", "4096");
            }
            let errors = Arc::new(tokio::sync::Notify::new());
            let producer: Arc<FutureProducer<PublishContext>> = Arc::new(
                c.create_with_context(PublishContext {
                    errors: errors.clone(),
                })
                .context("cannot create the Kafka producer")?,
            );
            let id = transactional
                .then(|| config.delivery.transactional_id().ok())
                .flatten();
            watch_fatal(Arc::downgrade(&producer), errors, halt.clone(), id);
            Ok(producer)
        };
        let producer = create(false)?;
        let solo = if transactional {
            None
        } else {
            Some(create(true)?)
        };
        Ok(Self {
            producer,
            solo,
            halt,
            metrics,
            unusable: Default::default(),
        })
    }

    /// The producer (transactional in exactly-once mode).
    pub fn producer(&self) -> &Arc<FutureProducer<PublishContext>> {
        &self.producer
    }

    pub fn halt(&self) -> &Halt {
        &self.halt
    }

    /// Enqueues a record into the open transaction, waiting while the
    /// producer's queue is full, without a fence: for a caller that holds
    /// the partition's fence. None once the transaction cannot take it
    /// (ended, aborting, or the runtime halts).
    pub fn send_fenced(&self, p: &Produce, ended: impl Fn() -> bool) -> Option<Ack> {
        loop {
            match self.enqueue(&self.producer, p) {
                Ok(ack) => return Some(ack),
                Err(_) if self.halt.reason().is_some() || self.unusable() || ended() => {
                    return None
                }
                Err(wait) => std::thread::sleep(wait),
            }
        }
    }

    /// Exactly-once: the producer said its transaction takes no more records.
    pub fn unusable(&self) -> bool {
        self.unusable.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn produce_error(&self) {
        if let Some(m) = &self.metrics {
            m.produce_errors.inc();
        }
    }

    /// Enqueues a record, waiting while the producer's queue is full. None
    /// when the partition's fence is closed. For worker threads.
    pub fn send(&self, p: &Produce, fence: &Fence) -> Option<Ack> {
        loop {
            match fence.pass(|| self.enqueue(&self.producer, p))? {
                Ok(ack) => return Some(ack),
                Err(wait) => std::thread::sleep(wait),
            }
        }
    }

    /// [`Publisher::send`] for async tasks, on the producer given.
    async fn send_async(
        &self,
        producer: &FutureProducer<PublishContext>,
        p: &Produce,
        fence: &Fence,
    ) -> Option<Ack> {
        loop {
            match fence.pass(|| self.enqueue(producer, p))? {
                Ok(ack) => return Some(ack),
                Err(wait) => tokio::time::sleep(wait).await,
            }
        }
    }

    /// Sends a record from an async task: None when the fence is closed.
    pub async fn send_now(&self, p: &Produce, fence: &Fence) -> Option<Ack> {
        self.send_async(&self.producer, p, fence).await
    }

    /// One attempt to enqueue a record to a given partition, without a
    /// trace or a fallback (the changelogs; no payload: a tombstone): its delivery, None
    /// when refused for good (logged and counted), or how long to wait
    /// before the next attempt.
    pub fn enqueue_to_partition(
        &self,
        topic: &str,
        partition: i32,
        key: &[u8],
        payload: Option<&[u8]>,
    ) -> Result<Option<DeliveryFuture>, Duration> {
        let mut record = FutureRecord::<[u8], [u8]>::to(topic)
            .partition(partition)
            .key(key);
        if let Some(payload) = payload {
            record = record.payload(payload);
        }
        match self.producer.send_result(record) {
            Ok(d) => Ok(Some(d)),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                Err(QUEUE_FULL_WAIT)
            }
            Err((e, _)) => {
                self.produce_error();
                match classify(&e) {
                    ErrorClass::Retriable => Err(Duration::from_millis(100)),
                    ErrorClass::Fatal => {
                        self.halt
                            .halt_now(format!("the Kafka producer hit a fatal error: {e}"));
                        Err(Duration::from_millis(100))
                    }
                    ErrorClass::Permanent => {
                        error!(topic, partition, error = %e, "a record was refused for good");
                        Ok(None)
                    }
                }
            }
        }
    }

    /// One attempt to enqueue a record: the ack, or how long to wait before
    /// the next attempt.
    fn enqueue(
        &self,
        producer: &FutureProducer<PublishContext>,
        p: &Produce,
    ) -> Result<Ack, Duration> {
        let mut headers = OwnedHeaders::new_with_capacity(p.headers.len());
        for (k, v) in &p.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let mut record = FutureRecord::to(&p.topic)
            .payload(&p.value)
            .headers(headers);
        if let Some(k) = &p.key {
            record = record.key(k);
        }
        match producer.send_result(record) {
            Ok(d) => Ok(Ack::Pending(d)),
            // The producer's queue drains as the broker acknowledges.
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                Err(QUEUE_FULL_WAIT)
            }
            Err((e, _)) => {
                self.produce_error();
                match classify(&e) {
                    ErrorClass::Permanent => Ok(Ack::Refused(e.to_string())),
                    ErrorClass::Fatal => {
                        self.halt
                            .halt_now(format!("the Kafka producer hit a fatal error: {e}"));
                        Err(Duration::from_millis(100))
                    }
                    ErrorClass::Retriable
                        if self.solo.is_none()
                            && e.rdkafka_error_code() == Some(RDKafkaErrorCode::State) =>
                    {
                        // The transaction cannot take records: it aborts.
                        self.unusable
                            .store(true, std::sync::atomic::Ordering::SeqCst);
                        Err(Duration::from_millis(100))
                    }
                    ErrorClass::Retriable => {
                        error!(topic = %p.topic, error = %e, "cannot enqueue a record; retrying");
                        Err(Duration::from_millis(100))
                    }
                }
            }
        }
    }

    /// Waits for one record's acknowledgement, sending it again while the
    /// broker refuses it for a reason that can pass.
    pub async fn acknowledged(
        &self,
        ack: Ack,
        fence: &Fence,
        span: Option<&TraceContext>,
    ) -> Acked {
        let mut delivery = match ack {
            Ack::Pending(d) => d,
            Ack::Refused(reason) => return refused(span, reason),
            Ack::Held(_) => unreachable!("a held record is sent before it is awaited"),
        };
        let mut backoff = Duration::from_millis(100);
        let mut sent_alone = false;
        loop {
            // Most acknowledgements have come by the time they are awaited:
            // no timer for those.
            let ready = (&mut delivery).now_or_never();
            let outcome = if let Some(r) = ready {
                r
            } else {
                loop {
                    tokio::select! {
                        r = &mut delivery => break r,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {
                            if fence.is_closed() || self.halt.reason().is_some() {
                                return gave_up(span);
                            }
                        }
                    }
                }
            };
            let (err, msg) = match outcome {
                Ok(Ok(_)) => return Acked::Yes,
                Ok(Err((err, msg))) => (err, msg),
                // The producer is gone: shutting down.
                Err(_) => return gave_up(span),
            };
            self.produce_error();
            if let Some(span) = span {
                telemetry::event(span, || {
                    (
                        "produce error",
                        vec![KeyValue::new("error", err.to_string())],
                    )
                });
            }
            let class = classify(&err);
            if self.solo.is_none() && class != ErrorClass::Fatal {
                // In a transaction, a failed delivery fails the transaction:
                // sending the record again would not save it.
                if let Some(span) = span {
                    telemetry::fail(span, "produce-failed", &err.to_string());
                }
                return Acked::Failed {
                    reason: err.to_string(),
                    permanent: refused_in_transaction(&err),
                    size: refused_for_size(&err),
                };
            }
            let producer = match class {
                ErrorClass::Fatal => {
                    let reason = self
                        .producer
                        .client()
                        .fatal_error()
                        .map_or_else(|| err.to_string(), |(_, r)| r);
                    self.halt
                        .halt_now(format!("the Kafka producer hit a fatal error: {reason}"));
                    return gave_up(span);
                }
                ErrorClass::Permanent if refused_for_size(&err) && !sent_alone => {
                    // Maybe refused for a batch-mate: once more, alone.
                    sent_alone = true;
                    self.solo.as_ref().unwrap_or(&self.producer)
                }
                ErrorClass::Permanent => {
                    warn!(topic = msg.topic(), error = %err, "a record was refused for good");
                    return refused(span, err.to_string());
                }
                ErrorClass::Retriable => {
                    error!(topic = msg.topic(), error = %err,
                        "a record could not be published; the partition waits and retries (nothing is committed past it)");
                    if fence.is_closed() {
                        return gave_up(span);
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    &self.producer
                }
            };
            let again = Record::from_message(&msg);
            let produce = Produce {
                topic: again.topic,
                key: again.key,
                value: again.value,
                headers: again.headers,
            };
            match self.send_async(producer, &produce, fence).await {
                Some(Ack::Pending(d)) => delivery = d,
                Some(Ack::Refused(reason)) => return refused(span, reason),
                Some(Ack::Held(_)) | None => return gave_up(span),
            }
        }
    }
}

fn refused(span: Option<&TraceContext>, reason: String) -> Acked {
    if let Some(span) = span {
        telemetry::fail(span, "produce-failed", &reason);
    }
    Acked::Refused(reason)
}

/// Marks a producer span whose record was given up on (it is redelivered
/// with its event).
fn gave_up(span: Option<&TraceContext>) -> Acked {
    if let Some(span) = span {
        telemetry::fail(span, "not-acknowledged", "given up at shutdown or revoke");
    }
    Acked::Abandoned
}

/// Starts the producer span of a record sent on behalf of the span in `cx`
/// and writes its context into the record's headers, so whoever consumes
/// the record continues the trace.
pub fn publish_span(
    tracing: &Tracing,
    cx: &TraceContext,
    p: &mut Produce,
    correlation_id: &str,
    dead_letter_reason: Option<&str>,
) -> Option<TraceContext> {
    let span = tracing.start(cx, || {
        telemetry::producer_span(p, correlation_id, dead_letter_reason)
    });
    tracing.inject(&span, &mut p.headers);
    tracing.enabled().then_some(span)
}

#[cfg(test)]
mod tests;
