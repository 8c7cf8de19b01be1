use super::*;
use crate::config::StateConfig;
use std::time::Duration;

fn store() -> (tempfile::TempDir, Arc<StateStore>) {
    let dir = tempfile::tempdir().unwrap();
    let dedup = Arc::new(Dedup::open(dir.path(), Duration::from_secs(3600)).unwrap());
    (dir, Arc::new(StateStore::open(dedup, None).unwrap()))
}

fn scope(store: &Arc<StateStore>, limits: StateConfig) -> Arc<Scope> {
    Arc::new(Scope {
        store: store.clone(),
        overlay: Arc::new(Overlay::default()),
        handler: "h".into(),
        prefix: scope_prefix("h", "t", 3),
        limits,
    })
}

#[test]
fn keys_split_back() {
    let mut k = scope_prefix("h", "orders", 7);
    k.extend_from_slice(b"c-1");
    assert_eq!(split_key(&k), Some(("h", "orders", 7, "c-1")));
}

#[test]
fn a_call_sees_its_writes_and_the_overlay_then_the_store() {
    let (_dir, store) = store();
    let s = scope(&store, StateConfig::default());
    let mut call = CallState::new(Some(s.clone()), "");
    assert_eq!(call.get("a"), None);
    call.set("a".into(), b"1".to_vec());
    assert_eq!(call.get("a"), Some(b"1".to_vec()));
    let writes = call.finish().unwrap();
    s.overlay.put(&s.handler, &writes, 10);
    let mut next = CallState::new(Some(s.clone()), "");
    assert_eq!(next.get("a"), Some(b"1".to_vec()), "the overlay");
    next.delete("a".into());
    assert_eq!(next.get("a"), None);
    drop(next); // a failed call: its delete is dropped
    store
        .persist(
            [],
            0,
            &writes.iter().collect::<Vec<_>>(),
            &[(&s.overlay, 10)],
        )
        .unwrap();
    assert!(s.overlay.is_empty());
    let mut later = CallState::new(Some(s.clone()), "");
    assert_eq!(later.get("a"), Some(b"1".to_vec()), "the store");
    assert_eq!(store.totals("h").keys, 1);
}

#[test]
fn scans_merge_store_overlay_and_buffer_in_key_order() {
    let (_dir, store) = store();
    let s = scope(&store, StateConfig::default());
    let mut call = CallState::new(Some(s.clone()), "");
    for k in ["c:1", "c:2", "c:3", "d:1"] {
        call.set(k.into(), k.as_bytes().to_vec());
    }
    let w = call.finish().unwrap();
    store
        .persist([], 0, &w.iter().collect::<Vec<_>>(), &[])
        .unwrap();
    let mut call = CallState::new(Some(s.clone()), "");
    call.delete("c:2".into());
    call.set("c:0".into(), b"x".to_vec());
    let page: Vec<String> = call.scan("c:", None, 2).into_iter().map(|e| e.0).collect();
    assert_eq!(page, ["c:0", "c:1"]);
    let page: Vec<String> = call
        .scan("c:", Some("c:1"), 10)
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(page, ["c:3"]);
}

#[test]
fn limits_fail_the_call_with_their_class() {
    let (_dir, store) = store();
    let limits = StateConfig {
        max_value_bytes: 4,
        max_total_bytes: 40,
        ttl_secs: None,
    };
    let s = scope(&store, limits);
    let _owned = store.own("t", 3);
    let mut call = CallState::new(Some(s.clone()), "");
    call.set("k".into(), b"12345".to_vec());
    let (kind, message) = call.finish().unwrap_err();
    assert_eq!(kind, crate::failure::FailureKind::StateLimit);
    assert!(message.contains("state.max_value_bytes"), "{message}");
    let mut call = CallState::new(Some(s.clone()), "");
    for i in 0..5 {
        call.set(format!("k{i}"), b"1234".to_vec());
    }
    let (kind, message) = call.finish().unwrap_err();
    assert_eq!(kind, crate::failure::FailureKind::StateLimit);
    assert!(message.contains("state.max_total_bytes"), "{message}");
    let mut none = CallState::new(None, "is not available to events of a retry topic");
    none.set("k".into(), b"1".to_vec());
    assert_eq!(
        none.finish().unwrap_err().0,
        crate::failure::FailureKind::StateUnavailable
    );
}

#[test]
fn expired_values_are_found_for_deletion_from_a_cursor() {
    let (_dir, store) = store();
    let prefix = scope_prefix("h", "t", 0);
    let mut writes = Vec::new();
    for i in 0..5u8 {
        let mut key = prefix.clone();
        key.push(b'a' + i);
        // Keys a, c, e expired long ago; b and d never expire.
        let mut value = if i % 2 == 0 { 1u64 } else { 0 }.to_be_bytes().to_vec();
        value.push(i);
        writes.push(Write {
            key,
            value: Some(value),
            delta: 0,
        });
    }
    store
        .persist([], 0, &writes.iter().collect::<Vec<_>>(), &[])
        .unwrap();
    let (first, next) = store.expired(&prefix, None, 3, |_| false).unwrap();
    assert_eq!(first.len(), 2, "a and c among the first three");
    let (rest, end) = store
        .expired(&prefix, next.as_deref(), 3, |k| k.ends_with(b"e"))
        .unwrap();
    assert!(rest.is_empty(), "e is being written: left alone");
    assert_eq!(end, None, "the end was reached");
    assert!(first.iter().all(|w| w.value.is_none() && w.delta < 0));
    store
        .persist([], 0, &first.iter().collect::<Vec<_>>(), &[])
        .unwrap();
    assert_eq!(store.totals("h").keys, 3);
    assert_eq!(store.checkpoint("c", "t", 0).unwrap(), None);
    store.set_checkpoint("c", "t", 0, 42).unwrap();
    assert_eq!(
        store.checkpoint("c", "t", 0).unwrap().map(|c| c.0),
        Some(42)
    );
    assert_eq!(store.totals("h").keys, 3, "a checkpoint is not state");
}

#[test]
fn expired_values_are_not_seen() {
    let (_dir, store) = store();
    let mut k = scope_prefix("h", "t", 0);
    k.push(b'a');
    let mut v = 1u64.to_be_bytes().to_vec(); // expired long ago
    v.push(b'x');
    let w = Write {
        key: k.clone(),
        value: Some(v),
        delta: 0,
    };
    store.persist([], 0, &[&w], &[]).unwrap();
    assert_eq!(store.get(&k).unwrap(), None);
    assert!(decode_value(&encode_value(b"y", Some(Duration::from_secs(60)))).is_some());
}
