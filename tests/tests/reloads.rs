//! Config reloads of a running instance (SIGHUP and `weir reload`), and the
//! compile cache.

use std::time::Duration;

use anyhow::{Context, Result};
use weir_e2e::*;

mod support;
use support::*;

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
