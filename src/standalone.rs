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
use chrono::Utc;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::pipeline::{Cancel, Progress};
use crate::scheduler::{
    CronSchedule, JobSchedule, MaintenanceWindow, RetryPolicy, RunOutcome, RunRequest, Scheduler,
    SchedulerCommand, SchedulerOptions, Summary,
};
use crate::state::{RunStatus, StateDb};
use crate::storage::Storage;
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
        out.push(s);
    }
    Ok(out)
}

/// Runs the scheduler until SIGTERM/SIGINT, then shuts down gracefully.
pub fn run(config: &Path) -> Result<Summary> {
    let cfg = Arc::new(Config::load(config)?);
    let state = Arc::new(StateDb::open(&cfg.state_dir)?);
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
    if let Some((start, end)) = &cfg.maintenance {
        options.maintenance_window = Some(
            MaintenanceWindow::parse(start, end).map_err(|e| anyhow::anyhow!("maintenance window: {e}"))?,
        );
    }

    let metrics = Metrics::new().context("cannot create the metrics registry")?;
    metrics.set_connection_state("standalone");
    if let Some(addr) = crate::metrics::listen_addr_from_env() {
        crate::metrics::serve(&addr, metrics.clone(), cfg.state_dir.clone())
            .map_err(|e| anyhow::anyhow!(e))?;
        log::info!("metrics and health endpoints on http://{addr}/metrics, /healthz, /readyz");
    }
    let worker = {
        let (cfg, state, metrics) = (cfg.clone(), state.clone(), metrics.clone());
        move |req: RunRequest, cancel: Cancel| run_once(&cfg, &state, &storage, &metrics, req, &cancel)
    };
    let handle = Scheduler::start(options, worker).context("cannot start the scheduler")?;
    crate::selfupdate::confirm(&cfg.state_dir);
    let ca_file = std::env::var_os("BACKUPY_CA_FILE").map(std::path::PathBuf::from);
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
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        let mut first = true;
        for sig in signals.forever() {
            if sig == signal_hook::consts::SIGHUP {
                reexec_requested.store(true, std::sync::atomic::Ordering::SeqCst);
            }
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

/// One scheduled run on a worker thread: state record, pipeline, retention.
fn run_once(
    cfg: &Config,
    state: &StateDb,
    storage: &Storage,
    metrics: &Metrics,
    req: RunRequest,
    cancel: &Cancel,
) -> RunOutcome {
    let t0 = std::time::Instant::now();
    let run_id = req.run_id.to_string();
    let Some(job) = cfg.job(&req.job_id) else {
        return RunOutcome::Failed(format!("unknown job {}", req.job_id));
    };
    if let Err(e) = state.record_start(&run_id, &job.id, req.attempt, Utc::now()) {
        log::warn!("{e}");
    }
    log::info!("job {}: run {} (attempt {}) starting", job.id, run_id, req.attempt);
    let result = runner::run_job_as(cfg, job, &run_id, cancel, Arc::new(Progress::default()));
    let (status, outcome) = match &result {
        Ok(r) => {
            log::info!(
                "job {}: run {} stored {} ({} bytes)",
                job.id,
                run_id,
                r.location,
                r.manifest.size_bytes
            );
            (RunStatus::Success, RunOutcome::Success)
        }
        Err(_) if cancel.is_cancelled() => {
            log::warn!("job {}: run {} cancelled", job.id, run_id);
            (RunStatus::Cancelled, RunOutcome::Cancelled)
        }
        Err(e) => {
            log::error!("{e}");
            (RunStatus::Failed, RunOutcome::Failed(e.to_string()))
        }
    };
    let (size, key, error) = match &result {
        Ok(r) => (r.manifest.size_bytes, r.manifest.object_key.clone(), String::new()),
        Err(e) => (0, String::new(), e.to_string()),
    };
    if let Err(e) = state.record_finish(&run_id, status, size, &key, &error) {
        log::warn!("{e}");
    }
    metrics.record_run(
        &job.id,
        status.as_str(),
        t0.elapsed(),
        (status == RunStatus::Success).then_some(size),
    );
    if status == RunStatus::Success {
        // A failure to prune is reported, never fatal to the backup that just succeeded.
        match retention::apply(storage, &job.target, &job.id, job.retention) {
            Ok(deleted) if !deleted.is_empty() => {
                log::info!(
                    "job {}: retention deleted {} old backup(s): {}",
                    job.id,
                    deleted.len(),
                    deleted.join(", ")
                )
            }
            Ok(_) => {}
            Err(e) => log::warn!("job {}: retention failed: {e}", job.id),
        }
    }
    outcome
}
