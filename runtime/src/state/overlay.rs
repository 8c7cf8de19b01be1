//! The state writes of a partition's handled events that are not in the
//! store yet (their outputs are still being acknowledged, or their
//! transaction is open): the partition's next events read them here.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::{StateStore, Write};

/// Store key → (stored value, None when deleted; offset of the event that
/// wrote it last).
type Entries = HashMap<Vec<u8>, (Option<Vec<u8>>, i64)>;

/// One partition's writes in flight (one per worker; the worker adds, its
/// finalizer or the transaction's commit removes). Their bytes count in
/// the store's pending bytes of their handler until they are in the store
/// (or dropped with the overlay).
#[derive(Default)]
pub struct Overlay {
    entries: Mutex<Entries>,
    /// (offset, handler, bytes) of the events' writes not in the store yet,
    /// one entry per event and handler.
    pending: Mutex<VecDeque<(i64, Arc<str>, i64)>>,
    store: Option<Arc<StateStore>>,
}

impl Overlay {
    /// An overlay whose pending bytes count in `store`'s.
    pub fn new(store: Option<Arc<StateStore>>) -> Overlay {
        Overlay {
            entries: Mutex::default(),
            pending: Mutex::default(),
            store,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_pending(&self) -> MutexGuard<'_, VecDeque<(i64, Arc<str>, i64)>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The latest in-flight write of `key`: Some(None) when it was deleted,
    /// None when no event in flight wrote it.
    pub fn get(&self, key: &[u8]) -> Option<Option<Vec<u8>>> {
        self.lock().get(key).map(|(v, _)| v.clone())
    }

    /// Adds the writes of handler `handler`'s call on the event at `offset`.
    pub fn put(&self, handler: &Arc<str>, writes: &[Write], offset: i64) {
        if writes.is_empty() {
            return;
        }
        let mut entries = self.lock();
        let mut delta = 0;
        for w in writes {
            entries.insert(w.key.clone(), (w.value.clone(), offset));
            delta += w.delta;
        }
        drop(entries);
        if let (Some(store), true) = (&self.store, delta != 0) {
            store.add_pending(handler, delta);
            self.lock_pending()
                .push_back((offset, handler.clone(), delta));
        }
    }

    /// The writes of events up to `offset` are in the store: drops them
    /// (unless a later event wrote the key again), and gives their
    /// in-flight bytes per handler back (`StateStore::persist` takes them
    /// off the store's count, under the lock that adds the stored ones).
    pub(super) fn retire(&self, offset: i64) -> Vec<(Arc<str>, i64)> {
        let mut entries = self.lock();
        if !entries.is_empty() {
            entries.retain(|_, (_, at)| *at > offset);
        }
        drop(entries);
        let mut pending = self.lock_pending();
        let mut retired = Vec::new();
        while pending.front().is_some_and(|(at, _, _)| *at <= offset) {
            let (_, handler, delta) = pending.pop_front().expect("a front");
            retired.push((handler, delta));
        }
        retired
    }

    /// In-flight writes of keys under `prefix`.
    pub fn with_prefix(&self, prefix: &[u8]) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        self.lock()
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if let Some(store) = &self.store {
            for (_, handler, delta) in self.lock_pending().drain(..) {
                store.add_pending(&handler, -delta);
            }
        }
    }
}
