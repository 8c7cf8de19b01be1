//! Crash safety: the real binary, the real broker, 50,000 events and at
//! least 20 SIGKILLs at random moments. Nothing is lost; duplicates are
//! only events whose outputs were acknowledged but not yet marked.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use rdkafka::message::Message;
use weir_e2e::*;

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_at_random_moments_loses_nothing() -> anyhow::Result<()> {
    const N: usize = 50_000;
    const P: i32 = 4;
    const KILLS: usize = 20;
    let seed = seed("crash test");
    let mut rng = SplitMix64(seed);
    let (input, output, group) = fresh_topics("crash", P).await?;
    let state = tempfile::tempdir()?;
    let files = tempfile::tempdir()?;
    // Static membership on the classic protocol: a restarted instance takes
    // its partitions back at once. (With the consumer protocol a killed
    // member's id stays taken until its session expires.)
    let config = with_store(
        config_toml(
            &group,
            &[HandlerSpec::new("echo", "echo", &input).config("delay_ms", "1")],
        )
        .replace(
            "[kafka.consumer_options]",
            "group_protocol = \"cooperative\"\n\n[kafka.consumer_options]\n\"group.instance.id\" = \"crash-test\"",
        ),
        state.path(),
        3600,
    );
    let path = write_config(files.path(), &config);
    let inputs = numbered_events(N);
    produce(&input, &inputs).await?;

    // After each kill: the output end offsets and the marks at that moment.
    let mut snapshots: Vec<(Vec<i64>, HashSet<String>)> = Vec::new();
    for _ in 0..KILLS {
        let before: i64 = end_offsets(&output, P)?.iter().sum();
        let weir = Weir::start(&config)?;
        // Kill at a random moment once it is handling events.
        await_records(&output, P, before + 1, Duration::from_secs(60)).await?;
        tokio::time::sleep(Duration::from_millis(rng.below(400))).await;
        weir.kill().await?;
        let ends = end_offsets(&output, P)?;
        let marked: HashSet<String> = marks(&path).into_iter().map(|(_, id)| id).collect();
        snapshots.push((ends, marked));
    }
    let weir = Weir::start(&config)?;
    await_committed_to_end(&group, &input, P, Duration::from_secs(300)).await?;
    assert!(weir.terminate(Duration::from_secs(30)).await?.success());

    let outputs = read_all(&output)?;
    let mut count: HashMap<String, usize> = HashMap::new();
    for m in &outputs {
        let id = header(m, "causation-id").unwrap();
        // No duplicate output for an event that was marked before a kill.
        for (k, (ends, marked)) in snapshots.iter().enumerate() {
            if m.offset() >= ends[m.partition() as usize] && marked.contains(&id) {
                panic!("{id} was marked before kill {k} and handled again after it (seed={seed})");
            }
        }
        *count.entry(id).or_default() += 1;
    }
    let lost = (0..N)
        .filter(|i| !count.contains_key(&format!("evt-{i}")))
        .count();
    let duplicates = outputs.len() - count.len();
    println!(
        "crash test: seed={seed} kills={KILLS} inputs={N} outputs={} lost={lost} duplicates={duplicates} \
         (each duplicate's outputs were acknowledged but not yet marked when the process died)",
        outputs.len()
    );
    assert_eq!(lost, 0);
    assert_eq!(count.len(), N);
    assert_eq!(committed(&group, &input, P)?, end_offsets(&input, P)?);
    Ok(())
}
