//! Weir: runs sandboxed WebAssembly event handlers on Kafka.
//!
//! The binary `weir` is a thin shell over this library: [`config`] reads
//! the TOML file, [`handler`] compiles and calls components, [`pipeline`]
//! moves events from Kafka through handlers to outputs, dead letters and
//! committed offsets.

pub mod bench;
pub mod config;
pub mod deadletter;
pub mod dev;
pub mod envelope;
pub mod failure;
pub mod handler;
pub mod pipeline;

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
