//! Write Weir event handlers in Rust.
//!
//! A handler is one function from an [`Event`] to the [`Output`]s it wants
//! published, registered with [`handler!`]. Build the crate for
//! `wasm32-wasip2` and the result is a WebAssembly component the `weir`
//! runtime loads.
//!
//! The crate ships the WIT contract it is built against (`wit/plugin.wit`,
//! world `weir:plugin/handler@0.1.1`), so a handler crate anywhere on disk
//! can depend on it by path or version:
//!
//! ```toml
//! [lib]
//! crate-type = ["cdylib", "rlib"]   # cdylib: the component; rlib: native tests
//!
//! [dependencies]
//! weir-sdk = { path = "/path/to/weir/sdk" }
//! serde = { version = "1", features = ["derive"] }
//!
//! [dev-dependencies]
//! serde_json = "1"
//! ```
//!
//! # Example
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use weir_sdk::{Event, HandlerError, HandlerResult, Output};
//!
//! #[derive(Deserialize)]
//! struct OrderPlaced { order_id: String, amount_cents: u64 }
//!
//! #[derive(Serialize)]
//! struct Receipt { order_id: String, total: String }
//!
//! fn handle(event: Event) -> HandlerResult {
//!     // A payload that does not decode is a fatal error: dead-lettered.
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
//! // Exports `handle` as the component's handler (on wasm32 only).
//! weir_sdk::handler!(handle);
//!
//! // Handler logic is plain Rust: test it natively with `cargo test`.
//! let event = Event::json("orders", "order.placed",
//!     &serde_json::json!({"order_id": "o-1", "amount_cents": 1250})).unwrap();
//! let outputs = handle(event).unwrap();
//! assert_eq!(outputs[0].topic, "receipts");
//! assert_eq!(outputs[0].key.as_deref(), Some(&b"o-1"[..]));
//! ```
//!
//! # Delivery semantics
//!
//! The runtime calls the handler once per event and attempt, in partition
//! order. Outputs are published only when the handler returns `Ok`, after
//! which the event counts as handled; an `Err(HandlerError::Retriable)` is
//! called again later with `attempt` increased (and dead-lettered as
//! `retries-exhausted` after the handler's `max_attempts`), an
//! `Err(HandlerError::Fatal)` sends the event to the dead-letter topic
//! with error kind `fatal`. Events are delivered at least once, so a
//! handler should be a function of its event.
//!
//! # Errors and `?`
//!
//! [`HandlerError`] converts from the errors a handler typically meets, so
//! `?` works on them. Each becomes [`HandlerError::Fatal`]: a malformed
//! payload, or one that cannot be encoded, will not get better on retry.
//!
//! | error | becomes |
//! |---|---|
//! | [`serde_json::Error`] | `Fatal("JSON: …")` |
//! | [`rmp_serde::decode::Error`] | `Fatal("MessagePack decode: …")` |
//! | [`rmp_serde::encode::Error`] | `Fatal("MessagePack encode: …")` |
//! | `anyhow::Error` (feature `anyhow`, on by default) | `Fatal` with the error and its causes (`outer: inner`) |
//!
//! Any other error (anything that implements `Display`) is marked with
//! [`ResultExt::fatal`] or [`ResultExt::retriable`], or built with
//! [`HandlerError::fatal`] / [`HandlerError::retriable`]:
//!
//! ```
//! use weir_sdk::{Event, HandlerError, HandlerResult, ResultExt};
//!
//! fn handle(event: Event) -> HandlerResult {
//!     let limit: u64 = weir_sdk::config("limit").unwrap_or("10".into())
//!         .parse().fatal()?;                       // a bad config stays bad
//!     let value: serde_json::Value = serde_json::from_slice(&event.payload)?; // fatal
//!     let _ = (limit, value);
//!     call_inventory().retriable()?;               // may work next time
//!     Ok(vec![])
//! }
//! # fn call_inventory() -> Result<(), std::io::Error> { Ok(()) }
//! # assert!(handle(Event::raw("t", "{}")).is_ok());
//! # assert!(matches!(handle(Event::raw("t", "{")), Err(HandlerError::Fatal(_))));
//! ```
//!
//! A failed [`Event::decode`] is a fatal error too; to treat it otherwise,
//! map it (`event.decode().map_err(..)`).
//!
//! # Testing natively
//!
//! Natively, [`handler!`] expands to nothing and the host functions work
//! from thread-local state that the [`testing`] module sets and reads:
//! [`config`] returns what [`testing::with_config`] or
//! [`testing::set_config`] set, and [`log`] lines are captured for
//! [`testing::logs`] (and printed to stderr). The test harness runs each
//! test on its own thread, so tests do not see each other's config or logs.
//!
//! # Features
//!
//! - `anyhow` (default): `impl From<anyhow::Error> for HandlerError`.
#![deny(missing_docs)]

// Lets the generated bindings name this crate by its public path.
extern crate self as weir_sdk;

use std::fmt;

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

pub use error::{HandlerError, HandlerResult, ResultExt};
pub use output::Output;

mod error;
mod output;

/// Reads a value of this handler's `config` table in the runtime config
/// (`[handler.config]` in `weir.toml`); `None` when the key is not set.
///
/// Natively (in tests) the values come from [`testing::with_config`] or
/// [`testing::set_config`].
///
/// ```
/// let topic = weir_sdk::config("output_topic").unwrap_or_else(|| "receipts".into());
/// assert_eq!(topic, "receipts");
/// ```
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

/// Writes to the runtime's log, tagged with the handler's name (target
/// `weir::handler`). The runtime rate-limits these lines per instance.
///
/// Natively, lines go to stderr and are captured for [`testing::logs`].
///
/// ```
/// weir_sdk::log::info("starting");
/// weir_sdk::log::warn(&format!("attempt {}", 2));
/// ```
pub mod log;

pub mod state;

/// Native test support: set the handler's config, read what it logged,
/// run it with its state.
///
/// State is per thread. The test harness runs each test on its own thread,
/// so tests do not see each other's config or log lines; a handler that
/// spawns threads logs and reads config on those threads' own state.
///
/// ```
/// use weir_sdk::{log::Level, testing, Event, HandlerResult, Output};
///
/// fn handle(event: Event) -> HandlerResult {
///     let topic = weir_sdk::config("output_topic").unwrap_or("out".into());
///     weir_sdk::log::info(&format!("forwarding to {topic}"));
///     Ok(vec![Output::raw(&topic, event.payload)])
/// }
///
/// let outputs = testing::with_config(&[("output_topic", "copies")], || {
///     handle(Event::raw("in", "x"))
/// }).unwrap();
/// assert_eq!(outputs[0].topic, "copies");
/// assert_eq!(testing::logs(), vec![testing::LogLine {
///     level: Level::Info,
///     message: "forwarding to copies".into(),
/// }]);
/// // Outside `with_config` the previous config is back.
/// assert_eq!(handle(Event::raw("in", "x")).unwrap()[0].topic, "out");
/// ```
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod __bindings {
    wit_bindgen::generate!({
        // Relative to this crate (sdk/), which ships the WIT: builds anywhere.
        path: "wit",
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

/// Registers a `fn(Event) -> Result<Vec<Output>, HandlerError>` (a path to
/// it) as the component's handler. Use it once per crate, at the top level.
///
/// Built for `wasm32-wasip2`, it generates the component's export: it
/// implements the `handle` function of the `weir:plugin/handler` world
/// (`wit/plugin.wit`) by converting the runtime's event into an [`Event`],
/// calling the function, and converting its [`Output`]s or
/// [`HandlerError`] back. Built natively it expands to nothing, so the
/// function stays plain Rust that native tests call directly.
///
/// ```
/// use weir_sdk::{Event, HandlerResult, Output};
///
/// pub fn handle(event: Event) -> HandlerResult {
///     Ok(vec![Output::raw("copies", event.payload)])
/// }
///
/// weir_sdk::handler!(handle);
/// # assert_eq!(handle(Event::raw("in", "x")).unwrap()[0].payload, b"x");
/// ```
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

#[cfg(test)]
mod tests {
    /// The WIT shipped in the crate (`sdk/wit/plugin.wit`) must be the
    /// repository's contract (`wit/plugin.wit`), which the runtime is built
    /// against. Read at run time so that packaging the crate does not need
    /// the file outside it.
    #[test]
    fn shipped_wit_is_the_repository_wit() {
        // At run time (cargo sets it for tests): a test binary reused from
        // a build in another checkout would name that checkout.
        let dir = std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned());
        let shipped = std::fs::read_to_string(format!("{dir}/wit/plugin.wit"))
            .expect("read sdk/wit/plugin.wit");
        let repo = std::fs::read_to_string(format!("{dir}/../wit/plugin.wit"))
            .expect("read wit/plugin.wit (this test runs in the Weir repository)");
        assert!(
            shipped == repo,
            "sdk/wit/plugin.wit differs from wit/plugin.wit: copy it with \
             `cp wit/plugin.wit sdk/wit/plugin.wit`"
        );
    }

    #[test]
    fn with_config_restores_the_previous_config_after_a_panic() {
        crate::testing::set_config("k", "before");
        let r = std::panic::catch_unwind(|| {
            crate::testing::with_config(&[("k", "inside")], || {
                assert_eq!(crate::config("k").as_deref(), Some("inside"));
                panic!("handler panicked");
            })
        });
        assert!(r.is_err());
        assert_eq!(crate::config("k").as_deref(), Some("before"));
    }

    #[test]
    fn error_conversions_are_fatal() {
        let bytes = rmp_serde::to_vec(&"text").unwrap();
        let e: crate::HandlerError = rmp_serde::from_slice::<u32>(&bytes).unwrap_err().into();
        assert!(
            matches!(e, crate::HandlerError::Fatal(m) if m.starts_with("MessagePack decode: "))
        );
        let e: crate::HandlerError = serde_json::from_str::<u32>("x").unwrap_err().into();
        assert!(!e.is_retriable());
    }
}
