//! The idempotency store: duplicates are skipped, marks expire after the
//! retention.

use std::time::Duration;

use serde_json::json;
use weir_e2e::*;

fn causations(topic: &str) -> anyhow::Result<Vec<String>> {
    Ok(read_all(topic)?
        .iter()
        .map(|m| header(m, "causation-id").unwrap_or_default())
        .collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_event_id_twice_is_handled_once() -> anyhow::Result<()> {
    let input = unique("dup-in");
    let output = format!("{input}.out");
    let group = unique("dup-group");
    create_topic(&input, 2).await?;
    create_topic(&output, 2).await?;
    let state = tempfile::tempdir()?;
    let config = with_store(
        config_toml(&group, &[HandlerSpec::new("echo", "echo", &input)]),
        state.path(),
        3600,
    );

    // A producer retry: the same event twice in a row, at two offsets.
    produce(
        &input,
        &[
            In::envelope("a", "evt-1", "c", "t", json!(1)),
            In::envelope("a", "evt-2", "c", "t", json!(2)),
            In::envelope("a", "evt-1", "c", "t", json!(1)),
        ],
    )
    .await?;
    let weir = Weir::start(&config)?;
    await_committed_to_end(&group, &input, 2, Duration::from_secs(60)).await?;
    // Much later, on another key (another partition, another worker): the store answers.
    produce(
        &input,
        &[
            In::envelope("b", "evt-1", "c", "t", json!(1)),
            In::envelope("c", "evt-1", "c", "t", json!(1)),
        ],
    )
    .await?;
    await_committed_to_end(&group, &input, 2, Duration::from_secs(60)).await?;
    assert!(weir.terminate(Duration::from_secs(30)).await?.success());

    let mut seen = causations(&output)?;
    seen.sort();
    assert_eq!(seen, ["evt-1", "evt-2"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_ids_are_processed_again() -> anyhow::Result<()> {
    let input = unique("ttl-in");
    let output = format!("{input}.out");
    let group = unique("ttl-group");
    create_topic(&input, 1).await?;
    create_topic(&output, 1).await?;
    let state = tempfile::tempdir()?;
    let files = tempfile::tempdir()?;
    let config = with_store(
        config_toml(&group, &[HandlerSpec::new("echo", "echo", &input)]),
        state.path(),
        2,
    );
    let path = write_config(files.path(), &config);

    produce(&input, &[In::envelope("k", "evt-ttl", "c", "t", json!(1))]).await?;
    let weir = Weir::start(&config)?;
    await_committed_to_end(&group, &input, 1, Duration::from_secs(60)).await?;
    assert!(weir.terminate(Duration::from_secs(30)).await?.success());
    assert_eq!(marks(&path), [("echo".to_string(), "evt-ttl".to_string())]);

    // Wait for the mark to expire (the store stops reporting it).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !marks(&path).is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the mark never expired"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    produce(&input, &[In::envelope("k", "evt-ttl", "c", "t", json!(1))]).await?;
    let weir = Weir::start(&config)?;
    await_committed_to_end(&group, &input, 1, Duration::from_secs(60)).await?;
    assert!(weir.terminate(Duration::from_secs(30)).await?.success());
    assert_eq!(
        causations(&output)?,
        ["evt-ttl", "evt-ttl"],
        "handled again after expiry"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_in_use_is_refused_naming_the_path() -> anyhow::Result<()> {
    let group = unique("lock-group");
    let input = unique("lock-in");
    create_topic(&input, 1).await?;
    let state = tempfile::tempdir()?;
    let config = with_store(
        config_toml(&group, &[HandlerSpec::new("echo", "echo", &input)]),
        state.path(),
        60,
    );
    let files = tempfile::tempdir()?;
    let path = write_config(files.path(), &config);
    let mut first = Weir::start(&config)?;
    // The first instance holds the store once it logs that it is consuming.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !first.log().iter().any(|l| l.contains("consuming")) {
        assert!(
            first.running() && tokio::time::Instant::now() < deadline,
            "first instance did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (ok, stderr) = run_weir(&["run", "--config", &path]);
    assert!(!ok);
    assert!(
        stderr.contains(&state.path().display().to_string()),
        "stderr: {stderr}"
    );
    assert!(stderr.contains("another weir process"), "stderr: {stderr}");
    assert!(first.terminate(Duration::from_secs(30)).await?.success());
    Ok(())
}
