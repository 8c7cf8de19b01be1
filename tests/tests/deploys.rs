//! Deploying handler versions to a running instance: hot swaps under load
//! (admin API and watched folder), refused versions, the admin API's
//! authentication, automatic rollback with the replay of a bad version's
//! dead letters, config reloads, and the compile cache.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use rdkafka::message::Message;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use weir_e2e::*;

const TOKEN: &str = "e2e-admin-token-0123456789";

/// A folder with a copy of a plugin (the file the watch and deploys
/// replace), the admin token file and the compile cache.
struct Plugins {
    dir: tempfile::TempDir,
}

impl Plugins {
    fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("token"), format!("{TOKEN}\n"))?;
        Ok(Self { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Copies plugin `plugin` to `<dir>/<file>`.
    fn copy(&self, plugin_name: &str, file: &str) -> Result<PathBuf> {
        let to = self.path(file);
        std::fs::copy(plugin(plugin_name), &to)?;
        Ok(to)
    }

    /// Replaces `file` as a deploy tool would: write a new file, rename it over.
    fn replace(&self, file: &str, bytes: &[u8]) -> Result<()> {
        let tmp = self.path(&format!(".{file}.tmp"));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, self.path(file))?;
        Ok(())
    }

    /// A config whose handlers' components are in this folder, with the
    /// admin API (port picked at start) and the compile cache here.
    fn config(&self, group: &str, handlers: &[HandlerSpec], extra: &str) -> String {
        let mut text = config_toml(group, handlers);
        for h in handlers {
            // Handlers in order: the first path still unreplaced is this one's.
            text = text.replacen(
                &format!("{:?}", plugin(&h.plugin).display().to_string()),
                &format!(
                    "{:?}",
                    self.path(&format!("{}.wasm", h.name)).display().to_string()
                ),
                1,
            );
        }
        format!(
            "{text}\n[admin]\nenabled = true\nlisten = \"127.0.0.1:0\"\ntoken_file = {:?}\nmax_body_mib = 1\n\n\
             [plugins]\ncache_dir = {:?}\n{extra}",
            self.path("token").display().to_string(),
            self.path("compiled").display().to_string(),
        )
    }

    /// `weir <command>` aimed at the admin API on `addr`.
    fn cli(&self, command: &str, addr: &str) -> Vec<String> {
        vec![
            command.into(),
            "--admin".into(),
            format!("http://{addr}"),
            "--token-file".into(),
            self.path("token").display().to_string(),
        ]
    }
}

/// The version Weir names a component by: the first 12 hex digits of its SHA-256.
fn version_of(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The same component with a custom section added: another version that
/// behaves the same.
fn variant(component: &[u8], tag: &str) -> Vec<u8> {
    fn leb(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let name = b"weir-test-variant";
    let mut content = Vec::new();
    leb(name.len(), &mut content);
    content.extend_from_slice(name);
    content.extend_from_slice(tag.as_bytes());
    let mut out = component.to_vec();
    out.push(0);
    leb(content.len(), &mut out);
    out.extend_from_slice(&content);
    out
}

/// An admin API request: (status, JSON body).
async fn admin(
    method: &str,
    addr: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> Result<(u16, Value)> {
    let client = reqwest::Client::new();
    let url = format!("http://{addr}{path}");
    let mut req = match method {
        "GET" => client.get(&url),
        "PUT" => client.put(&url),
        _ => client.post(&url),
    };
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if let Some(b) = body {
        req = req.body(b);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let text = resp.text().await?;
    Ok((
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    ))
}

/// The serving version of handler `name`.
async fn serving(addr: &str, name: &str) -> Result<Value> {
    let (status, list) = admin("GET", addr, "/handlers", Some(TOKEN), None).await?;
    anyhow::ensure!(status == 200, "GET /handlers: {status} {list}");
    list.as_array()
        .and_then(|l| l.iter().find(|h| h["name"] == name))
        .cloned()
        .with_context(|| format!("no handler {name} in {list}"))
}

async fn await_version(addr: &str, name: &str, version: &str) -> Result<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let h = serving(addr, name).await?;
        if h["version"] == version {
            return Ok(h);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "handler {name} still at {} (waiting for {version})",
            h["version"]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn events(from: usize, to: usize) -> Vec<In> {
    (from..to)
        .map(|i| {
            In::envelope(
                &format!("k{i}"),
                &format!("evt-{i}"),
                "c",
                "tick",
                json!({"i": i}),
            )
        })
        .collect()
}

fn total(v: Vec<i64>) -> i64 {
    v.into_iter().filter(|o| *o > 0).sum()
}

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

#[tokio::test(flavor = "multi_thread")]
async fn reloads_start_stop_and_change_handlers_and_refuse_invalid_files() -> Result<()> {
    const P: i32 = 2;
    let a = unique("reload-a");
    let b = unique("reload-b");
    let group = unique("reload-group");
    for t in [
        &a,
        &format!("{a}.out"),
        &b,
        &format!("{b}.out"),
        &format!("{b}.v2"),
    ] {
        create_topic(t, P).await?;
    }
    let plugins = Plugins::new()?;
    plugins.copy("echo", "a.wasm")?;
    plugins.copy("echo", "b.wasm")?;
    let spec_a = || HandlerSpec::new("a", "echo", &a);
    let spec_b = |out: &str| HandlerSpec::new("b", "echo", &b).config("output_topic", out);
    let mut weir = Weir::start(&plugins.config(&group, &[spec_a()], ""))?;
    let addr = weir.admin_addr().await?;
    let file = weir.config_path();
    produce(&a, &events(0, 50)).await?;
    await_records(&format!("{a}.out"), P, 50, Duration::from_secs(60)).await?;

    // Added (SIGHUP): b starts handling without a restart.
    std::fs::write(
        &file,
        plugins.config(&group, &[spec_a(), spec_b(&format!("{b}.out"))], ""),
    )?;
    weir.signal(1)?;
    produce(&b, &events(0, 50)).await?;
    await_records(&format!("{b}.out"), P, 50, Duration::from_secs(90)).await?;

    // An invalid edit: refused with the reason, nothing changes.
    std::fs::write(
        &file,
        plugins
            .config(&group, &[spec_a()], "")
            .replace("[pipeline]\n", "[pipeline]\nbogus = 1\n"),
    )?;
    let reload = plugins.cli("reload", &addr);
    let args: Vec<&str> = reload.iter().map(String::as_str).collect();
    let (ok, _, stderr) = run_weir_output(&args);
    println!("invalid reload: {stderr}");
    assert!(!ok && stderr.contains("bogus"), "{stderr}");
    let names: Vec<String> = admin("GET", &addr, "/handlers", Some(TOKEN), None)
        .await?
        .1
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["a", "b"]);

    // a removed, b's settings changed (its output topic).
    std::fs::write(
        &file,
        plugins.config(&group, &[spec_b(&format!("{b}.v2"))], ""),
    )?;
    let (ok, stdout, stderr) = run_weir_output(&args);
    assert!(ok, "{stderr}");
    println!("reload: {stdout}");
    assert!(
        stdout.contains("removed [\"a\"]") && stdout.contains("changed [\"b\"]"),
        "{stdout}"
    );
    produce(&a, &events(50, 100)).await?;
    produce(&b, &events(50, 100)).await?;
    await_records(&format!("{b}.v2"), P, 50, Duration::from_secs(90)).await?;
    await_committed_to_end(&group, &b, P, Duration::from_secs(60)).await?;
    // a's new events are not consumed: its offsets stay where a stopped.
    assert_eq!(total(committed(&group, &a, P)?), 50);
    assert_eq!(total(end_offsets(&format!("{a}.out"), P)?), 50);
    assert_eq!(total(end_offsets(&format!("{b}.out"), P)?), 50);
    let (status, _) = weir.stop(Duration::from_secs(30)).await?;
    assert!(status.success());
    Ok(())
}

/// (compiled from the cache?, load ms) of the handler's start-up log line.
fn load_line(log: &str) -> (bool, u64) {
    let field = |name: &str| {
        log.split(&format!("{name}="))
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_default()
            .to_owned()
    };
    (
        field("compiled") == "Cached",
        field("load_ms").parse().unwrap_or(u64::MAX),
    )
}

/// Starts weir and reads how its handler was loaded.
async fn start(config: &str) -> Result<(Weir, (bool, u64))> {
    let mut weir = Weir::start(config)?;
    let line = weir
        .await_log("handler loaded", Duration::from_secs(120))
        .await?;
    Ok((weir, load_line(&line)))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_compile_cache_skips_compilation_and_rebuilds_a_corrupt_entry() -> Result<()> {
    let input = unique("cache-in");
    let output = format!("{input}.out");
    let group = unique("cache-group");
    create_topic(&input, 1).await?;
    create_topic(&output, 1).await?;
    let plugins = Plugins::new()?;
    plugins.copy("echo", "echo.wasm")?;
    let config = plugins.config(&group, &[HandlerSpec::new("echo", "echo", &input)], "");

    let (weir, (cached, fresh_ms)) = start(&config).await?;
    assert!(!cached, "the first start compiles");
    weir.stop(Duration::from_secs(30)).await?;
    let (weir, (cached, cached_ms)) = start(&config).await?;
    println!("start-up: compiled {fresh_ms} ms, from the cache {cached_ms} ms");
    assert!(cached, "the second start reads the cache");
    assert!(
        cached_ms < fresh_ms,
        "{cached_ms} ms from the cache, {fresh_ms} ms compiling"
    );
    weir.stop(Duration::from_secs(30)).await?;

    // A damaged entry is noticed, compiled again, and the handler works.
    let entry = std::fs::read_dir(plugins.path("compiled"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "cwasm"))
        .context("a cache entry")?;
    let mut data = std::fs::read(&entry)?;
    let middle = data.len() / 2;
    data[middle] ^= 0x5a;
    std::fs::write(&entry, &data)?;
    let (mut weir, (cached, _)) = start(&config).await?;
    assert!(!cached);
    weir.await_log("compile cache entry is damaged", Duration::from_secs(5))
        .await?;
    produce(&input, &events(0, 10)).await?;
    await_records(&output, 1, 10, Duration::from_secs(60)).await?;
    weir.stop(Duration::from_secs(30)).await?;
    let (weir, (cached, _)) = start(&config).await?;
    assert!(cached, "the rewritten entry is used");
    weir.stop(Duration::from_secs(30)).await?;
    Ok(())
}
