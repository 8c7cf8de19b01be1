//! A throwaway state store for `weir try` and a new version's sample
//! events.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result};

use super::{scope_prefix, split_key, CallState, Overlay, Owned, Scope, StateStore, Write};
use crate::config::StateConfig;
use crate::dedup::Dedup;

/// (topic, partition, key, value) of a handler's state.
pub type Entry = (String, i32, String, Vec<u8>);

/// A throwaway state store for runs outside the pipeline (`weir try`, a
/// new version's sample events): state is kept across the calls of one
/// run and gone after it.
pub struct Scratch {
    _dir: tempfile::TempDir,
    store: Arc<StateStore>,
    overlay: Arc<Overlay>,
    /// The partitions called for (their state counts in the limits).
    owned: Mutex<Vec<Owned>>,
}

impl Scratch {
    pub fn new() -> Result<Scratch> {
        let dir = tempfile::tempdir().context("cannot make a folder for a scratch state store")?;
        let dedup = Arc::new(Dedup::open(dir.path(), Duration::from_secs(3600))?);
        Ok(Scratch {
            _dir: dir,
            store: Arc::new(StateStore::open(dedup, None)?),
            overlay: Arc::new(Overlay::new(None)),
            owned: Mutex::new(Vec::new()),
        })
    }

    /// The state a call of `handler` on an event of `topic`/`partition` sees.
    pub fn call(
        &self,
        handler: &str,
        limits: &StateConfig,
        topic: &str,
        partition: i32,
    ) -> CallState {
        let mut owned = self.owned.lock().unwrap_or_else(PoisonError::into_inner);
        if !owned.iter().any(|o| o.tp.0 == topic && o.tp.1 == partition) {
            owned.push(self.store.own(topic, partition));
        }
        CallState::new(
            Some(Arc::new(Scope {
                store: self.store.clone(),
                overlay: self.overlay.clone(),
                handler: handler.into(),
                prefix: scope_prefix(handler, topic, partition),
                limits: limits.clone(),
            })),
            "",
        )
    }

    /// Keeps a successful call's writes.
    pub fn keep(&self, writes: &[Write]) -> Result<()> {
        self.store
            .persist([], 0, &writes.iter().collect::<Vec<_>>(), &[])
    }

    /// Every (key, value) of `handler`'s state, for printing.
    pub fn entries(&self, handler: &str) -> Result<Vec<Entry>> {
        let mut prefix = handler.as_bytes().to_vec();
        prefix.push(0);
        Ok(self
            .store
            .scan(&prefix, None, usize::MAX)?
            .into_iter()
            .filter_map(|(k, v)| {
                let (_, topic, partition, key) = split_key(&k)?;
                Some((topic.to_owned(), partition, key.to_owned(), v[8..].to_vec()))
            })
            .collect())
    }
}
