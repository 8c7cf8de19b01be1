//! Committing stored offsets: periodically, on revoke and on shutdown;
//! failures are counted, and repeated ones make the instance not ready.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use tracing::{debug, error, info};

use super::stats::Observability;

/// Commit failures in a row after which the instance is not ready.
const FAILURES_NOT_READY: u32 = 3;

/// Commits the stored offsets every `interval` (asynchronously: the result
/// reaches the consumer's commit callback, [`Commits::record`]).
pub(super) fn every<C: ConsumerContext + 'static>(
    consumer: Arc<StreamConsumer<C>>,
    interval: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        loop {
            tick.tick().await;
            let _ = consumer.commit_consumer_state(CommitMode::Async);
        }
    })
}

/// What the results of commits say about the instance: each failure is
/// logged and counted; after [`FAILURES_NOT_READY`] in a row the instance
/// is not ready until a commit succeeds.
#[derive(Debug, Default)]
pub(super) struct Commits {
    failures_in_a_row: AtomicU32,
}

impl Commits {
    pub(super) fn record(&self, result: KafkaResult<()>, obs: &Observability) {
        match result {
            Ok(()) => {
                if self.failures_in_a_row.swap(0, Ordering::Relaxed) >= FAILURES_NOT_READY {
                    info!("offset commits succeed again");
                }
                obs.health.clear_problem("commit");
            }
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                if let Some(m) = &obs.metrics {
                    m.kafka_errors.with_label_values(&["commit"]).inc();
                }
                let n = self.failures_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
                error!(error = %e, failures_in_a_row = n, "offset commit failed");
                if n >= FAILURES_NOT_READY {
                    obs.health.set_problem(
                        "commit",
                        format!("{n} offset commits in a row failed, the last with: {e}"),
                    );
                }
            }
        }
    }
}

/// Commits the stored offsets now; failures are counted by the commit
/// callback.
pub(super) fn commit_sync<C: ConsumerContext>(consumer: &impl Consumer<C>) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => debug!("offsets committed"),
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(e) => error!(error = %e, "offset commit failed"),
    }
}
