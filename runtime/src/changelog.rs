//! The idempotency changelog: the marks of a consumer group, in a topic,
//! so they follow their partitions from instance to instance.
//!
//! Each instance keeps its marks in its own RocksDB store (a cache). Every
//! batch of marks a partition's finalizer writes there is also published,
//! as one record, to partition `p mod N` of the group's changelog topic
//! (`<group>.weir-idempotency`, N partitions), where `p` is the input
//! partition. When an instance is assigned a partition, its worker first
//! reads that changelog partition from where this store last stopped (a
//! checkpoint in the store; its start for a new store) to the end, then
//! handles the partition's first event: every mark the previous owner
//! published is known before any of its events is handled again.
//!
//! Marks are written once and expire after `idempotency.retention_secs`,
//! so the topic is `cleanup.policy=delete` with that `retention.ms`:
//! Kafka's retention drops a mark from the changelog when it expires from
//! the stores. (Compaction would not: every key is new.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use rdkafka::admin::{NewTopic, TopicReplication};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::config::Config;
use crate::dedup::Dedup;
use crate::fence::Fence;
use crate::kafka::{client_config, create_topics};
use crate::metrics::{Health, Metrics};
use crate::publish::Publisher;
use rdkafka::producer::DeliveryFuture;

/// One changelog record: the marks of one finalizer batch, as read.
#[derive(Deserialize)]
struct MarkBatch {
    /// When they were marked (ms since the epoch).
    at: u64,
    keys: Vec<serde_bytes::ByteBuf>,
}

/// The same record as written, borrowing the keys (no copy per mark).
#[derive(Serialize)]
struct MarkBatchOut<'a> {
    at: u64,
    keys: Vec<&'a serde_bytes::Bytes>,
}

/// The changelog topic of one pipeline.
pub struct Changelog {
    topic: String,
    partitions: i32,
    /// Options of the restore consumer (brokers, security).
    client: ClientConfig,
    /// One lock per changelog partition: two input partitions that share
    /// one restore it once.
    restoring: Vec<Mutex<()>>,
    metrics: Option<Arc<Metrics>>,
    /// How long a restore waits at the end of the committed records for
    /// the rest (exactly-once: an open transaction's timeout and a second;
    /// at-least-once: not at all).
    open_transaction_wait: Duration,
}

/// The changelog topic's name for `config`.
pub fn topic_name(config: &Config) -> String {
    config.changelog_topic()
}

impl Changelog {
    /// Finds the changelog topic, creating it (delete policy, the marks'
    /// retention, as many partitions as the most partitioned topic
    /// consumed) when it is missing. Fails naming the topic when it can
    /// neither be found nor created.
    pub async fn open(config: &Config, metrics: Option<Arc<Metrics>>) -> Result<Changelog> {
        let topic = topic_name(config);
        let client = client_config(config, &Default::default());
        let consumed = config.topics();
        let partitions = match partitions_of(&client, &topic)? {
            Some(n) => n,
            None => {
                let most = consumed
                    .iter()
                    .map(|t| partitions_of(&client, t))
                    .collect::<Result<Vec<_>>>()?
                    .into_iter()
                    .flatten()
                    .max()
                    .unwrap_or(1);
                create(config, &topic, most).await?;
                partitions_of(&client, &topic)?.ok_or_else(|| {
                    anyhow!("the idempotency changelog topic {topic} was created but is not in the metadata")
                })?
            }
        };
        info!(topic = %topic, partitions, "idempotency changelog");
        let mut restore = client.clone();
        // A group id librdkafka wants for `assign`; it never joins nor commits.
        restore
            .set(
                "group.id",
                format!("{}.weir-restore", config.kafka.group_id),
            )
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest");
        Ok(Changelog {
            topic,
            partitions,
            client: restore,
            restoring: (0..partitions).map(|_| Mutex::new(())).collect(),
            metrics,
            open_transaction_wait: if config.delivery.exactly_once() {
                Duration::from_millis(config.delivery.transaction_timeout_ms + 1000)
            } else {
                Duration::ZERO
            },
        })
    }

    /// The changelog partition of input partition `partition`.
    pub fn partition_of(&self, partition: i32) -> i32 {
        partition.rem_euclid(self.partitions)
    }

    /// Enqueues one batch of marks (of input partition `partition`): its
    /// delivery (None when there was nothing to write or the record was
    /// refused for good, counted), or how long to wait before trying again.
    pub fn write<'a>(
        &self,
        publisher: &Publisher,
        partition: i32,
        keys: impl Iterator<Item = &'a [u8]>,
        at: u64,
    ) -> Result<Option<DeliveryFuture>, Duration> {
        let batch = MarkBatchOut {
            at,
            keys: keys.map(serde_bytes::Bytes::new).collect(),
        };
        if batch.keys.is_empty() {
            return Ok(None);
        }
        let payload = rmp_serde::to_vec_named(&batch).expect("marks encode");
        let target = self.partition_of(partition);
        let key = partition.to_string();
        let delivery =
            publisher.enqueue_to_partition(&self.topic, target, key.as_bytes(), &payload)?;
        if delivery.is_none() {
            self.error();
        }
        Ok(delivery)
    }

    /// Counts a delivery that failed (the marks it carried are only in this
    /// instance's store).
    pub fn delivered(&self, result: &rdkafka::producer::future_producer::OwnedDeliveryResult) {
        if let Err((e, m)) = result {
            error!(topic = %self.topic, partition = m.partition(), error = %e,
                "idempotency marks not written to the changelog; another instance may handle these events again");
            self.error();
        }
    }

    fn error(&self) {
        if let Some(m) = &self.metrics {
            m.kafka_errors.with_label_values(&["changelog"]).inc();
        }
    }

    /// Restores into `dedup` the marks of input partition `partition`'s
    /// changelog partition that it does not have yet, retrying until done
    /// (the partition is reported in `health` while a restore fails); None
    /// when `stop` (revoke, shutdown) or the fence ended it first. What
    /// was restored before a stop is kept, with its checkpoint.
    pub fn restore(
        &self,
        dedup: &Dedup,
        partition: i32,
        fence: &Fence,
        stop: &AtomicBool,
        health: &Health,
    ) -> Option<Restored> {
        let problem = format!("changelog {}/{}", self.topic, self.partition_of(partition));
        let target = self.partition_of(partition);
        let _one = self.restoring[target as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let started = Instant::now();
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.try_restore(dedup, target, fence, stop) {
                Ok(Some(marks)) => {
                    health.clear_problem(&problem);
                    let r = Restored {
                        partition: target,
                        marks,
                        took: started.elapsed(),
                    };
                    if let Some(m) = &self.metrics {
                        m.restore_seconds.observe(r.took.as_secs_f64());
                        m.restored_marks.inc_by(marks);
                    }
                    info!(topic = %self.topic, partition = target, marks, ms = r.took.as_millis() as u64,
                        "idempotency marks restored");
                    return Some(r);
                }
                Ok(None) => {
                    health.clear_problem(&problem);
                    return None;
                }
                Err(e) => {
                    self.error();
                    error!(topic = %self.topic, partition = target, error = %format!("{e:#}"),
                        "cannot restore idempotency marks; the partition waits and retries");
                    health.set_problem(
                        &problem,
                        format!(
                            "cannot restore the idempotency marks of {problem} (partition {partition} waits): {e:#}"
                        ),
                    );
                    let until = Instant::now() + backoff;
                    while Instant::now() < until {
                        if stop.load(Ordering::SeqCst) || !fence.sleep(Duration::from_millis(50)) {
                            health.clear_problem(&problem);
                            return None;
                        }
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// One attempt: the marks restored, None when fenced off.
    fn try_restore(
        &self,
        dedup: &Dedup,
        target: i32,
        fence: &Fence,
        stop: &AtomicBool,
    ) -> Result<Option<u64>> {
        let consumer: BaseConsumer = self
            .client
            .create()
            .context("cannot create the changelog consumer")?;
        let (low, high) = consumer
            .fetch_watermarks(&self.topic, target, Duration::from_secs(10))
            .context("cannot read the changelog's offsets")?;
        // A checkpoint past the end: the topic was recreated; read it all.
        let from = match dedup.checkpoint(&self.topic, target)? {
            Some(c) if c <= high => c.max(low),
            _ => low,
        };
        if from >= high {
            dedup.set_checkpoint(&self.topic, target, high)?;
            return Ok(Some(0));
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, target, Offset::Offset(from))?;
        consumer.assign(&tpl)?;
        let mut next = from;
        let mut marks = 0u64;
        let mut idle = Instant::now();
        let mut last_checkpoint = Instant::now();
        // Reading committed records only, the end is where committed ones
        // stop: below another instance's open transaction (exactly-once)
        // the committed records after it wait for it to end, which takes
        // at most its timeout.
        let mut end_since: Option<Instant> = None;
        while next < high {
            if let Some(t) = end_since {
                let at = consumer
                    .position()
                    .ok()
                    .and_then(|tpl| {
                        tpl.find_partition(&self.topic, target)
                            .and_then(|e| e.offset().to_raw())
                    })
                    .unwrap_or(next);
                if at >= high || t.elapsed() >= self.open_transaction_wait {
                    break;
                }
            }
            if fence.is_closed() || stop.load(Ordering::SeqCst) {
                // Kept for the next restore of this partition, here.
                dedup.set_checkpoint(&self.topic, target, next)?;
                return Ok(None);
            }
            match consumer.poll(Duration::from_millis(200)) {
                None => {
                    if idle.elapsed() > Duration::from_secs(30) {
                        bail!("no changelog record for 30 s at offset {next} (end {high})");
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) => {
                    end_since.get_or_insert_with(Instant::now);
                }
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(m)) => {
                    idle = Instant::now();
                    next = m.offset() + 1;
                    let Some(payload) = m.payload() else { continue };
                    match rmp_serde::from_slice::<MarkBatch>(payload) {
                        Ok(batch) => {
                            dedup.mark_at(batch.keys.iter().map(|k| k.as_slice()), batch.at)?;
                            marks += batch.keys.len() as u64;
                            if last_checkpoint.elapsed() > Duration::from_secs(1) {
                                dedup.set_checkpoint(&self.topic, target, next)?;
                                last_checkpoint = Instant::now();
                            }
                        }
                        Err(e) => {
                            warn!(topic = %self.topic, partition = target, offset = m.offset(),
                            error = %e, "a changelog record that is not a batch of marks is skipped")
                        }
                    }
                }
            }
        }
        dedup.set_checkpoint(&self.topic, target, next)?;
        Ok(Some(marks))
    }
}

/// What one restore did.
#[derive(Debug)]
pub struct Restored {
    pub partition: i32,
    pub marks: u64,
    pub took: Duration,
}

/// The partition count of `topic`, None when it does not exist.
fn partitions_of(client: &ClientConfig, topic: &str) -> Result<Option<i32>> {
    let consumer: BaseConsumer = client.create().context("cannot create a metadata client")?;
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .with_context(|| format!("cannot read the metadata of {topic}"))?;
    Ok(md
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty())
        .map(|t| t.partitions().len() as i32))
}

async fn create(config: &Config, topic: &str, partitions: i32) -> Result<()> {
    let retention = (config.idempotency.retention_secs.saturating_mul(1000)).to_string();
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(-1))
        .set("cleanup.policy", "delete")
        .set("retention.ms", &retention);
    let results = create_topics(config, &[new])
        .await
        .with_context(|| format!("cannot create the idempotency changelog topic {topic}"))?;
    for (t, r) in results {
        match r {
            Ok(()) => {
                info!(topic = %t, partitions, retention_ms = %retention, "created the idempotency changelog topic")
            }
            Err(RDKafkaErrorCode::TopicAlreadyExists) => {}
            Err(e) => bail!(
                "cannot create the idempotency changelog topic {t}: {e} (create it, or set \
                 idempotency.changelog = false to keep marks local to each instance)"
            ),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_of_marks_round_trips() {
        let key = crate::dedup::key("h", "e-1");
        let batch = MarkBatchOut {
            at: 42,
            keys: vec![serde_bytes::Bytes::new(&key)],
        };
        let bytes = rmp_serde::to_vec_named(&batch).unwrap();
        let back: MarkBatch = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back.at, 42);
        assert_eq!(back.keys[0].as_slice(), b"h\0e-1");
    }
}
