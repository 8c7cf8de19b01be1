//! Handlers written in Python (componentize-py) and JavaScript
//! (componentize-js), built by `./dev plugins`, run against the real broker
//! like the Rust ones: outputs published as envelopes, a fatal error
//! dead-lettered, a retriable one retried until it succeeds.
//!
//! Both plugins behave like `fail-on-marker`. Their components embed a whole
//! interpreter and take seconds to compile, so each language gets one `weir`
//! process that sees every case.

use std::time::Duration;

use rdkafka::message::Message;
use serde_json::{json, Value};
use weir_e2e::*;

async fn a_handler_in(plugin: &str) -> anyhow::Result<()> {
    let input = unique(&format!("{plugin}-in"));
    let output = format!("{input}.out");
    let dlq = format!("{input}.dlq");
    let group = unique(&format!("{plugin}-group"));
    create_topic(&input, 1).await?;
    create_topic(&output, 1).await?;
    create_topic(&dlq, 1).await?;
    let records = vec![
        In::envelope("k1", "ok-1", "corr-1", "order.placed", json!({"n": 1})),
        In::envelope(
            "k2",
            "bad",
            "corr-2",
            "order.placed",
            json!("this one says FAIL"),
        ),
        In::envelope("k3", "flaky", "corr-3", "order.placed", json!("RETRY once")),
        In::envelope("k4", "ok-2", "corr-4", "order.placed", json!({"n": 2})),
        In {
            key: Some("k5".into()),
            value: b"raw bytes".to_vec(),
            headers: vec![],
        },
    ];
    produce(&input, &records).await?;

    let handler = HandlerSpec::new("polyglot", plugin, &input)
        .config("succeed_on_attempt", "2")
        .extra("max_attempts = 4\ninitial_backoff_ms = 10\nmax_backoff_ms = 50");
    let started = std::time::Instant::now();
    let mut weir = Weir::start(&config_toml(&group, &[handler]))?;
    let addr = weir.http_addr().await?;
    // The interpreter's component compiles before the first event.
    await_committed_to_end(&group, &input, 1, Duration::from_secs(180)).await?;
    println!(
        "{plugin}: every event handled {:.1} s after the start, RSS then {:?} KiB",
        started.elapsed().as_secs_f64(),
        weir.rss_kib()
    );
    let scrape = Scrape::fetch(&addr).await?;
    let log = weir.log();
    let status = weir.terminate(Duration::from_secs(30)).await?;
    assert!(status.success(), "weir exited with {status}");

    // Outputs: every event but the fatal one, in order, the retried one once.
    let out = read_all(&output)?;
    let raw_id = format!("{input}/0/4");
    assert_eq!(
        causation_ids(&out),
        ["ok-1", "flaky", "ok-2", raw_id.as_str()],
        "outputs of {plugin}"
    );
    for (m, (i, attempt)) in out.iter().zip([(0, "1"), (2, "2"), (3, "1")]) {
        let sent: Value = serde_json::from_slice(&records[i].value)?;
        let v: Value = serde_json::from_slice(m.payload().unwrap())?;
        assert_eq!(v["eventType"], "order.placed.echoed", "{v}");
        assert_eq!(v["payload"], sent["payload"], "{v}");
        assert_eq!(v["correlationId"], sent["correlationId"], "{v}");
        assert_eq!(v["causationId"], sent["id"], "{v}");
        assert_ne!(v["id"], sent["id"], "an output gets a fresh id");
        assert_eq!(m.key(), records[i].key.as_deref().map(str::as_bytes));
        assert_eq!(header(m, "attempt").as_deref(), Some(attempt), "{v}");
        assert_eq!(
            header(m, "content-type").as_deref(),
            Some("application/json")
        );
    }
    // A raw event is echoed raw, still with its causation.
    let raw = &out[3];
    assert_eq!(raw.payload(), Some(&b"raw bytes"[..]));
    assert_eq!(raw.key(), Some(&b"k5"[..]));

    // The fatal error is dead-lettered with the handler's message.
    let dead = read_all(&dlq)?;
    assert_eq!(dead.len(), 1, "one dead letter");
    let d = &dead[0];
    assert_eq!(header(d, "weir-error-kind").as_deref(), Some("fatal"));
    assert_eq!(header(d, "weir-handler").as_deref(), Some("polyglot"));
    assert_eq!(header(d, "weir-original-offset").as_deref(), Some("1"));
    let message = header(d, "weir-error-message").unwrap();
    assert!(
        message.contains("bad") && message.contains("FAIL"),
        "{message}"
    );
    assert_eq!(d.payload(), Some(&records[1].value[..]));

    // The retriable error was retried once, logged through the host import.
    assert_eq!(
        scrape.value("weir_events_retried_total", &[("handler", "polyglot")]),
        Some(1.0),
        "{}",
        scrape.text
    );
    assert!(
        log.iter()
            .any(|l| l.contains("event flaky fails on attempt 1") && l.contains("polyglot")),
        "no guest log line in {log:#?}"
    );
    assert!(!log
        .iter()
        .any(|l| l.contains("event flaky fails on attempt 2")));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_python_handler_publishes_dead_letters_and_retries() -> anyhow::Result<()> {
    a_handler_in("python-echo").await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_javascript_handler_publishes_dead_letters_and_retries() -> anyhow::Result<()> {
    a_handler_in("js-echo").await
}
