//! `backupy-agent dump-state`: what the state database says, as JSON, read through a
//! read-only connection so it works while `run` holds the directory lock (WAL readers do
//! not block the writer). The config is sealed with the agent key: with the key in the
//! environment it is shown, its secrets masked unless `--allow-secrets`; without it, only
//! its version. Runs on the calling thread.

use std::path::Path;

use anyhow::{Context, Result};
use prost::Message;
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde_json::{Value, json};

use crate::crypto::at_rest::StateCipher;
use crate::secrets::Secret;
use crate::wire::pb;

const MASK: &str = "***";

pub fn dump(state_dir: &Path, agent_key: Option<&Secret>, allow_secrets: bool) -> Result<Value> {
    let path = crate::state::db_path(state_dir);
    if !path.exists() {
        anyhow::bail!(
            "{} does not exist: no agent has used the state directory {} yet (set BACKUPY_STATE_DIR to the agent's)",
            path.display(),
            state_dir.display()
        );
    }
    let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("cannot open {} read-only", path.display()))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let has = |table: &str| -> Result<bool> {
        Ok(conn
            .query_row("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1", [table], |_| Ok(()))
            .optional()?
            .is_some())
    };
    let cipher = agent_key.map(StateCipher::from_agent_key);

    let mut config = Value::Null;
    if has("connected_config")? {
        let row: Option<(i64, i64, Vec<u8>)> = conn
            .query_row("SELECT version, applied_at_ms, config FROM connected_config WHERE id = 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        if let Some((version, applied_at_ms, blob)) = row {
            let body = match &cipher {
                None => json!("sealed: set BACKUPY_AGENT_KEY (or _FILE) to show it"),
                Some(c) => match c.open("control-plane config", &blob) {
                    Ok(bytes) => match pb::AgentConfig::decode(bytes.as_slice()) {
                        Ok(cfg) => config_json(&cfg, allow_secrets),
                        Err(e) => json!(format!("undecodable: {e}")),
                    },
                    Err(e) => json!(e.to_string()),
                },
            };
            config = json!({ "version": version, "applied_at_ms": applied_at_ms, "config": body });
        }
    }

    let mut session = Value::Null;
    if has("connected_session")? {
        session = conn
            .query_row(
                "SELECT endpoint, session_id, connected_at_ms, disconnected_at_ms, last_error
                 FROM connected_session WHERE id = 1",
                [],
                |r| {
                    Ok(json!({
                        "endpoint": r.get::<_, String>(0)?,
                        "session_id": r.get::<_, String>(1)?,
                        "connected_at_ms": r.get::<_, i64>(2)?,
                        "disconnected_at_ms": r.get::<_, Option<i64>>(3)?,
                        "last_error": r.get::<_, String>(4)?,
                    }))
                },
            )
            .optional()?
            .unwrap_or(Value::Null);
    }

    let mut outbox = json!({ "entries": 0, "bytes": 0 });
    if has("outbox")? {
        outbox = conn.query_row(
            "SELECT count(*), coalesce(sum(len), 0), min(seq), max(seq) FROM outbox",
            [],
            |r| {
                Ok(json!({
                    "entries": r.get::<_, i64>(0)?,
                    "bytes": r.get::<_, i64>(1)?,
                    "oldest_seq": r.get::<_, Option<i64>>(2)?,
                    "newest_seq": r.get::<_, Option<i64>>(3)?,
                }))
            },
        )?;
        let mut stmt = conn.prepare("SELECT kind, count(*) FROM outbox GROUP BY kind ORDER BY kind")?;
        let kinds: serde_json::Map<String, Value> = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, json!(r.get::<_, i64>(1)?))))?
            .collect::<Result<_, _>>()?;
        if let Some(o) = outbox.as_object_mut() {
            o.insert("by_kind".into(), Value::Object(kinds));
        }
    }

    let mut runs = Vec::new();
    if has("runs")? {
        let mut stmt = conn.prepare(
            "SELECT run_id, job_id, status, started_at, finished_at, size_bytes, object_key, error
             FROM runs ORDER BY started_at DESC LIMIT 20",
        )?;
        runs = stmt
            .query_map([], |r| {
                Ok(json!({
                    "run_id": r.get::<_, String>(0)?,
                    "job_id": r.get::<_, String>(1)?,
                    "status": r.get::<_, String>(2)?,
                    "started_at": r.get::<_, String>(3)?,
                    "finished_at": r.get::<_, Option<String>>(4)?,
                    "size_bytes": r.get::<_, i64>(5)?,
                    "object_key": r.get::<_, String>(6)?,
                    "error": r.get::<_, String>(7)?,
                }))
            })?
            .collect::<Result<_, _>>()?;
    }
    let mut pending_runs = Vec::new();
    if has("connected_runs")? {
        let mut stmt = conn.prepare(
            "SELECT run_id, job_id, phase, received_ms FROM connected_runs
             WHERE phase <> 'reported' ORDER BY received_ms",
        )?;
        pending_runs = stmt
            .query_map([], |r| {
                Ok(json!({
                    "run_id": r.get::<_, String>(0)?,
                    "job_id": r.get::<_, String>(1)?,
                    "phase": r.get::<_, String>(2)?,
                    "received_ms": r.get::<_, i64>(3)?,
                }))
            })?
            .collect::<Result<_, _>>()?;
    }
    Ok(json!({
        "state_dir": state_dir.display().to_string(),
        "config": config,
        "session": session,
        "outbox": outbox,
        "runs_in_flight": pending_runs,
        "recent_runs": runs,
    }))
}

fn config_json(cfg: &pb::AgentConfig, allow_secrets: bool) -> Value {
    let targets: Vec<Value> = cfg
        .targets
        .iter()
        .map(|t| {
            let c = t.connection.clone().unwrap_or_default();
            let password = match (c.password_secret_ref.is_empty(), allow_secrets) {
                (true, _) => Value::Null,
                (false, true) => json!(c.password_secret_ref),
                (false, false) => json!(MASK),
            };
            json!({
                "id": t.id, "type": t.r#type, "display_name": t.display_name,
                "host": c.host, "port": c.port, "database": c.database, "username": c.username,
                "password_secret_ref": password, "container_id": c.container_id, "strategy": c.strategy,
            })
        })
        .collect();
    let jobs: Vec<Value> = cfg
        .jobs
        .iter()
        .map(|j| {
            json!({
                "id": j.id, "target_id": j.target_id, "cron": j.cron, "retention_days": j.retention_days,
                "compression": j.compression, "encryption_enabled": j.encryption_enabled,
                "pre_hooks": j.pre_hooks.len(), "post_hooks": j.post_hooks.len(), "timeout_sec": j.timeout_sec,
            })
        })
        .collect();
    let checks: Vec<Value> = cfg
        .health_checks
        .iter()
        .map(|c| json!({ "id": c.id, "type": c.r#type, "target": c.target, "interval_sec": c.interval_sec }))
        .collect();
    let advanced = cfg.advanced.clone().unwrap_or_default();
    json!({
        "targets": targets,
        "jobs": jobs,
        "health_checks": checks,
        "advanced": {
            "max_parallel_jobs": advanced.max_parallel_jobs,
            "log_level": advanced.log_level,
            "auto_update_enabled": advanced.auto_update_enabled,
        },
    })
}
