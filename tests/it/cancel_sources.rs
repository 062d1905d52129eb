//! Issue 16.6: a cancel (or a job's timeout, which sets the same flag) stops a run within
//! 5 s whatever its source is doing. Each source is held in a state it cannot leave by
//! itself, deterministically: a SQLite database locked by another connection, a stand-in
//! Redis master that keeps preparing its snapshot (keep-alive newlines for ever), one
//! that stops sending in the middle of the RDB, a `mariadb-dump` waiting on a locked
//! table, and a native MongoDB dump behind a sink that takes a second per buffer. The
//! Docker BGSAVE wait is in `docker_exec.rs` (it needs a container).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use backupy_agent::cancel::Cancel;
use backupy_agent::drivers::{Engine, TargetSpec};
use backupy_agent::pipeline::Compression;
use backupy_agent::storage::DirStorage;

use crate::common::db;
use crate::common::*;

const PROMISED: Duration = Duration::from_secs(5);

/// Runs a backup of `spec` on a thread with `cancel`; returns the receiver of its result.
fn start_backup(
    spec: TargetSpec,
    cancel: Cancel,
    dir: &std::path::Path,
) -> crossbeam_channel::Receiver<Result<(), String>> {
    start_backup_with(spec, db::RunOpts { cancel, compression: Compression::None, ..Default::default() }, dir)
}

/// [`start_backup`] with options of the test's own.
fn start_backup_with(
    spec: TargetSpec,
    opts: db::RunOpts,
    dir: &std::path::Path,
) -> crossbeam_channel::Receiver<Result<(), String>> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let root = dir.to_path_buf();
    std::thread::spawn(move || {
        let storage = DirStorage::open(root.join("backups")).unwrap();
        let r = db::backup(&spec, &storage, &root.join("state/tmp"), &opts).map(|_| ());
        let _ = tx.send(r);
    });
    rx
}

/// Cancels and asserts the backup ends, with an error, within the promised 5 s.
fn cancel_and_expect_stop(
    cancel: &Cancel,
    rx: &crossbeam_channel::Receiver<Result<(), String>>,
    what: &str,
) -> String {
    let t0 = Instant::now();
    cancel.cancel();
    match rx.recv_timeout(PROMISED) {
        Ok(Err(e)) => {
            assert!(t0.elapsed() < PROMISED);
            e
        }
        Ok(Ok(())) => panic!("{what}: the backup succeeded although it was cancelled"),
        Err(_) => panic!("{what}: the backup was still running {PROMISED:?} after the cancel"),
    }
}

#[test]
fn a_sqlite_snapshot_waiting_for_a_locked_database_stops_on_cancel() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    let holder = rusqlite::Connection::open(&path).unwrap();
    holder.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);").unwrap();
    // Another process's writer in the middle of its commit: nobody may read.
    holder.execute_batch("BEGIN EXCLUSIVE; INSERT INTO t VALUES (2);").unwrap();
    let mut spec = TargetSpec::new("app", Engine::Sqlite);
    spec.database = path.to_string_lossy().into_owned();
    let cancel = Cancel::default();
    let rx = start_backup(spec, cancel.clone(), dir.path());
    // It cannot finish while the lock is held; give it time to be deep in its wait.
    assert!(rx.recv_timeout(Duration::from_millis(700)).is_err(), "the snapshot cannot have been taken");
    let err = cancel_and_expect_stop(&cancel, &rx, "sqlite snapshot");
    assert!(err.contains("stopped"), "{err}");
    holder.execute_batch("ROLLBACK").unwrap();
    let leftovers = files_under(&dir.path().join("state/tmp"));
    assert!(leftovers.is_empty(), "the snapshot file is removed: {leftovers:?}");
}

/// What the stand-in master does after PSYNC.
#[derive(Clone, Copy)]
enum Master {
    /// "+FULLRESYNC", then a keep-alive newline every 100 ms for ever: a BGSAVE that
    /// never ends.
    Preparing,
    /// "+FULLRESYNC", a bulk header for 10 MB, 300 KB of the RDB, then nothing.
    StallsMidStream,
}

/// A stand-in Redis master on a loopback port: answers INFO and REPLCONF, and after
/// PSYNC behaves as `mode` says. Sends a message on the returned channel once it has
/// sent all it will before the stall.
fn stand_in_master(mode: Master) -> (u16, PortClaim, crossbeam_channel::Receiver<()>) {
    let (port, claim) = reserve_port();
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let Ok((sock, _)) = listener.accept() else { return };
        let mut r = BufReader::new(sock.try_clone().unwrap());
        let mut w = sock;
        while let Some(cmd) = read_command(&mut r) {
            let reply: Vec<u8> = match cmd[0].to_ascii_uppercase().as_str() {
                "INFO" => {
                    let body = "# Server\r\nredis_version:7.0.15\r\n";
                    format!("${}\r\n{body}\r\n", body.len()).into_bytes()
                }
                "PSYNC" | "SYNC" => {
                    if w.write_all(b"+FULLRESYNC 0123456789012345678901234567890123456789 0\r\n").is_err() {
                        return;
                    }
                    match mode {
                        Master::Preparing => {
                            let _ = tx.send(());
                            while w.write_all(b"\n").is_ok() {
                                std::thread::sleep(Duration::from_millis(100));
                            }
                        }
                        Master::StallsMidStream => {
                            let mut rdb = b"REDIS0011".to_vec();
                            rdb.resize(300_000, b'x');
                            if w.write_all(b"$10000000\r\n").and_then(|_| w.write_all(&rdb)).is_ok() {
                                let _ = tx.send(());
                                // Hold the connection open, silent, until the agent drops it.
                                let mut sink = [0u8; 64];
                                while matches!(r.read(&mut sink), Ok(n) if n > 0) {}
                            }
                        }
                    }
                    return;
                }
                _ => b"+OK\r\n".to_vec(),
            };
            if w.write_all(&reply).is_err() {
                return;
            }
        }
    });
    (port, claim, rx)
}

/// One RESP array of bulk strings, as a client sends commands.
fn read_command(r: &mut BufReader<TcpStream>) -> Option<Vec<String>> {
    let mut line = String::new();
    r.read_line(&mut line).ok().filter(|n| *n > 0)?;
    let n: usize = line.trim().strip_prefix('*')?.parse().ok()?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        line.clear();
        r.read_line(&mut line).ok()?;
        let len: usize = line.trim().strip_prefix('$')?.parse().ok()?;
        let mut buf = vec![0u8; len + 2];
        r.read_exact(&mut buf).ok()?;
        buf.truncate(len);
        out.push(String::from_utf8_lossy(&buf).into_owned());
    }
    Some(out)
}

fn redis_spec(port: u16) -> TargetSpec {
    let mut spec = TargetSpec::new("cache", Engine::Redis);
    spec.host = "127.0.0.1".into();
    spec.port = port;
    spec
}

#[test]
fn a_redis_dump_waiting_for_the_master_to_prepare_its_snapshot_stops_on_cancel() {
    let dir = tempfile::tempdir().unwrap();
    let (port, _claim, ready) = stand_in_master(Master::Preparing);
    let cancel = Cancel::default();
    let rx = start_backup(redis_spec(port), cancel.clone(), dir.path());
    ready.recv_timeout(Duration::from_secs(20)).expect("the agent sends PSYNC to the stand-in master");
    let err = cancel_and_expect_stop(&cancel, &rx, "redis replication preamble");
    assert!(err.contains("stopped") || err.contains("cancel"), "{err}");
}

#[test]
fn a_redis_dump_whose_master_stalls_mid_stream_stops_on_cancel() {
    let dir = tempfile::tempdir().unwrap();
    let (port, _claim, ready) = stand_in_master(Master::StallsMidStream);
    let cancel = Cancel::default();
    let rx = start_backup(redis_spec(port), cancel.clone(), dir.path());
    ready.recv_timeout(Duration::from_secs(20)).expect("the stand-in master sends part of the RDB");
    let err = cancel_and_expect_stop(&cancel, &rx, "redis replication stream");
    assert!(err.contains("cancel"), "{err}");
    let partial: Vec<String> = files_under(&dir.path().join("backups"));
    assert!(partial.is_empty(), "nothing is stored of a cancelled run: {partial:?}");
}

/// The child-process sources were already stopped by killing their process group; this
/// holds it for MariaDB: `mariadb-dump` waits on a table another session holds with
/// `LOCK TABLES … WRITE`, and the cancel ends it within 5 s, leaving no dump process.
#[test]
fn a_mariadb_dump_waiting_for_a_locked_table_stops_on_cancel() {
    use mysql::prelude::Queryable;
    let _lock = db::server_lock("mariadb", false);
    let m = db::maria();
    let database = db::unique("lockd");
    let opts = mysql::OptsBuilder::new()
        .ip_or_hostname(Some(m.host.clone()))
        .tcp_port(m.port)
        .user(Some(m.user.clone()))
        .pass(Some(m.password.clone()));
    let mut holder = mysql::Conn::new(opts).unwrap();
    holder.query_drop(format!("CREATE DATABASE {database}")).unwrap();
    holder.query_drop(format!("CREATE TABLE {database}.t(id INT PRIMARY KEY) ENGINE=InnoDB")).unwrap();
    holder.query_drop(format!("INSERT INTO {database}.t VALUES (1), (2)")).unwrap();
    holder.query_drop(format!("LOCK TABLES {database}.t WRITE")).unwrap();
    let mut spec = TargetSpec::new("maria", Engine::MariaDb);
    spec.host = m.host.clone();
    spec.port = m.port;
    spec.username = m.user.clone();
    spec.password = Some(backupy_agent::secrets::Secret::new(m.password.clone()));
    spec.database = database.clone();
    let dir = tempfile::tempdir().unwrap();
    let cancel = Cancel::default();
    let rx = start_backup(spec, cancel.clone(), dir.path());
    // The dump tool is running and blocked on the lock: find it among our children.
    let child = db::find_child("mariadb-dump", &database, Duration::from_secs(20))
        .or_else(|| db::find_child("mysqldump", &database, Duration::from_secs(1)))
        .expect("the dump tool runs");
    let err = cancel_and_expect_stop(&cancel, &rx, "mariadb-dump");
    assert!(err.contains("cancel"), "{err}");
    let alive = std::fs::read_to_string(format!("/proc/{child}/stat"))
        .map(|s| s.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().next()) != Some("Z"))
        .unwrap_or(false);
    assert!(!alive, "the dump tool (pid {child}) was killed");
    holder.query_drop("UNLOCK TABLES").unwrap();
    holder.query_drop(format!("DROP DATABASE {database}")).unwrap();
}

/// The native MongoDB dump reads collections through cursors on the dump thread; a
/// cancel stops it part-way through a collection of 20 000 documents, whose backup
/// (through a sink that takes a second per buffer) could not finish for many seconds.
#[test]
fn a_native_mongodb_dump_stops_on_cancel_mid_collection() {
    use mongodb::bson::{Document, doc};
    let url = db::need("BACKUPY_TEST_SECANTUS_URL", "mongo");
    let client = mongodb::sync::Client::with_uri_str(&url).unwrap();
    let database = db::unique("mcancel");
    let pad = "x".repeat(1000);
    let docs: Vec<Document> = (0..20_000).map(|i| doc! { "_id": i, "pad": &pad }).collect();
    client.database(&database).collection::<Document>("c").insert_many(docs).run().unwrap();
    let mut spec = TargetSpec::new("mongo", Engine::MongoDb);
    spec.host = db::need("BACKUPY_TEST_SECANTUS_HOST", "mongo");
    spec.port = db::need("BACKUPY_TEST_SECANTUS_PORT", "mongo").parse().unwrap();
    spec.username = db::need("BACKUPY_TEST_SECANTUS_USER", "mongo");
    spec.password =
        Some(backupy_agent::secrets::Secret::new(db::need("BACKUPY_TEST_SECANTUS_PASSWORD", "mongo")));
    spec.database = database.clone();
    spec.options.insert("authSource".into(), "admin".into());
    spec.options.insert("tool".into(), "native".into());
    let dir = tempfile::tempdir().unwrap();
    let cancel = Cancel::default();
    let progress = std::sync::Arc::new(backupy_agent::pipeline::Progress::default());
    let opts = db::RunOpts {
        cancel: cancel.clone(),
        compression: Compression::None,
        sink_delay: Some(Duration::from_secs(1)),
        progress: progress.clone(),
        ..Default::default()
    };
    let rx = start_backup_with(spec, opts, dir.path());
    let t0 = Instant::now();
    while progress.dump_bytes.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(t0.elapsed() < Duration::from_secs(30), "the native dump never started");
        assert!(rx.is_empty(), "the backup ended before it started dumping: {:?}", rx.try_recv());
        std::thread::sleep(Duration::from_millis(10));
    }
    let err = cancel_and_expect_stop(&cancel, &rx, "native mongodb dump");
    assert!(err.contains("cancel") || err.contains("stopped"), "{err}");
    client.database(&database).drop().run().unwrap();
}
