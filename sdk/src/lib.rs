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

/// Content type of JSON payloads and envelopes.
pub const JSON: &str = "application/json";
/// Content type of MessagePack payloads and envelopes.
pub const MSGPACK: &str = "application/msgpack";

pub use error::{HandlerError, HandlerResult, ResultExt};
pub use event::{Event, Header};
pub use output::Output;

mod error;
mod event;
mod output;

/// Reads a value of this handler's `config` table in the runtime config
/// (`[handler.config]` in `weir.toml`); `None` when the key is not set.
///
/// A handler's config does not change while its instance lives (a reload,
/// deploy or rollback that changes it starts new instances), so each key
/// is asked of the runtime once per instance and its answer kept: reading
/// it on every event costs no call to the host. That holds for keys that
/// are not set too, for the first 32 such keys asked (so keys made from
/// event data cannot grow the instance's memory without bound); later
/// unset keys are asked each time.
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
        /// Keys that are not set whose answer is kept, per instance.
        const CONFIG_UNSET_KEPT: usize = 32;
        thread_local! {
            static KNOWN: std::cell::RefCell<std::collections::HashMap<String, Option<String>>> =
                Default::default();
            static UNSET_KEPT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
        }
        KNOWN.with(|known| {
            if let Some(value) = known.borrow().get(key) {
                return value.clone();
            }
            let value = __bindings::weir::plugin::host::config(key);
            if value.is_some() || UNSET_KEPT.get() < CONFIG_UNSET_KEPT {
                if value.is_none() {
                    UNSET_KEPT.set(UNSET_KEPT.get() + 1);
                }
                known.borrow_mut().insert(key.to_owned(), value.clone());
            }
            value
        })
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
