use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tracing::info;

use weir::config::Config;
use weir::deploy::admin::AdminTarget;
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
    /// Read a handler's state (from the state changelog), or reset it.
    State {
        #[command(subcommand)]
        command: weir::state::cli::StateCommand,
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
    /// Deploy a new version of a handler to a running instance (admin API).
    Deploy {
        #[command(flatten)]
        target: AdminTarget,
        /// The handler's name.
        name: String,
        /// The component.
        file: PathBuf,
    },
    /// Put a handler back on its previous version (admin API).
    Rollback {
        #[command(flatten)]
        target: AdminTarget,
        /// The handler's name.
        name: String,
    },
    /// List a running instance's handlers and versions (admin API).
    Handlers {
        #[command(flatten)]
        target: AdminTarget,
    },
    /// Make a running instance re-read its config file (admin API; SIGHUP
    /// does the same).
    Reload {
        #[command(flatten)]
        target: AdminTarget,
    },
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

/// The memory settings that keep latency steady (docs/benchmarks.md,
/// "huge pages"): no transparent huge pages, so a first touch zeroes 4 KiB
/// rather than 2 MiB (and the kernel never compacts memory to find one in
/// the middle of a fault), and freed memory kept at least 30 s before it
/// goes back to the OS, so a steady load does not fault the same pages in
/// again and again (`MIMALLOC_PURGE_DELAY` in the environment still
/// wins). Returns the error of the huge-page switch, if any.
fn tune_memory() -> std::io::Result<()> {
    /// `mi_option_purge_delay` in mimalloc's `mi_option_e` (v2 and v3).
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: called first in `main`, before any other thread exists
        // (mimalloc's options are not thread safe to set); it takes effect
        // at the next purge.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 30_000) };
    }
    // SAFETY: PR_SET_THP_DISABLE only changes how this process's (and its
    // children's) page faults are served.
    #[cfg(target_os = "linux")]
    if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn main() {
    let memory = tune_memory();
    let cli = Cli::parse();
    init_logging(cli.log_json, matches!(cli.command, Command::Dev(_)));
    if let Err(e) = memory {
        tracing::warn!(error = %e, "cannot turn transparent huge pages off for this process");
    }
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
        Command::State { command } => {
            if !weir::state::cli::run(command)? {
                std::process::exit(1);
            }
            Ok(())
        }
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
        Command::Deploy { target, name, file } => {
            let d = target.deploy(&name, &file)?;
            match d.result.as_str() {
                "unchanged" => println!("{name}: version {} is already serving", d.version),
                _ => println!(
                    "{name}: version {} serving (previous {}), {} in {} ms",
                    d.version,
                    d.previous_version.as_deref().unwrap_or("none"),
                    if d.cached {
                        "from the compile cache"
                    } else {
                        "compiled"
                    },
                    d.load_ms
                ),
            }
            Ok(())
        }
        Command::Rollback { target, name } => {
            let (from, to) = target.rollback(&name)?;
            println!("{name}: rolled back from {from} to {to}");
            Ok(())
        }
        Command::Handlers { target } => {
            for h in target.handlers()? {
                println!(
                    "{}\tversion {}\tprevious {}\t{}\thandled {}\tfailed {}\tsince {}{}",
                    h.name,
                    h.version,
                    h.previous_version.as_deref().unwrap_or("-"),
                    h.state,
                    h.events_handled,
                    h.events_failed,
                    h.loaded_at,
                    h.last_change.map(|c| format!("\t{c}")).unwrap_or_default()
                );
            }
            Ok(())
        }
        Command::Reload { target } => {
            let r = target.reload()?;
            println!(
                "reloaded: changed {:?}, added {:?}, removed {:?}",
                r.changed, r.added, r.removed
            );
            if !r.needs_restart.is_empty() {
                println!(
                    "changed sections that apply at the next start: {:?}",
                    r.needs_restart
                );
            }
            Ok(())
        }
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
