//! Connected mode's settings, read from the environment once at start (agent.md
//! "Environment"); every refusal names the variable.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::env::Env;
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

impl Settings {
    /// Checks what connected mode takes from the environment; every refusal names the
    /// variable.
    pub fn from_env() -> Result<Settings> {
        let env = Env::get();
        env.check().map_err(anyhow::Error::msg)?;
        let url = env.server_url.as_deref().context("BACKUPY_SERVER_URL is not set")?;
        let endpoint = Endpoint::parse(url, env.dev_allow_insecure).context("BACKUPY_SERVER_URL")?;
        let agent_key = agent_key_from_env()?.context(
            "connected mode needs the agent key: set BACKUPY_AGENT_KEY or BACKUPY_AGENT_KEY_FILE (the file form keeps it out of the process environment)",
        )?;
        let ca_file = env.ca_file.as_ref().map(|p| p.to_string_lossy().into_owned());
        let tls = TlsSettings::from_values(ca_file.as_deref(), env.server_pin_sha256.as_deref())?;
        // Test hooks for the wire timers; production never sets them.
        let timing = Timing {
            backoff_base: env.dev_backoff_base,
            dead_after: env.dev_dead_after,
            ws_ping_every: env.dev_ws_ping,
            ..Timing::default()
        };
        Ok(Settings {
            endpoint,
            tls,
            agent_key,
            state_dir: env.state_dir(),
            allow_hooks: env.allow_hooks,
            allow_insecure: env.dev_allow_insecure,
            metrics_addr: env.metrics_listen_addr.clone(),
            timing,
            hook_timeout: crate::hooks::DEFAULT_TIMEOUT,
            shutdown_grace: env.shutdown_grace,
            outbox_limits: Limits::default(),
        })
    }
}

/// The agent key from `BACKUPY_AGENT_KEY`, else the file `BACKUPY_AGENT_KEY_FILE` names
/// (surrounding whitespace stripped); `None` when neither is set.
pub fn agent_key_from_env() -> Result<Option<Secret>> {
    let env = Env::get();
    if let Some(key) = &env.agent_key {
        return Ok(Some(key.clone()));
    }
    let Some(path) = &env.agent_key_file else { return Ok(None) };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("BACKUPY_AGENT_KEY_FILE {}: cannot read the agent key", path.display()))?;
    let key = Secret::new(text.trim());
    if key.is_empty() {
        bail!("BACKUPY_AGENT_KEY_FILE {} is empty", path.display());
    }
    Ok(Some(key))
}
