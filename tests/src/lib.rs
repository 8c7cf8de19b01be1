//! Harness for the end-to-end tests: a real Kafka broker (started by
//! `scripts/kafka.sh`, address in `WEIR_TEST_BROKERS`), the real `weir`
//! binary, and the example plugins built for wasm32-wasip2.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::process::{Child, Command};

mod observe;
mod process;
mod records;

pub use observe::*;
pub use process::*;
pub use records::*;

/// The broker the tests run against.
pub fn brokers() -> String {
    std::env::var("WEIR_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

/// `<target>/<profile>`: where this test binary and `weir` were built.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // <target>/<profile>/deps/<test>
    exe.parent()
        .and_then(|d| d.parent())
        .expect("target layout")
        .to_path_buf()
}

/// The `weir` binary under test.
pub fn weir_bin() -> PathBuf {
    let bin = std::env::var_os("WEIR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| profile_dir().join("weir"));
    assert!(
        bin.is_file(),
        "{} is missing: build it first (`cargo build -p weir`, or run `./dev test`)",
        bin.display()
    );
    bin
}

/// A plugin component, e.g. `plugin("echo")`.
pub fn plugin(name: &str) -> PathBuf {
    let dir = std::env::var_os("WEIR_PLUGINS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            profile_dir()
                .parent()
                .unwrap()
                .join("wasm32-wasip2/release")
        });
    let path = dir.join(format!("{}.wasm", name.replace('-', "_")));
    assert!(
        path.is_file(),
        "{} is missing: build the plugins first (`./dev plugins`)",
        path.display()
    );
    path
}

/// A name no other test or run uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

fn admin() -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin client")
}

/// Creates a topic and waits until its partitions have leaders.
pub async fn create_topic(name: &str, partitions: i32) -> Result<()> {
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let res = admin()
        .create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &opts,
        )
        .await?;
    for r in res {
        r.map_err(|(t, e)| anyhow::anyhow!("cannot create topic {t}: {e}"))?;
    }
    let consumer = base_consumer(None);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let md = consumer.fetch_metadata(Some(name), Duration::from_secs(5))?;
        let ready = md.topics().iter().any(|t| {
            t.partitions().len() == partitions as usize
                && t.partitions().iter().all(|p| p.leader() >= 0)
        });
        if ready {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("topic {name} has no leaders after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates a topic with topic-level configs (e.g. `max.message.bytes`).
pub async fn create_topic_with(name: &str, configs: &[(&str, &str)]) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()?;
    let mut topic = NewTopic::new(name, 1, TopicReplication::Fixed(1));
    for (k, v) in configs {
        topic = topic.set(k, v);
    }
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for r in admin.create_topics(&[topic], &opts).await? {
        r.map_err(|(t, e)| anyhow::anyhow!("cannot create topic {t}: {e}"))?;
    }
    // Wait for the leader through the harness's own check.
    await_leader(name).await
}

pub async fn await_leader(name: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while end_offsets(name, 1).is_err() {
        if tokio::time::Instant::now() > deadline {
            bail!("topic {name} has no leader after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// `n` envelopes `evt-0`.. `evt-{n-1}`, keyed over 97 keys, for tests that
/// count outputs per event id.
pub fn numbered_events(n: usize) -> Vec<In> {
    (0..n)
        .map(|i| {
            In::envelope(
                &format!("k{}", i % 97),
                &format!("evt-{i}"),
                "c",
                "t",
                serde_json::json!({"i": i}),
            )
        })
        .collect()
}

/// A fresh input topic named from `prefix`, its `.out` topic (both with
/// `partitions`) and a fresh group: (input, output, group).
pub async fn fresh_topics(prefix: &str, partitions: i32) -> Result<(String, String, String)> {
    let input = unique(&format!("{prefix}-in"));
    let output = format!("{input}.out");
    create_topic(&input, partitions).await?;
    create_topic(&output, partitions).await?;
    Ok((input, output, unique(&format!("{prefix}-group"))))
}

/// SplitMix64: every random choice of a test from one seed, so a failing
/// run can be repeated with `WEIR_TEST_SEED` (printed by [`seed`]).
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..bound`.
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }
}

/// The seed of a randomized test: `WEIR_TEST_SEED`, else the clock; printed
/// with how to repeat the run.
pub fn seed(test: &str) -> u64 {
    let seed = match std::env::var("WEIR_TEST_SEED") {
        Ok(v) => v
            .trim()
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("WEIR_TEST_SEED={v:?} is not a u64")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    };
    println!("{test} seed={seed} (rerun with WEIR_TEST_SEED={seed})");
    seed
}

/// One record of a group's idempotency changelog (as the runtime writes it).
#[derive(serde::Deserialize)]
struct MarkBatch {
    keys: Vec<serde_bytes::ByteBuf>,
}

/// The event ids marked in `group`'s idempotency changelog, each with the
/// timestamp (ms, set by the instance that wrote it) of the first record
/// that marked it.
pub fn changelog_marks(group: &str) -> Result<HashMap<String, i64>> {
    let mut marks: HashMap<String, i64> = HashMap::new();
    for m in read_all(&format!("{group}.weir-idempotency"))? {
        let batch: MarkBatch = rmp_serde::from_slice(m.payload().unwrap_or_default())?;
        let at = m.timestamp().to_millis().unwrap_or(0);
        for k in batch.keys {
            let id = k.splitn(2, |b| *b == 0).nth(1).unwrap_or_default();
            let id = String::from_utf8_lossy(id).into_owned();
            let first = marks.entry(id).or_insert(at);
            *first = (*first).min(at);
        }
    }
    Ok(marks)
}

/// The partitions an instance's log says it was assigned, in order, as
/// `(topic, partition)` lists (one per "partitions assigned" line).
pub fn assignments(log: &[String]) -> Vec<Vec<(String, i32)>> {
    log.iter()
        .filter(|l| l.contains("partitions assigned"))
        .map(|l| {
            let list = l
                .split("list=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or("");
            list.split(',')
                .filter_map(|tp| {
                    let (t, p) = tp.rsplit_once('/')?;
                    Some((t.to_owned(), p.parse().ok()?))
                })
                .collect()
        })
        .collect()
}

/// Waits until `topic` holds at least `n` records.
pub async fn await_records(topic: &str, partitions: i32, n: i64, timeout: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let total: i64 = end_offsets(topic, partitions)?.iter().sum();
        if total >= n {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{topic} holds {total} records, expected at least {n}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A header of a record as text.
pub fn header(m: &OwnedMessage, name: &str) -> Option<String> {
    m.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// The `causation-id` of each record: which input event it came from.
pub fn causation_ids(records: &[OwnedMessage]) -> Vec<String> {
    records
        .iter()
        .map(|m| header(m, "causation-id").expect("a causation-id header"))
        .collect()
}

/// Produces `n` records made by `make(i)`, in order, and waits for every
/// acknowledgement. Each record is made only when it is sent and the
/// client's send queue is capped (64 MiB), so a flood larger than the test
/// should hold in memory costs it only that queue.
pub async fn produce_generated(
    topic: &str,
    n: usize,
    mut make: impl FnMut(usize) -> In,
) -> Result<()> {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .set("queue.buffering.max.kbytes", "65536")
        .create()?;
    let mut futures = Vec::with_capacity(n);
    for i in 0..n {
        let r = make(i);
        let mut headers = OwnedHeaders::new();
        for (k, v) in &r.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let mut rec = FutureRecord::to(topic).payload(&r.value).headers(headers);
        if let Some(k) = &r.key {
            rec = rec.key(k);
        }
        loop {
            match producer.send_result(rec) {
                Ok(f) => {
                    futures.push(f);
                    break;
                }
                // The send queue is full: wait for acknowledgements to free it.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    rec = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => bail!("cannot produce record {i} to {topic}: {e}"),
            }
        }
    }
    for f in futures {
        f.await?.map_err(|(e, _)| e)?;
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(())
}

/// A counter of the runtime's last `progress` log line (e.g. `handled`,
/// `duplicates`, `outputs`); `weir` writes one at shutdown, so after
/// `Weir::stop` this is the final count.
pub fn progress_counter(log: &[String], name: &str) -> u64 {
    let field = format!("{name}=");
    let line = log
        .iter()
        .rev()
        .find(|l| l.contains("progress") && l.contains("final_events="))
        .expect("a progress line in the log");
    let at = line
        .split(|c: char| c.is_whitespace() || c == ',' || c == '{')
        .find_map(|word| word.strip_prefix(&field))
        .unwrap_or_else(|| panic!("no {name} counter in {line:?}"));
    at.trim_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .unwrap_or_else(|_| panic!("{name} is not a number in {line:?}"))
}

/// README.md's code blocks, compiled by `cargo test --doc -p weir-e2e` so
/// that the handler example ("Writing a handler") cannot drift from the
/// SDK: every ```` ```rust ```` block (and untagged one) is a doctest, a
/// ```` ```rust,test_harness ```` block is built as a test crate and its
/// `#[test]`s run. Lives here, not in the SDK, so that `cargo package -p
/// weir-sdk` does not need a file outside the crate.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
