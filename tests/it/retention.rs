//! Retention on directory storage: objects and manifests pruned together, the newest
//! kept, incomplete objects (no manifest) older than the newest backup removed.

use backupy_agent::retention::{self, Rules};
use backupy_agent::storage::{DirStorage, Manifest, Storage, manifest_key, object_key, rfc3339};
use chrono::{Duration, Utc};

fn store(storage: &Storage, id: &str, days_ago: i64, with_manifest: bool) -> String {
    let started = Utc::now() - Duration::days(days_ago);
    let key = object_key("app", "nightly", started, id, "sqlite.zst.bkpy");
    storage.put(&key, b"object bytes").unwrap();
    if with_manifest {
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
            started_at: rfc3339(started),
            finished_at: rfc3339(started),
            agent_version: "test".into(),
            content: None,
        };
        storage.put(&manifest_key(&key), &serde_json::to_vec(&m).unwrap()).unwrap();
    }
    key
}

#[test]
fn keep_last_on_a_directory_deletes_objects_with_their_manifests() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::Dir(DirStorage::open(dir.path()).unwrap());
    let old = store(&storage, "r1", 9, true);
    let mid = store(&storage, "r2", 5, true);
    let new = store(&storage, "r3", 1, true);
    let orphan = store(&storage, "r0", 7, false); // an incomplete backup
    let other_job = object_key("app", "weekly", Utc::now() - Duration::days(30), "w1", "sqlite");
    storage.put(&other_job, b"x").unwrap();

    let mut deleted =
        retention::apply(&storage, "app", "nightly", Rules { keep_last: Some(2), retention_days: None })
            .unwrap();
    deleted.sort();
    let mut expected = vec![old.clone(), orphan.clone()];
    expected.sort();
    assert_eq!(deleted, expected);
    let left: Vec<String> = storage.list("").unwrap().into_iter().map(|(k, _)| k).collect();
    let mut want = vec![mid.clone(), manifest_key(&mid), new.clone(), manifest_key(&new), other_job];
    want.sort();
    assert_eq!(left, want, "the other job's backups are untouched");
}
