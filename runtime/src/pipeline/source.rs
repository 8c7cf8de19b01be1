//! The consumer side: records handed to each partition's worker, held and
//! paused when the work in flight reaches its bounds, resumed when it
//! drains. (Assignment and revocation: `group`.)

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::TopicPartitionList;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, warn};

use super::consumer::{GroupConsumer, TopicPartition};
use super::finalizer::{Finalizer, Step};
use super::shared::Shared;
use super::worker::PartitionWorker;
use crate::envelope::Record;
use crate::fence::Fence;
use crate::halt::panic_text;
use crate::state::Overlay;

/// A partition's worker as the poll loop and the rebalance callback see it.
pub(super) struct Worker {
    pub(super) tx: Option<mpsc::Sender<Record>>,
    /// Records fetched while the worker's queue was full, handed over
    /// first as it drains (past `prefetch_kbytes` held, or over the total
    /// bound after the poll loop's hold, the partition is paused too).
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

pub(super) fn tpl_of(tp: &TopicPartition) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&tp.0, tp.1);
    tpl
}

/// Hands a record to its partition's worker; parks it when the worker is
/// full, and pauses the partition past `prefetch_kbytes` held or over the
/// total bound.
pub(super) fn hand_over(
    shared: &Arc<Shared>,
    consumer: &Arc<dyn GroupConsumer>,
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

/// How long the poll loop holds off taking records over the total bound
/// before it pauses partitions instead.
pub(super) const HOLD: Duration = Duration::from_secs(1);

/// Whether the poll loop takes records `now`: not while the work in flight
/// is `over` the total bound, for up to [`HOLD`] since it went over
/// (`over_since`, kept here).
pub(super) fn taking(over: bool, over_since: &mut Option<Instant>, now: Instant) -> bool {
    if !over {
        *over_since = None;
        return true;
    }
    let since = *over_since.get_or_insert(now);
    now.saturating_duration_since(since) >= HOLD
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
pub(super) fn unpark(consumer: &dyn GroupConsumer, workers: &Workers, shared: &Shared) {
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

/// Starts a partition's worker thread (after the restore of its marks and
/// state) and its finalizer task.
pub(super) fn spawn_worker(
    shared: Arc<Shared>,
    consumer: &Arc<dyn GroupConsumer>,
    tp: &TopicPartition,
    first_offset: i64,
) -> Worker {
    let capacity = shared.config.pipeline.max_in_flight_per_partition;
    let (tx, rx) = mpsc::channel::<Record>(capacity);
    let (pending_tx, pending_rx) = mpsc::channel::<Step>(capacity);
    let (done_tx, done_rx) = watch::channel(false);
    let fence = Arc::new(Fence::default());
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = Arc::new(AtomicBool::new(false));
    let handlers = shared.by_topic.get(&tp.0).cloned().unwrap_or_default();
    let in_flight = Arc::new(AtomicI64::new(0));
    let overlay = Arc::new(Overlay::new(shared.state.clone()));
    debug!(topic = %tp.0, partition = tp.1, first_offset, "starting partition worker");

    let finalizer = Finalizer {
        tp: tp.clone(),
        consumer: consumer.clone(),
        shared: shared.clone(),
        in_flight: in_flight.clone(),
        fence: fence.clone(),
        stopped: stopped.clone(),
        closing: stop.clone(),
        overlay: overlay.clone(),
    };
    {
        let halt = shared.halt.clone();
        let tp = tp.clone();
        tokio::spawn(async move {
            use futures::FutureExt;
            let run = std::panic::AssertUnwindSafe(finalizer.run(pending_rx)).catch_unwind();
            if let Err(panic) = run.await {
                halt.halt(format!(
                    "the finalizer of partition {}/{} panicked: {}",
                    tp.0,
                    tp.1,
                    panic_text(panic.as_ref())
                ));
            }
            let _ = done_tx.send(true);
        });
    }
    let thread = {
        let fence = fence.clone();
        let stop = stop.clone();
        let tp = tp.clone();
        let runtime = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name(format!("weir-{}-{}", tp.0, tp.1))
            .spawn(move || {
                let halt = shared.halt.clone();
                // The marks of the partition's previous owners first.
                let is_retry = shared.retry_topics.contains_key(&tp.0);
                if let (Some(changelog), Some(dedup)) = (&shared.changelog, &shared.dedup) {
                    // A retry topic's events have no state.
                    let state = shared.state.as_deref().filter(|_| !is_retry);
                    changelog.restore(dedup, state, (&tp.0, tp.1), &fence, &stop, &shared.obs.health);
                }
                let worker =
                    PartitionWorker::new(shared, handlers, fence, is_retry, tp.clone(), overlay);
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    worker.run(rx, pending_tx, &stop, runtime)
                }));
                if let Err(panic) = run {
                    // Noticed at once, not at the partition's next record.
                    let text = panic_text(panic.as_ref());
                    error!(topic = %tp.0, partition = tp.1, panic = %text, "a partition worker panicked");
                    halt.halt(format!(
                        "the worker of partition {}/{} panicked: {text}",
                        tp.0, tp.1
                    ));
                }
            })
            .expect("spawning a worker thread")
    };
    Worker {
        tx: Some(tx),
        parked: VecDeque::new(),
        paused: false,
        next_offset: first_offset,
        stop,
        fence,
        stopped,
        done: done_rx,
        thread: Some(thread),
        in_flight,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn over_the_total_bound_the_loop_holds_off_then_takes_again_to_pause() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut since = None;
        assert!(taking(false, &mut since, at(0)), "under the bound");
        assert!(!taking(true, &mut since, at(10)), "over: held");
        assert!(!taking(true, &mut since, at(900)), "still within HOLD");
        assert!(
            taking(true, &mut since, at(1_010)),
            "held for HOLD: takes (and pauses)"
        );
        assert!(taking(false, &mut since, at(1_100)), "under again");
        assert!(
            !taking(true, &mut since, at(1_200)),
            "a new hold starts afresh"
        );
    }
}
