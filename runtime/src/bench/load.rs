//! The benchmark's load: its topics and its events (JSON envelopes of
//! about 240 bytes, keyed by one of 1,000 customers).

use std::time::Duration;

use anyhow::Result;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};

use super::BenchArgs;

/// The topics this run made and its consumer groups' ids: the topics that
/// hold one of them and the groups are deleted at the run's end
/// (`delete_made`).
static MADE: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
static GROUPS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Deletes the topics this run made, every topic whose name holds one of
/// theirs or one of its group ids (the dead-letter, retry and changelog
/// topics Weir made for them), and its consumer groups: a benchmark writes
/// gigabytes, which would otherwise fill the broker's disk and page cache
/// run after run. Every such name carries a random id, so no one else's
/// topic or group matches. Returns the topics deleted.
pub(super) async fn delete_made(brokers: &str) -> Result<usize> {
    delete_made_except(brokers, &[]).await
}

/// [`delete_made`], but the topics named in `keep` stay (and are deleted at
/// the run's end).
pub(super) async fn delete_made_except(brokers: &str, keep: &[&str]) -> Result<usize> {
    // The names stay registered until their deletion has run, so one that
    // fails or is interrupted leaves them to the run's last one.
    let made = MADE.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let groups = GROUPS.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if made.is_empty() && groups.is_empty() {
        return Ok(0);
    }
    let deleted = delete(brokers, keep, &made, &groups).await?;
    MADE.lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|m| keep.contains(&m.as_str()) || !made.contains(m));
    GROUPS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|g| !groups.contains(g));
    Ok(deleted)
}

/// Deletes `groups` and the topics holding a name of `made` or `groups`,
/// but those in `keep`.
async fn delete(brokers: &str, keep: &[&str], made: &[String], groups: &[String]) -> Result<usize> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    if !groups.is_empty() {
        let names: Vec<&str> = groups.iter().map(String::as_str).collect();
        // A group that never joined does not exist: nothing to delete.
        let _ = admin.delete_groups(&names, &opts).await;
    }
    let metadata = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))?;
    let doomed: Vec<&str> = metadata
        .topics()
        .iter()
        .map(|t| t.name())
        .filter(|name| !keep.contains(name))
        .filter(|name| made.iter().chain(groups).any(|m| name.contains(m.as_str())))
        .collect();
    if doomed.is_empty() {
        return Ok(0);
    }
    let mut deleted = 0;
    for r in admin.delete_topics(&doomed, &opts).await? {
        match r {
            Ok(_) => deleted += 1,
            Err((t, e)) => eprintln!("cannot delete the benchmark topic {t}: {e}"),
        }
    }
    Ok(deleted)
}

/// A fresh consumer group id (`bench-<what>-<random id>`), deleted at the
/// run's end with the topics named after it (the changelog topics of a
/// Weir run).
pub(super) fn group_id(what: &str) -> String {
    let group = format!("bench-{what}-{}", uuid::Uuid::new_v4().simple());
    GROUPS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(group.clone());
    group
}

/// Creates topics (name, partitions) with the given topic configs.
pub(super) async fn create_topics(
    brokers: &str,
    topics: &[(String, i32)],
    configs: &[(&str, &str)],
) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|(t, p)| {
            configs.iter().fold(
                NewTopic::new(t, *p, TopicReplication::Fixed(1)),
                |n, (k, v)| n.set(k, v),
            )
        })
        .collect();
    for r in admin.create_topics(&new, &opts).await? {
        let made = r.map_err(|(t, e)| anyhow::anyhow!("cannot create {t}: {e}"))?;
        MADE.lock().unwrap_or_else(|e| e.into_inner()).push(made);
    }
    Ok(())
}

/// A fresh input topic named from `prefix` and its output topic, whose
/// records the broker stamps with their append time (`LogAppendTime`):
/// (input, output).
pub(super) async fn timed_topics(args: &BenchArgs, prefix: &str) -> Result<(String, String)> {
    let topic = format!("{prefix}-{}", uuid::Uuid::new_v4().simple());
    let out = format!("{topic}.out");
    create_topics(&args.brokers, &[(topic.clone(), args.partitions)], &[]).await?;
    create_topics(
        &args.brokers,
        &[(out.clone(), args.partitions)],
        &[("message.timestamp.type", "LogAppendTime")],
    )
    .await?;
    Ok((topic, out))
}

/// Event `i` of the benchmark.
pub(super) fn sample(i: usize) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": "1", "eventType": "bench.tick", "id": format!("bench-{i}"),
        "timestamp": "2026-01-01T00:00:00Z", "correlationId": format!("c-{i}"),
        "payload": {"n": i, "customer": format!("customer-{}", i % 1000), "amount_cents": 1234,
                    "note": "a fairly ordinary event payload of modest size"},
    }))
    .expect("JSON")
}

/// Sends event `i` to `topic` (waiting while the producer's queue is
/// full); its acknowledgement is the future returned.
pub(super) fn send_sample(
    producer: &FutureProducer,
    topic: &str,
    i: usize,
) -> Result<DeliveryFuture> {
    let value = sample(i);
    let key = format!("customer-{}", i % 1000);
    let headers = OwnedHeaders::new().insert(Header {
        key: "content-type",
        value: Some("application/json"),
    });
    let mut rec = FutureRecord::to(topic)
        .key(&key)
        .payload(&value)
        .headers(headers);
    loop {
        match producer.send_result(rec) {
            Ok(f) => return Ok(f),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                rec = back;
                producer.poll(Duration::from_millis(5));
            }
            Err((e, _)) => return Err(e.into()),
        }
    }
}

/// Produces `n` events to `topic` and waits for every acknowledgement.
pub(super) async fn produce(brokers: &str, topic: &str, n: usize) -> Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .set("partitioner", "murmur2_random")
        .create()?;
    let mut acks = Vec::with_capacity(n);
    for i in 0..n {
        acks.push(send_sample(&producer, topic, i)?);
    }
    for a in acks {
        a.await?.map_err(|(e, _)| e)?;
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(())
}
