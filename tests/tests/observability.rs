//! Traces exported over OTLP and Prometheus metrics (readiness: `health.rs`),
//! against the real broker.

use std::time::Duration;

use rdkafka::message::OwnedMessage;
use serde_json::json;
use weir_e2e::*;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const TEST_SPAN: &str = "00f067aa0ba902b7";

/// The span id a record's `traceparent` header names, after checking its trace.
fn parent_span_of(m: &OwnedMessage, trace: &str) -> String {
    let tp = header(m, "traceparent").expect("every output carries a traceparent");
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent {tp}");
    assert_eq!(parts[1], trace, "the record continues the trace: {tp}");
    assert_eq!(parts[3], "01", "sampled: {tp}");
    parts[2].to_owned()
}

fn find<'a>(spans: &'a [ReceivedSpan], name: &str, parent: &str) -> &'a ReceivedSpan {
    spans
        .iter()
        .find(|s| s.name == name && s.parent_span_id == parent)
        .unwrap_or_else(|| panic!("no span {name:?} under {parent}; spans: {spans:#?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_two_hop_chain_is_one_trace() -> anyhow::Result<()> {
    let first = unique("trace-a");
    let second = format!("{first}.b");
    let third = format!("{first}.c");
    let group = unique("trace-group");
    for t in [&first, &second, &third, &format!("{first}.dlq")] {
        create_topic(t, 1).await?;
    }
    let receiver = OtlpReceiver::start().await?;
    let config = format!(
        "{}\n[tracing]\notlp_endpoint = {:?}\nservice_name = \"weir-e2e\"\nexport_interval_ms = 100\n",
        config_toml(
            &group,
            &[
                HandlerSpec::new("hop-a", "fail-on-marker", &first)
                    .config("output_topic", &second)
                    .config("succeed_on_attempt", "2")
                    .extra("initial_backoff_ms = 10"),
                HandlerSpec::new("hop-b", "echo", &second).config("output_topic", &third),
            ],
        ),
        receiver.endpoint
    );
    let weir = Weir::start(&config)?;

    let mut ok = In::envelope("k", "evt-1", "corr-1", "order.placed", json!({"n": 1}));
    ok.headers.push((
        "traceparent".into(),
        format!("00-{TRACE}-{TEST_SPAN}-01").into_bytes(),
    ));
    ok.headers.push(("baggage".into(), b"tenant=acme".to_vec()));
    // A second event that fails, in a trace of its own.
    let fail_trace = "0af7651916cd43dd8448eb211c80319c";
    let mut bad = In::envelope("k", "evt-2", "corr-2", "order.placed", json!("FAIL"));
    bad.headers.push((
        "traceparent".into(),
        format!("00-{fail_trace}-b7ad6b7169203331-01").into_bytes(),
    ));
    // A third that fails once, then succeeds on its retry.
    let retry_trace = "11111111111111111111111111111111";
    let mut flaky = In::envelope("k", "evt-3", "corr-3", "order.placed", json!("RETRY"));
    flaky.headers.push((
        "traceparent".into(),
        format!("00-{retry_trace}-2222222222222222-01").into_bytes(),
    ));
    produce(&first, &[ok, bad, flaky]).await?;
    await_records(&third, 1, 2, Duration::from_secs(60)).await?;
    await_records(&format!("{first}.dlq"), 1, 1, Duration::from_secs(60)).await?;
    // Spans still queued are exported at shutdown.
    let (status, log) = weir.stop(Duration::from_secs(30)).await?;
    assert!(status.success());

    let spans = receiver.spans();
    assert!(spans.iter().all(|s| s.service == "weir-e2e"));
    let chain: Vec<ReceivedSpan> = spans
        .iter()
        .filter(|s| s.trace_id == TRACE)
        .cloned()
        .collect();

    // Hop A: a consumer span under the test's context, its handler call
    // and the send of its output under it.
    let a = find(&chain, &format!("process {first}"), TEST_SPAN);
    assert_eq!(a.kind, 5, "consumer span");
    for (k, v) in [
        ("messaging.system", "kafka"),
        ("messaging.destination.name", first.as_str()),
        ("messaging.destination.partition.id", "0"),
        ("messaging.kafka.offset", "0"),
        ("messaging.consumer.group.name", group.as_str()),
        ("messaging.message.id", "evt-1"),
        ("messaging.message.conversation_id", "corr-1"),
        ("weir.handler.name", "hop-a"),
    ] {
        assert_eq!(
            a.attributes.get(k).map(String::as_str),
            Some(v),
            "{k} of {a:#?}"
        );
    }
    let version = &a.attributes["weir.handler.version"];
    assert!(
        version.len() == 12 && version.chars().all(|c| c.is_ascii_hexdigit()),
        "{version}"
    );
    let a_call = find(&chain, "call hop-a", &a.span_id);
    assert_eq!(a_call.attributes["weir.attempt"], "1");
    let a_send = find(&chain, &format!("send {second}"), &a.span_id);
    assert_eq!(a_send.kind, 4, "producer span");

    // The record A published carries A's send span, and the ids.
    let mid = read_all(&second)?;
    assert_eq!(mid.len(), 2);
    assert_eq!(parent_span_of(&mid[0], TRACE), a_send.span_id);
    assert_eq!(header(&mid[0], "baggage").as_deref(), Some("tenant=acme"));
    let mid_id = header(&mid[0], "event-id").unwrap();
    assert_eq!(header(&mid[0], "correlation-id").as_deref(), Some("corr-1"));
    assert_eq!(header(&mid[0], "causation-id").as_deref(), Some("evt-1"));

    // Hop B continues the same trace under A's send span.
    let b = find(&chain, &format!("process {second}"), &a_send.span_id);
    assert_eq!(b.attributes["weir.handler.name"], "hop-b");
    assert_eq!(b.attributes["messaging.message.id"], mid_id);
    assert_eq!(b.attributes["messaging.message.conversation_id"], "corr-1");
    assert_eq!(b.attributes["weir.causation_id"], "evt-1");
    let b_send = find(&chain, &format!("send {third}"), &b.span_id);
    let last: Vec<OwnedMessage> = read_all(&third)?
        .into_iter()
        .filter(|m| header(m, "correlation-id").as_deref() == Some("corr-1"))
        .collect();
    assert_eq!(parent_span_of(&last[0], TRACE), b_send.span_id);
    assert_eq!(
        header(&last[0], "correlation-id").as_deref(),
        Some("corr-1")
    );
    assert_eq!(header(&last[0], "causation-id"), Some(mid_id));
    assert!(
        chain.iter().all(|s| s.status_code != 2),
        "no failure in the chain"
    );

    // The failed event: the consumer span says why, the dead letter
    // carries the context of the span that sent it.
    let failed: Vec<ReceivedSpan> = spans
        .iter()
        .filter(|s| s.trace_id == fail_trace)
        .cloned()
        .collect();
    let f = find(&failed, &format!("process {first}"), "b7ad6b7169203331");
    assert_eq!(f.status_code, 2, "error status: {f:#?}");
    assert_eq!(f.attributes["error.type"], "fatal");
    assert!(
        f.status_message.starts_with("fatal: "),
        "{}",
        f.status_message
    );
    let dl_send = find(&failed, &format!("send {first}.dlq"), &f.span_id);
    assert_eq!(dl_send.attributes["weir.dead_letter.reason"], "fatal");
    let dlq = read_all(&format!("{first}.dlq"))?;
    assert_eq!(parent_span_of(&dlq[0], fail_trace), dl_send.span_id);

    // The retried event: one call span per attempt under one consumer span,
    // the first failed as retriable, and a retry event between them.
    let retried: Vec<ReceivedSpan> = spans
        .iter()
        .filter(|s| s.trace_id == retry_trace)
        .cloned()
        .collect();
    let r = find(&retried, &format!("process {first}"), "2222222222222222");
    assert!(r.events.iter().any(|e| e == "retry"), "{r:#?}");
    assert_eq!(r.status_code, 0, "it succeeded in the end");
    let mut calls: Vec<(String, i32)> = retried
        .iter()
        .filter(|s| s.name == "call hop-a" && s.parent_span_id == r.span_id)
        .map(|s| (s.attributes["weir.attempt"].clone(), s.status_code))
        .collect();
    calls.sort();
    assert_eq!(calls, [("1".to_string(), 2), ("2".to_string(), 0)]);

    // Log lines about an event name its trace, id, handler and position;
    // the handler's own log lines too.
    let dead = log
        .iter()
        .find(|l| l.contains("event dead-lettered"))
        .expect("a dead-letter log line");
    for field in [
        format!("trace_id={fail_trace}"),
        "event_id=evt-2".into(),
        "correlation_id=corr-2".into(),
        "handler=hop-a".into(),
        format!("topic={first}"),
        "partition=0".into(),
        "offset=1".into(),
    ] {
        assert!(dead.contains(&field), "{field} missing in {dead}");
    }
    let own = log
        .iter()
        .find(|l| l.contains("weir::handler") && l.contains("fails on attempt 1"))
        .expect("the handler's own log line");
    for field in [
        format!("trace_id={retry_trace}"),
        "event_id=evt-3".into(),
        "hop-a".into(),
        "offset=2".into(),
    ] {
        assert!(own.contains(&field), "{field} missing in {own}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_a_known_workload_exactly() -> anyhow::Result<()> {
    const OK: usize = 40;
    const FATAL: usize = 7;
    const DUPLICATES: usize = 5;
    let input = unique("metrics-in");
    let group = unique("metrics-group");
    create_topic(&input, 2).await?;
    create_topic(&format!("{input}.out"), 2).await?;
    // JSON logs this time.
    let mut weir = Weir::start_json(&config_toml(
        &group,
        &[HandlerSpec::new("counted", "fail-on-marker", &input)],
    ))?;
    let addr = weir.http_addr().await?;

    let ok: Vec<In> = (0..OK)
        .map(|i| In::envelope(&format!("k{i}"), &format!("ok-{i}"), "c", "t", json!(i)))
        .collect();
    let fatal: Vec<In> = (0..FATAL)
        .map(|i| {
            In::envelope(
                &format!("f{i}"),
                &format!("bad-{i}"),
                "c",
                "t",
                json!("FAIL"),
            )
        })
        .collect();
    // The same events again (same ids and keys): skipped as duplicates.
    let again: Vec<In> = ok[..DUPLICATES].to_vec();
    produce(&input, &[ok, fatal, again].concat()).await?;
    await_committed_to_end(&group, &input, 2, Duration::from_secs(60)).await?;

    let h = [("handler", "counted")];
    let scrape = Scrape::fetch(&addr).await?;
    let count = |name: &str, extra: &[(&str, &str)]| {
        let labels: Vec<(&str, &str)> = h.iter().chain(extra).copied().collect();
        scrape.value(name, &labels).unwrap_or(0.0) as usize
    };
    let t = &scrape.text;
    assert_eq!(count("weir_events_handled_total", &[]), OK, "{t}");
    assert_eq!(
        count("weir_events_failed_total", &[("class", "fatal")]),
        FATAL,
        "{t}"
    );
    assert_eq!(count("weir_events_failed_total", &[]), FATAL, "{t}");
    assert_eq!(count("weir_events_dead_lettered_total", &[]), FATAL, "{t}");
    assert_eq!(
        count("weir_duplicates_skipped_total", &[]),
        DUPLICATES,
        "{t}"
    );
    assert_eq!(count("weir_outputs_published_total", &[]), OK, "{t}");
    assert_eq!(count("weir_events_retried_total", &[]), 0, "{t}");
    assert_eq!(
        count("weir_handling_duration_seconds_count", &[("outcome", "ok")]),
        OK,
        "{t}"
    );
    assert_eq!(
        count(
            "weir_handling_duration_seconds_count",
            &[("outcome", "failed")]
        ),
        FATAL,
        "{t}"
    );
    assert_eq!(
        count(
            "weir_handling_duration_seconds_bucket",
            &[("outcome", "ok"), ("le", "+Inf")]
        ),
        OK,
        "{t}"
    );
    assert!(count("weir_fuel_consumed_total", &[]) > 0, "{t}");
    let info = scrape.series("weir_handler_info");
    assert_eq!(info.len(), 1, "{t}");
    assert_eq!((info[0].0["handler"].as_str(), info[0].1), ("counted", 1.0));
    assert_eq!(info[0].0["version"].len(), 12, "the component digest: {t}");
    assert_eq!(scrape.value("weir_produce_errors_total", &[]), Some(0.0));

    // Lag is refreshed from the client's statistics: it reaches 0 on
    // both partitions once the commits are seen.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = Scrape::fetch(&addr).await?;
        let lag = s.series("weir_consumer_lag");
        let caught_up = lag.len() == 2
            && lag.iter().all(|(l, v)| l["topic"] == input && *v == 0.0)
            && s.value("weir_events_in_flight", &[]) == Some(0.0)
            && s.value("weir_paused_partitions", &[]) == Some(0.0);
        if caught_up {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "lag did not reach 0:\n{}",
            s.text
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, log) = weir.stop(Duration::from_secs(30)).await?;
    assert!(status.success());
    // Every line is a JSON object; those about an event name it.
    let lines: Vec<serde_json::Value> = log
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let dead: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "event dead-lettered")
        .collect();
    assert_eq!(dead.len(), FATAL);
    for l in dead {
        let f = &l["fields"];
        assert!(f["event_id"].as_str().unwrap().starts_with("bad-"), "{l}");
        assert_eq!(f["handler"], "counted", "{l}");
        assert_eq!(f["topic"], input.as_str(), "{l}");
        assert_eq!(f["kind"], "fatal", "{l}");
        assert!(f["partition"].is_u64() && f["offset"].is_u64(), "{l}");
        assert!(
            f["trace_id"].is_string() && f["correlation_id"] == "c",
            "{l}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn sampling_follows_the_parent_and_the_ratio() -> anyhow::Result<()> {
    let input = unique("sampling-in");
    let output = format!("{input}.out");
    let group = unique("sampling-group");
    create_topic(&input, 1).await?;
    create_topic(&output, 1).await?;
    let receiver = OtlpReceiver::start().await?;
    // Ratio 0: new traces are not recorded; a sampled parent still is.
    let config = format!(
        "{}\n[tracing]\notlp_endpoint = {:?}\nsample_ratio = 0.0\nexport_interval_ms = 100\n",
        config_toml(&group, &[HandlerSpec::new("echo", "echo", &input)]),
        receiver.endpoint
    );
    let weir = Weir::start(&config)?;
    let fresh = In::envelope("k", "no-context", "c1", "t", json!(1));
    let mut traced = In::envelope("k", "sampled", "c2", "t", json!(2));
    traced.headers.push((
        "traceparent".into(),
        format!("00-{TRACE}-{TEST_SPAN}-01").into_bytes(),
    ));
    let mut unsampled = In::envelope("k", "not-sampled", "c3", "t", json!(3));
    unsampled.headers.push((
        "traceparent".into(),
        "00-99999999999999999999999999999999-8888888888888888-00".into(),
    ));
    produce(&input, &[fresh, traced, unsampled]).await?;
    await_records(&output, 1, 3, Duration::from_secs(60)).await?;
    let (status, _) = weir.stop(Duration::from_secs(30)).await?;
    assert!(status.success());

    let out = read_all(&output)?;
    let tp = |i: usize| header(&out[i], "traceparent").unwrap_or_default();
    // The event without context started a trace of its own, not sampled:
    // its context is passed on with the flag off.
    let (fresh_tp, traced_tp, unsampled_tp) = (tp(0), tp(1), tp(2));
    assert!(fresh_tp.ends_with("-00"), "{fresh_tp}");
    assert!(!fresh_tp.contains(TRACE), "{fresh_tp}");
    assert!(
        traced_tp.starts_with(&format!("00-{TRACE}-")) && traced_tp.ends_with("-01"),
        "{traced_tp}"
    );
    assert!(
        unsampled_tp.starts_with("00-99999999999999999999999999999999-")
            && unsampled_tp.ends_with("-00"),
        "{unsampled_tp}"
    );
    let spans = receiver.spans();
    assert!(!spans.is_empty());
    assert!(
        spans.iter().all(|s| s.trace_id == TRACE),
        "only the sampled parent's trace is exported: {spans:#?}"
    );
    find(&spans, &format!("process {input}"), TEST_SPAN);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn retries_through_the_retry_topic_stay_in_the_trace() -> anyhow::Result<()> {
    let input = unique("trace-retry");
    let output = format!("{input}.out");
    let group = unique("trace-retry-group");
    for t in [&input, &output, &format!("{input}.retry")] {
        create_topic(t, 1).await?;
    }
    let receiver = OtlpReceiver::start().await?;
    let config = format!(
        "{}\n[tracing]\notlp_endpoint = {:?}\nexport_interval_ms = 100\n",
        config_toml(
            &group,
            &[HandlerSpec::new("flaky", "fail-on-marker", &input)
                .config("succeed_on_attempt", "2")
                .extra("retry_mode = \"topic\"\ninitial_backoff_ms = 10")],
        ),
        receiver.endpoint
    );
    let weir = Weir::start(&config)?;
    let mut event = In::envelope("k", "evt-r", "corr-r", "t", json!("RETRY"));
    event.headers.push((
        "traceparent".into(),
        format!("00-{TRACE}-{TEST_SPAN}-01").into_bytes(),
    ));
    produce(&input, &[event]).await?;
    await_records(&output, 1, 1, Duration::from_secs(60)).await?;
    let (status, _) = weir.stop(Duration::from_secs(30)).await?;
    assert!(status.success());

    let spans = receiver.spans();
    // Attempt 1 fails and sends the event to the retry topic...
    let first = find(&spans, &format!("process {input}"), TEST_SPAN);
    assert!(
        first.events.iter().any(|e| e == "retry scheduled"),
        "{first:#?}"
    );
    let to_retry = find(&spans, &format!("send {input}.retry"), &first.span_id);
    // ...where attempt 2 picks it up, in the same trace, and succeeds.
    let second = find(&spans, &format!("process {input}"), &to_retry.span_id);
    assert_eq!(second.trace_id, TRACE);
    let call = find(&spans, "call flaky", &second.span_id);
    assert_eq!(call.attributes["weir.attempt"], "2");
    let send = find(&spans, &format!("send {output}"), &second.span_id);
    let out = read_all(&output)?;
    assert_eq!(parent_span_of(&out[0], TRACE), send.span_id);
    assert_eq!(header(&out[0], "correlation-id").as_deref(), Some("corr-r"));
    Ok(())
}
