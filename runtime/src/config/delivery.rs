//! `[delivery]`: at-least-once (the default) or exactly-once, and the
//! transactional id an exactly-once instance writes with.

use anyhow::{bail, Result};
use serde::Deserialize;

use super::KafkaConfig;

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

    /// Checks `[delivery]` and the raw Kafka options it owns, naming the key.
    pub fn validate(&self, kafka: &KafkaConfig, commit_interval_ms: u64) -> Result<()> {
        let tables = [
            ("kafka.options", &kafka.options),
            ("kafka.producer_options", &kafka.producer_options),
            ("kafka.consumer_options", &kafka.consumer_options),
        ];
        for (table, options) in tables {
            for (key, value) in options.iter() {
                let why = match key.as_str() {
                    "transactional.id" => "set delivery.transactional_id instead",
                    "transaction.timeout.ms" => "set delivery.transaction_timeout_ms instead",
                    "isolation.level" if self.exactly_once() && value != "read_committed" => {
                        "exactly-once reads only committed records (the default, read_committed)"
                    }
                    _ => continue,
                };
                bail!("{table}.{key:?}: {why}");
            }
        }
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

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const BASE: &str = "[kafka]\nbrokers = \"b:9092\"\ngroup_id = \"g\"\n";

    fn delivery_error(extra: &str) -> String {
        let c = Config::parse(&format!("{BASE}{extra}")).expect("parses");
        let pipeline = c.pipeline.commit_interval_ms;
        match c.delivery.validate(&c.kafka, pipeline) {
            Ok(()) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn exactly_once_needs_a_transactional_id_and_names_the_key() {
        let e = delivery_error("[delivery]\nmode = \"exactly-once\"\n");
        assert!(e.starts_with("delivery.transactional_id:"), "{e}");
        let e = delivery_error(
            "[delivery]\nmode = \"exactly-once\"\ntransactional_id_env = \"WEIR_TEST_NO_SUCH_VAR\"\n",
        );
        assert!(e.contains("WEIR_TEST_NO_SUCH_VAR"), "{e}");
        assert_eq!(
            delivery_error("[delivery]\nmode = \"exactly-once\"\ntransactional_id = \"pod-0\"\n"),
            ""
        );
    }

    #[test]
    fn options_the_delivery_mode_owns_are_refused() {
        let e = delivery_error("[kafka.producer_options]\n\"transactional.id\" = \"x\"\n");
        assert!(
            e.starts_with("kafka.producer_options.\"transactional.id\""),
            "{e}"
        );
        let e = delivery_error(
            "[kafka.consumer_options]\n\"isolation.level\" = \"read_uncommitted\"\n\n[delivery]\nmode = \"exactly-once\"\ntransactional_id = \"a\"\n",
        );
        assert!(e.contains("isolation.level"), "{e}");
        let e = delivery_error(
            "[pipeline]\ncommit_interval_ms = 20000\n\n[delivery]\nmode = \"exactly-once\"\ntransactional_id = \"a\"\n",
        );
        assert!(e.starts_with("delivery.transaction_timeout_ms"), "{e}");
        let e = delivery_error("[delivery]\ntransactional_id = \"a\"\n");
        assert!(e.contains("only used with"), "{e}");
    }
}
