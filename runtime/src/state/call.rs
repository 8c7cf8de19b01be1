//! One call's view of its handler's state: the scope (handler and source
//! partition) it reads, and the writes it buffers until it ends.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;

use super::{decode_value, encode_value, Overlay, StateStore, Write, MAX_KEY_BYTES, MAX_SCAN};
use crate::config::StateConfig;

/// A handler's state for one source partition, as its calls reach it.
pub struct Scope {
    pub store: Arc<StateStore>,
    pub overlay: Arc<Overlay>,
    pub handler: Arc<str>,
    pub prefix: Vec<u8>,
    pub limits: StateConfig,
}

impl Scope {
    fn store_key(&self, key: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(self.prefix.len() + key.len());
        k.extend_from_slice(&self.prefix);
        k.extend_from_slice(key.as_bytes());
        k
    }

    /// The stored value of `key` as the partition's next event sees it:
    /// the overlay of handled events, then the store.
    fn visible(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.overlay.get(key) {
            Some(v) => Ok(v.filter(|v| decode_value(v).is_some())),
            None => self.store.get(key),
        }
    }
}

/// One call's view of its scope: reads see its own writes, which are
/// buffered until the call ends.
pub struct CallState {
    scope: Option<Arc<Scope>>,
    /// Why there is no scope, for the failure.
    unavailable: &'static str,
    /// The call's writes, by key (None: deleted).
    buffer: BTreeMap<String, Option<Vec<u8>>>,
    /// Bytes (key and stored value) of the values the call read from its
    /// scope, by key (0: none), so the writes' sizes need no second read.
    read: HashMap<String, i64>,
    /// The first limit the call went past, or a store error.
    failed: Option<(crate::failure::FailureKind, String)>,
}

impl CallState {
    pub fn new(scope: Option<Arc<Scope>>, unavailable: &'static str) -> CallState {
        CallState {
            scope,
            unavailable,
            buffer: BTreeMap::new(),
            read: HashMap::new(),
            failed: None,
        }
    }

    /// The scope of the call, if it has one.
    pub fn handler(&self) -> Option<&Arc<str>> {
        self.scope.as_ref().map(|s| &s.handler)
    }

    fn scope(&mut self) -> Option<&Arc<Scope>> {
        if self.scope.is_none() && self.failed.is_none() {
            self.failed = Some((
                crate::failure::FailureKind::StateUnavailable,
                format!("the handler used its state, which {}", self.unavailable),
            ));
        }
        self.scope.as_ref()
    }

    pub fn get(&mut self, key: &str) -> Option<Vec<u8>> {
        if let Some(v) = self.buffer.get(key) {
            return v.clone();
        }
        let scope = self.scope()?.clone();
        let full = scope.store_key(key);
        match scope.visible(&full) {
            Ok(v) => {
                let bytes = v.as_ref().map_or(0, |v| (full.len() + v.len()) as i64);
                self.read.insert(key.to_owned(), bytes);
                v.and_then(|v| decode_value(&v).map(<[u8]>::to_vec))
            }
            Err(e) => {
                self.store_error(e);
                None
            }
        }
    }

    pub fn set(&mut self, key: String, value: Vec<u8>) {
        let Some(scope) = self.scope() else { return };
        let max = scope.limits.max_value_bytes;
        if value.len() as u64 > max {
            self.limit(format!(
                "a value of {} bytes for key {key:?} is above state.max_value_bytes ({max})",
                value.len()
            ));
            return;
        }
        if self.key_ok(&key) {
            self.buffer.insert(key, Some(value));
        }
    }

    pub fn delete(&mut self, key: String) {
        if self.scope().is_some() && self.key_ok(&key) {
            self.buffer.insert(key, None);
        }
    }

    fn key_ok(&mut self, key: &str) -> bool {
        if key.len() > MAX_KEY_BYTES {
            self.limit(format!(
                "a key of {} bytes is above the {MAX_KEY_BYTES}-byte limit",
                key.len()
            ));
            return false;
        }
        true
    }

    pub fn scan(
        &mut self,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Vec<(String, Vec<u8>)> {
        let Some(scope) = self.scope().cloned() else {
            return Vec::new();
        };
        let limit = limit.min(MAX_SCAN) as usize;
        let full_prefix = scope.store_key(prefix);
        let full_after = after.map(|a| scope.store_key(a));
        // Stored entries, then the overlay's and this call's writes on top:
        // as many stored ones as could be hidden by them, and the page.
        let overlaid = scope.overlay.with_prefix(&full_prefix);
        let mut merged: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let want = limit + overlaid.len() + self.buffer.len();
        let stored = match scope.store.scan(&full_prefix, full_after.as_deref(), want) {
            Ok(s) => s,
            Err(e) => {
                self.store_error(e);
                return Vec::new();
            }
        };
        let user_key = |k: &[u8]| String::from_utf8_lossy(&k[scope.prefix.len()..]).into_owned();
        for (k, v) in stored {
            merged.insert(user_key(&k), v[8..].to_vec());
        }
        for (k, v) in overlaid {
            let key = user_key(&k);
            match v.as_deref().and_then(decode_value) {
                Some(v) => merged.insert(key, v.to_vec()),
                None => merged.remove(&key),
            };
        }
        for (k, v) in self.buffer.range(prefix.to_owned()..) {
            if !k.starts_with(prefix) {
                break;
            }
            match v {
                Some(v) => merged.insert(k.clone(), v.clone()),
                None => merged.remove(k),
            };
        }
        merged
            .into_iter()
            .filter(|(k, _)| after.is_none_or(|a| k.as_str() > a))
            .take(limit)
            .collect()
    }

    fn limit(&mut self, message: String) {
        self.failed
            .get_or_insert((crate::failure::FailureKind::StateLimit, message));
    }

    fn store_error(&mut self, e: anyhow::Error) {
        self.failed.get_or_insert((
            crate::failure::FailureKind::StateUnavailable,
            format!("cannot read the state store: {e:#}"),
        ));
    }

    /// The call's writes, if it may make them: its failure otherwise (a
    /// limit it went past, or its state was unavailable).
    pub fn finish(mut self) -> Result<Vec<Write>, (crate::failure::FailureKind, String)> {
        if let Some(f) = self.failed.take() {
            return Err(f);
        }
        let Some(scope) = self.scope.clone() else {
            return Ok(Vec::new());
        };
        if self.buffer.is_empty() {
            return Ok(Vec::new());
        }
        let ttl = scope.limits.ttl_secs.map(Duration::from_secs);
        let mut delta: i64 = 0;
        let mut writes = Vec::with_capacity(self.buffer.len());
        for (user_key, value) in std::mem::take(&mut self.buffer) {
            let key = scope.store_key(&user_key);
            let old = match self.read.get(&user_key) {
                Some(bytes) => *bytes,
                None => match scope.visible(&key) {
                    Ok(old) => old.map_or(0, |v| (key.len() + v.len()) as i64),
                    Err(e) => {
                        return Err((
                            crate::failure::FailureKind::StateUnavailable,
                            format!("cannot read the state store: {e:#}"),
                        ))
                    }
                },
            };
            let value = value.map(|v| encode_value(&v, ttl));
            let d = value.as_ref().map_or(0, |v| (key.len() + v.len()) as i64) - old;
            delta += d;
            writes.push(Write {
                key,
                value,
                delta: d,
            });
        }
        let max = scope.limits.max_total_bytes;
        let total = scope.store.visible_bytes(&scope.handler);
        if delta > 0 && (total + delta) as u64 > max {
            return Err((
                crate::failure::FailureKind::StateLimit,
                format!(
                    "the call's writes would take the handler's state to {} bytes, above \
                     state.max_total_bytes ({max})",
                    total + delta
                ),
            ));
        }
        Ok(writes)
    }
}
