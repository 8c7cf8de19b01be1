//! Backpressure: bounded work in flight under overload (paused and resumed
//! partitions, bounded memory, nothing lost), and fuel budgets that slow an
//! expensive handler without slowing a cheap one.

use std::time::Duration;

use rdkafka::message::Message;
use serde_json::json;
use weir_e2e::*;

/// The tests of this file run one after the other: the flood keeps both
/// cores busy for a minute, which would distort the budget test's timings.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One event of the flood: a JSON envelope of about `fill.len()` bytes.
fn flood_event(i: usize, fill: &str) -> In {
    In::envelope(
        &format!("k{}", i % 31),
        &format!("f-{i}"),
        "c",
        "t",
        json!({"i": i, "fill": fill}),
    )
}

// The guard only orders the tests of this file; nothing else takes it.
#[allow(clippy::await_holding_lock)]
#[tokio::test(flavor = "multi_thread")]
async fn overload_pauses_partitions_keeps_memory_bounded_and_loses_nothing() -> anyhow::Result<()> {
    let _serial = serial();
    const P: i32 = 2;
    // Few, large events: the bytes are what a queue that never stopped
    // fetching would hold, and large values are cheap to produce.
    let fill = "x".repeat(512 * 1024);
    let (per_partition, total, prefetch_kib) = (4u64, 8u64, 2048u64);
    let smallest = flood_event(0, &fill).value.len() as u64;
    let largest = flood_event(9_999_999, &fill).value.len() as u64;
    // Memory bound from the config: the runtime's own footprint (engine,
    // compiled handler, librdkafka) plus four times what may be buffered:
    // prefetched records twice (librdkafka's prefetch, and what is parked
    // before a pause), the events queued for the workers, and those handed
    // on and awaiting their outcome.
    let event_kib = largest.div_ceil(1024);
    let buffered_kib = 2 * prefetch_kib + (total + 2 * per_partition * P as u64) * event_kib;
    let bound_kib = 160 * 1024 + 4 * buffered_kib;
    // The input is over three times the bound: a runtime that kept fetching
    // while its handler lags would blow through it.
    let n = (3 * bound_kib * 1024).div_ceil(smallest) as usize + 1;
    let input_bytes = n as u64 * smallest;
    assert!(input_bytes > 3 * bound_kib * 1024);

    let input = unique("flood");
    let group = unique("flood-group");
    create_topic(&input, P).await?;
    // The handler sleeps 100 ms an event and publishes nothing: at most 20
    // events (10 MiB) a second over two partitions, while the producer
    // sends them as fast as the broker takes them.
    let handler = HandlerSpec::new("slow", "echo", &input)
        .config("delay_ms", "100")
        .config("discard", "true");
    let config = config_toml(&group, &[handler]).replace(
        "[pipeline]\n",
        &format!("[pipeline]\nmax_in_flight_per_partition = {per_partition}\nmax_in_flight_total = {total}\nprefetch_kbytes = {prefetch_kib}\n"),
    );
    let mut weir = Weir::start_with_env(&config, &[("WEIR_LOG", "info,weir::pipeline=debug")])?;
    weir.await_log("partitions assigned", Duration::from_secs(30))
        .await?;
    let started = tokio::time::Instant::now();
    let mut producing = Some(tokio::spawn({
        let input = input.clone();
        async move { produce_generated(&input, n, |i| flood_event(i, &fill)).await }
    }));
    let mut produce_secs = 0.0;
    // Peak resident memory, and peak backlog: events produced and not yet
    // handled (committed), which an unbounded queue would be holding.
    let (mut peak_kib, mut peak_backlog) = (0u64, 0i64);
    let deadline = started + Duration::from_secs(240);
    for tick in 0u64.. {
        peak_kib = peak_kib.max(weir.rss_kib().unwrap_or(0));
        if tick % 10 == 0 {
            if producing.as_ref().is_some_and(|p| p.is_finished()) {
                producing.take().unwrap().await??;
                produce_secs = started.elapsed().as_secs_f64();
            }
            let end: i64 = end_offsets(&input, P)?.iter().sum();
            let done: i64 = committed(&group, &input, P)?.iter().sum();
            peak_backlog = peak_backlog.max(end - done);
            if producing.is_none() && done == end {
                assert_eq!(end, n as i64, "every event produced");
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline && weir.running(),
            "overload run did not finish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let run_secs = started.elapsed().as_secs_f64();
    let before_shutdown = weir.log();
    let (status, log) = weir.stop(Duration::from_secs(30)).await?;
    assert!(status.success(), "weir exited with {status}");

    let count = |needle: &str| log.iter().filter(|l| l.contains(needle)).count();
    let (paused, resumed) = (count("partition paused"), count("partition resumed"));
    assert!(
        paused > 0 && resumed > 0,
        "paused {paused}, resumed {resumed}"
    );
    assert!(
        !before_shutdown
            .iter()
            .any(|l| l.contains("partitions revoked")),
        "the consumer left its group"
    );
    // Nothing lost, nothing twice: every offset committed (above) and every
    // event handled exactly once.
    assert_eq!(
        progress_counter(&log, "handled"),
        n as u64,
        "events handled"
    );
    assert_eq!(progress_counter(&log, "duplicates"), 0);

    let mib = |kib: u64| kib as f64 / 1024.0;
    let backlog_kib = peak_backlog as u64 * smallest / 1024;
    println!(
        "overload: input {:.0} MiB ({n} events of {:.0} KiB, produced in {produce_secs:.1} s, handled in {run_secs:.1} s), \
         peak backlog {:.0} MiB ({peak_backlog} events), peak RSS {:.1} MiB, bound {:.1} MiB; \
         paused {paused} times, resumed {resumed} times",
        mib(input_bytes / 1024),
        smallest as f64 / 1024.0,
        mib(backlog_kib),
        mib(peak_kib),
        mib(bound_kib),
    );
    assert!(
        peak_kib < bound_kib,
        "peak RSS {peak_kib} KiB over the bound {bound_kib} KiB"
    );
    // Otherwise the handler kept up and the bound was never put to the test.
    assert!(
        backlog_kib > bound_kib,
        "the backlog peaked at {backlog_kib} KiB, under the bound {bound_kib} KiB"
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

// The guard only orders the tests of this file; nothing else takes it.
#[allow(clippy::await_holding_lock)]
#[tokio::test(flavor = "multi_thread")]
async fn a_fuel_budget_throttles_only_its_own_handler() -> anyhow::Result<()> {
    let _serial = serial();
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
