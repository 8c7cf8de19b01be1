//! Per-call limits: fuel, memory, deadline and traps fail the event (dead
//! letter with its class), never the runtime or another handler.

use std::time::Duration;

use rdkafka::message::Message;
use serde_json::json;
use weir_e2e::*;

struct Setup {
    input: String,
    output: String,
    dlq: String,
    group: String,
}

async fn setup(name: &str) -> anyhow::Result<Setup> {
    let input = unique(name);
    let s = Setup {
        output: format!("{input}.out"),
        dlq: format!("{input}.dlq"),
        group: unique(&format!("{name}-group")),
        input,
    };
    for t in [&s.input, &s.output, &s.dlq] {
        create_topic(t, 1).await?;
    }
    Ok(s)
}

fn commands(cmds: &[&str]) -> Vec<In> {
    cmds.iter()
        .enumerate()
        .map(|(i, c)| In::envelope("k", &format!("cmd-{i}"), "c", "cmd", json!(c)))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_infinite_loop_runs_out_of_fuel_while_another_handler_goes_on() -> anyhow::Result<()> {
    let bad = setup("loop").await?;
    let good = setup("steady").await?;
    let steady: Vec<In> = (0..300)
        .map(|i| In::envelope(&format!("k{i}"), &format!("s-{i}"), "c", "t", json!(i)))
        .collect();
    produce(&bad.input, &commands(&["loop", "after"])).await?;
    produce(&good.input, &steady).await?;
    let handlers = [
        HandlerSpec::new("looper", "misbehave", &bad.input)
            .extra("fuel_per_event = 200000000\ndeadline_ms = 10000"),
        HandlerSpec::new("steady", "echo", &good.input),
    ];
    let weir = Weir::start(&config_toml(&bad.group, &handlers))?;
    await_committed_to_end(&bad.group, &bad.input, 1, Duration::from_secs(60)).await?;
    await_committed_to_end(&bad.group, &good.input, 1, Duration::from_secs(60)).await?;
    assert!(weir.terminate(Duration::from_secs(30)).await?.success());

    let dead = read_all(&bad.dlq)?;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        header(&dead[0], "weir-error-kind").as_deref(),
        Some("fuel-exhausted")
    );
    assert_eq!(
        header(&dead[0], "weir-attempts").as_deref(),
        Some("1"),
        "a limit is not retried"
    );
    let input = read_all(&bad.input)?;
    let took = dead[0].timestamp().to_millis().unwrap() - input[0].timestamp().to_millis().unwrap();
    assert!(
        took < 20_000,
        "fuel ran out after {took} ms, past the deadline"
    );
    // The instance was replaced: the next event of the same handler works.
    assert_eq!(read_all(&bad.output)?.len(), 1);
    assert_eq!(read_all(&good.output)?.len(), 300);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn unbounded_allocation_hits_the_memory_cap() -> anyhow::Result<()> {
    let s = setup("alloc").await?;
    produce(&s.input, &commands(&["alloc", "alloc", "after"])).await?;
    let handler = HandlerSpec::new("hoarder", "misbehave", &s.input).extra("memory_limit_mib = 32");
    let mut weir = Weir::start(&config_toml(&s.group, &[handler]))?;
    let mut peak = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while committed(&s.group, &s.input, 1)? != end_offsets(&s.input, 1)? {
        assert!(
            tokio::time::Instant::now() < deadline && weir.running(),
            "not done in time"
        );
        peak = peak.max(weir.rss_kib().unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(weir.terminate(Duration::from_secs(30)).await?.success());
    let dead = read_all(&s.dlq)?;
    let kinds: Vec<_> = dead
        .iter()
        .map(|m| header(m, "weir-error-kind").unwrap())
        .collect();
    assert_eq!(kinds, ["memory-limit", "memory-limit"]);
    assert_eq!(read_all(&s.output)?.len(), 1);
    println!("peak RSS while two handlers hit a 32 MiB cap: {peak} KiB");
    assert!(peak < 400 * 1024, "peak RSS {peak} KiB");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_past_the_deadline_are_stopped() -> anyhow::Result<()> {
    let s = setup("deadline").await?;
    produce(&s.input, &commands(&["spin", "sleep", "panic", "after"])).await?;
    let handler = HandlerSpec::new("slowpoke", "misbehave", &s.input)
        .extra("deadline_ms = 300\nfuel_per_event = 1000000000000");
    let weir = Weir::start(&config_toml(&s.group, &[handler]))?;
    await_committed_to_end(&s.group, &s.input, 1, Duration::from_secs(60)).await?;
    assert!(weir.terminate(Duration::from_secs(30)).await?.success());
    let dead = read_all(&s.dlq)?;
    let kinds: Vec<_> = dead
        .iter()
        .map(|m| header(m, "weir-error-kind").unwrap())
        .collect();
    // A busy loop is interrupted at the deadline; a blocking host call
    // (sleep) is noticed as soon as it returns.
    assert_eq!(kinds, ["deadline-exceeded", "deadline-exceeded", "trap"]);
    assert!(header(&dead[2], "weir-error-message")
        .unwrap()
        .contains("unreachable"));
    assert_eq!(
        read_all(&s.output)?.len(),
        1,
        "the event after a trap is handled by a fresh instance"
    );
    Ok(())
}
