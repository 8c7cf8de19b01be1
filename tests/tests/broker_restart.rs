//! The broker goes away mid-stream for longer than the group's session
//! timeout, then comes back on the same data (`scripts/kafka.sh restart
//! 12`): the instance reports not-ready while it cannot reach it, becomes
//! ready again, and every event has its output.
//!
//! This test restarts the broker every test uses, so it is the only test
//! of its file (cargo runs test files one after another).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use weir_e2e::*;

/// `scripts/kafka.sh` with the test broker's port and cache.
fn kafka_sh(args: &[&str]) -> anyhow::Result<()> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/kafka.sh");
    let status = std::process::Command::new("bash")
        .arg(script)
        .args(args)
        .status()?;
    anyhow::ensure!(
        status.success(),
        "scripts/kafka.sh {args:?} failed: {status}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_restart_mid_stream_loses_nothing() -> anyhow::Result<()> {
    const N: usize = 20_000;
    const P: i32 = 4;
    let port = std::env::var("WEIR_KAFKA_PORT").unwrap_or_else(|_| "19092".into());
    anyhow::ensure!(
        brokers() == format!("127.0.0.1:{port}"),
        "this test restarts the broker of scripts/kafka.sh (127.0.0.1:{port}); WEIR_TEST_BROKERS is {}",
        brokers()
    );
    let (input, output, group) = fresh_topics("bounce", P).await?;
    let config = config_toml(
        &group,
        &[HandlerSpec::new("echo", "echo", &input).config("delay_ms", "2")],
    );
    produce(&input, &numbered_events(N)).await?;
    let mut weir = Weir::start(&config)?;
    let addr = weir.http_addr().await?;
    await_records(&output, P, 2_000, Duration::from_secs(60)).await?;

    // /readyz as seen every 100 ms: (ready, answer, when) at each change
    // of the answer.
    let seen: Arc<Mutex<Vec<(bool, String, Instant)>>> = Default::default();
    let watcher = {
        let seen = seen.clone();
        let addr = addr.clone();
        tokio::spawn(async move {
            loop {
                if let Ok((code, body)) = http_get(&addr, "/readyz").await {
                    let mut s = seen.lock().unwrap();
                    let ready = code == 200;
                    if s.last().map(|(r, b, _)| (*r, b.as_str())) != Some((ready, body.as_str())) {
                        s.push((ready, body, Instant::now()));
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // Away for 12 s: longer than the group's session timeout (10 s).
    let away = Instant::now();
    tokio::task::spawn_blocking(|| kafka_sh(&["restart", "12"])).await??;
    let back = Instant::now();
    await_committed_to_end(&group, &input, P, Duration::from_secs(300)).await?;
    // Ready again once it has made progress.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.lock().unwrap().last().map(|(r, _, _)| *r) != Some(true) {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "not ready again: {:?}",
            seen.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    watcher.abort();
    assert!(weir.terminate(Duration::from_secs(60)).await?.success());

    let states = seen.lock().unwrap().clone();
    println!(
        "broker restart: /readyz went {:?}",
        states
            .iter()
            .map(|(r, b, t)| (r, b.trim(), t.saturating_duration_since(away)))
            .collect::<Vec<_>>()
    );
    assert!(
        states.iter().any(|(ready, body, t)| !ready
            && *t >= away
            && *t <= back
            && (body.contains("no Kafka broker is reachable") || body.contains("coordinator"))),
        "never reported the broker or the group's coordinator unreachable while it was away"
    );
    let outputs = read_all(&output)?;
    let ids: std::collections::HashSet<String> = outputs
        .iter()
        .map(|m| header(m, "causation-id").unwrap())
        .collect();
    let lost = (0..N)
        .filter(|i| !ids.contains(&format!("evt-{i}")))
        .count();
    println!(
        "broker restart: inputs={N} outputs={} lost={lost} duplicates={}",
        outputs.len(),
        outputs.len() - ids.len()
    );
    assert_eq!(lost, 0);
    Ok(())
}
