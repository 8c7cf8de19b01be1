//! Deploying handler versions to a running instance: hot swaps under load
//! (admin API and watched folder), refused versions, the admin API's
//! authentication, automatic rollback with the replay of a bad version's
//! dead letters. (Config reloads and the compile cache: `reloads.rs`.)

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use anyhow::{Context, Result};
use rdkafka::message::Message;
use serde_json::Value;
use weir_e2e::*;

mod support;
use support::*;

#[tokio::test(flavor = "multi_thread")]
async fn hot_swaps_under_load_lose_duplicate_and_mix_nothing() -> Result<()> {
    const N: usize = 30_000;
    const P: i32 = 4;
    const DEPLOYS: usize = 6;
    let input = unique("swap-in");
    let output = format!("{input}.out");
    let group = unique("swap-group");
    create_topic(&input, P).await?;
    create_topic(&output, P).await?;
    let plugins = Plugins::new()?;
    plugins.copy("echo", "echo.wasm")?;
    // The version serving at start, then one new version per deploy.
    let first = std::fs::read(plugins.path("echo.wasm"))?;
    let mut order = vec![version_of(&first)];
    let deploys: Vec<Vec<u8>> = (1..=DEPLOYS)
        .map(|round| variant(&first, &format!("v{round}")))
        .collect();
    order.extend(deploys.iter().map(|b| version_of(b)));
    // A handler of 2 ms per event, so the stream lasts through the deploys.
    let config = plugins.config(
        &group,
        &[HandlerSpec::new("echo", "echo", &input).config("delay_ms", "2")],
        "watch = true\nwatch_debounce_ms = 100\n",
    );
    produce(&input, &events(0, N)).await?;
    let mut weir = Weir::start(&config)?;
    let addr = weir.admin_addr().await?;
    await_records(&output, P, 500, Duration::from_secs(60)).await?;

    let mut at_deploy = Vec::new();
    for (round, bytes) in deploys.iter().enumerate() {
        let version = &order[round + 1];
        let before = total(end_offsets(&output, P)?);
        if round % 3 == 2 {
            // The watched folder.
            plugins.replace("echo.wasm", bytes)?;
            await_version(&addr, "echo", version).await?;
        } else {
            let (status, body) = admin(
                "PUT",
                &addr,
                "/handlers/echo",
                Some(TOKEN),
                Some(bytes.clone()),
            )
            .await?;
            assert_eq!(status, 200, "deploy {round}: {body}");
            assert_eq!(body["version"], version.as_str(), "{body}");
        }
        at_deploy.push(total(end_offsets(&output, P)?));
        await_records(&output, P, before + 1_000, Duration::from_secs(60)).await?;
    }
    println!("outputs at each deploy: {at_deploy:?} of {N}");
    assert!(
        *at_deploy.last().unwrap() < N as i64,
        "the stream ended before the last deploy: the swaps were not under load"
    );
    await_committed_to_end(&group, &input, P, Duration::from_secs(180)).await?;
    let (status, _) = weir.stop(Duration::from_secs(30)).await?;
    assert!(status.success());

    // Input event id → (partition, offset).
    let mut position: HashMap<String, (i32, i64)> = HashMap::new();
    for m in read_all(&input)? {
        let v: Value = serde_json::from_slice(m.payload().unwrap())?;
        position.insert(
            v["id"].as_str().unwrap().to_owned(),
            (m.partition(), m.offset()),
        );
    }
    let outputs = read_all(&output)?;
    let mut seen = HashSet::new();
    let mut by_partition: BTreeMap<i32, Vec<(i64, String)>> = BTreeMap::new();
    for m in &outputs {
        let cause = header(m, "causation-id").context("a causation id")?;
        let version = header(m, "weir-handler-version").context("a version header")?;
        assert!(
            order.contains(&version),
            "output of {cause} names version {version}"
        );
        assert!(seen.insert(cause.clone()), "{cause} has two outputs");
        let (p, o) = position[&cause];
        by_partition.entry(p).or_default().push((o, version));
    }
    let lost = N - seen.len();
    println!("inputs {N}, outputs {}, lost {lost}", outputs.len());
    assert_eq!(lost, 0);
    assert_eq!(outputs.len(), N);
    let mut versions_seen = HashSet::new();
    for (p, mut handled) in by_partition {
        handled.sort();
        // The versions a partition went through, in offset order: each
        // once, in the order they were deployed (no event after a switch
        // handled by an older version).
        let mut runs: Vec<&str> = Vec::new();
        for (_, v) in &handled {
            if runs.last() != Some(&v.as_str()) {
                runs.push(v);
            }
        }
        let positions: Vec<usize> = runs
            .iter()
            .map(|v| order.iter().position(|o| o == v).expect("a known version"))
            .collect();
        println!("partition {p}: versions in deploy order {positions:?}");
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "partition {p} went back to an older version: {positions:?}"
        );
        versions_seen.extend(handled.into_iter().map(|(_, v)| v));
    }
    assert_eq!(
        versions_seen.len(),
        DEPLOYS + 1,
        "every version handled events"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_versions_and_bad_requests_change_nothing() -> Result<()> {
    const P: i32 = 2;
    let input = unique("refuse-in");
    let output = format!("{input}.out");
    let group = unique("refuse-group");
    create_topic(&input, P).await?;
    create_topic(&output, P).await?;
    let plugins = Plugins::new()?;
    plugins.copy("echo", "echo.wasm")?;
    let serving_version = version_of(&std::fs::read(plugins.path("echo.wasm"))?);
    // A version must handle this sample without a fault before it serves.
    std::fs::write(
        plugins.path("samples.jsonl"),
        "{\"eventType\": \"tick\", \"id\": \"s-1\", \"payload\": \"panic\"}\n",
    )?;
    let samples = plugins.path("samples.jsonl").display().to_string();
    let config = plugins.config(
        &group,
        &[HandlerSpec::new("echo", "echo", &input).extra(&format!("sample_events = {samples:?}"))],
        "",
    );
    produce(&input, &events(0, 100)).await?;
    let mut weir = Weir::start(&config)?;
    let addr = weir.admin_addr().await?;
    let metrics = weir.http_addr().await?;
    await_records(&output, P, 100, Duration::from_secs(60)).await?;

    let v2 = variant(&std::fs::read(plugins.path("echo.wasm"))?, "v2");
    // No token, a wrong token: 401, nothing deployed.
    for token in [None, Some("wrong")] {
        let (status, body) = admin("PUT", &addr, "/handlers/echo", token, Some(v2.clone())).await?;
        assert_eq!(status, 401, "{body}");
        let (status, _) = admin("GET", &addr, "/handlers", token, None).await?;
        assert_eq!(status, 401);
        let (status, _) = admin("POST", &addr, "/reload", token, None).await?;
        assert_eq!(status, 401);
    }
    // Over admin.max_body_mib: 413.
    let (status, body) = admin(
        "PUT",
        &addr,
        "/handlers/echo",
        Some(TOKEN),
        Some(vec![0u8; 2 << 20]),
    )
    .await?;
    assert_eq!(status, 413, "{body}");
    // An unknown handler: 404.
    let (status, _) = admin(
        "PUT",
        &addr,
        "/handlers/nope",
        Some(TOKEN),
        Some(v2.clone()),
    )
    .await?;
    assert_eq!(status, 404);

    // Not a component, a component of another world, one that traps on the sample.
    let empty_component = vec![0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];
    let misbehave = std::fs::read(plugin("misbehave"))?;
    for (bytes, reason) in [
        (b"not wasm at all".to_vec(), "is not a WebAssembly file"),
        (
            empty_component,
            "does not implement the weir:plugin/handler world",
        ),
        (misbehave, "fails its sample events"),
    ] {
        let (status, body) =
            admin("PUT", &addr, "/handlers/echo", Some(TOKEN), Some(bytes)).await?;
        println!("refused: {status} {body}");
        assert_eq!(status, 422, "{body}");
        let why = body["error"].as_str().unwrap_or_default();
        assert!(why.contains(reason), "{why:?} should say {reason:?}");
        assert_eq!(
            serving(&addr, "echo").await?["version"],
            serving_version.as_str()
        );
    }

    // The serving version keeps producing.
    produce(&input, &events(100, 200)).await?;
    await_records(&output, P, 200, Duration::from_secs(60)).await?;
    for m in read_all(&output)? {
        assert_eq!(
            header(&m, "weir-handler-version").as_deref(),
            Some(serving_version.as_str())
        );
    }
    let scrape = Scrape::fetch(&metrics).await?;
    let refused = scrape.value(
        "weir_handler_deploys_total",
        &[("handler", "echo"), ("result", "refused")],
    );
    assert_eq!(refused, Some(3.0));
    let (status, _) = weir.stop(Duration::from_secs(30)).await?;
    assert!(status.success());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_version_rolls_back_and_its_dead_letters_replay() -> Result<()> {
    const P: i32 = 2;
    let input = unique("rollback-in");
    let output = format!("{input}.out");
    let dlq = format!("{input}.dlq");
    let group = unique("rollback-group");
    for t in [&input, &output, &dlq] {
        create_topic(t, P).await?;
    }
    let plugins = Plugins::new()?;
    plugins.copy("echo", "echo.wasm")?;
    let good = version_of(&std::fs::read(plugins.path("echo.wasm"))?);
    let failing = std::fs::read(plugin("fail-on-marker"))?;
    let bad = version_of(&failing);
    // fail-on-marker fails every event whose payload holds `marker`; echo
    // ignores the setting.
    let config = plugins.config(
        &group,
        &[HandlerSpec::new("echo", "echo", &input)
            .config("marker", "\"i\"")
            .config("output_topic", &output)
            .extra("[handler.rollout]\nwatch_events = 50\nmax_failure_ratio = 0.2")],
        "",
    );
    produce(&input, &events(0, 100)).await?;
    let mut weir = Weir::start(&config)?;
    let addr = weir.admin_addr().await?;
    let metrics = weir.http_addr().await?;
    await_records(&output, P, 100, Duration::from_secs(60)).await?;

    let (status, body) = admin("PUT", &addr, "/handlers/echo", Some(TOKEN), Some(failing)).await?;
    assert_eq!(status, 200, "{body}");
    produce(&input, &events(100, 400)).await?;
    let h = await_version(&addr, "echo", &good).await?;
    println!("after the rollback: {h}");
    assert!(
        h["last_change"]
            .as_str()
            .unwrap_or_default()
            .contains("rolled back"),
        "{h}"
    );
    assert_eq!(h["previous_version"], bad.as_str());
    await_committed_to_end(&group, &input, P, Duration::from_secs(120)).await?;
    let dead = read_all(&dlq)?;
    let by_bad = dead
        .iter()
        .filter(|m| header(m, "weir-handler-version").as_deref() == Some(bad.as_str()))
        .count();
    let outputs = total(end_offsets(&output, P)?);
    println!(
        "dead letters {} (of the bad version {by_bad}), outputs {outputs}",
        dead.len()
    );
    assert!(
        by_bad > 10,
        "the bad version failed {by_bad} events before the rollback"
    );
    // The window is 50 events: the rollback came within it.
    assert!(by_bad <= 50, "{by_bad} events failed");
    assert_eq!(by_bad, dead.len(), "only the bad version dead-lettered");
    assert_eq!(outputs as usize + by_bad, 400);
    let scrape = Scrape::fetch(&metrics).await?;
    assert_eq!(
        scrape.value(
            "weir_handler_rollbacks_total",
            &[("handler", "echo"), ("kind", "automatic")]
        ),
        Some(1.0)
    );

    // Replay exactly that version's dead letters: the restored one handles them.
    let path = weir.config_path().display().to_string();
    let (ok, stdout, stderr) = run_weir_output(&[
        "dlq",
        "replay",
        "--config",
        &path,
        "--topic",
        &dlq,
        "--handler-version",
        &bad,
    ]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains(&format!("replayed {by_bad} dead letters")),
        "{stdout}"
    );
    await_records(&output, P, 400, Duration::from_secs(60)).await?;
    let causes: HashSet<String> = causation_ids(&read_all(&output)?).into_iter().collect();
    assert_eq!(causes.len(), 400, "every input has its output");
    let (status, _) = weir.stop(Duration::from_secs(30)).await?;
    assert!(status.success());
    Ok(())
}
