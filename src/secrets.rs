//! Secret values (passwords, S3 credentials) and the reference syntax that resolves
//! them: `env:NAME`, `file:/path`, `literal:TEXT`, a bare name found in
//! `BACKUPY_SECRETS_DIR`, else the value itself (today's control plane sends passwords
//! as they are).
//!
//! A [`Secret`] never prints its value: `Debug` and `Display` show `<redacted>`, so it
//! cannot leak through a log line or an error message by accident.
//!
//! It is also the one place that decides how secrets are blanked out of text: [`redact`]
//! for every log line and printed error, and the parts it is made of for callers that
//! need less ([`redact_urls`], [`redact_url`], [`redact_values`]). Everything here runs on
//! the caller's thread; the registry of known values is shared behind a lock.

use std::fmt;
use std::path::Path;

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

/// What every redacted part of a text is replaced with.
pub const REDACTED: &str = "<redacted>";

/// `text` with every registered secret, every http(s) URL's query string and password
/// (presigned URLs carry signatures in the query) and every `Bearer` token replaced.
/// Every log line and every error the CLI prints passes through this.
pub fn redact(text: &str) -> String {
    let mut out = redact_urls(text);
    out = redact_values(&out, &KNOWN_SECRETS.read().unwrap_or_else(|p| p.into_inner()));
    if let Some(pos) = out.find("Bearer ") {
        let end =
            out[pos + 7..].find(|c: char| c.is_whitespace() || c == '"').map_or(out.len(), |e| pos + 7 + e);
        out.replace_range(pos + 7..end, REDACTED);
    }
    out
}

/// `text` with each of `values` replaced, in the order given: for secrets a caller knows
/// but did not register (a percent-encoded form, a password taken out of a URI).
pub fn redact_values<S: AsRef<str>>(text: &str, values: &[S]) -> String {
    let mut out = text.to_string();
    for value in values.iter().map(AsRef::as_ref).filter(|v| !v.is_empty()) {
        if out.contains(value) {
            out = out.replace(value, REDACTED);
        }
    }
    out
}

/// `text` with every http(s) URL in it passed through [`redact_url`]. A URL ends at
/// whitespace or a quote.
pub fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("http") {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        if tail.starts_with("http://") || tail.starts_with("https://") {
            let end = tail.find(|c: char| c.is_whitespace() || c == '"' || c == '\'').unwrap_or(tail.len());
            out.push_str(&redact_url(&tail[..end]));
            rest = &tail[end..];
        } else {
            out.push_str("http");
            rest = &tail[4..];
        }
    }
    out.push_str(rest);
    out
}

/// One URL of any scheme, fit to show: the password of its userinfo and its query string
/// (where presigned URLs and some connection strings carry credentials) are replaced;
/// scheme, user, host and path stay, so the operator can still tell which URL it was.
pub fn redact_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, _)) => (base, format!("?{REDACTED}")),
        None => (url, String::new()),
    };
    let Some((scheme, rest)) = base.split_once("://") else { return format!("{base}{query}") };
    let (authority, path) = rest.split_at(rest.find(['/', '#']).unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:{REDACTED}@{host}{path}{query}")
        }
        _ => format!("{base}{query}"),
    }
}

/// Why a reference did not resolve. Names the reference, never a value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("environment variable {0} (from env:{0}) is not set")]
    MissingEnv(String),
    #[error("cannot read secret file {path} (from file:{path}): {error}")]
    File { path: String, error: std::io::Error },
    /// A pushed `env:` reference to a `BACKUPY_*` variable: the agent's own settings and
    /// its key are never a control plane's to read.
    #[error(
        "pushed secret reference env:{0} refused: BACKUPY_* variables are the agent's own and never resolve for a config pushed by the control plane"
    )]
    PushedAgentVariable(String),
    /// A pushed `env:` reference to a variable the host did not list.
    #[error(
        "pushed secret reference env:{0} refused: a control plane may read only the variables the host lists in BACKUPY_PUSHED_SECRET_ENV (set BACKUPY_PUSHED_SECRET_ENV={0} to allow this one)"
    )]
    PushedEnvNotListed(String),
    /// A pushed `file:` reference (or a secret name) that resolves outside the secrets
    /// directory, after `..` and symlinks.
    #[error(
        "pushed secret reference file:{path} refused: a control plane may read only files inside BACKUPY_SECRETS_DIR ({dir}), after resolving .. and symlinks; move the secret there or set BACKUPY_SECRETS_DIR"
    )]
    PushedFileOutside { path: String, dir: String },
}

/// Resolves a secret reference; a bare name is looked up in `secrets_dir` (the caller
/// passes `BACKUPY_SECRETS_DIR`: `Env::resolve_secret` in the `env` module).
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
    if is_secret_name(reference) {
        let candidate = secrets_dir.join(reference);
        if candidate.is_file() {
            return read_trimmed(&candidate)
                .map_err(|error| SecretError::File { path: candidate.display().to_string(), error });
        }
    }
    Ok(Secret::new(reference))
}

/// Resolves a reference from a config a control plane pushed (agent.md "Secrets"): less
/// trusted than the host, so `env:` reads only the names in `allowed_env`
/// (`BACKUPY_PUSHED_SECRET_ENV`) and never a `BACKUPY_*` one, and `file:` (and a bare
/// name) reads only a file that is inside `secrets_dir` once `..` and symlinks are
/// resolved. A refusal names the rule and the variable to set.
pub fn resolve_pushed(
    reference: &str,
    secrets_dir: &Path,
    allowed_env: &[String],
) -> Result<Secret, SecretError> {
    if let Some(name) = reference.strip_prefix("env:") {
        if name.to_ascii_uppercase().starts_with("BACKUPY_") {
            return Err(SecretError::PushedAgentVariable(name.to_string()));
        }
        if !allowed_env.iter().any(|allowed| allowed == name) {
            return Err(SecretError::PushedEnvNotListed(name.to_string()));
        }
        return resolve_in(reference, secrets_dir);
    }
    if let Some(path) = reference.strip_prefix("file:") {
        // A relative path is taken inside the secrets directory; `join` keeps an absolute
        // one as it is, and the containment check below decides.
        let inside = contained_file(&secrets_dir.join(path), secrets_dir).ok_or_else(|| {
            SecretError::PushedFileOutside { path: path.to_string(), dir: secrets_dir.display().to_string() }
        })?;
        return read_trimmed(&inside).map_err(|error| SecretError::File { path: path.to_string(), error });
    }
    if reference.starts_with("literal:") {
        return resolve_in(reference, secrets_dir);
    }
    // A bare name: a file of that name in the secrets directory counts only when it does
    // not lead out of it (a symlink planted there); otherwise the value itself.
    let candidate = secrets_dir.join(reference);
    if is_secret_name(reference) && candidate.is_file() {
        let inside =
            contained_file(&candidate, secrets_dir).ok_or_else(|| SecretError::PushedFileOutside {
                path: candidate.display().to_string(),
                dir: secrets_dir.display().to_string(),
            })?;
        return read_trimmed(&inside)
            .map_err(|error| SecretError::File { path: candidate.display().to_string(), error });
    }
    Ok(Secret::new(reference))
}

/// `path` with `..` and symlinks resolved, when that lies inside `dir` (also resolved);
/// `None` when either does not exist or it lies outside.
fn contained_file(path: &Path, dir: &Path) -> Option<std::path::PathBuf> {
    let dir = dir.canonicalize().ok()?;
    let resolved = path.canonicalize().ok()?;
    (resolved.starts_with(&dir) && resolved != dir).then_some(resolved)
}

/// A name that may be looked up in the secrets directory: one plain path segment.
fn is_secret_name(reference: &str) -> bool {
    !reference.is_empty()
        && reference.len() <= 255
        && reference.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && !reference.starts_with('.')
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
    fn pushed_references_read_only_listed_variables_and_files_inside_the_secrets_dir() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("secrets");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join("db-pass"), "from-dir\n").unwrap();
        let outside = root.path().join("agent.key.pem");
        std::fs::write(&outside, "-----BEGIN PRIVATE KEY-----\n").unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("link")).unwrap();
        // SAFETY: tests in this module are the only users of these variables.
        unsafe {
            std::env::set_var("BACKUPY_TEST_PUSHED_X", "agent-own");
            std::env::set_var("TEST_PUSHED_LISTED", "listed-value");
            std::env::set_var("TEST_PUSHED_UNLISTED", "unlisted-value");
        }
        let allowed = vec!["TEST_PUSHED_LISTED".to_string(), "BACKUPY_TEST_PUSHED_X".to_string()];
        let r = |s: &str| resolve_pushed(s, &dir, &allowed);
        assert_eq!(r("env:TEST_PUSHED_LISTED").unwrap().expose(), "listed-value");
        assert!(matches!(r("env:TEST_PUSHED_UNLISTED"), Err(SecretError::PushedEnvNotListed(_))));
        // Never a BACKUPY_* name, even when listed.
        assert!(matches!(r("env:BACKUPY_TEST_PUSHED_X"), Err(SecretError::PushedAgentVariable(_))));
        assert!(matches!(r("env:backupy_agent_key"), Err(SecretError::PushedAgentVariable(_))));
        assert_eq!(r(&format!("file:{}", dir.join("db-pass").display())).unwrap().expose(), "from-dir");
        assert_eq!(r("file:db-pass").unwrap().expose(), "from-dir");
        for refused in [
            format!("file:{}", outside.display()),
            format!("file:{}/../agent.key.pem", dir.display()),
            "file:../agent.key.pem".to_string(),
            format!("file:{}", dir.join("link").display()),
            format!("file:{}", dir.display()),
            "link".to_string(),
        ] {
            let e = r(&refused).map(|_| ()).unwrap_err();
            assert!(matches!(e, SecretError::PushedFileOutside { .. }), "{refused}: {e}");
            assert!(e.to_string().contains("BACKUPY_SECRETS_DIR"), "{e}");
        }
        assert_eq!(r("literal:x").unwrap().expose(), "x");
        assert_eq!(r("db-pass").unwrap().expose(), "from-dir");
        assert_eq!(r("plain password").unwrap().expose(), "plain password");
        let e = r("env:TEST_PUSHED_UNLISTED").map(|_| ()).unwrap_err().to_string();
        assert!(
            e.contains("BACKUPY_PUSHED_SECRET_ENV=TEST_PUSHED_UNLISTED") && !e.contains("unlisted-value"),
            "{e}"
        );
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
    fn redaction_removes_query_strings_only_from_urls_without_passwords() {
        let s =
            "PUT https://s3.example.com/b/k?X-Amz-Signature=abc&X-Amz-Credential=AK failed; see http://x/y";
        assert_eq!(redact_urls(s), "PUT https://s3.example.com/b/k?<redacted> failed; see http://x/y");
        assert_eq!(
            redact_urls("say \"https://h/p?sig=1\" or 'http://h/q?a' httpd"),
            "say \"https://h/p?<redacted>\" or 'http://h/q?<redacted>' httpd"
        );
    }

    #[test]
    fn one_url_keeps_scheme_user_host_and_path_but_not_password_or_query() {
        for (url, shown) in [
            // Self-update downloads: presigned query strings.
            ("https://cdn.example/agent?X-Amz-Signature=s", "https://cdn.example/agent?<redacted>"),
            ("http://127.0.0.1/x", "http://127.0.0.1/x"),
            // Restore targets: the password of any scheme, also an empty user's.
            ("mysql://root:pw@127.0.0.1:3306/newdb", "mysql://root:<redacted>@127.0.0.1:3306/newdb"),
            ("redis://:p@ss:w@h:6379", "redis://:<redacted>@h:6379"),
            ("postgres://u:pw@h/db?password=x", "postgres://u:<redacted>@h/db?<redacted>"),
            ("postgres://user@h/db", "postgres://user@h/db"),
            ("docker://app-db/shop", "docker://app-db/shop"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
        // In running text too.
        assert_eq!(redact_urls("GET https://u:pw@h/x failed"), "GET https://u:<redacted>@h/x failed");
    }

    #[test]
    fn given_values_are_blanked_in_order() {
        // MongoDB errors: the password, its percent-encoded form, one taken out of a URI.
        let values = ["p@ss!".to_string(), "p%40ss%21".to_string(), String::new()];
        assert_eq!(
            redact_values("auth p@ss! in mongodb://u:p%40ss%21@h failed", &values),
            "auth <redacted> in mongodb://u:<redacted>@h failed"
        );
        assert_eq!(redact_values("nothing here", &values), "nothing here");
    }

    #[test]
    fn secrets_never_print_their_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "<redacted> <redacted>");
    }
}
