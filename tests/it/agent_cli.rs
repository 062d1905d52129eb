//! `backupy-agent` through the real binary: configuration refusals name file, line and
//! reason; bad targets and storage fail with one clear line and leave nothing behind.

use std::path::Path;

use crate::common::*;

fn write_config(dir: &Path, body: &str) -> std::path::PathBuf {
    let p = dir.join("backupy.toml");
    std::fs::write(&p, body).unwrap();
    p
}

fn backup(config: &Path) -> std::process::Output {
    let mut c = agent();
    c.args(["backup", "--config"]).arg(config);
    run(c)
}

/// Runs `backup` and returns stderr, asserting exit status 1.
fn refused(config: &Path) -> String {
    let out = backup(config);
    assert_eq!(out.status.code(), Some(1), "stdout: {} stderr: {}", text(&out.stdout), text(&out.stderr));
    text(&out.stderr)
}

const GOOD_TAIL: &str = r#"
[[targets]]
id = "app"
type = "sqlite"
path = "app.db"
[[jobs]]
id = "nightly"
target = "app"
encryption = "none"
"#;

fn sqlite_db(dir: &Path) {
    rusqlite::Connection::open(dir.join("app.db"))
        .unwrap()
        .execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
        .unwrap();
}

#[test]
fn config_with_invalid_toml_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "[storage]\ndir = \"./b\"\n\n[[targets]\nid = \"x\"\n");
    let err = refused(&cfg);
    assert!(err.contains(&format!("{}:4:", cfg.display())), "{err}");
}

#[test]
fn config_with_unknown_key_names_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &format!("[storage]\ndir = \"./b\"\ncolour = \"blue\"\n{GOOD_TAIL}"));
    let err = refused(&cfg);
    assert!(err.contains(&format!("{}:3:", cfg.display())), "{err}");
    assert!(err.contains("colour"), "{err}");
}

#[test]
fn config_with_dangling_target_reference_names_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let body = GOOD_TAIL.replace("target = \"app\"", "target = \"nope\"");
    let cfg = write_config(dir.path(), &format!("[storage]\ndir = \"./b\"\n{body}"));
    let err = refused(&cfg);
    // Two storage lines, the blank line GOOD_TAIL starts with, then its 7th line.
    assert!(err.contains(&format!("{}:10:", cfg.display())), "{err}");
    assert!(err.contains("target \"nope\" is not defined") && err.contains("known targets: app"), "{err}");
}

#[test]
fn config_with_unknown_compression_or_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let body = GOOD_TAIL.replace("encryption = \"none\"", "encryption = \"none\"\ncompression = \"lz4\"");
    let err = refused(&write_config(dir.path(), &format!("[storage]\ndir = \"./b\"\n{body}")));
    assert!(err.contains(":12:") && err.contains("unknown compression \"lz4\""), "{err}");
    let body = "[storage]\ndir = \"./b\"\n[encryption]\nkey_file = \"k\"\nformat = \"v3\"\n";
    let err = refused(&write_config(dir.path(), &format!("{body}{GOOD_TAIL}")));
    assert!(err.contains(":5:") && err.contains("unknown encryption format"), "{err}");
}

#[test]
fn encrypted_job_without_a_key_is_refused_not_stored_in_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    sqlite_db(dir.path());
    let body = GOOD_TAIL.replace("encryption = \"none\"\n", "");
    let err = refused(&write_config(dir.path(), &format!("[storage]\ndir = \"./b\"\n{body}")));
    assert!(err.contains("names no recipient or key_file") && err.contains("keygen"), "{err}");
    assert!(!dir.path().join("b").exists(), "nothing was written");
}

#[test]
fn unusable_key_file_fails_the_run_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    sqlite_db(dir.path());
    std::fs::write(dir.path().join("k"), "not a key\n").unwrap();
    let body = GOOD_TAIL.replace("encryption = \"none\"\n", "");
    let cfg = write_config(
        dir.path(),
        &format!("[storage]\ndir = \"./b\"\n[encryption]\nkey_file = \"k\"\n{body}"),
    );
    let err = refused(&cfg);
    assert!(err.contains("job nightly") && err.contains("key file"), "{err}");
    assert!(files_under(&dir.path().join("b")).is_empty());
}

#[test]
fn invalid_recipient_is_refused_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        &format!("[storage]\ndir = \"./b\"\n[encryption]\nrecipient = \"bkpy1nope\"\n{GOOD_TAIL}"),
    );
    let err = refused(&cfg);
    assert!(err.contains(":4:") && err.contains("recipient"), "{err}");
}

#[test]
fn unreadable_config_file_is_named() {
    let err = refused(Path::new("/nonexistent/backupy.toml"));
    assert!(err.contains("/nonexistent/backupy.toml") && err.contains("cannot read"), "{err}");
}

#[test]
fn missing_sqlite_file_fails_with_one_clear_line_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &format!("[storage]\ndir = \"./b\"\n{GOOD_TAIL}"));
    let err = refused(&cfg);
    assert!(
        err.contains("job nightly") && err.contains("target app") && err.contains("does not exist"),
        "{err}"
    );
    assert_eq!(err.lines().filter(|l| l.contains("error")).count(), 1, "{err}");
    assert!(files_under(&dir.path().join("b")).is_empty());
}

#[test]
fn a_file_that_is_not_sqlite_fails_the_run_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("app.db"), "hello, I am a text file, not a database\n".repeat(100))
        .unwrap();
    let cfg = write_config(dir.path(), &format!("[storage]\ndir = \"./b\"\n{GOOD_TAIL}"));
    let err = refused(&cfg);
    assert!(err.contains("job nightly") && err.contains("target app"), "{err}");
    assert!(files_under(&dir.path().join("b")).is_empty());
}

#[test]
fn unwritable_storage_directory_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    sqlite_db(dir.path());
    // A path below a regular file cannot be created, even by root.
    std::fs::write(dir.path().join("file"), "x").unwrap();
    let cfg = write_config(dir.path(), &format!("[storage]\ndir = \"./file/backups\"\n{GOOD_TAIL}"));
    let err = refused(&cfg);
    assert!(
        err.contains("job nightly") && err.contains("storage directory") && err.contains("file/backups"),
        "{err}"
    );
}

#[test]
fn unknown_job_is_refused_listing_the_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), &format!("[storage]\ndir = \"./b\"\n{GOOD_TAIL}"));
    let mut c = agent();
    c.args(["backup", "--config"]).arg(&cfg).args(["--job", "weekly"]);
    let out = run(c);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no job \"weekly\" (jobs: nightly)"), "{}", text(&out.stderr));
}

#[test]
fn plaintext_job_is_stored_as_the_raw_dump_when_explicitly_asked() {
    let dir = tempfile::tempdir().unwrap();
    sqlite_db(dir.path());
    let body = GOOD_TAIL.replace("encryption = \"none\"", "encryption = \"none\"\ncompression = \"none\"");
    let cfg = write_config(dir.path(), &format!("[storage]\ndir = \"./b\"\n{body}"));
    let out = backup(&cfg);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let files = files_under(&dir.path().join("b"));
    let object = files
        .iter()
        .find(|f| f.ends_with(".sqlite"))
        .unwrap_or_else(|| panic!("no .sqlite object: {files:?}"));
    let db = dir.path().join("b").join(object);
    assert_eq!(sqlite3(&db, "SELECT x FROM t"), "1");
}

#[test]
fn usage_errors_exit_2() {
    for args in [vec!["backup"], vec!["frobnicate"], vec!["backup", "--config", "x", "--bogus"]] {
        let mut c = agent();
        c.args(&args);
        assert_eq!(run(c).status.code(), Some(2), "{args:?}");
    }
}

#[test]
fn version_json_is_machine_readable() {
    let mut c = agent();
    c.args(["version", "--json"]);
    let out = run(c);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    // Native engines are always available; tool-based ones say which tool they found.
    assert!(v["engines"]["sqlite"].as_str().unwrap().contains("SQLite 3."), "{v}");
    assert!(v["engines"]["redis"].is_string() && v["engines"]["mongodb"].is_string(), "{v}");
    if std::path::Path::new("/usr/bin/mariadb-dump").exists() {
        assert!(v["engines"]["mariadb"].as_str().unwrap().contains("mariadb-dump"), "{v}");
    }
}

/// `check-config` on `body` (storage and a sqlite target/job around it): (exit code, stdout, stderr).
fn check(body: &str) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), body);
    let mut c = agent();
    c.arg("check-config").arg(&cfg);
    let out = run(c);
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

const JOB_HEAD: &str = "[storage]\ndir = \"./b\"\n[[targets]]\nid = \"app\"\ntype = \"sqlite\"\npath = \"app.db\"\n[[jobs]]\nid = \"j\"\ntarget = \"app\"\nencryption = \"none\"\n";

#[test]
fn check_config_prints_the_next_three_fire_times_in_utc() {
    let (code, out, err) = check(&format!("{JOB_HEAD}cron = \"30 2 * * *\"\n"));
    assert_eq!(code, Some(0), "{err}");
    let line = out.lines().find(|l| l.contains("cron 30 2 * * *")).unwrap_or_else(|| panic!("{out}"));
    let times: Vec<&str> = line.split("next ").nth(1).unwrap().split(", ").collect();
    assert_eq!(times.len(), 3);
    for t in &times {
        assert!(t.ends_with("T02:30:00Z"), "{line}");
    }
    assert!(out.contains("job j: target app (sqlite)"), "{out}");
}

#[test]
fn invalid_cron_is_refused_with_file_line_and_reason() {
    let (code, _, err) = check(&format!("{JOB_HEAD}cron = \"61 * * * *\"\n"));
    assert_eq!(code, Some(1));
    assert!(err.contains(":11:") && err.contains("invalid cron") && err.contains("minute"), "{err}");
}

#[test]
fn impossible_values_are_refused_with_their_line() {
    let (code, _, err) = check(&format!("max_parallel_jobs = 0\n{JOB_HEAD}"));
    assert_eq!(code, Some(1));
    assert!(err.contains(":1:") && err.contains("max_parallel_jobs"), "{err}");
    let (code, _, err) =
        check(&format!("{JOB_HEAD}[maintenance]\nstart_utc = \"25:00\"\nend_utc = \"02:00\"\n"));
    assert_eq!(code, Some(1));
    assert!(err.contains(":12:") && err.contains("25:00"), "{err}");
    let (code, _, err) =
        check(&format!("{JOB_HEAD}[[health_checks]]\nid = \"h\"\ntype = \"ftp\"\ntarget = \"x\"\n"));
    assert_eq!(code, Some(1));
    assert!(err.contains(":13:") && err.contains("unknown type"), "{err}");
    let (code, _, err) =
        check(&format!("{JOB_HEAD}[[health_checks]]\nid = \"h\"\ntype = \"tcp\"\ntarget = \"nohost\"\n"));
    assert_eq!(code, Some(1));
    assert!(err.contains(":14:") && err.contains("host:port"), "{err}");
}

#[test]
fn target_url_of_the_wrong_scheme_is_refused() {
    let (code, _, err) = check(
        "[storage]\ndir = \"b\"\n[[targets]]\nid = \"pg\"\ntype = \"postgresql\"\nurl = \"mysql://x@127.0.0.1/db\"\n",
    );
    assert_eq!(code, Some(1));
    assert!(err.contains(":6:") && err.contains("postgres://"), "{err}");
}

#[test]
fn json_log_format_writes_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    sqlite_db(dir.path());
    let cfg = write_config(dir.path(), &format!("[storage]\ndir = \"./b\"\n{GOOD_TAIL}"));
    let mut c = agent();
    c.args(["backup", "--config"]).arg(&cfg).env("BACKUPY_LOG_FORMAT", "json");
    let out = run(c);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<String> = text(&out.stderr).lines().map(str::to_string).collect();
    assert!(lines.len() >= 2, "{lines:?}");
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["ts"].is_string() && v["level"].is_string() && v["module"].is_string(), "{line}");
    }
    assert!(lines.iter().any(|l| l.contains("backing up target app")), "{lines:?}");
}

#[test]
fn run_refuses_a_setting_from_the_environment_that_is_not_a_number_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    sqlite_db(dir.path());
    let cfg = write_config(
        dir.path(),
        &format!("state_dir = \"./state\"\n[storage]\ndir = \"./b\"\n{GOOD_TAIL}cron = \"0 3 * * *\"\n"),
    );
    let mut c = agent();
    c.args(["run", "--config"]).arg(&cfg).env("BACKUPY_UPDATE_CONFIRM_TIMEOUT_SEC", "soon");
    c.env("BACKUPY_METRICS_LISTEN_ADDR", "");
    let out = run(c);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("BACKUPY_UPDATE_CONFIRM_TIMEOUT_SEC=\"soon\" is not a number of seconds"), "{err}");
    // Refused before anything ran: no state database, no backup.
    assert!(!dir.path().join("state/state.db").exists());
    assert!(files_under(&dir.path().join("b")).is_empty());
}
