//! What a log line about an event says: one list of fields (README
//! "Logs": `trace_id`, `handler`, `handler_version`, `event_id`, `correlation_id`,
//! `causation_id`, `topic`, `partition`, `offset`), so no line about an
//! event misses one. The trace id is formatted only when the line is
//! written.

use opentelemetry::Context as TraceContext;

use crate::envelope::{Event, Record};
use crate::handler::LoadedHandler;

/// The fields of a line about one event and one handler.
pub(super) struct EventFields<'a> {
    pub(super) cx: &'a TraceContext,
    pub(super) handler: &'a str,
    pub(super) version: &'a str,
    pub(super) event_id: &'a str,
    pub(super) correlation_id: &'a str,
    pub(super) causation_id: &'a str,
    pub(super) record: &'a Record,
}

impl<'a> EventFields<'a> {
    /// A decoded event.
    pub(super) fn of(
        cx: &'a TraceContext,
        handler: &'a LoadedHandler,
        event: &'a Event,
        record: &'a Record,
    ) -> Self {
        Self {
            cx,
            handler: &handler.name,
            version: &handler.version,
            event_id: &event.id,
            correlation_id: &event.correlation_id,
            causation_id: event.causation_id.as_deref().unwrap_or(""),
            record,
        }
    }
}

/// Logs a line about an event at `level`: its [`EventFields`], then the
/// line's own fields and message, as `tracing` takes them.
macro_rules! event_log {
    ($level:ident, $f:expr, $($rest:tt)*) => {{
        let f = &$f;
        tracing::$level!(
            trace_id = %$crate::telemetry::trace_id(f.cx),
            handler = %f.handler,
            handler_version = %f.version,
            event_id = %f.event_id,
            correlation_id = %f.correlation_id,
            causation_id = %f.causation_id,
            topic = %f.record.topic,
            partition = f.record.partition,
            offset = f.record.offset,
            $($rest)*
        )
    }};
}
pub(super) use event_log;
