//! Readiness (what `/readyz` reports) and the HTTP server of `/metrics`,
//! `/healthz` and `/readyz`.

use super::*;

/// What `/readyz` reports.
#[derive(Debug, Default)]
pub struct Health {
    /// Every configured handler compiled and instantiated.
    pub handlers_loaded: AtomicBool,
    /// The consumer joined its group and got an assignment (maybe empty).
    pub joined: AtomicBool,
    /// A shutdown started: load balancers should stop sending traffic.
    pub stopping: AtomicBool,
    /// What keeps the instance from doing its work (a stopped partition,
    /// failing commits, a halt), by a key naming the cause.
    problems: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
}

impl Health {
    /// None when ready, else why not.
    pub fn not_ready(&self) -> Option<String> {
        let problems = self.problems.lock().unwrap_or_else(|e| e.into_inner());
        let stopping = self.stopping.load(Ordering::Relaxed);
        if !problems.is_empty() {
            // A problem says why, even while the instance shuts down over it.
            let mut why = problems.values().cloned().collect::<Vec<_>>().join("; ");
            if stopping {
                why.push_str("; shutting down");
            }
            return Some(why);
        }
        if stopping {
            return Some("shutting down".into());
        }
        if !self.handlers_loaded.load(Ordering::Relaxed) {
            Some("loading handlers".into())
        } else if !self.joined.load(Ordering::Relaxed) {
            Some("joining the consumer group".into())
        } else {
            None
        }
    }

    /// Reports a problem under `key` (replacing an earlier one): not ready
    /// until it is cleared.
    pub fn set_problem(&self, key: &str, reason: String) {
        self.problems
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.to_owned(), reason);
    }

    /// The problem under `key` is over.
    pub fn clear_problem(&self, key: &str) {
        self.problems
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}

/// Binds `listen` and serves `/metrics`, `/healthz` and `/readyz` on the
/// current tokio runtime; returns the bound address.
pub async fn serve(listen: &str, metrics: Arc<Metrics>, health: Arc<Health>) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("metrics.listen: cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        metrics.render(),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let health = health.clone();
                async move {
                    match health.not_ready() {
                        None => (StatusCode::OK, "ready\n".to_owned()).into_response(),
                        Some(why) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: {why}\n"),
                        )
                            .into_response(),
                    }
                }
            }),
        );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the metrics server stopped");
        }
    });
    info!(address = %addr, "serving /metrics, /healthz and /readyz");
    Ok(addr)
}
