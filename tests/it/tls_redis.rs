//! Redis over TLS against a real server with no plaintext port that requires a client
//! certificate (scripts/services.sh `services_start_redis_tls`): the replication stream
//! (PSYNC inside TLS) backed up and replayed back with `RESTORE` as an ACL user, a wrong
//! CA and a wrong host name refused with errors that say so, `sni` naming the checked
//! host, a missing client certificate refused, and `insecure_skip_verify`.

use crate::common;
use crate::common::db;

use std::path::PathBuf;
use std::process::Command;

use backupy_agent::drivers::redis::{ReplayOptions, restore_replay};
use backupy_agent::drivers::{Engine, TargetSpec};
use backupy_agent::secrets::Secret;
use backupy_agent::storage::DirStorage;
use db::RunOpts;

struct RedisTls {
    port: u16,
    password: String,
    acl_user: String,
    acl_password: String,
    dir: PathBuf,
}

fn server() -> RedisTls {
    RedisTls {
        port: db::need("BACKUPY_TEST_REDISTLS_PORT", "redis_tls").parse().expect("a port"),
        password: db::need("BACKUPY_TEST_REDISTLS_PASSWORD", "redis_tls"),
        acl_user: db::need("BACKUPY_TEST_REDISTLS_ACL_USER", "redis_tls"),
        acl_password: db::need("BACKUPY_TEST_REDISTLS_ACL_PASSWORD", "redis_tls"),
        dir: PathBuf::from(db::need("BACKUPY_TEST_REDISTLS_DIR", "redis_tls")),
    }
}

fn file(name: &str) -> String {
    server().dir.join(name).display().to_string()
}

/// A target on the TLS server as the ACL user, with the right CA and client certificate.
fn spec() -> TargetSpec {
    let s = server();
    let mut t = TargetSpec::new("redistls", Engine::Redis);
    t.host = "127.0.0.1".into();
    t.port = s.port;
    t.username = s.acl_user;
    t.password = Some(Secret::new(s.acl_password));
    t.options.insert("tls".into(), "true".into());
    t.options.insert("ca_file".into(), file("ca.pem"));
    t.options.insert("cert_file".into(), file("client.pem"));
    t.options.insert("key_file".into(), file("client.key"));
    t
}

/// redis-cli over TLS as `default` (the test's own client).
fn cli(args: &[&str]) -> String {
    let s = server();
    let out = Command::new("redis-cli")
        .args([
            "--tls",
            "--cacert",
            &file("ca.pem"),
            "--cert",
            &file("client.pem"),
            "--key",
            &file("client.key"),
        ])
        .args(["-h", "127.0.0.1", "-p", &s.port.to_string(), "--no-auth-warning"])
        .env("REDISCLI_AUTH", &s.password)
        .args(args)
        .output()
        .expect("redis-cli runs");
    assert!(out.status.success(), "redis-cli {args:?}: {}", common::text(&out.stderr));
    common::text(&out.stdout).trim().to_string()
}

fn try_backup(s: &TargetSpec) -> Result<(db::Backup, tempfile::TempDir), String> {
    let dir = tempfile::tempdir().unwrap();
    let storage = DirStorage::open(dir.path().join("store")).unwrap();
    let b = db::backup(s, &storage, &dir.path().join("tmp"), &RunOpts::default())?;
    Ok((b, dir))
}

#[test]
fn backup_and_replay_restore_over_tls_as_an_acl_user() {
    let prefix = db::unique("tlsrt");
    for i in 0..50 {
        cli(&["SET", &format!("{prefix}:{i}"), &format!("value-{i}-{}", "x".repeat(i * 10))]);
    }
    cli(&["HSET", &format!("{prefix}:h"), "f", "v"]);
    let (b, dir) = try_backup(&spec()).unwrap_or_else(|e| panic!("backup over TLS: {e}"));
    assert!(b.engine_version.starts_with("Redis "), "{}", b.engine_version);

    for i in 0..50 {
        cli(&["DEL", &format!("{prefix}:{i}")]);
    }
    cli(&["DEL", &format!("{prefix}:h")]);
    let key = db::raw_key().1;
    let mut rdb = db::open_dump(&b.path, Some(&key));
    let opts = ReplayOptions { replace: true, redis_server: None, temp_dir: Some(dir.path().join("replay")) };
    let report = restore_replay(&spec(), &mut rdb, &opts).unwrap_or_else(|e| panic!("replay over TLS: {e}"));
    assert!(report.keys >= 51, "{report:?}");
    for i in [0usize, 7, 49] {
        assert_eq!(cli(&["GET", &format!("{prefix}:{i}")]), format!("value-{i}-{}", "x".repeat(i * 10)));
    }
    assert_eq!(cli(&["HGET", &format!("{prefix}:h"), "f"]), "v");
}

#[test]
fn a_server_signed_by_another_ca_is_refused() {
    let other = tempfile::tempdir().unwrap();
    common::make_certs(other.path());
    let mut s = spec();
    s.options.insert("ca_file".into(), other.path().join("ca.pem").display().to_string());
    let err = try_backup(&s).err().expect("refused");
    assert!(err.contains("redistls") && err.contains("127.0.0.1:"), "{err}");
    assert!(err.contains("unknown issuer"), "{err}");

    // insecure_skip_verify connects anyway (and warns): the certificate is not checked.
    s.options.insert("insecure_skip_verify".into(), "true".into());
    try_backup(&s).unwrap_or_else(|e| panic!("insecure_skip_verify: {e}"));
}

#[test]
fn a_wrong_host_name_is_refused_and_sni_names_the_host_to_check() {
    let mut s = spec();
    s.host = "localhost".into();
    let err = try_backup(&s).err().expect("the certificate names 127.0.0.1 only");
    assert!(err.contains("wrong name") && err.contains("localhost"), "{err}");
    s.options.insert("sni".into(), "127.0.0.1".into());
    try_backup(&s).unwrap_or_else(|e| panic!("sni = 127.0.0.1: {e}"));
}

#[test]
fn a_client_certificate_is_required_by_the_server() {
    let mut s = spec();
    s.options.remove("cert_file");
    s.options.remove("key_file");
    let err = try_backup(&s).err().expect("the server requires a client certificate");
    assert!(err.contains("redistls") && err.contains("127.0.0.1:"), "{err}");
    // TLS 1.3: the server's alert arrives with the first reply.
    assert!(err.contains("CertificateRequired"), "{err}");
}

#[test]
fn tls_options_without_tls_and_tls_over_a_socket_are_refused() {
    let mut s = spec();
    s.options.remove("tls");
    let err = try_backup(&s).err().expect("refused");
    assert!(err.contains("needs tls"), "{err}");
    let mut s = spec();
    s.options.insert("tls".into(), "maybe".into());
    let err = try_backup(&s).err().expect("refused");
    assert!(err.contains("not true or false"), "{err}");
}
