//! The observable side of a `weir` process: HTTP endpoints, Prometheus
//! scrapes and the spans it exports over OTLP.

use super::*;

/// GET `http://{addr}{path}`: (status, body).
pub async fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    let resp = reqwest::get(format!("http://{addr}{path}")).await?;
    let status = resp.status().as_u16();
    Ok((status, resp.text().await?))
}

/// A parsed Prometheus text exposition.
#[derive(Debug)]
pub struct Scrape {
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
    pub text: String,
}

impl Scrape {
    /// Fetches and parses `/metrics`.
    pub async fn fetch(addr: &str) -> Result<Scrape> {
        let (status, text) = http_get(addr, "/metrics").await?;
        if status != 200 {
            bail!("/metrics answered {status}: {text}");
        }
        Self::parse(&text)
    }

    /// Parses `name{label="value",...} number` lines; comments are skipped.
    pub fn parse(text: &str) -> Result<Scrape> {
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        {
            let (series, value) = line
                .rsplit_once(' ')
                .with_context(|| format!("bad sample line {line:?}"))?;
            let value: f64 = value
                .parse()
                .with_context(|| format!("bad value in {line:?}"))?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').context("unclosed labels")?;
                    let mut labels = BTreeMap::new();
                    for pair in body.split("\",").filter(|p| !p.is_empty()) {
                        let (k, v) = pair.split_once("=\"").context("bad label")?;
                        labels.insert(k.to_owned(), v.trim_end_matches('"').to_owned());
                    }
                    (name, labels)
                }
                None => (series, BTreeMap::new()),
            };
            samples.push((name.to_owned(), labels, value));
        }
        Ok(Scrape {
            samples,
            text: text.to_owned(),
        })
    }

    /// The sum of the samples of `name` whose labels include `labels`
    /// (None when there is no such sample).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = self
            .samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| *v)
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    }

    /// Every sample of `name`: (labels, value).
    pub fn series(&self, name: &str) -> Vec<(&BTreeMap<String, String>, f64)> {
        self.samples
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, l, v)| (l, *v))
            .collect()
    }
}

/// A span as the OTLP receiver decoded it.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub service: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub name: String,
    /// The OTLP span kind (2 server, 3 client, 4 producer, 5 consumer, 1 internal).
    pub kind: i32,
    pub attributes: BTreeMap<String, String>,
    /// OTLP status code: 0 unset, 1 ok, 2 error.
    pub status_code: i32,
    pub status_message: String,
    pub events: Vec<String>,
}

/// An OTLP/HTTP receiver: decodes the protobuf `ExportTraceServiceRequest`s
/// posted to `/v1/traces` and keeps their spans.
pub struct OtlpReceiver {
    /// `http://127.0.0.1:port` (no path: the runtime adds `/v1/traces`).
    pub endpoint: String,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

impl OtlpReceiver {
    pub async fn start() -> Result<OtlpReceiver> {
        use opentelemetry_proto::tonic::collector::trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
        };
        use prost::Message as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let spans = Arc::new(Mutex::new(Vec::new()));
        let sink = spans.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let sink = sink.clone();
                async move {
                    let Ok(req) = ExportTraceServiceRequest::decode(body) else {
                        return (axum::http::StatusCode::BAD_REQUEST, Vec::new());
                    };
                    let mut out = sink.lock().unwrap();
                    for rs in req.resource_spans {
                        let service = rs
                            .resource
                            .iter()
                            .flat_map(|r| r.attributes.iter())
                            .find(|a| a.key == "service.name")
                            .map(|a| any_value_text(a.value.as_ref()))
                            .unwrap_or_default();
                        for s in rs.scope_spans.into_iter().flat_map(|ss| ss.spans) {
                            let status = s.status.unwrap_or_default();
                            out.push(ReceivedSpan {
                                service: service.clone(),
                                trace_id: hex(&s.trace_id),
                                span_id: hex(&s.span_id),
                                parent_span_id: hex(&s.parent_span_id),
                                name: s.name,
                                kind: s.kind,
                                attributes: s
                                    .attributes
                                    .iter()
                                    .map(|a| (a.key.clone(), any_value_text(a.value.as_ref())))
                                    .collect(),
                                status_code: status.code,
                                status_message: status.message,
                                events: s.events.into_iter().map(|e| e.name).collect(),
                            });
                        }
                    }
                    (
                        axum::http::StatusCode::OK,
                        ExportTraceServiceResponse::default().encode_to_vec(),
                    )
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(OtlpReceiver { endpoint, spans })
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().unwrap().clone()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn any_value_text(v: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    match v.and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}
