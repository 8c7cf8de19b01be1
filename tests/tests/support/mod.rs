//! Helpers of the deploy tests (`deploys.rs`, `reloads.rs`): a plugin
//! folder, versions of a component, the admin API.
#![allow(dead_code)] // each test file uses some of them

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use weir_e2e::*;

pub const TOKEN: &str = "e2e-admin-token-0123456789";

/// A folder with a copy of a plugin (the file the watch and deploys
/// replace), the admin token file and the compile cache.
pub struct Plugins {
    dir: tempfile::TempDir,
}

impl Plugins {
    pub fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("token"), format!("{TOKEN}\n"))?;
        Ok(Self { dir })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Copies plugin `plugin` to `<dir>/<file>`.
    pub fn copy(&self, plugin_name: &str, file: &str) -> Result<PathBuf> {
        let to = self.path(file);
        std::fs::copy(plugin(plugin_name), &to)?;
        Ok(to)
    }

    /// Replaces `file` as a deploy tool would: write a new file, rename it over.
    pub fn replace(&self, file: &str, bytes: &[u8]) -> Result<()> {
        let tmp = self.path(&format!(".{file}.tmp"));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, self.path(file))?;
        Ok(())
    }

    /// A config whose handlers' components are in this folder, with the
    /// admin API (port picked at start) and the compile cache here.
    pub fn config(&self, group: &str, handlers: &[HandlerSpec], extra: &str) -> String {
        let mut text = config_toml(group, handlers);
        for h in handlers {
            // Handlers in order: the first path still unreplaced is this one's.
            text = text.replacen(
                &format!("{:?}", plugin(&h.plugin).display().to_string()),
                &format!(
                    "{:?}",
                    self.path(&format!("{}.wasm", h.name)).display().to_string()
                ),
                1,
            );
        }
        format!(
            "{text}\n[admin]\nenabled = true\nlisten = \"127.0.0.1:0\"\ntoken_file = {:?}\nmax_body_mib = 1\n\n\
             [plugins]\ncache_dir = {:?}\n{extra}",
            self.path("token").display().to_string(),
            self.path("compiled").display().to_string(),
        )
    }

    /// `weir <command>` aimed at the admin API on `addr`.
    pub fn cli(&self, command: &str, addr: &str) -> Vec<String> {
        vec![
            command.into(),
            "--admin".into(),
            format!("http://{addr}"),
            "--token-file".into(),
            self.path("token").display().to_string(),
        ]
    }
}

/// The version Weir names a component by: the first 12 hex digits of its SHA-256.
pub fn version_of(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The same component with a custom section added: another version that
/// behaves the same.
pub fn variant(component: &[u8], tag: &str) -> Vec<u8> {
    pub fn leb(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let name = b"weir-test-variant";
    let mut content = Vec::new();
    leb(name.len(), &mut content);
    content.extend_from_slice(name);
    content.extend_from_slice(tag.as_bytes());
    let mut out = component.to_vec();
    out.push(0);
    leb(content.len(), &mut out);
    out.extend_from_slice(&content);
    out
}

/// An admin API request: (status, JSON body).
pub async fn admin(
    method: &str,
    addr: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> Result<(u16, Value)> {
    let client = reqwest::Client::new();
    let url = format!("http://{addr}{path}");
    let mut req = match method {
        "GET" => client.get(&url),
        "PUT" => client.put(&url),
        _ => client.post(&url),
    };
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if let Some(b) = body {
        req = req.body(b);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let text = resp.text().await?;
    Ok((
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    ))
}

/// The serving version of handler `name`.
pub async fn serving(addr: &str, name: &str) -> Result<Value> {
    let (status, list) = admin("GET", addr, "/handlers", Some(TOKEN), None).await?;
    anyhow::ensure!(status == 200, "GET /handlers: {status} {list}");
    list.as_array()
        .and_then(|l| l.iter().find(|h| h["name"] == name))
        .cloned()
        .with_context(|| format!("no handler {name} in {list}"))
}

pub async fn await_version(addr: &str, name: &str, version: &str) -> Result<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let h = serving(addr, name).await?;
        if h["version"] == version {
            return Ok(h);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "handler {name} still at {} (waiting for {version})",
            h["version"]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn events(from: usize, to: usize) -> Vec<In> {
    (from..to)
        .map(|i| {
            In::envelope(
                &format!("k{i}"),
                &format!("evt-{i}"),
                "c",
                "tick",
                json!({"i": i}),
            )
        })
        .collect()
}

pub fn total(v: Vec<i64>) -> i64 {
    v.into_iter().filter(|o| *o > 0).sum()
}
