//! Issue 19 (restore drills), first part, through the real binary: the manifest's
//! `content` block of a SQLite backup, `backupy-agent drill` passing with exact counts,
//! catching a row deleted in the scratch copy, refusing a tampered object before any
//! restore, and old manifests without `content` still listed, verified and restored.

use std::path::{Path, PathBuf};

use crate::common::*;
use crate::restore_cli::{backup, restore, setup};

/// A SQLite target with three tables of known sizes (one with a name that needs
/// quoting, one empty), backed up once. Returns the temp dir and the config.
fn backed_up() -> (tempfile::TempDir, PathBuf) {
    let (dir, config) = setup("type = \"sqlite\"\npath = \"app.db\"");
    rusqlite::Connection::open(dir.path().join("app.db"))
        .unwrap()
        .execute_batch(
            "CREATE TABLE items(id INTEGER PRIMARY KEY, v TEXT);
             INSERT INTO items(v) VALUES ('a'), ('b'), ('c');
             CREATE TABLE \"odd \"\"name\"(x);
             INSERT INTO \"odd \"\"name\" VALUES (1), (2);
             CREATE TABLE empty(x);",
        )
        .unwrap();
    backup(&config, &[]);
    (dir, config)
}

fn drill(config: &Path, env: &[(&str, &str)], extra: &[&str]) -> std::process::Output {
    let mut c = agent();
    for (k, v) in env {
        c.env(k, v);
    }
    c.args(["drill", "--job", "nightly", "--config"]).arg(config).args(extra);
    run(c)
}

/// The one stored object (not a manifest or a report).
fn object(dir: &Path) -> PathBuf {
    let backups = dir.join("backups");
    let objects: Vec<String> = files_under(&backups).into_iter().filter(|f| !f.ends_with(".json")).collect();
    assert_eq!(objects.len(), 1, "{objects:?}");
    backups.join(&objects[0])
}

fn json_file(p: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

fn report_path(object: &Path) -> PathBuf {
    PathBuf::from(format!("{}.drill.json", object.display()))
}

/// What is left in the state directory's tmp (scratch copies, spools).
fn tmp_leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir.join("state/tmp"))
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

#[test]
fn sqlite_manifest_records_exact_row_counts_per_table() {
    let (dir, _config) = backed_up();
    let m = json_file(&PathBuf::from(format!("{}.json", object(dir.path()).display())));
    let content = &m["content"];
    assert_eq!(content["exactness"], "exact", "{m:#}");
    assert_eq!(content["unit"], "rows");
    assert!(content["engine_version"].as_str().unwrap().starts_with("SQLite 3."), "{m:#}");
    assert_eq!(content["tables"], serde_json::json!({"items": 3, "odd \"name": 2, "empty": 0}), "{m:#}");
}

#[test]
fn drill_passes_with_exact_counts_and_writes_its_report_beside_the_backup() {
    let (dir, config) = backed_up();
    let out = drill(&config, &[], &["--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["status"], "passed", "{printed:#}");
    assert_eq!(printed["object_verified"], true);
    let counts: Vec<(String, u64, u64, bool)> = printed["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_string(),
                t["expected"].as_u64().unwrap(),
                t["found"].as_u64().unwrap(),
                t["ok"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        counts,
        [
            ("empty".to_string(), 0, 0, true),
            ("items".to_string(), 3, 3, true),
            ("odd \"name".to_string(), 2, 2, true)
        ]
    );
    let obj = object(dir.path());
    let manifest = json_file(&PathBuf::from(format!("{}.json", obj.display())));
    assert_eq!(printed["object_sha256"], manifest["sha256"]);
    assert_eq!(printed["backup_id"], manifest["id"]);
    assert!(printed["restore_seconds"].as_f64().unwrap() > 0.0, "{printed:#}");
    for field in ["agent_version", "host", "started_at", "finished_at"] {
        assert!(!printed[field].as_str().unwrap().is_empty(), "{field}: {printed:#}");
    }
    // The evidence in storage is the document that was printed.
    assert_eq!(json_file(&report_path(&obj)), printed);
    // The scratch copy is gone.
    assert_eq!(tmp_leftovers(dir.path()), Vec::<String>::new());
    // A report beside the backup is not taken for a manifest.
    let mut c = agent();
    c.args(["list", "--json", "--config"]).arg(&config);
    let out = run(c);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!text(&out.stderr).contains("drill.json"), "{}", text(&out.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed:#}");
    // The same by backup id, in the text form.
    let id = manifest["id"].as_str().unwrap();
    let out = drill(&config, &[], &["--backup", id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with(&format!("{id}\tpassed\t")), "{}", text(&out.stdout));
}

#[test]
fn a_row_deleted_in_the_scratch_copy_fails_the_drill_and_names_the_table() {
    let (dir, config) = backed_up();
    // The debug-build-only hook runs this on the scratch copy after the restore.
    let out = drill(&config, &[("BACKUPY_TEST_DRILL_SCRATCH_SQL", "DELETE FROM items WHERE v = 'b'")], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("table \"items\": expected 3, found 2"), "{err}");
    assert!(!err.contains("table \"empty\""), "{err}");
    let report = json_file(&report_path(&object(dir.path())));
    assert_eq!(report["status"], "failed", "{report:#}");
    assert!(report["error"].as_str().unwrap().contains("\"items\""), "{report:#}");
    let items = report["tables"].as_array().unwrap().iter().find(|t| t["name"] == "items").unwrap();
    assert_eq!(items, &serde_json::json!({"name": "items", "expected": 3, "found": 2, "ok": false}));
    // The backup itself is untouched: without the hook the drill passes.
    let out = drill(&config, &[], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(json_file(&report_path(&object(dir.path())))["status"], "passed");
}

#[test]
fn a_tampered_object_fails_the_drill_before_anything_is_restored() {
    let (dir, config) = backed_up();
    let obj = object(dir.path());
    let mut bytes = std::fs::read(&obj).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&obj, &bytes).unwrap();
    // Were anything restored, this hook would fail the drill with its own message.
    let hook = [("BACKUPY_TEST_DRILL_SCRATCH_SQL", "SELECT no_such_function()")];
    let out = drill(&config, &hook, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("tampered or corrupt"), "{err}");
    assert!(!err.contains("no_such_function"), "{err}");
    let report = json_file(&report_path(&obj));
    assert_eq!(report["status"], "failed");
    assert_eq!(report["object_verified"], false);
    assert_eq!(report["restore_seconds"], 0.0);
    assert_eq!(report["tables"], serde_json::json!([]));
    assert_eq!(tmp_leftovers(dir.path()), Vec::<String>::new());
}

#[test]
fn old_manifests_without_content_still_list_verify_and_restore_and_a_drill_says_why_it_cannot() {
    let (dir, config) = backed_up();
    // A manifest as agents before issue 19 wrote it: no `content` key.
    let manifest = PathBuf::from(format!("{}.json", object(dir.path()).display()));
    let mut m = json_file(&manifest);
    assert!(m.as_object_mut().unwrap().remove("content").is_some());
    std::fs::write(&manifest, serde_json::to_vec_pretty(&m).unwrap()).unwrap();

    let mut c = agent();
    c.args(["list", "--json", "--config"]).arg(&config);
    let out = run(c);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed[0]["id"], m["id"], "{listed:#}");
    assert!(listed[0].get("content").is_none(), "{listed:#}");

    let mut c = agent();
    c.args(["verify", "--backup", "latest", "--config"]).arg(&config);
    let out = run(c);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let to = dir.path().join("restored.db");
    let out = restore(&config, to.to_str().unwrap(), &[], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(sqlite3(&to, "SELECT count(*) FROM items"), "3");

    let out = drill(&config, &[], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no `content` block"), "{}", text(&out.stderr));
    assert!(!report_path(&object(dir.path())).exists());
}

#[test]
fn drill_of_an_unknown_job_names_the_jobs() {
    let (_dir, config) = setup("type = \"sqlite\"\npath = \"app.db\"");
    let mut c = agent();
    c.args(["drill", "--job", "nope", "--config"]).arg(&config);
    let out = run(c);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no job \"nope\" (jobs: nightly)"), "{}", text(&out.stderr));
}
