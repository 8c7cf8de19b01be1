//! The `[tracing]` and `[metrics]` tables: what the runtime reports to
//! operators.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::default_true;

/// OpenTelemetry traces. Trace context is always read from and written to
/// Kafka headers; spans are recorded and exported only with an endpoint.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// OTLP/HTTP (protobuf) endpoint, e.g. `http://collector:4318`
    /// (`/v1/traces` is added when the URL has no path). Unset, the standard
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`
    /// variables are used; none of them: no export.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// Headers sent with every export (e.g. a collector's auth token).
    #[serde(default)]
    pub otlp_headers: BTreeMap<String, String>,
    /// Fraction of new traces recorded; an event whose trace context says
    /// "sampled" or "not sampled" follows its parent (parent-based).
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
    /// `service.name` of the exported spans.
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// Spans waiting for export; past it new spans are dropped (logged).
    #[serde(default = "default_max_queued_spans")]
    pub max_queued_spans: usize,
    /// How often a batch is exported, in milliseconds.
    #[serde(default = "default_export_interval_ms")]
    pub export_interval_ms: u64,
}

fn default_sample_ratio() -> f64 {
    1.0
}
fn default_service_name() -> String {
    "weir".into()
}
const fn default_max_queued_spans() -> usize {
    8192
}
const fn default_export_interval_ms() -> u64 {
    1000
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            otlp_headers: BTreeMap::new(),
            sample_ratio: default_sample_ratio(),
            service_name: default_service_name(),
            max_queued_spans: default_max_queued_spans(),
            export_interval_ms: default_export_interval_ms(),
        }
    }
}

impl TracingConfig {
    /// The endpoint URL spans are posted to, `/v1/traces` added to a bare
    /// `scheme://host:port`.
    pub fn traces_url(&self) -> Option<String> {
        if self.otlp_endpoint.is_none() {
            // Per the OpenTelemetry spec: the signal's variable is used as
            // is, the generic one gets the signal's path.
            let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
            if let Some(url) = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
                return Some(url);
            }
            let base = var("OTEL_EXPORTER_OTLP_ENDPOINT")?;
            return Some(format!("{}/v1/traces", base.trim_end_matches('/')));
        }
        let e = self.otlp_endpoint.as_deref()?.trim();
        let after_scheme = e.split_once("://").map_or(e, |(_, rest)| rest);
        Some(match after_scheme.find('/') {
            Some(i) if i + 1 < after_scheme.len() => e.to_owned(),
            _ => format!("{}/v1/traces", e.trim_end_matches('/')),
        })
    }
}

/// The HTTP server of metrics and health.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve `/metrics`, `/healthz` and `/readyz` (and record the metrics).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Address of the server; port 0 picks a free port (logged).
    #[serde(default = "default_metrics_listen")]
    pub listen: String,
    /// How often consumer lag is refreshed from the client, in milliseconds.
    #[serde(default = "default_lag_interval_ms")]
    pub lag_interval_ms: u64,
}

fn default_metrics_listen() -> String {
    "0.0.0.0:9464".into()
}
const fn default_lag_interval_ms() -> u64 {
    5000
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: default_metrics_listen(),
            lag_interval_ms: default_lag_interval_ms(),
        }
    }
}
