//! Self-update: replaces the agent's own binary with a signed release, and rolls back to
//! the previous one when the new process does not prove itself in time.
//!
//! `apply` (on the thread that received the SelfUpdate command, or the `self-update`
//! command line) downloads the binary into `<state_dir>/updates` with a size cap, checks
//! its SHA-256, then the ECDSA P-256 / SHA-256 signature over its bytes against the
//! public key compiled in (`BACKUPY_UPDATE_PUBKEY` at build time; a build without one
//! has no self-update, see [`UNAVAILABLE`]), runs `version --json` of the candidate to
//! learn its version (refusing a downgrade unless forced, and a forced one unless
//! allowed: `BACKUPY_ALLOW_DOWNGRADE`), then swaps it in with a rename, keeping
//! the previous binary as `<exe>.previous`, and leaves a pending-update marker in the
//! state directory.
//!
//! The rollback protocol: `reexec` starts a guard process (the previous binary, hidden
//! `self-update-guard` subcommand) and then execs the new binary in place (same pid).
//! The new process calls `on_start` early and `confirm` once it has proved itself
//! (standalone: its scheduler started; connected: RegisterAck received). The guard
//! waits for the confirmation; when it does not come within the timeout (60 s,
//! `BACKUPY_UPDATE_CONFIRM_TIMEOUT_SEC`), it restores the previous binary, stops the
//! new process and execs the previous binary with the same arguments. The guard is a
//! separate process so that a new binary that hangs or dies before running any of our
//! code is rolled back too. `on_start` also rolls back by itself when it finds an
//! expired pending marker (a supervisor restarted a crashing new binary after the guard
//! was gone). The restored process finds the rollback record and reports it.
//!
//! No threads of its own; the guard is a process. It does not decide *whether* an
//! update is allowed (`auto_update_enabled` is the session's business) and it never
//! touches a binary whose signature did not verify.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::{DecodePublicKey, EncodePublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::AGENT_VERSION;

/// The public key updates must be signed with: `BACKUPY_UPDATE_PUBKEY` at build time
/// (PEM text of a P-256 SubjectPublicKeyInfo). There is no fallback: a build without one
/// has no self-update at all (issue 16: the repository's placeholder key has no private
/// half anybody holds, so trusting it would trust nobody, or anybody who claims it).
pub const COMPILED_KEY_PEM: Option<&str> = option_env!("BACKUPY_UPDATE_PUBKEY");

/// Why self-update is off in this build, for `version --json` and the Ack of a SelfUpdate.
pub const UNAVAILABLE: &str = "self-update unavailable: this binary was built without an update key \
     (release builds set BACKUPY_UPDATE_PUBKEY; scripts/release.sh refuses to build without it)";

/// The compiled-in update key, when this build has one.
pub fn compiled_key() -> Option<&'static str> {
    COMPILED_KEY_PEM.map(str::trim).filter(|k| !k.is_empty())
}

/// A release binary is ≤ 20 MB; anything far larger is not one of ours.
pub const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;
pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(60);

const MARKER: &str = "update-pending.json";
const ROLLED_BACK: &str = "update-rolled-back.json";
const PID_FILE: &str = "agent.pid";

/// What the control plane's SelfUpdate (or the command line) asks for.
#[derive(Debug, Clone)]
pub struct UpdateRequest {
    pub url: String,
    /// Lower- or upper-case hex SHA-256 of the binary.
    pub sha256: String,
    /// DER-encoded ECDSA P-256 signature over the binary's bytes.
    pub signature: Vec<u8>,
    /// The version the control plane announces; when set, the binary must report it.
    pub version: Option<String>,
    /// Installs the same version again, and (for the session) ignores
    /// `auto_update_enabled`; with `allow_downgrade` also an older version.
    pub force: bool,
    /// Whether `force` may install an older version: the operator's own `self-update
    /// --force`, or `BACKUPY_ALLOW_DOWNGRADE=true` for a control plane's forced SelfUpdate.
    pub allow_downgrade: bool,
}

/// Where and how updates are applied.
#[derive(Debug, Clone)]
pub struct Settings {
    pub state_dir: PathBuf,
    /// The binary to replace (default: this process's executable).
    pub exe: PathBuf,
    pub public_key_pem: String,
    pub max_bytes: u64,
    /// Extra CA bundle on top of the system roots (`BACKUPY_CA_FILE`).
    pub ca_file: Option<PathBuf>,
    /// `http://` URLs only with `BACKUPY_DEV_ALLOW_INSECURE=true`, as for the control plane.
    pub allow_insecure: bool,
    pub download_timeout: Duration,
    pub confirm_timeout: Duration,
}

impl Settings {
    /// The compiled-in key, this executable, and the environment's TLS rules.
    pub fn from_env(state_dir: &Path) -> Result<Settings, UpdateError> {
        let exe = std::env::current_exe()
            .and_then(fs::canonicalize)
            .map_err(|e| UpdateError::Io { context: "cannot find this executable".into(), source: e })?;
        let key = compiled_key().ok_or_else(|| UpdateError::Unavailable(UNAVAILABLE.to_string()))?;
        Ok(Settings {
            state_dir: state_dir.to_path_buf(),
            exe,
            public_key_pem: key.to_string(),
            max_bytes: DEFAULT_MAX_BYTES,
            ca_file: crate::env::Env::get().ca_file.clone(),
            allow_insecure: crate::env::Env::get().dev_allow_insecure,
            download_timeout: Duration::from_secs(600),
            confirm_timeout: confirm_timeout_from_env(),
        })
    }
}

/// An installed update, waiting for `reexec` (or a restart) and confirmation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub version: String,
    pub previous_version: String,
    pub exe: PathBuf,
    pub previous: PathBuf,
}

/// What `on_start` / `confirm` found; the session turns it into a LogEvent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Running the update, waiting for `confirm`.
    Pending {
        version: String,
    },
    Confirmed {
        version: String,
        previous_version: String,
    },
    RolledBack {
        version: String,
        previous_version: String,
        reason: String,
    },
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Pending { version } => write!(f, "self-update to {version}: waiting for confirmation"),
            Outcome::Confirmed { version, previous_version } => {
                write!(f, "self-update from {previous_version} to {version} confirmed")
            }
            Outcome::RolledBack { version, previous_version, reason } => {
                write!(f, "self-update to {version} rolled back to {previous_version}: {reason}")
            }
        }
    }
}

/// Why an update was refused; the text goes into the command's Ack.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("refused: {0}")]
    BadRequest(String),
    #[error("refused: {url} is not https (http:// needs BACKUPY_DEV_ALLOW_INSECURE=true)")]
    Insecure { url: String },
    #[error("download of {url} failed: {message}")]
    Download { url: String, message: String },
    #[error("refused: the download is larger than the {limit}-byte cap")]
    TooLarge { limit: u64 },
    #[error("refused: the download was truncated ({got} of {expected} bytes); nothing was installed")]
    Truncated { got: u64, expected: u64 },
    #[error(
        "refused: SHA-256 mismatch (expected {expected}, downloaded file has {actual}); nothing was installed"
    )]
    ShaMismatch { expected: String, actual: String },
    #[error(
        "refused: the signature does not verify against the compiled-in update key {key_id}; nothing was installed"
    )]
    BadSignature { key_id: String },
    #[error(
        "the compiled-in update key is unusable: {0} (rebuild with a P-256 PEM in BACKUPY_UPDATE_PUBKEY)"
    )]
    Key(String),
    #[error("refused: the new binary does not run here: {0}; nothing was installed")]
    NotRunnable(String),
    #[error("refused: the binary reports version {actual} but the update announced {announced}")]
    VersionMismatch { announced: String, actual: String },
    #[error("refused: {candidate} is a downgrade from {current} (force it to install anyway)")]
    Downgrade { current: String, candidate: String },
    #[error(
        "refused: {candidate} is older than the running {current}; a forced update from the control plane may downgrade only where the host sets BACKUPY_ALLOW_DOWNGRADE=true"
    )]
    DowngradeNotAllowed { current: String, candidate: String },
    #[error("{0}")]
    Unavailable(String),
    #[error("refused: version {version} is already running (force it to reinstall)")]
    SameVersion { version: String },
    #[error("refused: an update to {version} is still waiting for confirmation")]
    Pending { version: String },
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> UpdateError {
    let context = context.into();
    move |source| UpdateError::Io { context, source }
}

/// The pending-update record in the state directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Marker {
    version: String,
    previous_version: String,
    exe: PathBuf,
    previous: PathBuf,
    confirm_timeout_sec: u64,
    /// Unix milliseconds by which the new process must confirm; set when it is started.
    deadline_ms: Option<u64>,
    /// The command line to run the previous binary with after a rollback.
    args: Vec<OsString>,
    #[serde(default)]
    reason: String,
}

/// The signature in a file: DER as `openssl dgst -sign` writes it, or the base64 text of
/// it that `cosign sign-blob --output-signature` writes.
pub fn signature_from_file(bytes: &[u8]) -> Vec<u8> {
    use base64::Engine as _;
    if Signature::from_der(bytes).is_ok() {
        return bytes.to_vec();
    }
    let text = String::from_utf8_lossy(bytes);
    match base64::engine::general_purpose::STANDARD.decode(text.trim()) {
        Ok(der) if Signature::from_der(&der).is_ok() => der,
        _ => bytes.to_vec(),
    }
}

/// First 16 hex digits of the SHA-256 of the key's SubjectPublicKeyInfo (DER).
pub fn key_id(public_key_pem: &str) -> Result<String, UpdateError> {
    let key = VerifyingKey::from_public_key_pem(public_key_pem.trim())
        .map_err(|e| UpdateError::Key(e.to_string()))?;
    let der = key.to_public_key_der().map_err(|e| UpdateError::Key(e.to_string()))?;
    Ok(hex::encode(Sha256::digest(der.as_bytes()))[..16].to_string())
}

/// The compiled-in key's id, for `version --json`; `None` without a key.
pub fn compiled_key_id() -> Option<String> {
    compiled_key().map(|k| key_id(k).unwrap_or_else(|e| format!("invalid: {e}")))
}

/// `available` or the reason it is not, for `version --json`.
pub fn status() -> &'static str {
    if compiled_key().is_some() { "available" } else { UNAVAILABLE }
}

/// Downloads, verifies and installs an update; the previous binary is kept beside it.
/// The caller then calls `reexec` (a running agent) or leaves it for the next start.
pub fn apply(req: &UpdateRequest, settings: &Settings) -> Result<Applied, UpdateError> {
    let expected = parse_sha256(&req.sha256)?;
    let signature = Signature::from_der(&req.signature).map_err(|_| {
        UpdateError::BadRequest("the signature is not a DER-encoded ECDSA P-256 signature".into())
    })?;
    let key = VerifyingKey::from_public_key_pem(settings.public_key_pem.trim())
        .map_err(|e| UpdateError::Key(e.to_string()))?;
    if let Some(m) = read_marker(&settings.state_dir.join(MARKER)) {
        return Err(UpdateError::Pending { version: m.version });
    }
    check_url(&req.url, settings.allow_insecure)?;
    check_writable(&settings.exe)?;

    let dir = settings.state_dir.join("updates");
    fs::create_dir_all(&dir).map_err(io(format!("cannot create {}", dir.display())))?;
    let part = dir.join("download.part");
    let result = download(&req.url, &part, settings).and_then(|actual| {
        if actual != expected {
            return Err(UpdateError::ShaMismatch {
                expected: hex::encode(expected),
                actual: hex::encode(actual),
            });
        }
        // ECDSA over SHA-256 of the bytes is ECDSA over the prehash; openssl and cosign
        // may emit a high-S signature, which is just as valid.
        let sig = signature.normalize_s();
        key.verify_prehash(&actual, &sig).map_err(|_| UpdateError::BadSignature {
            key_id: key_id(&settings.public_key_pem).unwrap_or_default(),
        })
    });
    if let Err(e) = result {
        let _ = fs::remove_file(&part);
        return Err(e);
    }
    let candidate = dir.join(format!("backupy-agent-{}", &hex::encode(expected)[..16]));
    fs::set_permissions(&part, fs::Permissions::from_mode(0o755))
        .map_err(io("cannot make the download executable"))?;
    fs::rename(&part, &candidate)
        .map_err(io(format!("cannot move the download to {}", candidate.display())))?;

    let version = match candidate_version(&candidate) {
        Ok(v) => v,
        Err(e) => {
            let _ = fs::remove_file(&candidate);
            return Err(e);
        }
    };
    if let Err(e) = check_version(req, &version) {
        let _ = fs::remove_file(&candidate);
        return Err(e);
    }
    let applied = swap(&candidate, settings, &version)?;
    let _ = fs::remove_file(&candidate);
    log::info!(
        "self-update: installed {} over {} at {} (previous kept at {})",
        applied.version,
        applied.previous_version,
        applied.exe.display(),
        applied.previous.display()
    );
    Ok(applied)
}

fn parse_sha256(s: &str) -> Result<[u8; 32], UpdateError> {
    let bytes = hex::decode(s.trim()).ok().filter(|b| b.len() == 32);
    bytes
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| UpdateError::BadRequest(format!("sha256 {s:?} is not 64 hex digits")))
}

/// The scheme rule every URL handed to the agent follows (`env::check_handed_url`).
fn check_url(url: &str, allow_insecure: bool) -> Result<(), UpdateError> {
    use crate::env::UrlRefusal;
    match crate::env::check_handed_url(url, allow_insecure) {
        Ok(_) => Ok(()),
        Err(UrlRefusal::Insecure) => Err(UpdateError::Insecure { url: crate::secrets::redact_url(url) }),
        Err(UrlRefusal::Invalid(e)) => Err(UpdateError::BadRequest(format!("bad URL: {e}"))),
        Err(e @ UrlRefusal::Scheme(_)) => Err(UpdateError::BadRequest(e.to_string())),
    }
}

/// Fails early (before any download) where the binary cannot be replaced, e.g. a
/// container image, where updating means pulling a new image.
fn check_writable(exe: &Path) -> Result<(), UpdateError> {
    let dir = exe.parent().unwrap_or(Path::new("/"));
    let probe = dir.join(format!(".backupy-update-probe-{}", std::process::id()));
    match OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(_) => {
            let _ = fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(UpdateError::Io {
            context: format!(
                "refused: cannot replace {} (its directory is not writable by this user; in a container, pull a new image instead)",
                exe.display()
            ),
            source: e,
        }),
    }
}

/// Streams the body into `part`, hashing it; returns the SHA-256.
fn download(url: &str, part: &Path, settings: &Settings) -> Result<[u8; 32], UpdateError> {
    // Presigned download URLs carry credentials in their query string.
    let shown = crate::secrets::redact_url(url);
    let err = |message: String| UpdateError::Download { url: shown.clone(), message };
    let mut cfg = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(settings.download_timeout))
        // Release hosts redirect to their CDN; never from https down to http.
        .https_only(!settings.allow_insecure)
        .user_agent(concat!("backupy-agent/", env!("CARGO_PKG_VERSION"), " self-update"));
    if let Some(ca) = &settings.ca_file {
        cfg = cfg.tls_config(crate::storage::s3::tls_with_extra_ca(ca).map_err(err)?);
    }
    let agent = cfg.build().new_agent();
    let mut resp = agent.get(url).call().map_err(|e| err(e.to_string()))?;
    if !resp.status().is_success() {
        return Err(err(format!("HTTP {}", resp.status())));
    }
    let expected_len: Option<u64> = resp
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    if expected_len.is_some_and(|n| n > settings.max_bytes) {
        return Err(UpdateError::TooLarge { limit: settings.max_bytes });
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(part)
        .map_err(io(format!("cannot create {}", part.display())))?;
    let mut reader = resp.body_mut().with_config().limit(settings.max_bytes + 1).reader();
    let mut hasher = Sha256::new();
    let mut got: u64 = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                return Err(match expected_len {
                    Some(expected) if got < expected => UpdateError::Truncated { got, expected },
                    _ if got >= settings.max_bytes => UpdateError::TooLarge { limit: settings.max_bytes },
                    _ => err(format!("reading the body: {e}")),
                });
            }
        };
        got += n as u64;
        if got > settings.max_bytes {
            return Err(UpdateError::TooLarge { limit: settings.max_bytes });
        }
        let chunk = buf.get(..n).unwrap_or_default();
        hasher.update(chunk);
        file.write_all(chunk).map_err(io(format!("cannot write {}", part.display())))?;
    }
    if let Some(expected) = expected_len.filter(|e| got < *e) {
        return Err(UpdateError::Truncated { got, expected });
    }
    file.sync_all().map_err(io(format!("cannot write {}", part.display())))?;
    Ok(hasher.finalize().into())
}

/// Runs the verified candidate's `version --json`: it must run on this host, and its
/// answer is the version the downgrade rule compares.
fn candidate_version(candidate: &Path) -> Result<String, UpdateError> {
    let mut child = Command::new(candidate)
        .args(["version", "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .env_clear()
        .spawn()
        .map_err(|e| UpdateError::NotRunnable(e.to_string()))?;
    let t0 = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if t0.elapsed() < Duration::from_secs(15) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(UpdateError::NotRunnable("`version --json` did not answer within 15 s".into()));
            }
        }
    };
    let mut out = String::new();
    if let Some(o) = child.stdout.take() {
        let _ = o.take(64 * 1024).read_to_string(&mut out);
    }
    if !status.success() {
        return Err(UpdateError::NotRunnable(format!("`version --json` exited with {status}")));
    }
    serde_json::from_str::<serde_json::Value>(&out)
        .ok()
        .and_then(|v| v.get("version").and_then(|v| v.as_str()).map(str::to_string))
        .ok_or_else(|| UpdateError::NotRunnable("`version --json` printed no version".into()))
}

fn check_version(req: &UpdateRequest, version: &str) -> Result<(), UpdateError> {
    if let Some(announced) = req.version.as_deref().filter(|v| !v.is_empty())
        && announced.trim_start_matches('v') != version
    {
        return Err(UpdateError::VersionMismatch { announced: announced.into(), actual: version.into() });
    }
    let parse = |v: &str| semver::Version::parse(v.trim_start_matches('v'));
    let candidate =
        parse(version).map_err(|e| UpdateError::NotRunnable(format!("version {version:?}: {e}")))?;
    let current = parse(AGENT_VERSION).map_err(|e| UpdateError::BadRequest(e.to_string()))?;
    if req.force {
        // Forced: the same version again, or an older one only where the host allows it.
        if candidate < current && !req.allow_downgrade {
            return Err(UpdateError::DowngradeNotAllowed {
                current: AGENT_VERSION.into(),
                candidate: version.into(),
            });
        }
        return Ok(());
    }
    match candidate.cmp(&current) {
        std::cmp::Ordering::Less => {
            Err(UpdateError::Downgrade { current: AGENT_VERSION.into(), candidate: version.into() })
        }
        std::cmp::Ordering::Equal => Err(UpdateError::SameVersion { version: version.into() }),
        std::cmp::Ordering::Greater => Ok(()),
    }
}

/// `<exe>.previous` gets the running binary (a hard link, so no copy can be torn), then
/// the candidate is copied beside the executable and renamed over it; the marker is
/// written last, and the swap is undone if it cannot be.
fn swap(candidate: &Path, settings: &Settings, version: &str) -> Result<Applied, UpdateError> {
    let exe = &settings.exe;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    let name =
        exe.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "backupy-agent".into());
    let previous = dir.join(format!("{name}.previous"));
    let staged = dir.join(format!(".{name}.new"));
    let linked = dir.join(format!(".{name}.previous.new"));
    let _ = fs::remove_file(&linked);
    fs::hard_link(exe, &linked)
        .or_else(|_| fs::copy(exe, &linked).map(|_| ()))
        .map_err(io(format!("cannot keep the previous binary as {}", previous.display())))?;
    fs::rename(&linked, &previous)
        .map_err(io(format!("cannot keep the previous binary as {}", previous.display())))?;
    fs::copy(candidate, &staged)
        .map_err(io(format!("cannot stage the new binary at {}", staged.display())))?;
    File::open(&staged).and_then(|f| f.sync_all()).map_err(io("cannot flush the new binary"))?;
    fs::set_permissions(&staged, fs::Permissions::from_mode(0o755))
        .map_err(io("cannot make the new binary executable"))?;
    fs::rename(&staged, exe).map_err(io(format!("cannot replace {}", exe.display())))?;
    sync_dir(dir);
    let marker = Marker {
        version: version.to_string(),
        previous_version: AGENT_VERSION.to_string(),
        exe: exe.clone(),
        previous: previous.clone(),
        confirm_timeout_sec: settings.confirm_timeout.as_secs().max(1),
        deadline_ms: None,
        args: std::env::args_os().collect(),
        reason: String::new(),
    };
    if let Err(e) = write_marker(&settings.state_dir.join(MARKER), &marker) {
        let _ = restore(&previous, exe);
        return Err(e);
    }
    Ok(Applied {
        version: version.into(),
        previous_version: AGENT_VERSION.into(),
        exe: exe.clone(),
        previous,
    })
}

/// Copies `previous` back over `exe` with a rename, so `exe` is never half-written.
fn restore(previous: &Path, exe: &Path) -> std::io::Result<()> {
    let staged = exe.with_file_name(format!(
        ".{}.restore",
        exe.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    ));
    fs::copy(previous, &staged)?;
    File::open(&staged)?.sync_all()?;
    fs::rename(&staged, exe)?;
    sync_dir(exe.parent().unwrap_or(Path::new("/")));
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

fn read_marker(path: &Path) -> Option<Marker> {
    let text = fs::read_to_string(path).ok()?;
    match serde_json::from_str(&text) {
        Ok(m) => Some(m),
        Err(e) => {
            log::warn!("self-update: ignoring unreadable {}: {e}", path.display());
            None
        }
    }
}

fn write_marker(path: &Path, m: &Marker) -> Result<(), UpdateError> {
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_vec_pretty(m).map_err(|e| UpdateError::BadRequest(e.to_string()))?;
    fs::write(&tmp, text)
        .and_then(|_| File::open(&tmp)?.sync_all())
        .and_then(|_| fs::rename(&tmp, path))
        .map_err(io(format!("cannot write {}", path.display())))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")));
    Ok(())
}

/// `BACKUPY_UPDATE_CONFIRM_TIMEOUT_SEC`, default 60 s; tests shorten it.
pub fn confirm_timeout_from_env() -> Duration {
    crate::env::Env::get().update_confirm_timeout
}

/// Runs the freshly installed binary in place of this process (same pid, same
/// arguments), after starting the guard that rolls back if it never confirms. Returns
/// only on failure.
pub fn reexec(state_dir: &Path) -> UpdateError {
    let args: Vec<OsString> = std::env::args_os().collect();
    let marker_path = state_dir.join(MARKER);
    let Some(mut m) = read_marker(&marker_path) else {
        return UpdateError::BadRequest("no installed update to run".into());
    };
    m.args = args.clone();
    m.deadline_ms = Some(crate::clock::now_ms() + m.confirm_timeout_sec * 1000);
    if let Err(e) = write_marker(&marker_path, &m) {
        return e;
    }
    if let Err(e) = spawn_guard(&m, state_dir) {
        return e;
    }
    log::info!("self-update: re-executing {} ({})", m.exe.display(), m.version);
    let err = Command::new(&m.exe).args(args.iter().skip(1)).exec();
    UpdateError::Io { context: format!("cannot execute {}", m.exe.display()), source: err }
}

fn spawn_guard(m: &Marker, state_dir: &Path) -> Result<(), UpdateError> {
    Command::new(&m.previous)
        .arg("self-update-guard")
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--pid")
        .arg(std::process::id().to_string())
        .stdin(Stdio::null())
        .spawn()
        .map(|_| ())
        .map_err(io(format!("cannot start the rollback guard {}", m.previous.display())))
}

/// The version of an installed update still waiting for its first start or confirmation.
pub fn pending(state_dir: &Path) -> Option<String> {
    read_marker(&state_dir.join(MARKER)).map(|m| m.version)
}

/// Called early by `run`: records our pid (so `self-update` by hand can ask us to
/// re-exec), reports a rollback that brought us back, and for a pending update starts
/// the confirmation clock (and a guard, unless one already watches us) or, when the
/// clock already ran out, rolls back at once.
pub fn on_start(state_dir: &Path) -> Option<Outcome> {
    let _ = fs::create_dir_all(state_dir);
    let _ = fs::write(state_dir.join(PID_FILE), std::process::id().to_string());
    let rolled = state_dir.join(ROLLED_BACK);
    if let Some(m) = read_marker(&rolled) {
        let _ = fs::remove_file(&rolled);
        let outcome = Outcome::RolledBack {
            version: m.version,
            previous_version: m.previous_version,
            reason: m.reason,
        };
        log::error!("{outcome}");
        return Some(outcome);
    }
    let path = state_dir.join(MARKER);
    let mut m = read_marker(&path)?;
    match m.deadline_ms {
        Some(deadline) if crate::clock::now_ms() >= deadline => {
            let reason = format!("not confirmed within {} s", m.confirm_timeout_sec);
            if let Err(e) = roll_back(state_dir, &path, &mut m, &reason, None) {
                log::error!("self-update: rollback failed: {e}");
            }
            None
        }
        Some(_) => {
            log::info!("self-update: running {}; waiting for confirmation", m.version);
            Some(Outcome::Pending { version: m.version })
        }
        None => {
            // Installed by hand and started by a supervisor: the clock starts now.
            m.args = std::env::args_os().collect();
            m.deadline_ms = Some(crate::clock::now_ms() + m.confirm_timeout_sec * 1000);
            if let Err(e) = write_marker(&path, &m).and_then(|_| spawn_guard(&m, state_dir)) {
                log::error!("self-update: cannot arm the rollback guard: {e}");
            }
            log::info!(
                "self-update: running {}; it must confirm within {} s",
                m.version,
                m.confirm_timeout_sec
            );
            Some(Outcome::Pending { version: m.version })
        }
    }
}

/// The new process has proved itself (scheduler started / RegisterAck): the update
/// stays. Returns what happened, if an update was pending.
pub fn confirm(state_dir: &Path) -> Option<Outcome> {
    let path = state_dir.join(MARKER);
    let m = read_marker(&path)?;
    // Removing the marker is the confirmation; the guard sees it gone and exits.
    fs::remove_file(&path).ok()?;
    sync_dir(state_dir);
    let outcome = Outcome::Confirmed { version: m.version, previous_version: m.previous_version };
    log::info!("{outcome}");
    Some(outcome)
}

/// The pid of a running `run` on this state directory, for `self-update` by hand.
pub fn running_agent(state_dir: &Path) -> Option<i32> {
    let pid: i32 = fs::read_to_string(state_dir.join(PID_FILE)).ok()?.trim().parse().ok()?;
    let exe = fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let name = exe.file_name()?.to_string_lossy().into_owned();
    (pid != std::process::id() as i32 && name.starts_with("backupy-agent")).then_some(pid)
}

/// Takes over the pending marker (so a late `confirm` cannot race us), puts the
/// previous binary back, stops `pid` if given, and execs the previous binary with the
/// recorded arguments. Returns only on failure.
fn roll_back(
    state_dir: &Path,
    marker_path: &Path,
    m: &mut Marker,
    reason: &str,
    pid: Option<i32>,
) -> Result<(), UpdateError> {
    let claimed = state_dir.join(ROLLED_BACK);
    if fs::rename(marker_path, &claimed).is_err() {
        return Ok(()); // confirmed just now
    }
    m.reason = reason.to_string();
    write_marker(&claimed, m)?;
    log::error!("self-update: {} {reason}; restoring {}", m.version, m.previous_version);
    restore(&m.previous, &m.exe).map_err(io(format!("cannot restore {}", m.exe.display())))?;
    if let Some(pid) = pid {
        stop(pid);
    }
    let args = if m.args.is_empty() { vec![m.exe.clone().into_os_string()] } else { m.args.clone() };
    let err = Command::new(&m.exe).args(args.iter().skip(1)).exec();
    Err(UpdateError::Io { context: format!("cannot execute the restored {}", m.exe.display()), source: err })
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

fn stop(pid: i32) {
    // SAFETY: plain kill(2) on the pid the guard was started to watch.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let t0 = Instant::now();
    while alive(pid) && !is_zombie(pid) && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    if alive(pid) {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

fn is_zombie(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit(')').next().map(|rest| rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// The hidden `self-update-guard` subcommand, run from the previous binary: waits for
/// the new process `pid` to confirm; rolls back when it does not in time, or dies.
pub fn guard(state_dir: &Path, pid: i32) -> Result<(), UpdateError> {
    let path = state_dir.join(MARKER);
    let mut fallback_deadline = None;
    loop {
        let Some(mut m) = read_marker(&path) else {
            return Ok(()); // confirmed
        };
        let deadline = m.deadline_ms.unwrap_or_else(|| {
            *fallback_deadline.get_or_insert(crate::clock::now_ms() + m.confirm_timeout_sec * 1000)
        });
        if !alive(pid) || is_zombie(pid) {
            return roll_back(state_dir, &path, &mut m, "the new process exited before confirming", None);
        }
        if crate::clock::now_ms() >= deadline {
            let reason = format!("not confirmed within {} s", m.confirm_timeout_sec);
            return roll_back(state_dir, &path, &mut m, &reason, Some(pid));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn settings(dir: &Path, max_bytes: u64) -> Settings {
        Settings {
            state_dir: dir.to_path_buf(),
            exe: dir.join("backupy-agent"),
            public_key_pem: String::new(),
            max_bytes,
            ca_file: None,
            allow_insecure: true,
            download_timeout: Duration::from_secs(10),
            confirm_timeout: DEFAULT_CONFIRM_TIMEOUT,
        }
    }

    /// Serves `body` once, with or without a Content-Length.
    fn serve_once(body: Vec<u8>, with_length: bool) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/bin", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = listener.accept() {
                let mut buf = [0u8; 2048];
                let _ = s.read(&mut buf);
                let head = if with_length {
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len())
                } else {
                    "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_string()
                };
                let _ = s.write_all(head.as_bytes()).and_then(|_| s.write_all(&body));
            }
        });
        url
    }

    #[test]
    fn a_download_over_the_cap_is_refused_whether_announced_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(dir.path(), 1000);
        for with_length in [true, false] {
            let url = serve_once(vec![7u8; 5000], with_length);
            let err = download(&url, &dir.path().join("part"), &s).unwrap_err();
            assert!(matches!(err, UpdateError::TooLarge { limit: 1000 }), "{with_length}: {err}");
        }
        let url = serve_once(vec![7u8; 1000], false);
        let sha = download(&url, &dir.path().join("part"), &s).unwrap();
        assert_eq!(hex::encode(sha), hex::encode(Sha256::digest([7u8; 1000])));
    }

    #[test]
    fn downgrade_and_same_version_need_force_and_the_announced_version_must_match() {
        let req = |version: Option<&str>, force| UpdateRequest {
            url: String::new(),
            sha256: String::new(),
            signature: Vec::new(),
            version: version.map(str::to_string),
            force,
            allow_downgrade: force,
        };
        assert!(matches!(check_version(&req(None, false), "0.0.9"), Err(UpdateError::Downgrade { .. })));
        assert!(matches!(
            check_version(&req(None, false), AGENT_VERSION),
            Err(UpdateError::SameVersion { .. })
        ));
        assert!(check_version(&req(None, false), "99.0.0").is_ok());
        assert!(check_version(&req(None, true), "0.0.9").is_ok());
        assert!(check_version(&req(Some("v99.0.0"), false), "99.0.0").is_ok());
        assert!(matches!(
            check_version(&req(Some("99.0.1"), true), "99.0.0"),
            Err(UpdateError::VersionMismatch { .. })
        ));
    }

    #[test]
    fn http_urls_need_the_dev_switch() {
        assert!(matches!(check_url("http://127.0.0.1/x", false), Err(UpdateError::Insecure { .. })));
        assert!(check_url("http://127.0.0.1/x", true).is_ok());
        assert!(check_url("https://example.com/x", false).is_ok());
        assert!(matches!(check_url("file:///etc/passwd", true), Err(UpdateError::BadRequest(_))));
    }

    #[test]
    fn a_forced_update_downgrades_only_where_allowed() {
        let req = |allow_downgrade| UpdateRequest {
            url: String::new(),
            sha256: String::new(),
            signature: Vec::new(),
            version: None,
            force: true,
            allow_downgrade,
        };
        let err = check_version(&req(false), "0.0.9").unwrap_err();
        assert!(matches!(err, UpdateError::DowngradeNotAllowed { .. }), "{err}");
        assert!(err.to_string().contains("BACKUPY_ALLOW_DOWNGRADE=true"), "{err}");
        assert!(check_version(&req(true), "0.0.9").is_ok());
        assert!(check_version(&req(false), AGENT_VERSION).is_ok(), "forced reinstall of the same version");
        assert!(check_version(&req(false), "99.0.0").is_ok());
    }

    #[test]
    fn a_build_key_is_a_p256_key_and_without_one_self_update_is_unavailable() {
        match compiled_key() {
            Some(_) => assert_eq!(compiled_key_id().map(|k| k.len()), Some(16), "{:?}", compiled_key_id()),
            None => {
                assert_eq!(compiled_key_id(), None);
                assert!(status().starts_with("self-update unavailable"));
                let err = Settings::from_env(Path::new("/nonexistent")).map(|_| ()).unwrap_err();
                assert!(matches!(err, UpdateError::Unavailable(_)), "{err}");
            }
        }
    }
}
