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

// ---- issue 20: grandfather-father-son rules and `backupy-agent prune` ----

use crate::common::s3::{new_bucket, s3_env, target};
use crate::common::{agent, keygen, run, text};
use backupy_agent::storage::S3Storage;
use chrono::{DateTime, Datelike, NaiveDate};

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
        content: None,
    };
    storage.put(&manifest_key(&key), &serde_json::to_vec(&m).unwrap()).unwrap();
    key
}

/// Daily backups at 03:00 UTC from 2025-01-01 to Monday 2025-03-31 (90 of them, ids
/// `d2025-01-01`…), and one orphan (an object without a manifest) from 2025-02-10.
fn plant_quarter(storage: &Storage) -> String {
    let mut d = NaiveDate::from_ymd_opt(2025, 1, 1).unwrap();
    while d <= NaiveDate::from_ymd_opt(2025, 3, 31).unwrap() {
        store_at(storage, &format!("d{d}"), d.and_hms_opt(3, 0, 0).unwrap().and_utc());
        d = d.succ_opt().unwrap();
    }
    let orphan_at = NaiveDate::from_ymd_opt(2025, 2, 10).unwrap().and_hms_opt(4, 0, 0).unwrap().and_utc();
    let orphan = object_key("app", "nightly", orphan_at, "crashed", "sqlite.zst.bkpy");
    storage.put(&orphan, b"half a backup").unwrap();
    orphan
}

const GFS_RULES: &str = "keep_daily = 3\nkeep_weekly = 2\nkeep_monthly = 2\nkeep_yearly = 1";

fn write_config(dir: &std::path::Path, storage_section: &str, recipient: &str) -> std::path::PathBuf {
    rusqlite::Connection::open(dir.join("app.db"))
        .unwrap()
        .execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1), (2), (3);")
        .unwrap();
    let config = dir.join("backupy.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"./state\"\n{storage_section}\n[encryption]\nrecipient = \"{recipient}\"\n\
             [[targets]]\nid = \"app\"\ntype = \"sqlite\"\npath = \"app.db\"\n\
             [[jobs]]\nid = \"nightly\"\ntarget = \"app\"\n{GFS_RULES}\n"
        ),
    )
    .unwrap();
    config
}

fn prune_cmd(config: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut c = agent();
    c.arg("prune").arg("--config").arg(config).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    run(c)
}

fn backup_keys(storage: &Storage) -> Vec<String> {
    storage.list("app/nightly/").unwrap().into_iter().map(|(k, _)| k).collect()
}

/// `prune --dry-run --json`, then `prune`, then `prune --orphans` through the real
/// binary on `storage`; `real` is the key of a backup the binary made itself (newest).
fn prune_quarter_through_the_binary(
    storage: &Storage,
    config: &std::path::Path,
    env: &[(&str, &str)],
    real: Option<(&str, &str)>,
    want_kept: &[(&str, &[&str])],
) {
    let orphan = plant_quarter(storage);
    let before = backup_keys(storage);

    // --dry-run --json: every backup with its decision; nothing deleted.
    let out = prune_cmd(config, &["--dry-run", "--json"], env);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let reports: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let job = &reports[0];
    assert_eq!(job["job"], "nightly");
    assert_eq!(job["dry_run"], true);
    let backups = job["backups"].as_array().unwrap();
    assert_eq!(backups.len(), 90 + usize::from(real.is_some()));
    let mut kept: Vec<(String, Vec<String>)> = backups
        .iter()
        .filter(|b| b["keep"] == true)
        .map(|b| {
            let reasons = b["reasons"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_string());
            (b["id"].as_str().unwrap().to_string(), reasons.collect())
        })
        .collect();
    kept.sort();
    let mut want: Vec<(String, Vec<String>)> =
        want_kept.iter().map(|(id, r)| (id.to_string(), r.iter().map(|s| s.to_string()).collect())).collect();
    want.sort();
    assert_eq!(kept, want);
    let orphans = job["orphans"].as_array().unwrap();
    assert_eq!(orphans.len(), 1, "{orphans:?}");
    assert_eq!(orphans[0]["key"], orphan.as_str());
    assert_eq!(backup_keys(storage), before, "--dry-run deletes nothing");

    // prune: the decided backups go, each with its manifest; the orphan stays.
    let out = prune_cmd(config, &[], env);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("daily 2025-03-30"), "{stdout}");
    assert!(stdout.contains("deleted"), "{stdout}");
    assert!(stdout.contains(&orphan), "the orphan is reported: {stdout}");
    let mut want_left: Vec<String> = Vec::new();
    for (id, _) in want_kept {
        let key = match real {
            Some((k, real_id)) if *id == real_id => k.to_string(),
            _ => {
                let t =
                    NaiveDate::parse_from_str(&id[1..], "%Y-%m-%d").unwrap().and_hms_opt(3, 0, 0).unwrap();
                object_key("app", "nightly", t.and_utc(), id, "sqlite.zst.bkpy")
            }
        };
        want_left.push(manifest_key(&key));
        want_left.push(key);
    }
    want_left.push(orphan.clone());
    want_left.sort();
    assert_eq!(backup_keys(storage), want_left);

    // A second pass finds nothing more to delete.
    let out = prune_cmd(config, &["--json"], env);
    let reports: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reports[0]["deleted"].as_array().unwrap().len(), 0, "{reports}");

    // --orphans: the object without a manifest (older than the newest backup) goes too.
    let out = prune_cmd(config, &["--orphans"], env);
    assert!(out.status.success(), "{}", text(&out.stderr));
    want_left.retain(|k| *k != orphan);
    assert_eq!(backup_keys(storage), want_left);
}

/// A real backup by the binary (today, the newest), 90 planted daily backups from
/// 2025 and an orphan, pruned by `keep_daily = 3, keep_weekly = 2, keep_monthly = 2,
/// keep_yearly = 1` on a directory.
#[test]
fn prune_applies_gfs_rules_on_a_directory_with_a_real_backup() {
    let dir = tempfile::tempdir().unwrap();
    let (_identity, recipient) = keygen(dir.path());
    let config = write_config(dir.path(), "[storage]\ndir = \"./backups\"", &recipient);
    let out = run({
        let mut c = agent();
        c.args(["backup", "--config"]).arg(&config);
        c
    });
    assert!(out.status.success(), "{}", text(&out.stderr));
    let storage = Storage::Dir(DirStorage::open(dir.path().join("backups")).unwrap());
    let real_keys = backup_keys(&storage);
    assert_eq!(real_keys.len(), 2, "{real_keys:?}");
    let real_key = real_keys.iter().find(|k| !k.ends_with(".json")).unwrap().clone();
    let real_id = storage.manifests("").unwrap()[0].id.clone();
    let today = Utc::now();
    let week = today.iso_week();
    let reasons_real = [
        "newest".to_string(),
        format!("daily {}", today.format("%Y-%m-%d")),
        format!("weekly {}-W{:02}", week.year(), week.week()),
        format!("monthly {}", today.format("%Y-%m")),
        format!("yearly {}", today.format("%Y")),
    ];
    let reasons_real: Vec<&str> = reasons_real.iter().map(String::as_str).collect();
    let table: &[(&str, &[&str])] = &[
        (real_id.as_str(), &reasons_real),
        ("d2025-03-31", &["daily 2025-03-31", "weekly 2025-W14", "monthly 2025-03"]),
        ("d2025-03-30", &["daily 2025-03-30"]),
    ];
    prune_quarter_through_the_binary(&storage, &config, &[], Some((&real_key, &real_id)), table);
}

/// The same 2025 quarter on the S3 server, pruned by the binary through `[storage.s3]`.
#[test]
fn prune_applies_gfs_rules_on_s3() {
    let env = s3_env();
    let bucket = new_bucket(&env, "prune");
    let dir = tempfile::tempdir().unwrap();
    let (_identity, recipient) = keygen(dir.path());
    let section = format!(
        "[storage.s3]\nendpoint = \"{}\"\nregion = \"{}\"\nbucket = \"{bucket}\"\n\
         access_key_id = \"env:TEST_S3_KEY\"\nsecret_access_key = \"env:TEST_S3_SECRET\"",
        env.endpoint, env.region
    );
    let config = write_config(dir.path(), &section, &recipient);
    let storage = Storage::S3(S3Storage::new(target(&env, &env.endpoint, &bucket), None).unwrap());
    let creds = [("TEST_S3_KEY", env.access_key.as_str()), ("TEST_S3_SECRET", env.secret_key.as_str())];
    prune_quarter_through_the_binary(
        &storage,
        &config,
        &creds,
        None,
        &[
            // 2025-03-31 is a Monday: ISO week 14 alone; 03-30 is the Sunday of W13.
            (
                "d2025-03-31",
                &["newest", "daily 2025-03-31", "weekly 2025-W14", "monthly 2025-03", "yearly 2025"],
            ),
            ("d2025-03-30", &["daily 2025-03-30", "weekly 2025-W13"]),
            ("d2025-03-29", &["daily 2025-03-29"]),
            ("d2025-02-28", &["monthly 2025-02"]),
        ],
    );
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

/// An object whose `.json` is not a readable manifest is reported as an orphan, and
/// even `prune --orphans` leaves it (and the file) alone.
#[test]
fn an_object_beside_an_unreadable_manifest_is_an_orphan_that_stays() {
    let dir = tempfile::tempdir().unwrap();
    let storage = Storage::Dir(DirStorage::open(dir.path()).unwrap());
    let newest = store(&storage, "new", 0, true);
    let odd = object_key("app", "nightly", Utc::now() - Duration::days(5), "odd", "sqlite.zst.bkpy");
    storage.put(&odd, b"bytes").unwrap();
    storage.put(&manifest_key(&odd), b"{ not a manifest").unwrap();
    let plain = store(&storage, "crashed", 4, false);
    let opts = retention::Options { dry_run: false, orphans: true };
    let rules = Rules { keep_last: Some(1), ..Rules::default() };
    let report = retention::prune_job(&storage, "app", "nightly", rules, opts, Utc::now()).unwrap();
    let by_key = |k: &str| report.orphans.iter().find(|o| o.key == k).cloned();
    let o = by_key(&odd).expect("reported as an orphan");
    assert!(o.unreadable_manifest && !o.deletable && !o.deleted, "{o:?}");
    assert!(by_key(&plain).unwrap().deleted, "a plain orphan goes with --orphans");
    let mut left: Vec<String> = storage.list("").unwrap().into_iter().map(|(k, _)| k).collect();
    left.sort();
    let mut want = vec![newest.clone(), manifest_key(&newest), odd.clone(), manifest_key(&odd)];
    want.sort();
    assert_eq!(left, want);
    assert!(retention::render_text(&[report]).contains("its manifest cannot be read"));
}

/// A real scheduled `run` applies the GFS rules after each success through the same
/// code as `prune`: the planted 2025 quarter shrinks to its last day (daily and monthly
/// slots behind today's backup), and of today's runs only the newest stays.
#[test]
fn scheduled_runs_apply_gfs_rules_after_each_success() {
    use std::io::{BufRead, BufReader};
    use std::sync::{Arc, Mutex};
    use std::time::Instant;
    let dir = tempfile::tempdir().unwrap();
    let (_identity, recipient) = keygen(dir.path());
    let config = write_config(dir.path(), "[storage]\ndir = \"./backups\"", &recipient);
    let text_cfg = std::fs::read_to_string(&config).unwrap();
    let text_cfg = text_cfg.replace(GFS_RULES, "cron = \"*/2 * * * * *\"\nkeep_daily = 2\nkeep_monthly = 2");
    std::fs::write(&config, text_cfg).unwrap();
    let storage = Storage::Dir(DirStorage::open(dir.path().join("backups")).unwrap());
    let orphan = plant_quarter(&storage);

    let mut child = agent()
        .args(["run", "--config"])
        .arg(&config)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let (stderr, l) = (child.stderr.take().unwrap(), log.clone());
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut g = l.lock().unwrap_or_else(|e| e.into_inner());
            g.push_str(&line);
            g.push('\n');
        }
    });
    let current = || log.lock().unwrap_or_else(|e| e.into_inner()).clone();
    // Two passes that deleted something: the quarter, then an older run of today.
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    while current().matches("retention deleted").count() < 2 {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("no two retention passes within 60 s; log:\n{}", current());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // SAFETY: kill(2) on the child this test spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}\n{}", current());

    let kept: Vec<String> = storage.manifests("app/nightly/").unwrap().into_iter().map(|m| m.id).collect();
    let planted: Vec<&String> = kept.iter().filter(|id| id.starts_with("d2025-")).collect();
    assert_eq!(planted, ["d2025-03-31"], "the daily and monthly slots behind today; kept: {kept:?}");
    // Every run of today but the newest went in a later pass (a run that finished after
    // the last pass may still be there).
    let real = kept.len() - 1;
    assert!((1..=2).contains(&real), "today's runs kept: {kept:?}\n{}", current());
    assert!(storage.list("").unwrap().iter().any(|(k, _)| *k == orphan), "retention leaves the orphan");
    assert!(current().contains("without a manifest left alone"), "the orphan is reported");
}
