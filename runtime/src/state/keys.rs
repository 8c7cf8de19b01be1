//! How state is laid out in the store: keys are `handler \0 topic \0
//! partition (4 bytes, big endian) key`, values `expires at (ms since the
//! epoch, 8 bytes big endian; 0: never) value`.

use std::time::Duration;

use crate::dedup::now_ms;

/// `handler \0 topic \0 partition`: the prefix of a scope's keys.
pub fn scope_prefix(handler: &str, topic: &str, partition: i32) -> Vec<u8> {
    let mut k = Vec::with_capacity(handler.len() + topic.len() + 6);
    k.extend_from_slice(handler.as_bytes());
    k.push(0);
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

/// A store key split into (handler, topic, partition, key).
pub fn split_key(k: &[u8]) -> Option<(&str, &str, i32, &str)> {
    let a = k.iter().position(|b| *b == 0)?;
    let rest = &k[a + 1..];
    let b = rest.iter().position(|b| *b == 0)?;
    let partition = i32::from_be_bytes(rest.get(b + 1..b + 5)?.try_into().ok()?);
    Some((
        std::str::from_utf8(&k[..a]).ok()?,
        std::str::from_utf8(&rest[..b]).ok()?,
        partition,
        std::str::from_utf8(rest.get(b + 5..)?).ok()?,
    ))
}

/// A value as stored: when it expires (0: never), then the bytes.
pub fn encode_value(value: &[u8], ttl: Option<Duration>) -> Vec<u8> {
    let expires = ttl.map_or(0, |t| now_ms().saturating_add(t.as_millis() as u64).max(1));
    let mut v = Vec::with_capacity(8 + value.len());
    v.extend_from_slice(&expires.to_be_bytes());
    v.extend_from_slice(value);
    v
}

pub(super) fn expired(stored: &[u8], now: u64) -> bool {
    let expires = stored
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0);
    expires != 0 && expires < now
}

/// The bytes of a stored value; None once it expired.
pub fn decode_value(stored: &[u8]) -> Option<&[u8]> {
    (!expired(stored, now_ms())).then(|| stored.get(8..).unwrap_or_default())
}

/// The scope prefix of a store key.
pub(super) fn scope_of(key: &[u8]) -> Option<&[u8]> {
    let a = key.iter().position(|b| *b == 0)?;
    let b = a + 1 + key[a + 1..].iter().position(|b| *b == 0)?;
    key.get(..b + 5)
}

/// `\0 checkpoint \0 changelog \0 input topic \0 partition`: apart from
/// every state key (a handler's name is never empty).
pub(super) fn checkpoint_key(changelog: &str, topic: &str, partition: i32) -> Vec<u8> {
    format!("\0checkpoint\0{changelog}\0{topic}\0{partition}").into_bytes()
}
