//! The admin API, on its own listener (default `127.0.0.1:9465`), and the
//! client the `weir deploy|rollback|handlers|reload` commands use.
//!
//! - `GET /handlers`: each handler's version, previous version, load time,
//!   events handled and failed, state and last change;
//! - `PUT /handlers/{name}`: the body is a component; deploys it;
//! - `POST /handlers/{name}/rollback`: back to the previous version;
//! - `POST /reload`: re-reads the config file.
//!
//! Every request needs `Authorization: Bearer <token>`: without it, or
//! with another token, the answer is 401 and nothing changes. A body over
//! `admin.max_body_mib` gets 413.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Json;
use serde_json::json;
use tracing::{info, warn};

use super::{Deployed, Deployer, HandlerStatus, Reloaded};

struct Admin {
    deployer: Arc<Deployer>,
    token: String,
}

/// Starts the admin API; returns the address it listens on.
pub async fn serve(
    listen: &str,
    token: String,
    max_body_bytes: usize,
    deployer: Arc<Deployer>,
) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("admin.listen: cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let state = Arc::new(Admin { deployer, token });
    let app = axum::Router::new()
        .route("/handlers", get(list))
        .route("/handlers/{name}", put(deploy))
        .route("/handlers/{name}/rollback", post(rollback))
        .route("/reload", post(reload))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .with_state(state);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "the admin API stopped");
        }
    });
    info!(address = %addr, "serving the admin API");
    Ok(addr)
}

/// Compares in time independent of where the two differ.
fn same_token(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn authorize(State(admin): State<Arc<Admin>>, request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token);
    match given {
        Some(t) if same_token(t.trim().as_bytes(), admin.token.as_bytes()) => {
            next.run(request).await
        }
        _ => {
            warn!(method = %request.method(), path = %request.uri().path(),
                "admin request without a valid token refused");
            error(StatusCode::UNAUTHORIZED, "a valid bearer token is required")
        }
    }
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, Json(json!({ "error": message.to_string() }))).into_response()
}

async fn list(State(admin): State<Arc<Admin>>) -> Json<Vec<HandlerStatus>> {
    Json(
        admin
            .deployer
            .registry()
            .slots()
            .iter()
            .map(|s| s.status())
            .collect(),
    )
}

async fn deploy(
    State(admin): State<Arc<Admin>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    if admin.deployer.registry().get(&name).is_none() {
        return error(StatusCode::NOT_FOUND, format!("no handler named {name:?}"));
    }
    match admin
        .deployer
        .deploy(&name, body.to_vec(), "the uploaded component".into(), false)
        .await
    {
        Ok(d) => Json(d).into_response(),
        Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, format!("{e:#}")),
    }
}

async fn rollback(State(admin): State<Arc<Admin>>, Path(name): Path<String>) -> Response {
    if admin.deployer.registry().get(&name).is_none() {
        return error(StatusCode::NOT_FOUND, format!("no handler named {name:?}"));
    }
    match admin.deployer.rollback(&name).await {
        Ok((from, to)) => Json(json!({ "handler": name, "from": from, "to": to })).into_response(),
        Err(e) => error(StatusCode::CONFLICT, format!("{e:#}")),
    }
}

async fn reload(State(admin): State<Arc<Admin>>) -> Response {
    match admin.deployer.reload().await {
        Ok(r) => Json(r).into_response(),
        Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, format!("{e:#}")),
    }
}

/// The admin API's address and token, for the CLI.
#[derive(Debug, Clone, clap::Args)]
pub struct AdminTarget {
    /// The admin API, e.g. `http://127.0.0.1:9465`.
    #[arg(long, default_value = "http://127.0.0.1:9465")]
    pub admin: String,
    /// A file holding the bearer token (else `WEIR_ADMIN_TOKEN`).
    #[arg(long)]
    pub token_file: Option<std::path::PathBuf>,
}

impl AdminTarget {
    fn token(&self) -> Result<String> {
        let token = match &self.token_file {
            Some(f) => crate::config::read_token_file(f)?,
            None => std::env::var("WEIR_ADMIN_TOKEN").unwrap_or_default(),
        };
        if token.is_empty() {
            bail!("no admin token: set WEIR_ADMIN_TOKEN or pass --token-file");
        }
        Ok(token)
    }

    fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<serde_json::Value> {
        let url = format!("{}{path}", self.admin.trim_end_matches('/'));
        let client = reqwest::blocking::Client::builder()
            .timeout(std::time::Duration::from_secs(300))
            .build()?;
        let mut request = client.request(method, &url).bearer_auth(self.token()?);
        if let Some(body) = body {
            request = request.body(body);
        }
        let response = request
            .send()
            .with_context(|| format!("cannot reach the admin API at {url}"))?;
        let status = response.status();
        let text = response.text().unwrap_or_default();
        let value: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|_| json!({ "error": text }));
        if !status.is_success() {
            let why = value["error"].as_str().unwrap_or("").to_owned();
            bail!("{url}: {status}: {why}");
        }
        Ok(value)
    }

    /// `PUT /handlers/{name}` with the component in `file`.
    pub fn deploy(&self, name: &str, file: &std::path::Path) -> Result<Deployed> {
        let bytes =
            std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
        let v = self.send(
            reqwest::Method::PUT,
            &format!("/handlers/{name}"),
            Some(bytes),
        )?;
        Ok(serde_json::from_value(v)?)
    }

    /// `POST /handlers/{name}/rollback`; (from, to).
    pub fn rollback(&self, name: &str) -> Result<(String, String)> {
        let v = self.send(
            reqwest::Method::POST,
            &format!("/handlers/{name}/rollback"),
            None,
        )?;
        let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
        Ok((s("from"), s("to")))
    }

    /// `GET /handlers`.
    pub fn handlers(&self) -> Result<Vec<HandlerStatus>> {
        let v = self.send(reqwest::Method::GET, "/handlers", None)?;
        Ok(serde_json::from_value(v)?)
    }

    /// `POST /reload`.
    pub fn reload(&self) -> Result<Reloaded> {
        let v = self.send(reqwest::Method::POST, "/reload", None)?;
        Ok(serde_json::from_value(v)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(same_token(b"abc", b"abc"));
        assert!(!same_token(b"abd", b"abc"));
        assert!(!same_token(b"ab", b"abc"));
        assert!(!same_token(b"", b"abc"));
    }
}
