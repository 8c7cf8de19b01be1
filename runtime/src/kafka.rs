//! Kafka client configs: the user's raw options, then what Weir needs.

use std::collections::BTreeMap;

use rdkafka::config::ClientConfig;

use crate::config::Config;

/// The producer every output and dead letter goes through: idempotent,
/// acks from all replicas, Java-compatible key partitioning.
pub fn producer_config(config: &Config) -> ClientConfig {
    let mut c = client_config(config, &config.kafka.producer_options);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5");
    // librdkafka's default queue is 1 GiB: bound the memory it may take.
    if !user_set(
        config,
        &config.kafka.producer_options,
        "queue.buffering.max.kbytes",
    ) {
        c.set("queue.buffering.max.kbytes", "32768");
    }
    c
}

/// Whether the user set `key` in `[kafka.options]` or the client's table.
fn user_set(config: &Config, specific: &BTreeMap<String, String>, key: &str) -> bool {
    config.kafka.options.contains_key(key) || specific.contains_key(key)
}

/// The user's raw options (shared, then client-specific) and the brokers.
pub fn client_config(config: &Config, specific: &BTreeMap<String, String>) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (k, v) in config.kafka.options.iter().chain(specific) {
        c.set(k, v);
    }
    c.set("bootstrap.servers", &config.kafka.brokers);
    c
}

pub fn consumer_config(config: &Config) -> ClientConfig {
    let mut c = client_config(config, &config.kafka.consumer_options);
    c.set("group.id", &config.kafka.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", &config.kafka.auto_offset_reset)
        .set("enable.partition.eof", "false");
    if config.metrics.enabled {
        // Consumer lag comes from the client's statistics.
        c.set(
            "statistics.interval.ms",
            config.metrics.lag_interval_ms.to_string(),
        );
    }
    if !user_set(
        config,
        &config.kafka.consumer_options,
        "queued.max.messages.kbytes",
    ) {
        c.set(
            "queued.max.messages.kbytes",
            config.pipeline.prefetch_kbytes.to_string(),
        );
    }
    c
}
