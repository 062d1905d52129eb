//! SIGINT and SIGTERM on the one-shot commands (issue 23): `backup` to a directory and to
//! S3, from PostgreSQL over TCP and over its UNIX socket, and `backupy-decrypt`. Each
//! test signals the real binary mid-run, then checks the exit status (130/143), that
//! nothing is left in storage or open on the S3 server, that no dump child is left, and
//! the run's record in `state.db`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::common::s3::*;
use crate::common::*;

/// Sends `signal` to `child` and waits for it to exit, at most `limit`.
fn signal_and_wait(child: &mut Child, signal: i32, limit: Duration) -> (ExitStatus, Duration) {
    let t0 = Instant::now();
    // SAFETY: kill(2) on a child this test spawned and has not reaped.
    unsafe { libc::kill(child.id() as i32, signal) };
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return (st, t0.elapsed());
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the process did not exit within {limit:?} of signal {signal}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_until(what: &str, timeout: Duration, log: &Path, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "waited {timeout:?} for {what}; log:\n{}", log_tail(log));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The runs recorded in `state_dir/state.db`: (job, status, error).
fn runs(state_dir: &Path) -> Vec<(String, String, String)> {
    let db = rusqlite::Connection::open(state_dir.join("state.db")).unwrap();
    let mut stmt = db.prepare("SELECT job_id, status, error FROM runs ORDER BY started_at").unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap().map(Result::unwrap).collect()
}

fn is_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // A zombie has exited; its state letter is Z.
        Ok(s) => s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')),
    }
}

/// A PostgreSQL database whose only table another session holds locked: `pg_dump` starts,
/// then waits for the lock for as long as the test wants, so the signal always comes
/// while the dump child is running and the object is open in storage.
struct LockedPg {
    name: String,
    pg: db::Pg,
    locker: postgres::Client,
}

impl LockedPg {
    fn new() -> LockedPg {
        let pg = db::pg();
        let name = db::unique("sig");
        let mut admin = Self::connect(&pg, "postgres");
        admin.batch_execute(&format!("CREATE DATABASE \"{name}\"")).unwrap();
        // The table is committed first: created in the locking transaction, it would be
        // invisible to pg_dump, which would then dump an empty database at once.
        Self::connect(&pg, &name).batch_execute("CREATE TABLE t(x int); INSERT INTO t VALUES (1);").unwrap();
        let mut locker = Self::connect(&pg, &name);
        locker.batch_execute("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE;").unwrap();
        LockedPg { name, pg, locker }
    }

    fn connect(pg: &db::Pg, db: &str) -> postgres::Client {
        postgres::Config::new()
            .host(&pg.host)
            .port(pg.port)
            .user(&pg.user)
            .password(&pg.password)
            .dbname(db)
            .connect(postgres::NoTls)
            .unwrap()
    }

    /// The `[[targets]]` entry, over TCP or the server's UNIX socket.
    fn target(&self, over_socket: bool) -> String {
        let place = if over_socket {
            // The socket file's name carries the port.
            format!("socket = \"{}\"\nport = {}", self.pg.socket_dir, self.pg.port)
        } else {
            format!("host = \"{}\"\nport = {}", self.pg.host, self.pg.port)
        };
        format!(
            "[[targets]]\nid = \"pg\"\ntype = \"postgresql\"\n{place}\ndatabase = \"{}\"\nusername = \"{}\"\n\
             password = \"env:TEST_PG_PASSWORD\"\n",
            self.name, self.pg.user
        )
    }
}

impl Drop for LockedPg {
    fn drop(&mut self) {
        let _ = self.locker.batch_execute("ROLLBACK");
        let _ = Self::connect(&self.pg, "postgres")
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name));
    }
}

/// `backup --config` with the agent's stderr in `dir/agent.log`.
fn spawn_backup(config: &Path, log: &Path, envs: &[(&str, &str)]) -> Child {
    let mut c = agent();
    // stdout (the result lines) goes to the log too: a run that finished despite the
    // signal shows there.
    let file = std::fs::File::create(log).unwrap();
    c.args(["backup", "--config"]).arg(config).stdout(file.try_clone().unwrap()).stderr(file);
    for (k, v) in envs {
        c.env(k, v);
    }
    c.spawn().unwrap()
}

fn partial_files(dir: &Path) -> Vec<String> {
    files_under(dir).into_iter().filter(|f| f.contains(".partial") || f.ends_with(".bkpy")).collect()
}

/// `backup` of a PostgreSQL job into a directory, stopped by `signal` while `pg_dump` runs.
fn backup_to_a_directory_stops_on(signal: i32, over_socket: bool) {
    let db = LockedPg::new();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("backups");
    let config = dir.path().join("backupy.toml");
    let (_key, recipient) = keygen(dir.path());
    std::fs::write(
        &config,
        format!(
            "state_dir = \"./state\"\n[storage]\ndir = \"./backups\"\n[encryption]\nrecipient = \"{recipient}\"\n{}\n\
             [[jobs]]\nid = \"pgjob\"\ntarget = \"pg\"\n",
            db.target(over_socket)
        ),
    )
    .unwrap();
    let log = dir.path().join("agent.log");
    let mut child = spawn_backup(&config, &log, &[("TEST_PG_PASSWORD", &db.pg.password)]);
    let pid = child.id() as i32;
    let dump = db::find_child_of(pid, "pg_dump", "", Duration::from_secs(20))
        .unwrap_or_else(|| panic!("no pg_dump child; log:\n{}", log_tail(&log)));
    // The object is open in storage while pg_dump waits for the lock.
    wait_until("the object being written", Duration::from_secs(20), &log, || {
        !partial_files(&store).is_empty()
    });

    let (status, took) = signal_and_wait(&mut child, signal, Duration::from_secs(15));
    let text = log_tail(&log);
    assert_eq!(status.code(), Some(128 + signal), "exit status; log:\n{text}");
    assert!(took < Duration::from_secs(10), "took {took:?} to stop; log:\n{text}");
    assert!(text.contains("cancelled and recorded"), "one line saying what was cleaned up; log:\n{text}");
    assert_eq!(partial_files(&store), Vec::<String>::new(), "nothing left in storage; log:\n{text}");
    assert!(is_gone(dump), "pg_dump {dump} is still running; log:\n{text}");
    let recorded = runs(&dir.path().join("state"));
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!((recorded[0].0.as_str(), recorded[0].1.as_str()), ("pgjob", "cancelled"), "{recorded:?}");
}

#[test]
fn sigint_stops_a_backup_over_tcp_to_a_directory_and_leaves_nothing() {
    backup_to_a_directory_stops_on(libc::SIGINT, false);
}

#[test]
fn sigterm_stops_a_backup_over_the_unix_socket_and_leaves_nothing() {
    backup_to_a_directory_stops_on(libc::SIGTERM, true);
}

/// A job backing up 12 MiB of incompressible SQLite rows to S3 through `proxy`.
fn s3_config(dir: &Path, env: &S3Env, endpoint: &str, bucket: &str) -> PathBuf {
    let conn = rusqlite::Connection::open(dir.join("app.db")).unwrap();
    conn.execute_batch("CREATE TABLE t(b BLOB);").unwrap();
    for _ in 0..12 {
        conn.execute("INSERT INTO t VALUES (randomblob(1048576))", []).unwrap();
    }
    drop(conn);
    let (_key, recipient) = keygen(dir);
    let p = dir.join("backupy.toml");
    std::fs::write(
        &p,
        format!(
            "state_dir = \"./state\"\n[storage.s3]\nendpoint = \"{endpoint}\"\nregion = \"{}\"\nbucket = \"{bucket}\"\n\
             access_key_id = \"env:TEST_S3_KEY\"\nsecret_access_key = \"env:TEST_S3_SECRET\"\npart_size_mib = 5\n\
             [encryption]\nrecipient = \"{recipient}\"\n[[targets]]\nid = \"app\"\ntype = \"sqlite\"\npath = \"app.db\"\n\
             [[jobs]]\nid = \"s3job\"\ntarget = \"app\"\ncompression = \"none\"\n",
            env.region
        ),
    )
    .unwrap();
    p
}

#[test]
fn sigterm_during_a_stuck_s3_upload_aborts_it_and_exits_143() {
    let env = s3_env();
    let bucket = new_bucket(&env, "sig-s3");
    // Every part upload hangs: the backup is mid-upload when the signal comes.
    let proxy = FaultProxy::start(&env.endpoint, |req, _| {
        if req.method == "PUT" && req.url.contains("partNumber=") {
            Fault::Stall(Duration::from_secs(60))
        } else {
            Fault::Forward
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let config = s3_config(dir.path(), &env, &proxy.endpoint, &bucket);
    let log = dir.path().join("agent.log");
    let mut child =
        spawn_backup(&config, &log, &[("TEST_S3_KEY", &env.access_key), ("TEST_S3_SECRET", &env.secret_key)]);
    wait_until("a part upload", Duration::from_secs(30), &log, || {
        proxy.requests().iter().any(|r| r.url.contains("partNumber="))
    });
    let (status, took) = signal_and_wait(&mut child, libc::SIGTERM, Duration::from_secs(15));
    let text = log_tail(&log);
    assert_eq!(status.code(), Some(143), "log:\n{text}");
    assert!(took < Duration::from_secs(10), "took {took:?}; log:\n{text}");
    assert!(
        proxy.requests().iter().any(|r| r.method == "DELETE" && r.url.contains("uploadId=")),
        "the upload was aborted; log:\n{text}"
    );
    assert!(open_uploads(&env, &bucket).is_empty(), "no multipart upload left open");
    assert!(
        files_under(&env.dir.join(&bucket)).is_empty(),
        "nothing stored: {:?}",
        files_under(&env.dir.join(&bucket))
    );
    let recorded = runs(&dir.path().join("state"));
    assert_eq!(recorded.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(), ["cancelled"], "{recorded:?}");
}

#[test]
fn cleanup_is_bounded_and_a_second_signal_exits_at_once() {
    let env = s3_env();
    let bucket = new_bucket(&env, "sig-bound");
    // Parts and the abort both hang: cleanup cannot finish on its own.
    let proxy = FaultProxy::start(&env.endpoint, |req, _| {
        if req.url.contains("partNumber=") || req.method == "DELETE" {
            Fault::Stall(Duration::from_secs(60))
        } else {
            Fault::Forward
        }
    });
    for second_signal in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let config = s3_config(dir.path(), &env, &proxy.endpoint, &bucket);
        let log = dir.path().join("agent.log");
        let mut child = spawn_backup(
            &config,
            &log,
            &[("TEST_S3_KEY", &env.access_key), ("TEST_S3_SECRET", &env.secret_key)],
        );
        let parts_before = proxy.requests().iter().filter(|r| r.url.contains("partNumber=")).count();
        wait_until("a part upload", Duration::from_secs(30), &log, || {
            proxy.requests().iter().filter(|r| r.url.contains("partNumber=")).count() > parts_before
        });
        if second_signal {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            wait_until("the first signal's line", Duration::from_secs(5), &log, || {
                log_tail(&log).contains("a second signal exits at once")
            });
            let (status, took) = signal_and_wait(&mut child, libc::SIGINT, Duration::from_secs(5));
            assert_eq!(status.code(), Some(130), "log:\n{}", log_tail(&log));
            assert!(took < Duration::from_secs(2), "the second signal took {took:?}");
        } else {
            let (status, took) = signal_and_wait(&mut child, libc::SIGTERM, Duration::from_secs(20));
            let text = log_tail(&log);
            assert_eq!(status.code(), Some(143), "log:\n{text}");
            // The bound is 10 s after the first signal; allow for a loaded machine's scheduling.
            assert!(
                took >= Duration::from_secs(9) && took < Duration::from_secs(13),
                "took {took:?}; log:\n{text}"
            );
            assert!(text.contains("cleanup did not finish within 10 s"), "log:\n{text}");
        }
    }
}

#[test]
fn decrypt_stopped_by_sigint_or_sigterm_leaves_no_partial_output() {
    let dir = tempfile::tempdir().unwrap();
    // A real object: a backup of 4 MiB of random rows, v2 to a directory.
    let conn = rusqlite::Connection::open(dir.path().join("app.db")).unwrap();
    conn.execute_batch("CREATE TABLE t(b BLOB);").unwrap();
    for _ in 0..4 {
        conn.execute("INSERT INTO t VALUES (randomblob(1048576))", []).unwrap();
    }
    drop(conn);
    let (key, recipient) = keygen(dir.path());
    let config = dir.path().join("backupy.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"./state\"\n[storage]\ndir = \"./backups\"\n[encryption]\nrecipient = \"{recipient}\"\n\
             [[targets]]\nid = \"app\"\ntype = \"sqlite\"\npath = \"app.db\"\n[[jobs]]\nid = \"j\"\ntarget = \"app\"\n"
        ),
    )
    .unwrap();
    let out = run({
        let mut c = agent();
        c.args(["backup", "--config"]).arg(&config);
        c
    });
    assert!(out.status.success(), "{}", text(&out.stderr));
    let object = files_under(&dir.path().join("backups"))
        .into_iter()
        .find(|f| f.ends_with(".bkpy"))
        .expect("the backup's object");
    let bytes = std::fs::read(dir.path().join("backups").join(&object)).unwrap();

    for signal in [libc::SIGINT, libc::SIGTERM] {
        let out_dir = tempfile::tempdir().unwrap();
        let target = out_dir.path().join("app.sqlite");
        let log = out_dir.path().join("decrypt.log");
        let mut child = decrypt()
            .args(["--in", "-", "--out"])
            .arg(&target)
            .arg("--identity")
            .arg(&key)
            .arg("--no-verify-sha256")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        // Half the object, and the pipe stays open: decrypt is mid-stream.
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&bytes[..bytes.len() / 2]).unwrap();
        wait_until("the partial output", Duration::from_secs(10), &log, || {
            !files_under(out_dir.path()).iter().all(|f| f == "decrypt.log")
        });
        let (status, _) = signal_and_wait(&mut child, signal, Duration::from_secs(15));
        let text = log_tail(&log);
        assert_eq!(status.code(), Some(128 + signal), "log:\n{text}");
        assert_eq!(files_under(out_dir.path()), ["decrypt.log"], "no output, partial or whole; log:\n{text}");
        drop(stdin);
    }
}

#[test]
fn help_of_each_interruptible_command_lists_130_and_143() {
    let help = |mut c: std::process::Command, args: &[&str]| {
        let out = run({
            c.args(args);
            c
        });
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    let mut helps: Vec<(String, String)> = ["backup", "list", "verify", "restore", "prune"]
        .iter()
        .map(|cmd| (cmd.to_string(), help(agent(), &[cmd, "--help"])))
        .collect();
    helps.push(("backupy-decrypt".into(), help(decrypt(), &["--help"])));
    for (cmd, h) in helps {
        let codes = h.split_once("Exit codes:").unwrap_or_else(|| panic!("{cmd}: no exit codes:\n{h}")).1;
        for code in ["130", "143"] {
            assert!(
                codes.lines().any(|l| l.trim_start().starts_with(&format!("{code} "))),
                "{cmd}: exit code {code} is not listed:\n{h}"
            );
        }
    }
}

/// `restore --force` into a PostgreSQL database whose table another session holds
/// locked: pg_restore's `DROP TABLE` waits, so the signal always comes mid-restore.
fn restore_into_postgresql_stops_on(signal: i32) {
    let pg = db::pg();
    let (src, dst) = (db::unique("sigsrc"), db::unique("sigdst"));
    let mut admin = LockedPg::connect(&pg, "postgres");
    for name in [&src, &dst] {
        admin.batch_execute(&format!("CREATE DATABASE \"{name}\"")).unwrap();
    }
    LockedPg::connect(&pg, &src)
        .batch_execute("CREATE TABLE t(x int); INSERT INTO t SELECT generate_series(1, 1000);")
        .unwrap();
    LockedPg::connect(&pg, &dst).batch_execute("CREATE TABLE t(x int); INSERT INTO t VALUES (42);").unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (_key, recipient) = keygen(dir.path());
    let config = dir.path().join("backupy.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"./state\"\n[storage]\ndir = \"./backups\"\n[encryption]\nrecipient = \"{recipient}\"\n\
             [[targets]]\nid = \"pg\"\ntype = \"postgresql\"\nhost = \"{}\"\nport = {}\ndatabase = \"{src}\"\n\
             username = \"{}\"\npassword = \"env:TEST_PG_PASSWORD\"\n[[jobs]]\nid = \"pgjob\"\ntarget = \"pg\"\n",
            pg.host, pg.port, pg.user
        ),
    )
    .unwrap();
    let out = run({
        let mut c = agent();
        c.args(["backup", "--config"]).arg(&config).env("TEST_PG_PASSWORD", &pg.password);
        c
    });
    assert!(out.status.success(), "backup: {}", text(&out.stderr));

    let mut locker = LockedPg::connect(&pg, &dst);
    locker.batch_execute("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE;").unwrap();
    let log = dir.path().join("restore.log");
    let file = std::fs::File::create(&log).unwrap();
    let mut child = agent()
        .args(["restore", "--backup", "latest", "--force", "--config"])
        .arg(&config)
        .arg("--to")
        .arg(format!("postgres://{}@{}:{}/{dst}", pg.user, pg.host, pg.port))
        .env("TEST_PG_PASSWORD", &pg.password)
        .env("BACKUPY_RESTORE_PASSWORD", "env:TEST_PG_PASSWORD")
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    let tool = db::find_child_of(child.id() as i32, "pg_restore", "", Duration::from_secs(30))
        .unwrap_or_else(|| panic!("no pg_restore child; log:\n{}", log_tail(&log)));
    // pg_restore is inside its transaction, waiting for the lock.
    let mut watcher = LockedPg::connect(&pg, "postgres");
    wait_until("pg_restore waiting for the table lock", Duration::from_secs(30), &log, || {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'",
                &[&dst],
            )
            .unwrap()
            .get(0);
        waiting > 0
    });

    let (status, took) = signal_and_wait(&mut child, signal, Duration::from_secs(15));
    let text = log_tail(&log);
    assert_eq!(status.code(), Some(128 + signal), "exit status; log:\n{text}");
    assert!(took < Duration::from_secs(10), "took {took:?}; log:\n{text}");
    assert!(text.contains("nothing was committed"), "one line saying what was left; log:\n{text}");
    assert!(is_gone(tool), "pg_restore {tool} is still running; log:\n{text}");
    locker.batch_execute("ROLLBACK").unwrap();
    // The target is as it was: pg_restore's transaction never committed.
    let rows: Vec<i32> = LockedPg::connect(&pg, &dst)
        .query("SELECT x FROM t ORDER BY x", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rows, [42], "the target database changed; log:\n{text}");
    let tmp = dir.path().join("state/tmp");
    assert_eq!(files_under(&tmp), Vec::<String>::new(), "the restore left files in {}", tmp.display());
    for name in [&src, &dst] {
        let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"));
    }
}

#[test]
fn sigint_stops_a_restore_into_postgresql_and_the_target_is_unchanged() {
    restore_into_postgresql_stops_on(libc::SIGINT);
}

#[test]
fn sigterm_stops_a_restore_into_postgresql_and_the_target_is_unchanged() {
    restore_into_postgresql_stops_on(libc::SIGTERM);
}
