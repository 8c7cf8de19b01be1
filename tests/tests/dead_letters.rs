//! Malformed envelopes, fatal errors and exhausted retries land in the
//! dead-letter topic with the reason, and the events behind them go on.

use std::time::Duration;

use rdkafka::message::{Headers, Message};
use serde_json::json;
use weir_e2e::*;

#[tokio::test(flavor = "multi_thread")]
async fn failures_are_dead_lettered_and_processing_goes_on() -> anyhow::Result<()> {
    let input = unique("dlq-in");
    let output = format!("{input}.out");
    let dlq = format!("{input}.dlq");
    let group = unique("dlq-group");
    create_topic(&input, 1).await?;
    create_topic(&output, 1).await?;
    create_topic(&dlq, 1).await?;

    let mut malformed = In::malformed("k", b"{\"eventType\": \"x\", \"payload\": ");
    malformed
        .headers
        .push(("x-origin".into(), b"\x00\xffbytes".to_vec()));
    let records = vec![
        In::envelope("k", "ok-1", "c", "t", json!("first")),
        malformed,
        In::envelope("k", "ok-2", "c", "t", json!("second")),
        In::envelope("k", "bad-1", "c", "t", json!("this one says FAIL")),
        In::envelope("k", "ok-3", "c", "t", json!("third")),
        In::envelope("k", "flaky-1", "c", "t", json!("RETRY forever")),
        In::envelope("k", "ok-4", "c", "t", json!("fourth")),
    ];
    produce(&input, &records).await?;

    let handler = HandlerSpec::new("marker", "fail-on-marker", &input)
        .extra("max_attempts = 3\ninitial_backoff_ms = 10\nmax_backoff_ms = 50");
    let weir = Weir::start(&config_toml(&group, &[handler]))?;
    await_committed_to_end(&group, &input, 1, Duration::from_secs(60)).await?;
    assert!(weir.terminate(Duration::from_secs(30)).await?.success());

    let outputs = causation_ids(&read_all(&output)?);
    assert_eq!(outputs, ["ok-1", "ok-2", "ok-3", "ok-4"]);

    let dead = read_all(&dlq)?;
    assert_eq!(dead.len(), 3, "three dead letters");
    let kinds: Vec<String> = dead
        .iter()
        .map(|m| header(m, "weir-error-kind").unwrap())
        .collect();
    assert_eq!(kinds, ["undecodable", "fatal", "retries-exhausted"]);

    // The malformed record is kept byte for byte, headers included.
    let m = &dead[0];
    assert_eq!(m.payload(), Some(&records[1].value[..]));
    assert_eq!(m.key(), Some(&b"k"[..]));
    let origin = m
        .headers()
        .unwrap()
        .iter()
        .find(|h| h.key == "x-origin")
        .unwrap();
    assert_eq!(origin.value, Some(&b"\x00\xffbytes"[..]));
    assert!(header(m, "weir-error-message")
        .unwrap()
        .contains("malformed JSON envelope"));
    assert_eq!(
        header(m, "weir-original-topic").as_deref(),
        Some(input.as_str())
    );
    assert_eq!(header(m, "weir-original-partition").as_deref(), Some("0"));
    assert_eq!(header(m, "weir-original-offset").as_deref(), Some("1"));
    assert_eq!(
        header(m, "weir-consumer-group").as_deref(),
        Some(group.as_str())
    );

    let m = &dead[1];
    assert!(header(m, "weir-error-message").unwrap().contains("FAIL"));
    assert_eq!(header(m, "weir-handler").as_deref(), Some("marker"));
    assert_eq!(header(m, "weir-handler-version").map(|v| v.len()), Some(12));
    assert_eq!(header(m, "weir-original-offset").as_deref(), Some("3"));
    assert_eq!(m.payload(), Some(&records[3].value[..]));

    let m = &dead[2];
    assert_eq!(header(m, "weir-attempts").as_deref(), Some("3"));
    assert!(header(m, "weir-error-message")
        .unwrap()
        .contains("attempt 3"));
    Ok(())
}
