//! The watched plugin folder (`[plugins] watch = true`): replacing a
//! handler's `.wasm` file (write a new file, rename it over the old one)
//! deploys it. Changes are debounced: a file is deployed once it has been
//! quiet for `plugins.watch_debounce_ms`.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{handlers_of_file, Deployer};

/// Keeps the watch alive; dropping it stops watching.
pub struct PluginWatch {
    _watcher: notify::RecommendedWatcher,
}

/// Watches the folders of every handler's component.
pub fn start(deployer: Arc<Deployer>, debounce: Duration) -> Result<PluginWatch> {
    let (tx, rx) = mpsc::unbounded_channel::<PathBuf>();
    let mut watcher =
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
            Ok(e) if e.kind.is_create() || e.kind.is_modify() => {
                for p in e.paths {
                    let _ = tx.send(p);
                }
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "plugin folder watch error"),
        })
        .context("plugins.watch: cannot watch the plugin folders")?;
    let folders: BTreeSet<PathBuf> = deployer
        .config()
        .handlers
        .iter()
        .filter_map(|h| h.wasm.parent().map(|p| p.to_owned()))
        .collect();
    for folder in &folders {
        let folder = if folder.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            folder.clone()
        };
        watcher
            .watch(&folder, RecursiveMode::NonRecursive)
            .with_context(|| format!("plugins.watch: cannot watch {}", folder.display()))?;
        info!(folder = %folder.display(), "watching for new handler versions");
    }
    tokio::spawn(debounced(deployer, rx, debounce));
    Ok(PluginWatch { _watcher: watcher })
}

async fn debounced(
    deployer: Arc<Deployer>,
    mut rx: mpsc::UnboundedReceiver<PathBuf>,
    quiet: Duration,
) {
    let mut changed: HashMap<PathBuf, tokio::time::Instant> = HashMap::new();
    loop {
        let next_due = changed.values().min().copied();
        let path = match next_due {
            None => rx.recv().await,
            Some(due) => match tokio::time::timeout_at(due, rx.recv()).await {
                Ok(p) => p,
                Err(_) => {
                    let now = tokio::time::Instant::now();
                    let ready: Vec<PathBuf> = changed
                        .iter()
                        .filter(|(_, d)| **d <= now)
                        .map(|(p, _)| p.clone())
                        .collect();
                    for p in ready {
                        changed.remove(&p);
                        deploy_file(&deployer, &p).await;
                    }
                    continue;
                }
            },
        };
        let Some(path) = path else { return };
        changed.insert(path, tokio::time::Instant::now() + quiet);
    }
}

async fn deploy_file(deployer: &Arc<Deployer>, path: &std::path::Path) {
    let names = handlers_of_file(&deployer.config(), path);
    if names.is_empty() {
        debug!(file = %path.display(), "changed file is no handler's component");
        return;
    }
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            warn!(file = %path.display(), error = %e, "cannot read a changed component");
            return;
        }
    };
    for name in names {
        // Refusals are logged and counted by the deploy itself.
        let _ = deployer
            .deploy(&name, bytes.clone(), path.display().to_string(), true)
            .await;
    }
}
