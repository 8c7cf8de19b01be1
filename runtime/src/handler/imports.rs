//! What a handler's store holds and the host functions it imports: WASI,
//! `host` (log lines, configuration) and `state` (the call's view of its
//! state).

use super::*;

/// The per-store state the host functions see.
pub struct HostState {
    pub(super) wasi: WasiCtx,
    pub(super) table: ResourceTable,
    pub(super) limiter: MemoryLimiter,
    /// The rate limit of the host `log` import (stdout and stderr have
    /// their own, in their `GuestOutput`).
    pub(super) log_limit: LineLimiter,
    pub(super) handler: String,
    pub(super) config: Arc<BTreeMap<String, String>>,
    /// The event being handled, for the handler's log lines.
    pub(super) current: CurrentEvent,
    /// The handler's state as the call in progress sees it.
    pub(super) state: Option<CallState>,
}

/// What a handler's log line says about the event it is handling. The
/// strings are reused from call to call.
#[derive(Default)]
pub(super) struct CurrentEvent {
    trace_id: String,
    event_id: String,
    correlation_id: String,
    causation_id: String,
    topic: String,
    partition: i32,
    offset: i64,
}

impl CurrentEvent {
    pub(super) fn set(&mut self, event: &envelope::Event, record: &Record, trace_id: &str) {
        for (to, from) in [
            (&mut self.trace_id, trace_id),
            (&mut self.event_id, event.id.as_str()),
            (&mut self.correlation_id, event.correlation_id.as_str()),
            (
                &mut self.causation_id,
                event.causation_id.as_deref().unwrap_or(""),
            ),
            (&mut self.topic, record.topic.as_str()),
        ] {
            to.clear();
            to.push_str(from);
        }
        self.partition = record.partition;
        self.offset = record.offset;
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl host::Host for HostState {
    fn log(&mut self, level: Level, message: String) {
        let handler = self.handler.as_str();
        if !self.log_limit.admit(handler, "log") {
            return;
        }
        let message = guest_output::cut(&message);
        let e = &self.current;
        macro_rules! log {
            ($level:ident) => {
                tracing::$level!(target: "weir::handler", handler, trace_id = %e.trace_id,
                    event_id = %e.event_id, correlation_id = %e.correlation_id,
                    causation_id = %e.causation_id, topic = %e.topic,
                    partition = e.partition, offset = e.offset, "{message}")
            };
        }
        match level {
            Level::Trace => log!(trace),
            Level::Debug => log!(debug),
            Level::Info => log!(info),
            Level::Warn => log!(warn),
            Level::Error => log!(error),
        }
    }

    fn config(&mut self, key: String) -> Option<String> {
        self.config.get(&key).cloned()
    }
}

impl wit::Host for HostState {}

impl wit_state::Host for HostState {
    fn get(&mut self, key: String) -> Option<Vec<u8>> {
        self.state.as_mut()?.get(&key)
    }

    fn set(&mut self, key: String, value: Vec<u8>) {
        if let Some(s) = self.state.as_mut() {
            s.set(key, value)
        }
    }

    fn delete(&mut self, key: String) {
        if let Some(s) = self.state.as_mut() {
            s.delete(key)
        }
    }

    fn scan(
        &mut self,
        prefix: String,
        start_after: Option<String>,
        limit: u32,
    ) -> Vec<(String, Vec<u8>)> {
        match self.state.as_mut() {
            Some(s) => s.scan(&prefix, start_after.as_deref(), limit),
            None => Vec::new(),
        }
    }
}
