//! Standalone notifications against a local HTTP server: dead-man's-switch pings on
//! start, success and failure, the webhook body of a failing job, and an unreachable
//! webhook that does not fail the backup.

use crate::common::http::receiver as server;
use crate::common::*;

fn config(dir: &std::path::Path, jobs: &str) -> std::path::PathBuf {
    rusqlite::Connection::open(dir.join("app.db")).unwrap().execute_batch("CREATE TABLE t(x);").unwrap();
    let p = dir.join("backupy.toml");
    std::fs::write(
        &p,
        format!(
            "[storage]\ndir = \"./backups\"\n[[targets]]\nid = \"app\"\ntype = \"sqlite\"\npath = \"app.db\"\n\
             [[targets]]\nid = \"gone\"\ntype = \"sqlite\"\npath = \"missing.db\"\n{jobs}"
        ),
    )
    .unwrap();
    p
}

#[test]
fn pings_mark_start_success_and_failure_and_the_webhook_describes_the_failure() {
    let (base, seen) = server();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &format!(
            "[[jobs]]\nid = \"good\"\ntarget = \"app\"\nencryption = \"none\"\nnotify_url = \"{base}/ping/good\"\nwebhook_url = \"{base}/hook\"\n\
             [[jobs]]\nid = \"bad\"\ntarget = \"gone\"\nencryption = \"none\"\nnotify_url = \"{base}/ping/bad\"\nwebhook_url = \"{base}/hook\"\n"
        ),
    );
    let mut c = agent();
    c.args(["backup", "--config"]).arg(&cfg);
    let out = run(c);
    assert_eq!(out.status.code(), Some(1), "the failing job fails the command");
    let seen = seen.lock().unwrap().clone();
    let calls: Vec<(String, String)> = seen.iter().map(|(m, u, _)| (m.clone(), u.clone())).collect();
    let get = |u: &str| ("GET".to_string(), u.to_string());
    assert_eq!(
        calls,
        vec![
            get("/ping/good/start"),
            get("/ping/good"),
            get("/ping/bad/start"),
            get("/ping/bad/fail"),
            ("POST".into(), "/hook".into())
        ]
    );
    let body: serde_json::Value = serde_json::from_str(&seen[4].2).unwrap();
    assert_eq!(body["job"], "bad");
    assert_eq!(body["target"], "gone");
    assert_eq!(body["status"], "failed");
    assert!(body["error"].as_str().unwrap().contains("does not exist"), "{body}");
    assert!(body["run_id"].as_str().unwrap().len() >= 32);
    assert!(body["duration_seconds"].is_number());
}

#[test]
fn an_unreachable_webhook_does_not_fail_the_backup() {
    let (closed, _closed_claim) = reserve_port();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &format!(
            "[[jobs]]\nid = \"good\"\ntarget = \"app\"\nencryption = \"none\"\nwebhook_url = \"http://127.0.0.1:{closed}/hook\"\nwebhook_on = \"always\"\n"
        ),
    );
    let mut c = agent();
    c.args(["backup", "--config"]).arg(&cfg);
    let out = run(c);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("notification POST"),
        "the failure is reported: {}",
        text(&out.stderr)
    );
    assert_eq!(files_under(&dir.path().join("backups")).len(), 2, "object and manifest stored");
}
