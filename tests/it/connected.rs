//! Connected mode end to end: the real `backupy-agent run` against the control plane of
//! tests/it/common/control_plane.rs (written from wire-v1.md), the real S3 server of
//! scripts/services.sh, and real databases. A backup counts when the object the control
//! plane was told about decrypts with the key it holds and restores.

use crate::common;
use crate::common::db;
use crate::common::docker;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::control_plane::{Action, ControlPlane, envelope};
use crate::common::s3::{Fault, FaultProxy, S3Env, new_bucket, open_uploads, s3_env};
use backupy_agent::wire::pb;
use backupy_agent::wire::pb::envelope::Payload;
use sha2::{Digest, Sha256};

pub(crate) const KEY: &str = "bk_test_agent_key_0d5e1c2a9f";

pub(crate) struct Agent {
    pub(crate) child: Child,
    pub(crate) log: PathBuf,
}

impl Agent {
    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The end of the agent's log, for failure messages.
    pub(crate) fn log_tail(&self) -> String {
        common::log_tail(&self.log)
    }

    pub(crate) fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit status.
    pub(crate) fn stop(&mut self) -> std::process::ExitStatus {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the agent did not stop after SIGTERM:\n{}", self.log_tail());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn spawn_agent(cp: &ControlPlane, state: &Path, env: &[(&str, &str)]) -> Agent {
    let log = state.with_extension("log");
    let file = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
    let mut cmd = common::agent();
    cmd.arg("run")
        .env("BACKUPY_SERVER_URL", cp.url("ws"))
        .env("BACKUPY_DEV_ALLOW_INSECURE", "true")
        .env("BACKUPY_AGENT_KEY", KEY)
        .env("BACKUPY_STATE_DIR", state)
        .env("BACKUPY_LOG_LEVEL", "debug")
        .env("BACKUPY_DEV_BACKOFF_BASE_SEC", "0.2")
        .env("BACKUPY_DEV_WS_PING_SEC", "0.5")
        // Hermetic: no Docker unless a test gives one.
        .env("BACKUPY_DOCKER_SOCKET", state.with_extension("no-docker.sock"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Agent { child: cmd.spawn().expect("backupy-agent starts"), log }
}

#[track_caller]
pub(crate) fn wait_for(
    cp: &ControlPlane,
    agent: &Agent,
    what: &str,
    timeout: Duration,
    cond: impl Fn(&common::control_plane::Shared) -> bool,
) {
    assert!(
        cp.wait_until(timeout, cond),
        "timed out after {timeout:?} waiting for {what}; agent log:\n{}",
        agent.log_tail()
    );
}

/// Waits until connection `index` has sent Register and been answered: commands sent
/// earlier could reach the agent before RegisterAck, and its first frame is read then.
#[track_caller]
pub(crate) fn wait_registered(cp: &ControlPlane, agent: &Agent, index: usize) {
    wait_for(cp, agent, &format!("Register on connection {index}"), Duration::from_secs(20), |s| {
        s.registered(index)
    });
}

/// A SQLite database with `rows` rows of ~`row_bytes` random bytes each.
pub(crate) fn sqlite_db(path: &Path, rows: usize, row_bytes: usize) {
    let c = rusqlite::Connection::open(path).unwrap();
    c.execute_batch("CREATE TABLE orders(id INTEGER PRIMARY KEY, note TEXT, blob BLOB);").unwrap();
    let tx = c.unchecked_transaction().unwrap();
    for i in 0..rows {
        tx.execute(
            "INSERT INTO orders(note, blob) VALUES (?1, randomblob(?2))",
            rusqlite::params![format!("order {i}"), row_bytes as i64],
        )
        .unwrap();
    }
    tx.commit().unwrap();
}

pub(crate) fn sqlite_target(id: &str, path: &Path) -> pb::Target {
    pb::Target {
        id: id.into(),
        r#type: pb::DbType::Sqlite as i32,
        display_name: format!("{id} (test)"),
        connection: Some(pb::ConnectionConfig { database: path.display().to_string(), ..Default::default() }),
    }
}

pub(crate) fn job(id: &str, target: &str) -> pb::BackupJobSpec {
    pb::BackupJobSpec {
        id: id.into(),
        target_id: target.into(),
        cron: "0 3 * * *".into(),
        compression: "zstd".into(),
        encryption_enabled: true,
        ..Default::default()
    }
}

pub(crate) fn config(
    version: u64,
    targets: Vec<pb::Target>,
    jobs: Vec<pb::BackupJobSpec>,
) -> pb::AgentConfig {
    pb::AgentConfig { version, targets, jobs, ..Default::default() }
}

fn multipart(env: &S3Env, endpoint: &str, bucket: &str, key: &str) -> pb::S3MultipartTarget {
    pb::S3MultipartTarget {
        endpoint: endpoint.into(),
        region: env.region.clone(),
        bucket: bucket.into(),
        key: key.into(),
        access_key_id: env.access_key.clone(),
        secret_access_key: env.secret_key.clone(),
        session_token: String::new(),
        expires_at_ms: 0,
        path_style: true,
    }
}

pub(crate) fn presigned_creds(env: &S3Env, bucket: &str, key: &str) -> pb::S3UploadCreds {
    pb::S3UploadCreds {
        presigned_put_url: common::s3::presign_put(env, bucket, key, Duration::from_secs(600)),
        expires_at_ms: 0,
        final_s3_key: key.into(),
        multipart: None,
    }
}

pub(crate) fn run_backup(job_id: &str, run_id: &str, creds: pb::S3UploadCreds, dek: &[u8]) -> Payload {
    Payload::RunBackup(pb::RunBackup {
        job_id: job_id.into(),
        run_id: run_id.into(),
        manual_trigger: true,
        upload_creds: Some(creds),
        encrypted_dek: dek.to_vec(),
        recipient_public_key: Vec::new(),
    })
}

/// The stored object as s3s-fs keeps it (a bucket is a directory).
fn stored_object(env: &S3Env, bucket: &str, key: &str) -> Vec<u8> {
    std::fs::read(env.dir.join(bucket).join(key)).unwrap_or_else(|e| panic!("object {bucket}/{key}: {e}"))
}

pub(crate) fn status(u: &pb::JobUpdate) -> pb::JobStatus {
    pb::JobStatus::try_from(u.status).unwrap()
}

pub(crate) fn terminal(cp: &common::control_plane::Shared, run_id: &str) -> Option<pb::JobUpdate> {
    cp.job_updates(run_id).into_iter().find(|u| {
        matches!(status(u), pb::JobStatus::Success | pb::JobStatus::Failed | pb::JobStatus::Cancelled)
    })
}

/// Decrypts `object` with the real `backupy-decrypt` and the given key arguments, and
/// checks the restored SQLite file with the sqlite3 CLI.
fn restore_and_count(dir: &Path, object: &[u8], sha256: &str, key_args: &[&str]) -> String {
    let enc = dir.join(format!("obj-{sha256}.bkpy"));
    std::fs::write(&enc, object).unwrap();
    let out_path = dir.join(format!("restored-{sha256}.db"));
    let out = common::run({
        let mut c = common::decrypt();
        c.arg("--in")
            .arg(&enc)
            .arg("--out")
            .arg(&out_path)
            .args(["--sha256", sha256, "--quiet"])
            .args(key_args);
        c
    });
    assert!(out.status.success(), "backupy-decrypt: {}", common::text(&out.stderr));
    assert_eq!(common::sqlite3(&out_path, "PRAGMA integrity_check"), "ok");
    common::sqlite3(&out_path, "SELECT count(*) || ':' || sum(length(blob)) FROM orders")
}

pub(crate) fn setup(tag: &str, rows: usize, row_bytes: usize) -> (tempfile::TempDir, PathBuf, ControlPlane) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join(format!("{tag}.db"));
    sqlite_db(&db, rows, row_bytes);
    let cp = ControlPlane::plain();
    (dir, db, cp)
}

#[test]
fn presigned_put_with_the_raw_key_reports_a_backup_that_decrypts_and_restores() {
    let env = s3_env();
    let bucket = new_bucket(&env, "conn-put");
    let (dir, db, cp) = setup("app", 500, 100);
    cp.state().ack_config =
        Some(config(3, vec![sqlite_target("app-db", &db)], vec![job("nightly", "app-db")]));
    let state = dir.path().join("state");
    let agent = spawn_agent(&cp, &state, &[]);
    wait_registered(&cp, &agent, 0);

    let dek = [7u8; 32];
    let key = "agents/a1/app-db/run-put-1.sqlite.zst.bkpy";
    cp.send(
        0,
        envelope("cmd-1", run_backup("nightly", "run-put-1", presigned_creds(&env, &bucket, key), &dek)),
    );
    wait_for(&cp, &agent, "BackupCompleted", Duration::from_secs(60), |s| {
        !s.completed("run-put-1").is_empty()
    });

    let s = cp.state();
    let ack = s.ack("cmd-1").expect("RunBackup is acked");
    assert!(ack.accepted, "{ack:?}");
    let updates = s.job_updates("run-put-1");
    let statuses: Vec<_> = updates.iter().map(status).collect();
    assert_eq!(statuses.first(), Some(&pb::JobStatus::Queued), "{updates:?}");
    assert!(statuses.contains(&pb::JobStatus::Running), "{updates:?}");
    assert_eq!(statuses.last(), Some(&pb::JobStatus::Success), "{updates:?}");
    let running = updates.iter().find(|u| status(u) == pb::JobStatus::Running).unwrap();
    assert_eq!(running.current_step, "dumping");
    assert!(updates.iter().all(|u| u.job_id == "nightly"));
    let done = s.completed("run-put-1");
    assert_eq!(done.len(), 1, "{done:?}");
    let c = &done[0];
    drop(s);
    assert_eq!((c.job_id.as_str(), c.s3_key.as_str(), c.compression.as_str()), ("nightly", key, "zstd"));
    assert_eq!(c.encrypted_dek, dek, "raw-key mode returns the received key unchanged");
    assert!(c.dek_kms_id.is_empty());
    assert!(c.db_engine_version.starts_with("SQLite 3."), "{}", c.db_engine_version);
    let object = stored_object(&env, &bucket, key);
    assert_eq!(c.size_bytes, object.len() as u64);
    assert_eq!(c.sha256, hex::encode(Sha256::digest(&object)));
    let key_file = dir.path().join("dek.hex");
    std::fs::write(&key_file, hex::encode(dek)).unwrap();
    let counted =
        restore_and_count(dir.path(), &object, &c.sha256, &["--key-file", key_file.to_str().unwrap()]);
    assert_eq!(counted, "500:50000");
    // The config was persisted, sealed: the agent key's HKDF key, not plaintext.
    let raw_db = std::fs::read(state.join("state.db")).unwrap();
    assert!(!raw_db.windows(6).any(|w| w == b"app-db"), "the stored config is not sealed");
}

#[test]
fn multipart_and_recipient_extensions_seal_the_key_for_the_recipient() {
    let env = s3_env();
    let bucket = new_bucket(&env, "conn-mp");
    let (dir, db, cp) = setup("mp", 300, 200);
    cp.state().ack_config = Some(config(4, vec![sqlite_target("mp-db", &db)], vec![job("hourly", "mp-db")]));
    let (identity, recipient) = common::keygen(dir.path());
    let recipient = backupy_agent::crypto::Recipient::parse(&recipient).unwrap();
    let agent = spawn_agent(&cp, &dir.path().join("state"), &[]);
    wait_registered(&cp, &agent, 0);
    let key = "agents/a1/mp-db/run-mp-1.sqlite.zst.bkpy";
    let creds = pb::S3UploadCreds {
        // A wrong presigned URL: the multipart extension must be preferred.
        presigned_put_url: "http://127.0.0.1:9/never".into(),
        expires_at_ms: 0,
        final_s3_key: key.into(),
        multipart: Some(multipart(&env, &env.endpoint, &bucket, key)),
    };
    let cmd = pb::RunBackup {
        job_id: "hourly".into(),
        run_id: "run-mp-1".into(),
        manual_trigger: true,
        upload_creds: Some(creds),
        encrypted_dek: vec![1; 32],
        recipient_public_key: recipient.as_bytes().to_vec(),
    };
    cp.send(0, envelope("cmd-mp", Payload::RunBackup(cmd)));
    wait_for(&cp, &agent, "BackupCompleted", Duration::from_secs(60), |s| {
        !s.completed("run-mp-1").is_empty()
    });
    let c = cp.state().completed("run-mp-1").remove(0);
    assert_eq!(c.encrypted_dek.len(), 80, "the sealed key block, not a raw key");
    assert!(c.dek_kms_id.starts_with("x25519:"), "{}", c.dek_kms_id);
    let object = stored_object(&env, &bucket, key);
    assert_eq!(c.sha256, hex::encode(Sha256::digest(&object)));
    let counted =
        restore_and_count(dir.path(), &object, &c.sha256, &["--identity", identity.to_str().unwrap()]);
    assert_eq!(counted, "300:60000");
    assert!(open_uploads(&env, &bucket).is_empty());
}

#[test]
fn a_repeated_run_id_is_acked_as_duplicate_and_not_run_twice() {
    let env = s3_env();
    let bucket = new_bucket(&env, "conn-dup");
    let (dir, db, cp) = setup("dup", 50, 10);
    cp.state().ack_config = Some(config(5, vec![sqlite_target("d", &db)], vec![job("j", "d")]));
    let agent = spawn_agent(&cp, &dir.path().join("state"), &[]);
    wait_registered(&cp, &agent, 0);
    let key = "dup/run-dup.bkpy";
    cp.send(0, envelope("c1", run_backup("j", "run-dup", presigned_creds(&env, &bucket, key), &[3; 32])));
    wait_for(&cp, &agent, "the first run", Duration::from_secs(60), |s| !s.completed("run-dup").is_empty());
    cp.send(0, envelope("c2", run_backup("j", "run-dup", presigned_creds(&env, &bucket, key), &[3; 32])));
    wait_for(&cp, &agent, "the duplicate's ack", Duration::from_secs(20), |s| s.ack("c2").is_some());
    wait_for(&cp, &agent, "the re-sent reports", Duration::from_secs(20), |s| {
        s.completed("run-dup").len() == 2
    });
    let s = cp.state();
    let ack = s.ack("c2").unwrap();
    assert!(ack.accepted && ack.reason == "duplicate run_id", "{ack:?}");
    let done = s.completed("run-dup");
    assert_eq!(done[0], done[1], "identical payloads");
    let updates = s.job_updates("run-dup");
    assert_eq!(
        updates.iter().filter(|u| status(u) == pb::JobStatus::Running).count(),
        1,
        "ran once: {updates:?}"
    );
    assert_eq!(updates.iter().filter(|u| status(u) == pb::JobStatus::Success).count(), 2, "{updates:?}");
    // Re-sent reports are new envelopes: new seq numbers.
    let seqs: Vec<u64> = s
        .all()
        .into_iter()
        .filter(|e| matches!(&e.payload, Some(Payload::BackupCompleted(_))))
        .map(|e| e.seq)
        .collect();
    assert!(seqs[1] > seqs[0], "{seqs:?}");
}

#[test]
fn a_run_survives_a_dropped_connection_and_reports_once_after_reconnect() {
    let env = s3_env();
    let bucket = new_bucket(&env, "conn-drop");
    let (dir, db, cp) = setup("drop", 100, 10);
    let mut j = job("slow", "s");
    // A pre-hook keeps the run busy while the connection is down.
    j.pre_hooks = vec!["sleep 2".into()];
    cp.state().ack_config = Some(config(6, vec![sqlite_target("s", &db)], vec![j]));
    let agent = spawn_agent(&cp, &dir.path().join("state"), &[("BACKUPY_ALLOW_HOOKS", "true")]);
    wait_registered(&cp, &agent, 0);
    let key = "drop/run-drop.bkpy";
    cp.send(0, envelope("c1", run_backup("slow", "run-drop", presigned_creds(&env, &bucket, key), &[9; 32])));
    wait_for(&cp, &agent, "RUNNING", Duration::from_secs(20), |s| {
        s.job_updates("run-drop").iter().any(|u| status(u) == pb::JobStatus::Running)
    });
    cp.state().refuse = true;
    cp.act(0, Action::Drop);
    std::thread::sleep(Duration::from_secs(3));
    assert!(cp.state().completed("run-drop").is_empty(), "nothing could be delivered while down");
    cp.state().refuse = false;
    wait_for(&cp, &agent, "BackupCompleted after reconnect", Duration::from_secs(30), |s| {
        !s.completed("run-drop").is_empty()
    });
    std::thread::sleep(Duration::from_secs(2));
    let s = cp.state();
    assert!(s.conns.len() >= 2);
    assert_eq!(s.completed("run-drop").len(), 1, "exactly once");
    assert_eq!(terminal(&s, "run-drop").map(|u| status(&u)), Some(pb::JobStatus::Success));
    let success = s.job_updates("run-drop").iter().filter(|u| status(u) == pb::JobStatus::Success).count();
    assert_eq!(success, 1);
    let object = stored_object(&env, &bucket, key);
    assert_eq!(s.completed("run-drop")[0].sha256, hex::encode(Sha256::digest(&object)));
}

#[test]
fn after_kill_9_the_run_is_failed_its_upload_aborted_and_the_outbox_delivered() {
    let env = s3_env();
    let bucket = new_bucket(&env, "conn-kill");
    // 24 MiB of random rows: more than one 16 MiB part, so a multipart upload is open.
    let (dir, db, cp) = setup("kill", 24, 1 << 20);
    cp.state().ack_config = Some(config(8, vec![sqlite_target("k", &db)], vec![job("big", "k")]));
    let stall = Arc::new(AtomicBool::new(true));
    let proxy = {
        let stall = stall.clone();
        FaultProxy::start(&env.endpoint, move |req, _| {
            let is_part = req.method == "PUT" && req.url.contains("partNumber=");
            if is_part && stall.load(Ordering::SeqCst) {
                Fault::Stall(Duration::from_secs(60))
            } else {
                Fault::Forward
            }
        })
    };
    let state = dir.path().join("state");
    let mut agent = spawn_agent(&cp, &state, &[]);
    wait_registered(&cp, &agent, 0);
    let key = "kill/run-kill.bkpy";
    let creds = pb::S3UploadCreds {
        multipart: Some(multipart(&env, &proxy.endpoint, &bucket, key)),
        ..Default::default()
    };
    cp.send(0, envelope("c1", run_backup("big", "run-kill", creds, &[5; 32])));
    let deadline = Instant::now() + Duration::from_secs(30);
    while open_uploads(&env, &bucket).is_empty() {
        assert!(Instant::now() < deadline, "no multipart upload opened:\n{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    // The control plane goes away: what the agent reports now waits in the outbox.
    cp.state().refuse = true;
    cp.act(0, Action::Drop);
    cp.wait_for("the dropped connection to close", Duration::from_secs(10), |s| {
        s.conns[0].closed_at.is_some()
    });
    // Without undelivered entries to replay, the test would prove nothing.
    let deadline = Instant::now() + Duration::from_secs(20);
    while outbox_seqs(&state).is_empty() {
        assert!(Instant::now() < deadline, "the outage left nothing in the outbox:\n{}", agent.log_tail());
        std::thread::sleep(Duration::from_millis(50));
    }
    agent.kill9();
    let pending = outbox_seqs(&state);

    stall.store(false, Ordering::SeqCst);
    cp.state().refuse = false;
    let agent = spawn_agent(&cp, &state, &[]);
    wait_for(&cp, &agent, "FAILED after restart", Duration::from_secs(30), |s| {
        terminal(s, "run-kill").is_some()
    });
    let t = terminal(&cp.state(), "run-kill").unwrap();
    assert_eq!(status(&t), pb::JobStatus::Failed);
    assert!(t.error_message.starts_with("agent restarted"), "{}", t.error_message);
    assert!(open_uploads(&env, &bucket).is_empty(), "the multipart upload was aborted");
    wait_for(&cp, &agent, "every entry from before the kill", Duration::from_secs(30), |s| {
        let seen: std::collections::HashSet<u64> = s.all().iter().map(|e| e.seq).collect();
        pending.iter().all(|q| seen.contains(q))
    });
    wait_for(&cp, &agent, "an empty outbox", Duration::from_secs(30), |_| outbox_seqs(&state).is_empty());
}

/// Seq numbers in the outbox table (read with the sqlite3 CLI, independently of our code).
fn outbox_seqs(state: &Path) -> Vec<u64> {
    let out = common::sqlite3(&state.join("state.db"), "SELECT group_concat(seq) FROM outbox");
    out.split(',').filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect()
}

#[test]
fn cancel_job_stops_a_blocked_pg_dump_within_five_seconds() {
    let env = s3_env();
    let bucket = new_bucket(&env, "conn-cancel");
    let pg = db::pg();
    let name = db::unique("cancel");
    let admin = |db: &str| {
        postgres::Config::new()
            .host(&pg.host)
            .port(pg.port)
            .user(&pg.user)
            .password(&pg.password)
            .dbname(db)
            .connect(postgres::NoTls)
            .unwrap()
    };
    admin("postgres").batch_execute(&format!("CREATE DATABASE \"{name}\"")).unwrap();
    let mut locker = admin(&name);
    locker.batch_execute("CREATE TABLE t(x int); INSERT INTO t VALUES (1);").unwrap();
    // pg_dump waits for this lock for as long as the transaction lives.
    locker.batch_execute("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE;").unwrap();

    let cp = ControlPlane::plain();
    let dir = tempfile::tempdir().unwrap();
    let target = pb::Target {
        id: "pg".into(),
        r#type: pb::DbType::Postgresql as i32,
        display_name: String::new(),
        connection: Some(pb::ConnectionConfig {
            host: pg.host.clone(),
            port: pg.port.into(),
            database: name.clone(),
            username: pg.user.clone(),
            password_secret_ref: "env:TEST_PG_PASSWORD".into(),
            ..Default::default()
        }),
    };
    cp.state().ack_config = Some(config(9, vec![target], vec![job("pgjob", "pg")]));
    let agent = spawn_agent(
        &cp,
        &dir.path().join("state"),
        &[("TEST_PG_PASSWORD", &pg.password), ("BACKUPY_PUSHED_SECRET_ENV", "TEST_PG_PASSWORD")],
    );
    wait_registered(&cp, &agent, 0);
    let key = "cancel/run-cancel.bkpy";
    cp.send(
        0,
        envelope("c1", run_backup("pgjob", "run-cancel", presigned_creds(&env, &bucket, key), &[2; 32])),
    );
    let pid = db::find_child_of(agent.child.id() as i32, "pg_dump", &name, Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no pg_dump:\n{}", agent.log_text()));
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    cp.send(0, envelope("cancel-1", Payload::CancelJob(pb::CancelJob { job_id: "pgjob".into() })));
    wait_for(&cp, &agent, "CANCELLED", Duration::from_secs(5), |s| terminal(s, "run-cancel").is_some());
    let took = t0.elapsed();
    let t = terminal(&cp.state(), "run-cancel").unwrap();
    assert_eq!(status(&t), pb::JobStatus::Cancelled, "{t:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(cp.state().ack("cancel-1").is_some_and(|a| a.accepted));
    assert!(!Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid), "pg_dump {pid} is still running");
    let _ = locker.batch_execute("ROLLBACK");
    drop(locker);
    let _ = admin("postgres").batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"));
    // Nothing was stored.
    assert!(!env.dir.join(&bucket).join(key).exists());
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
}

#[test]
fn bad_commands_are_refused_with_reasons_and_the_agent_keeps_running() {
    let env = s3_env();
    let bucket = new_bucket(&env, "conn-bad");
    let (dir, db, cp) = setup("bad", 20, 10);
    let mut strange = sqlite_target("strange", &db);
    strange.r#type = 99; // an engine from the future
    let jobs = vec![job("ok", "good"), job("orphan", "missing-target"), job("weird", "strange")];
    cp.state().ack_config = Some(config(10, vec![sqlite_target("good", &db), strange], jobs));
    let agent = spawn_agent(&cp, &dir.path().join("state"), &[]);
    wait_registered(&cp, &agent, 0);
    let creds = |k: &str| presigned_creds(&env, &bucket, k);

    // Unknown job.
    cp.send(0, envelope("u1", run_backup("nope", "run-u1", creds("u1"), &[1; 32])));
    // Job whose target the config does not define.
    cp.send(0, envelope("u2", run_backup("orphan", "run-u2", creds("u2"), &[1; 32])));
    // Target with an unknown engine enum value.
    cp.send(0, envelope("u3", run_backup("weird", "run-u3", creds("u3"), &[1; 32])));
    // A data key of the wrong length.
    cp.send(0, envelope("u4", run_backup("ok", "run-u4", creds("u4"), &[1; 31])));
    // An expired presigned URL.
    let mut expired = creds("u5");
    expired.expires_at_ms = 1000;
    cp.send(0, envelope("u5", run_backup("ok", "run-u5", expired, &[1; 32])));
    // An envelope whose payload tag this agent does not know (tag 98), with a correlation id.
    let unknown = envelope("u6", Payload::Ping(pb::Ping { ts_ms: 1 })).encode_unknown_tag();
    cp.act(0, Action::Raw(tungstenite::Message::binary(unknown)));
    // A text frame.
    cp.act(0, Action::Raw(tungstenite::Message::text("hello")));
    wait_for(&cp, &agent, "every refusal", Duration::from_secs(30), |s| {
        ["run-u1", "run-u2", "run-u3", "run-u4", "run-u5"].iter().all(|r| terminal(s, r).is_some())
    });
    let s = cp.state();
    let reason = |r: &str| {
        let t = terminal(&s, r).unwrap();
        assert_eq!(status(&t), pb::JobStatus::Failed, "{t:?}");
        t.error_message
    };
    assert!(reason("run-u1").contains("unknown job \"nope\""), "{}", reason("run-u1"));
    assert!(reason("run-u2").contains("missing-target"), "{}", reason("run-u2"));
    assert!(reason("run-u3").contains("unknown database type 99"), "{}", reason("run-u3"));
    assert!(reason("run-u4").contains("31 bytes"), "{}", reason("run-u4"));
    assert!(reason("run-u5").contains("expired"), "{}", reason("run-u5"));
    for (cid, accepted) in [("u1", false), ("u2", false), ("u3", true), ("u4", true), ("u5", true)] {
        let ack = s.ack(cid).unwrap_or_else(|| panic!("no ack for {cid}"));
        assert_eq!(ack.accepted, accepted, "{cid}: {ack:?}");
        if !accepted {
            assert!(!ack.reason.is_empty());
        }
    }
    assert_eq!(s.conns.len(), 1, "none of this needed a reconnect");
    drop(s);
    // Still working: a good run after all that.
    cp.send(0, envelope("g", run_backup("ok", "run-good", creds("good"), &[4; 32])));
    wait_for(&cp, &agent, "a good run", Duration::from_secs(30), |s| !s.completed("run-good").is_empty());
}

/// Appends an unknown field (tag 98, length-delimited) to an encoded envelope.
trait UnknownTag {
    fn encode_unknown_tag(&self) -> Vec<u8>;
}

impl UnknownTag for pb::Envelope {
    fn encode_unknown_tag(&self) -> Vec<u8> {
        use prost::Message as _;
        let mut env = self.clone();
        env.payload = None;
        let mut bytes = env.encode_to_vec();
        // field 98, wire type 2: key = (98 << 3) | 2 = 786 → varint 0x92 0x06
        bytes.extend_from_slice(&[0x92, 0x06, 0x03, 0x08, 0x01, 0x10]);
        bytes
    }
}

#[test]
fn config_updates_apply_only_when_newer_and_persist_across_restarts() {
    let (dir, db, cp) = setup("cfg", 10, 10);
    cp.state().ack_config = Some(config(20, vec![sqlite_target("t", &db)], vec![job("j", "t")]));
    cp.state().heartbeat_interval_sec = 1;
    let state = dir.path().join("state");
    // A slow control plane (issue 22): the Register frame is recorded a second after the
    // connection is, so reading it on the strength of the connection alone fails.
    cp.state().register_delay = Duration::from_secs(1);
    let mut agent = spawn_agent(&cp, &state, &[]);
    wait_registered(&cp, &agent, 0);
    let first = cp.state().register(0);
    assert_eq!(first.last_known_config_version, 0);
    assert!(
        first.docker_version.is_empty() && !first.capabilities.iter().any(|c| c == "docker_exec"),
        "{first:?}"
    );
    assert!(first.capabilities.iter().any(|c| c == "sqlite"), "{first:?}");
    // Newer: applied, acked.
    let newer = config(21, vec![sqlite_target("t", &db)], vec![job("j", "t"), job("k", "t")]);
    cp.send(0, envelope("cfg-21", Payload::ConfigUpdate(pb::ConfigUpdate { config: Some(newer) })));
    // Older: kept 21.
    cp.send(
        0,
        envelope(
            "cfg-19",
            Payload::ConfigUpdate(pb::ConfigUpdate { config: Some(config(19, vec![], vec![])) }),
        ),
    );
    // Newer but with a job on a missing target: applied, the problem named in the Ack.
    let broken = config(22, vec![sqlite_target("t", &db)], vec![job("j", "t"), job("x", "gone")]);
    cp.send(0, envelope("cfg-22", Payload::ConfigUpdate(pb::ConfigUpdate { config: Some(broken) })));
    wait_for(&cp, &agent, "three acks", Duration::from_secs(20), |s| {
        ["cfg-21", "cfg-19", "cfg-22"].iter().all(|c| s.ack(c).is_some())
    });
    {
        let s = cp.state();
        assert!(s.ack("cfg-21").unwrap().accepted);
        let old = s.ack("cfg-19").unwrap();
        assert!(!old.accepted && old.reason.contains("older"), "{old:?}");
        let broken = s.ack("cfg-22").unwrap();
        assert!(broken.accepted && broken.reason.contains("\"gone\""), "{broken:?}");
    }
    // Heartbeats carry the applied version.
    wait_for(&cp, &agent, "a heartbeat with version 22", Duration::from_secs(40), |s| {
        s.all().iter().any(|e| matches!(&e.payload, Some(Payload::Heartbeat(h)) if h.config_version == 22))
    });
    assert_eq!(agent.stop().code(), Some(0), "graceful stop exits 0");
    // Restart with the control plane down: the agent works from its stored config, and
    // says which version it has when it registers.
    cp.state().refuse = true;
    let agent = spawn_agent(&cp, &state, &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !agent.log_text().contains("working from the stored config version 22") {
        assert!(Instant::now() < deadline, "{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    cp.state().refuse = false;
    wait_registered(&cp, &agent, 1);
    assert_eq!(cp.state().register(1).last_known_config_version, 22);
}

#[test]
fn the_agent_key_never_reaches_logs_log_events_or_children() {
    let env = s3_env();
    let pg = db::pg();
    let bucket = new_bucket(&env, "conn-secret");
    let (dir, db, cp) = setup("sec", 10, 10);
    let env_dump = dir.path().join("hook-env.txt");
    let mut j = job("hooked", "t");
    j.pre_hooks = vec![format!("env > {}", env_dump.display())];
    j.post_hooks = vec!["echo post-hook-output >&2; exit 3".into()];
    // Today's control plane sends the database password itself as the secret ref.
    let pg_target = |id: &str, password: &str| pb::Target {
        id: id.into(),
        r#type: pb::DbType::Postgresql as i32,
        display_name: String::new(),
        connection: Some(pb::ConnectionConfig {
            host: pg.host.clone(),
            port: pg.port.into(),
            database: "postgres".into(),
            username: pg.user.clone(),
            password_secret_ref: password.into(),
            ..Default::default()
        }),
    };
    let wrong_password = "wrong-Pa55word-planted-4711";
    let targets =
        vec![sqlite_target("t", &db), pg_target("pg", &pg.password), pg_target("pg-bad", wrong_password)];
    let jobs = vec![j, job("pgjob", "pg"), job("pgbad", "pg-bad")];
    cp.state().ack_config = Some(config(30, targets, jobs));
    let agent = spawn_agent(
        &cp,
        &dir.path().join("state"),
        &[("BACKUPY_ALLOW_HOOKS", "true"), ("BACKUPY_LOG_LEVEL", "trace")],
    );
    wait_registered(&cp, &agent, 0);
    let creds = presigned_creds(&env, &bucket, "sec/obj.bkpy");
    let url = creds.presigned_put_url.clone();
    cp.send(0, envelope("c", run_backup("hooked", "run-sec", creds, &[8; 32])));
    let mp = |key: &str| pb::S3UploadCreds {
        multipart: Some(multipart(&env, &env.endpoint, &bucket, key)),
        ..Default::default()
    };
    cp.send(0, envelope("p", run_backup("pgjob", "run-pg", mp("sec/pg.bkpy"), &[8; 32])));
    cp.send(0, envelope("b", run_backup("pgbad", "run-pgbad", mp("sec/pgbad.bkpy"), &[8; 32])));
    wait_for(&cp, &agent, "the runs", Duration::from_secs(60), |s| {
        ["run-sec", "run-pg", "run-pgbad"].iter().all(|r| terminal(s, r).is_some())
    });
    // The failing post-hook and the failed pg run are warnings and errors: LogEvents.
    wait_for(&cp, &agent, "LogEvents", Duration::from_secs(20), |s| {
        s.logs().iter().any(|l| l.message.contains("post-hook-output"))
            && s.logs().iter().any(|l| l.job_id == "pgbad")
    });
    let s = cp.state();
    assert_eq!(status(&terminal(&s, "run-pg").unwrap()), pb::JobStatus::Success);
    let bad = terminal(&s, "run-pgbad").unwrap();
    assert_eq!(status(&bad), pb::JobStatus::Failed);
    let log = agent.log_text();
    assert!(log.contains("TRACE") && log.contains("DEBUG"), "trace logging was on:\n{log}");
    let query = url.split_once('?').unwrap().1;
    let signature = query.split('&').find(|p| p.starts_with("X-Amz-Signature=")).unwrap();
    let planted = [KEY, signature, pg.password.as_str(), wrong_password, env.secret_key.as_str()];
    for secret in planted {
        assert!(!log.contains(secret), "{secret:?} is in the log");
        assert!(!bad.error_message.contains(secret), "{secret:?} is in {bad:?}");
        for l in s.logs() {
            assert!(!l.message.contains(secret), "{secret:?} is in {l:?}");
        }
    }
    for l in s.logs().iter().filter(|l| l.message.contains("post-hook-output")) {
        assert_eq!(l.job_id, "hooked", "{l:?}");
    }
    let hook_env = std::fs::read_to_string(&env_dump).unwrap();
    assert!(hook_env.contains("BACKUPY_RUN_ID=run-sec"), "{hook_env}");
    assert!(!hook_env.contains(KEY) && !hook_env.contains("BACKUPY_AGENT_KEY"), "{hook_env}");
    assert!(!hook_env.contains(&pg.password), "{hook_env}");
}

#[test]
fn pushed_hooks_are_refused_without_the_opt_in() {
    let env = s3_env();
    let bucket = new_bucket(&env, "conn-hooks");
    let (dir, db, cp) = setup("hk", 10, 10);
    let marker = dir.path().join("hook-ran");
    let mut j = job("hooked", "t");
    j.pre_hooks = vec![format!("touch {}", marker.display())];
    cp.state().ack_config = Some(config(31, vec![sqlite_target("t", &db)], vec![j]));
    let agent = spawn_agent(&cp, &dir.path().join("state"), &[]);
    wait_registered(&cp, &agent, 0);
    cp.send(0, envelope("c", run_backup("hooked", "run-hk", presigned_creds(&env, &bucket, "hk"), &[8; 32])));
    wait_for(&cp, &agent, "the run", Duration::from_secs(30), |s| terminal(s, "run-hk").is_some());
    let t = terminal(&cp.state(), "run-hk").unwrap();
    assert_eq!(status(&t), pb::JobStatus::Failed);
    assert!(t.error_message.contains("BACKUPY_ALLOW_HOOKS=true"), "{}", t.error_message);
    assert!(!marker.exists(), "the hook ran");
}

#[test]
fn a_failed_run_is_logged_once() {
    let env = s3_env();
    let bucket = new_bucket(&env, "conn-once");
    let (dir, _db, cp) = setup("once", 1, 10);
    let missing = dir.path().join("missing.db");
    cp.state().ack_config = Some(config(32, vec![sqlite_target("t", &missing)], vec![job("gone", "t")]));
    let agent = spawn_agent(&cp, &dir.path().join("state"), &[]);
    wait_registered(&cp, &agent, 0);
    cp.send(
        0,
        envelope("c", run_backup("gone", "run-gone", presigned_creds(&env, &bucket, "gone"), &[8; 32])),
    );
    wait_for(&cp, &agent, "the run", Duration::from_secs(30), |s| terminal(s, "run-gone").is_some());
    assert_eq!(status(&terminal(&cp.state(), "run-gone").unwrap()), pb::JobStatus::Failed);
    // One error line per failed run (issue 17): the agent's, which carries the job id into
    // LogEvents; the scheduler does not log a submitted run's end as well.
    let log = agent.log_text();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR") && l.contains("missing.db")).collect();
    assert_eq!(errors.len(), 1, "{errors:#?}");
}

#[test]
fn dump_state_reads_the_database_while_the_agent_runs() {
    let (dir, db, cp) = setup("ds", 10, 10);
    let mut t = sqlite_target("t", &db);
    t.connection.as_mut().unwrap().password_secret_ref = "literal:hunter2-dump-state".into();
    cp.state().ack_config = Some(config(40, vec![t], vec![job("j", "t")]));
    let state = dir.path().join("state");
    let agent = spawn_agent(&cp, &state, &[]);
    wait_registered(&cp, &agent, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let dump = |allow: bool| {
        let mut c = common::agent();
        c.arg("dump-state").env("BACKUPY_STATE_DIR", &state).env("BACKUPY_AGENT_KEY", KEY);
        if allow {
            c.arg("--allow-secrets");
        }
        common::run(c)
    };
    loop {
        let out = dump(false);
        assert!(out.status.success(), "{}", common::text(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if v["config"]["version"] == 40 && v["session"]["session_id"] == "session-0" {
            let text = common::text(&out.stdout);
            assert!(!text.contains("hunter2"), "{text}");
            assert!(v["outbox"]["entries"].is_number());
            break;
        }
        assert!(Instant::now() < deadline, "{v}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = dump(true);
    assert!(common::text(&out.stdout).contains("literal:hunter2-dump-state"));
    let mut c = common::agent();
    c.arg("dump-state").env("BACKUPY_STATE_DIR", dir.path().join("nowhere"));
    let out = common::run(c);
    assert_eq!(out.status.code(), Some(1));
    assert!(common::text(&out.stderr).contains("BACKUPY_STATE_DIR"));
    drop(agent);
    let _ = std::io::stdout().flush();
}

#[test]
fn health_checks_report_through_the_outbox_and_run_health_check_probes_at_once() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let open = listener.local_addr().unwrap().port();
    let (closed, _closed_claim) = common::reserve_port();
    let cp = ControlPlane::plain();
    let dir = tempfile::tempdir().unwrap();
    let check = |id: &str, port: u16| pb::HealthCheckSpec {
        id: id.into(),
        name: id.into(),
        r#type: pb::CheckType::TcpCheck as i32,
        target: format!("127.0.0.1:{port}"),
        interval_sec: 3600,
        timeout_sec: 2,
        expected_status: 0,
    };
    let mut cfg = config(50, vec![], vec![]);
    cfg.health_checks = vec![check("up", open), check("down", closed)];
    cp.state().ack_config = Some(cfg);
    let agent = spawn_agent(&cp, &dir.path().join("state"), &[]);
    let results = |s: &common::control_plane::Shared, id: &str| -> Vec<pb::HealthCheckResult> {
        s.all()
            .into_iter()
            .filter_map(|e| match &e.payload {
                Some(Payload::HealthResult(r)) if r.check_id == id => Some(r.clone()),
                _ => None,
            })
            .collect()
    };
    wait_for(&cp, &agent, "the first results", Duration::from_secs(20), |s| {
        !results(s, "up").is_empty() && !results(s, "down").is_empty()
    });
    {
        let s = cp.state();
        assert!(results(&s, "up")[0].ok, "{:?}", results(&s, "up"));
        let down = &results(&s, "down")[0];
        assert!(!down.ok && !down.error.is_empty(), "{down:?}");
    }
    // The interval is an hour: a second result for "up" can only come from RunHealthCheck.
    cp.send(0, envelope("probe-now", Payload::RunHealthCheck(pb::RunHealthCheck { check_id: "up".into() })));
    cp.send(
        0,
        envelope("probe-what", Payload::RunHealthCheck(pb::RunHealthCheck { check_id: "nope".into() })),
    );
    wait_for(&cp, &agent, "the probe on demand", Duration::from_secs(10), |s| results(s, "up").len() >= 2);
    let s = cp.state();
    assert!(s.ack("probe-now").unwrap().accepted);
    let refused = s.ack("probe-what").unwrap();
    assert!(!refused.accepted && refused.reason.contains("unknown health check"), "{refused:?}");
}

#[test]
fn max_parallel_jobs_keeps_the_next_run_queued_and_heartbeats_name_the_active_run() {
    let env = s3_env();
    let bucket = new_bucket(&env, "conn-par");
    let (dir, db, cp) = setup("par", 10, 10);
    let mut j = job("j", "t");
    j.pre_hooks = vec!["sleep 1.5".into()];
    let mut cfg = config(60, vec![sqlite_target("t", &db)], vec![j]);
    cfg.advanced = Some(pb::AdvancedSettings {
        max_parallel_jobs: 1,
        log_level: String::new(),
        auto_update_enabled: false,
    });
    cp.state().ack_config = Some(cfg);
    cp.state().heartbeat_interval_sec = 1;
    let agent = spawn_agent(&cp, &dir.path().join("state"), &[("BACKUPY_ALLOW_HOOKS", "true")]);
    wait_registered(&cp, &agent, 0);
    cp.send(0, envelope("a", run_backup("j", "run-a", presigned_creds(&env, &bucket, "a"), &[1; 32])));
    cp.send(0, envelope("b", run_backup("j", "run-b", presigned_creds(&env, &bucket, "b"), &[1; 32])));
    wait_for(&cp, &agent, "both runs", Duration::from_secs(30), |s| {
        terminal(s, "run-a").is_some() && terminal(s, "run-b").is_some()
    });
    let s = cp.state();
    let when = |run: &str, st: pb::JobStatus| {
        s.conns[0]
            .received
            .iter()
            .position(|r| matches!(&r.envelope.payload, Some(Payload::JobUpdate(u)) if u.run_id == run && status(u) == st))
            .unwrap_or_else(|| panic!("no {st:?} for {run}"))
    };
    assert!(when("run-b", pb::JobStatus::Running) > when("run-a", pb::JobStatus::Success), "b waited for a");
    assert!(
        when("run-b", pb::JobStatus::Queued) < when("run-a", pb::JobStatus::Success),
        "b was queued meanwhile"
    );
    let beat = s.all().into_iter().find_map(|e| match &e.payload {
        Some(Payload::Heartbeat(h)) if h.active_job_ids == ["run-a"] => Some(h.clone()),
        _ => None,
    });
    let beat = beat.expect("a heartbeat during run-a names it");
    let m = beat.metrics.unwrap();
    assert!(m.mem_total_bytes > 0 && m.disk_total_bytes > 0, "{m:?}");
    assert_eq!(m.queue_depth, 1, "run-b waits: {m:?}");
}

#[test]
fn self_update_is_refused_with_a_reason_and_log_level_changes_at_run_time() {
    let (dir, _db, cp) = setup("su", 1, 1);
    let mut cfg = config(70, vec![], vec![]);
    // "info" forwards info lines as LogEvents too, from the moment the config applies.
    cfg.advanced = Some(pb::AdvancedSettings {
        max_parallel_jobs: 0,
        log_level: "info".into(),
        auto_update_enabled: true,
    });
    cp.state().ack_config = Some(cfg);
    let agent = spawn_agent(&cp, &dir.path().join("state"), &[]);
    wait_for(&cp, &agent, "an info LogEvent", Duration::from_secs(20), |s| {
        s.logs()
            .iter()
            .any(|l| l.message.contains("applied config version 70") && l.level == pb::LogLevel::Info as i32)
    });
    let update = pb::SelfUpdate {
        target_version: "99.0.0".into(),
        binary_url: "http://127.0.0.1:1/agent".into(),
        sha256: "00".into(),
        cosign_signature: vec![],
        force: false,
    };
    cp.send(0, envelope("su-1", Payload::SelfUpdate(update)));
    wait_for(&cp, &agent, "the Ack", Duration::from_secs(10), |s| s.ack("su-1").is_some());
    let ack = cp.state().ack("su-1").unwrap();
    assert!(!ack.accepted && !ack.reason.is_empty(), "{ack:?}");
}

#[test]
fn readyz_follows_the_connection_and_metrics_show_its_state() {
    let (dir, _db, cp) = setup("ready", 1, 1);
    cp.state().ack_config = Some(config(80, vec![], vec![]));
    let (port, _port_claim) = common::reserve_port();
    let addr = format!("127.0.0.1:{port}");
    let agent = spawn_agent(&cp, &dir.path().join("state"), &[("BACKUPY_METRICS_LISTEN_ADDR", &addr)]);
    let http = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
    let get = |path: &str| -> (u16, String) {
        match http.get(&format!("http://{addr}{path}")).call() {
            Ok(mut r) => (r.status().as_u16(), r.body_mut().read_to_string().unwrap_or_default()),
            Err(_) => (0, String::new()),
        }
    };
    let until = |path: &str, code: u16| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (c, body) = get(path);
            if c == code {
                return body;
            }
            assert!(Instant::now() < deadline, "{path} stayed {c}:\n{}", agent.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    until("/readyz", 200);
    let metrics = until("/metrics", 200);
    let scrape = prometheus_parse::Scrape::parse(metrics.lines().map(|l| Ok(l.to_string()))).unwrap();
    let value = |name: &str, label: Option<(&str, &str)>| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
                prometheus_parse::Value::Counter(v) => v,
                _ => f64::NAN,
            })
    };
    assert_eq!(value("backupy_agent_connection_state", Some(("state", "connected"))), Some(1.0));
    assert_eq!(value("backupy_agent_config_version", None), Some(80.0));
    cp.state().refuse = true;
    cp.act(0, Action::Drop);
    until("/readyz", 503);
    let metrics = until("/metrics", 200);
    assert!(metrics.contains("backupy_agent_connection_state{state=\"disconnected\"} 1"), "{metrics}");
    assert!(metrics.contains("backupy_agent_reconnects_total 1"), "{metrics}");
}

#[test]
fn a_docker_socket_that_answers_adds_its_version_the_capability_and_discovery_reports() {
    let (dir, _db, cp) = setup("dock", 1, 1);
    let socket = dir.path().join("docker.sock");
    let standin = docker::StandIn::start(&socket, |_method, path| match path {
        "/_ping" => docker::Reply {
            status: 200,
            headers: vec![("Api-Version".into(), "1.43".into())],
            body: "OK".into(),
        },
        "/version" => docker::Reply::json(
            serde_json::json!({ "Version": "24.0.7", "ApiVersion": "1.43", "MinAPIVersion": "1.12" }),
        ),
        p if p.ends_with("/containers/json") => docker::Reply::json(serde_json::json!([])),
        _ => docker::Reply::status(404, "page not found"),
    });
    let agent =
        spawn_agent(&cp, &dir.path().join("state"), &[("BACKUPY_DOCKER_SOCKET", socket.to_str().unwrap())]);
    wait_for(&cp, &agent, "a DiscoveryReport", Duration::from_secs(20), |s| {
        s.all().iter().any(|e| matches!(e.payload, Some(Payload::Discovery(_))))
    });
    let r = cp.state().register(0);
    assert_eq!(r.docker_version, "24.0.7");
    assert!(r.capabilities.iter().any(|c| c == "docker_exec"), "{r:?}");
    standin.stop();
}

#[test]
fn readyz_turns_503_as_soon_as_a_shutdown_starts_while_a_run_has_its_grace() {
    let env = s3_env();
    let bucket = new_bucket(&env, "conn-ready");
    let (dir, db, cp) = setup("ready", 1, 10);
    let marker = dir.path().join("hook-started");
    let mut j = job("slow", "t");
    j.pre_hooks = vec![format!("touch {}; sleep 60", marker.display())];
    cp.state().ack_config = Some(config(33, vec![sqlite_target("t", &db)], vec![j]));
    let (port, _claim) = common::reserve_port();
    let addr = format!("127.0.0.1:{port}");
    let mut agent = spawn_agent(
        &cp,
        &dir.path().join("state"),
        &[("BACKUPY_ALLOW_HOOKS", "true"), ("BACKUPY_METRICS_LISTEN_ADDR", &addr)],
    );
    wait_registered(&cp, &agent, 0);
    cp.send(
        0,
        envelope("c", run_backup("slow", "run-slow", presigned_creds(&env, &bucket, "slow"), &[8; 32])),
    );
    let t0 = Instant::now();
    while !marker.exists() {
        assert!(t0.elapsed() < Duration::from_secs(20), "the slow run never started:\n{}", agent.log_tail());
        std::thread::sleep(Duration::from_millis(50));
    }
    let readyz = format!("http://{addr}/readyz");
    assert_eq!(common::http::get(&readyz).0, 200, "connected and taking runs:\n{}", agent.log_tail());

    // SAFETY: kill(2) on the agent this test started.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGTERM) };
    let t1 = Instant::now();
    loop {
        let (status, _) = common::http::get(&readyz);
        if status == 503 {
            break;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(5),
            "/readyz still {status} {:?} into a 60 s grace:\n{}",
            t1.elapsed(),
            agent.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(agent.child.try_wait().unwrap().is_none(), "the agent is still in its grace period");
    // A second SIGTERM ends the grace: the run (and its hook's sleep) is cancelled.
    // SAFETY: as above.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGTERM) };
    let t2 = Instant::now();
    while agent.child.try_wait().unwrap().is_none() {
        assert!(
            t2.elapsed() < Duration::from_secs(15),
            "no exit after a second SIGTERM:\n{}",
            agent.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
