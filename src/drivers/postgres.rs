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
//! TLS (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`, `sslpassword` from the target's
//! options or URL query) is the same for both connections. The agent's own connection
//! uses rustls through [`tls`](super::tls) (`prefer` and `allow` upgrade to TLS whenever
//! the server offers it and fail if the handshake fails: no silent plaintext fallback);
//! the tools get the same keys in their conninfo. `sslpassword` is key material, so it
//! never goes in argv: it reaches libpq through a 0600 service file (`PGSERVICEFILE`,
//! `service=backupy` in the conninfo) next to the passfile, and the agent's connection
//! decrypts the key with `openssl pkey`, the password again in a 0600 file. Over a UNIX
//! socket TLS does not apply (as in libpq).

use std::ffi::OsString;
use std::io::Read;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

pub mod content;

use super::exec::{self, PrivateDir};
use super::tls::{ClientKey, DbTls, Verify};
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

/// The service name in the private `PGSERVICEFILE` (sslpassword lives there).
const PG_SERVICE: &str = "backupy";

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
    let ssl = ssl_settings(spec)?;
    let pg_dump = find_pg_tool("pg_dump").ok_or_else(|| err(missing_tool("pg_dump")))?;
    let dir = PrivateDir::new(&ctx.temp_dir)
        .map_err(|e| err(format!("cannot create a private directory in {}: {e}", ctx.temp_dir.display())))?;
    let info = server_info(spec, &ssl, &dir)?;

    let mut cmd = exec::tool_command(&pg_dump);
    configure_auth(&mut cmd, spec, &dir, &ssl)?;
    cmd.arg("--format=custom").arg("--no-password");
    if ctx.pipeline_compresses {
        cmd.arg("--compress=0");
    }
    // Issue 19: pg_dump dumps the snapshot of a transaction that counts its rows for the
    // manifest's `content`, on a connection of its own with the target's TLS settings.
    // A server that cannot export a snapshot still gets its backup, without counts.
    let snapshot = agent_connect(spec, &spec.database, &ssl, &dir)
        .and_then(|client| content::begin(spec, client, &info.version))
        .map_err(|e| log::warn!("{e}; pg_dump takes its own snapshot and the manifest gets no content block"))
        .ok();
    if let Some(s) = &snapshot {
        cmd.arg(format!("--snapshot={}", s.id));
    }
    cmd.arg(format!("--dbname={}", conninfo(spec, &spec.database, &ssl)));

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
    let ssl = ssl_settings(spec)?;
    let pg_restore = find_pg_tool("pg_restore").ok_or_else(|| err(missing_tool("pg_restore")))?;
    if spec.database.is_empty() {
        return Err(err("pg_restore needs a database to connect to (the target has none)".into()));
    }
    let dir = opts.temp_dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = PrivateDir::new(&dir)
        .map_err(|e| err(format!("cannot create a private directory in {}: {e}", dir.display())))?;
    let mut cmd = exec::tool_command(&pg_restore);
    configure_auth(&mut cmd, spec, &dir, &ssl)?;
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
    cmd.arg(format!("--dbname={}", conninfo(spec, &spec.database, &ssl)));
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

/// A target's TLS settings, checked once and shared by both connections.
pub(crate) struct PgSsl {
    /// As libpq spells it (lower case).
    mode: String,
    /// `sslrootcert`: a CA file, or `system` (the built-in roots; libpq ≥ 16 for the tools).
    rootcert: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    /// `sslpassword`, resolved like every secret reference (env:, file:, a name).
    key_password: Option<Secret>,
}

impl PgSsl {
    /// The agent's own connection: the `postgres` crate's mode and how much is verified.
    /// `allow` is treated as `prefer` (TLS when offered): stricter, never weaker. As in
    /// libpq, `require` with a CA file checks the chain (verify-ca).
    fn agent_mode(&self) -> (postgres::config::SslMode, Verify) {
        use postgres::config::SslMode;
        match self.mode.as_str() {
            "disable" => (SslMode::Disable, Verify::Off),
            "allow" | "prefer" => (SslMode::Prefer, Verify::Off),
            "require" if self.rootcert.is_some() => (SslMode::Require, Verify::Chain),
            "require" => (SslMode::Require, Verify::Off),
            "verify-ca" => (SslMode::Require, Verify::Chain),
            _ => (SslMode::Require, Verify::Full),
        }
    }
}

pub(crate) fn ssl_settings(spec: &TargetSpec) -> Result<PgSsl, DriverError> {
    let err = |m: String| DriverError::new(&spec.id, m);
    let mode = ssl_mode(spec)?;
    let opt = |k: &str| spec.options.get(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
    let rootcert = opt("sslrootcert");
    if mode.starts_with("verify-") && rootcert.is_none() {
        return Err(err(format!(
            "sslmode={mode} needs sslrootcert: the CA file that signed the server's certificate, or \
             \"system\" for the built-in public roots (the tools need libpq 16 or newer for that)"
        )));
    }
    let key_password = match spec.options.get("sslpassword") {
        Some(r) => {
            Some(crate::env::Env::get().resolve_secret(r).map_err(|e| err(format!("sslpassword: {e}")))?)
        }
        None => None,
    };
    if key_password.as_ref().is_some_and(|p| p.expose().contains(['\n', '\r'])) {
        return Err(err("sslpassword contains a line break, which a service file cannot hold".into()));
    }
    let ssl = PgSsl { mode, rootcert, cert: opt("sslcert"), key: opt("sslkey"), key_password };
    if ssl.cert.is_some() != ssl.key.is_some() {
        return Err(err("sslcert and sslkey go together: give both or neither".into()));
    }
    Ok(ssl)
}

/// The rustls side of `ssl` for the agent's connection; an encrypted key is decrypted
/// into memory with `openssl pkey`, its password in a 0600 file in `dir`.
fn agent_tls(ssl: &PgSsl, verify: Verify, dir: &PrivateDir) -> Result<DbTls, String> {
    let mut t = DbTls::new(verify);
    t.ca_file = ssl.rootcert.as_deref().filter(|r| *r != "system").map(PathBuf::from);
    t.client_cert = ssl.cert.as_deref().map(PathBuf::from);
    t.client_key = match (&ssl.key, &ssl.key_password) {
        (None, _) => None,
        (Some(k), None) => Some(ClientKey::File(PathBuf::from(k))),
        (Some(k), Some(pw)) => Some(ClientKey::Pem(decrypt_key(std::path::Path::new(k), pw, dir)?)),
    };
    Ok(t)
}

/// `openssl pkey -in KEY -passin file:F`: the key in PEM, unencrypted, in memory only.
fn decrypt_key(key: &std::path::Path, password: &Secret, dir: &PrivateDir) -> Result<Secret, String> {
    let openssl = exec::find_tool(&["openssl"]).ok_or_else(|| {
        "sslpassword needs the openssl command to decrypt sslkey for the agent's own connection; \
         install openssl, or give an unencrypted key"
            .to_string()
    })?;
    let pass = dir
        .write_secret("sslkey-pass", &Secret::new(format!("{}\n", password.expose())))
        .map_err(|e| format!("cannot write the key password file: {e}"))?;
    let out = exec::tool_command(&openssl)
        .arg("pkey")
        .arg("-in")
        .arg(key)
        .arg("-passin")
        .arg(format!("file:{}", pass.display()))
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", openssl.display()))?;
    let _ = std::fs::remove_file(&pass);
    let pem = Secret::new(String::from_utf8_lossy(&out.stdout).into_owned());
    if !out.status.success() || pem.is_empty() {
        let why = String::from_utf8_lossy(&out.stderr);
        let why = why.lines().next().unwrap_or("").trim();
        return Err(format!(
            "cannot decrypt sslkey {} with sslpassword (wrong password?): {why}",
            key.display()
        ));
    }
    Ok(pem)
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

/// Connects with the `postgres` crate (TLS as `ssl` says) and reads the version and
/// database size.
/// The agent's own connection to `database` on `spec`'s server (the version check, the
/// snapshot whose rows the manifest counts, a drill's scratch database): over the UNIX
/// socket, or TCP with rustls as the target's sslmode says; `prefer` never retries in
/// plaintext after a failed handshake. `dir` holds a decrypted client key, if any.
pub(crate) fn agent_connect(
    spec: &TargetSpec,
    database: &str,
    ssl: &PgSsl,
    dir: &PrivateDir,
) -> Result<postgres::Client, DriverError> {
    let err = |m: String| DriverError::new(&spec.id, m);
    let unix = matches!(spec.strategy, Strategy::UnixSocket);
    // libpq ignores sslmode on a UNIX socket; so does the agent.
    let (mode, verify) =
        if unix { (postgres::config::SslMode::Disable, Verify::Off) } else { ssl.agent_mode() };
    let mut config = postgres::Config::new();
    if unix {
        config.host_path(socket_dir(spec));
    } else {
        config.host(host(spec));
    }
    config
        .port(port(spec))
        .user(if spec.username.is_empty() { "postgres" } else { &spec.username })
        .dbname(database)
        .ssl_mode(mode)
        .connect_timeout(CONNECT_TIMEOUT)
        .application_name("backupy-agent");
    if let Some(pw) = &spec.password {
        config.password(pw.expose());
    }
    let client = if mode == postgres::config::SslMode::Disable {
        config.connect(postgres::NoTls).map_err(|e| err(connect_error(spec, ssl, &e)))?
    } else {
        let tls = agent_tls(ssl, verify, dir).map_err(|m| err(format!("sslmode={}: {m}", ssl.mode)))?;
        let config_tls = tls.client_config().map_err(|m| err(format!("sslmode={}: {m}", ssl.mode)))?;
        let connector = rustls_connect::MakeRustls::new(config_tls);
        let negotiated = connector.negotiated.clone();
        let client = config.connect(connector).map_err(|e| err(connect_error(spec, ssl, &e)))?;
        match *negotiated.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(v) => log::info!(
                "target {}: PostgreSQL at {} over {} ({}, sslmode={})",
                spec.id,
                describe_server(spec),
                super::tls::version_name(Some(v)),
                verify.describe(),
                ssl.mode
            ),
            None => {
                let say = format!(
                    "target {}: PostgreSQL at {} does not offer TLS; connected in plaintext (sslmode={}; set \
                     require or verify-full to refuse)",
                    spec.id,
                    describe_server(spec),
                    ssl.mode
                );
                // Loud when the target asked for prefer/allow, quiet for the default.
                if spec.options.contains_key("sslmode") { log::warn!("{say}") } else { log::info!("{say}") }
            }
        }
        client
    };
    Ok(client)
}

fn server_info(spec: &TargetSpec, ssl: &PgSsl, dir: &PrivateDir) -> Result<ServerInfo, DriverError> {
    let err = |m: String| DriverError::new(&spec.id, m);
    if spec.database.is_empty() {
        return Err(err("a PostgreSQL target needs a database name (pg_dump dumps one database)".into()));
    }
    let mut client = agent_connect(spec, &spec.database, ssl, dir)?;
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

fn connect_error(spec: &TargetSpec, ssl: &PgSsl, e: &postgres::Error) -> String {
    use postgres::error::SqlState;
    let server = describe_server(spec);
    if let Some(why) = super::tls::explain(e) {
        return format!("TLS to PostgreSQL at {server} failed (sslmode={}): {why}", ssl.mode);
    }
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
fn configure_auth(
    cmd: &mut Command,
    spec: &TargetSpec,
    dir: &PrivateDir,
    ssl: &PgSsl,
) -> Result<(), DriverError> {
    cmd.env("HOME", dir.path());
    // sslpassword is not a passfile field: a service file holds it, read by libpq only
    // when the conninfo names `service=backupy`.
    if let Some(pw) = &ssl.key_password {
        let text = Secret::new(format!("[{PG_SERVICE}]\nsslpassword={}\n", pw.expose()));
        let path = dir
            .write_secret("pg_service.conf", &text)
            .map_err(|e| DriverError::new(&spec.id, format!("cannot write the service file: {e}")))?;
        cmd.env("PGSERVICEFILE", path);
    }
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
fn conninfo(spec: &TargetSpec, database: &str, ssl: &PgSsl) -> String {
    let host = match spec.strategy {
        Strategy::UnixSocket => socket_dir(spec),
        _ => host(spec),
    };
    let mut parts = vec![
        format!("host={}", conninfo_quote(host)),
        format!("port={}", port(spec)),
        format!("dbname={}", conninfo_quote(database)),
        format!("sslmode={}", ssl.mode),
        format!("connect_timeout={}", CONNECT_TIMEOUT.as_secs()),
        "application_name=backupy-agent".to_string(),
    ];
    if !spec.username.is_empty() {
        parts.push(format!("user={}", conninfo_quote(&spec.username)));
    }
    for (key, value) in [("sslrootcert", &ssl.rootcert), ("sslcert", &ssl.cert), ("sslkey", &ssl.key)] {
        if let Some(v) = value {
            parts.push(format!("{key}={}", conninfo_quote(v)));
        }
    }
    if ssl.key_password.is_some() {
        parts.push(format!("service={PG_SERVICE}"));
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

/// The `postgres` crate's TLS hook, implemented with tokio-rustls: tokio-postgres runs
/// inside the crate's own runtime, on the calling thread, so only the traits are async.
mod rustls_connect {
    use std::future::Future;
    use std::io;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};

    use postgres::Socket;
    use postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
    use rustls::{ClientConfig, ProtocolVersion};
    use rustls_pki_types::ServerName;
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio_rustls::TlsConnector;

    /// Makes one connector per connection attempt; records the negotiated version.
    pub struct MakeRustls {
        config: Arc<ClientConfig>,
        pub negotiated: Arc<Mutex<Option<ProtocolVersion>>>,
    }

    impl MakeRustls {
        pub fn new(config: Arc<ClientConfig>) -> Self {
            MakeRustls { config, negotiated: Arc::new(Mutex::new(None)) }
        }
    }

    impl MakeTlsConnect<Socket> for MakeRustls {
        type Stream = RustlsStream;
        type TlsConnect = RustlsConnect;
        type Error = io::Error;

        fn make_tls_connect(&mut self, domain: &str) -> io::Result<RustlsConnect> {
            let name = crate::drivers::tls::server_name(domain).map_err(io::Error::other)?;
            Ok(RustlsConnect {
                connector: TlsConnector::from(self.config.clone()),
                name,
                negotiated: self.negotiated.clone(),
            })
        }
    }

    pub struct RustlsConnect {
        connector: TlsConnector,
        name: ServerName<'static>,
        negotiated: Arc<Mutex<Option<ProtocolVersion>>>,
    }

    impl TlsConnect<Socket> for RustlsConnect {
        type Stream = RustlsStream;
        type Error = io::Error;
        type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream>> + Send>>;

        fn connect(self, stream: Socket) -> Self::Future {
            Box::pin(async move {
                let tls = self.connector.connect(self.name, stream).await?;
                *self.negotiated.lock().unwrap_or_else(|p| p.into_inner()) =
                    tls.get_ref().1.protocol_version();
                Ok(RustlsStream(tls))
            })
        }
    }

    pub struct RustlsStream(tokio_rustls::client::TlsStream<Socket>);

    impl TlsStream for RustlsStream {
        // No channel binding: SCRAM then runs without -PLUS, which every server accepts
        // unless `channel_binding=require` is set on the client (we never set it).
        fn channel_binding(&self) -> ChannelBinding {
            ChannelBinding::none()
        }
    }

    impl AsyncRead for RustlsStream {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for RustlsStream {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }
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
        spec.options.insert("sslmode".into(), "require".into());
        let c = conninfo(&spec, &spec.database, &ssl_settings(&spec).unwrap());
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
