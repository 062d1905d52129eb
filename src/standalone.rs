//! Standalone mode (`backupy-agent run --config FILE`): the scheduler wired to real runs.
//!
//! Threads: the main thread waits for the scheduler to finish; a `signals` thread turns
//! SIGTERM/SIGINT into `SchedulerCommand::Shutdown` (a second signal shortens the grace
//! to zero); the `scheduler` thread and its worker pool (see `scheduler`) run the jobs.
//! Each worker records its run in the state database, runs the pipeline, and prunes the
//! job's old backups after a success. The only shared state is the state database and
//! the read-only configuration.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::cancel::Cancel;
use crate::config::{Config, Job};
use crate::metrics::Metrics;
use crate::pipeline::Progress;
use crate::runner::{Destination, ErrorKind, Hooks, ObjectName, RunError, RunOutcome, RunPlan, Stored};
use crate::scheduler::{
    CronSchedule, JobSchedule, MaintenanceWindow, RetryPolicy, RunOutcome as SchedulerOutcome, RunRequest,
    Scheduler, SchedulerCommand, SchedulerOptions, Summary,
};
use crate::state::StateDb;
use crate::storage::{self, Manifest, ObjectWriter, Storage};
use crate::{retention, runner};

/// The scheduled jobs of a configuration (jobs without `cron` run only by hand).
pub fn schedules(cfg: &Config) -> Result<Vec<JobSchedule>> {
    let mut out = Vec::new();
    for job in &cfg.jobs {
        let Some(expr) = &job.cron else { continue };
        let cron = CronSchedule::parse(expr)
            .map_err(|why| anyhow::anyhow!("job {}: invalid cron {expr:?}: {why}", job.id))?;
        let mut s = JobSchedule::new(job.id.clone(), cron);
        s.retry = RetryPolicy {
            max_attempts: job.retry.max_attempts,
            backoff_seconds: job.retry.backoff_seconds.clone(),
        };
        s.timeout = job.timeout;
        s.run_on_start = job.run_on_start;
        out.push(s);
    }
    Ok(out)
}

/// Runs the scheduler until SIGTERM/SIGINT, then shuts down gracefully.
pub fn run(config: &Path) -> Result<Summary> {
    crate::env::Env::get().check().map_err(anyhow::Error::msg)?;
    let cfg = Arc::new(Config::load(config)?);
    let state = Arc::new(StateDb::open(&cfg.state_dir)?);
    let leftovers = crate::leftovers::clean_for(&cfg, true);
    crate::selfupdate::on_start(&cfg.state_dir);
    let storage = cfg.open_storage().map_err(|e| anyhow::anyhow!(e))?;
    if let Storage::S3(s3) = &storage {
        let n = s3.abort_recorded_uploads();
        if n > 0 {
            log::info!("aborted {n} unfinished upload(s) left by an earlier run");
        }
    }
    let jobs = schedules(&cfg)?;
    if jobs.is_empty() {
        bail!(
            "{}: no job has a cron schedule; `run` has nothing to do (use `backup` for one-off runs)",
            config.display()
        );
    }
    let mut options = SchedulerOptions::new(jobs);
    options.max_parallel_jobs = cfg.max_parallel_jobs;
    options.last_success = state.last_successes()?;
    let history = state.job_outcomes()?;
    options.last_run =
        history.iter().filter_map(|(job, h)| Some((job.clone(), h.last_run_started?))).collect();
    if let Some((start, end)) = &cfg.maintenance {
        options.maintenance_window = Some(
            MaintenanceWindow::parse(start, end).map_err(|e| anyhow::anyhow!("maintenance window: {e}"))?,
        );
    }

    let metrics = Metrics::new().context("cannot create the metrics registry")?;
    metrics.set_connection_state("standalone");
    metrics.init_jobs(cfg.jobs.iter().map(|j| j.id.as_str()), &history);
    leftovers.record(&metrics);
    if let Some(addr) = &crate::env::Env::get().metrics_listen_addr {
        crate::metrics::serve(addr, metrics.clone(), cfg.state_dir.clone())
            .map_err(|e| anyhow::anyhow!(e))?;
        log::info!("metrics and health endpoints on http://{addr}/metrics, /healthz, /readyz");
    }
    let worker = {
        let (cfg, state, metrics) = (cfg.clone(), state.clone(), metrics.clone());
        move |req: RunRequest, cancel: Cancel| run_once(&cfg, &state, &storage, &metrics, req, &cancel)
    };
    let handle = Scheduler::start(options, worker).context("cannot start the scheduler")?;
    crate::selfupdate::confirm(&cfg.state_dir);
    let ca_file = crate::env::Env::get().ca_file.clone();
    let health = crate::health::start(cfg.health_checks.clone(), metrics.clone(), ca_file, None)
        .context("cannot start the health-probe threads")?;
    metrics.ready.store(true, std::sync::atomic::Ordering::SeqCst);
    log::info!(
        "standalone agent running: {} scheduled job(s), state in {}, max {} in parallel",
        cfg.jobs.iter().filter(|j| j.cron.is_some()).count(),
        cfg.state_dir.display(),
        cfg.max_parallel_jobs
    );

    let commands = handle.sender();
    let grace = cfg.shutdown_grace;
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ])
    .context("cannot install signal handlers")?;
    let signal_handle = signals.handle();
    // SIGHUP (sent by `self-update`): stop like SIGTERM, then exec the installed binary
    // when an update is pending.
    let reexec = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reexec_requested = reexec.clone();
    let readiness = metrics.clone();
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        let mut first = true;
        for sig in signals.forever() {
            if sig == signal_hook::consts::SIGHUP {
                reexec_requested.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            // No new run starts from here on: /readyz says so at once, not after the grace.
            readiness.ready.store(false, std::sync::atomic::Ordering::SeqCst);
            let grace = if first { grace } else { Duration::ZERO };
            log::info!("signal {sig}: stopping new runs; running backups get {grace:?} to finish");
            if commands.send(SchedulerCommand::Shutdown { grace }).is_err() {
                break;
            }
            first = false;
        }
    })?;
    let summary = handle.join();
    drop(health);
    metrics.ready.store(false, std::sync::atomic::Ordering::SeqCst);
    signal_handle.close();
    log::info!(
        "stopped: {} run(s) started, {} succeeded, {} failed, {} cancelled",
        summary.started,
        summary.succeeded,
        summary.failed,
        summary.cancelled
    );
    if reexec.load(std::sync::atomic::Ordering::SeqCst)
        && crate::selfupdate::pending(&cfg.state_dir).is_some()
    {
        drop(state);
        return Err(crate::selfupdate::reexec(&cfg.state_dir).into());
    }
    Ok(summary)
}

/// A job's run as the runner takes it, from the TOML: the target, key and storage are
/// resolved here, so a job that cannot run fails before its hooks do.
pub fn plan(cfg: &Config, job: &Job, run_id: &str) -> Result<RunPlan, RunError> {
    let fail = |message: String| RunError::new(&job.id, ErrorKind::Config, message);
    let target = cfg
        .targets
        .get(&job.target)
        .ok_or_else(|| fail(format!("target {:?} is not defined", job.target)))?;
    let encryption = cfg.encryption_for(job).map_err(fail)?;
    let storage = cfg.open_storage().map_err(fail)?;
    Ok(RunPlan {
        job_id: job.id.clone(),
        run_id: run_id.to_string(),
        target: target.clone(),
        compression: job.compression,
        encryption,
        hooks: Hooks { pre: job.pre_hooks.clone(), post: job.post_hooks.clone(), timeout: job.hook_timeout },
        notify: job.notify.clone(),
        temp_dir: cfg.state_dir.join("tmp"),
        destination: Box::new(StoreDestination { storage, object: None }),
    })
}

/// The configured storage as a run's destination: the object under its dated key, then
/// the manifest, written last so that an object without one is an incomplete backup.
struct StoreDestination {
    storage: Storage,
    /// The object being written and the ids its manifest names: (key, target, job, run).
    object: Option<(String, String, String, String)>,
}

impl Destination for StoreDestination {
    fn create(
        &mut self,
        name: &ObjectName<'_>,
        cancel: &Cancel,
    ) -> Result<(Box<dyn ObjectWriter>, String), String> {
        let key = storage::object_key(name.target_id, name.job_id, name.started, name.run_id, name.extension);
        let writer = self.storage.create(&key, cancel).map_err(|e| e.to_string())?;
        self.object =
            Some((key.clone(), name.target_id.to_string(), name.job_id.to_string(), name.run_id.to_string()));
        Ok((writer, key))
    }

    fn describe(&self, key: &str) -> String {
        self.storage.describe(key)
    }

    fn seal(&mut self, stored: &Stored) -> Result<(), String> {
        let Some((key, target, job, run_id)) = self.object.take() else {
            return Err("internal error: sealing an object that was never created".into());
        };
        let manifest = Manifest {
            manifest_version: 1,
            id: run_id,
            job,
            target,
            engine: stored.engine.name().to_string(),
            engine_version: stored.engine_version.clone(),
            object_key: key.clone(),
            size_bytes: stored.stored_bytes,
            dump_bytes: stored.dump_bytes,
            sha256: stored.sha256.clone(),
            compression: stored.compression.name().to_string(),
            encryption: stored.encryption.to_string(),
            key_id: stored.key_id.clone(),
            started_at: storage::rfc3339(stored.started),
            finished_at: storage::rfc3339(stored.finished),
            agent_version: crate::AGENT_VERSION.to_string(),
            content: stored.content.clone(),
        };
        let json =
            serde_json::to_vec_pretty(&manifest).map_err(|e| format!("cannot encode the manifest: {e}"))?;
        if let Err(e) = self.storage.put(&storage::manifest_key(&key), &json) {
            // Without its manifest the object is an incomplete backup: do not leave it behind.
            let _ = self.storage.delete(&key);
            return Err(format!("cannot write the manifest: {e}"));
        }
        Ok(())
    }
}

/// One scheduled run on a worker thread: state record, the run, retention.
fn run_once(
    cfg: &Config,
    state: &StateDb,
    storage: &Storage,
    metrics: &Metrics,
    req: RunRequest,
    cancel: &Cancel,
) -> SchedulerOutcome {
    let run_id = req.run_id.to_string();
    let Some(job) = cfg.job(&req.job_id) else {
        return SchedulerOutcome::Failed(format!("unknown job {}", req.job_id));
    };
    runner::record_start(state, &job.id, &run_id, req.attempt);
    log::info!("job {}: run {} (attempt {}) starting", job.id, run_id, req.attempt);
    let outcome = match plan(cfg, job, &run_id) {
        Ok(plan) => runner::execute(plan, cancel, Arc::new(Progress::default()), &()),
        Err(e) => RunOutcome::refused(&job.id, &run_id, e),
    };
    let error = outcome.result.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
    runner::record_finish(state, metrics, &outcome, &error);
    match &outcome.result {
        Ok(_) => {
            // A failure to prune is reported, never fatal to the backup that just succeeded.
            retention::after_run(storage, &job.target, &job.id, job.retention, metrics);
            SchedulerOutcome::Success
        }
        // The scheduler logs the end of the run, once, with its id and attempt.
        Err(e) if e.is_cancelled() => SchedulerOutcome::Cancelled,
        Err(e) => SchedulerOutcome::Failed(e.detail().to_string()),
    }
}
