//! The idempotency store: duplicates are skipped, also by a process that
//! never saw the originals; marks expire after the retention.

use std::collections::BTreeSet;
use std::time::Duration;

use rdkafka::message::Message;
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
    // Later, on other keys, in the same process: still handled once. (This
    // process may answer from memory; the next test makes the store answer.)
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
async fn a_new_process_skips_what_its_store_marked_on_every_partition() -> anyhow::Result<()> {
    const P: i32 = 4;
    let input = unique("dup-store-in");
    let output = format!("{input}.out");
    create_topic(&input, P).await?;
    create_topic(&output, P).await?;
    let state = tempfile::tempdir()?;
    let files = tempfile::tempdir()?;
    let config_for = |group: &str| {
        with_store(
            config_toml(group, &[HandlerSpec::new("echo", "echo", &input)]),
            state.path(),
            3600,
        )
    };
    let event = |key: String, id: &str, n: usize| In::envelope(&key, id, "c", "t", json!(n));

    // First process: the originals, spread over the partitions by their keys.
    let originals: Vec<String> = (0..8).map(|i| format!("evt-{i}")).collect();
    let records: Vec<In> = originals
        .iter()
        .enumerate()
        .map(|(i, id)| event(format!("k{i}"), id, i))
        .collect();
    produce(&input, &records).await?;
    let first_group = unique("dup-store-first");
    let weir = Weir::start(&config_for(&first_group))?;
    await_committed_to_end(&first_group, &input, P, Duration::from_secs(60)).await?;
    let (status, _) = weir.stop(Duration::from_secs(30)).await?;
    assert!(status.success(), "first weir exited with {status}");
    let path = write_config(files.path(), &config_for(&first_group));
    let marked: BTreeSet<String> = marks(&path)
        .into_iter()
        .filter(|(handler, _)| handler == "echo")
        .map(|(_, id)| id)
        .collect();
    assert_eq!(marked, originals.iter().cloned().collect::<BTreeSet<_>>());
    let input_ends = end_offsets(&input, P)?;
    let output_ends = end_offsets(&output, P)?;

    // Then: every original again under other keys (an upstream producer
    // publishing its batch twice), between genuinely new events.
    let fresh: Vec<String> = (0..4).map(|i| format!("new-{i}")).collect();
    let mut records = Vec::new();
    for (i, id) in originals.iter().enumerate() {
        records.push(event(format!("dup-{i}"), id, i));
        if i % 2 == 1 {
            records.push(event(format!("new-key-{i}"), &fresh[i / 2], i));
        }
    }
    produce(&input, &records).await?;
    let dup_partitions: BTreeSet<i32> = read_all(&input)?
        .iter()
        .filter(|m| m.offset() >= input_ends[m.partition() as usize])
        .filter(|m| m.key().is_some_and(|k| k.starts_with(b"dup-")))
        .map(|m| m.partition())
        .collect();
    assert!(
        dup_partitions.len() >= 2,
        "the duplicates landed on partitions {dup_partitions:?} only"
    );

    // A new process with the same store, in a new group: it reads the topic
    // from the beginning (originals and duplicates) with nothing in memory,
    // so only the store can tell it what was handled.
    let second_group = unique("dup-store-second");
    let weir = Weir::start(&config_for(&second_group))?;
    await_committed_to_end(&second_group, &input, P, Duration::from_secs(60)).await?;
    let (status, log) = weir.stop(Duration::from_secs(30)).await?;
    assert!(status.success(), "second weir exited with {status}");

    let outputs = read_all(&output)?;
    let mut second_run: Vec<String> = outputs
        .iter()
        .filter(|m| m.offset() >= output_ends[m.partition() as usize])
        .map(|m| header(m, "causation-id").unwrap_or_default())
        .collect();
    second_run.sort();
    assert_eq!(
        second_run, fresh,
        "the second process published for the new events only"
    );
    let mut all = causations(&output)?;
    all.sort();
    let mut expected: Vec<String> = originals.iter().chain(&fresh).cloned().collect();
    expected.sort();
    assert_eq!(all, expected, "every event handled exactly once");
    // It did see them: 8 originals and 8 duplicates skipped, 4 handled.
    assert_eq!(progress_counter(&log, "duplicates"), 16);
    assert_eq!(progress_counter(&log, "handled"), 4);
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
