//! The runtime's TOML configuration.
//!
//! Every table rejects unknown keys, so a typo fails at start-up naming the
//! key instead of being silently ignored.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

mod delivery;
mod deploy;
mod handler;
mod kafka;
mod observability;
mod pipeline;
pub use delivery::{DeliveryConfig, DeliveryMode};
pub use deploy::{read_token_file, AdminConfig, PluginsConfig, RolloutConfig};
pub use handler::{HandlerConfig, RetryMode, StateConfig, MAX_STATE_VALUE_BYTES};
pub use kafka::{GroupProtocol, KafkaConfig};
pub use observability::{MetricsConfig, TracingConfig};
pub use pipeline::{IdempotencyConfig, PipelineConfig};

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Kafka connection and consumer group settings.
    pub kafka: KafkaConfig,
    /// Work in flight and commit pacing.
    #[serde(default)]
    pub pipeline: PipelineConfig,
    /// The store of processed event ids.
    #[serde(default)]
    pub idempotency: IdempotencyConfig,
    /// At-least-once or exactly-once.
    #[serde(default)]
    pub delivery: DeliveryConfig,
    /// OpenTelemetry traces: sampling and OTLP export.
    #[serde(default)]
    pub tracing: TracingConfig,
    /// The HTTP server of `/metrics`, `/healthz` and `/readyz`.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// The admin API (deploys, rollbacks, reloads), off unless enabled.
    #[serde(default)]
    pub admin: AdminConfig,
    /// The plugin folder watch and the compile cache.
    #[serde(default)]
    pub plugins: PluginsConfig,
    /// The handlers to load, each a WebAssembly component.
    #[serde(default, rename = "handler")]
    pub handlers: Vec<HandlerConfig>,
    /// The file this config was read from (what a reload reads again).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

impl Config {
    /// Reads, parses and validates a config file; errors name the file and the key.
    pub fn load(path: &Path) -> Result<Config> {
        let config = Self::read(path)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses a config file, paths resolved against its folder,
    /// without validating it (for callers that replace parts first).
    pub fn read(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let mut config = Self::parse(&text)
            .with_context(|| format!("invalid config file {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut config.idempotency.path);
        resolve(&mut config.plugins.cache_dir);
        config.admin.token_file.as_mut().map(resolve);
        for handler in &mut config.handlers {
            resolve(&mut handler.wasm);
            handler.read_only_dir.as_mut().map(resolve);
            handler.sample_events.as_mut().map(resolve);
        }
        deploy::apply_env_overrides(&mut config, std::env::vars())?;
        config.source = Some(path.to_owned());
        Ok(config)
    }

    /// Parses TOML text; unknown keys are errors that name the key.
    pub fn parse(text: &str) -> Result<Config> {
        let config: Config = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(config)
    }

    /// The idempotency changelog topic: `idempotency.changelog_topic`, else
    /// `<group_id>.weir-idempotency`.
    pub fn changelog_topic(&self) -> String {
        self.idempotency
            .changelog_topic
            .clone()
            .unwrap_or_else(|| format!("{}.weir-idempotency", self.kafka.group_id))
    }

    /// The handlers' state changelog topic: `idempotency.state_topic`, else
    /// `<group_id>.weir-state`.
    pub fn state_topic(&self) -> String {
        self.idempotency
            .state_topic
            .clone()
            .unwrap_or_else(|| format!("{}.weir-state", self.kafka.group_id))
    }

    /// Settings that are allowed but probably not meant, as log lines.
    pub fn warnings(&self) -> Vec<String> {
        self.handlers
            .iter()
            .enumerate()
            .filter(|(_, h)| h.deadline_ms > self.pipeline.drain_timeout_ms)
            .map(|(i, h)| {
                format!(
                    "handler[{i}] ({:?}).deadline_ms ({}) is above pipeline.drain_timeout_ms ({}): \
                     a shutdown or a revoke gives up on a longer call (the partition is fenced off: \
                     nothing the call produces is published, and the event is handled again)",
                    h.name, h.deadline_ms, self.pipeline.drain_timeout_ms
                )
            })
            .collect()
    }

    /// Checks what the types cannot: names, topics, files, numbers.
    pub fn validate(&self) -> Result<()> {
        self.kafka.validate()?;
        self.delivery
            .validate(&self.kafka, self.pipeline.commit_interval_ms)?;
        if self.delivery.exactly_once()
            && self
                .handlers
                .iter()
                .any(|h| h.retry_mode == RetryMode::Topic)
            && !(self.idempotency.enabled && self.idempotency.changelog)
        {
            bail!(
                "delivery.mode: exactly-once with retry topics needs idempotency.enabled and \
                 idempotency.changelog (a retry record's event can be committed before the \
                 events below it; its mark is what keeps it from being handled twice)"
            );
        }
        let changelog = self.changelog_topic();
        if self.idempotency.enabled
            && self.idempotency.changelog
            && self.topics().contains(&changelog)
        {
            bail!("idempotency.changelog_topic: {changelog:?} is also a topic handlers consume");
        }
        let state = self.state_topic();
        if self.idempotency.enabled && self.idempotency.changelog {
            if self.topics().contains(&state) {
                bail!("idempotency.state_topic: {state:?} is also a topic handlers consume");
            }
            if state == changelog {
                bail!("idempotency.state_topic: {state:?} is also idempotency.changelog_topic");
            }
        }
        if self.pipeline.max_in_flight_per_partition == 0 {
            bail!("pipeline.max_in_flight_per_partition: must be at least 1");
        }
        if self.pipeline.max_in_flight_total == 0 {
            bail!("pipeline.max_in_flight_total: must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.tracing.sample_ratio) {
            bail!(
                "tracing.sample_ratio: must be between 0 and 1, not {}",
                self.tracing.sample_ratio
            );
        }
        if let Some(e) = self.tracing.traces_url() {
            if !e.starts_with("http://") {
                bail!("tracing.otlp_endpoint: {e:?} must be an http:// URL (OTLP over HTTP; use a local collector for TLS)");
            }
        }
        if !(1..=1_000_000).contains(&self.tracing.max_queued_spans) {
            bail!("tracing.max_queued_spans: must be between 1 and 1000000");
        }
        if self.tracing.export_interval_ms == 0 {
            bail!("tracing.export_interval_ms: must be above 0");
        }
        if self.metrics.enabled {
            if let Err(e) = self.metrics.listen.parse::<std::net::SocketAddr>() {
                bail!(
                    "metrics.listen: {:?} is not an address like 0.0.0.0:9464 ({e})",
                    self.metrics.listen
                );
            }
        }
        if self.metrics.lag_interval_ms == 0 {
            bail!("metrics.lag_interval_ms: must be above 0");
        }
        if self.handlers.is_empty() {
            bail!("handler: at least one [[handler]] is required");
        }
        let mut names = std::collections::HashSet::new();
        // Every topic some handler consumes as a source, and every topic
        // dead letters go to (each with the first handler that names it): a
        // record written to one of the latter must never be read as one of
        // the former.
        let at_of = |j: usize| format!("handler[{j}] ({:?})", self.handlers[j].name);
        let mut sources: HashMap<&str, usize> = HashMap::new();
        let mut dead_letter_topics: HashMap<String, usize> = HashMap::new();
        for (j, h) in self.handlers.iter().enumerate() {
            for t in &h.topics {
                sources.entry(t.as_str()).or_insert(j);
                dead_letter_topics
                    .entry(h.dead_letter_topic_of(t))
                    .or_insert(j);
            }
        }
        for (i, h) in self.handlers.iter().enumerate() {
            let at = format!("handler[{i}] ({:?})", h.name);
            if h.name.is_empty() {
                bail!("handler[{i}].name: must not be empty");
            }
            if !names.insert(&h.name) {
                bail!("{at}.name: duplicate handler name");
            }
            if h.topics.is_empty() || h.topics.iter().any(|t| t.is_empty()) {
                bail!("{at}.topics: must list at least one non-empty topic");
            }
            if let Some(t) = h.topics.iter().find(|t| t.starts_with('^')) {
                bail!("{at}.topics: {t:?} is a pattern; name topics exactly");
            }
            if h.max_attempts == 0 {
                bail!("{at}.max_attempts: must be at least 1");
            }
            if h.fuel_per_event == 0 || h.memory_limit_mib == 0 || h.deadline_ms == 0 {
                bail!("{at}: fuel_per_event, memory_limit_mib and deadline_ms must be above 0");
            }
            if let Some(dir) = &h.read_only_dir {
                if !dir.is_dir() {
                    bail!("{at}.read_only_dir: no such folder {}", dir.display());
                }
            }
            if h.fuel_per_second == Some(0) {
                bail!("{at}.fuel_per_second: must be above 0 (omit it for no budget)");
            }
            if !(1..=MAX_STATE_VALUE_BYTES).contains(&h.state.max_value_bytes) {
                bail!(
                    "{at}.state.max_value_bytes: must be between 1 and {MAX_STATE_VALUE_BYTES} \
                     (a value is one changelog record), not {}",
                    h.state.max_value_bytes
                );
            }
            if h.state.max_total_bytes < h.state.max_value_bytes {
                bail!(
                    "{at}.state.max_total_bytes ({}) is below {at}.state.max_value_bytes ({})",
                    h.state.max_total_bytes,
                    h.state.max_value_bytes
                );
            }
            if let Some(ttl) = h.state.ttl_secs {
                if !(1..=MAX_STATE_TTL_SECS).contains(&ttl) {
                    bail!(
                        "{at}.state.ttl_secs: must be between 1 and {MAX_STATE_TTL_SECS} (omit \
                         it for no expiry), not {ttl}"
                    );
                }
            }
            let record = crate::kafka::max_message_bytes(self) as u64;
            if h.state.max_value_bytes + STATE_RECORD_OVERHEAD > record {
                bail!(
                    "{at}.state.max_value_bytes ({}) does not fit a state changelog record under \
                     the producer's message.max.bytes ({record}) with its key; lower it or raise \
                     message.max.bytes",
                    h.state.max_value_bytes
                );
            }
            if !(1..=16).contains(&h.max_memories) {
                bail!(
                    "{at}.max_memories: must be between 1 and 16, not {}",
                    h.max_memories
                );
            }
            if h.initial_backoff_ms > h.max_backoff_ms {
                bail!(
                    "{at}.initial_backoff_ms ({}) is above {at}.max_backoff_ms ({}): \
                     the first retry delay would already be past the cap",
                    h.initial_backoff_ms,
                    h.max_backoff_ms
                );
            }
            for source in &h.topics {
                let dlq = h.dead_letter_topic_of(source);
                if let Some(&j) = sources.get(dlq.as_str()) {
                    bail!(
                        "{at}.dead_letter_topic: {dlq:?}{} is also a source topic ({}.topics); \
                         dead letters would be handled again",
                        default_of(&h.dead_letter_topic, source),
                        at_of(j)
                    );
                }
                let Some(retry) = h.retry_topic_of(source) else {
                    continue;
                };
                if let Some(&j) = sources.get(retry.as_str()) {
                    bail!(
                        "{at}.retry_topic: {retry:?}{} is also a source topic ({}.topics); \
                         retry records would be handled as new events",
                        default_of(&h.retry_topic, source),
                        at_of(j)
                    );
                }
                if let Some(&j) = dead_letter_topics.get(&retry) {
                    bail!(
                        "{at}.retry_topic: {retry:?}{} is also a dead-letter topic \
                         ({}.dead_letter_topic); dead letters would be retried",
                        default_of(&h.retry_topic, source),
                        at_of(j)
                    );
                }
            }
            if !h.wasm.is_file() {
                bail!("{at}.wasm: no such file {}", h.wasm.display());
            }
            if let Some(file) = &h.sample_events {
                if !file.is_file() {
                    bail!("{at}.sample_events: no such file {}", file.display());
                }
            }
            if let Some(r) = &h.rollout {
                r.validate(&format!("{at}.rollout"))?;
            }
        }
        self.admin.validate()?;
        Ok(())
    }

    /// All topics the runtime consumes (handler topics and retry topics),
    /// sorted and unique.
    pub fn topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = self
            .handlers
            .iter()
            .flat_map(|h| h.topics.iter().cloned().chain(h.retry_topics()))
            .collect();
        topics.sort();
        topics.dedup();
        topics
    }
}

/// For an error message: says that a topic name is the default one
/// derived from `source`, when the key is not set.
const fn default_true() -> bool {
    true
}

fn default_of(key: &Option<String>, source: &str) -> String {
    match key {
        Some(_) => String::new(),
        None => format!(" (the default for source topic {source:?})"),
    }
}

/// The longest `state.ttl_secs`: ten years.
const MAX_STATE_TTL_SECS: u64 = 10 * 365 * 86_400;

/// What a state changelog record holds beside its value: the key (up to
/// 1,024 bytes of the handler's, with handler, topic and partition) and
/// the record's own framing.
const STATE_RECORD_OVERHEAD: u64 = 4096;

#[cfg(test)]
mod tests;
