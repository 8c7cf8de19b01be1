//! 10,000 events over 4 partitions through a handler against the real broker.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use rdkafka::message::Message;
use serde_json::{json, Value};
use weir_e2e::*;

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_events_flow_through_once_in_key_order() -> anyhow::Result<()> {
    const N: usize = 10_000;
    const KEYS: usize = 100;
    let input = unique("flow-in");
    let output = format!("{input}.out");
    let group = unique("flow-group");
    create_topic(&input, 4).await?;
    create_topic(&output, 4).await?;

    let records: Vec<In> = (0..N)
        .map(|i| {
            let key = format!("key-{}", i % KEYS);
            In::envelope(
                &key,
                &format!("evt-{i}"),
                &format!("corr-{i}"),
                "order.placed",
                json!({"key": key, "seq": i / KEYS}),
            )
        })
        .collect();
    produce(&input, &records).await?;

    let weir = Weir::start(&config_toml(
        &group,
        &[HandlerSpec::new("echo", "echo", &input)],
    ))?;
    await_committed_to_end(&group, &input, 4, Duration::from_secs(180)).await?;
    let status = weir.terminate(Duration::from_secs(30)).await?;
    assert!(status.success(), "weir exited with {status}");

    let outputs = read_all(&output)?;
    assert_eq!(outputs.len(), N, "every input has exactly one output");
    let mut causations = HashSet::new();
    let mut last_seq: HashMap<String, i64> = HashMap::new();
    // Partitions are read in offset order, so per key order is visible as is.
    for m in &outputs {
        let v: Value = serde_json::from_slice(m.payload().unwrap())?;
        let causation = v["causationId"].as_str().unwrap().to_owned();
        let i: usize = causation.strip_prefix("evt-").unwrap().parse()?;
        assert_eq!(v["correlationId"], format!("corr-{i}"));
        assert_eq!(
            header(m, "causation-id").as_deref(),
            Some(causation.as_str())
        );
        assert_eq!(header(m, "correlation-id"), Some(format!("corr-{i}")));
        assert_eq!(v["eventType"], "order.placed.echoed");
        assert_ne!(v["id"], causation.as_str(), "an output gets a fresh id");
        let key = v["payload"]["key"].as_str().unwrap().to_owned();
        assert_eq!(m.key(), Some(key.as_bytes()));
        let seq = v["payload"]["seq"].as_i64().unwrap();
        let prev = last_seq.insert(key.clone(), seq);
        assert!(
            prev.is_none_or(|p| p < seq),
            "key {key}: seq {seq} after {prev:?}"
        );
        assert!(causations.insert(causation), "duplicate output");
    }
    assert_eq!(causations.len(), N);
    assert_eq!(committed(&group, &input, 4)?, end_offsets(&input, 4)?);
    Ok(())
}
