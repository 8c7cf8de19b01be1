//! What `weir run` runs, from a loaded config to a stopped pipeline: the
//! exporter, the metrics and health endpoints, the handlers, the
//! idempotency store and the pipeline. `weir bench` runs the same.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{Context, Result};
use tracing::info;

use crate::config::Config;
use crate::handler::PluginEngine;
use crate::metrics::{Health, Metrics};
use crate::pipeline::{self, Observability, Stats};
use crate::telemetry::Tracing;

/// Runs the service until `shutdown` resolves and the pipeline has
/// drained. Blocking: call it outside the async runtime (or from a
/// blocking task), since the exporter's HTTP client is made here.
pub fn run(
    runtime: &tokio::runtime::Handle,
    config: Config,
    stats: Arc<Stats>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let tracing = Arc::new(Tracing::from_config(&config.tracing)?);
    let obs = Observability {
        tracing: tracing.clone(),
        metrics: config.metrics.enabled.then(|| Arc::new(Metrics::new())),
        health: Arc::new(Health::default()),
    };
    // Health is served while the handlers compile (not ready yet).
    if let Some(metrics) = &obs.metrics {
        runtime.block_on(crate::metrics::serve(
            &config.metrics.listen,
            metrics.clone(),
            obs.health.clone(),
        ))?;
    }
    let engine = PluginEngine::new()?;
    let handlers = crate::load_handlers(&engine, &config)?;
    obs.health.handlers_loaded.store(true, Ordering::Relaxed);
    for h in &handlers {
        info!(handler = %h.name, version = %h.version, topics = ?h.topics(), "handler loaded");
    }
    let dedup = crate::open_dedup(&config)?;
    let result = runtime.block_on(async move {
        tokio::spawn(pipeline::run(config, handlers, dedup, stats, obs, shutdown))
            .await
            .context("the pipeline task failed")?
    });
    tracing.shutdown();
    result
}
