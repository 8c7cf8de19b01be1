//! The configuration of deploys: the admin API, the plugin folder watch,
//! the compile cache, automatic rollback, and the environment overrides
//! that keep secrets out of the file.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use super::Config;

/// The admin API: its own listener, every request with a bearer token.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Serve the admin API (a token is then required).
    #[serde(default)]
    pub enabled: bool,
    /// Address to listen on; keep it private (default `127.0.0.1:9465`).
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    /// A file whose first line is the bearer token.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// The environment variable holding the token when `token_file` is not
    /// set (default `WEIR_ADMIN_TOKEN`).
    #[serde(default = "default_token_env")]
    pub token_env: String,
    /// The largest request body (a component upload), in MiB.
    #[serde(default = "default_max_body_mib")]
    pub max_body_mib: u64,
}

fn default_admin_listen() -> String {
    "127.0.0.1:9465".into()
}
fn default_token_env() -> String {
    "WEIR_ADMIN_TOKEN".into()
}
const fn default_max_body_mib() -> u64 {
    64
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: default_admin_listen(),
            token_file: None,
            token_env: default_token_env(),
            max_body_mib: default_max_body_mib(),
        }
    }
}

impl AdminConfig {
    /// The bearer token, from `token_file` or else from `token_env`; the
    /// error names the key to fix.
    pub fn token(&self) -> Result<String> {
        let token = match &self.token_file {
            Some(file) => {
                read_token_file(file).map_err(|e| anyhow::anyhow!("admin.token_file: {e:#}"))?
            }
            None => std::env::var(&self.token_env).unwrap_or_default(),
        };
        if token.is_empty() {
            match &self.token_file {
                Some(file) => bail!("admin.token_file: {} holds no token", file.display()),
                None => bail!(
                    "admin.token_env: the admin API needs a token; set the environment variable {} \
                     (or admin.token_file)",
                    self.token_env
                ),
            }
        }
        Ok(token)
    }

    pub(super) fn validate(&self) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        if self.max_body_mib == 0 {
            bail!("admin.max_body_mib: must be above 0");
        }
        self.token().map(|_| ())
    }

    /// The body limit in bytes.
    pub fn max_body_bytes(&self) -> usize {
        (self.max_body_mib as usize) << 20
    }
}

/// The first line of a token file, trimmed.
pub fn read_token_file(file: &std::path::Path) -> Result<String> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    Ok(text.lines().next().unwrap_or_default().trim().to_owned())
}

/// The plugin folder watch and the compile cache.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginsConfig {
    /// Watch the handlers' `.wasm` files: replacing one (write, then
    /// rename over it) deploys it.
    #[serde(default)]
    pub watch: bool,
    /// How long the watch waits for a file to settle, in milliseconds.
    #[serde(default = "default_debounce_ms")]
    pub watch_debounce_ms: u64,
    /// Keep precompiled components on disk so a known version starts
    /// without compiling.
    #[serde(default = "default_true")]
    pub cache: bool,
    /// Where the compile cache lives (relative to the config file).
    #[serde(default = "default_cache_dir")]
    pub cache_dir: PathBuf,
}

const fn default_debounce_ms() -> u64 {
    300
}
const fn default_true() -> bool {
    true
}
fn default_cache_dir() -> PathBuf {
    PathBuf::from("weir-compiled")
}

impl Default for PluginsConfig {
    fn default() -> Self {
        Self {
            watch: false,
            watch_debounce_ms: default_debounce_ms(),
            cache: true,
            cache_dir: default_cache_dir(),
        }
    }
}

/// `[handler.rollout]`: a new version whose failure ratio over its first
/// `watch_events` events passes `max_failure_ratio` (and the previous
/// version's ratio) is rolled back by itself.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutConfig {
    /// Events a new version is watched for.
    pub watch_events: u64,
    /// The failure ratio (dead-lettered / handled) above which it is rolled back.
    pub max_failure_ratio: f64,
}

impl RolloutConfig {
    pub(super) fn validate(&self, at: &str) -> Result<()> {
        if self.watch_events == 0 {
            bail!("{at}.watch_events: must be at least 1");
        }
        if !(0.0..1.0).contains(&self.max_failure_ratio) {
            bail!("{at}.max_failure_ratio: must be at least 0 and below 1");
        }
        Ok(())
    }
}

/// The prefix of environment variables that set a librdkafka option:
/// `WEIR_KAFKA_OPTION_SASL_PASSWORD` sets `sasl.password`.
pub const KAFKA_OPTION_ENV: &str = "WEIR_KAFKA_OPTION_";

/// Applies `WEIR_KAFKA_OPTION_<NAME>` variables over `[kafka.options]`
/// (name lowercased, `_` read as `.`), so secrets need not be in the file.
pub(super) fn apply_env_overrides(
    config: &mut Config,
    vars: impl Iterator<Item = (String, String)>,
) -> Result<()> {
    for (name, value) in vars {
        let Some(option) = name.strip_prefix(KAFKA_OPTION_ENV) else {
            continue;
        };
        if option.is_empty() {
            bail!("{name}: names no librdkafka option");
        }
        let key = option.to_ascii_lowercase().replace('_', ".");
        config.kafka.options.insert(key, value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[kafka]\nbrokers = \"b:9092\"\ngroup_id = \"g\"\n";

    #[test]
    fn kafka_options_come_from_the_environment() {
        let mut c = Config::parse(MINIMAL).unwrap();
        let vars = [
            (
                "WEIR_KAFKA_OPTION_SASL_PASSWORD".to_owned(),
                "s3cret".to_owned(),
            ),
            ("HOME".to_owned(), "/root".to_owned()),
        ];
        apply_env_overrides(&mut c, vars.into_iter()).unwrap();
        assert_eq!(c.kafka.options["sasl.password"], "s3cret");
        assert_eq!(c.kafka.options.len(), 1);
    }

    #[test]
    fn an_enabled_admin_api_without_a_token_names_the_key() {
        let text =
            format!("{MINIMAL}[admin]\nenabled = true\ntoken_env = \"WEIR_TEST_NO_SUCH_TOKEN\"\n");
        let c = Config::parse(&text).unwrap();
        let e = c.admin.validate().unwrap_err().to_string();
        assert!(e.starts_with("admin.token_env:"), "{e}");
        let text = format!("{MINIMAL}[admin]\nenabled = true\ntoken_file = \"/no/such/file\"\n");
        let e = Config::parse(&text)
            .unwrap()
            .admin
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("admin.token_file:"), "{e}");
    }

    #[test]
    fn a_rollout_ratio_of_one_or_more_is_refused() {
        let r = RolloutConfig {
            watch_events: 10,
            max_failure_ratio: 1.0,
        };
        let e = r.validate("handler[0].rollout").unwrap_err().to_string();
        assert!(e.starts_with("handler[0].rollout.max_failure_ratio"), "{e}");
    }
}
