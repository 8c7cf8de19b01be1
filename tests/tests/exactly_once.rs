//! Exactly-once mode (`[delivery] mode = "exactly-once"`): each commit
//! interval is one Kafka transaction with the outputs, dead letters, retry
//! records, changelog marks and input offsets of the events it finishes. A
//! `read_committed` consumer sees every event's effects once, whatever
//! happens to the instances.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::message::OwnedMessage;
use weir_e2e::*;

/// The tests start several instances each: one test at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `config` in exactly-once mode with transactional id `id`.
fn exactly_once(config: &str, id: &str) -> String {
    format!("{config}\n[delivery]\nmode = \"exactly-once\"\ntransactional_id = {id:?}\n")
}

/// Outputs per causation id (the event each output was made for).
fn per_event(outputs: &[OwnedMessage]) -> HashMap<String, usize> {
    let mut count = HashMap::new();
    for m in outputs {
        *count
            .entry(header(m, "causation-id").unwrap_or_default())
            .or_insert(0) += 1;
    }
    count
}

/// At least 20 SIGKILLs at random moments over 50,000 events and two
/// instances: a `read_committed` consumer sees each event's output exactly
/// once; the aborted transactions' records are in the log but never seen.
#[tokio::test(flavor = "multi_thread")]
async fn a_crash_storm_in_exactly_once_mode_shows_each_output_once() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    const N: usize = 50_000;
    const P: i32 = 4;
    const KILLS: usize = 20;
    let seed = seed("exactly-once crash storm");
    let mut rng = SplitMix64(seed);
    let (input, output, group) = fresh_topics("eos-storm", P).await?;
    let base = config_toml(
        &group,
        &[HandlerSpec::new("echo", "echo", &input).config("delay_ms", "1")],
    )
    .replace("commit_interval_ms = 200", "commit_interval_ms = 100");
    // Each instance slot keeps its transactional id across restarts.
    let configs: Vec<String> = (0..2)
        .map(|i| exactly_once(&base, &format!("{group}-{i}")))
        .collect();
    produce(&input, &numbered_events(N)).await?;
    let mut fleet: Vec<Weir> = configs
        .iter()
        .map(|c| Weir::start(c))
        .collect::<anyhow::Result<_>>()?;
    for k in 0..KILLS {
        let before: i64 = end_offsets(&output, P)?.iter().sum();
        // Handling goes on between kills (it may pause while a killed
        // member's session expires).
        await_records(&output, P, before + 1, Duration::from_secs(120)).await?;
        tokio::time::sleep(Duration::from_millis(100 + rng.below(900))).await;
        let i = rng.below(2) as usize;
        // Killed first: a replacement started before would fence it.
        let victim = fleet.remove(i);
        victim.kill().await?;
        fleet.insert(i, Weir::start(&configs[i])?);
        println!("kill {k}: instance {i} killed and started again");
    }
    await_committed_to_end(&group, &input, P, Duration::from_secs(300)).await?;
    for w in fleet {
        assert!(w.terminate(Duration::from_secs(60)).await?.success());
    }
    let visible = read_isolated(&output, "read_committed")?;
    let written = read_isolated(&output, "read_uncommitted")?;
    let count = per_event(&visible);
    let lost = (0..N)
        .filter(|i| !count.contains_key(&format!("evt-{i}")))
        .count();
    let duplicates = visible.len() - count.len();
    println!(
        "exactly-once crash storm: seed={seed} instances=2 kills={KILLS} inputs={N} outputs={} \
         lost={lost} duplicates={duplicates} aborted transactions: at most one per kill ({KILLS}), \
         holding {} output records (in the log, never seen by read_committed)",
        visible.len(),
        written.len() - visible.len(),
    );
    assert_eq!(lost, 0, "seed={seed}");
    assert_eq!(duplicates, 0, "seed={seed}");
    assert_eq!(count.len(), N);
    assert!(
        written.len() > visible.len(),
        "the kills left aborted records in the log"
    );
    assert_eq!(committed(&group, &input, P)?, end_offsets(&input, P)?);
    Ok(())
}

/// A second instance started with the same transactional id fences the
/// first: the first stops (not zero) naming the cause and commits nothing
/// more; every event's output is seen once.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_instance_with_the_same_transactional_id_fences_the_first() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    const N: usize = 3_000;
    const P: i32 = 2;
    let (input, output, group) = fresh_topics("eos-fence", P).await?;
    let config = exactly_once(
        &config_toml(
            &group,
            &[HandlerSpec::new("echo", "echo", &input).config("delay_ms", "5")],
        ),
        "the-same-id",
    );
    produce(&input, &numbered_events(N)).await?;
    let mut first = Weir::start(&config)?;
    await_records(&output, P, 100, Duration::from_secs(60)).await?;
    let second = Weir::start(&config)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while first.running() {
        if tokio::time::Instant::now() > deadline {
            println!("{}", first.log().join("\n"));
            anyhow::bail!("the fenced instance did not stop");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, log) = first.wait_exit(Duration::from_secs(10)).await?;
    let log = log.join("\n");
    println!("first instance: {status}");
    assert!(!status.success(), "the fenced instance exits non-zero");
    assert!(
        log.contains("transactional id \\\"the-same-id\\\"")
            || log.contains("transactional id \"the-same-id\""),
        "the log names the cause: {}",
        &log[log.len().saturating_sub(3000)..]
    );
    await_committed_to_end(&group, &input, P, Duration::from_secs(120)).await?;
    assert!(second.terminate(Duration::from_secs(30)).await?.success());
    let visible = read_isolated(&output, "read_committed")?;
    let count = per_event(&visible);
    println!(
        "fencing: inputs={N} outputs={} events={}",
        visible.len(),
        count.len()
    );
    assert_eq!(count.len(), N, "lost none");
    assert_eq!(visible.len(), N, "no duplicates");
    Ok(())
}

/// Successes, a handler error's dead letter and a retry record share the
/// first transaction with an output too large for its topic: the broker
/// refuses it, so the transaction aborts and none of them is seen. The
/// events are handled again: the oversize one alone, then dead-lettered
/// (`produce-failed`); everything else once.
#[tokio::test(flavor = "multi_thread")]
async fn successes_dead_letters_and_retries_commit_together_or_not_at_all() -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let input = unique("eos-mixed-in");
    let output = format!("{input}.out");
    let dlq = format!("{input}.dlq");
    let retry = format!("{input}.retry");
    create_topic(&input, 1).await?;
    create_topic(&dlq, 1).await?;
    create_topic(&retry, 1).await?;
    create_topic_with(&output, &[("max.message.bytes", "1500")]).await?;
    let group = unique("eos-mixed-group");
    let config = exactly_once(
        &config_toml(
            &group,
            &[HandlerSpec::new("h", "fail-on-marker", &input)
                .extra("retry_mode = \"topic\"\nmax_attempts = 5\ninitial_backoff_ms = 10\nmax_backoff_ms = 50\n")
                .config("succeed_on_attempt", "2")],
        )
        .replace("commit_interval_ms = 200", "commit_interval_ms = 5000"),
        "eos-mixed",
    );
    // 0-5 succeed, 6 fails (dead letter), 7 is retried once, 8 is too large;
    // all are handled within the first commit interval (5 s).
    let body = |i: usize| match i {
        6 => "FAIL".to_owned(),
        7 => "RETRY".to_owned(),
        8 => "x".repeat(4000),
        _ => format!("ok-{i}"),
    };
    let events: Vec<In> = (0..9)
        .map(|i| {
            In::envelope(
                &format!("k{i}"),
                &format!("e-{i}"),
                "c",
                "t",
                serde_json::json!({ "body": body(i) }),
            )
        })
        .collect();
    produce(&input, &events).await?;
    let mut weir = Weir::start(&config)?;
    let addr = weir.http_addr().await?;
    // The retried event's output comes last (the retry topic's end offset
    // counts transaction markers: committed offsets never reach it).
    let done = async {
        await_committed_to_end(&group, &input, 1, Duration::from_secs(120)).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !per_event(&read_isolated(&output, "read_committed")?).contains_key("e-7") {
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "no output for e-7");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::Ok(())
    };
    if let Err(e) = done.await {
        println!("{}", weir.log().join("\n"));
        return Err(e);
    }
    let scrape = Scrape::fetch(&addr).await?;
    let aborted = scrape
        .value("weir_transactions_total", &[("result", "aborted")])
        .unwrap_or(0.0);
    assert!(weir.terminate(Duration::from_secs(30)).await?.success());

    let outputs = per_event(&read_isolated(&output, "read_committed")?);
    let dead = read_isolated(&dlq, "read_committed")?;
    let retries = read_isolated(&retry, "read_committed")?;
    let written = |t: &str| read_isolated(t, "read_uncommitted").map(|v| v.len());
    println!(
        "outputs {outputs:?}; dead letters {:?}; retry records {}; aborted transactions {aborted}; \
         written (incl. aborted): outputs {} dead letters {} retry records {}",
        dead.iter()
            .map(|d| (header(d, "weir-error-kind"), header(d, "weir-original-offset")))
            .collect::<Vec<_>>(),
        retries.len(),
        written(&output)?,
        written(&dlq)?,
        written(&retry)?,
    );
    // Each success once (the retried event's output included).
    for i in [0, 1, 2, 3, 4, 5, 7] {
        assert_eq!(
            outputs.get(&format!("e-{i}")),
            Some(&1),
            "e-{i}: {outputs:?}"
        );
    }
    assert_eq!(outputs.len(), 7, "{outputs:?}");
    // One dead letter for the failure, one for the oversize output.
    let mut kinds: Vec<(String, String)> = dead
        .iter()
        .map(|d| {
            (
                header(d, "weir-original-offset").unwrap_or_default(),
                header(d, "weir-error-kind").unwrap_or_default(),
            )
        })
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        vec![
            ("6".to_owned(), "fatal".to_owned()),
            ("8".to_owned(), "produce-failed".to_owned())
        ]
    );
    assert_eq!(retries.len(), 1, "one retry hop");
    // The first transaction held all kinds of records and aborted: its
    // dead letter and retry record are in the log, never seen committed
    // (its outputs went in the batch the broker refused).
    assert!(aborted >= 1.0);
    assert!(written(&dlq)? > 2, "aborted dead letters are in the log");
    assert!(written(&retry)? > 1, "aborted retry records are in the log");
    Ok(())
}

/// A record the broker refuses for its size in the middle of a stream
/// that keeps arriving: the transaction aborts, the pipeline rewinds, the
/// oversize event is found and dead-lettered (`produce-failed`), and every
/// other event's output is seen exactly once; the instance stays ready.
#[tokio::test(flavor = "multi_thread")]
async fn an_oversize_output_mid_stream_is_dead_lettered_and_the_rest_seen_once(
) -> anyhow::Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    const N: usize = 3_000;
    const BIG: usize = 1_500;
    let input = unique("eos-big-in");
    let output = format!("{input}.out");
    let dlq = format!("{input}.dlq");
    create_topic(&input, 2).await?;
    create_topic(&dlq, 1).await?;
    // Room for any batch of small outputs, not for the 700 KB one.
    create_topic_with(&output, &[("max.message.bytes", "500000")]).await?;
    let group = unique("eos-big-group");
    let config = exactly_once(
        &config_toml(
            &group,
            &[HandlerSpec::new("echo", "echo", &input).config("output_topic", &output)],
        ),
        "eos-big",
    );
    let mut events = numbered_events(N);
    events[BIG] = In::envelope(
        "k-big",
        &format!("evt-{BIG}"),
        "c",
        "t",
        serde_json::json!({ "big": "x".repeat(700_000) }),
    );
    let mut weir = Weir::start(&config)?;
    let addr = weir.http_addr().await?;
    // The events keep arriving while the instance handles them.
    for chunk in events.chunks(500) {
        produce(&input, chunk).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    if let Err(e) = await_committed_to_end(&group, &input, 2, Duration::from_secs(180)).await {
        println!("{}", weir.log().join("\n"));
        return Err(e);
    }
    let (status, body) = http_get(&addr, "/readyz").await?;
    let scrape = Scrape::fetch(&addr).await?;
    let aborted = scrape
        .value("weir_transactions_total", &[("result", "aborted")])
        .unwrap_or(0.0);
    let published = scrape
        .value("weir_outputs_published_total", &[("handler", "echo")])
        .unwrap_or(0.0);
    assert!(weir.running(), "the instance keeps going");
    assert!(weir.terminate(Duration::from_secs(30)).await?.success());
    let count = per_event(&read_isolated(&output, "read_committed")?);
    let dead = read_isolated(&dlq, "read_committed")?;
    let duplicates: usize = count.values().map(|n| n - 1).sum();
    let lost = (0..N)
        .filter(|i| *i != BIG && !count.contains_key(&format!("evt-{i}")))
        .count();
    println!(
        "oversize mid-stream: inputs={N} outputs={} lost={lost} duplicates={duplicates} \
         dead letters={} aborted transactions={aborted} readyz={status}",
        count.len(),
        dead.len()
    );
    assert_eq!(lost, 0);
    assert_eq!(duplicates, 0);
    assert!(!count.contains_key(&format!("evt-{BIG}")));
    assert_eq!(dead.len(), 1);
    assert_eq!(
        header(&dead[0], "weir-error-kind").as_deref(),
        Some("produce-failed")
    );
    assert!(aborted >= 1.0);
    // Counted when their transaction commits: aborted attempts are not.
    assert_eq!(published, (N - 1) as f64, "outputs published");
    assert_eq!(status, 200, "{body}");
    Ok(())
}
