//! `[delivery]`: at-least-once (the default) or exactly-once, and the
//! transactional id an exactly-once instance writes with.

use anyhow::{bail, Result};
use serde::Deserialize;

/// How the effects of an event reach Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeliveryMode {
    /// Outputs are published, then the event is marked and its offset
    /// committed: a crash in between publishes them again (the idempotency
    /// store catches what it can).
    #[default]
    AtLeastOnce,
    /// Each commit interval is one Kafka transaction holding every output,
    /// dead letter, retry record and changelog record of the events it
    /// finishes, and their input offsets.
    ExactlyOnce,
}

/// The `[delivery]` table.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    #[serde(default)]
    pub mode: DeliveryMode,
    /// This instance's `transactional.id` (exactly-once): stable across
    /// restarts of the same instance, different from every other instance.
    #[serde(default)]
    pub transactional_id: Option<String>,
    /// The environment variable holding the transactional id (e.g.
    /// `POD_NAME` in a StatefulSet), when `transactional_id` is not set.
    #[serde(default)]
    pub transactional_id_env: Option<String>,
    /// How long a transaction may stay open on the broker before it aborts
    /// it (`transaction.timeout.ms`): what a crashed instance's open
    /// transaction holds back `read_committed` readers for at most.
    #[serde(default = "default_transaction_timeout_ms")]
    pub transaction_timeout_ms: u64,
}

// Kafka Streams' choice for exactly-once: short, so a crashed instance's
// open transaction holds readers back for seconds, not a minute.
const fn default_transaction_timeout_ms() -> u64 {
    10_000
}

impl DeliveryConfig {
    pub fn exactly_once(&self) -> bool {
        self.mode == DeliveryMode::ExactlyOnce
    }

    /// The transactional id: `transactional_id`, else the variable named
    /// by `transactional_id_env`; an error names the key.
    pub fn transactional_id(&self) -> Result<String> {
        if let Some(id) = &self.transactional_id {
            if id.trim().is_empty() {
                bail!("delivery.transactional_id: must not be empty");
            }
            return Ok(id.clone());
        }
        if let Some(var) = &self.transactional_id_env {
            return match std::env::var(var) {
                Ok(id) if !id.trim().is_empty() => Ok(id),
                _ => bail!(
                    "delivery.transactional_id_env: the environment variable {var} is not set \
                     (or empty); it must hold this instance's transactional id"
                ),
            };
        }
        bail!(
            "delivery.transactional_id: exactly-once mode needs a transactional id per instance, \
             stable across its restarts (e.g. the pod name of a StatefulSet: \
             transactional_id_env = \"POD_NAME\")"
        )
    }

    pub fn validate(&self, commit_interval_ms: u64) -> Result<()> {
        if !self.exactly_once() {
            if self.transactional_id.is_some() || self.transactional_id_env.is_some() {
                bail!("delivery.transactional_id: only used with delivery.mode = \"exactly-once\"");
            }
            return Ok(());
        }
        self.transactional_id()?;
        if self.transaction_timeout_ms <= commit_interval_ms {
            bail!(
                "delivery.transaction_timeout_ms ({}) must be above pipeline.commit_interval_ms ({}): \
                 each commit interval is one transaction",
                self.transaction_timeout_ms,
                commit_interval_ms
            );
        }
        Ok(())
    }
}
