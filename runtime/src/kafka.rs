//! Kafka client configs: the user's raw options, then what Weir needs.

use std::collections::BTreeMap;

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::error::RDKafkaErrorCode;
use tracing::{debug, info, warn};

use crate::config::{Config, GroupProtocol};

/// The producer every output and dead letter goes through: idempotent,
/// acks from all replicas, Java-compatible key partitioning (these win over
/// the user's options); 5 ms linger unless the user sets `linger.ms`.
pub fn producer_config(config: &Config) -> ClientConfig {
    let mut c = client_config(config, &config.kafka.producer_options);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random");
    // A setting of speed, not of delivery: the user's wins.
    if !user_set(config, &config.kafka.producer_options, "linger.ms") {
        c.set("linger.ms", "5");
    }
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

/// librdkafka's default `message.max.bytes`.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1_000_000;

/// The producer's record size limit: `message.max.bytes` of
/// `[kafka.producer_options]`, else `[kafka.options]`, else librdkafka's default.
pub fn max_message_bytes(config: &Config) -> usize {
    config
        .kafka
        .producer_options
        .get("message.max.bytes")
        .or(config.kafka.options.get("message.max.bytes"))
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_MAX_MESSAGE_BYTES)
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

/// Weir's `fetch.queue.backoff.ms` unless the config sets one.
pub const FETCH_QUEUE_BACKOFF_MS: &str = "20";

pub fn consumer_config(config: &Config) -> ClientConfig {
    let mut c = client_config(config, &config.kafka.consumer_options);
    c.set("group.id", &config.kafka.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", &config.kafka.auto_offset_reset)
        .set("enable.partition.eof", "false");
    match config.kafka.group_protocol {
        GroupProtocol::Consumer => {
            c.set("group.protocol", "consumer");
        }
        GroupProtocol::Cooperative => {
            c.set("group.protocol", "classic")
                .set("partition.assignment.strategy", "cooperative-sticky");
        }
        GroupProtocol::Eager => {
            c.set("group.protocol", "classic")
                .set("partition.assignment.strategy", "range,roundrobin");
        }
    }
    if config.metrics.enabled {
        // Consumer lag comes from the client's statistics.
        c.set(
            "statistics.interval.ms",
            config.metrics.lag_interval_ms.to_string(),
        );
    }
    // Once a partition's prefetch is over its thresholds, librdkafka puts
    // off its next fetch by this much (1 s by default), while the poll loop
    // empties the prefetch in milliseconds: the workers then waited for
    // input (echo moved 85-98k events/s with 1 s, 110-119k with 20 ms:
    // docs/benchmarks.md).
    if !user_set(
        config,
        &config.kafka.consumer_options,
        "fetch.queue.backoff.ms",
    ) {
        c.set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS);
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

/// Creates missing dead-letter and retry topics with their source topic's
/// partition count, so failures have somewhere to go even where the broker
/// does not create topics on first use. Best effort: a failure is logged,
/// and the partition waits at the first failure if the topic is still missing.
pub async fn ensure_topics<C: ConsumerContext>(config: &Config, consumer: &impl Consumer<C>) {
    let Ok(md) = consumer.fetch_metadata(None, Duration::from_secs(10)) else {
        warn!("cannot read cluster metadata; dead-letter and retry topics are not checked");
        return;
    };
    let partitions = |name: &str| {
        md.topics()
            .iter()
            .find(|t| t.name() == name && t.error().is_none())
            .map(|t| t.partitions().len() as i32)
    };
    let mut wanted: Vec<(String, i32)> = Vec::new();
    for h in &config.handlers {
        for source in &h.topics {
            let Some(n) = partitions(source) else {
                continue;
            };
            let dlq = h.dead_letter_topic_of(source);
            for t in std::iter::once(dlq).chain(h.retry_topic_of(source)) {
                if partitions(&t).is_none() && !wanted.iter().any(|(w, _)| *w == t) {
                    wanted.push((t, n));
                }
            }
        }
    }
    if wanted.is_empty() {
        return;
    }
    let new: Vec<NewTopic> = wanted
        .iter()
        .map(|(t, n)| NewTopic::new(t, *n, TopicReplication::Fixed(-1)))
        .collect();
    match create_topics(config, &new).await {
        Ok(results) => {
            for (t, r) in results {
                match r {
                    Ok(()) => info!(topic = %t, "created topic"),
                    Err(RDKafkaErrorCode::TopicAlreadyExists) => debug!(topic = %t, "topic exists"),
                    Err(e) => warn!(topic = %t, error = %e, "cannot create topic"),
                }
            }
        }
        Err(e) => warn!(error = %format!("{e:#}"), "cannot create dead-letter/retry topics"),
    }
}

/// Creates topics with the admin API (brokers and security from the
/// config): each topic's result, or why the request failed as a whole.
pub async fn create_topics(
    config: &Config,
    topics: &[NewTopic<'_>],
) -> anyhow::Result<Vec<(String, Result<(), RDKafkaErrorCode>)>> {
    let admin: AdminClient<DefaultClientContext> = client_config(config, &Default::default())
        .create()
        .map_err(|e| anyhow::anyhow!("cannot create an admin client: {e}"))?;
    let opts = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(10)))
        .request_timeout(Some(Duration::from_secs(10)));
    let results = admin.create_topics(topics, &opts).await?;
    Ok(results
        .into_iter()
        .map(|r| match r {
            Ok(t) => (t, Ok(())),
            Err((t, e)) => (t, Err(e)),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "[kafka]\nbrokers = \"b:9092\"\ngroup_id = \"g\"\n\n\
        [[handler]]\nname = \"h\"\nwasm = \"h.wasm\"\ntopics = [\"in\"]\n";

    #[test]
    fn the_fetch_backoff_is_short_unless_the_user_sets_it() {
        let c = Config::parse(CONFIG).unwrap();
        assert_eq!(
            consumer_config(&c).get("fetch.queue.backoff.ms"),
            Some("20")
        );
        let c = Config::parse(&CONFIG.replace(
            "[[handler]]",
            "[kafka.consumer_options]\n\"fetch.queue.backoff.ms\" = \"500\"\n\n[[handler]]",
        ))
        .unwrap();
        assert_eq!(
            consumer_config(&c).get("fetch.queue.backoff.ms"),
            Some("500")
        );
    }
}
