//! What exactly-once costs: echo's throughput at-least-once and
//! exactly-once, with commit intervals of 100 ms and 1 s, beside the raw
//! passthrough in every round (orders alternate), then the end-to-end
//! latency of each mode, from an input handed to the producer to its
//! output received by a `read_committed` reader.

use std::path::Path;

use anyhow::Result;

use super::baselines::passthrough;
use super::micro::OtlpSink;
use super::{latency, median, range, weir, BenchArgs, ECHO};

#[derive(Clone, Copy, PartialEq)]
struct Mode {
    exactly_once: bool,
    interval_ms: u64,
}

impl Mode {
    fn name(&self) -> String {
        format!(
            "echo, {}, commit interval {} ms",
            if self.exactly_once {
                "exactly-once"
            } else {
                "at-least-once"
            },
            self.interval_ms
        )
    }

    /// The TOML put before the run's config.
    fn config(&self) -> String {
        let mut text = format!("[pipeline]\ncommit_interval_ms = {}\n", self.interval_ms);
        if self.exactly_once {
            text += &format!(
                "\n[delivery]\nmode = \"exactly-once\"\ntransactional_id = \"bench-{}\"\n",
                uuid::Uuid::new_v4().simple()
            );
        }
        text
    }
}

pub(super) async fn run(args: &BenchArgs, topic: &str, echo: &Path, sink: &OtlpSink) -> Result<()> {
    let modes: Vec<Mode> = [100, 1000]
        .into_iter()
        .flat_map(|interval_ms| {
            [false, true].map(|exactly_once| Mode {
                exactly_once,
                interval_ms,
            })
        })
        .collect();
    // Per round: the passthrough's rate and each mode's.
    let mut rounds: Vec<(f64, Vec<f64>)> = Vec::new();
    for round in 0..args.delivery_rounds {
        let mut order: Vec<Option<usize>> = std::iter::once(None)
            .chain((0..modes.len()).map(Some))
            .collect();
        if round % 2 == 1 {
            order.reverse();
        }
        let mut rates = vec![0.0; modes.len()];
        let mut base = 0.0;
        for m in order {
            match m {
                None => {
                    base = passthrough(&args.brokers, topic, args.events).await?.rate();
                    eprintln!(
                        "delivery round {}: passthrough {base:.0} events/s",
                        round + 1
                    );
                }
                Some(i) => {
                    let extra = modes[i].config();
                    let run = weir(args, topic, echo, ECHO, sink, Some(&extra), &[]).await?;
                    rates[i] = run.rate();
                    eprintln!(
                        "delivery round {}: {} {:.0} events/s",
                        round + 1,
                        modes[i].name(),
                        rates[i]
                    );
                }
            }
        }
        rounds.push((base, rates));
    }
    println!(
        "\ndelivery modes ({} events, {} rounds, orders alternating; share of the same round's passthrough):\n",
        args.events, args.delivery_rounds
    );
    println!("| variant | events/s | share of passthrough |");
    println!("|---|---:|---:|");
    for (i, m) in modes.iter().enumerate() {
        let rates: Vec<f64> = rounds.iter().map(|(_, r)| r[i]).collect();
        let shares: Vec<f64> = rounds.iter().map(|(b, r)| 100.0 * r[i] / b).collect();
        if let (Some((lo, hi)), Some((slo, shi))) = (range(&rates), range(&shares)) {
            println!("| {} | {lo:.0}-{hi:.0} | {slo:.0}-{shi:.0} % |", m.name());
        }
    }
    for interval_ms in [100, 1000] {
        let at = |eos: bool| {
            modes
                .iter()
                .position(|m| m.exactly_once == eos && m.interval_ms == interval_ms)
                .expect("a mode")
        };
        let (alo, eos) = (at(false), at(true));
        let costs: Vec<f64> = rounds
            .iter()
            .map(|(_, r)| 100.0 * (1.0 - r[eos] / r[alo]))
            .collect();
        if let Some((lo, hi)) = range(&costs) {
            println!(
                "exactly-once cost at {interval_ms} ms (1 - exactly-once/at-least-once, each round): \
                 {lo:.1} % to {hi:.1} %, median {:.1} %",
                median(&costs)
            );
        }
    }
    if args.latency_secs == 0 {
        return Ok(());
    }
    // The same paced load through each mode at 100 ms: half of what the
    // slower of them moved at most.
    let eos_rates: Vec<f64> = rounds.iter().map(|(_, r)| r[1]).collect();
    let rate = args.latency_rate.unwrap_or(median(&eos_rates) / 2.0);
    println!(
        "\nend-to-end latency (input handed to the producer → output received by a read_committed reader), \
         echo at {rate:.0} events/s ({}) for {} s, commit interval 100 ms:",
        if args.latency_rate.is_some() {
            "--latency-rate"
        } else {
            "half of exactly-once's median at 100 ms"
        },
        args.latency_secs
    );
    for eos in [false, true] {
        let mode = Mode {
            exactly_once: eos,
            interval_ms: 100,
        };
        let q = latency::run(args, echo, rate, Some(&mode.config()), true, false).await?;
        println!(
            "- {}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} events)",
            mode.name(),
            q.p50_ms,
            q.p99_ms,
            q.max_ms,
            q.events
        );
    }
    Ok(())
}
