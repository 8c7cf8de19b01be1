use super::*;

const MINIMAL: &str = r#"
    [kafka]
    brokers = "127.0.0.1:9092"
    group_id = "g"

    [[handler]]
    name = "h"
    wasm = "h.wasm"
    topics = ["in"]
"#;

#[test]
fn minimal_config_gets_defaults() {
    let c = Config::parse(MINIMAL).unwrap();
    assert_eq!(c.handlers[0].max_attempts, 3);
    assert_eq!(c.pipeline.max_in_flight_per_partition, 20_000);
    assert_eq!(c.pipeline.max_in_flight_total, 80_000);
    assert_eq!(c.kafka.auto_offset_reset, "earliest");
}

#[test]
fn unknown_key_is_named() {
    let text = MINIMAL.replace("group_id = \"g\"", "group_id = \"g\"\nbrokres = \"x\"");
    let err = Config::parse(&text).unwrap_err().to_string();
    assert!(err.contains("brokres"), "{err}");
}

#[test]
fn unknown_handler_key_is_named() {
    let text = format!("{MINIMAL}\nfuel = 3\n");
    let err = Config::parse(&text).unwrap_err().to_string();
    assert!(err.contains("fuel"), "{err}");
}

#[test]
fn topic_patterns_are_refused() {
    let c = Config::parse(&MINIMAL.replace("[\"in\"]", "[\"^in.*\"]")).unwrap();
    let err = c.validate().unwrap_err().to_string();
    assert!(err.contains("pattern"), "{err}");
}

#[test]
fn missing_wasm_file_is_named() {
    let c = Config::parse(MINIMAL).unwrap();
    let err = c.validate().unwrap_err().to_string();
    assert!(err.contains("h.wasm") && err.contains("wasm"), "{err}");
}

/// A config whose files exist, with `pipeline` keys before it and
/// `handlers` (each a `[[handler]]` table's keys after its file) after.
fn checked(pipeline: &str, handlers: &[&str]) -> Result<Config> {
    // Any existing file passes the start-up check of `wasm`.
    let wasm = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let mut text = format!(
        "[kafka]\nbrokers = \"127.0.0.1:9092\"\ngroup_id = \"g\"\n[pipeline]\n{pipeline}\n"
    );
    for (i, keys) in handlers.iter().enumerate() {
        text.push_str(&format!(
            "[[handler]]\nname = \"h{i}\"\nwasm = {wasm:?}\n{keys}\n"
        ));
    }
    let config = Config::parse(&text)?;
    config.validate()?;
    Ok(config)
}

#[test]
fn a_consistent_config_passes() {
    checked("", &["topics = [\"in\"]"]).unwrap();
    checked(
        "drain_timeout_ms = 20000",
        &[
            "topics = [\"in\"]\nretry_mode = \"topic\"\ndeadline_ms = 20000",
            "topics = [\"in\", \"other\"]\ndead_letter_topic = \"all.dlq\"\n\
             initial_backoff_ms = 500\nmax_backoff_ms = 500\nmax_memories = 16",
        ],
    )
    .unwrap();
}

#[test]
fn a_dead_letter_topic_that_is_a_source_topic_is_refused() {
    let err = |handlers: &[&str]| checked("", handlers).unwrap_err().to_string();
    let e = err(&["topics = [\"in\"]\ndead_letter_topic = \"in\""]);
    assert!(
        e.contains("handler[0] (\"h0\").dead_letter_topic: \"in\" is also a source topic"),
        "{e}"
    );
    // Another handler's source, and the default `<source>.dlq`.
    let e = err(&["topics = [\"in\"]", "topics = [\"in.dlq\"]"]);
    assert!(
        e.contains("handler[0] (\"h0\").dead_letter_topic: \"in.dlq\" (the default")
            && e.contains("handler[1] (\"h1\").topics"),
        "{e}"
    );
}

#[test]
fn a_retry_topic_that_is_a_source_or_dead_letter_topic_is_refused() {
    let err = |handlers: &[&str]| checked("", handlers).unwrap_err().to_string();
    let e = err(&["topics = [\"in\"]\nretry_mode = \"topic\"\nretry_topic = \"in\""]);
    assert!(
        e.contains("handler[0] (\"h0\").retry_topic: \"in\" is also a source topic"),
        "{e}"
    );
    let e = err(&[
        "topics = [\"in\"]",
        "topics = [\"in.retry\"]",
        "topics = [\"x\"]\nretry_mode = \"topic\"\nretry_topic = \"in.retry\"",
    ]);
    assert!(e.contains("handler[2] (\"h2\").retry_topic"), "{e}");
    let e = err(&[
        "topics = [\"in\"]\ndead_letter_topic = \"bad\"",
        "topics = [\"x\"]\nretry_mode = \"topic\"\nretry_topic = \"bad\"",
    ]);
    assert!(
        e.contains("handler[1] (\"h1\").retry_topic: \"bad\" is also a dead-letter topic")
            && e.contains("handler[0] (\"h0\").dead_letter_topic"),
        "{e}"
    );
    // In blocking mode there is no retry topic to collide.
    checked(
        "",
        &[
            "topics = [\"in\"]\nretry_topic = \"in.dlq.x\"",
            "topics = [\"in.dlq.x\"]",
        ],
    )
    .unwrap();
}

#[test]
fn a_call_longer_than_the_drain_is_warned_of_naming_both_keys() {
    let c = checked(
        "drain_timeout_ms = 1000",
        &["topics = [\"in\"]\ndeadline_ms = 1001"],
    )
    .unwrap();
    let w = c.warnings().join("\n");
    assert!(
        w.contains(
            "handler[0] (\"h0\").deadline_ms (1001) is above pipeline.drain_timeout_ms (1000)"
        ),
        "{w}"
    );
}

#[test]
fn contradicting_numbers_are_refused_naming_both_keys() {
    let e = checked(
        "",
        &["topics = [\"in\"]\ninitial_backoff_ms = 200\nmax_backoff_ms = 100"],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("initial_backoff_ms (200)") && e.contains("max_backoff_ms (100)"),
        "{e}"
    );
    for n in [0, 17] {
        let e = checked("", &[&format!("topics = [\"in\"]\nmax_memories = {n}")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("handler[0] (\"h0\").max_memories"), "{e}");
    }
}

#[test]
fn state_limits_are_checked_naming_the_key() {
    let state = |keys: &str| {
        checked(
            "",
            &[&format!("topics = [\"in\"]\n[handler.state]\n{keys}")],
        )
        .unwrap_err()
        .to_string()
    };
    for bad in ["max_value_bytes = 0", "max_value_bytes = 600000"] {
        let e = state(bad);
        assert!(
            e.contains("handler[0] (\"h0\").state.max_value_bytes"),
            "{e}"
        );
    }
    let e = state("max_value_bytes = 1000\nmax_total_bytes = 999");
    assert!(e.contains("state.max_total_bytes (999)"), "{e}");
    assert!(state("ttl_secs = 0").contains("handler[0] (\"h0\").state.ttl_secs"));
    assert!(state("ttl_secs = 999999999999").contains("state.ttl_secs"));
    // 500,000 bytes fit the default 1 MB record.
    checked(
        "",
        &["topics = [\"in\"]\n[handler.state]\nmax_value_bytes = 500000"],
    )
    .unwrap();
    assert!(state("ttl = 5").contains("unknown field `ttl`"));
    checked(
        "",
        &["topics = [\"in\"]\n[handler.state]\nmax_value_bytes = 100\nttl_secs = 60"],
    )
    .unwrap();
}

#[test]
fn observability_settings_are_checked_naming_the_key() {
    let bad = |extra: &str| {
        let c = Config::parse(&format!("{extra}\n{MINIMAL}")).unwrap();
        c.validate().unwrap_err().to_string()
    };
    assert!(bad("[tracing]\nsample_ratio = 1.5").contains("tracing.sample_ratio"));
    assert!(bad("[tracing]\notlp_endpoint = \"https://x:4318\"").contains("tracing.otlp_endpoint"));
    assert!(bad("[metrics]\nlisten = \"localhost\"").contains("metrics.listen"));
}

#[test]
fn a_bare_otlp_endpoint_gets_the_traces_path() {
    let url = |e: &str| {
        TracingConfig {
            otlp_endpoint: Some(e.into()),
            ..Default::default()
        }
        .traces_url()
        .unwrap()
    };
    assert_eq!(url("http://c:4318"), "http://c:4318/v1/traces");
    assert_eq!(url("http://c:4318/"), "http://c:4318/v1/traces");
    assert_eq!(
        url("http://c:4318/custom/traces"),
        "http://c:4318/custom/traces"
    );
    assert!(TracingConfig::default().traces_url().is_none());
    // Without an endpoint in the file, the standard variable is used.
    std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4318/");
    let from_env = TracingConfig::default().traces_url();
    std::env::remove_var("OTEL_EXPORTER_OTLP_ENDPOINT");
    assert_eq!(from_env.as_deref(), Some("http://env:4318/v1/traces"));
    assert_eq!(url("http://file:4318"), "http://file:4318/v1/traces");
}
