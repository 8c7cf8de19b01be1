//! Several instances in one consumer group (the consumer group protocol,
//! KIP-848, the default): instances join, leave and are killed while a
//! stream is handled. Nothing is lost; an event whose mark reached the
//! group's idempotency changelog is never handled again by another
//! instance; partitions that stay with an instance keep flowing while
//! others move; a revoked partition's worker publishes nothing after the
//! revoke.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::message::{Message, OwnedMessage};
use serde_json::json;
use weir_e2e::*;

/// The fleet tests run several instances each: one test at a time, so the
/// join's gap is measured on the machine, not against the kill storm.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// What the outputs of a run say: events without an output, repeated
/// outputs, and the repeats that the changelog should have prevented (an
/// output made more than a second after the event's mark reached the
/// changelog: the next owner restores marks before its first event, and
/// an owner only gets a partition seconds after its previous owner's
/// marks were written).
struct Outcome {
    lost: usize,
    duplicates: usize,
    after_mark: Vec<String>,
    /// When each repeated event's second output was made (ms).
    repeats_at: Vec<i64>,
}

fn outcome(n: usize, outputs: &[OwnedMessage], marks: &HashMap<String, i64>) -> Outcome {
    let mut times: HashMap<String, Vec<i64>> = HashMap::new();
    for m in outputs {
        let id = header(m, "causation-id").expect("a causation id");
        times
            .entry(id)
            .or_default()
            .push(m.timestamp().to_millis().unwrap_or(0));
    }
    let lost = (0..n)
        .filter(|i| !times.contains_key(&format!("evt-{i}")))
        .count();
    let mut after_mark = Vec::new();
    let mut repeats_at = Vec::new();
    for (id, t) in &mut times {
        t.sort_unstable();
        repeats_at.extend(t.get(1));
        if let (Some(second), Some(marked)) = (t.get(1), marks.get(id)) {
            if *second > marked + 1000 {
                after_mark.push(format!(
                    "{id} (marked at {marked}, output again at {second})"
                ));
            }
        }
    }
    Outcome {
        lost,
        duplicates: outputs.len() - times.len(),
        after_mark,
        repeats_at,
    }
}

/// Waits until an instance's log says it was assigned partitions (a
/// non-empty list) and returns them.
async fn await_assigned(w: &mut Weir) -> anyhow::Result<Vec<(String, i32)>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(a) = assignments(&w.log()).into_iter().find(|a| !a.is_empty()) {
            return Ok(a);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no partitions assigned within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fleet_scales_out_and_in_and_keeps_every_event() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    const N: usize = 60_000;
    const P: i32 = 8;
    // Largest pause allowed in the outputs of a partition that stays with
    // its instance while another instance joins.
    const GAP_BOUND_MS: i64 = 1_000;
    let (input, output, group) = fresh_topics("fleet", P).await?;
    // 5 ms an event: one instance moves at most 1,600 events/s over the 8
    // partitions, so the stream lasts while instances come and go.
    let config = config_toml(
        &group,
        &[HandlerSpec::new("echo", "echo", &input).config("delay_ms", "5")],
    );
    produce(&input, &numbered_events(N)).await?;
    let partition_of: HashMap<String, i32> = read_all(&input)?
        .iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            (v["id"].as_str().unwrap().to_owned(), m.partition())
        })
        .collect();
    let progress = |n: i64| await_records(&output, P, n, Duration::from_secs(120));
    let outputs_now = || -> anyhow::Result<i64> { Ok(end_offsets(&output, P)?.iter().sum()) };

    let mut a = Weir::start(&config)?;
    let a_metrics = a.http_addr().await?;
    let a_first = await_assigned(&mut a).await?;
    assert_eq!(a_first.len(), P as usize, "alone, it owns every partition");
    progress(3_000).await?;

    // A second instance joins: the partitions that stay with the first
    // keep flowing.
    let join_started = now_ms();
    let mut b = Weir::start(&config)?;
    let b_got = await_assigned(&mut b).await?;
    let join_settled = now_ms();
    println!(
        "join: the second instance got {} partitions after {} ms",
        b_got.len(),
        join_settled - join_started
    );
    assert!(!b_got.is_empty() && b_got.len() < P as usize);
    progress(outputs_now()? + 2_000).await?;
    let window = (join_started, join_settled + 2_000);

    let mut c = Weir::start(&config)?;
    await_assigned(&mut c).await?;
    progress(outputs_now()? + 2_000).await?;

    // One leaves gracefully, another is killed.
    assert!(b.terminate(Duration::from_secs(60)).await?.success());
    progress(outputs_now()? + 2_000).await?;
    let killed_at = now_ms();
    c.kill().await?;
    await_committed_to_end(&group, &input, P, Duration::from_secs(300)).await?;
    // What the first instance reports of the group's life.
    let m = Scrape::fetch(&a_metrics).await?;
    let v = |name: &str, labels: &[(&str, &str)]| m.value(name, labels).unwrap_or(-1.0);
    println!(
        "first instance: partitions owned {}, rebalances assign {} revoke {}, restores {} ({} marks)",
        v("weir_partitions_owned", &[]),
        v("weir_rebalances_total", &[("kind", "assign")]),
        v("weir_rebalances_total", &[("kind", "revoke")]),
        v("weir_idempotency_restore_seconds_count", &[]),
        v("weir_idempotency_restored_marks_total", &[]),
    );
    assert_eq!(
        v("weir_partitions_owned", &[]),
        P as f64,
        "it owns all again"
    );
    assert!(
        v("weir_rebalances_total", &[("kind", "revoke")]) >= 2.0,
        "it gave partitions to two joiners"
    );
    assert!(
        v("weir_rebalances_total", &[("kind", "assign")]) >= 3.0,
        "it took them back"
    );
    // It restored marks when it took the leavers' partitions back (its
    // own among them: its store's checkpoint is where it last read).
    assert!(v("weir_idempotency_restore_seconds_count", &[]) > P as f64);
    assert!(v("weir_idempotency_restored_marks_total", &[]) > 0.0);
    assert!(a.terminate(Duration::from_secs(60)).await?.success());

    let outputs = read_all(&output)?;
    let marks = changelog_marks(&group)?;
    let o = outcome(N, &outputs, &marks);
    println!(
        "scale out and in: inputs={N} outputs={} lost={} duplicates={} marks in the changelog={} \
         (a duplicate is an event whose outputs were acknowledged but whose mark had not reached \
         the changelog when its instance was killed)",
        outputs.len(),
        o.lost,
        o.duplicates,
        marks.len()
    );
    assert_eq!(o.lost, 0);
    assert!(
        o.after_mark.is_empty(),
        "handled again after their mark reached the changelog: {:?}",
        &o.after_mark[..o.after_mark.len().min(10)]
    );
    // Joins and the graceful leave repeat nothing: every repeat follows the kill.
    assert!(
        o.repeats_at.iter().all(|t| *t >= killed_at),
        "events repeated before the kill (at {killed_at}): {:?}",
        o.repeats_at
    );

    // Gaps in the outputs of the partitions the first instance kept.
    let kept: HashSet<i32> = (0..P)
        .filter(|p| !b_got.iter().any(|(_, q)| q == p))
        .collect();
    let mut by_partition: HashMap<i32, Vec<i64>> = HashMap::new();
    for m in &outputs {
        let id = header(m, "causation-id").unwrap();
        let p = partition_of[&id];
        let t = m.timestamp().to_millis().unwrap_or(0);
        if kept.contains(&p) && t >= window.0 && t <= window.1 {
            by_partition.entry(p).or_default().push(t);
        }
    }
    let mut largest = 0;
    for p in &kept {
        let mut t = by_partition.remove(p).unwrap_or_default();
        assert!(
            t.len() > 10,
            "partition {p} kept by the first instance had {} outputs during the join",
            t.len()
        );
        t.sort_unstable();
        largest = largest.max(t.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0));
    }
    println!(
        "join: largest gap between outputs of the {} partitions the first instance kept: {largest} ms (bound {GAP_BOUND_MS} ms)",
        kept.len()
    );
    assert!(largest <= GAP_BOUND_MS);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kill_storm_across_a_fleet_loses_nothing() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    const N: usize = 50_000;
    const P: i32 = 8;
    const INSTANCES: usize = 3;
    const KILLS: usize = 21;
    let seed = seed("kill storm");
    let mut rng = SplitMix64(seed);
    let (input, output, group) = fresh_topics("storm", P).await?;
    let config = config_toml(
        &group,
        &[HandlerSpec::new("echo", "echo", &input).config("delay_ms", "3")],
    );
    produce(&input, &numbered_events(N)).await?;
    // Each start is a new process with an empty store of its own (as a new
    // pod on a new disk): what it knows of earlier handling comes from the
    // changelog.
    let mut fleet: Vec<Weir> = (0..INSTANCES)
        .map(|_| Weir::start(&config))
        .collect::<anyhow::Result<_>>()?;
    for k in 0..KILLS {
        let before: i64 = end_offsets(&output, P)?.iter().sum();
        if before < N as i64 {
            // Handling goes on between kills (it may pause while killed
            // members' sessions expire).
            await_records(&output, P, before + 1, Duration::from_secs(120)).await?;
        }
        tokio::time::sleep(Duration::from_millis(200 + rng.below(1_000))).await;
        let i = rng.below(INSTANCES as u64) as usize;
        let victim = std::mem::replace(&mut fleet[i], Weir::start(&config)?);
        victim.kill().await?;
        println!("kill {k}: instance slot {i} killed and started again");
    }
    await_committed_to_end(&group, &input, P, Duration::from_secs(300)).await?;
    for w in fleet {
        assert!(w.terminate(Duration::from_secs(60)).await?.success());
    }
    let outputs = read_all(&output)?;
    let marks = changelog_marks(&group)?;
    let o = outcome(N, &outputs, &marks);
    println!(
        "kill storm: seed={seed} instances={INSTANCES} kills={KILLS} inputs={N} outputs={} lost={} \
         duplicates={} (outputs acknowledged, mark not yet in the changelog when the instance died) \
         handled again after the mark={}",
        outputs.len(),
        o.lost,
        o.duplicates,
        o.after_mark.len()
    );
    assert_eq!(o.lost, 0);
    assert!(
        o.after_mark.is_empty(),
        "seed={seed}: handled again after their mark reached the changelog: {:?}",
        &o.after_mark[..o.after_mark.len().min(10)]
    );
    assert_eq!(committed(&group, &input, P)?, end_offsets(&input, P)?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_partition_stuck_in_a_long_call_publishes_nothing_after_the_revoke(
) -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    const P: i32 = 2;
    let (input, output, group) = fresh_topics("fence", P).await?;
    // Each call takes 10 s (time for the second instance to start and
    // join); a revoke waits 1 s for the event in hand.
    let config = config_toml(
        &group,
        &[HandlerSpec::new("echo", "echo", &input)
            .extra("deadline_ms = 30000\n")
            .config("delay_ms", "10000")],
    )
    .replace("[pipeline]\n", "[pipeline]\ndrain_timeout_ms = 1000\n");
    // An event in each partition (keys until every partition has one).
    let mut inputs = Vec::new();
    for i in 0.. {
        let e = In::envelope(
            &format!("k{i}"),
            &format!("evt-{i}"),
            "c",
            "t",
            json!({"i": i}),
        );
        produce(&input, std::slice::from_ref(&e)).await?;
        inputs.push(e);
        if end_offsets(&input, P)?.iter().all(|o| *o > 0) {
            break;
        }
    }
    let mut a = Weir::start(&config)?;
    let addr = a.http_addr().await?;
    await_assigned(&mut a).await?;
    // Both partitions' events are in their handler calls.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = Scrape::fetch(&addr).await?;
        if s.value("weir_events_in_flight", &[]).unwrap_or(0.0) >= inputs.len() as f64 {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "events not in flight"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A second instance joins; one partition moves while its event is in
    // the first instance's handler call.
    let mut b = Weir::start(&config)?;
    let moved = await_assigned(&mut b).await?;
    assert_eq!(moved.len(), 1, "{moved:?}");
    a.await_log("did not finish in time", Duration::from_secs(30))
        .await?;
    // The first instance's call ends after the revoke: fenced off.
    a.await_log("partition fenced off", Duration::from_secs(30))
        .await?;
    // Every event has its output: the moved one from the second instance.
    await_committed_to_end(&group, &input, P, Duration::from_secs(60)).await?;
    assert!(a.terminate(Duration::from_secs(30)).await?.success());
    assert!(b.terminate(Duration::from_secs(30)).await?.success());
    let outputs = read_all(&output)?;
    let ids: Vec<String> = outputs
        .iter()
        .map(|m| header(m, "causation-id").unwrap())
        .collect();
    println!("fence: inputs={} outputs={ids:?}", inputs.len());
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), inputs.len(), "every event has an output");
    assert_eq!(
        ids.len(),
        inputs.len(),
        "the revoked worker published after the revoke"
    );
    Ok(())
}
