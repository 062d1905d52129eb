//! Issue 17, defect 5, against the real `backupy-agent run`: on a first start (no history
//! in `state.db`) a job waits for its first fire time instead of running at once, and
//! `run_on_start = true` runs a job at start.

use std::time::{Duration, Instant};

use crate::common::*;
use crate::ops_metrics::{Agent, value};

#[test]
fn on_first_start_a_job_waits_for_its_fire_time_and_run_on_start_runs_at_once() {
    let dir = tempfile::tempdir().unwrap();
    rusqlite::Connection::open(dir.path().join("app.db"))
        .unwrap()
        .execute_batch("CREATE TABLE t(x);")
        .unwrap();
    // Twelve hours from now: nothing fires while the test runs.
    let hour = (chrono::Utc::now() + chrono::Duration::hours(12)).format("%H").to_string();
    let cron = format!("0 {} * * *", hour.trim_start_matches('0').parse::<u32>().unwrap_or(0));
    let cfg = dir.path().join("backupy.toml");
    // One worker, nightly first: were nightly to run at start, it would run before eager.
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"./state\"\nmax_parallel_jobs = 1\n[storage]\ndir = \"./backups\"\n\
             [[targets]]\nid = \"app\"\ntype = \"sqlite\"\npath = \"app.db\"\n\
             [[jobs]]\nid = \"nightly\"\ntarget = \"app\"\ncron = \"{cron}\"\nencryption = \"none\"\n\
             [[jobs]]\nid = \"eager\"\ntarget = \"app\"\ncron = \"{cron}\"\nencryption = \"none\"\nrun_on_start = true\n"
        ),
    )
    .unwrap();
    let log = dir.path().join("agent.log");
    let mut a = Agent::start(&cfg, &log, &[]);
    let s = a.scrape_until("the run of eager", |s| {
        value(s, "backupy_agent_jobs_total", &[("job_id", "eager"), ("status", "success")]).unwrap_or(0.0)
            >= 1.0
    });
    for status in ["success", "failed", "cancelled"] {
        assert_eq!(
            value(&s, "backupy_agent_jobs_total", &[("job_id", "nightly"), ("status", status)])
                .unwrap_or(0.0),
            0.0,
            "nightly ran at first start:\n{}",
            log_tail(&log)
        );
    }
    let db = dir.path().join("state/state.db");
    assert_eq!(sqlite3(&db, "SELECT count(*) FROM runs WHERE job_id = 'nightly'"), "0");
    assert_eq!(sqlite3(&db, "SELECT count(*) FROM runs WHERE job_id = 'eager'"), "1");
    let text = a.stop();
    assert!(text.contains("job nightly: no run on record; its first run is due at"), "{text}");
    let stored = files_under(&dir.path().join("backups"));
    assert!(stored.iter().all(|f| f.starts_with("app/eager/")), "{stored:?}");

    // Second start: eager runs again (run_on_start), nightly still waits (it has no
    // history, and nothing was missed).
    let mut b = Agent::start(&cfg, &dir.path().join("second.log"), &[]);
    b.scrape_until("the second run of eager", |s| {
        value(s, "backupy_agent_jobs_total", &[("job_id", "eager"), ("status", "success")]).unwrap_or(0.0)
            >= 1.0
    });
    let t0 = Instant::now();
    while sqlite3(&db, "SELECT count(*) FROM runs WHERE job_id = 'eager'") != "2" {
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(sqlite3(&db, "SELECT count(*) FROM runs WHERE job_id = 'nightly'"), "0");
    b.stop();
}

#[test]
fn run_on_start_must_be_a_boolean() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("backupy.toml");
    std::fs::write(
        &cfg,
        "[storage]\ndir = \"./b\"\n[[targets]]\nid = \"app\"\ntype = \"sqlite\"\npath = \"app.db\"\n\
         [[jobs]]\nid = \"j\"\ntarget = \"app\"\ncron = \"0 3 * * *\"\nencryption = \"none\"\nrun_on_start = \"yes\"\n",
    )
    .unwrap();
    let mut c = agent();
    c.arg("check-config").arg(&cfg);
    let out = run(c);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains(":12:") && err.contains("bool"), "{err}");
}
