//! Backpressure: bounded work in flight under overload (paused and resumed
//! partitions, bounded memory, nothing lost), and fuel budgets that slow an
//! expensive handler without slowing a cheap one.

use std::collections::HashSet;
use std::time::Duration;

use rdkafka::message::Message;
use serde_json::json;
use weir_e2e::*;

#[tokio::test(flavor = "multi_thread")]
async fn overload_pauses_partitions_keeps_memory_bounded_and_loses_nothing() -> anyhow::Result<()> {
    const N: usize = 4_000;
    const P: i32 = 2;
    let input = unique("flood");
    let output = format!("{input}.out");
    let group = unique("flood-group");
    create_topic(&input, P).await?;
    create_topic(&output, P).await?;
    let filler = "x".repeat(1000);
    let events: Vec<In> = (0..N)
        .map(|i| {
            In::envelope(
                &format!("k{}", i % 31),
                &format!("f-{i}"),
                "c",
                "t",
                json!({"i": i, "fill": filler}),
            )
        })
        .collect();
    // The handler takes 2 ms an event (at most ~1,000 events/s over two
    // partitions); the events arrive over ten times faster.
    let (per_partition, total, prefetch_kib) = (50usize, 80usize, 256u64);
    let config = config_toml(&group, &[HandlerSpec::new("slow", "echo", &input).config("delay_ms", "2")]).replace(
        "[pipeline]\n",
        &format!("[pipeline]\nmax_in_flight_per_partition = {per_partition}\nmax_in_flight_total = {total}\nprefetch_kbytes = {prefetch_kib}\n"),
    );
    let mut weir = Weir::start_with_env(&config, &[("WEIR_LOG", "info,weir::pipeline=debug")])?;
    weir.await_log("partitions assigned", Duration::from_secs(30))
        .await?;
    let producing = tokio::spawn({
        let input = input.clone();
        async move { produce(&input, &events).await }
    });
    let mut peak = 0u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        peak = peak.max(weir.rss_kib().unwrap_or(0));
        if producing.is_finished() && committed(&group, &input, P)? == end_offsets(&input, P)? {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline && weir.running(),
            "overload run did not finish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    producing.await??;
    let log = weir.log();
    assert!(weir.terminate(Duration::from_secs(30)).await?.success());

    let paused = log
        .iter()
        .filter(|l| l.contains("partition paused"))
        .count();
    let resumed = log
        .iter()
        .filter(|l| l.contains("partition resumed"))
        .count();
    assert!(
        paused > 0 && resumed > 0,
        "paused {paused}, resumed {resumed}"
    );
    assert!(
        !log.iter().any(|l| l.contains("partitions revoked")),
        "the consumer left its group"
    );
    let ids: HashSet<String> = causation_ids(&read_all(&output)?).into_iter().collect();
    assert_eq!(ids.len(), N, "nothing lost");
    // Memory bound from the config: the runtime's own footprint (engine,
    // compiled handler, librdkafka) plus four times what may be buffered:
    // prefetched and held records, and the events queued and awaiting
    // acknowledgement.
    // (prefetch twice: librdkafka's, and what is held before a pause).
    let buffered_kib = 2 * prefetch_kib + (total as u64 + 2 * per_partition as u64 * P as u64) * 2;
    let bound = 160 * 1024 + 4 * buffered_kib;
    println!("overload: paused {paused} times, resumed {resumed} times, peak RSS {peak} KiB (bound {bound} KiB)");
    assert!(
        peak < bound,
        "peak RSS {peak} KiB over the bound {bound} KiB"
    );
    Ok(())
}

/// Fuel used per the runtime's final progress line.
fn fuel_used(log: &[String]) -> u64 {
    let line = log
        .iter()
        .rev()
        .find(|l| l.contains("progress"))
        .expect("a progress line");
    let at = line.find("fuel_used=").expect("fuel_used field") + "fuel_used=".len();
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fuel_budget_throttles_only_its_own_handler() -> anyhow::Result<()> {
    const BURN: &str = "burn:3000000";
    // Calibrate: the fuel one expensive event uses.
    let probe = unique("burn-probe");
    let group = unique("burn-probe-group");
    create_topic(&probe, 1).await?;
    create_topic(&format!("{probe}.out"), 1).await?;
    let cmds = |n: usize, prefix: &str| -> Vec<In> {
        (0..n)
            .map(|i| In::envelope("k", &format!("{prefix}-{i}"), "c", "cmd", json!(BURN)))
            .collect()
    };
    produce(&probe, &cmds(4, "p")).await?;
    let weir = Weir::start(&config_toml(
        &group,
        &[HandlerSpec::new("burner", "misbehave", &probe)],
    ))?;
    await_committed_to_end(&group, &probe, 1, Duration::from_secs(60)).await?;
    let (_, log) = weir.stop(Duration::from_secs(30)).await?;
    let per_event = fuel_used(&log) / 4;
    assert!(per_event > 0);

    // Budget: two expensive events a second.
    let hot = unique("burn");
    let cold = unique("cheap");
    let group = unique("budget-group");
    for t in [&hot, &format!("{hot}.out"), &cold, &format!("{cold}.out")] {
        create_topic(t, 1).await?;
    }
    const HOT: usize = 12;
    produce(&hot, &cmds(HOT, "h")).await?;
    let cheap: Vec<In> = (0..300)
        .map(|i| In::envelope("k", &format!("c-{i}"), "c", "t", json!(i)))
        .collect();
    produce(&cold, &cheap).await?;
    let handlers = [
        HandlerSpec::new("burner", "misbehave", &hot)
            .extra(&format!("fuel_per_second = {}", per_event * 2)),
        HandlerSpec::new("cheap", "echo", &cold),
    ];
    let weir = Weir::start(&config_toml(&group, &handlers))?;
    await_committed_to_end(&group, &hot, 1, Duration::from_secs(60)).await?;
    await_committed_to_end(&group, &cold, 1, Duration::from_secs(60)).await?;
    assert!(weir.terminate(Duration::from_secs(30)).await?.success());

    let span = |topic: &str| -> anyhow::Result<(i64, i64)> {
        let out = read_all(topic)?;
        let ts: Vec<i64> = out
            .iter()
            .map(|m| m.timestamp().to_millis().unwrap())
            .collect();
        Ok((*ts.iter().min().unwrap(), *ts.iter().max().unwrap()))
    };
    let (hot_first, hot_last) = span(&format!("{hot}.out"))?;
    let (_, cold_last) = span(&format!("{cold}.out"))?;
    let hot_secs = (hot_last - hot_first) as f64 / 1000.0;
    // One second of budget is available at once, then two events a second.
    let expected = (HOT as f64 - 2.0) / 2.0;
    println!("fuel budget: {per_event} fuel an event; {HOT} events took {hot_secs:.1} s (expected ~{expected:.1} s)");
    assert!(hot_secs > expected * 0.7, "not throttled: {hot_secs:.1} s");
    assert!(
        hot_secs < expected * 2.0 + 2.0,
        "throttled far below its budget: {hot_secs:.1} s"
    );
    assert!(
        cold_last < hot_last - 2_000,
        "the cheap handler was held back by the expensive one"
    );
    Ok(())
}
