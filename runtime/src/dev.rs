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
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;
use tracing::info;

use crate::config::{Config, HandlerConfig, KafkaConfig, PipelineConfig};
use crate::deadletter::header as dlh;
use crate::handler::PluginEngine;
use crate::pipeline::{self, Stats};
use crate::replay::header_str;

/// Options of `weir dev`.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Folder holding the example components (`order_enricher.wasm`,
    /// `echo.wasm`); default: the workspace's wasm32-wasip2 release output.
    #[arg(long)]
    plugins: Option<PathBuf>,
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

/// Runs the demo and prints what happened.
pub async fn run(args: DevArgs) -> Result<()> {
    let dir = plugins_dir(args.plugins)?;
    // The mock cluster lives as long as the client that owns it.
    let owner: FutureProducer = ClientConfig::new()
        .set("test.mock.num.brokers", "1")
        .create()
        .context("cannot start librdkafka's mock cluster")?;
    let mock = owner
        .client()
        .mock_cluster()
        .context("librdkafka did not start a mock cluster")?;
    // The mock delays the first group join by 3 s by default.
    // SAFETY: the mock cluster handle is valid while `owner` lives.
    unsafe {
        let raw = rdkafka::bindings::rd_kafka_handle_mock_cluster(owner.client().native_ptr());
        rdkafka::bindings::rd_kafka_mock_group_initial_rebalance_delay_ms(raw, 0);
    }
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

    let config = Config {
        kafka: KafkaConfig {
            brokers: brokers.clone(),
            group_id: "weir-dev".into(),
            options: BTreeMap::new(),
            consumer_options: BTreeMap::from([("session.timeout.ms".into(), "6000".into())]),
            producer_options: BTreeMap::new(),
            auto_offset_reset: "earliest".into(),
        },
        pipeline: PipelineConfig {
            commit_interval_ms: 200,
            ..PipelineConfig::default()
        },
        idempotency: Default::default(),
        tracing: Default::default(),
        metrics: Default::default(),
        handlers: vec![
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
    };
    config.validate()?;
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
    let task = tokio::spawn(pipeline::run(
        config.clone(),
        handlers,
        Some(Arc::new(dedup)),
        stats.clone(),
        obs,
        async {
            let _ = stop_rx.await;
        },
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while stats.events_final.load(Ordering::Relaxed) < events.len() as u64 {
        if tokio::time::Instant::now() > deadline || task.is_finished() {
            bail!(
                "the demo pipeline did not finish its {} events",
                events.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_tx.send(());
    task.await??;
    info!("pipeline stopped");

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
    print_committed(&brokers, &config.kafka.group_id)?;
    println!(
        "\nsummary: {} events final, {} handler calls succeeded, {} outputs published, {} dead letters",
        stats.events_final.load(Ordering::Relaxed),
        stats.handled.load(Ordering::Relaxed),
        stats.outputs.load(Ordering::Relaxed) - stats.dead_lettered.load(Ordering::Relaxed),
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

/// Prints every record of `topic`.
fn print_topic(brokers: &str, topic: &str, title: &str) -> Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "weir-dev-reader")
        .set("enable.auto.commit", "false")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
    let mut tpl = TopicPartitionList::new();
    let mut expected = 0;
    for p in metadata.topics().iter().flat_map(|t| t.partitions()) {
        let (lo, hi) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(5))?;
        expected += hi - lo;
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    println!("\n== {title} ({expected} records)");
    let mut seen = 0;
    while seen < expected {
        let Some(msg) = consumer.poll(Duration::from_secs(5)) else {
            bail!("timed out reading {topic}");
        };
        let msg = msg?;
        seen += 1;
        let key = msg
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .unwrap_or_default();
        let value = String::from_utf8_lossy(msg.payload().unwrap_or_default());
        if let Some(kind) = header_str(&msg, dlh::ERROR_KIND) {
            println!(
                "  [{}:{}] key={key} kind={kind} handler={} reason={:?}\n      original value: {}",
                header_str(&msg, dlh::ORIGINAL_TOPIC).unwrap_or_default(),
                header_str(&msg, dlh::ORIGINAL_OFFSET).unwrap_or_default(),
                header_str(&msg, dlh::HANDLER).unwrap_or_default(),
                header_str(&msg, dlh::ERROR_MESSAGE).unwrap_or_default(),
                truncate(&value, 100),
            );
        } else {
            println!(
                "  p{} key={key} causation={} value={}",
                msg.partition(),
                header_str(&msg, "causation-id").unwrap_or_default(),
                truncate(&value, 160)
            );
        }
    }
    Ok(())
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

/// Prints the group's committed offsets beside the end offsets.
fn print_committed(brokers: &str, group: &str) -> Result<()> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(INPUT, p);
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(5))?;
    println!("\n== committed offsets of group {group}");
    for e in committed.elements() {
        let (_, hi) = consumer.fetch_watermarks(INPUT, e.partition(), Duration::from_secs(5))?;
        let c = match e.offset() {
            Offset::Offset(o) => o.to_string(),
            other => format!("{other:?}"),
        };
        println!("  {INPUT}[{}] committed {c} / end {hi}", e.partition());
    }
    Ok(())
}
