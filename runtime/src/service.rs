//! What `weir run` runs, from a loaded config to a stopped pipeline: the
//! exporter, the metrics and health endpoints, the handlers (with the
//! compile cache), the idempotency store, the deploy paths (admin API,
//! watched plugin folder, SIGHUP reload) and the pipeline, rebuilt in place
//! when a reload changes what the handlers subscribe to. `weir bench` runs
//! the same.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{Context, Result};
use tracing::{info, warn};

use crate::compile_cache::CompileCache;
use crate::config::Config;
use crate::deploy::{self, Deployer, Registry};
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
    // SIGHUP is caught from the start: while handlers compile it waits
    // (its default action would end the process).
    let hangups = {
        let _guard = runtime.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    };
    for w in config.warnings() {
        warn!("{w}");
    }
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
    let mut engine = PluginEngine::new()?;
    if config.plugins.cache {
        engine = engine.with_cache(CompileCache::open(&config.plugins.cache_dir)?);
    }
    let started = std::time::Instant::now();
    let handlers = crate::load_handlers(&engine, &config)?;
    obs.health.handlers_loaded.store(true, Ordering::Relaxed);
    for h in &handlers {
        info!(handler = %h.name, version = %h.version, topics = ?h.topics(),
            compiled = ?h.compiled, load_ms = h.load_time.as_millis() as u64, "handler loaded");
    }
    info!(
        handlers = handlers.len(),
        load_ms = started.elapsed().as_millis() as u64,
        "handlers ready"
    );
    let registry = Arc::new(Registry::new(handlers, obs.metrics.clone()));
    let deployer = Arc::new(Deployer::new(
        engine,
        registry.clone(),
        config.clone(),
        obs.metrics.clone(),
    ));
    if config.admin.enabled {
        runtime.block_on(deploy::admin::serve(
            &config.admin.listen,
            config.admin.token()?,
            config.admin.max_body_bytes(),
            deployer.clone(),
        ))?;
    }
    let _watch = if config.plugins.watch {
        let _guard = runtime.enter();
        Some(deploy::watch::start(
            deployer.clone(),
            std::time::Duration::from_millis(config.plugins.watch_debounce_ms),
        )?)
    } else {
        None
    };
    match hangups {
        Ok(hangups) if config.source.is_some() => {
            runtime.spawn(reload_on_sighup(deployer.clone(), hangups));
        }
        Ok(_) => {}
        Err(e) => {
            warn!(error = %e, "cannot install a SIGHUP handler; reload through the admin API")
        }
    }
    let dedup = crate::open_dedup(&config)?;

    // The caller's shutdown, as a flag every pipeline (first and rebuilt) sees.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    runtime.spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let result = runtime.block_on(async move {
        let mut config = config;
        let mut slots = registry.slots();
        loop {
            let mut stop = stop_rx.clone();
            let rebuild = deployer.clone();
            let until = async move {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => {}
                    _ = rebuild.rebuild_requested.notified() => {}
                }
            };
            let run = pipeline::run(
                config.clone(),
                slots,
                dedup.clone(),
                stats.clone(),
                obs.clone(),
                until,
            );
            let ended = tokio::spawn(run)
                .await
                .context("the pipeline task failed")?;
            if *stop_rx.borrow() {
                return match ended {
                    // Stopping anyway: the aborted events are redelivered.
                    Err(e) if e.downcast_ref::<pipeline::Rewound>().is_some() => Ok(()),
                    other => other,
                };
            }
            // Stopped for a rebuild: events a slow partition did not finish
            // in time are redelivered to the new pipeline, not a reason to
            // stop the process; any other failure is.
            match ended {
                Err(e) if e.downcast_ref::<pipeline::Unfinished>().is_some() => {
                    warn!(reason = %e, "pipeline rebuilt with events unfinished")
                }
                Err(e) if e.downcast_ref::<pipeline::Rewound>().is_some() => {
                    warn!(reason = %e, "pipeline rebuilt after an aborted transaction");
                    slots = registry.slots();
                    continue;
                }
                other => other?,
            }
            // Several reloads may have asked for one rebuild: the last wins;
            // none left (already taken) means the same pipeline again.
            let Some(next) = deployer.take_rebuild() else {
                slots = registry.slots();
                continue;
            };
            info!("handlers or subscriptions changed: pipeline rebuilt on the reloaded config");
            registry.replace(next.slots.clone());
            config = next.config;
            slots = next.slots;
        }
    });
    tracing.shutdown();
    result
}

/// SIGHUP re-reads the config file.
async fn reload_on_sighup(deployer: Arc<Deployer>, mut hangups: tokio::signal::unix::Signal) {
    while hangups.recv().await.is_some() {
        info!("SIGHUP received: reloading the config file");
        // The outcome is logged by the reload.
        let _ = deployer.reload().await;
    }
}
