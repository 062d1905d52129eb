//! MariaDB over TLS against a real server that refuses TCP without TLS (scripts/services.sh
//! `services_start_mariadb_tls`: a server certificate for IP 127.0.0.1 from a test CA,
//! `require_secure_transport`, user `certuser` by client certificate): every ssl-mode
//! for the pre-check and the MariaDB tools' own dialect, verification failures that say
//! what did not match, and a backup and restore round trip over TLS.

use crate::common;
use crate::common::db;

use std::path::PathBuf;
use std::process::Command;

use backupy_agent::drivers::mysql::{self as my_driver, MySqlRestoreOptions};
use backupy_agent::drivers::{Engine, TargetSpec};
use backupy_agent::secrets::Secret;
use backupy_agent::storage::DirStorage;
use db::RunOpts;

struct MariaTls {
    port: u16,
    password: String,
    socket: String,
    dir: PathBuf,
}

fn server() -> MariaTls {
    MariaTls {
        port: db::need("BACKUPY_TEST_MARIADBTLS_PORT", "mariadb_tls").parse().expect("a port"),
        password: db::need("BACKUPY_TEST_MARIADBTLS_PASSWORD", "mariadb_tls"),
        socket: db::need("BACKUPY_TEST_MARIADBTLS_SOCKET", "mariadb_tls"),
        dir: PathBuf::from(db::need("BACKUPY_TEST_MARIADBTLS_DIR", "mariadb_tls")),
    }
}

fn file(name: &str) -> String {
    server().dir.join(name).display().to_string()
}

/// A target for `database` as root over TCP; `ssl_mode` `None` = the default.
fn spec(database: &str, ssl_mode: Option<&str>) -> TargetSpec {
    let s = server();
    let mut t = TargetSpec::new("mariatls", Engine::MariaDb);
    t.host = "127.0.0.1".into();
    t.port = s.port;
    t.username = "root".into();
    t.password = Some(Secret::new(s.password));
    t.database = database.to_string();
    if let Some(m) = ssl_mode {
        t.options.insert("ssl-mode".into(), m.into());
    }
    t
}

/// The test's own client, as root over the server's UNIX socket.
fn sql(database: &str, query: &str) -> String {
    let s = server();
    let out = Command::new("mariadb")
        .args(["--no-defaults", "-uroot", "-N", "-B"])
        .arg(format!("--socket={}", s.socket))
        .arg(format!("--database={database}"))
        .arg("-e")
        .arg(query)
        .env("MYSQL_PWD", &s.password)
        .output()
        .expect("mariadb runs");
    assert!(out.status.success(), "{query}: {}", common::text(&out.stderr));
    common::text(&out.stdout).trim().to_string()
}

struct DropDbs(Vec<String>);
impl Drop for DropDbs {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::panic::catch_unwind(|| sql("mysql", &format!("DROP DATABASE IF EXISTS `{d}`")));
        }
    }
}

fn source_db(prefix: &str, rows: u32) -> (String, DropDbs) {
    let name = db::unique(prefix);
    sql("mysql", &format!("CREATE DATABASE `{name}`"));
    let guard = DropDbs(vec![name.clone()]);
    sql(
        &name,
        &format!(
            "CREATE TABLE t (id INT PRIMARY KEY, v TEXT); \
             INSERT INTO t SELECT seq, CONCAT(MD5(seq), REPEAT('x', 100)) FROM seq_1_to_{rows}"
        ),
    );
    (name, guard)
}

fn fingerprint(database: &str) -> String {
    sql(
        database,
        "SELECT CONCAT(COUNT(*), ' ', MD5(GROUP_CONCAT(id, ':', v ORDER BY id SEPARATOR ','))) FROM t",
    )
}

fn try_backup(s: &TargetSpec) -> Result<(db::Backup, tempfile::TempDir), String> {
    let dir = tempfile::tempdir().unwrap();
    let storage = DirStorage::open(dir.path().join("store")).unwrap();
    let b = db::backup(s, &storage, &dir.path().join("tmp"), &RunOpts::default())?;
    Ok((b, dir))
}

#[test]
fn verify_identity_with_the_right_ca_backs_up_and_restores_over_tls() {
    let (src, mut guard) = source_db("bk_mtls_rt", 300);
    let mut s = spec(&src, Some("VERIFY_IDENTITY"));
    s.options.insert("ssl-ca".into(), file("ca.pem"));
    let (b, dir) = try_backup(&s).unwrap_or_else(|e| panic!("backup over VERIFY_IDENTITY: {e}"));
    assert!(b.engine_version.starts_with("MariaDB "), "{}", b.engine_version);

    let dst = db::unique("bk_mtls_rt_dst");
    guard.0.push(dst.clone());
    let mut d = spec(&dst, Some("VERIFY_IDENTITY"));
    d.options.insert("ssl-ca".into(), file("ca.pem"));
    let key = db::raw_key().1;
    let mut input = db::open_dump(&b.path, Some(&key));
    let opts = MySqlRestoreOptions {
        create_database: true,
        temp_dir: Some(dir.path().join("restore")),
        ..Default::default()
    };
    my_driver::restore(&d, &mut input, &opts).unwrap_or_else(|e| panic!("restore over TLS: {e}"));
    assert_eq!(fingerprint(&dst), fingerprint(&src));
    assert!(fingerprint(&dst).starts_with("300 "), "{}", fingerprint(&dst));
}

#[test]
fn a_server_signed_by_another_ca_is_refused() {
    let other = tempfile::tempdir().unwrap();
    common::make_certs(other.path());
    let (src, _guard) = source_db("bk_mtls_ca", 1);
    let mut s = spec(&src, Some("VERIFY_IDENTITY"));
    s.options.insert("ssl-ca".into(), other.path().join("ca.pem").display().to_string());
    let err = try_backup(&s).err().expect("refused");
    assert!(err.contains("mariatls") && err.contains("127.0.0.1:"), "{err}");
    assert!(err.contains("unknown issuer"), "{err}");
}

#[test]
fn a_wrong_host_name_is_refused_and_verify_ca_is_refused_for_mariadb_tools() {
    let (src, _guard) = source_db("bk_mtls_name", 1);
    let mut s = spec(&src, Some("VERIFY_IDENTITY"));
    s.host = "localhost".into();
    s.options.insert("ssl-ca".into(), file("ca.pem"));
    let err = try_backup(&s).err().expect("the certificate names 127.0.0.1 only");
    assert!(err.contains("wrong name") && err.contains("localhost"), "{err}");
    // MariaDB's tools check the name whenever they check the chain: said, not weakened.
    s.options.insert("ssl-mode".into(), "VERIFY_CA".into());
    let err = try_backup(&s).err().expect("VERIFY_CA cannot be expressed for mariadb-dump");
    assert!(err.contains("VERIFY_IDENTITY"), "{err}");
}

#[test]
fn required_and_the_default_use_tls_and_disabled_is_refused_by_the_server() {
    let (src, _guard) = source_db("bk_mtls_req", 5);
    for mode in [Some("REQUIRED"), None, Some("PREFERRED")] {
        try_backup(&spec(&src, mode)).unwrap_or_else(|e| panic!("ssl-mode {mode:?}: {e}"));
    }
    let err = try_backup(&spec(&src, Some("DISABLED"))).err().expect("plaintext TCP is refused");
    assert!(err.contains("MariaDB at 127.0.0.1:"), "{err}");
}

#[test]
fn a_client_certificate_user_connects_with_ssl_cert_and_ssl_key() {
    let (src, _guard) = source_db("bk_mtls_cert", 5);
    let mut s = spec(&src, Some("VERIFY_IDENTITY"));
    s.username = "certuser".into();
    s.password = None;
    s.options.insert("ssl-ca".into(), file("ca.pem"));
    s.options.insert("ssl-cert".into(), file("client.pem"));
    s.options.insert("ssl-key".into(), file("client.key"));
    try_backup(&s).unwrap_or_else(|e| panic!("client certificate: {e}"));
    s.options.remove("ssl-cert");
    s.options.remove("ssl-key");
    let err = try_backup(&s).err().expect("certuser without its certificate is refused");
    assert!(err.contains("certuser"), "{err}");
}
