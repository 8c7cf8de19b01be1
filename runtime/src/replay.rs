//! `weir dlq replay`: re-publishes dead letters to the topic they came from,
//! so a fixed handler gets another go at them, and defines the replay
//! protocol: the headers a replayed record carries and what the pipeline
//! makes of them ([`dedup_id`], [`position_id`]).
//!
//! A replayed record is the dead letter's key and value and its headers
//! without any `weir-*` header, plus:
//!
//! - [`REPLAY_HEADER`] `weir-replay-of: <dlq topic>/<partition>/<offset>`,
//!   the dead letter it comes from;
//! - [`REPLAY_HANDLERS_HEADER`] `weir-replay-handlers`: the handlers that
//!   are to handle it again, comma-separated: `--handler NAME` when given,
//!   else the dead letter's `weir-handler` value (the handler that failed;
//!   for an undecodable record every handler subscribed to it). Empty means
//!   every handler;
//! - [`REPLAY_POSITION_HEADER`] `weir-replay-position: <topic>/<partition>/<offset>`,
//!   where the event was first consumed (the dead letter's
//!   `weir-original-*` headers; for a dead letter of a replayed record, the
//!   position that record carried), so an event without an envelope `id`
//!   keeps its identity, which is its first position.
//!
//! For a handler that the record names, the replayed event is a new
//! delivery: its idempotency id is `<event id>@replay:<weir-replay-of>`, so
//! it is handled once more, however often the same dead letter is replayed.
//! For any other handler subscribed to the topic it is the same event as
//! before, under its original id, which is marked done for a handler that
//! already handled it: the call is skipped. (With `[idempotency]` off, or
//! after the mark expired, or for a handler that never saw the event, it is
//! handled as a first delivery.)
//!
//! Acknowledgements are awaited as they come: at most [`ACK_WINDOW`] replayed
//! records are unacknowledged at once, and a failed one stops the replay,
//! naming its dead letter.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::Config;
use crate::deadletter::header as dlh;
use crate::envelope::Record;
use crate::kafka::{client_config, producer_config};

/// The header `weir dlq replay` adds: `<dlq topic>/<partition>/<offset>` of
/// the dead letter a record replays. A record with it is a replay.
pub const REPLAY_HEADER: &str = "weir-replay-of";

/// The handlers that are to handle a replayed record again, comma-separated;
/// absent or empty: every handler.
pub const REPLAY_HANDLERS_HEADER: &str = "weir-replay-handlers";

/// `<topic>/<partition>/<offset>` where a replayed event was first consumed.
pub const REPLAY_POSITION_HEADER: &str = "weir-replay-position";

/// Replayed records awaiting their acknowledgement at most at once.
pub const ACK_WINDOW: usize = 1000;

/// The idempotency id a handler uses for an event: a replayed record is a
/// new delivery for the handlers it names (its own id, `<id>@replay:<of>`),
/// and the same event for the others (they see it as already done).
pub fn dedup_id<'a>(event_id: &'a str, record: &Record, handler: &str) -> Cow<'a, str> {
    let Some(of) = record.header(REPLAY_HEADER) else {
        return Cow::Borrowed(event_id);
    };
    if !replays_for(record, handler) {
        return Cow::Borrowed(event_id);
    }
    Cow::Owned(format!("{event_id}@replay:{}", String::from_utf8_lossy(of)))
}

/// Whether a replayed record is to be handled again by `handler`: it is
/// named in [`REPLAY_HANDLERS_HEADER`], or that header is absent or empty.
fn replays_for(record: &Record, handler: &str) -> bool {
    let Some(names) = record.header(REPLAY_HANDLERS_HEADER) else {
        return true;
    };
    let names = String::from_utf8_lossy(names);
    let mut names = names
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .peekable();
    names.peek().is_none() || names.any(|n| n == handler)
}

/// The position id of a record: for a replayed record the position it was
/// first consumed at.
pub fn position_id(record: &Record) -> String {
    if record.header(REPLAY_HEADER).is_some() {
        if let Some(p) = record
            .header(REPLAY_POSITION_HEADER)
            .and_then(|v| std::str::from_utf8(v).ok())
            .filter(|p| is_position(p))
        {
            return p.to_owned();
        }
    }
    record.position_id()
}

/// Whether `p` reads `<topic>/<partition>/<offset>`.
fn is_position(p: &str) -> bool {
    let mut parts = p.rsplitn(3, '/');
    let (Some(offset), Some(partition), Some(topic)) = (parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    !topic.is_empty() && partition.parse::<i32>().is_ok() && offset.parse::<i64>().is_ok()
}

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
    /// Only dead letters of this handler version (a version rolled back,
    /// say; `weir handlers` and the admin API name versions).
    #[arg(long)]
    handler_version: Option<String>,
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

/// A header of a dead letter: the last one of that name, which is the one
/// Weir added (the original record's own headers come first, and may
/// carry anything).
fn header<'a>(m: &'a impl Message, name: &str) -> Option<&'a [u8]> {
    m.headers()?
        .iter()
        .filter(|h| h.key == name)
        .last()
        .and_then(|h| h.value)
}

/// A header of a consumed record as text.
pub(crate) fn header_str(m: &impl Message, name: &str) -> Option<String> {
    header(m, name).map(|v| String::from_utf8_lossy(v).into_owned())
}

/// The replay headers of the record replaying dead letter `m`, found at
/// `of` (`<dlq topic>/<partition>/<offset>`).
fn replay_headers(m: &impl Message, of: &str, only: Option<&str>) -> Vec<(&'static str, String)> {
    let mut headers = vec![(REPLAY_HEADER, of.to_owned())];
    let handlers = match only {
        Some(h) => h.to_owned(),
        None => header_str(m, dlh::HANDLER).unwrap_or_default(),
    };
    headers.push((REPLAY_HANDLERS_HEADER, handlers));
    // A dead letter of a replayed record still carries the first position.
    let position = header_str(m, REPLAY_POSITION_HEADER)
        .filter(|p| is_position(p))
        .or_else(|| {
            let topic = header_str(m, dlh::ORIGINAL_TOPIC)?;
            let partition = header_str(m, dlh::ORIGINAL_PARTITION)?;
            let offset = header_str(m, dlh::ORIGINAL_OFFSET)?;
            Some(format!("{topic}/{partition}/{offset}")).filter(|p| is_position(p))
        });
    if let Some(p) = position {
        headers.push((REPLAY_POSITION_HEADER, p));
    }
    headers
}

/// A replayed record's acknowledgement, and the dead letter it replays.
struct Ack {
    of: String,
    delivery: DeliveryFuture,
}

impl Ack {
    async fn wait(self) -> Result<()> {
        match self.delivery.await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err((e, _))) => Err(e).with_context(|| {
                format!("the replay of dead letter {} was not acknowledged", self.of)
            }),
            Err(_) => bail!(
                "the replay of dead letter {} was not acknowledged: the producer closed",
                self.of
            ),
        }
    }
}

/// Replays what matches; returns (replayed, skipped).
async fn replay(args: &ReplayArgs) -> Result<(u64, u64)> {
    let config = Config::load(&args.config)?;
    // `[kafka.options]` and `[kafka.consumer_options]` apply (SASL, TLS, ...).
    let consumer: BaseConsumer = client_config(&config, &config.kafka.consumer_options)
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
    let mut acks: VecDeque<Ack> = VecDeque::with_capacity(ACK_WINDOW);
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
            .is_none_or(|k| header_str(&m, dlh::ERROR_KIND).as_deref() == Some(k))
            && args.handler_version.as_ref().is_none_or(|v| {
                header_str(&m, dlh::HANDLER_VERSION).is_some_and(|x| x.split(',').any(|x| x == v))
            });
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
        for (key, value) in replay_headers(&m, &of, args.handler.as_deref()) {
            headers = headers.insert(Header {
                key,
                value: Some(&value),
            });
        }
        let mut rec = FutureRecord::to(&original)
            .payload(m.payload().unwrap_or_default())
            .headers(headers);
        if let Some(k) = m.key() {
            rec = rec.key(k);
        }
        if acks.len() >= ACK_WINDOW {
            acks.pop_front().expect("the window is full").wait().await?;
        }
        let delivery = loop {
            match producer.send_result(rec) {
                Ok(delivery) => break delivery,
                // The producer's queue is full (its own bound, if set below
                // the window): wait for the oldest acknowledgement, or a bit.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    rec = r;
                    match acks.pop_front() {
                        Some(oldest) => oldest.wait().await?,
                        None => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
                Err((e, _)) => {
                    return Err(e)
                        .with_context(|| format!("cannot enqueue the replay of dead letter {of}"))
                }
            }
        };
        acks.push_back(Ack { of, delivery });
        replayed += 1;
    }
    while let Some(ack) = acks.pop_front() {
        ack.wait().await?;
    }
    producer.flush(Duration::from_secs(30))?;
    Ok((replayed, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(headers: &[(&str, &str)]) -> Record {
        Record {
            topic: "orders".into(),
            partition: 2,
            offset: 40,
            timestamp_ms: 0,
            key: None,
            value: Vec::new(),
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect(),
        }
    }

    #[test]
    fn a_record_that_is_no_replay_keeps_its_ids() {
        let r = record(&[
            (REPLAY_HANDLERS_HEADER, "a"),
            (REPLAY_POSITION_HEADER, "orders/0/1"),
        ]);
        assert!(matches!(dedup_id("e1", &r, "a"), Cow::Borrowed("e1")));
        assert!(matches!(dedup_id("e1", &r, "b"), Cow::Borrowed("e1")));
        // Without `weir-replay-of` the position header is just a header.
        assert_eq!(position_id(&r), "orders/2/40");
    }

    #[test]
    fn a_replay_is_new_only_for_the_handlers_it_names() {
        let of = (REPLAY_HEADER, "orders.dlq/0/7");
        let r = record(&[of, (REPLAY_HANDLERS_HEADER, "enricher, audit")]);
        assert_eq!(dedup_id("e1", &r, "enricher"), "e1@replay:orders.dlq/0/7");
        assert_eq!(dedup_id("e1", &r, "audit"), "e1@replay:orders.dlq/0/7");
        assert!(matches!(dedup_id("e1", &r, "billing"), Cow::Borrowed("e1")));
        // Absent or empty: every handler.
        for r in [record(&[of]), record(&[of, (REPLAY_HANDLERS_HEADER, "")])] {
            assert_eq!(dedup_id("e1", &r, "billing"), "e1@replay:orders.dlq/0/7");
        }
    }

    #[test]
    fn a_replay_keeps_its_first_position() {
        let of = (REPLAY_HEADER, "orders.dlq/0/7");
        let r = record(&[of, (REPLAY_POSITION_HEADER, "orders/1/3")]);
        assert_eq!(position_id(&r), "orders/1/3");
        // A raw event's id is its position; for the handlers the replay names
        // it is a new delivery of that same event.
        assert_eq!(
            dedup_id(&position_id(&r), &r, "h"),
            "orders/1/3@replay:orders.dlq/0/7"
        );
        // A malformed or absent position: the record's own.
        for r in [
            record(&[of, (REPLAY_POSITION_HEADER, "orders/x/3")]),
            record(&[of, (REPLAY_POSITION_HEADER, "")]),
            record(&[of]),
        ] {
            assert_eq!(position_id(&r), "orders/2/40");
        }
        // Topic names may not hold '/', but the parse does not depend on it.
        assert!(is_position("a/b/0/1") && !is_position("0/1") && !is_position("/0/1"));
    }

    #[test]
    fn replay_headers_name_the_handlers_and_the_first_position() {
        use rdkafka::message::OwnedMessage;
        use rdkafka::Timestamp;
        let dead_letter = |headers: &[(&str, &str)]| {
            let mut hs = OwnedHeaders::new();
            for &(k, v) in headers {
                hs = hs.insert(Header {
                    key: k,
                    value: Some(v),
                });
            }
            OwnedMessage::new(
                None,
                None,
                "orders.dlq".into(),
                Timestamp::NotAvailable,
                0,
                7,
                Some(hs),
            )
        };
        let origin = [
            (dlh::HANDLER, "enricher,audit"),
            (dlh::ORIGINAL_TOPIC, "orders"),
            (dlh::ORIGINAL_PARTITION, "1"),
            (dlh::ORIGINAL_OFFSET, "3"),
        ];
        let m = dead_letter(&origin);
        let get = |hs: &[(&str, String)], k: &str| {
            hs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
        };
        let hs = replay_headers(&m, "orders.dlq/0/7", None);
        assert_eq!(get(&hs, REPLAY_HEADER).as_deref(), Some("orders.dlq/0/7"));
        assert_eq!(
            get(&hs, REPLAY_HANDLERS_HEADER).as_deref(),
            Some("enricher,audit")
        );
        assert_eq!(
            get(&hs, REPLAY_POSITION_HEADER).as_deref(),
            Some("orders/1/3")
        );
        let hs = replay_headers(&m, "orders.dlq/0/7", Some("audit"));
        assert_eq!(get(&hs, REPLAY_HANDLERS_HEADER).as_deref(), Some("audit"));
        // The dead letter of a replayed record: its first position wins.
        let mut again = origin.to_vec();
        again.insert(0, (REPLAY_POSITION_HEADER, "orders/0/1"));
        let hs = replay_headers(&dead_letter(&again), "orders.dlq/0/9", None);
        assert_eq!(
            get(&hs, REPLAY_POSITION_HEADER).as_deref(),
            Some("orders/0/1")
        );
    }
}
