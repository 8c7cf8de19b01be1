//! The retry-topic protocol: a record sent to a handler's retry topic
//! stands for its original (position and headers) and carries its retry
//! state in `weir-retry-*` headers. Retry state is honoured only on the
//! topics Weir uses for retries; on any other topic those headers are
//! ordinary headers. A record is handled when it is due, without holding up
//! later records that are due sooner ([`DelayQueue`]), and each hop is
//! marked in the idempotency store so that it happens once ([`hop_id`]).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use time::OffsetDateTime;

use crate::deadletter;
use crate::envelope::{self, Produce, Record};

/// Headers of a record in a retry topic.
pub mod header {
    pub const HANDLER: &str = "weir-retry-handler";
    pub const ATTEMPT: &str = "weir-retry-attempt";
    pub const NOT_BEFORE: &str = "weir-retry-not-before";
}

/// Where a record read from a retry topic stands.
pub struct RetryInfo {
    pub handler: String,
    pub attempt: u32,
    pub not_before_ms: i64,
    pub first_failure: OffsetDateTime,
}

/// The record a retry-topic record stands for (original position, original
/// headers), and its retry state; None for an ordinary record.
pub fn take_retry(record: &Record) -> Option<(Record, RetryInfo)> {
    let text = |name: &str| {
        record
            .header(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    let handler = text(header::HANDLER)?;
    let info = RetryInfo {
        handler,
        attempt: text(header::ATTEMPT)?.parse().ok()?,
        not_before_ms: text(header::NOT_BEFORE)?.parse().ok()?,
        first_failure: text(deadletter::header::FIRST_FAILURE_AT)
            .and_then(|t| {
                OffsetDateTime::parse(&t, &time::format_description::well_known::Rfc3339).ok()
            })
            .unwrap_or_else(OffsetDateTime::now_utc),
    };
    let original = Record {
        topic: text(deadletter::header::ORIGINAL_TOPIC)?,
        partition: text(deadletter::header::ORIGINAL_PARTITION)?.parse().ok()?,
        offset: text(deadletter::header::ORIGINAL_OFFSET)?.parse().ok()?,
        timestamp_ms: text(deadletter::header::ORIGINAL_TIMESTAMP)?.parse().ok()?,
        key: record.key.clone(),
        value: record.value.clone(),
        headers: record
            .headers
            .iter()
            .filter(|(k, _)| !is_retry_state(k))
            .cloned()
            .collect(),
    };
    Some((original, info))
}

/// Whether a header is part of a retry record's state.
fn is_retry_state(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key.starts_with("weir-retry-")
        || key.starts_with("weir-original-")
        || key == deadletter::header::FIRST_FAILURE_AT
}

/// The record to send to a retry topic for `attempt` after `delay`. An
/// event without a correlation id got a fresh one (`correlation_id`); it is
/// kept as a header so that every attempt shares it.
#[allow(clippy::too_many_arguments)]
pub fn retry_record(
    record: &Record,
    correlation_id: &str,
    handler: &str,
    attempt: u32,
    delay: Duration,
    first_failure: OffsetDateTime,
    topic: String,
) -> Produce {
    let not_before = OffsetDateTime::now_utc().unix_timestamp() * 1000 + delay.as_millis() as i64;
    // Only Weir's own retry state: whatever the original carried under
    // these names is dropped, so it cannot steer the retry.
    let mut headers: Vec<(String, Vec<u8>)> = record
        .headers
        .iter()
        .filter(|(k, _)| !is_retry_state(k))
        .cloned()
        .collect();
    deadletter::add_origin(&mut headers, record);
    let mut add = |k: &str, v: String| headers.push((k.to_owned(), v.into_bytes()));
    if record.header(envelope::header::CORRELATION_ID).is_none() {
        add(envelope::header::CORRELATION_ID, correlation_id.to_owned());
    }
    add(header::HANDLER, handler.to_owned());
    add(header::ATTEMPT, attempt.to_string());
    add(header::NOT_BEFORE, not_before.to_string());
    add(
        deadletter::header::FIRST_FAILURE_AT,
        first_failure
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
    );
    Produce {
        topic,
        key: record.key.clone(),
        value: record.value.clone(),
        headers,
    }
}

/// The idempotency id of "attempt `attempt` of event `id` was handed on to
/// the retry topic": marked once the retry record is acknowledged, so that
/// a redelivery of the same attempt (after a crash) does not start a
/// second retry chain.
pub fn hop_id(id: &str, attempt: u32) -> String {
    format!("{id}#retry-hop:{attempt}")
}

/// Records waiting until they are due, soonest first; ties in arrival order.
pub struct DelayQueue<T> {
    heap: BinaryHeap<Reverse<(Instant, u64, Slot<T>)>>,
    seq: u64,
}

/// A heap entry ordered only by its key.
struct Slot<T>(T);

impl<T> PartialEq for Slot<T> {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl<T> Eq for Slot<T> {}
impl<T> PartialOrd for Slot<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Slot<T> {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}

impl<T> Default for DelayQueue<T> {
    fn default() -> Self {
        Self {
            heap: BinaryHeap::new(),
            seq: 0,
        }
    }
}

impl<T> DelayQueue<T> {
    pub fn push(&mut self, due: Instant, item: T) {
        self.seq += 1;
        self.heap.push(Reverse((due, self.seq, Slot(item))));
    }

    /// The soonest item if it is due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<T> {
        if self.heap.peek()?.0 .0 > now {
            return None;
        }
        self.heap.pop().map(|Reverse((_, _, Slot(item)))| item)
    }

    /// When the soonest item is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((due, _, _))| *due)
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

/// When a retry record is due, as an instant: its `not-before` time, but
/// never later than `cap` from now (the longest backoff of its handler), so
/// a wrong clock or a forged header cannot park it for long.
pub fn due_at(info: &RetryInfo, cap: Duration) -> Instant {
    let now_ms = OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
    let wait = (info.not_before_ms as i128 - now_ms).clamp(0, cap.as_millis() as i128);
    Instant::now() + Duration::from_millis(wait as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            topic: "orders".into(),
            partition: 2,
            offset: 40,
            timestamp_ms: 7,
            key: Some(b"k".to_vec()),
            value: b"v".to_vec(),
            headers: vec![
                ("content-type".into(), b"application/json".to_vec()),
                ("correlation-id".into(), b"c-1".to_vec()),
            ],
        }
    }

    #[test]
    fn a_retry_record_keeps_a_generated_correlation_id() {
        let mut r = record();
        r.headers.retain(|(k, _)| k != "correlation-id");
        let p = retry_record(
            &r,
            "fresh",
            "h",
            2,
            Duration::ZERO,
            OffsetDateTime::now_utc(),
            "orders.retry".into(),
        );
        let kept = p.headers.iter().find(|(k, _)| k == "correlation-id");
        assert_eq!(kept.map(|(_, v)| v.as_slice()), Some(&b"fresh"[..]));
    }

    #[test]
    fn a_retry_record_stands_for_its_original() {
        let first = OffsetDateTime::now_utc();
        let p = retry_record(
            &record(),
            "c-1",
            "h",
            3,
            Duration::from_millis(500),
            first,
            "orders.retry".into(),
        );
        assert_eq!(p.topic, "orders.retry");
        let (original, info) = take_retry(&consumed(p)).expect("a retry record");
        assert_eq!(original.topic, "orders");
        assert_eq!(
            (original.partition, original.offset, original.timestamp_ms),
            (2, 40, 7)
        );
        assert_eq!(
            original.headers,
            record().headers,
            "retry headers are stripped"
        );
        assert_eq!((info.handler.as_str(), info.attempt), ("h", 3));
        assert!(info.not_before_ms >= first.unix_timestamp() * 1000 + 500);
    }

    /// A retry record as read back from its retry topic.
    fn consumed(p: Produce) -> Record {
        Record {
            topic: p.topic,
            partition: 0,
            offset: 9,
            timestamp_ms: 8,
            key: p.key,
            value: p.value,
            headers: p.headers,
        }
    }

    #[test]
    fn forged_retry_headers_of_the_original_do_not_steer_its_retry() {
        let mut r = record();
        for (k, v) in [
            ("weir-retry-handler", "other"),
            ("Weir-Original-Topic", "elsewhere"),
            ("weir-original-offset", "999"),
        ] {
            r.headers.push((k.into(), v.as_bytes().to_vec()));
        }
        let p = retry_record(
            &r,
            "c-1",
            "h",
            2,
            Duration::ZERO,
            OffsetDateTime::now_utc(),
            "orders.retry".into(),
        );
        let (original, info) = take_retry(&consumed(p)).expect("a retry record");
        assert_eq!(info.handler, "h");
        assert_eq!((original.topic.as_str(), original.offset), ("orders", 40));
    }

    #[test]
    fn an_ordinary_record_is_not_a_retry() {
        assert!(take_retry(&record()).is_none());
    }

    #[test]
    fn later_due_records_do_not_wait_for_earlier_queued_ones() {
        let mut q = DelayQueue::default();
        let now = Instant::now();
        q.push(now + Duration::from_secs(60), "long");
        q.push(now, "short");
        q.push(now, "short-2");
        assert_eq!(q.pop_due(now), Some("short"));
        assert_eq!(q.pop_due(now), Some("short-2"));
        assert_eq!(q.pop_due(now), None, "the long one is not due");
        assert_eq!(q.next_due(), Some(now + Duration::from_secs(60)));
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn a_due_time_is_capped_by_the_longest_backoff() {
        let info = RetryInfo {
            handler: "h".into(),
            attempt: 2,
            not_before_ms: i64::MAX / 2,
            first_failure: OffsetDateTime::now_utc(),
        };
        let due = due_at(&info, Duration::from_millis(200));
        assert!(due <= Instant::now() + Duration::from_millis(200));
    }

    #[test]
    fn hops_of_different_attempts_have_different_ids() {
        assert_ne!(hop_id("e-1", 1), hop_id("e-1", 2));
        assert_ne!(hop_id("e-1", 1), "e-1");
    }
}
