//! The `backupy-decrypt` (and `backupy-agent keygen`) command-line contract, run as real
//! processes against objects made with the library.
//!
//! Expected values come from the spec's rules (agent.md "Command line", blob-format.md),
//! from the bytes the test itself chose, and from the `zstd`/`flate2`/`sha2` crates,
//! never from the output of the code under test.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use backupy_agent::crypto::{DataKey, Encryption, Identity, Recipient};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

const DECRYPT: &str = env!("CARGO_BIN_EXE_backupy-decrypt");
const AGENT: &str = env!("CARGO_BIN_EXE_backupy-agent");

/// Chunk size used for test objects: the spec's minimum, so small plaintexts span chunks.
const C: u32 = 4096;
/// v2 header length in key mode 0: 4+1+1+1+1+4+16+7+2 (blob-format.md header table).
const RAW_HEADER_LEN: usize = 37;
/// AES-GCM tag length.
const TAG: usize = 16;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Compressible text that starts with neither the zstd nor the gzip magic.
fn text(len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 64);
    let mut i = 0u32;
    while v.len() < len {
        v.extend_from_slice(format!("{i:08} INSERT INTO t VALUES ('the quick brown fox');\n").as_bytes());
        i += 1;
    }
    v.truncate(len);
    v
}

fn key(byte: u8) -> DataKey {
    let mut k = [0u8; 32];
    for (i, b) in k.iter_mut().enumerate() {
        *b = byte.wrapping_add(i as u8).wrapping_mul(7);
    }
    DataKey::from_bytes(k)
}

fn seal(enc: Encryption, compression_code: u8, plain: &[u8]) -> Vec<u8> {
    let prepared = enc.prepare(compression_code).expect("prepare");
    let mut w = prepared.writer(Vec::new()).expect("writer");
    w.write_all(plain).expect("write");
    w.finish().expect("finish")
}

fn seal_raw(k: &DataKey, compression_code: u8, plain: &[u8]) -> Vec<u8> {
    seal(Encryption::V2Raw { key: k.clone(), chunk_size: C }, compression_code, plain)
}

fn seal_recipient(r: &Recipient, plain: &[u8]) -> Vec<u8> {
    seal(Encryption::V2Recipient { recipient: r.clone(), chunk_size: C }, 0, plain)
}

fn seal_v1(k: &DataKey, plain: &[u8]) -> Vec<u8> {
    seal(Encryption::V1 { key: k.clone() }, 0, plain)
}

fn zstd_bytes(plain: &[u8]) -> Vec<u8> {
    zstd::encode_all(plain, 3).unwrap()
}

fn gzip_bytes(plain: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(plain).unwrap();
    e.finish().unwrap()
}

/// A scratch directory: inputs and keys at the top, outputs under `out/` so that a
/// leftover temporary file there is noticed.
struct Scratch {
    dir: TempDir,
}

impl Scratch {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("out")).unwrap();
        Self { dir }
    }

    fn file(&self, name: &str, bytes: impl AsRef<[u8]>) -> String {
        let p = self.dir.path().join(name);
        fs::write(&p, bytes).unwrap();
        p.to_str().unwrap().to_string()
    }

    fn out(&self, name: &str) -> String {
        self.out_path(name).to_str().unwrap().to_string()
    }

    fn out_path(&self, name: &str) -> PathBuf {
        self.dir.path().join("out").join(name)
    }

    fn out_entries(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.dir.path().join("out"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// The output directory holds nothing: no output, no `.partial` temp file.
    fn assert_out_empty(&self) {
        assert_eq!(self.out_entries(), Vec::<String>::new(), "leftover files in the output directory");
    }

    /// A raw key file in hex with surrounding whitespace.
    fn hex_key_file(&self, k: &DataKey) -> String {
        self.file("key.hex", format!("  \n\t{}  \n\n", hex::encode(k.as_bytes())))
    }

    fn identity_file(&self, id: &Identity) -> String {
        self.file("identity.key", id.to_file_text().unwrap().as_bytes())
    }
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .env_remove("BACKUPY_LOG_LEVEL")
        .stdin(Stdio::null())
        .output()
        .expect("run the binary")
}

fn decrypt(args: &[&str]) -> Output {
    run(DECRYPT, args)
}

fn decrypt_stdin(args: &[&str], input: Vec<u8>) -> Output {
    let mut child = Command::new(DECRYPT)
        .args(args)
        .env_remove("BACKUPY_LOG_LEVEL")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn backupy-decrypt");
    let mut stdin = child.stdin.take().unwrap();
    let feeder = std::thread::spawn(move || {
        // The child may stop reading early on an error; a broken pipe is fine then.
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().expect("wait");
    feeder.join().unwrap();
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[track_caller]
fn assert_ok(out: &Output) {
    assert!(out.status.success(), "expected success, got {:?}: {}", out.status, stderr(out));
}

/// Asserts the exit code and that stderr mentions every needle (case-insensitive).
#[track_caller]
fn assert_fails(out: &Output, code: i32, needles: &[&str]) -> String {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    let lower = err.to_lowercase();
    for n in needles {
        assert!(lower.contains(&n.to_lowercase()), "stderr should mention {n:?}: {err}");
    }
    err
}

// ---------------------------------------------------------------------------
// Tokens (blob-format.md "Decryption tokens")
// ---------------------------------------------------------------------------

fn valid_claims(k: &DataKey) -> Value {
    json!({
        "iss": "backupy-server",
        "aud": "backupy-decrypt",
        "exp": now() + 3600,
        "sub": "user-42",
        "run_id": "run-7",
        "company_id": "company-3",
        "dek": B64.encode(k.as_bytes()),
        "alg": "AES-256-GCM",
        "format_version": 2,
    })
}

fn jwt(claims: &Value) -> String {
    let header = json!({"alg": "HS256", "typ": "JWT"});
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(b"not-a-real-signature")
    )
}

/// A raw-key v2 object of a few chunks, its key and its plaintext.
struct RawCase {
    s: Scratch,
    key: DataKey,
    plain: Vec<u8>,
    object: Vec<u8>,
    input: String,
}

fn raw_case() -> RawCase {
    let s = Scratch::new();
    let key = key(1);
    let plain = text(3 * C as usize + 123);
    let object = seal_raw(&key, 0, &plain);
    let input = s.file("object.bkpy", &object);
    RawCase { s, key, plain, object, input }
}

/// Decrypts `case` with `token` to `out/dump` and returns the process output.
fn decrypt_with_token(case: &RawCase, claims: &Value, extra: &[&str]) -> Output {
    let token = jwt(claims);
    let out = case.s.out("dump");
    let mut args = vec!["--in", &case.input, "--out", &out, "--token", &token];
    args.extend_from_slice(extra);
    decrypt(&args)
}

// ---------------------------------------------------------------------------
// Key options and input/output forms
// ---------------------------------------------------------------------------

#[test]
fn decrypts_with_hex_key_file_with_surrounding_whitespace() {
    let c = raw_case();
    let key = c.s.hex_key_file(&c.key);
    let out = c.s.out("dump");
    assert_ok(&decrypt(&["--in", &c.input, "--out", &out, "--key-file", &key]));
    assert_eq!(fs::read(&out).unwrap(), c.plain);
    assert_eq!(c.s.out_entries(), vec!["dump"]);
}

#[test]
fn decrypts_with_base64_key_file_with_surrounding_whitespace() {
    let c = raw_case();
    let key = c.s.file("key.b64", format!("\r\n   {}  \r\n\n", B64.encode(c.key.as_bytes())));
    let out = c.s.out("dump");
    assert_ok(&decrypt(&["--in", &c.input, "--out", &out, "--key-file", &key]));
    assert_eq!(fs::read(&out).unwrap(), c.plain);
}

#[test]
fn decrypts_with_identity() {
    let s = Scratch::new();
    let id = Identity::generate().unwrap();
    let plain = text(2 * C as usize + 1);
    let input = s.file("object.bkpy", seal_recipient(&id.recipient().unwrap(), &plain));
    let idf = s.identity_file(&id);
    let out = s.out("dump");
    assert_ok(&decrypt(&["--in", &input, "--out", &out, "--identity", &idf]));
    assert_eq!(fs::read(&out).unwrap(), plain);
}

#[test]
fn decrypts_with_identity_file_with_crlf_and_no_final_newline() {
    let s = Scratch::new();
    let id = Identity::generate().unwrap();
    let plain = text(5000);
    let input = s.file("object.bkpy", seal_recipient(&id.recipient().unwrap(), &plain));
    // Rewrite the key file by the spec's rules: comments, blank lines, CRLF, spaces, no final newline.
    let text_file = id.to_file_text().unwrap();
    let key_line = text_file.lines().find(|l| l.starts_with("BKPY-SECRET-KEY-1:")).unwrap().to_string();
    let idf = s.file("id.key", format!("# a comment\r\n\r\n   {key_line}  "));
    let out = s.out("dump");
    assert_ok(&decrypt(&["--in", &input, "--out", &out, "--identity", &idf]));
    assert_eq!(fs::read(&out).unwrap(), plain);
}

#[test]
fn decrypts_with_token() {
    let c = raw_case();
    assert_ok(&decrypt_with_token(&c, &valid_claims(&c.key), &[]));
    assert_eq!(fs::read(c.s.out_path("dump")).unwrap(), c.plain);
}

#[test]
fn decrypts_with_token_file() {
    let c = raw_case();
    let tf = c.s.file("token.jwt", format!("{}\n", jwt(&valid_claims(&c.key))));
    let out = c.s.out("dump");
    assert_ok(&decrypt(&["--in", &c.input, "--out", &out, "--token-file", &tf]));
    assert_eq!(fs::read(&out).unwrap(), c.plain);
}

#[test]
fn decrypts_file_to_file() {
    let c = raw_case();
    let key = c.s.hex_key_file(&c.key);
    let out = c.s.out("restored.sql");
    let o = decrypt(&["--in", &c.input, "--out", &out, "--key-file", &key]);
    assert_ok(&o);
    assert!(o.stdout.is_empty(), "nothing on stdout when writing a file");
    assert_eq!(fs::read(&out).unwrap(), c.plain);
    assert_eq!(c.s.out_entries(), vec!["restored.sql"]);
}

#[test]
fn decrypts_stdin_to_stdout() {
    let s = Scratch::new();
    let k = key(9);
    // Large enough to fill pipe buffers both ways.
    let plain = text(300_000);
    let object = seal_raw(&k, 0, &plain);
    let keyf = s.hex_key_file(&k);
    let o = decrypt_stdin(&["--in", "-", "--out", "-", "--key-file", &keyf], object);
    assert_ok(&o);
    assert_eq!(o.stdout.len(), plain.len());
    assert!(o.stdout == plain, "stdout differs from the plaintext");
}

#[test]
fn decrypts_file_to_stdout() {
    let c = raw_case();
    let key = c.s.hex_key_file(&c.key);
    let o = decrypt(&["--in", &c.input, "--out", "-", "--key-file", &key]);
    assert_ok(&o);
    assert_eq!(o.stdout, c.plain);
}

#[test]
fn decrypts_stdin_to_file() {
    let c = raw_case();
    let key = c.s.hex_key_file(&c.key);
    let out = c.s.out("dump");
    let o = decrypt_stdin(&["--in", "-", "--out", &out, "--key-file", &key], c.object.clone());
    assert_ok(&o);
    assert_eq!(fs::read(&out).unwrap(), c.plain);
}

// ---------------------------------------------------------------------------
// Token claims
// ---------------------------------------------------------------------------

/// A raw-key object decrypted with a valid token that `edit` changed, and `extra` flags:
/// refused (exit 1) naming every needle, nothing left in the output directory.
#[track_caller]
fn token_refused(edit: impl FnOnce(&RawCase, &mut Value), extra: &[&str], needles: &[&str]) {
    let c = raw_case();
    let mut claims = valid_claims(&c.key);
    edit(&c, &mut claims);
    assert_fails(&decrypt_with_token(&c, &claims, extra), 1, needles);
    c.s.assert_out_empty();
}

/// As [`token_refused`], but the decryption must succeed and give back the dump.
#[track_caller]
fn token_accepted(edit: impl FnOnce(&RawCase, &mut Value), extra: &[&str]) {
    let c = raw_case();
    let mut claims = valid_claims(&c.key);
    edit(&c, &mut claims);
    assert_ok(&decrypt_with_token(&c, &claims, extra));
    assert_eq!(fs::read(c.s.out_path("dump")).unwrap(), c.plain);
}

#[test]
fn token_expired_beyond_leeway_is_refused() {
    token_refused(|_, t| t["exp"] = json!(now() - 600), &[], &["expired"]);
}

#[test]
fn token_expired_within_leeway_is_accepted() {
    // 60 s of leeway: 20 s past exp is still fine.
    token_accepted(|_, t| t["exp"] = json!(now() - 20), &[]);
}

#[test]
fn token_with_wrong_audience_is_refused() {
    token_refused(|_, t| t["aud"] = json!("backupy-agent"), &[], &["aud"]);
}

#[test]
fn token_with_wrong_issuer_is_refused() {
    token_refused(|_, t| t["iss"] = json!("someone-else"), &[], &["iss"]);
}

#[test]
fn token_without_run_id_is_refused() {
    token_refused(|_, t| drop(t.as_object_mut().unwrap().remove("run_id")), &[], &["run_id"]);
}

#[test]
fn token_with_empty_company_id_is_refused() {
    token_refused(|_, t| t["company_id"] = json!(""), &[], &["company_id"]);
}

#[test]
fn token_for_another_format_is_refused() {
    token_refused(|_, t| t["alg"] = json!("AES-128-CBC"), &[], &["another format"]);
}

#[test]
fn token_without_format_version_is_accepted() {
    token_accepted(|_, t| drop(t.as_object_mut().unwrap().remove("format_version")), &[]);
}

#[test]
fn token_that_is_not_a_jwt_is_refused() {
    let c = raw_case();
    let out = c.s.out("dump");
    let o = decrypt(&["--in", &c.input, "--out", &out, "--token", "not-a-token"]);
    assert_fails(&o, 1, &["token"]);
    c.s.assert_out_empty();
}

#[test]
fn token_sha256_claim_matching_in_upper_case_is_accepted() {
    token_accepted(|c, t| t["sha256"] = json!(sha256_hex(&c.object).to_uppercase()), &[]);
}

#[test]
fn token_sha256_mismatch_removes_the_output() {
    token_refused(|_, t| t["sha256"] = json!(sha256_hex(b"some other object")), &[], &["SHA-256 mismatch"]);
}

#[test]
fn sha256_flag_overrides_a_wrong_token_claim() {
    let c = raw_case();
    let mut claims = valid_claims(&c.key);
    claims["sha256"] = json!(sha256_hex(b"some other object"));
    let flag = sha256_hex(&c.object).to_uppercase();
    assert_ok(&decrypt_with_token(&c, &claims, &["--sha256", &flag]));
    assert_eq!(fs::read(c.s.out_path("dump")).unwrap(), c.plain);
}

#[test]
fn sha256_flag_takes_precedence_over_a_correct_token_claim() {
    let wrong = sha256_hex(b"some other object");
    token_refused(
        |c, t| t["sha256"] = json!(sha256_hex(&c.object)),
        &["--sha256", &wrong],
        &["SHA-256 mismatch"],
    );
}

#[test]
fn no_verify_sha256_ignores_a_wrong_token_claim() {
    token_accepted(|_, t| t["sha256"] = json!(sha256_hex(b"some other object")), &["--no-verify-sha256"]);
}

#[test]
fn sha256_flag_mismatch_with_key_file_removes_the_output() {
    let c = raw_case();
    let key = c.s.hex_key_file(&c.key);
    let out = c.s.out("dump");
    let mut wrong = sha256_hex(&c.object).into_bytes();
    wrong[0] = if wrong[0] == b'0' { b'1' } else { b'0' };
    let wrong = String::from_utf8(wrong).unwrap();
    let o = decrypt(&["--in", &c.input, "--out", &out, "--key-file", &key, "--sha256", &wrong]);
    assert_fails(&o, 1, &["SHA-256 mismatch"]);
    c.s.assert_out_empty();
}

// ---------------------------------------------------------------------------
// Wrong keys
// ---------------------------------------------------------------------------

#[test]
fn wrong_key_is_refused() {
    let c = raw_case();
    let key = c.s.hex_key_file(&key(2));
    let out = c.s.out("dump");
    let o = decrypt(&["--in", &c.input, "--out", &out, "--key-file", &key]);
    assert_fails(&o, 1, &["wrong key"]);
    c.s.assert_out_empty();
}

#[test]
fn wrong_key_on_v1_object_is_refused() {
    let s = Scratch::new();
    let input = s.file("object.bkpy", seal_v1(&key(1), &text(10_000)));
    let keyf = s.hex_key_file(&key(2));
    let out = s.out("dump");
    let o = decrypt(&["--in", &input, "--out", &out, "--key-file", &keyf]);
    assert_fails(&o, 1, &["wrong key"]);
    s.assert_out_empty();
}

#[test]
fn wrong_identity_is_refused() {
    let s = Scratch::new();
    let sealed_to = Identity::generate().unwrap();
    let other = Identity::generate().unwrap();
    let input = s.file("object.bkpy", seal_recipient(&sealed_to.recipient().unwrap(), &text(9000)));
    let idf = s.identity_file(&other);
    let out = s.out("dump");
    let o = decrypt(&["--in", &input, "--out", &out, "--identity", &idf]);
    assert_fails(&o, 1, &["wrong private key"]);
    s.assert_out_empty();
}

#[test]
fn identity_on_raw_key_object_is_refused() {
    let c = raw_case();
    let idf = c.s.identity_file(&Identity::generate().unwrap());
    let out = c.s.out("dump");
    let o = decrypt(&["--in", &c.input, "--out", &out, "--identity", &idf]);
    assert_fails(&o, 1, &["raw data key", "--key-file"]);
    c.s.assert_out_empty();
}

#[test]
fn identity_on_v1_object_is_refused() {
    let s = Scratch::new();
    let input = s.file("object.bkpy", seal_v1(&key(1), &text(100)));
    let idf = s.identity_file(&Identity::generate().unwrap());
    let out = s.out("dump");
    let o = decrypt(&["--in", &input, "--out", &out, "--identity", &idf]);
    assert_fails(&o, 1, &["v1", "raw data key", "--key-file"]);
    s.assert_out_empty();
}

#[test]
fn key_file_on_recipient_object_is_refused() {
    let s = Scratch::new();
    let id = Identity::generate().unwrap();
    let input = s.file("object.bkpy", seal_recipient(&id.recipient().unwrap(), &text(100)));
    let keyf = s.hex_key_file(&key(1));
    let out = s.out("dump");
    let o = decrypt(&["--in", &input, "--out", &out, "--key-file", &keyf]);
    assert_fails(&o, 1, &["sealed to a recipient key", "use --identity"]);
    s.assert_out_empty();
}

#[test]
fn token_on_recipient_object_is_refused() {
    let s = Scratch::new();
    let id = Identity::generate().unwrap();
    let input = s.file("object.bkpy", seal_recipient(&id.recipient().unwrap(), &text(100)));
    let token = jwt(&valid_claims(&key(1)));
    let out = s.out("dump");
    let o = decrypt(&["--in", &input, "--out", &out, "--token", &token]);
    assert_fails(&o, 1, &["sealed to a recipient key", "use --identity"]);
    s.assert_out_empty();
}

// ---------------------------------------------------------------------------
// Damaged objects
// ---------------------------------------------------------------------------

/// Decrypts `object` with key(1) to `out/dump`; returns the process output and scratch.
fn decrypt_damaged(object: &[u8]) -> (Output, Scratch) {
    let s = Scratch::new();
    let input = s.file("object.bkpy", object);
    let keyf = s.hex_key_file(&key(1));
    let out = s.out("dump");
    let o = decrypt(&["--in", &input, "--out", &out, "--key-file", &keyf]);
    (o, s)
}

#[test]
fn corrupted_object_is_refused_and_leaves_no_output() {
    let mut object = seal_raw(&key(1), 0, &text(3 * C as usize + 123));
    let mid = object.len() / 2;
    object[mid] ^= 0x01;
    let (o, s) = decrypt_damaged(&object);
    assert_fails(&o, 1, &["corrupted"]);
    s.assert_out_empty();
}

#[test]
fn corrupted_header_is_refused_and_leaves_no_output() {
    // The header is the AAD of every chunk: a flipped salt byte (offset 12..28) must fail.
    let mut object = seal_raw(&key(1), 0, &text(3 * C as usize + 123));
    object[20] ^= 0x80;
    let (o, s) = decrypt_damaged(&object);
    assert_fails(&o, 1, &[]);
    s.assert_out_empty();
}

#[test]
fn corrupted_v1_object_is_refused_and_leaves_no_output() {
    let mut object = seal_v1(&key(1), &text(10_000));
    let mid = object.len() / 2;
    object[mid] ^= 0x01;
    let (o, s) = decrypt_damaged(&object);
    assert_fails(&o, 1, &["corrupted"]);
    s.assert_out_empty();
}

#[test]
fn truncated_object_is_refused_and_leaves_no_output() {
    let object = seal_raw(&key(1), 0, &text(3 * C as usize + 123));
    let (o, s) = decrypt_damaged(&object[..object.len() / 2]);
    assert_fails(&o, 1, &["error"]);
    s.assert_out_empty();
}

#[test]
fn object_truncated_at_a_chunk_boundary_is_refused() {
    let object = seal_raw(&key(1), 0, &text(3 * C as usize + 123));
    // Three full chunks then the final one: cut right after the second full chunk.
    let cut = RAW_HEADER_LEN + 2 * (C as usize + TAG);
    assert_eq!(object.len(), RAW_HEADER_LEN + 3 * (C as usize + TAG) + 123 + TAG);
    let (o, s) = decrypt_damaged(&object[..cut]);
    assert_fails(&o, 1, &["truncated"]);
    s.assert_out_empty();
}

#[test]
fn object_cut_to_its_header_is_refused() {
    let object = seal_raw(&key(1), 0, &text(100));
    let (o, s) = decrypt_damaged(&object[..RAW_HEADER_LEN]);
    assert_fails(&o, 1, &["truncated"]);
    s.assert_out_empty();
}

#[test]
fn bytes_after_the_final_chunk_are_refused() {
    let mut object = seal_raw(&key(1), 0, &text(3 * C as usize + 123));
    object.extend_from_slice(b"extra");
    let (o, s) = decrypt_damaged(&object);
    assert_fails(&o, 1, &[]);
    s.assert_out_empty();
}

#[test]
fn v1_object_without_end_marker_is_refused() {
    let object = seal_v1(&key(1), &text(10_000));
    // The end marker is the last four bytes, a zero length.
    assert_eq!(&object[object.len() - 4..], &[0, 0, 0, 0]);
    let (o, s) = decrypt_damaged(&object[..object.len() - 4]);
    assert_fails(&o, 1, &["truncated"]);
    s.assert_out_empty();
}

#[test]
fn truncated_object_on_stdout_exits_1() {
    let s = Scratch::new();
    let object = seal_raw(&key(1), 0, &text(3 * C as usize + 123));
    let keyf = s.hex_key_file(&key(1));
    let cut = RAW_HEADER_LEN + 2 * (C as usize + TAG);
    let o = decrypt_stdin(&["--in", "-", "--out", "-", "--key-file", &keyf], object[..cut].to_vec());
    assert_fails(&o, 1, &["truncated"]);
}

// ---------------------------------------------------------------------------
// Existing output
// ---------------------------------------------------------------------------

#[test]
fn existing_output_is_refused_without_force() {
    let c = raw_case();
    let key = c.s.hex_key_file(&c.key);
    let out = c.s.out("dump");
    fs::write(&out, b"precious").unwrap();
    let o = decrypt(&["--in", &c.input, "--out", &out, "--key-file", &key]);
    assert_fails(&o, 1, &["--force"]);
    assert_eq!(fs::read(&out).unwrap(), b"precious");
    assert_eq!(c.s.out_entries(), vec!["dump"]);
}

#[test]
fn existing_output_is_replaced_with_force() {
    let c = raw_case();
    let key = c.s.hex_key_file(&c.key);
    let out = c.s.out("dump");
    fs::write(&out, b"old contents").unwrap();
    let o = decrypt(&["--in", &c.input, "--out", &out, "--key-file", &key, "--force"]);
    assert_ok(&o);
    assert_eq!(fs::read(&out).unwrap(), c.plain);
    assert_eq!(c.s.out_entries(), vec!["dump"]);
}

#[test]
fn existing_output_is_kept_when_a_forced_decrypt_fails() {
    let mut c = raw_case();
    let mid = c.object.len() / 2;
    c.object[mid] ^= 1;
    let input = c.s.file("object.bkpy", &c.object);
    let key = c.s.hex_key_file(&c.key);
    let out = c.s.out("dump");
    fs::write(&out, b"precious").unwrap();
    let o = decrypt(&["--in", &input, "--out", &out, "--key-file", &key, "--force"]);
    assert_fails(&o, 1, &[]);
    assert_eq!(fs::read(&out).unwrap(), b"precious");
    assert_eq!(c.s.out_entries(), vec!["dump"]);
}

// ---------------------------------------------------------------------------
// Usage errors: exit 2
// ---------------------------------------------------------------------------

#[test]
fn usage_error_without_key_option_exits_2() {
    let c = raw_case();
    let out = c.s.out("dump");
    assert_fails(&decrypt(&["--in", &c.input, "--out", &out]), 2, &[]);
    c.s.assert_out_empty();
}

#[test]
fn usage_error_with_two_key_options_exits_2() {
    let c = raw_case();
    let key = c.s.hex_key_file(&c.key);
    let idf = c.s.identity_file(&Identity::generate().unwrap());
    let out = c.s.out("dump");
    let o = decrypt(&["--in", &c.input, "--out", &out, "--key-file", &key, "--identity", &idf]);
    assert_fails(&o, 2, &[]);
    let token = jwt(&valid_claims(&c.key));
    let o = decrypt(&["--in", &c.input, "--out", &out, "--key-file", &key, "--token", &token]);
    assert_fails(&o, 2, &[]);
    c.s.assert_out_empty();
}

#[test]
fn usage_error_sha256_with_no_verify_sha256_exits_2() {
    let c = raw_case();
    let key = c.s.hex_key_file(&c.key);
    let out = c.s.out("dump");
    let sha = sha256_hex(&c.object);
    let o = decrypt(&[
        "--in",
        &c.input,
        "--out",
        &out,
        "--key-file",
        &key,
        "--sha256",
        &sha,
        "--no-verify-sha256",
    ]);
    assert_fails(&o, 2, &[]);
    c.s.assert_out_empty();
}

#[test]
fn usage_error_unknown_flag_exits_2() {
    let c = raw_case();
    let key = c.s.hex_key_file(&c.key);
    let out = c.s.out("dump");
    let o = decrypt(&["--in", &c.input, "--out", &out, "--key-file", &key, "--frobnicate"]);
    assert_fails(&o, 2, &["--frobnicate"]);
    c.s.assert_out_empty();
}

#[test]
fn usage_error_missing_in_exits_2() {
    let c = raw_case();
    let key = c.s.hex_key_file(&c.key);
    let out = c.s.out("dump");
    assert_fails(&decrypt(&["--out", &out, "--key-file", &key]), 2, &[]);
}

#[test]
fn help_says_the_token_signature_is_not_checked() {
    let o = decrypt(&["--help"]);
    assert_ok(&o);
    let help = String::from_utf8_lossy(&o.stdout).to_lowercase();
    assert!(help.contains("signature"), "{help}");
}

// ---------------------------------------------------------------------------
// Decompression by magic
// ---------------------------------------------------------------------------

/// Encrypts `plain` (compression code `code`) and decrypts it with `extra` flags to stdout.
fn roundtrip(code: u8, plain: &[u8], extra: &[&str]) -> Vec<u8> {
    let s = Scratch::new();
    let k = key(5);
    let input = s.file("object.bkpy", seal_raw(&k, code, plain));
    let keyf = s.hex_key_file(&k);
    let mut args = vec!["--in", input.as_str(), "--out", "-", "--key-file", keyf.as_str()];
    args.extend_from_slice(extra);
    let o = decrypt(&args);
    assert_ok(&o);
    o.stdout
}

#[test]
fn zstd_plaintext_is_decompressed() {
    let dump = text(200_000);
    let compressed = zstd_bytes(&dump);
    assert_eq!(&compressed[..4], &[0x28, 0xB5, 0x2F, 0xFD]);
    assert!(roundtrip(1, &compressed, &[]) == dump);
}

#[test]
fn gzip_plaintext_is_decompressed() {
    let dump = text(200_000);
    let compressed = gzip_bytes(&dump);
    assert_eq!(&compressed[..2], &[0x1F, 0x8B]);
    assert!(roundtrip(2, &compressed, &[]) == dump);
}

#[test]
fn skip_decompress_leaves_zstd_compressed() {
    let compressed = zstd_bytes(&text(200_000));
    assert!(roundtrip(1, &compressed, &["--skip-decompress"]) == compressed);
}

#[test]
fn skip_decompress_leaves_gzip_compressed() {
    let compressed = gzip_bytes(&text(200_000));
    assert!(roundtrip(2, &compressed, &["--skip-decompress"]) == compressed);
}

#[test]
fn uncompressed_plaintext_passes_through_unchanged() {
    let dump = text(3 * C as usize + 7);
    assert!(roundtrip(0, &dump, &[]) == dump);
}

#[test]
fn plaintext_with_partial_magic_passes_through_unchanged() {
    // Starts like gzip / zstd but is neither: readers detect by the full magic only.
    for plain in [
        vec![0x1F],
        vec![0x1F, 0x00, 0x01, 0x02],
        vec![0x28, 0xB5, 0x2F],
        vec![0x28, 0xB5, 0x2F, 0x00, 0x10],
        Vec::new(),
    ] {
        assert_eq!(roundtrip(0, &plain, &[]), plain);
    }
}

#[test]
fn compression_code_does_not_decide_decompression() {
    // The header's compression code is informational; the magic decides.
    let dump = text(50_000);
    let compressed = zstd_bytes(&dump);
    assert!(roundtrip(0, &compressed, &[]) == dump);
    assert!(roundtrip(2, &dump, &[]) == dump);
}

#[test]
fn zstd_decompression_works_through_a_token_and_a_file() {
    let s = Scratch::new();
    let k = key(6);
    let dump = text(100_000);
    let object = seal_raw(&k, 1, &zstd_bytes(&dump));
    let input = s.file("object.bkpy", &object);
    let mut claims = valid_claims(&k);
    claims["sha256"] = json!(sha256_hex(&object));
    let token = jwt(&claims);
    let out = s.out("dump.sql");
    assert_ok(&decrypt(&["--in", &input, "--out", &out, "--token", &token]));
    assert!(fs::read(&out).unwrap() == dump);
}

// ---------------------------------------------------------------------------
// v1 warning
// ---------------------------------------------------------------------------

fn v1_case() -> (Scratch, String, String, Vec<u8>, Vec<u8>) {
    let s = Scratch::new();
    let plain = text(10_000);
    let object = seal_v1(&key(1), &plain);
    let input = s.file("object.bkpy", &object);
    let keyf = s.hex_key_file(&key(1));
    (s, input, keyf, object, plain)
}

#[test]
fn v1_without_sha256_warns_about_reordering() {
    let (_s, input, keyf, _, plain) = v1_case();
    let o = decrypt(&["--in", &input, "--out", "-", "--key-file", &keyf]);
    assert_ok(&o);
    assert_eq!(o.stdout, plain);
    let err = stderr(&o).to_lowercase();
    assert!(err.contains("warning"), "{err}");
    assert!(err.contains("v1"), "{err}");
    assert!(err.contains("reorder"), "{err}");
}

#[test]
fn v1_with_quiet_does_not_warn() {
    let (_s, input, keyf, _, plain) = v1_case();
    let o = decrypt(&["--in", &input, "--out", "-", "--key-file", &keyf, "--quiet"]);
    assert_ok(&o);
    assert_eq!(o.stdout, plain);
    assert_eq!(stderr(&o), "");
}

#[test]
fn v1_with_sha256_does_not_warn() {
    let (_s, input, keyf, object, plain) = v1_case();
    let sha = sha256_hex(&object);
    let o = decrypt(&["--in", &input, "--out", "-", "--key-file", &keyf, "--sha256", &sha]);
    assert_ok(&o);
    assert_eq!(o.stdout, plain);
    assert!(!stderr(&o).to_lowercase().contains("warning"), "{}", stderr(&o));
}

#[test]
fn v2_without_sha256_does_not_warn() {
    let c = raw_case();
    let key = c.s.hex_key_file(&c.key);
    let o = decrypt(&["--in", &c.input, "--out", "-", "--key-file", &key]);
    assert_ok(&o);
    assert!(!stderr(&o).to_lowercase().contains("warning"), "{}", stderr(&o));
}

// ---------------------------------------------------------------------------
// backupy-agent keygen
// ---------------------------------------------------------------------------

fn keygen(path: &Path) -> Output {
    run(AGENT, &["keygen", "--out", path.to_str().unwrap()])
}

/// Checks the printed recipient by the spec's rule alone: `bkpy1` + lower-case
/// unpadded base32 of 32 bytes, 57 characters.
fn check_recipient_text(r: &str) {
    assert_eq!(r.len(), 57, "{r:?}");
    let body = r.strip_prefix("bkpy1").expect("starts with bkpy1");
    assert!(body.bytes().all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b)), "{r:?}");
    let bytes = data_encoding::BASE32_NOPAD.decode(body.to_ascii_uppercase().as_bytes()).expect("base32");
    assert_eq!(bytes.len(), 32);
}

#[test]
fn keygen_writes_a_0600_identity_and_prints_one_recipient_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("backupy.key");
    let o = keygen(&path);
    assert_ok(&o);
    let stdout = String::from_utf8(o.stdout.clone()).unwrap();
    assert_eq!(stdout.lines().count(), 1, "{stdout:?}");
    assert!(stdout.ends_with('\n'));
    let line = stdout.trim_end_matches('\n');
    check_recipient_text(line);
    let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "mode {mode:o}");
    // Exactly one key line in the file, in the spec's form.
    let text = fs::read_to_string(&path).unwrap();
    let key_lines: Vec<&str> =
        text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    assert_eq!(key_lines.len(), 1, "{text}");
    let b64 = key_lines[0].strip_prefix("BKPY-SECRET-KEY-1:").expect("key line prefix");
    assert_eq!(B64.decode(b64).unwrap().len(), 32);
    // The file's identity has the printed public key.
    let id = Identity::from_file(&path).unwrap();
    assert_eq!(id.recipient().unwrap().to_string(), line);
}

#[test]
fn keygen_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("backupy.key");
    fs::write(&path, "existing\n").unwrap();
    let o = keygen(&path);
    assert_fails(&o, 1, &["exists"]);
    assert!(o.stdout.is_empty());
    assert_eq!(fs::read_to_string(&path).unwrap(), "existing\n");

    // Also after a successful keygen: the second run must not replace the key.
    let path2 = dir.path().join("second.key");
    assert_ok(&keygen(&path2));
    let before = fs::read(&path2).unwrap();
    assert_fails(&keygen(&path2), 1, &[]);
    assert_eq!(fs::read(&path2).unwrap(), before);
}

#[test]
fn keygen_identity_decrypts_an_object_sealed_to_the_printed_recipient() {
    let s = Scratch::new();
    let idpath = s.dir.path().join("backupy.key");
    let o = keygen(&idpath);
    assert_ok(&o);
    let printed = String::from_utf8(o.stdout).unwrap();
    let recipient = Recipient::parse(printed.trim()).unwrap();
    let dump = text(20_000);
    let object = seal(Encryption::V2Recipient { recipient, chunk_size: C }, 1, &zstd_bytes(&dump));
    let input = s.file("object.bkpy", &object);
    let out = s.out("dump");
    assert_ok(&decrypt(&["--in", &input, "--out", &out, "--identity", idpath.to_str().unwrap()]));
    assert!(fs::read(&out).unwrap() == dump);
}
