//! `weir try`: runs a component against sample events, without Kafka, and
//! prints per event what `weir run` would publish (envelope and headers
//! included), or how it failed, with the fuel used and the time of the
//! call. The fastest loop a handler author has: edit, build, try.
//!
//! The handler runs with the same engine, limits and host imports as under
//! `weir run`, on one instance reused from event to event (a fresh one after
//! a trap, as in a partition worker). A `retriable` error is retried at
//! once, up to `max_attempts` (the backoff is not waited).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::config::{Config, HandlerConfig};
use crate::envelope::{self, Produce, Record};
use crate::handler::{CallOutcome, LoadedHandler, PluginEngine};
use crate::samples;

/// Options of `weir try`.
#[derive(Debug, clap::Args)]
pub struct TryArgs {
    /// The component to run (a `.wasm` file of the `weir:plugin` world).
    pub wasm: PathBuf,
    /// Sample events, one JSON object a line (an envelope, or a record with
    /// `value`, `key`, `headers`, `topic`).
    #[arg(long)]
    pub events: PathBuf,
    /// A config file whose handler settings apply (limits, `[handler.config]`,
    /// topics, event types, retries): the handler that names this component,
    /// or `--handler`, or the only one.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// The handler of the config to take the settings of.
    #[arg(long)]
    pub handler: Option<String>,
}

/// The settings a component runs with: those of the handler of `config`
/// that names it (or the one named `handler`, or the only one), else the
/// defaults on the topic `events`; with the config's `message.max.bytes`.
/// Shared by `weir try` and `weir dev --handler`; `flag` is the option
/// that names a handler, for messages.
pub fn settings(
    wasm: &Path,
    config: Option<&Path>,
    handler: Option<&str>,
    flag: &str,
) -> Result<(HandlerConfig, usize)> {
    let Some(path) = config else {
        let name = wasm
            .file_stem()
            .map_or("handler".into(), |s| s.to_string_lossy().replace('_', "-"));
        let text = format!("name = {name:?}\nwasm = \"\"\ntopics = [\"events\"]\n");
        let mut h: HandlerConfig = toml::from_str(&text).expect("a valid handler table");
        h.wasm = wasm.to_path_buf();
        return Ok((h, crate::kafka::DEFAULT_MAX_MESSAGE_BYTES));
    };
    // Validated once this component stands in for the handler: the config
    // may name files that are not built yet.
    let mut config = Config::read(path)?;
    let same_file = |h: &HandlerConfig| {
        let a = std::fs::canonicalize(&h.wasm).ok();
        a.is_some() && a == std::fs::canonicalize(wasm).ok()
    };
    let at = match handler {
        Some(name) => config
            .handlers
            .iter()
            .position(|h| h.name == name)
            .with_context(|| format!("{}: no handler named {name:?}", path.display()))?,
        None => match config.handlers.iter().position(same_file) {
            Some(i) => i,
            None if config.handlers.len() == 1 => 0,
            None => bail!(
                "{}: no handler runs {}; name one with {flag}",
                path.display(),
                wasm.display()
            ),
        },
    };
    let mut h = config.handlers.swap_remove(at);
    h.wasm = wasm.to_path_buf();
    config.handlers = vec![h];
    config
        .validate()
        .with_context(|| format!("invalid config file {}", path.display()))?;
    let max_bytes = crate::kafka::max_message_bytes(&config);
    Ok((config.handlers.remove(0), max_bytes))
}

/// Runs `weir try`; Ok(false) when any event failed.
pub fn run(args: &TryArgs) -> Result<bool> {
    let (cfg, max_bytes) = settings(
        &args.wasm,
        args.config.as_deref(),
        args.handler.as_deref(),
        "--handler",
    )?;
    let records = samples::load(&args.events, &cfg.topics[0])?;
    if let Some(r) = records.iter().find(|r| !cfg.topics.contains(&r.topic)) {
        bail!(
            "{}: an event for topic {:?}, which handler {} does not subscribe to ({:?})",
            args.events.display(),
            r.topic,
            cfg.name,
            cfg.topics
        );
    }
    let engine = PluginEngine::new()?;
    let started = Instant::now();
    let handler = LoadedHandler::load(&engine, &cfg)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "handler {} (version {}) from {}: compiled and instantiated in {:.0} ms\n",
        handler.name,
        handler.version,
        args.wasm.display(),
        started.elapsed().as_secs_f64() * 1000.0
    )?;
    let mut failed = 0;
    let mut instance = None;
    // State is kept from event to event of the run, as `weir run` keeps it.
    let state = crate::state::Scratch::new()?;
    for record in &records {
        if !try_event(&handler, &mut instance, &state, record, max_bytes, &mut out)? {
            failed += 1;
        }
    }
    let entries = state.entries(&handler.name)?;
    if !entries.is_empty() {
        writeln!(out, "state after the run ({} keys):", entries.len())?;
        for (topic, partition, key, value) in entries {
            writeln!(
                out,
                "  {topic}/{partition} {key:?} = {}",
                String::from_utf8_lossy(&value)
            )?;
        }
        writeln!(out)?;
    }
    writeln!(
        out,
        "{} events: {} ok, {failed} failed",
        records.len(),
        records.len() - failed
    )?;
    Ok(failed == 0)
}

/// One event through the handler; false when it failed.
fn try_event(
    handler: &LoadedHandler,
    instance: &mut Option<crate::handler::HandlerInstance>,
    state: &crate::state::Scratch,
    record: &Record,
    max_bytes: usize,
    out: &mut impl Write,
) -> Result<bool> {
    let at = format!("{}/{}/{}", record.topic, record.partition, record.offset);
    let event = match envelope::decode(record) {
        Ok(e) => e,
        Err(e) => {
            writeln!(out, "event {at}: FAILED undecodable: {e}\n")?;
            return Ok(false);
        }
    };
    let kind = if event.event_type.is_empty() {
        "raw".to_owned()
    } else {
        event.event_type.clone()
    };
    if !handler.config_entry.accepts(&event.event_type) {
        writeln!(out, "event {at} ({kind}): not subscribed (event_types)\n")?;
        return Ok(true);
    }
    for attempt in 1..=handler.config_entry.max_attempts {
        if instance.is_none() {
            *instance = Some(handler.instantiate()?);
        }
        let inst = instance.as_mut().expect("an instance");
        let started = Instant::now();
        let call_state = state.call(
            &handler.name,
            &handler.config_entry.state,
            &record.topic,
            record.partition,
        );
        let outcome = inst.call(&event, record, attempt, "", call_state);
        let took = started.elapsed().as_secs_f64() * 1000.0;
        let fuel = inst.last_fuel_used();
        if inst.is_poisoned() {
            *instance = None;
        }
        let head = format!(
            "event {at} ({kind}, id {}), attempt {attempt}: {took:.2} ms, fuel {fuel}",
            event.id
        );
        match outcome {
            CallOutcome::Ok(outputs, writes) => {
                // All or nothing, as `weir run` publishes them.
                let encoded: Result<Vec<Produce>, String> = outputs
                    .into_iter()
                    .map(|o| envelope::encode_output(o, &event, max_bytes))
                    .collect();
                match encoded {
                    Ok(produced) => {
                        state.keep(&writes)?;
                        let wrote = if writes.is_empty() {
                            String::new()
                        } else {
                            format!(", {} state write(s)", writes.len())
                        };
                        writeln!(out, "{head}: ok, {} output(s){wrote}", produced.len())?;
                        for p in &produced {
                            print_output(p, out)?;
                        }
                        writeln!(out)?;
                        return Ok(true);
                    }
                    Err(why) => {
                        writeln!(out, "{head}: FAILED invalid-output: {why}\n")?;
                        return Ok(false);
                    }
                }
            }
            CallOutcome::Failed(kind, message) => {
                writeln!(out, "{head}: FAILED {kind}: {message}\n")?;
                return Ok(false);
            }
            CallOutcome::Retriable(message) => {
                writeln!(out, "{head}: retriable: {message}")?;
            }
        }
    }
    writeln!(
        out,
        "event {at}: FAILED retries-exhausted after {} attempts\n",
        handler.config_entry.max_attempts
    )?;
    Ok(false)
}

/// An output as it would be published.
fn print_output(p: &Produce, out: &mut impl Write) -> Result<()> {
    let key = p
        .key
        .as_ref()
        .map_or("(none)".into(), |k| String::from_utf8_lossy(k).into_owned());
    writeln!(out, "  → {} key={key}", p.topic)?;
    for (k, v) in &p.headers {
        writeln!(out, "    {k}: {}", String::from_utf8_lossy(v))?;
    }
    let msgpack = p
        .headers
        .iter()
        .any(|(k, v)| k == envelope::header::CONTENT_TYPE && v == b"application/msgpack");
    let value = if msgpack {
        match rmpv::decode::read_value(&mut p.value.as_slice()) {
            Ok(v) => format!("(msgpack) {v}"),
            Err(_) => format!("({} bytes of msgpack)", p.value.len()),
        }
    } else {
        match std::str::from_utf8(&p.value) {
            Ok(text) => text.to_owned(),
            Err(_) => format!("({} bytes)", p.value.len()),
        }
    };
    writeln!(out, "    {value}")?;
    Ok(())
}
