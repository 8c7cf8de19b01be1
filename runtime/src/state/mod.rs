//! Handler state: a key-value store per handler and source partition, in
//! the instance's RocksDB store (column family `state`, beside the
//! idempotency marks), published to the group's compacted state changelog
//! so it moves with its partition.
//!
//! A call's writes are buffered in its [`CallState`]; when the call
//! succeeds they go to the partition's [`Overlay`] (visible to the
//! partition's next events at once) and travel with the event to its
//! finalizer (at-least-once) or its transaction (exactly-once), which
//! writes them to the store in the same write batch as the event's
//! idempotency mark, and to the changelog, then drops them from the
//! overlay. A failed attempt's buffer is dropped.
//!
//! Keys in the store are `handler \0 topic \0 partition (4 bytes, big
//! endian) key`; values are `expires at (ms since the epoch, 8 bytes big
//! endian; 0: never) value`.

mod call;
pub mod cli;
mod keys;
mod overlay;
mod scratch;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context, Result};
use rocksdb::{Direction, IteratorMode, Options, WriteBatch};

pub use call::{CallState, Scope};
use keys::{checkpoint_key, expired, scope_of};
pub use keys::{decode_value, encode_value, scope_prefix, split_key};
pub use overlay::Overlay;
pub use scratch::{Entry, Scratch};

use crate::dedup::{now_ms, Dedup};
use crate::metrics::Metrics;

/// Entries one `scan` returns at most.
pub const MAX_SCAN: u32 = 1000;
/// The longest key, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;

/// The options of the state column family. Expired values are deleted by
/// the partition's worker (with a tombstone in the changelog, and counted),
/// not by a compaction filter, so the totals and the changelog follow.
pub(crate) fn column_options() -> Options {
    let mut opts = Options::default();
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    opts.set_block_based_table_factory(&table);
    opts
}

/// One write of a successful call: a store key and its stored value (None:
/// deleted).
#[derive(Debug, Clone, PartialEq)]
pub struct Write {
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
    /// What it adds to its handler's bytes (negative: frees), against the
    /// value it replaces (for the total limit while it is in flight).
    pub delta: i64,
}

/// What a handler's state holds in this instance's store.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Totals {
    pub keys: i64,
    /// Keys and values, in bytes.
    pub bytes: i64,
}

/// The counts of the store's state, kept with the store (counted once per
/// process, when the store's state is first opened).
#[derive(Default)]
pub struct Accounts {
    /// Per scope (`handler \0 topic \0 partition`).
    scopes: HashMap<Vec<u8>, Totals>,
    /// Bytes of each handler's writes in flight (in overlays).
    pending: HashMap<String, i64>,
    /// Input partitions this instance works on now (their workers): topic
    /// → partition → workers.
    owned: HashMap<String, HashMap<i32, usize>>,
}

impl Accounts {
    /// A handler's totals over the partitions owned here.
    fn owned(&self, handler: &str) -> Totals {
        let mut t = Totals::default();
        for (scope, s) in &self.scopes {
            if let Some((h, topic, partition, _)) = split_key(scope) {
                if h == handler
                    && self
                        .owned
                        .get(topic)
                        .is_some_and(|p| p.contains_key(&partition))
                {
                    t.keys += s.keys;
                    t.bytes += s.bytes;
                }
            }
        }
        t
    }
}

/// The state of every handler, in the instance's store.
pub struct StateStore {
    dedup: Arc<Dedup>,
    accounts: Arc<Mutex<Accounts>>,
    metrics: Option<Arc<Metrics>>,
}

/// An input partition worked on here, while this lives.
pub struct Owned {
    store: Arc<StateStore>,
    tp: (String, i32),
}

impl Drop for Owned {
    fn drop(&mut self) {
        let mut a = self.store.lock();
        if let Some(partitions) = a.owned.get_mut(&self.tp.0) {
            if let Some(n) = partitions.get_mut(&self.tp.1) {
                *n -= 1;
                if *n == 0 {
                    partitions.remove(&self.tp.1);
                }
            }
            if partitions.is_empty() {
                a.owned.remove(&self.tp.0);
            }
        }
        drop(a);
        self.store.publish_totals();
    }
}

impl StateStore {
    /// The state in `dedup`'s store (its totals counted at the first open
    /// in this process).
    pub fn open(dedup: Arc<Dedup>, metrics: Option<Arc<Metrics>>) -> Result<StateStore> {
        let accounts = match dedup.state_accounts.get() {
            Some(a) => a.clone(),
            None => {
                let mut accounts = Accounts::default();
                for item in dedup
                    .db()
                    .iterator_cf(dedup.state_cf(), IteratorMode::Start)
                {
                    let (k, v) = item.context("reading the state store")?;
                    let Some(scope) = scope_of(&k).filter(|_| k.first() != Some(&0)) else {
                        continue;
                    };
                    let t = accounts.scopes.entry(scope.to_vec()).or_default();
                    t.keys += 1;
                    t.bytes += (k.len() + v.len()) as i64;
                }
                dedup
                    .state_accounts
                    .get_or_init(|| Arc::new(Mutex::new(accounts)))
                    .clone()
            }
        };
        let store = StateStore {
            dedup,
            accounts,
            metrics,
        };
        store.publish_totals();
        Ok(store)
    }

    /// The store the state lives in (with the marks).
    pub fn dedup(&self) -> &Arc<Dedup> {
        &self.dedup
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Accounts> {
        self.accounts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Notes that input partition `topic`/`partition` is worked on here
    /// until the guard is dropped: its state counts in the handlers'
    /// totals and limits.
    pub fn own(self: &Arc<Self>, topic: &str, partition: i32) -> Owned {
        *self
            .lock()
            .owned
            .entry(topic.to_owned())
            .or_default()
            .entry(partition)
            .or_default() += 1;
        self.publish_totals();
        Owned {
            store: self.clone(),
            tp: (topic.to_owned(), partition),
        }
    }

    /// The stored value of a store key, None when absent or expired.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let db = self.dedup.db();
        let v = db
            .get_pinned_cf(self.dedup.state_cf(), key)
            .context("reading the state store")?;
        Ok(v.filter(|v| decode_value(v).is_some()).map(|v| v.to_vec()))
    }

    /// Up to `limit` unexpired (store key, stored value) pairs under
    /// `prefix`, from the first key after `after`, in key order.
    pub fn scan(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        self.walk(prefix, after, |k, v| {
            if out.len() >= limit {
                return false;
            }
            if decode_value(v).is_some() {
                out.push((k.to_vec(), v.to_vec()));
            }
            true
        })?;
        Ok(out)
    }

    /// Calls `f` on each (store key, stored value) under `prefix` after
    /// `after`, in key order, while it returns true.
    fn walk(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        mut f: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> Result<()> {
        let from = match after {
            Some(a) if a > prefix => a,
            _ => prefix,
        };
        for item in self.dedup.db().iterator_cf(
            self.dedup.state_cf(),
            IteratorMode::From(from, Direction::Forward),
        ) {
            let (k, v) = item.context("reading the state store")?;
            if !k.starts_with(prefix) {
                break;
            }
            if after.is_some_and(|a| &*k <= a) {
                continue;
            }
            if !f(&k, &v) {
                break;
            }
        }
        Ok(())
    }

    /// Deletes for up to `limit` expired values under `prefix` after
    /// `after` (skipping the keys `skip` says are being written), and the
    /// key to go on after (None: the end was reached).
    pub fn expired(
        &self,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
        skip: impl Fn(&[u8]) -> bool,
    ) -> Result<(Vec<Write>, Option<Vec<u8>>)> {
        let (now, mut seen, mut last) = (now_ms(), 0, None);
        let mut deletes = Vec::new();
        self.walk(prefix, after, |k, v| {
            seen += 1;
            if seen > limit {
                return false;
            }
            last = Some(k.to_vec());
            if expired(v, now) && !skip(k) {
                deletes.push(Write {
                    key: k.to_vec(),
                    value: None,
                    delta: -((k.len() + v.len()) as i64),
                });
            }
            true
        })?;
        Ok((deletes, if seen > limit { last } else { None }))
    }

    /// A handler's totals in this store (every partition).
    pub fn totals(&self, handler: &str) -> Totals {
        let mut t = Totals::default();
        for (scope, s) in &self.lock().scopes {
            if split_key(scope).is_some_and(|(h, ..)| h == handler) {
                t.keys += s.keys;
                t.bytes += s.bytes;
            }
        }
        t
    }

    /// A handler's bytes over the partitions owned here, with its writes
    /// in flight: what its total limit is checked against.
    pub fn visible_bytes(&self, handler: &str) -> i64 {
        let a = self.lock();
        a.owned(handler).bytes + a.pending.get(handler).copied().unwrap_or(0)
    }

    pub(crate) fn add_pending(&self, handler: &str, delta: i64) {
        let mut a = self.lock();
        match a.pending.get_mut(handler) {
            Some(p) => *p += delta,
            None => {
                a.pending.insert(handler.to_owned(), delta);
            }
        }
    }

    /// Writes idempotency marks and state writes in one batch (the writes
    /// in order: a later write of a key wins), counts them, and retires
    /// from each overlay the writes of its events up to an offset (their
    /// in-flight bytes leave the count as the stored ones enter it).
    pub fn persist<'a>(
        &self,
        marks: impl IntoIterator<Item = &'a [u8]>,
        at: u64,
        writes: &[&Write],
        retire: &[(&Overlay, i64)],
    ) -> Result<()> {
        let mut batch = WriteBatch::default();
        Dedup::put_marks(&mut batch, marks, at);
        // The last write of each key, and what it replaces (for the totals).
        let last: BTreeMap<&[u8], Option<&[u8]>> = writes
            .iter()
            .map(|w| (w.key.as_slice(), w.value.as_deref()))
            .collect();
        let cf = self.dedup.state_cf();
        let olds = self
            .dedup
            .db()
            .batched_multi_get_cf(cf, last.keys().copied(), false);
        let mut deltas: HashMap<&[u8], Totals> = HashMap::new();
        for ((key, value), old) in last.iter().zip(olds) {
            let old = old.context("reading the state store")?;
            let d = deltas.entry(scope_of(key).unwrap_or_default()).or_default();
            if let Some(old) = old {
                d.keys -= 1;
                d.bytes -= (key.len() + old.len()) as i64;
            }
            match value {
                Some(v) => {
                    batch.put_cf(cf, key, v);
                    d.keys += 1;
                    d.bytes += (key.len() + v.len()) as i64;
                }
                None => batch.delete_cf(cf, key),
            }
        }
        self.dedup.write(batch)?;
        let mut a = self.lock();
        for (scope, d) in deltas {
            let t = a.scopes.entry(scope.to_vec()).or_default();
            t.keys += d.keys;
            t.bytes += d.bytes;
        }
        for (overlay, offset) in retire {
            for (handler, delta) in overlay.retire(*offset) {
                if let Some(p) = a.pending.get_mut(&*handler) {
                    *p -= delta;
                }
            }
        }
        drop(a);
        if !last.is_empty() {
            self.publish_totals();
        }
        Ok(())
    }

    /// The state checkpoint of input partition `topic`/`partition` from
    /// `changelog`: (the next changelog offset to read, when it was set).
    pub fn checkpoint(
        &self,
        changelog: &str,
        topic: &str,
        partition: i32,
    ) -> Result<Option<(i64, u64)>> {
        let v = self
            .dedup
            .db()
            .get_pinned_cf(
                self.dedup.state_cf(),
                checkpoint_key(changelog, topic, partition),
            )
            .context("reading the state store")?;
        Ok(v.and_then(|v| {
            let at = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
            let next = i64::from_be_bytes(v.get(8..16)?.try_into().ok()?);
            Some((next, at))
        }))
    }

    /// Records that the state records of `topic`/`partition` below `next`
    /// in `changelog` are in this store.
    pub fn set_checkpoint(
        &self,
        changelog: &str,
        topic: &str,
        partition: i32,
        next: i64,
    ) -> Result<()> {
        let mut value = now_ms().to_be_bytes().to_vec();
        value.extend_from_slice(&next.to_be_bytes());
        self.dedup
            .db()
            .put_cf(
                self.dedup.state_cf(),
                checkpoint_key(changelog, topic, partition),
                value,
            )
            .context("writing the state store")
    }

    /// Sets the state gauges: each handler's totals over the partitions
    /// owned here.
    fn publish_totals(&self) {
        let Some(m) = &self.metrics else { return };
        let a = self.lock();
        let handlers: std::collections::BTreeSet<&str> = a
            .scopes
            .keys()
            .filter_map(|s| split_key(s).map(|(h, ..)| h))
            .collect();
        for handler in handlers {
            let t = a.owned(handler);
            m.state_keys.with_label_values(&[handler]).set(t.keys);
            m.state_bytes.with_label_values(&[handler]).set(t.bytes);
        }
    }
}

#[cfg(test)]
mod tests;
