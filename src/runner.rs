//! One backup run, written once for both modes: pre-hooks, the dump, the pipeline into
//! the run's destination, the destination's seal (standalone writes the manifest there),
//! post-hooks and notifications.
//!
//! Each mode only builds a [`RunPlan`] (standalone from its TOML, connected mode from a
//! RunBackup) and turns the [`RunOutcome`] into its own report: a manifest and a state
//! record, or JobUpdate/BackupCompleted. Runs on the calling thread (a scheduler worker in
//! both modes, or the `backup` command's run thread); the pipeline it starts owns its own
//! stage threads. What the run does is told to the mode through an [`Observer`], called
//! on this thread.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::cancel::{Cancel, CancelReason};
use crate::crypto::Encryption;
use crate::drivers::{self, Engine, TargetSpec};
use crate::hooks;
use crate::metrics::Metrics;
use crate::notify::{self, Notify};
use crate::pipeline::{self, Compression, Progress};
use crate::state::{RunStatus, StateDb};
use crate::storage::ObjectWriter;

/// Everything one run works from, resolved before it starts.
pub struct RunPlan {
    pub job_id: String,
    pub run_id: String,
    pub target: TargetSpec,
    pub compression: Compression,
    pub encryption: Encryption,
    pub hooks: Hooks,
    /// Standalone's ping and webhook; connected mode leaves them to the control plane.
    pub notify: Notify,
    /// Where snapshot and secret files of the dump go.
    pub temp_dir: PathBuf,
    pub destination: Box<dyn Destination>,
}

/// Shell commands around the run (`hooks`).
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    pub pre: Vec<String>,
    pub post: Vec<String>,
    pub timeout: Duration,
}

/// What a destination needs to name the object.
pub struct ObjectName<'a> {
    pub target_id: &'a str,
    pub job_id: &'a str,
    pub run_id: &'a str,
    pub started: DateTime<Utc>,
    /// "pgdump.zst.bkpy": the dump's extension, then compression's and encryption's.
    pub extension: &'a str,
}

/// Where a run's object goes: a key in the standalone storage, or the control plane's
/// multipart upload or presigned PUT.
pub trait Destination: Send {
    /// Starts writing the object; returns the writer and the object's key.
    fn create(
        &mut self,
        name: &ObjectName<'_>,
        cancel: &Cancel,
    ) -> Result<(Box<dyn ObjectWriter>, String), String>;
    /// Where `key` is, for people: a path or an s3:// URL.
    fn describe(&self, key: &str) -> String;
    /// Called once the object is committed; an error fails the run, and the destination
    /// removes the object it cannot complete.
    fn seal(&mut self, stored: &Stored) -> Result<(), String>;
}

/// What a successful run stored.
#[derive(Debug, Clone)]
pub struct Stored {
    pub key: String,
    pub location: String,
    pub engine: Engine,
    pub engine_version: String,
    pub stored_bytes: u64,
    pub dump_bytes: u64,
    pub sha256: String,
    pub compression: Compression,
    /// "none", "v1" or "v2".
    pub encryption: &'static str,
    pub key_id: String,
    pub encrypted_dek: Vec<u8>,
    pub started: DateTime<Utc>,
    pub finished: DateTime<Utc>,
    /// The backup itself, hooks not included.
    pub elapsed: Duration,
    /// What the dump holds, when its driver counts it (the manifest's `content`).
    pub content: Option<crate::storage::Content>,
}

/// What went wrong, so each mode can report it without parsing a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The plan could not be built: an unknown target, a bad key, a refused setting.
    Config,
    /// A pre-hook failed; the backup did not start.
    Hook,
    /// Encryption could not be prepared.
    Encryption,
    /// The dump could not start or failed.
    Dump,
    /// The destination refused the object or its seal.
    Store,
    /// A pipeline stage failed.
    Pipeline,
    /// The run was stopped from outside.
    Cancelled(CancelReason),
}

/// A failed run, with the job named; the message says what to do where it can.
#[derive(Debug, thiserror::Error)]
#[error("job {job}: {message}")]
pub struct RunError {
    pub job: String,
    pub kind: ErrorKind,
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl RunError {
    pub fn new(job: &str, kind: ErrorKind, message: impl Into<String>) -> RunError {
        RunError { job: job.to_string(), kind, message: message.into(), source: None }
    }

    /// An error from `source`, as `kind`, unless `cancel` says the run was stopped from
    /// outside (then whatever broke, broke because of it).
    fn from_source<E>(job: &str, kind: ErrorKind, source: E, cancel: &Cancel) -> RunError
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let kind = cancel.reason().map(ErrorKind::Cancelled).unwrap_or(kind);
        RunError { job: job.to_string(), kind, message: source.to_string(), source: Some(Box::new(source)) }
    }

    /// The message without the job's name (connected mode reports it per job anyway).
    pub fn detail(&self) -> &str {
        &self.message
    }

    pub fn is_cancelled(&self) -> bool {
        matches!(self.kind, ErrorKind::Cancelled(_))
    }
}

/// How a run ended.
#[derive(Debug)]
pub struct RunOutcome {
    pub job_id: String,
    pub run_id: String,
    /// The whole run, hooks included.
    pub elapsed: Duration,
    pub result: Result<Stored, RunError>,
}

impl RunOutcome {
    /// A run that failed before it started (its plan could not be built).
    pub fn refused(job_id: &str, run_id: &str, error: RunError) -> RunOutcome {
        RunOutcome {
            job_id: job_id.to_string(),
            run_id: run_id.to_string(),
            elapsed: Duration::ZERO,
            result: Err(error),
        }
    }

    /// The status recorded in `state.db`, the metrics and post-hooks: a timed-out run
    /// failed, any other stop from outside is a cancel.
    pub fn status(&self) -> RunStatus {
        match &self.result {
            Ok(_) => RunStatus::Success,
            Err(e) if e.kind == ErrorKind::Cancelled(CancelReason::TimedOut) => RunStatus::Failed,
            Err(e) if e.is_cancelled() => RunStatus::Cancelled,
            Err(_) => RunStatus::Failed,
        }
    }
}

/// Steps of a run, as wire-v1.md names them in `JobUpdate.current_step`.
pub mod step {
    pub const PRE_HOOKS: &str = "pre_hooks";
    pub const DUMPING: &str = "dumping";
    pub const UPLOADING: &str = "uploading";
    pub const POST_HOOKS: &str = "post_hooks";
}

/// What the run tells its mode while it works; every method has a do-nothing default.
pub trait Observer {
    /// The run entered `step` (see [`step`]).
    fn step(&self, _step: &'static str) {}
    /// The dump's expected size in bytes, for a percentage.
    fn estimate(&self, _bytes: u64) {}
}

impl Observer for () {}

/// Runs `plan` to its end on this thread. Nothing is left in the destination unless the
/// run succeeds completely.
pub fn execute(
    mut plan: RunPlan,
    cancel: &Cancel,
    progress: Arc<Progress>,
    observer: &dyn Observer,
) -> RunOutcome {
    let t0 = Instant::now();
    let started_at = Utc::now();
    notify::started(&plan.notify);
    let mut result = Ok(());
    if !plan.hooks.pre.is_empty() {
        observer.step(step::PRE_HOOKS);
    }
    for hook in &plan.hooks.pre {
        log::info!("job {}: pre-hook {hook:?}", plan.job_id);
        if let Err(e) = hooks::run(hook, &hook_ctx(&plan, None), plan.hooks.timeout, cancel) {
            let kind = cancel.reason().map(ErrorKind::Cancelled).unwrap_or(ErrorKind::Hook);
            result = Err(RunError::new(&plan.job_id, kind, format!("{e}; the backup did not start")));
            break;
        }
    }
    let result = result.and_then(|()| backup(&mut plan, cancel, progress, observer));
    let outcome = RunOutcome {
        job_id: plan.job_id.clone(),
        run_id: plan.run_id.clone(),
        elapsed: Duration::ZERO,
        result,
    };
    // Post-hooks run whenever pre-hooks ran, after a failure or a cancel too; their own
    // failure is reported but does not change the backup's outcome.
    let status = outcome.status().as_str();
    if !plan.hooks.post.is_empty() {
        observer.step(step::POST_HOOKS);
    }
    for hook in &plan.hooks.post {
        log::info!("job {}: post-hook {hook:?} (run {status})", plan.job_id);
        if let Err(e) =
            hooks::run(hook, &hook_ctx(&plan, Some(status)), plan.hooks.timeout, &Cancel::default())
        {
            log::warn!("job {}: {e}", plan.job_id);
        }
    }
    let elapsed = t0.elapsed();
    let finished_at = Utc::now();
    let error = outcome.result.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
    let (size_bytes, object) = match &outcome.result {
        Ok(s) => (s.stored_bytes, s.location.as_str()),
        Err(_) => (0, ""),
    };
    notify::finished(
        &plan.notify,
        &notify::Summary {
            job: &plan.job_id,
            target: &plan.target.id,
            run_id: &plan.run_id,
            status,
            size_bytes,
            duration_seconds: elapsed.as_secs_f64(),
            error: &error,
            object,
            host: &crate::session::hostname(),
            agent_version: crate::AGENT_VERSION,
            started_at: crate::storage::rfc3339(started_at),
            finished_at: crate::storage::rfc3339(finished_at),
            health_checks: crate::health::snapshot(),
        },
    );
    RunOutcome { elapsed, ..outcome }
}

fn hook_ctx<'a>(plan: &'a RunPlan, run_status: Option<&'a str>) -> hooks::HookContext<'a> {
    hooks::HookContext { job_id: &plan.job_id, run_id: &plan.run_id, target_id: &plan.target.id, run_status }
}

/// The backup itself: encryption, dump, pipeline, seal.
fn backup(
    plan: &mut RunPlan,
    cancel: &Cancel,
    progress: Arc<Progress>,
    observer: &dyn Observer,
) -> Result<Stored, RunError> {
    let job = plan.job_id.as_str();
    let t0 = Instant::now();
    let started = Utc::now();
    let prepared = plan
        .encryption
        .prepare(plan.compression.header_code())
        .map_err(|e| RunError::new(job, ErrorKind::Encryption, format!("cannot prepare encryption: {e}")))?;
    observer.step(step::DUMPING);
    let ctx = drivers::DumpContext {
        temp_dir: plan.temp_dir.clone(),
        pipeline_compresses: plan.compression != Compression::None,
        cancel: cancel.clone(),
    };
    let drivers::Dump { source, engine_version } = drivers::dump(&plan.target, &ctx)
        .map_err(|e| RunError::from_source(job, ErrorKind::Dump, e, cancel))?;
    if let Some(bytes) = source.size_hint {
        observer.estimate(bytes);
    }

    let mut ext = vec![plan.target.engine.dump_extension()];
    ext.extend(plan.compression.extension());
    ext.extend(plan.encryption.extension());
    let extension = ext.join(".");
    let name = ObjectName {
        target_id: &plan.target.id,
        job_id: job,
        run_id: &plan.run_id,
        started,
        extension: &extension,
    };
    let (writer, key) =
        plan.destination.create(&name, cancel).map_err(|e| RunError::new(job, ErrorKind::Store, e))?;
    let location = plan.destination.describe(&key);
    log::info!(
        "job {job}: run {} backing up target {} ({engine_version}) to {location}",
        plan.run_id,
        plan.target.id
    );
    let (key_id, encrypted_dek) = (prepared.key_id.clone(), prepared.encrypted_dek.clone());
    let opts = pipeline::Options::new(plan.compression, prepared);
    let content = source.content_slot();
    let out = pipeline::run(source, opts, writer, cancel, progress)
        .map_err(|e| RunError::from_source(job, ErrorKind::Pipeline, e, cancel))?;
    let stored = Stored {
        key,
        location,
        engine: plan.target.engine,
        engine_version,
        stored_bytes: out.stored_bytes,
        dump_bytes: out.dump_bytes,
        sha256: out.sha256,
        compression: plan.compression,
        encryption: plan.encryption.label(),
        key_id,
        encrypted_dek,
        started,
        finished: Utc::now(),
        elapsed: t0.elapsed(),
        content: content.lock().unwrap_or_else(|p| p.into_inner()).take(),
    };
    plan.destination.seal(&stored).map_err(|e| RunError::new(job, ErrorKind::Store, e))?;
    log::info!(
        "job {job}: run {} stored {} ({} bytes, dump {} bytes, sha256 {})",
        plan.run_id,
        stored.key,
        stored.stored_bytes,
        stored.dump_bytes,
        stored.sha256
    );
    Ok(stored)
}

/// A run's start in `state.db`, the same in both modes.
pub fn record_start(state: &StateDb, job_id: &str, run_id: &str, attempt: u32) {
    if let Err(e) = state.record_start(run_id, job_id, attempt, Utc::now()) {
        log::warn!("{e}");
    }
}

/// A run's end in `state.db` and the metrics, the same in both modes; `error` is the
/// mode's own words for a failure.
pub fn record_finish(state: &StateDb, metrics: &Metrics, outcome: &RunOutcome, error: &str) {
    let status = outcome.status();
    let (size, key) = match &outcome.result {
        Ok(s) => (Some(s.stored_bytes), s.key.as_str()),
        Err(_) => (None, ""),
    };
    if let Err(e) = state.record_finish(&outcome.run_id, status, size.unwrap_or(0), key, error) {
        log::warn!("{e}");
    }
    metrics.record_run(&outcome.job_id, status.as_str(), outcome.elapsed, size);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(kind: ErrorKind) -> RunOutcome {
        RunOutcome::refused("j", "r", RunError::new("j", kind, "x"))
    }

    #[test]
    fn a_timeout_is_a_failure_and_other_stops_are_cancels() {
        assert_eq!(failed(ErrorKind::Cancelled(CancelReason::TimedOut)).status(), RunStatus::Failed);
        assert_eq!(failed(ErrorKind::Cancelled(CancelReason::Requested)).status(), RunStatus::Cancelled);
        assert_eq!(failed(ErrorKind::Cancelled(CancelReason::Shutdown)).status(), RunStatus::Cancelled);
        assert_eq!(failed(ErrorKind::Dump).status(), RunStatus::Failed);
    }

    #[test]
    fn an_error_while_cancelled_takes_the_cancel_as_its_kind_and_keeps_its_source() {
        let cancel = Cancel::default();
        let io = || std::io::Error::other("broken pipe");
        let e = RunError::from_source("j", ErrorKind::Pipeline, io(), &cancel);
        assert_eq!(e.kind, ErrorKind::Pipeline);
        cancel.cancel_because(CancelReason::TimedOut);
        let e = RunError::from_source("j", ErrorKind::Pipeline, io(), &cancel);
        assert_eq!(e.kind, ErrorKind::Cancelled(CancelReason::TimedOut));
        assert_eq!(e.to_string(), "job j: broken pipe");
        assert_eq!(std::error::Error::source(&e).map(|s| s.to_string()), Some("broken pipe".into()));
    }
}
