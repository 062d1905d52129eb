//! The metrics and health endpoints of a real `backupy-agent run`: one job that succeeds
//! and one that fails; the scrape is parsed as Prometheus text exposition and its values
//! checked against the runs; `/healthz` and `health-check` follow the state directory.

use std::time::{Duration, Instant};

use crate::common::http::{get, value};
use crate::common::*;
use prometheus_parse::Scrape;

fn health_check(addr: &str) -> i32 {
    let mut c = agent();
    c.arg("health-check").env("BACKUPY_METRICS_LISTEN_ADDR", addr);
    run(c).status.code().unwrap_or(-1)
}

#[test]
fn scrape_matches_the_runs_and_healthz_follows_the_state_directory() {
    let dir = tempfile::tempdir().unwrap();
    rusqlite::Connection::open(dir.path().join("app.db"))
        .unwrap()
        .execute_batch("CREATE TABLE t(x);")
        .unwrap();
    let config = dir.path().join("backupy.toml");
    std::fs::write(
        &config,
        r#"state_dir = "./state"
[storage]
dir = "./backups"
[[targets]]
id = "app"
type = "sqlite"
path = "app.db"
[[targets]]
id = "gone"
type = "sqlite"
path = "missing.db"
[[jobs]]
id = "good"
target = "app"
cron = "*/2 * * * * *"
encryption = "none"
compression = "none"
[[jobs]]
id = "bad"
target = "gone"
cron = "*/2 * * * * *"
encryption = "none"
"#,
    )
    .unwrap();
    let (port, _port_claim) = reserve_port();
    let addr = format!("127.0.0.1:{port}");
    let log = dir.path().join("agent.log");
    let mut c = agent();
    c.args(["run", "--config"])
        .arg(&config)
        .env("BACKUPY_METRICS_LISTEN_ADDR", &addr)
        .stderr(std::fs::File::create(&log).unwrap());
    let mut child = c.spawn().unwrap();

    let t0 = Instant::now();
    let scrape = loop {
        let (status, body) = get(&format!("http://{addr}/metrics"));
        if status == 200 {
            let s = Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
            let ok = value(&s, "backupy_agent_jobs_total", &[("job_id", "good"), ("status", "success")])
                .unwrap_or(0.0);
            let bad = value(&s, "backupy_agent_jobs_total", &[("job_id", "bad"), ("status", "failed")])
                .unwrap_or(0.0);
            if ok >= 2.0 && bad >= 1.0 {
                break s;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no runs recorded in the metrics:\n{}",
            log_tail(&log)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let successes =
        value(&scrape, "backupy_agent_jobs_total", &[("job_id", "good"), ("status", "success")]).unwrap();
    for status in ["failed", "cancelled"] {
        // Every job's series exist from the start, at 0 (issue 17).
        assert_eq!(
            value(&scrape, "backupy_agent_jobs_total", &[("job_id", "good"), ("status", status)]),
            Some(0.0),
            "a run of `good` ended {status}; agent log:\n{}",
            log_tail(&log)
        );
    }
    assert_eq!(value(&scrape, "backupy_agent_up", &[]), Some(1.0));
    assert_eq!(
        value(&scrape, "backupy_agent_build_info", &[("version", env!("CARGO_PKG_VERSION"))]),
        Some(1.0)
    );
    assert_eq!(value(&scrape, "backupy_agent_connection_state", &[("state", "standalone")]), Some(1.0));
    assert_eq!(
        value(&scrape, "backupy_agent_jobs_total", &[("job_id", "bad"), ("status", "success")]),
        Some(0.0)
    );
    let last = value(&scrape, "backupy_agent_last_success_timestamp_seconds", &[("job_id", "good")]).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(now - last < 30.0 && last <= now + 1.0, "last success {last}, now {now}");
    assert_eq!(value(&scrape, "backupy_agent_last_success_timestamp_seconds", &[("job_id", "bad")]), None);
    // Every finished run of `good` is one observation of its duration and size.
    assert_eq!(
        value(&scrape, "backupy_agent_backup_duration_seconds", &[("job_id", "good")]),
        Some(successes)
    );
    assert_eq!(value(&scrape, "backupy_agent_backup_size_bytes", &[("job_id", "good")]), Some(successes));
    // Unencrypted, uncompressed: every object is the database file itself.
    let db_size = std::fs::metadata(dir.path().join("app.db")).unwrap().len() as f64;
    assert_eq!(value(&scrape, "backupy_agent_bytes_uploaded_total", &[]), Some(successes * db_size));
    assert!(value(&scrape, "process_resident_memory_bytes", &[]).unwrap() > 0.0, "process collector");

    assert_eq!(get(&format!("http://{addr}/healthz")).0, 200);
    assert_eq!(get(&format!("http://{addr}/readyz")).0, 200);
    assert_eq!(health_check(&addr), 0);
    // The state directory stops being writable: replace it by a plain file.
    std::fs::rename(dir.path().join("state"), dir.path().join("state.moved")).unwrap();
    std::fs::write(dir.path().join("state"), "not a directory").unwrap();
    assert_eq!(get(&format!("http://{addr}/healthz")).0, 503);
    assert_eq!(health_check(&addr), 1);

    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t1 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t1.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("agent did not stop");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A run is recorded in several metrics one after another; a scrape taken meanwhile must
/// still show it in all of them or in none (the end-to-end test above once saw a third
/// duration observation beside two counted successes).
#[test]
fn a_scrape_shows_whole_runs_while_runs_are_recorded() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let metrics = backupy_agent::metrics::Metrics::new().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let recorder = {
        let (metrics, stop) = (metrics.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut runs = 0u64;
            while !stop.load(Ordering::SeqCst) {
                metrics.record_run("j", "success", Duration::from_millis(5), Some(10));
                runs += 1;
            }
            runs
        })
    };
    let t0 = Instant::now();
    let mut scrapes = 0;
    while t0.elapsed() < Duration::from_secs(1) {
        let body = metrics.render();
        let s = Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
        let runs =
            value(&s, "backupy_agent_jobs_total", &[("job_id", "j"), ("status", "success")]).unwrap_or(0.0);
        let durations = value(&s, "backupy_agent_backup_duration_seconds", &[("job_id", "j")]).unwrap_or(0.0);
        let sizes = value(&s, "backupy_agent_backup_size_bytes", &[("job_id", "j")]).unwrap_or(0.0);
        let bytes = value(&s, "backupy_agent_bytes_uploaded_total", &[]).unwrap_or(0.0);
        assert_eq!((durations, sizes, bytes), (runs, runs, runs * 10.0), "scrape {scrapes}");
        scrapes += 1;
    }
    stop.store(true, Ordering::SeqCst);
    let runs = recorder.join().unwrap();
    assert!(runs > 100 && scrapes > 10, "{runs} runs recorded, {scrapes} scrapes: too few to prove anything");
}
