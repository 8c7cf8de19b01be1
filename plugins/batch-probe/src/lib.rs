//! The echo of `plugins/echo` (an output per event to `<topic>.out`, same
//! key and payload, `<type>.echoed`), exported both as `handle` (one event
//! a call) and `handle-batch` (a list a call), so `weir bench` can measure
//! what batching the call itself saves. It reads no config: the host calls
//! are the handler's own business, not the call's.

#[cfg(target_arch = "wasm32")]
mod probe {
    // The world `use`s the types, so they are in scope here.
    wit_bindgen::generate!({ path: "wit", world: "probe" });

    struct Probe;

    fn echo(event: Event) -> Result<Vec<Output>, HandlerError> {
        Ok(vec![Output {
            topic: format!("{}.out", event.topic),
            key: event.key,
            event_type: format!("{}.echoed", event.event_type),
            schema_version: String::new(),
            content_type: event.content_type,
            payload: event.payload,
            headers: Vec::new(),
        }])
    }

    impl Guest for Probe {
        fn handle(event: Event) -> Result<Vec<Output>, HandlerError> {
            echo(event)
        }

        fn handle_batch(events: Vec<Event>) -> Vec<Result<Vec<Output>, HandlerError>> {
            events.into_iter().map(echo).collect()
        }
    }

    export!(Probe);
}
