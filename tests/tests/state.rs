//! Handler state (`weir:plugin/state`): a handler's writes are made with
//! its event's outcome, restored with its partition, and never seen from a
//! failed attempt. The `state-counter` plugin counts each record key's
//! events in its state and publishes the new count.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use rdkafka::message::{Message, OwnedMessage};
use weir_e2e::*;

/// The tests start several instances each: one test at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A record's payload as a `state-counter` count: (key, count, event id).
fn count_of(m: &OwnedMessage) -> (String, u64, String) {
    let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or_default()).unwrap();
    (
        v["key"].as_str().unwrap().to_owned(),
        v["count"].as_u64().unwrap(),
        v["id"].as_str().unwrap().to_owned(),
    )
}

/// The handler's state as `weir state list` prints it from the changelog:
/// key → count.
fn state_list(config_path: &str, handler: &str) -> BTreeMap<String, u64> {
    let (ok, out, err) = run_weir_output(&[
        "state",
        "list",
        "--config",
        config_path,
        "--handler",
        handler,
    ]);
    assert!(ok, "weir state list: {err}");
    out.lines()
        .filter(|l| !l.is_empty())
        .filter_map(|l| {
            let mut f = l.split('\t');
            let (_, key, value) = (f.next()?, f.next()?, f.next()?);
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// A copy of `config` for `weir state` (the instances' own files go with
/// them).
fn cli_config(config: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), config);
    (dir, path)
}

/// A fresh one-partition input topic named from `prefix`, its `.counts`
/// and `.dlq` topics, and a fresh group: (input, output, dlq, group).
async fn one_partition(prefix: &str) -> anyhow::Result<(String, String, String, String)> {
    let input = unique(&format!("{prefix}-in"));
    let output = format!("{input}.counts");
    let dlq = format!("{input}.dlq");
    for t in [&input, &output, &dlq] {
        create_topic(t, 1).await?;
    }
    Ok((input, output, dlq, unique(&format!("{prefix}-group"))))
}

/// Raw records of `key` with these payloads (the counter's markers).
fn raw_events(key: &str, bodies: &[&str]) -> Vec<In> {
    bodies
        .iter()
        .map(|p| In {
            key: Some(key.into()),
            value: p.as_bytes().to_vec(),
            headers: Vec::new(),
        })
        .collect()
}

/// Events per record key of `numbered_events(n)` (keyed over 97 keys).
fn expected_counts(n: usize) -> BTreeMap<String, u64> {
    let mut want = BTreeMap::new();
    for i in 0..n {
        *want.entry(format!("k{}", i % 97)).or_insert(0) += 1;
    }
    want
}

/// 50,000 events on 8 partitions, two instances, SIGKILLs at random moments
/// (one instance restarts on its store, the other on an empty one, so its
/// state comes back from the changelog alone): the final count of each key, read from the state changelog,
/// against the number of its events.
async fn counts_through_a_crash_storm(exactly_once: bool) -> anyhow::Result<()> {
    const N: usize = 50_000;
    const P: i32 = 8;
    const KILLS: usize = 12;
    let mode = if exactly_once {
        "exactly-once"
    } else {
        "at-least-once"
    };
    let seed = seed(&format!("state crash storm {mode}"));
    let mut rng = SplitMix64(seed);
    let input = unique(&format!("state-storm-{}", &mode[..2]));
    let output = format!("{input}.counts");
    create_topic(&input, P).await?;
    create_topic(&output, P).await?;
    let group = unique("state-storm-group");
    let base = config_toml(
        &group,
        &[HandlerSpec::new("counter", "state-counter", &input).config("delay_ms", "1")],
    )
    .replace("commit_interval_ms = 200", "commit_interval_ms = 100");
    let kept = tempfile::tempdir()?;
    let configs: Vec<String> = (0..2)
        .map(|i| {
            let mut c = if i == 0 {
                with_store(base.clone(), kept.path(), 3600)
            } else {
                base.clone()
            };
            if exactly_once {
                c += &format!(
                    "\n[delivery]\nmode = \"exactly-once\"\ntransactional_id = \"{group}-{i}\"\n"
                );
            }
            c
        })
        .collect();
    produce(&input, &numbered_events(N)).await?;
    let mut fleet: Vec<Weir> = configs
        .iter()
        .map(|c| Weir::start(c))
        .collect::<anyhow::Result<_>>()?;
    for k in 0..KILLS {
        let before: i64 = end_offsets(&output, P)?.iter().sum();
        await_records(&output, P, before + 1, Duration::from_secs(120)).await?;
        tokio::time::sleep(Duration::from_millis(100 + rng.below(900))).await;
        let i = rng.below(2) as usize;
        let victim = fleet.remove(i);
        victim.kill().await?;
        fleet.insert(i, Weir::start(&configs[i])?);
        println!(
            "kill {k}: instance {i} killed and started again ({})",
            if i == 0 {
                "on its store"
            } else {
                "on an empty store"
            }
        );
    }
    await_committed_to_end(&group, &input, P, Duration::from_secs(300)).await?;
    let (_cli, config_path) = cli_config(&configs[0]);
    for w in fleet {
        assert!(w.terminate(Duration::from_secs(60)).await?.success());
    }
    let want = expected_counts(N);
    let got = state_list(&config_path, "counter");
    let below: Vec<_> = want
        .iter()
        .filter(|(k, n)| got.get(*k).copied().unwrap_or(0) < **n)
        .collect();
    let above: Vec<_> = want
        .iter()
        .filter(|(k, n)| got.get(*k).copied().unwrap_or(0) > **n)
        .collect();
    let visible = read_isolated(&output, "read_committed")?;
    println!(
        "state crash storm ({mode}): seed={seed} instances=2 kills={KILLS} events={N} keys={} \
         counts equal={} below={} above={} (sum of counts {} for {N} events); outputs seen={}",
        want.len(),
        want.len() - below.len() - above.len(),
        below.len(),
        above.len(),
        got.values().sum::<u64>(),
        visible.len()
    );
    assert_eq!(got.len(), want.len(), "every key has a count");
    assert!(
        below.is_empty(),
        "seed={seed}: counts below their events: {below:?}"
    );
    if exactly_once {
        assert!(
            above.is_empty(),
            "seed={seed}: counts above their events: {above:?}"
        );
        // Each event's output once, with the count it made.
        assert_eq!(visible.len(), N, "seed={seed}");
        let mut last: HashMap<String, u64> = HashMap::new();
        for m in &visible {
            let (key, count, _) = count_of(m);
            let l = last.entry(key).or_insert(0);
            assert_eq!(count, *l + 1, "seed={seed}: counts of a key go up by one");
            *l = count;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn counts_are_exact_through_a_crash_storm_in_exactly_once_mode() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    counts_through_a_crash_storm(true).await
}

#[tokio::test(flavor = "multi_thread")]
async fn counts_are_never_below_their_events_through_a_crash_storm_at_least_once(
) -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    counts_through_a_crash_storm(false).await
}

/// A key's events: a success, an attempt that writes then fails (retried
/// in place), an event that writes then fails fatally (dead-lettered),
/// a success. The retry sees the state before the failed attempt; the dead
/// letter changes nothing. `weir state get` reads the count, `weir state
/// reset` empties it.
#[tokio::test(flavor = "multi_thread")]
async fn failed_attempts_and_dead_letters_leave_the_state_unchanged() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let (input, output, dlq, group) = one_partition("state-fail").await?;
    let config = config_toml(
        &group,
        &[HandlerSpec::new("counter", "state-counter", &input)
            .extra("initial_backoff_ms = 10\nmax_backoff_ms = 20")],
    );
    let events = raw_events("a", &["x", "fail-once", "fatal", "x"]);
    produce(&input, &events).await?;
    let weir = Weir::start(&config)?;
    await_committed_to_end(&group, &input, 1, Duration::from_secs(60)).await?;
    let (_cli, config_path) = cli_config(&config);
    // A reset is refused while an instance runs.
    let (ok, _, err) = run_weir_output(&[
        "state",
        "reset",
        "--config",
        &config_path,
        "--handler",
        "counter",
        "--yes",
    ]);
    assert!(!ok && err.contains("running member"), "{err}");
    assert!(weir.terminate(Duration::from_secs(30)).await?.success());
    let counts: Vec<u64> = read_all(&output)?.iter().map(|m| count_of(m).1).collect();
    println!("outputs: {counts:?}");
    assert_eq!(
        counts,
        [1, 2, 3],
        "the retry saw 1 (not its failed attempt's 1,000,000); the dead letter's 2,000,000 is gone"
    );
    let dead = read_all(&dlq)?;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        header(&dead[0], "weir-error-kind").as_deref(),
        Some("fatal")
    );
    assert_eq!(state_list(&config_path, "counter").get("a"), Some(&3));
    let (ok, out, err) = run_weir_output(&[
        "state",
        "get",
        "--config",
        &config_path,
        "--handler",
        "counter",
        "--key",
        "a",
    ]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "3");
    // A deliberate reset (every instance stopped): the state starts empty,
    // and the next event counts from 1.
    let (ok, out, err) = run_weir_output(&[
        "state",
        "reset",
        "--config",
        &config_path,
        "--handler",
        "counter",
        "--yes",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("deleted 1 keys"), "{out}");
    assert!(state_list(&config_path, "counter").is_empty());
    produce(&input, &events[..1]).await?;
    let weir = Weir::start(&config)?;
    await_committed_to_end(&group, &input, 1, Duration::from_secs(60)).await?;
    assert!(weir.terminate(Duration::from_secs(30)).await?.success());
    let counts: Vec<u64> = read_all(&output)?.iter().map(|m| count_of(m).1).collect();
    assert_eq!(
        counts,
        [1, 2, 3, 1],
        "counted from an empty state after the reset"
    );
    Ok(())
}

/// An instance handles a partitioned stream; a second one (with a store of
/// its own) joins, then the first leaves: the counts go on from where the
/// first left them, with no gap and no repeat, and end at the number of
/// events of each key.
#[tokio::test(flavor = "multi_thread")]
async fn state_follows_its_partition_to_another_instance() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    const P: i32 = 4;
    const PHASE: usize = 2_000;
    let input = unique("state-move-in");
    let output = format!("{input}.counts");
    create_topic(&input, P).await?;
    create_topic(&output, P).await?;
    let group = unique("state-move-group");
    let config = config_toml(
        &group,
        &[HandlerSpec::new("counter", "state-counter", &input)],
    );
    let all = numbered_events(3 * PHASE);
    produce(&input, &all[..PHASE]).await?;
    let first = Weir::start(&config)?;
    await_committed_to_end(&group, &input, P, Duration::from_secs(60)).await?;
    let mut second = Weir::start(&config)?;
    second
        .await_log("partitions assigned", Duration::from_secs(60))
        .await?;
    produce(&input, &all[PHASE..2 * PHASE]).await?;
    await_committed_to_end(&group, &input, P, Duration::from_secs(60)).await?;
    assert!(first.terminate(Duration::from_secs(30)).await?.success());
    produce(&input, &all[2 * PHASE..]).await?;
    await_committed_to_end(&group, &input, P, Duration::from_secs(60)).await?;
    let restored: Vec<String> = second
        .log()
        .into_iter()
        .filter(|l| l.contains("handler state restored"))
        .collect();
    let (_cli, config_path) = cli_config(&config);
    assert!(second.terminate(Duration::from_secs(30)).await?.success());
    println!("second instance's restores: {}", restored.join("\n"));
    assert!(
        !restored.is_empty(),
        "the second instance restored the state of partitions the first had"
    );
    let mut per_key: HashMap<String, Vec<u64>> = HashMap::new();
    for m in read_all(&output)? {
        let (key, count, _) = count_of(&m);
        per_key.entry(key).or_default().push(count);
    }
    let want = expected_counts(3 * PHASE);
    for (key, n) in &want {
        let mut counts = per_key.remove(key).unwrap_or_default();
        counts.sort_unstable();
        assert_eq!(
            counts,
            (1..=*n).collect::<Vec<_>>(),
            "key {key}: every count once, none skipped"
        );
    }
    assert_eq!(state_list(&config_path, "counter"), want);
    Ok(())
}

/// A value above `state.max_value_bytes`, and writes that would take the
/// handler's state above `state.max_total_bytes`, fail their events as
/// `state-limit` (dead-lettered); the events around them count on as if
/// the failed ones had never written.
#[tokio::test(flavor = "multi_thread")]
async fn a_handler_over_its_state_limits_fails_with_the_state_limit_class() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let (input, output, dlq, group) = one_partition("state-limit").await?;
    let config = config_toml(
        &group,
        &[HandlerSpec::new("counter", "state-counter", &input)
            .config("big_bytes", "5000")
            .extra("[handler.state]\nmax_value_bytes = 2000\nmax_total_bytes = 20000")],
    );
    // One value too large, then new 1,000-byte keys until the total is
    // reached (about 18 fit), with ordinary events between them.
    let mut bodies = vec!["x", "big", "x"];
    for _ in 0..25 {
        bodies.push("grow");
        bodies.push("x");
    }
    let events = raw_events("a", &bodies);
    produce(&input, &events).await?;
    let mut weir = Weir::start(&config)?;
    let addr = weir.http_addr().await?;
    await_committed_to_end(&group, &input, 1, Duration::from_secs(60)).await?;
    let (_, metrics) = http_get(&addr, "/metrics").await?;
    let scrape = Scrape::parse(&metrics)?;
    let bytes = scrape
        .value("weir_state_bytes", &[("handler", "counter")])
        .unwrap_or(0.0);
    let (_cli, config_path) = cli_config(&config);
    assert!(weir.terminate(Duration::from_secs(30)).await?.success());
    let dead = read_all(&dlq)?;
    let kinds: Vec<String> = dead
        .iter()
        .map(|m| header(m, "weir-error-kind").unwrap_or_default())
        .collect();
    let messages: Vec<String> = dead
        .iter()
        .map(|m| header(m, "weir-error-message").unwrap_or_default())
        .collect();
    println!("dead letters: {kinds:?}\n{messages:#?}\nstate bytes: {bytes}");
    assert!(kinds.iter().all(|k| k == "state-limit"), "{kinds:?}");
    assert!(
        messages[0].contains("state.max_value_bytes"),
        "{messages:?}"
    );
    assert!(
        messages[1..]
            .iter()
            .all(|m| m.contains("state.max_total_bytes")),
        "{messages:?}"
    );
    let failed = dead.len() as u64;
    assert!(failed >= 2, "the big value and the grows past the total");
    assert!(bytes > 0.0 && bytes <= 20_000.0, "state bytes {bytes}");
    // The counts of the events that succeeded, in order, with no gap.
    let counts: Vec<u64> = read_all(&output)?.iter().map(|m| count_of(m).1).collect();
    let succeeded = bodies.len() as u64 - failed;
    assert_eq!(counts, (1..=succeeded).collect::<Vec<_>>());
    assert_eq!(
        state_list(&config_path, "counter").get("a"),
        Some(&succeeded)
    );
    Ok(())
}

/// With `state.ttl_secs`, a value not written again within it expires: it
/// reads as absent at once, and the partition's next event deletes it from
/// the store and the changelog (a tombstone), so it is no longer counted.
#[tokio::test(flavor = "multi_thread")]
async fn expired_values_read_as_absent_and_are_deleted() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let (input, output, _, group) = one_partition("state-ttl").await?;
    let config = config_toml(
        &group,
        &[HandlerSpec::new("counter", "state-counter", &input)
            .extra("[handler.state]\nttl_secs = 3")],
    );
    let event = |key: &str| raw_events(key, &["x"]).remove(0);
    produce(&input, &[event("a"), event("b")]).await?;
    let mut weir = Weir::start(&config)?;
    let addr = weir.http_addr().await?;
    await_committed_to_end(&group, &input, 1, Duration::from_secs(60)).await?;
    let (_cli, config_path) = cli_config(&config);
    // Expired: `weir state list` (like a handler's read) no longer sees them.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !state_list(&config_path, "counter").is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the values did not expire"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    produce(&input, &[event("c"), event("a")]).await?;
    await_committed_to_end(&group, &input, 1, Duration::from_secs(60)).await?;
    let (_, metrics) = http_get(&addr, "/metrics").await?;
    let keys = Scrape::parse(&metrics)?
        .value("weir_state_keys", &[("handler", "counter")])
        .unwrap_or(-1.0);
    assert!(weir.terminate(Duration::from_secs(30)).await?.success());
    let counts: Vec<u64> = read_all(&output)?.iter().map(|m| count_of(m).1).collect();
    // b's delete is in the changelog (a's may be replaced by its new value
    // in the same batch).
    let tombstones = read_all(&format!("{group}.weir-state"))?
        .iter()
        .filter(|m| m.payload().is_none() && m.key().is_some_and(|k| k.ends_with(b"b")))
        .count();
    println!("counts {counts:?}, state keys {keys}, tombstones {tombstones}");
    assert_eq!(counts, [1, 1, 1, 1], "an expired count starts again");
    assert_eq!(
        keys, 2.0,
        "a and b were deleted; c and the new a are counted"
    );
    assert_eq!(tombstones, 1, "b's delete reached the changelog");
    Ok(())
}
