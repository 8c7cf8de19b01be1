//! Weir: runs sandboxed WebAssembly event handlers on Kafka.
//!
//! The binary `weir` is a thin shell over this library: [`config`] reads
//! the TOML file, [`handler`] compiles and calls components, [`pipeline`]
//! moves events from Kafka through handlers to outputs, dead letters and
//! committed offsets; [`telemetry`] and [`metrics`] let operators see it.

pub mod bench;
pub mod changelog;
pub mod compile_cache;
pub mod config;
pub mod deadletter;
pub mod dedup;
pub mod deploy;
pub mod dev;
pub mod envelope;
pub mod failure;
pub mod fence;
pub mod guest_output;
pub mod halt;
pub mod handler;
pub mod kafka;
pub mod metrics;
pub mod pipeline;
pub mod publish;
pub mod replay;
pub mod retry_topic;
pub mod runner;
pub mod samples;
pub mod scaffold;
pub mod service;
pub mod state;
pub mod telemetry;

use std::sync::Arc;

use anyhow::Result;

/// Compiles every configured handler; the first that fails is named in the error.
pub fn load_handlers(
    engine: &handler::PluginEngine,
    config: &config::Config,
) -> Result<Vec<Arc<handler::LoadedHandler>>> {
    config
        .handlers
        .iter()
        .map(|h| handler::LoadedHandler::load(engine, h).map(Arc::new))
        .collect()
}

/// Opens the idempotency store the config asks for, if any.
pub fn open_dedup(config: &config::Config) -> Result<Option<Arc<dedup::Dedup>>> {
    if !config.idempotency.enabled {
        return Ok(None);
    }
    let store = dedup::Dedup::open(&config.idempotency.path, config.idempotency.retention())?;
    Ok(Some(Arc::new(store)))
}
