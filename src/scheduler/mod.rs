//! The standalone scheduler: cron fires in UTC, the maintenance window, retries,
//! missed-run catch-up, job timeouts, and a worker pool of `max_parallel_jobs` threads.
//!
//! Threads and channels:
//! - `scheduler`, one thread started by [`Scheduler::start`], owns all schedule state:
//!   each job's next fire and pending retry, the queue of runs waiting for a worker, and
//!   the runs in flight with their [`Cancel`] and deadline. Its one input is the command
//!   channel of [`SchedulerCommand`]s (from the [`SchedulerHandle`] and from the
//!   workers). Between deadlines it sleeps on the [`Clock`], so it never polls.
//! - `worker-1` … `worker-N` (`pool.rs`) call the caller's run function, one run each at a
//!   time, and answer on the command channel with `RunFinished`. The scheduler hands out
//!   runs on the dispatch channel, never more than there are idle workers.
//! - What the caller can watch: [`SchedulerEvent`]s on an optional unbounded channel
//!   (nobody has to read it), the log, and the [`Summary`] returned at shutdown.
//!
//! What it does not do: read the TOML (config hands over [`JobSchedule`]s), keep run
//! records (the state database does; the caller passes in each job's last success), run
//! a backup (the run function does), or catch signals (the CLI does, and calls
//! [`SchedulerHandle::shutdown`]).
//!
//! The rules:
//! - A cron fire starts attempt 1 of a run, unless the job is still queued or running,
//!   or the time is inside the maintenance window: then the fire is skipped, logged,
//!   counted and reported as [`SchedulerEvent::RunSkipped`]. Fires missed because the
//!   clock jumped ahead count as one.
//! - [`SchedulerCommand::RunNow`] starts a manual run: it ignores the maintenance
//!   window, is never retried, and is skipped too while the job runs.
//! - A scheduled run that fails (or times out) is retried per its [`RetryPolicy`],
//!   timed from the failure. A cron fire or a manual run of the job replaces a pending
//!   retry. A retry or a catch-up run that comes due inside the maintenance window
//!   waits for the window's end ([`SchedulerEvent::RunDeferred`]).
//! - At start, a job whose cron fired at least once between its last recorded success
//!   (or, when it never succeeded, its last recorded run) and now runs once (not once per
//!   missed fire). A job with no run on record waits for its first fire time: catch-up
//!   is for runs missed, and a job never seen before missed none. A job with
//!   `run_on_start` runs once at every start, whatever its history.
//! - A job's timeout counts from the moment a worker takes the run. When it elapses the
//!   scheduler sets the run's [`Cancel`]; the run then counts as failed ("timed out").
//! - [`SchedulerCommand::Submit`] queues a run from outside the cron schedule (connected
//!   mode's RunBackup) behind the others: the same workers, the same parallel limit, its
//!   own timeout. It is never retried and never skipped; [`SchedulerCommand::CancelRun`]
//!   drops it while it is queued ([`Work::dropped`]) or cancels it while it runs.
//! - [`SchedulerCommand::SetMaxParallel`] changes the number of runs at a time (connected
//!   mode's pushed `max_parallel_jobs`); runs in flight are never stopped for it.
//! - [`SchedulerCommand::Shutdown`] drops queued runs and pending retries, lets running
//!   ones finish within the grace period, then cancels them, waits for them (run
//!   functions must stop promptly once cancelled) and for the workers, and the thread
//!   returns the [`Summary`]. A [`Cancel`] set by the scheduler says why: a timeout or
//!   the shutdown.

pub mod clock;
pub mod cron;
mod pool;
pub mod window;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::panic;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use crossbeam_channel::{Receiver, Sender};
use uuid::Uuid;

use crate::cancel::{Cancel, CancelReason};
pub use clock::{Clock, ManualClock, Sleeper, SystemClock};
pub use cron::CronSchedule;
use pool::{Dispatch, Pool};
pub use window::MaintenanceWindow;

pub const DEFAULT_MAX_PARALLEL_JOBS: usize = 2;

/// When a failed scheduled run is tried again.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first one included; 0 counts as 1 (no retry).
    pub max_attempts: u32,
    /// Seconds to wait after failed attempt k before attempt k + 1 is `backoff_seconds[k - 1]`;
    /// the last value repeats; empty means [`RetryPolicy::DEFAULT_BACKOFF_SECONDS`].
    pub backoff_seconds: Vec<u32>,
}

impl RetryPolicy {
    pub const DEFAULT_BACKOFF_SECONDS: u32 = 60;

    /// How long to wait after attempt `failed_attempt` (1-based) failed, or `None` when
    /// that was the last attempt allowed.
    pub fn delay_after(&self, failed_attempt: u32) -> Option<Duration> {
        if failed_attempt >= self.max_attempts.max(1) {
            return None;
        }
        let k = failed_attempt.max(1) as usize - 1;
        let seconds = self.backoff_seconds.get(k).or(self.backoff_seconds.last());
        Some(Duration::from_secs(seconds.copied().unwrap_or(Self::DEFAULT_BACKOFF_SECONDS).into()))
    }
}

/// One job as the scheduler sees it.
#[derive(Clone, Debug)]
pub struct JobSchedule {
    pub job_id: String,
    pub cron: CronSchedule,
    pub retry: RetryPolicy,
    /// The whole run, counted from the moment a worker takes it; `None`: no limit.
    pub timeout: Option<Duration>,
    /// Run once as soon as the scheduler starts, besides the cron fires.
    pub run_on_start: bool,
}

impl JobSchedule {
    /// No retry, no timeout, no run at start.
    pub fn new(job_id: impl Into<String>, cron: CronSchedule) -> JobSchedule {
        JobSchedule {
            job_id: job_id.into(),
            cron,
            retry: RetryPolicy::default(),
            timeout: None,
            run_on_start: false,
        }
    }
}

/// What a worker is asked to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunRequest {
    pub job_id: String,
    /// A new UUID v4 for every attempt.
    pub run_id: Uuid,
    /// 1 for a fire, a catch-up or a manual run; k + 1 for the retry after attempt k.
    pub attempt: u32,
    /// The fire time, the retry time, the start time (catch-up) or the request time (manual).
    pub scheduled_for: DateTime<Utc>,
    pub manual: bool,
}

/// What the run function reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunOutcome {
    Success,
    /// The run failed; the text says why (for the log).
    Failed(String),
    /// The run stopped because its `Cancel` was set.
    Cancelled,
}

/// A run handed to the scheduler from outside its cron schedule.
pub trait Work: Send {
    /// Runs on a worker thread; must return promptly once `cancel` is set.
    fn run(self: Box<Self>, cancel: Cancel) -> RunOutcome;
    /// Called on the scheduler thread instead of [`Work::run`] when the run is dropped
    /// before a worker took it: cancelled while queued, or the scheduler shutting down.
    fn dropped(self: Box<Self>, reason: SkipReason);
}

/// A run from outside the cron schedule (connected mode's RunBackup).
pub struct Submission {
    pub job_id: String,
    /// Chosen by the caller, so it can cancel the run with [`SchedulerCommand::CancelRun`].
    pub run_id: Uuid,
    /// The whole run, counted from the moment a worker takes it; `None`: no limit.
    pub timeout: Option<Duration>,
    pub work: Box<dyn Work>,
}

impl fmt::Debug for Submission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Submission")
            .field("job_id", &self.job_id)
            .field("run_id", &self.run_id)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Everything the scheduler thread can be asked to do.
#[derive(Debug)]
pub enum SchedulerCommand {
    /// Run the job now, as a manual run.
    RunNow { job_id: String },
    /// Sent by the worker pool when a run function returns.
    RunFinished { job_id: String, run_id: Uuid, outcome: RunOutcome },
    /// Stop new runs, give running ones `grace` to finish, then cancel them. A second
    /// `Shutdown` can only shorten the grace.
    Shutdown { grace: Duration },
    /// Queue a run from outside the cron schedule.
    Submit(Submission),
    /// Drop a submitted run that waits for a worker, or cancel it if it runs.
    CancelRun { run_id: Uuid },
    /// Run at most this many at a time from now on (0 counts as 1).
    SetMaxParallel(usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// The job's previous run is still running or waiting for a worker.
    AlreadyRunning,
    /// A scheduled run would have started inside the maintenance window.
    MaintenanceWindow,
    /// `RunNow` named a job the scheduler does not have.
    UnknownJob,
    /// The scheduler is shutting down.
    ShuttingDown,
    /// A submitted run was cancelled before a worker took it.
    Cancelled,
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SkipReason::AlreadyRunning => "the previous run is still running",
            SkipReason::MaintenanceWindow => "inside the maintenance window",
            SkipReason::UnknownJob => "no such job",
            SkipReason::ShuttingDown => "the scheduler is shutting down",
            SkipReason::Cancelled => "cancelled before it started",
        })
    }
}

/// What the scheduler thread did, in order, for whoever watches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SchedulerEvent {
    /// A worker took the run.
    RunStarted(RunRequest),
    RunSkipped {
        job_id: String,
        scheduled_for: DateTime<Utc>,
        manual: bool,
        reason: SkipReason,
    },
    /// A retry or catch-up run came due inside the maintenance window and waits for its end.
    RunDeferred {
        job_id: String,
        attempt: u32,
        until: DateTime<Utc>,
    },
    RetryScheduled {
        job_id: String,
        attempt: u32,
        at: DateTime<Utc>,
    },
    /// The run's timeout elapsed and its `Cancel` was set.
    RunTimedOut {
        job_id: String,
        run_id: Uuid,
    },
    /// The run ended; a timed-out run is `Failed("timed out after …")`.
    RunFinished {
        request: RunRequest,
        outcome: RunOutcome,
    },
    /// `Shutdown` was received with this many runs in flight.
    ShutdownStarted {
        running: usize,
    },
}

/// Counts over the scheduler's whole life, returned when its thread ends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub started: u64,
    pub succeeded: u64,
    /// Timed-out runs included.
    pub failed: u64,
    pub timed_out: u64,
    pub cancelled: u64,
    pub retries_scheduled: u64,
    pub skipped_already_running: u64,
    pub skipped_maintenance_window: u64,
    pub skipped_unknown_job: u64,
    /// Queued runs dropped and `RunNow`s refused during shutdown.
    pub skipped_shutting_down: u64,
}

/// The next fire times of one job, for `check-config`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedJob {
    pub job_id: String,
    pub next: Vec<DateTime<Utc>>,
}

/// Each job's next `n` fire times strictly after `now`, in the order given.
pub fn plan(jobs: &[JobSchedule], now: DateTime<Utc>, n: usize) -> Vec<PlannedJob> {
    jobs.iter().map(|j| PlannedJob { job_id: j.job_id.clone(), next: j.cron.upcoming(now, n) }).collect()
}

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("job {0} is scheduled twice")]
    DuplicateJob(String),
    #[error("cannot start the scheduler's threads: {0}")]
    Spawn(#[from] io::Error),
    #[error("the scheduler has stopped")]
    Stopped,
}

pub struct SchedulerOptions {
    pub jobs: Vec<JobSchedule>,
    /// Worker threads; 0 counts as 1.
    pub max_parallel_jobs: usize,
    pub maintenance_window: Option<MaintenanceWindow>,
    /// Each job's last successful run, from the state database; a job missing here has none.
    pub last_success: HashMap<String, DateTime<Utc>>,
    /// The start of each job's last recorded run of any status; a job missing here and
    /// in `last_success` has no history, and waits for its first fire.
    pub last_run: HashMap<String, DateTime<Utc>>,
    pub clock: Arc<dyn Clock>,
    pub events: Option<Sender<SchedulerEvent>>,
}

impl SchedulerOptions {
    /// Two workers, no window, no recorded success, the system clock, no events.
    pub fn new(jobs: Vec<JobSchedule>) -> SchedulerOptions {
        SchedulerOptions {
            jobs,
            max_parallel_jobs: DEFAULT_MAX_PARALLEL_JOBS,
            maintenance_window: None,
            last_success: HashMap::new(),
            last_run: HashMap::new(),
            clock: Arc::new(SystemClock),
            events: None,
        }
    }
}

/// The running scheduler, seen from outside. Dropping it shuts the scheduler down with
/// no grace and waits for it.
pub struct SchedulerHandle {
    commands: Sender<SchedulerCommand>,
    thread: Option<JoinHandle<Summary>>,
}

impl SchedulerHandle {
    pub fn send(&self, command: SchedulerCommand) -> Result<(), SchedulerError> {
        self.commands.send(command).map_err(|_| SchedulerError::Stopped)
    }

    /// A sender of commands for another thread (e.g. the one that waits for signals).
    pub fn sender(&self) -> Sender<SchedulerCommand> {
        self.commands.clone()
    }

    /// Sends `Shutdown { grace }` and waits for the scheduler thread to end.
    pub fn shutdown(self, grace: Duration) -> Summary {
        let _ = self.send(SchedulerCommand::Shutdown { grace });
        self.join()
    }

    /// Waits for the scheduler thread to end, i.e. for a `Shutdown` someone sent to
    /// complete.
    pub fn join(mut self) -> Summary {
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(summary)) => summary,
            Some(Err(panic)) => panic::resume_unwind(panic),
            None => Summary::default(),
        }
    }
}

impl Drop for SchedulerHandle {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.commands.send(SchedulerCommand::Shutdown { grace: Duration::ZERO });
            let _ = thread.join();
        }
    }
}

/// The scheduler thread's state. Built and started by [`Scheduler::start`]; nothing
/// else touches it.
pub struct Scheduler {
    jobs: Vec<JobState>,
    index: HashMap<String, usize>,
    window: Option<MaintenanceWindow>,
    max_parallel: usize,
    clock: Arc<dyn Clock>,
    events: Option<Sender<SchedulerEvent>>,
    commands: Receiver<SchedulerCommand>,
    pool: Pool,
    /// Runs waiting for a worker.
    queue: VecDeque<Queued>,
    running: HashMap<Uuid, Running>,
    shutting_down: bool,
    summary: Summary,
}

struct JobState {
    spec: JobSchedule,
    next_fire: Option<DateTime<Utc>>,
    /// A retry, or the catch-up run at start.
    pending: Option<Pending>,
    /// Queued or running.
    busy: bool,
}

#[derive(Clone, Copy)]
struct Pending {
    at: DateTime<Utc>,
    attempt: u32,
}

/// A run waiting for a worker: a cron job's (`job` set) or a submitted one (`work` set).
struct Queued {
    job: Option<usize>,
    request: RunRequest,
    timeout: Option<Duration>,
    work: Option<Box<dyn Work>>,
}

struct Running {
    /// `None` for a submitted run.
    job: Option<usize>,
    request: RunRequest,
    cancel: Cancel,
    timeout: Option<Duration>,
    deadline: Option<DateTime<Utc>>,
    timed_out: bool,
}

impl Scheduler {
    /// Starts the worker pool and the `scheduler` thread. `run` is called on a worker
    /// thread for every run; it must return promptly once its `Cancel` is set.
    pub fn start<F>(options: SchedulerOptions, run: F) -> Result<SchedulerHandle, SchedulerError>
    where
        F: Fn(RunRequest, Cancel) -> RunOutcome + Send + Sync + 'static,
    {
        let SchedulerOptions {
            jobs,
            max_parallel_jobs,
            maintenance_window,
            last_success,
            last_run,
            clock,
            events,
        } = options;
        let mut index = HashMap::new();
        for (i, job) in jobs.iter().enumerate() {
            if index.insert(job.job_id.clone(), i).is_some() {
                return Err(SchedulerError::DuplicateJob(job.job_id.clone()));
            }
        }
        let max_parallel = max_parallel_jobs.max(1);
        let (commands_tx, commands) = crossbeam_channel::unbounded();
        let pool = Pool::start(max_parallel, Arc::new(run), commands_tx.clone())?;
        let now = clock.now();
        let jobs = jobs
            .into_iter()
            .map(|spec| {
                let reference = last_success.get(&spec.job_id).or(last_run.get(&spec.job_id)).copied();
                JobState::new(spec, now, reference)
            })
            .collect();
        let scheduler = Scheduler {
            jobs,
            index,
            window: maintenance_window.filter(|w| !w.is_empty()),
            max_parallel,
            clock,
            events,
            commands,
            pool,
            queue: VecDeque::new(),
            running: HashMap::new(),
            shutting_down: false,
            summary: Summary::default(),
        };
        let thread = thread::Builder::new().name("scheduler".to_string()).spawn(move || scheduler.run())?;
        Ok(SchedulerHandle { commands: commands_tx, thread: Some(thread) })
    }

    fn run(mut self) -> Summary {
        loop {
            let now = self.clock.now();
            self.fire_due(now);
            self.dispatch(now);
            match self.clock.sleep_until(self.next_wake(), &self.commands) {
                None => {}
                Some(SchedulerCommand::Shutdown { grace }) => return self.shut_down(grace),
                Some(SchedulerCommand::RunNow { job_id }) => self.run_now(&job_id),
                Some(SchedulerCommand::RunFinished { job_id, run_id, outcome }) => {
                    self.finished(&job_id, run_id, outcome)
                }
                Some(SchedulerCommand::Submit(submission)) => self.submit(submission),
                Some(SchedulerCommand::CancelRun { run_id }) => self.cancel_run(run_id),
                Some(SchedulerCommand::SetMaxParallel(n)) => self.set_max_parallel(n),
            }
        }
    }

    fn submit(&mut self, s: Submission) {
        if self.shutting_down {
            log::warn!("job {}: submitted run {} dropped: {}", s.job_id, s.run_id, SkipReason::ShuttingDown);
            self.summary.skipped_shutting_down += 1;
            return s.work.dropped(SkipReason::ShuttingDown);
        }
        let request = RunRequest {
            job_id: s.job_id,
            run_id: s.run_id,
            attempt: 1,
            scheduled_for: self.clock.now(),
            manual: true,
        };
        if self.running.len() + self.queue.len() >= self.max_parallel {
            log::info!("job {}: waiting for one of the {} workers", request.job_id, self.max_parallel);
        }
        self.queue.push_back(Queued { job: None, request, timeout: s.timeout, work: Some(s.work) });
    }

    fn cancel_run(&mut self, run_id: Uuid) {
        if let Some(at) = self.queue.iter().position(|q| q.request.run_id == run_id) {
            if let Some(Queued { request, work, .. }) = self.queue.remove(at) {
                log::info!("job {}: run {run_id} cancelled before it started", request.job_id);
                if let Some(work) = work {
                    work.dropped(SkipReason::Cancelled);
                }
            }
        } else if let Some(run) = self.running.get(&run_id) {
            run.cancel.cancel();
        }
    }

    fn set_max_parallel(&mut self, n: usize) {
        let n = n.max(1);
        if n != self.max_parallel {
            log::info!("max_parallel_jobs: {} → {n}", self.max_parallel);
        }
        self.max_parallel = n;
        if let Err(e) = self.pool.grow(n) {
            log::error!("cannot start more worker threads: {e}");
        }
    }

    fn fire_due(&mut self, now: DateTime<Utc>) {
        self.expire_timeouts(now);
        for i in 0..self.jobs.len() {
            if let Some(fire) = self.jobs[i].next_fire.filter(|t| *t <= now) {
                self.jobs[i].next_fire = self.jobs[i].spec.cron.next_after(now);
                self.fire(i, fire, now);
            }
            if let Some(pending) = self.jobs[i].pending.filter(|p| p.at <= now) {
                self.jobs[i].pending = None;
                self.start_pending(i, pending, now);
            }
        }
    }

    fn fire(&mut self, i: usize, fire: DateTime<Utc>, now: DateTime<Utc>) {
        if self.jobs[i].busy {
            return self.skip(i, fire, false, SkipReason::AlreadyRunning);
        }
        if self.window.is_some_and(|w| w.contains(now)) {
            return self.skip(i, fire, false, SkipReason::MaintenanceWindow);
        }
        if let Some(retry) = self.jobs[i].pending.take() {
            log::info!(
                "job {}: the run due at {fire} replaces attempt {} planned for {}",
                self.jobs[i].spec.job_id,
                retry.attempt,
                retry.at
            );
        }
        self.enqueue(i, 1, fire, false);
    }

    fn start_pending(&mut self, i: usize, pending: Pending, now: DateTime<Utc>) {
        if self.jobs[i].busy {
            return self.skip(i, pending.at, false, SkipReason::AlreadyRunning);
        }
        if let Some(window) = self.window.filter(|w| w.contains(now)) {
            let until = window.end_after(now);
            let job_id = self.jobs[i].spec.job_id.clone();
            log::info!(
                "job {job_id}: attempt {} waits for the end of the maintenance window {window}",
                pending.attempt
            );
            self.jobs[i].pending = Some(Pending { at: until, ..pending });
            return self.emit(SchedulerEvent::RunDeferred { job_id, attempt: pending.attempt, until });
        }
        self.enqueue(i, pending.attempt, pending.at, false);
    }

    fn run_now(&mut self, job_id: &str) {
        let now = self.clock.now();
        let Some(&i) = self.index.get(job_id) else {
            log::warn!("manual run of job {job_id} refused: no such job");
            self.summary.skipped_unknown_job += 1;
            let reason = SkipReason::UnknownJob;
            return self.emit(SchedulerEvent::RunSkipped {
                job_id: job_id.to_string(),
                scheduled_for: now,
                manual: true,
                reason,
            });
        };
        if self.shutting_down {
            return self.skip(i, now, true, SkipReason::ShuttingDown);
        }
        if self.jobs[i].busy {
            return self.skip(i, now, true, SkipReason::AlreadyRunning);
        }
        self.jobs[i].pending = None;
        self.enqueue(i, 1, now, true);
    }

    fn enqueue(&mut self, i: usize, attempt: u32, scheduled_for: DateTime<Utc>, manual: bool) {
        let job = &mut self.jobs[i];
        job.busy = true;
        let request = RunRequest {
            job_id: job.spec.job_id.clone(),
            run_id: Uuid::new_v4(),
            attempt,
            scheduled_for,
            manual,
        };
        if self.running.len() + self.queue.len() >= self.max_parallel {
            log::info!("job {}: waiting for one of the {} workers", request.job_id, self.max_parallel);
        }
        let timeout = job.spec.timeout;
        self.queue.push_back(Queued { job: Some(i), request, timeout, work: None });
    }

    /// Hands queued runs to idle workers.
    fn dispatch(&mut self, now: DateTime<Utc>) {
        while self.running.len() < self.max_parallel.min(self.pool.size()) {
            let Some(Queued { job, request, timeout, work }) = self.queue.pop_front() else { return };
            let deadline = timeout.and_then(|t| now.checked_add_signed(TimeDelta::from_std(t).ok()?));
            let cancel = Cancel::default();
            let kind = if request.manual { "manual run" } else { "run" };
            log::info!(
                "job {}: {kind} {} started (attempt {})",
                request.job_id,
                request.run_id,
                request.attempt
            );
            self.summary.started += 1;
            self.emit(SchedulerEvent::RunStarted(request.clone()));
            let (job_id, run_id) = (request.job_id.clone(), request.run_id);
            let running = Running {
                job,
                request: request.clone(),
                cancel: cancel.clone(),
                timeout,
                deadline,
                timed_out: false,
            };
            self.running.insert(run_id, running);
            if self.pool.dispatch(Dispatch { request, cancel, work }).is_err() {
                self.finished(&job_id, run_id, RunOutcome::Failed("no worker thread is left".to_string()));
            }
        }
    }

    fn expire_timeouts(&mut self, now: DateTime<Utc>) {
        for run in self.running.values_mut() {
            if !run.timed_out && run.deadline.is_some_and(|d| d <= now) {
                run.timed_out = true;
                run.cancel.cancel_because(CancelReason::TimedOut);
                let (job_id, run_id) = (run.request.job_id.clone(), run.request.run_id);
                log::warn!("job {job_id}: run {run_id} timed out; cancelling it");
                if let Some(events) = &self.events {
                    let _ = events.send(SchedulerEvent::RunTimedOut { job_id, run_id });
                }
            }
        }
    }

    fn finished(&mut self, job_id: &str, run_id: Uuid, outcome: RunOutcome) {
        let Some(run) = self.running.remove(&run_id) else {
            log::warn!("job {job_id}: ignoring the end of run {run_id}, which is not running");
            return;
        };
        if let Some(job) = run.job {
            self.jobs[job].busy = false;
        }
        let outcome = match outcome {
            RunOutcome::Success => RunOutcome::Success,
            _ if run.timed_out => {
                self.summary.timed_out += 1;
                RunOutcome::Failed(format!("timed out after {}", seconds(run.timeout.unwrap_or_default())))
            }
            other => other,
        };
        let request = run.request;
        // A submitted run's owner logs its end (connected mode, with the job id that
        // carries the line into LogEvents): one line per run, not two.
        let quiet = |level: log::Level| if run.job.is_some() { level } else { log::Level::Debug };
        match &outcome {
            RunOutcome::Success => {
                self.summary.succeeded += 1;
                log::log!(quiet(log::Level::Info), "job {job_id}: run {run_id} succeeded");
            }
            RunOutcome::Cancelled => {
                self.summary.cancelled += 1;
                log::log!(quiet(log::Level::Warn), "job {job_id}: run {run_id} was cancelled");
            }
            RunOutcome::Failed(error) => {
                self.summary.failed += 1;
                log::log!(
                    quiet(log::Level::Error),
                    "job {job_id}: run {run_id} (attempt {}) failed: {error}",
                    request.attempt
                );
            }
        }
        let retry = match (run.job, &outcome) {
            (Some(job), RunOutcome::Failed(_)) if !request.manual && !self.shutting_down => {
                self.jobs[job].spec.retry.delay_after(request.attempt).map(|delay| (job, delay))
            }
            _ => None,
        };
        let attempt = request.attempt + 1;
        self.emit(SchedulerEvent::RunFinished { request, outcome });
        if let Some((job, delay)) = retry {
            let at = self.clock.now() + TimeDelta::from_std(delay).unwrap_or(TimeDelta::MAX);
            self.jobs[job].pending = Some(Pending { at, attempt });
            self.summary.retries_scheduled += 1;
            log::info!("job {job_id}: attempt {attempt} at {at}");
            self.emit(SchedulerEvent::RetryScheduled { job_id: job_id.to_string(), attempt, at });
        }
    }

    fn skip(&mut self, i: usize, scheduled_for: DateTime<Utc>, manual: bool, reason: SkipReason) {
        let job_id = self.jobs[i].spec.job_id.clone();
        let what = if manual { "manual run" } else { "run due at" };
        let when = if manual { String::new() } else { format!(" {scheduled_for}") };
        log::warn!("job {job_id}: {what}{when} skipped: {reason}");
        match reason {
            SkipReason::AlreadyRunning => self.summary.skipped_already_running += 1,
            SkipReason::MaintenanceWindow => self.summary.skipped_maintenance_window += 1,
            SkipReason::UnknownJob => self.summary.skipped_unknown_job += 1,
            SkipReason::ShuttingDown => self.summary.skipped_shutting_down += 1,
            SkipReason::Cancelled => {}
        }
        self.emit(SchedulerEvent::RunSkipped { job_id, scheduled_for, manual, reason });
    }

    fn next_wake(&self) -> Option<DateTime<Utc>> {
        let timers = self.jobs.iter().flat_map(|j| [j.next_fire, j.pending.map(|p| p.at)]).flatten();
        let deadlines = self.running.values().filter(|r| !r.timed_out).filter_map(|r| r.deadline);
        timers.chain(deadlines).min()
    }

    fn shut_down(mut self, grace: Duration) -> Summary {
        self.shutting_down = true;
        let now = self.clock.now();
        log::info!("shutting down: {} run(s) in flight get {} to finish", self.running.len(), seconds(grace));
        self.emit(SchedulerEvent::ShutdownStarted { running: self.running.len() });
        for Queued { job, request, work, .. } in std::mem::take(&mut self.queue) {
            if let Some(i) = job {
                self.jobs[i].busy = false;
                self.skip(i, request.scheduled_for, request.manual, SkipReason::ShuttingDown);
            } else if let Some(work) = work {
                log::warn!(
                    "job {}: run {} dropped: {}",
                    request.job_id,
                    request.run_id,
                    SkipReason::ShuttingDown
                );
                self.summary.skipped_shutting_down += 1;
                work.dropped(SkipReason::ShuttingDown);
            }
        }
        for job in &mut self.jobs {
            job.next_fire = None;
            job.pending = None;
        }
        let mut grace_end = add(now, grace);
        let mut cancelled = false;
        while !self.running.is_empty() {
            let now = self.clock.now();
            self.expire_timeouts(now);
            if !cancelled && grace_end.is_some_and(|end| now >= end) {
                cancelled = true;
                log::warn!("grace period over: cancelling {} run(s)", self.running.len());
                for run in self.running.values() {
                    run.cancel.cancel_because(CancelReason::Shutdown);
                }
            }
            let wake = if cancelled { None } else { earliest(self.next_wake(), grace_end) };
            match self.clock.sleep_until(wake, &self.commands) {
                None => {}
                Some(SchedulerCommand::Shutdown { grace }) => {
                    grace_end = earliest(grace_end, add(now, grace))
                }
                Some(SchedulerCommand::RunNow { job_id }) => self.run_now(&job_id),
                Some(SchedulerCommand::RunFinished { job_id, run_id, outcome }) => {
                    self.finished(&job_id, run_id, outcome)
                }
                Some(SchedulerCommand::Submit(submission)) => self.submit(submission),
                Some(SchedulerCommand::CancelRun { run_id }) => self.cancel_run(run_id),
                Some(SchedulerCommand::SetMaxParallel(n)) => self.max_parallel = n.max(1),
            }
        }
        let Scheduler { pool, summary, .. } = self;
        pool.join();
        log::info!("scheduler stopped: {summary:?}");
        summary
    }

    fn emit(&self, event: SchedulerEvent) {
        if let Some(events) = &self.events {
            let _ = events.send(event);
        }
    }
}

impl JobState {
    /// `reference`: the job's last recorded success, else its last recorded run; `None`
    /// when the state database knows nothing of it.
    fn new(spec: JobSchedule, now: DateTime<Utc>, reference: Option<DateTime<Utc>>) -> JobState {
        let next_fire = spec.cron.next_after(now);
        let missed = match reference {
            None => {
                if !spec.run_on_start {
                    let first = next_fire.map_or_else(|| "never".to_string(), |t| t.to_string());
                    log::info!("job {}: no run on record; its first run is due at {first}", spec.job_id);
                }
                false
            }
            Some(last) => match spec.cron.next_after(last) {
                Some(fire) if fire <= now => {
                    log::info!(
                        "job {}: missed the run due at {fire} (last on record: {last}); running it once now",
                        spec.job_id
                    );
                    true
                }
                _ => false,
            },
        };
        if spec.run_on_start && !missed {
            log::info!("job {}: run_on_start: running it once now", spec.job_id);
        }
        JobState {
            next_fire,
            pending: (missed || spec.run_on_start).then_some(Pending { at: now, attempt: 1 }),
            busy: false,
            spec,
        }
    }
}

/// `None` when the sum is beyond chrono's range, i.e. never.
fn add(t: DateTime<Utc>, d: Duration) -> Option<DateTime<Utc>> {
    t.checked_add_signed(TimeDelta::from_std(d).ok()?)
}

fn earliest(a: Option<DateTime<Utc>>, b: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn seconds(d: Duration) -> String {
    if d.subsec_nanos() == 0 { format!("{}s", d.as_secs()) } else { format!("{:.3}s", d.as_secs_f64()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_backoff_repeats_its_last_value_and_stops_at_max_attempts() {
        let p = RetryPolicy { max_attempts: 4, backoff_seconds: vec![10, 30] };
        assert_eq!(p.delay_after(1), Some(Duration::from_secs(10)));
        assert_eq!(p.delay_after(2), Some(Duration::from_secs(30)));
        assert_eq!(p.delay_after(3), Some(Duration::from_secs(30)));
        assert_eq!(p.delay_after(4), None);
    }

    #[test]
    fn retry_defaults_to_sixty_seconds_and_zero_attempts_means_one() {
        let p = RetryPolicy { max_attempts: 2, backoff_seconds: vec![] };
        assert_eq!(p.delay_after(1), Some(Duration::from_secs(60)));
        assert_eq!(p.delay_after(2), None);
        let p = RetryPolicy { max_attempts: 0, backoff_seconds: vec![5] };
        assert_eq!(p.delay_after(1), None);
        assert_eq!(RetryPolicy::default().delay_after(1), None);
    }

    #[test]
    fn earliest_ignores_a_missing_side() {
        let t = DateTime::<Utc>::UNIX_EPOCH;
        let later = t + TimeDelta::seconds(1);
        assert_eq!(earliest(Some(later), Some(t)), Some(t));
        assert_eq!(earliest(None, Some(t)), Some(t));
        assert_eq!(earliest(Some(t), None), Some(t));
        assert_eq!(earliest(None, None), None);
    }
}
