//! Issue 17, against the real `backupy-agent run`: the metrics an operator's alerts read
//! survive a restart (restored from `state.db`) and exist at 0 from the start; `/readyz`
//! turns 503 as soon as a shutdown begins; the health probes log a change of state once
//! and show their state in `/readyz`'s body.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

pub use crate::common::http::{get, value};
use crate::common::*;
use prometheus_parse::Scrape;

/// A `run` of `config` with its metrics on a port of its own and its stderr in `log`.
pub struct Agent {
    pub child: Child,
    pub addr: String,
    pub log: PathBuf,
    _port: PortClaim,
}

impl Agent {
    pub fn start(config: &Path, log: &Path, env: &[(&str, &str)]) -> Agent {
        let (port, claim) = reserve_port();
        let addr = format!("127.0.0.1:{port}");
        let mut c = agent();
        c.args(["run", "--config"])
            .arg(config)
            .env("BACKUPY_METRICS_LISTEN_ADDR", &addr)
            .stderr(std::fs::File::create(log).unwrap());
        for (k, v) in env {
            c.env(k, v);
        }
        Agent { child: c.spawn().unwrap(), addr, log: log.to_path_buf(), _port: claim }
    }

    /// Waits until `done` holds for a scrape of /metrics, and returns that scrape.
    pub fn scrape_until(&mut self, what: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
        let t0 = Instant::now();
        loop {
            let (status, body) = get(&format!("http://{}/metrics", self.addr));
            if status == 200 {
                let s = Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
                if done(&s) {
                    return s;
                }
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the agent exited ({status}) before {what}:\n{}", log_tail(&self.log));
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "no {what} within 30 s:\n{}",
                log_tail(&self.log)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// SIGTERM (twice: no grace), then waits for the exit.
    pub fn stop(mut self) -> String {
        self.signal(libc::SIGTERM);
        std::thread::sleep(Duration::from_millis(50));
        self.signal(libc::SIGTERM);
        let t0 = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            if t0.elapsed() > Duration::from_secs(20) {
                let _ = self.child.kill();
                panic!("the agent did not stop:\n{}", log_tail(&self.log));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::fs::read_to_string(&self.log).unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(dir: &Path, cron: &str, extra: &str) -> PathBuf {
    rusqlite::Connection::open(dir.join("app.db"))
        .unwrap()
        .execute_batch("CREATE TABLE IF NOT EXISTS t(x);")
        .unwrap();
    let p = dir.join("backupy.toml");
    std::fs::write(
        &p,
        format!(
            "state_dir = \"./state\"\nshutdown_grace_sec = 60\n[storage]\ndir = \"./backups\"\n\
             [[targets]]\nid = \"app\"\ntype = \"sqlite\"\npath = \"app.db\"\n\
             [[targets]]\nid = \"gone\"\ntype = \"sqlite\"\npath = \"missing.db\"\n\
             [[jobs]]\nid = \"good\"\ntarget = \"app\"\ncron = \"{cron}\"\nencryption = \"none\"\n\
             [[jobs]]\nid = \"bad\"\ntarget = \"gone\"\ncron = \"{cron}\"\nencryption = \"none\"\n{extra}"
        ),
    )
    .unwrap();
    p
}

const STATUSES: [&str; 3] = ["success", "failed", "cancelled"];

#[test]
fn after_a_restart_the_last_success_failure_and_status_come_back_from_the_state_database() {
    let dir = tempfile::tempdir().unwrap();
    // First life: both jobs run every second until each has finished a run.
    let cfg = config(dir.path(), "* * * * * *", "");
    let mut first = Agent::start(&cfg, &dir.path().join("first.log"), &[]);
    let before = first.scrape_until("a success of good and a failure of bad", |s| {
        value(s, "backupy_agent_jobs_total", &[("job_id", "good"), ("status", "success")]).unwrap_or(0.0)
            >= 1.0
            && value(s, "backupy_agent_jobs_total", &[("job_id", "bad"), ("status", "failed")]).unwrap_or(0.0)
                >= 1.0
    });
    first.stop();
    // The state database holds the truth the second life must show.
    let db = dir.path().join("state/state.db");
    let last = |job: &str, status: &str| -> f64 {
        let at = sqlite3(
            &db,
            &format!(
                "SELECT max(coalesce(finished_at, started_at)) FROM runs WHERE job_id = '{job}' AND status = '{status}'"
            ),
        );
        chrono::DateTime::parse_from_rfc3339(&at).unwrap_or_else(|e| panic!("{at:?}: {e}")).timestamp_millis()
            as f64
            / 1000.0
    };
    let (good_success, bad_failure) = (last("good", "success"), last("bad", "failed"));
    let scraped_success =
        value(&before, "backupy_agent_last_success_timestamp_seconds", &[("job_id", "good")]).unwrap();
    assert!(scraped_success <= good_success + 1.0);

    // Second life: nothing is due for months, so every value comes from state.db.
    let cfg = config(dir.path(), "0 0 1 1 *", "");
    let log = dir.path().join("second.log");
    let mut second = Agent::start(&cfg, &log, &[]);
    let s = second.scrape_until("the endpoint", |_| true);
    let close = |got: Option<f64>, want: f64, what: &str| {
        let got = got.unwrap_or_else(|| panic!("{what} is missing after the restart:\n{}", log_tail(&log)));
        assert!((got - want).abs() < 0.01, "{what}: {got}, state.db says {want}");
    };
    close(
        value(&s, "backupy_agent_last_success_timestamp_seconds", &[("job_id", "good")]),
        good_success,
        "last success of good",
    );
    close(
        value(&s, "backupy_agent_last_failure_timestamp_seconds", &[("job_id", "bad")]),
        bad_failure,
        "last failure of bad",
    );
    assert_eq!(value(&s, "backupy_agent_last_run_success", &[("job_id", "bad")]), Some(0.0));
    assert_eq!(
        sqlite3(&db, "SELECT count(*) FROM runs WHERE job_id = 'good' AND status = 'failed'"),
        "0",
        "no run of good failed"
    );
    assert_eq!(value(&s, "backupy_agent_last_run_success", &[("job_id", "good")]), Some(1.0));
    assert_eq!(value(&s, "backupy_agent_last_success_timestamp_seconds", &[("job_id", "bad")]), None);
    // Every job's counters exist at 0 from the start: the first failure is a rise.
    for job in ["good", "bad"] {
        for status in STATUSES {
            assert_eq!(
                value(&s, "backupy_agent_jobs_total", &[("job_id", job), ("status", status)]),
                Some(0.0),
                "jobs_total{{{job},{status}}} after the restart"
            );
        }
    }
    second.stop();
}

#[test]
fn a_new_job_has_its_counters_at_zero_and_its_first_failure_sets_last_run_success_to_zero() {
    let dir = tempfile::tempdir().unwrap();
    // Due for months: nothing runs, the series must exist anyway.
    let cfg = config(dir.path(), "0 0 1 1 *", "");
    let mut a = Agent::start(&cfg, &dir.path().join("a.log"), &[]);
    let s = a.scrape_until("the endpoint", |_| true);
    for job in ["good", "bad"] {
        for status in STATUSES {
            assert_eq!(
                value(&s, "backupy_agent_jobs_total", &[("job_id", job), ("status", status)]),
                Some(0.0),
                "jobs_total{{{job},{status}}} at start:\n{}",
                log_tail(&a.log)
            );
        }
        // No run yet: no success, no failure, no last-run status to alert on.
        assert_eq!(value(&s, "backupy_agent_last_run_success", &[("job_id", job)]), None);
    }
    a.stop();

    let cfg = config(dir.path(), "* * * * * *", "");
    let mut b = Agent::start(&cfg, &dir.path().join("b.log"), &[]);
    let s = b.scrape_until("the first failure of bad", |s| {
        value(s, "backupy_agent_jobs_total", &[("job_id", "bad"), ("status", "failed")]).unwrap_or(0.0) >= 1.0
    });
    assert_eq!(value(&s, "backupy_agent_last_run_success", &[("job_id", "bad")]), Some(0.0));
    let s = b.scrape_until("a success of good", |s| {
        value(s, "backupy_agent_last_run_success", &[("job_id", "good")]).is_some()
    });
    assert_eq!(value(&s, "backupy_agent_last_run_success", &[("job_id", "good")]), Some(1.0));
    b.stop();
}

#[test]
fn readyz_turns_503_as_soon_as_the_shutdown_starts_while_a_run_still_has_its_grace() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("hook-started");
    let cfg = config(
        dir.path(),
        "0 0 1 1 *",
        &format!(
            "[[jobs]]\nid = \"slow\"\ntarget = \"app\"\ncron = \"* * * * * *\"\nencryption = \"none\"\n\
             pre_hooks = [\"touch {}; sleep 60\"]\n",
            marker.display()
        ),
    );
    let mut a = Agent::start(&cfg, &dir.path().join("agent.log"), &[]);
    a.scrape_until("the endpoint", |_| true);
    let t0 = Instant::now();
    while !marker.exists() {
        assert!(t0.elapsed() < Duration::from_secs(20), "the slow run never started:\n{}", log_tail(&a.log));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(get(&format!("http://{}/readyz", a.addr)).0, 200, "{}", log_tail(&a.log));

    a.signal(libc::SIGTERM);
    let t1 = Instant::now();
    loop {
        let (status, body) = get(&format!("http://{}/readyz", a.addr));
        if status == 503 {
            assert!(body.starts_with("not ready"), "{body}");
            break;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(5),
            "/readyz still {status} {} s into a 60 s grace:\n{}",
            t1.elapsed().as_secs(),
            log_tail(&a.log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(a.child.try_wait().unwrap().is_none(), "the agent is still in its grace period");
    // /healthz is about the process, not about new runs: still 200.
    assert_eq!(get(&format!("http://{}/healthz", a.addr)).0, 200);
    a.stop();
}

#[test]
fn a_failing_probe_is_logged_once_and_its_state_is_in_the_readyz_body() {
    let dir = tempfile::tempdir().unwrap();
    let (port, _claim) = reserve_port();
    let cfg = config(
        dir.path(),
        "0 0 1 1 *",
        &format!(
            "[[health_checks]]\nid = \"db-port\"\ntype = \"tcp\"\ntarget = \"127.0.0.1:{port}\"\ninterval_sec = 1\ntimeout_sec = 1\n"
        ),
    );
    let log = dir.path().join("agent.log");
    let mut a = Agent::start(&cfg, &log, &[]);
    // Five failed probes.
    a.scrape_until("five probes of db-port", |s| {
        value(s, "backupy_agent_health_check_duration_seconds", &[("check_id", "db-port")]).unwrap_or(0.0)
            >= 5.0
    });
    let (status, body) = get(&format!("http://{}/readyz", a.addr));
    assert_eq!(status, 200, "a failing probe does not make the agent unready: {body}");
    let line =
        body.lines().find(|l| l.starts_with("health_check db-port ")).unwrap_or_else(|| panic!("{body}"));
    assert!(line.contains(" down since ") && line.contains(&port.to_string()), "{body}");
    let mentions = |log: &str| log.lines().filter(|l| l.contains("health check db-port")).count();
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(mentions(&text), 1, "one line for the change to down, not one per probe:\n{text}");

    // The port opens: one line for the change back to up.
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let t0 = Instant::now();
    loop {
        let body = get(&format!("http://{}/readyz", a.addr)).1;
        if body.lines().any(|l| l.starts_with("health_check db-port up since ")) {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "db-port never came up: {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
    a.scrape_until("three more probes", |s| {
        value(s, "backupy_agent_health_check_duration_seconds", &[("check_id", "db-port")]).unwrap_or(0.0)
            >= 8.0
    });
    drop(listener);
    let text = a.stop();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("health check db-port")).collect();
    assert!(lines.len() >= 2 && lines[1].contains("up again"), "{lines:#?}");
    // Closing the listener may have been seen as a third change (down), never more.
    assert!(lines.len() <= 3, "{lines:#?}");
}
