//! `[kafka]`: the brokers, the consumer group and its protocol, and the raw
//! librdkafka options.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use serde::Deserialize;

/// Kafka connection and consumer group settings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port]`.
    pub brokers: String,
    /// The consumer group every instance of this deployment joins.
    pub group_id: String,
    /// Raw librdkafka options applied to the consumer and the producer
    /// (escape hatch; ours win where they overlap on delivery semantics).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    /// Raw librdkafka options for the consumer only (e.g. `session.timeout.ms`).
    #[serde(default)]
    pub consumer_options: BTreeMap<String, String>,
    /// Raw librdkafka options for the producer only (e.g. `compression.type`).
    #[serde(default)]
    pub producer_options: BTreeMap<String, String>,
    /// Where a new group starts reading: `earliest` or `latest`.
    #[serde(default = "default_offset_reset")]
    pub auto_offset_reset: String,
    /// How the group rebalances: `consumer` (KIP-848, brokers 4.0+:
    /// incremental, assignments computed by the broker), `cooperative`
    /// (the classic protocol with `cooperative-sticky`: incremental, for
    /// older brokers) or `eager` (classic; every rebalance stops every
    /// partition).
    #[serde(default)]
    pub group_protocol: GroupProtocol,
}

/// The consumer group protocol (`kafka.group_protocol`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupProtocol {
    #[default]
    Consumer,
    Cooperative,
    Eager,
}

impl GroupProtocol {
    pub fn name(self) -> &'static str {
        match self {
            GroupProtocol::Consumer => "consumer",
            GroupProtocol::Cooperative => "cooperative",
            GroupProtocol::Eager => "eager",
        }
    }
}

impl KafkaConfig {
    /// Checks `[kafka]`, naming the key at fault.
    pub(super) fn validate(&self) -> Result<()> {
        if self.brokers.trim().is_empty() {
            bail!("kafka.brokers: must name at least one broker");
        }
        if self.group_id.trim().is_empty() {
            bail!("kafka.group_id: must not be empty");
        }
        if !matches!(self.auto_offset_reset.as_str(), "earliest" | "latest") {
            bail!(
                "kafka.auto_offset_reset: must be \"earliest\" or \"latest\", not {:?}",
                self.auto_offset_reset
            );
        }
        self.validate_group_protocol()
    }

    /// Raw options that the chosen group protocol sets itself or refuses.
    fn validate_group_protocol(&self) -> Result<()> {
        let protocol = self.group_protocol;
        let tables = [
            ("kafka.options", &self.options),
            ("kafka.consumer_options", &self.consumer_options),
        ];
        for (table, options) in tables {
            for key in options.keys() {
                let why = match (key.as_str(), protocol) {
                    ("group.protocol", _) => "set kafka.group_protocol instead",
                    ("partition.assignment.strategy", GroupProtocol::Consumer) => {
                        "the broker assigns partitions with kafka.group_protocol = \"consumer\" \
                         (set \"group.remote.assignor\" to choose its assignor)"
                    }
                    ("partition.assignment.strategy", _) => {
                        "kafka.group_protocol sets it (\"cooperative\" or \"eager\")"
                    }
                    (
                        "session.timeout.ms" | "heartbeat.interval.ms" | "group.protocol.type",
                        GroupProtocol::Consumer,
                    ) => {
                        "with kafka.group_protocol = \"consumer\" the broker sets it \
                         (group.consumer.session.timeout.ms, group.consumer.heartbeat.interval.ms); \
                         remove it, or set kafka.group_protocol = \"cooperative\""
                    }
                    _ => continue,
                };
                bail!("{table}.{key:?}: {why}");
            }
        }
        Ok(())
    }
}

// Kafka's own default for a new group would skip events produced before the
// first start; a handler runtime should see them.
fn default_offset_reset() -> String {
    "earliest".into()
}
