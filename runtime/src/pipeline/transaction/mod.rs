//! Exactly-once mode: one transactional producer per instance, one Kafka
//! transaction per commit interval.
//!
//! A partition's worker sends the records of one event together, inside
//! the transaction gate (a shared lock) and its partition's fence, and in
//! the same pass notes here the event's offset and idempotency marks. A
//! commit takes the gate exclusively, so each event is either wholly in the
//! transaction or not in it at all; it writes the marks to the changelog,
//! adds the final input offsets to the transaction with the consumer
//! group's metadata (KIP-447: a member the group has fenced cannot commit),
//! commits, writes the marks to the local store and begins the next
//! transaction. Errors are taken by librdkafka's classes: a retriable one
//! is tried again; one that needs an abort aborts, and the pipeline rewinds
//! (it is rebuilt, and its partitions start again from their committed
//! offsets: the handlers may run twice, their effects appear once); a fatal
//! one (a newer instance with the same transactional id) halts the runtime.
//!
//! A record the broker refuses for good (e.g. larger than its topic
//! allows) fails its whole transaction, and librdkafka cannot say which of
//! a batch's records was at fault. The events whose records were refused
//! become suspects: the next time, each is sent in a transaction of its
//! own; one refused alone is dead-lettered (`produce-failed`) instead; one
//! whose dead letter is refused alone stops its partition.
//!
//! Every call here blocks: callers are the committer thread, the worker
//! threads, the rebalance callback and a blocking task at shutdown.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError, RwLock, RwLockReadGuard, Weak};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use prometheus::IntCounter;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::producer::Producer;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use super::consumer::{GroupConsumer, TopicPartition};
use super::offsets::Offsets;
use super::stats::Stats;
use super::suspects::{Suspects, Treatment};
use crate::changelog::Changelog;
use crate::dedup::Dedup;
use crate::metrics::{Health, Metrics};
use crate::publish::{fenced_hint, Publisher, QUEUE_FULL_WAIT};
use crate::state::{Overlay, StateStore, Write};
use rdkafka::producer::DeliveryFuture;

mod commit;

/// The `/readyz` problem of a failing transaction.
const PROBLEM: &str = "transaction";

/// Marks per changelog record (as the finalizer batches them).
const MARKS_PER_RECORD: usize = 512;

/// Times a transactional call that failed with a retriable error is tried
/// again.
const RETRIES: u32 = 5;

/// How a transactional call failed.
enum Failure {
    /// The transaction must be aborted (its events are handled again).
    Abort(String),
    /// The producer cannot go on: the runtime halts.
    Fatal(String),
}

/// A partition's state writes in a commit.
struct PartWrites {
    tp: TopicPartition,
    writes: Vec<Write>,
    overlay: Option<Arc<Overlay>>,
    /// The offset of its last event in the transaction.
    last: i64,
    /// The deliveries of its state records (their offsets make the
    /// partition's state checkpoint once committed).
    deliveries: Vec<DeliveryFuture>,
}

/// One partition's part of the open transaction.
#[derive(Default)]
struct Part {
    offsets: Offsets,
    /// Idempotency keys of the events finished in the open transaction.
    marks: HashSet<Vec<u8>>,
    /// Events finished in the open transaction.
    events: u64,
    /// The handlers' output and dead-letter counters of their records,
    /// counted when the transaction commits.
    counted: Vec<IntCounter>,
    /// Outputs in the open transaction (the pipeline's progress count).
    outputs: u64,
    /// The handlers' state writes of those events, in order.
    state: Vec<Write>,
    /// The partition's writes in flight, dropped once in the store.
    overlay: Option<Arc<Overlay>>,
    /// The last event finished in the open transaction.
    last: i64,
}

#[derive(Default)]
struct State {
    /// A transaction is open (after `init`, between commits).
    open: bool,
    /// Aborted or halted: nothing more is committed by this pipeline.
    ended: bool,
}

/// The transactions of one pipeline.
pub(super) struct Transactions {
    publisher: Publisher,
    id: String,
    /// For each transactional call.
    timeout: Duration,
    interval: Duration,
    dedup: Option<Arc<Dedup>>,
    state_store: OnceLock<Arc<StateStore>>,
    changelog: OnceLock<Arc<Changelog>>,
    /// The consumer whose group metadata goes with the offsets (weak: the
    /// consumer's context holds this).
    consumer: OnceLock<Weak<dyn GroupConsumer>>,
    metrics: Option<Arc<Metrics>>,
    health: Arc<Health>,
    suspects: Arc<Suspects>,
    /// Counts the events of each committed transaction as final.
    stats: Arc<Stats>,
    gate: RwLock<()>,
    state: Mutex<State>,
    parts: Mutex<HashMap<TopicPartition, Part>>,
    /// Records were sent since the last commit.
    sent: AtomicBool,
    /// `init_transactions` succeeded.
    registered: AtomicBool,
    /// Aborted or halted (as `State::ended`, readable without the lock a
    /// commit holds).
    ended: AtomicBool,
    /// Why the open transaction must abort (a failed delivery, lost
    /// partitions); the committer thread aborts it.
    doomed: Mutex<Option<String>>,
    /// Wakes the committer thread early (a doomed transaction, a stop).
    wake: (Mutex<bool>, Condvar),
    /// Set, with the reason, once a transaction is aborted: the pipeline
    /// rewinds.
    rewind: watch::Sender<Option<String>>,
}

impl Transactions {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        publisher: Publisher,
        id: String,
        timeout: Duration,
        interval: Duration,
        dedup: Option<Arc<Dedup>>,
        metrics: Option<Arc<Metrics>>,
        health: Arc<Health>,
        stats: Arc<Stats>,
    ) -> Self {
        Self {
            publisher,
            id,
            timeout,
            interval,
            dedup,
            state_store: OnceLock::new(),
            changelog: OnceLock::new(),
            consumer: OnceLock::new(),
            metrics,
            health,
            suspects: stats.suspects.clone(),
            stats,
            gate: RwLock::new(()),
            state: Mutex::new(State::default()),
            parts: Mutex::new(HashMap::new()),
            sent: AtomicBool::new(false),
            registered: AtomicBool::new(false),
            ended: AtomicBool::new(false),
            doomed: Mutex::new(None),
            wake: (Mutex::new(false), Condvar::new()),
            rewind: watch::channel(None).0,
        }
    }

    pub(super) fn set_state(&self, state: Arc<StateStore>) {
        let _ = self.state_store.set(state);
    }

    pub(super) fn set_changelog(&self, changelog: Arc<Changelog>) {
        let _ = self.changelog.set(changelog);
    }

    pub(super) fn set_consumer(&self, consumer: &Arc<dyn GroupConsumer>) {
        let _ = self.consumer.set(Arc::downgrade(consumer));
    }

    fn group_metadata(&self) -> Option<ConsumerGroupMetadata> {
        self.consumer.get()?.upgrade()?.group_metadata()
    }

    /// Resolves once a transaction was aborted, with the reason.
    pub(super) fn rewound(&self) -> watch::Receiver<Option<String>> {
        self.rewind.subscribe()
    }

    /// Registers the transactional id with the broker (fencing any earlier
    /// producer with the same id and aborting what it left open) and opens
    /// the first transaction. Blocking.
    pub(super) fn init(&self) -> Result<()> {
        let producer = self.publisher.producer();
        // Once registered, a retry only begins (librdkafka refuses a second
        // registration).
        if !self.registered.load(Ordering::SeqCst) {
            if let Err(e) = producer.init_transactions(self.timeout) {
                bail!("cannot start the transactional producer {:?}: {e}", self.id);
            }
            self.registered.store(true, Ordering::SeqCst);
        }
        if let Err(e) = producer.begin_transaction() {
            bail!("cannot begin a transaction: {e}");
        }
        self.lock_state().open = true;
        self.health.clear_problem(PROBLEM);
        info!(transactional_id = %self.id, "exactly-once: transactional producer ready");
        Ok(())
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_parts(&self) -> std::sync::MutexGuard<'_, HashMap<TopicPartition, Part>> {
        self.parts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Held by a worker while it sends one event's records.
    pub(super) fn gate(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The gate, unless a commit holds it or waits for it.
    pub(super) fn try_gate(&self) -> Option<RwLockReadGuard<'_, ()>> {
        match self.gate.try_read() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// A retry record held until due: its offset is final later.
    pub(super) fn defer(&self, tp: &TopicPartition, offset: i64) {
        self.lock_parts()
            .entry(tp.clone())
            .or_default()
            .offsets
            .defer(offset);
    }

    /// An event's records are in the open transaction (called with the
    /// gate held).
    pub(super) fn finished(
        &self,
        tp: &TopicPartition,
        offset: i64,
        marks: Vec<Vec<u8>>,
        (state, overlay): (Vec<Write>, &Arc<Overlay>),
        counted: Vec<IntCounter>,
        outputs: u64,
    ) {
        let mut parts = self.lock_parts();
        let part = parts.entry(tp.clone()).or_default();
        part.offsets.finish(offset);
        part.marks.extend(marks);
        if !state.is_empty() {
            part.state.extend(state);
            part.overlay.get_or_insert_with(|| overlay.clone());
        }
        part.last = offset;
        part.events += 1;
        part.counted.extend(counted);
        part.outputs += outputs;
        self.sent.store(true, Ordering::Relaxed);
    }

    /// Whether `key` was marked by an event of the open transaction.
    pub(super) fn marked(&self, tp: &TopicPartition, key: &[u8]) -> bool {
        self.lock_parts()
            .get(tp)
            .is_some_and(|p| p.marks.contains(key))
    }

    /// Drops what is noted of partitions given up (after their commit).
    pub(super) fn forget<'a>(&self, tps: impl IntoIterator<Item = &'a TopicPartition>) {
        let mut parts = self.lock_parts();
        for tp in tps {
            parts.remove(tp);
            // Should it come back, a stopped partition is tried again.
            self.suspects.forget_partition(tp);
        }
    }

    /// How the worker sends the event at `offset`.
    pub(super) fn treatment(&self, tp: &TopicPartition, offset: i64) -> Treatment {
        self.suspects.get(tp, offset)
    }

    /// A record of the event at `offset` was refused for good (`size`: for
    /// its batch's size): the open transaction aborts and the event is
    /// sent differently next time.
    pub(super) fn refused(&self, tp: &TopicPartition, offset: i64, reason: &str, size: bool) {
        self.note_refused(tp, offset, reason, size, false);
        self.fail(format!(
            "a record of {}/{} offset {offset} was refused: {reason}",
            tp.0, tp.1
        ));
    }

    /// Notes that a record of the event at `offset` was refused for good.
    pub(super) fn note_refused(
        &self,
        tp: &TopicPartition,
        offset: i64,
        reason: &str,
        size: bool,
        alone: bool,
    ) {
        let next = self.suspects.refused(tp, offset, size, alone);
        warn!(topic = %tp.0, partition = tp.1, offset, reason, next = ?next,
            "a record of this event was refused for good: the transaction aborts, and the event is sent differently next time");
    }

    /// The open transaction cannot commit: the committer aborts it.
    pub(super) fn fail(&self, reason: String) {
        let mut doomed = self.doomed.lock().unwrap_or_else(PoisonError::into_inner);
        if doomed.is_none() {
            *doomed = Some(reason);
        }
        drop(doomed);
        self.poke();
    }

    fn poke(&self) {
        let (lock, cvar) = &self.wake;
        *lock.lock().unwrap_or_else(PoisonError::into_inner) = true;
        cvar.notify_all();
    }

    /// Runs `send` (which sends an event's records and notes it finished)
    /// in a transaction of its own: what is open is committed first, and
    /// the event's transaction right after. False when that failed (the
    /// transaction aborted).
    pub(super) fn alone(
        &self,
        tp: &TopicPartition,
        offset: i64,
        send: impl FnOnce() -> bool,
    ) -> bool {
        // Taken before the locks: the consumer is never dropped under them.
        let cgm = self.group_metadata();
        let mut state = self.lock_state();
        let _gate = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        if !self.commit_locked(&mut state, cgm.as_ref()) {
            return false;
        }
        if !send() {
            return false;
        }
        let ok = self.commit_locked(&mut state, cgm.as_ref());
        if ok {
            self.suspects.cleared(tp, offset);
        }
        ok
    }
}
