//! `weir bench`: throughput and handling latency against a real broker,
//! beside two raw librdkafka baselines over the same topic (consume-only,
//! and a consume→produce passthrough), run first and last; the table gives
//! each Weir run as a share of its baseline.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::config::{Config, HandlerConfig, KafkaConfig, PipelineConfig};
use crate::handler::PluginEngine;
use crate::pipeline::{self, Stats};

/// Options of `weir bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Bootstrap servers of a real broker.
    #[arg(long, default_value = "127.0.0.1:19092")]
    brokers: String,
    /// Events to produce and consume.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Partitions of the benchmark topic.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Folder with `echo.wasm`.
    #[arg(long, default_value = "target/wasm32-wasip2/release")]
    plugins: PathBuf,
}

mod baselines;
use baselines::{baseline, passthrough, CONSUME_ONLY, PASSTHROUGH};

struct Run {
    name: String,
    seconds: f64,
    events: usize,
    p50_us: Option<u64>,
    p99_us: Option<u64>,
}

/// Runs the benchmark and prints a table.
pub async fn run(args: BenchArgs) -> Result<()> {
    let echo = args.plugins.join("echo.wasm");
    if !echo.is_file() {
        bail!(
            "{} is missing: build the plugins first (./dev plugins)",
            echo.display()
        );
    }
    let topic = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .create()?;
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for r in admin
        .create_topics(
            &[
                NewTopic::new(&topic, args.partitions, TopicReplication::Fixed(1)),
                NewTopic::new(
                    &format!("{topic}.out"),
                    args.partitions,
                    TopicReplication::Fixed(1),
                ),
                NewTopic::new(
                    &format!("{topic}.raw"),
                    args.partitions,
                    TopicReplication::Fixed(1),
                ),
            ],
            &opts,
        )
        .await?
    {
        r.map_err(|(t, e)| anyhow::anyhow!("cannot create {t}: {e}"))?;
    }

    let started = Instant::now();
    produce(&args.brokers, &topic, args.events).await?;
    let produce_secs = started.elapsed().as_secs_f64();
    println!(
        "produced {} events (~{} bytes each) to {topic} ({} partitions) in {produce_secs:.2} s",
        args.events,
        sample(0).len(),
        args.partitions
    );

    let mut runs = vec![
        baseline(&args.brokers, &topic, args.events).await?,
        passthrough(&args.brokers, &topic, args.events).await?,
    ];
    for discard in [true, false] {
        for dedup in [false, true] {
            runs.push(weir(&args, &topic, &echo, discard, dedup, Observe::Off).await?);
        }
    }
    let sink = OtlpSink::start().await?;
    // Observability on and off, in an order and its reverse, so that a
    // drift over the runs (the output topic grows) does not favour one.
    let variants = [
        Observe::Off,
        Observe::Metrics,
        Observe::Traces(&sink, 0.1),
        Observe::Traces(&sink, 1.0),
    ];
    for observe in variants.iter().chain(variants.iter().rev()) {
        runs.push(weir(&args, &topic, &echo, false, true, *observe).await?);
    }
    // The baselines again, in reverse order: a drift over the run (the
    // first reader of a fresh topic, the output topics growing) shows in
    // the two runs of each, and the ratios use their mean.
    runs.push(passthrough(&args.brokers, &topic, args.events).await?);
    runs.push(baseline(&args.brokers, &topic, args.events).await?);

    println!("\nhandler call cost by metering (no Kafka; µs per call, reused instance):");
    println!("| handler | fuel+epochs | fuel only | epochs only | neither |");
    println!("|---|---:|---:|---:|---:|");
    let misbehave = args.plugins.join("misbehave.wasm");
    for (name, wasm, payload, calls) in [
        ("trivial (echo, discard)", &echo, "\"x\"", 20_000),
        (
            "CPU-heavy (misbehave burn:2000000)",
            &misbehave,
            "\"burn:2000000\"",
            200,
        ),
    ] {
        let mut cells = Vec::new();
        for (fuel, epochs) in [(true, true), (true, false), (false, true), (false, false)] {
            let us = call_cost(
                wasm,
                payload,
                calls,
                crate::handler::Metering { fuel, epochs },
            )?;
            cells.push(format!("{us:.2}"));
        }
        println!("| {name} | {} |", cells.join(" | "));
    }
    let (check_us, mark_us) = dedup_cost(args.events)?;
    println!(
        "\nidempotency store alone ({} ids): check {check_us:.2} µs/event, mark {mark_us:.2} µs/event (batches of 512)",
        args.events
    );
    println!("\nobservability cost per event and handler (no Kafka; µs):");
    println!("| what | µs/event |");
    println!("|---|---:|");
    println!(
        "| metrics (counters, fuel, duration histogram) | {:.3} |",
        metrics_cost(args.events)
    );
    for (what, endpoint, ratio) in [
        ("spans off, traceparent passed on", None, 1.0),
        (
            "spans on, trace not sampled (ratio 0)",
            Some(&sink.url),
            0.0,
        ),
        (
            "spans on, sampled (3 spans: process, call, send)",
            Some(&sink.url),
            1.0,
        ),
    ] {
        let us = spans_cost(args.events, endpoint, ratio).await?;
        println!("| {what} | {us:.3} |");
    }
    println!(
        "\nOTLP receiver: {} requests, {} KiB of spans",
        sink.requests.load(Ordering::Relaxed),
        sink.bytes.load(Ordering::Relaxed) / 1024
    );
    // Ratios to the baselines of this run: a weir run that publishes
    // against the raw passthrough (the mean of its runs), one that does not
    // against consume-only.
    let rate = |r: &Run| r.events as f64 / r.seconds;
    let mean_of = |prefix: &str| {
        let rates: Vec<f64> = runs
            .iter()
            .filter(|r| r.name.starts_with(prefix))
            .map(rate)
            .collect();
        rates.iter().sum::<f64>() / rates.len().max(1) as f64
    };
    let (consume_only, raw) = (mean_of(CONSUME_ONLY), mean_of(PASSTHROUGH));
    println!(
        "\n| run | events | seconds | events/s | of baseline | handle p50 µs | handle p99 µs |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in &runs {
        let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_else(|| "-".into());
        let share = if r.name.starts_with("weir") {
            let (base, what) = if r.name.contains("no outputs") {
                (consume_only, "consume-only")
            } else {
                (raw, "passthrough")
            };
            format!("{:.0} % of {what}", 100.0 * rate(r) / base)
        } else {
            "-".into()
        };
        println!(
            "| {} | {} | {:.2} | {:.0} | {share} | {} | {} |",
            r.name,
            r.events,
            r.seconds,
            rate(r),
            opt(r.p50_us),
            opt(r.p99_us)
        );
    }
    Ok(())
}

/// Mean time of one `handle` call on a reused instance.
fn call_cost(
    wasm: &std::path::Path,
    payload: &str,
    calls: usize,
    metering: crate::handler::Metering,
) -> Result<f64> {
    let engine = PluginEngine::with_metering(metering)?;
    let mut cfg: HandlerConfig = toml::from_str(&format!(
        "name = \"bench\"\nwasm = {:?}\ntopics = [\"t\"]\nfuel_per_event = 100000000000\ndeadline_ms = 60000\n",
        wasm.display().to_string()
    ))?;
    cfg.config = BTreeMap::from([("discard".to_string(), "true".to_string())]);
    let handler = crate::handler::LoadedHandler::load(&engine, &cfg)?;
    let mut instance = handler.instantiate()?;
    let record = crate::envelope::Record {
        topic: "t".into(),
        partition: 0,
        offset: 0,
        timestamp_ms: 0,
        key: None,
        value: payload.as_bytes().to_vec(),
        headers: vec![("content-type".into(), b"application/json".to_vec())],
    };
    let event = crate::envelope::Event {
        id: "e".into(),
        event_type: "bench".into(),
        schema_version: "1".into(),
        payload: payload.as_bytes().to_vec(),
        content_type: "application/json".into(),
        timestamp_ms: 0,
        correlation_id: "c".into(),
        causation_id: None,
    };
    let started = Instant::now();
    for _ in 0..calls {
        if let crate::handler::CallOutcome::Failed(kind, m) = instance.call(&event, &record, 1, "")
        {
            bail!("benchmark call failed: {kind}: {m}");
        }
    }
    Ok(started.elapsed().as_secs_f64() * 1e6 / calls as f64)
}

/// The store's own cost per event: one lookup, and one mark written in
/// batches as the finalizer does.
fn dedup_cost(n: usize) -> Result<(f64, f64)> {
    let dir = tempfile::tempdir()?;
    let store = crate::dedup::Dedup::open(dir.path(), Duration::from_secs(3600))?;
    let keys: Vec<Vec<u8>> = (0..n)
        .map(|i| crate::dedup::key("echo", &format!("bench-{i}")))
        .collect();
    let started = Instant::now();
    for k in &keys {
        std::hint::black_box(store.contains(k)?);
    }
    let check = started.elapsed().as_secs_f64() * 1e6 / n as f64;
    let started = Instant::now();
    for chunk in keys.chunks(512) {
        store.mark(chunk.iter().map(Vec::as_slice))?;
    }
    let mark = started.elapsed().as_secs_f64() * 1e6 / n as f64;
    Ok((check, mark))
}

/// Mean cost of recording one handled event's metrics.
fn metrics_cost(n: usize) -> f64 {
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let h = metrics.handler("echo", "bench");
    let started = Instant::now();
    for i in 0..n {
        h.fuel(1000 + i as u64);
        h.handled(Duration::from_nanos(5000 + i as u64));
        if let Some(c) = h.output_counter() {
            c.inc();
        }
    }
    started.elapsed().as_secs_f64() * 1e6 / n as f64
}

/// Mean cost of one event's trace work: read the context from headers,
/// a consumer span, a call span, a send span and its context written into
/// the output's headers.
async fn spans_cost(n: usize, endpoint: Option<&String>, ratio: f64) -> Result<f64> {
    use crate::telemetry::{self, Tracing};
    use opentelemetry::trace::SpanKind;
    use opentelemetry::KeyValue;
    let cfg = crate::config::TracingConfig {
        otlp_endpoint: endpoint.cloned(),
        sample_ratio: ratio,
        ..Default::default()
    };
    let tracing = Arc::new(Tracing::from_config(&cfg)?);
    let t = tracing.clone();
    let new_traces = endpoint.is_some();
    let us = tokio::task::spawn_blocking(move || {
        let incoming = vec![(
            "traceparent".to_string(),
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00".to_vec(),
        )];
        let started = Instant::now();
        for i in 0..n {
            // New traces (no parent) so that the ratio decides.
            let parent = if new_traces {
                opentelemetry::Context::new()
            } else {
                t.extract(&incoming)
            };
            let cx = t.start(&parent, || {
                let a = vec![
                    KeyValue::new(telemetry::attr::SYSTEM, "kafka"),
                    KeyValue::new(telemetry::attr::DESTINATION, "bench"),
                    KeyValue::new(telemetry::attr::OFFSET, i as i64),
                    KeyValue::new(telemetry::attr::MESSAGE_ID, format!("evt-{i}")),
                ];
                ("process bench".into(), SpanKind::Consumer, a)
            });
            let call = t.start(&cx, || ("call echo".into(), SpanKind::Internal, Vec::new()));
            telemetry::end(&call);
            let send = t.start(&cx, || {
                ("send bench.out".into(), SpanKind::Producer, Vec::new())
            });
            let mut headers = Vec::new();
            t.inject(&send, &mut headers);
            std::hint::black_box(&headers);
            telemetry::end(&send);
            telemetry::end(&cx);
        }
        started.elapsed().as_secs_f64() * 1e6 / n as f64
    })
    .await?;
    tokio::task::spawn_blocking(move || tracing.shutdown()).await?;
    Ok(us)
}

fn sample(i: usize) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": "1", "eventType": "bench.tick", "id": format!("bench-{i}"),
        "timestamp": "2026-01-01T00:00:00Z", "correlationId": format!("c-{i}"),
        "payload": {"n": i, "customer": format!("customer-{}", i % 1000), "amount_cents": 1234,
                    "note": "a fairly ordinary event payload of modest size"},
    }))
    .expect("JSON")
}

async fn produce(brokers: &str, topic: &str, n: usize) -> Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .set("partitioner", "murmur2_random")
        .create()?;
    let mut acks = Vec::with_capacity(n);
    for i in 0..n {
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
                Ok(f) => {
                    acks.push(f);
                    break;
                }
                Err((_, back)) => {
                    rec = back;
                    producer.poll(Duration::from_millis(5));
                }
            }
        }
    }
    for a in acks {
        a.await?.map_err(|(e, _)| e)?;
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(())
}

/// What the pipeline reports while it is measured.
#[derive(Clone, Copy)]
enum Observe<'a> {
    /// No metrics, no spans (context is still propagated).
    Off,
    /// Prometheus metrics recorded (the default of `weir run`).
    Metrics,
    /// Metrics, and spans sampled at a ratio exported to an OTLP receiver.
    Traces(&'a OtlpSink, f64),
}

/// An OTLP/HTTP receiver that counts and discards what it gets.
struct OtlpSink {
    url: String,
    requests: Arc<std::sync::atomic::AtomicU64>,
    bytes: Arc<std::sync::atomic::AtomicU64>,
}

impl OtlpSink {
    async fn start() -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/v1/traces", listener.local_addr()?);
        let requests = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (r, b) = (requests.clone(), bytes.clone());
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| async move {
                r.fetch_add(1, Ordering::Relaxed);
                b.fetch_add(body.len() as u64, Ordering::Relaxed);
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Self {
            url,
            requests,
            bytes,
        })
    }
}

/// The full pipeline with the echo handler: `discard` makes it trivial
/// (no outputs); otherwise every event publishes one output.
async fn weir(
    args: &BenchArgs,
    topic: &str,
    echo: &std::path::Path,
    discard: bool,
    dedup: bool,
    observe: Observe<'_>,
) -> Result<Run> {
    let mut handler: HandlerConfig = toml::from_str(&format!(
        "name = \"echo\"\nwasm = {:?}\ntopics = [{topic:?}]\n",
        echo.display().to_string()
    ))?;
    handler.config = BTreeMap::from([
        ("discard".to_string(), discard.to_string()),
        ("output_topic".to_string(), format!("{topic}.out")),
    ]);
    let config = Config {
        kafka: KafkaConfig {
            brokers: args.brokers.clone(),
            group_id: format!("bench-weir-{}", uuid::Uuid::new_v4().simple()),
            options: BTreeMap::new(),
            consumer_options: BTreeMap::new(),
            producer_options: BTreeMap::new(),
            auto_offset_reset: "earliest".into(),
        },
        pipeline: PipelineConfig::default(),
        idempotency: Default::default(),
        tracing: crate::config::TracingConfig {
            otlp_endpoint: match observe {
                Observe::Traces(sink, _) => Some(sink.url.clone()),
                _ => None,
            },
            sample_ratio: match observe {
                Observe::Traces(_, ratio) => ratio,
                _ => 1.0,
            },
            ..Default::default()
        },
        metrics: crate::config::MetricsConfig {
            enabled: !matches!(observe, Observe::Off),
            ..Default::default()
        },
        handlers: vec![handler],
    };
    let tracing = Arc::new(crate::telemetry::Tracing::from_config(&config.tracing)?);
    let obs = pipeline::Observability {
        tracing: tracing.clone(),
        metrics: config
            .metrics
            .enabled
            .then(|| Arc::new(crate::metrics::Metrics::new())),
        health: Default::default(),
    };
    let engine = PluginEngine::new()?;
    let handlers = crate::load_handlers(&engine, &config)?;
    let stats = Arc::new(Stats {
        handle_micros: Some(Mutex::new(hdrhistogram::Histogram::new(3)?)),
        ..Stats::default()
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    let store = if dedup {
        let dir = tempfile::tempdir()?;
        let store = crate::dedup::Dedup::open(dir.path(), Duration::from_secs(3600))?;
        Some((Arc::new(store), dir))
    } else {
        None
    };
    let task = tokio::spawn(pipeline::run(
        config,
        handlers,
        store.as_ref().map(|d| d.0.clone()),
        stats.clone(),
        obs,
        async {
            let _ = stop_rx.await;
        },
    ));
    let n = args.events as u64;
    while stats.events_final.load(Ordering::Relaxed) < n {
        if task.is_finished() || started.elapsed() > Duration::from_secs(600) {
            bail!("the pipeline stopped before handling {n} events");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let _ = stop_tx.send(());
    task.await??;
    tokio::task::spawn_blocking(move || tracing.shutdown()).await?;
    let hist = stats
        .handle_micros
        .as_ref()
        .expect("histogram")
        .lock()
        .unwrap()
        .clone();
    Ok(Run {
        name: format!(
            "{}{}",
            match (discard, dedup) {
                (true, false) => "weir, trivial handler (no outputs), dedup off",
                (true, true) => "weir, trivial handler (no outputs), dedup on",
                (false, false) => "weir, echo handler (one output per event), dedup off",
                (false, true) => "weir, echo handler (one output per event), dedup on",
            },
            match observe {
                Observe::Off if !discard && dedup => ", metrics off, spans off".into(),
                Observe::Off => String::new(),
                Observe::Metrics => ", metrics on".into(),
                Observe::Traces(_, ratio) => format!(", metrics on, spans sampled at {ratio}"),
            }
        ),
        seconds,
        events: args.events,
        p50_us: Some(hist.value_at_quantile(0.5)),
        p99_us: Some(hist.value_at_quantile(0.99)),
    })
}
