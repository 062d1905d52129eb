//! Protobuf ⇄ domain for connected mode: a pushed `Target` as the drivers take it, the key
//! decision of wire-v1.md, a `HealthCheckSpec` as the probes take it, what is wrong in a
//! pushed config, and a run's outcome as `JobUpdate`/`BackupCompleted`.
//!
//! Pure functions, called on the connected main loop and on run workers; no I/O except
//! resolving a target's password reference.

use std::time::Duration;

use crate::cancel::CancelReason;
use crate::config::HealthCheck;
use crate::crypto::{DataKey, Encryption, Recipient};
use crate::drivers::{Engine, Strategy, TargetSpec};
use crate::runner::{ErrorKind, RunOutcome};
use crate::secrets;
use crate::wire::pb;

/// The engine of a wire `DbType`.
pub fn engine_of(db_type: i32) -> Result<Engine, String> {
    Ok(match pb::DbType::try_from(db_type) {
        Ok(pb::DbType::Postgresql) => Engine::PostgreSql,
        Ok(pb::DbType::Mysql) => Engine::MySql,
        Ok(pb::DbType::Mariadb) => Engine::MariaDb,
        Ok(pb::DbType::Mongodb) => Engine::MongoDb,
        Ok(pb::DbType::Redis) => Engine::Redis,
        Ok(pb::DbType::Sqlite) => Engine::Sqlite,
        Ok(pb::DbType::DbUnspecified) => return Err("the target has no database type".into()),
        Err(_) => return Err(format!("unknown database type {db_type} (a newer control plane?)")),
    })
}

/// A control plane `Target` as the drivers take it. The password reference is resolved
/// here under the pushed rules (agent.md "Secrets"), so it is only ever in memory for the
/// run, and a refused reference fails the run before anything connects to the database.
pub fn target_spec(target: &pb::Target) -> Result<TargetSpec, String> {
    let engine = engine_of(target.r#type).map_err(|e| format!("target {}: {e}", target.id))?;
    let c = target.connection.clone().unwrap_or_default();
    let mut spec = TargetSpec::new(&target.id, engine);
    spec.strategy = match pb::ConnectionStrategy::try_from(c.strategy) {
        Ok(pb::ConnectionStrategy::Tcp) => Strategy::Tcp,
        Ok(pb::ConnectionStrategy::UnixSocket) => Strategy::UnixSocket,
        Ok(pb::ConnectionStrategy::DockerExec) => {
            if c.container_id.is_empty() {
                return Err(format!("target {}: DOCKER_EXEC needs a container_id", target.id));
            }
            Strategy::DockerExec { container: c.container_id.clone() }
        }
        Err(_) => return Err(format!("target {}: unknown connection strategy {}", target.id, c.strategy)),
    };
    spec.host = c.host;
    spec.port = u16::try_from(c.port)
        .map_err(|_| format!("target {}: port {} is out of range", target.id, c.port))?;
    spec.database = c.database;
    spec.username = c.username;
    if !c.password_secret_ref.is_empty() {
        let password = crate::env::Env::get()
            .resolve_pushed_secret(&c.password_secret_ref)
            .map_err(|e| format!("target {}: password: {e}", target.id))?;
        spec.password = Some(password);
    }
    Ok(spec)
}

/// The key decision of wire-v1.md and agent.md "Encryption fails closed".
pub fn encryption_for(job: &pb::BackupJobSpec, cmd: &pb::RunBackup) -> Result<Encryption, String> {
    let chunk_size = crate::crypto::v2::DEFAULT_CHUNK;
    if !cmd.recipient_public_key.is_empty() {
        let bytes: [u8; 32] = cmd.recipient_public_key.as_slice().try_into().map_err(|_| {
            format!(
                "recipient_public_key has {} bytes; an X25519 public key has 32",
                cmd.recipient_public_key.len()
            )
        })?;
        return Ok(Encryption::V2Recipient { recipient: Recipient::from_bytes(bytes), chunk_size });
    }
    match cmd.encrypted_dek.len() {
        0 if job.encryption_enabled => {
            Err("no data key: the job requires encryption but RunBackup carried no encrypted_dek".into())
        }
        0 => Ok(Encryption::None),
        32 => Ok(Encryption::V2Raw {
            key: DataKey::from_slice(&cmd.encrypted_dek).map_err(|e| e.to_string())?,
            chunk_size,
        }),
        n => Err(format!("encrypted_dek has {n} bytes; a raw data key has 32")),
    }
}

/// A control plane health check as the probes take it.
pub fn health_check(c: &pb::HealthCheckSpec) -> Result<HealthCheck, String> {
    let kind = match pb::CheckType::try_from(c.r#type) {
        Ok(pb::CheckType::Http) => "http",
        Ok(pb::CheckType::Https) => "https",
        Ok(pb::CheckType::TcpCheck) => "tcp",
        Err(_) => return Err(format!("health check {:?}: unknown check type {}", c.id, c.r#type)),
    };
    Ok(HealthCheck {
        id: c.id.clone(),
        name: c.name.clone(),
        kind: kind.into(),
        target: c.target.clone(),
        interval: Duration::from_secs(if c.interval_sec == 0 { 60 } else { c.interval_sec.into() }),
        timeout: Duration::from_secs(if c.timeout_sec == 0 { 10 } else { c.timeout_sec.into() }),
        expected_status: c.expected_status,
    })
}

/// What is wrong in a pushed config, each in words an operator can act on.
pub fn config_problems(config: &pb::AgentConfig) -> Vec<String> {
    let mut problems = Vec::new();
    for job in &config.jobs {
        if !config.targets.iter().any(|t| t.id == job.target_id) {
            problems.push(format!(
                "job {:?} refers to target {:?}, which the config does not define",
                job.id, job.target_id
            ));
        }
    }
    for t in &config.targets {
        if let Err(e) = engine_of(t.r#type) {
            problems.push(format!("target {:?}: {e}", t.id));
        }
    }
    for c in &config.health_checks {
        if let Err(e) = health_check(c) {
            problems.push(e);
        }
    }
    if let Some(a) = &config.advanced
        && !a.log_level.is_empty()
        && crate::logfwd::parse_level(&a.log_level).is_none()
    {
        problems.push(format!(
            "advanced.log_level {:?} is not one of trace, debug, info, warn, error",
            a.log_level
        ));
    }
    problems
}

/// A `JobUpdate` with only the ids and the status set.
pub fn job_update(job_id: &str, run_id: &str, status: pb::JobStatus) -> pb::JobUpdate {
    pb::JobUpdate {
        job_id: job_id.to_string(),
        status: status as i32,
        run_id: run_id.to_string(),
        ..Default::default()
    }
}

/// The final `JobUpdate` of a run and, after a success, its `BackupCompleted`.
/// `timeout_sec` is the job's, for the words of a timeout.
pub fn final_reports(outcome: &RunOutcome, timeout_sec: u32) -> (pb::JobUpdate, Option<pb::BackupCompleted>) {
    let mut update = job_update(&outcome.job_id, &outcome.run_id, pb::JobStatus::Success);
    match &outcome.result {
        Ok(s) => {
            update.progress_percent = 100;
            let completed = pb::BackupCompleted {
                job_id: outcome.job_id.clone(),
                run_id: outcome.run_id.clone(),
                s3_key: s.key.clone(),
                size_bytes: s.stored_bytes,
                sha256: s.sha256.clone(),
                duration_ms: s.elapsed.as_millis() as u64,
                dek_kms_id: s.key_id.clone(),
                encrypted_dek: s.encrypted_dek.clone(),
                compression: s.compression.name().to_string(),
                db_engine_version: s.engine_version.clone(),
            };
            (update, Some(completed))
        }
        Err(e) => {
            let (status, message) = match e.kind {
                ErrorKind::Cancelled(CancelReason::Requested) => {
                    (pb::JobStatus::Cancelled, "cancelled by the control plane".to_string())
                }
                ErrorKind::Cancelled(CancelReason::Shutdown) => {
                    (pb::JobStatus::Cancelled, "cancelled: the agent shut down during the run".to_string())
                }
                ErrorKind::Cancelled(CancelReason::TimedOut) => (
                    pb::JobStatus::Failed,
                    format!("timed out after {timeout_sec} s (the job's timeout_sec)"),
                ),
                _ => (pb::JobStatus::Failed, secrets::redact(e.detail())),
            };
            update.status = status as i32;
            update.error_message = message;
            (update, None)
        }
    }
}
