//! End-to-end latency under a steady load: events produced at a fixed rate
//! (half of what echo moved at most in the same run) through `weir run`
//! with the echo handler, or through the raw passthrough (the floor of the
//! machine at that rate); each output's latency is the broker's append
//! time of the output (the output topic stamps `LogAppendTime`, so it is
//! when the broker took it, just before acknowledging it) minus the time
//! its input was handed to the producer.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;

use super::baselines::forward;
use super::load::{send_sample, timed_topics};
use super::{echo_config, BenchArgs, ECHO};
use crate::pipeline::Stats;

/// Warm-up events (sent until Weir answers) are numbered from here.
const WARM_UP: u64 = 1 << 40;

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
        * 1000.0
}

/// Runs the paced load and prints p50/p99/max of the latency.
/// With `visible`, an output's latency ends when a `read_committed`
/// reader receives it (what exactly-once delays), not at its append.
/// With `raw`, the raw librdkafka passthrough forwards the events instead
/// of Weir: the latency floor of the machine at the same rate.
pub(super) async fn run(
    args: &BenchArgs,
    echo: &Path,
    rate: f64,
    extra: Option<&str>,
    visible: bool,
    raw: bool,
) -> Result<Quantiles> {
    let rate = rate.max(100.0);
    let (topic, out) = timed_topics(args, "bench-latency").await?;
    let dir = tempfile::tempdir()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let stop = async {
        let _ = stop_rx.await;
    };
    let weir = if raw {
        let (brokers, topic, out) = (args.brokers.clone(), topic.clone(), out.clone());
        tokio::spawn(async move {
            forward(&brokers, &topic, &out, None, stop).await?;
            anyhow::Ok(())
        })
    } else {
        let mut config = echo_config(&args.brokers, &topic, echo, ECHO, "", extra, dir.path())?;
        config.handlers[0]
            .config
            .insert("output_topic".into(), out.clone());
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            crate::service::run(&runtime, config, Arc::new(Stats::default()), stop)
        })
    };

    let reader: Arc<StreamConsumer> = Arc::new(
        ClientConfig::new()
            .set("bootstrap.servers", &args.brokers)
            .set("group.id", super::load::group_id("latency"))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "10")
            .set("isolation.level", "read_committed")
            .create()?,
    );
    reader.subscribe(&[&out])?;
    // A producer as applications have them (librdkafka's defaults: 5 ms
    // linger); the latency counts from when an event was due, so its
    // batching is part of it.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .create()?;
    let send = |n: u64| {
        let _ = send_sample(&producer, &topic, n as usize);
    };
    // The payload's `n` names the input of an output.
    let number = |m: &rdkafka::message::BorrowedMessage<'_>| -> Option<u64> {
        let v: serde_json::Value = serde_json::from_slice(m.payload()?).ok()?;
        v.pointer("/payload/n")?.as_u64()
    };

    // Warm up until every input partition has answered: Weir (or the
    // passthrough) has joined, fetched each partition and, for Weir, made
    // each partition's handler instance; a partition still starting would
    // put its start-up into the measured tail.
    let started = Instant::now();
    let mut warm = WARM_UP;
    let mut partition_of: HashMap<u64, i32> = HashMap::new();
    let mut answered = std::collections::HashSet::new();
    while answered.len() < args.partitions as usize {
        let delivery = send_sample(&producer, &topic, warm as usize)?;
        if let Ok(Ok(Ok(d))) = tokio::time::timeout(Duration::from_secs(5), delivery).await {
            partition_of.insert(warm, d.partition);
        }
        warm += 1;
        let deadline = tokio::time::Instant::now() + Duration::from_millis(50);
        while let Ok(m) = tokio::time::timeout_at(deadline, reader.recv()).await {
            let m = match m {
                // The output topic was just made: until its metadata
                // reaches the reader, the reader reports it unknown.
                Err(KafkaError::MessageConsumption(RDKafkaErrorCode::UnknownTopicOrPartition)) => {
                    continue
                }
                m => m.context("latency reader")?,
            };
            if let Some(p) = number(&m).and_then(|n| partition_of.get(&n)) {
                answered.insert(*p);
            }
        }
        if started.elapsed() > Duration::from_secs(60) || weir.is_finished() {
            bail!(
                "the forwarder did not answer from every partition within a minute ({} of {})",
                answered.len(),
                args.partitions
            );
        }
    }

    let total = (rate * args.latency_secs as f64) as u64;
    let sent: Arc<std::sync::Mutex<HashMap<u64, f64>>> = Default::default();
    let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let pace = {
        let sent = sent.clone();
        async move {
            let begin = tokio::time::Instant::now();
            let begin_ms = now_ms();
            for i in 0..total {
                let offset = i as f64 / rate;
                let due = begin + Duration::from_secs_f64(offset);
                if due > tokio::time::Instant::now() {
                    tokio::time::sleep_until(due).await;
                }
                // Latency counts from when the event was due, so a pacer
                // that falls behind does not hide a delay.
                sent.lock().unwrap().insert(i, begin_ms + offset * 1000.0);
                send(i);
            }
        }
    };
    let read = {
        let sent = sent.clone();
        let seen = seen.clone();
        let reader = reader.clone();
        async move {
            let mut hist = hdrhistogram::Histogram::<u64>::new(3)?;
            while seen.load(Ordering::Relaxed) < total {
                let m = tokio::time::timeout(Duration::from_secs(30), reader.recv())
                    .await
                    .context("outputs stopped arriving")??;
                let Some(n) = number(&m) else { continue };
                if n >= WARM_UP {
                    continue;
                }
                let Some(at) = sent.lock().unwrap().remove(&n) else {
                    continue;
                };
                let end = if visible {
                    now_ms()
                } else {
                    // The append time has millisecond resolution.
                    m.timestamp().to_millis().unwrap_or_default() as f64
                };
                hist.record(((end - at).max(0.0) * 1000.0) as u64)?;
                seen.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(hist)
        }
    };
    // The reader on its own task, so the pacer does not delay it.
    let read = tokio::spawn(read);
    pace.await;
    let hist = read.await?;
    let hist = hist?;
    let _ = stop_tx.send(());
    weir.await??;
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let quantiles = Quantiles {
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        max_ms: hist.max() as f64 / 1000.0,
        events: hist.len(),
    };
    if visible {
        return Ok(quantiles);
    }
    println!(
        "\nend-to-end latency (input handed to the producer → output appended by the broker), \
         {} at {rate:.0} events/s ({}) for {} s, {} events: \
         p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (append times have 1 ms resolution)",
        match (raw, extra) {
            (true, _) => "librdkafka passthrough",
            (false, None) => "weir, echo with the defaults",
            (false, Some(_)) => "weir, echo with --extra-config",
        },
        if args.latency_rate.is_some() {
            "--latency-rate"
        } else {
            "half of echo's median rate"
        },
        args.latency_secs,
        hist.len(),
        ms(0.5),
        ms(0.99),
        hist.max() as f64 / 1000.0
    );
    Ok(quantiles)
}

/// Latency quantiles of one paced run.
pub(super) struct Quantiles {
    pub(super) p50_ms: f64,
    pub(super) p99_ms: f64,
    pub(super) max_ms: f64,
    pub(super) events: u64,
}
