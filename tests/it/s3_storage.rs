//! S3 storage against the real S3 server (s3s-fs, SigV4 signatures checked): streaming
//! multipart uploads of every size class, adaptive part sizes, retries and aborts under
//! injected faults, presigned single PUT, and crash recovery of upload ids.

use crate::common;

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::s3::*;
use backupy_agent::cancel::Cancel;
use backupy_agent::crypto::{DataKey, Encryption};
use backupy_agent::pipeline::{self, Compression, Progress, Source};
use backupy_agent::secrets::Secret;
use backupy_agent::storage::ObjectWriter;
use backupy_agent::storage::s3::{PresignedPut, S3Error, S3Storage};
use sha2::Digest;

const MIB: usize = 1 << 20;

fn data(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn upload(
    storage: &S3Storage,
    key: &str,
    bytes: &[u8],
) -> std::io::Result<backupy_agent::storage::StoredObject> {
    let mut w = Box::new(storage.create(key));
    // Odd write sizes, as the pipeline's store stage would deliver them.
    for piece in bytes.chunks(777_777) {
        w.write_all(piece)?;
    }
    w.commit()
}

fn download(storage: &S3Storage, key: &str) -> Vec<u8> {
    let mut out = Vec::new();
    storage.get(key).unwrap().read_to_end(&mut out).unwrap();
    out
}

#[test]
fn objects_of_every_size_class_round_trip_byte_for_byte() {
    let env = s3_env();
    let bucket = new_bucket(&env, "sizes");
    let mut t = target(&env, &env.endpoint, &bucket);
    t.prefix = "prod/".into();
    let storage = S3Storage::new(t, None).unwrap();
    let part = 5 * MIB;
    for (name, n) in [
        ("empty", 0),
        ("one", 1),
        ("exactly-one-part", part),
        ("part-plus-one", part + 1),
        ("several", 3 * part + 12_345),
    ] {
        let bytes = data(n, n as u64 + 7);
        let stored = upload(&storage, name, &bytes).unwrap();
        assert_eq!(stored.key, format!("prod/{name}"));
        assert_eq!(stored.size, n as u64, "{name}");
        assert_eq!(storage.head(name).unwrap(), Some(n as u64), "{name}");
        assert!(download(&storage, name) == bytes, "{name}: bytes differ");
        // The server's own copy, read from its directory, is the same.
        assert_eq!(std::fs::read(env.dir.join(&bucket).join("prod").join(name)).unwrap().len(), n, "{name}");
    }
    assert!(
        open_uploads(&env, &bucket).is_empty(),
        "no multipart upload left open: {:?}",
        open_uploads(&env, &bucket)
    );
    let mut listed = storage.list("").unwrap();
    listed.sort();
    assert_eq!(listed.len(), 5);
    assert!(listed.contains(&("several".to_string(), (3 * part + 12_345) as u64)));
}

#[test]
fn pipeline_reports_the_sha256_of_the_stored_object() {
    let env = s3_env();
    let bucket = new_bucket(&env, "sha");
    let storage = S3Storage::new(target(&env, &env.endpoint, &bucket), None).unwrap();
    let input = data(12 * MIB, 3);
    let enc = Encryption::V2Raw { key: DataKey::from_bytes([5; 32]), chunk_size: 1 << 20 };
    let out = pipeline::run(
        Source::from_reader("test", std::io::Cursor::new(input)),
        pipeline::Options::new(Compression::None, enc.prepare(0).unwrap()),
        Box::new(storage.create("obj.bkpy")),
        &Cancel::default(),
        Arc::new(Progress::default()),
    )
    .unwrap();
    let stored = download(&storage, "obj.bkpy");
    assert_eq!(out.sha256, hex::encode(sha2::Sha256::digest(&stored)));
    assert_eq!(out.stored_bytes, stored.len() as u64);
}

#[test]
fn tiny_max_parts_makes_the_part_size_grow_mid_stream() {
    let env = s3_env();
    let bucket = new_bucket(&env, "grow");
    let proxy = FaultProxy::start(&env.endpoint, |_, _| Fault::Forward);
    let mut t = target(&env, &proxy.endpoint, &bucket);
    t.max_parts = 3;
    let storage = S3Storage::new(t, None).unwrap();
    // 5 + 10 + 15 MiB: three parts of growing size.
    let bytes = data(30 * MIB, 11);
    upload(&storage, "grown", &bytes).unwrap();
    assert!(download(&storage, "grown") == bytes);
    let part_puts: Vec<_> =
        proxy.requests().into_iter().filter(|r| r.method == "PUT" && r.url.contains("partNumber=")).collect();
    assert_eq!(part_puts.len(), 3, "{part_puts:?}");
    // A stream too large for 3 growing parts (5 + 10 + 20 MiB) fails and leaves no upload.
    let err = upload(&storage, "too-big", &data(40 * MIB, 12)).unwrap_err();
    assert!(err.to_string().contains("max_parts = 3"), "{err}");
    assert!(storage.head("too-big").unwrap().is_none());
    assert!(open_uploads(&env, &bucket).is_empty());
}

#[test]
fn wrong_secret_is_a_clear_authentication_error_without_retries() {
    let env = s3_env();
    let bucket = new_bucket(&env, "auth");
    let proxy = FaultProxy::start(&env.endpoint, |_, _| Fault::Forward);
    let mut t = target(&env, &proxy.endpoint, &bucket);
    t.secret_access_key = Secret::new("definitely-wrong");
    let storage = S3Storage::new(t, None).unwrap();
    let err = storage.put("m.json", b"{}").unwrap_err();
    match &err {
        S3Error::Status { status, code, .. } => {
            assert_eq!(*status, 403, "{err}");
            assert!(!code.is_empty(), "the S3 error code is reported: {err}");
        }
        other => panic!("expected an HTTP status error, got {other}"),
    }
    let msg = err.to_string();
    assert!(!msg.contains("definitely-wrong") && !msg.contains("X-Amz-Signature"), "{msg}");
    assert_eq!(proxy.requests().len(), 1, "a 403 is not retried");
}

#[test]
fn failed_and_stalled_parts_are_retried_and_the_object_is_correct() {
    let env = s3_env();
    let bucket = new_bucket(&env, "retry");
    let proxy = FaultProxy::start(&env.endpoint, |req, n| {
        if req.method == "PUT" && req.url.contains("partNumber=2&") && n == 1 {
            Fault::Status(503)
        } else if req.method == "PUT" && req.url.contains("partNumber=3&") && n == 1 {
            Fault::Stall(Duration::from_secs(4))
        } else if req.method == "POST" && req.url.contains("uploadId=") && n == 1 {
            Fault::Status(500) // CompleteMultipartUpload fails once too
        } else {
            Fault::Forward
        }
    });
    let storage = S3Storage::new(target(&env, &proxy.endpoint, &bucket), None).unwrap();
    let bytes = data(4 * 5 * MIB + 99, 21);
    upload(&storage, "retried", &bytes).unwrap();
    assert!(download(&storage, "retried") == bytes);
    let reqs = proxy.requests();
    let count = |pat: &str| reqs.iter().filter(|r| r.method == "PUT" && r.url.contains(pat)).count();
    assert_eq!(count("partNumber=2&"), 2, "part 2 sent twice");
    // Every part carries Content-MD5: the base64 of a 16-byte digest.
    use base64::Engine as _;
    for r in reqs.iter().filter(|r| r.method == "PUT" && r.url.contains("partNumber=")) {
        let md5 = r.headers.iter().find(|(k, _)| k == "content-md5").map(|(_, v)| v.clone());
        let md5 = md5.unwrap_or_else(|| panic!("part without Content-MD5: {}", r.url));
        assert_eq!(base64::engine::general_purpose::STANDARD.decode(md5).unwrap().len(), 16);
    }
    assert_eq!(count("partNumber=3&"), 2, "part 3 retried after the stall");
    assert!(open_uploads(&env, &bucket).is_empty());
}

#[test]
fn a_fatal_part_failure_aborts_the_upload_and_leaves_nothing() {
    let env = s3_env();
    let bucket = new_bucket(&env, "abort");
    let proxy = FaultProxy::start(&env.endpoint, |req, _| {
        if req.method == "PUT" && req.url.contains("partNumber=2&") {
            Fault::Status(500)
        } else {
            Fault::Forward
        }
    });
    let state = tempfile::tempdir().unwrap();
    let storage = S3Storage::new(target(&env, &proxy.endpoint, &bucket), Some(state.path())).unwrap();
    let t0 = Instant::now();
    let err = upload(&storage, "doomed", &data(4 * 5 * MIB, 5)).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("part 2") && msg.contains("500"), "{msg}");
    assert!(t0.elapsed() < Duration::from_secs(20));
    assert!(
        proxy.requests().iter().any(|r| r.method == "DELETE" && r.url.contains("uploadId=")),
        "AbortMultipartUpload sent"
    );
    assert!(open_uploads(&env, &bucket).is_empty(), "{:?}", open_uploads(&env, &bucket));
    assert!(storage.head("doomed").unwrap().is_none());
    assert!(common::files_under(&state.path().join("uploads")).is_empty(), "upload record removed");
}

#[test]
fn an_upload_left_by_a_crash_is_aborted_by_the_next_agent() {
    let env = s3_env();
    let bucket = new_bucket(&env, "crash");
    let state = tempfile::tempdir().unwrap();
    let storage = S3Storage::new(target(&env, &env.endpoint, &bucket), Some(state.path())).unwrap();
    let mut w = storage.create("crashed");
    w.write_all(&data(11 * MIB, 9)).unwrap(); // two parts sent: the upload exists
    std::thread::sleep(Duration::from_millis(500));
    // A crash runs no destructor.
    std::mem::forget(w);
    assert_eq!(common::files_under(&state.path().join("uploads")).len(), 1, "the upload id was recorded");
    assert!(!open_uploads(&env, &bucket).is_empty());
    let restarted = S3Storage::new(target(&env, &env.endpoint, &bucket), Some(state.path())).unwrap();
    assert_eq!(restarted.abort_recorded_uploads(), 1);
    assert!(open_uploads(&env, &bucket).is_empty(), "{:?}", open_uploads(&env, &bucket));
    assert!(common::files_under(&state.path().join("uploads")).is_empty());
}

#[test]
fn presigned_put_uploads_the_spooled_object_and_removes_the_spool() {
    let env = s3_env();
    let bucket = new_bucket(&env, "presigned");
    let url = common::s3::presign_put(&env, &bucket, "run-1.bkpy", Duration::from_secs(600));
    let spool = tempfile::tempdir().unwrap();
    let expires = (std::time::SystemTime::now() + Duration::from_secs(600))
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let bytes = data(7 * MIB + 3, 4);
    let mut w = Box::new(PresignedPut::new(&url, "run-1.bkpy", expires, spool.path(), true).unwrap());
    w.write_all(&bytes).unwrap();
    assert_eq!(common::files_under(spool.path()).len(), 1, "spooled while writing");
    let stored = w.commit().unwrap();
    assert_eq!(stored.size, bytes.len() as u64);
    assert!(common::files_under(spool.path()).is_empty(), "spool deleted");
    assert!(std::fs::read(env.dir.join(&bucket).join("run-1.bkpy")).unwrap() == bytes);
}

#[test]
fn expired_presigned_url_is_refused_before_upload() {
    let env = s3_env();
    let spool = tempfile::tempdir().unwrap();
    let past =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64 - 1000;
    let url = common::s3::presign_put(&env, "whatever", "k", Duration::from_secs(1));
    let err = PresignedPut::new(&url, "k", past, spool.path(), true).err().expect("refused");
    let msg = err.to_string();
    assert!(msg.contains("expired"), "{msg}");
    assert!(!msg.contains("X-Amz"), "no signature in the message: {msg}");
    assert!(common::files_under(spool.path()).is_empty());
}

#[test]
fn https_endpoint_is_trusted_only_with_its_ca_file() {
    let env = s3_env();
    let bucket = new_bucket(&env, "tls");
    let certs = tempfile::tempdir().unwrap();
    common::make_certs(certs.path());
    // socat terminates TLS in front of the S3 server (which speaks plain HTTP).
    let (port, _port_claim) = crate::common::reserve_port();
    let upstream = env.endpoint.trim_start_matches("http://");
    let mut socat = std::process::Command::new("socat")
        .arg(format!(
            "openssl-listen:{port},bind=127.0.0.1,reuseaddr,fork,verify=0,cert={}",
            certs.path().join("server.pem").display()
        ))
        .arg(format!("tcp:{upstream}"))
        .spawn()
        .expect("socat is needed for the TLS test: apt-get install socat (scripts/install-deps.sh core)");
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(10), "socat did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let endpoint = format!("https://127.0.0.1:{port}");

    let untrusted = S3Storage::new(target(&env, &endpoint, &bucket), None).unwrap();
    let err = untrusted.put("k", b"x").unwrap_err().to_string();
    let mut t = target(&env, &endpoint, &bucket);
    t.ca_file = Some(certs.path().join("ca.pem"));
    let trusted = S3Storage::new(t, None).unwrap();
    let put = trusted.put("k", b"over tls");
    let back = put.as_ref().ok().map(|_| download(&trusted, "k"));
    let _ = socat.kill();
    let _ = socat.wait();
    assert!(err.to_lowercase().contains("certificate") || err.contains("UnknownIssuer"), "{err}");
    put.unwrap();
    assert_eq!(back.as_deref(), Some(&b"over tls"[..]));
}
