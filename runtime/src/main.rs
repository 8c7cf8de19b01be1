use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tracing::info;

use weir::config::Config;
use weir::handler::PluginEngine;
use weir::pipeline::Stats;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Runs sandboxed WebAssembly event handlers on Kafka.
#[derive(Parser)]
#[command(name = "weir", version)]
struct Cli {
    /// Log lines as JSON objects instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join the consumer group and handle events until SIGINT/SIGTERM.
    Run {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and load its handlers, then exit.
    Check {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Inspect the idempotency store (the runtime must be stopped).
    Idempotency {
        #[command(subcommand)]
        command: IdempotencyCommand,
    },
    /// Work with dead-letter topics.
    Dlq {
        #[command(subcommand)]
        command: weir::replay::DlqCommand,
    },
    /// Create a handler project (Rust, Python or JavaScript) that builds,
    /// tests and runs as it is.
    New(weir::scaffold::NewArgs),
    /// Run a component against sample events, without Kafka, and print
    /// what it would publish.
    Try(weir::runner::TryArgs),
    /// Run the example pipeline (or your component) on an in-process mock
    /// Kafka cluster.
    Dev(weir::dev::DevArgs),
    /// Measure throughput and handling latency against a real broker.
    Bench(weir::bench::BenchArgs),
}

#[derive(Subcommand)]
enum IdempotencyCommand {
    /// Print every unexpired mark as `handler<TAB>event id<TAB>marked at (ms)`.
    List {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() {
    let cli = Cli::parse();
    init_logging(cli.log_json, matches!(cli.command, Command::Dev(_)));
    // A panic is logged like every other line (JSON with --log-json), with
    // its thread (a partition worker is named weir-<topic>-<partition>).
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        tracing::error!(
            panic = %weir::halt::panic_text(info.payload()),
            location = %info.location().map(ToString::to_string).unwrap_or_default(),
            thread = thread.name().unwrap_or("unnamed"),
            "panic"
        );
    }));
    if let Err(e) = real_main(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn init_logging(json: bool, dev: bool) {
    let default = if dev { "warn,weir::dev=info" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn real_main(cli: Cli) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match cli.command {
        Command::Check { config } => {
            let config = Config::load(&config)?;
            let engine = PluginEngine::new()?;
            for h in weir::load_handlers(&engine, &config)? {
                println!(
                    "ok: handler {} version {} on {:?}",
                    h.name,
                    h.version,
                    h.topics()
                );
            }
            Ok(())
        }
        Command::Run { config } => {
            let config = Config::load(&config)?;
            weir::service::run(
                runtime.handle(),
                config,
                Arc::new(Stats::default()),
                shutdown_signal(),
            )
        }
        Command::Idempotency {
            command: IdempotencyCommand::List { config },
        } => {
            let config = Config::load(&config)?;
            let store =
                weir::dedup::Dedup::open(&config.idempotency.path, config.idempotency.retention())?;
            use std::io::Write;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            for (handler, id, at) in store.marks() {
                writeln!(out, "{handler}\t{id}\t{at}")?;
            }
            Ok(())
        }
        Command::Dlq { command } => runtime.block_on(weir::replay::run(command)),
        Command::New(args) => {
            let dir = weir::scaffold::run(&args)?;
            println!("created {} (see its README.md)", dir.display());
            Ok(())
        }
        Command::Try(args) => {
            if !weir::runner::run(&args)? {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Dev(args) => runtime.block_on(weir::dev::run(args)),
        Command::Bench(args) => runtime.block_on(weir::bench::run(args)),
    }
}

/// Resolves on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
        _ = term.recv() => info!("SIGTERM received"),
    }
}
