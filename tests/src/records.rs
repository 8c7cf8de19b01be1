//! Records in and out of the broker: producing the tests' events, reading
//! topics back, end and committed offsets.

use super::*;

/// Every record of `topic` a consumer with `isolation` (`read_committed`
/// or `read_uncommitted`) sees, read from the beginning to the end of each
/// partition (transaction markers and aborted records leave holes in the
/// offsets, so the end is found by the client, not counted).
pub fn read_isolated(topic: &str, isolation: &str) -> Result<Vec<OwnedMessage>> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", "weir-e2e-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", isolation)
        .create()?;
    let partitions = assign_from_start(&c, topic)?;
    let mut out = Vec::new();
    let mut at_end = std::collections::HashSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while (at_end.len() as i32) < partitions {
        if std::time::Instant::now() > deadline {
            bail!(
                "{topic}: {} of {partitions} partitions read to the end in 60 s",
                at_end.len()
            );
        }
        match c.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => out.push(m.detach()),
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(e)) => return Err(e.into()),
            None => {}
        }
    }
    Ok(out)
}

/// A record to produce.
#[derive(Debug, Clone, Default)]
pub struct In {
    pub key: Option<String>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl In {
    /// A record with a JSON envelope.
    pub fn envelope(
        key: &str,
        id: &str,
        correlation: &str,
        event_type: &str,
        payload: serde_json::Value,
    ) -> In {
        let value = serde_json::json!({
            "schemaVersion": "1", "eventType": event_type, "id": id,
            "timestamp": "2026-01-01T00:00:00Z", "correlationId": correlation, "payload": payload,
        });
        In {
            key: Some(key.into()),
            value: serde_json::to_vec(&value).unwrap(),
            headers: vec![("content-type".into(), b"application/json".to_vec())],
        }
    }

    /// A record claiming a JSON envelope with a body that is not one.
    pub fn malformed(key: &str, body: &[u8]) -> In {
        In {
            key: Some(key.into()),
            value: body.to_vec(),
            headers: vec![("content-type".into(), b"application/json".to_vec())],
        }
    }
}

/// Produces records in order and waits for every acknowledgement.
pub async fn produce(topic: &str, records: &[In]) -> Result<()> {
    produce_generated(topic, records.len(), |i| records[i].clone()).await
}

pub(crate) fn base_consumer(group: Option<&str>) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group.unwrap_or("weir-e2e-reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer")
}

/// High watermarks of every partition.
pub fn end_offsets(topic: &str, partitions: i32) -> Result<Vec<i64>> {
    let c = base_consumer(None);
    (0..partitions)
        .map(|p| Ok(c.fetch_watermarks(topic, p, Duration::from_secs(5))?.1))
        .collect()
}

/// The group's committed offsets (0 where nothing was committed, which is
/// where a partition that never had a record stands).
pub fn committed(group: &str, topic: &str, partitions: i32) -> Result<Vec<i64>> {
    let c = base_consumer(Some(group));
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let tpl = c.committed_offsets(tpl, Duration::from_secs(10))?;
    Ok((0..partitions)
        .map(|p| match tpl.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => 0,
        })
        .collect())
}

/// Waits until the group has committed every partition to its end.
pub async fn await_committed_to_end(
    group: &str,
    topic: &str,
    partitions: i32,
    timeout: Duration,
) -> Result<()> {
    let end = end_offsets(topic, partitions)?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let c = committed(group, topic, partitions)?;
        if c == end {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("group {group} committed {c:?} on {topic}, end offsets are {end:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Assigns every partition of `topic` from its beginning: how many.
pub(crate) fn assign_from_start(c: &BaseConsumer, topic: &str) -> Result<i32> {
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(30))?;
    let partitions = md
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or(0) as i32;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    Ok(partitions)
}

/// Every record now in `topic`, read from the beginning to the end offsets.
pub fn read_all(topic: &str) -> Result<Vec<OwnedMessage>> {
    let c = base_consumer(None);
    let partitions = assign_from_start(&c, topic)?;
    let ends = end_offsets(topic, partitions)?;
    let expected: i64 = ends.iter().sum();
    let mut out = Vec::with_capacity(expected as usize);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while (out.len() as i64) < expected {
        if std::time::Instant::now() > deadline {
            bail!("read {} of {expected} records of {topic}", out.len());
        }
        if let Some(m) = c.poll(Duration::from_millis(500)) {
            out.push(m?.detach());
        }
    }
    Ok(out)
}
