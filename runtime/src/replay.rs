//! `weir dlq replay`: re-publishes dead letters to the topic they came from,
//! so a fixed handler gets another go at them.
//!
//! A replayed record is the original key, value and headers (the dead-letter
//! headers removed) plus `weir-replay-of: <dlq topic>/<partition>/<offset>`.
//! The runtime gives a replayed event its own idempotency key, so it is
//! handled again once, however often the same dead letter is replayed.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::Config;
use crate::deadletter::header as dlh;
use crate::kafka::producer_config;
use crate::pipeline::REPLAY_HEADER;

/// `weir dlq` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// Re-publish dead letters to their original topic and report how many.
    Replay(ReplayArgs),
}

/// Which dead letters to replay.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The TOML config file (for the brokers and producer options).
    #[arg(long, short)]
    config: PathBuf,
    /// The dead-letter topic to read.
    #[arg(long)]
    topic: String,
    /// Only dead letters of this handler.
    #[arg(long)]
    handler: Option<String>,
    /// Only dead letters of this failure class (e.g. `fatal`, `retries-exhausted`).
    #[arg(long)]
    error_kind: Option<String>,
    /// Only dead letters at or after this offset of the dead-letter topic.
    #[arg(long)]
    from_offset: Option<i64>,
    /// Only dead letters before this offset of the dead-letter topic.
    #[arg(long)]
    to_offset: Option<i64>,
}

/// Runs a `weir dlq` command.
pub async fn run(command: DlqCommand) -> Result<()> {
    match command {
        DlqCommand::Replay(args) => {
            let n = replay(&args).await?;
            println!("replayed {} dead letters from {}", n.0, args.topic);
            if n.1 > 0 {
                println!("skipped {} that did not match the filters", n.1);
            }
            Ok(())
        }
    }
}

fn header<'a>(m: &'a impl Message, name: &str) -> Option<&'a [u8]> {
    m.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
}

/// A header of a consumed record as text.
pub(crate) fn header_str(m: &impl Message, name: &str) -> Option<String> {
    header(m, name).map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Replays what matches; returns (replayed, skipped).
async fn replay(args: &ReplayArgs) -> Result<(u64, u64)> {
    let config = Config::load(&args.config)?;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("group.id", format!("{}-dlq-replay", config.kafka.group_id))
        .set("enable.auto.commit", "false")
        .create()?;
    let md = consumer
        .fetch_metadata(Some(&args.topic), Duration::from_secs(10))
        .with_context(|| format!("cannot read metadata of {}", args.topic))?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        bail!("dead-letter topic {} does not exist", args.topic);
    }
    // Replay what is there now; dead letters written meanwhile wait for the next run.
    let mut ends = Vec::new();
    let mut tpl = TopicPartitionList::new();
    for &p in &partitions {
        let (lo, hi) = consumer.fetch_watermarks(&args.topic, p, Duration::from_secs(10))?;
        let from = args.from_offset.unwrap_or(lo).max(lo);
        let to = args.to_offset.unwrap_or(hi).min(hi);
        if from < to {
            tpl.add_partition_offset(&args.topic, p, Offset::Offset(from))?;
            ends.push((p, to));
        }
    }
    if ends.is_empty() {
        return Ok((0, 0));
    }
    consumer.assign(&tpl)?;
    let producer: FutureProducer = producer_config(&config).create()?;
    let (mut replayed, mut skipped) = (0u64, 0u64);
    let mut acks = Vec::new();
    let mut open: std::collections::HashMap<i32, i64> = ends.iter().copied().collect();
    while !open.is_empty() {
        let m = consumer
            .poll(Duration::from_secs(10))
            .context("timed out reading the dead-letter topic")??;
        let Some(&end) = open.get(&m.partition()) else {
            continue;
        };
        if m.offset() >= end {
            open.remove(&m.partition());
            continue;
        }
        if m.offset() + 1 >= end {
            open.remove(&m.partition());
        }
        let matches = args.handler.as_ref().is_none_or(|h| {
            header_str(&m, dlh::HANDLER).is_some_and(|v| v.split(',').any(|x| x == h))
        }) && args
            .error_kind
            .as_ref()
            .is_none_or(|k| header_str(&m, dlh::ERROR_KIND).as_deref() == Some(k));
        let Some(original) = header_str(&m, dlh::ORIGINAL_TOPIC) else {
            skipped += 1;
            continue;
        };
        if !matches {
            skipped += 1;
            continue;
        }
        let mut headers = OwnedHeaders::new();
        if let Some(hs) = m.headers() {
            for h in hs.iter() {
                if h.key.starts_with("weir-") {
                    continue;
                }
                headers = headers.insert(Header {
                    key: h.key,
                    value: h.value,
                });
            }
        }
        let of = format!("{}/{}/{}", m.topic(), m.partition(), m.offset());
        headers = headers.insert(Header {
            key: REPLAY_HEADER,
            value: Some(&of),
        });
        let mut rec = FutureRecord::to(&original)
            .payload(m.payload().unwrap_or_default())
            .headers(headers);
        if let Some(k) = m.key() {
            rec = rec.key(k);
        }
        acks.push(
            producer
                .send_result(rec)
                .map_err(|(e, _)| e)
                .context("cannot enqueue a replayed record")?,
        );
        replayed += 1;
    }
    for a in acks {
        a.await
            .context("producer closed")?
            .map_err(|(e, _)| e)
            .context("a replayed record was not acknowledged")?;
    }
    producer.flush(Duration::from_secs(30))?;
    Ok((replayed, skipped))
}
