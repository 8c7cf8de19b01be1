//! The raw librdkafka baselines `weir bench` measures Weir against, on the
//! same topic and in the same run: consume-only, and a consume→produce
//! passthrough.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use super::Run;

/// A consumer from the beginning of the topic in a fresh group, committing
/// by hand, with the short fetch backoff Weir sets for itself (librdkafka's
/// 1 s would hold the baselines back); otherwise librdkafka's defaults.
/// The baselines never take `--extra-config`.
fn reader(brokers: &str, what: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set(
        "fetch.queue.backoff.ms",
        crate::kafka::FETCH_QUEUE_BACKOFF_MS,
    )
    .set("bootstrap.servers", brokers)
    .set("group.id", super::load::group_id(what))
    .set("auto.offset.reset", "earliest")
    .set("enable.auto.commit", "false");
    c
}

/// A raw consume→produce passthrough with librdkafka: bytes forwarded
/// unchanged to `<topic>.raw` (idempotent producer, acks=all), each offset
/// stored once its record is acknowledged, committed every second: the
/// ceiling for a consumer that publishes what it reads at least once.
pub(super) async fn passthrough(brokers: &str, topic: &str, n: usize) -> Result<Run> {
    let out = format!("{topic}.raw");
    let started = forward(brokers, topic, &out, Some(n), std::future::pending()).await?;
    Ok(Run::since(started, n))
}

/// The passthrough's loop: forwards `topic` to `out` until `limit` records
/// are acknowledged (and committed), or until `stop` resolves. Returns when
/// it subscribed (a run is timed from there, as Weir's are).
pub(super) async fn forward(
    brokers: &str,
    topic: &str,
    out: &str,
    limit: Option<usize>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<Instant> {
    let consumer: Arc<StreamConsumer> = Arc::new(
        reader(brokers, "passthrough")
            // Weir's consumer's prefetch bound, as Weir fetches.
            .set(
                "queued.max.messages.kbytes",
                crate::config::PipelineConfig::default()
                    .prefetch_kbytes
                    .to_string(),
            )
            .set("enable.auto.offset.store", "false")
            .create()?,
    );
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()?;
    consumer.subscribe(&[topic])?;
    let subscribed = Instant::now();
    // Acknowledgements are awaited in order beside the consume loop; as
    // many records may await theirs as Weir holds in flight by default.
    let window = crate::config::PipelineConfig::default().max_in_flight_total;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(i32, i64, DeliveryFuture)>(window);
    let acker = {
        let consumer = consumer.clone();
        let topic = topic.to_owned();
        tokio::spawn(async move {
            let mut last_commit = Instant::now();
            while let Some((partition, offset, ack)) = rx.recv().await {
                ack.await
                    .context("producer gone")?
                    .map_err(|(e, _)| e)
                    .context("passthrough record not acknowledged")?;
                consumer.store_offset(&topic, partition, offset)?;
                if last_commit.elapsed() >= Duration::from_secs(1) {
                    let _ = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Async);
                    last_commit = Instant::now();
                }
            }
            anyhow::Ok(())
        })
    };
    tokio::pin!(stop);
    let mut seen = 0;
    while limit.is_none_or(|n| seen < n) {
        let m = tokio::select! {
            _ = &mut stop => break,
            m = tokio::time::timeout(Duration::from_secs(60), consumer.recv()) => {
                m.context("passthrough consumer stalled")??
            }
        };
        let mut record = FutureRecord::to(out).payload(m.payload().unwrap_or_default());
        if let Some(k) = m.key() {
            record = record.key(k);
        }
        if let Some(h) = m.headers() {
            record = record.headers(h.detach());
        }
        let ack = loop {
            match producer.send_result(record) {
                Ok(ack) => break ack,
                Err((_, back)) => {
                    record = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        };
        tx.send((m.partition(), m.offset(), ack)).await?;
        seen += 1;
    }
    drop(tx);
    acker.await??;
    let committed = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
    // A forwarder stopped right after a periodic commit has nothing left
    // to commit (librdkafka reports that as an error).
    if limit.is_some() {
        committed?;
    }
    Ok(subscribed)
}

/// Consume-only with librdkafka: the ceiling for any consumer on this machine.
pub(super) async fn baseline(brokers: &str, topic: &str, n: usize) -> Result<Run> {
    let consumer: StreamConsumer = reader(brokers, "baseline").create()?;
    consumer.subscribe(&[topic])?;
    let started = Instant::now();
    let mut seen = 0;
    while seen < n {
        tokio::time::timeout(Duration::from_secs(60), consumer.recv())
            .await
            .context("baseline consumer stalled")??;
        seen += 1;
    }
    Ok(Run::since(started, n))
}
