//! Decoding Kafka records into handler events, and encoding handler outputs
//! back into records.
//!
//! A record whose `content-type` header is `application/json` or
//! `application/msgpack` must carry the envelope (`schemaVersion`,
//! `eventType`, `id`, `timestamp`, `correlationId`, `causationId`,
//! `payload`); any other record is raw and passes through as is.

use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Header names the runtime reads and writes.
pub mod header {
    pub const CONTENT_TYPE: &str = "content-type";
    pub const EVENT_ID: &str = "event-id";
    pub const EVENT_TYPE: &str = "event-type";
    pub const CORRELATION_ID: &str = "correlation-id";
    pub const CAUSATION_ID: &str = "causation-id";
}

pub const JSON: &str = "application/json";
pub const MSGPACK: &str = "application/msgpack";

/// The wire encoding of an envelope, from a `content-type` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Json,
    MsgPack,
}

impl Encoding {
    pub fn from_content_type(content_type: &str) -> Option<Encoding> {
        let essence = content_type.split(';').next().unwrap_or("").trim();
        // Compared without case, and without a lowercased copy per event.
        let is = |name: &str| essence.eq_ignore_ascii_case(name);
        if is(JSON) {
            Some(Encoding::Json)
        } else if is(MSGPACK) || is("application/x-msgpack") || is("application/vnd.msgpack") {
            Some(Encoding::MsgPack)
        } else {
            None
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::Json => JSON,
            Encoding::MsgPack => MSGPACK,
        }
    }
}

/// A Kafka record as the runtime received it.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: i64,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Record {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// A header as text; None when absent, empty or not UTF-8.
    pub fn header_str(&self, name: &str) -> Option<String> {
        self.header(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    }

    /// A copy of a consumed (or returned) Kafka message.
    pub fn from_message(msg: &impl rdkafka::message::Message) -> Record {
        use rdkafka::message::Headers;
        Record {
            topic: msg.topic().to_owned(),
            partition: msg.partition(),
            offset: msg.offset(),
            timestamp_ms: msg.timestamp().to_millis().unwrap_or(0),
            key: msg.key().map(<[u8]>::to_vec),
            value: msg.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            headers: msg
                .headers()
                .map(|hs| {
                    hs.iter()
                        .map(|h| {
                            (
                                h.key.to_owned(),
                                h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// `topic/partition/offset`: the id of an event without one of its own.
    pub fn position_id(&self) -> String {
        format!("{}/{}/{}", self.topic, self.partition, self.offset)
    }
}

/// An event ready for a handler (the runtime's side of the WIT `event`).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: String,
    pub event_type: String,
    pub schema_version: String,
    pub payload: Vec<u8>,
    pub content_type: String,
    pub timestamp_ms: i64,
    pub correlation_id: String,
    pub causation_id: Option<String>,
    /// Set by [`decode`] alone: the payload is one JSON value as it stood
    /// in a JSON envelope, checked (an output passing it on unchanged is
    /// not parsed again).
    pub(crate) json_checked: bool,
}

/// An envelope field written as text or as a number (ids, versions and
/// timestamps come both ways). Read straight from the parser, not through
/// serde's buffered `untagged` matching.
enum Text {
    Str(String),
    Int(i64),
    UInt(u64),
    Float(f64),
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Text, D::Error> {
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = Text;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an id, schemaVersion or timestamp as a string or a number")
            }
            fn visit_str<E>(self, v: &str) -> Result<Text, E> {
                Ok(Text::Str(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<Text, E> {
                Ok(Text::Str(v))
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Text, E> {
                std::str::from_utf8(v)
                    .map(|s| Text::Str(s.to_owned()))
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Bytes(v), &self))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Text, E> {
                Ok(Text::Int(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Text, E> {
                // Kept whole: an id past i64 must not collide with another.
                Ok(i64::try_from(v).map_or(Text::UInt(v), Text::Int))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Text, E> {
                Ok(Text::Float(v))
            }
        }
        d.deserialize_any(Visit)
    }
}

impl Text {
    fn into_string(self) -> String {
        match self {
            Text::Str(s) => s,
            Text::Int(i) => i.to_string(),
            Text::UInt(u) => u.to_string(),
            Text::Float(f) => f.to_string(),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InEnvelope<P> {
    #[serde(default)]
    schema_version: Option<Text>,
    event_type: String,
    #[serde(default)]
    id: Option<Text>,
    #[serde(default)]
    timestamp: Option<Text>,
    #[serde(default)]
    correlation_id: Option<String>,
    #[serde(default)]
    causation_id: Option<String>,
    payload: P,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OutEnvelope<'a, P> {
    schema_version: &'a str,
    event_type: &'a str,
    id: &'a str,
    timestamp: String,
    correlation_id: &'a str,
    causation_id: &'a str,
    payload: P,
}

impl<'a> OutEnvelope<'a, ()> {
    fn with<P>(self, payload: P) -> OutEnvelope<'a, P> {
        OutEnvelope {
            schema_version: self.schema_version,
            event_type: self.event_type,
            id: self.id,
            timestamp: self.timestamp,
            correlation_id: self.correlation_id,
            causation_id: self.causation_id,
            payload,
        }
    }
}

/// An envelope in JSON around a payload that is JSON already, written
/// field by field (serde_json escapes the text) with the payload copied in.
fn json_envelope(head: &OutEnvelope<'_, ()>, payload: &[u8]) -> Vec<u8> {
    // Sized for the envelope's fields at once, not grown.
    let mut value = Vec::with_capacity(payload.len() + 384);
    let fields = [
        ("schemaVersion", head.schema_version),
        ("eventType", head.event_type),
        ("id", head.id),
        ("timestamp", head.timestamp.as_str()),
        ("correlationId", head.correlation_id),
        ("causationId", head.causation_id),
    ];
    for (name, text) in fields {
        value.extend_from_slice(if value.is_empty() { b"{\"" } else { b",\"" });
        value.extend_from_slice(name.as_bytes());
        value.extend_from_slice(b"\":");
        serde_json::to_writer(&mut value, text).expect("a string serialises");
    }
    value.extend_from_slice(b",\"payload\":");
    value.extend_from_slice(payload);
    value.push(b'}');
    value
}

/// Why a record could not be turned into an event.
#[derive(Debug, Clone, PartialEq)]
pub struct Undecodable(pub String);

impl std::fmt::Display for Undecodable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn parse_timestamp(t: Text) -> Result<i64, Undecodable> {
    match t {
        Text::Int(ms) => Ok(ms),
        Text::UInt(ms) => Err(Undecodable(format!(
            "envelope timestamp {ms} is out of range (milliseconds since 1970)"
        ))),
        Text::Float(ms) => Ok(ms as i64),
        Text::Str(s) => OffsetDateTime::parse(&s, &Rfc3339)
            .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
            .map_err(|e| Undecodable(format!("envelope timestamp {s:?} is not RFC 3339: {e}"))),
    }
}

/// Decodes a record into an event: the envelope when its content type names
/// one, the raw value otherwise.
pub fn decode(record: &Record) -> Result<Event, Undecodable> {
    let content_type = record
        .header(header::CONTENT_TYPE)
        .and_then(|v| std::str::from_utf8(v).ok())
        .unwrap_or_default();
    let Some(encoding) = Encoding::from_content_type(content_type) else {
        return Ok(Event {
            id: record.position_id(),
            event_type: record.header_str(header::EVENT_TYPE).unwrap_or_default(),
            schema_version: String::new(),
            payload: record.value.clone(),
            content_type: content_type.to_owned(),
            timestamp_ms: record.timestamp_ms,
            correlation_id: record
                .header_str(header::CORRELATION_ID)
                .unwrap_or_else(new_id),
            causation_id: record.header_str(header::CAUSATION_ID),
            json_checked: false,
        });
    };
    let (envelope, payload) = match encoding {
        Encoding::Json => {
            // The payload is passed on as it came, not parsed into a tree
            // and written out again.
            let env: InEnvelope<&serde_json::value::RawValue> =
                serde_json::from_slice(&record.value)
                    .map_err(|e| Undecodable(format!("malformed JSON envelope: {e}")))?;
            let payload = env.payload.get().as_bytes().to_vec();
            (strip(env), payload)
        }
        Encoding::MsgPack => {
            let env: InEnvelope<rmpv::Value> = rmp_serde::from_slice(&record.value)
                .map_err(|e| Undecodable(format!("malformed MessagePack envelope: {e}")))?;
            let mut payload = Vec::new();
            rmpv::encode::write_value(&mut payload, &env.payload)
                .expect("writing to a Vec cannot fail");
            (strip(env), payload)
        }
    };
    if envelope.event_type.is_empty() {
        return Err(Undecodable("envelope eventType is empty".into()));
    }
    let timestamp_ms = match envelope.timestamp {
        Some(t) => parse_timestamp(t)?,
        None => record.timestamp_ms,
    };
    Ok(Event {
        id: envelope
            .id
            .map(Text::into_string)
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| record.position_id()),
        event_type: envelope.event_type,
        schema_version: envelope
            .schema_version
            .map(Text::into_string)
            .unwrap_or_default(),
        payload,
        content_type: encoding.content_type().to_owned(),
        timestamp_ms,
        correlation_id: envelope
            .correlation_id
            .filter(|s| !s.is_empty())
            .or_else(|| record.header_str(header::CORRELATION_ID))
            .unwrap_or_else(new_id),
        causation_id: envelope.causation_id.filter(|s| !s.is_empty()),
        json_checked: encoding == Encoding::Json,
    })
}

fn strip<P>(env: InEnvelope<P>) -> InEnvelope<()> {
    InEnvelope {
        schema_version: env.schema_version,
        event_type: env.event_type,
        id: env.id,
        timestamp: env.timestamp,
        correlation_id: env.correlation_id,
        causation_id: env.causation_id,
        payload: (),
    }
}

/// A fresh event or correlation id: a random (version 4) UUID from the
/// thread's generator, seeded once from the OS (no system call per id).
pub fn new_id() -> String {
    let id = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    // Written into a buffer, not through the formatting machinery.
    id.hyphenated().encode_lower(&mut text).to_owned()
}

/// What a handler asked to publish (the runtime's side of the WIT `output`).
#[derive(Debug, Clone, Default)]
pub struct Output {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub event_type: String,
    pub schema_version: String,
    pub content_type: String,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// A record ready for the producer.
#[derive(Debug, Clone)]
pub struct Produce {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Encodes an output of `parent`: a fresh id, the parent's correlation id,
/// the parent's id as causation id; in the envelope when it uses one, and
/// always as headers.
pub fn encode_output(output: Output, parent: &Event, max_bytes: usize) -> Result<Produce, String> {
    let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if output.topic.is_empty() || output.topic.len() > 249 || !output.topic.chars().all(legal) {
        return Err(format!(
            "output topic {:?} is not a legal Kafka topic name",
            output.topic
        ));
    }
    let id = new_id();
    let encoding = Encoding::from_content_type(&output.content_type);
    let value = match (encoding, output.event_type.is_empty()) {
        (Some(encoding), false) => {
            let timestamp = OffsetDateTime::now_utc()
                .format(&Rfc3339)
                .expect("now formats as RFC 3339");
            let schema_version = if output.schema_version.is_empty() {
                "1"
            } else {
                output.schema_version.as_str()
            };
            let head = OutEnvelope {
                schema_version,
                event_type: &output.event_type,
                id: &id,
                timestamp,
                correlation_id: &parent.correlation_id,
                causation_id: &parent.id,
                payload: (),
            };
            match encoding {
                Encoding::Json => {
                    // Written into the envelope as it is: checked first,
                    // unless it is a JSON event's own payload passed on
                    // unchanged (checked when the event was decoded).
                    let payload = if parent.json_checked && output.payload == parent.payload {
                        &output.payload[..]
                    } else {
                        let raw: &serde_json::value::RawValue =
                            serde_json::from_slice(&output.payload)
                                .map_err(|e| format!("output payload is not JSON: {e}"))?;
                        raw.get().as_bytes()
                    };
                    json_envelope(&head, payload)
                }
                Encoding::MsgPack => {
                    let payload = rmpv::decode::read_value(&mut output.payload.as_slice())
                        .map_err(|e| format!("output payload is not MessagePack: {e}"))?;
                    rmp_serde::to_vec_named(&head.with(payload))
                        .map_err(|e| format!("cannot encode MessagePack envelope: {e}"))?
                }
            }
        }
        _ => output.payload,
    };
    let mut headers = output.headers;
    // The envelope's five, the handler version and the trace context.
    headers.reserve(8);
    headers.retain(|(k, _)| {
        ![
            header::EVENT_ID,
            header::CORRELATION_ID,
            header::CAUSATION_ID,
        ]
        .iter()
        .any(|h| k.eq_ignore_ascii_case(h))
    });
    if !output.content_type.is_empty()
        && !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case(header::CONTENT_TYPE))
    {
        headers.push((
            header::CONTENT_TYPE.into(),
            output.content_type.into_bytes(),
        ));
    }
    if !output.event_type.is_empty() {
        headers.push((header::EVENT_TYPE.into(), output.event_type.into_bytes()));
    }
    headers.push((header::EVENT_ID.into(), id.into_bytes()));
    headers.push((
        header::CORRELATION_ID.into(),
        parent.correlation_id.clone().into_bytes(),
    ));
    headers.push((header::CAUSATION_ID.into(), parent.id.clone().into_bytes()));
    let produce = Produce {
        topic: output.topic,
        key: output.key,
        value,
        headers,
    };
    let size = produce.size() + RECORD_OVERHEAD;
    if size > max_bytes {
        return Err(format!(
            "output to {} is {size} bytes with its envelope, headers and framing, over the {max_bytes} bytes a record may have (message.max.bytes)",
            produce.topic
        ));
    }
    Ok(produce)
}

/// What a record costs beyond its key, value and headers: the record and
/// batch framing, and the trace-context headers added when it is sent.
pub const RECORD_OVERHEAD: usize = 512;

impl Produce {
    /// Bytes of key, value and headers.
    pub fn size(&self) -> usize {
        self.value.len()
            + self.key.as_ref().map_or(0, Vec::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests;
