//! MongoDB over TLS: SecantusDB (scripts/services.sh `services_start_mongo`) speaks no
//! TLS, so each test puts a TLS-terminating stand-in in front of it (rustls, a server
//! certificate for 127.0.0.1 from a test CA, optionally requiring a client certificate
//! from that CA). The driver's own settings (`tls=true`, `tlsCAFile`,
//! `tlsCertificateKeyFile`) are what is proved: a native dump and restore through TLS, a
//! wrong CA refused, a client certificate required and accepted.

use crate::common;
use crate::common::db;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use backupy_agent::drivers::mongodb::{self as mongo_driver, RestoreOptions};
use backupy_agent::drivers::{Engine, TargetSpec};
use backupy_agent::secrets::Secret;
use backupy_agent::storage::DirStorage;
use db::RunOpts;
use mongodb::bson::doc;
use mongodb::sync::Client;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

fn need(var: &str) -> String {
    db::need(var, "mongo")
}

/// A test CA with a server certificate for 127.0.0.1 and a client certificate
/// (`client-bundle.pem`: certificate and key, as tlsCertificateKeyFile wants).
fn certs(dir: &Path) {
    common::make_certs(dir);
    let sh = |script: &str| {
        let out = Command::new("sh").arg("-c").arg(script).current_dir(dir).output().unwrap();
        assert!(out.status.success(), "{script}: {}", common::text(&out.stderr));
    };
    sh(
        "openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj /CN=client 2>/dev/null && \
        printf 'basicConstraints=CA:FALSE\\n' > cext && \
        openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days 2 \
        -extfile cext 2>/dev/null && cat client.pem client.key > client-bundle.pem",
    );
}

/// Accepts TLS on a loopback port and relays the plaintext to `upstream`, one thread
/// per connection; stops accepting on drop.
struct TlsProxy {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl TlsProxy {
    fn start(upstream: SocketAddr, certs_dir: &Path, require_client_cert: bool) -> TlsProxy {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(certs_dir.join("leaf.pem"))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(certs_dir.join("leaf.key")).unwrap();
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if require_client_cert {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(certs_dir.join("ca.pem")).unwrap() {
                roots.add(c.unwrap()).unwrap();
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = Arc::new(builder.with_single_cert(chain, key).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_accept = stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop_accept.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = conn else { continue };
                let config = config.clone();
                let stop = stop_accept.clone();
                std::thread::spawn(move || relay(client, upstream, config, &stop));
            }
        });
        TlsProxy { port, stop }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Shuttles bytes both ways with non-blocking sockets until either side closes.
fn relay(mut client: TcpStream, upstream: SocketAddr, config: Arc<rustls::ServerConfig>, stop: &AtomicBool) {
    let Ok(mut up) = TcpStream::connect(upstream) else { return };
    let mut tls = rustls::ServerConnection::new(config).unwrap();
    client.set_nonblocking(true).unwrap();
    up.set_nonblocking(true).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    while !stop.load(Ordering::SeqCst) {
        let mut idle = true;
        match tls.read_tls(&mut client) {
            Ok(0) => return,
            Ok(_) => {
                idle = false;
                if tls.process_new_packets().is_err() {
                    let _ = tls.write_tls(&mut client);
                    return;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
        loop {
            match tls.reader().read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    idle = false;
                    up.set_nonblocking(false).unwrap();
                    if up.write_all(&buf[..n]).is_err() {
                        return;
                    }
                    up.set_nonblocking(true).unwrap();
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => return,
            }
        }
        if !tls.is_handshaking() {
            match up.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    idle = false;
                    tls.writer().write_all(&buf[..n]).unwrap();
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
        while tls.wants_write() {
            match tls.write_tls(&mut client) {
                Ok(_) => idle = false,
                Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(1)),
                Err(_) => return,
            }
        }
        if idle {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn secantus_addr() -> SocketAddr {
    let host = need("BACKUPY_TEST_SECANTUS_HOST");
    let port: u16 = need("BACKUPY_TEST_SECANTUS_PORT").parse().unwrap();
    (host.as_str(), port).to_socket_addrs().unwrap().next().unwrap()
}

/// A target through the proxy on `port` with TLS options.
fn spec(port: u16, database: &str, options: &[(&str, String)]) -> TargetSpec {
    let mut t = TargetSpec::new("mongotls", Engine::MongoDb);
    t.host = "127.0.0.1".into();
    t.port = port;
    t.username = need("BACKUPY_TEST_SECANTUS_USER");
    t.password = Some(Secret::new(need("BACKUPY_TEST_SECANTUS_PASSWORD")));
    t.database = database.to_string();
    t.options.insert("authSource".into(), "admin".into());
    t.options.insert("tool".into(), "native".into());
    t.options.insert("serverSelectionTimeoutMS".into(), "3000".into());
    t.options.insert("tls".into(), "true".into());
    for (k, v) in options {
        t.options.insert((*k).into(), v.clone());
    }
    t
}

fn plain_client() -> Client {
    Client::with_uri_str(need("BACKUPY_TEST_SECANTUS_URL")).unwrap()
}

struct DropDbs(Vec<String>);
impl Drop for DropDbs {
    fn drop(&mut self) {
        let c = plain_client();
        for d in &self.0 {
            let _ = c.database(d).drop().run();
        }
    }
}

fn try_backup(s: &TargetSpec) -> Result<(db::Backup, tempfile::TempDir), String> {
    let dir = tempfile::tempdir().unwrap();
    let storage = DirStorage::open(dir.path().join("store")).unwrap();
    let b = db::backup(s, &storage, &dir.path().join("tmp"), &RunOpts::default())?;
    Ok((b, dir))
}

fn ca(dir: &Path) -> String {
    dir.join("ca.pem").display().to_string()
}

#[test]
fn native_dump_and_restore_through_tls_with_the_ca_file() {
    let tls = tempfile::tempdir().unwrap();
    certs(tls.path());
    let proxy = TlsProxy::start(secantus_addr(), tls.path(), false);
    let src = db::unique("mtls_src");
    let dst = db::unique("mtls_dst");
    let _guard = DropDbs(vec![src.clone(), dst.clone()]);
    let c = plain_client();
    let docs: Vec<_> = (0..200).map(|i| doc! { "_id": i, "v": format!("value {i}") }).collect();
    c.database(&src).collection("items").insert_many(docs).run().unwrap();

    let (b, dir) = try_backup(&spec(proxy.port, &src, &[("tlsCAFile", ca(tls.path()))]))
        .unwrap_or_else(|e| panic!("dump through TLS: {e}"));
    let key = db::raw_key().1;
    let mut input = db::open_dump(&b.path, Some(&key));
    let opts = RestoreOptions {
        drop: false,
        target_db: Some(dst.clone()),
        temp_dir: dir.path().join("r"),
        native: true,
    };
    mongo_driver::restore(&spec(proxy.port, &dst, &[("tlsCAFile", ca(tls.path()))]), &mut input, &opts)
        .unwrap_or_else(|e| panic!("restore through TLS: {e}"));
    let n = c
        .database(&dst)
        .collection::<mongodb::bson::Document>("items")
        .count_documents(doc! {})
        .run()
        .unwrap();
    assert_eq!(n, 200);
}

#[test]
fn a_server_signed_by_another_ca_is_refused() {
    let tls = tempfile::tempdir().unwrap();
    certs(tls.path());
    let other = tempfile::tempdir().unwrap();
    common::make_certs(other.path());
    let proxy = TlsProxy::start(secantus_addr(), tls.path(), false);
    let err = try_backup(&spec(proxy.port, "admin", &[("tlsCAFile", ca(other.path()))]))
        .err()
        .expect("a server signed by another CA is refused");
    assert!(err.contains("mongotls"), "{err}");
    // Both test CAs share a subject name, so webpki reports the issuer's signature.
    assert!(err.contains("invalid peer certificate"), "{err}");
}

#[test]
fn a_client_certificate_is_required_and_accepted() {
    let tls = tempfile::tempdir().unwrap();
    certs(tls.path());
    let proxy = TlsProxy::start(secantus_addr(), tls.path(), true);
    let src = db::unique("mtls_cert");
    let _guard = DropDbs(vec![src.clone()]);
    plain_client().database(&src).collection("items").insert_one(doc! { "_id": 1 }).run().unwrap();
    let bundle: PathBuf = tls.path().join("client-bundle.pem");
    try_backup(&spec(
        proxy.port,
        &src,
        &[("tlsCAFile", ca(tls.path())), ("tlsCertificateKeyFile", bundle.display().to_string())],
    ))
    .unwrap_or_else(|e| panic!("with the client certificate: {e}"));
    let err = try_backup(&spec(proxy.port, &src, &[("tlsCAFile", ca(tls.path()))]))
        .err()
        .expect("without a client certificate the server refuses");
    assert!(err.contains("mongotls"), "{err}");
}
