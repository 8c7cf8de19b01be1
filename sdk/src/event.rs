//! The event a handler receives, and its headers.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{HandlerError, JSON, MSGPACK};

/// A Kafka header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Header name.
    pub key: String,
    /// Header value, byte for byte.
    pub value: Vec<u8>,
}

/// One event, as the runtime hands it to the handler.
///
/// In native tests, build one with [`Event::json`], [`Event::msgpack`] or
/// [`Event::raw`] and adjust it with the `with_*` methods.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The envelope `id`, else `topic/partition/offset`.
    pub id: String,
    /// The envelope `eventType`; empty for raw events.
    pub event_type: String,
    /// The envelope `schemaVersion`; empty for raw events.
    pub schema_version: String,
    /// The Kafka record key.
    pub key: Option<Vec<u8>>,
    /// The envelope payload (in `content_type`), or the raw record value.
    pub payload: Vec<u8>,
    /// [`JSON`], [`MSGPACK`], or a raw record's own content type.
    pub content_type: String,
    /// All Kafka headers of the record.
    pub headers: Vec<Header>,
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// Event time in milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// Correlation id shared by every event of one flow.
    pub correlation_id: String,
    /// Id of the event that caused this one.
    pub causation_id: Option<String>,
    /// 1 on the first attempt, counting up on retries.
    pub attempt: u32,
}

impl Event {
    /// A raw event (no envelope, empty content type), for native tests.
    ///
    /// ```
    /// let e = weir_sdk::Event::raw("audit", "hello");
    /// assert_eq!(e.payload, b"hello");
    /// assert_eq!(e.id, "audit/0/0");
    /// assert_eq!(e.attempt, 1);
    /// ```
    pub fn raw(topic: &str, payload: impl Into<Vec<u8>>) -> Event {
        Event {
            id: format!("{topic}/0/0"),
            event_type: String::new(),
            schema_version: String::new(),
            key: None,
            payload: payload.into(),
            content_type: String::new(),
            headers: Vec::new(),
            topic: topic.into(),
            partition: 0,
            offset: 0,
            timestamp_ms: 0,
            correlation_id: "test-correlation".into(),
            causation_id: None,
            attempt: 1,
        }
    }

    /// An event with a JSON envelope (`schemaVersion` "1"), for native
    /// tests. Fails (fatal) only if `payload` cannot be encoded as JSON.
    ///
    /// ```
    /// use weir_sdk::{Event, JSON};
    /// let e = Event::json("orders", "order.placed",
    ///     &serde_json::json!({"order_id": "o-1"})).unwrap();
    /// assert_eq!(e.content_type, JSON);
    /// assert_eq!(e.event_type, "order.placed");
    /// ```
    pub fn json<T: Serialize + ?Sized>(
        topic: &str,
        event_type: &str,
        payload: &T,
    ) -> Result<Event, HandlerError> {
        let payload = serde_json::to_vec(payload)
            .map_err(|e| HandlerError::fatal(format!("cannot encode test payload as JSON: {e}")))?;
        Ok(Event {
            event_type: event_type.into(),
            schema_version: "1".into(),
            content_type: JSON.into(),
            ..Event::raw(topic, payload)
        })
    }

    /// An event with a MessagePack envelope (`schemaVersion` "1"), for
    /// native tests. Structs are encoded as maps (field names included),
    /// as [`Output::msgpack`] does. Fails (fatal) only if `payload` cannot
    /// be encoded.
    ///
    /// ```
    /// use serde::{Deserialize, Serialize};
    /// use weir_sdk::{Event, MSGPACK};
    ///
    /// #[derive(Serialize, Deserialize, Debug, PartialEq)]
    /// struct Ping { n: u32 }
    ///
    /// let e = Event::msgpack("pings", "ping", &Ping { n: 7 }).unwrap();
    /// assert_eq!(e.content_type, MSGPACK);
    /// assert_eq!(e.decode::<Ping>().unwrap(), Ping { n: 7 });
    /// ```
    pub fn msgpack<T: Serialize + ?Sized>(
        topic: &str,
        event_type: &str,
        payload: &T,
    ) -> Result<Event, HandlerError> {
        let payload = rmp_serde::to_vec_named(payload).map_err(|e| {
            HandlerError::fatal(format!("cannot encode test payload as MessagePack: {e}"))
        })?;
        Ok(Event {
            event_type: event_type.into(),
            schema_version: "1".into(),
            content_type: MSGPACK.into(),
            ..Event::raw(topic, payload)
        })
    }

    /// Decodes the payload into `T` by its content type (MessagePack for
    /// [`MSGPACK`], JSON otherwise).
    ///
    /// A payload that does not decode is a [`HandlerError::Fatal`] naming
    /// the event id and the decoder's complaint: returned with `?`, the
    /// runtime sends the event to the dead-letter topic with error kind
    /// `fatal` (retrying cannot fix it), unless the handler maps the error
    /// to something else.
    ///
    /// ```
    /// use weir_sdk::{Event, HandlerError};
    ///
    /// #[derive(serde::Deserialize)]
    /// struct Order { order_id: String }
    ///
    /// let good = Event::json("orders", "order.placed",
    ///     &serde_json::json!({"order_id": "o-1"})).unwrap();
    /// assert_eq!(good.decode::<Order>().unwrap().order_id, "o-1");
    ///
    /// let bad = Event::json("orders", "order.placed", &serde_json::json!({"id": 1})).unwrap();
    /// assert!(matches!(bad.decode::<Order>(), Err(HandlerError::Fatal(m)) if m.contains("order_id")));
    /// ```
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        if self.content_type == MSGPACK {
            rmp_serde::from_slice(&self.payload).map_err(|e| {
                HandlerError::fatal(format!(
                    "payload of {} is not the expected MessagePack: {e}",
                    self.id
                ))
            })
        } else {
            serde_json::from_slice(&self.payload).map_err(|e| {
                HandlerError::fatal(format!(
                    "payload of {} is not the expected JSON: {e}",
                    self.id
                ))
            })
        }
    }

    /// The first header named `key`.
    ///
    /// ```
    /// let e = weir_sdk::Event::raw("t", "x").with_header("tenant", "acme");
    /// assert_eq!(e.header("tenant"), Some(&b"acme"[..]));
    /// assert_eq!(e.header("missing"), None);
    /// ```
    pub fn header(&self, key: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|h| h.key == key)
            .map(|h| h.value.as_slice())
    }

    /// Sets the record key (builder style, for tests).
    pub fn with_key(mut self, key: impl Into<Vec<u8>>) -> Event {
        self.key = Some(key.into());
        self
    }

    /// Adds a header (builder style, for tests).
    pub fn with_header(mut self, key: &str, value: impl Into<Vec<u8>>) -> Event {
        self.headers.push(Header {
            key: key.into(),
            value: value.into(),
        });
        self
    }

    /// Sets the attempt number (builder style, for tests of retry logic).
    ///
    /// ```
    /// let e = weir_sdk::Event::raw("t", "x").with_attempt(3);
    /// assert_eq!(e.attempt, 3);
    /// ```
    pub fn with_attempt(mut self, attempt: u32) -> Event {
        self.attempt = attempt;
        self
    }
}
