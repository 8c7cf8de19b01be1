//! What `weir dev` prints: a topic's records and a group's committed
//! offsets, read from the mock cluster.

use std::time::Duration;

use anyhow::{bail, Result};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::deadletter::header as dlh;
use crate::replay::header_str;

/// Prints every record of `topic`.
pub(super) fn print_topic(brokers: &str, topic: &str, title: &str) -> Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "weir-dev-reader")
        .set("enable.auto.commit", "false")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
    let mut tpl = TopicPartitionList::new();
    let mut expected = 0;
    for p in metadata.topics().iter().flat_map(|t| t.partitions()) {
        let (lo, hi) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(5))?;
        expected += hi - lo;
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    println!("\n== {title} ({expected} records)");
    let mut seen = 0;
    while seen < expected {
        let Some(msg) = consumer.poll(Duration::from_secs(5)) else {
            bail!("timed out reading {topic}");
        };
        let msg = msg?;
        seen += 1;
        let key = msg
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_default();
        let value = String::from_utf8_lossy(msg.payload().unwrap_or_default());
        if let Some(kind) = header_str(&msg, dlh::ERROR_KIND) {
            println!(
                "  [{}:{}] key={key} kind={kind} handler={} reason={:?}\n      original value: {}",
                header_str(&msg, dlh::ORIGINAL_TOPIC).unwrap_or_default(),
                header_str(&msg, dlh::ORIGINAL_OFFSET).unwrap_or_default(),
                header_str(&msg, dlh::HANDLER).unwrap_or_default(),
                header_str(&msg, dlh::ERROR_MESSAGE).unwrap_or_default(),
                truncate(&value, 100),
            );
        } else {
            println!(
                "  p{} key={key} causation={} value={}",
                msg.partition(),
                header_str(&msg, "causation-id").unwrap_or_default(),
                truncate(&value, 160)
            );
        }
    }
    Ok(())
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

/// Prints the group's committed offsets of `topic` beside the end offsets.
pub(super) fn print_committed(
    brokers: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(5))?;
    println!("\n== committed offsets of group {group}");
    for e in committed.elements() {
        let (_, hi) = consumer.fetch_watermarks(topic, e.partition(), Duration::from_secs(5))?;
        let c = match e.offset() {
            Offset::Offset(o) => o.to_string(),
            other => format!("{other:?}"),
        };
        println!("  {topic}[{}] committed {c} / end {hi}", e.partition());
    }
    Ok(())
}
