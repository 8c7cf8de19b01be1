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

    /// Restores into `dedup` the marks of input partition `partition`'s
    /// changelog partition that it does not have yet, and into `state` the
    /// state of input partition `topic`/`partition` from its state
    /// changelog partition (the records of other input partitions there
    /// are not touched: one of them may be this instance's and newer in
    /// its store than in the topic), retrying until done (the partition is
    /// reported in `health` while a restore fails); None when `stop`
    /// (revoke, shutdown) or the fence ended it first. What was restored
    /// before a stop is kept, with its checkpoint.
    pub fn restore(
        &self,
        dedup: &Dedup,
        state: Option<&StateStore>,
        (topic, partition): (&str, i32),
        fence: &Fence,
        stop: &AtomicBool,
        health: &Health,
    ) -> Option<Restored> {
        let target = self.partition_of(partition);
        let _one = self.restoring[target as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let started = Instant::now();
        let marks = self.retrying(&self.topic, target, fence, stop, health, || {
            self.try_restore_marks(dedup, target, fence, stop)
        })?;
        let took = started.elapsed();
        if let Some(m) = &self.metrics {
            m.restore_seconds.observe(took.as_secs_f64());
            m.restored_marks.inc_by(marks);
        }
        info!(topic = %self.topic, partition = target, marks, ms = took.as_millis() as u64,
            "idempotency marks restored");
        let mut r = Restored {
            partition: target,
            marks,
            state_writes: 0,
            took,
            state_took: Duration::ZERO,
        };
        if let Some(state) = state {
            let started = Instant::now();
            let target = self.state_partition_of(partition);
            r.state_writes =
                self.retrying(&self.state_topic, target, fence, stop, health, || {
                    self.try_restore_state(state, topic, partition, fence, stop)
                })?;
            r.state_took = started.elapsed();
            if let Some(m) = &self.metrics {
                m.state_restore_seconds.observe(r.state_took.as_secs_f64());
            }
            if r.state_writes > 0 {
                info!(topic = %self.state_topic, partition = target, writes = r.state_writes,
                    ms = r.state_took.as_millis() as u64, "handler state restored");
            }
        }
        Some(r)
    }

    /// Runs one restore until it succeeds: what it restored, None when
    /// stopped.
    fn retrying(
        &self,
        topic: &str,
        target: i32,
        fence: &Fence,
        stop: &AtomicBool,
        health: &Health,
        mut attempt: impl FnMut() -> Result<Option<u64>>,
    ) -> Option<u64> {
        let problem = format!("changelog {topic}/{target}");
        let mut backoff = Duration::from_millis(200);
        loop {
            match attempt() {
                Ok(done) => {
                    health.clear_problem(&problem);
                    return done;
                }
                Err(e) => {
                    self.error();
                    error!(topic, partition = target, error = %format!("{e:#}"),
                        "cannot restore from the changelog; the partition waits and retries");
                    health.set_problem(
                        &problem,
                        format!("cannot restore {problem} (its input partitions wait): {e:#}"),
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

    /// One attempt at the marks: how many were restored, None when fenced
    /// off.
    fn try_restore_marks(
        &self,
        dedup: &Dedup,
        target: i32,
        fence: &Fence,
        stop: &AtomicBool,
    ) -> Result<Option<u64>> {
        let from = |low: i64, high: i64| -> Result<i64> {
            // A checkpoint past the end: the topic was recreated; read it all.
            Ok(match dedup.checkpoint(&self.topic, target)? {
                Some(c) if c <= high => c.max(low),
                _ => low,
            })
        };
        let mut marks = 0u64;
        let apply = |m: &BorrowedMessage<'_>| -> Result<()> {
            let Some(payload) = m.payload() else {
                return Ok(());
            };
            match rmp_serde::from_slice::<MarkBatch>(payload) {
                Ok(batch) => {
                    dedup.mark_at(batch.keys.iter().map(|k| k.as_slice()), batch.at)?;
                    marks += batch.keys.len() as u64;
                }
                Err(e) => {
                    warn!(topic = %self.topic, partition = target, offset = m.offset(),
                        error = %e, "a changelog record that is not a batch of marks is skipped")
                }
            }
            Ok(())
        };
        let done = self.replay(
            (&self.topic, target),
            |next| dedup.set_checkpoint(&self.topic, target, next),
            fence,
            stop,
            from,
            apply,
            || Ok(()),
        )?;
        Ok(done.map(|()| marks))
    }

    /// One attempt at the state of input partition `input`/`partition`:
    /// how many writes were applied, None when fenced off.
    fn try_restore_state(
        &self,
        state: &StateStore,
        input: &str,
        partition: i32,
        fence: &Fence,
        stop: &AtomicBool,
    ) -> Result<Option<u64>> {
        let topic = &self.state_topic;
        let target = self.state_partition_of(partition);
        // One checkpoint per input partition (they may share a changelog
        // partition, each restored when it is assigned), in the state's
        // column family: it does not expire.
        let from = |low: i64, high: i64| -> Result<i64> {
            match state.checkpoint(topic, input, partition)? {
                Some((c, at))
                    if c <= high
                        && at.saturating_add(STATE_CHECKPOINT_MAX_AGE_MS)
                            >= crate::dedup::now_ms() =>
                {
                    Ok(c.max(low))
                }
                None => Ok(low),
                // Recreated, or too old to trust: from the start, over a
                // clean slate.
                Some(_) => {
                    self.clear_state(state, input, partition)?;
                    Ok(low)
                }
            }
        };
        let mut applied = 0u64;
        let pending = std::cell::RefCell::new(Vec::<Write>::new());
        let flush = &|| -> Result<()> {
            let mut p = pending.borrow_mut();
            if !p.is_empty() {
                state.persist([], 0, &p.iter().collect::<Vec<_>>(), &[])?;
                p.clear();
            }
            Ok(())
        };
        let apply = |m: &BorrowedMessage<'_>| -> Result<()> {
            let Some(key) = m.key() else { return Ok(()) };
            let Some((_, t, p, _)) = crate::state::split_key(key) else {
                return Ok(());
            };
            if t != input || p != partition {
                return Ok(());
            }
            // A value that expired meanwhile is stored as it is: reads
            // do not see it, and the worker's sweep deletes it, with a
            // tombstone in the changelog.
            pending.borrow_mut().push(Write {
                key: key.to_vec(),
                value: m.payload().map(<[u8]>::to_vec),
                delta: 0,
            });
            applied += 1;
            if pending.borrow().len() >= 1000 {
                flush()?;
            }
            Ok(())
        };
        let done = self.replay(
            (topic, target),
            |next| state.set_checkpoint(topic, input, partition, next),
            fence,
            stop,
            from,
            apply,
            flush,
        )?;
        Ok(done.map(|()| applied))
    }

    /// Deletes from the store the state of input partition
    /// `input`/`partition` (of every handler).
    fn clear_state(&self, state: &StateStore, input: &str, partition: i32) -> Result<()> {
        let dedup = state.dedup();
        let mut deletes = Vec::new();
        for item in dedup
            .db()
            .iterator_cf(dedup.state_cf(), rocksdb::IteratorMode::Start)
        {
            let (k, _) = item.context("reading the state store")?;
            if crate::state::split_key(&k).is_some_and(|(_, t, p, _)| t == input && p == partition)
            {
                deletes.push(Write {
                    key: k.to_vec(),
                    value: None,
                    delta: 0,
                });
            }
        }
        warn!(
            topic = input,
            partition,
            keys = deletes.len(),
            "the local state of this partition is restored from the changelog's start"
        );
        state.persist([], 0, &deletes.iter().collect::<Vec<_>>(), &[])
    }

    /// Reads `topic`/`target` from where `from` says (given the low and
    /// high watermarks) to its end, applying each record, then `flush`, and
    /// keeps the checkpoint (with `set_checkpoint`); None when fenced off
    /// or stopped.
    #[allow(clippy::too_many_arguments)]
    fn replay(
        &self,
        (topic, target): (&str, i32),
        set_checkpoint: impl Fn(i64) -> Result<()>,
        fence: &Fence,
        stop: &AtomicBool,
        from: impl FnOnce(i64, i64) -> Result<i64>,
        mut apply: impl FnMut(&BorrowedMessage<'_>) -> Result<()>,
        flush: impl Fn() -> Result<()>,
    ) -> Result<Option<()>> {
        let consumer: BaseConsumer = self
            .client
            .create()
            .context("cannot create the changelog consumer")?;
        let (low, high) = consumer
            .fetch_watermarks(topic, target, Duration::from_secs(10))
            .context("cannot read the changelog's offsets")?;
        let from = from(low, high)?;
        if from >= high {
            set_checkpoint(high)?;
            return Ok(Some(()));
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, target, Offset::Offset(from))?;
        consumer.assign(&tpl)?;
        let mut next = from;
        let mut idle = Instant::now();
        let mut last_checkpoint = Instant::now();
        let checkpoint = |next: i64| -> Result<()> {
            flush()?;
            set_checkpoint(next)
        };
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
                        tpl.find_partition(topic, target)
                            .and_then(|e| e.offset().to_raw())
                    })
                    .unwrap_or(next);
                if at >= high || t.elapsed() >= self.open_transaction_wait {
                    break;
                }
            }
            if fence.is_closed() || stop.load(Ordering::SeqCst) {
                // Kept for the next restore of this partition, here.
                checkpoint(next)?;
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
                    apply(&m)?;
                    if last_checkpoint.elapsed() > Duration::from_secs(1) {
                        checkpoint(next)?;
                        last_checkpoint = Instant::now();
                    }
                }
            }
        }
        checkpoint(next)?;
        Ok(Some(()))
    }
}

/// What one restore did.
#[derive(Debug)]
pub struct Restored {
    pub partition: i32,
    pub marks: u64,
    /// State records applied (writes and deletes).
    pub state_writes: u64,
    /// How long the marks took.
    pub took: Duration,
    /// How long the state took, after the marks.
    pub state_took: Duration,
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
