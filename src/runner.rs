//! One backup run of a standalone job: resolve the job's target and key, take the dump,
//! stream it through the pipeline into storage, then write the manifest.
//!
//! Runs on the calling thread (the `backup` command's run thread, or a scheduler worker
//! under `run`); the pipeline it starts owns its own stage threads.

use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;

use crate::config::{Config, Job};
use crate::pipeline::{self, Cancel, Progress};
use crate::storage::{self, Manifest};
use crate::{drivers, hooks, notify};

pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// A failed run, with the job named; `message` says what to do where it can.
#[derive(Debug, thiserror::Error)]
#[error("job {job}: {message}")]
pub struct RunError {
    pub job: String,
    pub message: String,
}

pub struct RunResult {
    pub manifest: Manifest,
    /// Where the object is, for people: a path or an s3:// URL.
    pub location: String,
    pub elapsed: std::time::Duration,
}

/// Runs `job` once. Nothing is left in storage unless the run succeeds completely.
pub fn run_job(
    cfg: &Config,
    job: &Job,
    cancel: &Cancel,
    progress: Arc<Progress>,
) -> Result<RunResult, RunError> {
    run_job_as(cfg, job, &uuid::Uuid::new_v4().to_string(), cancel, progress)
}

/// Runs `job` once as run `run_id` (the scheduler chooses the id, so the state database
/// and the stored object name the same run).
pub fn run_job_as(
    cfg: &Config,
    job: &Job,
    run_id: &str,
    cancel: &Cancel,
    progress: Arc<Progress>,
) -> Result<RunResult, RunError> {
    let fail = |message: String| RunError { job: job.id.clone(), message };
    let hook_ctx =
        |run_status| hooks::HookContext { job_id: &job.id, run_id, target_id: &job.target, run_status };
    let t0 = Instant::now();
    notify::started(&job.notify);
    let mut result = Ok(());
    for hook in &job.pre_hooks {
        log::info!("job {}: pre-hook {hook:?}", job.id);
        if let Err(e) = hooks::run(hook, &hook_ctx(None), job.hook_timeout, cancel) {
            result = Err(fail(format!("{e}; the backup did not start")));
            break;
        }
    }
    let result = result.and_then(|()| backup_once(cfg, job, run_id, cancel, progress));
    // Post-hooks run whenever pre-hooks ran, after a failure or a cancel too; their own
    // failure is reported but does not change the backup's outcome.
    let status = match &result {
        Ok(_) => "success",
        Err(_) if cancel.is_cancelled() => "cancelled",
        Err(_) => "failed",
    };
    for hook in &job.post_hooks {
        log::info!("job {}: post-hook {hook:?} (run {status})", job.id);
        if let Err(e) = hooks::run(hook, &hook_ctx(Some(status)), job.hook_timeout, &Cancel::default()) {
            log::warn!("job {}: {e}", job.id);
        }
    }
    let error = result.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
    let (size_bytes, object) = match &result {
        Ok(r) => (r.manifest.size_bytes, r.location.as_str()),
        Err(_) => (0, ""),
    };
    notify::finished(
        &job.notify,
        &notify::Summary {
            job: &job.id,
            target: &job.target,
            run_id,
            status,
            size_bytes,
            duration_seconds: t0.elapsed().as_secs_f64(),
            error: &error,
            object,
        },
    );
    result
}

/// The backup itself: dump, pipeline, manifest.
fn backup_once(
    cfg: &Config,
    job: &Job,
    run_id: &str,
    cancel: &Cancel,
    progress: Arc<Progress>,
) -> Result<RunResult, RunError> {
    let fail = |message: String| RunError { job: job.id.clone(), message };
    let t0 = Instant::now();
    let started = Utc::now();
    let run_id = run_id.to_string();
    let target = cfg
        .targets
        .get(&job.target)
        .ok_or_else(|| fail(format!("target {:?} is not defined", job.target)))?;

    let encryption = cfg.encryption_for(job).map_err(fail)?;
    let prepared = encryption
        .prepare(job.compression.header_code())
        .map_err(|e| fail(format!("cannot prepare encryption: {e}")))?;
    let storage = cfg.open_storage().map_err(fail)?;

    let ctx = drivers::DumpContext {
        temp_dir: cfg.state_dir.join("tmp"),
        pipeline_compresses: job.compression != pipeline::Compression::None,
    };
    let drivers::Dump { source, engine_version } =
        drivers::dump(target, &ctx).map_err(|e| fail(e.to_string()))?;

    let mut ext = vec![target.engine.dump_extension()];
    ext.extend(job.compression.extension());
    ext.extend(encryption.extension());
    let key = storage::object_key(&target.id, &job.id, started, &run_id, &ext.join("."));
    let writer = storage.create(&key, cancel).map_err(|e| fail(e.to_string()))?;
    log::info!(
        "job {}: backing up target {} ({}) to {}",
        job.id,
        target.id,
        engine_version,
        storage.describe(&key)
    );

    let key_id = prepared.key_id.clone();
    let opts = pipeline::Options::new(job.compression, prepared);
    let out = pipeline::run(source, opts, writer, cancel, progress).map_err(|e| fail(e.to_string()))?;

    let manifest = Manifest {
        manifest_version: 1,
        id: run_id,
        job: job.id.clone(),
        target: target.id.clone(),
        engine: target.engine.name().to_string(),
        engine_version,
        object_key: key.clone(),
        size_bytes: out.stored_bytes,
        dump_bytes: out.dump_bytes,
        sha256: out.sha256,
        compression: job.compression.name().to_string(),
        encryption: encryption.label().to_string(),
        key_id,
        started_at: storage::rfc3339(started),
        finished_at: storage::rfc3339(Utc::now()),
        agent_version: AGENT_VERSION.to_string(),
    };
    let json =
        serde_json::to_vec_pretty(&manifest).map_err(|e| fail(format!("cannot encode the manifest: {e}")))?;
    if let Err(e) = storage.put(&storage::manifest_key(&key), &json) {
        // Without its manifest the object is an incomplete backup: do not leave it behind.
        let _ = storage.delete(&key);
        return Err(fail(format!("cannot write the manifest: {e}")));
    }
    log::info!(
        "job {}: stored {} ({} bytes, dump {} bytes, sha256 {})",
        job.id,
        key,
        manifest.size_bytes,
        manifest.dump_bytes,
        manifest.sha256
    );
    Ok(RunResult { location: storage.describe(&key), manifest, elapsed: t0.elapsed() })
}
