//! End to end through the real binaries: back up a SQLite database while another
//! connection writes, decrypt it with `backupy-decrypt`, and let the `sqlite3` CLI judge
//! the result.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::common::*;
use rusqlite::Connection;
use sha2::Digest;

fn make_db(path: &std::path::Path) {
    let c = Connection::open(path).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode=WAL;
         CREATE TABLE t(id INTEGER PRIMARY KEY, payload TEXT NOT NULL);
         CREATE TABLE meta(n INTEGER NOT NULL);
         INSERT INTO meta VALUES (0);",
    )
    .unwrap();
    let tx = c.unchecked_transaction().unwrap();
    for i in 0..20_000 {
        tx.execute("INSERT INTO t(payload) VALUES (?1)", [format!("row {i} {}", "x".repeat(200))]).unwrap();
    }
    tx.execute("UPDATE meta SET n = (SELECT count(*) FROM t)", []).unwrap();
    tx.commit().unwrap();
}

/// Inserts rows until stopped; each transaction also sets meta.n to the row count, so a
/// consistent snapshot always has count(t) == meta.n.
fn writer(path: std::path::PathBuf, stop: Arc<AtomicBool>, written: Arc<AtomicU64>) {
    let c = Connection::open(path).unwrap();
    c.busy_timeout(Duration::from_secs(10)).unwrap();
    while !stop.load(Ordering::SeqCst) {
        let tx = c.unchecked_transaction().unwrap();
        tx.execute("INSERT INTO t(payload) VALUES ('concurrent')", []).unwrap();
        tx.execute("UPDATE meta SET n = n + 1", []).unwrap();
        tx.commit().unwrap();
        written.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn sqlite_backup_during_writes_restores_consistently() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("app.db");
    make_db(&db);
    let (identity, recipient) = keygen(dir.path());
    std::fs::write(dir.path().join("backupy.pub"), format!("{recipient}\n")).unwrap();
    let config = dir.path().join("backupy.toml");
    std::fs::write(
        &config,
        r#"
state_dir = "./state"
[storage]
dir = "./backups"
[encryption]
recipient = "file:backupy.pub"
[[targets]]
id = "app"
type = "sqlite"
path = "app.db"
[[jobs]]
id = "nightly"
target = "app"
"#,
    )
    .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let w = {
        let (db, stop, written) = (db.clone(), stop.clone(), written.clone());
        std::thread::spawn(move || writer(db, stop, written))
    };
    while written.load(Ordering::SeqCst) < 50 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let before = written.load(Ordering::SeqCst);
    let out = run({
        let mut c = agent();
        c.args(["backup", "--config"]).arg(&config);
        c
    });
    let during = written.load(Ordering::SeqCst) - before;
    stop.store(true, Ordering::SeqCst);
    w.join().unwrap();
    assert!(out.status.success(), "backup failed: {}", text(&out.stderr));
    assert!(during > 0, "the writer kept writing while the backup ran");

    let files = files_under(&dir.path().join("backups"));
    assert_eq!(files.len(), 2, "one object and its manifest: {files:?}");
    let object = &files[0];
    assert!(object.starts_with("app/nightly/") && object.ends_with(".sqlite.zst.bkpy"), "{object}");
    assert_eq!(files[1], format!("{object}.json"));
    let object_path = dir.path().join("backups").join(object);
    let stored = std::fs::read(&object_path).unwrap();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("backups").join(&files[1])).unwrap()).unwrap();
    assert_eq!(manifest["object_key"], object.as_str());
    assert_eq!(manifest["sha256"], hex::encode(sha2::Sha256::digest(&stored)));
    assert_eq!(manifest["size_bytes"], stored.len() as u64);
    assert_eq!(manifest["engine"], "sqlite");
    assert_eq!(manifest["encryption"], "v2");
    assert_eq!(manifest["compression"], "zstd");
    assert_eq!(manifest["job"], "nightly");
    assert!(manifest["engine_version"].as_str().unwrap().starts_with("SQLite 3."));
    let id = manifest["id"].as_str().unwrap();
    assert!(object.ends_with(&format!("-{id}.sqlite.zst.bkpy")), "{object} names run {id}");
    assert!(state_is_clean(&dir.path().join("state/tmp")), "the snapshot file was removed");

    let restored = dir.path().join("restored.db");
    let out = run({
        let mut c = decrypt();
        c.arg("--in").arg(&object_path).arg("--out").arg(&restored).arg("--identity").arg(&identity);
        c.args(["--sha256", manifest["sha256"].as_str().unwrap()]);
        c
    });
    assert!(out.status.success(), "decrypt failed: {}", text(&out.stderr));
    assert_eq!(sqlite3(&restored, "PRAGMA integrity_check"), "ok");
    let rows: u64 = sqlite3(&restored, "SELECT count(*) FROM t").parse().unwrap();
    let counted: u64 = sqlite3(&restored, "SELECT n FROM meta").parse().unwrap();
    assert_eq!(rows, counted, "row count equals the count taken inside the snapshot");
    assert!(rows >= 20_000 + before, "the snapshot is not older than the backup start");
}

fn state_is_clean(tmp: &std::path::Path) -> bool {
    files_under(tmp).is_empty()
}
