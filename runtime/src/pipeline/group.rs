//! The consumer group as the runtime sees it: partitions assigned and
//! revoked (a revoked partition's worker drained, then fenced off, then its
//! offsets committed), membership and broker reachability in `/readyz`,
//! rebalance and commit results counted, fatal consumer errors.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::TopicPartitionList;
use tracing::{error, info, warn};

use super::commit;
use super::consumer::partition_key;
use super::shared::Shared;
use super::source::{Worker, Workers};
use super::stats::Observability;
use super::transaction::Transactions;
use crate::config::GroupProtocol;

/// The consumer context: flushes revoked partitions before they move,
/// reports joining the group, commit results and consumer lag.
pub(super) struct WeirContext {
    pub(super) workers: Arc<Workers>,
    pub(super) drain_timeout: Duration,
    pub(super) obs: Observability,
    /// Commits that failed since the last one that succeeded.
    pub(super) commits: commit::Commits,
    /// Exactly-once: revoked partitions are committed with the open
    /// transaction; lost ones abort it.
    pub(super) txn: Option<Arc<Transactions>>,
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
            blocking(|| drain(&mut revoked, deadline));
            // From here nothing of theirs is published, marked or committed.
            for w in &revoked {
                w.fence.close();
            }
        }
        match &self.txn {
            None => commit::commit_sync(base),
            // Their events may share the open transaction with others':
            // it cannot commit without their offsets.
            Some(txn) if lost => txn.fail("partitions were lost".into()),
            Some(txn) => {
                // The transaction holding their events commits before
                // they move (this holds the poll, as the drain does).
                // (Not after an abort: the rewind keeps what it learnt.)
                if blocking(|| txn.commit()) {
                    let tps: Vec<_> = tpl
                        .elements()
                        .iter()
                        .map(|e| (e.topic().to_owned(), e.partition()))
                        .collect();
                    txn.forget(&tps);
                }
            }
        }
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

/// Runs blocking work in a rebalance callback, which runs inside the
/// consumer's poll on one of the async runtime's worker threads: the
/// runtime hands that thread's other tasks to another one meanwhile.
pub(super) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use std::collections::VecDeque;
    use tokio::sync::watch;

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
            txn: None,
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
