//! What a handler publishes.

use serde::Serialize;

use crate::*;

/// An event to publish. The runtime adds a fresh id, the parent's
/// correlation id and the parent's id as causation id.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// Destination topic.
    pub topic: String,
    /// Record key; keyed records are partitioned like the Java client does.
    pub key: Option<Vec<u8>>,
    /// Envelope `eventType`; empty publishes the payload raw.
    pub event_type: String,
    /// Envelope `schemaVersion`; empty means "1".
    pub schema_version: String,
    /// [`JSON`] or [`MSGPACK`] for an envelope; anything else is raw.
    pub content_type: String,
    /// The payload bytes.
    pub payload: Vec<u8>,
    /// Extra headers.
    pub headers: Vec<Header>,
}

impl Output {
    /// An event in a JSON envelope. Fails (fatal) if `payload` cannot be
    /// encoded as JSON.
    ///
    /// ```
    /// let o = weir_sdk::Output::json("receipts", "receipt.issued",
    ///     &serde_json::json!({"order_id": "o-1"})).unwrap().with_key("o-1");
    /// assert_eq!(o.content_type, weir_sdk::JSON);
    /// assert_eq!(o.payload, br#"{"order_id":"o-1"}"#);
    /// ```
    pub fn json<T: Serialize + ?Sized>(
        topic: &str,
        event_type: &str,
        payload: &T,
    ) -> Result<Output, HandlerError> {
        let payload = serde_json::to_vec(payload)
            .map_err(|e| HandlerError::fatal(format!("cannot encode {event_type} as JSON: {e}")))?;
        Ok(Output {
            content_type: JSON.into(),
            event_type: event_type.into(),
            ..Output::raw(topic, payload)
        })
    }

    /// An event in a MessagePack envelope; structs are encoded as maps
    /// (field names included). Fails (fatal) if `payload` cannot be encoded.
    ///
    /// ```
    /// let o = weir_sdk::Output::msgpack("scores", "score.set",
    ///     &serde_json::json!({"score": 3})).unwrap();
    /// assert_eq!(o.content_type, weir_sdk::MSGPACK);
    /// ```
    pub fn msgpack<T: Serialize + ?Sized>(
        topic: &str,
        event_type: &str,
        payload: &T,
    ) -> Result<Output, HandlerError> {
        let payload = rmp_serde::to_vec_named(payload).map_err(|e| {
            HandlerError::fatal(format!("cannot encode {event_type} as MessagePack: {e}"))
        })?;
        Ok(Output {
            content_type: MSGPACK.into(),
            event_type: event_type.into(),
            ..Output::raw(topic, payload)
        })
    }

    /// A raw record: the payload is published as is, without an envelope.
    ///
    /// ```
    /// let o = weir_sdk::Output::raw("audit", "plain text").with_header("source", "me");
    /// assert_eq!(o.event_type, "");
    /// assert_eq!(o.headers[0].key, "source");
    /// ```
    pub fn raw(topic: &str, payload: impl Into<Vec<u8>>) -> Output {
        Output {
            topic: topic.into(),
            key: None,
            event_type: String::new(),
            schema_version: String::new(),
            content_type: String::new(),
            payload: payload.into(),
            headers: Vec::new(),
        }
    }

    /// Sets the record key.
    pub fn with_key(mut self, key: impl Into<Vec<u8>>) -> Output {
        self.key = Some(key.into());
        self
    }

    /// Adds a header.
    pub fn with_header(mut self, key: &str, value: impl Into<Vec<u8>>) -> Output {
        self.headers.push(Header {
            key: key.into(),
            value: value.into(),
        });
        self
    }

    /// Sets the envelope `schemaVersion`.
    pub fn with_schema_version(mut self, version: &str) -> Output {
        self.schema_version = version.into();
        self
    }
}
