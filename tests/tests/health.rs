//! Readiness (`/readyz`) as a load balancer or an orchestrator sees it,
//! against the real broker.

use std::time::Duration;

use weir_e2e::*;

#[tokio::test(flavor = "multi_thread")]
async fn ready_only_after_joining_the_group() -> anyhow::Result<()> {
    let input = unique("ready-in");
    create_topic(&input, 1).await?;
    let handlers = [HandlerSpec::new("echo", "echo", &input)];

    // No broker at this address: alive, handlers loaded, never joined.
    let unreachable = config_toml(&unique("ready-group"), &handlers).replace(
        &format!("brokers = {:?}", brokers()),
        "brokers = \"127.0.0.1:1\"",
    );
    let mut lonely = Weir::start(&unreachable)?;
    let addr = lonely.http_addr().await?;
    assert_eq!(http_get(&addr, "/healthz").await?.0, 200);
    lonely
        .await_log("handler loaded", Duration::from_secs(30))
        .await?;
    let (status, body) = http_get(&addr, "/readyz").await?;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("consumer group") || body.contains("loading"),
        "{body}"
    );
    // It waits for the broker (the group's idempotency changelog is the
    // first thing it reads), saying so.
    lonely
        .await_log(
            "cannot open the idempotency changelog",
            Duration::from_secs(60),
        )
        .await?;
    let (status, body) = http_get(&addr, "/readyz").await?;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("weir-idempotency"), "{body}");
    lonely.kill().await?;

    // With the broker: ready once the group assigned partitions.
    let mut weir = Weir::start(&config_toml(&unique("ready-group"), &handlers))?;
    let addr = weir.http_addr().await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = http_get(&addr, "/readyz").await?;
        if status == 200 {
            assert_eq!(body, "ready\n");
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "never ready: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Ready means joined: the assignment was logged before.
    weir.await_log("partitions assigned", Duration::from_secs(5))
        .await?;
    assert!(weir.terminate(Duration::from_secs(30)).await?.success());
    Ok(())
}
