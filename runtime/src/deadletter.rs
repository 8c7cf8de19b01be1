//! Dead-letter records: the original record byte for byte, plus headers
//! that say what failed, where, and how often.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::envelope::{Produce, Record};
use crate::failure::FailureKind;

/// Header names added to a dead-lettered record.
pub mod header {
    pub const ERROR_KIND: &str = "weir-error-kind";
    pub const ERROR_MESSAGE: &str = "weir-error-message";
    pub const HANDLER: &str = "weir-handler";
    pub const HANDLER_VERSION: &str = "weir-handler-version";
    pub const ATTEMPTS: &str = "weir-attempts";
    pub const ORIGINAL_TOPIC: &str = "weir-original-topic";
    pub const ORIGINAL_PARTITION: &str = "weir-original-partition";
    pub const ORIGINAL_OFFSET: &str = "weir-original-offset";
    pub const ORIGINAL_TIMESTAMP: &str = "weir-original-timestamp";
    pub const CONSUMER_GROUP: &str = "weir-consumer-group";
    pub const FIRST_FAILURE_AT: &str = "weir-first-failure-at";
    pub const LAST_FAILURE_AT: &str = "weir-last-failure-at";
}

/// One failed event, with what is known about the failure.
#[derive(Debug, Clone)]
pub struct DeadLetter<'a> {
    pub record: &'a Record,
    pub kind: FailureKind,
    pub message: String,
    /// Handler name; for an undecodable record, every handler subscribed to it.
    pub handler: String,
    pub handler_version: String,
    pub attempts: u32,
    pub group_id: &'a str,
    pub first_failure: OffsetDateTime,
    pub last_failure: OffsetDateTime,
}

/// Adds the `weir-original-*` headers: where `record` was read from. Dead
/// letters and retry records both carry them.
pub fn add_origin(headers: &mut Vec<(String, Vec<u8>)>, record: &Record) {
    for (k, v) in [
        (header::ORIGINAL_TOPIC, record.topic.clone()),
        (header::ORIGINAL_PARTITION, record.partition.to_string()),
        (header::ORIGINAL_OFFSET, record.offset.to_string()),
        (header::ORIGINAL_TIMESTAMP, record.timestamp_ms.to_string()),
    ] {
        headers.push((k.to_owned(), v.into_bytes()));
    }
}

/// The default dead-letter topic of a source topic.
pub fn default_topic(source: &str) -> String {
    format!("{source}.dlq")
}

impl DeadLetter<'_> {
    /// The record to publish to `topic`.
    pub fn into_produce(self, topic: String) -> Produce {
        let fmt = |t: OffsetDateTime| t.format(&Rfc3339).unwrap_or_default();
        let mut headers = self.record.headers.clone();
        let mut add = |k: &str, v: String| headers.push((k.to_owned(), v.into_bytes()));
        add(header::ERROR_KIND, self.kind.name().to_owned());
        // A handler controls its error text; keep the record small.
        let mut message = self.message;
        if message.len() > 4096 {
            let mut cut = 4096;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        add(header::ERROR_MESSAGE, message);
        add(header::HANDLER, self.handler);
        add(header::HANDLER_VERSION, self.handler_version);
        add(header::ATTEMPTS, self.attempts.to_string());
        add_origin(&mut headers, self.record);
        let mut add = |k: &str, v: String| headers.push((k.to_owned(), v.into_bytes()));
        add(header::CONSUMER_GROUP, self.group_id.to_owned());
        add(header::FIRST_FAILURE_AT, fmt(self.first_failure));
        add(header::LAST_FAILURE_AT, fmt(self.last_failure));
        Produce {
            topic,
            key: self.record.key.clone(),
            value: self.record.value.clone(),
            headers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_original_and_names_the_failure() {
        let record = Record {
            topic: "orders".into(),
            partition: 3,
            offset: 17,
            timestamp_ms: 99,
            key: Some(b"k".to_vec()),
            value: b"\xff raw".to_vec(),
            headers: vec![("trace".into(), b"t".to_vec())],
        };
        let now = OffsetDateTime::now_utc();
        let p = DeadLetter {
            record: &record,
            kind: FailureKind::Fatal,
            message: "bad order".into(),
            handler: "enricher".into(),
            handler_version: "abc".into(),
            attempts: 1,
            group_id: "g",
            first_failure: now,
            last_failure: now,
        }
        .into_produce(default_topic("orders"));
        assert_eq!(p.topic, "orders.dlq");
        assert_eq!(p.key, record.key);
        assert_eq!(p.value, record.value);
        assert_eq!(p.headers[0], ("trace".to_string(), b"t".to_vec()));
        let h = |n: &str| {
            p.headers
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
                .unwrap()
        };
        assert_eq!(h(header::ERROR_KIND), "fatal");
        assert_eq!(h(header::ERROR_MESSAGE), "bad order");
        assert_eq!(h(header::ORIGINAL_OFFSET), "17");
        assert_eq!(h(header::ORIGINAL_PARTITION), "3");
        assert_eq!(h(header::CONSUMER_GROUP), "g");
    }
}
