//! `weir dev`: the whole pipeline on librdkafka's in-process mock cluster,
//! with the example handlers and sample events, so Weir can be seen working
//! without a broker.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde_json::json;
use tracing::info;

use crate::config::{Config, GroupProtocol, HandlerConfig, KafkaConfig, PipelineConfig};
use crate::handler::PluginEngine;
use crate::pipeline::{self, Stats};

mod show;

use show::{print_committed, print_topic};

/// Options of `weir dev`.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Folder holding the example components (`order_enricher.wasm`,
    /// `echo.wasm`); default: the workspace's wasm32-wasip2 release output.
    #[arg(long)]
    plugins: Option<PathBuf>,
    /// Run this component instead of the demo's handlers (with `--events`).
    #[arg(long, value_name = "FILE.wasm")]
    handler: Option<PathBuf>,
    /// Sample events for `--handler`, one JSON object a line (as for `weir try`).
    #[arg(long, requires = "handler")]
    events: Option<PathBuf>,
    /// A config whose handler settings apply to `--handler` (as for `weir try`).
    #[arg(long, short, requires = "handler")]
    config: Option<PathBuf>,
    /// The handler of `--config` to take the settings of.
    #[arg(long, requires = "handler")]
    name: Option<String>,
}

const INPUT: &str = "orders";
const PARTITIONS: i32 = 4;

fn plugins_dir(arg: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(dir) = arg {
        return Ok(dir);
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        // <target>/<profile>/weir → <target>/wasm32-wasip2/release
        if let Some(target) = exe.parent().and_then(Path::parent) {
            candidates.push(target.join("wasm32-wasip2/release"));
        }
    }
    candidates.push(PathBuf::from("target/wasm32-wasip2/release"));
    candidates
        .iter()
        .find(|d| d.join("order_enricher.wasm").is_file())
        .cloned()
        .with_context(|| {
            format!(
                "the example plugins are not built (looked in {candidates:?}); \
                 run `./dev plugins` or pass --plugins DIR"
            )
        })
}

fn handler(
    name: &str,
    wasm: PathBuf,
    event_types: &[&str],
    config: &[(&str, &str)],
) -> HandlerConfig {
    let text = format!(
        "name = {name:?}\nwasm = {:?}\ntopics = [{INPUT:?}]\nevent_types = {event_types:?}\n",
        wasm.display().to_string()
    );
    let mut h: HandlerConfig = toml::from_str(&text).expect("a valid handler table");
    h.config = config
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect::<BTreeMap<_, _>>();
    h
}

fn sample_events() -> Vec<(String, Vec<u8>, &'static str)> {
    let order = |id: &str, customer: &str, country: &str| {
        json!({"schemaVersion": "1", "eventType": "order.placed", "id": format!("evt-{id}"),
               "timestamp": "2026-11-27T10:00:00Z", "correlationId": format!("checkout-{id}"),
               "payload": {"order_id": id, "customer_id": customer, "country": country,
                           "items": [{"sku": "tea", "quantity": 2, "unit_price_cents": 450},
                                     {"sku": "mug", "quantity": 1, "unit_price_cents": 1200}]}})
    };
    let mut events: Vec<(String, Vec<u8>, &'static str)> = [
        ("c-1", order("o-1001", "c-1", "DE")),
        ("c-2", order("o-1002", "c-2", "US")),
        ("c-3", order("o-1003", "c-3", "JP")),
        ("c-1", order("o-1004", "c-1", "FR")),
        ("c-4", order("o-1005", "c-4", "AQ")), // no region serves it: fatal
        (
            "c-2",
            json!({"eventType": "order.cancelled", "id": "evt-o-1002-x",
                       "payload": {"order_id": "o-1002", "reason": "changed mind"}}),
        ),
        ("c-5", order("o-1006", "c-5", "GB")),
        ("c-6", order("o-1007", "c-6", "CA")),
    ]
    .into_iter()
    .map(|(k, v)| {
        (
            k.to_string(),
            serde_json::to_vec(&v).unwrap(),
            "application/json",
        )
    })
    .collect();
    events.insert(
        3,
        (
            "c-9".into(),
            b"{\"eventType\": \"order.placed\", \"payload\": {oops".to_vec(),
            "application/json",
        ),
    );
    events
}

/// The client that owns librdkafka's in-process mock cluster (the cluster
/// lives as long as it does).
fn start_mock() -> Result<FutureProducer> {
    let owner: FutureProducer = ClientConfig::new()
        .set("test.mock.num.brokers", "1")
        .create()
        .context("cannot start librdkafka's mock cluster")?;
    owner
        .client()
        .mock_cluster()
        .context("librdkafka did not start a mock cluster")?;
    // The mock delays the first group join by 3 s by default.
    // SAFETY: the mock cluster handle is valid while `owner` lives.
    unsafe {
        let raw = rdkafka::bindings::rd_kafka_handle_mock_cluster(owner.client().native_ptr());
        rdkafka::bindings::rd_kafka_mock_group_initial_rebalance_delay_ms(raw, 0);
    }
    Ok(owner)
}

/// The Kafka settings of a pipeline on the mock cluster.
fn mock_config(brokers: &str, handlers: Vec<HandlerConfig>) -> Config {
    Config {
        kafka: KafkaConfig {
            brokers: brokers.to_owned(),
            group_id: "weir-dev".into(),
            options: BTreeMap::new(),
            consumer_options: BTreeMap::from([("session.timeout.ms".into(), "6000".into())]),
            producer_options: BTreeMap::new(),
            auto_offset_reset: "earliest".into(),
            // The mock cluster's classic groups are the tried ones.
            group_protocol: GroupProtocol::Cooperative,
        },
        pipeline: PipelineConfig {
            commit_interval_ms: 200,
            ..PipelineConfig::default()
        },
        idempotency: Default::default(),
        delivery: Default::default(),
        tracing: Default::default(),
        metrics: Default::default(),
        admin: Default::default(),
        plugins: Default::default(),
        handlers,
        source: None,
    }
}

/// Runs the demo, or the user's component with `--handler`, and prints
/// what happened.
pub async fn run(args: DevArgs) -> Result<()> {
    if let Some(wasm) = &args.handler {
        return run_own(&args, wasm).await;
    }
    let dir = plugins_dir(args.plugins)?;
    let owner = start_mock()?;
    let mock = owner.client().mock_cluster().expect("started above");
    let brokers = mock.bootstrap_servers();
    for (topic, partitions) in [
        (INPUT, PARTITIONS),
        ("orders.enriched", PARTITIONS),
        ("orders.cancelled", 1),
        ("orders.audit", 1),
        ("orders.dlq", 1),
    ] {
        mock.create_topic(topic, partitions, 1)?;
    }
    println!("mock Kafka cluster at {brokers}; topics: orders (4 partitions), orders.enriched, orders.cancelled, orders.audit, orders.dlq");

    let config = mock_config(
        &brokers,
        vec![
            handler(
                "order-enricher",
                dir.join("order_enricher.wasm"),
                &["order.placed", "order.cancelled"],
                &[("output_prefix", "orders"), ("tax_rate_percent", "20")],
            ),
            handler(
                "audit-log",
                dir.join("echo.wasm"),
                &[],
                &[("output_topic", "orders.audit")],
            ),
        ],
    );
    config.validate()?;
    // The mock cluster cannot create topics: the changelogs are made here.
    mock.create_topic(&crate::changelog::topic_name(&config), PARTITIONS, 1)?;
    mock.create_topic(&config.state_topic(), PARTITIONS, 1)?;
    let engine = PluginEngine::new()?;
    let handlers = crate::load_handlers(&engine, &config)?;
    for h in &handlers {
        println!(
            "loaded handler {} (version {}) on {:?}",
            h.name,
            h.version,
            h.topics()
        );
    }

    let events = sample_events();
    let producer: FutureProducer = crate::kafka::producer_config(&config).create()?;
    for (key, value, content_type) in &events {
        let headers = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
            key: "content-type",
            value: Some(*content_type),
        });
        producer
            .send(
                FutureRecord::to(INPUT)
                    .key(key)
                    .payload(value)
                    .headers(headers),
                Duration::from_secs(5),
            )
            .await
            .map_err(|(e, _)| e)
            .context("cannot produce sample events")?;
    }
    println!("produced {} sample events to {INPUT} (one malformed, one for a country no region serves)\n", events.len());

    let (stats, metrics) = run_pipeline(&config, handlers, events.len()).await?;

    print_topic(
        &brokers,
        "orders.enriched",
        "order-enricher → orders.enriched",
    )?;
    print_topic(
        &brokers,
        "orders.cancelled",
        "order-enricher → orders.cancelled",
    )?;
    print_topic(&brokers, "orders.audit", "audit-log → orders.audit")?;
    print_topic(&brokers, "orders.dlq", "dead letters → orders.dlq")?;
    print_committed(&brokers, &config.kafka.group_id, INPUT, PARTITIONS)?;
    println!(
        "\nsummary: {} events final, {} handler calls succeeded, {} outputs published, {} dead letters",
        stats.events_final.load(Ordering::Relaxed),
        stats.handled.load(Ordering::Relaxed),
        stats.outputs.load(Ordering::Relaxed),
        stats.dead_lettered.load(Ordering::Relaxed),
    );
    println!("\nmetrics, as `weir run` serves them on /metrics (excerpt):");
    for line in metrics.render().lines().filter(|l| {
        !l.starts_with('#')
            && [
                "weir_events_handled_total",
                "weir_events_failed_total",
                "weir_events_dead_lettered_total",
                "weir_outputs_published_total",
                "weir_handler_info",
            ]
            .iter()
            .any(|m| l.starts_with(m))
    }) {
        println!("  {line}");
    }
    // Clients first, then the cluster they talk to.
    drop(producer);
    drop(mock);
    drop(owner);
    Ok(())
}

/// `weir dev --handler FILE.wasm --events FILE`: the user's component on
/// the mock cluster, fed the sample events; prints every topic it wrote
/// and the committed offsets.
async fn run_own(args: &DevArgs, wasm: &Path) -> Result<()> {
    let events = args
        .events
        .as_deref()
        .context("--handler needs --events FILE (sample events, one JSON object a line)")?;
    let (cfg, _) =
        crate::runner::settings(wasm, args.config.as_deref(), args.name.as_deref(), "--name")?;
    let records = crate::samples::load(events, &cfg.topics[0])?;
    if let Some(r) = records.iter().find(|r| !cfg.topics.contains(&r.topic)) {
        bail!(
            "{}: an event for topic {:?}, which handler {} does not subscribe to ({:?})",
            events.display(),
            r.topic,
            cfg.name,
            cfg.topics
        );
    }
    let owner = start_mock()?;
    let mock = owner.client().mock_cluster().expect("started above");
    let brokers = mock.bootstrap_servers();
    let mut inputs: Vec<(String, i32)> = Vec::new();
    for t in &cfg.topics {
        let partitions = records
            .iter()
            .filter(|r| &r.topic == t)
            .map(|r| r.partition + 1)
            .max()
            .unwrap_or(1);
        mock.create_topic(t, partitions, 1)?;
        mock.create_topic(&cfg.dead_letter_topic_of(t), 1, 1)?;
        inputs.push((t.clone(), partitions));
    }
    let config = mock_config(&brokers, vec![cfg]);
    config.validate()?;
    let most = inputs.iter().map(|(_, p)| *p).max().unwrap_or(1);
    mock.create_topic(&crate::changelog::topic_name(&config), most, 1)?;
    mock.create_topic(&config.state_topic(), most, 1)?;
    let engine = PluginEngine::new()?;
    let handlers = crate::load_handlers(&engine, &config)?;
    let h = &handlers[0];
    println!(
        "mock Kafka cluster at {brokers}; handler {} (version {}) on {:?}",
        h.name,
        h.version,
        h.topics()
    );
    let producer: FutureProducer = crate::kafka::producer_config(&config).create()?;
    for r in &records {
        let mut headers = rdkafka::message::OwnedHeaders::new();
        for (k, v) in &r.headers {
            headers = headers.insert(rdkafka::message::Header {
                key: k,
                value: Some(v),
            });
        }
        let mut record = FutureRecord::to(&r.topic)
            .partition(r.partition)
            .payload(&r.value)
            .headers(headers);
        if let Some(k) = &r.key {
            record = record.key(k);
        }
        producer
            .send(record, Duration::from_secs(5))
            .await
            .map_err(|(e, _)| e)
            .context("cannot produce the sample events")?;
    }
    println!(
        "produced {} sample events from {}",
        records.len(),
        events.display()
    );
    let (stats, _) = run_pipeline(&config, handlers, records.len()).await?;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()?;
    let metadata = consumer.fetch_metadata(None, Duration::from_secs(5))?;
    let mut written: Vec<String> = metadata
        .topics()
        .iter()
        .map(|t| t.name().to_owned())
        .filter(|t| !inputs.iter().any(|(i, _)| i == t) && !t.starts_with("__"))
        .collect();
    written.sort();
    for t in &written {
        print_topic(&brokers, t, t)?;
    }
    for (t, partitions) in &inputs {
        print_committed(&brokers, &config.kafka.group_id, t, *partitions)?;
    }
    println!(
        "\nsummary: {} events final, {} handler calls succeeded, {} dead letters",
        stats.events_final.load(Ordering::Relaxed),
        stats.handled.load(Ordering::Relaxed),
        stats.dead_lettered.load(Ordering::Relaxed),
    );
    // Clients first, then the cluster they talk to.
    drop(consumer);
    drop(producer);
    drop(mock);
    drop(owner);
    Ok(())
}

/// Runs the pipeline on the mock cluster until `events` events are final.
async fn run_pipeline(
    config: &Config,
    handlers: Vec<Arc<crate::handler::LoadedHandler>>,
    events: usize,
) -> Result<(Arc<Stats>, Arc<crate::metrics::Metrics>)> {
    let stats = Arc::new(Stats::default());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let state = tempfile::tempdir()?;
    let dedup = crate::dedup::Dedup::open(state.path(), Duration::from_secs(3600))?;
    // Metrics are recorded as `weir run` records them (no HTTP server here).
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let obs = pipeline::Observability {
        metrics: Some(metrics.clone()),
        ..pipeline::Observability::off()
    };
    let slots = crate::deploy::Registry::new(handlers, Some(metrics.clone())).slots();
    let task = tokio::spawn(pipeline::run(
        config.clone(),
        slots,
        Some(Arc::new(dedup)),
        stats.clone(),
        obs,
        async {
            let _ = stop_rx.await;
        },
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while stats.events_final.load(Ordering::Relaxed) < events as u64 {
        if tokio::time::Instant::now() > deadline || task.is_finished() {
            bail!("the pipeline did not finish its {events} events");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_tx.send(());
    task.await??;
    info!("pipeline stopped");
    Ok((stats, metrics))
}
