//! PostgreSQL over TLS against a real server that refuses plaintext (scripts/services.sh
//! `services_start_postgres_tls`: ssl=on, a server certificate for IP 127.0.0.1 from a
//! test CA, `hostssl`-only rules, user `certuser` by client certificate): every sslmode
//! the agent's own connection and pg_dump/pg_restore share, verification failures that
//! say what did not match, a backup and restore round trip over TLS, and the client
//! key's password never in pg_dump's argv or environment.

use crate::common;
use crate::common::db;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use backupy_agent::cancel::Cancel;
use backupy_agent::crypto::Encryption;
use backupy_agent::drivers::postgres::{self as pg_driver, PgRestoreOptions};
use backupy_agent::drivers::{Engine, TargetSpec};
use backupy_agent::pipeline::{Compression, Progress};
use backupy_agent::secrets::Secret;
use backupy_agent::storage::DirStorage;
use db::RunOpts;

struct PgTls {
    port: u16,
    password: String,
    dir: PathBuf,
}

fn server() -> PgTls {
    PgTls {
        port: db::need("BACKUPY_TEST_PGTLS_PORT", "postgres_tls").parse().expect("a port"),
        password: db::need("BACKUPY_TEST_PGTLS_PASSWORD", "postgres_tls"),
        dir: PathBuf::from(db::need("BACKUPY_TEST_PGTLS_DIR", "postgres_tls")),
    }
}

fn ca() -> String {
    server().dir.join("ca.pem").display().to_string()
}

/// A target for `database` on the TLS server as `postgres` with `sslmode`.
fn spec(database: &str, sslmode: &str) -> TargetSpec {
    let s = server();
    let mut t = TargetSpec::new("pgtls", Engine::PostgreSql);
    t.host = "127.0.0.1".into();
    t.port = s.port;
    t.username = "postgres".into();
    t.password = Some(Secret::new(s.password));
    t.database = database.to_string();
    t.options.insert("sslmode".into(), sslmode.into());
    t
}

/// psql over TLS as `postgres` (the test's own client; the server refuses plaintext).
fn psql(database: &str, sql: &str) -> String {
    let s = server();
    let bin = db::need("BACKUPY_TEST_PG_BIN", "postgres");
    let out = Command::new(Path::new(&bin).join("psql"))
        .args(["-X", "-w", "-v", "ON_ERROR_STOP=1", "-Atq", "-h", "127.0.0.1", "-U", "postgres"])
        .arg("-p")
        .arg(s.port.to_string())
        .arg("-d")
        .arg(database)
        .arg("-c")
        .arg(sql)
        .env("PGPASSWORD", &s.password)
        .env("PGSSLMODE", "require")
        .output()
        .expect("psql runs");
    assert!(out.status.success(), "psql {sql}: {}", common::text(&out.stderr));
    common::text(&out.stdout).trim().to_string()
}

struct DropDbs(Vec<String>);
impl Drop for DropDbs {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::panic::catch_unwind(|| {
                psql("postgres", &format!("DROP DATABASE IF EXISTS \"{d}\" WITH (FORCE)"))
            });
        }
    }
}

/// A database with one table of `rows` rows.
fn source_db(prefix: &str, rows: u32) -> (String, DropDbs) {
    let name = db::unique(prefix);
    psql("postgres", &format!("CREATE DATABASE \"{name}\""));
    let guard = DropDbs(vec![name.clone()]);
    psql(
        &name,
        &format!(
            "CREATE TABLE t (id int PRIMARY KEY, v text); \
             INSERT INTO t SELECT g, md5(g::text) || repeat('x', 200) FROM generate_series(1, {rows}) g"
        ),
    );
    (name, guard)
}

fn fingerprint(database: &str) -> String {
    psql(database, "SELECT count(*) || ' ' || md5(string_agg(id || ':' || v, ',' ORDER BY id)) FROM t")
}

/// A backup into a fresh directory, which lives as long as the returned guard.
fn try_backup(s: &TargetSpec) -> Result<(db::Backup, tempfile::TempDir), String> {
    let dir = tempfile::tempdir().unwrap();
    let storage = DirStorage::open(dir.path().join("store")).unwrap();
    let b = db::backup(s, &storage, &dir.path().join("tmp"), &RunOpts::default())?;
    Ok((b, dir))
}

#[test]
fn verify_full_with_the_right_ca_backs_up_and_restores_over_tls() {
    let (src, mut guard) = source_db("bk_tls_rt", 500);
    let mut s = spec(&src, "verify-full");
    s.options.insert("sslrootcert".into(), ca());
    let (b, _store) = try_backup(&s).unwrap_or_else(|e| panic!("backup over verify-full: {e}"));
    assert!(b.engine_version.starts_with("PostgreSQL "), "{}", b.engine_version);
    assert!(b.size_hint.is_some(), "the size query ran on the TLS connection");

    let dst = db::unique("bk_tls_rt_dst");
    psql("postgres", &format!("CREATE DATABASE \"{dst}\""));
    guard.0.push(dst.clone());
    let mut d = spec(&dst, "verify-full");
    d.options.insert("sslrootcert".into(), ca());
    let key = db::raw_key().1;
    let mut input = db::open_dump(&b.path, Some(&key));
    pg_driver::restore(&d, &mut input, &PgRestoreOptions::default())
        .unwrap_or_else(|e| panic!("restore: {e}"));
    assert_eq!(fingerprint(&dst), fingerprint(&src));
    assert!(fingerprint(&dst).starts_with("500 "), "{}", fingerprint(&dst));
}

#[test]
fn verify_full_refuses_a_server_signed_by_another_ca() {
    let other = tempfile::tempdir().unwrap();
    common::make_certs(other.path());
    let (src, _guard) = source_db("bk_tls_wrongca", 1);
    let mut s = spec(&src, "verify-full");
    s.options.insert("sslrootcert".into(), other.path().join("ca.pem").display().to_string());
    let err = try_backup(&s).err().expect("a server signed by another CA is refused");
    assert!(err.contains("pgtls") && err.contains("127.0.0.1:"), "names target and server: {err}");
    assert!(err.contains("unknown issuer"), "says what did not match: {err}");
}

#[test]
fn verify_full_refuses_a_wrong_host_name_and_verify_ca_accepts_it() {
    // The certificate names IP 127.0.0.1 only; "localhost" reaches the same server.
    let (src, _guard) = source_db("bk_tls_name", 3);
    let mut s = spec(&src, "verify-full");
    s.host = "localhost".into();
    s.options.insert("sslrootcert".into(), ca());
    let err = try_backup(&s).err().expect("a certificate for another name is refused");
    assert!(err.contains("pgtls") && err.contains("localhost"), "{err}");
    assert!(err.contains("wrong name"), "says what did not match: {err}");

    s.options.insert("sslmode".into(), "verify-ca".into());
    let (b, _store) =
        try_backup(&s).unwrap_or_else(|e| panic!("verify-ca checks the chain, not the name: {e}"));
    assert!(b.output.object.size > 0);
}

#[test]
fn require_and_prefer_use_tls_and_plaintext_is_refused_by_the_server() {
    let (src, _guard) = source_db("bk_tls_req", 10);
    for mode in ["require", "prefer", "allow"] {
        try_backup(&spec(&src, mode))
            .unwrap_or_else(|e| panic!("sslmode={mode} against a hostssl-only server: {e}"));
    }
    let err = try_backup(&spec(&src, "disable")).err().expect("plaintext is refused by hostssl rules");
    assert!(err.contains("no encryption") || err.contains("pg_hba.conf"), "{err}");
}

#[test]
fn verify_modes_need_a_root_certificate() {
    let err = try_backup(&spec("postgres", "verify-ca")).err().expect("refused");
    assert!(err.contains("sslrootcert"), "{err}");
}

/// A dump big enough, and a sink slow enough, that pg_dump is still running when the
/// test reads its /proc entries.
fn slow_opts(cancel: Cancel) -> RunOpts {
    RunOpts {
        compression: Compression::None,
        encryption: Encryption::None,
        sink_delay: Some(Duration::from_millis(20)),
        buffer_size: Some(64 << 10),
        cancel,
        progress: Arc::new(Progress::default()),
    }
}

#[test]
fn client_certificate_with_an_encrypted_key_and_no_key_password_in_argv_or_environment() {
    let srv = server();
    let key_password = std::fs::read_to_string(srv.dir.join("client-enc.pass")).unwrap().trim().to_string();
    let (src, _guard) = source_db("bk_tls_cert", 40_000);
    let mut s = spec(&src, "verify-full");
    s.username = "certuser".into();
    s.password = None;
    s.options.insert("sslrootcert".into(), ca());
    s.options.insert("sslcert".into(), srv.dir.join("client.pem").display().to_string());
    s.options.insert("sslkey".into(), srv.dir.join("client-enc.key").display().to_string());
    s.options.insert("sslpassword".into(), format!("file:{}", srv.dir.join("client-enc.pass").display()));

    let dir = tempfile::tempdir().unwrap();
    let storage = DirStorage::open(dir.path().join("store")).unwrap();
    let cancel = Cancel::default();
    let opts = slow_opts(cancel.clone());
    let tmp = dir.path().join("tmp");
    let run_spec = s.clone();
    let run = std::thread::spawn(move || db::backup(&run_spec, &storage, &tmp, &opts));
    let pid = db::find_child("pg_dump", &src, Duration::from_secs(20)).expect("pg_dump is running");
    let (cmdline, environ) = db::proc_cmdline_and_environ(pid);
    assert!(!db::contains(&cmdline, &key_password), "key password in pg_dump's argv");
    assert!(!db::contains(&environ, &key_password), "key password in pg_dump's environment");
    let env = db::split_nul(&environ);
    let service = env.iter().find_map(|v| v.strip_prefix("PGSERVICEFILE=")).expect("PGSERVICEFILE is set");
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(service).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "service file mode");
        assert!(std::fs::read_to_string(service).unwrap().contains(&key_password));
    }
    let args = db::split_nul(&cmdline);
    assert!(args.iter().any(|a| a.contains("sslmode=verify-full") && a.contains("service=")), "{args:?}");
    cancel.cancel();
    assert_eq!(run.join().unwrap().err().as_deref(), Some("cancelled"));
    assert!(!Path::new(service).exists(), "the service file is removed when the run ends");

    // And the whole dump works with the client certificate alone (no password).
    let (b, _store) =
        try_backup(&s).unwrap_or_else(|e| panic!("client certificate with an encrypted key: {e}"));
    assert!(b.output.object.size > 0);

    // A wrong key password is one clear error.
    let bad = dir.path().join("bad.pass");
    std::fs::write(&bad, "not-the-password\n").unwrap();
    s.options.insert("sslpassword".into(), format!("file:{}", bad.display()));
    let err = try_backup(&s).err().expect("a wrong key password is refused");
    assert!(err.contains("sslpassword"), "{err}");
}
