//! Issue 17, defect 7, against the real binaries: with `BACKUPY_LOG_FORMAT=json` every
//! line on stderr is one JSON object — config errors, usage errors, a failed `backup`,
//! `health-check` — each failure is one line, and a hook's multi-line output stays inside
//! one line's `message`.

use std::process::Output;

use crate::common::*;
use crate::ops_metrics::{Agent, value};

/// Every stderr line parsed as a JSON object with the four fields.
fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    json_text(&text(&out.stderr))
}

fn json_text(err: &str) -> Vec<serde_json::Value> {
    assert!(!err.trim().is_empty(), "nothing on stderr");
    err.lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not one JSON object ({e}): {line}\n{err}"));
            for field in ["ts", "level", "module", "message"] {
                assert!(v[field].is_string(), "no {field}: {line}");
            }
            v
        })
        .collect()
}

fn json_agent() -> std::process::Command {
    let mut c = agent();
    c.env("BACKUPY_LOG_FORMAT", "json");
    c
}

fn sqlite_config(dir: &std::path::Path, jobs: &str) -> std::path::PathBuf {
    rusqlite::Connection::open(dir.join("app.db")).unwrap().execute_batch("CREATE TABLE t(x);").unwrap();
    let p = dir.join("backupy.toml");
    std::fs::write(
        &p,
        format!(
            "state_dir = \"./state\"\n[storage]\ndir = \"./backups\"\n\
             [[targets]]\nid = \"app\"\ntype = \"sqlite\"\npath = \"app.db\"\n\
             [[targets]]\nid = \"gone\"\ntype = \"sqlite\"\npath = \"missing.db\"\n{jobs}"
        ),
    )
    .unwrap();
    p
}

#[test]
fn config_and_usage_errors_are_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[storage]\ndir = \"b\"\n[[jobs]]\nid = \"j\"\ntarget = \"nowhere\"\n").unwrap();
    for args in [vec!["check-config"], vec!["backup", "--config"], vec!["run", "--config"]] {
        let mut c = json_agent();
        c.args(&args).arg(&cfg);
        let out = run(c);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let lines = json_lines(&out);
        let errors: Vec<_> = lines.iter().filter(|l| l["level"] == "ERROR").collect();
        assert_eq!(errors.len(), 1, "{args:?}: {lines:?}");
        assert!(errors[0]["message"].as_str().unwrap().contains("nowhere"), "{args:?}: {lines:?}");
    }
    // A usage error (clap's) keeps its exit code 2 and is a JSON line too.
    let mut c = json_agent();
    c.args(["backup", "--no-such-flag"]);
    let out = run(c);
    assert_eq!(out.status.code(), Some(2));
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0]["message"].as_str().unwrap().contains("--no-such-flag"), "{lines:?}");
    let mut c = crate::common::decrypt();
    c.env("BACKUPY_LOG_FORMAT", "json").args(["--in", "x"]);
    let out = run(c);
    assert_eq!(out.status.code(), Some(2));
    json_lines(&out);
}

#[test]
fn health_check_errors_are_json_lines() {
    let (port, _claim) = reserve_port();
    let mut c = json_agent();
    c.arg("health-check").env("BACKUPY_METRICS_LISTEN_ADDR", format!("127.0.0.1:{port}"));
    let out = run(c);
    assert_eq!(out.status.code(), Some(1));
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0]["message"].as_str().unwrap().contains("/healthz"), "{lines:?}");
}

#[test]
fn a_failed_backup_is_one_json_line_with_the_hooks_output_inside_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = sqlite_config(
        dir.path(),
        "[[jobs]]\nid = \"hooked\"\ntarget = \"app\"\nencryption = \"none\"\n\
         pre_hooks = [\"printf 'first line\\\\nsecond line\\\\n{\\\"level\\\":\\\"FAKE\\\"}\\\\n' >&2; exit 3\"]\n",
    );
    let mut c = json_agent();
    c.args(["backup", "--config"]).arg(&cfg);
    let out = run(c);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let lines = json_lines(&out);
    assert!(
        lines.iter().all(|l| l["level"] != "FAKE"),
        "the hook's output made a line of its own: {lines:?}"
    );
    // The output has real line breaks; the command itself (logged as the hook starts)
    // shows them escaped.
    let failures: Vec<&str> =
        lines.iter().filter_map(|l| l["message"].as_str()).filter(|m| m.contains("did not start")).collect();
    assert_eq!(failures.len(), 1, "one line for the failure: {lines:?}");
    assert!(failures[0].contains("first line\nsecond line\n{\"level\":\"FAKE\"}"), "{failures:?}");
    let with_output =
        lines.iter().filter_map(|l| l["message"].as_str()).filter(|m| m.contains("second line\n"));
    assert_eq!(with_output.count(), 1, "{lines:?}");
}

#[test]
fn under_run_each_failed_run_is_logged_once() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = sqlite_config(
        dir.path(),
        "[[jobs]]\nid = \"bad\"\ntarget = \"gone\"\ncron = \"* * * * * *\"\nencryption = \"none\"\n",
    );
    let log = dir.path().join("agent.log");
    let mut a = Agent::start(&cfg, &log, &[("BACKUPY_LOG_FORMAT", "json")]);
    a.scrape_until("three failures", |s| {
        value(s, "backupy_agent_jobs_total", &[("job_id", "bad"), ("status", "failed")]).unwrap_or(0.0) >= 3.0
    });
    drop(a.stop());
    let lines = json_text(&std::fs::read_to_string(&log).unwrap());
    let db = dir.path().join("state/state.db");
    let failed: usize =
        sqlite3(&db, "SELECT count(*) FROM runs WHERE job_id = 'bad' AND status = 'failed'").parse().unwrap();
    let logged =
        lines.iter().filter_map(|l| l["message"].as_str()).filter(|m| m.contains("missing.db")).count();
    assert!(failed >= 3);
    assert_eq!(logged, failed, "one line per failed run: {lines:#?}");
}
