//! DOCKER_EXEC against the throwaway dockerd: PostgreSQL, MariaDB, Redis and SQLite run
//! inside containers (images FROM scratch tagged like the real ones, the host's binaries
//! mounted), the agent dumps them with the tools inside those containers, and every
//! backup is restored and compared. Failures carry the container's stderr, a cancel or
//! SIGTERM leaves no process in the container, and no password reaches an exec's
//! command line or a log line.

use crate::common::db;
use crate::common::docker;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use backupy_agent::drivers::{Engine, Strategy, TargetSpec, docker_exec};
use backupy_agent::pipeline::Compression;
use backupy_agent::secrets::Secret;
use backupy_agent::storage::DirStorage;
use docker::{Container, docker_ok, top, wait_for};

fn uid_of(user: &str) -> u32 {
    let out = Command::new("id").args(["-u", user]).output().unwrap();
    assert!(out.status.success(), "user {user} is missing (apt-get install postgresql mariadb-server)");
    text(&out.stdout).trim().parse().unwrap()
}

fn chown_r(path: &Path, user: &str) {
    let st = Command::new("chown").args(["-R", user]).arg(path).status().unwrap();
    assert!(st.success());
}

fn pg_bin() -> String {
    let mut majors: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries (scripts/install-deps.sh core)")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    majors.sort();
    format!("/usr/lib/postgresql/{}/bin", majors.last().expect("a PostgreSQL major version"))
}

struct PgInDocker {
    container: Container,
    port: u16,
    password: String,
    _dir: tempfile::TempDir,
}

impl PgInDocker {
    fn client(&self, db: &str) -> postgres::Client {
        postgres::Config::new()
            .host("127.0.0.1")
            .port(self.port)
            .user("postgres")
            .password(&self.password)
            .dbname(db)
            .connect(postgres::NoTls)
            .unwrap()
    }

    fn spec(&self, database: &str, password: &str) -> TargetSpec {
        let mut spec = TargetSpec::new("pg-in-docker", Engine::PostgreSql);
        spec.strategy = Strategy::DockerExec { container: self.container.name.clone() };
        spec.host = "127.0.0.1".into();
        spec.port = self.port;
        spec.username = "postgres".into();
        spec.database = database.into();
        spec.password = Some(Secret::new(password));
        spec
    }
}

/// PostgreSQL running inside a container tagged `postgres:16`, password authentication.
fn postgres_in_docker(tag: &str) -> PgInDocker {
    docker::image("postgres:16", "");
    let dir = docker::open_tempdir();
    let password = format!("pg-{}", db::unique("pw"));
    std::fs::write(dir.path().join("pw"), &password).unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    chown_r(dir.path(), "postgres");
    let bin = pg_bin();
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--", &format!("{bin}/initdb"), "-D"])
        .arg(dir.path().join("data"))
        .args(["-U", "postgres", "--auth=scram-sha-256", "--no-sync", "--pwfile"])
        .arg(dir.path().join("pw"))
        .output()
        .unwrap();
    assert!(out.status.success(), "initdb: {}", text(&out.stderr));
    let (port, _port_claim) = reserve_port();
    let volume = format!("{}:/srv", dir.path().display());
    let uid = uid_of("postgres").to_string();
    let container = docker::run(
        &db::unique(tag),
        "postgres:16",
        &["--user", &uid, "-v", &volume],
        &[
            &format!("{bin}/postgres"),
            "-D",
            "/srv/data",
            "-p",
            &port.to_string(),
            "-k",
            "/srv/data",
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
        ],
    );
    let pg = PgInDocker { container, port, password, _dir: dir };
    wait_for("PostgreSQL in its container", Duration::from_secs(30), || {
        postgres::Config::new()
            .host("127.0.0.1")
            .port(port)
            .user("postgres")
            .password(&pg.password)
            .dbname("postgres")
            .connect(postgres::NoTls)
            .is_ok()
    });
    pg
}

fn pg_checksum(c: &mut postgres::Client) -> String {
    c.query_one("SELECT md5(string_agg(id || ':' || v, ',' ORDER BY id)) || ':' || count(*) FROM t", &[])
        .unwrap()
        .get(0)
}

fn storage(dir: &Path) -> DirStorage {
    DirStorage::open(dir.join("backups")).unwrap()
}

/// Execs of `container` as the daemon describes them (`GET /exec/{id}/json`).
fn exec_descriptions(container: &str) -> Vec<String> {
    let client = backupy_agent::docker::Client::connect(&docker::socket()).unwrap();
    let c: serde_json::Value = client.get_json(&format!("/containers/{container}/json")).unwrap();
    c["ExecIDs"]
        .as_array()
        .map(|ids| {
            ids.iter()
                .filter_map(|id| id.as_str())
                .filter_map(|id| client.get_json::<serde_json::Value>(&format!("/exec/{id}/json")).ok())
                .map(|v| v.to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn postgres_in_a_container_is_dumped_by_its_own_pg_dump_and_restored_through_it() {
    let _l = docker::shared_lock();
    let pg = postgres_in_docker("pg-roundtrip");
    let mut c = pg.client("postgres");
    c.batch_execute("CREATE DATABASE app").unwrap();
    c.batch_execute("CREATE DATABASE app_restored").unwrap();
    let mut app = pg.client("app");
    app.batch_execute(
        "CREATE TABLE t(id int PRIMARY KEY, v text); \
         INSERT INTO t SELECT g, md5(g::text) || 'é' FROM generate_series(1, 5000) g;",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = storage(dir.path());
    let b = db::backup(&pg.spec("app", &pg.password), &store, dir.path(), &db::RunOpts::default())
        .expect("DOCKER_EXEC backup");
    assert!(b.engine_version.starts_with("PostgreSQL 1"), "{}", b.engine_version);
    // Restore through the container's pg_restore, then compare.
    let mut dump = db::open_dump(&b.path, Some(&db::raw_key().1));
    docker_exec::restore(&pg.spec("app_restored", &pg.password), &pg.container.name, &mut dump, false)
        .expect("restore through the container");
    assert_eq!(pg_checksum(&mut pg.client("app_restored")), pg_checksum(&mut app));
}

#[test]
fn a_dump_failing_inside_the_container_fails_with_its_stderr_tail() {
    let _l = docker::shared_lock();
    let pg = postgres_in_docker("pg-wrongpw");
    let dir = tempfile::tempdir().unwrap();
    let err = db::backup(
        &pg.spec("postgres", "not-the-password"),
        &storage(dir.path()),
        dir.path(),
        &db::RunOpts::default(),
    )
    .map(|_| ())
    .expect_err("a wrong password fails the run");
    assert!(err.contains("password authentication failed"), "{err}");
    assert!(err.contains(&format!("inside container {}", pg.container.name)), "{err}");
    assert!(!err.contains("not-the-password"), "{err}");
    assert!(files_under(&dir.path().join("backups")).is_empty(), "nothing is committed");
}

/// pg_dump waits for a table another session holds locked: a dump that runs for as long
/// as the test wants, with no data volume needed.
fn blocked_pg(tag: &str) -> (PgInDocker, postgres::Client) {
    let pg = postgres_in_docker(tag);
    let mut c = pg.client("postgres");
    c.batch_execute("CREATE TABLE t(id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'x')").unwrap();
    let mut locker = pg.client("postgres");
    locker.batch_execute("BEGIN; LOCK TABLE t IN ACCESS EXCLUSIVE MODE").unwrap();
    (pg, locker)
}

#[test]
fn a_cancel_during_an_exec_dump_leaves_no_process_in_the_container() {
    let _l = docker::shared_lock();
    let (pg, _locker) = blocked_pg("pg-cancel");
    let dir = tempfile::tempdir().unwrap();
    let store = storage(dir.path());
    let opts = db::RunOpts { compression: Compression::None, ..Default::default() };
    let cancel = opts.cancel.clone();
    let spec = pg.spec("postgres", &pg.password);
    let (done_tx, done_rx) = crossbeam_channel::bounded(1);
    let temp = dir.path().to_path_buf();
    std::thread::spawn(move || {
        let _ = done_tx.send(db::backup(&spec, &store, &temp, &opts).map(|_| ()));
    });
    wait_for("pg_dump inside the container", Duration::from_secs(20), || {
        top(&pg.container.name).contains("pg_dump")
    });
    // The running exec as Docker shows it: pg_dump's command line, and no password there
    // or in `docker top` (the password is only in the exec's environment).
    let execs = exec_descriptions(&pg.container.name);
    assert!(execs.iter().any(|e| e.contains("pg_dump") && e.contains("--format=custom")), "{execs:?}");
    assert!(
        execs.iter().all(|e| !e.contains(&pg.password)),
        "a password reached an exec's command line: {execs:?}"
    );
    assert!(!top(&pg.container.name).contains(&pg.password));
    let t0 = Instant::now();
    cancel.cancel();
    let result =
        done_rx.recv_timeout(Duration::from_secs(5)).expect("the run stops within 5 s of the cancel");
    assert_eq!(result.unwrap_err(), "cancelled");
    assert!(t0.elapsed() < Duration::from_secs(5));
    let procs = top(&pg.container.name);
    assert!(!procs.contains("pg_dump"), "pg_dump still runs in the container:\n{procs}");
}

#[test]
fn sigterm_during_an_exec_dump_leaves_no_process_and_no_password_in_the_log() {
    let _l = docker::shared_lock();
    let (pg, _locker) = blocked_pg("pg-sigterm");
    let dir = tempfile::tempdir().unwrap();
    let (_key, recipient) = keygen(dir.path());
    let config = dir.path().join("backupy.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"./state\"\nshutdown_grace_sec = 1\n[storage]\ndir = \"./backups\"\n[encryption]\nrecipient = \"{recipient}\"\n\
             [[targets]]\nid = \"db\"\ntype = \"postgresql\"\nstrategy = \"docker_exec\"\ncontainer = \"{}\"\n\
             host = \"127.0.0.1\"\nport = {}\nusername = \"postgres\"\ndatabase = \"postgres\"\npassword = \"env:PG_IN_DOCKER\"\n\
             [[jobs]]\nid = \"often\"\ntarget = \"db\"\ncron = \"* * * * * *\"\n",
            pg.container.name, pg.port
        ),
    )
    .unwrap();
    let mut child = agent()
        .args(["run", "--config"])
        .arg(&config)
        .env("PG_IN_DOCKER", &pg.password)
        .env("BACKUPY_DOCKER_SOCKET", docker::socket())
        .env("BACKUPY_LOG_LEVEL", "trace")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    wait_for("pg_dump inside the container", Duration::from_secs(30), || {
        top(&pg.container.name).contains("pg_dump")
    });
    // SAFETY: kill(2) on the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            panic!("the agent did not exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = log.join().unwrap();
    assert!(status.success(), "{status:?}\n{log}");
    let procs = top(&pg.container.name);
    assert!(!procs.contains("pg_dump"), "pg_dump still runs in the container:\n{procs}\n{log}");
    assert!(log.contains("cancelled"), "the run was cancelled:\n{log}");
    assert!(!log.contains(&pg.password), "the password reached a log line:\n{log}");
}

#[test]
fn sigint_on_the_backup_command_during_an_exec_dump_exits_130_and_leaves_nothing() {
    let _l = docker::shared_lock();
    let (pg, _locker) = blocked_pg("pg-sigint");
    let dir = tempfile::tempdir().unwrap();
    let (_key, recipient) = keygen(dir.path());
    let config = dir.path().join("backupy.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"./state\"\n[storage]\ndir = \"./backups\"\n[encryption]\nrecipient = \"{recipient}\"\n\
             [[targets]]\nid = \"db\"\ntype = \"postgresql\"\nstrategy = \"docker_exec\"\ncontainer = \"{}\"\n\
             host = \"127.0.0.1\"\nport = {}\nusername = \"postgres\"\ndatabase = \"postgres\"\npassword = \"env:PG_IN_DOCKER\"\n\
             [[jobs]]\nid = \"byhand\"\ntarget = \"db\"\n",
            pg.container.name, pg.port
        ),
    )
    .unwrap();
    let log = dir.path().join("agent.log");
    let mut child = agent()
        .args(["backup", "--config"])
        .arg(&config)
        .env("PG_IN_DOCKER", &pg.password)
        .env("BACKUPY_DOCKER_SOCKET", docker::socket())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_for("pg_dump inside the container", Duration::from_secs(30), || {
        top(&pg.container.name).contains("pg_dump")
    });
    // SAFETY: kill(2) on the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            panic!("backup did not exit after SIGINT:\n{}", log_tail(&log));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = log_tail(&log);
    assert_eq!(status.code(), Some(130), "{text}");
    let procs = top(&pg.container.name);
    assert!(!procs.contains("pg_dump"), "pg_dump still runs in the container:\n{procs}\n{text}");
    assert_eq!(files_under(&dir.path().join("backups")), Vec::<String>::new(), "{text}");
    let db = rusqlite::Connection::open(dir.path().join("state/state.db")).unwrap();
    let status: String = db.query_row("SELECT status FROM runs", [], |r| r.get(0)).unwrap();
    assert_eq!(status, "cancelled");
}

/// A standalone config whose one job backs up database `shop` of `pg` through
/// DOCKER_EXEC, encrypted to a key pair beside it (password from `PG_IN_DOCKER`).
fn pg_docker_config(pg: &PgInDocker) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (_key, recipient) = keygen(dir.path());
    let config = dir.path().join("backupy.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"./state\"\n[storage]\ndir = \"./backups\"\n[encryption]\nrecipient = \"{recipient}\"\n\
             [[targets]]\nid = \"db\"\ntype = \"postgresql\"\nstrategy = \"docker_exec\"\ncontainer = \"{}\"\n\
             host = \"127.0.0.1\"\nport = {}\nusername = \"postgres\"\ndatabase = \"shop\"\npassword = \"env:PG_IN_DOCKER\"\n\
             [[jobs]]\nid = \"nightly\"\ntarget = \"db\"\n",
            pg.container.name, pg.port
        ),
    )
    .unwrap();
    (dir, config)
}

#[test]
fn toml_docker_exec_target_backs_up_and_restores_to_docker_url_through_the_cli() {
    let _l = docker::shared_lock();
    let pg = postgres_in_docker("pg-cli");
    let mut admin = pg.client("postgres");
    admin.batch_execute("CREATE DATABASE shop").unwrap();
    admin.batch_execute("CREATE DATABASE shop_copy").unwrap();
    let mut shop = pg.client("shop");
    shop.batch_execute("CREATE TABLE t(id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a'), (2, 'b')")
        .unwrap();
    let (_dir, config) = pg_docker_config(&pg);
    let env = |c: &mut Command| {
        c.env("PG_IN_DOCKER", &pg.password)
            .env("BACKUPY_DOCKER_SOCKET", docker::socket())
            .env("BACKUPY_LOG_LEVEL", "trace");
    };
    let mut c = agent();
    env(&mut c);
    let out = run({
        c.args(["backup", "--config"]).arg(&config);
        c
    });
    assert!(out.status.success(), "backup: {}", text(&out.stderr));
    assert!(!text(&out.stderr).contains(&pg.password), "password in the log:\n{}", text(&out.stderr));
    let mut c = agent();
    env(&mut c);
    c.env("BACKUPY_RESTORE_PASSWORD", "env:PG_IN_DOCKER")
        .args(["restore", "--backup", "latest", "--to"])
        .arg(format!("docker://postgres@{}/shop_copy?host=127.0.0.1&port={}", pg.container.name, pg.port))
        .arg("--config")
        .arg(&config);
    let out = run(c);
    assert!(out.status.success(), "restore: {}", text(&out.stderr));
    assert_eq!(pg_checksum(&mut pg.client("shop_copy")), pg_checksum(&mut shop));
}

#[test]
fn mariadb_in_a_container_is_dumped_and_restored_through_it() {
    let _l = docker::shared_lock();
    docker::image("mariadb:11", "");
    let dir = docker::open_tempdir();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    chown_r(dir.path(), "mysql");
    let out = Command::new("mariadb-install-db")
        .args(["--no-defaults", "--user=mysql", "--auth-root-authentication-method=normal", "--skip-test-db"])
        .arg(format!("--datadir={}", dir.path().join("data").display()))
        .output()
        .expect("mariadb-install-db (scripts/install-deps.sh core)");
    assert!(out.status.success(), "mariadb-install-db: {}", text(&out.stderr));
    let (port, _port_claim) = reserve_port();
    let volume = format!("{}:/srv", dir.path().display());
    let container = docker::run(
        &db::unique("maria"),
        "mariadb:11",
        &["-v", &volume],
        &[
            "mariadbd",
            "--no-defaults",
            "--datadir=/srv/data",
            "--tmpdir=/srv/data",
            &format!("--port={port}"),
            "--bind-address=127.0.0.1",
            "--socket=/srv/sock",
            "--user=mysql",
            "--skip-log-bin",
            "--innodb-log-file-size=16M",
            "--innodb-buffer-pool-size=32M",
            "--innodb-flush-log-at-trx-commit=0",
        ],
    );
    wait_for("MariaDB in its container", Duration::from_secs(60), || {
        docker::docker(&[
            "exec",
            &container.name,
            "mariadb",
            "--no-defaults",
            "--socket=/srv/sock",
            "-uroot",
            "-e",
            "select 1",
        ])
        .status
        .success()
    });
    let password = format!("maria-{}", db::unique("pw"));
    let sql = docker_ok(&[
        "exec",
        &container.name,
        "mariadb",
        "--no-defaults",
        "--socket=/srv/sock",
        "-uroot",
        "-N",
        "-e",
        &format!(
            "select concat('ALTER USER root@''', host, ''' IDENTIFIED BY ''{password}'';') from mysql.user where user = 'root'"
        ),
    ]);
    docker_ok(&[
        "exec",
        &container.name,
        "mariadb",
        "--no-defaults",
        "--socket=/srv/sock",
        "-uroot",
        "-e",
        &format!("{sql} FLUSH PRIVILEGES;"),
    ]);
    let url = format!("mysql://root:{password}@127.0.0.1:{port}/");
    let mut conn = mysql::Conn::new(mysql::Opts::from_url(&url).unwrap()).unwrap();
    use mysql::prelude::Queryable;
    conn.query_drop("CREATE DATABASE app CHARACTER SET utf8mb4").unwrap();
    conn.query_drop("CREATE TABLE app.t(id int PRIMARY KEY, v varchar(64), b varbinary(16))").unwrap();
    conn.query_drop(
        "INSERT INTO app.t SELECT seq, concat('zeile-', seq, '-ü'), unhex('00ff10') FROM app.seq_1_to_3000",
    )
    .unwrap();

    let mut spec = TargetSpec::new("maria-in-docker", Engine::MariaDb);
    spec.strategy = Strategy::DockerExec { container: container.name.clone() };
    spec.host = "127.0.0.1".into();
    spec.port = port;
    spec.username = "root".into();
    spec.database = "app".into();
    spec.password = Some(Secret::new(password.clone()));
    let tmp = tempfile::tempdir().unwrap();
    let b = db::backup(&spec, &storage(tmp.path()), tmp.path(), &db::RunOpts::default())
        .expect("DOCKER_EXEC backup");
    assert!(b.engine_version.starts_with("MariaDB 10."), "{}", b.engine_version);
    let mut restore_spec = spec.clone();
    restore_spec.database = "app_restored".into();
    let mut dump = db::open_dump(&b.path, Some(&db::raw_key().1));
    docker_exec::restore(&restore_spec, &container.name, &mut dump, false)
        .expect("restore through the container");
    let sum = |db: &str, conn: &mut mysql::Conn| -> String {
        conn.query_first(format!(
            "SELECT concat(count(*), ':', md5(group_concat(id, v, hex(b) ORDER BY id))) FROM {db}.t"
        ))
        .unwrap()
        .unwrap()
    };
    assert_eq!(sum("app_restored", &mut conn), sum("app", &mut conn));
}

fn redis_in_docker() -> (Container, u16, String, tempfile::TempDir) {
    docker::image("redis:7", "");
    let (port, _port_claim) = reserve_port();
    let password = format!("redis-{}", db::unique("pw"));
    let dir = docker::open_tempdir();
    let volume = format!("{}:/data", dir.path().display());
    let container = docker::run(
        &db::unique("redis"),
        "redis:7",
        &["-v", &volume],
        &[
            "redis-server",
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--requirepass",
            &password,
            "--dir",
            "/data",
            "--save",
            "",
        ],
    );
    let url = format!("redis://:{password}@127.0.0.1:{port}/");
    wait_for("Redis in its container", Duration::from_secs(20), || {
        redis::Client::open(url.as_str()).and_then(|c| c.get_connection()).is_ok()
    });
    let mut c = redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
    for i in 0..500 {
        let _: () =
            redis::cmd("SET").arg(format!("key:{i}")).arg(format!("value-{i}")).query(&mut c).unwrap();
    }
    let _: () = redis::cmd("RPUSH").arg("list").arg(&["a", "b", "c"]).query(&mut c).unwrap();
    (container, port, password, dir)
}

/// Loads `rdb` into a fresh redis-server on the host and reads it back.
fn keys_of_rdb(rdb: &[u8]) -> (usize, String, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dump.rdb"), rdb).unwrap();
    let (port, _port_claim) = reserve_port();
    let mut server = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--dir"])
        .arg(dir.path())
        .args(["--dbfilename", "dump.rdb"])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server (scripts/install-deps.sh core)");
    let url = format!("redis://127.0.0.1:{port}/");
    let mut conn = None;
    wait_for("the restored redis-server", Duration::from_secs(10), || {
        conn = redis::Client::open(url.as_str()).and_then(|c| c.get_connection()).ok();
        conn.is_some()
    });
    let mut c = conn.unwrap();
    let size: usize = redis::cmd("DBSIZE").query(&mut c).unwrap();
    let v: String = redis::cmd("GET").arg("key:499").query(&mut c).unwrap();
    let l: Vec<String> = redis::cmd("LRANGE").arg("list").arg(0).arg(-1).query(&mut c).unwrap();
    let _ = server.kill();
    let _ = server.wait();
    (size, v, l)
}

fn redis_backup(method: Option<&str>) {
    let _l = docker::shared_lock();
    let (container, port, password, _data) = redis_in_docker();
    let mut spec = TargetSpec::new("redis-in-docker", Engine::Redis);
    spec.strategy = Strategy::DockerExec { container: container.name.clone() };
    spec.host = "127.0.0.1".into();
    spec.port = port;
    spec.password = Some(Secret::new(password.clone()));
    if let Some(m) = method {
        spec.options.insert("docker_redis_method".into(), m.into());
    }
    let dir = tempfile::tempdir().unwrap();
    let b = db::backup(&spec, &storage(dir.path()), dir.path(), &db::RunOpts::default())
        .expect("DOCKER_EXEC backup");
    assert!(b.engine_version.starts_with("Redis 7."), "{}", b.engine_version);
    let mut rdb = Vec::new();
    db::open_dump(&b.path, Some(&db::raw_key().1)).read_to_end(&mut rdb).unwrap();
    assert_eq!(keys_of_rdb(&rdb), (501, "value-499".to_string(), vec!["a".into(), "b".into(), "c".into()]));
}

#[test]
fn redis_in_a_container_is_dumped_with_redis_cli_rdb_and_restored() {
    redis_backup(None);
}

#[test]
fn redis_in_a_container_is_dumped_through_bgsave_and_the_rdb_file() {
    redis_backup(Some("bgsave"));
}

#[test]
fn sqlite_in_a_container_is_snapshotted_there_streamed_and_cleaned_up() {
    let _l = docker::shared_lock();
    docker::image("acme/app:1", "");
    let dir = docker::open_tempdir();
    let db_path = dir.path().join("app.sqlite");
    let conn = rusqlite::Connection::open(&db_path).unwrap();
    conn.execute_batch("CREATE TABLE orders(id INTEGER PRIMARY KEY, item TEXT);").unwrap();
    for i in 0..2000 {
        conn.execute("INSERT INTO orders(item) VALUES (?1)", [format!("item-{i}")]).unwrap();
    }
    drop(conn);
    let volume = format!("{}:/var/lib/app", dir.path().display());
    let container =
        docker::run(&db::unique("sqlite-app"), "acme/app:1", &["-v", &volume], &["sleep", "3600"]);
    let mut spec = TargetSpec::new("sqlite-in-docker", Engine::Sqlite);
    spec.strategy = Strategy::DockerExec { container: container.name.clone() };
    spec.database = "/var/lib/app/app.sqlite".into();
    let tmp = tempfile::tempdir().unwrap();
    let b = db::backup(&spec, &storage(tmp.path()), tmp.path(), &db::RunOpts::default())
        .expect("DOCKER_EXEC backup");
    assert!(b.engine_version.starts_with("SQLite 3."), "{}", b.engine_version);
    let restored = tmp.path().join("restored.sqlite");
    let mut out = std::fs::File::create(&restored).unwrap();
    std::io::copy(&mut db::open_dump(&b.path, Some(&db::raw_key().1)), &mut out).unwrap();
    assert_eq!(sqlite3(&restored, "PRAGMA integrity_check"), "ok");
    assert_eq!(sqlite3(&restored, "SELECT count(*) || ':' || max(item) FROM orders"), "2000:item-999");
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec!["app.sqlite".to_string()], "the snapshot inside the container was removed");
}

#[test]
fn a_stopped_container_is_a_clear_error() {
    let _l = docker::shared_lock();
    docker::image("postgres:16", "");
    let container = docker::run(&db::unique("stopped"), "postgres:16", &[], &["true"]);
    wait_for("the container to exit", Duration::from_secs(10), || {
        docker_ok(&["inspect", "-f", "{{.State.Running}}", &container.name]) == "false"
    });
    let mut spec = TargetSpec::new("stopped", Engine::PostgreSql);
    spec.strategy = Strategy::DockerExec { container: container.name.clone() };
    spec.database = "app".into();
    let dir = tempfile::tempdir().unwrap();
    let err =
        db::backup(&spec, &storage(dir.path()), dir.path(), &db::RunOpts::default()).map(|_| ()).unwrap_err();
    assert!(err.contains("is not running") && err.contains(&container.name), "{err}");
    let mut spec = spec.clone();
    spec.strategy = Strategy::DockerExec { container: "no-such-container-here".into() };
    let err =
        db::backup(&spec, &storage(dir.path()), dir.path(), &db::RunOpts::default()).map(|_| ()).unwrap_err();
    assert!(err.contains("No such container") || err.contains("no such container"), "{err}");
}

/// No MongoDB tools can be installed here, so the container gets stand-ins for
/// `mongod`, `mongodump` and `mongorestore` that record how they were called and what
/// their config file said. This pins the plumbing (argv without the password, the
/// password in a 0600 file written through stdin and removed, the archive streamed out
/// and fed back in), not the tools themselves.
#[test]
fn mongodb_tools_in_a_container_get_the_password_from_a_removed_config_file() {
    use std::os::unix::fs::PermissionsExt;
    let _l = docker::shared_lock();
    let tools = docker::open_tempdir();
    let log = docker::open_tempdir();
    let script = |name: &str, body: &str| {
        let p = tools.path().join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    script("mongod", "echo 'db version v7.0.5'; echo 'Build Info: {}'");
    let record = r#"echo "$@" > /srv/log/$(basename "$0").argv
for a in "$@"; do case $a in --config=*) f=${a#--config=}; cp "$f" /srv/log/$(basename "$0").config; stat -c %a "$f" > /srv/log/$(basename "$0").mode;; esac; done"#;
    script("mongodump", &format!("{record}\nprintf '\\155\\342\\231\\201archive-payload'"));
    script("mongorestore", &format!("{record}\ncat > /srv/log/restored"));
    docker::image(
        "mongo:7",
        "ENV PATH=/srv/tools:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    let tools_volume = format!("{}:/srv/tools:ro", tools.path().display());
    let log_volume = format!("{}:/srv/log", log.path().display());
    let container = docker::run(
        &db::unique("mongo"),
        "mongo:7",
        &["--tmpfs", "/tmp", "-v", &tools_volume, "-v", &log_volume],
        &["sleep", "3600"],
    );
    let password = format!("mongo-{}", db::unique("pw"));
    let mut spec = TargetSpec::new("mongo-in-docker", Engine::MongoDb);
    spec.strategy = Strategy::DockerExec { container: container.name.clone() };
    spec.username = "backup".into();
    spec.database = "shop".into();
    spec.password = Some(Secret::new(password.clone()));
    let dir = tempfile::tempdir().unwrap();
    let b = db::backup(&spec, &storage(dir.path()), dir.path(), &db::RunOpts::default())
        .expect("DOCKER_EXEC backup");
    assert_eq!(b.engine_version, "MongoDB 7.0.5");
    let mut dump = Vec::new();
    db::open_dump(&b.path, Some(&db::raw_key().1)).read_to_end(&mut dump).unwrap();
    assert_eq!(dump, b"\x6d\xe2\x99\x81archive-payload");
    let read = |name: &str| std::fs::read_to_string(log.path().join(name)).unwrap();
    let argv = read("mongodump.argv");
    assert!(
        argv.contains("--archive") && argv.contains("--username=backup") && argv.contains("--db=shop"),
        "{argv}"
    );
    assert!(!argv.contains(&password), "the password is in mongodump's argv: {argv}");
    assert_eq!(read("mongodump.config"), format!("password: \"{password}\"\n"));
    assert_eq!(read("mongodump.mode").trim(), "600");
    assert_eq!(docker_ok(&["exec", &container.name, "ls", "-A", "/tmp"]), "", "the config file was removed");

    let mut input = std::io::Cursor::new(dump.clone());
    docker_exec::restore(&spec, &container.name, &mut input, true).expect("restore through the container");
    assert_eq!(std::fs::read(log.path().join("restored")).unwrap(), dump);
    let argv = read("mongorestore.argv");
    assert!(argv.contains("--drop") && argv.contains("--nsInclude=shop.*"), "{argv}");
    assert!(!argv.contains(&password), "{argv}");
    assert_eq!(read("mongorestore.config"), format!("password: \"{password}\"\n"));
    assert_eq!(docker_ok(&["exec", &container.name, "ls", "-A", "/tmp"]), "");
}

/// Issue 16.4: a tampered object restored with `--no-preverify` to `docker://` used to
/// hang for ever (the exec's stdin was never shut after the failed copy, and its output
/// was awaited without a deadline). Now the process in the container is killed, the
/// command ends with the authentication error, and `pg_restore --single-transaction`
/// leaves the database as it was. The default (pre-verified) restore writes nothing.
#[test]
fn a_tampered_object_restored_to_docker_fails_promptly_and_changes_nothing() {
    let _l = docker::shared_lock();
    let pg = postgres_in_docker("pg-tamper");
    let mut admin = pg.client("postgres");
    admin.batch_execute("CREATE DATABASE shop").unwrap();
    admin.batch_execute("CREATE DATABASE shop_copy").unwrap();
    pg.client("shop")
        .batch_execute(
            "CREATE TABLE t(id int PRIMARY KEY, v text);
             INSERT INTO t SELECT g, md5(g::text) || md5((g * 7)::text) || md5(random()::text)
               FROM generate_series(1, 120000) g;",
        )
        .unwrap();
    let mut copy = pg.client("shop_copy");
    copy.batch_execute("CREATE TABLE t(id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'existing')")
        .unwrap();
    let before = pg_checksum(&mut copy);
    let (dir, config) = pg_docker_config(&pg);
    let env = |c: &mut Command| {
        c.env("PG_IN_DOCKER", &pg.password)
            .env("BACKUPY_DOCKER_SOCKET", docker::socket())
            .env("BACKUPY_RESTORE_PASSWORD", "env:PG_IN_DOCKER");
    };
    let mut c = agent();
    env(&mut c);
    let out = run({
        c.args(["backup", "--config"]).arg(&config);
        c
    });
    assert!(out.status.success(), "backup: {}", text(&out.stderr));
    let objects: Vec<String> =
        files_under(&dir.path().join("backups")).into_iter().filter(|f| !f.ends_with(".json")).collect();
    let object = dir.path().join("backups").join(&objects[0]);
    let mut bytes = std::fs::read(&object).unwrap();
    assert!(bytes.len() > 3 << 20, "{} bytes: too few chunks", bytes.len());
    let at = bytes.len() - 5;
    bytes[at] ^= 1;
    std::fs::write(&object, bytes).unwrap();
    let to = format!("docker://postgres@{}/shop_copy?host=127.0.0.1&port={}", pg.container.name, pg.port);
    for extra in [&["--force"][..], &["--force", "--no-preverify"][..]] {
        let log = dir.path().join("restore.log");
        let mut c = agent();
        env(&mut c);
        c.args(["restore", "--backup", "latest", "--to", &to, "--config"])
            .arg(&config)
            .args(extra)
            .stderr(std::fs::File::create(&log).unwrap());
        let mut child = c.spawn().unwrap();
        let t0 = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if t0.elapsed() > Duration::from_secs(90) {
                let _ = child.kill();
                panic!("restore {extra:?} hangs:\n{}", log_tail(&log));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let err = std::fs::read_to_string(&log).unwrap();
        assert_eq!(status.code(), Some(1), "{extra:?}: {err}");
        assert!(err.contains("authentication failed"), "{extra:?}: {err}");
        assert_eq!(pg_checksum(&mut pg.client("shop_copy")), before, "{extra:?}: the rows were replaced");
    }
}

/// Issue 16.6: a cancel reaches the wait for a BGSAVE inside the container (it used to
/// wait up to an hour). Every key takes a second to save (`rdb-key-save-delay`), so the
/// BGSAVE of these 501 keys cannot end during the test.
#[test]
fn a_cancel_stops_the_wait_for_a_bgsave_in_the_container_within_five_seconds() {
    let _l = docker::shared_lock();
    let (container, port, password, _data) = redis_in_docker();
    let url = format!("redis://:{password}@127.0.0.1:{port}/");
    let mut c = redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
    let _: () =
        redis::cmd("CONFIG").arg("SET").arg("rdb-key-save-delay").arg("1000000").query(&mut c).unwrap();
    let mut spec = TargetSpec::new("redis-in-docker", Engine::Redis);
    spec.strategy = Strategy::DockerExec { container: container.name.clone() };
    spec.host = "127.0.0.1".into();
    spec.port = port;
    spec.password = Some(Secret::new(password.clone()));
    spec.options.insert("docker_redis_method".into(), "bgsave".into());
    let dir = tempfile::tempdir().unwrap();
    let cancel = backupy_agent::cancel::Cancel::default();
    let (tx, rx) = crossbeam_channel::bounded(1);
    {
        let (cancel, root) = (cancel.clone(), dir.path().to_path_buf());
        std::thread::spawn(move || {
            let opts = db::RunOpts { cancel, ..Default::default() };
            let _ = tx.send(db::backup(&spec, &storage(&root), &root, &opts).map(|_| ()));
        });
    }
    wait_for("the agent's BGSAVE", Duration::from_secs(30), || {
        let info: String = redis::cmd("INFO").arg("persistence").query(&mut c).unwrap();
        info.lines().any(|l| l.trim() == "rdb_bgsave_in_progress:1")
    });
    let t0 = Instant::now();
    cancel.cancel();
    let result = rx.recv_timeout(Duration::from_secs(5));
    // Let the server's BGSAVE finish at once, whatever happened.
    let _: () = redis::cmd("CONFIG").arg("SET").arg("rdb-key-save-delay").arg("0").query(&mut c).unwrap();
    match result {
        Ok(Err(e)) => assert!(e.contains("stopped while waiting for BGSAVE"), "{e}"),
        Ok(Ok(())) => panic!("the backup succeeded although it was cancelled"),
        Err(_) => panic!("the backup was still waiting for BGSAVE {:?} after the cancel", t0.elapsed()),
    }
}
