//! The MySQL/MariaDB driver against a real MariaDB (scripts/services.sh
//! `services_start_mariadb`): single-database and all-databases backups through the real
//! pipeline and storage, restored with the client and compared (checksums, ordered-row
//! md5s, routines, triggers, events, views); the UNIX-socket strategy with a password
//! that needs quoting; every connection error before the dump starts; a missing tool; a
//! dump killed mid-stream; and no secret in a running `mariadb-dump`'s argv or
//! environment.

use crate::common;
use crate::common::db;

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use backupy_agent::cancel::Cancel;
use backupy_agent::crypto::Encryption;
use backupy_agent::drivers::mysql::{self as my_driver, MySqlRestoreOptions};
use backupy_agent::drivers::{Engine, Strategy, TargetSpec};
use backupy_agent::pipeline::{Compression, Progress};
use backupy_agent::secrets::Secret;
use backupy_agent::storage::DirStorage;
use db::RunOpts;
use mysql::prelude::Queryable;

const LOCK: &str = "mariadb";

fn spec(database: &str) -> TargetSpec {
    let s = db::maria();
    let mut t = TargetSpec::new("maria", Engine::MariaDb);
    t.host = s.host;
    t.port = s.port;
    t.username = s.user;
    t.password = Some(Secret::new(s.password));
    t.database = database.to_string();
    t
}

fn conn(database: Option<&str>) -> mysql::Conn {
    let s = db::maria();
    let opts = mysql::OptsBuilder::new()
        .ip_or_hostname(Some(s.host))
        .tcp_port(s.port)
        .user(Some(s.user))
        .pass(Some(s.password))
        .db_name(database)
        .prefer_socket(false);
    let mut c = mysql::Conn::new(opts).unwrap_or_else(|e| panic!("connecting to the test MariaDB: {e}"));
    c.query_drop("SET SESSION group_concat_max_len = 1073741824").unwrap();
    c
}

fn drop_database(name: &str) {
    let _ = conn(None).query_drop(format!("DROP DATABASE IF EXISTS `{name}`"));
}

struct DropDbs(Vec<String>);
impl Drop for DropDbs {
    fn drop(&mut self) {
        for d in &self.0 {
            drop_database(d);
        }
    }
}

/// Bytes 0..=255 and then pseudo-random ones (a small LCG: no extra crate).
fn blob(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|i| {
            if i < 256 {
                return i as u8;
            }
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 33) as u8
        })
        .collect()
}

/// utf8mb4 text (emoji), BLOBs (every byte value, up to 1 MiB), a view, a function, a
/// procedure, a trigger and an event.
fn populate(database: &str) {
    let mut c = conn(None);
    c.query_drop(format!("CREATE DATABASE `{database}` CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"))
        .unwrap();
    let mut c = conn(Some(database));
    for sql in [
        "CREATE TABLE people (
            id INT AUTO_INCREMENT PRIMARY KEY,
            name VARCHAR(200) NOT NULL,
            bio TEXT,
            UNIQUE KEY people_name (name)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
        "INSERT INTO people (name, bio)
            SELECT CONCAT('Person ', seq, ' 🎉 Grüße 日本'), CONCAT('bio ', REPEAT('✓', seq % 50), ' 😀👍🏽')
            FROM seq_1_to_5000",
        "CREATE TABLE files (
            id INT PRIMARY KEY,
            name VARCHAR(100) NOT NULL,
            data LONGBLOB,
            digest CHAR(32)
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
        "CREATE TRIGGER files_digest BEFORE INSERT ON files FOR EACH ROW SET NEW.digest = MD5(NEW.data)",
        "CREATE VIEW people_stats AS SELECT COUNT(*) AS n, MAX(id) AS last_id FROM people",
        "CREATE FUNCTION greet(who VARCHAR(50)) RETURNS VARCHAR(100) CHARSET utf8mb4 DETERMINISTIC
            RETURN CONCAT('Hallo, ', who, ' 👋')",
        "CREATE PROCEDURE add_person(IN p VARCHAR(200))
         BEGIN
            INSERT INTO people (name, bio) VALUES (p, 'added');
         END",
        "CREATE EVENT nightly_cleanup ON SCHEDULE EVERY 1 DAY STARTS '2030-01-01 00:00:00' DISABLE
            DO DELETE FROM people WHERE id < 0",
    ] {
        c.query_drop(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    for (id, len) in [(1, 0usize), (2, 1), (3, 256), (4, 4096), (5, 1 << 20), (6, 70_000)] {
        c.exec_drop(
            "INSERT INTO files (id, name, data) VALUES (?, ?, ?)",
            (id, format!("blob {id} ✓"), blob(len, id as u64)),
        )
        .unwrap();
    }
    c.exec_drop("INSERT INTO files (id, name, data) VALUES (7, 'null blob', NULL)", ()).unwrap();
}

/// Per table: `CHECKSUM TABLE`, row count and md5 of the ordered rows; per object kind:
/// names and definitions; and what the view and the function return.
fn fingerprint(database: &str) -> BTreeMap<String, String> {
    let mut c = conn(Some(database));
    let mut out = BTreeMap::new();
    for table in ["people", "files"] {
        let row: Option<(String, Option<u64>)> = c.query_first(format!("CHECKSUM TABLE `{table}`")).unwrap();
        out.insert(format!("checksum {table}"), format!("{:?}", row.unwrap().1));
    }
    let rows = [
        ("people", "CONCAT_WS('|', id, HEX(name), HEX(IFNULL(bio, 'NULL')))"),
        (
            "files",
            "CONCAT_WS('|', id, HEX(name), IFNULL(MD5(data), 'NULL'), IFNULL(LENGTH(data), -1), IFNULL(digest, 'NULL'))",
        ),
    ];
    for (table, expr) in rows {
        let r: Option<(i64, Option<String>)> = c
            .query_first(format!(
                "SELECT COUNT(*), MD5(GROUP_CONCAT({expr} ORDER BY id SEPARATOR '\\n')) FROM `{table}`"
            ))
            .unwrap();
        out.insert(format!("rows {table}"), format!("{:?}", r.unwrap()));
    }
    let objects = [
        (
            "routine",
            "SELECT ROUTINE_NAME, CONCAT(ROUTINE_TYPE, ' ', ROUTINE_DEFINITION) FROM information_schema.ROUTINES WHERE ROUTINE_SCHEMA = ?",
        ),
        (
            "trigger",
            "SELECT TRIGGER_NAME, CONCAT(ACTION_TIMING, ' ', EVENT_MANIPULATION, ' ', ACTION_STATEMENT) FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = ?",
        ),
        (
            "event",
            "SELECT EVENT_NAME, CONCAT(STATUS, ' ', INTERVAL_VALUE, ' ', INTERVAL_FIELD, ' ', EVENT_DEFINITION) FROM information_schema.EVENTS WHERE EVENT_SCHEMA = ?",
        ),
        ("view", "SELECT TABLE_NAME, IS_UPDATABLE FROM information_schema.VIEWS WHERE TABLE_SCHEMA = ?"),
    ];
    for (kind, sql) in objects {
        let rows: Vec<(String, String)> = c.exec(sql, (database,)).unwrap();
        for (name, def) in rows {
            out.insert(format!("{kind} {name}"), def);
        }
    }
    let stats: Option<(i64, i64)> = c.query_first("SELECT n, last_id FROM people_stats").unwrap();
    out.insert("view result".into(), format!("{:?}", stats.unwrap()));
    let greet: Option<String> = c.query_first("SELECT greet('Welt')").unwrap();
    out.insert("function result".into(), greet.unwrap());
    out
}

fn assert_objects_present(f: &BTreeMap<String, String>) {
    for key in [
        "routine greet",
        "routine add_person",
        "trigger files_digest",
        "event nightly_cleanup",
        "view people_stats",
    ] {
        assert!(f.contains_key(key), "{key} in {:?}", f.keys().collect::<Vec<_>>());
    }
    assert_eq!(f["function result"], "Hallo, Welt 👋");
}

fn read_all(path: &std::path::Path, key: &backupy_agent::crypto::KeySource) -> Vec<u8> {
    let mut out = Vec::new();
    db::open_dump(path, Some(key)).read_to_end(&mut out).unwrap();
    out
}

#[test]
fn single_database_backup_restores_into_a_fresh_database() {
    let _lock = db::server_lock(LOCK, false);
    let source = db::unique("bk_my_one");
    let restored = format!("{source}_restored");
    let _cleanup = DropDbs(vec![source.clone(), restored.clone()]);
    populate(&source);
    let before = fingerprint(&source);
    assert_objects_present(&before);

    let dir = tempfile::tempdir().unwrap();
    let storage = DirStorage::open(dir.path().join("store")).unwrap();
    let (_, key) = db::raw_key();
    let t = Instant::now();
    let b = db::backup(&spec(&source), &storage, &dir.path().join("tmp"), &RunOpts::default()).unwrap();
    let backup_time = t.elapsed();
    let v = b.engine_version.strip_prefix("MariaDB ").unwrap_or_else(|| panic!("{}", b.engine_version));
    assert!(v.chars().all(|c| c.is_ascii_digit() || c == '.'), "no suffix: {}", b.engine_version);
    assert!(b.size_hint.is_some_and(|n| n > 0), "size hint {:?}", b.size_hint);
    assert_eq!(common::files_under(&dir.path().join("tmp")), Vec::<String>::new(), "defaults file removed");

    let dump = read_all(&b.path, &key);
    let text = String::from_utf8_lossy(&dump);
    assert!(!text.contains("CREATE DATABASE"), "a one-database dump restores into any database");
    assert!(text.contains("0x000102030405"), "BLOBs are hex");
    for needle in [
        "TRIGGER files_digest BEFORE INSERT",
        "FUNCTION `greet`",
        "PROCEDURE `add_person`",
        "EVENT `nightly_cleanup`",
    ] {
        assert!(text.contains(needle), "{needle} in the dump");
    }

    let t = Instant::now();
    let mut input = db::open_dump(&b.path, Some(&key));
    let opts = MySqlRestoreOptions { create_database: true, ..Default::default() };
    my_driver::restore(&spec(&restored), &mut input, &opts).unwrap();
    let after = fingerprint(&restored);
    assert_eq!(after, before);
    // The restored trigger and procedure work.
    let mut c = conn(Some(&restored));
    c.query_drop("CALL add_person('Neu 🆕')").unwrap();
    c.exec_drop("INSERT INTO files (id, name, data) VALUES (100, 'x', ?)", (b"abc".to_vec(),)).unwrap();
    let digest: Option<String> = c.query_first("SELECT digest FROM files WHERE id = 100").unwrap();
    assert_eq!(digest.as_deref(), Some("900150983cd24fb0d6963f7d28e17f72"));
    eprintln!(
        "timings: backup {backup_time:?} ({} bytes dump), restore {:?}",
        b.output.dump_bytes,
        t.elapsed()
    );
}

#[test]
fn all_databases_backup_restores_after_the_databases_are_dropped() {
    // Restoring a whole server rewrites every database: no other test may run meanwhile.
    let _lock = db::server_lock(LOCK, true);
    let a = db::unique("bk_my_all_a");
    let b_name = db::unique("bk_my_all_b");
    let _cleanup = DropDbs(vec![a.clone(), b_name.clone()]);
    populate(&a);
    conn(None).query_drop(format!("CREATE DATABASE `{b_name}` CHARACTER SET utf8mb4")).unwrap();
    conn(Some(&b_name))
        .query_drop(
            "CREATE TABLE notes (id INT PRIMARY KEY, body VARCHAR(100)) DEFAULT CHARSET=utf8mb4; \
                     INSERT INTO notes VALUES (1, 'zwei 🐢'), (2, 'ñ')",
        )
        .unwrap();
    let before_a = fingerprint(&a);
    let notes = |db: &str| -> Vec<(i32, String)> {
        conn(Some(db)).query("SELECT id, body FROM notes ORDER BY id").unwrap()
    };
    let before_b = notes(&b_name);

    let dir = tempfile::tempdir().unwrap();
    let storage = DirStorage::open(dir.path().join("store")).unwrap();
    let (_, key) = db::raw_key();
    let b = db::backup(&spec(""), &storage, &dir.path().join("tmp"), &RunOpts::default()).unwrap();
    let text = String::from_utf8_lossy(&read_all(&b.path, &key)).into_owned();
    for name in [&a, &b_name] {
        assert!(
            text.contains(&format!("CREATE DATABASE /*!32312 IF NOT EXISTS*/ `{name}`")),
            "{name} in the dump"
        );
    }
    assert!(text.contains("USE `mysql`"), "the system database is in an all-databases dump");

    drop_database(&a);
    drop_database(&b_name);
    let mut input = db::open_dump(&b.path, Some(&key));
    my_driver::restore(&spec(""), &mut input, &MySqlRestoreOptions::default()).unwrap();
    let after_a = fingerprint(&a);
    assert_eq!(after_a, before_a);
    assert_objects_present(&after_a);
    assert_eq!(notes(&b_name), before_b);
}

/// A user (all privileges) whose password needs quoting in an option file.
fn special_user() -> (String, String) {
    let user = db::unique("bk_u");
    let password = r#"p"a#s\w:o'rd $x ;"#.to_string();
    let lit = password.replace('\\', "\\\\").replace('\'', "\\'");
    let mut c = conn(None);
    c.query_drop(format!("CREATE USER '{user}'@'localhost' IDENTIFIED BY '{lit}'")).unwrap();
    c.query_drop(format!("GRANT ALL PRIVILEGES ON *.* TO '{user}'@'localhost'")).unwrap();
    (user, password)
}

#[test]
fn unix_socket_dump_with_a_quoted_password_restores() {
    let _lock = db::server_lock(LOCK, false);
    let source = db::unique("bk_my_sock");
    let restored = format!("{source}_restored");
    let _cleanup = DropDbs(vec![source.clone(), restored.clone()]);
    let (user, password) = special_user();
    conn(None).query_drop(format!("CREATE DATABASE `{source}` CHARACTER SET utf8mb4")).unwrap();
    conn(Some(&source))
        .query_drop(
            "CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(50)) DEFAULT CHARSET=utf8mb4; \
                     INSERT INTO t SELECT seq, CONCAT('wert ', seq, ' 🦀') FROM seq_1_to_3000",
        )
        .unwrap();
    let mut s = TargetSpec::new("maria-sock", Engine::MariaDb);
    s.strategy = Strategy::UnixSocket;
    s.host = db::maria().socket;
    s.username = user.clone();
    s.password = Some(Secret::new(password.clone()));
    s.database = source.clone();

    let dir = tempfile::tempdir().unwrap();
    let storage = DirStorage::open(dir.path().join("store")).unwrap();
    let (_, key) = db::raw_key();
    let b = db::backup(&s, &storage, &dir.path().join("tmp"), &RunOpts::default()).unwrap();
    assert!(b.engine_version.starts_with("MariaDB 10."), "{}", b.engine_version);
    let mut target = s.clone();
    target.database = restored.clone();
    let mut input = db::open_dump(&b.path, Some(&key));
    my_driver::restore(
        &target,
        &mut input,
        &MySqlRestoreOptions { create_database: true, ..Default::default() },
    )
    .unwrap();
    let sum =
        |d: &str| -> Option<(String, Option<u64>)> { conn(Some(d)).query_first("CHECKSUM TABLE t").unwrap() };
    assert_eq!(sum(&restored).unwrap().1, sum(&source).unwrap().1);
    let n: Option<i64> = conn(Some(&restored)).query_first("SELECT COUNT(*) FROM t").unwrap();
    assert_eq!(n, Some(3000));
    let _ = conn(None).query_drop(format!("DROP USER '{user}'@'localhost'"));
}

fn assert_fails_cleanly(spec: &TargetSpec, want: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let storage = DirStorage::open(dir.path().join("store")).unwrap();
    let t = Instant::now();
    let err = match db::backup(spec, &storage, &dir.path().join("tmp"), &RunOpts::default()) {
        Ok(_) => panic!("the backup of {spec:?} succeeded"),
        Err(e) => e,
    };
    for w in want {
        assert!(err.contains(w), "error {err:?} should contain {w:?}");
    }
    if let Some(pw) = &spec.password {
        assert!(!err.contains(pw.expose()), "no password in the error: {err}");
    }
    assert!(t.elapsed() < Duration::from_secs(15), "failed promptly ({:?})", t.elapsed());
    assert_eq!(common::files_under(dir.path()), Vec::<String>::new(), "nothing stored, no temp file left");
}

#[test]
fn wrong_password_is_a_clear_error_and_nothing_is_stored() {
    let _lock = db::server_lock(LOCK, false);
    let mut s = spec("mysql");
    s.password = Some(Secret::new("not-the-password"));
    assert_fails_cleanly(
        &s,
        &["target maria: MariaDB at 127.0.0.1:", "refused user \"root\"", "Access denied"],
    );
}

#[test]
fn unreachable_server_is_a_clear_error_and_nothing_is_stored() {
    let mut s = spec("mysql");
    let (closed, _closed_claim) = crate::common::reserve_port();
    s.port = closed;
    assert_fails_cleanly(
        &s,
        &[&format!("cannot connect to MariaDB at 127.0.0.1:{}", s.port), "onnection refused"],
    );
}

#[test]
fn missing_database_is_a_clear_error_and_nothing_is_stored() {
    let _lock = db::server_lock(LOCK, false);
    let s = spec("no_such_database_here");
    assert_fails_cleanly(&s, &["database \"no_such_database_here\" does not exist on MariaDB at 127.0.0.1:"]);
}

#[test]
fn missing_dump_tool_is_a_clear_error_naming_the_tools_and_how_to_install_them() {
    let cap = my_driver::capability(Engine::MariaDb);
    assert!(cap.as_deref().is_some_and(|c| c.starts_with("mariadb-dump 10.")), "capability here: {cap:?}");
    let empty = tempfile::tempdir().unwrap();
    db::rerun_self(
        module_path!(),
        "inner_dump_tool_missing",
        &[("BACKUPY_TOOL_PATH", empty.path().as_os_str())],
    );
}

#[test]
#[ignore = "run by missing_dump_tool_is_a_clear_error_naming_the_tools_and_how_to_install_them"]
fn inner_dump_tool_missing() {
    if !db::is_inner() {
        return;
    }
    assert_eq!(my_driver::capability(Engine::MariaDb), None);
    assert_fails_cleanly(
        &spec("mysql"),
        &[
            "neither mariadb-dump nor mysqldump was found in BACKUPY_TOOL_PATH=",
            "apt-get install mariadb-client",
        ],
    );
}

/// A database with a ~20 MB table, for dumps that must still be running when looked at.
fn slow_source(prefix: &str) -> (String, DropDbs) {
    let name = db::unique(prefix);
    let guard = DropDbs(vec![name.clone()]);
    conn(None).query_drop(format!("CREATE DATABASE `{name}`")).unwrap();
    conn(Some(&name))
        .query_drop(
            "CREATE TABLE filler (id INT PRIMARY KEY, v VARCHAR(100)); \
                     INSERT INTO filler SELECT seq, REPEAT(MD5(seq), 3) FROM seq_1_to_200000",
        )
        .unwrap();
    (name, guard)
}

fn slow_opts(cancel: Cancel, progress: Arc<Progress>) -> RunOpts {
    RunOpts {
        compression: Compression::None,
        encryption: Encryption::None,
        sink_delay: Some(Duration::from_millis(20)),
        buffer_size: Some(64 << 10),
        cancel,
        progress,
    }
}

#[test]
fn dump_killed_mid_stream_fails_the_run_and_stores_nothing() {
    let _lock = db::server_lock(LOCK, false);
    let (name, _guard) = slow_source("bk_my_kill");
    let dir = tempfile::tempdir().unwrap();
    let storage = DirStorage::open(dir.path().join("store")).unwrap();
    let progress = Arc::new(Progress::default());
    let opts = slow_opts(Cancel::default(), progress.clone());
    let s = spec(&name);
    let tmp = dir.path().join("tmp");
    let run = std::thread::spawn(move || db::backup(&s, &storage, &tmp, &opts));
    let pid =
        db::find_child("mariadb-dump", &name, Duration::from_secs(20)).expect("mariadb-dump is running");
    let deadline = Instant::now() + Duration::from_secs(20);
    while progress.dump_bytes.load(Ordering::Relaxed) < 256 << 10 {
        assert!(Instant::now() < deadline, "the dump streams");
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: kill(2) on the process group of the mariadb-dump this test started.
    assert_eq!(unsafe { libc::kill(-pid, libc::SIGKILL) }, 0);
    let err = match run.join().unwrap() {
        Ok(b) => panic!("a killed dump was stored: {:?}", b.output),
        Err(e) => e,
    };
    assert!(
        err.contains("dump stage failed") && err.contains("mariadb-dump was killed by signal 9"),
        "{err}"
    );
    assert_eq!(common::files_under(dir.path()), Vec::<String>::new(), "nothing stored, no temp file left");
}

#[test]
fn no_password_or_agent_key_in_the_mariadb_dump_command_line_or_environment() {
    let agent_key = format!("bkpy-agent-key-{}", db::unique("k"));
    db::rerun_self(
        module_path!(),
        "inner_mariadb_dump_secrets",
        &[("BACKUPY_AGENT_KEY", agent_key.as_ref())],
    );
}

#[test]
#[ignore = "run by no_password_or_agent_key_in_the_mariadb_dump_command_line_or_environment"]
fn inner_mariadb_dump_secrets() {
    if !db::is_inner() {
        return;
    }
    let _lock = db::server_lock(LOCK, false);
    let agent_key = std::env::var("BACKUPY_AGENT_KEY").expect("the outer test plants an agent key");
    let password = db::maria().password;
    let (name, _guard) = slow_source("bk_my_secrets");
    let dir = tempfile::tempdir().unwrap();
    let storage = DirStorage::open(dir.path().join("store")).unwrap();
    let cancel = Cancel::default();
    let opts = slow_opts(cancel.clone(), Arc::new(Progress::default()));
    let s = spec(&name);
    let tmp = dir.path().join("tmp");
    let run = std::thread::spawn(move || db::backup(&s, &storage, &tmp, &opts));

    let pid =
        db::find_child("mariadb-dump", &name, Duration::from_secs(20)).expect("mariadb-dump is running");
    let (cmdline, environ) = db::proc_cmdline_and_environ(pid);
    assert!(!db::contains(&cmdline, &password), "password in mariadb-dump's argv");
    assert!(!db::contains(&environ, &password), "password in mariadb-dump's environment");
    assert!(!db::contains(&cmdline, &agent_key), "agent key in mariadb-dump's argv");
    assert!(!db::contains(&environ, &agent_key), "agent key in mariadb-dump's environment");
    let env = db::split_nul(&environ);
    assert!(!env.iter().any(|v| v.starts_with("BACKUPY_") || v.starts_with("MYSQL_PWD")), "{env:?}");
    let args = db::split_nul(&cmdline);
    let file =
        args[1].strip_prefix("--defaults-extra-file=").unwrap_or_else(|| panic!("first argument: {args:?}"));
    let file = std::path::Path::new(file);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(file), 0o600, "defaults file mode");
        assert_eq!(mode(file.parent().unwrap()), 0o700, "defaults file directory mode");
        assert!(file.starts_with(dir.path().join("tmp")), "the defaults file is under the run's temp dir");
        assert!(
            std::fs::read_to_string(file).unwrap().contains(&password),
            "the defaults file holds the password"
        );
    }
    for flag in ["--single-transaction", "--routines", "--triggers", "--events", "--hex-blob"] {
        assert!(args.iter().any(|a| a == flag), "{flag} in {args:?}");
    }

    cancel.cancel();
    let err = match run.join().unwrap() {
        Ok(_) => panic!("a cancelled run was stored"),
        Err(e) => e,
    };
    assert_eq!(err, "cancelled");
    assert!(!file.exists(), "the defaults file is removed when the run ends");
}
