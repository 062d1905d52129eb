//! Every `BACKUPY_*` variable the agent reads (agent.md "Environment"), read once, on
//! first use, into one typed [`Env`]; nothing else in the crate reads them.
//!
//! One rule for all of them: an empty value counts as unset, and a flag is on when its
//! value is `1`, `true`, `yes` or `on` (any case, surrounding spaces ignored). A number
//! that does not parse is recorded as a problem naming the variable; the modes that use
//! it refuse to start with [`Env::check`], and the default stands meanwhile.
//!
//! Variables named by a secret reference (`env:NAME`) are not settings: `secrets`
//! resolves them when asked. Children get none of these (`drivers::exec`'s allow-list).

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use crate::secrets::{self, Secret, SecretError};

/// Where state lives when neither the config nor `BACKUPY_STATE_DIR` says.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/backupy";
/// The metrics and health endpoints when `BACKUPY_METRICS_LISTEN_ADDR` is unset.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9090";
pub const DEFAULT_DOCKER_SOCKET: &str = "/var/run/docker.sock";

/// The agent's environment, typed.
#[derive(Debug, Clone)]
pub struct Env {
    /// `BACKUPY_SERVER_URL`: connected mode when set.
    pub server_url: Option<String>,
    /// `BACKUPY_AGENT_KEY`, trimmed.
    pub agent_key: Option<Secret>,
    /// `BACKUPY_AGENT_KEY_FILE`, read by connected mode when the key itself is unset.
    pub agent_key_file: Option<PathBuf>,
    /// `BACKUPY_STATE_DIR`; see [`Env::state_dir`].
    pub state_dir: Option<PathBuf>,
    /// `BACKUPY_CA_FILE`: extra trusted roots for the control plane, S3, probes, updates.
    pub ca_file: Option<PathBuf>,
    /// `BACKUPY_SERVER_PIN_SHA256`.
    pub server_pin_sha256: Option<String>,
    /// `BACKUPY_ALLOW_HOOKS`: run hooks a control plane pushes.
    pub allow_hooks: bool,
    /// `BACKUPY_ALLOW_DOWNGRADE`: a forced SelfUpdate from the control plane may install
    /// an older version.
    pub allow_downgrade: bool,
    /// `BACKUPY_DEV_ALLOW_INSECURE`: plain `ws://` and `http://` for development.
    pub dev_allow_insecure: bool,
    /// `BACKUPY_METRICS_LISTEN_ADDR`: `None` when set to empty (no endpoint).
    pub metrics_listen_addr: Option<String>,
    /// `BACKUPY_LOG_LEVEL`: a level or an env_logger filter.
    pub log_level: Option<String>,
    /// `BACKUPY_LOG_FORMAT=json`.
    pub log_json: bool,
    /// `BACKUPY_DOCKER_SOCKET`.
    pub docker_socket: PathBuf,
    /// `BACKUPY_DISABLE_DISCOVERY`.
    pub disable_discovery: bool,
    /// `BACKUPY_SECRETS_DIR`: where a bare secret name is looked up.
    pub secrets_dir: Option<PathBuf>,
    /// `BACKUPY_PUSHED_SECRET_ENV`: the variables a pushed `env:` reference may read
    /// (comma-separated; never a `BACKUPY_*` one, see `secrets::resolve_pushed`).
    pub pushed_secret_env: Vec<String>,
    /// `BACKUPY_RESTORE_PASSWORD`: a secret reference for `restore --to`.
    pub restore_password: Option<String>,
    /// `BACKUPY_TOOL_PATH`: the only place dump and restore tools are looked for.
    pub tool_path: Option<OsString>,
    /// `BACKUPY_SHUTDOWN_GRACE_SEC` (connected mode; default 60 s).
    pub shutdown_grace: Duration,
    /// `BACKUPY_UPDATE_CONFIRM_TIMEOUT_SEC` (default 60 s).
    pub update_confirm_timeout: Duration,
    /// `BACKUPY_DEV_BACKOFF_BASE_SEC`, `_DEAD_AFTER_SEC`, `_WS_PING_SEC`: test hooks for
    /// the wire timers (defaults 1, 90 and 30 s).
    pub dev_backoff_base: Duration,
    pub dev_dead_after: Duration,
    pub dev_ws_ping: Duration,
    /// Values that did not parse, each naming its variable.
    pub problems: Vec<String>,
}

impl Env {
    /// The process environment, read on first use.
    pub fn get() -> &'static Env {
        static ENV: OnceLock<Env> = OnceLock::new();
        ENV.get_or_init(|| Env::from_lookup(|name| std::env::var_os(name)))
    }

    /// The environment as `lookup` gives it (tests pass a map).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<OsString>) -> Env {
        let mut problems = Vec::new();
        let os = |name: &str| lookup(name).filter(|v| !v.is_empty());
        let text =
            |name: &str| os(name).map(|v| v.to_string_lossy().trim().to_string()).filter(|v| !v.is_empty());
        let flag = |name: &str| text(name).is_some_and(|v| is_true(&v));
        let mut secs = |name: &str, default: u64| match text(name) {
            None => Duration::from_secs(default),
            Some(v) => match v.parse::<f64>() {
                Ok(n) if n.is_finite() && n >= 0.0 => Duration::from_secs_f64(n),
                _ => {
                    problems.push(format!("{name}={v:?} is not a number of seconds"));
                    Duration::from_secs(default)
                }
            },
        };
        let shutdown_grace = secs("BACKUPY_SHUTDOWN_GRACE_SEC", 60);
        let update_confirm_timeout = match secs("BACKUPY_UPDATE_CONFIRM_TIMEOUT_SEC", 60) {
            d if d.is_zero() => Duration::from_secs(60),
            d => d,
        };
        let dev_backoff_base = secs("BACKUPY_DEV_BACKOFF_BASE_SEC", 1);
        let dev_dead_after = secs("BACKUPY_DEV_DEAD_AFTER_SEC", 90);
        let dev_ws_ping = secs("BACKUPY_DEV_WS_PING_SEC", 30);
        Env {
            server_url: text("BACKUPY_SERVER_URL"),
            agent_key: text("BACKUPY_AGENT_KEY").map(Secret::new),
            agent_key_file: os("BACKUPY_AGENT_KEY_FILE").map(PathBuf::from),
            state_dir: os("BACKUPY_STATE_DIR").map(PathBuf::from),
            ca_file: os("BACKUPY_CA_FILE").map(PathBuf::from),
            server_pin_sha256: text("BACKUPY_SERVER_PIN_SHA256"),
            allow_hooks: flag("BACKUPY_ALLOW_HOOKS"),
            dev_allow_insecure: flag("BACKUPY_DEV_ALLOW_INSECURE"),
            allow_downgrade: flag("BACKUPY_ALLOW_DOWNGRADE"),
            metrics_listen_addr: match lookup("BACKUPY_METRICS_LISTEN_ADDR") {
                None => Some(DEFAULT_METRICS_ADDR.to_string()),
                Some(_) => text("BACKUPY_METRICS_LISTEN_ADDR"),
            },
            log_level: text("BACKUPY_LOG_LEVEL"),
            log_json: text("BACKUPY_LOG_FORMAT").is_some_and(|f| f.eq_ignore_ascii_case("json")),
            docker_socket: os("BACKUPY_DOCKER_SOCKET")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DOCKER_SOCKET)),
            disable_discovery: flag("BACKUPY_DISABLE_DISCOVERY"),
            secrets_dir: os("BACKUPY_SECRETS_DIR").map(PathBuf::from),
            pushed_secret_env: text("BACKUPY_PUSHED_SECRET_ENV")
                .map(|v| v.split(',').map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect())
                .unwrap_or_default(),
            restore_password: text("BACKUPY_RESTORE_PASSWORD"),
            tool_path: os("BACKUPY_TOOL_PATH"),
            shutdown_grace,
            update_confirm_timeout,
            dev_backoff_base,
            dev_dead_after,
            dev_ws_ping,
            problems,
        }
    }

    /// `BACKUPY_STATE_DIR`, else [`DEFAULT_STATE_DIR`] (a config's `state_dir` comes first
    /// where there is a config).
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR))
    }

    /// Resolves a secret reference, with `BACKUPY_SECRETS_DIR` (default
    /// [`secrets::DEFAULT_SECRETS_DIR`]) for a bare name.
    pub fn resolve_secret(&self, reference: &str) -> Result<Secret, SecretError> {
        let default = PathBuf::from(secrets::DEFAULT_SECRETS_DIR);
        secrets::resolve_in(reference, self.secrets_dir.as_ref().unwrap_or(&default))
    }

    /// Resolves a secret reference from a config the control plane pushed, under the
    /// narrower rules of `secrets::resolve_pushed` (`BACKUPY_PUSHED_SECRET_ENV`,
    /// `BACKUPY_SECRETS_DIR`).
    pub fn resolve_pushed_secret(&self, reference: &str) -> Result<Secret, SecretError> {
        let default = PathBuf::from(secrets::DEFAULT_SECRETS_DIR);
        secrets::resolve_pushed(
            reference,
            self.secrets_dir.as_ref().unwrap_or(&default),
            &self.pushed_secret_env,
        )
    }

    /// The password of `restore --to` from `BACKUPY_RESTORE_PASSWORD`, resolved; `None`
    /// when it is unset (the URL may carry one).
    pub fn restore_password(&self) -> Result<Option<Secret>, String> {
        self.restore_password
            .as_deref()
            .map(|reference| {
                self.resolve_secret(reference).map_err(|e| format!("BACKUPY_RESTORE_PASSWORD: {e}"))
            })
            .transpose()
    }

    /// The first value that did not parse, as an error naming the variable.
    pub fn check(&self) -> Result<(), String> {
        match self.problems.first() {
            Some(p) => Err(p.clone()),
            None => Ok(()),
        }
    }
}

/// Why a URL the control plane handed over is refused (see [`check_handed_url`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlRefusal {
    #[error(
        "plain-http URL refused (https is required; set BACKUPY_DEV_ALLOW_INSECURE=true for development)"
    )]
    Insecure,
    #[error("unsupported URL scheme {0:?} (https is required)")]
    Scheme(String),
    #[error("not a URL: {0}")]
    Invalid(String),
}

/// The one scheme rule for every URL the agent is handed (an S3 endpoint of the
/// multipart extension, a presigned PUT, a self-update download): `https`, or `http`
/// only with `BACKUPY_DEV_ALLOW_INSECURE=true` (`allow_insecure`).
pub fn check_handed_url(url: &str, allow_insecure: bool) -> Result<url::Url, UrlRefusal> {
    let parsed = url::Url::parse(url).map_err(|e| UrlRefusal::Invalid(e.to_string()))?;
    match parsed.scheme() {
        "https" => Ok(parsed),
        "http" if allow_insecure => Ok(parsed),
        "http" => Err(UrlRefusal::Insecure),
        other => Err(UrlRefusal::Scheme(other.to_string())),
    }
}

/// The one truthiness rule of the agent's flags.
pub fn is_true(value: &str) -> bool {
    matches!(value.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> Env {
        let map: HashMap<String, OsString> =
            vars.iter().map(|(k, v)| (k.to_string(), OsString::from(v))).collect();
        Env::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn one_truthiness_rule_for_every_flag() {
        for v in ["1", "true", "TRUE", " yes ", "On"] {
            let e = env(&[
                ("BACKUPY_DEV_ALLOW_INSECURE", v),
                ("BACKUPY_ALLOW_HOOKS", v),
                ("BACKUPY_DISABLE_DISCOVERY", v),
            ]);
            assert!(e.dev_allow_insecure && e.allow_hooks && e.disable_discovery, "{v:?}");
        }
        for v in ["", "0", "false", "no", "off", "y", "enabled"] {
            let e = env(&[("BACKUPY_DEV_ALLOW_INSECURE", v), ("BACKUPY_ALLOW_HOOKS", v)]);
            assert!(!e.dev_allow_insecure && !e.allow_hooks, "{v:?}");
        }
    }

    #[test]
    fn an_empty_value_is_unset() {
        let e = env(&[("BACKUPY_STATE_DIR", ""), ("BACKUPY_CA_FILE", ""), ("BACKUPY_AGENT_KEY", "  ")]);
        assert_eq!(e.state_dir(), PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!((e.ca_file, e.agent_key.is_none()), (None, true));
        assert_eq!(env(&[("BACKUPY_STATE_DIR", "/srv/b")]).state_dir(), PathBuf::from("/srv/b"));
        assert_eq!(env(&[]).docker_socket, PathBuf::from(DEFAULT_DOCKER_SOCKET));
    }

    #[test]
    fn one_scheme_rule_for_handed_urls() {
        assert!(check_handed_url("https://s3.example/b/k?X-Amz-Signature=s", false).is_ok());
        assert_eq!(check_handed_url("http://s3.example/b/k", false).unwrap_err(), UrlRefusal::Insecure);
        assert!(check_handed_url("http://s3.example/b/k", true).is_ok());
        assert!(matches!(check_handed_url("ftp://h/x", true), Err(UrlRefusal::Scheme(_))));
        assert!(matches!(check_handed_url("not a url", true), Err(UrlRefusal::Invalid(_))));
        assert!(UrlRefusal::Insecure.to_string().contains("BACKUPY_DEV_ALLOW_INSECURE=true"));
    }

    #[test]
    fn pushed_secret_env_is_a_trimmed_comma_separated_list() {
        assert_eq!(env(&[("BACKUPY_PUSHED_SECRET_ENV", " A, B ,,C ")]).pushed_secret_env, ["A", "B", "C"]);
        assert!(env(&[]).pushed_secret_env.is_empty());
    }

    #[test]
    fn the_metrics_address_defaults_when_unset_and_is_off_when_empty() {
        assert_eq!(env(&[]).metrics_listen_addr.as_deref(), Some(DEFAULT_METRICS_ADDR));
        assert_eq!(env(&[("BACKUPY_METRICS_LISTEN_ADDR", "")]).metrics_listen_addr, None);
        assert_eq!(
            env(&[("BACKUPY_METRICS_LISTEN_ADDR", " :9100 ")]).metrics_listen_addr.as_deref(),
            Some(":9100")
        );
    }

    #[test]
    fn a_bad_number_is_a_problem_naming_its_variable_and_the_default_stands() {
        let e = env(&[("BACKUPY_SHUTDOWN_GRACE_SEC", "soon"), ("BACKUPY_DEV_WS_PING_SEC", "0.5")]);
        assert_eq!(e.shutdown_grace, Duration::from_secs(60));
        assert_eq!(e.dev_ws_ping, Duration::from_millis(500));
        assert_eq!(e.check(), Err("BACKUPY_SHUTDOWN_GRACE_SEC=\"soon\" is not a number of seconds".into()));
        assert_eq!(env(&[("BACKUPY_DEV_DEAD_AFTER_SEC", "-1")]).problems.len(), 1);
        assert_eq!(env(&[]).check(), Ok(()));
    }
}
