//! S3-compatible storage: requests signed with `rusty-s3` (presigned SigV4 URLs) and
//! sent with `ureq`; no SDK, no async runtime.
//!
//! Objects stream in as a multipart upload of unknown length: the pipeline's store thread
//! fills one part at a time and hands full parts over a rendezvous channel to
//! `upload_concurrency` uploader threads (`s3-part-N`), so memory is
//! (upload_concurrency + 1) × part size whatever the object size. Part sizes grow with
//! the part number (see [`PartSizer`]) so `max_parts` parts always suffice. Every part
//! carries Content-MD5 and is retried with exponential backoff on connection errors,
//! timeouts, 5xx and 429. A writer that is dropped uncommitted aborts its upload
//! (retried), and the upload id is recorded in the state directory until the upload is
//! completed or aborted, so a restarted agent can abort what a crash left behind.
//! Errors name the operation, key, part, status and S3 error code — never a signature,
//! a presigned query string or a secret.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use crossbeam_channel::{Receiver, Sender};
use md5::{Digest, Md5};
use rusty_s3::actions::{CreateMultipartUpload, ListObjectsV2};
use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};
use serde::{Deserialize, Serialize};

use super::{ObjectWriter, StoredObject};
use crate::cancel::Cancel;
use crate::secrets::Secret;

pub const MIB: u64 = 1 << 20;
pub const MIN_PART_SIZE: u64 = 5 * MIB;
pub const MAX_PART_SIZE: u64 = 5 << 30;
pub const DEFAULT_PART_SIZE: u64 = 16 * MIB;
pub const MAX_OBJECT_SIZE: u64 = 5 << 40;
pub const DEFAULT_MAX_PARTS: u32 = 10_000;
pub const DEFAULT_CONCURRENCY: usize = 4;
/// How long a presigned request stays valid; requests are signed just before sending.
const SIGN_TTL: Duration = Duration::from_secs(3600);

/// One S3 target: where objects go and how to sign for it. Shared by the standalone
/// `[storage.s3]` section and the control plane's `S3MultipartTarget`.
#[derive(Clone, Debug)]
pub struct S3Target {
    pub endpoint: url::Url,
    pub region: String,
    pub bucket: String,
    /// Prepended to every key ("prod/").
    pub prefix: String,
    pub access_key_id: Secret,
    pub secret_access_key: Secret,
    pub session_token: Option<Secret>,
    pub path_style: bool,
    /// PEM file with extra CA certificates to trust besides the system bundle.
    pub ca_file: Option<PathBuf>,
    pub max_parts: u32,
    pub upload_concurrency: usize,
    /// The first part size; later parts grow (≥ 5 MiB).
    pub part_size: u64,
    pub retry: RetryPolicy,
    pub timeouts: Timeouts,
    /// `[storage.s3] object_lock` (issue 20): every object and manifest is written
    /// under this Object Lock retention.
    pub object_lock: Option<ObjectLock>,
    /// `[storage.s3.prune]` (issue 20): when given, the only credentials that sign a
    /// DeleteObject, so that the backup credentials can be denied deletes.
    pub prune_credentials: Option<PruneCredentials>,
}

/// The credential pair used for deletes only.
#[derive(Clone, Debug)]
pub struct PruneCredentials {
    pub access_key_id: Secret,
    pub secret_access_key: Secret,
    pub session_token: Option<Secret>,
}

fn sign_with(key: &Secret, secret: &Secret, token: Option<&Secret>) -> Credentials {
    match token {
        Some(t) => Credentials::new_with_token(key.expose(), secret.expose(), t.expose()),
        None => Credentials::new(key.expose(), secret.expose()),
    }
}

/// S3 Object Lock retention for new objects: `mode` until `days` after the write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjectLock {
    /// `GOVERNANCE` (a user with s3:BypassGovernanceRetention may still delete) or
    /// `COMPLIANCE` (nobody can, the root account included, until the date).
    pub compliance: bool,
    pub days: u32,
}

impl ObjectLock {
    pub fn mode(&self) -> &'static str {
        if self.compliance { "COMPLIANCE" } else { "GOVERNANCE" }
    }

    /// The `x-amz-object-lock-*` headers for an object written now. They are signed
    /// with the request; the integrity header Object Lock requires (Content-MD5) is on
    /// every PutObject and UploadPart already.
    fn headers(&self, now: chrono::DateTime<chrono::Utc>) -> [(&'static str, String); 2] {
        let until = now + chrono::Duration::days(self.days as i64);
        [
            ("x-amz-object-lock-mode", self.mode().to_string()),
            ("x-amz-object-lock-retain-until-date", crate::storage::rfc3339(until)),
        ]
    }
}

impl S3Target {
    pub fn new(
        endpoint: url::Url,
        region: &str,
        bucket: &str,
        access_key_id: Secret,
        secret_access_key: Secret,
    ) -> Self {
        Self {
            endpoint,
            region: region.to_string(),
            bucket: bucket.to_string(),
            prefix: String::new(),
            access_key_id,
            secret_access_key,
            session_token: None,
            path_style: true,
            ca_file: None,
            max_parts: DEFAULT_MAX_PARTS,
            upload_concurrency: DEFAULT_CONCURRENCY,
            part_size: DEFAULT_PART_SIZE,
            retry: RetryPolicy::default(),
            timeouts: Timeouts::default(),
            object_lock: None,
            prune_credentials: None,
        }
    }
}

impl S3Target {
    /// The target of the control plane's `S3MultipartTarget` extension. Everything in
    /// it is untrusted: a plain-http endpoint needs `allow_insecure`
    /// (`BACKUPY_DEV_ALLOW_INSECURE=true`).
    pub fn from_wire(m: &crate::wire::pb::S3MultipartTarget, allow_insecure: bool) -> Result<Self, S3Error> {
        let invalid = |message: String| S3Error::Invalid { op: "setup".into(), key: m.key.clone(), message };
        let endpoint = crate::env::check_handed_url(&m.endpoint, allow_insecure)
            .map_err(|e| invalid(format!("S3 endpoint {}: {e}", crate::secrets::redact_url(&m.endpoint))))?;
        if m.bucket.len() < 3
            || m.key.is_empty()
            || m.access_key_id.is_empty()
            || m.secret_access_key.is_empty()
        {
            return Err(invalid("bucket, key and credentials are required".into()));
        }
        let region = if m.region.is_empty() { "us-east-1" } else { &m.region };
        let mut t = Self::new(
            endpoint,
            region,
            &m.bucket,
            Secret::new(m.access_key_id.clone()),
            Secret::new(m.secret_access_key.clone()),
        );
        t.session_token = (!m.session_token.is_empty()).then(|| Secret::new(m.session_token.clone()));
        t.path_style = m.path_style;
        Ok(t)
    }
}

#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { attempts: 6, base_delay: Duration::from_millis(500), max_delay: Duration::from_secs(20) }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub connect: Duration,
    /// Silence on an established connection (no bytes read or written) that fails a request.
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self { connect: Duration::from_secs(10), idle: Duration::from_secs(60) }
    }
}

/// An S3 failure, phrased for the operator; never contains a URL query or secret.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("S3 {op} {key}: HTTP {status}{}{}", code_suffix(.code), msg_suffix(.message))]
    Status { op: String, key: String, status: u16, code: String, message: String },
    #[error("S3 {op} {key}: {message}")]
    Transport { op: String, key: String, message: String },
    #[error("S3 {op} {key}: {message}")]
    Invalid { op: String, key: String, message: String },
}

impl S3Error {
    /// Whether trying again may succeed.
    fn retryable(&self) -> bool {
        match self {
            S3Error::Status { status, .. } => *status >= 500 || *status == 429,
            S3Error::Transport { .. } => true,
            S3Error::Invalid { .. } => false,
        }
    }
}

fn code_suffix(code: &str) -> String {
    if code.is_empty() { String::new() } else { format!(" {code}") }
}

fn msg_suffix(msg: &str) -> String {
    if msg.is_empty() { String::new() } else { format!(": {msg}") }
}

impl From<S3Error> for io::Error {
    fn from(e: S3Error) -> Self {
        io::Error::other(e)
    }
}

/// The part-size rule: part `n` (1-based) is `base × 2^((n-1) / step)`, capped at 5 GiB,
/// with the largest `step` whose `max_parts` parts still hold the largest object the
/// part count allows (5 TiB, or `max_parts × 5 GiB` when that is less). Small objects
/// therefore use small parts, and no stream ever runs out of parts.
#[derive(Clone, Copy, Debug)]
pub struct PartSizer {
    pub base: u64,
    pub max_parts: u32,
    pub step: u32,
}

impl PartSizer {
    pub fn new(base: u64, max_parts: u32) -> Self {
        let base = base.clamp(MIN_PART_SIZE, MAX_PART_SIZE);
        let max_parts = max_parts.clamp(1, 10_000);
        let target = Self::reachable(max_parts);
        // capacity(step) shrinks as step grows: find the largest step that still fits.
        let (mut lo, mut hi) = (1u32, max_parts);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if (Self { base, max_parts, step: mid }).capacity() >= target {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        Self { base, max_parts, step: lo }
    }

    /// The largest object `max_parts` parts can hold at all (S3 caps it at 5 TiB).
    pub fn reachable(max_parts: u32) -> u64 {
        // Growth by doubling wastes at most one tier of headroom; ask for 90 % of the
        // theoretical maximum when the part count, not S3, is the limit.
        MAX_OBJECT_SIZE.min(max_parts as u64 * MAX_PART_SIZE / 10 * 9)
    }

    pub fn size_of(&self, part: u32) -> u64 {
        let tier = (part.saturating_sub(1) / self.step).min(40);
        self.base.saturating_mul(1u64 << tier).min(MAX_PART_SIZE)
    }

    /// Total bytes `max_parts` parts can hold.
    pub fn capacity(&self) -> u64 {
        let mut total = 0u64;
        let mut part = 1u32;
        while part <= self.max_parts {
            let tier_end = ((part - 1) / self.step + 1) * self.step;
            let count = (tier_end.min(self.max_parts) - part + 1) as u64;
            total = total.saturating_add(count.saturating_mul(self.size_of(part)));
            part = tier_end + 1;
        }
        total
    }
}

/// A record of an upload in progress, kept in the state directory.
#[derive(Serialize, Deserialize)]
struct UploadRecord {
    endpoint: String,
    bucket: String,
    key: String,
    upload_id: String,
}

struct Inner {
    target: S3Target,
    bucket: Bucket,
    credentials: Credentials,
    /// `prune_credentials` when given, else `credentials`: they sign DeleteObject.
    delete_credentials: Credentials,
    agent: ureq::Agent,
    /// Where upload records go; `None` keeps no records (tests, one-off commands).
    uploads_dir: Option<PathBuf>,
}

#[derive(Clone)]
pub struct S3Storage {
    inner: Arc<Inner>,
}

impl S3Storage {
    pub fn new(target: S3Target, state_dir: Option<&Path>) -> Result<Self, S3Error> {
        let invalid =
            |m: String| S3Error::Invalid { op: "setup".into(), key: target.bucket.clone(), message: m };
        let style = if target.path_style { UrlStyle::Path } else { UrlStyle::VirtualHost };
        let bucket =
            Bucket::new(target.endpoint.clone(), style, target.bucket.clone(), target.region.clone())
                .map_err(|e| invalid(format!("invalid endpoint or bucket: {e}")))?;
        let credentials =
            sign_with(&target.access_key_id, &target.secret_access_key, target.session_token.as_ref());
        let delete_credentials = match &target.prune_credentials {
            Some(p) => sign_with(&p.access_key_id, &p.secret_access_key, p.session_token.as_ref()),
            None => credentials.clone(),
        };
        let agent = build_agent(&target).map_err(invalid)?;
        let uploads_dir = state_dir.map(|d| d.join("uploads"));
        Ok(Self {
            inner: Arc::new(Inner { target, bucket, credentials, delete_credentials, agent, uploads_dir }),
        })
    }

    pub fn target(&self) -> &S3Target {
        &self.inner.target
    }

    /// The full object key: the target's prefix plus `key`.
    pub fn full_key(&self, key: &str) -> String {
        format!("{}{}", self.inner.target.prefix, key)
    }

    /// Starts a streaming upload of `key`; the object appears only on commit.
    pub fn create(&self, key: &str) -> S3ObjectWriter {
        S3ObjectWriter::new(self.inner.clone(), self.full_key(key), Cancel::default())
    }

    /// Like [`create`](Self::create), but a writer blocked on busy uploader threads
    /// gives up as soon as `cancel` is set, and its abort does not wait for them.
    pub fn create_cancellable(&self, key: &str, cancel: Cancel) -> S3ObjectWriter {
        S3ObjectWriter::new(self.inner.clone(), self.full_key(key), cancel)
    }

    /// Stores a small object (a manifest) with one PUT.
    pub fn put(&self, key: &str, bytes: &[u8]) -> Result<(), S3Error> {
        self.inner.put_object(&self.full_key(key), bytes)
    }

    /// Refuses a bucket without Object Lock enabled (GetObjectLockConfiguration): objects
    /// written with lock headers to such a bucket are refused by S3, and a backup the
    /// operator believes immutable must not silently be deletable.
    pub fn check_object_lock(&self) -> Result<(), S3Error> {
        let inner = &self.inner;
        let bucket = inner.target.bucket.clone();
        let refuse = |why: String| S3Error::Invalid {
            op: "GetObjectLockConfiguration".into(),
            key: bucket.clone(),
            message: format!(
                "[storage.s3] object_lock is set, but {why}; create the bucket with Object Lock enabled \
                 (see docs/user-guide.md, \"Ransomware-resistant setup\"), or remove object_lock"
            ),
        };
        // rusty-s3 has no action for it: a signed GET of the bucket itself with the
        // `object-lock` subresource (GetObject of the empty key is exactly that URL).
        let mut action = inner.bucket.get_object(Some(&inner.credentials), "");
        action.query_mut().insert("object-lock", "");
        let url = action.sign(SIGN_TTL);
        let mut resp = match inner
            .with_retry("GetObjectLockConfiguration", "", || inner.agent.get(url.as_str()).call())
        {
            Ok(resp) => resp,
            Err(S3Error::Status { status, code, message, .. }) => {
                return Err(refuse(format!(
                    "bucket {bucket:?} has no Object Lock configuration (HTTP {status} {code}: {message})"
                )));
            }
            Err(e) => return Err(e),
        };
        let body = read_body(&mut resp, "GetObjectLockConfiguration", "")?;
        if xml_field(&body, "ObjectLockEnabled") != "Enabled" {
            return Err(refuse(format!("bucket {bucket:?} does not have Object Lock enabled")));
        }
        Ok(())
    }

    /// The object's Object Lock retention date, if it has one.
    pub fn retain_until(&self, key: &str) -> Result<Option<chrono::DateTime<chrono::Utc>>, S3Error> {
        self.inner.retain_until(&self.full_key(key))
    }

    /// The object's size, or `None` when it does not exist.
    pub fn head(&self, key: &str) -> Result<Option<u64>, S3Error> {
        self.inner.head(&self.full_key(key))
    }

    /// Streams an object's bytes.
    pub fn get(&self, key: &str) -> Result<Box<dyn Read + Send>, S3Error> {
        let full = self.full_key(key);
        let url = self.inner.bucket.get_object(Some(&self.inner.credentials), &full).sign(SIGN_TTL);
        let resp = self.inner.with_retry("GetObject", &full, || self.inner.agent.get(url.as_str()).call())?;
        Ok(Box::new(resp.into_body().into_reader()))
    }

    pub fn delete(&self, key: &str) -> Result<(), S3Error> {
        let full = self.full_key(key);
        let url = self.inner.bucket.delete_object(Some(&self.inner.delete_credentials), &full).sign(SIGN_TTL);
        self.inner.with_retry("DeleteObject", &full, || self.inner.agent.delete(url.as_str()).call())?;
        Ok(())
    }

    /// Every object under `prefix` (relative to the target's prefix): (key, size).
    pub fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>, S3Error> {
        let full_prefix = self.full_key(prefix);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut action: ListObjectsV2 = self.inner.bucket.list_objects_v2(Some(&self.inner.credentials));
            action.with_prefix(full_prefix.as_str());
            if let Some(t) = &token {
                action.with_continuation_token(t.as_str());
            }
            let url = action.sign(SIGN_TTL);
            let mut resp = self
                .inner
                .with_retry("ListObjectsV2", &full_prefix, || self.inner.agent.get(url.as_str()).call())?;
            let body = read_body(&mut resp, "ListObjectsV2", &full_prefix)?;
            let parsed = ListObjectsV2::parse_response(&body).map_err(|e| S3Error::Invalid {
                op: "ListObjectsV2".into(),
                key: full_prefix.clone(),
                message: format!("unreadable response: {e}"),
            })?;
            let strip = self.inner.target.prefix.len();
            for c in parsed.contents {
                let key = c.key.get(strip..).unwrap_or(&c.key).to_string();
                out.push((key, c.size.unwrap_or(0)));
            }
            match parsed.next_continuation_token {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => break,
            }
        }
        Ok(out)
    }

    /// Aborts every upload recorded in the state directory (left by a crash). Returns
    /// how many were aborted; failures are logged and the record kept for next time.
    pub fn abort_recorded_uploads(&self) -> usize {
        let Some(dir) = &self.inner.uploads_dir else { return 0 };
        let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
        let mut aborted = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(text) = std::fs::read_to_string(&path) else { continue };
            let Ok(rec) = serde_json::from_str::<UploadRecord>(&text) else {
                log::warn!("ignoring unreadable upload record {}", path.display());
                continue;
            };
            if rec.bucket != self.inner.target.bucket || rec.endpoint != self.inner.target.endpoint.as_str() {
                continue;
            }
            match self.inner.abort(&rec.key, &rec.upload_id) {
                Ok(()) => {
                    let _ = std::fs::remove_file(&path);
                    log::info!("aborted the unfinished upload of {} left by an earlier run", rec.key);
                    aborted += 1;
                }
                Err(e) => log::warn!("cannot abort the unfinished upload of {}: {e}", rec.key),
            }
        }
        aborted
    }
}

fn build_agent(target: &S3Target) -> Result<ureq::Agent, String> {
    let mut cfg = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(target.timeouts.connect))
        .timeout_per_read(Some(target.timeouts.idle))
        .timeout_per_write(Some(target.timeouts.idle))
        .timeout_recv_response(Some(target.timeouts.idle))
        .max_redirects(0)
        .user_agent(concat!("backupy-agent/", env!("CARGO_PKG_VERSION")));
    if let Some(ca) = &target.ca_file {
        cfg = cfg.tls_config(tls_with_extra_ca(ca)?);
    }
    Ok(cfg.build().new_agent())
}

/// TLS settings trusting the system bundle plus the PEM certificates of `ca` (extra
/// roots come on top of the system's, not instead of them). Shared by every HTTP client
/// of the agent that takes an extra CA (S3 targets, health probes).
pub fn tls_with_extra_ca(ca: &Path) -> Result<ureq::tls::TlsConfig, String> {
    let mut certs = Vec::new();
    for path in [Path::new("/etc/ssl/certs/ca-certificates.crt"), ca] {
        let pem = match std::fs::read(path) {
            Ok(pem) => pem,
            Err(_) if path != ca => continue,
            Err(e) => return Err(format!("cannot read CA file {}: {e}", ca.display())),
        };
        for item in ureq::tls::parse_pem(&pem) {
            if let Ok(ureq::tls::PemItem::Certificate(c)) = item {
                certs.push(c.to_owned());
            }
        }
    }
    Ok(ureq::tls::TlsConfig::builder().root_certs(ureq::tls::RootCerts::new_with_certs(&certs)).build())
}

type Response = ureq::http::Response<ureq::Body>;

fn read_body(resp: &mut Response, op: &str, key: &str) -> Result<String, S3Error> {
    resp.body_mut().with_config().limit(16 * MIB).read_to_string().map_err(|e| S3Error::Transport {
        op: op.into(),
        key: key.into(),
        message: crate::secrets::redact_urls(&format!("reading the response: {e}")),
    })
}

/// Pulls `<Code>` and `<Message>` out of an S3 XML error body.
fn xml_field(body: &str, tag: &str) -> String {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    body.find(&open)
        .and_then(|s| {
            body[s + open.len()..].find(&close).map(|e| body[s + open.len()..s + open.len() + e].trim())
        })
        .map(|s| s.chars().take(300).collect())
        .unwrap_or_default()
}

/// Sends a request until it succeeds, fails for good (4xx other than 429), or runs out
/// of attempts, waiting with exponential backoff in between.
fn send_with_retry(
    policy: RetryPolicy,
    op: &str,
    key: &str,
    mut send: impl FnMut() -> Result<Response, ureq::Error>,
) -> Result<Response, S3Error> {
    let backoff = crate::retry::Backoff::new(policy.base_delay, policy.max_delay);
    let attempt = |_| match send() {
        Ok(resp) if resp.status().is_success() => Ok(resp),
        Ok(mut resp) => {
            let status = resp.status().as_u16();
            let body = if op == "HeadObject" {
                String::new()
            } else {
                read_body(&mut resp, op, key).unwrap_or_default()
            };
            Err(S3Error::Status {
                op: op.into(),
                key: key.into(),
                status,
                code: xml_field(&body, "Code"),
                message: xml_field(&body, "Message"),
            })
        }
        Err(e) => Err(S3Error::Transport {
            op: op.into(),
            key: key.into(),
            message: crate::secrets::redact_urls(&e.to_string()),
        }),
    };
    crate::retry::run(policy.attempts, backoff, attempt, |error, next, delay| {
        if error.retryable() {
            log::warn!("{error}; retrying in {delay:?} (attempt {next}/{})", policy.attempts);
        }
        error.retryable()
    })
}

impl Inner {
    fn with_retry(
        &self,
        op: &str,
        key: &str,
        send: impl FnMut() -> Result<Response, ureq::Error>,
    ) -> Result<Response, S3Error> {
        send_with_retry(self.target.retry, op, key, send)
    }

    fn put_object(&self, key: &str, bytes: &[u8]) -> Result<(), S3Error> {
        let md5 = B64.encode(Md5::digest(bytes));
        let mut action = self.bucket.put_object(Some(&self.credentials), key);
        action.headers_mut().insert("content-md5", md5.clone());
        let lock = self.lock_headers();
        for (name, value) in &lock {
            action.headers_mut().insert(*name, value.clone());
        }
        let url = action.sign(SIGN_TTL);
        self.with_retry("PutObject", key, || {
            let mut req = self.agent.put(url.as_str()).header("Content-MD5", &md5);
            for (name, value) in &lock {
                req = req.header(*name, value);
            }
            req.send(bytes)
        })?;
        Ok(())
    }

    /// The Object Lock headers for a write now, none without `object_lock`.
    fn lock_headers(&self) -> Vec<(&'static str, String)> {
        self.target.object_lock.map(|l| l.headers(chrono::Utc::now()).to_vec()).unwrap_or_default()
    }

    /// The Object Lock retention date of an object (HeadObject's
    /// `x-amz-object-lock-retain-until-date`), `None` when it has none or is gone.
    fn retain_until(&self, key: &str) -> Result<Option<chrono::DateTime<chrono::Utc>>, S3Error> {
        let url = self.bucket.head_object(Some(&self.credentials), key).sign(SIGN_TTL);
        match self.with_retry("HeadObject", key, || self.agent.head(url.as_str()).call()) {
            Ok(resp) => Ok(resp
                .headers()
                .get("x-amz-object-lock-retain-until-date")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| chrono::DateTime::parse_from_rfc3339(v).ok())
                .map(|t| t.with_timezone(&chrono::Utc))),
            Err(S3Error::Status { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn head(&self, key: &str) -> Result<Option<u64>, S3Error> {
        let url = self.bucket.head_object(Some(&self.credentials), key).sign(SIGN_TTL);
        match self.with_retry("HeadObject", key, || self.agent.head(url.as_str()).call()) {
            Ok(resp) => {
                let len = resp
                    .headers()
                    .get("content-length")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                Ok(Some(len))
            }
            Err(S3Error::Status { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn create_upload(&self, key: &str) -> Result<String, S3Error> {
        let mut action = self.bucket.create_multipart_upload(Some(&self.credentials), key);
        let lock = self.lock_headers();
        for (name, value) in &lock {
            action.headers_mut().insert(*name, value.clone());
        }
        let url = action.sign(SIGN_TTL);
        let mut resp = self.with_retry("CreateMultipartUpload", key, || {
            let mut req = self.agent.post(url.as_str());
            for (name, value) in &lock {
                req = req.header(*name, value);
            }
            req.send_empty()
        })?;
        let body = read_body(&mut resp, "CreateMultipartUpload", key)?;
        let parsed = CreateMultipartUpload::parse_response(&body).map_err(|e| S3Error::Invalid {
            op: "CreateMultipartUpload".into(),
            key: key.into(),
            message: format!("unreadable response: {e}"),
        })?;
        Ok(parsed.upload_id().to_string())
    }

    fn upload_part(&self, key: &str, upload_id: &str, part: u32, data: &[u8]) -> Result<String, S3Error> {
        let md5 = B64.encode(Md5::digest(data));
        let mut action = self.bucket.upload_part(Some(&self.credentials), key, part as u16, upload_id);
        action.headers_mut().insert("content-md5", md5.clone());
        let url = action.sign(SIGN_TTL);
        let op = format!("UploadPart (part {part})");
        let resp = self
            .with_retry(&op, key, || self.agent.put(url.as_str()).header("Content-MD5", &md5).send(data))?;
        resp.headers().get("etag").and_then(|v| v.to_str().ok()).map(str::to_string).ok_or_else(|| {
            S3Error::Invalid { op, key: key.into(), message: "no ETag in the response".into() }
        })
    }

    fn complete(&self, key: &str, upload_id: &str, etags: &[String]) -> Result<(), S3Error> {
        let action = self.bucket.complete_multipart_upload(
            Some(&self.credentials),
            key,
            upload_id,
            etags.iter().map(String::as_str),
        );
        let url = action.sign(SIGN_TTL);
        let body = action.body();
        let mut resp = self.with_retry("CompleteMultipartUpload", key, || {
            self.agent.post(url.as_str()).send(body.as_bytes())
        })?;
        // S3 may answer 200 and still report an error in the body.
        let text = read_body(&mut resp, "CompleteMultipartUpload", key)?;
        if text.contains("<Error>") {
            return Err(S3Error::Status {
                op: "CompleteMultipartUpload".into(),
                key: key.into(),
                status: 200,
                code: xml_field(&text, "Code"),
                message: xml_field(&text, "Message"),
            });
        }
        Ok(())
    }

    fn abort(&self, key: &str, upload_id: &str) -> Result<(), S3Error> {
        let url = self.bucket.abort_multipart_upload(Some(&self.credentials), key, upload_id).sign(SIGN_TTL);
        match self.with_retry("AbortMultipartUpload", key, || self.agent.delete(url.as_str()).call()) {
            Ok(_) | Err(S3Error::Status { status: 404, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn record_path(&self, upload_id: &str) -> Option<PathBuf> {
        let name = hex::encode(sha2::Sha256::digest(upload_id.as_bytes()));
        self.uploads_dir.as_ref().map(|d| d.join(format!("{}.json", &name[..32])))
    }

    fn record(&self, key: &str, upload_id: &str) -> io::Result<()> {
        let (Some(dir), Some(path)) = (&self.uploads_dir, self.record_path(upload_id)) else { return Ok(()) };
        std::fs::create_dir_all(dir)?;
        let rec = UploadRecord {
            endpoint: self.target.endpoint.to_string(),
            bucket: self.target.bucket.clone(),
            key: key.to_string(),
            upload_id: upload_id.to_string(),
        };
        let mut f = std::fs::File::create(&path)?;
        f.write_all(&serde_json::to_vec(&rec).map_err(io::Error::other)?)?;
        f.sync_all()
    }

    fn forget(&self, upload_id: &str) {
        if let Some(path) = self.record_path(upload_id) {
            let _ = std::fs::remove_file(path);
        }
    }
}

struct PartJob {
    number: u32,
    data: Vec<u8>,
}

struct PartDone {
    number: u32,
    result: Result<String, S3Error>,
}

struct Upload {
    id: String,
    jobs: Option<Sender<PartJob>>,
    done: Receiver<PartDone>,
    workers: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    etags: Vec<Option<String>>,
}

/// A streaming upload; see the module comment. Dropping it uncommitted aborts it.
pub struct S3ObjectWriter {
    inner: Arc<Inner>,
    key: String,
    sizer: PartSizer,
    buf: Vec<u8>,
    next_part: u32,
    total: u64,
    upload: Option<Upload>,
    committed: bool,
    cancel: Cancel,
}

impl S3ObjectWriter {
    fn new(inner: Arc<Inner>, key: String, cancel: Cancel) -> Self {
        let sizer = PartSizer::new(inner.target.part_size, inner.target.max_parts);
        Self {
            inner,
            key,
            sizer,
            buf: Vec::new(),
            next_part: 1,
            total: 0,
            upload: None,
            committed: false,
            cancel,
        }
    }

    fn start_upload(&mut self) -> Result<(), S3Error> {
        let id = self.inner.create_upload(&self.key)?;
        if let Err(e) = self.inner.record(&self.key, &id) {
            log::warn!("cannot record upload id for {} in the state directory: {e}", self.key);
        }
        let (job_tx, job_rx) = crossbeam_channel::bounded::<PartJob>(0);
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = Vec::new();
        for n in 0..self.inner.target.upload_concurrency.max(1) {
            let (inner, key, id, rx, tx, stop) = (
                self.inner.clone(),
                self.key.clone(),
                id.clone(),
                job_rx.clone(),
                done_tx.clone(),
                stop.clone(),
            );
            let h = std::thread::Builder::new()
                .name(format!("s3-part-{n}"))
                .spawn(move || {
                    for job in rx {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let result = inner.upload_part(&key, &id, job.number, &job.data);
                        let failed = result.is_err();
                        let _ = tx.send(PartDone { number: job.number, result });
                        if failed {
                            break;
                        }
                    }
                })
                .map_err(|e| S3Error::Invalid {
                    op: "UploadPart".into(),
                    key: self.key.clone(),
                    message: format!("cannot start an upload thread: {e}"),
                })?;
            workers.push(h);
        }
        self.upload =
            Some(Upload { id, jobs: Some(job_tx), done: done_rx, workers, stop, etags: Vec::new() });
        Ok(())
    }

    /// Collects finished parts; the first failure fails the whole upload.
    fn collect(&mut self, block: bool) -> Result<(), S3Error> {
        let Some(up) = self.upload.as_mut() else { return Ok(()) };
        loop {
            let msg = if block { up.done.recv().ok() } else { up.done.try_recv().ok() };
            let Some(done) = msg else { return Ok(()) };
            record_etag(&mut up.etags, done.number, done.result?);
        }
    }

    fn send_part(&mut self) -> Result<(), S3Error> {
        if self.upload.is_none() {
            self.start_upload()?;
        }
        self.collect(false)?;
        if self.next_part > self.sizer.max_parts {
            return Err(S3Error::Invalid {
                op: "UploadPart".into(),
                key: self.key.clone(),
                message: format!("the object needs more than max_parts = {} parts", self.sizer.max_parts),
            });
        }
        let data = std::mem::take(&mut self.buf);
        let number = self.next_part;
        self.next_part += 1;
        let key = self.key.clone();
        let up = self.upload.as_mut().ok_or_else(|| no_upload("UploadPart", key))?;
        let Some(tx) = up.jobs.as_ref() else {
            return Err(S3Error::Invalid {
                op: "UploadPart".into(),
                key: self.key.clone(),
                message: "upload closed".into(),
            });
        };
        // Wait for a free uploader, but give up at once when the run is cancelled.
        let mut job = PartJob { number, data };
        let sent = loop {
            match tx.send_timeout(job, Duration::from_millis(100)) {
                Ok(()) => break Ok(()),
                Err(crossbeam_channel::SendTimeoutError::Timeout(j)) if !self.cancel.is_cancelled() => {
                    job = j
                }
                Err(crossbeam_channel::SendTimeoutError::Timeout(_)) => {
                    return Err(S3Error::Invalid {
                        op: "UploadPart".into(),
                        key: self.key.clone(),
                        message: "cancelled".into(),
                    });
                }
                Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => break Err(()),
            }
        };
        if sent.is_err() {
            // Every worker stopped: one of them failed, and `collect` has its error.
            self.collect(true)?;
            return Err(S3Error::Invalid {
                op: "UploadPart".into(),
                key: self.key.clone(),
                message: "the upload threads stopped".into(),
            });
        }
        Ok(())
    }

    fn finish_upload(&mut self) -> Result<(), S3Error> {
        if !self.buf.is_empty() {
            self.send_part()?;
        }
        let parts = self.next_part - 1;
        let key = self.key.clone();
        let up = self.upload.as_mut().ok_or_else(|| no_upload("UploadPart", key.clone()))?;
        drop(up.jobs.take());
        // Wait for every part's result, but not past a cancel: a stuck request must not
        // hold a cancelled run hostage.
        while (0..parts as usize).any(|i| up.etags.get(i).is_none_or(Option::is_none)) {
            if self.cancel.is_cancelled() {
                return Err(S3Error::Invalid {
                    op: "UploadPart".into(),
                    key: self.key.clone(),
                    message: "cancelled".into(),
                });
            }
            match up.done.recv_timeout(Duration::from_millis(100)) {
                Ok(done) => {
                    record_etag(&mut up.etags, done.number, done.result?);
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            }
        }
        for w in up.workers.drain(..) {
            let _ = w.join();
        }
        let up = self.upload.as_ref().ok_or_else(|| no_upload("CompleteMultipartUpload", key))?;
        let etags: Option<Vec<String>> =
            (0..parts as usize).map(|i| up.etags.get(i).cloned().flatten()).collect();
        let etags = etags.ok_or_else(|| S3Error::Invalid {
            op: "CompleteMultipartUpload".into(),
            key: self.key.clone(),
            message: "a part has no ETag".into(),
        })?;
        self.inner.complete(&self.key, &up.id, &etags)
    }

    fn abort_upload(&mut self) {
        let Some(mut up) = self.upload.take() else { return };
        up.stop.store(true, Ordering::SeqCst);
        drop(up.jobs.take());
        if self.cancel.is_cancelled() {
            // A cancelled run must stop now: uploader threads still inside a request are
            // left to finish on their own (the abort below makes their parts moot).
            up.workers.clear();
        }
        for w in up.workers.drain(..) {
            let _ = w.join();
        }
        match self.inner.abort(&self.key, &up.id) {
            Ok(()) => self.inner.forget(&up.id),
            Err(e) => log::warn!("{e}; the upload id stays recorded and is aborted at the next start"),
        }
    }
}

impl Write for S3ObjectWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let part_size = self.sizer.size_of(self.next_part) as usize;
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(part_size.min(data.len().max(64 << 10)));
        }
        let take = (part_size - self.buf.len()).min(data.len());
        self.buf.extend_from_slice(data.get(..take).unwrap_or(data));
        self.total += take as u64;
        if self.total > MAX_OBJECT_SIZE {
            return Err(S3Error::Invalid {
                op: "UploadPart".into(),
                key: self.key.clone(),
                message: "the object exceeds S3's 5 TiB limit".into(),
            }
            .into());
        }
        if self.buf.len() == part_size {
            self.send_part()?;
        }
        Ok(take)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ObjectWriter for S3ObjectWriter {
    fn commit(mut self: Box<Self>) -> io::Result<StoredObject> {
        let result = if self.upload.is_none() {
            // Smaller than one part (or empty): one PUT, no multipart upload to clean up.
            self.inner.put_object(&self.key, &self.buf)
        } else {
            self.finish_upload()
        };
        if let Err(e) = result {
            self.abort_upload();
            return Err(e.into());
        }
        self.committed = true;
        if let Some(up) = &self.upload {
            self.inner.forget(&up.id);
        }
        // Verify what S3 now holds before calling the object stored.
        match self.inner.head(&self.key)? {
            Some(size) if size == self.total => Ok(StoredObject { key: self.key.clone(), size }),
            other => Err(S3Error::Invalid {
                op: "HeadObject".into(),
                key: self.key.clone(),
                message: format!("stored size {other:?} differs from the {} bytes uploaded", self.total),
            }
            .into()),
        }
    }
}

impl Drop for S3ObjectWriter {
    fn drop(&mut self) {
        if !self.committed {
            self.abort_upload();
        }
    }
}

/// Stores part `number`'s (1-based) ETag, growing the list as parts finish out of order.
fn record_etag(etags: &mut Vec<Option<String>>, number: u32, etag: String) {
    let Some(idx) = (number as usize).checked_sub(1) else { return };
    if etags.len() <= idx {
        etags.resize(idx + 1, None);
    }
    if let Some(slot) = etags.get_mut(idx) {
        *slot = Some(etag);
    }
}

/// An internal-state error: a multipart step ran without an upload in progress.
fn no_upload(op: &str, key: String) -> S3Error {
    S3Error::Invalid { op: op.into(), key, message: "internal error: no multipart upload in progress".into() }
}

/// The control plane's presigned single PUT: S3 needs Content-Length, so the ciphertext
/// (never plaintext: this sink comes after the encrypt stage) is spooled to a 0600 file
/// in the state directory, PUT from there (retried from the file), and deleted.
pub struct PresignedPut {
    url: String,
    key: String,
    expires_at_ms: u64,
    spool: Option<tempfile::NamedTempFile>,
    size: u64,
    agent: ureq::Agent,
    retry: RetryPolicy,
}

/// S3's single-PUT limit.
pub const MAX_SINGLE_PUT: u64 = 5 << 30;

impl PresignedPut {
    /// Refuses an expired URL, and one that breaks the scheme rule of
    /// [`crate::env::check_handed_url`] (`allow_insecure`: `BACKUPY_DEV_ALLOW_INSECURE`),
    /// before anything is dumped.
    pub fn new(
        url: &str,
        key: &str,
        expires_at_ms: u64,
        spool_dir: &Path,
        allow_insecure: bool,
    ) -> Result<Self, S3Error> {
        let invalid =
            |m: String| S3Error::Invalid { op: "PutObject (presigned)".into(), key: key.into(), message: m };
        crate::env::check_handed_url(url, allow_insecure)
            .map_err(|e| invalid(format!("presigned URL {}: {e}", crate::secrets::redact_url(url))))?;
        if expires_at_ms != 0 && crate::clock::now_ms() >= expires_at_ms {
            return Err(invalid("the presigned URL has expired; ask the control plane for a new run".into()));
        }
        std::fs::create_dir_all(spool_dir)
            .map_err(|e| invalid(format!("cannot create spool directory {}: {e}", spool_dir.display())))?;
        let spool = tempfile::Builder::new()
            .prefix(".spool-")
            .tempfile_in(spool_dir)
            .map_err(|e| invalid(format!("cannot create a spool file in {}: {e}", spool_dir.display())))?;
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Timeouts::default().connect))
            .timeout_per_read(Some(Timeouts::default().idle))
            .timeout_per_write(Some(Timeouts::default().idle))
            .max_redirects(0)
            .build()
            .new_agent();
        Ok(Self {
            url: url.to_string(),
            key: key.to_string(),
            expires_at_ms,
            spool: Some(spool),
            size: 0,
            agent,
            retry: RetryPolicy::default(),
        })
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Trusts the certificates of `ca` too (BACKUPY_CA_FILE), on top of the system's.
    pub fn with_ca_file(mut self, ca: &Path) -> Result<Self, S3Error> {
        let tls = tls_with_extra_ca(ca).map_err(|m| S3Error::Invalid {
            op: "PutObject (presigned)".into(),
            key: self.key.clone(),
            message: m,
        })?;
        self.agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Timeouts::default().connect))
            .timeout_per_read(Some(Timeouts::default().idle))
            .timeout_per_write(Some(Timeouts::default().idle))
            .max_redirects(0)
            .tls_config(tls)
            .build()
            .new_agent();
        Ok(self)
    }
}

impl Write for PresignedPut {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.size + data.len() as u64 > MAX_SINGLE_PUT {
            return Err(S3Error::Invalid {
                op: "PutObject (presigned)".into(),
                key: self.key.clone(),
                message: "the object exceeds the 5 GiB limit of a single PUT; use multipart upload".into(),
            }
            .into());
        }
        let spool = self.spool.as_mut().ok_or_else(|| io::Error::other("spool file already closed"))?;
        spool.write_all(data)?;
        self.size += data.len() as u64;
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ObjectWriter for PresignedPut {
    fn commit(mut self: Box<Self>) -> io::Result<StoredObject> {
        let spool = self.spool.take().ok_or_else(|| io::Error::other("spool file already closed"))?;
        spool.as_file().sync_all()?;
        let op = "PutObject (presigned)";
        if self.expires_at_ms != 0 && crate::clock::now_ms() >= self.expires_at_ms {
            return Err(S3Error::Invalid {
                op: op.into(),
                key: self.key.clone(),
                message: "the presigned URL expired while the dump ran".into(),
            }
            .into());
        }
        let inner = PutFromFile { agent: &self.agent, url: &self.url, retry: self.retry };
        inner.put(spool.path(), op, &self.key)?;
        Ok(StoredObject { key: self.key.clone(), size: self.size })
        // `spool` is dropped here: the file is deleted whether the PUT worked or not.
    }
}

struct PutFromFile<'a> {
    agent: &'a ureq::Agent,
    url: &'a str,
    retry: RetryPolicy,
}

impl PutFromFile<'_> {
    /// PUTs the file, reopening it for every attempt, so a retry resends it whole.
    fn put(&self, path: &Path, op: &str, key: &str) -> Result<(), S3Error> {
        send_with_retry(self.retry, op, key, || {
            let file = std::fs::File::open(path).map_err(ureq::Error::Io)?;
            self.agent.put(self.url).send(file)
        })
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_sizes_reach_5_tib_with_10000_parts() {
        let s = PartSizer::new(DEFAULT_PART_SIZE, 10_000);
        assert!(s.capacity() >= MAX_OBJECT_SIZE, "{s:?} holds {}", s.capacity());
        assert_eq!(s.size_of(1), 16 * MIB);
        assert!(s.size_of(10_000) <= MAX_PART_SIZE);
        // Growth is as slow as the limit allows: the first thousand parts stay at 16 MiB.
        assert!(s.step >= 1000, "{s:?}");
    }

    #[test]
    fn part_sizes_with_1000_parts_reach_what_1000_parts_can_hold() {
        let s = PartSizer::new(DEFAULT_PART_SIZE, 1_000);
        // 1000 parts of at most 5 GiB hold 4.88 TiB: S3's 5 TiB is out of reach.
        assert!(s.capacity() >= PartSizer::reachable(1_000), "{s:?}");
        assert!(PartSizer::reachable(1_000) >= 4 << 40);
        for p in 1..=1000 {
            let size = s.size_of(p);
            assert!((MIN_PART_SIZE..=MAX_PART_SIZE).contains(&size));
            assert!(p == 1 || size >= s.size_of(p - 1), "sizes never shrink");
        }
    }

    #[test]
    fn tiny_max_parts_grows_part_size_every_part() {
        let s = PartSizer::new(MIN_PART_SIZE, 3);
        assert_eq!(s.step, 1);
        assert_eq!((s.size_of(1), s.size_of(2), s.size_of(3)), (5 * MIB, 10 * MIB, 20 * MIB));
    }

    #[test]
    fn wire_target_refuses_plain_http_unless_allowed() {
        let m = crate::wire::pb::S3MultipartTarget {
            endpoint: "http://127.0.0.1:9000".into(),
            region: String::new(),
            bucket: "backups".into(),
            key: "a/b.bkpy".into(),
            access_key_id: "AK".into(),
            secret_access_key: "SK".into(),
            session_token: "tok".into(),
            expires_at_ms: 0,
            path_style: true,
        };
        let err = S3Target::from_wire(&m, false).unwrap_err().to_string();
        assert!(err.contains("BACKUPY_DEV_ALLOW_INSECURE") && !err.contains("SK"), "{err}");
        let t = S3Target::from_wire(&m, true).unwrap();
        assert_eq!((t.region.as_str(), t.path_style), ("us-east-1", true));
        assert_eq!(t.session_token.as_ref().map(Secret::expose), Some("tok"));
        let mut bad = m.clone();
        bad.bucket = "b".into();
        assert!(S3Target::from_wire(&bad, true).is_err());
    }

    #[test]
    fn presigned_put_refuses_more_than_5_gib_before_writing_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut w =
            PresignedPut::new("https://s3.example.com/b/k?X-Amz-Signature=s", "k", 0, dir.path(), false)
                .unwrap();
        w.size = MAX_SINGLE_PUT - 2;
        w.write_all(b"ab").unwrap();
        let err = w.write_all(b"c").unwrap_err().to_string();
        assert!(err.contains("5 GiB") && !err.contains("X-Amz"), "{err}");
    }
}
