//! State counter: counts the events of each record key in the handler's
//! state and publishes the new count (`{"key", "count", "id"}`) to the topic
//! named by `output_topic` (default `<topic>.counts`). Used by the
//! end-to-end tests and benchmarks of handler state.
//!
//! Payload markers (for tests): `fail-once` writes, then fails retriably on
//! its first attempt; `fatal` writes, then fails fatally (dead-lettered);
//! `big` writes a value of `big_bytes` bytes (config, default 100,000);
//! `grow` writes a new key of 1,000 bytes named after the event id. Config
//! `delay_ms` sleeps per event (a slow handler); `raw = "true"` skips JSON
//! and outputs: one get and one set of an 8-byte counter (the benchmark's
//! small value); with `stateless = "true"` as well, not even those (the
//! benchmark's baseline: the same module without state).

use serde::{Deserialize, Serialize};
use weir_sdk::{state, Event, HandlerError, HandlerResult, Output};

/// What is published for each event.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Count {
    pub key: String,
    pub count: u64,
    pub id: String,
}

/// Counts one event.
pub fn handle(event: Event) -> HandlerResult {
    let key = String::from_utf8_lossy(event.key.as_deref().unwrap_or(b"-")).into_owned();
    if let Some(ms) = weir_sdk::config("delay_ms").and_then(|v| v.parse().ok()) {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    if weir_sdk::config("raw").as_deref() == Some("true") {
        if weir_sdk::config("stateless").as_deref() == Some("true") {
            return Ok(Vec::new());
        }
        let n = state::get_raw(&key)
            .and_then(|v| v.try_into().ok())
            .map_or(0, u64::from_le_bytes)
            + 1;
        state::set_raw(&key, &n.to_le_bytes());
        return Ok(Vec::new());
    }
    let count: u64 = state::get(&key)?.unwrap_or(0) + 1;
    state::set(&key, &count)?;
    match event.payload.as_slice() {
        b"fail-once" if event.attempt == 1 => {
            state::set(&key, &1_000_000u64)?;
            return Err(HandlerError::retriable("failing the first attempt"));
        }
        b"fatal" => {
            state::set(&key, &2_000_000u64)?;
            return Err(HandlerError::fatal("a fatal event"));
        }
        b"big" => {
            let n = weir_sdk::config("big_bytes")
                .and_then(|v| v.parse().ok())
                .unwrap_or(100_000);
            state::set_raw(&format!("big:{key}"), &vec![b'x'; n]);
        }
        b"grow" => state::set_raw(&format!("grow:{}", event.id), &[b'g'; 1000]),
        _ => {}
    }
    let topic =
        weir_sdk::config("output_topic").unwrap_or_else(|| format!("{}.counts", event.topic));
    let out = Count {
        key: key.clone(),
        count,
        id: event.id,
    };
    Ok(vec![Output::raw(
        &topic,
        serde_json::to_vec(&out).map_err(HandlerError::fatal)?,
    )
    .with_key(key)])
}

weir_sdk::handler!(handle);

#[cfg(test)]
mod tests {
    use super::*;
    use weir_sdk::testing;

    fn count(out: &[Output]) -> u64 {
        serde_json::from_slice::<Count>(&out[0].payload)
            .unwrap()
            .count
    }

    #[test]
    fn counts_per_key_and_failed_calls_change_nothing() {
        let e = |p: &str, k: &str| Event::raw("in", p.to_owned()).with_key(k.to_owned());
        assert_eq!(count(&testing::call(handle, e("x", "a")).unwrap()), 1);
        assert_eq!(count(&testing::call(handle, e("x", "b")).unwrap()), 1);
        assert!(testing::call(handle, e("fail-once", "a")).is_err());
        assert!(testing::call(handle, e("fatal", "a")).is_err());
        let retried = e("fail-once", "a").with_attempt(2);
        assert_eq!(count(&testing::call(handle, retried).unwrap()), 2);
        assert_eq!(state::get::<u64>("a").unwrap(), Some(2));
        assert_eq!(state::get::<u64>("b").unwrap(), Some(1));
    }
}
