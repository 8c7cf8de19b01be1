//! Deny-by-default WASI: no files, environment or sockets unless granted;
//! stdout/stderr land in the runtime log tagged with the handler.

use std::time::Duration;

use rdkafka::message::Message;
use serde_json::json;
use weir_e2e::*;

async fn answers(
    extra: &str,
    env: &[(&str, &str)],
    cmds: &[&str],
) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let input = unique("sandbox");
    let output = format!("{input}.out");
    let group = unique("sandbox-group");
    create_topic(&input, 1).await?;
    create_topic(&output, 1).await?;
    let events: Vec<In> = cmds
        .iter()
        .enumerate()
        .map(|(i, c)| In::envelope("k", &format!("c{i}"), "c", "cmd", json!(c)))
        .collect();
    produce(&input, &events).await?;
    let handler = HandlerSpec::new("prober", "misbehave", &input).extra(extra);
    let weir = Weir::start_with_env(&config_toml(&group, &[handler]), env)?;
    await_committed_to_end(&group, &input, 1, Duration::from_secs(60)).await?;
    let log = weir.log();
    assert!(weir.terminate(Duration::from_secs(30)).await?.success());
    let out = read_all(&output)?
        .iter()
        .map(|m| String::from_utf8_lossy(m.payload().unwrap()).into_owned())
        .collect();
    Ok((out, log))
}

#[tokio::test(flavor = "multi_thread")]
async fn files_environment_and_sockets_are_denied_by_default() -> anyhow::Result<()> {
    let (out, log) = answers(
        "",
        &[("WEIR_TEST_SECRET", "s3cret")],
        &[
            "read:/etc/hostname",
            "env:WEIR_TEST_SECRET",
            &format!("connect:{}", brokers()),
            "print:hello from the guest",
        ],
    )
    .await?;
    assert!(out[0].starts_with("read denied"), "{}", out[0]);
    assert!(out[1].starts_with("env denied"), "{}", out[1]);
    assert!(out[2].starts_with("connect denied"), "{}", out[2]);
    assert_eq!(out[3], "printed");
    let line = log
        .iter()
        .find(|l| l.contains("hello from the guest") && !l.contains("stderr"))
        .expect("stdout line in the log");
    assert!(line.contains("prober") && line.contains("stdout"), "{line}");
    assert!(log
        .iter()
        .any(|l| l.contains("hello from the guest (stderr)") && l.contains("prober")));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn granted_environment_and_read_only_folder_work() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("rates.txt"), "eur=1.0")?;
    let extra = format!(
        "allow_env = [\"WEIR_TEST_GRANTED\"]\nread_only_dir = {:?}",
        dir.path().display().to_string()
    );
    let (out, _) = answers(
        &extra,
        &[("WEIR_TEST_GRANTED", "yes"), ("WEIR_TEST_SECRET", "no")],
        &[
            "read:/data/rates.txt",
            "env:WEIR_TEST_GRANTED",
            "env:WEIR_TEST_SECRET",
            "read:/etc/hostname",
        ],
    )
    .await?;
    assert_eq!(out[0], "read ok: eur=1.0");
    assert_eq!(out[1], "env ok: yes");
    assert!(out[2].starts_with("env denied"), "{}", out[2]);
    assert!(out[3].starts_with("read denied"), "{}", out[3]);
    Ok(())
}

/// Handlers subscribed to one topic share that partition's worker: events
/// reach every handler in offset order, so while one handler retries an
/// event in place (blocking mode), the others wait with it.
#[tokio::test(flavor = "multi_thread")]
async fn handlers_of_one_topic_share_a_partition_worker_so_blocking_retries_delay_the_others(
) -> anyhow::Result<()> {
    let input = unique("shared-worker");
    let echoed = format!("{input}.echo");
    let passed = format!("{input}.flaky");
    let dlq = format!("{input}.dlq");
    let group = unique("shared-worker-group");
    for topic in [&input, &echoed, &passed, &dlq] {
        create_topic(topic, 1).await?;
    }
    // Event 1 carries the retry marker: "flaky" fails it retriably on every
    // attempt and dead-letters it after the third. Event 2 is plain.
    produce(
        &input,
        &[
            In::envelope("k", "e1", "c", "t", json!("RETRY")),
            In::envelope("k", "e2", "c", "t", json!("plain")),
        ],
    )
    .await?;
    let handlers = [
        HandlerSpec::new("echo", "echo", &input).config("output_topic", &echoed),
        HandlerSpec::new("flaky", "fail-on-marker", &input)
            .config("retry_marker", "RETRY")
            .config("output_topic", &passed)
            .extra("max_attempts = 3\ninitial_backoff_ms = 300\nmax_backoff_ms = 300\nretry_mode = \"blocking\""),
    ];
    let weir = Weir::start(&config_toml(&group, &handlers))?;
    await_records(&dlq, 1, 1, Duration::from_secs(60)).await?;
    await_records(&echoed, 1, 2, Duration::from_secs(60)).await?;
    await_committed_to_end(&group, &input, 1, Duration::from_secs(60)).await?;
    assert!(weir.terminate(Duration::from_secs(30)).await?.success());

    let dead = read_all(&dlq)?;
    assert_eq!(dead.len(), 1, "one dead letter");
    let d = &dead[0];
    assert_eq!(header(d, "weir-handler").as_deref(), Some("flaky"));
    assert_eq!(
        header(d, "weir-error-kind").as_deref(),
        Some("retries-exhausted")
    );
    assert_eq!(header(d, "weir-attempts").as_deref(), Some("3"));
    // Each handler's outcome is its own: echo handled both events, flaky
    // passed event 2 on.
    let echo_out = read_all(&echoed)?;
    assert_eq!(causation_ids(&echo_out), ["e1", "e2"]);
    assert_eq!(causation_ids(&read_all(&passed)?), ["e2"]);

    // But not its timing: echo's output for event 2 was published only
    // after flaky had given up on event 1.
    let e2 = echo_out
        .iter()
        .find(|m| header(m, "causation-id").as_deref() == Some("e2"))
        .expect("echo's output for e2");
    let dead_at = d.timestamp().to_millis().expect("a dead-letter timestamp");
    let e2_at = e2.timestamp().to_millis().expect("an output timestamp");
    println!(
        "shared worker: flaky dead-lettered e1 at {dead_at} ms, echo published e2 at {e2_at} ms ({} ms later)",
        e2_at - dead_at
    );
    assert!(
        e2_at >= dead_at,
        "echo published e2 at {e2_at} before flaky dead-lettered e1 at {dead_at}: not held up"
    );
    Ok(())
}
