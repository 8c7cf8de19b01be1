//! Deploys: one path for every way a version arrives (the admin API, the
//! watched plugin folder, a reload of the config file): validate, compile
//! (or read the compile cache), check against sample events, then swap.
//!
//! Compiling and checking run on a blocking thread, never on a partition
//! worker; a refused version changes nothing. The swap itself is the
//! slot's (see [`registry`]): workers take the new version between two
//! event attempts.

pub mod admin;
pub mod registry;
pub mod watch;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use tracing::{info, warn};

use crate::config::{Config, HandlerConfig};
use crate::envelope;
use crate::failure::FailureKind;
use crate::handler::{digest_hex, CallOutcome, LoadedHandler, PluginEngine};
use crate::metrics::Metrics;
pub use registry::{Change, HandlerStatus, Registry, Slot};

/// What a deploy came to.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Deployed {
    pub handler: String,
    pub version: String,
    pub previous_version: Option<String>,
    /// `ok`, or `unchanged` when that version was already serving.
    pub result: String,
    /// Whether the compiled code came from the compile cache.
    pub cached: bool,
    pub load_ms: u64,
}

/// What a reload came to.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Reloaded {
    /// Handlers whose version or settings changed in place.
    pub changed: Vec<String>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Sections outside `[[handler]]` that changed: they apply at the next start.
    pub needs_restart: Vec<String>,
}

/// A new set of handlers whose subscriptions differ: the pipeline is
/// rebuilt on it (drained and committed first).
pub struct Rebuild {
    pub config: Config,
    pub slots: Vec<Arc<Slot>>,
}

/// Deploys, rollbacks and reloads.
pub struct Deployer {
    engine: PluginEngine,
    registry: Arc<Registry>,
    metrics: Option<Arc<Metrics>>,
    /// The config now in force (what a reload compares against).
    config: Mutex<Config>,
    /// One change at a time.
    lock: tokio::sync::Mutex<()>,
    /// A rebuild waiting for the service to make it.
    rebuild: Mutex<Option<Rebuild>>,
    pub rebuild_requested: tokio::sync::Notify,
}

impl Deployer {
    pub fn new(
        engine: PluginEngine,
        registry: Arc<Registry>,
        config: Config,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        Self {
            engine,
            registry,
            metrics,
            config: Mutex::new(config),
            lock: Default::default(),
            rebuild: Default::default(),
            rebuild_requested: Default::default(),
        }
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The rebuild a reload asked for, if any.
    pub fn take_rebuild(&self) -> Option<Rebuild> {
        self.rebuild.lock().unwrap().take()
    }

    /// Deploys `bytes` as the new version of handler `name`; `origin`
    /// names where they came from, `from_file` says they are the handler's
    /// `wasm` file (the watched folder). Refused versions change nothing.
    pub async fn deploy(
        self: &Arc<Self>,
        name: &str,
        bytes: Vec<u8>,
        origin: String,
        from_file: bool,
    ) -> Result<Deployed> {
        let _one = self.lock.lock().await;
        let digest = digest_hex(&bytes);
        let result = self.deploy_locked(name, bytes, &digest, &origin).await;
        if let (true, Ok(_), Some(slot)) = (from_file, &result, self.registry.get(name)) {
            // The file holds what serves: a reload leaves it.
            slot.set_file_digest(digest);
        }
        self.count(
            name,
            match &result {
                Ok(d) => d.result.as_str(),
                Err(_) => "refused",
            },
        );
        match &result {
            Ok(d) if d.result == "ok" => info!(handler = %name, version = %d.version,
                previous = ?d.previous_version, cached = d.cached, load_ms = d.load_ms, from = %origin,
                "new version deployed"),
            Ok(d) => info!(handler = %name, version = %d.version, from = %origin,
                "deploy of the version already serving: nothing to do"),
            Err(e) => warn!(handler = %name, from = %origin, reason = %format!("{e:#}"),
                "deploy refused; the serving version keeps running"),
        }
        result
    }

    async fn deploy_locked(
        self: &Arc<Self>,
        name: &str,
        bytes: Vec<u8>,
        digest: &str,
        origin: &str,
    ) -> Result<Deployed> {
        let slot = self
            .registry
            .get(name)
            .ok_or_else(|| anyhow!("no handler named {name:?}"))?;
        let (_, current) = slot.current();
        if digest == current.digest {
            return Ok(Deployed {
                handler: name.to_owned(),
                version: current.version.clone(),
                previous_version: slot.previous().map(|p| p.version.clone()),
                result: "unchanged".into(),
                cached: true,
                load_ms: 0,
            });
        }
        let cfg = current.config_entry.clone();
        let this = self.clone();
        let origin_owned = origin.to_owned();
        let new = tokio::task::spawn_blocking(move || this.build(&cfg, &bytes, &origin_owned))
            .await
            .context("the deploy task failed")??;
        let deployed = Deployed {
            handler: name.to_owned(),
            version: new.version.clone(),
            previous_version: Some(current.version.clone()),
            result: "ok".into(),
            cached: new.compiled == crate::compile_cache::Compiled::Cached,
            load_ms: new.load_time.as_millis() as u64,
        };
        slot.swap(
            Arc::new(new),
            Change::Deploy,
            format!("deployed from {origin} (was {})", current.version),
        );
        Ok(deployed)
    }

    /// Compiles, checks and tries a version against its sample events.
    fn build(&self, cfg: &HandlerConfig, bytes: &[u8], origin: &str) -> Result<LoadedHandler> {
        let h = LoadedHandler::from_bytes(&self.engine, cfg, bytes, origin)?;
        if let Some(file) = &cfg.sample_events {
            try_samples(&h, file).with_context(|| {
                format!("handler {:?}: {origin} fails its sample events", cfg.name)
            })?;
        }
        Ok(h)
    }

    /// Counts a deploy in `weir_handler_deploys_total`.
    fn count(&self, name: &str, result: &str) {
        if let Some(m) = &self.metrics {
            m.deploy(name, result);
        }
    }

    /// Back to handler `name`'s previous version.
    pub async fn rollback(&self, name: &str) -> Result<(String, String)> {
        let _one = self.lock.lock().await;
        let slot = self
            .registry
            .get(name)
            .ok_or_else(|| anyhow!("no handler named {name:?}"))?;
        let (from, to) = slot.rollback("by an operator")?;
        warn!(handler = %name, from = %from, to = %to, "rolled back by an operator");
        if let Some(m) = &self.metrics {
            m.rollback(name, "manual");
        }
        Ok((from, to))
    }

    /// Re-reads the config file: changed handlers are swapped in place;
    /// added or removed handlers (or changed subscriptions) rebuild the
    /// pipeline. A file that fails validation, or a handler that fails to
    /// load, changes nothing.
    pub async fn reload(self: &Arc<Self>) -> Result<Reloaded> {
        let _one = self.lock.lock().await;
        let this = self.clone();
        let result = tokio::task::spawn_blocking(move || this.reload_locked())
            .await
            .context("the reload task failed")?;
        match &result {
            Ok(r) => info!(changed = ?r.changed, added = ?r.added, removed = ?r.removed,
                needs_restart = ?r.needs_restart, "config reloaded"),
            Err(e) => warn!(reason = %format!("{e:#}"), "reload refused; nothing changed"),
        }
        result
    }

    fn reload_locked(&self) -> Result<Reloaded> {
        let old = self.config.lock().unwrap().clone();
        let path = old
            .source
            .clone()
            .context("this instance was not started from a config file")?;
        let new = Config::load(&path)?;
        let mut out = Reloaded {
            needs_restart: restart_sections(&old, &new),
            ..Default::default()
        };
        // Build every changed handler first: one failure refuses the lot.
        let mut built: Vec<Swap> = Vec::new();
        let mut fresh: Vec<Arc<LoadedHandler>> = Vec::new();
        for cfg in &new.handlers {
            let bytes = std::fs::read(&cfg.wasm).with_context(|| {
                format!("handler {:?}: cannot read {}", cfg.name, cfg.wasm.display())
            })?;
            match self.registry.get(&cfg.name) {
                Some(slot) => {
                    let (_, current) = slot.current();
                    let digest = digest_hex(&bytes);
                    if digest != slot.file_digest() {
                        // A new file: deployed (and watched) like any other.
                        let h = self
                            .build(cfg, &bytes, &cfg.wasm.display().to_string())
                            .inspect_err(|_| self.count(&cfg.name, "refused"))?;
                        built.push((slot, Arc::new(h), Change::Deploy, Some(digest)));
                    } else if current.config_entry != *cfg {
                        // New settings for the version serving (which may
                        // be an upload the file does not hold).
                        let h = current.with_settings(cfg);
                        built.push((slot, Arc::new(h), Change::Reload, None));
                    } else {
                        continue;
                    }
                    out.changed.push(cfg.name.clone());
                }
                None => {
                    let h = self.build(cfg, &bytes, &cfg.wasm.display().to_string())?;
                    fresh.push(Arc::new(h));
                    out.added.push(cfg.name.clone());
                }
            }
        }
        out.removed = old
            .handlers
            .iter()
            .filter(|h| !new.handlers.iter().any(|n| n.name == h.name))
            .map(|h| h.name.clone())
            .collect();
        let routing_changed = !out.added.is_empty()
            || !out.removed.is_empty()
            || built.iter().any(|(slot, h, _, _)| {
                let (_, current) = slot.current();
                !same_routing(&current.config_entry, &h.config_entry)
            });
        for (slot, h, change, digest) in built {
            slot.swap(h, change, format!("reloaded from {}", path.display()));
            if let Some(d) = digest {
                slot.set_file_digest(d);
            }
        }
        if routing_changed {
            if let Some(m) = &self.metrics {
                for name in &out.removed {
                    if let Some(slot) = self.registry.get(name) {
                        m.handler_removed(name, &slot.current().1.version);
                    }
                }
            }
            let mut slots = Vec::new();
            for cfg in &new.handlers {
                match self.registry.get(&cfg.name) {
                    Some(slot) => slots.push(slot),
                    None => {
                        let h = fresh
                            .iter()
                            .find(|h| h.name == cfg.name)
                            .expect("every added handler was built")
                            .clone();
                        slots.push(Arc::new(Slot::new(h, None, self.metrics.clone())));
                    }
                }
            }
            *self.rebuild.lock().unwrap() = Some(Rebuild {
                config: new.clone(),
                slots,
            });
            self.rebuild_requested.notify_one();
        }
        *self.config.lock().unwrap() = new;
        Ok(out)
    }
}

/// A swap a reload makes: (slot, version, how, the file's digest when the
/// file is new).
type Swap = (Arc<Slot>, Arc<LoadedHandler>, Change, Option<String>);

/// What decides which records reach a handler and where its failures go.
fn same_routing(a: &HandlerConfig, b: &HandlerConfig) -> bool {
    a.topics == b.topics
        && a.event_types == b.event_types
        && a.dead_letter_topic == b.dead_letter_topic
        && a.retry_mode == b.retry_mode
        && a.retry_topic == b.retry_topic
}

/// The sections outside `[[handler]]` that differ (they apply at a restart).
fn restart_sections(old: &Config, new: &Config) -> Vec<String> {
    [
        ("kafka", old.kafka != new.kafka),
        ("pipeline", old.pipeline != new.pipeline),
        ("idempotency", old.idempotency != new.idempotency),
        ("tracing", old.tracing != new.tracing),
        ("metrics", old.metrics != new.metrics),
        ("admin", old.admin != new.admin),
        ("plugins", old.plugins != new.plugins),
    ]
    .into_iter()
    .filter(|(_, changed)| *changed)
    .map(|(name, _)| name.to_owned())
    .collect()
}

/// Runs a version on its sample events: any failure of the runtime's
/// classes (a trap, fuel, memory, deadline, an output that cannot be
/// published) refuses it; the handler's own `fatal` or `retriable`
/// answers are answers, not faults.
fn try_samples(h: &LoadedHandler, file: &std::path::Path) -> Result<()> {
    let records = crate::samples::load(file, &h.topics()[0])?;
    let mut instance = h.instantiate()?;
    let max_bytes = usize::MAX;
    let state = crate::state::Scratch::new()?;
    for record in &records {
        let at = format!("{}/{}/{}", record.topic, record.partition, record.offset);
        let event =
            envelope::decode(record).map_err(|e| anyhow!("sample {at} is undecodable: {}", e.0))?;
        if !h.config_entry.accepts(&event.event_type) {
            continue;
        }
        let call_state = state.call(
            &h.name,
            &h.config_entry.state,
            &record.topic,
            record.partition,
        );
        match instance.call(&event, record, 1, "", call_state) {
            CallOutcome::Ok(outputs, writes) => {
                for o in outputs {
                    envelope::encode_output(o, &event, max_bytes)
                        .map_err(|e| anyhow!("sample {at}: invalid output: {e}"))?;
                }
                state.keep(&writes)?;
            }
            CallOutcome::Retriable(_) | CallOutcome::Failed(FailureKind::Fatal, _) => {}
            CallOutcome::Failed(kind, message) => {
                // A trap's message ends with its cause, after the backtrace.
                let cause = message.lines().last().unwrap_or_default().trim();
                bail!("sample {at}: {kind}: {cause}")
            }
        }
        if instance.is_poisoned() {
            instance = h.instantiate()?;
        }
    }
    Ok(())
}

/// Where deploys come from, for the watched folder: the handlers whose
/// component is this file.
pub fn handlers_of_file(config: &Config, file: &std::path::Path) -> Vec<String> {
    config
        .handlers
        .iter()
        .filter(|h| same_file(&h.wasm, file))
        .map(|h| h.name.clone())
        .collect()
}

fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    let canon = |p: &std::path::Path| -> PathBuf {
        match (
            p.parent().and_then(|d| d.canonicalize().ok()),
            p.file_name(),
        ) {
            (Some(dir), Some(name)) => dir.join(name),
            _ => p.to_owned(),
        }
    };
    canon(a) == canon(b)
}

impl Deployer {
    /// The config now in force.
    pub fn config(&self) -> Config {
        self.config.lock().unwrap().clone()
    }
}
