//! PostgreSQL: `pg_dump --format=custom` of one database as a child process, over TCP or
//! a UNIX socket, and `pg_restore` back into a given database.
//!
//! Before the dump starts, the driver connects with the `postgres` crate: a wrong
//! password, an unreachable server or a missing database fails there with a clear error,
//! and the same connection reads the server version (`SHOW server_version`) and the
//! database size (`pg_database_size`, the progress estimate).
//!
//! The password reaches `pg_dump`/`pg_restore` only through a 0600 passfile in a private
//! 0700 directory under the run's temp dir (`PGPASSFILE`), never argv and never the
//! child's environment; the directory is removed when the pipeline's `Source` is dropped.
//! Everything else goes into one libpq connection string (`--dbname=…`), so database
//! names that look like options or contain `=` are safe.
//!
//! Tools are looked up in `BACKUPY_TOOL_PATH` (a `PATH`-style list of directories) when
//! that variable is set, and only there; otherwise in `/usr/lib/postgresql/<major>/bin`,
//! newest major first (a newer `pg_dump` dumps every older server), then on `PATH`.
//!
//! `sslmode` (from the target's options) is passed to the tools as it is. The version
//! query has no TLS connector in this build: with `disable`, `allow` or `prefer` it runs
//! in plaintext; with `require`, `verify-ca` or `verify-full` the dump is refused with an
//! error that says so.

use std::ffi::OsString;
use std::io::Read;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

pub mod content;

use super::exec::{self, PrivateDir};
use super::{DriverError, Dump, DumpContext, Engine, MAGIC_LEN, Strategy, TargetSpec, check_magic};
use crate::cancel::Cancel;
use crate::pipeline::Source;
use crate::secrets::Secret;

/// Port used when the target gives none.
pub const DEFAULT_PORT: u16 = 5432;
/// How long a connection attempt (the pre-check and the tools') may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The variable that replaces the tool search path (tests, unusual installs).
pub const TOOL_PATH_VAR: &str = "BACKUPY_TOOL_PATH";

const SSL_MODES: &[&str] = &["disable", "allow", "prefer", "require", "verify-ca", "verify-full"];

/// How `pg_restore` treats the target database.
#[derive(Debug, Clone, Default)]
pub struct PgRestoreOptions {
    /// Drop each object before creating it (`--clean --if-exists`).
    pub clean: bool,
    /// Create the database named in the dump first (`--create`); the target's
    /// `database` is then only the one connected to initially (e.g. `postgres`).
    pub create: bool,
    /// Do not restore object ownership (`--no-owner`): every object then belongs to the
    /// restoring user.
    pub no_owner: bool,
    /// Where the private passfile directory goes; the system temp dir when `None`.
    pub temp_dir: Option<PathBuf>,
    /// Restore in one transaction (`--single-transaction`): a failure, or a kill because
    /// the input failed, leaves the database as it was. Not with `create`.
    pub single_transaction: bool,
    /// Stops pg_restore at once when set (its group is killed; with
    /// `single_transaction` nothing is committed).
    pub cancel: Option<Cancel>,
}

/// What the server said before the dump started.
struct ServerInfo {
    version: String,
    size: Option<u64>,
}

/// Starts `pg_dump` for `spec`; the returned source carries the `PGDMP` magic check, the
/// database size as its progress estimate, and the passfile directory as its guard.
pub fn dump(spec: &TargetSpec, ctx: &DumpContext) -> Result<Dump, DriverError> {
    let err = |m: String| DriverError::new(&spec.id, m);
    let sslmode = ssl_mode(spec)?;
    let pg_dump = find_pg_tool("pg_dump").ok_or_else(|| err(missing_tool("pg_dump")))?;
    let info = server_info(spec, &sslmode)?;

    let dir = PrivateDir::new(&ctx.temp_dir)
        .map_err(|e| err(format!("cannot create a private directory in {}: {e}", ctx.temp_dir.display())))?;
    let mut cmd = exec::tool_command(&pg_dump);
    configure_auth(&mut cmd, spec, &dir)?;
    cmd.arg("--format=custom").arg("--no-password");
    if ctx.pipeline_compresses {
        cmd.arg("--compress=0");
    }
    // Issue 19: pg_dump dumps the snapshot of a transaction that counts its rows for the
    // manifest's `content` (server_info above refused the modes that need TLS).
    let mode = if sslmode == "disable" {
        postgres::config::SslMode::Disable
    } else {
        postgres::config::SslMode::Prefer
    };
    // A server that cannot export a snapshot still gets its backup, without counts.
    let snapshot = content::begin(spec, &content::client_config(spec, &spec.database, mode), &info.version)
        .map_err(|e| log::warn!("{e}; pg_dump takes its own snapshot and the manifest gets no content block"))
        .ok();
    if let Some(s) = &snapshot {
        cmd.arg(format!("--snapshot={}", s.id));
    }
    cmd.arg(format!("--dbname={}", conninfo(spec, &spec.database, &sslmode)));

    let source = Source::spawn("pg_dump", cmd).map_err(|e| err(format!("{e} ({})", pg_dump.display())))?;
    let counting = match snapshot {
        Some(s) => Some(
            s.count_into(&spec.id, source.content_slot())
                .map_err(|e| err(format!("cannot start the row count: {e}")))?,
        ),
        None => None,
    };
    Ok(Dump {
        source: source
            .with_magic(MAGIC_LEN, Box::new(|head| check_magic(Engine::PostgreSql, head)))
            .with_size_hint(info.size)
            .with_guard(dir)
            .with_guard(counting),
        engine_version: info.version,
    })
}

/// Restores a custom-format dump read from `input` with `pg_restore` into the target's
/// database (or, with `create`, into the database the dump names). Stops at the first
/// error; the error carries `pg_restore`'s stderr tail.
pub fn restore(spec: &TargetSpec, input: &mut dyn Read, opts: &PgRestoreOptions) -> Result<(), DriverError> {
    let err = |m: String| DriverError::new(&spec.id, m);
    let sslmode = ssl_mode(spec)?;
    let pg_restore = find_pg_tool("pg_restore").ok_or_else(|| err(missing_tool("pg_restore")))?;
    if spec.database.is_empty() {
        return Err(err("pg_restore needs a database to connect to (the target has none)".into()));
    }
    let dir = opts.temp_dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = PrivateDir::new(&dir)
        .map_err(|e| err(format!("cannot create a private directory in {}: {e}", dir.display())))?;
    let mut cmd = exec::tool_command(&pg_restore);
    configure_auth(&mut cmd, spec, &dir)?;
    cmd.arg("--no-password").arg("--exit-on-error");
    if opts.clean {
        cmd.arg("--clean").arg("--if-exists");
    }
    if opts.create {
        cmd.arg("--create");
    }
    if opts.no_owner {
        cmd.arg("--no-owner");
    }
    if opts.single_transaction && !opts.create {
        cmd.arg("--single-transaction");
    }
    cmd.arg(format!("--dbname={}", conninfo(spec, &spec.database, &sslmode)));
    // `dir` (the passfile) lives until pg_restore has exited.
    exec::feed_until("pg_restore", cmd, input, opts.cancel.as_ref()).map_err(err)
}

/// `pg_dump <version>` when a `pg_dump` that runs is found here, for the agent's
/// capabilities; `None` otherwise.
pub fn capability() -> Option<String> {
    let tool = find_pg_tool("pg_dump")?;
    let out = exec::tool_command(&tool).arg("--version").output().ok()?;
    if !out.status.success() {
        return None;
    }
    // "pg_dump (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)"
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.split_whitespace().nth(2)?;
    Some(format!("pg_dump {version}"))
}

/// "PostgreSQL 15.19" from a `server_version` such as "15.19 (Debian 15.19-0+deb12u1)".
pub fn engine_version(server_version: &str) -> String {
    let number = server_version.split_whitespace().next().unwrap_or(server_version);
    format!("PostgreSQL {number}")
}

fn ssl_mode(spec: &TargetSpec) -> Result<String, DriverError> {
    let mode = spec.options.get("sslmode").map(|s| s.trim().to_ascii_lowercase());
    match mode {
        None => Ok("prefer".into()),
        Some(m) if SSL_MODES.contains(&m.as_str()) => Ok(m),
        Some(m) => {
            Err(DriverError::new(&spec.id, format!("sslmode {m:?} is not one of {}", SSL_MODES.join(", "))))
        }
    }
}

/// Where the server is, for messages: "127.0.0.1:5432" or "socket /run/postgresql".
fn describe_server(spec: &TargetSpec) -> String {
    match spec.strategy {
        Strategy::UnixSocket => {
            format!("the socket in {} (port {})", socket_dir(spec), port(spec))
        }
        _ => format!("{}:{}", host(spec), port(spec)),
    }
}

fn host(spec: &TargetSpec) -> &str {
    if spec.host.is_empty() { "localhost" } else { &spec.host }
}

fn socket_dir(spec: &TargetSpec) -> &str {
    if spec.host.is_empty() { "/var/run/postgresql" } else { &spec.host }
}

fn port(spec: &TargetSpec) -> u16 {
    if spec.port == 0 { DEFAULT_PORT } else { spec.port }
}

/// Connects with the `postgres` crate and reads the version and database size.
fn server_info(spec: &TargetSpec, sslmode: &str) -> Result<ServerInfo, DriverError> {
    let err = |m: String| DriverError::new(&spec.id, m);
    let mode = match sslmode {
        "disable" => postgres::config::SslMode::Disable,
        "allow" | "prefer" => postgres::config::SslMode::Prefer,
        other => {
            return Err(err(format!(
                "sslmode={other} needs TLS for the server-version query, which this build cannot do yet; \
                 use sslmode=prefer or disable"
            )));
        }
    };
    if spec.database.is_empty() {
        return Err(err("a PostgreSQL target needs a database name (pg_dump dumps one database)".into()));
    }
    let mut config = postgres::Config::new();
    match spec.strategy {
        Strategy::UnixSocket => config.host_path(socket_dir(spec)),
        _ => config.host(host(spec)),
    };
    config
        .port(port(spec))
        .user(if spec.username.is_empty() { "postgres" } else { &spec.username })
        .dbname(&spec.database)
        .ssl_mode(mode)
        .connect_timeout(CONNECT_TIMEOUT)
        .application_name("backupy-agent");
    if let Some(pw) = &spec.password {
        config.password(pw.expose());
    }
    let mut client = config.connect(postgres::NoTls).map_err(|e| err(connect_error(spec, &e)))?;
    let version: String = client
        .query_one("SHOW server_version", &[])
        .and_then(|row| row.try_get(0))
        .map_err(|e| err(format!("cannot read the server version: {}", pg_error_text(&e))))?;
    let size = client
        .query_one("SELECT pg_database_size(current_database())", &[])
        .and_then(|row| row.try_get::<_, i64>(0))
        .ok()
        .and_then(|n| u64::try_from(n).ok());
    Ok(ServerInfo { version: engine_version(&version), size })
}

fn connect_error(spec: &TargetSpec, e: &postgres::Error) -> String {
    use postgres::error::SqlState;
    let server = describe_server(spec);
    let user = if spec.username.is_empty() { "postgres" } else { &spec.username };
    match e.code() {
        Some(c)
            if *c == SqlState::INVALID_PASSWORD || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION =>
        {
            format!("PostgreSQL at {server} refused user {user:?}: {}", pg_error_text(e))
        }
        Some(c) if *c == SqlState::INVALID_CATALOG_NAME => {
            format!("database {:?} does not exist on PostgreSQL at {server}", spec.database)
        }
        _ => format!("cannot connect to PostgreSQL at {server}: {}", pg_error_text(e)),
    }
}

/// A `postgres::Error` with its causes ("error connecting to server: Connection refused").
fn pg_error_text(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return db.message().to_string();
    }
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Writes the passfile (when there is a password) and points the child at it. HOME is
/// the private directory too, so no `~/.pgpass` or service file of the agent's user
/// takes part.
fn configure_auth(cmd: &mut Command, spec: &TargetSpec, dir: &PrivateDir) -> Result<(), DriverError> {
    cmd.env("HOME", dir.path());
    cmd.env("PGCONNECT_TIMEOUT", CONNECT_TIMEOUT.as_secs().to_string());
    if let Some(pw) = &spec.password {
        if pw.expose().contains(['\n', '\r']) {
            return Err(DriverError::new(
                &spec.id,
                "the password contains a line break, which a passfile cannot hold",
            ));
        }
        let line = Secret::new(format!("*:*:*:*:{}\n", passfile_escape(pw.expose())));
        let path = dir
            .write_secret("pgpass", &line)
            .map_err(|e| DriverError::new(&spec.id, format!("cannot write the passfile: {e}")))?;
        cmd.env("PGPASSFILE", path);
    }
    Ok(())
}

/// A passfile field: `\` and `:` are escaped with a backslash.
fn passfile_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for c in s.chars() {
        if c == '\\' || c == ':' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A libpq connection string for `database` (no password: that is in the passfile).
fn conninfo(spec: &TargetSpec, database: &str, sslmode: &str) -> String {
    let host = match spec.strategy {
        Strategy::UnixSocket => socket_dir(spec),
        _ => host(spec),
    };
    let mut parts = vec![
        format!("host={}", conninfo_quote(host)),
        format!("port={}", port(spec)),
        format!("dbname={}", conninfo_quote(database)),
        format!("sslmode={sslmode}"),
        format!("connect_timeout={}", CONNECT_TIMEOUT.as_secs()),
        "application_name=backupy-agent".to_string(),
    ];
    if !spec.username.is_empty() {
        parts.push(format!("user={}", conninfo_quote(&spec.username)));
    }
    for key in ["sslrootcert", "sslcert", "sslkey"] {
        if let Some(v) = spec.options.get(key) {
            parts.push(format!("{key}={}", conninfo_quote(v)));
        }
    }
    parts.join(" ")
}

/// A conninfo value in single quotes, `'` and `\` escaped with a backslash.
fn conninfo_quote(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('\'');
    for c in v.chars() {
        if c == '\'' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// The first `name` found: in `BACKUPY_TOOL_PATH` only, when it is set; otherwise in
/// `/usr/lib/postgresql/<major>/bin` (newest first), then on `PATH`.
pub fn find_pg_tool(name: &str) -> Option<PathBuf> {
    if let Some(path) = crate::env::Env::get().tool_path.clone() {
        return find_in(&path, &[name]);
    }
    let mut majors: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse::<u32>().ok()?, e.path().join("bin"))))
        .collect();
    majors.sort_by_key(|(major, _)| std::cmp::Reverse(*major));
    let versioned = std::env::join_paths(majors.into_iter().map(|(_, p)| p)).unwrap_or_default();
    find_in(&versioned, &[name]).or_else(|| exec::find_tool(&[name]))
}

/// The first of `names` in the directories of the `PATH`-style list `path`.
pub(crate) fn find_in(path: &OsString, names: &[&str]) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    names.iter().find_map(|name| {
        std::env::split_paths(path)
            .filter(|d| !d.as_os_str().is_empty())
            .map(|dir| dir.join(name))
            .find(|p| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
    })
}

fn missing_tool(tool: &str) -> String {
    let place = match crate::env::Env::get().tool_path.clone() {
        Some(p) => format!("in {TOOL_PATH_VAR}={}", p.to_string_lossy()),
        None => "on PATH or in /usr/lib/postgresql/*/bin".to_string(),
    };
    format!(
        "{tool} was not found {place}; install the PostgreSQL client tools, at least as new as the \
         server (Debian/Ubuntu: apt-get install postgresql-client; Alpine: apk add postgresql-client; \
         RHEL: dnf install postgresql)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_version_drops_the_distribution_suffix() {
        assert_eq!(engine_version("15.19 (Debian 15.19-0+deb12u1)"), "PostgreSQL 15.19");
        assert_eq!(engine_version("16.2"), "PostgreSQL 16.2");
        assert_eq!(engine_version("17beta1"), "PostgreSQL 17beta1");
    }

    #[test]
    fn passfile_and_conninfo_values_are_escaped() {
        assert_eq!(passfile_escape(r"a:b\c"), r"a\:b\\c");
        assert_eq!(conninfo_quote(r"it's a\b"), r"'it\'s a\\b'");
        let mut spec = TargetSpec::new("t", Engine::PostgreSql);
        spec.host = "db.example".into();
        spec.database = "--create x=y".into();
        spec.username = "backup".into();
        spec.password = Some(Secret::new("hunter2"));
        let c = conninfo(&spec, &spec.database, "require");
        assert_eq!(
            c,
            "host='db.example' port=5432 dbname='--create x=y' sslmode=require connect_timeout=10 \
             application_name=backupy-agent user='backup'"
        );
        assert!(!c.contains("hunter2"));
    }

    #[test]
    fn sslmode_is_checked() {
        let mut spec = TargetSpec::new("t", Engine::PostgreSql);
        assert_eq!(ssl_mode(&spec).unwrap(), "prefer");
        spec.options.insert("sslmode".into(), "Verify-Full".into());
        assert_eq!(ssl_mode(&spec).unwrap(), "verify-full");
        spec.options.insert("sslmode".into(), "sometimes".into());
        assert!(ssl_mode(&spec).unwrap_err().to_string().contains("not one of"));
    }
}
