//! The micro-benchmarks of `weir bench`, without Kafka: a handler call
//! with and without metering, the envelope's decoding and encoding, the
//! idempotency store alone, and the cost of metrics and spans per event;
//! and the OTLP receiver the span runs use.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::BenchArgs;
use crate::config::HandlerConfig;
use crate::handler::PluginEngine;

/// Runs the micro-benchmarks and prints their tables.
pub(super) async fn print(args: &BenchArgs, echo: &Path, sink: &OtlpSink) -> Result<()> {
    let echo = echo.to_path_buf();
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
    println!("\nenvelope, the load's events (~240 B of JSON), five passes (µs/event):");
    println!("| what | min-max | median |");
    println!("|---|---:|---:|");
    for (what, times) in [
        "decode",
        "encode echo's output (the payload passed on)",
        "encode an output with a new JSON payload (checked)",
    ]
    .into_iter()
    .zip(envelope_cost(args.events))
    {
        let (lo, hi) = super::report::range(&times).unwrap_or_default();
        println!(
            "| {what} | {lo:.3}-{hi:.3} | {:.3} |",
            super::report::median(&times)
        );
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
        json_checked: false,
    };
    let started = Instant::now();
    for _ in 0..calls {
        if let crate::handler::CallOutcome::Failed(kind, m) = instance.call(
            &event,
            &record,
            1,
            "",
            crate::state::CallState::new(None, "is not available in this benchmark"),
        ) {
            bail!("benchmark call failed: {kind}: {m}");
        }
    }
    Ok(started.elapsed().as_secs_f64() * 1e6 / calls as f64)
}

/// Cost of decoding one of the load's records into an event, and of
/// encoding an output of it (its envelope and headers): echo's, which
/// passes the payload on unchanged, and one with a new payload (parsed to
/// check it). Five passes over 1,000 distinct records (the pipeline drops
/// each event once handled; here each result is dropped at once); µs per
/// event of each pass.
fn envelope_cost(n: usize) -> [Vec<f64>; 3] {
    use crate::envelope::{self, Output, Record};
    let records: Vec<Record> = (0..1000)
        .map(|i| Record {
            topic: "bench".into(),
            partition: 0,
            offset: i as i64,
            timestamp_ms: 0,
            key: Some(format!("customer-{i}").into_bytes()),
            value: super::load::sample(i),
            headers: vec![(
                envelope::header::CONTENT_TYPE.into(),
                envelope::JSON.as_bytes().to_vec(),
            )],
        })
        .collect();
    let events: Vec<_> = records
        .iter()
        .map(|r| envelope::decode(r).expect("the load's events decode"))
        .collect();
    let output = |e: &envelope::Event, payload: Vec<u8>| Output {
        topic: "bench.out".into(),
        key: Some(b"customer-1".to_vec()),
        event_type: format!("{}.echoed", e.event_type),
        content_type: e.content_type.clone(),
        payload,
        ..Output::default()
    };
    let per_pass = (n / 5).max(1000);
    let mut times: [Vec<f64>; 3] = Default::default();
    for _ in 0..5 {
        let started = Instant::now();
        for r in records.iter().cycle().take(per_pass) {
            std::hint::black_box(envelope::decode(r).expect("the load's events decode"));
        }
        times[0].push(started.elapsed().as_secs_f64() * 1e6 / per_pass as f64);
        for (i, passed_on) in [(1, true), (2, false)] {
            // The outputs are made before the clock starts, a pass's worth.
            let outputs: Vec<(Output, &envelope::Event)> = events
                .iter()
                .cycle()
                .take(per_pass)
                .map(|e| {
                    let payload = if passed_on {
                        e.payload.clone()
                    } else {
                        // A byte longer (a leading space), so not the event's own bytes.
                        let mut p = e.payload.clone();
                        p.insert(0, b' ');
                        p
                    };
                    (output(e, payload), e)
                })
                .collect();
            let started = Instant::now();
            for (o, e) in outputs {
                std::hint::black_box(
                    envelope::encode_output(o, e, 1 << 20).expect("the output encodes"),
                );
            }
            times[i].push(started.elapsed().as_secs_f64() * 1e6 / per_pass as f64);
        }
    }
    times
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

/// An OTLP/HTTP receiver that counts and discards what it gets.
pub(super) struct OtlpSink {
    pub(super) url: String,
    requests: Arc<std::sync::atomic::AtomicU64>,
    bytes: Arc<std::sync::atomic::AtomicU64>,
}

impl OtlpSink {
    pub(super) async fn start() -> Result<Self> {
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
