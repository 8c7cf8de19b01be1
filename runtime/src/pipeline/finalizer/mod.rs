//! The finalizer of one partition: awaits what each event produced, in the
//! order the worker handled them, marks the events in the idempotency
//! store and stores the offset below every unfinished event (the
//! [`Offsets`] lattice); a record refused for good dead-letters its event,
//! or stops the partition if it is a dead letter itself.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use opentelemetry::Context as TraceContext;
use prometheus::IntCounter;

use rdkafka::producer::DeliveryFuture;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tracing::{error, warn};

use super::consumer::{partition_key, GroupConsumer, TopicPartition};
use super::observe::{EventFields, Happened};
use super::offsets::Offsets;
use super::shared::Shared;
use crate::deadletter::DeadLetter;
use crate::envelope::{self, Produce, Record};
use crate::failure::FailureKind;
use crate::fence::Fence;
use crate::handler::LoadedHandler;
use crate::metrics::HandlerMetrics;
use crate::publish::{publish_span, Ack, Acked};
use crate::state::{Overlay, Write};
use crate::telemetry;

mod settle;

pub(super) use settle::{produce_failed, Settled};

/// Deliveries of the partition's marks to the changelog, not ended yet.
pub(super) type ChangelogAcks = FuturesUnordered<DeliveryFuture>;

/// What a worker hands its finalizer, in the order it handles records.
pub(super) enum Step {
    /// A record held until it is due (retry partitions): final later.
    Deferred(i64),
    /// A record handled: what must be acknowledged before it is final.
    Done(Pending),
    /// Exactly-once: the partition stops at this event, for this reason.
    Stop(i64, String),
}

/// The outcome of one event: what must be acknowledged before its offset
/// is final.
pub(super) struct Pending {
    pub(super) offset: i64,
    pub(super) deliveries: Vec<Delivery>,
    /// Idempotency keys to mark once the deliveries are acknowledged.
    pub(super) marks: Vec<Vec<u8>>,
    /// The handlers' state writes, made with the marks.
    pub(super) state: Vec<Write>,
}

/// A record sent for an event, awaited before the event is final.
pub(super) struct Delivery {
    pub(super) ack: Ack,
    /// The producer span, ended at the acknowledgement.
    pub(super) span: Option<TraceContext>,
    /// Counted once acknowledged (outputs or dead letters of a handler).
    pub(super) counter: Option<IntCounter>,
    /// What a refusal for good means.
    pub(super) on_refused: OnRefused,
    /// A handler's output (not a retry record or a dead letter), for the
    /// `outputs` count of the progress line.
    pub(super) output: bool,
}

/// What the finalizer does when a record is refused for good.
pub(super) enum OnRefused {
    /// An output or a retry record: the event is dead-lettered for its
    /// handler as `produce-failed`.
    DeadLetter(Arc<Fallback>),
    /// A dead letter to this topic: the partition stops, nothing is
    /// committed past the event.
    Stop(String),
}

/// What dead-lettering an event for one handler takes, should one of the
/// records its call produced be refused.
pub(super) struct Fallback {
    pub(super) record: Arc<Record>,
    pub(super) handler: Arc<LoadedHandler>,
    pub(super) metrics: HandlerMetrics,
    pub(super) attempts: u32,
    /// When the event's failures began; None: at the refusal (a call that
    /// succeeded, whose output was refused).
    pub(super) first_failure: Option<OffsetDateTime>,
    pub(super) correlation_id: String,
    pub(super) cx: TraceContext,
    /// Marked once the dead letter is acknowledged, when the call's own
    /// mark is not (a retry hop that could not be written).
    pub(super) mark: Option<Vec<u8>>,
    /// Set once dead-lettered: an event is dead-lettered once per handler.
    pub(super) used: AtomicBool,
}

/// One partition's finalizer: awaits each event's acknowledgements in the
/// order the worker handled them, marks the events in the idempotency
/// store, then stores the offset below every unfinished event. Events that
/// are ready together are marked in one batch. A record refused for a
/// reason that can pass is sent again; one refused for good dead-letters
/// its event, or, if it is a dead letter, stops the partition, so nothing
/// is committed past an output or dead letter that is not durable.
pub(super) struct Finalizer {
    pub(super) tp: TopicPartition,
    pub(super) consumer: Arc<dyn GroupConsumer>,
    pub(super) shared: Arc<Shared>,
    pub(super) in_flight: Arc<AtomicI64>,
    pub(super) fence: Arc<Fence>,
    pub(super) stopped: Arc<AtomicBool>,
    /// Set when the partition is revoked or the instance shuts down.
    pub(super) closing: Arc<AtomicBool>,
    /// The partition's state writes not in the store yet.
    pub(super) overlay: Arc<Overlay>,
}

impl Finalizer {
    pub(super) async fn run(self, mut steps: mpsc::Receiver<Step>) {
        const BATCH: usize = 512;
        let mut batch: Vec<Pending> = Vec::with_capacity(BATCH);
        let mut offsets = Offsets::default();
        let mut deferred: Vec<i64> = Vec::new();
        let mut marks = ChangelogAcks::new();
        while let Some(first) = steps.recv().await {
            let mut next = Some(first);
            let mut stop = None;
            while let Some(step) = next.take() {
                match step {
                    Step::Deferred(offset) => deferred.push(offset),
                    Step::Done(p) => batch.push(p),
                    Step::Stop(offset, reason) => {
                        stop = Some((offset, reason));
                        break;
                    }
                }
                if batch.len() < BATCH {
                    next = steps.try_recv().ok();
                }
            }
            for offset in deferred.drain(..) {
                offsets.defer(offset);
            }
            // Events settle in order; a stop or an abandon cuts the batch:
            // the events before it are final all the same.
            let mut cut: Option<(usize, Option<String>)> = None;
            'settle: for (i, p) in batch.iter_mut().enumerate() {
                let mut noted = false;
                for delivery in std::mem::take(&mut p.deliveries) {
                    match self.settle(delivery).await {
                        Settled::Done(mark) => p.marks.extend(mark),
                        Settled::Stop(reason) => {
                            cut.get_or_insert((i, Some(reason)));
                            break 'settle;
                        }
                        Settled::Abandoned => {
                            cut.get_or_insert((i, None));
                            break 'settle;
                        }
                        Settled::Failed {
                            reason,
                            permanent,
                            size,
                        } => {
                            if let Some(txn) = &self.shared.txn {
                                if permanent && !std::mem::replace(&mut noted, true) {
                                    txn.refused(&self.tp, p.offset, &reason, size);
                                } else if !permanent && cut.is_none() {
                                    warn!(topic = %self.tp.0, partition = self.tp.1, offset = p.offset,
                                        reason, "a record was not delivered: the transaction aborts");
                                    txn.fail(format!("a record was not delivered: {reason}"));
                                }
                            }
                            // The transaction aborts: the batch's other
                            // refusals are noted too (a record refused for
                            // its size takes its batch-mates down with it).
                            cut.get_or_insert((i, None));
                        }
                    }
                }
            }
            if cut.is_none() {
                if let Some((offset, reason)) = stop.take() {
                    if self.finish(&mut batch, &mut offsets, &mut marks).await {
                        self.stop(offset, reason);
                    }
                    break;
                }
            }
            let stop_at = cut.as_ref().map(|(i, _)| batch[*i].offset);
            if let Some((i, _)) = &cut {
                batch.truncate(*i);
            }
            if !self.finish(&mut batch, &mut offsets, &mut marks).await {
                break;
            }
            self.changelog_acks(&mut marks, false).await;
            match cut {
                None => {}
                Some((_, Some(reason))) => {
                    self.stop(stop_at.expect("a cut event"), reason);
                    break;
                }
                Some((_, None)) => break,
            }
        }
        // The partition's marks are in the changelog before it is done
        // (and, on a revoke, before its next owner restores them).
        self.changelog_acks(&mut marks, true).await;
    }

    /// Counts the changelog deliveries that ended; with `all`, waits for
    /// every one (until the fence closes).
    async fn changelog_acks(&self, acks: &mut ChangelogAcks, all: bool) {
        let Some(changelog) = &self.shared.changelog else {
            return;
        };
        loop {
            let next = if all {
                tokio::select! {
                    r = acks.next() => Some(r),
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {
                        if self.fence.is_closed() {
                            return;
                        }
                        continue;
                    }
                }
            } else {
                acks.next().now_or_never()
            };
            match next {
                Some(Some(Ok(result))) => changelog.delivered(&result),
                // The producer is gone: shutting down.
                Some(Some(Err(_))) => {}
                Some(None) | None => return,
            }
        }
    }

    /// Marks settled events in the idempotency store, then stores the
    /// offset below every unfinished event. False when cancelled before
    /// the marks were written.
    pub(super) async fn finish(
        &self,
        batch: &mut Vec<Pending>,
        offsets: &mut Offsets,
        marks: &mut ChangelogAcks,
    ) -> bool {
        if batch.is_empty() {
            return true;
        }
        if self.shared.txn.is_some() {
            // Exactly-once: marks and offsets go with the transaction, and
            // its commit counts the events final.
            self.in_flight
                .fetch_sub(batch.len() as i64, Ordering::Relaxed);
            batch.clear();
            return true;
        }
        if let Some(dedup) = &self.shared.dedup {
            let keys = batch.iter().flat_map(|p| p.marks.iter().map(Vec::as_slice));
            let at = crate::dedup::now_ms();
            let writes: Vec<&Write> = batch.iter().flat_map(|p| &p.state).collect();
            // The state writes are in the changelog (acknowledged) before
            // they are in the store, and before the marks and the offsets:
            // the changelog never holds less than a store, so a restore
            // never takes a key back, and an instance that takes the
            // partition over finds an event's writes, or handles it again.
            let mut state_next = None;
            if !writes.is_empty() {
                match self.write_state(&writes).await {
                    None => return false,
                    Some(next) => state_next = next,
                }
            }
            let mut backoff = Duration::from_millis(100);
            loop {
                // Nothing is marked once the partition is fenced off. The
                // state writes go in the same write batch as the marks.
                let retire = [(&*self.overlay, batch.last().map_or(-1, |p| p.offset))];
                let write = || match &self.shared.state {
                    Some(state) if !writes.is_empty() => {
                        state.persist(keys.clone(), at, &writes, &retire)
                    }
                    _ => dedup.mark_at(keys.clone(), at),
                };
                let Some(written) = self.fence.pass(write) else {
                    return false;
                };
                let Err(e) = written else { break };
                // Committing without the marks would let duplicates through
                // after a crash: wait for the store instead.
                error!(error = %format!("{e:#}"), "cannot mark events as processed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            // What a restore of the partition here can start from.
            if let (Some(state), Some(changelog), Some(next)) =
                (&self.shared.state, &self.shared.changelog, state_next)
            {
                let topic = changelog.state_topic();
                if let Err(e) = state.set_checkpoint(topic, &self.tp.0, self.tp.1, next) {
                    warn!(error = %format!("{e:#}"), "cannot keep the state checkpoint");
                }
            }
            if let Some(changelog) = &self.shared.changelog {
                loop {
                    let write =
                        || changelog.write(&self.shared.publisher, self.tp.1, keys.clone(), at);
                    match self.fence.pass(write) {
                        None => return false,
                        Some(Ok(delivery)) => {
                            marks.extend(delivery);
                            break;
                        }
                        // The producer's queue is full: it drains as the
                        // broker acknowledges.
                        Some(Err(wait)) => tokio::time::sleep(wait).await,
                    }
                }
            }
        }
        for p in batch.iter() {
            offsets.finish(p.offset);
        }
        if let Some(offset) = offsets.storable() {
            let stored = self
                .fence
                .pass(|| self.consumer.store_offset(&self.tp.0, self.tp.1, offset));
            match stored {
                // Fenced off: the partition is no longer ours, and its new
                // owner starts from the last commit.
                None => return false,
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    error!(topic = %self.tp.0, partition = self.tp.1, offset, error = %e, "offset not stored");
                    self.shared.kafka_error("store_offset");
                }
            }
        }
        self.final_count(batch);
        true
    }

    /// Publishes state writes to the state changelog (the last of each
    /// key) and awaits their acknowledgements; writes that were not
    /// acknowledged are sent again (the partition waits: its store must
    /// never hold what the changelog does not). The offset after the last
    /// record (None without a changelog); None when fenced off meanwhile.
    async fn write_state(&self, writes: &[&Write]) -> Option<Option<i64>> {
        let Some(changelog) = &self.shared.changelog else {
            return Some(None);
        };
        let mut last: std::collections::HashMap<&[u8], &Write> = Default::default();
        for w in writes {
            last.insert(&w.key, w);
        }
        let mut todo: Vec<&Write> = last.into_values().collect();
        let mut next = -1;
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut failed = Vec::new();
            let mut acks = FuturesUnordered::new();
            for w in todo {
                loop {
                    let write = || changelog.write_state(&self.shared.publisher, self.tp.1, w);
                    match self.fence.pass(write) {
                        None => return None,
                        Some(Ok(Some(delivery))) => {
                            acks.push(async move { (w, delivery.await) });
                            break;
                        }
                        // Refused for good (logged and counted).
                        Some(Ok(None)) => {
                            failed.push(w);
                            break;
                        }
                        Some(Err(wait)) => tokio::time::sleep(wait).await,
                    }
                }
            }
            loop {
                tokio::select! {
                    r = acks.next() => match r {
                        Some((_, Ok(Ok(d)))) => next = next.max(d.offset + 1),
                        Some((w, Ok(result))) => {
                            changelog.state_delivered(&result);
                            failed.push(w);
                        }
                        // The producer is gone: shutting down.
                        Some((_, Err(_))) => return None,
                        None => break,
                    },
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {
                        if self.fence.is_closed() {
                            return None;
                        }
                    }
                }
            }
            if failed.is_empty() {
                return Some((next >= 0).then_some(next));
            }
            error!(topic = %self.tp.0, partition = self.tp.1, writes = failed.len(),
                "state writes not in the changelog; sending them again (the partition waits)");
            let until = tokio::time::Instant::now() + backoff;
            while tokio::time::Instant::now() < until {
                if self.fence.is_closed() {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
            todo = failed;
        }
    }

    fn final_count(&self, batch: &mut Vec<Pending>) {
        self.shared
            .stats
            .events_final
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.in_flight
            .fetch_sub(batch.len() as i64, Ordering::Relaxed);
        batch.clear();
    }

    /// Stops the partition for good: the worker stops, its records are left
    /// uncommitted, and the instance is not ready until the partition moves.
    pub(super) fn stop(&self, offset: i64, reason: String) {
        let (topic, partition) = (&self.tp.0, self.tp.1);
        error!(topic = %topic, partition, offset, reason = %reason,
            "partition stopped: nothing past this event is committed until the cause is fixed and the partition moves or the instance restarts");
        self.stopped.store(true, Ordering::SeqCst);
        self.fence.close();
        // Its queued events are dropped uncommitted.
        self.in_flight.store(0, Ordering::Relaxed);
        if self.closing.load(Ordering::SeqCst) {
            // Being revoked or shut down: the partition is not ours to
            // report on any more.
            return;
        }
        self.shared.obs.health.set_problem(
            &partition_key(topic, partition),
            format!("partition {topic}/{partition} stopped at offset {offset}: {reason}"),
        );
        if let Some(m) = &self.shared.obs.metrics {
            m.stopped_partitions.inc();
        }
    }
}
