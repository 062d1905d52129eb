//! Interoperability vectors for blob-format.md, decrypted by the real `backupy-decrypt`.
//!
//! The vectors in `tests/vectors/blob/` (a copy of the shared set) were written by an
//! independent implementation of the spec; every expected value below comes from their
//! `manifest.json`, never from running the code under test.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use backupy_agent::crypto::{self, DataKey, Identity, KeySource};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD};
use serde_json::Value;
use sha2::{Digest, Sha256};

const DECRYPT: &str = env!("CARGO_BIN_EXE_backupy-decrypt");

fn vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/blob")
}

struct Vector {
    file: String,
    recipient: bool,
    v: Value,
}

impl Vector {
    fn path(&self) -> PathBuf {
        vectors_dir().join(&self.file)
    }

    fn s(&self, field: &str) -> String {
        self.v[field].as_str().unwrap_or_else(|| panic!("{}: field {field} missing", self.file)).to_string()
    }

    fn dir_file(&self, field: &str) -> PathBuf {
        vectors_dir().join(self.s(field))
    }

    fn identity_path(&self) -> PathBuf {
        assert!(self.recipient);
        self.dir_file("identity_file")
    }
}

fn manifest() -> Vec<Vector> {
    let text = fs::read_to_string(vectors_dir().join("manifest.json")).expect("manifest.json");
    let m: Value = serde_json::from_str(&text).expect("manifest is JSON");
    let vectors: Vec<Vector> = m["vectors"]
        .as_array()
        .expect("vectors array")
        .iter()
        .map(|v| {
            assert_eq!(v["expect"], "accept", "this set holds only valid objects");
            let mode = v["key_mode"].as_str().expect("key_mode");
            assert!(mode == "raw" || mode == "recipient", "key_mode {mode}");
            Vector {
                file: v["file"].as_str().expect("file").to_string(),
                recipient: mode == "recipient",
                v: v.clone(),
            }
        })
        .collect();
    assert!(vectors.len() >= 24, "the manifest lists {} vectors", vectors.len());
    vectors
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn decrypt(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(DECRYPT).args(args).env_remove("BACKUPY_LOG_LEVEL").output().expect("run backupy-decrypt")
}

/// Runs the binary and returns its stdout, panicking with its stderr on failure.
fn decrypt_ok(v: &Vector, args: &[&std::ffi::OsStr]) -> Vec<u8> {
    let out = decrypt(args);
    assert!(
        out.status.success(),
        "{}: backupy-decrypt {:?} failed ({:?}): {}",
        v.file,
        args,
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The key option for a vector: its identity file (recipient) or the named key file (raw).
fn key_arg(v: &Vector, key_field: &str) -> (&'static str, PathBuf) {
    if v.recipient { ("--identity", v.identity_path()) } else { ("--key-file", v.dir_file(key_field)) }
}

#[test]
fn vector_files_are_intact() {
    for v in manifest() {
        let bytes = fs::read(v.path()).unwrap();
        assert_eq!(bytes.len() as u64, v.v["object_size"].as_u64().unwrap(), "{}", v.file);
        assert_eq!(sha256_hex(&bytes), v.s("object_sha256"), "{}", v.file);
    }
}

#[test]
fn every_vector_decrypts_to_output_sha256_on_stdout() {
    for v in manifest() {
        // Raw vectors: the hex key file; recipient vectors: the identity file.
        let (k, key) = key_arg(&v, "key_file_hex");
        let (k, kp) = (k.as_ref(), key.as_os_str());
        let input = v.path();
        let out =
            decrypt_ok(&v, &["--in".as_ref(), input.as_os_str(), "--out".as_ref(), "-".as_ref(), k, kp]);
        assert_eq!(out.len() as u64, v.v["output_size"].as_u64().unwrap(), "{}", v.file);
        assert_eq!(sha256_hex(&out), v.s("output_sha256"), "{}", v.file);
    }
}

#[test]
fn raw_vectors_decrypt_with_base64_key_file_to_a_file() {
    let dir = tempfile::tempdir().unwrap();
    for v in manifest().into_iter().filter(|v| !v.recipient) {
        let out_path = dir.path().join(format!("{}.out", v.file));
        let key = v.dir_file("key_file_b64");
        let input = v.path();
        decrypt_ok(
            &v,
            &[
                "--in".as_ref(),
                input.as_os_str(),
                "--out".as_ref(),
                out_path.as_os_str(),
                "--key-file".as_ref(),
                key.as_os_str(),
            ],
        );
        let got = fs::read(&out_path).unwrap();
        assert_eq!(sha256_hex(&got), v.s("output_sha256"), "{}", v.file);
    }
}

#[test]
fn raw_vectors_decrypt_with_hex_key_file_to_a_file() {
    let dir = tempfile::tempdir().unwrap();
    for v in manifest().into_iter().filter(|v| !v.recipient) {
        let out_path = dir.path().join(format!("{}.out", v.file));
        let key = v.dir_file("key_file_hex");
        let input = v.path();
        decrypt_ok(
            &v,
            &[
                "--in".as_ref(),
                input.as_os_str(),
                "--out".as_ref(),
                out_path.as_os_str(),
                "--key-file".as_ref(),
                key.as_os_str(),
            ],
        );
        let got = fs::read(&out_path).unwrap();
        assert_eq!(sha256_hex(&got), v.s("output_sha256"), "{}", v.file);
    }
}

#[test]
fn every_vector_with_skip_decompress_gives_plaintext_sha256() {
    for v in manifest() {
        let (k, key) = key_arg(&v, "key_file_b64");
        let (k, kp) = (k.as_ref(), key.as_os_str());
        let input = v.path();
        let out = decrypt_ok(
            &v,
            &[
                "--in".as_ref(),
                input.as_os_str(),
                "--out".as_ref(),
                "-".as_ref(),
                "--skip-decompress".as_ref(),
                k,
                kp,
            ],
        );
        assert_eq!(out.len() as u64, v.v["plaintext_size"].as_u64().unwrap(), "{}", v.file);
        assert_eq!(sha256_hex(&out), v.s("plaintext_sha256"), "{}", v.file);
    }
}

#[test]
fn every_vector_verifies_against_its_object_sha256() {
    let dir = tempfile::tempdir().unwrap();
    for v in manifest() {
        let (k, key) = key_arg(&v, "key_file_hex");
        let (k, kp) = (k.as_ref(), key.as_os_str());
        let input = v.path();
        let out_path = dir.path().join(format!("{}.out", v.file));
        let sha = v.s("object_sha256");
        let out = decrypt(&[
            "--in".as_ref(),
            input.as_os_str(),
            "--out".as_ref(),
            out_path.as_os_str(),
            "--sha256".as_ref(),
            sha.as_ref(),
            k,
            kp,
        ]);
        assert!(out.status.success(), "{}: {}", v.file, String::from_utf8_lossy(&out.stderr));
        // With an expected SHA-256 there is nothing to warn about, even for v1.
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("warning"),
            "{}: unexpected warning: {}",
            v.file,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(sha256_hex(&fs::read(&out_path).unwrap()), v.s("output_sha256"), "{}", v.file);
    }
}

fn token_for(key_hex: &str) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let header = serde_json::json!({"alg": "HS256", "typ": "JWT"});
    let claims = serde_json::json!({
        "iss": "backupy-server",
        "aud": "backupy-decrypt",
        "exp": now + 3600,
        "sub": "user-1",
        "run_id": "run-1",
        "company_id": "company-1",
        "dek": B64.encode(hex::decode(key_hex).unwrap()),
        "alg": "AES-256-GCM",
        "format_version": 2,
    });
    format!(
        "{}.{}.c2lnbmF0dXJl",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

#[test]
fn recipient_vectors_refuse_a_token_with_their_data_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut seen = 0;
    for v in manifest().into_iter().filter(|v| v.recipient) {
        seen += 1;
        let out_path = dir.path().join(format!("{}.out", v.file));
        let token = token_for(&v.s("key_hex"));
        let input = v.path();
        let out = decrypt(&[
            "--in".as_ref(),
            input.as_os_str(),
            "--out".as_ref(),
            out_path.as_os_str(),
            "--token".as_ref(),
            token.as_ref(),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {stderr}", v.file);
        assert!(stderr.contains("--identity"), "{}: {stderr}", v.file);
        assert!(!out_path.exists(), "{}: output left behind", v.file);
    }
    assert!(seen > 0);
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0, "leftover files");
}

#[test]
fn recipient_vectors_refuse_their_data_key_as_key_file() {
    for v in manifest().into_iter().filter(|v| v.recipient) {
        let key = v.dir_file("key_file_hex");
        let input = v.path();
        let out = decrypt(&[
            "--in".as_ref(),
            input.as_os_str(),
            "--out".as_ref(),
            "-".as_ref(),
            "--key-file".as_ref(),
            key.as_os_str(),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{}: {stderr}", v.file);
        assert!(stderr.contains("--identity"), "{}: {stderr}", v.file);
        assert!(out.stdout.is_empty(), "{}", v.file);
    }
}

#[test]
fn raw_vectors_decrypt_with_a_token_carrying_their_key() {
    for v in manifest().into_iter().filter(|v| !v.recipient) {
        let token = token_for(&v.s("key_hex"));
        let sha = v.s("object_sha256");
        let input = v.path();
        let out = decrypt_ok(
            &v,
            &[
                "--in".as_ref(),
                input.as_os_str(),
                "--out".as_ref(),
                "-".as_ref(),
                "--token".as_ref(),
                token.as_ref(),
                "--sha256".as_ref(),
                sha.as_ref(),
            ],
        );
        assert_eq!(sha256_hex(&out), v.s("output_sha256"), "{}", v.file);
    }
}

#[test]
fn library_open_gives_plaintext_sha256() {
    for v in manifest() {
        let key = if v.recipient {
            KeySource::Identity(Identity::from_file(&v.identity_path()).unwrap())
        } else {
            KeySource::Raw(DataKey::from_slice(&hex::decode(v.s("key_hex")).unwrap()).unwrap())
        };
        let file = fs::File::open(v.path()).unwrap();
        let (format, mut plain) = crypto::open(file, &key).unwrap_or_else(|e| panic!("{}: {e}", v.file));
        let expected_format = match v.v["format_version"].as_u64() {
            Some(1) => crypto::Format::V1,
            Some(2) => crypto::Format::V2,
            other => panic!("{}: format_version {other:?}", v.file),
        };
        assert_eq!(format, expected_format, "{}", v.file);
        let mut buf = Vec::new();
        plain.read_to_end(&mut buf).unwrap_or_else(|e| panic!("{}: {e}", v.file));
        assert_eq!(sha256_hex(&buf), v.s("plaintext_sha256"), "{}", v.file);
    }
}

#[test]
fn library_recipient_of_vector_identity_matches_manifest() {
    let text = fs::read_to_string(vectors_dir().join("manifest.json")).unwrap();
    let m: Value = serde_json::from_str(&text).unwrap();
    let id = Identity::from_file(&vectors_dir().join(m["identity_file"].as_str().unwrap())).unwrap();
    let r = id.recipient().unwrap();
    assert_eq!(r.to_string(), m["recipient"].as_str().unwrap());
    assert_eq!(r.key_id(), m["recipient_dek_kms_id"].as_str().unwrap());
}
