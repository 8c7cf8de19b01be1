//! `weir dlq replay`: dead letters go back to their topic and a fixed
//! handler processes them, once however often they are replayed.

use std::time::Duration;

use serde_json::json;
use weir_e2e::*;

#[tokio::test(flavor = "multi_thread")]
async fn replayed_dead_letters_are_processed_after_the_fix() -> anyhow::Result<()> {
    let input = unique("replay-in");
    let output = format!("{input}.out");
    let dlq = format!("{input}.dlq");
    let group = unique("replay-group");
    create_topic(&input, 2).await?;
    create_topic(&output, 2).await?;
    create_topic(&dlq, 2).await?;
    let state = tempfile::tempdir()?;
    let files = tempfile::tempdir()?;
    let broken = HandlerSpec::new("orders", "fail-on-marker", &input);
    let config = with_store(config_toml(&group, &[broken]), state.path(), 3600);
    produce(
        &input,
        &[
            In::envelope("a", "o-1", "c", "t", json!("fine")),
            In::envelope("b", "o-2", "c", "t", json!("FAIL until fixed")),
            In::envelope("c", "o-3", "c", "t", json!("FAIL until fixed")),
        ],
    )
    .await?;
    let weir = Weir::start(&config)?;
    await_committed_to_end(&group, &input, 2, Duration::from_secs(60)).await?;
    assert!(weir.terminate(Duration::from_secs(30)).await?.success());
    assert_eq!(read_all(&dlq)?.len(), 2);

    // The fix: the marker no longer fails.
    let fixed = HandlerSpec::new("orders", "fail-on-marker", &input).config("marker", "NEVER");
    let config = with_store(config_toml(&group, &[fixed]), state.path(), 3600);
    let path = write_config(files.path(), &config);
    let (ok, stdout, stderr) = run_weir_output(&[
        "dlq",
        "replay",
        "--config",
        &path,
        "--topic",
        &dlq,
        "--handler",
        "orders",
    ]);
    assert!(ok, "replay failed: {stderr}");
    assert!(
        stdout.contains("replayed 2 dead letters"),
        "stdout: {stdout}"
    );

    let weir = Weir::start(&config)?;
    await_committed_to_end(&group, &input, 2, Duration::from_secs(60)).await?;
    // Replaying the same dead letters again changes nothing.
    let (ok, stdout, _) = run_weir_output(&["dlq", "replay", "--config", &path, "--topic", &dlq]);
    assert!(
        ok && stdout.contains("replayed 2 dead letters"),
        "stdout: {stdout}"
    );
    await_committed_to_end(&group, &input, 2, Duration::from_secs(60)).await?;
    assert!(weir.terminate(Duration::from_secs(30)).await?.success());

    let mut ids = causation_ids(&read_all(&output)?);
    ids.sort();
    assert_eq!(ids, ["o-1", "o-2", "o-3"]);
    // Filters: nothing of another handler or kind.
    let (ok, stdout, _) = run_weir_output(&[
        "dlq",
        "replay",
        "--config",
        &path,
        "--topic",
        &dlq,
        "--error-kind",
        "trap",
    ]);
    assert!(
        ok && stdout.contains("replayed 0 dead letters") && stdout.contains("skipped 2"),
        "stdout: {stdout}"
    );
    Ok(())
}

/// A replay is for the handler that failed: the other handlers of the
/// topic, which handled the event already, see it as done.
#[tokio::test(flavor = "multi_thread")]
async fn a_replay_reruns_only_the_handler_it_names() -> anyhow::Result<()> {
    let input = unique("replay-one");
    let out_a = format!("{input}.a");
    let out_b = format!("{input}.b");
    let dlq = format!("{input}.dlq");
    let group = unique("replay-group");
    for t in [&input, &out_a, &out_b, &dlq] {
        create_topic(t, 1).await?;
    }
    let state = tempfile::tempdir()?;
    let files = tempfile::tempdir()?;
    let handlers = |marker: &str| {
        [
            HandlerSpec::new("a", "fail-on-marker", &input)
                .config("output_topic", &out_a)
                .config("marker", marker),
            HandlerSpec::new("b", "echo", &input).config("output_topic", &out_b),
        ]
    };
    let config = with_store(config_toml(&group, &handlers("FAIL")), state.path(), 3600);
    produce(&input, &[In::envelope("k", "o-1", "c", "t", json!("FAIL"))]).await?;
    let weir = Weir::start(&config)?;
    await_committed_to_end(&group, &input, 1, Duration::from_secs(60)).await?;
    assert!(weir.terminate(Duration::from_secs(30)).await?.success());
    assert_eq!(read_all(&dlq)?.len(), 1, "a dead-lettered it");
    assert_eq!(read_all(&out_b)?.len(), 1, "b handled it");

    // a is fixed; its dead letter is replayed (for a, as its header says).
    let config = with_store(config_toml(&group, &handlers("NEVER")), state.path(), 3600);
    let path = write_config(files.path(), &config);
    let (ok, stdout, stderr) =
        run_weir_output(&["dlq", "replay", "--config", &path, "--topic", &dlq]);
    assert!(
        ok && stdout.contains("replayed 1 dead letters"),
        "{stdout} {stderr}"
    );
    let weir = Weir::start(&config)?;
    await_committed_to_end(&group, &input, 1, Duration::from_secs(60)).await?;
    assert!(weir.terminate(Duration::from_secs(30)).await?.success());
    assert_eq!(
        causation_ids(&read_all(&out_a)?),
        ["o-1"],
        "a handled it again"
    );
    assert_eq!(read_all(&out_b)?.len(), 1, "b did not handle it twice");
    Ok(())
}
