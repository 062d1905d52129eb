//! Issue 16, defect 3: manifests written by someone else (a store writer) cannot steer
//! retention, restore or verify. A manifest counts only when its own name is
//! `object_key + ".json"` and the key lies under its own job's prefix with valid
//! segments; anything else is foreign, reported and left alone. On directory storage
//! (including a victim file outside the storage directory) and on the S3 server of
//! scripts/services.sh.

use crate::common::s3::{new_bucket, s3_env, target};
use crate::common::{agent, keygen, run, text};
use backupy_agent::retention::{self, Rules};
use backupy_agent::storage::{DirStorage, Manifest, S3Storage, Storage, manifest_key, object_key, rfc3339};
use chrono::{Duration, Utc};

fn manifest(id: &str, target: &str, job: &str, key: &str, days_ago: i64) -> Manifest {
    let started = Utc::now() - Duration::days(days_ago);
    Manifest {
        manifest_version: 1,
        id: id.into(),
        job: job.into(),
        target: target.into(),
        engine: "sqlite".into(),
        engine_version: "SQLite 3".into(),
        object_key: key.into(),
        size_bytes: 12,
        dump_bytes: 12,
        sha256: String::new(),
        compression: "none".into(),
        encryption: "none".into(),
        key_id: String::new(),
        started_at: rfc3339(started),
        finished_at: rfc3339(started),
        agent_version: "test".into(),
        content: None,
    }
}

/// A genuine backup of app/nightly, `days_ago` old: its key.
fn genuine(storage: &Storage, id: &str, days_ago: i64) -> String {
    let key = object_key("app", "nightly", Utc::now() - Duration::days(days_ago), id, "sqlite");
    storage.put(&key, b"genuine data").unwrap();
    let m = manifest(id, "app", "nightly", &key, days_ago);
    storage.put(&manifest_key(&key), &serde_json::to_vec(&m).unwrap()).unwrap();
    key
}

/// Plants a manifest at `at` (a key under app/nightly/) that says `object_key`, 400 days
/// old so that any retention rule would delete it.
fn plant(storage: &Storage, at: &str, id: &str, target: &str, job: &str, object_key: &str) {
    let m = manifest(id, target, job, object_key, 400);
    storage.put(at, &serde_json::to_vec(&m).unwrap()).unwrap();
}

/// The planted manifests and what each points at; returns (manifest keys, protected keys).
fn plant_all(storage: &Storage, newest: &str, other_job: &str) -> (Vec<String>, Vec<String>) {
    let old = (Utc::now() - Duration::days(400)).format("%Y%m%dT%H%M%SZ");
    let at = |n: &str| format!("app/nightly/{old}-{n}.sqlite.json");
    // 1. Out of the storage root.
    plant(storage, &at("evil1"), "evil1", "app", "nightly", "../../victim.txt");
    // 2. Another job's object, from this job's directory.
    plant(storage, &at("evil2"), "evil2", "app", "nightly", other_job);
    // 3. The newest genuine backup, from a manifest whose name does not match.
    plant(storage, &at("evil3"), "evil3", "app", "nightly", newest);
    // 4. Its name matches and the key is under app/nightly/, but it claims another job.
    let own = format!("app/nightly/{old}-evil4.sqlite");
    storage.put(&own, b"someone else's object").unwrap();
    plant(storage, &manifest_key(&own), "evil4", "app", "weekly", &own);
    let planted = ["evil1", "evil2", "evil3"].iter().map(|n| at(n)).chain([manifest_key(&own)]).collect();
    (planted, vec![newest.to_string(), other_job.to_string(), own])
}

fn keys(storage: &Storage) -> Vec<String> {
    storage.list("").unwrap().into_iter().map(|(k, _)| k).collect()
}

/// Retention on `storage`: only the genuine old backup goes; everything planted, and all
/// it points at, stays and is reported as foreign.
fn retention_leaves_planted_manifests_alone(storage: &Storage) {
    let old = genuine(storage, "g-old", 30);
    let mid = genuine(storage, "g-mid", 20);
    let newest = genuine(storage, "g-new", 1);
    let other_job = object_key("app", "weekly", Utc::now() - Duration::days(300), "w1", "sqlite");
    storage.put(&other_job, b"weekly").unwrap();
    let (planted, protected) = plant_all(storage, &newest, &other_job);

    let pruned = retention::prune(
        storage,
        "app",
        "nightly",
        Rules { keep_last: Some(1), retention_days: Some(1), ..Rules::default() },
    )
    .unwrap();
    let mut deleted = pruned.deleted.clone();
    deleted.sort();
    let mut want = vec![old.clone(), mid.clone()];
    want.sort();
    assert_eq!(deleted, want, "only the genuine old backups are deleted");
    let mut foreign: Vec<String> = pruned.foreign.iter().map(|f| f.key.clone()).collect();
    foreign.sort();
    let mut planted_sorted = planted.clone();
    planted_sorted.sort();
    assert_eq!(
        foreign, planted_sorted,
        "every planted manifest is reported as foreign: {:?}",
        pruned.foreign
    );
    let left = keys(storage);
    for k in planted.iter().chain(&protected).chain([&manifest_key(&newest)]) {
        assert!(left.contains(k), "{k} was deleted; left: {left:?}");
    }
    // The reasons name what is wrong.
    let reason = |n: &str| pruned.foreign.iter().find(|f| f.key.contains(n)).unwrap().reason.clone();
    assert!(reason("evil1").contains("not its own name"), "{}", reason("evil1"));
    assert!(reason("evil4").contains("outside the prefix"), "{}", reason("evil4"));
    // Restore and verify find backups through the same listing: the planted ones are not there.
    let ids: Vec<String> = storage.manifests("").unwrap().into_iter().map(|m| m.id).collect();
    assert_eq!(ids, ["g-new"], "only the genuine backup is listed");
}

#[test]
fn retention_on_a_directory_never_follows_a_planted_object_key() {
    let root = tempfile::tempdir().unwrap();
    let store_dir = root.path().join("a").join("backups");
    let victim = root.path().join("victim.txt");
    std::fs::write(&victim, "keep me").unwrap();
    let storage = Storage::Dir(DirStorage::open(&store_dir).unwrap());
    // The planted key, joined to the storage root as the directory storage does, lands on the victim.
    assert_eq!(store_dir.join("../../victim.txt").canonicalize().unwrap(), victim.canonicalize().unwrap());
    retention_leaves_planted_manifests_alone(&storage);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
    // And the storage layer refuses such a key outright.
    assert!(storage.delete("../../victim.txt").is_err());
    assert!(storage.get("app/../../victim.txt").is_err());
    assert!(victim.exists());
}

#[test]
fn retention_on_s3_never_deletes_another_jobs_objects_for_a_planted_manifest() {
    let env = s3_env();
    let bucket = new_bucket(&env, "trust-retention");
    let storage = Storage::S3(S3Storage::new(target(&env, &env.endpoint, &bucket), None).unwrap());
    retention_leaves_planted_manifests_alone(&storage);
}

#[test]
fn verify_and_restore_refuse_a_planted_manifest_and_name_it_foreign() {
    let dir = tempfile::tempdir().unwrap();
    let (_key, recipient) = keygen(dir.path());
    let victim = dir.path().join("victim.db");
    rusqlite::Connection::open(&victim).unwrap().execute_batch("CREATE TABLE secret(x);").unwrap();
    let config = dir.path().join("backupy.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"./state\"\n[storage]\ndir = \"./backups\"\n[encryption]\nrecipient = \"{recipient}\"\n\
             [[targets]]\nid = \"app\"\ntype = \"sqlite\"\npath = \"app.db\"\n\
             [[jobs]]\nid = \"nightly\"\ntarget = \"app\"\n"
        ),
    )
    .unwrap();
    let storage = Storage::Dir(DirStorage::open(dir.path().join("backups")).unwrap());
    let old = (Utc::now() - Duration::days(1)).format("%Y%m%dT%H%M%SZ");
    // The victim as a plaintext SQLite "backup", through a traversing key.
    plant(
        &storage,
        &format!("app/nightly/{old}-p1.sqlite.json"),
        "planted",
        "app",
        "nightly",
        "../victim.db",
    );
    for cmd in ["verify", "restore"] {
        let to = dir.path().join(format!("restored-{cmd}.db"));
        let mut c = agent();
        c.args([cmd, "--backup", "planted", "--config"]).arg(&config);
        if cmd == "restore" {
            c.arg("--to").arg(&to);
        }
        let out = run(c);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{cmd}: {err}");
        assert!(err.contains("foreign manifest") && err.contains("p1.sqlite.json"), "{cmd}: {err}");
        assert!(err.contains("no backup with ID \"planted\""), "{cmd}: {err}");
        assert!(!to.exists(), "{cmd} wrote {}", to.display());
    }
    // `latest` does not pick it either.
    let mut c = agent();
    c.args(["verify", "--backup", "latest", "--config"]).arg(&config);
    let out = run(c);
    assert!(text(&out.stderr).contains("no backup in storage"), "{}", text(&out.stderr));
}
