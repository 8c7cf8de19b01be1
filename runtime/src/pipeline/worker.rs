//! A partition's worker thread: takes its records in offset order (a retry
//! partition holds each record until it is due), runs them through the
//! handlers and hands what they produced to the finalizer.

use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{debug, error, info};

use std::cell::RefCell;

use super::consumer::TopicPartition;
use super::finalizer::{Pending, Step};
use super::shared::Shared;
use super::suspects::Treatment;
use crate::deploy::Slot;
use crate::envelope::Produce;
use crate::envelope::Record;
use crate::fence::Fence;
use crate::handler::{HandlerInstance, LoadedHandler};
use crate::metrics::HandlerMetrics;
use crate::retry_topic::{self, DelayQueue};
use crate::state::{CallState, Overlay, Owned, Scope, Write};

/// Handles one partition's events, in order, on its own thread.
pub(super) struct PartitionWorker {
    pub(super) shared: Arc<Shared>,
    pub(super) handlers: Vec<(Arc<LoadedHandler>, Option<HandlerInstance>, HandlerMetrics)>,
    /// Each handler's slot, and the generation of the version in
    /// `handlers` (a deploy changes the slot's).
    pub(super) slots: Vec<(Arc<Slot>, u64)>,
    pub(super) fence: Arc<Fence>,
    /// Keys handled by this worker whose marks may not be written yet: a
    /// duplicate close behind its original is caught here.
    pub(super) recent: RecentKeys,
    /// The producer's record size limit (`message.max.bytes`).
    pub(super) max_record_bytes: usize,
    /// Time the current event waited for its handler's fuel budget.
    pub(super) throttled: Duration,
    /// The partition is of a retry topic: records carry retry state and
    /// wait in `delayed` until they are due.
    pub(super) is_retry: bool,
    pub(super) delayed: DelayQueue<Record>,
    /// The partition.
    pub(super) tp: TopicPartition,
    /// Exactly-once: the records of the event in hand, sent together once
    /// it is handled.
    pub(super) outbox: RefCell<Vec<Produce>>,
    /// Exactly-once: events handled while a commit held the gate, with
    /// their records, sent in order once it is free.
    pub(super) backlog: Vec<(Pending, Vec<Produce>)>,
    /// The partition's state writes not in the store yet.
    pub(super) overlay: Arc<Overlay>,
    /// Each handler's state scope for this partition (made at its first
    /// call, again after a deploy).
    pub(super) scopes: Vec<Option<Arc<Scope>>>,
    /// The partition counts in the handlers' state totals while this lives.
    _owned: Option<Owned>,
    /// When expired state is next looked for, and where each handler's
    /// look goes on from.
    next_sweep: Instant,
    sweep_from: Vec<Option<Vec<u8>>>,
}

/// Exactly-once: events a worker may handle ahead while a commit holds the
/// transaction gate, before it waits (`outbox`).
pub(super) const BACKLOG: usize = 2048;

/// Keys looked at for expired values per handler and sweep.
const SWEEP_KEYS: usize = 10_000;

/// A bounded set of recently handled idempotency keys. Keys are kept as
/// 128-bit digests (two SipHash-1-3 with random keys of this process:
/// cheap, and no one can craft keys that collide), so memory does not
/// depend on the length of event ids. A key's digest is made once per
/// event ([`RecentKeys::digest`]) and serves the lookup and the insert; the
/// set hashes a digest by taking its low half. Two generations: inserts go
/// to the current one; when it holds `capacity` keys it becomes the
/// previous one and the oldest generation is dropped whole. So a key is
/// known for at least `capacity` inserts after its own (at most twice
/// that), and no insert evicts an old key (a cache miss per event).
pub(super) struct RecentKeys {
    capacity: usize,
    current: DigestSet,
    previous: DigestSet,
    hashers: (RandomState, RandomState),
}

type DigestSet = std::collections::HashSet<u128, BuildHasherDefault<DigestHasher>>;

/// The hasher of a set of digests: a digest is already random.
#[derive(Default)]
pub(super) struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Only digests are hashed (`write_u128`); anything else still
        // hashes, if poorly.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u128(&mut self, digest: u128) {
        self.0 = digest as u64;
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

impl RecentKeys {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            current: DigestSet::default(),
            previous: DigestSet::default(),
            hashers: (RandomState::new(), RandomState::new()),
        }
    }

    /// The digest a key is known by.
    pub(super) fn digest(&self, key: &[u8]) -> u128 {
        let (a, b) = &self.hashers;
        (u128::from(a.hash_one(key)) << 64) | u128::from(b.hash_one(key))
    }

    pub(super) fn contains(&self, digest: u128) -> bool {
        self.current.contains(&digest) || self.previous.contains(&digest)
    }

    pub(super) fn insert(&mut self, digest: u128) {
        if self.current.len() >= self.capacity {
            // The oldest generation goes whole; its table is reused.
            std::mem::swap(&mut self.current, &mut self.previous);
            self.current.clear();
        }
        self.current.insert(digest);
    }
}

impl PartitionWorker {
    pub(super) fn new(
        shared: Arc<Shared>,
        slots: Vec<Arc<Slot>>,
        fence: Arc<Fence>,
        is_retry: bool,
        tp: TopicPartition,
        overlay: Arc<Overlay>,
    ) -> Self {
        let keys_per_event = slots.len().max(1);
        let handlers = slots.len();
        let slots: Vec<(Arc<Slot>, Arc<LoadedHandler>, u64)> = slots
            .into_iter()
            .map(|s| {
                let (generation, h) = s.current();
                (s, h, generation)
            })
            .collect();
        Self {
            slots: slots.iter().map(|(s, _, g)| (s.clone(), *g)).collect(),
            handlers: slots
                .into_iter()
                .map(|(_, h, _)| {
                    let m = shared
                        .handler_metrics
                        .get(&h.name)
                        .cloned()
                        .unwrap_or_default();
                    (h, None, m)
                })
                .collect(),
            // What the finalizer may hold unmarked: its queue and one batch
            // of events (512), each with a key per handler, and a margin.
            // Exactly-once adds the events handled ahead during a commit.
            recent: RecentKeys::new(
                (shared.config.pipeline.max_in_flight_per_partition
                    + 1024
                    + if shared.txn.is_some() { BACKLOG } else { 0 })
                    * keys_per_event,
            ),
            max_record_bytes: crate::kafka::max_message_bytes(&shared.config),
            _owned: shared
                .state
                .as_ref()
                .filter(|_| !is_retry)
                .map(|s| s.own(&tp.0, tp.1)),
            shared,
            fence,
            throttled: Duration::ZERO,
            is_retry,
            delayed: DelayQueue::default(),
            tp,
            outbox: RefCell::new(Vec::new()),
            backlog: Vec::new(),
            overlay,
            scopes: vec![None; handlers],
            next_sweep: Instant::now(),
            sweep_from: vec![None; handlers],
        }
    }

    /// Deletes expired state values of the handlers with a TTL, now and
    /// then (every half TTL, at most every minute), with the event at
    /// `offset`: the deletes go to the store, and as tombstones to the
    /// changelog, with that event's outcome, so the totals and the
    /// changelog shed them too. Keys written by events in flight are left.
    pub(super) fn sweep(&mut self, offset: i64, state: &mut Vec<Write>) {
        // (No clock read per event where there is nothing to sweep.)
        let ttl = |h: &(Arc<LoadedHandler>, _, _)| h.0.config_entry.state.ttl_secs.is_some();
        if self.is_retry || self.shared.state.is_none() || !self.handlers.iter().any(ttl) {
            return;
        }
        let now = Instant::now();
        if now < self.next_sweep {
            return;
        }
        let mut every = Duration::from_secs(60);
        for i in 0..self.handlers.len() {
            let Some(ttl) = self.handlers[i].0.config_entry.state.ttl_secs else {
                continue;
            };
            every = every.min(
                Duration::from_millis(ttl.saturating_mul(500)).max(Duration::from_millis(100)),
            );
            let _ = self.call_state(i);
            let Some(scope) = self.scopes[i].clone() else {
                continue;
            };
            let from = self.sweep_from[i].take();
            let overlay = &self.overlay;
            match scope
                .store
                .expired(&scope.prefix, from.as_deref(), SWEEP_KEYS, |k| {
                    overlay.get(k).is_some()
                }) {
                Ok((deletes, next)) => {
                    self.sweep_from[i] = next;
                    if !deletes.is_empty() {
                        debug!(handler = %scope.handler, keys = deletes.len(), "expired state deleted");
                        self.overlay.put(&scope.handler, &deletes, offset);
                        state.extend(deletes);
                    }
                }
                Err(e) => error!(error = %format!("{e:#}"), "cannot look for expired state"),
            }
        }
        self.next_sweep = now + every;
    }

    /// The state a call of handler `i` sees.
    pub(super) fn call_state(&mut self, i: usize) -> CallState {
        let Some(store) = &self.shared.state else {
            return CallState::new(
                None,
                "needs the idempotency store (idempotency.enabled = true)",
            );
        };
        if self.is_retry {
            return CallState::new(
                None,
                "is not available to events of a retry topic (state needs partition order: \
                 use retry_mode = \"blocking\")",
            );
        }
        let h = &self.handlers[i].0;
        let scope = self.scopes[i].get_or_insert_with(|| {
            Arc::new(Scope {
                store: store.clone(),
                overlay: self.overlay.clone(),
                handler: h.name.as_str().into(),
                prefix: crate::state::scope_prefix(&h.name, &self.tp.0, self.tp.1),
                limits: h.config_entry.state.clone(),
            })
        });
        CallState::new(Some(scope.clone()), "")
    }

    pub(super) fn run(
        mut self,
        mut rx: mpsc::Receiver<Record>,
        pending: mpsc::Sender<Step>,
        stop: &AtomicBool,
        runtime: tokio::runtime::Handle,
    ) {
        // Retry records held until due; beyond this many the worker waits
        // for the soonest instead of taking more.
        let max_delayed = self.shared.config.pipeline.max_in_flight_per_partition;
        loop {
            if stop.load(Ordering::SeqCst) || self.fence.is_closed() {
                break;
            }
            // The clock is read only with retry records held.
            let popped = if self.delayed.is_empty() {
                None
            } else {
                self.delayed.pop_due(Instant::now())
            };
            let record = if let Some(due) = popped {
                due
            } else {
                let record = match self.delayed.next_due() {
                    None => {
                        // Nothing to handle next: what was handled ahead
                        // is sent now, not when the next record comes.
                        let next = match rx.try_recv() {
                            Ok(r) => Some(r),
                            Err(_) => {
                                if !self.send_backlog(true, &pending) {
                                    break;
                                }
                                rx.blocking_recv()
                            }
                        };
                        match next {
                            Some(r) => r,
                            None => break,
                        }
                    }
                    Some(due) => {
                        if !self.send_backlog(true, &pending) {
                            break;
                        }
                        let wait = due.saturating_duration_since(Instant::now());
                        if self.delayed.len() >= max_delayed {
                            self.sleep(wait.min(Duration::from_millis(100)));
                            continue;
                        }
                        let wait = wait.min(Duration::from_millis(100));
                        // The timer is made inside the runtime's context.
                        let next =
                            runtime.block_on(async { tokio::time::timeout(wait, rx.recv()).await });
                        match next {
                            Ok(Some(r)) => r,
                            Ok(None) => break,
                            Err(_) => continue,
                        }
                    }
                };
                if stop.load(Ordering::SeqCst) || self.fence.is_closed() {
                    break;
                }
                if let Some(due) = self.not_due(&record) {
                    // Later records that are due sooner go first; its offset
                    // is final later (exactly-once: in a later transaction).
                    if let Some(txn) = &self.shared.txn {
                        txn.defer(&self.tp, record.offset);
                    } else if pending
                        .blocking_send(Step::Deferred(record.offset))
                        .is_err()
                    {
                        break;
                    }
                    self.delayed.push(due, record);
                    continue;
                }
                record
            };
            if let Some((t, p, o)) = &self.shared.panic_at {
                if record.topic == *t && record.partition == *p && record.offset == *o {
                    panic!("injected fault: the worker of {t}/{p} panics at offset {o}");
                }
            }
            let (partition, offset) = (record.partition, record.offset);
            let treatment = self
                .shared
                .txn
                .as_ref()
                .map(|t| t.treatment(&self.tp, offset));
            if treatment == Some(Treatment::Stop) {
                if self.send_backlog(true, &pending) {
                    let reason =
                        "its records and its dead letter were refused for good, each sent alone";
                    let _ = pending.blocking_send(Step::Stop(offset, reason.into()));
                }
                break;
            }
            let Some(p) = self.process(record) else {
                if self.fence.is_closed() {
                    info!(partition, offset,
                        "partition fenced off (revoked or abandoned): the event in hand is not published, marked or committed here");
                }
                break;
            };
            let taken = match treatment {
                Some(t) => self.take_handled(p, t, &pending),
                None => pending.blocking_send(Step::Done(p)).is_ok(),
            };
            if !taken {
                break;
            }
        }
        // Stopping (a revoke's drain, a shutdown): what was handled ahead
        // is sent, unless the partition is fenced off.
        if !self.fence.is_closed() {
            self.send_backlog(true, &pending);
        }
    }

    /// Takes handler `i`'s serving version if a deploy or a rollback
    /// changed it: called between event attempts, never during one.
    pub(super) fn refresh(&mut self, i: usize) {
        let (slot, seen) = &mut self.slots[i];
        if slot.generation() == *seen {
            return;
        }
        let (generation, current) = slot.current();
        *seen = generation;
        if !Arc::ptr_eq(&self.handlers[i].0, &current) {
            self.handlers[i].0 = current;
            self.handlers[i].1 = None;
            // The new version's limits.
            self.scopes[i] = None;
        }
    }

    /// Counts an event's outcome for the version that handled it (the
    /// rollout watch of a new version).
    pub(super) fn outcome(&self, i: usize, ok: bool) {
        let (slot, generation) = &self.slots[i];
        slot.record(*generation, ok);
    }

    /// When a retry record that is not due yet will be; None for one that
    /// is due, or that is not a retry record.
    pub(super) fn not_due(&self, record: &Record) -> Option<Instant> {
        if !self.is_retry {
            return None;
        }
        let (_, info) = retry_topic::take_retry(record)?;
        // Never longer than the longest backoff of the handler it names.
        let cap = self
            .handlers
            .iter()
            .find(|(h, _, _)| h.name == info.handler)
            .map_or(0, |(h, _, _)| h.config_entry.max_backoff_ms);
        let due = retry_topic::due_at(&info, Duration::from_millis(cap));
        (due > Instant::now()).then_some(due)
    }

    /// Whether `key` already has a final outcome. A store that cannot be
    /// read is waited for: guessing either way would break a promise.
    pub(super) fn already_done(&self, key: &[u8], digest: u128) -> Option<bool> {
        let dedup = self.shared.dedup.as_ref()?;
        if self.recent.contains(digest) {
            return Some(true);
        }
        // Marked by an event of the open transaction (exactly-once: marks
        // reach the store once their transaction commits).
        if let Some(txn) = &self.shared.txn {
            if txn.marked(&self.tp, key) {
                return Some(true);
            }
        }
        let mut backoff = Duration::from_millis(100);
        loop {
            match dedup.contains(key) {
                Ok(found) => return Some(found),
                Err(e) => {
                    error!(error = %format!("{e:#}"), "cannot read the idempotency store; retrying");
                    if !self.sleep(backoff) {
                        return None;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// Sleeps for a backoff; false when cancelled meanwhile.
    pub(super) fn sleep(&self, d: Duration) -> bool {
        self.fence.sleep(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn recent_keys_are_kept_for_at_least_capacity_inserts() {
        let mut recent = RecentKeys::new(3);
        let digests: Vec<u128> = (0..10u32)
            .map(|i| recent.digest(&i.to_be_bytes()))
            .collect();
        assert_ne!(digests[0], digests[1], "distinct keys, distinct digests");
        for (i, d) in digests.iter().enumerate() {
            recent.insert(*d);
            // A key is known for at least `capacity` inserts after its own.
            for kept in &digests[i.saturating_sub(3)..=i] {
                assert!(recent.contains(*kept), "insert {i}");
            }
        }
        // At most twice the capacity is kept: the first keys are gone.
        assert!(!recent.contains(digests[0]) && !recent.contains(digests[3]));
        assert!(!recent.contains(recent.digest(b"never inserted")));
    }
}
