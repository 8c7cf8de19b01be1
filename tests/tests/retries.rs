//! Retries with backoff, in place (blocking) and through a retry topic.

use std::time::Duration;

use rdkafka::message::Message;
use serde_json::json;
use weir_e2e::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_handler_that_fails_twice_then_succeeds_publishes_once() -> anyhow::Result<()> {
    let input = unique("retry-ok-in");
    let output = format!("{input}.out");
    let dlq = format!("{input}.dlq");
    let group = unique("retry-ok-group");
    create_topic(&input, 1).await?;
    create_topic(&output, 1).await?;
    create_topic(&dlq, 1).await?;
    produce(
        &input,
        &[In::envelope("k", "flaky", "c", "t", json!("RETRY"))],
    )
    .await?;
    let handler = HandlerSpec::new("flaky", "fail-on-marker", &input)
        .config("succeed_on_attempt", "3")
        .extra("max_attempts = 5\ninitial_backoff_ms = 10\nmax_backoff_ms = 40");
    let weir = Weir::start(&config_toml(&group, &[handler]))?;
    await_committed_to_end(&group, &input, 1, Duration::from_secs(60)).await?;
    let log = weir.log();
    assert!(weir.terminate(Duration::from_secs(30)).await?.success());

    let out = read_all(&output)?;
    assert_eq!(out.len(), 1, "one output");
    assert_eq!(header(&out[0], "attempt").as_deref(), Some("3"));
    for attempt in [1, 2] {
        let needle = format!("event flaky fails on attempt {attempt}");
        assert!(
            log.iter().any(|l| l.contains(&needle)),
            "no log line {needle:?}"
        );
    }
    assert!(read_all(&dlq)?.is_empty(), "no dead letter");
    Ok(())
}

async fn always_failing(
    mode: &str,
) -> anyhow::Result<(
    Vec<rdkafka::message::OwnedMessage>,
    Vec<rdkafka::message::OwnedMessage>,
    String,
    String,
)> {
    let input = unique(&format!("retry-{mode}-in"));
    let output = format!("{input}.out");
    let dlq = format!("{input}.dlq");
    let group = unique("retry-group");
    create_topic(&input, 1).await?;
    create_topic(&output, 1).await?;
    create_topic(&dlq, 1).await?;
    if mode == "topic" {
        create_topic(&format!("{input}.retry"), 1).await?;
    }
    produce(
        &input,
        &[
            In::envelope("k", "ok-1", "c", "t", json!("one")),
            In::envelope("k", "stuck", "c", "t", json!("RETRY")),
            In::envelope("k", "ok-2", "c", "t", json!("two")),
        ],
    )
    .await?;
    let (attempts, backoff) = if mode == "topic" { (6, 200) } else { (3, 20) };
    let handler = HandlerSpec::new("flaky", "fail-on-marker", &input).extra(&format!(
        "max_attempts = {attempts}\ninitial_backoff_ms = {backoff}\nmax_backoff_ms = 5000\nretry_mode = {mode:?}"
    ));
    let weir = Weir::start(&config_toml(&group, &[handler]))?;
    await_records(&dlq, 1, 1, Duration::from_secs(60)).await?;
    await_committed_to_end(&group, &input, 1, Duration::from_secs(60)).await?;
    assert!(weir.terminate(Duration::from_secs(30)).await?.success());
    Ok((read_all(&output)?, read_all(&dlq)?, input, group))
}

fn ts(m: &rdkafka::message::OwnedMessage) -> i64 {
    m.timestamp().to_millis().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn blocking_retries_dead_letter_after_max_attempts_then_go_on() -> anyhow::Result<()> {
    let (out, dead, input, group) = always_failing("blocking").await?;
    let ids = causation_ids(&out);
    assert_eq!(ids, ["ok-1", "ok-2"]);
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(
        header(d, "weir-error-kind").as_deref(),
        Some("retries-exhausted")
    );
    assert_eq!(header(d, "weir-attempts").as_deref(), Some("3"));
    assert_eq!(header(d, "weir-handler").as_deref(), Some("flaky"));
    assert_eq!(header(d, "weir-handler-version").map(|v| v.len()), Some(12));
    assert_eq!(header(d, "weir-original-topic"), Some(input));
    assert_eq!(header(d, "weir-original-partition").as_deref(), Some("0"));
    assert_eq!(header(d, "weir-original-offset").as_deref(), Some("1"));
    assert!(
        header(d, "weir-original-timestamp")
            .unwrap()
            .parse::<i64>()?
            > 0
    );
    assert_eq!(header(d, "weir-consumer-group"), Some(group));
    assert!(header(d, "weir-error-message")
        .unwrap()
        .contains("attempt 3"));
    let first = header(d, "weir-first-failure-at").unwrap();
    let last = header(d, "weir-last-failure-at").unwrap();
    assert!(first <= last, "{first} then {last}");
    assert_eq!(
        header(d, "content-type").as_deref(),
        Some("application/json"),
        "original headers kept"
    );
    // In order: the event behind waited for the dead letter.
    assert!(ts(&out[1]) >= ts(d));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn topic_retries_let_the_events_behind_go_first() -> anyhow::Result<()> {
    let (out, dead, input, _) = always_failing("topic").await?;
    let ids = causation_ids(&out);
    assert_eq!(ids, ["ok-1", "ok-2"]);
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(
        header(d, "weir-error-kind").as_deref(),
        Some("retries-exhausted")
    );
    assert_eq!(header(d, "weir-attempts").as_deref(), Some("6"));
    // The dead letter names the source topic and offset, not the retry topic's.
    assert_eq!(header(d, "weir-original-topic"), Some(input));
    assert_eq!(header(d, "weir-original-offset").as_deref(), Some("1"));
    assert!(header(d, "weir-retry-attempt").is_none());
    // Out of order: the event behind was handled while the stuck one waited.
    assert!(
        ts(&out[1]) < ts(d),
        "ok-2 at {} is not before the dead letter at {}",
        ts(&out[1]),
        ts(d)
    );
    Ok(())
}
