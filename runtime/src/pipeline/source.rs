//! The consumer side: partitions assigned and revoked, records handed to
//! each partition's worker, held and paused when the work in flight
//! reaches its bounds, resumed when it drains.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::TopicPartitionList;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use super::commit;
use super::{spawn_worker, Observability, Shared, TopicPartition};
use crate::config::GroupProtocol;
use crate::envelope::Record;
use crate::fence::Fence;

/// A partition's worker as the poll loop and the rebalance callback see it.
pub(super) struct Worker {
    pub(super) tx: Option<mpsc::Sender<Record>>,
    /// Records fetched while the worker's queue was full; fetching of the
    /// partition is paused until they are handed over.
    pub(super) parked: VecDeque<Record>,
    pub(super) paused: bool,
    /// Offset of the next record expected, to drop records redelivered by a
    /// pause/resume refetch.
    pub(super) next_offset: i64,
    /// Set to stop after the event being handled; queued events are left
    /// uncommitted for redelivery.
    pub(super) stop: Arc<AtomicBool>,
    /// Set to abandon even the acknowledgements being awaited.
    pub(super) fence: Arc<Fence>,
    /// Set when the partition stopped for good (a dead letter was refused):
    /// its records are dropped uncommitted until the partition moves.
    pub(super) stopped: Arc<AtomicBool>,
    pub(super) done: watch::Receiver<bool>,
    pub(super) thread: Option<JoinHandle<()>>,
    /// Events handed to this partition's worker (or parked) and not final yet.
    pub(super) in_flight: Arc<AtomicI64>,
}

impl Worker {
    /// Stops taking records; the event being handled is finished and its
    /// outcome made final, the queued ones are dropped (not committed).
    pub(super) fn close(&mut self, workers: &Workers) {
        self.stop.store(true, Ordering::SeqCst);
        self.tx = None;
        let bytes: usize = self.parked.iter().map(record_size).sum();
        workers.parked_bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.parked.clear();
    }
}

/// Approximate memory of a record.
pub(super) fn record_size(r: &Record) -> usize {
    64 + r.topic.len()
        + r.value.len()
        + r.key.as_ref().map_or(0, Vec::len)
        + r.headers
            .iter()
            .map(|(k, v)| k.len() + v.len() + 16)
            .sum::<usize>()
}

#[derive(Default)]
pub(super) struct Workers {
    pub(super) map: Mutex<HashMap<TopicPartition, Worker>>,
    /// Bytes of records parked over all partitions. Pausing a partition is
    /// expensive (librdkafka resumes its fetching only after a delay), so
    /// records beyond a full worker queue are first held here, up to the
    /// prefetch budget, and the partition is paused only past it.
    pub(super) parked_bytes: std::sync::atomic::AtomicUsize,
    /// Set while the events queued over all partitions exceed the total bound.
    pub(super) over_total: AtomicBool,
}

/// The consumer context: flushes revoked partitions before they move,
/// reports joining the group, commit results and consumer lag.
pub(super) struct WeirContext {
    pub(super) workers: Arc<Workers>,
    pub(super) drain_timeout: Duration,
    pub(super) obs: Observability,
    /// Commits that failed since the last one that succeeded.
    pub(super) commits: commit::Commits,
}

impl WeirContext {
    pub(super) fn kafka_error(&self, operation: &str) {
        if let Some(m) = &self.obs.metrics {
            m.kafka_errors.with_label_values(&[operation]).inc();
        }
    }

    /// Sets the partitions-owned gauge from the assignment.
    fn owned(&self, base: &BaseConsumer<Self>) {
        if let (Some(m), Ok(a)) = (&self.obs.metrics, base.assignment()) {
            m.partitions_owned.set(a.count() as i64);
        }
    }

    fn rebalance(&self, kind: &str) {
        if let Some(m) = &self.obs.metrics {
            m.rebalances.with_label_values(&[kind]).inc();
        }
    }

    /// Readiness from the client's statistics: not ready while no broker
    /// is reachable, or while the member is not connected to its group's
    /// coordinator (after it first joined); ready again when both are back.
    fn connection_health(&self, s: &rdkafka::Statistics) {
        let health = &self.obs.health;
        let reachable = s.brokers.values().any(|b| b.state == "UP");
        if reachable {
            health.clear_problem(BROKERS);
        } else if !s.brokers.is_empty() {
            health.set_problem(
                BROKERS,
                "no Kafka broker is reachable; waiting for one (nothing is lost meanwhile)".into(),
            );
        }
        if let Some(group) = &s.cgrp {
            if group.state == "up" {
                health.clear_problem(GROUP);
            } else if health.joined.load(Ordering::Relaxed) {
                health.set_problem(
                    GROUP,
                    format!(
                        "not connected to the consumer group's coordinator (state {}); rejoining",
                        group.state
                    ),
                );
            }
        }
    }
}

/// Keys of [`crate::metrics::Health`] problems.
const BROKERS: &str = "brokers";
const GROUP: &str = "group";
const LOST: &str = "assignment";

/// A consumer error from a poll: a fatal one halts the runtime with the
/// client's reason (and what to change when the broker refused the group
/// protocol); others are logged and counted.
pub(super) fn consumer_error(
    shared: &Shared,
    consumer: &StreamConsumer<WeirContext>,
    e: KafkaError,
) {
    shared.kafka_error("consume");
    let fatal = matches!(
        e,
        KafkaError::MessageConsumptionFatal(_)
            | KafkaError::MessageConsumption(RDKafkaErrorCode::Fatal)
    );
    if !fatal {
        error!(error = %e, "consumer error");
        return;
    }
    let (code, reason) = consumer
        .client()
        .fatal_error()
        .unwrap_or((RDKafkaErrorCode::Fatal, e.to_string()));
    let hint = match code {
        RDKafkaErrorCode::UnsupportedVersion | RDKafkaErrorCode::UnsupportedFeature
            if shared.config.kafka.group_protocol == GroupProtocol::Consumer =>
        {
            " (the broker refused kafka.group_protocol = \"consumer\": it needs Kafka 4.0+ with the \
             consumer protocol enabled; set kafka.group_protocol = \"cooperative\" for older brokers)"
        }
        RDKafkaErrorCode::UnreleasedInstanceId => {
            " (another member with this group.instance.id is still in the group, e.g. a killed \
             instance whose session has not expired yet; start again after the broker's session timeout)"
        }
        _ => "",
    };
    shared.halt.halt_now(format!(
        "the Kafka consumer hit a fatal error: {reason}{hint}"
    ));
}

impl ClientContext for WeirContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        if let Some(m) = &self.obs.metrics {
            m.record_lag(&statistics);
        }
        self.connection_health(&statistics);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        error!(error = %error, reason, "Kafka consumer error");
        self.kafka_error("consume");
    }
}

impl ConsumerContext for WeirContext {
    fn pre_rebalance(&self, base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        // Only here: the rebalance clears it before `post_rebalance`.
        let lost = base.assignment_lost() && tpl.count() > 0;
        if lost {
            self.rebalance("lost");
            warn!(partitions = tpl.count(), "the group took this member's partitions away (session expired or member fenced); rejoining");
            self.obs.health.set_problem(
                LOST,
                "the consumer group took this member's partitions away; rejoining".into(),
            );
        } else if tpl.count() > 0 {
            self.rebalance("revoke");
        }
        let mut revoked = Vec::new();
        {
            let mut map = self.workers.map.lock().unwrap();
            for e in tpl.elements() {
                if let Some(mut w) = map.remove(&(e.topic().to_owned(), e.partition())) {
                    w.close(&self.workers);
                    if w.stopped.load(Ordering::SeqCst) {
                        // No longer ours: its new owner tries again.
                        self.obs
                            .health
                            .clear_problem(&partition_key(e.topic(), e.partition()));
                        if let Some(m) = &self.obs.metrics {
                            m.stopped_partitions.dec();
                        }
                    }
                    revoked.push(w);
                }
            }
        }
        if !revoked.is_empty() {
            info!(
                partitions = revoked.len(),
                list = %describe(tpl),
                "partitions revoked; finishing their in-flight events"
            );
            let deadline = if lost {
                // Already someone else's: nothing more of theirs is
                // published, marked or committed, not even the event in hand.
                for w in &revoked {
                    w.fence.close();
                }
                Instant::now()
            } else {
                Instant::now() + self.drain_timeout
            };
            drain(&mut revoked, deadline);
            // From here nothing of theirs is published, marked or committed.
            for w in &revoked {
                w.fence.close();
            }
        }
        commit::commit_sync(base);
    }

    fn post_rebalance(&self, base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                info!(partitions = tpl.count(), list = %describe(tpl), "partitions assigned");
                if tpl.count() > 0 {
                    self.rebalance("assign");
                }
                self.obs.health.joined.store(true, Ordering::Relaxed);
                self.obs.health.clear_problem(LOST);
                self.owned(base);
                // A partition paused before it was revoked stays paused in
                // librdkafka when it comes back; it has no worker yet, so
                // nothing else would resume it.
                if let Err(e) = base.resume(tpl) {
                    warn!(error = %e, "cannot resume assigned partitions");
                }
            }
            Rebalance::Revoke(_) => self.owned(base),
            Rebalance::Error(e) => {
                error!(error = %e, "consumer group rebalance failed");
                self.kafka_error("rebalance");
            }
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        _offsets: &TopicPartitionList,
    ) {
        self.commits.record(result, &self.obs);
    }
}

/// `topic/partition` of each partition of a list, comma-separated.
fn describe(tpl: &TopicPartitionList) -> String {
    tpl.elements()
        .iter()
        .map(|e| format!("{}/{}", e.topic(), e.partition()))
        .collect::<Vec<_>>()
        .join(",")
}

/// The key of a partition's problem in [`Health`].
pub(super) fn partition_key(topic: &str, partition: i32) -> String {
    format!("partition {topic}/{partition}")
}

/// Waits for workers' finalizers until `deadline`, then cancels the rest;
/// returns how many were cancelled with events unfinished.
pub(super) fn drain(workers: &mut [Worker], deadline: Instant) -> usize {
    let wait = |w: &mut Worker| {
        let mut done = w.done.clone();
        let left = deadline.saturating_duration_since(Instant::now());
        let fut = async move {
            let _ = tokio::time::timeout(left, done.wait_for(|d| *d)).await;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => tokio::task::block_in_place(|| h.block_on(fut)),
            Err(_) => tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("a runtime to wait on")
                .block_on(fut),
        }
    };
    let mut abandoned = 0;
    for w in workers.iter_mut() {
        wait(w);
        if !*w.done.borrow() {
            // (Not when it was fenced off before: the group took it away.)
            if !w.fence.is_closed() {
                warn!("in-flight events did not finish in time; they will be redelivered");
            }
            w.fence.close();
            abandoned += 1;
        }
    }
    for w in workers.iter_mut() {
        // A cancelled worker stops at its next check; one stuck in a long
        // handler call is left to finish on its own rather than holding up
        // the rebalance.
        if let Some(t) = w.thread.take() {
            if t.is_finished() || *w.done.borrow() {
                let _ = t.join();
            }
        }
    }
    abandoned
}

pub(super) fn tpl_of(tp: &TopicPartition) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&tp.0, tp.1);
    tpl
}

/// Hands a record to its partition's worker; parks it and pauses the
/// partition when the worker is full.
pub(super) fn hand_over(
    shared: &Arc<Shared>,
    consumer: &Arc<StreamConsumer<WeirContext>>,
    workers: &Workers,
    record: Record,
) {
    let tp = (record.topic.clone(), record.partition);
    let mut map = workers.map.lock().unwrap();
    let w = map
        .entry(tp.clone())
        .or_insert_with(|| spawn_worker(shared.clone(), consumer, &tp, record.offset));
    if w.stopped.load(Ordering::Relaxed) {
        // Left uncommitted: redelivered once the partition moves or the
        // instance restarts.
        if !w.paused && consumer.pause(&tpl_of(&tp)).is_ok() {
            w.paused = true;
        }
        return;
    }
    if record.offset < w.next_offset {
        return; // already handed over; refetched after a pause
    }
    let Some(tx) = &w.tx else { return };
    w.next_offset = record.offset + 1;
    w.in_flight.fetch_add(1, Ordering::Relaxed);
    let full = workers.over_total.load(Ordering::Relaxed);
    let record = if !w.parked.is_empty() || full {
        record
    } else {
        match tx.try_send(record) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(record)) => record,
            Err(mpsc::error::TrySendError::Closed(_)) => return worker_died(shared, &tp),
        }
    };
    let parked = workers
        .parked_bytes
        .fetch_add(record_size(&record), Ordering::Relaxed)
        + record_size(&record);
    w.parked.push_back(record);
    let budget = shared.config.pipeline.prefetch_kbytes as usize * 1024;
    if !w.paused && (parked >= budget || full) {
        match consumer.pause(&tpl_of(&tp)) {
            Ok(()) => {
                w.paused = true;
                shared.stats.pauses.fetch_add(1, Ordering::Relaxed);
                debug!(topic = %tp.0, partition = tp.1, "partition paused: work in flight at its bound");
            }
            Err(e) => warn!(error = %e, "cannot pause partition"),
        }
    }
}

/// A worker thread that ended while its partition is assigned is a bug
/// (a panic is reported where it happens); carrying on would commit past
/// the events it dropped, so the runtime halts and they are redelivered.
pub(super) fn worker_died(shared: &Shared, tp: &TopicPartition) {
    shared.halt.halt(format!(
        "the worker of partition {}/{} stopped unexpectedly",
        tp.0, tp.1
    ));
}

/// Whether the events queued over all partitions are over the total
/// bound, with hysteresis: over at the bound, under again at half of it,
/// so partitions do not flap between paused and resumed.
pub(super) fn over_total(was_over: bool, queued: usize, max_total: usize) -> bool {
    if was_over {
        queued * 2 >= max_total
    } else {
        queued >= max_total
    }
}

/// Whether a paused partition may resume: once the records held over all
/// partitions are under half the budget (its own held records still go
/// first, so the order is kept, and its worker stays fed while librdkafka
/// fetches again: a pause drops librdkafka's prefetch of the partition),
/// or, whatever others hold, once it holds nothing and half its worker's
/// queue is free (so a partition stuck on a slow handler does not keep
/// the others paused).
pub(super) fn may_resume(
    parked_bytes: usize,
    budget: usize,
    parked_here: usize,
    free: usize,
    capacity: usize,
) -> bool {
    parked_bytes * 2 < budget || (parked_here == 0 && free * 2 >= capacity)
}

/// Moves parked records into workers with room, resuming drained partitions.
pub(super) fn unpark(consumer: &StreamConsumer<WeirContext>, workers: &Workers, shared: &Shared) {
    let stats = &shared.stats;
    let budget = shared.config.pipeline.prefetch_kbytes as usize * 1024;
    let max_total = shared.config.pipeline.max_in_flight_total;
    let mut map = workers.map.lock().unwrap();
    if let Some(m) = &shared.obs.metrics {
        m.in_flight.set(
            map.values()
                .map(|w| w.in_flight.load(Ordering::Relaxed))
                .sum(),
        );
        m.paused_partitions
            .set(map.values().filter(|w| w.paused).count() as i64);
    }
    let queued: usize = map
        .values()
        .filter_map(|w| w.tx.as_ref().map(|tx| tx.max_capacity() - tx.capacity()))
        .sum();
    let over = over_total(
        workers.over_total.load(Ordering::Relaxed),
        queued,
        max_total,
    );
    workers.over_total.store(over, Ordering::Relaxed);
    if over {
        return;
    }
    for (tp, w) in map.iter_mut() {
        let Some(tx) = &w.tx else { continue };
        if w.stopped.load(Ordering::Relaxed) {
            // Its worker is gone; held records stay uncommitted.
            let bytes: usize = w.parked.drain(..).map(|r| record_size(&r)).sum();
            workers.parked_bytes.fetch_sub(bytes, Ordering::Relaxed);
            continue;
        }
        while let Some(record) = w.parked.pop_front() {
            let size = record_size(&record);
            match tx.try_send(record) {
                Ok(()) => {
                    workers.parked_bytes.fetch_sub(size, Ordering::Relaxed);
                }
                Err(mpsc::error::TrySendError::Full(record)) => {
                    w.parked.push_front(record);
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    worker_died(shared, tp);
                    break;
                }
            }
        }
        // Resume at half the budget, so a partition does not flap.
        let held = workers.parked_bytes.load(Ordering::Relaxed);
        if w.paused
            && may_resume(
                held,
                budget,
                w.parked.len(),
                tx.capacity(),
                tx.max_capacity(),
            )
        {
            match consumer.resume(&tpl_of(tp)) {
                Ok(()) => {
                    w.paused = false;
                    stats.resumes.fetch_add(1, Ordering::Relaxed);
                    debug!(topic = %tp.0, partition = tp.1, "partition resumed");
                }
                Err(e) => warn!(error = %e, "cannot resume partition"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use rdkafka::error::RDKafkaErrorCode;

    #[test]
    pub(super) fn the_total_bound_has_hysteresis() {
        assert!(!over_total(false, 99, 100));
        assert!(over_total(false, 100, 100), "over at the bound");
        assert!(over_total(true, 60, 100), "still over above half");
        assert!(over_total(true, 50, 100));
        assert!(!over_total(true, 49, 100), "under again below half");
    }

    #[test]
    pub(super) fn a_partition_resumes_under_half_the_budget_or_when_its_own_queue_drained() {
        assert!(!may_resume(1000, 1000, 10, 0, 100), "still at the budget");
        assert!(!may_resume(500, 1000, 10, 100, 100), "holds records");
        assert!(may_resume(499, 1000, 10, 0, 100), "under half the budget");
        assert!(
            may_resume(900, 1000, 0, 50, 100),
            "others hold records, but its own queue is half free"
        );
        assert!(!may_resume(900, 1000, 0, 49, 100));
    }

    /// A worker as `drain` sees it, whose finalizer is done or never ends.
    pub(super) fn worker(done: bool) -> (Worker, watch::Sender<bool>) {
        let (done_tx, done_rx) = watch::channel(done);
        let w = Worker {
            tx: None,
            parked: VecDeque::new(),
            paused: false,
            next_offset: 0,
            stop: Default::default(),
            fence: Default::default(),
            stopped: Default::default(),
            done: done_rx,
            thread: None,
            in_flight: Default::default(),
        };
        (w, done_tx)
    }

    #[test]
    pub(super) fn drain_waits_for_finishing_workers_and_cancels_the_rest_at_the_deadline() {
        let (finished, _a) = worker(true);
        let (late, late_tx) = worker(false);
        let (stuck, _c) = worker(false);
        // One finishes while drain waits.
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let _ = late_tx.send(true);
        });
        let mut all = vec![finished, late, stuck];
        let started = Instant::now();
        let abandoned = drain(&mut all, Instant::now() + Duration::from_millis(500));
        assert_eq!(abandoned, 1);
        assert!(!all[0].fence.is_closed());
        assert!(!all[1].fence.is_closed(), "finished before the deadline");
        assert!(all[2].fence.is_closed(), "cancelled at the deadline");
        assert!(started.elapsed() >= Duration::from_millis(450));
    }

    pub(super) fn context() -> (WeirContext, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let obs = Observability {
            metrics: Some(metrics.clone()),
            ..Observability::off()
        };
        obs.health.handlers_loaded.store(true, Ordering::Relaxed);
        obs.health.joined.store(true, Ordering::Relaxed);
        let cx = WeirContext {
            workers: Default::default(),
            drain_timeout: Duration::from_secs(1),
            obs,
            commits: Default::default(),
        };
        (cx, metrics)
    }

    #[test]
    pub(super) fn repeated_commit_failures_make_the_instance_not_ready_until_one_succeeds() {
        let (cx, metrics) = context();
        let tpl = TopicPartitionList::new();
        let failed = || {
            Err(KafkaError::ConsumerCommit(
                RDKafkaErrorCode::RequestTimedOut,
            ))
        };
        cx.commit_callback(failed(), &tpl);
        cx.commit_callback(failed(), &tpl);
        assert!(
            cx.obs.health.not_ready().is_none(),
            "two failures are tolerated"
        );
        cx.commit_callback(failed(), &tpl);
        let why = cx.obs.health.not_ready().expect("not ready after three");
        assert!(why.contains("3 offset commits in a row failed"), "{why}");
        assert!(metrics
            .render()
            .contains("weir_kafka_errors_total{operation=\"commit\"} 3"));
        cx.commit_callback(
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)),
            &tpl,
        );
        assert!(
            cx.obs.health.not_ready().is_some(),
            "nothing to commit is no success"
        );
        cx.commit_callback(Ok(()), &tpl);
        assert!(cx.obs.health.not_ready().is_none());
    }
}
