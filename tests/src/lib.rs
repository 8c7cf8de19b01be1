//! Harness for the end-to-end tests: a real Kafka broker (started by
//! `scripts/kafka.sh`, address in `WEIR_TEST_BROKERS`), the real `weir`
//! binary, and the example plugins built for wasm32-wasip2.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::process::{Child, Command};

/// The broker the tests run against.
pub fn brokers() -> String {
    std::env::var("WEIR_TEST_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

/// `<target>/<profile>`: where this test binary and `weir` were built.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // <target>/<profile>/deps/<test>
    exe.parent()
        .and_then(|d| d.parent())
        .expect("target layout")
        .to_path_buf()
}

/// The `weir` binary under test.
pub fn weir_bin() -> PathBuf {
    let bin = std::env::var_os("WEIR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| profile_dir().join("weir"));
    assert!(
        bin.is_file(),
        "{} is missing: build it first (`cargo build -p weir`, or run `./dev test`)",
        bin.display()
    );
    bin
}

/// A plugin component, e.g. `plugin("echo")`.
pub fn plugin(name: &str) -> PathBuf {
    let dir = std::env::var_os("WEIR_PLUGINS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            profile_dir()
                .parent()
                .unwrap()
                .join("wasm32-wasip2/release")
        });
    let path = dir.join(format!("{}.wasm", name.replace('-', "_")));
    assert!(
        path.is_file(),
        "{} is missing: build the plugins first (`./dev plugins`)",
        path.display()
    );
    path
}

/// A name no other test or run uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

fn admin() -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin client")
}

/// Creates a topic and waits until its partitions have leaders.
pub async fn create_topic(name: &str, partitions: i32) -> Result<()> {
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let res = admin()
        .create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &opts,
        )
        .await?;
    for r in res {
        r.map_err(|(t, e)| anyhow::anyhow!("cannot create topic {t}: {e}"))?;
    }
    let consumer = base_consumer(None);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let md = consumer.fetch_metadata(Some(name), Duration::from_secs(5))?;
        let ready = md.topics().iter().any(|t| {
            t.partitions().len() == partitions as usize
                && t.partitions().iter().all(|p| p.leader() >= 0)
        });
        if ready {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("topic {name} has no leaders after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates a topic with topic-level configs (e.g. `max.message.bytes`).
pub async fn create_topic_with(name: &str, configs: &[(&str, &str)]) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()?;
    let mut topic = NewTopic::new(name, 1, TopicReplication::Fixed(1));
    for (k, v) in configs {
        topic = topic.set(k, v);
    }
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for r in admin.create_topics(&[topic], &opts).await? {
        r.map_err(|(t, e)| anyhow::anyhow!("cannot create topic {t}: {e}"))?;
    }
    // Wait for the leader through the harness's own check.
    await_leader(name).await
}

pub async fn await_leader(name: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while end_offsets(name, 1).is_err() {
        if tokio::time::Instant::now() > deadline {
            bail!("topic {name} has no leader after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Every record of `topic` a consumer with `isolation` (`read_committed`
/// or `read_uncommitted`) sees, read from the beginning to the end of each
/// partition (transaction markers and aborted records leave holes in the
/// offsets, so the end is found by the client, not counted).
pub fn read_isolated(topic: &str, isolation: &str) -> Result<Vec<OwnedMessage>> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", "weir-e2e-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", isolation)
        .create()?;
    let partitions = assign_from_start(&c, topic)?;
    let mut out = Vec::new();
    let mut at_end = std::collections::HashSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while (at_end.len() as i32) < partitions {
        if std::time::Instant::now() > deadline {
            bail!(
                "{topic}: {} of {partitions} partitions read to the end in 60 s",
                at_end.len()
            );
        }
        match c.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => out.push(m.detach()),
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                at_end.insert(p);
            }
            Some(Err(e)) => return Err(e.into()),
            None => {}
        }
    }
    Ok(out)
}

/// A record to produce.
#[derive(Debug, Clone, Default)]
pub struct In {
    pub key: Option<String>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl In {
    /// A record with a JSON envelope.
    pub fn envelope(
        key: &str,
        id: &str,
        correlation: &str,
        event_type: &str,
        payload: serde_json::Value,
    ) -> In {
        let value = serde_json::json!({
            "schemaVersion": "1", "eventType": event_type, "id": id,
            "timestamp": "2026-01-01T00:00:00Z", "correlationId": correlation, "payload": payload,
        });
        In {
            key: Some(key.into()),
            value: serde_json::to_vec(&value).unwrap(),
            headers: vec![("content-type".into(), b"application/json".to_vec())],
        }
    }

    /// A record claiming a JSON envelope with a body that is not one.
    pub fn malformed(key: &str, body: &[u8]) -> In {
        In {
            key: Some(key.into()),
            value: body.to_vec(),
            headers: vec![("content-type".into(), b"application/json".to_vec())],
        }
    }
}

/// Produces records in order and waits for every acknowledgement.
pub async fn produce(topic: &str, records: &[In]) -> Result<()> {
    produce_generated(topic, records.len(), |i| records[i].clone()).await
}

fn base_consumer(group: Option<&str>) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group.unwrap_or("weir-e2e-reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer")
}

/// High watermarks of every partition.
pub fn end_offsets(topic: &str, partitions: i32) -> Result<Vec<i64>> {
    let c = base_consumer(None);
    (0..partitions)
        .map(|p| Ok(c.fetch_watermarks(topic, p, Duration::from_secs(5))?.1))
        .collect()
}

/// The group's committed offsets (0 where nothing was committed, which is
/// where a partition that never had a record stands).
pub fn committed(group: &str, topic: &str, partitions: i32) -> Result<Vec<i64>> {
    let c = base_consumer(Some(group));
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let tpl = c.committed_offsets(tpl, Duration::from_secs(10))?;
    Ok((0..partitions)
        .map(|p| match tpl.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => 0,
        })
        .collect())
}

/// Waits until the group has committed every partition to its end.
pub async fn await_committed_to_end(
    group: &str,
    topic: &str,
    partitions: i32,
    timeout: Duration,
) -> Result<()> {
    let end = end_offsets(topic, partitions)?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let c = committed(group, topic, partitions)?;
        if c == end {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("group {group} committed {c:?} on {topic}, end offsets are {end:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Assigns every partition of `topic` from its beginning: how many.
fn assign_from_start(c: &BaseConsumer, topic: &str) -> Result<i32> {
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(30))?;
    let partitions = md
        .topics()
        .first()
        .map(|t| t.partitions().len())
        .unwrap_or(0) as i32;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    Ok(partitions)
}

/// Every record now in `topic`, read from the beginning to the end offsets.
pub fn read_all(topic: &str) -> Result<Vec<OwnedMessage>> {
    let c = base_consumer(None);
    let partitions = assign_from_start(&c, topic)?;
    let ends = end_offsets(topic, partitions)?;
    let expected: i64 = ends.iter().sum();
    let mut out = Vec::with_capacity(expected as usize);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while (out.len() as i64) < expected {
        if std::time::Instant::now() > deadline {
            bail!("read {} of {expected} records of {topic}", out.len());
        }
        if let Some(m) = c.poll(Duration::from_millis(500)) {
            out.push(m?.detach());
        }
    }
    Ok(out)
}

/// `n` envelopes `evt-0`.. `evt-{n-1}`, keyed over 97 keys, for tests that
/// count outputs per event id.
pub fn numbered_events(n: usize) -> Vec<In> {
    (0..n)
        .map(|i| {
            In::envelope(
                &format!("k{}", i % 97),
                &format!("evt-{i}"),
                "c",
                "t",
                serde_json::json!({"i": i}),
            )
        })
        .collect()
}

/// A fresh input topic named from `prefix`, its `.out` topic (both with
/// `partitions`) and a fresh group: (input, output, group).
pub async fn fresh_topics(prefix: &str, partitions: i32) -> Result<(String, String, String)> {
    let input = unique(&format!("{prefix}-in"));
    let output = format!("{input}.out");
    create_topic(&input, partitions).await?;
    create_topic(&output, partitions).await?;
    Ok((input, output, unique(&format!("{prefix}-group"))))
}

/// SplitMix64: every random choice of a test from one seed, so a failing
/// run can be repeated with `WEIR_TEST_SEED` (printed by [`seed`]).
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..bound`.
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }
}

/// The seed of a randomized test: `WEIR_TEST_SEED`, else the clock; printed
/// with how to repeat the run.
pub fn seed(test: &str) -> u64 {
    let seed = match std::env::var("WEIR_TEST_SEED") {
        Ok(v) => v
            .trim()
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("WEIR_TEST_SEED={v:?} is not a u64")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    };
    println!("{test} seed={seed} (rerun with WEIR_TEST_SEED={seed})");
    seed
}

/// One record of a group's idempotency changelog (as the runtime writes it).
#[derive(serde::Deserialize)]
struct MarkBatch {
    keys: Vec<serde_bytes::ByteBuf>,
}

/// The event ids marked in `group`'s idempotency changelog, each with the
/// timestamp (ms, set by the instance that wrote it) of the first record
/// that marked it.
pub fn changelog_marks(group: &str) -> Result<HashMap<String, i64>> {
    let mut marks: HashMap<String, i64> = HashMap::new();
    for m in read_all(&format!("{group}.weir-idempotency"))? {
        let batch: MarkBatch = rmp_serde::from_slice(m.payload().unwrap_or_default())?;
        let at = m.timestamp().to_millis().unwrap_or(0);
        for k in batch.keys {
            let id = k.splitn(2, |b| *b == 0).nth(1).unwrap_or_default();
            let id = String::from_utf8_lossy(id).into_owned();
            let first = marks.entry(id).or_insert(at);
            *first = (*first).min(at);
        }
    }
    Ok(marks)
}

/// The partitions an instance's log says it was assigned, in order, as
/// `(topic, partition)` lists (one per "partitions assigned" line).
pub fn assignments(log: &[String]) -> Vec<Vec<(String, i32)>> {
    log.iter()
        .filter(|l| l.contains("partitions assigned"))
        .map(|l| {
            let list = l
                .split("list=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or("");
            list.split(',')
                .filter_map(|tp| {
                    let (t, p) = tp.rsplit_once('/')?;
                    Some((t.to_owned(), p.parse().ok()?))
                })
                .collect()
        })
        .collect()
}

/// Waits until `topic` holds at least `n` records.
pub async fn await_records(topic: &str, partitions: i32, n: i64, timeout: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let total: i64 = end_offsets(topic, partitions)?.iter().sum();
        if total >= n {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{topic} holds {total} records, expected at least {n}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A header of a record as text.
pub fn header(m: &OwnedMessage, name: &str) -> Option<String> {
    m.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// The `causation-id` of each record: which input event it came from.
pub fn causation_ids(records: &[OwnedMessage]) -> Vec<String> {
    records
        .iter()
        .map(|m| header(m, "causation-id").expect("a causation-id header"))
        .collect()
}

/// A handler table for a config file.
pub struct HandlerSpec {
    pub name: String,
    pub plugin: String,
    pub topics: Vec<String>,
    pub extra: String,
    pub config: BTreeMap<String, String>,
}

impl HandlerSpec {
    pub fn new(name: &str, plugin: &str, topic: &str) -> HandlerSpec {
        HandlerSpec {
            name: name.into(),
            plugin: plugin.into(),
            topics: vec![topic.into()],
            extra: String::new(),
            config: BTreeMap::new(),
        }
    }
    pub fn config(mut self, k: &str, v: &str) -> Self {
        self.config.insert(k.into(), v.into());
        self
    }
    /// Extra `key = value` lines in the handler table.
    pub fn extra(mut self, line: &str) -> Self {
        self.extra.push_str(line);
        self.extra.push('\n');
        self
    }
}

/// A config file for `group` with `handlers`.
pub fn config_toml(group: &str, handlers: &[HandlerSpec]) -> String {
    let mut s = format!(
        "[kafka]\nbrokers = {:?}\ngroup_id = {group:?}\n\n[kafka.consumer_options]\n\n[pipeline]\ncommit_interval_ms = 200\n\n[metrics]\nlisten = \"127.0.0.1:0\"\nlag_interval_ms = 200\n",
        brokers()
    );
    for h in handlers {
        s.push_str(&format!(
            "\n[[handler]]\nname = {:?}\nwasm = {:?}\ntopics = {:?}\n{}",
            h.name,
            plugin(&h.plugin).display().to_string(),
            h.topics,
            h.extra
        ));
        if !h.config.is_empty() {
            s.push_str("[handler.config]\n");
            for (k, v) in &h.config {
                s.push_str(&format!("{k} = {v:?}\n"));
            }
        }
    }
    s
}

/// A running `weir run` process with its config in a temporary folder.
pub struct Weir {
    child: Child,
    _dir: tempfile::TempDir,
    log: Arc<Mutex<Vec<String>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Weir {
    /// Starts `weir run` on a config text.
    pub fn start(config: &str) -> Result<Weir> {
        Self::start_with_env(config, &[])
    }

    /// Starts `weir run` with extra environment variables.
    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Result<Weir> {
        Self::spawn(config, env, false)
    }

    /// Starts `weir --log-json run`: every log line a JSON object.
    pub fn start_json(config: &str) -> Result<Weir> {
        Self::spawn(config, &[], true)
    }

    /// [`Weir::start_json`] with extra environment variables.
    pub fn start_json_with_env(config: &str, env: &[(&str, &str)]) -> Result<Weir> {
        Self::spawn(config, env, true)
    }

    fn spawn(config: &str, env: &[(&str, &str)], json: bool) -> Result<Weir> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("weir.toml");
        std::fs::write(&path, config)?;
        let mut child = Command::new(weir_bin())
            .args(json.then_some("--log-json"))
            .arg("run")
            .arg("--config")
            .arg(&path)
            .env(
                "WEIR_LOG",
                std::env::var("WEIR_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start weir")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = log.clone();
        // The runtime's log is kept for assertions; echoed only on request.
        let echo = std::env::var_os("WEIR_TEST_ECHO_LOG").is_some();
        let reader = tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if echo {
                    eprintln!("weir| {line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        Ok(Weir {
            child,
            _dir: dir,
            log,
            reader,
        })
    }

    /// The log lines written so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Resident memory of the process in KiB (from /proc).
    pub fn rss_kib(&self) -> Option<u64> {
        let pid = self.child.id()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    /// Waits until a log line contains `needle`.
    pub async fn await_log(&mut self, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(l) = self.log().into_iter().find(|l| l.contains(needle)) {
                return Ok(l);
            }
            if !self.running() {
                bail!("weir exited before logging {needle:?}");
            }
            if tokio::time::Instant::now() > deadline {
                bail!("weir did not log {needle:?} within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The config file it runs on (a reload test edits it).
    pub fn config_path(&self) -> std::path::PathBuf {
        self._dir.path().join("weir.toml")
    }

    /// Sends signal `sig` (e.g. 1 for SIGHUP).
    pub fn signal(&self, sig: i32) -> Result<()> {
        let pid = self.child.id().context("weir already exited")?;
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc_kill(pid as i32, sig) };
        Ok(())
    }

    /// The address of the admin API (its port is picked at start and logged).
    pub async fn admin_addr(&mut self) -> Result<String> {
        self.logged_address("serving the admin API").await
    }

    /// The address of the metrics and health server (its port is picked
    /// at start and logged).
    pub async fn http_addr(&mut self) -> Result<String> {
        self.logged_address("serving /metrics").await
    }

    async fn logged_address(&mut self, needle: &str) -> Result<String> {
        let line = self.await_log(needle, Duration::from_secs(60)).await?;
        let addr = match serde_json::from_str::<serde_json::Value>(&line) {
            Ok(json) => json["fields"]["address"].as_str().map(str::to_owned),
            Err(_) => line
                .split("address=")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .map(str::to_owned),
        };
        addr.with_context(|| format!("no address in {line:?}"))
    }

    /// SIGTERM, waits for the exit, and returns the status with every log line.
    pub async fn stop(mut self, timeout: Duration) -> Result<(ExitStatus, Vec<String>)> {
        let pid = self.child.id().context("weir already exited")?;
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc_kill(pid as i32, 15) };
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .context("weir did not exit after SIGTERM")??;
        // The reader ends at the end of the stream: every line is in.
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.reader).await;
        let lines = self.log.lock().unwrap().clone();
        Ok((status, lines))
    }

    /// Waits for the process to exit by itself; returns the status with
    /// every log line.
    pub async fn wait_exit(mut self, timeout: Duration) -> Result<(ExitStatus, Vec<String>)> {
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .context("weir did not exit")??;
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.reader).await;
        let lines = self.log.lock().unwrap().clone();
        Ok((status, lines))
    }

    /// SIGTERM, then waits for the exit.
    pub async fn terminate(mut self, timeout: Duration) -> Result<ExitStatus> {
        let pid = self.child.id().context("weir already exited")?;
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc_kill(pid as i32, 15) };
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .context("weir did not exit after SIGTERM")?
            .map_err(Into::into)
    }

    /// SIGKILL: no chance to finish or commit anything.
    pub async fn kill(mut self) -> Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// True while the process runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// Runs `weir <args>` to completion and returns (success, stderr).
pub fn run_weir(args: &[&str]) -> (bool, String) {
    let (ok, _, stderr) = run_weir_output(args);
    (ok, stderr)
}

/// Runs `weir <args>` to completion and returns (success, stdout, stderr).
pub fn run_weir_output(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(weir_bin())
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("running weir");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Adds an `[idempotency]` table keeping the store in `dir`.
pub fn with_store(config: String, dir: &std::path::Path, retention_secs: u64) -> String {
    format!(
        "{config}\n[idempotency]\npath = {:?}\nretention_secs = {retention_secs}\n",
        dir.display().to_string()
    )
}

/// Writes a config file into `dir` and returns its path.
pub fn write_config(dir: &std::path::Path, text: &str) -> String {
    let path = dir.join("weir.toml");
    std::fs::write(&path, text).expect("writing a config");
    path.display().to_string()
}

/// The idempotency marks of a stopped runtime: (handler, event id) pairs.
pub fn marks(config_path: &str) -> Vec<(String, String)> {
    let (ok, stdout, stderr) = run_weir_output(&["idempotency", "list", "--config", config_path]);
    assert!(ok, "weir idempotency list failed: {stderr}");
    stdout
        .lines()
        .filter_map(|l| {
            let mut parts = l.split('\t');
            Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
        })
        .collect()
}

/// GET `http://{addr}{path}`: (status, body).
pub async fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    let resp = reqwest::get(format!("http://{addr}{path}")).await?;
    let status = resp.status().as_u16();
    Ok((status, resp.text().await?))
}

/// A parsed Prometheus text exposition.
#[derive(Debug)]
pub struct Scrape {
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
    pub text: String,
}

impl Scrape {
    /// Fetches and parses `/metrics`.
    pub async fn fetch(addr: &str) -> Result<Scrape> {
        let (status, text) = http_get(addr, "/metrics").await?;
        if status != 200 {
            bail!("/metrics answered {status}: {text}");
        }
        Self::parse(&text)
    }

    /// Parses `name{label="value",...} number` lines; comments are skipped.
    pub fn parse(text: &str) -> Result<Scrape> {
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        {
            let (series, value) = line
                .rsplit_once(' ')
                .with_context(|| format!("bad sample line {line:?}"))?;
            let value: f64 = value
                .parse()
                .with_context(|| format!("bad value in {line:?}"))?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').context("unclosed labels")?;
                    let mut labels = BTreeMap::new();
                    for pair in body.split("\",").filter(|p| !p.is_empty()) {
                        let (k, v) = pair.split_once("=\"").context("bad label")?;
                        labels.insert(k.to_owned(), v.trim_end_matches('"').to_owned());
                    }
                    (name, labels)
                }
                None => (series, BTreeMap::new()),
            };
            samples.push((name.to_owned(), labels, value));
        }
        Ok(Scrape {
            samples,
            text: text.to_owned(),
        })
    }

    /// The sum of the samples of `name` whose labels include `labels`
    /// (None when there is no such sample).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = self
            .samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| *v)
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    }

    /// Every sample of `name`: (labels, value).
    pub fn series(&self, name: &str) -> Vec<(&BTreeMap<String, String>, f64)> {
        self.samples
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, l, v)| (l, *v))
            .collect()
    }
}

/// A span as the OTLP receiver decoded it.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub service: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub name: String,
    /// The OTLP span kind (2 server, 3 client, 4 producer, 5 consumer, 1 internal).
    pub kind: i32,
    pub attributes: BTreeMap<String, String>,
    /// OTLP status code: 0 unset, 1 ok, 2 error.
    pub status_code: i32,
    pub status_message: String,
    pub events: Vec<String>,
}

/// An OTLP/HTTP receiver: decodes the protobuf `ExportTraceServiceRequest`s
/// posted to `/v1/traces` and keeps their spans.
pub struct OtlpReceiver {
    /// `http://127.0.0.1:port` (no path: the runtime adds `/v1/traces`).
    pub endpoint: String,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

impl OtlpReceiver {
    pub async fn start() -> Result<OtlpReceiver> {
        use opentelemetry_proto::tonic::collector::trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
        };
        use prost::Message as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let spans = Arc::new(Mutex::new(Vec::new()));
        let sink = spans.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let sink = sink.clone();
                async move {
                    let Ok(req) = ExportTraceServiceRequest::decode(body) else {
                        return (axum::http::StatusCode::BAD_REQUEST, Vec::new());
                    };
                    let mut out = sink.lock().unwrap();
                    for rs in req.resource_spans {
                        let service = rs
                            .resource
                            .iter()
                            .flat_map(|r| r.attributes.iter())
                            .find(|a| a.key == "service.name")
                            .map(|a| any_value_text(a.value.as_ref()))
                            .unwrap_or_default();
                        for s in rs.scope_spans.into_iter().flat_map(|ss| ss.spans) {
                            let status = s.status.unwrap_or_default();
                            out.push(ReceivedSpan {
                                service: service.clone(),
                                trace_id: hex(&s.trace_id),
                                span_id: hex(&s.span_id),
                                parent_span_id: hex(&s.parent_span_id),
                                name: s.name,
                                kind: s.kind,
                                attributes: s
                                    .attributes
                                    .iter()
                                    .map(|a| (a.key.clone(), any_value_text(a.value.as_ref())))
                                    .collect(),
                                status_code: status.code,
                                status_message: status.message,
                                events: s.events.into_iter().map(|e| e.name).collect(),
                            });
                        }
                    }
                    (
                        axum::http::StatusCode::OK,
                        ExportTraceServiceResponse::default().encode_to_vec(),
                    )
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(OtlpReceiver { endpoint, spans })
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn any_value_text(v: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    match v.and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

/// Produces `n` records made by `make(i)`, in order, and waits for every
/// acknowledgement. Each record is made only when it is sent and the
/// client's send queue is capped (64 MiB), so a flood larger than the test
/// should hold in memory costs it only that queue.
pub async fn produce_generated(
    topic: &str,
    n: usize,
    mut make: impl FnMut(usize) -> In,
) -> Result<()> {
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("enable.idempotence", "true")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .set("queue.buffering.max.kbytes", "65536")
        .create()?;
    let mut futures = Vec::with_capacity(n);
    for i in 0..n {
        let r = make(i);
        let mut headers = OwnedHeaders::new();
        for (k, v) in &r.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let mut rec = FutureRecord::to(topic).payload(&r.value).headers(headers);
        if let Some(k) = &r.key {
            rec = rec.key(k);
        }
        loop {
            match producer.send_result(rec) {
                Ok(f) => {
                    futures.push(f);
                    break;
                }
                // The send queue is full: wait for acknowledgements to free it.
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    rec = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => bail!("cannot produce record {i} to {topic}: {e}"),
            }
        }
    }
    for f in futures {
        f.await?.map_err(|(e, _)| e)?;
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(())
}

/// A counter of the runtime's last `progress` log line (e.g. `handled`,
/// `duplicates`, `outputs`); `weir` writes one at shutdown, so after
/// `Weir::stop` this is the final count.
pub fn progress_counter(log: &[String], name: &str) -> u64 {
    let field = format!("{name}=");
    let line = log
        .iter()
        .rev()
        .find(|l| l.contains("progress") && l.contains("final_events="))
        .expect("a progress line in the log");
    let at = line
        .split(|c: char| c.is_whitespace() || c == ',' || c == '{')
        .find_map(|word| word.strip_prefix(&field))
        .unwrap_or_else(|| panic!("no {name} counter in {line:?}"));
    at.trim_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .unwrap_or_else(|_| panic!("{name} is not a number in {line:?}"))
}

/// README.md's code blocks, compiled by `cargo test --doc -p weir-e2e` so
/// that the handler example ("Writing a handler") cannot drift from the
/// SDK: every ```` ```rust ```` block (and untagged one) is a doctest, a
/// ```` ```rust,test_harness ```` block is built as a test crate and its
/// `#[test]`s run. Lives here, not in the SDK, so that `cargo package -p
/// weir-sdk` does not need a file outside the crate.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
