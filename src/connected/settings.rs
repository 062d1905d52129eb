//! Connected mode's settings, read from the environment once at start (agent.md
//! "Environment"); every refusal names the variable.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::outbox::Limits;
use crate::secrets::Secret;
use crate::session::{Endpoint, Timing, TlsSettings};

/// Everything connected mode takes from the environment (agent.md "Environment").
pub struct Settings {
    pub endpoint: Endpoint,
    pub tls: TlsSettings,
    pub agent_key: Secret,
    pub state_dir: PathBuf,
    pub allow_hooks: bool,
    pub allow_insecure: bool,
    pub metrics_addr: Option<String>,
    pub timing: Timing,
    pub hook_timeout: Duration,
    /// How long running backups may go on after SIGTERM before they are cancelled.
    pub shutdown_grace: Duration,
    pub outbox_limits: Limits,
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1" | "yes"))
}

fn env_secs(name: &str, default: u64) -> Result<Duration> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => {
            let n: f64 =
                v.trim().parse().with_context(|| format!("{name}={v:?} is not a number of seconds"))?;
            if !(n.is_finite() && n >= 0.0) {
                bail!("{name}={v:?} is not a number of seconds");
            }
            Ok(Duration::from_secs_f64(n))
        }
        _ => Ok(Duration::from_secs(default)),
    }
}

impl Settings {
    /// Reads and checks the environment; every refusal names the variable.
    pub fn from_env() -> Result<Settings> {
        let url = std::env::var("BACKUPY_SERVER_URL").context("BACKUPY_SERVER_URL is not set")?;
        let allow_insecure = env_flag("BACKUPY_DEV_ALLOW_INSECURE");
        let endpoint = Endpoint::parse(&url, allow_insecure).context("BACKUPY_SERVER_URL")?;
        let agent_key = agent_key_from_env()?.context(
            "connected mode needs the agent key: set BACKUPY_AGENT_KEY or BACKUPY_AGENT_KEY_FILE (the file form keeps it out of the process environment)",
        )?;
        let tls = TlsSettings::from_values(
            std::env::var("BACKUPY_CA_FILE").ok().as_deref(),
            std::env::var("BACKUPY_SERVER_PIN_SHA256").ok().as_deref(),
        )?;
        let state_dir =
            PathBuf::from(std::env::var("BACKUPY_STATE_DIR").unwrap_or_else(|_| "/var/lib/backupy".into()));
        // Test hooks for the wire timers; production never sets them.
        let timing = Timing {
            backoff_base: env_secs("BACKUPY_DEV_BACKOFF_BASE_SEC", 1)?,
            dead_after: env_secs("BACKUPY_DEV_DEAD_AFTER_SEC", 90)?,
            ws_ping_every: env_secs("BACKUPY_DEV_WS_PING_SEC", 30)?,
            ..Timing::default()
        };
        Ok(Settings {
            endpoint,
            tls,
            agent_key,
            state_dir,
            allow_hooks: env_flag("BACKUPY_ALLOW_HOOKS"),
            allow_insecure,
            metrics_addr: crate::metrics::listen_addr_from_env(),
            timing,
            hook_timeout: crate::hooks::DEFAULT_TIMEOUT,
            shutdown_grace: env_secs("BACKUPY_SHUTDOWN_GRACE_SEC", 60)?,
            outbox_limits: Limits::default(),
        })
    }
}

/// The agent key from `BACKUPY_AGENT_KEY`, else the file `BACKUPY_AGENT_KEY_FILE` names
/// (surrounding whitespace stripped); `None` when neither is set.
pub fn agent_key_from_env() -> Result<Option<Secret>> {
    if let Ok(k) = std::env::var("BACKUPY_AGENT_KEY")
        && !k.trim().is_empty()
    {
        return Ok(Some(Secret::new(k.trim())));
    }
    let Some(path) = std::env::var_os("BACKUPY_AGENT_KEY_FILE") else { return Ok(None) };
    let path = PathBuf::from(path);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("BACKUPY_AGENT_KEY_FILE {}: cannot read the agent key", path.display()))?;
    let key = Secret::new(text.trim());
    if key.is_empty() {
        bail!("BACKUPY_AGENT_KEY_FILE {} is empty", path.display());
    }
    Ok(Some(key))
}
