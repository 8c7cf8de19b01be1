//! `weir state`: an operator's view of the handlers' state, and a
//! deliberate reset.
//!
//! With the changelog on (the default) the state is read from the state
//! changelog topic (committed records only), so it works while the
//! instances run and shows every partition, whichever instance owns it.
//! Without it, the state is read from this instance's store, which the
//! runtime must not hold (stop it first).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use super::{decode_value, scope_prefix, split_key, StateStore, Write};
use crate::config::Config;
use crate::dedup::Dedup;
use crate::kafka::client_config;

#[derive(Subcommand)]
pub enum StateCommand {
    /// Print a handler's state as `topic/partition<TAB>key<TAB>value`
    /// (values that are not UTF-8 in hex, as 0x...).
    List(Which),
    /// Print the value of one key (exit status 1 when it has none).
    Get {
        #[command(flatten)]
        which: Which,
        /// The key.
        #[arg(long)]
        key: String,
    },
    /// Delete a handler's state (of one partition with --partition): every
    /// instance of the group must be stopped. Events already handled stay
    /// handled; the state starts empty.
    Reset {
        #[command(flatten)]
        which: Which,
        /// Do it (without it, prints what would be deleted).
        #[arg(long)]
        yes: bool,
    },
}

/// Whose state.
#[derive(Args)]
pub struct Which {
    /// The TOML config file.
    #[arg(long, short)]
    config: PathBuf,
    /// The handler's name.
    #[arg(long)]
    handler: String,
    /// Only this source partition.
    #[arg(long)]
    partition: Option<i32>,
    /// Only this source topic (default: all the handler's topics).
    #[arg(long)]
    topic: Option<String>,
}

/// (topic, partition, key) → value.
type Entries = BTreeMap<(String, i32, String), Vec<u8>>;

pub fn run(command: StateCommand) -> Result<bool> {
    let which = match &command {
        StateCommand::List(w) | StateCommand::Get { which: w, .. } => w,
        StateCommand::Reset { which, .. } => which,
    };
    let config = Config::load(&which.config)?;
    let Some(h) = config.handlers.iter().find(|h| h.name == which.handler) else {
        bail!(
            "--handler: no handler {:?} in {}",
            which.handler,
            which.config.display()
        );
    };
    if let Some(t) = &which.topic {
        if !h.topics.contains(t) {
            bail!("--topic: handler {:?} does not consume {t:?}", h.name);
        }
    }
    if !config.idempotency.enabled {
        bail!("handlers have no state without the idempotency store (idempotency.enabled = false)");
    }
    let from_topic = config.idempotency.changelog;
    let entries = if from_topic {
        read_changelog(&config, which)?
    } else {
        read_store(&config, which)?
    };
    let mut out = std::io::stdout().lock();
    match command {
        StateCommand::List(_) => {
            for ((topic, partition, key), value) in &entries {
                writeln!(out, "{topic}/{partition}\t{key}\t{}", show(value))?;
            }
            Ok(true)
        }
        StateCommand::Get { key, .. } => {
            let found: Vec<_> = entries.iter().filter(|((_, _, k), _)| *k == key).collect();
            if found.len() > 1 {
                bail!(
                    "key {key:?} is in the state of {} partitions; name one with --partition (and --topic)",
                    found.len()
                );
            }
            match found.first() {
                Some((_, v)) => {
                    writeln!(out, "{}", show(v))?;
                    Ok(true)
                }
                None => Ok(false),
            }
        }
        StateCommand::Reset { yes, .. } => {
            if !yes {
                writeln!(
                    out,
                    "would delete {} keys of handler {:?}; run again with --yes to do it",
                    entries.len(),
                    which.handler
                )?;
                return Ok(true);
            }
            if from_topic {
                no_members(&config)?;
                tombstones(&config, &which.handler, &entries)?;
            }
            // This instance's store too, when there is one here and it is
            // not held.
            let here = config.idempotency.path.is_dir();
            if let Some(store) = here.then(|| open_store(&config).ok()).flatten() {
                let deletes: Vec<Write> = entries
                    .keys()
                    .map(|(t, p, k)| {
                        let mut key = scope_prefix(&which.handler, t, *p);
                        key.extend_from_slice(k.as_bytes());
                        Write {
                            key,
                            value: None,
                            delta: 0,
                        }
                    })
                    .collect();
                store.persist([], 0, &deletes.iter().collect::<Vec<_>>(), &[])?;
            }
            writeln!(
                out,
                "deleted {} keys of handler {:?}",
                entries.len(),
                which.handler
            )?;
            Ok(true)
        }
    }
}

fn show(v: &[u8]) -> String {
    match std::str::from_utf8(v) {
        Ok(s) if !s.starts_with("0x") => s.to_owned(),
        _ => format!(
            "0x{}",
            v.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ),
    }
}

fn wanted(which: &Which, key: &[u8]) -> Option<(String, i32, String)> {
    let (handler, topic, partition, k) = split_key(key)?;
    (handler == which.handler
        && which.partition.is_none_or(|p| p == partition)
        && which.topic.as_deref().is_none_or(|t| t == topic))
    .then(|| (topic.to_owned(), partition, k.to_owned()))
}

fn open_store(config: &Config) -> Result<StateStore> {
    let dedup = Dedup::open(&config.idempotency.path, config.idempotency.retention())?;
    StateStore::open(std::sync::Arc::new(dedup), None)
}

fn read_store(config: &Config, which: &Which) -> Result<Entries> {
    let store = open_store(config).context(
        "the state is in this instance's store (idempotency.changelog = false); stop the runtime to read it",
    )?;
    let mut prefix = which.handler.as_bytes().to_vec();
    prefix.push(0);
    Ok(store
        .scan(&prefix, None, usize::MAX)?
        .into_iter()
        .filter_map(|(k, v)| Some((wanted(which, &k)?, v[8..].to_vec())))
        .collect())
}

/// The committed state of the handler, folded from the state changelog.
fn read_changelog(config: &Config, which: &Which) -> Result<Entries> {
    let topic = config.state_topic();
    let mut client = client_config(config, &Default::default());
    client
        .set(
            "group.id",
            format!("{}.weir-state-cli", config.kafka.group_id),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed");
    let consumer: BaseConsumer = client.create().context("cannot create a Kafka consumer")?;
    let md = consumer
        .fetch_metadata(Some(&topic), Duration::from_secs(10))
        .with_context(|| format!("cannot read the metadata of {topic}"))?;
    let partitions = md
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().len() as i32)
        .filter(|n| *n > 0)
        .with_context(|| {
            format!("no state changelog topic {topic} (no instance of the group has started yet)")
        })?;
    let targets: Vec<i32> = match which.partition {
        Some(p) => {
            let most = consumed_partitions(&consumer, config, which)?;
            if p < 0 || p >= most {
                bail!("--partition: {p} is not a partition of the handler's topics (they have {most})");
            }
            vec![p.rem_euclid(partitions)]
        }
        None => (0..partitions).collect(),
    };
    let mut entries = Entries::new();
    for target in targets {
        let (low, high) = consumer
            .fetch_watermarks(&topic, target, Duration::from_secs(10))
            .context("cannot read the changelog's offsets")?;
        if low >= high {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, target, Offset::Offset(low))?;
        consumer.assign(&tpl)?;
        let started = Instant::now();
        loop {
            match consumer.poll(Duration::from_millis(500)) {
                Some(Ok(m)) => {
                    if let Some(k) = m.key().and_then(|k| wanted(which, k)) {
                        match m.payload().and_then(decode_value) {
                            Some(v) => entries.insert(k, v.to_vec()),
                            None => entries.remove(&k),
                        };
                    }
                    if m.offset() + 1 >= high {
                        break;
                    }
                }
                // The end of the committed records.
                Some(Err(KafkaError::PartitionEOF(_))) => break,
                Some(Err(e)) => return Err(e.into()),
                None if started.elapsed() > Duration::from_secs(30) => {
                    bail!("no record of {topic}/{target} for 30 s")
                }
                None => {}
            }
        }
    }
    Ok(entries)
}

/// The most partitions of the handler's topics (or `--topic`).
fn consumed_partitions(consumer: &BaseConsumer, config: &Config, which: &Which) -> Result<i32> {
    let handler = config
        .handlers
        .iter()
        .find(|h| h.name == which.handler)
        .expect("checked");
    let mut most = 0;
    for t in handler
        .topics
        .iter()
        .filter(|t| which.topic.as_ref().is_none_or(|w| w == *t))
    {
        let md = consumer
            .fetch_metadata(Some(t), Duration::from_secs(10))
            .with_context(|| format!("cannot read the metadata of {t}"))?;
        let n = md
            .topics()
            .iter()
            .find(|m| m.name() == t && m.error().is_none())
            .map_or(0, |m| m.partitions().len() as i32);
        most = most.max(n);
    }
    Ok(most)
}

/// Refuses while the consumer group has members: a running instance
/// would write the state again, or restore it before the reset lands.
fn no_members(config: &Config) -> Result<()> {
    let group = &config.kafka.group_id;
    let (state, members) = describe_group(config)
        .with_context(|| format!("cannot describe consumer group {group:?}"))?;
    if members > 0 {
        bail!(
            "consumer group {group:?} has {members} running member(s) (state {state}): stop every \
             instance before a reset"
        );
    }
    Ok(())
}

/// The consumer group's state and member count, as the broker describes
/// it (librdkafka's DescribeConsumerGroups, which covers groups of both
/// the classic and the consumer protocol; rust-rdkafka does not wrap it).
fn describe_group(config: &Config) -> Result<(String, usize)> {
    use rdkafka::bindings as rd;
    use std::ffi::{CStr, CString};
    let consumer: BaseConsumer = client_config(config, &Default::default())
        .create()
        .context("cannot create a Kafka client")?;
    let rk = consumer.client().native_ptr();
    let group = CString::new(config.kafka.group_id.as_str())?;
    let text = |p: *const std::os::raw::c_char| {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: librdkafka's error strings are NUL-terminated and
            // live as long as their event or error.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    // SAFETY: every pointer passed is valid for the call (the client lives
    // until the end of the function, `group` until the request is made);
    // the event is destroyed once, after its results were read.
    unsafe {
        let queue = rd::rd_kafka_queue_new(rk);
        let mut groups = [group.as_ptr()];
        rd::rd_kafka_DescribeConsumerGroups(rk, groups.as_mut_ptr(), 1, std::ptr::null(), queue);
        let event = rd::rd_kafka_queue_poll(queue, 15_000);
        rd::rd_kafka_queue_destroy(queue);
        if event.is_null() {
            bail!("no answer from the cluster within 15 s");
        }
        let result = (|| {
            if rd::rd_kafka_event_error(event)
                != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
            {
                bail!("{}", text(rd::rd_kafka_event_error_string(event)));
            }
            let res = rd::rd_kafka_event_DescribeConsumerGroups_result(event);
            if res.is_null() {
                bail!("an unexpected answer");
            }
            let mut n = 0usize;
            let descs = rd::rd_kafka_DescribeConsumerGroups_result_groups(res, &mut n);
            if n == 0 || descs.is_null() {
                bail!("the group is not in the answer");
            }
            let desc = *descs;
            let err = rd::rd_kafka_ConsumerGroupDescription_error(desc);
            if !err.is_null() {
                if rd::rd_kafka_error_code(err)
                    == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_GROUP_ID_NOT_FOUND
                {
                    return Ok(("none".to_owned(), 0));
                }
                bail!("{}", text(rd::rd_kafka_error_string(err)));
            }
            let state = rd::rd_kafka_ConsumerGroupDescription_state(desc);
            let members = rd::rd_kafka_ConsumerGroupDescription_member_count(desc);
            Ok((text(rd::rd_kafka_consumer_group_state_name(state)), members))
        })();
        rd::rd_kafka_event_destroy(event);
        result
    }
}

/// Writes a tombstone to the state changelog for each entry.
fn tombstones(config: &Config, handler: &str, entries: &Entries) -> Result<()> {
    let topic = config.state_topic();
    let producer: ThreadedProducer<DefaultProducerContext> =
        client_config(config, &Default::default())
            .set("enable.idempotence", "true")
            .create()
            .context("cannot create a Kafka producer")?;
    let consumer: BaseConsumer = client_config(config, &Default::default()).create()?;
    let md = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
    let partitions = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().len() as i32)
        .unwrap_or(1)
        .max(1);
    for (t, p, k) in entries.keys() {
        let mut key = scope_prefix(handler, t, *p);
        key.extend_from_slice(k.as_bytes());
        let record = BaseRecord::<[u8], [u8]>::to(&topic)
            .partition(p.rem_euclid(partitions))
            .key(&key);
        producer
            .send(record)
            .map_err(|(e, _)| e)
            .context("cannot write a tombstone to the state changelog")?;
    }
    producer
        .flush(Duration::from_secs(30))
        .context("the tombstones were not all acknowledged")?;
    Ok(())
}
