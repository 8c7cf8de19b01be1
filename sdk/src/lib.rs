//! Write Weir event handlers in Rust.
//!
//! A handler is one function from an [`Event`] to the [`Output`]s it wants
//! published, registered with [`handler!`]. Build the crate for
//! `wasm32-wasip2` and the result is a WebAssembly component the `weir`
//! runtime loads.
//!
//! # Delivery semantics
//!
//! The runtime calls the handler once per event and attempt, in partition
//! order. Outputs are published only when the handler returns `Ok`, after
//! which the event counts as handled; an `Err(HandlerError::Retriable)` is
//! called again later with `attempt` increased, an `Err(HandlerError::Fatal)`
//! sends the event to the dead-letter topic. Events are delivered at least
//! once, so a handler should be a function of its event.
//!
//! # Example
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use weir_sdk::{Event, HandlerError, Output};
//!
//! #[derive(Deserialize)]
//! struct OrderPlaced { order_id: String, amount_cents: u64 }
//!
//! #[derive(Serialize)]
//! struct Receipt { order_id: String, total: String }
//!
//! fn handle(event: Event) -> Result<Vec<Output>, HandlerError> {
//!     let order: OrderPlaced = event.decode()?;
//!     if order.amount_cents == 0 {
//!         return Err(HandlerError::fatal("an order must have an amount"));
//!     }
//!     let receipt = Receipt {
//!         order_id: order.order_id.clone(),
//!         total: format!("{:.2}", order.amount_cents as f64 / 100.0),
//!     };
//!     Ok(vec![Output::json("receipts", "receipt.issued", &receipt)?
//!         .with_key(order.order_id)])
//! }
//!
//! weir_sdk::handler!(handle);
//!
//! // Handler logic is plain Rust: test it natively with `cargo test`.
//! let event = Event::json("orders", "order.placed",
//!     &serde_json::json!({"order_id": "o-1", "amount_cents": 1250})).unwrap();
//! let outputs = handle(event).unwrap();
//! assert_eq!(outputs[0].topic, "receipts");
//! assert_eq!(outputs[0].key.as_deref(), Some(&b"o-1"[..]));
//! ```
#![deny(missing_docs)]

// Lets the generated bindings name this crate by its public path.
extern crate self as weir_sdk;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Content type of JSON payloads and envelopes.
pub const JSON: &str = "application/json";
/// Content type of MessagePack payloads and envelopes.
pub const MSGPACK: &str = "application/msgpack";

/// A Kafka header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Header name.
    pub key: String,
    /// Header value, byte for byte.
    pub value: Vec<u8>,
}

/// One event, as the runtime hands it to the handler.
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
    /// A raw event, for native tests.
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

    /// An event with a JSON envelope, for native tests.
    pub fn json<T: Serialize>(
        topic: &str,
        event_type: &str,
        payload: &T,
    ) -> Result<Event, HandlerError> {
        let payload = serde_json::to_vec(payload)
            .map_err(|e| HandlerError::fatal(format!("cannot encode test payload: {e}")))?;
        Ok(Event {
            event_type: event_type.into(),
            schema_version: "1".into(),
            content_type: JSON.into(),
            ..Event::raw(topic, payload)
        })
    }

    /// Decodes the payload into `T` by its content type (MessagePack for
    /// [`MSGPACK`], JSON otherwise). A payload that does not decode is a
    /// fatal error: retrying cannot fix it.
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
    pub fn header(&self, key: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|h| h.key == key)
            .map(|h| h.value.as_slice())
    }

    /// Sets the key (builder style, for tests).
    pub fn with_key(mut self, key: impl Into<Vec<u8>>) -> Event {
        self.key = Some(key.into());
        self
    }
}

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
    /// An event in a JSON envelope.
    pub fn json<T: Serialize>(
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

    /// An event in a MessagePack envelope.
    pub fn msgpack<T: Serialize>(
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

    /// A raw record: the payload is published as is.
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

/// How a handler failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerError {
    /// Transient (a dependency is down): the runtime calls again later.
    Retriable(String),
    /// Permanent (the event is wrong): the event goes to the dead-letter topic.
    Fatal(String),
}

impl HandlerError {
    /// A transient failure.
    pub fn retriable(message: impl Into<String>) -> HandlerError {
        HandlerError::Retriable(message.into())
    }
    /// A permanent failure.
    pub fn fatal(message: impl Into<String>) -> HandlerError {
        HandlerError::Fatal(message.into())
    }
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandlerError::Retriable(m) => write!(f, "retriable: {m}"),
            HandlerError::Fatal(m) => write!(f, "fatal: {m}"),
        }
    }
}

impl std::error::Error for HandlerError {}

/// What a handler returns.
pub type HandlerResult = Result<Vec<Output>, HandlerError>;

/// Reads a value of this handler's `config` table in the runtime config.
///
/// Natively (in tests) the values come from [`testing::set_config`].
pub fn config(key: &str) -> Option<String> {
    #[cfg(target_arch = "wasm32")]
    {
        __bindings::weir::plugin::host::config(key)
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        testing::CONFIG.with(|c| c.borrow().get(key).cloned())
    }
}

/// Writes to the runtime's log, tagged with the handler's name.
pub mod log {
    /// Log levels, from the most verbose.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Level {
        /// Very verbose.
        Trace,
        /// Diagnostic.
        Debug,
        /// Normal operation.
        Info,
        /// Something unexpected that was handled.
        Warn,
        /// Something failed.
        Error,
    }

    /// Logs `message` at `level`.
    pub fn log(level: Level, message: &str) {
        #[cfg(target_arch = "wasm32")]
        {
            use crate::__bindings::weir::plugin::host::{log, Level as L};
            let level = match level {
                Level::Trace => L::Trace,
                Level::Debug => L::Debug,
                Level::Info => L::Info,
                Level::Warn => L::Warn,
                Level::Error => L::Error,
            };
            log(level, message);
        }
        #[cfg(not(target_arch = "wasm32"))]
        eprintln!("[{level:?}] {message}");
    }
    /// Logs at trace level.
    pub fn trace(message: &str) {
        log(Level::Trace, message)
    }
    /// Logs at debug level.
    pub fn debug(message: &str) {
        log(Level::Debug, message)
    }
    /// Logs at info level.
    pub fn info(message: &str) {
        log(Level::Info, message)
    }
    /// Logs at warn level.
    pub fn warn(message: &str) {
        log(Level::Warn, message)
    }
    /// Logs at error level.
    pub fn error(message: &str) {
        log(Level::Error, message)
    }
}

/// Native test support.
#[cfg(not(target_arch = "wasm32"))]
pub mod testing {
    use std::cell::RefCell;
    use std::collections::HashMap;

    thread_local! {
        pub(crate) static CONFIG: RefCell<HashMap<String, String>> = RefCell::new(HashMap::new());
    }

    /// Sets a value that [`crate::config`] returns on this thread.
    pub fn set_config(key: &str, value: &str) {
        CONFIG.with(|c| c.borrow_mut().insert(key.into(), value.into()));
    }
}

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod __bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "handler",
        pub_export_macro: true,
        export_macro_name: "__export_handler",
        default_bindings_module: "weir_sdk::__bindings",
        runtime_path: "weir_sdk::__bindings::__rt",
    });
    pub use wit_bindgen::rt as __rt;

    use weir::plugin::types as wit;

    impl From<wit::Event> for crate::Event {
        fn from(e: wit::Event) -> Self {
            crate::Event {
                id: e.id,
                event_type: e.event_type,
                schema_version: e.schema_version,
                key: e.key,
                payload: e.payload,
                content_type: e.content_type,
                headers: e
                    .headers
                    .into_iter()
                    .map(|h| crate::Header {
                        key: h.key,
                        value: h.value,
                    })
                    .collect(),
                topic: e.topic,
                partition: e.partition,
                offset: e.offset,
                timestamp_ms: e.timestamp_ms,
                correlation_id: e.correlation_id,
                causation_id: e.causation_id,
                attempt: e.attempt,
            }
        }
    }

    impl From<crate::Output> for wit::Output {
        fn from(o: crate::Output) -> Self {
            wit::Output {
                topic: o.topic,
                key: o.key,
                event_type: o.event_type,
                schema_version: o.schema_version,
                content_type: o.content_type,
                payload: o.payload,
                headers: o
                    .headers
                    .into_iter()
                    .map(|h| wit::Header {
                        key: h.key,
                        value: h.value,
                    })
                    .collect(),
            }
        }
    }

    /// Converts a handler's result to the WIT result.
    pub fn into_wit(
        r: Result<Vec<crate::Output>, crate::HandlerError>,
    ) -> Result<Vec<wit::Output>, wit::HandlerError> {
        match r {
            Ok(outputs) => Ok(outputs.into_iter().map(Into::into).collect()),
            Err(crate::HandlerError::Retriable(m)) => Err(wit::HandlerError::Retriable(m)),
            Err(crate::HandlerError::Fatal(m)) => Err(wit::HandlerError::Fatal(m)),
        }
    }
}

/// Registers `fn(Event) -> Result<Vec<Output>, HandlerError>` as the
/// component's handler. Outside WebAssembly it expands to nothing, so the
/// function stays testable natively.
#[macro_export]
macro_rules! handler {
    ($handle:path) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct WeirHandler;
            impl $crate::__bindings::Guest for WeirHandler {
                fn handle(
                    event: $crate::__bindings::weir::plugin::types::Event,
                ) -> ::core::result::Result<
                    ::std::vec::Vec<$crate::__bindings::weir::plugin::types::Output>,
                    $crate::__bindings::weir::plugin::types::HandlerError,
                > {
                    $crate::__bindings::into_wit($handle(event.into()))
                }
            }
    $crate::__bindings::__export_handler!(WeirHandler with_types_in $crate::__bindings);
        };
    };
}
