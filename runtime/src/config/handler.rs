//! `[[handler]]`: one handler component, what it subscribes to, its
//! limits and retries, and the topics derived from them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::RolloutConfig;

/// One handler component and what it subscribes to.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerConfig {
    /// Unique name; appears in logs, metrics and dead-letter headers.
    pub name: String,
    /// Path of the `.wasm` component (relative to the config file).
    pub wasm: PathBuf,
    /// Topics whose events this handler receives.
    pub topics: Vec<String>,
    /// Only events of these envelope `eventType`s; empty means all.
    #[serde(default)]
    pub event_types: Vec<String>,
    /// Dead-letter topic; default `<source topic>.dlq`.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// Values the handler reads with the host `config` import.
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    /// Attempts for a `retriable` error before the event is dead-lettered.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// First retry delay in milliseconds; doubles per attempt, with jitter.
    #[serde(default = "default_initial_backoff_ms")]
    pub initial_backoff_ms: u64,
    /// Upper bound on a retry delay in milliseconds.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
    /// `blocking`: retry in place, keeping partition order (the partition
    /// waits). `topic`: send the event to a retry topic and go on; it comes
    /// back after its delay, so one bad event does not hold up the partition.
    #[serde(default)]
    pub retry_mode: RetryMode,
    /// The retry topic in `topic` mode; default `<source topic>.retry`.
    #[serde(default)]
    pub retry_topic: Option<String>,
    /// CPU budget of one call, in wasmtime fuel units.
    #[serde(default = "default_fuel_per_event")]
    pub fuel_per_event: u64,
    /// Memory cap of one instance, in MiB: all its linear memories together.
    #[serde(default = "default_memory_limit_mib")]
    pub memory_limit_mib: u64,
    /// Linear memories one instance may have (1 to 16); a component that
    /// declares more is refused at load.
    #[serde(default = "default_max_memories")]
    pub max_memories: u32,
    /// Wall-clock deadline of one call, in milliseconds.
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u64,
    /// Environment variables of the runtime the handler may read (by name).
    #[serde(default)]
    pub allow_env: Vec<String>,
    /// A host folder the handler may read (not write), mounted at `/data`.
    #[serde(default)]
    pub read_only_dir: Option<PathBuf>,
    /// A fuel-per-second budget shared by the handler's calls; when it is
    /// spent, the partitions feeding the handler pause until it refills.
    #[serde(default)]
    pub fuel_per_second: Option<u64>,
    /// A sample events file (the `weir try` format) a new version must
    /// handle without failing before it takes traffic.
    #[serde(default)]
    pub sample_events: Option<PathBuf>,
    /// Automatic rollback of a new version that fails too often.
    #[serde(default)]
    pub rollout: Option<RolloutConfig>,
    /// Limits of the handler's state (`weir:plugin/state`).
    #[serde(default)]
    pub state: StateConfig,
}

/// `[handler.state]`: limits of a handler's key-value state.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// The largest value one key may hold, in bytes.
    #[serde(default = "default_state_max_value_bytes")]
    pub max_value_bytes: u64,
    /// The most the handler's state (keys and values) may take in an
    /// instance's store, in bytes.
    #[serde(default = "default_state_max_total_bytes")]
    pub max_total_bytes: u64,
    /// Values expire this many seconds after they were last written; none
    /// by default.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            max_value_bytes: default_state_max_value_bytes(),
            max_total_bytes: default_state_max_total_bytes(),
            ttl_secs: None,
        }
    }
}

/// A value must fit one changelog record, below the default 1 MB limit.
pub const MAX_STATE_VALUE_BYTES: u64 = 512 * 1024;

const fn default_state_max_value_bytes() -> u64 {
    64 * 1024
}
const fn default_state_max_total_bytes() -> u64 {
    1 << 30
}

/// How `retriable` failures are retried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RetryMode {
    /// In place, in partition order.
    #[default]
    Blocking,
    /// Through a retry topic, out of order.
    Topic,
}

// The article's example: three tries, then the dead-letter topic.
const fn default_max_attempts() -> u32 {
    3
}
const fn default_initial_backoff_ms() -> u64 {
    100
}
const fn default_max_backoff_ms() -> u64 {
    10_000
}
// About a second of CPU for typical code; a runaway loop ends quickly.
const fn default_fuel_per_event() -> u64 {
    1_000_000_000
}
const fn default_memory_limit_mib() -> u64 {
    64
}
const fn default_deadline_ms() -> u64 {
    5_000
}
// A component built by the usual toolchains has one linear memory.
const fn default_max_memories() -> u32 {
    1
}

impl HandlerConfig {
    /// The dead-letter topic of a source topic.
    pub fn dead_letter_topic_of(&self, source: &str) -> String {
        self.dead_letter_topic
            .clone()
            .unwrap_or_else(|| crate::deadletter::default_topic(source))
    }

    /// Whether an event of this type is for this handler.
    pub fn accepts(&self, event_type: &str) -> bool {
        self.event_types.is_empty() || self.event_types.iter().any(|t| t == event_type)
    }

    /// The retry topic of a source topic, in `topic` retry mode.
    pub fn retry_topic_of(&self, source: &str) -> Option<String> {
        (self.retry_mode == RetryMode::Topic).then(|| {
            self.retry_topic
                .clone()
                .unwrap_or_else(|| format!("{source}.retry"))
        })
    }

    /// Every retry topic this handler consumes.
    pub fn retry_topics(&self) -> Vec<String> {
        self.topics
            .iter()
            .filter_map(|t| self.retry_topic_of(t))
            .collect()
    }
}
