use super::*;

fn record(value: &[u8], content_type: Option<&str>) -> Record {
    Record {
        topic: "orders".into(),
        partition: 2,
        offset: 41,
        timestamp_ms: 1_000,
        key: Some(b"k".to_vec()),
        value: value.to_vec(),
        headers: content_type
            .map(|c| vec![("content-type".to_string(), c.as_bytes().to_vec())])
            .unwrap_or_default(),
    }
}

#[test]
fn json_envelope_is_decoded() {
    let v = br#"{"schemaVersion":"v2","eventType":"order.placed","id":"e-1",
        "timestamp":"2021-01-15T10:30:00Z","correlationId":"c-1","payload":{"a":1}}"#;
    let e = decode(&record(v, Some("application/json"))).unwrap();
    assert_eq!(e.id, "e-1");
    assert_eq!(e.event_type, "order.placed");
    assert_eq!(e.schema_version, "v2");
    assert_eq!(e.correlation_id, "c-1");
    assert_eq!(e.timestamp_ms, 1_610_706_600_000);
    assert_eq!(e.payload, br#"{"a":1}"#);
    assert_eq!(e.content_type, JSON);
}

#[test]
fn a_json_payload_passes_byte_for_byte_both_ways() {
    // Key order, spacing and escapes as the producer wrote them.
    let payload = r#"{ "z": 1,  "a": "caf\u00e9", "n": 1.50 }"#;
    let v = format!(r#"{{"eventType":"t","id":"e-1","payload":{payload}}}"#);
    let e = decode(&record(v.as_bytes(), Some("application/json"))).unwrap();
    assert_eq!(e.payload, payload.as_bytes());
    let out = Output {
        topic: "out".into(),
        event_type: "t.out".into(),
        content_type: JSON.into(),
        payload: e.payload.clone(),
        ..Default::default()
    };
    let p = encode_output(out, &e, 1_000_000).unwrap();
    let text = String::from_utf8(p.value).unwrap();
    assert!(
        text.ends_with(&format!(r#""payload":{payload}}}"#)),
        "{text}"
    );
    let bad = Output {
        topic: "out".into(),
        event_type: "t.out".into(),
        content_type: JSON.into(),
        payload: br#"{"a":1} trailing"#.to_vec(),
        ..Default::default()
    };
    let err = encode_output(bad, &e, 1_000_000).unwrap_err();
    assert!(err.contains("output payload is not JSON"), "{err}");
}

#[test]
fn envelope_without_id_gets_position_and_fresh_correlation() {
    let v = br#"{"eventType":"x","payload":null}"#;
    let e = decode(&record(v, Some("application/json; charset=utf-8"))).unwrap();
    assert_eq!(e.id, "orders/2/41");
    assert_eq!(e.correlation_id.len(), 36);
    assert_eq!(e.timestamp_ms, 1_000);
}

#[test]
fn msgpack_envelope_is_decoded() {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct E {
        event_type: &'static str,
        id: &'static str,
        payload: (u8, &'static str),
    }
    let v = rmp_serde::to_vec_named(&E {
        event_type: "t",
        id: "m-1",
        payload: (7, "x"),
    })
    .unwrap();
    let e = decode(&record(&v, Some("application/msgpack"))).unwrap();
    assert_eq!(e.id, "m-1");
    let payload: (u8, String) = rmp_serde::from_slice(&e.payload).unwrap();
    assert_eq!(payload, (7, "x".into()));
}

#[test]
fn malformed_envelope_names_the_reason() {
    let err = decode(&record(b"{not json", Some("application/json"))).unwrap_err();
    assert!(err.0.contains("malformed JSON envelope"), "{err}");
    let err = decode(&record(br#"{"payload":1}"#, Some("application/json"))).unwrap_err();
    assert!(err.0.contains("eventType"), "{err}");
}

#[test]
fn raw_record_passes_through() {
    let e = decode(&record(b"\x00\x01", None)).unwrap();
    assert_eq!(e.payload, b"\x00\x01");
    assert_eq!(e.id, "orders/2/41");
    assert_eq!(e.event_type, "");
}

#[test]
fn output_envelope_carries_correlation_and_causation() {
    let parent = decode(&record(
        br#"{"eventType":"a","id":"p-1","correlationId":"c-9","payload":1}"#,
        Some("application/json"),
    ))
    .unwrap();
    let p = encode_output(
        Output {
            topic: "out".into(),
            event_type: "b".into(),
            content_type: JSON.into(),
            payload: br#"{"x":true}"#.to_vec(),
            ..Default::default()
        },
        &parent,
        1 << 20,
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&p.value).unwrap();
    assert_eq!(v["correlationId"], "c-9");
    assert_eq!(v["causationId"], "p-1");
    assert_eq!(v["eventType"], "b");
    assert_eq!(v["payload"]["x"], true);
    let h = |n: &str| {
        p.headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
    };
    assert_eq!(h("correlation-id").as_deref(), Some("c-9"));
    assert_eq!(h("causation-id").as_deref(), Some("p-1"));
    assert_eq!(h("event-id").unwrap(), v["id"]);
}

#[test]
fn output_with_bad_json_is_refused() {
    let parent = decode(&record(b"raw", None)).unwrap();
    let err = encode_output(
        Output {
            topic: "out".into(),
            event_type: "b".into(),
            content_type: JSON.into(),
            payload: b"{".to_vec(),
            ..Default::default()
        },
        &parent,
        1 << 20,
    )
    .unwrap_err();
    assert!(err.contains("not JSON"));
    let err = encode_output(
        Output {
            topic: "bad topic!".into(),
            ..Default::default()
        },
        &parent,
        1 << 20,
    )
    .unwrap_err();
    assert!(err.contains("not a legal Kafka topic name"), "{err}");
    let err = encode_output(
        Output {
            topic: "big".into(),
            payload: vec![0; 2000],
            ..Default::default()
        },
        &parent,
        1000,
    )
    .unwrap_err();
    assert!(err.contains("over the 1000 bytes"), "{err}");
    // Headers count too: a small value with large headers is refused.
    let err = encode_output(
        Output {
            topic: "big".into(),
            payload: vec![0; 10],
            headers: vec![("h".into(), vec![b'x'; 2000])],
            ..Default::default()
        },
        &parent,
        2000,
    )
    .unwrap_err();
    assert!(err.contains("with its envelope, headers"), "{err}");
}

#[test]
fn ids_versions_and_timestamps_may_be_numbers() {
    let v =
        br#"{"schemaVersion":2,"eventType":"t","id":12345,"timestamp":1610706600000,"payload":1}"#;
    let e = decode(&record(v, Some("application/json"))).unwrap();
    assert_eq!(e.schema_version, "2");
    assert_eq!(e.id, "12345");
    assert_eq!(e.timestamp_ms, 1_610_706_600_000);
    // Past i64 an id is kept whole: two such ids stay two events.
    let v = br#"{"schemaVersion":1.5,"eventType":"t","id":18446744073709551615,"timestamp":-5,"payload":1}"#;
    let e = decode(&record(v, Some("application/json"))).unwrap();
    assert_eq!(e.id, "18446744073709551615");
    assert_eq!(e.schema_version, "1.5");
    assert_eq!(e.timestamp_ms, -5);
    let v = br#"{"eventType":"t","id":"e","timestamp":18446744073709551615,"payload":1}"#;
    let err = decode(&record(v, Some("application/json"))).unwrap_err();
    assert!(err.0.contains("out of range"), "{err}");
    let v = br#"{"eventType":"t","id":true,"payload":1}"#;
    let err = decode(&record(v, Some("application/json"))).unwrap_err();
    assert!(err.0.contains("a string or a number"), "{err}");
    // MessagePack: numbers, and text as `bin`.
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct In<'a> {
        schema_version: u8,
        event_type: &'a str,
        #[serde(with = "serde_bytes")]
        id: &'a [u8],
        timestamp: u64,
        payload: u8,
    }
    let v = rmp_serde::to_vec_named(&In {
        schema_version: 3,
        event_type: "t",
        id: b"m-2",
        timestamp: 1_610_706_600_000,
        payload: 7,
    })
    .unwrap();
    let e = decode(&record(&v, Some("application/msgpack"))).unwrap();
    assert_eq!((e.schema_version.as_str(), e.id.as_str()), ("3", "m-2"));
    assert_eq!(e.timestamp_ms, 1_610_706_600_000);
}

#[test]
fn the_written_json_envelope_is_what_serde_writes() {
    for text in ["plain", "q\"uote\\", "ctl\u{1}\n\t", "café ☕ \u{2028}", ""] {
        let head = OutEnvelope {
            schema_version: text,
            event_type: text,
            id: "0b9c",
            timestamp: "2026-01-01T00:00:00Z".into(),
            correlation_id: text,
            causation_id: text,
            payload: (),
        };
        let payload = br#"{"a":[1,"x"]}"#;
        let raw: &serde_json::value::RawValue = serde_json::from_slice(payload).unwrap();
        let by_hand = json_envelope(&head, payload);
        let by_serde = serde_json::to_vec(&head.with(raw)).unwrap();
        assert_eq!(String::from_utf8(by_hand), String::from_utf8(by_serde));
    }
}

#[test]
fn a_new_json_payload_is_checked_and_written_without_surrounding_whitespace() {
    let v = br#"{"eventType":"t","id":"e-1","correlationId":"c \"1\"","payload":{}}"#;
    let e = decode(&record(v, Some("application/json"))).unwrap();
    let out = Output {
        topic: "out".into(),
        event_type: "t.\"quoted\"".into(),
        content_type: JSON.into(),
        payload: b"  [1, 2]\n".to_vec(),
        ..Default::default()
    };
    let p = encode_output(out, &e, 1_000_000).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&p.value).unwrap();
    assert_eq!(v["payload"], serde_json::json!([1, 2]));
    assert_eq!(v["eventType"], "t.\"quoted\"");
    assert_eq!(v["correlationId"], "c \"1\"");
    assert_eq!(v["schemaVersion"], "1");
    assert!(String::from_utf8(p.value)
        .unwrap()
        .ends_with(r#""payload":[1, 2]}"#));
}
