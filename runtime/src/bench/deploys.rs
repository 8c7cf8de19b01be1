//! What deploys cost (`weir bench --swaps N`): the stall a hot swap causes
//! and the throughput with a swap every second, both through the admin
//! API of a running service; and (`--startup FILE`) the start-up of a
//! large component compiled vs read from the compile cache.
//!
//! The stall of a swap is the largest gap between consecutive outputs of
//! an output partition (broker append times, `LogAppendTime`) in the
//! half second around it, under a steady paced load; the same is measured
//! at instants half-way between swaps, as the control.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use rdkafka::TopicPartitionList;

use super::load::{create_topics, produce, send_sample, timed_topics};
use super::{echo_config, median, range, BenchArgs, ECHO};
use crate::pipeline::Stats;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

/// Another version of a component (a custom section added), same code.
fn tagged(component: &[u8], tag: u8) -> Vec<u8> {
    let content = [&[4u8][..], b"weir", &[tag]].concat();
    let mut out = component.to_vec();
    out.extend_from_slice(&[0, content.len() as u8]);
    out.extend_from_slice(&content);
    out
}

/// A running service with the admin API on a free port.
struct Service {
    admin: String,
    token: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<()>>,
    stats: Arc<Stats>,
    _dir: tempfile::TempDir,
}

impl Service {
    fn start(args: &BenchArgs, topic: &str, out: &str, echo: &Path) -> Result<Service> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let token = uuid::Uuid::new_v4().simple().to_string();
        std::fs::write(dir.path().join("token"), &token)?;
        let admin = format!(
            "[admin]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\ntoken_file = \"token\"\n"
        );
        let extra = format!("{}\n{admin}", args.extra_config.as_deref().unwrap_or(""));
        let mut config = echo_config(
            &args.brokers,
            topic,
            echo,
            ECHO,
            "",
            Some(&extra),
            dir.path(),
        )?;
        config.handlers[0]
            .config
            .insert("output_topic".into(), out.to_owned());
        let stats = Arc::new(Stats::default());
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Handle::current();
        let s = stats.clone();
        let task = tokio::task::spawn_blocking(move || {
            crate::service::run(&runtime, config, s, async {
                let _ = stop_rx.await;
            })
        });
        Ok(Service {
            admin: format!("http://127.0.0.1:{port}"),
            token,
            stop,
            task,
            stats,
            _dir: dir,
        })
    }

    async fn deploy(&self, bytes: Vec<u8>) -> Result<()> {
        let resp = reqwest::Client::new()
            .put(format!("{}/handlers/echo", self.admin))
            .bearer_auth(&self.token)
            .body(bytes)
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("deploy refused: {}", resp.text().await.unwrap_or_default());
        }
        Ok(())
    }

    async fn stop(self) -> Result<()> {
        let _ = self.stop.send(());
        self.task.await?
    }

    fn finished(&self) -> u64 {
        self.stats
            .events_final
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Runs the swap measurements and prints them.
pub(super) async fn run(args: &BenchArgs, echo: &Path, swaps: usize, rate: f64) -> Result<()> {
    let v1 = std::fs::read(echo)?;
    let versions = [tagged(&v1, 1), tagged(&v1, 2)];
    stall(args, echo, &versions, swaps, rate).await?;
    throughput(args, echo, &versions).await
}

/// Paced load, a swap a second: the largest output gap around each swap.
async fn stall(
    args: &BenchArgs,
    echo: &Path,
    versions: &[Vec<u8>; 2],
    swaps: usize,
    rate: f64,
) -> Result<()> {
    let (topic, out) = timed_topics(args, "bench-swap").await?;
    let service = Service::start(args, &topic, &out, echo)?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("partitioner", "murmur2_random")
        .create()?;
    let total = ((swaps as f64 + 3.0) * rate) as usize;
    let started = Instant::now();
    let mut swap_times = Vec::new();
    let mut acks = Vec::with_capacity(total);
    let mut next_swap = started + Duration::from_millis(1500);
    let mut deploy: Option<tokio::task::JoinHandle<Result<i64>>> = None;
    let service = Arc::new(service);
    for i in 0..total {
        let due = started + Duration::from_secs_f64(i as f64 / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        acks.push(send_sample(&producer, &topic, i)?);
        if swap_times.len() < swaps && Instant::now() >= next_swap && deploy.is_none() {
            let bytes = versions[swap_times.len() % 2].clone();
            let s = service.clone();
            deploy = Some(tokio::spawn(async move {
                s.deploy(bytes).await?;
                Ok(now_ms())
            }));
            next_swap += Duration::from_secs(1);
        }
        if deploy.as_ref().is_some_and(|d| d.is_finished()) {
            swap_times.push(deploy.take().expect("checked").await??);
        }
    }
    if let Some(d) = deploy.take() {
        swap_times.push(d.await??);
    }
    for a in acks {
        a.await?.map_err(|(e, _)| e)?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while service.finished() < total as u64 {
        if Instant::now() > deadline {
            bail!("the service did not finish the paced load");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Arc::into_inner(service)
        .context("deploys finished")?
        .stop()
        .await?;

    let times = append_times(&args.brokers, &out, args.partitions, total)?;
    let gap_at = |t: i64| -> f64 {
        times
            .iter()
            .map(|p| {
                let w: Vec<i64> = p
                    .iter()
                    .copied()
                    .filter(|x| (t - 200..t + 300).contains(x))
                    .collect();
                w.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0)
            })
            .max()
            .unwrap_or(0) as f64
    };
    let around: Vec<f64> = swap_times.iter().map(|t| gap_at(*t)).collect();
    let control: Vec<f64> = swap_times.iter().map(|t| gap_at(t + 500)).collect();
    let q = |v: &[f64], p: f64| -> f64 {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
    };
    println!(
        "\nhot swaps under a paced load of {rate:.0} events/s ({} partitions), {} swaps one second apart:",
        args.partitions,
        around.len()
    );
    if around.is_empty() {
        return Ok(());
    }
    println!(
        "  largest gap between outputs of a partition within -200/+300 ms of a swap: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        q(&around, 0.5),
        q(&around, 0.99),
        q(&around, 1.0)
    );
    println!(
        "  the same half-way between swaps (control): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        q(&control, 0.5),
        q(&control, 0.99),
        q(&control, 1.0)
    );
    Ok(())
}

/// The append times of every output, per partition, sorted.
fn append_times(brokers: &str, topic: &str, partitions: i32, n: usize) -> Result<Vec<Vec<i64>>> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "bench-swap-reader")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    let mut times = vec![Vec::new(); partitions as usize];
    let mut seen = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen < n && Instant::now() < deadline {
        if let Some(m) = c.poll(Duration::from_millis(200)) {
            let m = m?;
            if let Some(t) = m.timestamp().to_millis() {
                times[m.partition() as usize].push(t);
                seen += 1;
            }
        }
    }
    for t in &mut times {
        t.sort_unstable();
    }
    Ok(times)
}

/// The backlog at full speed, without swaps and with one a second, in
/// alternating order.
async fn throughput(args: &BenchArgs, echo: &Path, versions: &[Vec<u8>; 2]) -> Result<()> {
    let topic = format!("bench-swap-rate-{}", uuid::Uuid::new_v4().simple());
    let out = format!("{topic}.out");
    create_topics(
        &args.brokers,
        &[
            (topic.clone(), args.partitions),
            (out.clone(), args.partitions),
        ],
        &[],
    )
    .await?;
    produce(&args.brokers, &topic, args.events).await?;
    let mut plain = Vec::new();
    let mut swapping = Vec::new();
    for round in 0..args.rounds.max(2) * 2 {
        let swap = (round % 2 == 1) ^ (round / 2 % 2 == 1);
        let service = Service::start(args, &topic, &out, echo)?;
        let n = args.events as u64;
        while service.stats.subscribed.get().is_none() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let from = *service.stats.subscribed.get().expect("subscribed");
        let mut next = Instant::now() + Duration::from_secs(1);
        let mut deployed = 0;
        while service.finished() < n {
            if from.elapsed() > Duration::from_secs(600) {
                bail!("the service did not finish {n} events");
            }
            if swap && Instant::now() >= next {
                service.deploy(versions[deployed % 2].clone()).await?;
                deployed += 1;
                next += Duration::from_secs(1);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let rate = n as f64 / from.elapsed().as_secs_f64();
        service.stop().await?;
        eprintln!(
            "swap throughput run {}: {} {rate:.0} events/s ({deployed} swaps)",
            round + 1,
            if swap {
                "one swap a second"
            } else {
                "no swaps"
            }
        );
        if swap {
            swapping.push(rate)
        } else {
            plain.push(rate)
        }
    }
    let (Some(a), Some(b)) = (range(&plain), range(&swapping)) else {
        return Ok(());
    };
    println!(
        "  echo throughput, no swaps: {:.0}-{:.0} events/s (median {:.0}); one swap a second: {:.0}-{:.0} (median {:.0}); ratio of medians {:.2}",
        a.0, a.1, median(&plain), b.0, b.1, median(&swapping), median(&swapping) / median(&plain)
    );
    Ok(())
}

/// Start-up of a large component, compiled vs read from the compile cache.
pub(super) fn startup(file: &Path, rounds: usize) -> Result<()> {
    use crate::handler::{LoadedHandler, PluginEngine};
    let cfg: crate::config::HandlerConfig = toml::from_str(&format!(
        "name = \"startup\"\nwasm = {:?}\ntopics = [\"t\"]\n",
        file.display().to_string()
    ))?;
    let size = std::fs::metadata(file)?.len();
    let dir = tempfile::tempdir()?;
    let cached =
        PluginEngine::new()?.with_cache(crate::compile_cache::CompileCache::open(dir.path())?);
    // Fill the cache once.
    LoadedHandler::load(&cached, &cfg)?;
    let (mut compiled, mut from_cache) = (Vec::new(), Vec::new());
    for round in 0..rounds.max(2) * 2 {
        let use_cache = (round % 2 == 0) ^ (round / 2 % 2 == 1);
        let engine = if use_cache {
            cached.clone()
        } else {
            PluginEngine::new()?
        };
        let t = Instant::now();
        LoadedHandler::load(&engine, &cfg)?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        if use_cache {
            from_cache.push(ms)
        } else {
            compiled.push(ms)
        }
    }
    let (a, b) = (
        range(&compiled).unwrap_or_default(),
        range(&from_cache).unwrap_or_default(),
    );
    println!(
        "\nstart-up of {} ({:.1} MB): compiled {:.0}-{:.0} ms, from the compile cache {:.0}-{:.0} ms ({} runs each)",
        file.display(),
        size as f64 / 1e6,
        a.0, a.1, b.0, b.1,
        compiled.len()
    );
    Ok(())
}
