//! What handler state costs: `state-counter` doing one `get` and one
//! `set` of an 8-byte value per event, against the same module told not to
//! touch its state (both without outputs, both reading the same config;
//! the bench topic's 1,000 keys), through `weir run`'s pipeline, rounds
//! alternating their order (`--state-rounds N`); and how
//! long a new owner takes to restore a partition's state, by its number of
//! keys (`--restore-state 10000,100000`).

use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::fleet::{enqueue, print_restores};
use super::micro::OtlpSink;
use super::{median, range, weir, BenchArgs, Variant};
use crate::changelog::Changelog;
use crate::config::Config;
use crate::dedup::Dedup;
use crate::fence::Fence;
use crate::halt::Halt;
use crate::publish::Publisher;
use crate::state::{encode_value, scope_prefix, StateStore, Write};

const TRIVIAL: Variant = Variant::Weir {
    outputs: false,
    dedup: true,
    metrics: true,
    spans: None,
};

pub(super) async fn run(
    args: &BenchArgs,
    topic: &str,
    sink: &OtlpSink,
    rounds: usize,
) -> Result<()> {
    let counter = args.plugins.join("state_counter.wasm");
    if !counter.is_file() {
        bail!(
            "{} is missing: build the plugins first (`./dev plugins rust`)",
            counter.display()
        );
    }
    // Per round: (stateless, stateful) events/s.
    let mut rates: Vec<(f64, f64)> = Vec::new();
    for round in 0..rounds {
        let mut r = (0.0, 0.0);
        for stateful in if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        } {
            let config: &[(&str, &str)] = if stateful {
                &[("raw", "true")]
            } else {
                &[("raw", "true"), ("stateless", "true")]
            };
            let run = weir(args, topic, &counter, TRIVIAL, sink, None, config).await?;
            eprintln!(
                "state round {}: {} {:.0} events/s",
                round + 1,
                if stateful { "get + set" } else { "stateless" },
                run.rate()
            );
            if stateful {
                r.1 = run.rate();
            } else {
                r.0 = run.rate();
            }
        }
        rates.push(r);
    }
    println!(
        "\nhandler state ({} events over 1,000 keys, {rounds} rounds, orders alternating):\n",
        args.events
    );
    println!("| variant | events/s (min-max) | median |");
    println!("|---|---:|---:|");
    for (name, pick) in [
        ("state-counter told not to touch its state", 0),
        ("state-counter, one get + one set of 8 bytes", 1),
    ] {
        let r: Vec<f64> = rates
            .iter()
            .map(|p| if pick == 0 { p.0 } else { p.1 })
            .collect();
        if let Some((lo, hi)) = range(&r) {
            println!("| {name} | {lo:.0}-{hi:.0} | {:.0} |", median(&r));
        }
    }
    let shares: Vec<f64> = rates.iter().map(|(a, b)| 100.0 * b / a).collect();
    let micros: Vec<f64> = rates.iter().map(|(a, b)| 1e6 / b - 1e6 / a).collect();
    if let (Some((lo, hi)), Some((mlo, mhi))) = (range(&shares), range(&micros)) {
        println!(
            "stateful share of stateless (each round): {lo:.1} % to {hi:.1} %, median {:.1} %; \
             cost per event {mlo:.2} to {mhi:.2} µs, median {:.2} µs",
            median(&shares),
            median(&micros)
        );
    }
    Ok(())
}

/// Restore time of one input partition's state holding `n` keys (8-byte
/// values) into an empty store; two runs each.
pub(super) async fn restore(args: &BenchArgs, counts: &[usize]) -> Result<()> {
    println!("\nrestore: one input partition's handler state into an empty store");
    println!("| keys | restore, ms (two runs) | keys/s |");
    println!("|---:|---:|---:|");
    for &n in counts {
        let group = super::load::group_id("state");
        let config = Config::parse(&format!(
            "[kafka]\nbrokers = {:?}\ngroup_id = {group:?}\n",
            args.brokers
        ))?;
        let changelog = Changelog::open(&config, None).await?;
        let (halt, _halted) = Halt::new(Default::default());
        let publisher = Publisher::new(&config, halt, None)?;
        let prefix = scope_prefix("counter", "bench", 0);
        let mut acks = Vec::new();
        for i in 0..n {
            let mut key = prefix.clone();
            key.extend_from_slice(format!("customer-{i}").as_bytes());
            let w = Write {
                key,
                value: Some(encode_value(&(i as u64).to_le_bytes(), None)),
                delta: 0,
            };
            acks.extend(enqueue(|| changelog.write_state(&publisher, 0, &w)).await);
        }
        for a in acks {
            a.await?.map_err(|(e, _)| e)?;
        }
        print_restores(n, |dir| {
            let dedup = std::sync::Arc::new(Dedup::open(dir, Duration::from_secs(3600))?);
            let state = StateStore::open(dedup.clone(), None)?;
            let fence = Fence::default();
            let (stop, health) = (Default::default(), Default::default());
            let r = tokio::task::block_in_place(|| {
                changelog.restore(&dedup, Some(&state), ("bench", 0), &fence, &stop, &health)
            })
            .context("restore")?;
            if state.totals("counter").keys != n as i64 {
                bail!("restored {} keys of {n}", state.totals("counter").keys);
            }
            Ok(r.state_took)
        })?;
    }
    Ok(())
}
