//! The `[pipeline]` table (bounds on work in flight, commits, drains) and
//! the `[idempotency]` table (the store of handled event ids and its
//! changelog).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::default_true;

/// Bounds on work in flight and how often offsets are committed.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Events queued for a partition's worker; records fetched beyond are
    /// held (and, past `prefetch_kbytes` held, its fetching pauses).
    #[serde(default = "default_partition_queue")]
    pub max_in_flight_per_partition: usize,
    /// Events queued for the workers over all partitions before the poll
    /// loop stops taking records (for up to a second; then fetching
    /// pauses); with the per-partition bound and `prefetch_kbytes` this
    /// bounds memory under any input rate.
    #[serde(default = "default_total_queue")]
    pub max_in_flight_total: usize,
    /// Kilobytes librdkafka may prefetch ahead of the handlers, in total.
    #[serde(default = "default_prefetch_kbytes")]
    pub prefetch_kbytes: u64,
    /// How often final offsets are committed, in milliseconds.
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
    /// How long a graceful shutdown or a partition revoke waits for
    /// in-flight events before giving up on them (they are redelivered).
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
}

/// The idempotency store (RocksDB) of (handler, event id) pairs whose
/// outcome is final.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// Skip events a handler already handled (or dead-lettered).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Folder of the store (relative to the config file). One per instance.
    #[serde(default = "default_store_path")]
    pub path: PathBuf,
    /// How long a mark is kept, in seconds (also the changelog topic's
    /// `retention.ms` when Weir creates it).
    #[serde(default = "default_retention_secs")]
    pub retention_secs: u64,
    /// Publish marks to the group's changelog topic and restore them when a
    /// partition is assigned, so "one handling per event id" holds across
    /// the instances of a group, not only within one process.
    #[serde(default = "default_true")]
    pub changelog: bool,
    /// The changelog topic; default `<group_id>.weir-idempotency` (created
    /// when missing).
    #[serde(default)]
    pub changelog_topic: Option<String>,
    /// The handlers' state changelog (compacted); default
    /// `<group_id>.weir-state` (created when missing).
    #[serde(default)]
    pub state_topic: Option<String>,
}

fn default_store_path() -> PathBuf {
    PathBuf::from("weir-state")
}
// A week: longer than any realistic redelivery or replay window.
const fn default_retention_secs() -> u64 {
    7 * 24 * 3600
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            path: default_store_path(),
            retention_secs: default_retention_secs(),
            changelog: true,
            changelog_topic: None,
            state_topic: None,
        }
    }
}

impl IdempotencyConfig {
    pub fn retention(&self) -> Duration {
        Duration::from_secs(self.retention_secs)
    }
}

// Enough to keep a handler busy while the poll loop waits for a core and a
// resumed partition's fetching starts again (on two cores, 1,000 left the
// workers idle half the time; with 5,000 the four workers still waited for
// input a quarter to half of the time, and 20,000 moved a third more
// events: docs/benchmarks.md, "deeper worker queues"), small enough that
// a partition of 1 KiB events holds some tens of MiB.
const fn default_partition_queue() -> usize {
    20_000
}
const fn default_total_queue() -> usize {
    80_000
}
// librdkafka's default (64 MiB) is generous for a process that also hosts
// handler instances; 16 MiB still keeps a fast handler fed.
const fn default_prefetch_kbytes() -> u64 {
    16 * 1024
}
// One commit a second bounds redelivery after a crash to about a second of work.
const fn default_commit_interval_ms() -> u64 {
    1000
}
// Below the default session timeout, so a revoke finishes before the group gives up.
const fn default_drain_timeout_ms() -> u64 {
    10_000
}
impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            max_in_flight_per_partition: default_partition_queue(),
            max_in_flight_total: default_total_queue(),
            prefetch_kbytes: default_prefetch_kbytes(),
            commit_interval_ms: default_commit_interval_ms(),
            drain_timeout_ms: default_drain_timeout_ms(),
        }
    }
}

impl PipelineConfig {
    pub fn commit_interval(&self) -> Duration {
        Duration::from_millis(self.commit_interval_ms)
    }
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
}
