//! Traces: W3C trace context (`traceparent`, `tracestate`, `baggage`) read
//! from and written to Kafka headers, OpenTelemetry spans for each event and
//! handler, exported over OTLP/HTTP in batches.
//!
//! Without an OTLP endpoint no span is recorded, but the incoming context
//! still travels to every output and dead letter, so a traced producer
//! upstream and a traced consumer downstream stay in one trace.

use std::time::Duration;

use anyhow::{Context as _, Result};
use opentelemetry::propagation::{
    Extractor, Injector, TextMapCompositePropagator, TextMapPropagator,
};
use opentelemetry::trace::{
    SpanKind, Status, TraceContextExt as _, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider,
};
use opentelemetry_sdk::Resource;
use tracing::{info, warn};

use crate::config::TracingConfig;
use crate::envelope::{self, Produce, Record};

/// Attribute keys of the OpenTelemetry messaging conventions, and ours.
pub mod attr {
    pub const SYSTEM: &str = "messaging.system";
    pub const OPERATION_TYPE: &str = "messaging.operation.type";
    pub const OPERATION_NAME: &str = "messaging.operation.name";
    pub const DESTINATION: &str = "messaging.destination.name";
    pub const PARTITION: &str = "messaging.destination.partition.id";
    pub const OFFSET: &str = "messaging.kafka.offset";
    pub const KEY: &str = "messaging.kafka.message.key";
    pub const GROUP: &str = "messaging.consumer.group.name";
    pub const MESSAGE_ID: &str = "messaging.message.id";
    pub const CONVERSATION_ID: &str = "messaging.message.conversation_id";
    pub const BODY_SIZE: &str = "messaging.message.body.size";
    pub const ERROR_TYPE: &str = "error.type";
    pub const CAUSATION_ID: &str = "weir.causation_id";
    pub const EVENT_TYPE: &str = "weir.event_type";
    pub const HANDLER: &str = "weir.handler.name";
    pub const HANDLER_VERSION: &str = "weir.handler.version";
    pub const ATTEMPT: &str = "weir.attempt";
    pub const FUEL: &str = "weir.fuel_used";
    pub const DEAD_LETTER_REASON: &str = "weir.dead_letter.reason";
}

/// The propagators of W3C trace context and baggage, and the tracer when
/// spans are exported.
pub struct Tracing {
    provider: Option<SdkTracerProvider>,
    tracer: Option<SdkTracer>,
    propagator: TextMapCompositePropagator,
}

impl Default for Tracing {
    fn default() -> Self {
        Self::disabled()
    }
}

impl Tracing {
    /// Propagation only: no span is recorded.
    pub fn disabled() -> Self {
        Self {
            provider: None,
            tracer: None,
            propagator: TextMapCompositePropagator::new(vec![
                Box::new(TraceContextPropagator::new()),
                Box::new(BaggagePropagator::new()),
            ]),
        }
    }

    /// Spans exported to the configured endpoint, or propagation only
    /// without one. Export runs on a thread of its own; `shutdown` blocks
    /// until the last batch is sent, so call it off the async runtime.
    pub fn from_config(cfg: &TracingConfig) -> Result<Self> {
        let Some(url) = cfg.traces_url() else {
            return Ok(Self::disabled());
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_headers(cfg.otlp_headers.clone().into_iter().collect())
            .with_endpoint(&url)
            .with_timeout(Duration::from_secs(10))
            .build()
            .with_context(|| format!("tracing.otlp_endpoint: cannot export to {url}"))?;
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_max_queue_size(cfg.max_queued_spans)
                    .with_max_export_batch_size(cfg.max_queued_spans.min(512))
                    .with_scheduled_delay(Duration::from_millis(cfg.export_interval_ms))
                    .build(),
            )
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                cfg.sample_ratio,
            ))))
            .with_resource(
                Resource::builder()
                    .with_service_name(cfg.service_name.clone())
                    .build(),
            )
            .build();
        let tracer = provider.tracer("weir");
        info!(endpoint = %url, sample_ratio = cfg.sample_ratio, "exporting traces over OTLP");
        Ok(Self {
            provider: Some(provider),
            tracer: Some(tracer),
            propagator: Self::disabled().propagator,
        })
    }

    /// True when spans are recorded.
    pub fn enabled(&self) -> bool {
        self.tracer.is_some()
    }

    /// The context an event's headers carry (an empty one without
    /// `traceparent`: the event's span starts a new trace).
    pub fn extract(&self, headers: &[(String, Vec<u8>)]) -> Context {
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("traceparent"))
        {
            return Context::new();
        }
        self.propagator.extract(&HeaderExtractor(headers))
    }

    /// Writes `cx`'s trace context and baggage into `headers`, replacing
    /// any that were there.
    pub fn inject(&self, cx: &Context, headers: &mut Vec<(String, Vec<u8>)>) {
        headers.retain(|(k, _)| {
            !["traceparent", "tracestate", "baggage"]
                .iter()
                .any(|n| k.eq_ignore_ascii_case(n))
        });
        // Nothing to write without a span or baggage (the common case
        // when the event came without a trace and spans are off).
        if !opentelemetry::trace::TraceContextExt::has_active_span(cx)
            && opentelemetry::baggage::BaggageExt::baggage(cx).is_empty()
        {
            return;
        }
        self.propagator
            .inject_context(cx, &mut HeaderInjector(headers));
    }

    /// Starts a span under `parent` and returns the context that holds it;
    /// returns `parent` itself when spans are off (then `what` is not
    /// evaluated, so building names and attributes costs nothing).
    pub fn start(
        &self,
        parent: &Context,
        what: impl FnOnce() -> (String, SpanKind, Vec<KeyValue>),
    ) -> Context {
        let Some(tracer) = &self.tracer else {
            return parent.clone();
        };
        let (name, kind, attributes) = what();
        let span = tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes)
            .start_with_context(tracer, parent);
        parent.with_span(span)
    }

    /// Flushes the spans still queued and stops the exporter.
    pub fn shutdown(&self) {
        if let Some(p) = &self.provider {
            if let Err(e) = p.shutdown_with_timeout(Duration::from_secs(10)) {
                warn!(error = %e, "spans could not all be exported at shutdown");
            }
        }
    }
}

/// Marks the span in `cx` as failed with `class` (a failure kind).
pub fn fail(cx: &Context, class: &str, message: &str) {
    let span = cx.span();
    if span.is_recording() {
        span.set_attribute(KeyValue::new(attr::ERROR_TYPE, class.to_owned()));
        span.set_status(Status::error(format!("{class}: {message}")));
    }
}

/// Sets an attribute on the span in `cx`, if it records.
pub fn set(cx: &Context, kv: impl FnOnce() -> KeyValue) {
    let span = cx.span();
    if span.is_recording() {
        span.set_attribute(kv());
    }
}

/// Adds an event to the span in `cx`, if it records.
pub fn event(cx: &Context, what: impl FnOnce() -> (&'static str, Vec<KeyValue>)) {
    let span = cx.span();
    if span.is_recording() {
        let (name, attributes) = what();
        span.add_event(name, attributes);
    }
}

/// Ends the span in `cx` now (a span ends on its own when its last context
/// is dropped; this pins the end time).
pub fn end(cx: &Context) {
    cx.span().end();
}

/// The trace id of `cx` as 32 hex digits, or empty when it has none.
pub fn trace_id(cx: &Context) -> String {
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        sc.trace_id().to_string()
    } else {
        String::new()
    }
}

/// The consumer span of one event and handler (messaging conventions).
pub fn consumer_span(
    record: &Record,
    event: Option<&envelope::Event>,
    handler: &str,
    version: &str,
    group: &str,
) -> (String, SpanKind, Vec<KeyValue>) {
    let mut a = messaging("process", &record.topic, record.value.len());
    a.extend([
        KeyValue::new(attr::PARTITION, record.partition.to_string()),
        KeyValue::new(attr::OFFSET, record.offset),
        KeyValue::new(attr::GROUP, group.to_owned()),
        KeyValue::new(attr::HANDLER, handler.to_owned()),
        KeyValue::new(attr::HANDLER_VERSION, version.to_owned()),
    ]);
    if let Some(key) = record
        .key
        .as_deref()
        .and_then(|k| std::str::from_utf8(k).ok())
    {
        a.push(KeyValue::new(attr::KEY, key.to_owned()));
    }
    if let Some(e) = event {
        a.push(KeyValue::new(attr::MESSAGE_ID, e.id.clone()));
        a.push(KeyValue::new(
            attr::CONVERSATION_ID,
            e.correlation_id.clone(),
        ));
        a.push(KeyValue::new(attr::EVENT_TYPE, e.event_type.clone()));
        if let Some(c) = &e.causation_id {
            a.push(KeyValue::new(attr::CAUSATION_ID, c.clone()));
        }
    }
    (format!("process {}", record.topic), SpanKind::Consumer, a)
}

/// The attributes every Kafka span has.
fn messaging(operation: &'static str, topic: &str, body_size: usize) -> Vec<KeyValue> {
    vec![
        KeyValue::new(attr::SYSTEM, "kafka"),
        KeyValue::new(attr::OPERATION_TYPE, operation),
        KeyValue::new(attr::OPERATION_NAME, operation),
        KeyValue::new(attr::DESTINATION, topic.to_owned()),
        KeyValue::new(attr::BODY_SIZE, body_size as i64),
    ]
}

/// The producer span of a record sent on behalf of an event
/// (messaging conventions); `dead_letter_reason` for a dead letter.
pub fn producer_span(
    p: &Produce,
    correlation_id: &str,
    dead_letter_reason: Option<&str>,
) -> (String, SpanKind, Vec<KeyValue>) {
    let mut a = messaging("send", &p.topic, p.value.len());
    if let Some((_, id)) = p
        .headers
        .iter()
        .find(|(k, _)| k == envelope::header::EVENT_ID)
    {
        a.push(KeyValue::new(
            attr::MESSAGE_ID,
            String::from_utf8_lossy(id).into_owned(),
        ));
    }
    if !correlation_id.is_empty() {
        a.push(KeyValue::new(
            attr::CONVERSATION_ID,
            correlation_id.to_owned(),
        ));
    }
    if let Some(reason) = dead_letter_reason {
        a.push(KeyValue::new(attr::DEAD_LETTER_REASON, reason.to_owned()));
    }
    (format!("send {}", p.topic), SpanKind::Producer, a)
}

struct HeaderExtractor<'a>(&'a [(String, Vec<u8>)]);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }
}

struct HeaderInjector<'a>(&'a mut Vec<(String, Vec<u8>)>);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // An empty `tracestate` says nothing; leave the header out.
        if !value.is_empty() {
            self.0.push((key.to_owned(), value.into_bytes()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn context_passes_through_when_spans_are_off() {
        let t = Tracing::disabled();
        let incoming = vec![
            ("traceparent".to_owned(), PARENT.as_bytes().to_vec()),
            ("baggage".to_owned(), b"tenant=acme".to_vec()),
        ];
        let cx = t.extract(&incoming);
        assert_eq!(trace_id(&cx), "0af7651916cd43dd8448eb211c80319c");
        let cx = t.start(&cx, || unreachable!("spans are off"));
        let mut out = vec![("traceparent".to_owned(), b"stale".to_vec())];
        t.inject(&cx, &mut out);
        let get = |k: &str| {
            out.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        assert_eq!(get("traceparent").as_deref(), Some(PARENT));
        assert_eq!(get("baggage").as_deref(), Some("tenant=acme"));
        assert_eq!(out.len(), 2, "the stale traceparent is replaced");
    }

    #[test]
    fn no_context_injects_nothing() {
        let t = Tracing::disabled();
        let cx = t.extract(&[]);
        assert_eq!(trace_id(&cx), "");
        let mut out = Vec::new();
        t.inject(&cx, &mut out);
        assert!(out.is_empty());
    }
}
