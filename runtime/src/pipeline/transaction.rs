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
use rdkafka::consumer::{Consumer, ConsumerGroupMetadata, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::producer::Producer;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use super::group::WeirContext;
use super::offsets::Offsets;
use super::suspects::{Suspects, Treatment};
use super::Stats;
use super::TopicPartition;
use crate::changelog::Changelog;
use crate::dedup::Dedup;
use crate::metrics::{Health, Metrics};
use crate::publish::{fenced_hint, Publisher, QUEUE_FULL_WAIT};
use crate::state::{Overlay, StateStore, Write};
use rdkafka::producer::DeliveryFuture;

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
    consumer: OnceLock<Weak<StreamConsumer<WeirContext>>>,
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

    pub(super) fn set_consumer(&self, consumer: &Arc<StreamConsumer<WeirContext>>) {
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

    /// Commits the open transaction (nothing to do: true at once). False
    /// when it aborted or the runtime halts.
    pub(super) fn commit(&self) -> bool {
        // Taken before the locks: the consumer is never dropped under them.
        let cgm = self.group_metadata();
        let mut state = self.lock_state();
        let waited = Instant::now();
        let _gate = self.gate.write().unwrap_or_else(PoisonError::into_inner);
        debug!(
            ms = waited.elapsed().as_millis() as u64,
            "transaction gate taken"
        );
        self.commit_locked(&mut state, cgm.as_ref())
    }

    fn commit_locked(&self, state: &mut State, cgm: Option<&ConsumerGroupMetadata>) -> bool {
        if state.ended || !state.open {
            return false;
        }
        let doomed = self
            .doomed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(reason) = doomed {
            self.abort(state, &reason);
            return false;
        }
        let started = Instant::now();
        // The gate is held: no event is finished meanwhile (an offset
        // deferred meanwhile is above every finished one).
        let mut offsets = TopicPartitionList::new();
        let mut marks: Vec<(i32, Vec<Vec<u8>>)> = Vec::new();
        // Per partition: its state writes, its overlay, its last event.
        let mut writes_of: Vec<PartWrites> = Vec::new();
        let mut events = 0;
        {
            let mut parts = self.lock_parts();
            for ((topic, partition), part) in parts.iter_mut() {
                events += part.events;
                if !part.state.is_empty() {
                    writes_of.push(PartWrites {
                        tp: (topic.clone(), *partition),
                        writes: std::mem::take(&mut part.state),
                        overlay: part.overlay.clone(),
                        last: part.last,
                        deliveries: Vec::new(),
                    });
                }
                if let Some(o) = part.offsets.storable() {
                    if let Err(e) =
                        offsets.add_partition_offset(topic, *partition, Offset::Offset(o + 1))
                    {
                        error!(topic, partition, error = %e, "cannot list an offset");
                    }
                }
                if !part.marks.is_empty() {
                    marks.push((*partition, part.marks.iter().cloned().collect()));
                }
            }
        }
        let sent = self.sent.swap(false, Ordering::Relaxed);
        if !sent && offsets.count() == 0 && marks.is_empty() && writes_of.is_empty() {
            return true;
        }
        let at = crate::dedup::now_ms();
        let producer = self.publisher.producer();
        let result = (|| {
            self.write_changelog(&marks, at)?;
            self.write_state_changelog(&mut writes_of)?;
            if offsets.count() > 0 {
                let Some(cgm) = cgm else {
                    return Err(Failure::Abort(
                        "the consumer has no group metadata (not in the group)".into(),
                    ));
                };
                self.call("send the offsets to the transaction", || {
                    producer.send_offsets_to_transaction(&offsets, cgm, self.timeout)
                })?;
            }
            let offsets_ms = started.elapsed().as_millis() as u64;
            // The records' acknowledgements first: rust-rdkafka's flush
            // inside the commit polls the event queue in steps of 100 ms
            // that its polling thread wins, so every commit with a record
            // outstanding took 100 ms more (docs/benchmarks.md).
            let until = Instant::now() + self.timeout;
            while producer.in_flight_count() > 0 && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(1));
            }
            self.call("commit the transaction", || {
                producer.commit_transaction(self.timeout)
            })?;
            debug!(
                offsets_ms,
                commit_ms = started.elapsed().as_millis() as u64 - offsets_ms,
                "transaction steps"
            );
            Ok(())
        })();
        match result {
            Ok(()) => {}
            Err(Failure::Abort(reason)) => {
                self.abort(state, &reason);
                return false;
            }
            Err(Failure::Fatal(reason)) => {
                self.fatal(state, reason);
                return false;
            }
        }
        let took = started.elapsed();
        if let Some(m) = &self.metrics {
            m.transactions.with_label_values(&["committed"]).inc();
            m.transaction_seconds.observe(took.as_secs_f64());
        }
        debug!(
            partitions = offsets.count(),
            ms = took.as_millis() as u64,
            "transaction committed"
        );
        if let Some(dedup) = &self.dedup {
            let keys = marks.iter().flat_map(|(_, k)| k.iter().map(Vec::as_slice));
            let writes: Vec<&Write> = writes_of.iter().flat_map(|p| &p.writes).collect();
            let retire: Vec<(&Overlay, i64)> = writes_of
                .iter()
                .filter_map(|p| Some((p.overlay.as_deref()?, p.last)))
                .collect();
            let mut backoff = Duration::from_millis(50);
            let mut written = false;
            for attempt in 1..=5 {
                // The state writes in the same write batch as the marks.
                let result = match self.state_store.get() {
                    Some(s) if !writes.is_empty() => s.persist(keys.clone(), at, &writes, &retire),
                    _ => dedup.mark_at(keys.clone(), at),
                };
                let Err(e) = result else {
                    written = true;
                    break;
                };
                // They are in the changelog, restored with the partition.
                error!(error = %format!("{e:#}"), attempt, "committed marks not written to the local store");
                std::thread::sleep(backoff);
                backoff *= 2;
            }
            if !written && !writes.is_empty() {
                // Later events would read the state as it was before this
                // transaction: the pipeline rewinds, and its partitions'
                // state is restored from the changelog.
                self.fail(
                    "the committed state writes could not be written to the local store".into(),
                );
            }
            if let (true, Some(state), Some(changelog)) =
                (written, self.state_store.get(), self.changelog.get())
            {
                self.state_checkpoints(state, changelog, &mut writes_of);
            }
        }
        let mut outputs = 0;
        for part in self.lock_parts().values_mut() {
            part.marks.clear();
            part.events = 0;
            for c in part.counted.drain(..) {
                c.inc();
            }
            outputs += std::mem::take(&mut part.outputs);
        }
        self.stats.events_final.fetch_add(events, Ordering::Relaxed);
        self.stats.outputs.fetch_add(outputs, Ordering::Relaxed);
        match self.call("begin a transaction", || producer.begin_transaction()) {
            Ok(()) => true,
            Err(Failure::Abort(reason)) => {
                self.abort(state, &reason);
                false
            }
            Err(Failure::Fatal(reason)) => {
                self.fatal(state, reason);
                false
            }
        }
    }

    /// Enqueues the marks of the transaction's events to the changelog
    /// (their deliveries are part of the commit).
    fn write_changelog(&self, marks: &[(i32, Vec<Vec<u8>>)], at: u64) -> Result<(), Failure> {
        let Some(changelog) = self.changelog.get() else {
            return Ok(());
        };
        for (partition, keys) in marks {
            for chunk in keys.chunks(MARKS_PER_RECORD) {
                loop {
                    let keys = chunk.iter().map(Vec::as_slice);
                    match changelog.write(&self.publisher, *partition, keys, at) {
                        // Refused for good: logged and counted; the marks
                        // stay in this instance's store.
                        Ok(_) => break,
                        Err(_) if self.publisher.halt().reason().is_some() => {
                            return Err(Failure::Fatal("halting".into()));
                        }
                        // The producer's queue drains as the broker answers.
                        Err(wait) if wait == QUEUE_FULL_WAIT => std::thread::sleep(wait),
                        Err(_) => {
                            return Err(Failure::Abort(
                                "cannot write the idempotency changelog".into(),
                            ))
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Enqueues the state writes of the transaction's events to the state
    /// changelog, the last of each key (part of the commit).
    fn write_state_changelog(&self, state: &mut [PartWrites]) -> Result<(), Failure> {
        let Some(changelog) = self.changelog.get() else {
            return Ok(());
        };
        for part in state {
            let mut last: HashMap<&[u8], &Write> = HashMap::new();
            for w in &part.writes {
                last.insert(&w.key, w);
            }
            for w in last.into_values() {
                loop {
                    match changelog.write_state(&self.publisher, part.tp.1, w) {
                        Ok(Some(d)) => {
                            part.deliveries.push(d);
                            break;
                        }
                        // Refused for good: the store must not hold what
                        // the changelog does not.
                        Ok(None) => {
                            return Err(Failure::Abort(
                                "a state write was refused by the state changelog".into(),
                            ))
                        }
                        Err(_) if self.publisher.halt().reason().is_some() => {
                            return Err(Failure::Fatal("halting".into()));
                        }
                        Err(wait) if wait == QUEUE_FULL_WAIT => std::thread::sleep(wait),
                        Err(_) => {
                            return Err(Failure::Abort("cannot write the state changelog".into()))
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// After a commit: each partition's state checkpoint moves past its
    /// committed state records (a restore here reads only what is newer).
    fn state_checkpoints(
        &self,
        state: &StateStore,
        changelog: &Changelog,
        parts: &mut [PartWrites],
    ) {
        use futures::FutureExt;
        for part in parts {
            let next = part
                .deliveries
                .drain(..)
                .filter_map(|d| match d.now_or_never() {
                    Some(Ok(Ok(delivered))) => Some(delivered.offset + 1),
                    _ => None,
                })
                .max();
            if let Some(next) = next {
                let topic = changelog.state_topic();
                if let Err(e) = state.set_checkpoint(topic, &part.tp.0, part.tp.1, next) {
                    warn!(error = %format!("{e:#}"), "cannot keep the state checkpoint");
                }
            }
        }
    }

    /// Runs one transactional call, again while it fails with a retriable
    /// error (a few times).
    fn call(&self, what: &str, f: impl Fn() -> KafkaResult<()>) -> Result<(), Failure> {
        let mut backoff = Duration::from_millis(100);
        let mut attempt = 1;
        loop {
            let err = match f() {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            let (fatal, retriable) = match &err {
                KafkaError::Transaction(t) => (t.is_fatal(), t.is_retriable()),
                _ => (false, false),
            };
            if fatal {
                let hint = err
                    .rdkafka_error_code()
                    .map(|c| fenced_hint(c, Some(&self.id)))
                    .unwrap_or_default();
                return Err(Failure::Fatal(format!("cannot {what}: {err}{hint}")));
            }
            if retriable && attempt <= RETRIES {
                warn!(error = %err, attempt, "cannot {what}; retrying");
                std::thread::sleep(backoff);
                backoff *= 2;
                attempt += 1;
                continue;
            }
            return Err(Failure::Abort(format!("cannot {what}: {err}")));
        }
    }

    /// No transaction is open any more: what is sent now cannot commit.
    pub(super) fn ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    /// Aborts the open transaction; the pipeline rewinds.
    fn abort(&self, state: &mut State, reason: &str) {
        state.ended = true;
        self.ended.store(true, Ordering::SeqCst);
        state.open = false;
        warn!(
            reason,
            "transaction aborted: its events are handled again from the committed offsets"
        );
        if let Some(m) = &self.metrics {
            m.transactions.with_label_values(&["aborted"]).inc();
        }
        if let Err(e) = self.publisher.producer().abort_transaction(self.timeout) {
            let fatal = matches!(&e, KafkaError::Transaction(t) if t.is_fatal());
            if fatal {
                self.fatal(state, format!("cannot abort the transaction: {e}"));
                return;
            }
            // The next producer with this id aborts it when it starts.
            error!(error = %e, "cannot abort the transaction");
        }
        self.health.set_problem(
            PROBLEM,
            format!("a transaction aborted ({reason}); rewinding to the committed offsets"),
        );
        self.rewind.send_replace(Some(reason.to_owned()));
    }

    fn fatal(&self, state: &mut State, reason: String) {
        state.ended = true;
        self.ended.store(true, Ordering::SeqCst);
        state.open = false;
        self.publisher.halt().halt_now(reason);
    }

    /// Commits every commit interval (sooner when a transaction is doomed)
    /// until `stop`, on its own thread.
    pub(super) fn spawn_committer(
        self: &Arc<Self>,
        stop: Arc<AtomicBool>,
    ) -> std::thread::JoinHandle<()> {
        let txn = self.clone();
        std::thread::Builder::new()
            .name("weir-transactions".into())
            .spawn(move || {
                let halt = txn.publisher.halt().clone();
                let run = std::panic::AssertUnwindSafe(|| txn.commit_every(&stop));
                if let Err(panic) = std::panic::catch_unwind(run) {
                    halt.halt(format!(
                        "the transaction committer panicked: {}",
                        crate::halt::panic_text(panic.as_ref())
                    ));
                }
            })
            .expect("spawning the committer thread")
    }

    fn commit_every(&self, stop: &AtomicBool) {
        let txn = self;
        loop {
            {
                let (lock, cvar) = &txn.wake;
                let woken = lock.lock().unwrap_or_else(PoisonError::into_inner);
                let (mut woken, _) = cvar
                    .wait_timeout_while(woken, txn.interval, |w| !*w)
                    .unwrap_or_else(PoisonError::into_inner);
                *woken = false;
            }
            if stop.load(Ordering::SeqCst) || txn.lock_state().ended {
                return;
            }
            txn.commit();
        }
    }

    /// Stops the committer thread.
    pub(super) fn stop_committer(&self, stop: &AtomicBool) {
        stop.store(true, Ordering::SeqCst);
        self.poke();
    }
}
