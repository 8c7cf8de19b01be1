//! Echo: publishes every event it receives to the topic named by its
//! `output_topic` config (default `<topic>.out`), with the same key and
//! payload, as an `echo` envelope (JSON or MessagePack, as the input was).
//! A raw input is echoed raw. Used by the end-to-end tests and benchmarks.
//!
//! Config: `output_topic`; `discard = "true"` publishes nothing (a trivial
//! handler for benchmarks); `delay_ms` sleeps per event (a slow handler).

use weir_sdk::{Event, HandlerResult, Output};

/// Echoes one event.
pub fn handle(event: Event) -> HandlerResult {
    let topic = weir_sdk::config("output_topic").unwrap_or_else(|| format!("{}.out", event.topic));
    if let Some(ms) = weir_sdk::config("delay_ms").and_then(|v| v.parse().ok()) {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    if weir_sdk::config("discard").as_deref() == Some("true") {
        return Ok(Vec::new());
    }
    let mut out = Output::raw(&topic, event.payload);
    if !event.event_type.is_empty() {
        out.event_type = format!("{}.echoed", event.event_type);
        out.content_type = event.content_type;
    }
    out.key = event.key;
    Ok(vec![out])
}

weir_sdk::handler!(handle);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoes_payload_and_key_to_the_output_topic() {
        let e = Event::json("in", "t", &serde_json::json!({"n": 1}))
            .unwrap()
            .with_key("k");
        let out = handle(e).unwrap();
        assert_eq!(out[0].topic, "in.out");
        assert_eq!(out[0].event_type, "t.echoed");
        assert_eq!(out[0].key.as_deref(), Some(&b"k"[..]));
        assert_eq!(out[0].payload, br#"{"n":1}"#);
    }
}
