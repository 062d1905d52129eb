//! The standalone scheduler against agent.md ("Backup run — the pipeline": maintenance
//! window, retries; "Standalone configuration": cron in UTC, 5 or 6 fields) and issue 4
//! (overlap, catch-up, max_parallel_jobs, timeout, shutdown). Time is a ManualClock: each
//! test moves it by hand and reads what the scheduler did from its events, so nothing
//! sleeps through real minutes. Expected weekdays come from `date -u -d`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use backupy_agent::cancel::{Cancel, CancelReason};
use backupy_agent::scheduler::{
    Clock, CronSchedule, JobSchedule, MaintenanceWindow, ManualClock, PlannedJob, RetryPolicy, RunOutcome,
    RunRequest, Scheduler, SchedulerCommand, SchedulerEvent, SchedulerHandle, SchedulerOptions, SkipReason,
    Sleeper, Submission, Summary, SystemClock, Work, plan,
};
use chrono::{DateTime, Utc};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use uuid::Uuid;

/// Real time allowed for the scheduler to react to one step of a test.
const WAIT: Duration = Duration::from_secs(10);

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn cron(expr: &str) -> CronSchedule {
    CronSchedule::parse(expr).unwrap_or_else(|e| panic!("{expr}: {e}"))
}

fn times(list: &[&str]) -> Vec<DateTime<Utc>> {
    list.iter().map(|s| t(s)).collect()
}

// ---------------------------------------------------------------- fire times

#[test]
fn every_five_minutes_crosses_the_hour_and_the_day() {
    let s = cron("*/5 * * * *");
    assert_eq!(
        s.upcoming(t("2028-01-03T10:52:30Z"), 4),
        times(&[
            "2028-01-03T10:55:00Z",
            "2028-01-03T11:00:00Z",
            "2028-01-03T11:05:00Z",
            "2028-01-03T11:10:00Z"
        ])
    );
    // Strictly after: a fire time itself is not its own next fire.
    assert_eq!(s.next_after(t("2028-01-03T10:55:00Z")), Some(t("2028-01-03T11:00:00Z")));
    assert_eq!(s.next_after(t("2028-01-03T23:57:00Z")), Some(t("2028-01-04T00:00:00Z")));
}

#[test]
fn first_of_the_month_follows_every_month_end() {
    let s = cron("0 0 1 * *");
    assert_eq!(s.next_after(t("2027-01-31T12:00:00Z")), Some(t("2027-02-01T00:00:00Z")));
    // 2028 is a leap year: February has a 29th, and March 1st still follows it.
    assert_eq!(s.next_after(t("2028-02-28T23:59:00Z")), Some(t("2028-03-01T00:00:00Z")));
    assert_eq!(s.next_after(t("2028-02-29T00:00:00Z")), Some(t("2028-03-01T00:00:00Z")));
    assert_eq!(s.next_after(t("2027-12-31T23:00:00Z")), Some(t("2028-01-01T00:00:00Z")));
    // The 29th of February waits for the next leap year.
    assert_eq!(cron("0 0 29 2 *").next_after(t("2027-03-01T00:00:00Z")), Some(t("2028-02-29T00:00:00Z")));
}

#[test]
fn last_minute_of_the_year_crosses_the_year_end() {
    let s = cron("59 23 31 12 *");
    assert_eq!(
        s.upcoming(t("2027-06-01T00:00:00Z"), 2),
        times(&["2027-12-31T23:59:00Z", "2028-12-31T23:59:00Z"])
    );
}

#[test]
fn six_fields_start_with_seconds() {
    let s = cron("*/10 * * * * *");
    assert_eq!(s.next_after(t("2028-01-03T12:00:05Z")), Some(t("2028-01-03T12:00:10Z")));
    assert_eq!(
        s.upcoming(t("2028-01-03T12:00:45Z"), 3),
        times(&["2028-01-03T12:00:50Z", "2028-01-03T12:01:00Z", "2028-01-03T12:01:10Z"])
    );
    // Five fields fire on the minute.
    assert_eq!(cron("* * * * *").next_after(t("2028-01-03T12:00:05Z")), Some(t("2028-01-03T12:01:00Z")));
}

#[test]
fn day_of_week_zero_and_seven_are_sunday() {
    // 2028-01-01 is a Saturday; Sundays follow on the 2nd, 9th and 16th.
    let sundays = times(&["2028-01-02T03:00:00Z", "2028-01-09T03:00:00Z", "2028-01-16T03:00:00Z"]);
    for expr in ["0 3 * * 0", "0 3 * * 7", "0 3 * * SUN", "0 3 * * sun"] {
        assert_eq!(cron(expr).upcoming(t("2028-01-01T00:00:00Z"), 3), sundays, "{expr}");
    }
}

#[test]
fn one_to_five_and_mon_fri_are_the_weekdays() {
    // Monday 2028-01-03 … Friday 2028-01-07, then Monday 2028-01-10.
    let weekdays = times(&[
        "2028-01-03T03:00:00Z",
        "2028-01-04T03:00:00Z",
        "2028-01-05T03:00:00Z",
        "2028-01-06T03:00:00Z",
        "2028-01-07T03:00:00Z",
        "2028-01-10T03:00:00Z",
    ]);
    for expr in ["0 3 * * 1-5", "0 3 * * MON-FRI", "0 3 * * mon,tue,wed,thu,fri"] {
        assert_eq!(cron(expr).upcoming(t("2028-01-01T00:00:00Z"), 6), weekdays, "{expr}");
    }
    // A range through Sunday: Friday, Saturday, Sunday.
    assert_eq!(
        cron("0 3 * * 5-7").upcoming(t("2028-01-03T00:00:00Z"), 3),
        times(&["2028-01-07T03:00:00Z", "2028-01-08T03:00:00Z", "2028-01-09T03:00:00Z"])
    );
}

#[test]
fn invalid_expressions_are_refused_with_a_reason() {
    let refused =
        |expr: &str| CronSchedule::parse(expr).err().unwrap_or_else(|| panic!("{expr:?} was accepted"));
    let e = refused("* * * *");
    assert!(e.contains("expected 5 fields") && e.contains("found 4"), "{e}");
    assert_eq!(refused("61 * * * *"), "minute field \"61\": 61 is out of range 0-59");
    let e = refused("* * * * MONX");
    assert!(e.starts_with("day-of-week field \"MONX\": unknown name \"MONX\""), "{e}");
    let e = refused("");
    assert!(e.starts_with("empty cron expression"), "{e}");
    let e = refused("   ");
    assert!(e.starts_with("empty cron expression"), "{e}");
    // The crate's 7th (year) field is not part of the spec's format.
    assert!(refused("0 0 0 * * * 2028").contains("found 7"));
    assert!(refused("0 24 * * *").starts_with("hour field"));
    assert!(refused("0 0 * 13 *").starts_with("month field"));
    assert!(refused("0 0 * * 8").starts_with("day-of-week field"));
    assert!(refused("0 0 30 2 *").starts_with("never fires"));
}

#[test]
fn check_config_plan_lists_the_next_three_fire_times() {
    let jobs = vec![
        JobSchedule::new("nightly", cron("0 3 * * *")),
        JobSchedule::new("often", cron("*/10 * * * * *")),
    ];
    assert_eq!(
        plan(&jobs, t("2028-01-03T10:00:00Z"), 3),
        vec![
            PlannedJob {
                job_id: "nightly".into(),
                next: times(&["2028-01-04T03:00:00Z", "2028-01-05T03:00:00Z", "2028-01-06T03:00:00Z"]),
            },
            PlannedJob {
                job_id: "often".into(),
                next: times(&["2028-01-03T10:00:10Z", "2028-01-03T10:00:20Z", "2028-01-03T10:00:30Z"]),
            },
        ]
    );
}

// ---------------------------------------------------------------- the scheduler thread

/// A scheduler on a ManualClock, with its events.
struct Harness {
    clock: Arc<ManualClock>,
    events: Receiver<SchedulerEvent>,
    handle: SchedulerHandle,
}

impl Harness {
    fn start<F>(clock: Arc<ManualClock>, mut options: SchedulerOptions, run: F) -> Harness
    where
        F: Fn(RunRequest, Cancel) -> RunOutcome + Send + Sync + 'static,
    {
        let (tx, events) = crossbeam_channel::unbounded();
        options.clock = clock.clone();
        options.events = Some(tx);
        let handle = Scheduler::start(options, run).expect("scheduler starts");
        Harness { clock, events, handle }
    }

    fn set(&self, now: &str) {
        self.clock.set(t(now));
    }

    fn send(&self, command: SchedulerCommand) {
        self.handle.send(command).expect("scheduler is running");
    }

    fn event(&self) -> SchedulerEvent {
        match self.events.recv_timeout(WAIT) {
            Ok(event) => event,
            Err(RecvTimeoutError::Timeout) => panic!("no scheduler event within {WAIT:?}"),
            Err(RecvTimeoutError::Disconnected) => panic!("the scheduler stopped"),
        }
    }

    fn started(&self) -> RunRequest {
        match self.event() {
            SchedulerEvent::RunStarted(request) => request,
            other => panic!("expected RunStarted, got {other:?}"),
        }
    }

    fn finished(&self) -> (RunRequest, RunOutcome) {
        match self.event() {
            SchedulerEvent::RunFinished { request, outcome } => (request, outcome),
            other => panic!("expected RunFinished, got {other:?}"),
        }
    }

    fn skipped(&self) -> (String, DateTime<Utc>, SkipReason) {
        match self.event() {
            SchedulerEvent::RunSkipped { job_id, scheduled_for, reason, .. } => {
                (job_id, scheduled_for, reason)
            }
            other => panic!("expected RunSkipped, got {other:?}"),
        }
    }

    /// The scheduler is asleep until `until` and has nothing more to report.
    fn asleep_until(&self, until: &str) {
        assert_eq!(self.clock.wait_for_sleeper(WAIT), Some(Sleeper::Until(t(until))));
        let extra: Vec<SchedulerEvent> = self.events.try_iter().collect();
        assert!(extra.is_empty(), "unexpected events: {extra:?}");
    }

    /// The scheduler is asleep with no timer at all and has nothing more to report.
    fn asleep_until_nothing(&self) {
        assert_eq!(self.clock.wait_for_sleeper(WAIT), Some(Sleeper::Indefinitely));
        let extra: Vec<SchedulerEvent> = self.events.try_iter().collect();
        assert!(extra.is_empty(), "unexpected events: {extra:?}");
    }

    fn shutdown(self, grace: Duration) -> Summary {
        self.handle.shutdown(grace)
    }
}

/// Run functions that wait until the test releases them (or they are cancelled), and
/// that record what they saw.
struct Runs {
    release: HashMap<String, Sender<RunOutcome>>,
    /// Which job started, and the clock's time when it did.
    seen: Receiver<(String, DateTime<Utc>)>,
    peak: Arc<AtomicUsize>,
}

impl Runs {
    fn new(
        jobs: &[&str],
        clock: Arc<ManualClock>,
    ) -> (Runs, impl Fn(RunRequest, Cancel) -> RunOutcome + Send + Sync + 'static) {
        let mut release = HashMap::new();
        let mut gates = HashMap::new();
        for job in jobs {
            let (tx, rx) = crossbeam_channel::unbounded::<RunOutcome>();
            release.insert(job.to_string(), tx);
            gates.insert(job.to_string(), rx);
        }
        let (seen_tx, seen) = crossbeam_channel::unbounded();
        let (active, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let peak_seen = peak.clone();
        let run = move |request: RunRequest, cancel: Cancel| {
            let now_running = active.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now_running, Ordering::SeqCst);
            let _ = seen_tx.send((request.job_id.clone(), clock.now()));
            let gate = &gates[&request.job_id];
            let outcome = loop {
                if cancel.is_cancelled() {
                    break RunOutcome::Cancelled;
                }
                match gate.recv_timeout(Duration::from_millis(2)) {
                    Ok(outcome) => break outcome,
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => break RunOutcome::Failed("test ended".into()),
                }
            };
            active.fetch_sub(1, Ordering::SeqCst);
            outcome
        };
        (Runs { release, seen, peak: peak_seen }, run)
    }

    fn release(&self, job: &str, outcome: RunOutcome) {
        self.release[job].send(outcome).unwrap();
    }

    fn seen(&self) -> (String, DateTime<Utc>) {
        self.seen.recv_timeout(WAIT).expect("a run function was called")
    }
}

fn options(jobs: Vec<JobSchedule>, last_success: &[(&str, &str)]) -> SchedulerOptions {
    let mut options = SchedulerOptions::new(jobs);
    options.last_success = last_success.iter().map(|(job, at)| (job.to_string(), t(at))).collect();
    options
}

#[test]
fn a_fire_while_the_job_runs_is_skipped_and_reported() {
    let clock = Arc::new(ManualClock::new(t("2028-01-03T10:01:00Z")));
    let (runs, run) = Runs::new(&["a"], clock.clone());
    let jobs = vec![JobSchedule::new("a", cron("*/5 * * * *"))];
    let h = Harness::start(clock, options(jobs, &[("a", "2028-01-03T10:00:00Z")]), run);

    h.asleep_until("2028-01-03T10:05:00Z");
    h.set("2028-01-03T10:05:00Z");
    let first = h.started();
    assert_eq!(
        (first.job_id.as_str(), first.scheduled_for, first.attempt, first.manual),
        ("a", t("2028-01-03T10:05:00Z"), 1, false)
    );

    // Still running at the next fire: skipped, not queued behind it.
    h.set("2028-01-03T10:10:00Z");
    assert_eq!(h.skipped(), ("a".to_string(), t("2028-01-03T10:10:00Z"), SkipReason::AlreadyRunning));
    h.asleep_until("2028-01-03T10:15:00Z");

    runs.release("a", RunOutcome::Success);
    assert_eq!(h.finished(), (first, RunOutcome::Success));
    h.set("2028-01-03T10:15:00Z");
    let second = h.started();
    assert_eq!(second.scheduled_for, t("2028-01-03T10:15:00Z"));
    runs.release("a", RunOutcome::Success);
    h.finished();

    let summary = h.shutdown(Duration::ZERO);
    assert_eq!((summary.started, summary.succeeded, summary.skipped_already_running), (2, 2, 1));
}

#[test]
fn maintenance_window_spanning_midnight_skips_scheduled_runs_but_not_manual_ones() {
    let clock = Arc::new(ManualClock::new(t("2028-01-03T21:30:00Z")));
    let jobs = vec![JobSchedule::new("hourly", cron("0 * * * *"))];
    let mut opts = options(jobs, &[("hourly", "2028-01-03T21:00:00Z")]);
    opts.maintenance_window = Some(MaintenanceWindow::parse("22:00", "02:00").unwrap());
    let h = Harness::start(clock, opts, |_, _| RunOutcome::Success);

    for inside in ["2028-01-03T22:00:00Z", "2028-01-03T23:00:00Z"] {
        h.set(inside);
        assert_eq!(h.skipped(), ("hourly".to_string(), t(inside), SkipReason::MaintenanceWindow));
    }
    h.set("2028-01-03T23:30:00Z");
    h.send(SchedulerCommand::RunNow { job_id: "hourly".into() });
    let manual = h.started();
    assert!(manual.manual);
    assert_eq!(manual.scheduled_for, t("2028-01-03T23:30:00Z"));
    assert_eq!(h.finished().1, RunOutcome::Success);
    for inside in ["2028-01-04T00:00:00Z", "2028-01-04T01:00:00Z"] {
        h.set(inside);
        assert_eq!(h.skipped(), ("hourly".to_string(), t(inside), SkipReason::MaintenanceWindow));
    }
    // The window's end is outside it.
    h.set("2028-01-04T02:00:00Z");
    let after = h.started();
    assert_eq!((after.scheduled_for, after.manual), (t("2028-01-04T02:00:00Z"), false));
    h.finished();

    let summary = h.shutdown(Duration::ZERO);
    assert_eq!((summary.started, summary.skipped_maintenance_window), (2, 4));
}

#[test]
fn a_retry_due_inside_the_maintenance_window_waits_for_its_end() {
    let clock = Arc::new(ManualClock::new(t("2028-01-03T20:59:00Z")));
    let (runs, run) = Runs::new(&["db"], clock.clone());
    let mut job = JobSchedule::new("db", cron("0 21 * * *"));
    job.retry = RetryPolicy { max_attempts: 2, backoff_seconds: vec![3600] };
    let mut opts = options(vec![job], &[("db", "2028-01-02T21:00:00Z")]);
    opts.maintenance_window = Some(MaintenanceWindow::parse("22:00", "02:00").unwrap());
    let h = Harness::start(clock, opts, run);

    h.set("2028-01-03T21:00:00Z");
    h.started();
    runs.release("db", RunOutcome::Failed("disk full".into()));
    h.finished();
    let retry =
        SchedulerEvent::RetryScheduled { job_id: "db".into(), attempt: 2, at: t("2028-01-03T22:00:00Z") };
    assert_eq!(h.event(), retry);
    h.asleep_until("2028-01-03T22:00:00Z");
    h.set("2028-01-03T22:00:00Z");
    let deferred =
        SchedulerEvent::RunDeferred { job_id: "db".into(), attempt: 2, until: t("2028-01-04T02:00:00Z") };
    assert_eq!(h.event(), deferred);
    h.asleep_until("2028-01-04T02:00:00Z");
    h.set("2028-01-04T02:00:00Z");
    let retry = h.started();
    assert_eq!((retry.attempt, retry.scheduled_for), (2, t("2028-01-04T02:00:00Z")));
    runs.release("db", RunOutcome::Success);
    h.finished();
    assert_eq!(h.shutdown(Duration::ZERO).started, 2);
}

#[test]
fn a_catch_up_run_due_inside_the_maintenance_window_waits_for_its_end() {
    let clock = Arc::new(ManualClock::new(t("2028-01-03T23:00:00Z")));
    // The 01-03 12:00 run was missed while the agent was down.
    let mut opts =
        options(vec![JobSchedule::new("db", cron("0 12 * * *"))], &[("db", "2028-01-02T12:00:00Z")]);
    opts.maintenance_window = Some(MaintenanceWindow::parse("22:00", "02:00").unwrap());
    let h = Harness::start(clock, opts, |_, _| RunOutcome::Success);

    let deferred =
        SchedulerEvent::RunDeferred { job_id: "db".into(), attempt: 1, until: t("2028-01-04T02:00:00Z") };
    assert_eq!(h.event(), deferred);
    h.asleep_until("2028-01-04T02:00:00Z");
    h.set("2028-01-04T02:00:00Z");
    assert_eq!(h.started().attempt, 1);
    h.finished();
    h.asleep_until("2028-01-04T12:00:00Z");
    assert_eq!(h.shutdown(Duration::ZERO).started, 1);
}

#[test]
fn failed_runs_are_retried_after_each_backoff_until_max_attempts() {
    let clock = Arc::new(ManualClock::new(t("2028-01-03T02:59:00Z")));
    let (runs, run) = Runs::new(&["db"], clock.clone());
    let mut job = JobSchedule::new("db", cron("0 3 * * *"));
    job.retry = RetryPolicy { max_attempts: 3, backoff_seconds: vec![30, 120] };
    let h = Harness::start(clock, options(vec![job], &[("db", "2028-01-02T03:00:00Z")]), run);

    h.set("2028-01-03T03:00:00Z");
    let first = h.started();
    runs.release("db", RunOutcome::Failed("connection refused".into()));
    assert_eq!(h.finished(), (first.clone(), RunOutcome::Failed("connection refused".into())));
    let retry =
        SchedulerEvent::RetryScheduled { job_id: "db".into(), attempt: 2, at: t("2028-01-03T03:00:30Z") };
    assert_eq!(h.event(), retry);
    h.asleep_until("2028-01-03T03:00:30Z");
    h.set("2028-01-03T03:00:29Z");
    h.asleep_until("2028-01-03T03:00:30Z");

    h.set("2028-01-03T03:00:30Z");
    let second = h.started();
    assert_eq!((second.attempt, second.scheduled_for, second.manual), (2, t("2028-01-03T03:00:30Z"), false));
    assert_ne!(second.run_id, first.run_id);
    runs.release("db", RunOutcome::Failed("connection refused".into()));
    h.finished();
    let retry =
        SchedulerEvent::RetryScheduled { job_id: "db".into(), attempt: 3, at: t("2028-01-03T03:02:30Z") };
    assert_eq!(h.event(), retry);
    h.asleep_until("2028-01-03T03:02:30Z");

    h.set("2028-01-03T03:02:30Z");
    assert_eq!(h.started().attempt, 3);
    runs.release("db", RunOutcome::Failed("connection refused".into()));
    h.finished();
    // Attempt 3 of 3: no more retries, the next run is tomorrow's.
    h.asleep_until("2028-01-04T03:00:00Z");

    let started_at: Vec<DateTime<Utc>> = (0..3).map(|_| runs.seen().1).collect();
    assert_eq!(started_at, times(&["2028-01-03T03:00:00Z", "2028-01-03T03:00:30Z", "2028-01-03T03:02:30Z"]));
    let summary = h.shutdown(Duration::ZERO);
    assert_eq!((summary.started, summary.failed, summary.retries_scheduled), (3, 3, 2));
}

#[test]
fn a_run_missed_while_down_runs_once_at_start() {
    // Last success two periods ago: 01-02 03:00 and 01-03 03:00 were both missed.
    let clock = Arc::new(ManualClock::new(t("2028-01-03T04:00:00Z")));
    let jobs = vec![JobSchedule::new("nightly", cron("0 3 * * *"))];
    let h = Harness::start(clock, options(jobs, &[("nightly", "2028-01-01T03:00:00Z")]), |_, _| {
        RunOutcome::Success
    });

    let run = h.started();
    assert_eq!((run.scheduled_for, run.attempt, run.manual), (t("2028-01-03T04:00:00Z"), 1, false));
    assert_eq!(h.finished().1, RunOutcome::Success);
    h.asleep_until("2028-01-04T03:00:00Z");
    assert_eq!(h.shutdown(Duration::ZERO).started, 1);
}

#[test]
fn a_recent_success_means_no_catch_up() {
    let clock = Arc::new(ManualClock::new(t("2028-01-03T04:00:00Z")));
    let jobs = vec![JobSchedule::new("nightly", cron("0 3 * * *"))];
    let h = Harness::start(clock, options(jobs, &[("nightly", "2028-01-03T03:00:05Z")]), |_, _| {
        RunOutcome::Success
    });

    h.asleep_until("2028-01-04T03:00:00Z");
    assert_eq!(h.shutdown(Duration::ZERO).started, 0);
}

#[test]
fn a_job_with_no_history_waits_for_its_first_fire_time() {
    // Issue 17: on first start, a nightly job must not run at 04:00 because it has no
    // record; it runs at its first fire, 03:00 the next day.
    let clock = Arc::new(ManualClock::new(t("2028-01-03T04:00:00Z")));
    let jobs = vec![JobSchedule::new("new", cron("0 3 * * *"))];
    let h = Harness::start(clock, options(jobs, &[]), |_, _| RunOutcome::Success);

    h.asleep_until("2028-01-04T03:00:00Z");
    h.set("2028-01-04T03:00:00Z");
    assert_eq!(h.started().scheduled_for, t("2028-01-04T03:00:00Z"));
    h.finished();
    assert_eq!(h.shutdown(Duration::ZERO).started, 1);
}

#[test]
fn run_on_start_runs_a_job_at_every_start_whatever_its_history() {
    let clock = Arc::new(ManualClock::new(t("2028-01-03T04:00:00Z")));
    let mut fresh = JobSchedule::new("fresh", cron("0 3 * * *"));
    fresh.run_on_start = true;
    let mut recent = JobSchedule::new("recent", cron("0 3 * * *"));
    recent.run_on_start = true;
    let opts = options(vec![fresh, recent], &[("recent", "2028-01-03T03:00:05Z")]);
    let h = Harness::start(clock, opts, |_, _| RunOutcome::Success);

    let mut started: Vec<String> = (0..2).map(|_| h.started()).map(|r| r.job_id).collect();
    started.sort();
    assert_eq!(started, ["fresh", "recent"]);
    h.finished();
    h.finished();
    h.asleep_until("2028-01-04T03:00:00Z");
    assert_eq!(h.shutdown(Duration::ZERO).started, 2);
}

#[test]
fn a_job_that_never_succeeded_catches_up_from_its_last_recorded_run() {
    let clock = Arc::new(ManualClock::new(t("2028-01-03T04:00:00Z")));
    let jobs = vec![
        JobSchedule::new("missed", cron("0 3 * * *")),
        JobSchedule::new("failed-today", cron("0 3 * * *")),
    ];
    let mut opts = options(jobs, &[]);
    // missed last ran (and failed) the day before yesterday; failed-today at today's 03:00.
    opts.last_run.insert("missed".into(), t("2028-01-01T03:00:00Z"));
    opts.last_run.insert("failed-today".into(), t("2028-01-03T03:00:00Z"));
    let h = Harness::start(clock, opts, |_, _| RunOutcome::Success);

    let run = h.started();
    assert_eq!((run.job_id.as_str(), run.scheduled_for), ("missed", t("2028-01-03T04:00:00Z")));
    h.finished();
    h.asleep_until("2028-01-04T03:00:00Z");
    assert_eq!(h.shutdown(Duration::ZERO).started, 1);
}

#[test]
fn at_most_max_parallel_jobs_run_at_once() {
    let clock = Arc::new(ManualClock::new(t("2028-01-03T04:00:00Z")));
    let (runs, run) = Runs::new(&["a", "b", "c"], clock.clone());
    let jobs = ["a", "b", "c"].iter().map(|id| JobSchedule::new(*id, cron("0 3 * * *"))).collect();
    let long_ago = "2028-01-01T03:00:00Z";
    let mut opts = options(jobs, &[("a", long_ago), ("b", long_ago), ("c", long_ago)]);
    opts.max_parallel_jobs = 2;
    let h = Harness::start(clock, opts, run);

    // All three are due at start; two start, the third waits for a worker.
    assert_eq!(h.started().job_id, "a");
    assert_eq!(h.started().job_id, "b");
    h.asleep_until("2028-01-04T03:00:00Z");

    runs.release("b", RunOutcome::Success);
    assert_eq!(h.finished().0.job_id, "b");
    assert_eq!(h.started().job_id, "c");
    runs.release("a", RunOutcome::Success);
    runs.release("c", RunOutcome::Success);
    h.finished();
    h.finished();

    assert_eq!(runs.peak.load(Ordering::SeqCst), 2);
    let summary = h.shutdown(Duration::ZERO);
    assert_eq!((summary.started, summary.succeeded, summary.skipped_already_running), (3, 3, 0));
}

#[test]
fn a_run_past_its_timeout_is_cancelled_and_fails() {
    let clock = Arc::new(ManualClock::new(t("2028-01-03T10:04:00Z")));
    let (_runs, run) = Runs::new(&["slow"], clock.clone());
    let mut job = JobSchedule::new("slow", cron("*/5 * * * *"));
    job.timeout = Some(Duration::from_secs(30));
    let h = Harness::start(clock, options(vec![job], &[("slow", "2028-01-03T10:00:00Z")]), run);

    h.set("2028-01-03T10:05:00Z");
    let request = h.started();
    h.asleep_until("2028-01-03T10:05:30Z");
    h.set("2028-01-03T10:05:29Z");
    h.asleep_until("2028-01-03T10:05:30Z");

    h.set("2028-01-03T10:05:30Z");
    assert_eq!(h.event(), SchedulerEvent::RunTimedOut { job_id: "slow".into(), run_id: request.run_id });
    assert_eq!(h.finished(), (request, RunOutcome::Failed("timed out after 30s".into())));

    let summary = h.shutdown(Duration::ZERO);
    assert_eq!((summary.timed_out, summary.failed, summary.cancelled), (1, 1, 0));
}

#[test]
fn shutdown_lets_a_short_run_finish_and_cancels_a_long_one_after_the_grace() {
    let clock = Arc::new(ManualClock::new(t("2028-01-03T04:00:00Z")));
    let (runs, run) = Runs::new(&["short", "long"], clock.clone());
    let jobs =
        vec![JobSchedule::new("short", cron("0 3 * * *")), JobSchedule::new("long", cron("0 3 * * *"))];
    let long_ago = "2028-01-01T03:00:00Z";
    let h = Harness::start(clock, options(jobs, &[("short", long_ago), ("long", long_ago)]), run);
    h.started();
    h.started();

    h.send(SchedulerCommand::Shutdown { grace: Duration::from_secs(60) });
    assert_eq!(h.event(), SchedulerEvent::ShutdownStarted { running: 2 });
    h.send(SchedulerCommand::RunNow { job_id: "short".into() });
    assert_eq!(h.skipped().2, SkipReason::ShuttingDown);

    runs.release("short", RunOutcome::Success);
    let (request, outcome) = h.finished();
    assert_eq!((request.job_id.as_str(), outcome), ("short", RunOutcome::Success));
    // The long one gets the rest of the grace period, measured on the scheduler's clock.
    h.asleep_until("2028-01-03T04:01:00Z");

    h.set("2028-01-03T04:01:00Z");
    let (request, outcome) = h.finished();
    assert_eq!((request.job_id.as_str(), outcome), ("long", RunOutcome::Cancelled));
    let summary = h.handle.join();
    assert_eq!((summary.succeeded, summary.cancelled, summary.skipped_shutting_down), (1, 1, 1));
}

#[test]
fn run_now_for_an_unknown_job_is_refused() {
    let clock = Arc::new(ManualClock::new(t("2028-01-03T04:00:00Z")));
    let jobs = vec![JobSchedule::new("a", cron("0 3 * * *"))];
    let h =
        Harness::start(clock, options(jobs, &[("a", "2028-01-03T03:00:00Z")]), |_, _| RunOutcome::Success);
    h.send(SchedulerCommand::RunNow { job_id: "nope".into() });
    assert_eq!(h.skipped(), ("nope".to_string(), t("2028-01-03T04:00:00Z"), SkipReason::UnknownJob));
    assert_eq!(h.shutdown(Duration::ZERO).skipped_unknown_job, 1);
}

#[test]
fn the_system_clock_fires_a_seconds_schedule() {
    let (tx, events) = crossbeam_channel::unbounded();
    let now = SystemClock.now();
    let mut opts = options(vec![JobSchedule::new("tick", cron("* * * * * *"))], &[]);
    opts.last_success.insert("tick".into(), now);
    opts.events = Some(tx);
    let handle = Scheduler::start(opts, |_, _| RunOutcome::Success).unwrap();
    match events.recv_timeout(Duration::from_secs(3)) {
        Ok(SchedulerEvent::RunStarted(request)) => {
            assert!(
                request.scheduled_for > now && request.scheduled_for <= now + chrono::TimeDelta::seconds(2)
            );
        }
        other => panic!("expected a run within 3 s, got {other:?}"),
    }
    let summary = handle.shutdown(Duration::from_secs(5));
    assert!(summary.started >= 1);
}

// ---------------------------------------------------------------- submitted runs
// Connected mode's RunBackups: the same workers, limit and timeouts as cron runs.

/// What a submitted run saw: that it started, why it was cancelled, or that it was
/// dropped before it started.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Started(&'static str),
    Cancelled(&'static str, Option<CancelReason>),
    Dropped(&'static str, SkipReason),
}

/// A submitted run that waits for its gate (or its cancel) and reports what it saw.
struct GatedWork {
    name: &'static str,
    gate: Receiver<RunOutcome>,
    seen: Sender<Seen>,
}

impl Work for GatedWork {
    fn run(self: Box<Self>, cancel: Cancel) -> RunOutcome {
        let _ = self.seen.send(Seen::Started(self.name));
        loop {
            if cancel.is_cancelled() {
                let _ = self.seen.send(Seen::Cancelled(self.name, cancel.reason()));
                return RunOutcome::Cancelled;
            }
            match self.gate.recv_timeout(Duration::from_millis(2)) {
                Ok(outcome) => return outcome,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return RunOutcome::Failed("test ended".into()),
            }
        }
    }

    fn dropped(self: Box<Self>, reason: SkipReason) {
        let _ = self.seen.send(Seen::Dropped(self.name, reason));
    }
}

/// Submits `name` with `timeout`; returns its scheduler id and its gate.
fn submit(
    h: &Harness,
    seen: &Sender<Seen>,
    name: &'static str,
    timeout: Option<Duration>,
) -> (Uuid, Sender<RunOutcome>) {
    let (gate_tx, gate) = crossbeam_channel::unbounded();
    let run_id = Uuid::new_v4();
    let work = Box::new(GatedWork { name, gate, seen: seen.clone() });
    h.send(SchedulerCommand::Submit(Submission { job_id: name.into(), run_id, timeout, work }));
    (run_id, gate_tx)
}

fn next_seen(seen: &Receiver<Seen>) -> Seen {
    seen.recv_timeout(WAIT).unwrap_or_else(|e| panic!("no submitted run reported within {WAIT:?}: {e}"))
}

fn no_cron_jobs(max_parallel: usize) -> SchedulerOptions {
    let mut o = options(Vec::new(), &[]);
    o.max_parallel_jobs = max_parallel;
    o
}

#[test]
fn submitted_runs_wait_for_a_worker_in_order_and_a_cancel_drops_a_queued_one() {
    let clock = Arc::new(ManualClock::new(t("2028-01-03T10:00:00Z")));
    let h = Harness::start(clock, no_cron_jobs(1), |_, _| RunOutcome::Failed("no cron runs here".into()));
    let (seen_tx, seen) = crossbeam_channel::unbounded();
    let (a, gate_a) = submit(&h, &seen_tx, "a", None);
    let (b, _gate_b) = submit(&h, &seen_tx, "b", None);
    let (c, gate_c) = submit(&h, &seen_tx, "c", None);

    assert_eq!(h.started().run_id, a);
    assert_eq!(next_seen(&seen), Seen::Started("a"));
    h.send(SchedulerCommand::CancelRun { run_id: b });
    assert_eq!(next_seen(&seen), Seen::Dropped("b", SkipReason::Cancelled));
    // One worker: c waits for a, and b never runs.
    assert!(seen.try_recv().is_err());

    gate_a.send(RunOutcome::Success).unwrap();
    let (request, outcome) = h.finished();
    assert_eq!((request.run_id, request.manual, outcome), (a, true, RunOutcome::Success));
    assert_eq!(h.started().run_id, c);
    assert_eq!(next_seen(&seen), Seen::Started("c"));
    gate_c.send(RunOutcome::Failed("dump failed".into())).unwrap();
    // A submitted run is never retried.
    assert_eq!(h.finished().1, RunOutcome::Failed("dump failed".into()));
    let summary = h.shutdown(Duration::ZERO);
    assert_eq!((summary.started, summary.succeeded, summary.failed, summary.retries_scheduled), (2, 1, 1, 0));
}

#[test]
fn a_running_submitted_run_is_cancelled_as_requested() {
    let clock = Arc::new(ManualClock::new(t("2028-01-03T10:00:00Z")));
    let h = Harness::start(clock, no_cron_jobs(2), |_, _| RunOutcome::Failed("no cron runs here".into()));
    let (seen_tx, seen) = crossbeam_channel::unbounded();
    let (a, _gate) = submit(&h, &seen_tx, "a", None);
    assert_eq!(h.started().run_id, a);
    assert_eq!(next_seen(&seen), Seen::Started("a"));
    h.send(SchedulerCommand::CancelRun { run_id: a });
    assert_eq!(next_seen(&seen), Seen::Cancelled("a", Some(CancelReason::Requested)));
    assert_eq!(h.finished().1, RunOutcome::Cancelled);
    assert_eq!(h.shutdown(Duration::ZERO).cancelled, 1);
}

#[test]
fn a_submitted_run_past_its_timeout_is_cancelled_as_timed_out() {
    let clock = Arc::new(ManualClock::new(t("2028-01-03T10:00:00Z")));
    let h = Harness::start(clock, no_cron_jobs(2), |_, _| RunOutcome::Failed("no cron runs here".into()));
    let (seen_tx, seen) = crossbeam_channel::unbounded();
    let (a, _gate) = submit(&h, &seen_tx, "a", Some(Duration::from_secs(30)));
    let request = h.started();
    assert_eq!(request.run_id, a);
    h.asleep_until("2028-01-03T10:00:30Z");

    h.set("2028-01-03T10:00:30Z");
    assert_eq!(h.event(), SchedulerEvent::RunTimedOut { job_id: "a".into(), run_id: a });
    assert_eq!(next_seen(&seen), Seen::Started("a"));
    assert_eq!(next_seen(&seen), Seen::Cancelled("a", Some(CancelReason::TimedOut)));
    assert_eq!(h.finished(), (request, RunOutcome::Failed("timed out after 30s".into())));
    assert_eq!(h.shutdown(Duration::ZERO).timed_out, 1);
}

#[test]
fn a_higher_max_parallel_starts_waiting_runs_at_once() {
    let clock = Arc::new(ManualClock::new(t("2028-01-03T10:00:00Z")));
    let h = Harness::start(clock, no_cron_jobs(1), |_, _| RunOutcome::Failed("no cron runs here".into()));
    let (seen_tx, seen) = crossbeam_channel::unbounded();
    let gates: Vec<_> = ["a", "b", "c"].into_iter().map(|n| submit(&h, &seen_tx, n, None).1).collect();
    h.started();
    assert_eq!(next_seen(&seen), Seen::Started("a"));
    h.asleep_until_nothing();

    h.send(SchedulerCommand::SetMaxParallel(3));
    h.started();
    h.started();
    let mut started = vec![next_seen(&seen), next_seen(&seen)];
    started.sort_by_key(|s| format!("{s:?}"));
    assert_eq!(started, vec![Seen::Started("b"), Seen::Started("c")]);
    for gate in gates {
        gate.send(RunOutcome::Success).unwrap();
    }
    for _ in 0..3 {
        assert_eq!(h.finished().1, RunOutcome::Success);
    }
    assert_eq!(h.shutdown(Duration::ZERO).succeeded, 3);
}

#[test]
fn shutdown_drops_queued_submissions_and_cancels_running_ones_as_shutdown() {
    let clock = Arc::new(ManualClock::new(t("2028-01-03T10:00:00Z")));
    let h = Harness::start(clock, no_cron_jobs(1), |_, _| RunOutcome::Failed("no cron runs here".into()));
    let (seen_tx, seen) = crossbeam_channel::unbounded();
    let (_a, _gate_a) = submit(&h, &seen_tx, "a", None);
    let (_b, _gate_b) = submit(&h, &seen_tx, "b", None);
    h.started();
    assert_eq!(next_seen(&seen), Seen::Started("a"));

    h.send(SchedulerCommand::Shutdown { grace: Duration::from_secs(60) });
    assert_eq!(next_seen(&seen), Seen::Dropped("b", SkipReason::ShuttingDown));
    // Submitted during the grace period: dropped at once, never run.
    let (_c, _gate_c) = submit(&h, &seen_tx, "c", None);
    assert_eq!(next_seen(&seen), Seen::Dropped("c", SkipReason::ShuttingDown));

    h.set("2028-01-03T10:01:00Z");
    assert_eq!(next_seen(&seen), Seen::Cancelled("a", Some(CancelReason::Shutdown)));
    let summary = h.handle.join();
    assert_eq!((summary.cancelled, summary.skipped_shutting_down), (1, 2));
}
