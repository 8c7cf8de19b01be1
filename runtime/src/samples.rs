//! Sample event files (`events.jsonl`), for `weir try` and `weir dev
//! --handler`: one JSON object a line; blank lines and lines starting with
//! `#` or `//` are skipped.
//!
//! A line is either an envelope, published as a JSON-envelope record:
//!
//! ```json
//! {"eventType": "order.placed", "id": "e-1", "payload": {"order_id": "o-1"}}
//! ```
//!
//! or a record, when it has a `value`: `{"key": "c-1", "value": ...,
//! "headers": {"content-type": "application/json"}, "topic": "orders",
//! "partition": 0}` (all but `value` optional). A string `value` is the
//! record's bytes as they are; any other JSON value is its JSON text.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::envelope::Record;

/// Reads a sample file into records of `default_topic` (unless a line names
/// its topic), with offsets counting from 0 per topic and partition.
pub fn load(path: &Path, default_topic: &str) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read sample events {}", path.display()))?;
    parse(&text, default_topic).with_context(|| format!("in {}", path.display()))
}

/// Parses sample lines (see the module doc).
pub fn parse(text: &str, default_topic: &str) -> Result<Vec<Record>> {
    let mut records: Vec<Record> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_start_matches('\u{feff}').trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with("//") {
            continue;
        }
        let mut record =
            parse_line(line, default_topic).with_context(|| format!("line {}", i + 1))?;
        record.offset = records
            .iter()
            .filter(|r| r.topic == record.topic && r.partition == record.partition)
            .count() as i64;
        records.push(record);
    }
    if records.is_empty() {
        bail!("no events (one JSON object a line)");
    }
    Ok(records)
}

fn parse_line(line: &str, default_topic: &str) -> Result<Record> {
    let value: Value = serde_json::from_str(line).context("not a JSON object")?;
    let Value::Object(mut obj) = value else {
        bail!("not a JSON object");
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
    let Some(body) = obj.remove("value") else {
        // An envelope.
        return Ok(Record {
            topic: default_topic.to_owned(),
            partition: 0,
            offset: 0,
            timestamp_ms: now,
            key: None,
            value: serde_json::to_vec(&obj)?,
            headers: vec![("content-type".into(), b"application/json".to_vec())],
        });
    };
    let text = |v: &Value, what: &str| match v {
        Value::String(s) => Ok(s.clone()),
        other => bail!("{what} must be a string, not {other}"),
    };
    let mut headers = Vec::new();
    if let Some(h) = obj.get("headers") {
        let Value::Object(h) = h else {
            bail!("headers must be an object of strings");
        };
        for (k, v) in h {
            headers.push((k.clone(), text(v, "a header value")?.into_bytes()));
        }
    }
    Ok(Record {
        topic: match obj.get("topic") {
            Some(t) => text(t, "topic")?,
            None => default_topic.to_owned(),
        },
        partition: match obj.get("partition") {
            Some(p) => p
                .as_i64()
                .and_then(|p| i32::try_from(p).ok())
                .filter(|p| (0..1024).contains(p))
                .context("partition must be a number from 0 to 1023")?,
            None => 0,
        },
        offset: 0,
        timestamp_ms: now,
        key: match obj.get("key") {
            Some(Value::Null) | None => None,
            Some(k) => Some(text(k, "key")?.into_bytes()),
        },
        value: match body {
            Value::String(s) => s.into_bytes(),
            other => serde_json::to_vec(&other)?,
        },
        headers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_and_records_with_offsets_per_partition() {
        let text = r#"
# an envelope
{"eventType": "order.placed", "id": "e-1", "payload": {"n": 1}}
{"key": "k", "value": "raw bytes", "headers": {"h": "v"}}
{"topic": "other", "value": {"n": 2}}
"#;
        let r = parse(text, "orders").unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!((r[0].topic.as_str(), r[0].offset), ("orders", 0));
        assert_eq!(r[0].header("content-type"), Some(&b"application/json"[..]));
        assert_eq!((r[1].offset, r[1].value.as_slice()), (1, &b"raw bytes"[..]));
        assert_eq!(r[1].key.as_deref(), Some(&b"k"[..]));
        assert_eq!(r[1].header("h"), Some(&b"v"[..]));
        assert_eq!((r[2].topic.as_str(), r[2].offset), ("other", 0));
        assert_eq!(r[2].value, br#"{"n":2}"#);
    }

    #[test]
    fn a_null_key_is_no_key_and_a_bom_is_skipped() {
        let r = parse("\u{feff}{\"key\": null, \"value\": \"v\"}", "t").unwrap();
        assert_eq!(r[0].key, None);
        assert!(parse("{\"partition\": -1, \"value\": 1}", "t").is_err());
    }

    #[test]
    fn a_bad_line_is_named() {
        let err = parse("{\"value\": 1}\n[1]\n", "t").unwrap_err();
        assert!(format!("{err:#}").contains("line 2"), "{err:#}");
    }
}
