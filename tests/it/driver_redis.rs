//! The Redis driver against real redis-servers: an RDB streamed over the replication
//! protocol (bulk and diskless forms, TCP and UNIX socket), through the real pipeline
//! into encrypted directory storage, restored both ways (a fresh server loading the file,
//! and RESTORE replay into a running server) with every key, value and TTL compared;
//! and each failure the spec names (wrong password, unreachable server, replication
//! refused, server killed mid-stream) is a clear error with nothing stored.
//!
//! Needs `scripts/services.sh` (`services_start_redis`): the shared server for the
//! authentication tests, and its `redis-server` binary for the throwaway servers that
//! the round trips fill, kill and restore into.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use backupy_agent::cancel::Cancel;
use backupy_agent::crypto::{self, Encryption, Identity, KeySource};
use backupy_agent::drivers::redis::{ReplayOptions, restore_replay, restore_to_dir};
use backupy_agent::drivers::{self, DumpContext, Engine, Strategy, TargetSpec};
use backupy_agent::pipeline::compress::decompress_by_magic;
use backupy_agent::pipeline::{self, Compression, PipelineError, Progress, Stage};
use backupy_agent::secrets::Secret;
use backupy_agent::storage::{DirStorage, ObjectWriter, StoredObject};
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo, Value};

// ------------------------------------------------------------------------- services

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: these tests need the throwaway Redis of scripts/services.sh. Run them \
             through scripts/test.sh, or `source scripts/services.sh; services_init; services_start_redis` \
             first in the same shell"
        )
    })
}

/// The shared server of scripts/services.sh.
struct Shared {
    port: u16,
    password: String,
    acl_user: String,
    acl_password: String,
}

fn shared() -> Shared {
    Shared {
        port: env("BACKUPY_TEST_REDIS_PORT").parse().expect("BACKUPY_TEST_REDIS_PORT is a port"),
        password: env("BACKUPY_TEST_REDIS_PASSWORD"),
        acl_user: env("BACKUPY_TEST_REDIS_ACL_USER"),
        acl_password: env("BACKUPY_TEST_REDIS_ACL_PASSWORD"),
    }
}

fn redis_server_bin() -> PathBuf {
    PathBuf::from(env("BACKUPY_TEST_REDIS_SERVER"))
}

fn tcp_spec(id: &str, port: u16, username: &str, password: Option<&str>) -> TargetSpec {
    let mut spec = TargetSpec::new(id, Engine::Redis);
    spec.host = "127.0.0.1".into();
    spec.port = port;
    spec.username = username.into();
    spec.password = password.map(Secret::new);
    spec
}

fn client(addr: ConnectionAddr, password: Option<&str>) -> redis::Connection {
    let mut settings = RedisConnectionInfo::default();
    if let Some(pw) = password {
        settings = settings.set_password(pw);
    }
    let info: ConnectionInfo = addr.into_connection_info().unwrap().set_redis_settings(settings);
    let con =
        redis::Client::open(info).unwrap().get_connection_with_timeout(Duration::from_secs(10)).unwrap();
    con.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    con
}

/// A redis-server of our own in `dir` (which it loads `dump.rdb` from, if present),
/// killed with its process group on drop.
struct Server {
    child: Child,
    port: u16,
    password: Option<String>,
    dir: PathBuf,
}

impl Server {
    fn start(dir: &Path, password: Option<&str>, extra: &[&str]) -> Server {
        std::fs::create_dir_all(dir).unwrap();
        // Claimed until the server listens: no other test can take the port meanwhile.
        let (port, _port_claim) = crate::common::reserve_port();
        let mut cmd = Command::new(redis_server_bin());
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .args(["--dbfilename", "dump.rdb", "--daemonize", "no", "--repl-diskless-sync-delay", "0"])
            .arg("--unixsocket")
            .arg(dir.join("redis.sock"))
            .args(["--unixsocketperm", "700"])
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .args(extra)
            .stdin(Stdio::null())
            .process_group(0);
        if let Some(pw) = password {
            cmd.args(["--requirepass", pw]);
        }
        let mut s = Server {
            child: cmd.spawn().unwrap(),
            port,
            password: password.map(String::from),
            dir: dir.into(),
        };
        assert!(
            s.wait_ready(),
            "redis-server did not start on port {port}; its log:\n{}",
            crate::common::log_tail(&dir.join("redis.log"))
        );
        s
    }

    /// Waits until the server answers (and has loaded its data); false if it exited.
    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return false;
            }
            let info = ConnectionAddr::Tcp("127.0.0.1".into(), self.port).into_connection_info().unwrap();
            let info = match &self.password {
                Some(pw) => info.set_redis_settings(RedisConnectionInfo::default().set_password(pw)),
                None => info,
            };
            if let Ok(mut con) =
                redis::Client::open(info).unwrap().get_connection_with_timeout(Duration::from_secs(1))
                && redis::cmd("PING").query::<String>(&mut con).is_ok()
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    fn client(&self) -> redis::Connection {
        client(ConnectionAddr::Tcp("127.0.0.1".into(), self.port), self.password.as_deref())
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("redis.sock")
    }

    fn kill(&mut self) {
        // SAFETY: kill(2) on the process group this test spawned (process_group(0)).
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

// ------------------------------------------------------------------------- datasets

/// Sends `cmds` in pipelines of 10 000.
fn pipelined(con: &mut redis::Connection, cmds: impl IntoIterator<Item = redis::Cmd>) {
    let mut p = redis::pipe();
    for c in cmds {
        p.add_command(c).ignore();
        if p.len() == 10_000 {
            p.exec(con).unwrap();
            p.clear();
        }
    }
    if !p.is_empty() {
        p.exec(con).unwrap();
    }
}

/// `cmd!("SET", key, value)`: one command with its arguments.
macro_rules! cmd {
    ($name:expr $(, $arg:expr)* $(,)?) => {{
        #[allow(unused_mut)]
        let mut c = redis::cmd($name);
        $(c.arg($arg);)*
        c
    }};
}

const STRINGS: usize = 100_000;
const LIBRARY: &str =
    "#!lua name=backupylib\nredis.register_function('backupy_echo', function(keys, args) return args[1] end)";

/// Every type, small and large encodings, binary keys and values, TTLs, two databases
/// and a function library: more than 100 000 keys.
fn fill(con: &mut redis::Connection) {
    let mut cmds = Vec::new();
    for i in 0..STRINGS {
        cmds.push(cmd!("SET", &format!("s:{i}"), &format!("value {i} {}", i * 7919 % 1000)));
    }
    cmds.push(cmd!(
        "SET",
        &b"bin:\xff\x00key".as_slice(),
        &(0..=255u8).cycle().take(5000).collect::<Vec<_>>()
    ));
    cmds.push(cmd!("SET", &"big", &"0123456789abcdef".repeat(1 << 16))); // 1 MiB
    cmds.push(cmd!("SET", &"counter", &12345));
    for i in 0..200 {
        for f in 0..10 {
            cmds.push(cmd!("HSET", &format!("h:{i}"), &format!("f{f}"), &format!("v{i}.{f}")));
        }
        for e in 0..50 {
            cmds.push(cmd!("RPUSH", &format!("l:{i}"), &format!("item {e}")));
        }
        for m in 0..20 {
            cmds.push(cmd!("SADD", &format!("set:{i}"), &format!("member {m}")));
            cmds.push(cmd!("ZADD", &format!("z:{i}"), &(m as f64 * 1.5 - 7.25), &format!("m{m}")));
        }
    }
    for n in 0..2000 {
        cmds.push(cmd!("HSET", &"h:big", &format!("field {n}"), &format!("{}", n * n)));
        cmds.push(cmd!("RPUSH", &"l:big", &format!("element {n}")));
        cmds.push(cmd!("SADD", &"set:big", &format!("m{n}")));
        cmds.push(cmd!("SADD", &"set:ints", &(n * 3)));
        cmds.push(cmd!("ZADD", &"z:big", &(n as f64 / 3.0), &format!("member {n}")));
    }
    for n in 0..500 {
        cmds.push(cmd!("XADD", &"stream", &"*", &"n", &n, &"text", &format!("event {n}")));
    }
    cmds.push(cmd!("XGROUP", &"CREATE", &"stream", &"readers", &"0"));
    cmds.push(cmd!("XREADGROUP", &"GROUP", &"readers", &"alice", &"COUNT", &10, &"STREAMS", &"stream", &">"));
    for i in 0..1000 {
        cmds.push(cmd!("SET", &format!("ttl:{i}"), &format!("expiring {i}"), &"PX", &(3_600_000 + i * 1000)));
    }
    cmds.push(cmd!("EXPIRE", &"h:0", &7200));
    cmds.push(cmd!("EXPIRE", &"z:big", &9000));
    cmds.push(cmd!("SELECT", &3));
    for i in 0..100 {
        cmds.push(cmd!("SET", &format!("db3:{i}"), &format!("in db 3: {i}")));
    }
    cmds.push(cmd!("SET", &"db3:ttl", &"x", &"EX", &5000));
    cmds.push(cmd!("SELECT", &0));
    pipelined(con, cmds);
    redis::cmd("FUNCTION").arg("LOAD").arg(LIBRARY).exec(con).unwrap();
}

/// Keys set just before the dump, expired before the restores.
const SHORT_TTL_KEYS: usize = 20;
const SHORT_TTL_MS: u64 = 3000;

fn fill_short_ttl(con: &mut redis::Connection) {
    pipelined(
        con,
        (0..SHORT_TTL_KEYS).map(|i| cmd!("SET", &format!("short:{i}"), &"soon gone", &"PX", &SHORT_TTL_MS)),
    );
}

#[derive(Debug, PartialEq)]
struct Entry {
    kind: String,
    value: Vec<Vec<u8>>,
    pttl: i64,
}

type Snapshot = BTreeMap<(u32, Vec<u8>), Entry>;

fn flat(v: Value) -> Vec<Vec<u8>> {
    match v {
        Value::BulkString(b) => vec![b],
        Value::SimpleString(s) => vec![s.into_bytes()],
        Value::Okay => vec![b"OK".to_vec()],
        Value::Int(i) => vec![i.to_string().into_bytes()],
        Value::Nil => vec![b"(nil)".to_vec()],
        Value::Array(a) | Value::Set(a) => a.into_iter().flat_map(flat).collect(),
        Value::Map(m) => m.into_iter().flat_map(|(k, v)| flat(k).into_iter().chain(flat(v))).collect(),
        other => vec![format!("{other:?}").into_bytes()],
    }
}

/// What each key holds, read type by type; unordered types sorted.
fn snapshot(con: &mut redis::Connection) -> Snapshot {
    let mut out = Snapshot::new();
    for db in 0..16u32 {
        redis::cmd("SELECT").arg(db).exec(con).unwrap();
        let mut keys = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, batch): (u64, Vec<Vec<u8>>) =
                redis::cmd("SCAN").arg(cursor).arg("COUNT").arg(10_000).query(con).unwrap();
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        for chunk in keys.chunks(10_000) {
            let mut p = redis::pipe();
            for k in chunk {
                p.cmd("TYPE").arg(k).cmd("PTTL").arg(k);
            }
            let meta: Vec<Value> = p.query(con).unwrap();
            let mut p = redis::pipe();
            let mut kinds = Vec::new();
            for (k, m) in chunk.iter().zip(meta.chunks(2)) {
                let kind: String = redis::from_redis_value(m[0].clone()).unwrap();
                let pttl: i64 = redis::from_redis_value(m[1].clone()).unwrap();
                match kind.as_str() {
                    "string" => p.cmd("GET").arg(k),
                    "hash" => p.cmd("HGETALL").arg(k),
                    "list" => p.cmd("LRANGE").arg(k).arg(0).arg(-1),
                    "set" => p.cmd("SMEMBERS").arg(k),
                    "zset" => p.cmd("ZRANGE").arg(k).arg(0).arg(-1).arg("WITHSCORES"),
                    "stream" => p.cmd("XRANGE").arg(k).arg("-").arg("+").cmd("XINFO").arg("GROUPS").arg(k),
                    "none" => continue, // expired meanwhile
                    other => panic!("unexpected type {other}"),
                };
                kinds.push((k.clone(), kind, pttl));
            }
            let mut values: std::collections::VecDeque<Value> = p.query::<Vec<Value>>(con).unwrap().into();
            for (k, kind, pttl) in kinds {
                let mut value = flat(values.pop_front().unwrap());
                match kind.as_str() {
                    "hash" => {
                        let mut pairs: Vec<Vec<u8>> = value.chunks(2).map(|c| c.concat()).collect();
                        pairs.sort();
                        value = pairs;
                    }
                    "set" => value.sort(),
                    "stream" => value.extend(stream_groups(values.pop_front().unwrap())),
                    _ => {}
                }
                out.insert((db, k), Entry { kind, value, pttl });
            }
        }
    }
    redis::cmd("SELECT").arg(0).exec(con).unwrap();
    out
}

/// name, consumers, pending and last-delivered-id of each consumer group.
fn stream_groups(v: Value) -> Vec<Vec<u8>> {
    let Value::Array(groups) = v else { panic!("XINFO GROUPS: {v:?}") };
    let keep: [&[u8]; 4] = [b"name", b"consumers", b"pending", b"last-delivered-id"];
    groups
        .into_iter()
        .flat_map(|g| {
            let f = flat(g);
            f.chunks(2)
                .filter(|kv| keep.contains(&kv[0].as_slice()))
                .map(|kv| kv.concat())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn functions(con: &mut redis::Connection) -> Vec<Vec<u8>> {
    flat(redis::cmd("FUNCTION").arg("LIST").query(con).unwrap())
}

/// Same keys, types and values; TTLs within `tolerance` (and none lost or added).
fn assert_same(what: &str, expected: &Snapshot, got: &Snapshot, tolerance: Duration) {
    let missing: Vec<_> = expected.keys().filter(|k| !got.contains_key(*k)).take(5).collect();
    let extra: Vec<_> = got.keys().filter(|k| !expected.contains_key(*k)).take(5).collect();
    assert!(missing.is_empty() && extra.is_empty(), "{what}: missing {missing:?}, unexpected {extra:?}");
    let tol = tolerance.as_millis() as i64;
    for (k, e) in expected {
        let g = &got[k];
        assert_eq!((&e.kind, &e.value), (&g.kind, &g.value), "{what}: value of {k:?}");
        match (e.pttl, g.pttl) {
            (-1, -1) => {}
            (a, b) if a > 0 && b > 0 => {
                assert!(b <= a + 1000 && a - b <= tol, "{what}: TTL of {k:?} was {a} ms, restored {b} ms")
            }
            (a, b) => panic!("{what}: TTL of {k:?} was {a}, restored {b}"),
        }
    }
}

// ------------------------------------------------------------------------ the backup

struct Backup {
    storage: DirStorage,
    output: pipeline::Output,
    size_hint: Option<u64>,
    engine_version: String,
}

/// drivers::dump → the real pipeline → `storage`, as a run does.
fn backup(
    spec: &TargetSpec,
    storage: &DirStorage,
    compression: Compression,
    encryption: &Encryption,
    wrap: impl FnOnce(Box<dyn ObjectWriter>) -> Box<dyn ObjectWriter>,
    progress: Arc<Progress>,
) -> Result<Backup, String> {
    let ctx = DumpContext {
        temp_dir: storage.root().join("../state"),
        pipeline_compresses: true,
        cancel: Default::default(),
    };
    let dump = drivers::dump(spec, &ctx).map_err(|e| e.to_string())?;
    let size_hint = dump.source.size_hint;
    let key = format!("{}/job/object.rdb", spec.id);
    let sink = wrap(Box::new(storage.create(&key).unwrap()));
    let opts = pipeline::Options::new(compression, encryption.prepare(compression.header_code()).unwrap());
    let output =
        pipeline::run(dump.source, opts, sink, &Cancel::default(), progress).map_err(|e| match &e {
            PipelineError::Stage { stage: Stage::Dump, .. } => format!("DUMP STAGE: {e}"),
            _ => e.to_string(),
        })?;
    Ok(Backup { storage: storage.clone(), output, size_hint, engine_version: dump.engine_version })
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    out
}

fn redis_server_version() -> String {
    let out = Command::new(redis_server_bin()).arg("--version").output().unwrap();
    // "Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64 build=…"
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split_whitespace().find_map(|w| w.strip_prefix("v=")).expect("a v= field").to_string()
}

/// The whole round trip: fill, dump in the given form, store encrypted, decrypt, restore
/// into a fresh server loading the file and by RESTORE replay, compare with the source.
fn round_trip(diskless: bool, via_socket: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let pw = format!("source-pw-{}", std::process::id());
    let source = Server::start(&tmp.path().join("source"), Some(&pw), &[]);
    let mut con = source.client();
    let mode = if diskless { "yes" } else { "no" };
    redis::cmd("CONFIG").arg("SET").arg("repl-diskless-sync").arg(mode).exec(&mut con).unwrap();
    redis::cmd("CONFIG").arg("SET").arg("repl-diskless-sync-delay").arg(0).exec(&mut con).unwrap();
    let t = Instant::now();
    fill(&mut con);
    fill_short_ttl(&mut con);
    let short_set = Instant::now();
    eprintln!("filled in {:?}", t.elapsed());

    let mut spec = tcp_spec("cache", source.port, "", Some(&pw));
    if via_socket {
        spec.strategy = Strategy::UnixSocket;
        spec.host = source.socket().display().to_string();
        spec.port = 0;
    }
    let id = Identity::generate().unwrap();
    let enc = Encryption::V2Recipient { recipient: id.recipient().unwrap(), chunk_size: 1 << 20 };
    let storage = DirStorage::open(tmp.path().join("backups")).unwrap();
    let t = Instant::now();
    let b =
        backup(&spec, &storage, Compression::default(), &enc, |w| w, Arc::new(Progress::default())).unwrap();
    eprintln!("dumped {} bytes in {:?}", b.output.dump_bytes, t.elapsed());
    assert_eq!(b.engine_version, format!("Redis {}", redis_server_version()));
    // The size is announced only in the bulk form: this is how we know which one came.
    if diskless {
        assert_eq!(b.size_hint, None, "expected the diskless EOF-mark form");
    } else {
        assert_eq!(b.size_hint, Some(b.output.dump_bytes), "expected the $<len> bulk form");
    }
    assert_eq!(
        files_under(storage.root()),
        vec![storage.path_of(&b.output.object.key).display().to_string()]
    );

    // Decrypt with nothing but the object and the identity.
    let object = File::open(b.storage.path_of(&b.output.object.key)).unwrap();
    let (_, plain) = crypto::open(object, &KeySource::Identity(id)).unwrap();
    let (_, mut rdb) = decompress_by_magic(plain).unwrap();
    let mut bytes = Vec::new();
    rdb.read_to_end(&mut bytes).unwrap();
    assert_eq!(bytes.len() as u64, b.output.dump_bytes);
    // An RDB starts with "REDIS" + 4 version digits and ends with the EOF opcode 0xFF
    // and an 8-byte CRC-64: no protocol framing, no end-of-payload mark.
    assert!(bytes.starts_with(b"REDIS0"), "{:?}", &bytes[..9]);
    assert_eq!(bytes[bytes.len() - 9], 0xFF, "the RDB's last opcode is EOF");
    assert!(contains(&bytes, b"short:0"), "the short-TTL keys are in the dump");
    let rdb_path = tmp.path().join("restored.rdb");
    std::fs::write(&rdb_path, &bytes).unwrap();

    // Let the short-TTL keys expire; the source no longer has them either.
    let wait = Duration::from_millis(SHORT_TTL_MS + 500).saturating_sub(short_set.elapsed());
    std::thread::sleep(wait);
    // TTLs are compared within the time since this snapshot started (+ 2 s).
    let snapped = Instant::now();
    let expected = snapshot(&mut con);
    eprintln!("source snapshot: {} keys in {:?}", expected.len(), snapped.elapsed());
    assert!(expected.len() > 100_000, "{} keys", expected.len());
    assert!(!expected.keys().any(|(_, k)| k.starts_with(b"short:")));
    assert!(expected.values().filter(|e| e.pttl > 0).count() >= 1003);
    let want_functions = functions(&mut con);
    assert!(contains(&want_functions.concat(), b"backupylib"));

    // (a) A fresh server that loads the file from its data directory.
    let dir_a = tmp.path().join("restore-dir");
    std::fs::create_dir_all(&dir_a).unwrap();
    let n = restore_to_dir(&mut File::open(&rdb_path).unwrap(), &dir_a, "dump.rdb").unwrap();
    assert_eq!(n, bytes.len() as u64);
    let a = Server::start(&dir_a, None, &[]);
    let mut con_a = a.client();
    assert_same(
        "restore into a data dir",
        &expected,
        &snapshot(&mut con_a),
        snapped.elapsed() + Duration::from_secs(2),
    );
    assert_eq!(functions(&mut con_a), want_functions);
    drop(a);

    // (b) RESTORE replay into a running, password-protected server.
    let target_pw = "target-pw";
    let b_server = Server::start(&tmp.path().join("replay-target"), Some(target_pw), &[]);
    let opts = ReplayOptions {
        replace: false,
        redis_server: Some(redis_server_bin()),
        temp_dir: Some(tmp.path().join("state")),
    };
    let t = Instant::now();
    let report = restore_replay(
        &tcp_spec("cache", b_server.port, "", Some(target_pw)),
        &mut File::open(&rdb_path).unwrap(),
        &opts,
    )
    .unwrap();
    eprintln!("replayed {report:?} in {:?}", t.elapsed());
    assert_eq!(report.keys as usize, expected.len());
    assert_eq!(report.databases, vec![0, 3]);
    assert!(report.functions);
    let mut con_b = b_server.client();
    assert_same(
        "RESTORE replay",
        &expected,
        &snapshot(&mut con_b),
        snapped.elapsed() + Duration::from_secs(2),
    );
    assert_eq!(functions(&mut con_b), want_functions);
    assert!(files_under(&tmp.path().join("state")).is_empty(), "the throwaway server's files are removed");

    // Replaying again without replace refuses to overwrite, and says how.
    redis::cmd("FUNCTION").arg("FLUSH").exec(&mut con_b).unwrap();
    let e = restore_replay(
        &tcp_spec("cache", b_server.port, "", Some(target_pw)),
        &mut File::open(&rdb_path).unwrap(),
        &opts,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("BUSYKEY") && e.contains("restore with replace"), "{e}");
    let again = ReplayOptions { replace: true, ..opts };
    let r = restore_replay(
        &tcp_spec("cache", b_server.port, "", Some(target_pw)),
        &mut File::open(&rdb_path).unwrap(),
        &again,
    )
    .unwrap();
    assert_eq!(r.keys as usize, expected.len());
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn bulk_form_backup_restores_every_key_value_and_ttl_both_ways() {
    round_trip(false, false);
}

#[test]
fn diskless_eof_form_over_a_unix_socket_restores_every_key_value_and_ttl_both_ways() {
    round_trip(true, true);
}

// ------------------------------------------------------------- the shared server

#[test]
fn acl_user_with_replication_rights_backs_up() {
    let s = shared();
    let tmp = tempfile::tempdir().unwrap();
    let storage = DirStorage::open(tmp.path().join("backups")).unwrap();
    let spec = tcp_spec("shared", s.port, &s.acl_user, Some(&s.acl_password));
    let b =
        backup(&spec, &storage, Compression::None, &Encryption::None, |w| w, Arc::new(Progress::default()))
            .unwrap();
    assert_eq!(b.engine_version, format!("Redis {}", redis_server_version()));
    let bytes = std::fs::read(storage.path_of(&b.output.object.key)).unwrap();
    assert!(bytes.starts_with(b"REDIS0") && bytes[bytes.len() - 9] == 0xFF);
    assert_eq!(bytes.len() as u64, b.output.dump_bytes);
}

fn assert_fails_storing_nothing(spec: &TargetSpec, wants: &[&str]) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let storage = DirStorage::open(tmp.path().join("backups")).unwrap();
    let t = Instant::now();
    let e = match backup(
        spec,
        &storage,
        Compression::default(),
        &Encryption::None,
        |w| w,
        Arc::new(Progress::default()),
    ) {
        Ok(_) => panic!("the backup of {} succeeded", spec.id),
        Err(e) => e,
    };
    assert!(t.elapsed() < Duration::from_secs(15), "took {:?}", t.elapsed());
    for w in wants {
        assert!(e.contains(w), "{e:?} should say {w:?}");
    }
    assert!(e.starts_with(&format!("target {}: ", spec.id)), "{e}");
    eprintln!("{e}");
    assert_eq!(files_under(storage.root()), Vec::<String>::new());
    e
}

#[test]
fn wrong_password_is_a_clear_error_and_stores_nothing() {
    let s = shared();
    assert_fails_storing_nothing(
        &tcp_spec("shared", s.port, "", Some("not-the-password")),
        &["authentication failed", "WRONGPASS", "check the password"],
    );
    assert_fails_storing_nothing(
        &tcp_spec("shared", s.port, &s.acl_user, Some("not-the-password")),
        &["authentication failed", "WRONGPASS", "username and password"],
    );
    assert_fails_storing_nothing(
        &tcp_spec("shared", s.port, "", None),
        &["requires authentication", "NOAUTH"],
    );
}

#[test]
fn unreachable_server_is_a_clear_error() {
    let (port, _port_claim) = crate::common::reserve_port();
    let e = assert_fails_storing_nothing(
        &tcp_spec("gone", port, "", Some("pw")),
        &["cannot connect to 127.0.0.1:"],
    );
    assert!(e.contains(&port.to_string()) && e.contains("refused"), "{e}");
    let mut spec = tcp_spec("gone", 0, "", None);
    spec.strategy = Strategy::UnixSocket;
    spec.host = "/nonexistent/redis.sock".into();
    assert_fails_storing_nothing(&spec, &["cannot connect to the UNIX socket /nonexistent/redis.sock"]);
}

/// Deletes the ACL user on drop, whatever the test did.
struct AclUser<'a>(&'a mut redis::Connection, String);

impl Drop for AclUser<'_> {
    fn drop(&mut self) {
        let _ = redis::cmd("ACL").arg("DELUSER").arg(&self.1).exec(self.0);
    }
}

#[test]
fn refused_replication_fails_with_a_message_that_says_so() {
    let s = shared();
    let mut admin = client(ConnectionAddr::Tcp("127.0.0.1".into(), s.port), Some(&s.password));
    let name = format!("limited-{}", std::process::id());
    // What managed services do (rename-command cannot be set at run time): a user that
    // may run everything but replication.
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&name)
        .arg("on")
        .arg(">limited-pw")
        .arg("~*")
        .arg("+@all")
        .arg("-sync")
        .arg("-psync")
        .exec(&mut admin)
        .unwrap();
    let _guard = AclUser(&mut admin, name.clone());
    assert_fails_storing_nothing(
        &tcp_spec("managed", s.port, &name, Some("limited-pw")),
        &["refuses replication commands", "NOPERM", "PSYNC", "+psync +sync", "managed services"],
    );
}

// ------------------------------------------------------------------- mid-stream kill

/// An object writer that takes its time, so the kill lands while the stream flows.
struct Slow(Box<dyn ObjectWriter>);

impl Write for Slow {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        std::thread::sleep(Duration::from_millis(20));
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl ObjectWriter for Slow {
    fn commit(self: Box<Self>) -> io::Result<StoredObject> {
        self.0.commit()
    }
}

#[test]
fn server_killed_mid_stream_fails_the_run_and_commits_nothing() {
    for diskless in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let mut server = Server::start(&tmp.path().join("doomed"), Some("pw"), &["--rdbcompression", "no"]);
        let mut con = server.client();
        let mode = if diskless { "yes" } else { "no" };
        redis::cmd("CONFIG").arg("SET").arg("repl-diskless-sync").arg(mode).exec(&mut con).unwrap();
        // 96 MiB that neither LZF nor zstd can shrink: more than every buffer between
        // the server and the slow sink holds.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let value = |x: &mut u64| -> Vec<u8> {
            (0..1 << 20)
                .map(|_| {
                    *x ^= *x << 13;
                    *x ^= *x >> 7;
                    *x ^= *x << 17;
                    *x as u8
                })
                .collect()
        };
        pipelined(&mut con, (0..96).map(|i| cmd!("SET", &format!("blob:{i}"), &value(&mut x))));

        let storage = DirStorage::open(tmp.path().join("backups")).unwrap();
        let progress = Arc::new(Progress::default());
        let spec = tcp_spec("doomed", server.port, "", Some("pw"));
        let result = std::thread::scope(|scope| {
            let run = scope.spawn(|| {
                backup(
                    &spec,
                    &storage,
                    Compression::None,
                    &Encryption::None,
                    |w| Box::new(Slow(w)),
                    progress.clone(),
                )
            });
            let deadline = Instant::now() + Duration::from_secs(60);
            while progress.dump_bytes.load(Ordering::SeqCst) < 4 << 20 {
                assert!(Instant::now() < deadline && !run.is_finished(), "the stream never started");
                std::thread::sleep(Duration::from_millis(1));
            }
            server.kill();
            run.join().unwrap()
        });
        let e = match result {
            Ok(b) => {
                panic!("the run succeeded with {} bytes after the server was killed", b.output.dump_bytes)
            }
            Err(e) => e,
        };
        eprintln!("diskless={diskless}: {e}");
        assert!(e.starts_with("DUMP STAGE: dump stage failed"), "{e}");
        assert!(e.contains("snapshot bytes") && e.contains("the RDB is truncated"), "{e}");
        if diskless {
            assert!(e.contains("before the end-of-snapshot mark"), "{e}");
        } else {
            assert!(e.contains(" of ") && e.contains(" snapshot bytes"), "{e}");
        }
        assert_eq!(files_under(storage.root()), Vec::<String>::new(), "nothing committed, no partial left");
    }
}
