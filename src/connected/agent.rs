//! The connected main loop: the applied config, the table of this agent's runs and every
//! decision (agent.md "Control-plane session", wire-v1.md).
//!
//! It runs on the `connected` thread and selects on the session's events, the runs'
//! [`RunEvent`]s, health-probe results, Docker discovery reports, the self-update thread's
//! answers, signals and a 500 ms tick. It acts only through messages and the two stores:
//! runs go to the scheduler ([`SchedulerCommand`]), checks to the health thread
//! ([`HealthCommand`]), updates to the self-update thread ([`UpdateJob`]), and every
//! report into the [`Outbox`]; the [`Store`] keeps the config and each run's reports by
//! `run_id`. The fuzz harness builds it with [`Agent::new`] like `run_with` does, and
//! keeps the receiving ends of those channels to itself, so no fuzzed command reaches a
//! host.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select};
use uuid::Uuid;

use super::convert::{self, job_update};
use super::runs::{ConnectedRun, Report, RunEvent, RunInput, RunSettings};
use super::store::{RunPhase, Store};
use super::update::{self, UpdateDone, UpdateJob, UpdateState};
use crate::health::{HealthCommand, ProbeResult};
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::pipeline::Progress;
use crate::scheduler::{self, MaintenanceWindow, SchedulerCommand, SkipReason, Submission};
use crate::session::{self, SessionEvent};
use crate::state::StateDb;
use crate::storage::s3::{S3Storage, S3Target};
use crate::wire::pb;
use crate::wire::pb::envelope::Payload;

/// Progress updates of one run go out at most this often (agent.md).
const UPDATE_EVERY: Duration = Duration::from_secs(2);
const TICK: Duration = Duration::from_millis(500);

/// What the heartbeat (on the session thread) reads of the main loop's state.
#[derive(Debug, Clone, Default)]
pub struct Published {
    pub active: Vec<String>,
    pub queued: u32,
}

/// What the main loop works with; the senders are the only way it acts on other threads.
pub struct Parts {
    pub run_settings: RunSettings,
    pub endpoint: String,
    pub store: Store,
    pub outbox: Arc<Outbox>,
    pub state: Arc<StateDb>,
    pub metrics: Arc<Metrics>,
    /// Read by the session for Register.
    pub config_version: Arc<AtomicU64>,
    pub published: Arc<Mutex<Published>>,
    pub scheduler: Sender<SchedulerCommand>,
    pub health: Sender<HealthCommand>,
    pub updates: Sender<UpdateJob>,
    /// Handed to each run, which reports on it.
    pub run_events: Sender<RunEvent>,
}

/// Everything the main loop selects on.
pub struct Inputs {
    pub events: Receiver<SessionEvent>,
    pub runs: Receiver<RunEvent>,
    pub health: Receiver<ProbeResult>,
    pub discovery: Receiver<pb::DiscoveryReport>,
    pub updates: Receiver<UpdateDone>,
    pub stop: Receiver<i32>,
}

/// One of this agent's runs, from RunBackup to its final report.
struct Tracked {
    job_id: String,
    /// The scheduler's id of the run, for CancelRun.
    scheduler_id: Uuid,
    progress: Arc<Progress>,
    /// A worker took it; until then it is queued.
    started: bool,
    first_step: &'static str,
    step: &'static str,
    estimate: Option<u64>,
    /// What the last JobUpdate said, and when it went out.
    reported: (&'static str, u32),
    reported_at: Instant,
}

pub struct Agent {
    parts: Parts,
    config: pb::AgentConfig,
    runs: HashMap<String, Tracked>,
    /// A stop was asked for: no new runs; the loop ends once every run has reported.
    stopping: bool,
    /// A SelfUpdate is downloading and checking on the `self-update` thread.
    updating: bool,
    /// An update is installed: once stopped, exec it.
    reexec: bool,
}

impl Agent {
    /// The main loop's state at start: the stored config applied, runs the previous
    /// process left behind reported.
    pub fn new(parts: Parts) -> Agent {
        let mut agent = Agent {
            parts,
            config: pb::AgentConfig::default(),
            runs: HashMap::new(),
            stopping: false,
            updating: false,
            reexec: false,
        };
        match agent.parts.store.load_config() {
            Ok(Some(config)) => {
                log::info!(
                    "working from the stored config version {} until the control plane answers",
                    config.version
                );
                agent.apply_config(config, false);
            }
            Ok(None) => log::info!("no stored config yet: waiting for the control plane's"),
            Err(e) => log::error!("{e}"),
        }
        agent.recover();
        agent
    }

    /// An update was installed: the process should exec it once stopped.
    pub fn reexec(&self) -> bool {
        self.reexec
    }

    /// The applied config's version.
    pub fn config_version(&self) -> u64 {
        self.config.version
    }

    pub fn serve(&mut self, inputs: &Inputs, grace: Duration) {
        let Inputs { events, runs, health, discovery, updates, stop } = inputs;
        let mut stop = stop.clone();
        let mut next_tick = Instant::now() + TICK;
        loop {
            if self.stopping && self.runs.is_empty() {
                return;
            }
            let wait = next_tick.saturating_duration_since(Instant::now());
            select! {
                recv(events) -> ev => match ev {
                    Ok(ev) => self.session_event(ev),
                    Err(_) => return,
                },
                recv(runs) -> ev => {
                    if let Ok(ev) = ev {
                        self.run_event(ev);
                    }
                },
                recv(health) -> r => {
                    if let Ok(r) = r {
                        self.health_result(r);
                    }
                },
                recv(discovery) -> report => {
                    if let Ok(report) = report {
                        log::info!("discovery: {} database container(s)", report.containers.len());
                        self.push(Payload::Discovery(report), "");
                    }
                },
                recv(updates) -> done => {
                    if let Ok(done) = done {
                        self.update_done(done, grace);
                    }
                },
                recv(stop) -> sig => {
                    if sig == Ok(signal_hook::consts::SIGHUP) {
                        match crate::selfupdate::pending(&self.parts.run_settings.state_dir) {
                            Some(version) => {
                                log::info!("SIGHUP: stopping to run the installed update {version}");
                                self.reexec = true;
                            }
                            None => log::info!("SIGHUP with no installed update: stopping"),
                        }
                    }
                    let grace = if !self.stopping && sig.is_ok() { grace } else { Duration::ZERO };
                    if sig.is_err() {
                        // Nobody can send a signal any more: one stop, not a busy loop.
                        stop = crossbeam_channel::never();
                    }
                    self.stop(grace);
                },
                default(wait) => {}
            }
            if Instant::now() >= next_tick {
                self.progress_updates();
                next_tick = Instant::now() + TICK;
            }
        }
    }

    /// No new runs; queued ones are dropped, running ones get `grace` to finish before
    /// the scheduler cancels them. A second stop can only shorten the grace.
    fn stop(&mut self, grace: Duration) {
        let running = self.runs.values().filter(|r| r.started).count();
        log::info!(
            "stopping: no new runs; {running} running backup(s) get {:.0} s to finish",
            grace.as_secs_f64()
        );
        self.stopping = true;
        // /readyz turns 503 now, not when the grace is over.
        self.parts.metrics.ready.store(false, Ordering::SeqCst);
        if self.parts.scheduler.send(SchedulerCommand::Shutdown { grace }).is_err() {
            log::error!("the scheduler has stopped: {} run(s) cannot report", self.runs.len());
            self.runs.clear();
        }
    }

    // ---- delivery helpers ----

    fn push(&self, payload: Payload, correlation_id: &str) {
        if let Err(e) = self.parts.outbox.push(payload, correlation_id) {
            log::error!("{e}");
        }
    }

    /// Answers a server command (wire-v1.md "Acknowledging commands").
    fn ack(&self, correlation_id: &str, accepted: bool, reason: impl Into<String>) {
        if correlation_id.is_empty() {
            return;
        }
        let ack = pb::Ack { correlation_id: correlation_id.to_string(), accepted, reason: reason.into() };
        self.push(Payload::Ack(ack), correlation_id);
    }

    fn publish(&self) {
        let queued = self.runs.values().filter(|r| !r.started).count();
        if let Ok(mut p) = self.parts.published.lock() {
            p.active = self.runs.iter().filter(|(_, r)| r.started).map(|(id, _)| id.clone()).collect();
            p.active.sort();
            p.queued = queued as u32;
        }
        self.parts.metrics.queue_depth.set(queued as i64);
    }

    // ---- session ----

    fn session_event(&mut self, ev: SessionEvent) {
        match ev {
            SessionEvent::Connected { session_id, config } => {
                // RegisterAck reached: an update waiting for proof is confirmed.
                if let Some(outcome) = crate::selfupdate::confirm(&self.parts.run_settings.state_dir) {
                    // confirm() logged it locally; the control plane hears it whatever the
                    // forwarding level.
                    self.log_event(pb::LogLevel::Info, &outcome.to_string());
                }
                self.parts.metrics.set_connection_state("connected");
                self.parts.metrics.ready.store(!self.stopping, Ordering::SeqCst);
                if let Err(e) = self.parts.store.record_connected(&self.parts.endpoint, &session_id) {
                    log::warn!("{e}");
                }
                if let Some(config) = config {
                    self.offer_config(config, "");
                }
            }
            SessionEvent::Disconnected { reason } => {
                self.parts.metrics.set_connection_state("disconnected");
                self.parts.metrics.reconnects_total.inc();
                self.parts.metrics.ready.store(false, Ordering::SeqCst);
                if let Err(e) = self.parts.store.record_disconnected(&reason) {
                    log::warn!("{e}");
                }
            }
            SessionEvent::Ack(_) => {}
            SessionEvent::Command(env) => self.command(env),
        }
    }

    /// One server frame that carries a command or a config.
    pub fn command(&mut self, env: pb::Envelope) {
        let cid = env.correlation_id;
        match env.payload {
            Some(Payload::ConfigUpdate(u)) => match u.config {
                Some(config) => self.offer_config(config, &cid),
                None => self.ack(&cid, false, "config_update without a config"),
            },
            Some(Payload::RunBackup(cmd)) => self.run_backup(cmd, &cid),
            Some(Payload::CancelJob(c)) => self.cancel_job(&c.job_id, &cid),
            Some(Payload::RunHealthCheck(c)) => self.run_health_check(&c.check_id, &cid),
            Some(Payload::SelfUpdate(u)) => self.self_update(u, &cid),
            other => {
                log::warn!("ignoring an unexpected {} command", session::payload_name(other.as_ref()));
                self.ack(&cid, false, "not a command this agent takes");
            }
        }
    }

    // ---- config ----

    /// RegisterAck or ConfigUpdate: applied only when newer (agent.md).
    pub fn offer_config(&mut self, config: pb::AgentConfig, cid: &str) {
        let current = self.config.version;
        if config.version <= current {
            let reason = if config.version == current {
                format!("config version {} is already applied", config.version)
            } else {
                format!(
                    "config version {} is older than the applied version {current}; kept {current}",
                    config.version
                )
            };
            log::debug!("{reason}");
            self.ack(cid, config.version == current, reason);
            return;
        }
        let problems = self.apply_config(config, true);
        self.ack(cid, true, problems.join("; "));
    }

    /// Applies (and, when `persist`, first stores) a config; returns what is wrong in it.
    /// Problems do not refuse the config: jobs and checks that are fine keep working; a run
    /// of a broken job fails with the same reason.
    fn apply_config(&mut self, config: pb::AgentConfig, persist: bool) -> Vec<String> {
        let problems = convert::config_problems(&config);
        for p in &problems {
            log::warn!("config version {}: {p}", config.version);
        }
        if persist && let Err(e) = self.parts.store.save_config(&config) {
            log::error!("config version {} is applied but not stored: {e}", config.version);
        }
        let advanced = config.advanced.clone().unwrap_or_default();
        if let Some(level) = crate::logfwd::parse_level(&advanced.log_level) {
            crate::logfwd::set_local_level(level);
            crate::logfwd::set_forward_level(level);
        }
        self.parts.config_version.store(config.version, Ordering::SeqCst);
        self.parts.metrics.config_version.set(config.version as i64);
        let checks = config.health_checks.iter().filter_map(|c| convert::health_check(c).ok()).collect();
        if self.parts.health.send(HealthCommand::Configure(checks)).is_err() {
            log::error!("the health thread has stopped: health checks are not probed");
        }
        let max_parallel = match advanced.max_parallel_jobs {
            0 => scheduler::DEFAULT_MAX_PARALLEL_JOBS,
            n => n as usize,
        };
        let _ = self.parts.scheduler.send(SchedulerCommand::SetMaxParallel(max_parallel));
        log::info!(
            "applied config version {}: {} target(s), {} job(s), {} health check(s)",
            config.version,
            config.targets.len(),
            config.jobs.len(),
            config.health_checks.len()
        );
        self.config = config;
        problems
    }

    // ---- runs ----

    fn run_backup(&mut self, cmd: pb::RunBackup, cid: &str) {
        if cmd.run_id.is_empty() {
            self.ack(cid, false, "run_backup without a run_id");
            return;
        }
        match self.parts.store.run(&cmd.run_id) {
            Ok(Some(row)) => {
                self.ack(cid, true, "duplicate run_id");
                if let Some(u) = row.last_update {
                    self.push(Payload::JobUpdate(u), "");
                }
                if let Some(c) = row.completed {
                    self.push(Payload::BackupCompleted(c), "");
                }
                return;
            }
            Ok(None) => {}
            Err(e) => log::error!("{e}"),
        }
        let refuse = |this: &mut Self, reason: String| {
            crate::logfwd::set_job(Some(&cmd.job_id));
            log::error!("job {}: run {} refused: {reason}", cmd.job_id, cmd.run_id);
            this.ack(cid, false, reason.clone());
            let mut u = job_update(&cmd.job_id, &cmd.run_id, pb::JobStatus::Failed);
            u.error_message = reason;
            this.finish_report(&cmd.run_id, &cmd.job_id, u, None);
            crate::logfwd::set_job(None);
        };
        if self.stopping {
            return refuse(self, "the agent is shutting down".into());
        }
        if self.updating {
            return refuse(
                self,
                "the agent is updating itself; send the run again after it reconnects".into(),
            );
        }
        let Some(job) = self.config.jobs.iter().find(|j| j.id == cmd.job_id).cloned() else {
            return refuse(
                self,
                format!("unknown job {:?} (config version {})", cmd.job_id, self.config.version),
            );
        };
        let Some(target) = self.config.targets.iter().find(|t| t.id == job.target_id).cloned() else {
            return refuse(
                self,
                format!(
                    "job {:?} refers to target {:?}, which config version {} does not define",
                    job.id, job.target_id, self.config.version
                ),
            );
        };
        if !cmd.manual_trigger
            && let Some(w) = self.config.maintenance.as_ref()
            && let Ok(window) = MaintenanceWindow::parse(&w.start_utc, &w.end_utc)
            && window.contains(chrono::Utc::now())
        {
            return refuse(
                self,
                format!("not started: inside the maintenance window {}–{} UTC", w.start_utc, w.end_utc),
            );
        }
        let queued = job_update(&job.id, &cmd.run_id, pb::JobStatus::Queued);
        let upload = cmd.upload_creds.as_ref().and_then(|c| c.multipart.as_ref());
        if let Err(e) = self.parts.store.insert_run(&cmd.run_id, &job.id, &queued, upload) {
            log::error!("{e}");
        }
        self.ack(cid, true, "");
        self.push(Payload::JobUpdate(queued), "");
        self.submit(RunInput { job, target, command: cmd });
    }

    /// Hands the run to the scheduler, which starts it when a worker is free.
    fn submit(&mut self, input: RunInput) {
        let run_id = input.command.run_id.clone();
        let job_id = input.job.id.clone();
        let first_step = if input.job.pre_hooks.is_empty() { "dumping" } else { "pre_hooks" };
        let timeout = (input.job.timeout_sec > 0).then(|| Duration::from_secs(input.job.timeout_sec.into()));
        let progress = Arc::new(Progress::default());
        let scheduler_id = Uuid::new_v4();
        let work = ConnectedRun {
            report: Report::new(&run_id, &job_id, self.parts.run_events.clone()),
            input,
            settings: self.parts.run_settings.clone(),
            progress: progress.clone(),
            state: self.parts.state.clone(),
            metrics: self.parts.metrics.clone(),
        };
        let submission =
            Submission { job_id: job_id.clone(), run_id: scheduler_id, timeout, work: Box::new(work) };
        if self.parts.scheduler.send(SchedulerCommand::Submit(submission)).is_err() {
            let mut u = job_update(&job_id, &run_id, pb::JobStatus::Failed);
            u.error_message = "the agent's scheduler has stopped".into();
            self.finish_report(&run_id, &job_id, u, None);
            return;
        }
        self.runs.insert(
            run_id,
            Tracked {
                job_id,
                scheduler_id,
                progress,
                started: false,
                first_step,
                step: first_step,
                estimate: None,
                reported: (first_step, 0),
                reported_at: Instant::now(),
            },
        );
        self.publish();
    }

    fn run_event(&mut self, ev: RunEvent) {
        match ev {
            RunEvent::Started { run_id } => {
                let Some(run) = self.runs.get_mut(&run_id) else { return };
                run.started = true;
                run.reported_at = Instant::now();
                let mut running = job_update(&run.job_id, &run_id, pb::JobStatus::Running);
                running.current_step = run.first_step.into();
                log::info!("job {}: run {run_id} started", run.job_id);
                if let Err(e) = self.parts.store.set_running(&run_id, &running) {
                    log::error!("{e}");
                }
                self.push(Payload::JobUpdate(running), "");
                self.publish();
            }
            RunEvent::Step { run_id, step } => {
                if let Some(run) = self.runs.get_mut(&run_id) {
                    run.step = step;
                }
                self.progress_updates();
            }
            RunEvent::Estimate { run_id, bytes } => {
                if let Some(run) = self.runs.get_mut(&run_id) {
                    run.estimate = Some(bytes.max(1));
                }
            }
            RunEvent::Finished { run_id, reports } => {
                let (update, completed) = *reports;
                let Some(run) = self.runs.remove(&run_id) else { return };
                // Log lines about the run carry its job id into LogEvents.
                crate::logfwd::set_job(Some(&run.job_id));
                match &completed {
                    Some(c) => {
                        log::info!("job {}: run {run_id} succeeded ({} bytes)", run.job_id, c.size_bytes)
                    }
                    None if update.status == pb::JobStatus::Failed as i32 => {
                        log::error!("job {}: run {run_id} failed: {}", run.job_id, update.error_message)
                    }
                    None => log::warn!("job {}: run {run_id} {}", run.job_id, update.error_message),
                }
                self.finish_report(&run_id, &run.job_id, update, completed);
                crate::logfwd::set_job(None);
            }
            RunEvent::Dropped { run_id, reason } => {
                let Some(run) = self.runs.remove(&run_id) else { return };
                let (status, message) = match reason {
                    SkipReason::Cancelled => (
                        pb::JobStatus::Cancelled,
                        "cancelled by the control plane before it started".to_string(),
                    ),
                    SkipReason::ShuttingDown => {
                        (pb::JobStatus::Failed, "the agent shut down before the run started".to_string())
                    }
                    other => (pb::JobStatus::Failed, format!("not started: {other}")),
                };
                let mut u = job_update(&run.job_id, &run_id, status);
                u.error_message = message;
                self.finish_report(&run_id, &run.job_id, u, None);
            }
        }
    }

    /// The final reports of a run: stored first (so a crash before they reach the outbox
    /// re-pushes them at restart), then pushed, then marked reported.
    fn finish_report(
        &mut self,
        run_id: &str,
        job_id: &str,
        update: pb::JobUpdate,
        completed: Option<pb::BackupCompleted>,
    ) {
        if let Err(e) = self.parts.store.set_done(run_id, job_id, &update, completed.as_ref()) {
            log::error!("{e}");
        }
        self.push(Payload::JobUpdate(update), "");
        if let Some(c) = completed {
            self.push(Payload::BackupCompleted(c), "");
        }
        if let Err(e) = self.parts.store.set_reported(run_id) {
            log::error!("{e}");
        }
        self.publish();
    }

    fn cancel_job(&mut self, job_id: &str, cid: &str) {
        let mut found = 0;
        for (run_id, run) in self.runs.iter().filter(|(_, r)| r.job_id == job_id) {
            found += 1;
            let _ = self.parts.scheduler.send(SchedulerCommand::CancelRun { run_id: run.scheduler_id });
            if run.started {
                log::info!("job {job_id}: run {run_id} cancelled by the control plane");
            }
        }
        if found == 0 {
            self.ack(cid, false, format!("no queued or running run of job {job_id:?}"));
        } else {
            self.ack(cid, true, "");
        }
    }

    /// RUNNING updates for runs whose step or percentage changed, at most one per run per
    /// [`UPDATE_EVERY`].
    fn progress_updates(&mut self) {
        let mut out = Vec::new();
        for (run_id, run) in self.runs.iter_mut().filter(|(_, r)| r.started) {
            if run.reported_at.elapsed() < UPDATE_EVERY {
                continue;
            }
            let percent = match run.estimate {
                Some(total) => {
                    let done = run.progress.dump_bytes.load(Ordering::Relaxed);
                    ((done.saturating_mul(100) / total).min(99)) as u32
                }
                None => 0,
            };
            if (run.step, percent) == run.reported {
                continue;
            }
            run.reported = (run.step, percent);
            run.reported_at = Instant::now();
            let mut u = job_update(&run.job_id, run_id, pb::JobStatus::Running);
            u.current_step = run.step.into();
            u.progress_percent = percent;
            out.push(u);
        }
        for u in out {
            if let Err(e) = self.parts.store.set_running(&u.run_id, &u) {
                log::warn!("{e}");
            }
            self.push(Payload::JobUpdate(u), "");
        }
    }

    /// After a restart: runs that were queued or running when the process died are
    /// reported FAILED ("agent restarted …") and their multipart uploads aborted; final
    /// reports that never reached the outbox are pushed now.
    fn recover(&mut self) {
        let rows = match self.parts.store.unfinished_runs() {
            Ok(rows) => rows,
            Err(e) => {
                log::error!("{e}");
                return;
            }
        };
        let settings = self.parts.run_settings.clone();
        for row in rows {
            match row.phase {
                RunPhase::Queued | RunPhase::Running => {
                    let was = if row.phase == RunPhase::Queued { "queued" } else { "running" };
                    let mut message = format!("agent restarted while the run was {was}");
                    if let Some(mp) = &row.upload {
                        match S3Target::from_wire(mp, settings.allow_insecure)
                            .and_then(|t| S3Storage::new(t, Some(&settings.state_dir)))
                        {
                            Ok(s3) => {
                                let n = s3.abort_recorded_uploads();
                                if n > 0 {
                                    message.push_str("; its unfinished upload was aborted");
                                }
                            }
                            Err(e) => log::warn!("run {}: cannot abort its upload: {e}", row.run_id),
                        }
                    }
                    log::warn!("job {}: run {}: {message}", row.job_id, row.run_id);
                    let mut u = job_update(&row.job_id, &row.run_id, pb::JobStatus::Failed);
                    u.error_message = message;
                    self.finish_report(&row.run_id, &row.job_id, u, None);
                }
                RunPhase::Done { reported: false } => {
                    if let Some(u) = row.last_update {
                        self.push(Payload::JobUpdate(u), "");
                    }
                    if let Some(c) = row.completed {
                        self.push(Payload::BackupCompleted(c), "");
                    }
                    if let Err(e) = self.parts.store.set_reported(&row.run_id) {
                        log::error!("{e}");
                    }
                }
                RunPhase::Done { reported: true } => {}
            }
        }
    }

    // ---- self-update ----

    /// SelfUpdate (agent.md "Self-update"): decided here, applied on the self-update thread.
    fn self_update(&mut self, u: pb::SelfUpdate, cid: &str) {
        let state = UpdateState {
            auto_update_enabled: self.config.advanced.as_ref().is_some_and(|a| a.auto_update_enabled),
            updating: self.updating,
            stopping: self.stopping,
            busy: self.runs.len(),
        };
        if let Some(reason) = update::refusal(&u, &state) {
            log::warn!("self-update to {:?} refused: {reason}", u.target_version);
            self.ack(cid, false, reason);
            return;
        }
        let job = UpdateJob { correlation_id: cid.to_string(), request: update::request(u) };
        match self.parts.updates.send(job) {
            Ok(()) => self.updating = true,
            Err(_) => self.ack(cid, false, "the self-update thread has stopped"),
        }
    }

    fn update_done(&mut self, done: UpdateDone, grace: Duration) {
        self.updating = false;
        match done.result {
            Ok(applied) => {
                let message = format!(
                    "self-update: installed {} (was {}); restarting into it",
                    applied.version, applied.previous_version
                );
                // Stored before the exec: the new process delivers it.
                self.log_event(pb::LogLevel::Info, &message);
                log::info!("{message}");
                self.ack(&done.correlation_id, true, message);
                self.reexec = true;
                self.stop(grace);
            }
            Err(reason) => {
                log::error!("self-update refused: {reason}");
                self.ack(&done.correlation_id, false, reason);
            }
        }
    }

    /// A LogEvent straight into the outbox, whatever the forwarding level.
    fn log_event(&self, level: pb::LogLevel, message: &str) {
        let event = pb::LogEvent {
            ts_ms: crate::clock::now_ms(),
            level: level as i32,
            job_id: String::new(),
            message: crate::secrets::redact(message),
            fields: Default::default(),
        };
        self.push(Payload::Log(event), "");
    }

    // ---- health ----

    fn run_health_check(&mut self, check_id: &str, cid: &str) {
        let Some(spec) = self.config.health_checks.iter().find(|c| c.id == check_id) else {
            self.ack(
                cid,
                false,
                format!("unknown health check {check_id:?} (config version {})", self.config.version),
            );
            return;
        };
        match convert::health_check(spec) {
            Ok(check) => match self.parts.health.send(HealthCommand::ProbeNow(check)) {
                Ok(()) => self.ack(cid, true, ""),
                Err(_) => self.ack(cid, false, "the health thread has stopped"),
            },
            Err(e) => self.ack(cid, false, e),
        }
    }

    fn health_result(&mut self, r: ProbeResult) {
        let result = pb::HealthCheckResult {
            check_id: r.check_id,
            ts_ms: crate::clock::now_ms(),
            ok: r.ok,
            latency_ms: r.latency.as_millis().min(u32::MAX as u128) as u32,
            error: r.error,
            status_code: r.status_code,
        };
        self.push(Payload::HealthResult(result), "");
    }
}
