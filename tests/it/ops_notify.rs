//! Issue 17, defects 6, 11 and 12, against a local HTTP receiver: a `notify_url` with a
//! query gets `/start` and `/fail` in its path with the query kept; the webhook payload
//! carries host, agent version, start and end (RFC 3339 UTC) and, under `run`, the
//! health probes' state.

use std::time::{Duration, Instant};

use crate::common::http::receiver;
use crate::common::*;
use crate::ops_metrics::Agent;

fn config(dir: &std::path::Path, head: &str, jobs: &str) -> std::path::PathBuf {
    rusqlite::Connection::open(dir.join("app.db")).unwrap().execute_batch("CREATE TABLE t(x);").unwrap();
    let p = dir.join("backupy.toml");
    std::fs::write(
        &p,
        format!(
            "{head}[storage]\ndir = \"./backups\"\n[[targets]]\nid = \"app\"\ntype = \"sqlite\"\npath = \"app.db\"\n\
             [[targets]]\nid = \"gone\"\ntype = \"sqlite\"\npath = \"missing.db\"\n{jobs}"
        ),
    )
    .unwrap();
    p
}

fn rfc3339_utc(v: &serde_json::Value) -> chrono::DateTime<chrono::Utc> {
    let s = v.as_str().unwrap_or_else(|| panic!("not a string: {v}"));
    assert!(s.ends_with('Z'), "not UTC: {s}");
    chrono::DateTime::parse_from_rfc3339(s).unwrap_or_else(|e| panic!("{s}: {e}")).with_timezone(&chrono::Utc)
}

#[test]
fn pings_keep_the_query_after_start_and_fail_and_the_webhook_says_host_version_and_times() {
    let (base, seen) = receiver();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        "",
        &format!(
            "[[jobs]]\nid = \"good\"\ntarget = \"app\"\nencryption = \"none\"\nnotify_url = \"{base}/ping/good?k=1&rid=a%2Fb\"\n\
             webhook_url = \"{base}/hook?token=t\"\nwebhook_on = \"always\"\n\
             [[jobs]]\nid = \"bad\"\ntarget = \"gone\"\nencryption = \"none\"\nnotify_url = \"{base}/ping/bad/?k=2\"\n\
             webhook_url = \"{base}/hook?token=t\"\n"
        ),
    );
    let t0 = chrono::Utc::now() - chrono::Duration::seconds(1);
    let mut c = agent();
    c.args(["backup", "--config"]).arg(&cfg);
    let out = run(c);
    let t1 = chrono::Utc::now() + chrono::Duration::seconds(1);
    assert_eq!(out.status.code(), Some(1), "the failing job fails the command: {}", text(&out.stderr));
    let seen = seen.lock().unwrap().clone();
    let calls: Vec<(&str, &str)> = seen.iter().map(|(m, u, _)| (m.as_str(), u.as_str())).collect();
    assert_eq!(
        calls,
        vec![
            ("GET", "/ping/good/start?k=1&rid=a%2Fb"),
            ("GET", "/ping/good?k=1&rid=a%2Fb"),
            ("POST", "/hook?token=t"),
            ("GET", "/ping/bad/start?k=2"),
            ("GET", "/ping/bad/fail?k=2"),
            ("POST", "/hook?token=t"),
        ]
    );
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
    for (i, status) in [(2, "success"), (5, "failed")] {
        let body: serde_json::Value = serde_json::from_str(&seen[i].2).unwrap();
        assert_eq!(body["status"], status, "{body}");
        assert_eq!(body["host"], host.as_str(), "{body}");
        assert_eq!(body["agent_version"], env!("CARGO_PKG_VERSION"), "{body}");
        let (started, finished) = (rfc3339_utc(&body["started_at"]), rfc3339_utc(&body["finished_at"]));
        assert!(t0 <= started && started <= finished && finished <= t1, "{body}");
        // `backup` runs no health probes: the list is there, empty.
        assert_eq!(body["health_checks"], serde_json::json!([]), "{body}");
    }
}

#[test]
fn under_run_the_webhook_carries_the_state_of_the_health_probes() {
    let (base, seen) = receiver();
    let (closed, _claim) = reserve_port();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        "state_dir = \"./state\"\n",
        &format!(
            "[[jobs]]\nid = \"bad\"\ntarget = \"gone\"\ncron = \"*/2 * * * * *\"\nencryption = \"none\"\nwebhook_url = \"{base}/hook\"\n\
             [[health_checks]]\nid = \"db-port\"\ntype = \"tcp\"\ntarget = \"127.0.0.1:{closed}\"\ninterval_sec = 1\n"
        ),
    );
    let a = Agent::start(&cfg, &dir.path().join("agent.log"), &[]);
    let t0 = Instant::now();
    let body = loop {
        let bodies: Vec<serde_json::Value> = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(m, _, _)| m == "POST")
            .map(|(_, _, b)| serde_json::from_str(b).unwrap())
            .collect();
        if let Some(b) = bodies.into_iter().find(|b| b["health_checks"][0]["state"] == "down") {
            break b;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no webhook with the probe down: {:?}\n{}",
            seen.lock().unwrap(),
            log_tail(&a.log)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    a.stop();
    let check = &body["health_checks"][0];
    assert_eq!(check["id"], "db-port", "{body}");
    rfc3339_utc(&check["since"]);
    assert!(check["error"].as_str().unwrap().contains(&closed.to_string()), "{body}");
    assert_eq!(body["health_checks"].as_array().unwrap().len(), 1);
}
