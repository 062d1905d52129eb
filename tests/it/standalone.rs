//! `backupy-agent run`: scheduled backups to the S3 server with retention, one agent per
//! state directory, and a graceful SIGTERM that cancels a stuck upload cleanly.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::s3::*;
use crate::common::*;

fn config(
    dir: &Path,
    env: &S3Env,
    endpoint: &str,
    bucket: &str,
    extra_job: &str,
    top: &str,
) -> std::path::PathBuf {
    let (_key, recipient) = keygen(dir);
    let p = dir.join("backupy.toml");
    std::fs::write(
        &p,
        format!(
            r#"state_dir = "./state"
{top}
[storage.s3]
endpoint = "{endpoint}"
region = "{region}"
bucket = "{bucket}"
access_key_id = "env:TEST_S3_KEY"
secret_access_key = "env:TEST_S3_SECRET"
part_size_mib = 5
[encryption]
recipient = "{recipient}"
[[targets]]
id = "app"
type = "sqlite"
path = "app.db"
[[jobs]]
id = "often"
target = "app"
cron = "*/2 * * * * *"
{extra_job}
"#,
            region = env.region
        ),
    )
    .unwrap();
    p
}

struct Agent {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Agent {
    fn start(config: &Path, env: &S3Env) -> Agent {
        let mut c = agent();
        c.args(["run", "--config"])
            .arg(config)
            .env("TEST_S3_KEY", &env.access_key)
            .env("TEST_S3_SECRET", &env.secret_key)
            .stderr(Stdio::piped())
            .stdout(Stdio::null());
        let mut child = c.spawn().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (stderr, l) = (child.stderr.take().unwrap(), log.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // A test that failed holding the log has reported that already.
                let mut g = l.lock().unwrap_or_else(|e| e.into_inner());
                g.push_str(&line);
                g.push('\n');
            }
        });
        Agent { child, log }
    }

    fn wait_for(&self, what: &str, count: usize, timeout: Duration) {
        let t0 = Instant::now();
        while self.log.lock().unwrap().matches(what).count() < count {
            assert!(t0.elapsed() < timeout, "waited {timeout:?} for {count}× {what:?}; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// SIGTERM, then the exit status and how long the agent took to exit.
    fn terminate(mut self, limit: Duration) -> (std::process::ExitStatus, Duration, String) {
        let t0 = Instant::now();
        // SAFETY: kill(2) on the child we spawned.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100));
                return (st, t0.elapsed(), self.log());
            }
            if t0.elapsed() > limit {
                let _ = self.child.kill();
                panic!("the agent did not exit within {limit:?} of SIGTERM; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn small_db(dir: &Path) {
    rusqlite::Connection::open(dir.join("app.db"))
        .unwrap()
        .execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1), (2);")
        .unwrap();
}

#[test]
fn run_backs_up_on_schedule_and_keeps_the_newest_two() {
    let env = s3_env();
    let bucket = new_bucket(&env, "run");
    let dir = tempfile::tempdir().unwrap();
    small_db(dir.path());
    let cfg = config(dir.path(), &env, &env.endpoint, &bucket, "keep_last = 2", "");
    let a = Agent::start(&cfg, &env);
    a.wait_for(" succeeded\n", 3, Duration::from_secs(40));
    let (status, _, log) = a.terminate(Duration::from_secs(65));
    assert!(status.success(), "exit 0 after a graceful shutdown: {status:?}\n{log}");
    assert!(log.contains("retention deleted"), "{log}");

    let objects = files_under(&env.dir.join(&bucket));
    let data: Vec<_> = objects.iter().filter(|k| k.ends_with(".bkpy")).collect();
    let manifests: Vec<_> = objects.iter().filter(|k| k.ends_with(".json")).collect();
    assert_eq!((data.len(), manifests.len()), (2, 2), "{objects:?}");

    let mut c = agent();
    c.args(["list", "--json", "--config"])
        .arg(&cfg)
        .env("TEST_S3_KEY", &env.access_key)
        .env("TEST_S3_SECRET", &env.secret_key);
    let out = run(c);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2);
    // Those two are the newest runs recorded as successful in the state database.
    let db = rusqlite::Connection::open(dir.path().join("state/state.db")).unwrap();
    let newest: Vec<String> = db
        .prepare("SELECT run_id FROM runs WHERE status = 'success' ORDER BY started_at DESC LIMIT 2")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut listed: Vec<String> =
        list.as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_string()).collect();
    listed.sort();
    let mut newest_sorted = newest.clone();
    newest_sorted.sort();
    assert_eq!(listed, newest_sorted);
}

#[test]
fn a_second_agent_on_the_same_state_dir_refuses_to_start() {
    let env = s3_env();
    let bucket = new_bucket(&env, "lock");
    let dir = tempfile::tempdir().unwrap();
    small_db(dir.path());
    let cfg = config(dir.path(), &env, &env.endpoint, &bucket, "", "");
    let first = Agent::start(&cfg, &env);
    first.wait_for("standalone agent running", 1, Duration::from_secs(20));
    let mut c = agent();
    c.args(["run", "--config"])
        .arg(&cfg)
        .env("TEST_S3_KEY", &env.access_key)
        .env("TEST_S3_SECRET", &env.secret_key);
    let out = run(c);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("agent.lock"), "{}", text(&out.stderr));
    let (status, _, log) = first.terminate(Duration::from_secs(65));
    assert!(status.success(), "{log}");
}

#[test]
fn sigterm_during_a_stuck_upload_cancels_it_within_the_grace_period() {
    let env = s3_env();
    let bucket = new_bucket(&env, "term");
    // Every part upload hangs: the run is stuck in its upload when SIGTERM comes.
    let proxy = FaultProxy::start(&env.endpoint, |req, _| {
        if req.method == "PUT" && req.url.contains("partNumber=") {
            Fault::Stall(Duration::from_secs(30))
        } else {
            Fault::Forward
        }
    });
    let dir = tempfile::tempdir().unwrap();
    // 12 MiB of incompressible rows: more than two 5 MiB parts.
    let conn = rusqlite::Connection::open(dir.path().join("app.db")).unwrap();
    conn.execute_batch("CREATE TABLE t(b BLOB);").unwrap();
    for _ in 0..12 {
        conn.execute("INSERT INTO t VALUES (randomblob(1048576))", []).unwrap();
    }
    drop(conn);
    let cfg = config(
        dir.path(),
        &env,
        &proxy.endpoint,
        &bucket,
        "compression = \"none\"",
        "shutdown_grace_sec = 1",
    );
    let a = Agent::start(&cfg, &env);
    let t0 = Instant::now();
    while !proxy.requests().iter().any(|r| r.url.contains("partNumber=")) {
        assert!(t0.elapsed() < Duration::from_secs(30), "no part upload started; log:\n{}", a.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, took, log) = a.terminate(Duration::from_secs(1 + 5));
    assert!(status.success(), "{status:?}\n{log}");
    assert!(took <= Duration::from_secs(6), "exited {took:?} after SIGTERM");
    assert!(
        proxy.requests().iter().any(|r| r.method == "DELETE" && r.url.contains("uploadId=")),
        "upload aborted; log:\n{log}"
    );
    assert!(open_uploads(&env, &bucket).is_empty(), "no incomplete multipart upload remains");
    let db = rusqlite::Connection::open(dir.path().join("state/state.db")).unwrap();
    let status: String =
        db.query_row("SELECT status FROM runs ORDER BY started_at LIMIT 1", [], |r| r.get(0)).unwrap();
    assert_eq!(status, "cancelled");
}
