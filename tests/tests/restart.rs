//! Stopping the runtime mid-stream (gracefully, then by SIGKILL) and
//! starting it again leaves no input without its output.

use std::collections::HashSet;
use std::time::Duration;

use rdkafka::message::Message;
use serde_json::{json, Value};
use weir_e2e::*;

#[tokio::test(flavor = "multi_thread")]
async fn restarts_leave_no_input_without_output() -> anyhow::Result<()> {
    const N: usize = 6_000;
    const P: i32 = 3;
    let input = unique("restart-in");
    let output = format!("{input}.out");
    let group = unique("restart-group");
    create_topic(&input, P).await?;
    create_topic(&output, P).await?;
    // A slow handler (2 ms per event) so that the stops land mid-stream.
    let config = config_toml(
        &group,
        &[HandlerSpec::new("echo", "echo", &input).config("delay_ms", "2")],
    );
    let batch = |from: usize, to: usize| -> Vec<In> {
        (from..to)
            .map(|i| {
                In::envelope(
                    &format!("k{}", i % 17),
                    &format!("evt-{i}"),
                    "c",
                    "tick",
                    json!({"i": i}),
                )
            })
            .collect()
    };
    let total = |v: Vec<i64>| v.into_iter().filter(|o| *o > 0).sum::<i64>();

    // Graceful stop mid-stream: exit 0, and every event that produced an
    // output is committed (in-flight work finished, commit synchronous).
    produce(&input, &batch(0, 3_000)).await?;
    let weir = Weir::start(&config)?;
    await_records(&output, P, 200, Duration::from_secs(60)).await?;
    let status = weir.terminate(Duration::from_secs(30)).await?;
    assert!(status.success(), "graceful stop exits 0, got {status}");
    let outputs = total(end_offsets(&output, P)?);
    let committed_after_stop = total(committed(&group, &input, P)?);
    println!("after graceful stop: {committed_after_stop} committed, {outputs} outputs");
    assert!(committed_after_stop < 3_000, "the stop was not mid-stream");
    assert_eq!(
        committed_after_stop, outputs,
        "graceful stop commits exactly what it finished"
    );

    // A crash while events are in flight.
    let weir = Weir::start(&config)?;
    await_records(&output, P, outputs + 100, Duration::from_secs(60)).await?;
    weir.kill().await?;
    let c = total(committed(&group, &input, P)?);
    let o = total(end_offsets(&output, P)?);
    assert!(
        c < 3_000,
        "the crash was not mid-stream: {c} committed, {o} outputs"
    );

    // More events arrive while it is down; the next start catches up.
    produce(&input, &batch(3_000, N)).await?;
    let weir = Weir::start(&config)?;
    await_committed_to_end(&group, &input, P, Duration::from_secs(180)).await?;
    assert!(weir.terminate(Duration::from_secs(30)).await?.success());

    let mut seen = HashSet::new();
    let all = read_all(&output)?;
    for m in &all {
        let v: Value = serde_json::from_slice(m.payload().unwrap())?;
        seen.insert(v["causationId"].as_str().unwrap().to_owned());
    }
    let missing: Vec<usize> = (0..N)
        .filter(|i| !seen.contains(&format!("evt-{i}")))
        .collect();
    assert!(
        missing.is_empty(),
        "{} inputs have no output, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    println!(
        "restart: {N} inputs, {} outputs, {} duplicates after the crash",
        all.len(),
        all.len() - N
    );
    Ok(())
}
