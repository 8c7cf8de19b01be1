//! `weir bench`: throughput and handling latency against a real broker,
//! beside two raw librdkafka baselines over the same topic (consume-only,
//! and a consume→produce passthrough), run first and last; the table gives
//! each Weir run as a share of its baseline.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::config::Config;
use crate::pipeline::Stats;

/// Options of `weir bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Bootstrap servers of a real broker.
    #[arg(long, default_value = "127.0.0.1:19092")]
    brokers: String,
    /// Events to produce and consume.
    #[arg(long, default_value_t = 100_000)]
    events: usize,
    /// Partitions of the benchmark topic.
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Folder with `echo.wasm`.
    #[arg(long, default_value = "target/wasm32-wasip2/release")]
    plugins: PathBuf,
    /// Rounds: each runs every variant, in the opposite order of the one
    /// before, so a drift over the run favours none (0: only the latency
    /// runs, at `--latency-rate`).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Only the Weir variants whose name contains this text, or the one
    /// so named; may be given more than once (the baselines always run).
    #[arg(long)]
    only: Vec<String>,
    /// Seconds of paced load of each end-to-end latency run: the raw
    /// passthrough and Weir, twice each in alternating order (0: none).
    #[arg(long, default_value_t = 5)]
    latency_secs: u64,
    /// Events/s of the latency run (default: half of echo's median rate).
    #[arg(long)]
    latency_rate: Option<f64>,
    /// TOML put before every Weir run's config (e.g. to measure other
    /// `[pipeline]` or `[kafka.producer_options]` settings); printed.
    #[arg(long)]
    extra_config: Option<String>,
    /// Hot swaps to measure (the stall around each, under a paced load,
    /// and echo's throughput with a swap a second vs none); 0: none.
    #[arg(long, default_value_t = 0)]
    swaps: usize,
    /// Events/s of the paced load of the swap run.
    #[arg(long, default_value_t = 10_000.0)]
    swap_rate: f64,
    /// A large component whose start-up is timed compiled vs read from
    /// the compile cache.
    #[arg(long)]
    startup: Option<PathBuf>,
    /// Rounds of the rebalance measure: a second `weir run` joins a busy
    /// one, with each group protocol (eager, cooperative, consumer); 0: none.
    #[arg(long, default_value_t = 0)]
    rebalances: usize,
    /// Restore time of a changelog partition holding this many marks
    /// (comma-separated counts, e.g. 10000,100000,1000000).
    #[arg(long, value_delimiter = ',')]
    restore_marks: Vec<usize>,
    /// Rounds of the delivery-mode measure: echo at-least-once vs
    /// exactly-once, with commit intervals of 100 ms and 1 s, beside the
    /// passthrough, then each mode's end-to-end latency; 0: none.
    #[arg(long, default_value_t = 0)]
    delivery_rounds: usize,
    /// Rounds of the handler-state measure: a stateless trivial handler vs
    /// `state-counter` (one get and one set per event); 0: none.
    #[arg(long, default_value_t = 0)]
    state_rounds: usize,
    /// Restore time of one partition's handler state holding this many
    /// keys (comma-separated counts, e.g. 10000,100000).
    #[arg(long, value_delimiter = ',')]
    restore_state: Vec<usize>,
}

mod baselines;
mod batch;
mod delivery;
mod deploys;
mod fleet;
mod latency;
mod load;
mod micro;
mod report;
mod state;
mod variant;

use baselines::{baseline, passthrough};
use load::{create_topics, produce, sample};
use micro::OtlpSink;
use report::{median, print_runs, range};
use variant::{Variant, ECHO};

/// One measured run.
struct Run {
    seconds: f64,
    /// CPU time of this process (all threads) during the run, set by the caller.
    cpu_seconds: f64,
    events: usize,
    p50_us: Option<u64>,
    p99_us: Option<u64>,
}

impl Run {
    /// A run of `events` started at `started`, without latencies (the
    /// caller measures its CPU).
    fn since(started: Instant, events: usize) -> Run {
        Run {
            seconds: started.elapsed().as_secs_f64(),
            cpu_seconds: 0.0,
            events,
            p50_us: None,
            p99_us: None,
        }
    }

    fn rate(&self) -> f64 {
        self.events as f64 / self.seconds
    }

    fn cpu_us_per_event(&self) -> f64 {
        self.cpu_seconds * 1e6 / self.events as f64
    }
}

/// User and system CPU time of this process so far, from `/proc/self/stat`
/// (0 where there is none).
fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces): utime is the
    // 12th, stime the 13th, in clock ticks (100 per second on Linux).
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Runs the benchmark and prints a table; deletes its topics at the end.
pub async fn run(args: BenchArgs) -> Result<()> {
    let brokers = args.brokers.clone();
    // Interrupted, it still deletes what it made.
    let result = tokio::select! {
        r = measure(args) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    match load::delete_made(&brokers).await {
        Ok(n) if n > 0 => println!("\ndeleted the {n} topics left of this run"),
        Ok(_) => {}
        Err(e) => eprintln!("cannot delete this run's topics: {e:#}"),
    }
    result
}

async fn measure(args: BenchArgs) -> Result<()> {
    let echo = args.plugins.join("echo.wasm");
    if !echo.is_file() {
        bail!(
            "{} is missing: build the plugins first (./dev plugins)",
            echo.display()
        );
    }
    let topic = format!("bench-{}", uuid::Uuid::new_v4().simple());
    create_topics(
        &args.brokers,
        &[
            (topic.clone(), args.partitions),
            (format!("{topic}.out"), args.partitions),
            (format!("{topic}.raw"), args.partitions),
        ],
        &[],
    )
    .await?;

    let started = Instant::now();
    produce(&args.brokers, &topic, args.events).await?;
    let produce_secs = started.elapsed().as_secs_f64();
    println!(
        "produced {} events (~{} bytes each) to {topic} ({} partitions) in {produce_secs:.2} s",
        args.events,
        sample(0).len(),
        args.partitions
    );

    if let Some(extra) = &args.extra_config {
        println!("every Weir run's config starts with:\n{extra}");
    }
    let sink = OtlpSink::start().await?;
    let variants: Vec<Variant> = Variant::all()
        .into_iter()
        .filter(|v| {
            // A name given whole selects that variant alone.
            let exact = |o: &str| Variant::all().iter().any(|w| w.name() == o);
            v.baseline().is_none()
                || args.only.is_empty()
                || args.only.iter().any(|o| {
                    if exact(o) {
                        v.name() == *o
                    } else {
                        v.name().contains(o.as_str())
                    }
                })
        })
        .collect();
    // Every round runs every variant; odd rounds in reverse order.
    let mut runs: Vec<(usize, Variant, Run)> = Vec::new();
    if args.rounds > 0 {
        // The first reader of a fresh topic is slower (the broker's reads
        // warm up): one read before the measured ones, not counted.
        baseline(&args.brokers, &topic, args.events).await?;
    }
    for round in 0..args.rounds {
        let order: Vec<Variant> = if round % 2 == 0 {
            variants.clone()
        } else {
            variants.iter().rev().copied().collect()
        };
        for v in order {
            let cpu = process_cpu_seconds();
            let run = match v {
                Variant::ConsumeOnly => baseline(&args.brokers, &topic, args.events).await?,
                Variant::Passthrough => passthrough(&args.brokers, &topic, args.events).await?,
                Variant::Weir { .. } => {
                    weir(
                        &args,
                        &topic,
                        &echo,
                        v,
                        &sink,
                        args.extra_config.as_deref(),
                        &[],
                    )
                    .await?
                }
            };
            let run = match v {
                Variant::Weir { .. } => run,
                _ => Run {
                    cpu_seconds: process_cpu_seconds() - cpu,
                    ..run
                },
            };
            eprintln!(
                "round {}: {} {:.0} events/s, {:.1} µs of CPU per event",
                round + 1,
                v.name(),
                run.rate(),
                run.cpu_us_per_event()
            );
            runs.push((round, v, run));
        }
    }
    print_runs(&variants, &runs);

    let rate_of = |round: usize, v: Variant| {
        runs.iter()
            .find(|(r, w, _)| *r == round && *w == v)
            .map(|(_, _, run)| run.rate())
    };
    let rounds = args.rounds;
    for (what, on) in [("echo", true), ("trivial handler", false)] {
        let off = Variant::Weir {
            outputs: on,
            dedup: false,
            metrics: true,
            spans: None,
        };
        let with = Variant::Weir {
            outputs: on,
            dedup: true,
            metrics: true,
            spans: None,
        };
        let costs: Vec<f64> = (0..rounds)
            .filter_map(|r| Some(100.0 * (1.0 - rate_of(r, with)? / rate_of(r, off)?)))
            .collect();
        if let Some((lo, hi)) = range(&costs) {
            println!(
                "idempotency cost, {what} (1 - on/off, each round): {lo:.1} % to {hi:.1} % over {} rounds",
                costs.len()
            );
        }
    }

    let echo_rates: Vec<f64> = runs
        .iter()
        .filter(|(_, v, _)| *v == ECHO)
        .map(|(_, _, r)| r.rate())
        .collect();
    let latency_rate = args
        .latency_rate
        .or((!echo_rates.is_empty()).then(|| median(&echo_rates) / 2.0));
    if let (true, Some(rate)) = (args.latency_secs > 0, latency_rate) {
        // What the rounds made but their input goes first (unless later
        // parts use it): with the rounds' outputs still there, even the
        // passthrough's p99 was hundreds of milliseconds (likely the broker
        // writing them back to disk).
        if args.delivery_rounds == 0 && args.state_rounds == 0 {
            match load::delete_made_except(&args.brokers, &[topic.as_str()]).await {
                Ok(n) => println!("\ndeleted the {n} topics of the rounds but their input"),
                Err(e) => eprintln!("cannot delete the rounds' topics: {e:#}"),
            }
        }
        // Beside the machine's floor at the same rate (the raw
        // passthrough), alternating, so a drift favours neither.
        for raw in [true, false, false, true] {
            let extra = args.extra_config.as_deref().filter(|_| !raw);
            latency::run(&args, &echo, rate, extra, false, raw).await?;
        }
    }
    if args.swaps > 0 {
        deploys::run(&args, &echo, args.swaps, args.swap_rate).await?;
    }
    if let Some(file) = &args.startup {
        let file = file.clone();
        let rounds = args.rounds;
        tokio::task::spawn_blocking(move || deploys::startup(&file, rounds)).await??;
    }
    if args.rebalances > 0 {
        fleet::rebalances(&args, &echo, args.rebalances).await?;
    }
    if !args.restore_marks.is_empty() {
        fleet::restore(&args, &args.restore_marks).await?;
    }
    if args.delivery_rounds > 0 {
        delivery::run(&args, &topic, &echo, &sink).await?;
    }
    if args.state_rounds > 0 {
        state::run(&args, &topic, &sink, args.state_rounds).await?;
    }
    if !args.restore_state.is_empty() {
        state::restore(&args, &args.restore_state).await?;
    }

    micro::print(&args, &echo, &sink).await?;
    batch::print(&args.plugins, 20_000, 3)
}

/// A `weir run` config for the echo handler on `topic`, written to a file
/// in `dir` and read back the way `weir run` reads it.
fn echo_config(
    brokers: &str,
    topic: &str,
    echo: &std::path::Path,
    v: Variant,
    otlp: &str,
    extra: Option<&str>,
    dir: &std::path::Path,
) -> Result<Config> {
    let Variant::Weir {
        outputs,
        dedup,
        metrics,
        spans,
    } = v
    else {
        bail!("not a Weir variant");
    };
    let mut text = format!(
        "[kafka]\nbrokers = {brokers:?}\ngroup_id = {:?}\nauto_offset_reset = \"earliest\"\n\n\
         [idempotency]\nenabled = {dedup}\npath = \"idempotency\"\n\n\
         [metrics]\nenabled = {metrics}\nlisten = \"127.0.0.1:0\"\n\n",
        load::group_id("weir")
    );
    if let Some(ratio) = spans {
        text += &format!("[tracing]\notlp_endpoint = {otlp:?}\nsample_ratio = {ratio}\n\n");
    }
    text += &format!(
        "[[handler]]\nname = \"echo\"\nwasm = {:?}\ntopics = [{topic:?}]\n\n\
         [handler.config]\ndiscard = \"{}\"\noutput_topic = \"{topic}.out\"\n",
        echo.display().to_string(),
        !outputs
    );
    if let Some(extra) = extra {
        text = format!("{extra}\n{text}");
    }
    let path = dir.join("weir.toml");
    std::fs::write(&path, text)?;
    Config::load(&path)
}

/// `weir run` from a config file (what `weir run --config` runs, metrics
/// endpoint and on-disk store included) until every event is final.
async fn weir(
    args: &BenchArgs,
    topic: &str,
    echo: &std::path::Path,
    v: Variant,
    sink: &OtlpSink,
    extra: Option<&str>,
    handler_config: &[(&str, &str)],
) -> Result<Run> {
    let dir = tempfile::tempdir()?;
    let mut config = echo_config(&args.brokers, topic, echo, v, &sink.url, extra, dir.path())?;
    for (k, v) in handler_config {
        config.handlers[0]
            .config
            .insert(k.to_string(), v.to_string());
    }
    let stats = Arc::new(Stats {
        handle_micros: Some(Mutex::new(hdrhistogram::Histogram::new(3)?)),
        ..Stats::default()
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    let task = {
        let stats = stats.clone();
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            crate::service::run(&runtime, config, stats, async {
                let _ = stop_rx.await;
            })
        })
    };
    // Timed from the subscription, like the baselines (start-up, handler
    // compilation and shutdown are outside), CPU over the same span.
    let n = args.events as u64;
    let mut cpu_from = None;
    while stats.events_final.load(Ordering::Relaxed) < n {
        if task.is_finished() || started.elapsed() > Duration::from_secs(600) {
            bail!("the pipeline stopped before handling {n} events");
        }
        if cpu_from.is_none() && stats.subscribed.get().is_some() {
            cpu_from = Some(process_cpu_seconds());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let cpu_seconds = process_cpu_seconds() - cpu_from.unwrap_or_default();
    let seconds = stats
        .subscribed
        .get()
        .map_or(started.elapsed(), |t| t.elapsed())
        .as_secs_f64();
    let _ = stop_tx.send(());
    task.await??;
    let hist = stats
        .handle_micros
        .as_ref()
        .expect("histogram")
        .lock()
        .unwrap()
        .clone();
    Ok(Run {
        seconds,
        cpu_seconds,
        events: args.events,
        p50_us: Some(hist.value_at_quantile(0.5)),
        p99_us: Some(hist.value_at_quantile(0.99)),
    })
}
