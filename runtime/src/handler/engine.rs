//! The one wasmtime engine of the runtime and every default it holds:
//! the component model, fuel metering, epoch deadlines (and their ticker
//! thread), the linker with the host's imports, and compilation (through
//! the compile cache when there is one).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::Engine;

use super::bindings::Handler;
use super::HostState;
use crate::compile_cache::{CompileCache, Compiled};

/// How often the epoch ticker advances; the granularity of call deadlines.
pub(super) const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The one wasmtime engine of the runtime, with every default we rely on:
/// the component model, fuel metering and epoch interruption (driven by a
/// ticker thread, so deadlines hold even in a tight loop).
#[derive(Clone)]
pub struct PluginEngine {
    pub(super) engine: Engine,
    pub(super) metering: Metering,
    /// Precompiled components on disk, when the config keeps them.
    cache: Option<CompileCache>,
    pub(super) linker: Arc<Linker<HostState>>,
    _ticker: Arc<Ticker>,
}

struct Ticker {
    stop: Arc<AtomicBool>,
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl PluginEngine {
    /// The wasmtime engine itself, for components that are not handlers
    /// (`weir bench`'s `handle-batch` probe), with the same defaults.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The engine the runtime uses: fuel metering and deadlines on.
    pub fn new() -> Result<Self> {
        Self::with_metering(Metering::default())
    }

    /// An engine with fuel metering and/or epoch deadlines off, for
    /// measuring what they cost (`weir bench`). Without them the matching
    /// limits are not enforced.
    pub fn with_metering(metering: Metering) -> Result<Self> {
        let mut config = wasmtime::Config::new();
        config
            .consume_fuel(metering.fuel)
            .epoch_interruption(metering.epochs);
        let engine = Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        Handler::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)?;
        let stop = Arc::new(AtomicBool::new(false));
        {
            let engine = engine.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("weir-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(EPOCH_TICK);
                        engine.increment_epoch();
                    }
                })?;
        }
        Ok(Self {
            engine,
            metering,
            cache: None,
            linker: Arc::new(linker),
            _ticker: Arc::new(Ticker { stop }),
        })
    }
}

impl PluginEngine {
    /// The same engine, keeping compiled components in `cache`.
    pub fn with_cache(mut self, cache: CompileCache) -> Self {
        self.cache = Some(cache);
        self
    }

    /// Compiles a component, or reads it from the compile cache.
    pub(super) fn compile(&self, bytes: &[u8], sha256_hex: &str) -> Result<(Component, Compiled)> {
        match &self.cache {
            Some(cache) => cache.component(&self.engine, bytes, sha256_hex),
            None => Ok((
                Component::from_binary(&self.engine, bytes).map_err(anyhow::Error::from)?,
                Compiled::Fresh,
            )),
        }
    }
}

/// Which per-call limits the engine enforces.
#[derive(Debug, Clone, Copy)]
pub struct Metering {
    /// Fuel metering (CPU budget per call and per second).
    pub fuel: bool,
    /// Epoch interruption (wall-clock deadline per call).
    pub epochs: bool,
}

impl Default for Metering {
    fn default() -> Self {
        Self {
            fuel: true,
            epochs: true,
        }
    }
}
