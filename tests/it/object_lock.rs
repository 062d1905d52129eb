//! S3 Object Lock (issue 20): the lock headers signed and sent on PutObject and
//! CreateMultipartUpload (s3s-fs, which checks SigV4, behind the recording FaultProxy);
//! a bucket without Object Lock refused at start; and, on moto (scripts/services.sh
//! `services_start_moto`, which enforces locks but checks no signature), a locked
//! backup that survives `prune` and a direct delete, and is pruned once its date passed.

use std::io::Write as _;
use std::time::{Duration, Instant};

use backupy_agent::retention::{self, Options, Rules};
use backupy_agent::storage::s3::ObjectLock;
use backupy_agent::storage::{Manifest, ObjectWriter, S3Storage, Storage, manifest_key, object_key, rfc3339};
use chrono::{DateTime, Utc};

use crate::common::s3::{Fault, FaultProxy, new_bucket, s3_env, target};
use crate::common::{agent, keygen, run, text};

fn moto_endpoint() -> String {
    std::env::var("BACKUPY_TEST_MOTO_ENDPOINT").unwrap_or_else(|_| {
        panic!(
            "BACKUPY_TEST_MOTO_ENDPOINT is not set: these tests need moto_server; \
             `source scripts/services.sh; services_init; services_start_moto` in the shell that runs cargo test"
        )
    })
}

fn http() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).build().new_agent()
}

/// A bucket on moto, with Object Lock enabled or not (moto checks no signature).
fn moto_bucket(endpoint: &str, lock: bool) -> String {
    let name = format!("lock-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let mut req = http().put(format!("{endpoint}/{name}"));
    if lock {
        req = req.header("x-amz-bucket-object-lock-enabled", "true");
    }
    let resp = req.send_empty().unwrap();
    assert_eq!(resp.status().as_u16(), 200, "creating bucket {name} on moto");
    name
}

fn moto_storage(endpoint: &str, bucket: &str, lock: Option<ObjectLock>) -> Storage {
    let env = crate::common::s3::S3Env {
        endpoint: endpoint.to_string(),
        access_key: "moto-key".into(),
        secret_key: "moto-secret".into(),
        region: "us-east-1".into(),
        dir: std::path::PathBuf::new(),
    };
    let mut t = target(&env, endpoint, bucket);
    t.object_lock = lock;
    Storage::S3(S3Storage::new(t, None).unwrap())
}

fn manifest(id: &str, key: &str, t: DateTime<Utc>) -> Vec<u8> {
    let m = Manifest {
        manifest_version: 1,
        id: id.into(),
        job: "nightly".into(),
        target: "app".into(),
        engine: "sqlite".into(),
        engine_version: "SQLite 3".into(),
        object_key: key.into(),
        size_bytes: 12,
        dump_bytes: 12,
        sha256: String::new(),
        compression: "zstd".into(),
        encryption: "v2".into(),
        key_id: String::new(),
        started_at: rfc3339(t),
        finished_at: rfc3339(t),
        agent_version: "test".into(),
        content: None,
    };
    serde_json::to_vec(&m).unwrap()
}

/// A backup written through the storage layer (object, then manifest): with the
/// storage's own lock headers.
fn store(storage: &Storage, id: &str, days_ago: i64) -> String {
    let t = Utc::now() - chrono::Duration::days(days_ago);
    let key = object_key("app", "nightly", t, id, "sqlite.zst.bkpy");
    storage.put(&key, b"object bytes").unwrap();
    storage.put(&manifest_key(&key), &manifest(id, &key, t)).unwrap();
    key
}

fn header<'a>(seen: &'a crate::common::s3::Seen, name: &str) -> Option<&'a str> {
    seen.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

fn signed_headers(url: &str) -> String {
    let q = url.split_once('?').map(|(_, q)| q).unwrap_or("");
    q.split('&')
        .find_map(|kv| kv.strip_prefix("X-Amz-SignedHeaders="))
        .map(|v| v.replace("%3B", ";"))
        .unwrap_or_default()
}

/// Every PutObject and CreateMultipartUpload carries the lock mode and date, signed
/// (X-Amz-SignedHeaders), and s3s-fs, which checks the signature, accepts them; every
/// PutObject and UploadPart carries Content-MD5, the integrity header Object Lock needs.
#[test]
fn object_lock_headers_are_signed_and_sent_on_every_write() {
    let env = s3_env();
    let bucket = new_bucket(&env, "lockhdr");
    let proxy = FaultProxy::start(&env.endpoint, |_, _| Fault::Forward);
    let mut t = target(&env, &proxy.endpoint, &bucket);
    t.object_lock = Some(ObjectLock { compliance: true, days: 3 });
    let s3 = S3Storage::new(t, None).unwrap();
    let before = Utc::now();
    s3.put("app/nightly/small.json", b"{}").unwrap();
    let mut w = s3.create("app/nightly/big.bin");
    w.write_all(&vec![7u8; 6 << 20]).unwrap();
    Box::new(w).commit().unwrap();
    let after = Utc::now();

    let reqs = proxy.requests();
    let puts: Vec<_> = reqs.iter().filter(|r| r.method == "PUT" && !r.url.contains("uploadId=")).collect();
    let creates: Vec<_> = reqs.iter().filter(|r| r.method == "POST" && r.url.contains("uploads")).collect();
    let parts: Vec<_> = reqs.iter().filter(|r| r.method == "PUT" && r.url.contains("uploadId=")).collect();
    assert_eq!(puts.len(), 1, "{reqs:#?}");
    assert_eq!(creates.len(), 1, "{reqs:#?}");
    assert!(parts.len() >= 2, "{reqs:#?}");
    for r in puts.iter().chain(&creates) {
        assert_eq!(header(r, "x-amz-object-lock-mode"), Some("COMPLIANCE"), "{r:?}");
        let until = header(r, "x-amz-object-lock-retain-until-date").expect("retain-until date");
        let until = DateTime::parse_from_rfc3339(until).unwrap().with_timezone(&Utc);
        let (lo, hi) = (before + chrono::Duration::days(3), after + chrono::Duration::days(3));
        assert!(
            until >= lo - chrono::Duration::seconds(1) && until <= hi,
            "{until} not 3 days after the write"
        );
        let signed = signed_headers(&r.url);
        assert!(
            signed.contains("x-amz-object-lock-mode")
                && signed.contains("x-amz-object-lock-retain-until-date"),
            "the lock headers are signed: {signed}"
        );
    }
    for r in puts.iter().chain(&parts) {
        assert!(header(r, "content-md5").is_some(), "Content-MD5 on {} {}", r.method, r.url);
        assert!(signed_headers(&r.url).contains("content-md5"), "{}", r.url);
    }
    // s3s-fs checked the signatures and stored both.
    let keys: Vec<String> = s3.list("app/nightly/").unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys, ["app/nightly/big.bin", "app/nightly/small.json"]);
}

fn lock_config(dir: &std::path::Path, endpoint: &str, bucket: &str) -> std::path::PathBuf {
    let (_identity, recipient) = keygen(dir);
    let config = dir.join("backupy.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"./state\"\n[storage.s3]\nendpoint = \"{endpoint}\"\nbucket = \"{bucket}\"\n\
             access_key_id = \"moto-key\"\nsecret_access_key = \"moto-secret\"\n\
             object_lock = {{ mode = \"governance\", days = 1 }}\n\
             [encryption]\nrecipient = \"{recipient}\"\n\
             [[targets]]\nid = \"app\"\ntype = \"sqlite\"\npath = \"app.db\"\n\
             [[jobs]]\nid = \"nightly\"\ntarget = \"app\"\nkeep_last = 1\n"
        ),
    )
    .unwrap();
    config
}

/// `object_lock` on a bucket without Object Lock: refused at start, naming the bucket
/// and what to do; on moto (no lock configuration) and on s3s-fs (no Object Lock at all).
#[test]
fn a_bucket_without_object_lock_is_refused_at_start() {
    let moto = moto_endpoint();
    let plain = moto_bucket(&moto, false);
    let dir = tempfile::tempdir().unwrap();
    let config = lock_config(dir.path(), &moto, &plain);
    for cmd in ["list", "prune"] {
        let out = run({
            let mut c = agent();
            c.args([cmd, "--config"]).arg(&config);
            c
        });
        assert_eq!(out.status.code(), Some(1), "{cmd}: {}", text(&out.stdout));
        let err = text(&out.stderr);
        assert!(
            err.contains("object_lock") && err.contains(&plain) && err.contains("Object Lock"),
            "{cmd}: {err}"
        );
    }
    let locked = moto_bucket(&moto, true);
    let dir = tempfile::tempdir().unwrap();
    let config = lock_config(dir.path(), &moto, &locked);
    let out = run({
        let mut c = agent();
        c.args(["list", "--config"]).arg(&config);
        c
    });
    assert!(out.status.success(), "a bucket with Object Lock is accepted: {}", text(&out.stderr));

    let env = s3_env();
    let bucket = new_bucket(&env, "nolock");
    let mut t = target(&env, &env.endpoint, &bucket);
    t.object_lock = Some(ObjectLock { compliance: false, days: 1 });
    let err = S3Storage::new(t, None).unwrap().check_object_lock().unwrap_err().to_string();
    assert!(err.contains("Object Lock"), "{err}");
}

/// On moto, which enforces Object Lock: backups written by the storage layer with a
/// one-day governance lock all survive `prune` (keep_last = 1 would delete two), each
/// kept as "locked until …", and a direct delete with the same credentials is refused.
#[test]
fn a_locked_backup_survives_prune_and_a_direct_delete() {
    let moto = moto_endpoint();
    let bucket = moto_bucket(&moto, true);
    let storage = moto_storage(&moto, &bucket, Some(ObjectLock { compliance: false, days: 1 }));
    let keys: Vec<String> = (0..3).map(|i| store(&storage, &format!("b{i}"), 10 - i)).collect();
    let rules = Rules { keep_last: Some(1), ..Rules::default() };
    let report =
        retention::prune_job(&storage, "app", "nightly", rules, Options::default(), Utc::now()).unwrap();
    assert!(report.deleted.is_empty() && report.errors.is_empty(), "{report:?}");
    for d in &report.backups {
        assert!(d.keep, "{d:?}");
        assert!(d.reasons.iter().any(|r| r.starts_with("locked until ")), "{d:?}");
    }
    let left: Vec<String> = storage.list("app/nightly/").unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(left.len(), 6, "{left:?}");

    // The lock is the server's, not only ours. A DELETE without a version (what stolen
    // backup credentials can send) only puts a delete marker on top, as S3 does on a
    // versioned bucket; deleting the locked version itself is refused, and the backup
    // is still there to be read.
    storage.delete(&keys[0]).unwrap();
    let versions = http().get(format!("{moto}/{bucket}?versions&prefix={}", keys[0])).call().unwrap();
    let body = versions.into_body().read_to_string().unwrap();
    let version = body
        .split("<Version>")
        .nth(1)
        .and_then(|v| v.split("<VersionId>").nth(1))
        .and_then(|v| v.split("</VersionId>").next())
        .unwrap_or_else(|| panic!("no locked version of {} left: {body}", keys[0]))
        .to_string();
    let del = http().delete(format!("{moto}/{bucket}/{}?versionId={version}", keys[0])).call().unwrap();
    let status = del.status().as_u16();
    let body = del.into_body().read_to_string().unwrap_or_default();
    assert_eq!(status, 403, "deleting the locked version is refused: {body}");
    assert!(body.contains("AccessDenied"), "{body}");
    let get = http().get(format!("{moto}/{bucket}/{}?versionId={version}", keys[0])).call().unwrap();
    assert_eq!(get.status().as_u16(), 200);
    assert_eq!(get.into_body().read_to_vec().unwrap(), b"object bytes");
}

/// Once the retention date has passed, the same prune deletes the backup. The objects
/// are written straight to moto with a retain-until date three seconds ahead (the
/// agent's own setting counts in days).
#[test]
fn a_backup_is_pruned_once_its_lock_date_passed() {
    let moto = moto_endpoint();
    let bucket = moto_bucket(&moto, true);
    let storage = moto_storage(&moto, &bucket, Some(ObjectLock { compliance: false, days: 1 }));
    let until = Utc::now() + chrono::Duration::seconds(3);
    let put = |key: &str, body: &[u8]| {
        use base64::Engine as _;
        use md5::Digest as _;
        let md5 = base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(body));
        let resp = http()
            .put(format!("{moto}/{bucket}/{key}"))
            .header("Content-MD5", &md5)
            .header("x-amz-object-lock-mode", "GOVERNANCE")
            .header("x-amz-object-lock-retain-until-date", &rfc3339(until))
            .send(body)
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "PUT {key}");
    };
    let mut keys = Vec::new();
    for (i, days_ago) in [(0, 9), (1, 8)] {
        let t = Utc::now() - chrono::Duration::days(days_ago);
        let key = object_key("app", "nightly", t, &format!("old{i}"), "sqlite.zst.bkpy");
        put(&key, b"object bytes");
        put(&manifest_key(&key), &manifest(&format!("old{i}"), &key, t));
        keys.push(key);
    }
    let newest = store(&storage, "new", 0);
    let rules = Rules { keep_last: Some(1), ..Rules::default() };
    let report =
        retention::prune_job(&storage, "app", "nightly", rules, Options::default(), Utc::now()).unwrap();
    assert!(report.deleted.is_empty(), "still locked: {report:?}");

    let deadline = Instant::now() + Duration::from_secs(30);
    while Utc::now() <= until + chrono::Duration::seconds(1) {
        assert!(Instant::now() < deadline, "the lock date never passed");
        std::thread::sleep(Duration::from_millis(100));
    }
    let report =
        retention::prune_job(&storage, "app", "nightly", rules, Options::default(), Utc::now()).unwrap();
    let mut deleted = report.deleted.clone();
    deleted.sort();
    assert_eq!(deleted, keys, "{report:?}");
    let left: Vec<String> = storage.list("app/nightly/").unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(left, [newest.clone(), manifest_key(&newest)]);
}

/// A bad `object_lock` is refused at load with its line and what is allowed.
#[test]
fn a_bad_object_lock_setting_is_refused_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("backupy.toml");
    for (lock, want) in [
        ("{ mode = \"forever\", days = 3 }", "must be \"governance\" or \"compliance\""),
        ("{ mode = \"compliance\", days = 0 }", "days must be between 1 and 36500"),
        ("{ mode = \"compliance\" }", "days"),
    ] {
        std::fs::write(
            &config,
            format!(
                "[storage.s3]\nendpoint = \"http://127.0.0.1:9\"\nbucket = \"bkt\"\naccess_key_id = \"a\"\n\
                 secret_access_key = \"b\"\nobject_lock = {lock}\n"
            ),
        )
        .unwrap();
        let out = run({
            let mut c = agent();
            c.arg("check-config").arg(&config);
            c
        });
        assert_eq!(out.status.code(), Some(1), "{lock}");
        let err = text(&out.stderr);
        assert!(err.contains(want) && err.contains("backupy.toml:6"), "{lock}: {err}");
    }
}

/// `[storage.s3.prune]`: deletes are signed with the prune pair and only with it;
/// everything else with the backup pair (s3s-fs checks the signatures).
#[test]
fn deletes_are_signed_with_the_prune_credentials_only() {
    use backupy_agent::secrets::Secret;
    use backupy_agent::storage::s3::PruneCredentials;
    let env = s3_env();
    let bucket = new_bucket(&env, "prunekey");
    let proxy = FaultProxy::start(&env.endpoint, |_, _| Fault::Forward);
    // Backup pair valid, prune pair unknown to the server: writes work, deletes are refused.
    let mut t = target(&env, &proxy.endpoint, &bucket);
    t.prune_credentials = Some(PruneCredentials {
        access_key_id: Secret::new("AKPRUNEUNKNOWN"),
        secret_access_key: Secret::new("nope"),
        session_token: None,
    });
    let writer = S3Storage::new(t, None).unwrap();
    writer.put("app/nightly/a.bin", b"a").unwrap();
    let err = writer.delete("app/nightly/a.bin").unwrap_err().to_string();
    assert!(err.contains("403"), "{err}");
    let reqs = proxy.requests();
    let put = reqs.iter().find(|r| r.method == "PUT").unwrap();
    let del = reqs.iter().find(|r| r.method == "DELETE").unwrap();
    assert!(put.url.contains(&format!("X-Amz-Credential={}%2F", env.access_key)), "{}", put.url);
    assert!(del.url.contains("X-Amz-Credential=AKPRUNEUNKNOWN%2F"), "{}", del.url);
    assert_eq!(writer.list("app/").unwrap().len(), 1, "the object is still there");

    // Backup pair unknown, prune pair valid: the delete works.
    let mut t = target(&env, &env.endpoint, &bucket);
    t.access_key_id = Secret::new("AKBACKUPUNKNOWN");
    t.secret_access_key = Secret::new("nope");
    t.prune_credentials = Some(PruneCredentials {
        access_key_id: Secret::new(env.access_key.clone()),
        secret_access_key: Secret::new(env.secret_key.clone()),
        session_token: None,
    });
    let pruner = S3Storage::new(t, None).unwrap();
    assert!(pruner.list("app/").is_err(), "the backup pair is not valid here");
    pruner.delete("app/nightly/a.bin").unwrap();
    assert!(writer.list("app/").unwrap().is_empty());
}

/// `[storage.s3.prune]` is read like the main pair (env:/file: references), and a
/// reference that does not resolve names the prune key.
#[test]
fn the_prune_credentials_section_is_read_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("backupy.toml");
    let write = |key: &str| {
        std::fs::write(
            &config,
            format!(
                "[storage.s3]\nendpoint = \"http://127.0.0.1:9\"\nbucket = \"bkt\"\naccess_key_id = \"a\"\n\
                 secret_access_key = \"b\"\n[storage.s3.prune]\naccess_key_id = \"{key}\"\n\
                 secret_access_key = \"env:BACKUPY_TEST_PRUNE_SECRET\"\n"
            ),
        )
        .unwrap()
    };
    let check = || {
        run({
            let mut c = agent();
            c.arg("check-config").arg(&config).env("BACKUPY_TEST_PRUNE_SECRET", "s3cr3t-prune");
            c
        })
    };
    write("AKPRUNE");
    let out = check();
    assert!(out.status.success(), "{}", text(&out.stderr));
    write("env:BACKUPY_TEST_NO_SUCH_VAR");
    let out = check();
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("prune.access_key_id") && err.contains("backupy.toml:7"), "{err}");
    assert!(!err.contains("s3cr3t-prune"), "{err}");
}

/// A real run of the binary into a locked moto bucket: both backups are written under
/// the lock (moto refuses a locked PutObject without Content-MD5), `list` shows each
/// lock date, and `prune` (keep_last = 1) keeps the older one as locked.
#[test]
fn real_backups_into_a_locked_bucket_are_listed_with_their_lock_and_kept_by_prune() {
    let moto = moto_endpoint();
    let bucket = moto_bucket(&moto, true);
    let dir = tempfile::tempdir().unwrap();
    rusqlite::Connection::open(dir.path().join("app.db"))
        .unwrap()
        .execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
        .unwrap();
    let config = lock_config(dir.path(), &moto, &bucket);
    let cmd = |args: &[&str]| {
        run({
            let mut c = agent();
            c.args(args).arg("--config").arg(&config);
            c
        })
    };
    let before = Utc::now();
    for _ in 0..2 {
        let out = cmd(&["backup"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let out = cmd(&["list", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    for m in listed {
        let until = m["locked_until"].as_str().unwrap_or_else(|| panic!("no lock date: {m}"));
        let until = DateTime::parse_from_rfc3339(until).unwrap().with_timezone(&Utc);
        assert!(until >= before + chrono::Duration::days(1) - chrono::Duration::seconds(1), "{until}");
        assert!(until <= Utc::now() + chrono::Duration::days(1), "{until}");
    }
    let out = cmd(&["list"]);
    assert_eq!(text(&out.stdout).matches("locked until ").count(), 2, "{}", text(&out.stdout));

    let out = cmd(&["prune", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let backups = report[0]["backups"].as_array().unwrap();
    assert_eq!(backups.len(), 2);
    assert!(backups.iter().all(|b| b["keep"] == true), "{backups:?}");
    let older = &backups[1]["reasons"];
    assert!(
        older.as_array().unwrap().iter().any(|r| r.as_str().unwrap().starts_with("locked until ")),
        "{older}"
    );
    assert_eq!(report[0]["deleted"].as_array().unwrap().len(), 0);
}

/// A delete the storage refuses (403: here a prune pair the server does not know) ends
/// the pass after one DELETE, is not retried, and is counted in
/// `backupy_agent_retention_deletes_refused_total{job_id}`.
#[test]
fn a_refused_delete_is_tried_once_and_counted() {
    use backupy_agent::secrets::Secret;
    use backupy_agent::storage::s3::PruneCredentials;
    let env = s3_env();
    let bucket = new_bucket(&env, "refused");
    let proxy = FaultProxy::start(&env.endpoint, |_, _| Fault::Forward);
    let mut t = target(&env, &proxy.endpoint, &bucket);
    t.prune_credentials = Some(PruneCredentials {
        access_key_id: Secret::new("AKPRUNEUNKNOWN"),
        secret_access_key: Secret::new("nope"),
        session_token: None,
    });
    let storage = Storage::S3(S3Storage::new(t, None).unwrap());
    for i in 0..3 {
        store(&storage, &format!("b{i}"), 10 - i);
    }
    let metrics = backupy_agent::metrics::Metrics::new().unwrap();
    let rules = Rules { keep_last: Some(1), ..Rules::default() };
    retention::after_run(&storage, "app", "nightly", rules, &metrics);
    let deletes = proxy.requests().into_iter().filter(|r| r.method == "DELETE").count();
    assert_eq!(deletes, 1, "one refused DELETE, no retry, no further attempt in this pass");
    assert_eq!(metrics.retention_deletes_refused_total.with_label_values(&["nightly"]).get(), 1);
    assert_eq!(storage.list("app/nightly/").unwrap().len(), 6, "nothing was deleted");
}
