//! The handler's key-value state, kept by the runtime per handler and per
//! source partition (a call sees the state of its event's partition).
//!
//! Writes are buffered by the runtime: they become visible to the
//! partition's later events, and durable, only if the call returns `Ok`,
//! together with the event's idempotency mark (in exactly-once mode, in the
//! event's transaction). A failed or retried attempt sees the state as it
//! was before it. A value above the handler's `state.max_value_bytes`, or
//! writes that take its state above `state.max_total_bytes`, fail the call
//! as `state-limit` (dead-lettered, writes dropped).
//!
//! The typed helpers store values as JSON ([`get`], [`set`]) or
//! MessagePack ([`get_msgpack`], [`set_msgpack`]); the `_raw` ones take
//! bytes.
//!
//! Natively (in unit tests) the state is an in-memory map per thread:
//! [`crate::testing::call`] runs a handler the way the runtime does
//! (writes kept only when it returns `Ok`), and [`crate::testing::state`]
//! and [`crate::testing::clear_state`] look at and empty it.
//!
//! ```
//! use weir_sdk::{state, Event, HandlerResult, Output};
//!
//! fn handle(event: Event) -> HandlerResult {
//!     let key = String::from_utf8_lossy(event.key.as_deref().unwrap_or_default()).into_owned();
//!     let seen: u64 = state::get(&key)?.unwrap_or(0) + 1;
//!     state::set(&key, &seen)?;
//!     Ok(vec![Output::raw("counts", seen.to_string())])
//! }
//!
//! let e = || Event::raw("clicks", "x").with_key("user-1");
//! weir_sdk::testing::call(handle, e()).unwrap();
//! let out = weir_sdk::testing::call(handle, e()).unwrap();
//! assert_eq!(out[0].payload, b"2");
//! assert_eq!(state::get::<u64>("user-1").unwrap(), Some(2));
//! ```

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::HandlerError;

/// Entries one [`scan_raw`] returns at most.
pub const MAX_SCAN: u32 = 1000;

/// The bytes of `key`, if it has a value.
pub fn get_raw(key: &str) -> Option<Vec<u8>> {
    #[cfg(target_arch = "wasm32")]
    {
        crate::__bindings::weir::plugin::state::get(key)
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        crate::testing::STATE.with(|s| s.borrow().get(key).cloned())
    }
}

/// Sets `key` to `value`.
pub fn set_raw(key: &str, value: &[u8]) {
    #[cfg(target_arch = "wasm32")]
    {
        crate::__bindings::weir::plugin::state::set(key, value)
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        crate::testing::STATE.with(|s| s.borrow_mut().insert(key.to_owned(), value.to_vec()));
    }
}

/// Removes `key`.
pub fn delete(key: &str) {
    #[cfg(target_arch = "wasm32")]
    {
        crate::__bindings::weir::plugin::state::delete(key)
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        crate::testing::STATE.with(|s| s.borrow_mut().remove(key));
    }
}

/// Up to `limit` entries (at most [`MAX_SCAN`]) whose key starts with
/// `prefix`, in key order, after `start_after` when given (pass the last key
/// of a page to get the next).
pub fn scan_raw(prefix: &str, start_after: Option<&str>, limit: u32) -> Vec<(String, Vec<u8>)> {
    #[cfg(target_arch = "wasm32")]
    {
        crate::__bindings::weir::plugin::state::scan(prefix, start_after, limit)
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        crate::testing::STATE.with(|s| {
            s.borrow()
                .range(prefix.to_owned()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .filter(|(k, _)| start_after.is_none_or(|a| k.as_str() > a))
                .take(limit.min(MAX_SCAN) as usize)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
    }
}

fn undecodable(key: &str, e: impl std::fmt::Display) -> HandlerError {
    HandlerError::fatal(format!("state key {key:?} does not decode: {e}"))
}

/// The value of `key`, stored as JSON by [`set`]. A value that does not
/// decode is a fatal error.
pub fn get<T: DeserializeOwned>(key: &str) -> Result<Option<T>, HandlerError> {
    get_raw(key)
        .map(|v| serde_json::from_slice(&v).map_err(|e| undecodable(key, e)))
        .transpose()
}

/// Sets `key` to `value`, as JSON.
pub fn set<T: Serialize + ?Sized>(key: &str, value: &T) -> Result<(), HandlerError> {
    let bytes = serde_json::to_vec(value)
        .map_err(|e| HandlerError::fatal(format!("state key {key:?}: {e}")))?;
    set_raw(key, &bytes);
    Ok(())
}

/// The value of `key`, stored as MessagePack by [`set_msgpack`].
pub fn get_msgpack<T: DeserializeOwned>(key: &str) -> Result<Option<T>, HandlerError> {
    get_raw(key)
        .map(|v| rmp_serde::from_slice(&v).map_err(|e| undecodable(key, e)))
        .transpose()
}

/// Sets `key` to `value`, as MessagePack (smaller and faster than JSON).
pub fn set_msgpack<T: Serialize + ?Sized>(key: &str, value: &T) -> Result<(), HandlerError> {
    let bytes = rmp_serde::to_vec_named(value)
        .map_err(|e| HandlerError::fatal(format!("state key {key:?}: {e}")))?;
    set_raw(key, &bytes);
    Ok(())
}

/// Up to `limit` JSON values under `prefix`, in key order, after
/// `start_after` when given.
pub fn scan<T: DeserializeOwned>(
    prefix: &str,
    start_after: Option<&str>,
    limit: u32,
) -> Result<Vec<(String, T)>, HandlerError> {
    scan_raw(prefix, start_after, limit)
        .into_iter()
        .map(|(k, v)| {
            let t = serde_json::from_slice(&v).map_err(|e| undecodable(&k, e))?;
            Ok((k, t))
        })
        .collect()
}
