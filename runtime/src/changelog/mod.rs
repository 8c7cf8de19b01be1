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
//!
//! The handlers' state has a changelog of its own beside it
//! (`<group>.weir-state`, `cleanup.policy=compact`: a record per written
//! key, keyed by its store key, a tombstone for a delete; compaction keeps
//! the latest value of each key for as long as it lives). It is restored
//! with the marks, from the same partition number.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use rdkafka::admin::{NewTopic, TopicReplication};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::config::Config;
use crate::dedup::Dedup;
use crate::fence::Fence;
use crate::kafka::{client_config, create_topics};
use crate::metrics::{Health, Metrics};
use crate::publish::Publisher;
use crate::state::{StateStore, Write};
use rdkafka::producer::DeliveryFuture;

/// A state checkpoint older than this is not trusted: the tombstones after
/// it may be gone from the compacted topic (`delete.retention.ms` is a day
/// by default), so the partition's state is restored from the start.
const STATE_CHECKPOINT_MAX_AGE_MS: u64 = 20 * 3600 * 1000;

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
    /// The state changelog and its partition count.
    state_topic: String,
    state_partitions: i32,
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

mod restore;

pub use restore::Restored;

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
        let state_topic = config.state_topic();
        let state_partitions = match partitions_of(&client, &state_topic)? {
            Some(n) => n,
            None => {
                create_state(config, &state_topic, partitions).await?;
                partitions_of(&client, &state_topic)?.ok_or_else(|| {
                    anyhow!("the state changelog topic {state_topic} was created but is not in the metadata")
                })?
            }
        };
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
            state_topic,
            state_partitions,
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
            publisher.enqueue_to_partition(&self.topic, target, key.as_bytes(), Some(&payload))?;
        if delivery.is_none() {
            self.error();
        }
        Ok(delivery)
    }

    /// The state changelog topic.
    pub fn state_topic(&self) -> &str {
        &self.state_topic
    }

    /// The state changelog partition of input partition `partition`.
    pub fn state_partition_of(&self, partition: i32) -> i32 {
        partition.rem_euclid(self.state_partitions)
    }

    /// Enqueues one state write (of input partition `partition`): its
    /// delivery (None when refused for good, counted), or how long to wait
    /// before trying again.
    pub fn write_state(
        &self,
        publisher: &Publisher,
        partition: i32,
        write: &Write,
    ) -> Result<Option<DeliveryFuture>, Duration> {
        let target = self.state_partition_of(partition);
        let delivery = publisher.enqueue_to_partition(
            &self.state_topic,
            target,
            &write.key,
            write.value.as_deref(),
        )?;
        if delivery.is_none() {
            self.error();
        }
        Ok(delivery)
    }

    /// Counts a state delivery that failed.
    pub fn state_delivered(
        &self,
        result: &rdkafka::producer::future_producer::OwnedDeliveryResult,
    ) {
        if let Err((e, m)) = result {
            error!(topic = %self.state_topic, partition = m.partition(), error = %e,
                "a state write was not written to the changelog; another instance taking the partition would not see it");
            self.error();
        }
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

/// Creates the compacted state changelog topic.
async fn create_state(config: &Config, topic: &str, partitions: i32) -> Result<()> {
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(-1))
        .set("cleanup.policy", "compact");
    let results = create_topics(config, &[new])
        .await
        .with_context(|| format!("cannot create the state changelog topic {topic}"))?;
    for (t, r) in results {
        match r {
            Ok(()) => info!(topic = %t, partitions, "created the state changelog topic"),
            Err(RDKafkaErrorCode::TopicAlreadyExists) => {}
            Err(e) => bail!(
                "cannot create the state changelog topic {t}: {e} (create it with \
                 cleanup.policy=compact, or set idempotency.changelog = false to keep state \
                 local to each instance)"
            ),
        }
    }
    Ok(())
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
mod tests;
