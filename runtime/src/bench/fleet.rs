//! The fleet's costs: how long a rebalance takes to settle with each group
//! protocol when a second `weir run` joins a busy first one
//! (`--rebalances N`), and how long a new owner takes to restore a
//! partition's idempotency marks from the changelog, by their number
//! (`--restore-marks 10000,100000,1000000`).

use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::load::{create_topics, produce};
use super::{median, BenchArgs};
use crate::changelog::Changelog;
use crate::config::Config;
use crate::dedup::{self, Dedup};
use crate::fence::Fence;
use crate::halt::Halt;
use crate::publish::Publisher;
use rdkafka::producer::DeliveryFuture;

const PROTOCOLS: [&str; 3] = ["eager", "cooperative", "consumer"];

/// `weir run` as a child process, its log lines kept with when they came.
struct Instance {
    child: Child,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    _dir: tempfile::TempDir,
}

impl Instance {
    fn start(config: &str) -> Result<Instance> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("weir.toml");
        std::fs::write(&path, config)?;
        let mut child = Command::new(std::env::current_exe()?)
            .arg("run")
            .arg("--config")
            .arg(&path)
            .env("WEIR_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start weir run")?;
        let lines: Arc<Mutex<Vec<(Instant, String)>>> = Default::default();
        let stderr = child.stderr.take().context("piped stderr")?;
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(|l| l.ok())
            {
                sink.lock().unwrap().push((Instant::now(), line));
            }
        });
        Ok(Instance {
            child,
            lines,
            _dir: dir,
        })
    }

    /// When the first line after `after` containing every one of `needles`
    /// came (waits up to 60 s).
    fn await_line(&self, needles: &[&str], after: Instant) -> Result<Instant> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some((t, _)) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|(t, l)| *t >= after && needles.iter().all(|n| l.contains(n)))
            {
                return Ok(*t);
            }
            if Instant::now() > deadline {
                bail!("no log line with {needles:?} within 60 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn stop(mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { kill(self.child.id() as i32, 15) };
        let _ = self.child.wait();
    }
}

extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

/// Per protocol, the time from the second instance's subscription to its
/// first partitions, over `rounds` rounds in alternating order.
pub(super) async fn rebalances(args: &BenchArgs, echo: &Path, rounds: usize) -> Result<()> {
    println!(
        "\nrebalance: a second `weir run` joins one busy with a backlog ({} partitions); \
         settle = from its subscription to its first partitions",
        args.partitions.max(8)
    );
    let mut settle: Vec<(&str, Vec<f64>)> = PROTOCOLS.iter().map(|p| (*p, Vec::new())).collect();
    for round in 0..rounds {
        let mut order: Vec<usize> = (0..PROTOCOLS.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let ms = one_rebalance(args, echo, PROTOCOLS[i]).await?;
            println!("  round {round} {:<12} settled in {ms:.0} ms", PROTOCOLS[i]);
            settle[i].1.push(ms);
        }
    }
    println!("| group protocol | settle, ms (min-max) | median |");
    println!("|---|---:|---:|");
    for (p, v) in &settle {
        let min = v.iter().cloned().fold(f64::MAX, f64::min);
        let max = v.iter().cloned().fold(0.0, f64::max);
        println!("| {p} | {min:.0}-{max:.0} | {:.0} |", median(v));
    }
    Ok(())
}

async fn one_rebalance(args: &BenchArgs, echo: &Path, protocol: &str) -> Result<f64> {
    let partitions = args.partitions.max(8);
    let topic = format!("bench-rebalance-{}", uuid::Uuid::new_v4().simple());
    create_topics(
        &args.brokers,
        &[
            (topic.clone(), partitions),
            (format!("{topic}.out"), partitions),
        ],
        &[],
    )
    .await?;
    produce(&args.brokers, &topic, 20_000).await?;
    // 1 ms an event: the instance is busy when the second one joins.
    let config = format!(
        "[kafka]\nbrokers = {:?}\ngroup_id = \"{topic}-group\"\ngroup_protocol = {protocol:?}\n\n\
         [metrics]\nlisten = \"127.0.0.1:0\"\n\n\
         [[handler]]\nname = \"echo\"\nwasm = {:?}\ntopics = [{topic:?}]\n\n\
         [handler.config]\ndelay_ms = \"1\"\noutput_topic = \"{topic}.out\"\n",
        args.brokers,
        echo.display().to_string()
    );
    let first = Instance::start(&config)?;
    let t = Instant::now();
    first.await_line(&["partitions assigned", &format!("list={topic}")], t)?;
    first.await_line(&["idempotency marks restored"], t)?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let second = Instance::start(&config)?;
    let t = Instant::now();
    let subscribed = second.await_line(&["consuming"], t)?;
    let assigned = second.await_line(&["partitions assigned", &format!("list={topic}")], t)?;
    first.stop();
    second.stop();
    Ok(assigned.duration_since(subscribed).as_secs_f64() * 1000.0)
}

/// Restore time of one changelog partition holding `n` marks (in batches
/// of 512, as finalizers write them), into an empty store; two runs each.
pub(super) async fn restore(args: &BenchArgs, counts: &[usize]) -> Result<()> {
    println!("\nrestore: one changelog partition's marks into an empty store");
    println!("| marks | restore, ms (two runs) | marks/s |");
    println!("|---:|---:|---:|");
    for &n in counts {
        let group = super::load::group_id("restore");
        let config = Config::parse(&format!(
            "[kafka]\nbrokers = {:?}\ngroup_id = {group:?}\n",
            args.brokers
        ))?;
        let changelog = Changelog::open(&config, None).await?;
        let (halt, _halted) = Halt::new(Default::default());
        let publisher = Publisher::new(&config, halt, None)?;
        let keys: Vec<Vec<u8>> = (0..n)
            .map(|i| dedup::key("echo", &format!("bench-{i}")))
            .collect();
        let mut acks = Vec::new();
        for chunk in keys.chunks(512) {
            let iter = || chunk.iter().map(Vec::as_slice);
            acks.extend(enqueue(|| changelog.write(&publisher, 0, iter(), dedup::now_ms())).await);
        }
        for a in acks {
            a.await?.map_err(|(e, _)| e)?;
        }
        print_restores(n, |dir| {
            let store = Dedup::open(dir, Duration::from_secs(3600))?;
            let fence = Fence::default();
            let (stop, health) = (Default::default(), Default::default());
            let r = tokio::task::block_in_place(|| {
                changelog.restore(&store, None, ("", 0), &fence, &stop, &health)
            })
            .context("restore")?;
            if r.marks != n as u64 {
                bail!("restored {} marks of {n}", r.marks);
            }
            Ok(r.took)
        })?;
    }
    Ok(())
}

/// Enqueues a changelog record, waiting while the producer's queue is full:
/// its delivery (None when refused for good).
pub(super) async fn enqueue(
    mut send: impl FnMut() -> Result<Option<DeliveryFuture>, Duration>,
) -> Option<DeliveryFuture> {
    loop {
        match send() {
            Ok(ack) => return ack,
            Err(wait) => tokio::time::sleep(wait).await,
        }
    }
}

/// Times two restores of `n` entries (each into an empty store in a fresh
/// folder, by `restore`, which checks them) and prints the table row.
pub(super) fn print_restores(
    n: usize,
    mut restore: impl FnMut(&Path) -> Result<Duration>,
) -> Result<()> {
    let mut took = Vec::new();
    for _ in 0..2 {
        let dir = tempfile::tempdir()?;
        took.push(restore(dir.path())?.as_secs_f64() * 1000.0);
    }
    let best = took.iter().cloned().fold(f64::MAX, f64::min);
    println!(
        "| {n} | {:.0}, {:.0} | {:.0} |",
        took[0],
        took[1],
        n as f64 / (best / 1000.0)
    );
    Ok(())
}
