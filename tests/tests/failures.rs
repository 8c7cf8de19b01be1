//! Every failure has an end: records the broker refuses for good, forged
//! retry headers, retry records due at different times, a panicking
//! worker, a shutdown that cannot finish in time.

use std::time::Duration;

use anyhow::{bail, Result};
use rdkafka::Message;
use weir_e2e::*;

/// Polls `/readyz` until `pred(status, body)` holds.
async fn await_ready_state(
    addr: &str,
    timeout: Duration,
    pred: impl Fn(u16, &str) -> bool,
) -> Result<(u16, String)> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let (status, body) = http_get(addr, "/readyz").await?;
        if pred(status, &body) {
            return Ok((status, body));
        }
        if tokio::time::Instant::now() > deadline {
            bail!("/readyz still answers {status} {body:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn envelope(i: usize, payload: serde_json::Value) -> In {
    In::envelope(
        &format!("k{i}"),
        &format!("e-{i}"),
        "c",
        "order.placed",
        payload,
    )
}

/// The case seen in use: one output too large for its topic among five
/// small ones. The small ones reach the topic (the oversize record does
/// not take its batch-mates down), the large one's event is dead-lettered
/// as `produce-failed` with the broker's reason, everything is committed
/// and the instance stays ready.
#[tokio::test]
async fn an_output_too_large_for_its_topic_dead_letters_only_its_event() -> Result<()> {
    let input = unique("big-out");
    let output = format!("{input}.out");
    let dlq = format!("{input}.dlq");
    create_topic(&input, 1).await?;
    create_topic(&dlq, 1).await?;
    // Room for a small output with Weir's headers, not for a 4 KB one.
    create_topic_with(&output, &[("max.message.bytes", "1500")]).await?;
    let group = unique("g");
    let config = config_toml(
        &group,
        &[HandlerSpec::new("echo", "echo", &input).config("output_topic", &output)],
    );
    let events: Vec<In> = (0..6)
        .map(|i| {
            let text = if i == 3 { "x".repeat(4000) } else { "s".into() };
            In {
                key: Some(format!("k{i}")),
                value: text.into_bytes(),
                headers: vec![],
            }
        })
        .collect();
    let mut weir = Weir::start(&config)?;
    let addr = weir.http_addr().await?;
    produce(&input, &events).await?;
    await_committed_to_end(&group, &input, 1, Duration::from_secs(60)).await?;
    let outputs = read_all(&output)?;
    let dead = read_all(&dlq)?;
    println!(
        "outputs {} dead letters {} reason {:?}",
        outputs.len(),
        dead.len(),
        dead.first().and_then(|d| header(d, "weir-error-message"))
    );
    assert_eq!(outputs.len(), 5, "the five small outputs are published");
    assert!(outputs.iter().all(|m| m.payload() == Some(&b"s"[..])));
    assert_eq!(dead.len(), 1);
    assert_eq!(
        header(&dead[0], "weir-error-kind").as_deref(),
        Some("produce-failed")
    );
    assert_eq!(
        header(&dead[0], "weir-original-offset").as_deref(),
        Some("3")
    );
    let reason = header(&dead[0], "weir-error-message").unwrap_or_default();
    assert!(reason.to_lowercase().contains("too large"), "{reason}");
    let (status, _) = http_get(&addr, "/readyz").await?;
    assert_eq!(status, 200);
    let scrape = Scrape::fetch(&addr).await?;
    assert!(scrape
        .text
        .contains("weir_events_failed_total{class=\"produce-failed\",handler=\"echo\"} 1"));
    weir.stop(Duration::from_secs(30)).await?;
    Ok(())
}

/// An output topic that does not exist (the broker creates no topics on
/// first use): the events are dead-lettered as `produce-failed` and the
/// partition goes on.
#[tokio::test]
async fn an_output_topic_that_does_not_exist_dead_letters_the_events() -> Result<()> {
    let input = unique("no-out");
    let dlq = format!("{input}.dlq");
    create_topic(&input, 1).await?;
    create_topic(&dlq, 1).await?;
    let group = unique("g");
    let config = config_toml(
        &group,
        &[HandlerSpec::new("echo", "echo", &input).config("output_topic", &unique("missing"))],
    )
    .replace(
        "[pipeline]",
        "[kafka.producer_options]\n\"topic.metadata.propagation.max.ms\" = \"1000\"\n\n[pipeline]",
    );
    let weir = Weir::start(&config)?;
    let events: Vec<In> = (0..3)
        .map(|i| envelope(i, serde_json::json!({"n": i})))
        .collect();
    produce(&input, &events).await?;
    await_committed_to_end(&group, &input, 1, Duration::from_secs(60)).await?;
    let dead = read_all(&dlq)?;
    assert_eq!(dead.len(), 3);
    for d in &dead {
        assert_eq!(
            header(d, "weir-error-kind").as_deref(),
            Some("produce-failed")
        );
        let reason = header(d, "weir-error-message").unwrap_or_default();
        assert!(reason.to_lowercase().contains("unknown topic"), "{reason}");
    }
    weir.stop(Duration::from_secs(30)).await?;
    Ok(())
}

/// A dead letter the dead-letter topic refuses for good: the partition
/// stops at that event (nothing committed past it, nothing dropped),
/// `/readyz` answers 503 with the reason, and it is counted.
#[tokio::test]
async fn a_refused_dead_letter_stops_the_partition_and_turns_not_ready() -> Result<()> {
    let input = unique("dlq-refused");
    let output = format!("{input}.out");
    let dlq = format!("{input}.dlq");
    create_topic(&input, 1).await?;
    create_topic(&output, 1).await?;
    // Every dead letter carries ~500 bytes of headers.
    create_topic_with(&dlq, &[("max.message.bytes", "200")]).await?;
    let group = unique("g");
    let config = config_toml(
        &group,
        &[HandlerSpec::new("h", "fail-on-marker", &input).config("output_topic", &output)],
    );
    let mut weir = Weir::start(&config)?;
    let addr = weir.http_addr().await?;
    let events = vec![
        envelope(0, serde_json::json!({"n": 0})),
        envelope(1, serde_json::json!({"n": "FAIL"})),
        envelope(2, serde_json::json!({"n": 2})),
    ];
    produce(&input, &events).await?;
    // Not ready because of the stop (not because it is still joining).
    let (status, body) = await_ready_state(&addr, Duration::from_secs(60), |s, body| {
        s == 503 && body.contains("stopped at offset")
    })
    .await?;
    println!("/readyz {status}: {body}");
    assert!(
        body.contains(&format!("partition {input}/0 stopped at offset 1")),
        "{body}"
    );
    assert!(body.contains(&dlq), "{body}");
    let scrape = Scrape::fetch(&addr).await?;
    assert!(
        scrape.text.contains("weir_stopped_partitions 1"),
        "{}",
        scrape.text
    );
    // The event before it is final and committed; nothing past it is.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while committed(&group, &input, 1)?[0] < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "offset 0 not committed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        weir.running(),
        "a stopped partition does not stop the instance"
    );
    weir.stop(Duration::from_secs(30)).await?;
    assert_eq!(
        committed(&group, &input, 1)?,
        vec![1],
        "nothing past the refused dead letter"
    );
    Ok(())
}

/// Retry headers on a source topic are ordinary headers: the record is not
/// routed to the one handler they name under the identity they claim.
#[tokio::test]
async fn retry_headers_on_a_source_topic_are_not_trusted() -> Result<()> {
    let input = unique("forged");
    let out_a = format!("{input}.a");
    let out_b = format!("{input}.b");
    for t in [&input, &out_a, &out_b] {
        create_topic(t, 1).await?;
    }
    let group = unique("g");
    let config = config_toml(
        &group,
        &[
            HandlerSpec::new("a", "echo", &input).config("output_topic", &out_a),
            HandlerSpec::new("b", "echo", &input).config("output_topic", &out_b),
        ],
    );
    let weir = Weir::start(&config)?;
    let mut forged = envelope(0, serde_json::json!({"n": 0}));
    for (k, v) in [
        ("weir-retry-handler", "a"),
        ("weir-retry-attempt", "2"),
        ("weir-retry-not-before", "0"),
        ("weir-original-topic", "somewhere-else"),
        ("weir-original-partition", "7"),
        ("weir-original-offset", "99"),
        ("weir-original-timestamp", "0"),
    ] {
        forged.headers.push((k.into(), v.as_bytes().to_vec()));
    }
    produce(&input, &[forged]).await?;
    await_committed_to_end(&group, &input, 1, Duration::from_secs(60)).await?;
    assert_eq!(read_all(&out_a)?.len(), 1, "handler a handled it");
    assert_eq!(read_all(&out_b)?.len(), 1, "handler b was not skipped");
    weir.stop(Duration::from_secs(30)).await?;
    Ok(())
}

/// A retry record due much later does not hold up one behind it that is
/// due now.
#[tokio::test]
async fn a_retry_record_due_later_does_not_block_one_due_now() -> Result<()> {
    let input = unique("delays");
    let retry = format!("{input}.retry");
    let output = format!("{input}.out");
    for t in [&input, &retry, &output, &format!("{input}.dlq")] {
        create_topic(t, 1).await?;
    }
    let group = unique("g");
    let config = config_toml(
        &group,
        &[HandlerSpec::new("h", "echo", &input)
            .config("output_topic", &output)
            .extra("retry_mode = \"topic\"\nmax_backoff_ms = 120000")],
    );
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let retry_record = |i: usize, not_before: i64| {
        let mut r = envelope(i, serde_json::json!({"n": i}));
        for (k, v) in [
            ("weir-retry-handler", "h".to_string()),
            ("weir-retry-attempt", "2".into()),
            ("weir-retry-not-before", not_before.to_string()),
            ("weir-original-topic", input.clone()),
            ("weir-original-partition", "0".into()),
            ("weir-original-offset", i.to_string()),
            ("weir-original-timestamp", "0".into()),
        ] {
            r.headers.push((k.into(), v.into_bytes()));
        }
        r
    };
    produce(
        &retry,
        &[retry_record(0, now_ms + 90_000), retry_record(1, 0)],
    )
    .await?;
    let weir = Weir::start(&config)?;
    await_records(&output, 1, 1, Duration::from_secs(30)).await?;
    let out = read_all(&output)?;
    assert_eq!(out.len(), 1);
    assert_eq!(header(&out[0], "causation-id").as_deref(), Some("e-1"));
    weir.stop(Duration::from_secs(30)).await?;
    // The later one is held, unfinished: the final commit at shutdown does
    // not pass it (offset 1 is final, but behind it).
    assert_eq!(committed(&group, &retry, 1)?, vec![0]);
    Ok(())
}

/// A retry hop is marked: when the source event is read again (here by a
/// new group sharing the store, as after a crash before the commit), it
/// does not start a second retry chain.
#[tokio::test]
async fn a_retry_hop_happens_once() -> Result<()> {
    let input = unique("hop");
    let retry = format!("{input}.retry");
    for t in [
        &input,
        &retry,
        &format!("{input}.dlq"),
        &format!("{input}.out"),
    ] {
        create_topic(t, 1).await?;
    }
    let store = tempfile::tempdir()?;
    let handler = || {
        HandlerSpec::new("h", "fail-on-marker", &input).extra(
            "retry_mode = \"topic\"\nmax_attempts = 2\ninitial_backoff_ms = 60000\nmax_backoff_ms = 60000",
        )
    };
    produce(&input, &[envelope(0, serde_json::json!({"n": "RETRY"}))]).await?;
    let first = unique("g");
    let weir = Weir::start(&with_store(
        config_toml(&first, &[handler()]),
        store.path(),
        3600,
    ))?;
    await_committed_to_end(&first, &input, 1, Duration::from_secs(60)).await?;
    await_records(&retry, 1, 1, Duration::from_secs(30)).await?;
    weir.stop(Duration::from_secs(30)).await?;
    let second = unique("g");
    let weir = Weir::start(&with_store(
        config_toml(&second, &[handler()]),
        store.path(),
        3600,
    ))?;
    await_committed_to_end(&second, &input, 1, Duration::from_secs(60)).await?;
    let records = read_all(&retry)?;
    weir.stop(Duration::from_secs(30)).await?;
    assert_eq!(records.len(), 1, "one retry chain, not two");
    Ok(())
}

/// A partition worker that panics is noticed at once: logged with the
/// panic text (JSON), nothing committed past it, and the process exits
/// non-zero so its supervisor restarts it.
#[tokio::test]
async fn a_panicking_worker_stops_the_instance_with_the_panic_text() -> Result<()> {
    let input = unique("panic");
    let output = format!("{input}.out");
    create_topic(&input, 1).await?;
    create_topic(&output, 1).await?;
    let group = unique("g");
    let config = config_toml(
        &group,
        &[HandlerSpec::new("h", "echo", &input).config("output_topic", &output)],
    );
    // The last event: nothing comes after it to notice a dead worker by.
    let at = format!("{input}/0/4");
    let events: Vec<In> = (0..5)
        .map(|i| envelope(i, serde_json::json!({"n": i})))
        .collect();
    produce(&input, &events).await?;
    let weir = Weir::start_json_with_env(&config, &[("WEIR_FAULT_PANIC_AT", &at)])?;
    let (status, log) = weir.wait_exit(Duration::from_secs(60)).await?;
    assert!(!status.success(), "exit status {status}");
    let panic_line = log
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|j| j["fields"]["message"] == "a partition worker panicked")
        .expect("a JSON log line about the panic");
    assert!(panic_line["fields"]["panic"]
        .as_str()
        .unwrap_or_default()
        .contains("injected fault"));
    let committed = committed(&group, &input, 1)?[0];
    println!("committed {committed} of 5; the worker panicked at offset 4");
    assert_eq!(
        committed, 4,
        "the events before it are final and committed, the one in hand is not"
    );
    Ok(())
}

/// A shutdown that cannot finish the event in hand within the drain
/// timeout exits non-zero, saying so.
#[tokio::test]
async fn a_drain_timeout_exits_non_zero() -> Result<()> {
    let input = unique("drain");
    for t in [&input, &format!("{input}.out"), &format!("{input}.dlq")] {
        create_topic(t, 1).await?;
    }
    let group = unique("g");
    let config = config_toml(
        &group,
        &[HandlerSpec::new("h", "fail-on-marker", &input).extra(
            "max_attempts = 100\ninitial_backoff_ms = 5000\nmax_backoff_ms = 5000\ndeadline_ms = 500",
        )],
    )
    .replace("[pipeline]\n", "[pipeline]\ndrain_timeout_ms = 500\n");
    let mut weir = Weir::start(&config)?;
    let addr = weir.http_addr().await?;
    produce(&input, &[envelope(0, serde_json::json!({"n": "RETRY"}))]).await?;
    // Shut down while the event waits between attempts.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !Scrape::fetch(&addr)
        .await?
        .text
        .contains("weir_events_retried_total{handler=\"h\"} 1")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no retry within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, log) = weir.stop(Duration::from_secs(30)).await?;
    assert!(!status.success(), "exit status {status}");
    assert!(
        log.iter().any(|l| l.contains("drain_timeout_ms")),
        "the reason is logged"
    );
    assert_eq!(committed(&group, &input, 1)?, vec![0]);
    Ok(())
}
