//! Running `weir`: config files for it, the process with its log, one-shot
//! commands and the idempotency store it leaves.

use super::*;

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
    pub async fn stop(self, timeout: Duration) -> Result<(ExitStatus, Vec<String>)> {
        let pid = self.child.id().context("weir already exited")?;
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc_kill(pid as i32, 15) };
        self.exit(timeout, "weir did not exit after SIGTERM").await
    }

    /// Waits for the process to exit by itself; returns the status with
    /// every log line.
    pub async fn wait_exit(self, timeout: Duration) -> Result<(ExitStatus, Vec<String>)> {
        self.exit(timeout, "weir did not exit").await
    }

    /// Waits up to `timeout` for the exit (else fails with `late`), then
    /// for the log reader to reach the end of the stream.
    async fn exit(
        mut self,
        timeout: Duration,
        late: &'static str,
    ) -> Result<(ExitStatus, Vec<String>)> {
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .context(late)??;
        // The reader ends at the end of the stream: every line is in.
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
