//! Retention on directory storage: objects and manifests pruned together, the newest
//! kept, incomplete objects (no manifest) left alone (issue 20: orphans go only with
//! `prune --orphans`).

use backupy_agent::retention::{self, Rules};
use backupy_agent::storage::{DirStorage, Manifest, Storage, manifest_key, object_key, rfc3339};
use chrono::{Duration, Utc};

fn store(storage: &Storage, id: &str, days_ago: i64, with_manifest: bool) -> String {
    let started = Utc::now() - Duration::days(days_ago);
    if with_manifest {
        return store_at(storage, id, started);
    }
    let key = object_key("app", "nightly", started, id, "sqlite.zst.bkpy");
    storage.put(&key, b"object bytes").unwrap();
    key
}

#[test]
fn keep_last_on_a_directory_deletes_objects_with_their_manifests_and_leaves_orphans() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::Dir(DirStorage::open(dir.path()).unwrap());
    let old = store(&storage, "r1", 9, true);
    let mid = store(&storage, "r2", 5, true);
    let new = store(&storage, "r3", 1, true);
    let orphan = store(&storage, "r0", 7, false); // an incomplete backup
    let other_job = object_key("app", "weekly", Utc::now() - Duration::days(30), "w1", "sqlite");
    storage.put(&other_job, b"x").unwrap();

    let mut deleted =
        retention::apply(&storage, "app", "nightly", Rules { keep_last: Some(2), ..Rules::default() })
            .unwrap();
    deleted.sort();
    assert_eq!(deleted, vec![old.clone()]);
    let left: Vec<String> = storage.list("").unwrap().into_iter().map(|(k, _)| k).collect();
    let mut want = vec![mid.clone(), manifest_key(&mid), new.clone(), manifest_key(&new), orphan, other_job];
    want.sort();
    assert_eq!(left, want, "the other job's backups are untouched");
}

// ---- issue 20: grandfather-father-son rules ----

use crate::common::{agent, run, text};
use chrono::DateTime;

/// A backup of app/nightly started at `t`, stored as the agent stores one: the object
/// under `storage::object_key`, then its manifest.
fn store_at(storage: &Storage, id: &str, t: DateTime<Utc>) -> String {
    let key = object_key("app", "nightly", t, id, "sqlite.zst.bkpy");
    storage.put(&key, b"object bytes").unwrap();
    let m = Manifest {
        manifest_version: 1,
        id: id.into(),
        job: "nightly".into(),
        target: "app".into(),
        engine: "sqlite".into(),
        engine_version: "SQLite 3".into(),
        object_key: key.clone(),
        size_bytes: 12,
        dump_bytes: 12,
        sha256: String::new(),
        compression: "zstd".into(),
        encryption: "v2".into(),
        key_id: String::new(),
        started_at: rfc3339(t),
        finished_at: rfc3339(t),
        agent_version: "test".into(),
    };
    storage.put(&manifest_key(&key), &serde_json::to_vec(&m).unwrap()).unwrap();
    key
}

/// A bad `keep_within` is refused at load, naming the job and the value.
#[test]
fn a_bad_keep_within_is_refused_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("backupy.toml");
    std::fs::write(
        &config,
        "[storage]\ndir = \"./b\"\n[[targets]]\nid = \"app\"\ntype = \"sqlite\"\npath = \"app.db\"\n\
         [[jobs]]\nid = \"nightly\"\ntarget = \"app\"\nencryption = \"none\"\nkeep_within = \"30 days\"\n",
    )
    .unwrap();
    let out = run({
        let mut c = agent();
        c.arg("check-config").arg(&config);
        c
    });
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("keep_within \"30 days\"") && err.contains("nightly") && err.contains(":11:"),
        "{err}"
    );
}
