//! The standalone TOML configuration: parsed in one place into typed values, with every
//! refusal naming the file, the line and the reason.
//!
//! Covers the spec's standalone format (state_dir, storage dir or S3, encryption,
//! targets of all six types in URL or field form, jobs with cron/retention/retry/timeout,
//! max_parallel_jobs, maintenance window, health checks). Secret references are
//! resolved at load time, so a missing variable refuses the configuration at start
//! rather than failing a backup at 3 a.m. Unknown keys are refused, never ignored.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::crypto::{self, DataKey, Encryption, Recipient};
use crate::drivers::{Engine, Strategy, TargetSpec};
use crate::pipeline::Compression;
use crate::storage::check_key_segment;
use crate::storage::s3::S3Target;

/// A refused configuration: `file:line: reason`.
#[derive(Debug, thiserror::Error)]
#[error("{}{}: {reason}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    state_dir: Option<Spanned<String>>,
    storage: Option<Spanned<RawStorage>>,
    encryption: Option<Spanned<RawEncryption>>,
    #[serde(default)]
    targets: Vec<Spanned<RawTarget>>,
    #[serde(default)]
    jobs: Vec<Spanned<RawJob>>,
    max_parallel_jobs: Option<Spanned<u32>>,
    maintenance: Option<Spanned<RawMaintenance>>,
    #[serde(default)]
    health_checks: Vec<Spanned<RawHealthCheck>>,
    /// Seconds a graceful shutdown waits for running backups before cancelling them.
    shutdown_grace_sec: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMaintenance {
    start_utc: Spanned<String>,
    end_utc: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealthCheck {
    id: Spanned<String>,
    name: Option<String>,
    #[serde(rename = "type")]
    kind: Spanned<String>,
    target: Spanned<String>,
    interval_sec: Option<u32>,
    timeout_sec: Option<u32>,
    expected_status: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    max_attempts: Option<u32>,
    #[serde(default)]
    backoff_seconds: Vec<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    dir: Option<Spanned<String>>,
    /// Octal mode of stored objects and manifests in a storage directory ("0640").
    file_mode: Option<Spanned<String>>,
    s3: Option<Spanned<RawS3>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawS3 {
    endpoint: Spanned<String>,
    region: Option<String>,
    bucket: Spanned<String>,
    prefix: Option<String>,
    access_key_id: Spanned<String>,
    secret_access_key: Spanned<String>,
    session_token: Option<Spanned<String>>,
    path_style: Option<bool>,
    max_parts: Option<Spanned<u32>>,
    upload_concurrency: Option<Spanned<u32>>,
    part_size_mib: Option<Spanned<u64>>,
    ca_file: Option<String>,
    /// `{ mode = "governance" | "compliance", days = N }` (issue 20).
    object_lock: Option<Spanned<RawObjectLock>>,
    /// `[storage.s3.prune]`: the credentials for deletes only (issue 20).
    prune: Option<RawS3Prune>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawS3Prune {
    access_key_id: Spanned<String>,
    secret_access_key: Spanned<String>,
    session_token: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawObjectLock {
    mode: String,
    days: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEncryption {
    recipient: Option<Spanned<String>>,
    key_file: Option<Spanned<String>>,
    identity: Option<Spanned<String>>,
    format: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    id: Spanned<String>,
    #[serde(rename = "type")]
    kind: Spanned<String>,
    /// SQLite: the database file.
    path: Option<Spanned<String>>,
    /// `postgres://user@host:5432/db?sslmode=require` and the like.
    url: Option<Spanned<String>>,
    host: Option<String>,
    port: Option<Spanned<u16>>,
    database: Option<String>,
    username: Option<String>,
    password: Option<Spanned<String>>,
    /// A UNIX socket: PostgreSQL's socket directory, MySQL's and Redis's socket path.
    socket: Option<String>,
    /// Engine options (e.g. `sslmode`, `tls`, `authSource`), merged over the URL query.
    #[serde(default)]
    options: BTreeMap<String, String>,
    /// `docker_exec`: run the engine's tools inside `container` (issue 8).
    strategy: Option<Spanned<String>>,
    /// The container (name or id) of the `docker_exec` strategy.
    container: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    id: Spanned<String>,
    target: Spanned<String>,
    cron: Option<Spanned<String>>,
    compression: Option<Spanned<String>>,
    encryption: Option<Spanned<String>>,
    format: Option<Spanned<String>>,
    retention_days: Option<u32>,
    keep_last: Option<u32>,
    /// Grandfather-father-son retention (issue 20): see `retention::Rules`.
    keep_hourly: Option<u32>,
    keep_daily: Option<u32>,
    keep_weekly: Option<u32>,
    keep_monthly: Option<u32>,
    keep_yearly: Option<u32>,
    keep_within: Option<Spanned<String>>,
    /// The whole run's limit; 0 or absent = none.
    timeout_sec: Option<u64>,
    retry: Option<RawRetry>,
    #[serde(default)]
    pre_hooks: Vec<String>,
    #[serde(default)]
    post_hooks: Vec<String>,
    /// Seconds each hook may run (default 300).
    hook_timeout_sec: Option<u64>,
    /// Dead-man's-switch URL: pinged at `/start`, on success, and at `/fail`.
    notify_url: Option<Spanned<String>>,
    webhook_url: Option<Spanned<String>>,
    /// "failure" (default) or "always".
    webhook_on: Option<Spanned<String>>,
    /// Run once each time `run` starts (default false: wait for the first cron fire).
    #[serde(default)]
    run_on_start: bool,
}

/// A validated standalone configuration. Paths are absolute or relative to the
/// directory of the config file, already resolved.
#[derive(Debug)]
pub struct Config {
    pub file: PathBuf,
    pub state_dir: PathBuf,
    pub storage: StorageConfig,
    pub encryption: EncryptionConfig,
    pub targets: BTreeMap<String, TargetSpec>,
    pub jobs: Vec<Job>,
    pub max_parallel_jobs: usize,
    /// ("HH:MM", "HH:MM") UTC; scheduled runs do not start inside it.
    pub maintenance: Option<(String, String)>,
    pub health_checks: Vec<HealthCheck>,
    pub shutdown_grace: std::time::Duration,
    /// The mode of objects and manifests in a storage directory (`[storage] file_mode`,
    /// default [`crate::storage::dir::OBJECT_MODE`], 0640).
    pub storage_file_mode: u32,
    /// What is allowed but unwise, each with file:line; logged as warnings at load (so
    /// `check-config` shows them too).
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone)]
pub enum StorageConfig {
    Dir(PathBuf),
    S3(Box<S3Target>),
}

#[derive(Debug, Default)]
pub struct EncryptionConfig {
    pub recipient: Option<Recipient>,
    pub key_file: Option<PathBuf>,
    pub identity: Option<PathBuf>,
    pub format: FormatChoice,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FormatChoice {
    V1,
    #[default]
    V2,
}

#[derive(Debug, Clone)]
pub struct Job {
    pub id: String,
    pub target: String,
    pub cron: Option<String>,
    pub compression: Compression,
    /// `encryption = "none"`: the only way to store plaintext.
    pub plaintext: bool,
    pub format: Option<FormatChoice>,
    pub retention: crate::retention::Rules,
    pub timeout: Option<std::time::Duration>,
    pub retry: RetryConfig,
    /// Shell commands from the operator's own file: they run without an opt-in.
    pub pre_hooks: Vec<String>,
    pub post_hooks: Vec<String>,
    pub hook_timeout: std::time::Duration,
    pub notify: crate::notify::Notify,
    /// `run_on_start = true`: `run` runs the job once at every start.
    pub run_on_start: bool,
}

/// Retries of failed scheduled runs: `max_attempts` in all (1 = no retry), waiting
/// `backoff_seconds[k]` before attempt k+2 (the last value repeats).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryConfig {
    pub max_attempts: u32,
    pub backoff_seconds: Vec<u32>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self { max_attempts: 1, backoff_seconds: Vec::new() }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub id: String,
    pub name: String,
    /// "http", "https" or "tcp".
    pub kind: String,
    pub target: String,
    pub interval: std::time::Duration,
    pub timeout: std::time::Duration,
    /// 0 = any 2xx.
    pub expected_status: u32,
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: None,
            reason: format!("cannot read the configuration file: {e}"),
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let line_of =
            |span: std::ops::Range<usize>| text[..span.start.min(text.len())].matches('\n').count() + 1;
        let fail = |span: Option<std::ops::Range<usize>>, reason: String| ConfigError {
            file: path.to_path_buf(),
            line: span.map(line_of),
            reason,
        };
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| fail(e.span(), e.message().trim().to_string()))?;
        let resolve = |p: &str| {
            let p = Path::new(p);
            clean(&if p.is_absolute() { p.to_path_buf() } else { base.join(p) })
        };

        let state_dir = match &raw.state_dir {
            Some(s) => resolve(s.get_ref()),
            None => crate::env::Env::get().state_dir(),
        };
        let storage = raw
            .storage
            .as_ref()
            .ok_or_else(|| fail(None, "missing [storage] section (e.g. dir = \"./backups\")".into()))?;
        let storage_file_mode = match &storage.get_ref().file_mode {
            Some(m) => parse_file_mode(m.get_ref()).map_err(|e| fail(Some(m.span()), e))?,
            None => crate::storage::dir::OBJECT_MODE,
        };
        let storage = match (&storage.get_ref().dir, &storage.get_ref().s3) {
            (Some(d), None) if !d.get_ref().is_empty() => StorageConfig::Dir(resolve(d.get_ref())),
            (None, Some(s3)) => StorageConfig::S3(Box::new(parse_s3(s3, &resolve, &fail)?)),
            (Some(_), Some(_)) => {
                return Err(fail(
                    Some(storage.span()),
                    "[storage] takes dir or [storage.s3], not both".into(),
                ));
            }
            _ => {
                return Err(fail(
                    Some(storage.span()),
                    "[storage] needs dir = \"PATH\" or a [storage.s3] section".into(),
                ));
            }
        };

        let mut encryption = EncryptionConfig::default();
        if let Some(enc) = &raw.encryption {
            let e = enc.get_ref();
            if let Some(r) = &e.recipient {
                let value = match r.get_ref().strip_prefix("file:") {
                    Some(p) => std::fs::read_to_string(resolve(p)).map_err(|err| {
                        fail(
                            Some(r.span()),
                            format!("cannot read the recipient file {}: {err}", resolve(p).display()),
                        )
                    })?,
                    None => r.get_ref().clone(),
                };
                encryption.recipient =
                    Some(Recipient::parse(&value).map_err(|err| fail(Some(r.span()), err.to_string()))?);
            }
            encryption.key_file = e.key_file.as_ref().map(|k| resolve(k.get_ref()));
            encryption.identity = e.identity.as_ref().map(|k| resolve(k.get_ref()));
            if let Some(f) = &e.format {
                encryption.format = parse_format(f).map_err(|m| fail(Some(f.span()), m))?;
            }
            if encryption.recipient.is_some() && encryption.key_file.is_some() {
                return Err(fail(
                    Some(enc.span()),
                    "[encryption] takes recipient or key_file, not both".into(),
                ));
            }
            if encryption.format == FormatChoice::V1 && encryption.recipient.is_some() {
                return Err(fail(
                    Some(enc.span()),
                    "format v1 cannot seal to a recipient (it has no header for the sealed key); use format = \"v2\" or a key_file".into(),
                ));
            }
        }

        let mut targets = BTreeMap::new();
        for t in &raw.targets {
            let rt = t.get_ref();
            let id = rt.id.get_ref().clone();
            check_key_segment("target id", &id).map_err(|m| fail(Some(rt.id.span()), m))?;
            let engine = Engine::parse(rt.kind.get_ref()).ok_or_else(|| {
                fail(
                    Some(rt.kind.span()),
                    format!(
                        "unknown target type {:?} (expected postgresql, mysql, mariadb, mongodb, redis or sqlite)",
                        rt.kind.get_ref()
                    ),
                )
            })?;
            let spec = parse_target(&id, engine, rt, t.span(), &resolve, &fail)?;
            if targets.insert(id.clone(), spec).is_some() {
                return Err(fail(Some(rt.id.span()), format!("target id {id:?} is defined twice")));
            }
        }

        let mut warnings = Vec::new();
        let mut jobs = Vec::new();
        let mut seen = HashSet::new();
        for j in &raw.jobs {
            let rj = j.get_ref();
            let id = rj.id.get_ref().clone();
            check_key_segment("job id", &id).map_err(|m| fail(Some(rj.id.span()), m))?;
            if !seen.insert(id.clone()) {
                return Err(fail(Some(rj.id.span()), format!("job id {id:?} is defined twice")));
            }
            let target = rj.target.get_ref().clone();
            if !targets.contains_key(&target) {
                let known: Vec<&str> = targets.keys().map(String::as_str).collect();
                return Err(fail(
                    Some(rj.target.span()),
                    format!("job {id:?}: target {target:?} is not defined (known targets: {})", list(&known)),
                ));
            }
            let compression = match &rj.compression {
                Some(c) => Compression::parse(c.get_ref()).map_err(|m| fail(Some(c.span()), m))?,
                None => Compression::default(),
            };
            let plaintext = match &rj.encryption {
                None => false,
                Some(e) if e.get_ref() == "none" => true,
                Some(e) => {
                    return Err(fail(
                        Some(e.span()),
                        format!(
                            "job {id:?}: encryption = {:?} is not valid; the only value is \"none\" (encryption is on by default)",
                            e.get_ref()
                        ),
                    ));
                }
            };
            let format = match &rj.format {
                Some(f) => Some(parse_format(f).map_err(|m| fail(Some(f.span()), m))?),
                None => None,
            };
            if !plaintext {
                let fmt = format.unwrap_or(encryption.format);
                if encryption.recipient.is_none() && encryption.key_file.is_none() {
                    return Err(fail(
                        Some(j.span()),
                        format!(
                            "job {id:?} is encrypted (the default) but [encryption] names no recipient or key_file; \
                             run `backupy-agent keygen` and set recipient, or set encryption = \"none\" on the job"
                        ),
                    ));
                }
                if fmt == FormatChoice::V1 && encryption.recipient.is_some() {
                    return Err(fail(
                        Some(j.span()),
                        format!("job {id:?}: format v1 cannot seal to a recipient; use v2 or a key_file"),
                    ));
                }
            }
            if !plaintext
                && format.unwrap_or(encryption.format) == FormatChoice::V1
                && let Some(w) = v1_compression_warning(&id, compression)
            {
                let line = rj.compression.as_ref().map_or(j.span(), |c| c.span());
                warnings.push(format!("{}:{}: {w}", path.display(), line_of(line)));
            }
            if let Some(c) = &rj.cron {
                crate::scheduler::CronSchedule::parse(c.get_ref()).map_err(|why| {
                    fail(Some(c.span()), format!("job {id:?}: invalid cron {:?}: {why}", c.get_ref()))
                })?;
            }
            let retry = match &rj.retry {
                Some(r) => RetryConfig {
                    max_attempts: r.max_attempts.unwrap_or(1).max(1),
                    backoff_seconds: r.backoff_seconds.clone(),
                },
                None => RetryConfig::default(),
            };
            let notify = parse_notify(rj, &id, &fail)?;
            let keep_within = match &rj.keep_within {
                Some(w) => Some(
                    crate::retention::Within::parse(w.get_ref())
                        .map_err(|why| fail(Some(w.span()), format!("job {id:?}: {why}")))?,
                ),
                None => None,
            };
            jobs.push(Job {
                id,
                target,
                cron: rj.cron.as_ref().map(|c| c.get_ref().clone()),
                compression,
                plaintext,
                format,
                retention: crate::retention::Rules {
                    retention_days: rj.retention_days,
                    keep_last: rj.keep_last,
                    keep_hourly: rj.keep_hourly,
                    keep_daily: rj.keep_daily,
                    keep_weekly: rj.keep_weekly,
                    keep_monthly: rj.keep_monthly,
                    keep_yearly: rj.keep_yearly,
                    keep_within,
                },
                timeout: rj.timeout_sec.filter(|s| *s > 0).map(std::time::Duration::from_secs),
                retry,
                pre_hooks: rj.pre_hooks.clone(),
                post_hooks: rj.post_hooks.clone(),
                hook_timeout: rj
                    .hook_timeout_sec
                    .filter(|s| *s > 0)
                    .map_or(crate::hooks::DEFAULT_TIMEOUT, std::time::Duration::from_secs),
                notify,
                run_on_start: rj.run_on_start,
            });
        }
        let max_parallel_jobs = match &raw.max_parallel_jobs {
            Some(n) if !(1..=64).contains(n.get_ref()) => {
                return Err(fail(Some(n.span()), "max_parallel_jobs must be between 1 and 64".into()));
            }
            Some(n) => *n.get_ref() as usize,
            None => 2,
        };
        let maintenance = match &raw.maintenance {
            Some(m) => {
                let r = m.get_ref();
                for t in [&r.start_utc, &r.end_utc] {
                    if chrono::NaiveTime::parse_from_str(t.get_ref(), "%H:%M").is_err() {
                        return Err(fail(
                            Some(t.span()),
                            format!("{:?} is not a UTC time HH:MM", t.get_ref()),
                        ));
                    }
                }
                Some((r.start_utc.get_ref().clone(), r.end_utc.get_ref().clone()))
            }
            None => None,
        };
        let mut health_checks = Vec::new();
        for h in &raw.health_checks {
            health_checks.push(parse_health_check(h.get_ref(), &fail)?);
        }
        Ok(Config {
            file: path.to_path_buf(),
            state_dir,
            storage,
            encryption,
            targets,
            jobs,
            max_parallel_jobs,
            maintenance,
            health_checks,
            shutdown_grace: std::time::Duration::from_secs(raw.shutdown_grace_sec.unwrap_or(60)),
            storage_file_mode,
            warnings: {
                for w in &warnings {
                    log::warn!("{w}");
                }
                warnings
            },
        })
    }

    /// Opens the configured storage (creating a storage directory if needed).
    pub fn open_storage(&self) -> Result<crate::storage::Storage, String> {
        use crate::storage::{DirStorage, S3Storage, Storage};
        match &self.storage {
            StorageConfig::Dir(d) => DirStorage::open(d)
                .map(|d| Storage::Dir(d.with_file_mode(self.storage_file_mode)))
                .map_err(|e| e.to_string()),
            StorageConfig::S3(t) => {
                let s = S3Storage::new((**t).clone(), Some(&self.state_dir)).map_err(|e| e.to_string())?;
                if t.object_lock.is_some() {
                    s.check_object_lock().map_err(|e| e.to_string())?;
                }
                Ok(Storage::S3(s))
            }
        }
    }

    pub fn job(&self, id: &str) -> Option<&Job> {
        self.jobs.iter().find(|j| j.id == id)
    }

    /// The encryption a job's runs use. Fails closed: an unusable key is an error.
    pub fn encryption_for(&self, job: &Job) -> Result<Encryption, String> {
        if job.plaintext {
            return Ok(Encryption::None);
        }
        let format = job.format.unwrap_or(self.encryption.format);
        let chunk_size = crypto::v2::DEFAULT_CHUNK;
        if let Some(r) = &self.encryption.recipient {
            return Ok(Encryption::V2Recipient { recipient: r.clone(), chunk_size });
        }
        let path = self.encryption.key_file.as_ref().ok_or_else(|| {
            format!("job {}: no encryption key configured ([encryption] recipient or key_file)", job.id)
        })?;
        let key: DataKey =
            crypto::keys::read_raw_key_file(path).map_err(|e| format!("job {}: {e}", job.id))?;
        Ok(match format {
            FormatChoice::V1 => Encryption::V1 { key },
            FormatChoice::V2 => Encryption::V2Raw { key, chunk_size },
        })
    }
}

type Fail<'a> = dyn Fn(Option<std::ops::Range<usize>>, String) -> ConfigError + 'a;

fn parse_s3(
    s3: &Spanned<RawS3>,
    resolve: &dyn Fn(&str) -> PathBuf,
    fail: &Fail,
) -> Result<S3Target, ConfigError> {
    let r = s3.get_ref();
    let endpoint: url::Url = r.endpoint.get_ref().parse().map_err(|e| {
        fail(Some(r.endpoint.span()), format!("invalid S3 endpoint {:?}: {e}", r.endpoint.get_ref()))
    })?;
    match endpoint.scheme() {
        "https" => {}
        "http" => log::warn!(
            "S3 endpoint {endpoint} is plain http: credentials are signed but data travels unencrypted"
        ),
        other => {
            return Err(fail(
                Some(r.endpoint.span()),
                format!("S3 endpoint scheme {other:?} must be https or http"),
            ));
        }
    }
    let secret = |v: &Spanned<String>, what: &str| {
        crate::env::Env::get()
            .resolve_secret(v.get_ref())
            .map_err(|e| fail(Some(v.span()), format!("[storage.s3] {what}: {e}")))
    };
    let mut t = S3Target::new(
        endpoint,
        r.region.as_deref().unwrap_or("us-east-1"),
        r.bucket.get_ref(),
        secret(&r.access_key_id, "access_key_id")?,
        secret(&r.secret_access_key, "secret_access_key")?,
    );
    if r.bucket.get_ref().len() < 3 {
        return Err(fail(Some(r.bucket.span()), "an S3 bucket name has at least 3 characters".into()));
    }
    t.prefix = r.prefix.clone().unwrap_or_default();
    t.session_token = match &r.session_token {
        Some(tok) if !tok.get_ref().is_empty() => Some(secret(tok, "session_token")?),
        _ => None,
    };
    t.path_style = r.path_style.unwrap_or(true);
    if let Some(m) = &r.max_parts {
        if !(1..=10_000).contains(m.get_ref()) {
            return Err(fail(Some(m.span()), "max_parts must be between 1 and 10000".into()));
        }
        t.max_parts = *m.get_ref();
    }
    if let Some(c) = &r.upload_concurrency {
        if !(1..=64).contains(c.get_ref()) {
            return Err(fail(Some(c.span()), "upload_concurrency must be between 1 and 64".into()));
        }
        t.upload_concurrency = *c.get_ref() as usize;
    }
    if let Some(p) = &r.part_size_mib {
        if !(5..=5120).contains(p.get_ref()) {
            return Err(fail(
                Some(p.span()),
                "part_size_mib must be between 5 and 5120 (S3's part limits)".into(),
            ));
        }
        t.part_size = p.get_ref() << 20;
    }
    if let Some(l) = &r.object_lock {
        let raw = l.get_ref();
        let compliance = match raw.mode.as_str() {
            "governance" => false,
            "compliance" => true,
            other => {
                return Err(fail(
                    Some(l.span()),
                    format!(
                        "[storage.s3] object_lock mode {other:?} must be \"governance\" or \"compliance\""
                    ),
                ));
            }
        };
        if !(1..=36_500).contains(&raw.days) {
            return Err(fail(
                Some(l.span()),
                "[storage.s3] object_lock days must be between 1 and 36500".into(),
            ));
        }
        t.object_lock = Some(crate::storage::s3::ObjectLock { compliance, days: raw.days });
    }
    if let Some(p) = &r.prune {
        t.prune_credentials = Some(crate::storage::s3::PruneCredentials {
            access_key_id: secret(&p.access_key_id, "prune.access_key_id")?,
            secret_access_key: secret(&p.secret_access_key, "prune.secret_access_key")?,
            session_token: match &p.session_token {
                Some(tok) if !tok.get_ref().is_empty() => Some(secret(tok, "prune.session_token")?),
                _ => None,
            },
        });
    }
    t.ca_file = r.ca_file.as_deref().map(resolve);
    Ok(t)
}

/// A target from its URL form, its field form, or both (fields override the URL).
fn parse_target(
    id: &str,
    engine: Engine,
    rt: &RawTarget,
    span: std::ops::Range<usize>,
    resolve: &dyn Fn(&str) -> PathBuf,
    fail: &Fail,
) -> Result<TargetSpec, ConfigError> {
    let mut spec = TargetSpec::new(id, engine);
    let docker = docker_container(id, rt, span.clone(), fail)?;
    if let (Engine::Sqlite, Some(container)) = (engine, &docker) {
        // The path is the file's inside the container: nothing to resolve here.
        match &rt.path {
            Some(p) if p.get_ref().starts_with('/') => spec.database = p.get_ref().clone(),
            _ => {
                return Err(fail(
                    Some(span),
                    format!("sqlite target {id:?} needs path = \"/absolute/path/in/the/container\""),
                ));
            }
        }
        spec.strategy = Strategy::DockerExec { container: container.clone() };
        return Ok(spec);
    }
    if engine == Engine::Sqlite {
        let path = match &rt.path {
            Some(p) if !p.get_ref().is_empty() => resolve(p.get_ref()),
            _ => return Err(fail(Some(span), format!("sqlite target {id:?} needs path = \"FILE\""))),
        };
        if rt.url.is_some() || rt.host.is_some() || rt.socket.is_some() {
            return Err(fail(Some(span), format!("sqlite target {id:?} takes only path")));
        }
        spec.database = path.display().to_string();
        return Ok(spec);
    }
    if rt.path.is_some() {
        return Err(fail(
            Some(span),
            format!("target {id:?}: path is for sqlite targets; use url or host/socket"),
        ));
    }
    if let Some(u) = &rt.url {
        apply_url(&mut spec, u, fail)?;
    }
    if let Some(h) = &rt.host {
        spec.host = h.clone();
    }
    if let Some(p) = &rt.port {
        spec.port = *p.get_ref();
    }
    if let Some(d) = &rt.database {
        spec.database = d.clone();
    }
    if let Some(u) = &rt.username {
        spec.username = u.clone();
    }
    if let Some(p) = &rt.password {
        spec.password = Some(
            crate::env::Env::get()
                .resolve_secret(p.get_ref())
                .map_err(|e| fail(Some(p.span()), format!("target {id:?} password: {e}")))?,
        );
    }
    if let Some(sock) = &rt.socket {
        spec.strategy = Strategy::UnixSocket;
        spec.host = resolve(sock).display().to_string();
    }
    spec.options.extend(rt.options.clone());
    if let Some(container) = docker {
        // The tools run inside the container and find their server there by default.
        if rt.socket.is_some() {
            return Err(fail(
                Some(span),
                format!("target {id:?}: socket and strategy = \"docker_exec\" exclude each other"),
            ));
        }
        spec.strategy = Strategy::DockerExec { container };
        return Ok(spec);
    }
    if spec.host.is_empty() && engine != Engine::MongoDb {
        return Err(fail(Some(span), format!("target {id:?} needs url, host or socket")));
    }
    if spec.host.is_empty() && !spec.options.contains_key("uri") {
        return Err(fail(Some(span), format!("target {id:?} needs url or host")));
    }
    Ok(spec)
}

/// `strategy = "docker_exec"` with its `container`, or neither.
fn docker_container(
    id: &str,
    rt: &RawTarget,
    span: std::ops::Range<usize>,
    fail: &Fail,
) -> Result<Option<String>, ConfigError> {
    match (&rt.strategy, &rt.container) {
        (None, None) => Ok(None),
        (Some(s), container) if s.get_ref() == "docker_exec" => match container {
            Some(c) => crate::docker::names::check_container_ref(c.get_ref())
                .map(|()| Some(c.get_ref().clone()))
                .map_err(|m| fail(Some(c.span()), format!("target {id:?}: container: {m}"))),
            None => Err(fail(
                Some(span),
                format!("target {id:?}: strategy = \"docker_exec\" needs container = \"NAME\""),
            )),
        },
        (Some(s), _) if s.get_ref() == "tcp" && rt.container.is_none() => Ok(None),
        (Some(s), _) => Err(fail(
            Some(s.span()),
            format!(
                "target {id:?}: strategy {:?} is not one of docker_exec, tcp (a container needs docker_exec)",
                s.get_ref()
            ),
        )),
        (None, Some(c)) => {
            Err(fail(Some(c.span()), format!("target {id:?}: container needs strategy = \"docker_exec\"")))
        }
    }
}

fn apply_url(spec: &mut TargetSpec, u: &Spanned<String>, fail: &Fail) -> Result<(), ConfigError> {
    apply_url_str(spec, u.get_ref()).map_err(|m| fail(Some(u.span()), format!("target {:?}: {m}", spec.id)))
}

/// A target for `restore --to URL`; the password comes from the URL or, better, from
/// `BACKUPY_RESTORE_PASSWORD` (a secret reference like every password).
pub fn target_from_url(id: &str, engine: Engine, url: &str) -> Result<TargetSpec, String> {
    let mut spec = TargetSpec::new(id, engine);
    apply_url_str(&mut spec, url)?;
    if let Some(password) = crate::env::Env::get().restore_password()? {
        spec.password = Some(password);
    }
    Ok(spec)
}

fn apply_url_str(spec: &mut TargetSpec, raw: &str) -> Result<(), String> {
    let id = spec.id.clone();
    let url: url::Url = raw.parse().map_err(|e| format!("invalid url: {e}"))?;
    let allowed: &[&str] = match spec.engine {
        Engine::PostgreSql => &["postgres", "postgresql"],
        Engine::MySql | Engine::MariaDb => &["mysql", "mariadb"],
        Engine::MongoDb => &["mongodb", "mongodb+srv"],
        Engine::Redis => &["redis", "rediss"],
        Engine::Sqlite => &[],
    };
    if !allowed.contains(&url.scheme()) {
        return Err(format!("a {} url starts with {}://", spec.engine, allowed.join("://, ")));
    }
    if !url.password().unwrap_or("").is_empty() {
        log::warn!("target {id}: the url holds a password; prefer password = \"env:NAME\" (or file:)");
        spec.password = Some(crate::secrets::Secret::new(percent_decode(url.password().unwrap_or(""))));
    }
    spec.username = percent_decode(url.username());
    spec.host = url.host_str().unwrap_or("").trim_start_matches('[').trim_end_matches(']').to_string();
    spec.port = url.port().unwrap_or(0);
    spec.database = percent_decode(url.path().trim_start_matches('/'));
    for (k, v) in url.query_pairs() {
        spec.options.insert(k.into_owned(), v.into_owned());
    }
    match spec.engine {
        Engine::Redis if url.scheme() == "rediss" => {
            spec.options.insert("tls".into(), "true".into());
        }
        // mongodb+srv and replica-set URIs carry more than host/port: the driver takes
        // the URI as written (without its password, which travels separately).
        Engine::MongoDb => {
            let mut clean = url.clone();
            let _ = clean.set_password(None);
            spec.options.insert("uri".into(), clean.to_string());
        }
        _ => {}
    }
    Ok(())
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

fn parse_health_check(h: &RawHealthCheck, fail: &Fail) -> Result<HealthCheck, ConfigError> {
    let id = h.id.get_ref().clone();
    check_key_segment("health check id", &id).map_err(|m| fail(Some(h.id.span()), m))?;
    let kind = h.kind.get_ref().to_ascii_lowercase();
    let target = h.target.get_ref().clone();
    match kind.as_str() {
        "http" | "https" => {
            let url: url::Url = target
                .parse()
                .map_err(|e| fail(Some(h.target.span()), format!("health check {id:?}: invalid URL: {e}")))?;
            if url.scheme() != kind {
                return Err(fail(
                    Some(h.target.span()),
                    format!("health check {id:?}: a {kind} check needs a {kind}:// URL"),
                ));
            }
        }
        "tcp" => {
            let ok = target
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !ok {
                return Err(fail(
                    Some(h.target.span()),
                    format!("health check {id:?}: a tcp check needs host:port"),
                ));
            }
        }
        other => {
            return Err(fail(
                Some(h.kind.span()),
                format!("health check {id:?}: unknown type {other:?} (http, https or tcp)"),
            ));
        }
    }
    if let Some(s) = &h.expected_status
        && !(100..=599).contains(s.get_ref())
    {
        return Err(fail(
            Some(s.span()),
            format!("health check {id:?}: expected_status must be an HTTP status"),
        ));
    }
    let secs = |v: Option<u32>, default: u64| {
        std::time::Duration::from_secs(v.filter(|v| *v > 0).map_or(default, u64::from))
    };
    Ok(HealthCheck {
        id,
        name: h.name.clone().unwrap_or_default(),
        kind,
        target,
        interval: secs(h.interval_sec, 60),
        timeout: secs(h.timeout_sec, 10),
        expected_status: h.expected_status.as_ref().map_or(0, |s| *s.get_ref()),
    })
}

fn parse_notify(rj: &RawJob, id: &str, fail: &Fail) -> Result<crate::notify::Notify, ConfigError> {
    let url = |u: &Option<Spanned<String>>, what: &str| -> Result<Option<String>, ConfigError> {
        let Some(u) = u else { return Ok(None) };
        let parsed: url::Url = u.get_ref().parse().map_err(|e| {
            fail(Some(u.span()), format!("job {id:?}: invalid {what} {:?}: {e}", u.get_ref()))
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(fail(Some(u.span()), format!("job {id:?}: {what} must be an http(s) URL")));
        }
        Ok(Some(u.get_ref().clone()))
    };
    let webhook_always = match &rj.webhook_on {
        None => false,
        Some(w) if w.get_ref() == "failure" => false,
        Some(w) if w.get_ref() == "always" => true,
        Some(w) => {
            return Err(fail(
                Some(w.span()),
                format!("job {id:?}: webhook_on must be \"failure\" or \"always\""),
            ));
        }
    };
    Ok(crate::notify::Notify {
        ping_url: url(&rj.notify_url, "notify_url")?,
        webhook_url: url(&rj.webhook_url, "webhook_url")?,
        webhook_always,
    })
}

/// The warning for a v1 job whose compression the original Go `backupy-decrypt` cannot
/// undo: it always zstd-decodes a v1 object, so gzip or no compression makes it hang
/// (issue 16). Allowed, since this agent's own `backupy-decrypt` opens it.
pub fn v1_compression_warning(job: &str, compression: Compression) -> Option<String> {
    match compression {
        Compression::Zstd { .. } => None,
        other => Some(format!(
            "job {job:?}: format v1 with compression {:?}: the original Go backupy-decrypt always \
             zstd-decodes v1 objects and cannot open (hangs on) this one; only this agent's \
             backupy-decrypt can. Use compression = \"zstd\" or format = \"v2\"",
            other.name()
        )),
    }
}

/// `[storage] file_mode`: octal, at most 0777, and the owner must read and write.
fn parse_file_mode(s: &str) -> Result<u32, String> {
    let mode = u32::from_str_radix(s.trim(), 8)
        .map_err(|_| format!("[storage] file_mode {s:?} is not an octal mode such as \"0640\""))?;
    if mode > 0o777 || mode & 0o600 != 0o600 {
        return Err(format!(
            "[storage] file_mode {s:?} must be at most 0777 and let the owner read and write (e.g. \"0640\" or \"0600\")"
        ));
    }
    Ok(mode)
}

fn parse_format(f: &Spanned<String>) -> Result<FormatChoice, String> {
    match f.get_ref().as_str() {
        "v1" => Ok(FormatChoice::V1),
        "v2" => Ok(FormatChoice::V2),
        other => Err(format!("unknown encryption format {other:?} (expected \"v1\" or \"v2\")")),
    }
}

/// Removes `.` and `name/..` lexically, so messages show `backups/x`, not
/// `examples/../backups/x`.
fn clean(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir if matches!(out.components().next_back(), Some(Component::Normal(_))) => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    if out.as_os_str().is_empty() { PathBuf::from(".") } else { out }
}

fn list(items: &[&str]) -> String {
    if items.is_empty() { "none".into() } else { items.join(", ") }
}
