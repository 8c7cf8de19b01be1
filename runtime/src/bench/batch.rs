//! Would a `handle-batch` export pay for itself? The same echo called one
//! event a call (`handle`, as handlers are called) and a list a call
//! (`handle-batch`), on one reused instance with fuel and a deadline set
//! per call as the runtime sets them; µs of the call per event. The probe
//! component (`plugins/batch-probe`) is not a handler: its WIT world is a
//! copy of the handler types behind both exports.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};

use super::report::{median, range};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

mod bindings {
    wasmtime::component::bindgen!({ world: "probe", path: "../plugins/batch-probe/wit" });
}

use bindings::weir::batch_probe::types::{Event, Header};
use bindings::Probe;

struct Host {
    wasi: WasiCtx,
    table: ResourceTable,
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Batch sizes measured against one event a call.
const SIZES: [usize; 4] = [1, 16, 64, 256];
/// Fuel per event (the handlers' default is far above what echo uses).
const FUEL: u64 = 10_000_000;

struct Instance {
    store: Store<Host>,
    probe: Probe,
}

impl Instance {
    fn new(engine: &Engine, component: &Component) -> Result<Self> {
        let mut linker = Linker::new(engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        let host = Host {
            wasi: WasiCtxBuilder::new().build(),
            table: ResourceTable::new(),
        };
        let mut store = Store::new(engine, host);
        store.set_fuel(FUEL)?;
        store.set_epoch_deadline(u64::MAX / 2);
        let probe = Probe::instantiate(&mut store, component, &linker)?;
        Ok(Self { store, probe })
    }

    /// Fresh fuel and deadline, as before every handler call.
    fn limits(&mut self, events: usize) -> Result<()> {
        self.store.set_fuel(FUEL * events as u64)?;
        self.store.set_epoch_deadline(1_000);
        Ok(())
    }

    /// µs per event with one `handle` call each.
    fn one_a_call(&mut self, events: &[Event]) -> Result<f64> {
        let started = Instant::now();
        for e in events {
            self.limits(1)?;
            let outputs = self
                .probe
                .call_handle(&mut self.store, e)?
                .map_err(|e| anyhow::anyhow!("probe failed: {e:?}"))?;
            std::hint::black_box(outputs);
        }
        Ok(started.elapsed().as_secs_f64() * 1e6 / events.len() as f64)
    }

    /// µs per event with `handle-batch` calls of `size` events.
    fn batched(&mut self, events: &[Event], size: usize) -> Result<f64> {
        let started = Instant::now();
        for chunk in events.chunks(size) {
            self.limits(chunk.len())?;
            let results = self.probe.call_handle_batch(&mut self.store, chunk)?;
            if results.len() != chunk.len() {
                bail!(
                    "probe returned {} results for {}",
                    results.len(),
                    chunk.len()
                );
            }
            std::hint::black_box(results);
        }
        Ok(started.elapsed().as_secs_f64() * 1e6 / events.len() as f64)
    }
}

/// Events like the benchmark's input: a ~240-byte JSON envelope's fields.
fn events(n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| Event {
            id: format!("{i:08x}-1b4e-4c1a-9f3e-5d2a7c9e{i:04x}"),
            event_type: "order.created".into(),
            schema_version: "1".into(),
            key: Some(format!("key-{}", i % 1000).into_bytes()),
            payload: format!(
                r#"{{"order":{i},"customer":"c-{}","amount":{}.5,"items":["a","b"]}}"#,
                i % 97,
                i % 500
            )
            .into_bytes(),
            content_type: "application/json".into(),
            headers: vec![Header {
                key: "content-type".into(),
                value: b"application/json".to_vec(),
            }],
            topic: "bench-input".into(),
            partition: (i % 4) as i32,
            offset: i as i64,
            timestamp_ms: 1_700_000_000_000 + i as i64,
            correlation_id: format!("corr-{i}"),
            causation_id: None,
            attempt: 1,
        })
        .collect()
}

/// Prints the table; `rounds` repeats in alternating order.
pub(super) fn print(plugins: &Path, n: usize, rounds: usize) -> Result<()> {
    let wasm = plugins.join("batch_probe.wasm");
    println!("\nhandle-batch probe (no Kafka; µs of the call per event, echo, {n} events, {rounds} rounds in alternating order, reused instance):");
    if !wasm.exists() {
        println!(
            "skipped: {} not found (built by `./dev plugins`)",
            wasm.display()
        );
        return Ok(());
    }
    // The runtime's engine and its defaults (fuel metering, epochs).
    let plugins_engine = crate::handler::PluginEngine::new()?;
    let engine = plugins_engine.engine();
    let component = Component::from_file(engine, &wasm)
        .map_err(|e| anyhow::anyhow!("cannot load {}: {e:#}", wasm.display()))?;
    let mut instance = Instance::new(engine, &component)?;
    let events = events(n);
    // Warm-up: the instance's memory grown, the caches filled.
    instance.one_a_call(&events[..n.min(2_000)])?;
    instance.batched(&events[..n.min(2_000)], 64)?;
    // Variant 0 is one event a call; then each batch size.
    let variants = 1 + SIZES.len();
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); variants];
    for round in 0..rounds {
        let order: Vec<usize> = if round % 2 == 0 {
            (0..variants).collect()
        } else {
            (0..variants).rev().collect()
        };
        for v in order {
            let us = match v {
                0 => instance.one_a_call(&events)?,
                v => instance.batched(&events, SIZES[v - 1])?,
            };
            times[v].push(us);
        }
    }
    let range = |t: &[f64]| range(t).unwrap_or_default();
    let base = median(&times[0]);
    println!("| call | µs/event (min-max) | median | saved per event against `handle` |");
    println!("|---|---:|---:|---:|");
    let (lo, hi) = range(&times[0]);
    println!("| `handle`, one event a call | {lo:.2}-{hi:.2} | {base:.2} | - |");
    for (i, size) in SIZES.iter().enumerate() {
        let t = &times[i + 1];
        let (lo, hi) = range(t);
        let m = median(t);
        println!(
            "| `handle-batch`, {size} a call | {lo:.2}-{hi:.2} | {m:.2} | {:.2} µs ({:.0} %) |",
            base - m,
            100.0 * (base - m) / base
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The `interface types { .. }` block of a WIT file.
    fn types(wit: &str) -> String {
        let start = wit.find("interface types {").expect("a types interface");
        let end = start + wit[start..].find("\n}\n").expect("its end");
        wit[start..end].to_owned()
    }

    #[test]
    fn the_probe_lowers_and_lifts_the_same_types_as_handlers() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let read = |p: &str| std::fs::read_to_string(dir.join(p)).expect(p);
        assert_eq!(
            types(&read("plugins/batch-probe/wit/probe.wit")),
            types(&read("wit/plugin.wit")),
            "plugins/batch-probe/wit/probe.wit must copy wit/plugin.wit's types"
        );
    }
}
