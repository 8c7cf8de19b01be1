//! `weir dev --handler`: the user's own component through the whole
//! pipeline on librdkafka's in-process mock cluster, fed sample events.

use anyhow::Result;
use weir_e2e::{plugin, run_weir_output};

#[test]
fn weir_dev_runs_your_component_on_the_mock_cluster() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let events = dir.path().join("events.jsonl");
    std::fs::write(
        &events,
        concat!(
            "{\"eventType\": \"order.placed\", \"id\": \"e-1\", \"payload\": {\"n\": 1}}\n",
            "{\"key\": \"k\", \"value\": \"FAIL here\"}\n",
            "{\"eventType\": \"order.placed\", \"id\": \"e-3\", \"payload\": {\"n\": 3}}\n",
        ),
    )?;
    let wasm = plugin("fail-on-marker");
    let (ok, stdout, stderr) = run_weir_output(&[
        "dev",
        "--handler",
        &wasm.display().to_string(),
        "--events",
        &events.display().to_string(),
    ]);
    println!("{stdout}");
    assert!(ok, "weir dev failed: {stderr}");
    assert!(stdout.contains("== events.out (2 records)"), "{stdout}");
    assert!(stdout.contains("causation=e-1") && stdout.contains("causation=e-3"));
    assert!(stdout.contains("== events.dlq (1 records)"), "{stdout}");
    assert!(stdout.contains("kind=fatal"), "{stdout}");
    assert!(stdout.contains("events[0] committed 3 / end 3"), "{stdout}");
    Ok(())
}
