//! Fail on marker: behaves like echo, except that an event whose payload
//! contains the configured `marker` (default `FAIL`) fails fatally, and one
//! containing `retry_marker` (default `RETRY`) fails retriably until the
//! attempt `succeed_on_attempt` (default: never). Each output carries the
//! attempt that produced it in an `attempt` header. Used by the end-to-end
//! tests of retries and dead-lettering.

use weir_sdk::{Event, HandlerError, HandlerResult, Output};

fn contains(haystack: &[u8], needle: &str) -> bool {
    !needle.is_empty()
        && haystack
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
}

/// Echoes the event, or fails on a marker.
pub fn handle(event: Event) -> HandlerResult {
    let marker = weir_sdk::config("marker").unwrap_or_else(|| "FAIL".into());
    let retry_marker = weir_sdk::config("retry_marker").unwrap_or_else(|| "RETRY".into());
    if contains(&event.payload, &marker) {
        return Err(HandlerError::fatal(format!(
            "event {} carries the marker {marker:?}",
            event.id
        )));
    }
    let succeed_on: u32 = weir_sdk::config("succeed_on_attempt")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if contains(&event.payload, &retry_marker) && (succeed_on == 0 || event.attempt < succeed_on) {
        weir_sdk::log::warn(&format!(
            "event {} fails on attempt {}",
            event.id, event.attempt
        ));
        return Err(HandlerError::retriable(format!(
            "event {} carries the retry marker (attempt {})",
            event.id, event.attempt
        )));
    }
    let topic = weir_sdk::config("output_topic").unwrap_or_else(|| format!("{}.out", event.topic));
    let mut out = Output::raw(&topic, event.payload);
    out.key = event.key;
    out.event_type = event.event_type;
    out.content_type = event.content_type;
    Ok(vec![out.with_header("attempt", event.attempt.to_string())])
}

weir_sdk::handler!(handle);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_is_fatal_and_others_pass() {
        assert!(matches!(
            handle(Event::raw("t", "a FAIL b")),
            Err(HandlerError::Fatal(_))
        ));
        assert!(matches!(
            handle(Event::raw("t", "RETRY")),
            Err(HandlerError::Retriable(_))
        ));
        assert_eq!(handle(Event::raw("t", "ok")).unwrap()[0].payload, b"ok");
    }
}
