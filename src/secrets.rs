//! Secret values (passwords, S3 credentials) and the reference syntax that resolves
//! them: `env:NAME`, `file:/path`, `literal:TEXT`, a bare name found in
//! `BACKUPY_SECRETS_DIR`, else the value itself (today's control plane sends passwords
//! as they are).
//!
//! A [`Secret`] never prints its value: `Debug` and `Display` show `<redacted>`, so it
//! cannot leak through a log line or an error message by accident.

use std::fmt;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

pub const DEFAULT_SECRETS_DIR: &str = "/run/secrets";

#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    /// Wraps a secret value and registers it with the log redaction layer.
    pub fn new(s: impl Into<String>) -> Self {
        let secret = Self(Zeroizing::new(s.into()));
        register_for_redaction(&secret.0);
        secret
    }

    /// The value, for the one place that must hand it on (a 0600 file, a signature).
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Every secret value the process has seen, so the log layer can blank it out of any
/// line, whichever code path wrote it. Made for sharing: written rarely, read per line.
static KNOWN_SECRETS: std::sync::RwLock<Vec<Zeroizing<String>>> = std::sync::RwLock::new(Vec::new());

/// Values shorter than this are not redacted: they would blank ordinary words.
const MIN_REDACTED_LEN: usize = 4;

pub fn register_for_redaction(value: &str) {
    if value.len() < MIN_REDACTED_LEN {
        return;
    }
    let mut known = KNOWN_SECRETS.write().unwrap_or_else(|p| p.into_inner());
    if !known.iter().any(|k| k.as_str() == value) {
        known.push(Zeroizing::new(value.to_string()));
        // Longest first, so a secret that contains another is blanked whole.
        known.sort_by_key(|k| std::cmp::Reverse(k.len()));
    }
}

/// `text` with every registered secret, every URL query string (presigned URLs carry
/// signatures there) and every `Bearer` token replaced. Every log line and every error
/// the CLI prints passes through this.
pub fn redact(text: &str) -> String {
    let mut out = crate::storage::s3::redact_urls(text);
    for secret in KNOWN_SECRETS.read().unwrap_or_else(|p| p.into_inner()).iter() {
        if out.contains(secret.as_str()) {
            out = out.replace(secret.as_str(), "<redacted>");
        }
    }
    if let Some(pos) = out.find("Bearer ") {
        let end =
            out[pos + 7..].find(|c: char| c.is_whitespace() || c == '"').map_or(out.len(), |e| pos + 7 + e);
        out.replace_range(pos + 7..end, "<redacted>");
    }
    out
}

/// Why a reference did not resolve. Names the reference, never a value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("environment variable {0} (from env:{0}) is not set")]
    MissingEnv(String),
    #[error("cannot read secret file {path} (from file:{path}): {error}")]
    File { path: String, error: std::io::Error },
}

/// Resolves a secret reference with the secrets directory of `BACKUPY_SECRETS_DIR`.
pub fn resolve(reference: &str) -> Result<Secret, SecretError> {
    let dir = std::env::var_os("BACKUPY_SECRETS_DIR").map(PathBuf::from);
    resolve_in(reference, dir.as_deref().unwrap_or(Path::new(DEFAULT_SECRETS_DIR)))
}

pub fn resolve_in(reference: &str, secrets_dir: &Path) -> Result<Secret, SecretError> {
    if let Some(name) = reference.strip_prefix("env:") {
        return std::env::var(name).map(Secret::new).map_err(|_| SecretError::MissingEnv(name.to_string()));
    }
    if let Some(path) = reference.strip_prefix("file:") {
        return read_trimmed(Path::new(path))
            .map_err(|error| SecretError::File { path: path.to_string(), error });
    }
    if let Some(text) = reference.strip_prefix("literal:") {
        return Ok(Secret::new(text));
    }
    let is_name = !reference.is_empty()
        && reference.len() <= 255
        && reference.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !reference.starts_with('.');
    if is_name {
        let candidate = secrets_dir.join(reference);
        if candidate.is_file() {
            return read_trimmed(&candidate)
                .map_err(|error| SecretError::File { path: candidate.display().to_string(), error });
        }
    }
    Ok(Secret::new(reference))
}

/// A secret file's content without its final newline (`\n` or `\r\n`).
fn read_trimmed(path: &Path) -> std::io::Result<Secret> {
    let mut s = Zeroizing::new(std::fs::read_to_string(path)?);
    if s.ends_with('\n') {
        s.pop();
        if s.ends_with('\r') {
            s.pop();
        }
    }
    Ok(Secret(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_resolve_in_the_documented_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("db-pass"), "from-dir\n").unwrap();
        std::fs::write(dir.path().join("f"), "from-file\r\n").unwrap();
        // SAFETY: tests in this module are the only users of this variable.
        unsafe { std::env::set_var("BACKUPY_TEST_SECRET_X", "from-env") };
        let r = |s: &str| resolve_in(s, dir.path()).unwrap().expose().to_string();
        assert_eq!(r("env:BACKUPY_TEST_SECRET_X"), "from-env");
        assert_eq!(r(&format!("file:{}", dir.path().join("f").display())), "from-file");
        assert_eq!(r("literal:env:not-a-ref"), "env:not-a-ref");
        assert_eq!(r("db-pass"), "from-dir");
        assert_eq!(r("plain password"), "plain password");
        assert_eq!(r("../db-pass"), "../db-pass", "no path traversal out of the secrets dir");
        assert!(matches!(
            resolve_in("env:BACKUPY_NOPE_NOT_SET", dir.path()),
            Err(SecretError::MissingEnv(_))
        ));
        assert!(resolve_in("file:/nonexistent/x", dir.path()).is_err());
    }

    #[test]
    fn redaction_blanks_known_secrets_query_strings_and_bearer_tokens() {
        let _ = Secret::new("s3cr3t-value-123");
        let line =
            "connect with s3cr3t-value-123 to https://h/b/k?X-Amz-Signature=ab then Bearer tok.en.x done";
        assert_eq!(
            redact(line),
            "connect with <redacted> to https://h/b/k?<redacted> then Bearer <redacted> done"
        );
        assert_eq!(redact("abc"), "abc");
    }

    #[test]
    fn secrets_never_print_their_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "<redacted> <redacted>");
    }
}
