//! Handler components: compiled once, instantiated once per partition
//! worker, called once per event under a fuel budget, a memory cap and a
//! wall-clock deadline.
//!
//! The memory cap (`memory_limit_mib`) is on the total of all an
//! instance's linear memories, and an instance may have at most
//! `max_memories` of them (1 by default); a component that declares more is
//! refused at load.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rand::Rng;
use sha2::{Digest, Sha256};
use wasmtime::component::ResourceTable;
use wasmtime::{Store, Trap};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::compile_cache::Compiled;
use crate::guest_output::{self, GuestOutput, LineLimiter};

use crate::config::HandlerConfig;
use crate::envelope::{self, Record};
use crate::failure::FailureKind;

mod engine;
mod imports;
mod limiter;

use engine::EPOCH_TICK;
pub use engine::{Metering, PluginEngine};
use imports::CurrentEvent;
pub use imports::HostState;
use limiter::MemoryLimiter;

mod bindings {
    // The event a call takes is lowered from borrowed fields: no copy of
    // its strings and payload made just to be copied into the guest.
    wasmtime::component::bindgen!({
        world: "handler",
        path: "../wit",
        ownership: Borrowing { duplicate_if_necessary: true },
    });
}

use crate::state::{CallState, Write};
use bindings::weir::plugin::host::{self, Level};
use bindings::weir::plugin::state as wit_state;
use bindings::weir::plugin::types as wit;
use bindings::{Handler, HandlerPre};

/// A handler ready to take events: its component compiled and its imports
/// resolved once.
pub struct LoadedHandler {
    pub name: String,
    /// The handler's config table as written.
    pub config_entry: HandlerConfig,
    /// Content hash of the component (first 12 hex digits of its SHA-256).
    pub version: String,
    /// The whole SHA-256 of the component, in hex.
    pub digest: String,
    /// Whether the compiled code came from the compile cache.
    pub compiled: Compiled,
    /// How long compiling (or reading the cache) and checking took.
    pub load_time: Duration,
    /// The component imports `weir:plugin/state`.
    pub stateful: bool,
    initial_backoff: Duration,
    max_backoff: Duration,
    fuel_per_event: u64,
    memory_limit: usize,
    max_memories: usize,
    deadline_ticks: u64,
    config: Arc<BTreeMap<String, String>>,
    engine: PluginEngine,
    pre: HandlerPre<HostState>,
    budget: Option<FuelBudget>,
}

/// A token bucket of fuel, refilled at `per_second` up to one second's
/// worth, debited with the fuel each call actually used.
pub struct FuelBudget {
    per_second: f64,
    state: std::sync::Mutex<(f64, std::time::Instant)>,
}

impl FuelBudget {
    pub fn new(per_second: u64) -> Self {
        Self {
            per_second: per_second as f64,
            state: std::sync::Mutex::new((per_second as f64, std::time::Instant::now())),
        }
    }

    fn refill(&self, s: &mut (f64, std::time::Instant)) {
        let now = std::time::Instant::now();
        s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * self.per_second).min(self.per_second);
        s.1 = now;
    }

    /// How long until the bucket is no longer in debt (zero when it is not).
    pub fn wait_time(&self) -> Duration {
        let mut s = self.state.lock().unwrap();
        self.refill(&mut s);
        if s.0 >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-s.0 / self.per_second)
        }
    }

    /// Takes `fuel` from the bucket (it may go into debt).
    pub fn debit(&self, fuel: u64) {
        let mut s = self.state.lock().unwrap();
        self.refill(&mut s);
        s.0 -= fuel as f64;
    }
}

/// The load error of a component with more linear memories than the
/// handler's `max_memories`; `detail` says how many and where, if known.
fn too_many_memories(cfg: &HandlerConfig, detail: &str) -> String {
    let n = cfg.max_memories;
    format!(
        "handler {:?}: the component needs more than {n} linear memor{}{detail}; \
         raise max_memories (at most 16)",
        cfg.name,
        if n == 1 { "y" } else { "ies" }
    )
}

/// What the component file is, by its header.
fn check_wasm_header(origin: &str, bytes: &[u8]) -> Result<()> {
    if bytes.len() < 8 || &bytes[0..4] != b"\0asm" {
        bail!("{origin} is not a WebAssembly file");
    }
    if bytes[4..8] == [1, 0, 0, 0] {
        bail!(
            "{origin} is a core WebAssembly module, not a component: build it for wasm32-wasip2 \
             (or wrap it with `wasm-tools component new`)"
        );
    }
    Ok(())
}

/// The SHA-256 of a component, in hex.
pub fn digest_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl LoadedHandler {
    /// Reads, compiles and checks a handler component; the error names the
    /// handler, the file and the cause.
    pub fn load(engine: &PluginEngine, cfg: &HandlerConfig) -> Result<LoadedHandler> {
        let path = &cfg.wasm;
        let bytes = std::fs::read(path)
            .with_context(|| format!("handler {:?}: cannot load {}", cfg.name, path.display()))?;
        Self::from_bytes(engine, cfg, &bytes, &path.display().to_string())
    }

    /// Compiles and checks a component given as bytes; `origin` names
    /// where they came from (a file, an upload) in errors.
    pub fn from_bytes(
        engine: &PluginEngine,
        cfg: &HandlerConfig,
        bytes: &[u8],
        origin: &str,
    ) -> Result<LoadedHandler> {
        let started = std::time::Instant::now();
        let what = || format!("handler {:?}: cannot load {origin}", cfg.name);
        check_wasm_header(origin, bytes).with_context(what)?;
        let digest = digest_hex(bytes);
        let (component, compiled) = engine.compile(bytes, &digest).with_context(what)?;
        let max_memories = cfg.max_memories as usize;
        if let Some(needs) = component.resources_required() {
            if needs.num_memories as usize > max_memories {
                bail!(
                    "{}",
                    too_many_memories(cfg, &format!(" ({} in {origin})", needs.num_memories))
                );
            }
        }
        let pre = engine
            .linker
            .instantiate_pre(&component)
            .map_err(anyhow::Error::from)
            .with_context(|| {
                format!(
                    "handler {:?}: {origin} imports something Weir does not provide",
                    cfg.name
                )
            })?;
        let pre = HandlerPre::new(pre)
            .map_err(anyhow::Error::from)
            .with_context(|| {
                format!(
                    "handler {:?}: {origin} does not implement the weir:plugin/handler world",
                    cfg.name
                )
            })?;
        let stateful = component
            .component_type()
            .imports(&engine.engine)
            .any(|(name, _)| name.starts_with("weir:plugin/state"));
        let mut handler = Self::assemble(cfg, digest, compiled, engine.clone(), pre);
        handler.stateful = stateful;
        // Instantiating once proves the start-up code runs within the limits.
        if let Err(e) = handler.instantiate() {
            // What `resources_required` could not count (a component that
            // instantiates a module it imports) the store's count refuses.
            if format!("{e:#}").contains("memory count too high") {
                bail!("{}", too_many_memories(cfg, &format!(" (in {origin})")));
            }
            return Err(e.context(format!("handler {:?}: {origin} fails to start", cfg.name)));
        }
        handler.load_time = started.elapsed();
        Ok(handler)
    }

    /// A compiled component under the settings of `cfg` (limits,
    /// retries, handler config).
    fn assemble(
        cfg: &HandlerConfig,
        digest: String,
        compiled: Compiled,
        engine: PluginEngine,
        pre: HandlerPre<HostState>,
    ) -> LoadedHandler {
        LoadedHandler {
            name: cfg.name.clone(),
            config_entry: cfg.clone(),
            version: digest[..12].to_owned(),
            digest,
            compiled,
            load_time: Duration::ZERO,
            stateful: false,
            initial_backoff: Duration::from_millis(cfg.initial_backoff_ms),
            max_backoff: Duration::from_millis(cfg.max_backoff_ms),
            fuel_per_event: cfg.fuel_per_event,
            memory_limit: (cfg.memory_limit_mib as usize) << 20,
            max_memories: cfg.max_memories as usize,
            deadline_ticks: cfg.deadline_ms.div_ceil(EPOCH_TICK.as_millis() as u64) + 1,
            config: Arc::new(cfg.config.clone()),
            engine,
            pre,
            budget: cfg.fuel_per_second.map(FuelBudget::new),
        }
    }

    /// The same compiled version under the settings of `cfg` (a rollback
    /// changes the component, not the settings in force).
    pub fn with_settings(&self, cfg: &HandlerConfig) -> LoadedHandler {
        let mut h = Self::assemble(
            cfg,
            self.digest.clone(),
            self.compiled,
            self.engine.clone(),
            self.pre.clone(),
        );
        h.stateful = self.stateful;
        h.load_time = self.load_time;
        h
    }

    /// The fuel budget, when the handler has one.
    pub fn budget(&self) -> Option<&FuelBudget> {
        self.budget.as_ref()
    }

    /// The topics the handler subscribes to.
    pub fn topics(&self) -> &[String] {
        &self.config_entry.topics
    }

    /// The delay before attempt `attempt + 1`: exponential, capped, full jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .initial_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let cap = exp.min(self.max_backoff);
        let millis = cap.as_millis() as u64;
        Duration::from_millis(rand::rng().random_range(0..=millis))
    }

    /// A fresh instance in its own store.
    pub fn instantiate(&self) -> Result<HandlerInstance> {
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(GuestOutput::new(&self.name, "stdout"))
            .stderr(GuestOutput::new(&self.name, "stderr"));
        for name in &self.config_entry.allow_env {
            if let Ok(value) = std::env::var(name) {
                wasi.env(name, value);
            }
        }
        if let Some(dir) = &self.config_entry.read_only_dir {
            wasi.preopened_dir(dir, "/data", FsPerms::ReadOnly)
                .map_err(anyhow::Error::from)
                .with_context(|| {
                    format!("cannot grant {} to handler {:?}", dir.display(), self.name)
                })?;
        }
        let state = HostState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limiter: MemoryLimiter::new(self.memory_limit, self.max_memories),
            log_limit: LineLimiter::new(),
            handler: self.name.clone(),
            current: CurrentEvent::default(),
            config: self.config.clone(),
            state: None,
        };
        let mut store = Store::new(&self.engine.engine, state);
        store.limiter(|s| &mut s.limiter);
        let metering = self.engine.metering;
        if metering.fuel {
            store.set_fuel(self.fuel_per_event)?;
        }
        if metering.epochs {
            store.set_epoch_deadline(self.deadline_ticks);
        }
        let bindings = self.pre.instantiate(&mut store)?;
        Ok(HandlerInstance {
            store,
            bindings,
            metering,
            fuel_per_event: self.fuel_per_event,
            deadline_ticks: self.deadline_ticks,
            poisoned: false,
            last_fuel_used: 0,
        })
    }
}

/// What one call came to.
#[derive(Debug)]
pub enum CallOutcome {
    /// The outputs, and the state writes to make with them.
    Ok(Vec<envelope::Output>, Vec<Write>),
    Retriable(String),
    Failed(FailureKind, String),
}

/// One live instance of a handler. Not shared between threads at once.
pub struct HandlerInstance {
    store: Store<HostState>,
    bindings: Handler,
    metering: Metering,
    fuel_per_event: u64,
    deadline_ticks: u64,
    poisoned: bool,
    last_fuel_used: u64,
}

impl HandlerInstance {
    /// Calls `handle` with fresh fuel and deadline, and `state` as the
    /// handler's state; the handler's log lines name the event and
    /// `trace_id`.
    pub fn call(
        &mut self,
        event: &envelope::Event,
        record: &Record,
        attempt: u32,
        trace_id: &str,
        state: CallState,
    ) -> CallOutcome {
        self.store.data_mut().state = Some(state);
        let outcome = self.call_inner(event, record, attempt, trace_id);
        let state = self.store.data_mut().state.take();
        match (outcome, state) {
            (CallOutcome::Ok(outputs, _), Some(state)) => match state.finish() {
                Ok(writes) => CallOutcome::Ok(outputs, writes),
                Err((kind, message)) => CallOutcome::Failed(kind, message),
            },
            (outcome, _) => outcome,
        }
    }

    fn call_inner(
        &mut self,
        event: &envelope::Event,
        record: &Record,
        attempt: u32,
        trace_id: &str,
    ) -> CallOutcome {
        self.store.data_mut().current.set(event, record, trace_id);
        if self.metering.fuel {
            if let Err(e) = self.store.set_fuel(self.fuel_per_event) {
                self.poisoned = true;
                return CallOutcome::Failed(FailureKind::Trap, format!("cannot set fuel: {e}"));
            }
        }
        if self.metering.epochs {
            self.store.set_epoch_deadline(self.deadline_ticks);
        }
        self.store.data_mut().limiter.hit = false;
        let headers: Vec<wit::HeaderParam<'_>> = record
            .headers
            .iter()
            .map(|(k, v)| wit::HeaderParam { key: k, value: v })
            .collect();
        let arg = wit::Event {
            id: &event.id,
            event_type: &event.event_type,
            schema_version: &event.schema_version,
            key: record.key.as_deref(),
            payload: &event.payload,
            content_type: &event.content_type,
            headers: &headers,
            topic: &record.topic,
            partition: record.partition,
            offset: record.offset,
            timestamp_ms: event.timestamp_ms,
            correlation_id: &event.correlation_id,
            causation_id: event.causation_id.as_deref(),
            attempt,
        };
        let result = self.bindings.call_handle(&mut self.store, arg);
        if self.metering.fuel {
            self.last_fuel_used = self
                .fuel_per_event
                .saturating_sub(self.store.get_fuel().unwrap_or(0));
        }
        match result {
            Ok(Ok(outputs)) => CallOutcome::Ok(
                outputs
                    .into_iter()
                    .map(|o| envelope::Output {
                        topic: o.topic,
                        key: o.key,
                        event_type: o.event_type,
                        schema_version: o.schema_version,
                        content_type: o.content_type,
                        payload: o.payload,
                        headers: o.headers.into_iter().map(|h| (h.key, h.value)).collect(),
                    })
                    .collect(),
                Vec::new(),
            ),
            Ok(Err(wit::HandlerError::Retriable(m))) => CallOutcome::Retriable(m),
            Ok(Err(wit::HandlerError::Fatal(m))) => CallOutcome::Failed(FailureKind::Fatal, m),
            Err(e) => {
                // A trapped instance cannot be entered again.
                self.poisoned = true;
                let kind = if self.store.data().limiter.hit {
                    FailureKind::MemoryLimit
                } else {
                    match e.downcast_ref::<Trap>() {
                        Some(Trap::OutOfFuel) => FailureKind::FuelExhausted,
                        Some(Trap::Interrupt) => FailureKind::DeadlineExceeded,
                        _ => FailureKind::Trap,
                    }
                };
                CallOutcome::Failed(kind, format!("{e:#}"))
            }
        }
    }

    /// True after a trap: the worker must make a new instance.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Fuel the last call used.
    pub fn last_fuel_used(&self) -> u64 {
        self.last_fuel_used
    }
}

#[cfg(test)]
mod tests;
