//! The versions of each handler: the one serving, the previous one kept
//! for rollback, and the watch of a new version's first events.
//!
//! Partition workers read a slot's generation (one atomic load) before
//! each event attempt and take the current version when it changed, so a
//! swap lands between two attempts and each attempt is handled wholly by
//! one version.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{bail, Result};
use serde::Serialize;
use time::OffsetDateTime;
use tracing::{info, warn};

use crate::config::RolloutConfig;
use crate::handler::LoadedHandler;
use crate::metrics::Metrics;

/// Every handler's slot, in config order.
#[derive(Default)]
pub struct Registry {
    slots: RwLock<Vec<Arc<Slot>>>,
}

impl Registry {
    pub fn new(handlers: Vec<Arc<LoadedHandler>>, metrics: Option<Arc<Metrics>>) -> Self {
        let r = Registry::default();
        r.replace(
            handlers
                .into_iter()
                .map(|h| Arc::new(Slot::new(h, None, metrics.clone())))
                .collect(),
        );
        r
    }

    /// The slots now.
    pub fn slots(&self) -> Vec<Arc<Slot>> {
        self.slots.read().unwrap().clone()
    }

    pub fn get(&self, name: &str) -> Option<Arc<Slot>> {
        self.slots
            .read()
            .unwrap()
            .iter()
            .find(|s| s.name == name)
            .cloned()
    }

    /// Replaces the set of slots (a reload that adds or removes handlers).
    pub fn replace(&self, slots: Vec<Arc<Slot>>) {
        *self.slots.write().unwrap() = slots;
    }
}

/// Why the serving version changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// A new version deployed (watched, when the handler has a rollout).
    Deploy,
    /// New settings for the same or another version (a reload).
    Reload,
    /// Back to the previous version, by hand.
    Rollback,
}

/// One handler's versions.
pub struct Slot {
    pub name: String,
    generation: AtomicU64,
    /// Outcomes of the serving version's events since it took over.
    handled: AtomicU64,
    failed: AtomicU64,
    /// A new version's first events are being watched.
    watching: AtomicBool,
    state: Mutex<SlotState>,
    metrics: Option<Arc<Metrics>>,
}

struct SlotState {
    current: Arc<LoadedHandler>,
    /// The digest of the handler's `wasm` file when it was last read (at
    /// start, a reload or a watched-folder deploy): a reload swaps the
    /// file in only when it changed, so it does not undo an upload.
    file_digest: String,
    previous: Option<Arc<LoadedHandler>>,
    /// The failure ratio of the previous version while it served.
    previous_ratio: Option<f64>,
    loaded_at: OffsetDateTime,
    /// What the last change was and why, for operators.
    last_change: Option<String>,
}

/// What the admin API tells of a handler.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct HandlerStatus {
    pub name: String,
    pub version: String,
    pub previous_version: Option<String>,
    /// RFC 3339.
    pub loaded_at: String,
    /// Events the serving version handled, and those it failed (dead-lettered).
    pub events_handled: u64,
    pub events_failed: u64,
    /// `serving`, or `watching` while a new version's first events are watched.
    pub state: String,
    pub last_change: Option<String>,
    pub topics: Vec<String>,
}

/// The verdict on a watched version after one more event.
#[derive(Debug, PartialEq)]
pub enum Watch {
    Watching,
    Passed,
    RollBack(String),
}

/// Whether a new version with `failed` of `handled + failed` events failed
/// stays: it is rolled back once its failure ratio over the window is sure
/// to pass `max_failure_ratio` and is above the previous version's.
pub fn judge(rollout: &RolloutConfig, handled: u64, failed: u64, previous: Option<f64>) -> Watch {
    let seen = handled + failed;
    let window = rollout.watch_events;
    // The ratio over the window if every event still to come succeeds.
    let least = failed as f64 / seen.max(window) as f64;
    let previous = previous.unwrap_or(0.0);
    if least > rollout.max_failure_ratio && least > previous {
        return Watch::RollBack(format!(
            "{failed} of its first {seen} events failed (ratio {least:.2} over the window of \
             {window}; bound {}, previous version {previous:.2})",
            rollout.max_failure_ratio
        ));
    }
    if seen >= window {
        Watch::Passed
    } else {
        Watch::Watching
    }
}

impl Slot {
    pub fn new(
        handler: Arc<LoadedHandler>,
        previous: Option<Arc<LoadedHandler>>,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        if let Some(m) = &metrics {
            m.handler_version(&handler.name, None, &handler.version);
        }
        Slot {
            name: handler.name.clone(),
            generation: AtomicU64::new(0),
            handled: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            watching: AtomicBool::new(false),
            state: Mutex::new(SlotState {
                file_digest: handler.digest.clone(),
                current: handler,
                previous,
                previous_ratio: None,
                loaded_at: OffsetDateTime::now_utc(),
                last_change: None,
            }),
            metrics,
        }
    }

    /// Changes whenever the serving version does.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The serving version and its generation.
    pub fn current(&self) -> (u64, Arc<LoadedHandler>) {
        let s = self.state.lock().unwrap();
        (self.generation(), s.current.clone())
    }

    /// The digest of the handler's file when last read.
    pub fn file_digest(&self) -> String {
        self.state.lock().unwrap().file_digest.clone()
    }

    /// Notes that the handler's file now has digest `digest`.
    pub fn set_file_digest(&self, digest: String) {
        self.state.lock().unwrap().file_digest = digest;
    }

    /// The previous version, kept for rollback.
    pub fn previous(&self) -> Option<Arc<LoadedHandler>> {
        self.state.lock().unwrap().previous.clone()
    }

    /// Makes `new` the serving version; the one it replaces becomes the
    /// previous version (unless both are the same component: a change of
    /// settings keeps the previous version, the counts and any watch).
    pub fn swap(&self, new: Arc<LoadedHandler>, change: Change, why: String) {
        let mut s = self.state.lock().unwrap();
        self.swap_locked(&mut s, new, change, why);
    }

    fn swap_locked(&self, s: &mut SlotState, new: Arc<LoadedHandler>, change: Change, why: String) {
        let old = std::mem::replace(&mut s.current, new.clone());
        if old.digest != new.digest {
            let handled = self.handled.swap(0, Ordering::Relaxed);
            let failed = self.failed.swap(0, Ordering::Relaxed);
            s.previous = Some(old.clone());
            s.previous_ratio =
                (handled + failed > 0).then(|| failed as f64 / (handled + failed) as f64);
            let watch = change == Change::Deploy && new.config_entry.rollout.is_some();
            self.watching.store(watch, Ordering::Relaxed);
        }
        s.loaded_at = OffsetDateTime::now_utc();
        s.last_change = Some(why);
        self.generation.fetch_add(1, Ordering::AcqRel);
        if let Some(m) = &self.metrics {
            m.handler_version(&self.name, Some(&old.version), &new.version);
        }
    }

    /// Back to the previous version; the one serving becomes the previous.
    pub fn rollback(&self, why: &str) -> Result<(String, String)> {
        let mut s = self.state.lock().unwrap();
        self.rollback_locked(&mut s, why)
    }

    fn rollback_locked(&self, s: &mut SlotState, why: &str) -> Result<(String, String)> {
        let Some(previous) = s.previous.clone() else {
            bail!(
                "handler {:?} has no previous version to roll back to",
                self.name
            );
        };
        // The component goes back; the settings in force stay.
        let to = Arc::new(previous.with_settings(&s.current.config_entry));
        let from = s.current.version.clone();
        let text = format!("rolled back from {from} to {}: {why}", to.version);
        let version = to.version.clone();
        self.swap_locked(s, to, Change::Rollback, text);
        Ok((from, version))
    }

    /// Counts the outcome of one event handled by generation `generation`;
    /// a watched version that fails too often is rolled back here (judged
    /// and swapped under the slot's lock, so a deploy meanwhile is never
    /// the one rolled back).
    pub fn record(&self, generation: u64, ok: bool) {
        if generation != self.generation() {
            return;
        }
        if ok {
            self.handled.fetch_add(1, Ordering::Relaxed);
        } else {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        if !self.watching.load(Ordering::Relaxed) {
            return;
        }
        let mut s = self.state.lock().unwrap();
        if generation != self.generation() || !self.watching.load(Ordering::Relaxed) {
            return;
        }
        let Some(rollout) = s.current.config_entry.rollout else {
            return;
        };
        let handled = self.handled.load(Ordering::Relaxed);
        let failed = self.failed.load(Ordering::Relaxed);
        match judge(&rollout, handled, failed, s.previous_ratio) {
            Watch::Watching => {}
            Watch::Passed => {
                self.watching.store(false, Ordering::Relaxed);
                info!(handler = %self.name, version = %s.current.version, handled, failed,
                    "new version passed its rollout watch");
            }
            Watch::RollBack(why) => {
                self.watching.store(false, Ordering::Relaxed);
                match self.rollback_locked(&mut s, &why) {
                    Ok((from, to)) => {
                        warn!(handler = %self.name, from = %from, to = %to, reason = %why,
                            "automatic rollback");
                        if let Some(m) = &self.metrics {
                            m.rollback(&self.name, "automatic");
                        }
                    }
                    Err(e) => warn!(handler = %self.name, error = %e, reason = %why,
                        "a failing version cannot be rolled back"),
                }
            }
        }
    }

    pub fn status(&self) -> HandlerStatus {
        let s = self.state.lock().unwrap();
        HandlerStatus {
            name: self.name.clone(),
            version: s.current.version.clone(),
            previous_version: s.previous.as_ref().map(|p| p.version.clone()),
            loaded_at: s
                .loaded_at
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            events_handled: self.handled.load(Ordering::Relaxed),
            events_failed: self.failed.load(Ordering::Relaxed),
            state: if self.watching.load(Ordering::Relaxed) {
                "watching".into()
            } else {
                "serving".into()
            },
            last_change: s.last_change.clone(),
            topics: s.current.topics().to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const R: RolloutConfig = RolloutConfig {
        watch_events: 100,
        max_failure_ratio: 0.2,
    };

    #[test]
    fn a_version_failing_more_than_the_bound_is_rolled_back_as_soon_as_it_is_sure() {
        assert_eq!(judge(&R, 0, 20, None), Watch::Watching);
        // 21 failures: over 100 events the ratio is above 0.2 whatever follows.
        assert!(matches!(judge(&R, 0, 21, None), Watch::RollBack(_)));
        assert!(matches!(judge(&R, 200, 100, None), Watch::RollBack(_)));
    }

    #[test]
    fn a_version_within_the_bound_passes_at_the_end_of_the_window() {
        assert_eq!(judge(&R, 50, 10, None), Watch::Watching);
        assert_eq!(judge(&R, 80, 20, None), Watch::Passed);
    }

    #[test]
    fn a_version_no_worse_than_the_previous_one_stays() {
        // Both fail half the events (a bad input stream, not a bad version).
        assert_eq!(judge(&R, 50, 50, Some(0.5)), Watch::Passed);
        assert!(matches!(judge(&R, 40, 60, Some(0.5)), Watch::RollBack(_)));
    }
}
