//! What every stage of a partition's path reads: the config, the clients,
//! the stores and the handlers by topic.

use std::collections::HashMap;
use std::sync::Arc;

use super::stats::{Observability, Stats};
use super::transaction::Transactions;
use crate::changelog::Changelog;
use crate::config::Config;
use crate::dedup::Dedup;
use crate::deploy::Slot;
use crate::halt::Halt;
use crate::metrics::HandlerMetrics;
use crate::publish::Publisher;
use crate::state::StateStore;
use crate::telemetry::Tracing;

/// Everything a worker and a finalizer need, shared.
pub(super) struct Shared {
    pub(super) config: Config,
    pub(super) publisher: Publisher,
    pub(super) halt: Halt,
    /// Fault injection for the end-to-end tests: the worker of this
    /// `topic/partition` panics at this offset (`WEIR_FAULT_PANIC_AT`).
    pub(super) panic_at: Option<(String, i32, i64)>,
    pub(super) by_topic: HashMap<String, Vec<Arc<Slot>>>,
    /// Each retry topic, with the dead-letter topic of its source topic
    /// (where a record it cannot route goes).
    pub(super) retry_topics: HashMap<String, String>,
    pub(super) dedup: Option<Arc<Dedup>>,
    /// The handlers' state (in the idempotency store).
    pub(super) state: Option<Arc<StateStore>>,
    /// Where marks are published for the group's other instances.
    pub(super) changelog: Option<Arc<Changelog>>,
    /// Exactly-once mode's transactions.
    pub(super) txn: Option<Arc<Transactions>>,
    pub(super) stats: Arc<Stats>,
    pub(super) obs: Observability,
    /// Per handler name.
    pub(super) handler_metrics: HashMap<String, HandlerMetrics>,
}

impl Shared {
    pub(super) fn tracing(&self) -> &Tracing {
        &self.obs.tracing
    }

    pub(super) fn kafka_error(&self, operation: &str) {
        if let Some(m) = &self.obs.metrics {
            m.kafka_errors.with_label_values(&[operation]).inc();
        }
    }
}
