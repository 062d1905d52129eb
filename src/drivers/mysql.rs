//! MySQL and MariaDB: `mariadb-dump` or `mysqldump` (whichever exists) as a child process,
//! over TCP or a UNIX socket, and restore by feeding the dump to the `mariadb`/`mysql`
//! client.
//!
//! Before the dump starts, the driver connects with the `mysql` crate: a wrong password,
//! an unreachable server or a missing database fails there with a clear error, and the
//! same connection reads `SELECT VERSION()` ("MariaDB 10.11.19", "MySQL 8.0.36") and the
//! data size from `information_schema` (the progress estimate).
//!
//! The dump runs `--single-transaction --routines --triggers --events --hex-blob` (plus
//! `--no-tablespaces`, which MySQL ≥ 8.0.21 would otherwise need the PROCESS privilege
//! for). One database is dumped without `CREATE DATABASE`/`USE`, so it can be restored
//! into a database of any name; an empty database name dumps `--all-databases`.
//!
//! The user name and password reach the tools only through a 0600
//! `--defaults-extra-file` (always the first argument) in a private 0700 directory under
//! the run's temp dir, removed when the pipeline's `Source` is dropped. The child's HOME
//! is that directory too, so no `~/.my.cnf` of the agent's user overrides it.
//!
//! Tools are looked up in `BACKUPY_TOOL_PATH` (a `PATH`-style list of directories) when
//! that variable is set, and only there; otherwise on `PATH`.
//!
//! TLS (`ssl-mode` DISABLED | PREFERRED (default) | REQUIRED | VERIFY_CA |
//! VERIFY_IDENTITY, with `ssl-ca`, `ssl-cert`, `ssl-key`; `_` works for `-` in the
//! names) is the same for both connections. The pre-check uses the `mysql` crate's
//! rustls backend: PREFERRED tries TLS (certificate not checked) and goes plaintext only
//! when the server does not offer TLS at all, never after a failed handshake. The tools
//! get the settings in the defaults file, in their own dialect: MySQL's `ssl-mode=…`;
//! MariaDB's `ssl`/`skip-ssl`/`ssl-verify-server-cert` (which has no CA-only mode, so
//! VERIFY_CA with a MariaDB tool is refused rather than weakened or silently widened).
//! The flavour comes from the tool's `--version`, not its name (Debian's `mysqldump`
//! is MariaDB's).

use std::io::Read;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use mysql::prelude::Queryable;

use super::exec::{self, PrivateDir};
use super::postgres::{TOOL_PATH_VAR, find_in};
use super::tls::explain_rustls;
use super::{DriverError, Dump, DumpContext, Engine, MAGIC_LEN, Strategy, TargetSpec, check_magic};
use crate::cancel::Cancel;
use crate::pipeline::Source;
use crate::secrets::Secret;

/// Port used when the target gives none.
pub const DEFAULT_PORT: u16 = 3306;
/// Socket used when a UNIX_SOCKET target gives no path.
pub const DEFAULT_SOCKET: &str = "/run/mysqld/mysqld.sock";
/// How long a connection attempt (the pre-check and the tools') may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The flags every dump runs with (spec: "Drivers").
pub const DUMP_FLAGS: &[&str] =
    &["--single-transaction", "--routines", "--triggers", "--events", "--hex-blob", "--no-tablespaces"];

const SSL_MODES: &[&str] = &["DISABLED", "PREFERRED", "REQUIRED", "VERIFY_CA", "VERIFY_IDENTITY"];

/// A target's TLS settings, checked once and shared by the pre-check and the tools.
struct MySsl {
    /// One of [`SSL_MODES`]; PREFERRED when the target says nothing.
    mode: &'static str,
    /// Whether the target named a mode (only then do the tools get one).
    explicit: bool,
    ca: Option<String>,
    cert: Option<String>,
    key: Option<String>,
}

impl MySsl {
    /// REQUIRED with a CA file checks the chain, as the MySQL client does.
    fn effective_mode(&self) -> &'static str {
        if self.mode == "REQUIRED" && self.ca.is_some() { "VERIFY_CA" } else { self.mode }
    }
}

fn ssl_settings(spec: &TargetSpec) -> Result<MySsl, DriverError> {
    let err = |m: String| DriverError::new(&spec.id, m);
    let opt = |k: &str| {
        spec.options
            .get(k)
            .or_else(|| spec.options.get(&k.replace('-', "_")))
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    let (mode, explicit) = match opt("ssl-mode") {
        None => ("PREFERRED", false),
        Some(m) => {
            let upper = m.to_ascii_uppercase();
            let found = SSL_MODES
                .iter()
                .find(|x| **x == upper)
                .ok_or_else(|| err(format!("ssl-mode {m:?} is not one of {}", SSL_MODES.join(", "))))?;
            (*found, true)
        }
    };
    let ssl = MySsl { mode, explicit, ca: opt("ssl-ca"), cert: opt("ssl-cert"), key: opt("ssl-key") };
    if mode.starts_with("VERIFY_") && ssl.ca.is_none() {
        return Err(err(format!(
            "ssl-mode={mode} needs ssl-ca: the CA file that signed the server's certificate"
        )));
    }
    if ssl.cert.is_some() != ssl.key.is_some() {
        return Err(err("ssl-cert and ssl-key go together: give both or neither".into()));
    }
    if mode == "DISABLED" && (ssl.ca.is_some() || ssl.cert.is_some()) {
        return Err(err("ssl-mode=DISABLED contradicts ssl-ca/ssl-cert/ssl-key".into()));
    }
    Ok(ssl)
}

/// The pre-check's TLS, or `None` for plaintext.
fn agent_ssl_opts(ssl: &MySsl) -> Option<mysql::SslOpts> {
    let mode = ssl.effective_mode();
    if mode == "DISABLED" {
        return None;
    }
    let mut o = mysql::SslOpts::default();
    if let (Some(c), Some(k)) = (&ssl.cert, &ssl.key) {
        o = o.with_client_identity(Some(mysql::ClientIdentity::new(
            std::path::PathBuf::from(c),
            std::path::PathBuf::from(k),
        )));
    }
    o = match mode {
        "PREFERRED" | "REQUIRED" => {
            o.with_danger_accept_invalid_certs(true).with_danger_skip_domain_validation(true)
        }
        "VERIFY_CA" => o
            .with_root_cert_path(ssl.ca.clone().map(|c| std::borrow::Cow::Owned(PathBuf::from(c))))
            .with_danger_skip_domain_validation(true),
        _ => o.with_root_cert_path(ssl.ca.clone().map(|c| std::borrow::Cow::Owned(PathBuf::from(c)))),
    };
    Some(o)
}

/// The defaults-file lines that give a tool of `flavour` the target's TLS settings.
fn tool_ssl_lines(ssl: &MySsl, mariadb_tool: bool) -> Result<Vec<String>, String> {
    let mut lines = Vec::new();
    let mode = ssl.effective_mode();
    if mariadb_tool {
        match mode {
            "DISABLED" => lines.push("skip-ssl".to_string()),
            // The tool's own default (MariaDB ≥ 10.x clients use TLS when offered).
            "PREFERRED" => {}
            "REQUIRED" => lines.push("ssl".to_string()),
            "VERIFY_CA" => {
                return Err("ssl-mode=VERIFY_CA (or REQUIRED with ssl-ca) cannot be expressed for MariaDB's                             client tools, which check the host name whenever they check the certificate: use                             VERIFY_IDENTITY, or REQUIRED without ssl-ca"
                    .into());
            }
            _ => {
                lines.push("ssl".to_string());
                lines.push("ssl-verify-server-cert".to_string());
            }
        }
    } else if ssl.explicit || mode != "PREFERRED" {
        lines.push(format!("ssl-mode={mode}"));
    }
    for (key, v) in [("ssl-ca", &ssl.ca), ("ssl-cert", &ssl.cert), ("ssl-key", &ssl.key)] {
        if let Some(v) = v {
            lines.push(format!("{key}={}", option_value(v)));
        }
    }
    Ok(lines)
}

/// True when `tool --version` says MariaDB (Debian's `mysqldump` is MariaDB's).
fn is_mariadb_tool(tool: &std::path::Path) -> bool {
    exec::tool_command(tool)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_ascii_lowercase().contains("mariadb"))
        .unwrap_or_else(|_| tool.file_name().is_some_and(|n| n.to_string_lossy().starts_with("mariadb")))
}

/// How a dump is restored.
#[derive(Debug, Clone, Default)]
pub struct MySqlRestoreOptions {
    /// `CREATE DATABASE IF NOT EXISTS … CHARACTER SET utf8mb4` the target's database
    /// first (a one-database dump carries no `CREATE DATABASE`). The character set
    /// matters for routines: their parameters without one take the database's.
    pub create_database: bool,
    /// Where the private defaults-file directory goes; the system temp dir when `None`.
    pub temp_dir: Option<PathBuf>,
    /// Stops the client at once when set (its group is killed; what it already applied
    /// stays: MySQL/MariaDB dumps are not one transaction).
    pub cancel: Option<Cancel>,
}

/// Starts `mariadb-dump`/`mysqldump` for `spec`; the returned source carries the banner
/// magic check, the data size as its progress estimate, and the defaults-file
/// directory as its guard.
pub fn dump(spec: &TargetSpec, ctx: &DumpContext) -> Result<Dump, DriverError> {
    let err = |m: String| DriverError::new(&spec.id, m);
    let names = dump_tools(spec.engine);
    let tool = find_mysql_tool(&names).ok_or_else(|| err(missing_tool(&names)))?;
    let (version, size) = {
        let mut conn = connect(spec, &spec.database)?;
        let version: String = conn
            .query_first("SELECT VERSION()")
            .map_err(|e| err(format!("cannot read the server version: {}", error_text(&e))))?
            .unwrap_or_default();
        (engine_version(&version), data_size(&mut conn, &spec.database))
    };

    let dir = PrivateDir::new(&ctx.temp_dir)
        .map_err(|e| err(format!("cannot create a private directory in {}: {e}", ctx.temp_dir.display())))?;
    let mut cmd = client_command(&tool, spec, &dir)?;
    cmd.args(DUMP_FLAGS).arg("--default-character-set=utf8mb4");
    if spec.database.is_empty() {
        cmd.arg("--all-databases");
    } else {
        cmd.arg("--").arg(&spec.database);
    }
    let name = tool.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let source = Source::spawn(name, cmd).map_err(|e| err(format!("{e} ({})", tool.display())))?;
    let engine = spec.engine;
    Ok(Dump {
        source: source
            .with_magic(MAGIC_LEN, Box::new(move |head| check_magic(engine, head)))
            .with_size_hint(size)
            .with_guard(dir),
        engine_version: version,
    })
}

/// Feeds an SQL dump read from `input` to the `mariadb`/`mysql` client, into the target's
/// database (or, when it has none, as it is: an all-databases dump names its databases).
pub fn restore(
    spec: &TargetSpec,
    input: &mut dyn Read,
    opts: &MySqlRestoreOptions,
) -> Result<(), DriverError> {
    let err = |m: String| DriverError::new(&spec.id, m);
    let names = client_tools(spec.engine);
    let tool = find_mysql_tool(&names).ok_or_else(|| err(missing_tool(&names)))?;
    if opts.create_database && !spec.database.is_empty() {
        let mut conn = connect(spec, "")?;
        let sql =
            format!("CREATE DATABASE IF NOT EXISTS {} CHARACTER SET utf8mb4", quote_ident(&spec.database));
        conn.query_drop(sql)
            .map_err(|e| err(format!("cannot create database {:?}: {}", spec.database, error_text(&e))))?;
    }
    let dir = opts.temp_dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = PrivateDir::new(&dir)
        .map_err(|e| err(format!("cannot create a private directory in {}: {e}", dir.display())))?;
    let mut cmd = client_command(&tool, spec, &dir)?;
    cmd.arg("--default-character-set=utf8mb4").arg("--batch");
    // The dump tools have no such option; the clients do.
    cmd.arg(format!("--connect-timeout={}", CONNECT_TIMEOUT.as_secs()));
    if !spec.database.is_empty() {
        cmd.arg(format!("--database={}", spec.database));
    }
    let name = tool.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // `dir` (the defaults file) lives until the client has exited.
    exec::feed_until(&name, cmd, input, opts.cancel.as_ref()).map_err(err)
}

/// `mariadb-dump 10.11.19` or `mysqldump 8.0.36` when a dump tool that runs is found
/// here, for the agent's capabilities; `None` otherwise.
pub fn capability(engine: Engine) -> Option<String> {
    let tool = find_mysql_tool(&dump_tools(engine))?;
    let out = exec::tool_command(&tool).arg("--version").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let version = tool_version(&String::from_utf8_lossy(&out.stdout))?;
    Some(format!("{} {version}", tool.file_name()?.to_string_lossy()))
}

/// The version in a `--version` line: "… Distrib 10.11.19-MariaDB, …" → "10.11.19",
/// "mysqldump  Ver 8.0.36 for Linux …" → "8.0.36".
fn tool_version(text: &str) -> Option<String> {
    let mut words = text.split_whitespace();
    let after = |words: &mut std::str::SplitWhitespace, key: &str| {
        words.clone().skip_while(|w| *w != key).nth(1).map(str::to_string)
    };
    let v = after(&mut words, "Distrib").or_else(|| after(&mut words, "Ver"))?;
    let v: String = v.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    (!v.is_empty()).then_some(v)
}

/// "MariaDB 10.11.19" / "MySQL 8.0.36" from `SELECT VERSION()` ("10.11.19-MariaDB-0+deb12u1",
/// "8.0.36-log"): the server says which it is, whatever the target was configured as.
pub fn engine_version(version: &str) -> String {
    let flavour = if version.to_ascii_lowercase().contains("mariadb") { "MariaDB" } else { "MySQL" };
    // Old MariaDB servers may still prefix the replication-compatibility "5.5.5-".
    let v = version.strip_prefix("5.5.5-").unwrap_or(version);
    let number = v.split(['-', ' ']).next().unwrap_or(v);
    format!("{flavour} {number}")
}

fn dump_tools(engine: Engine) -> Vec<&'static str> {
    match engine {
        Engine::MySql => vec!["mysqldump", "mariadb-dump"],
        _ => vec!["mariadb-dump", "mysqldump"],
    }
}

fn client_tools(engine: Engine) -> Vec<&'static str> {
    match engine {
        Engine::MySql => vec!["mysql", "mariadb"],
        _ => vec!["mariadb", "mysql"],
    }
}

fn find_mysql_tool(names: &[&str]) -> Option<PathBuf> {
    match crate::env::Env::get().tool_path.clone() {
        Some(path) => find_in(&path, names),
        None => exec::find_tool(names),
    }
}

fn missing_tool(names: &[&str]) -> String {
    let place = match crate::env::Env::get().tool_path.clone() {
        Some(p) => format!("in {TOOL_PATH_VAR}={}", p.to_string_lossy()),
        None => "on PATH".to_string(),
    };
    format!(
        "neither {} was found {place}; install the client tools (Debian/Ubuntu: apt-get install \
         mariadb-client, or mysql-client for MySQL; Alpine: apk add mariadb-client; RHEL: dnf install mariadb)",
        names.join(" nor ")
    )
}

fn host(spec: &TargetSpec) -> &str {
    if spec.host.is_empty() { "localhost" } else { &spec.host }
}

fn port(spec: &TargetSpec) -> u16 {
    if spec.port == 0 { DEFAULT_PORT } else { spec.port }
}

fn socket(spec: &TargetSpec) -> &str {
    if spec.host.is_empty() { DEFAULT_SOCKET } else { &spec.host }
}

fn user(spec: &TargetSpec) -> &str {
    if spec.username.is_empty() { "root" } else { &spec.username }
}

fn describe_server(spec: &TargetSpec) -> String {
    match spec.strategy {
        Strategy::UnixSocket => format!("the socket {}", socket(spec)),
        _ => format!("{}:{}", host(spec), port(spec)),
    }
}

/// A connection for the pre-check (`database` empty: none selected).
fn connect(spec: &TargetSpec, database: &str) -> Result<mysql::Conn, DriverError> {
    let mut opts = mysql::OptsBuilder::new()
        .user(Some(user(spec)))
        .pass(spec.password.as_ref().map(|p| p.expose()))
        .db_name((!database.is_empty()).then_some(database))
        .tcp_connect_timeout(Some(CONNECT_TIMEOUT))
        .read_timeout(Some(Duration::from_secs(60)))
        .write_timeout(Some(Duration::from_secs(60)))
        .prefer_socket(false);
    let ssl = ssl_settings(spec)?;
    opts = match spec.strategy {
        // TLS does not apply to a UNIX socket (the server does not offer it there).
        Strategy::UnixSocket => return plain_or_err(spec, database, opts.socket(Some(socket(spec)))),
        _ => opts.ip_or_hostname(Some(host(spec))).tcp_port(port(spec)),
    };
    let Some(tls) = agent_ssl_opts(&ssl) else {
        return plain_or_err(spec, database, opts);
    };
    match mysql::Conn::new(opts.clone().ssl_opts(tls)) {
        Ok(c) => {
            log::info!(
                "target {}: {} over TLS (ssl-mode={})",
                spec.id,
                describe_server(spec),
                ssl.effective_mode()
            );
            Ok(c)
        }
        // PREFERRED, and the server offers no TLS at all: plaintext, said out loud.
        Err(mysql::Error::DriverError(mysql::DriverError::TlsNotSupported)) if ssl.mode == "PREFERRED" => {
            let say = format!(
                "target {}: {} does not offer TLS; connecting in plaintext (ssl-mode=PREFERRED; set REQUIRED \
                 or VERIFY_IDENTITY to refuse)",
                spec.id,
                describe_server(spec)
            );
            if ssl.explicit {
                log::warn!("{say}")
            } else {
                log::info!("{say}")
            }
            plain_or_err(spec, database, opts)
        }
        Err(e) => Err(DriverError::new(&spec.id, connect_error(spec, database, &e))),
    }
}

fn plain_or_err(
    spec: &TargetSpec,
    database: &str,
    opts: mysql::OptsBuilder,
) -> Result<mysql::Conn, DriverError> {
    mysql::Conn::new(opts).map_err(|e| DriverError::new(&spec.id, connect_error(spec, database, &e)))
}

/// A TLS failure in `e`, in words (unknown issuer, wrong name, expired …).
fn tls_reason(e: &mysql::Error) -> Option<String> {
    match e {
        mysql::Error::TlsError(mysql::error::tls::TlsError::Tls(r)) => Some(explain_rustls(r)),
        mysql::Error::TlsError(t) => Some(format!("TLS failed: {t}")),
        mysql::Error::IoError(io) => super::tls::explain(io),
        mysql::Error::CodecError(c) => super::tls::explain(c),
        mysql::Error::DriverError(mysql::DriverError::TlsNotSupported) => {
            Some("the server does not offer TLS, and the target's ssl-mode requires it".into())
        }
        _ => None,
    }
}

fn connect_error(spec: &TargetSpec, database: &str, e: &mysql::Error) -> String {
    let server = describe_server(spec);
    let flavour = if spec.engine == Engine::MySql { "MySQL" } else { "MariaDB" };
    if let Some(why) = tls_reason(e) {
        return format!("TLS to {flavour} at {server} failed: {why}");
    }
    match e {
        mysql::Error::MySqlError(m) if m.code == 1045 || m.code == 1698 => {
            format!("{flavour} at {server} refused user {:?}: {}", user(spec), m.message)
        }
        mysql::Error::MySqlError(m) if m.code == 1049 => {
            format!("database {database:?} does not exist on {flavour} at {server}")
        }
        mysql::Error::MySqlError(m) if m.code == 1044 => {
            format!(
                "user {:?} may not use database {database:?} on {flavour} at {server}: {}",
                user(spec),
                m.message
            )
        }
        other => format!("cannot connect to {flavour} at {server}: {}", error_text(other)),
    }
}

fn error_text(e: &mysql::Error) -> String {
    match e {
        mysql::Error::MySqlError(m) => m.message.clone(),
        mysql::Error::IoError(io) => io.to_string(),
        mysql::Error::DriverError(d) => d.to_string(),
        other => other.to_string(),
    }
}

/// Bytes of table data and indexes: of `database`, or of every user database.
fn data_size(conn: &mut mysql::Conn, database: &str) -> Option<u64> {
    let base = "SELECT CAST(COALESCE(SUM(data_length + index_length), 0) AS UNSIGNED) \
                FROM information_schema.tables WHERE";
    let r: mysql::Result<Option<u64>> = if database.is_empty() {
        conn.query_first(format!(
            "{base} table_schema NOT IN ('information_schema', 'performance_schema', 'sys')"
        ))
    } else {
        conn.exec_first(format!("{base} table_schema = ?"), (database,))
    };
    r.ok().flatten().filter(|n| *n > 0)
}

/// `` `name` `` with backticks doubled.
fn quote_ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// A client-tool command: the defaults file first, then user and connection options.
fn client_command(
    tool: &std::path::Path,
    spec: &TargetSpec,
    dir: &PrivateDir,
) -> Result<Command, DriverError> {
    let err = |m: String| DriverError::new(&spec.id, m);
    let mut text = String::from("[client]\n");
    text.push_str(&format!("user={}\n", option_value(user(spec))));
    if let Some(pw) = &spec.password {
        text.push_str(&format!("password={}\n", option_value(pw.expose())));
    }
    if !matches!(spec.strategy, Strategy::UnixSocket) {
        let ssl = ssl_settings(spec)?;
        for line in tool_ssl_lines(&ssl, is_mariadb_tool(tool)).map_err(err)? {
            text.push_str(&line);
            text.push('\n');
        }
    }
    let file = dir
        .write_secret("my.cnf", &Secret::new(text))
        .map_err(|e| err(format!("cannot write the defaults file: {e}")))?;
    let mut cmd = exec::tool_command(tool);
    // The defaults file must be the first argument; HOME keeps ~/.my.cnf out.
    cmd.arg(format!("--defaults-extra-file={}", file.display())).env("HOME", dir.path());
    match spec.strategy {
        Strategy::UnixSocket => cmd.arg("--protocol=SOCKET").arg(format!("--socket={}", socket(spec))),
        _ => cmd
            .arg("--protocol=TCP")
            .arg(format!("--host={}", host(spec)))
            .arg(format!("--port={}", port(spec))),
    };
    Ok(cmd)
}

/// An option-file value in double quotes, with `\`, `"` and control characters escaped
/// (so `#` and surrounding spaces stay part of the value).
fn option_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_version_drops_suffixes() {
        assert_eq!(engine_version("10.11.19-MariaDB-0+deb12u1"), "MariaDB 10.11.19");
        assert_eq!(engine_version("5.5.5-10.6.12-MariaDB-log"), "MariaDB 10.6.12");
        assert_eq!(engine_version("8.0.36-log"), "MySQL 8.0.36");
        assert_eq!(engine_version("8.0.36"), "MySQL 8.0.36");
    }

    #[test]
    fn tool_versions_are_read_from_both_flavours() {
        let maria = "mariadb-dump  Ver 10.19 Distrib 10.11.19-MariaDB, for debian-linux-gnu (x86_64)";
        assert_eq!(tool_version(maria).as_deref(), Some("10.11.19"));
        let mysql = "mysqldump  Ver 8.0.36 for Linux on x86_64 (MySQL Community Server - GPL)";
        assert_eq!(tool_version(mysql).as_deref(), Some("8.0.36"));
        assert_eq!(tool_version("nonsense"), None);
    }

    #[test]
    fn tls_settings_follow_each_client_dialect() {
        let mut spec = TargetSpec::new("t", Engine::MariaDb);
        let plain = ssl_settings(&spec).unwrap();
        assert_eq!(plain.mode, "PREFERRED");
        assert_eq!(tool_ssl_lines(&plain, false).unwrap(), Vec::<String>::new());
        spec.options.insert("ssl_mode".into(), "verify_identity".into());
        assert!(ssl_settings(&spec).err().unwrap().to_string().contains("needs ssl-ca"));
        spec.options.insert("ssl-ca".into(), "/ca.pem".into());
        let s = ssl_settings(&spec).unwrap();
        assert_eq!(
            tool_ssl_lines(&s, true).unwrap(),
            ["ssl", "ssl-verify-server-cert", "ssl-ca=\"/ca.pem\""]
        );
        assert_eq!(tool_ssl_lines(&s, false).unwrap(), ["ssl-mode=VERIFY_IDENTITY", "ssl-ca=\"/ca.pem\""]);
        spec.options.insert("ssl_mode".into(), "REQUIRED".into());
        let s = ssl_settings(&spec).unwrap();
        assert_eq!(s.effective_mode(), "VERIFY_CA");
        assert!(tool_ssl_lines(&s, true).unwrap_err().contains("VERIFY_IDENTITY"));
        assert_eq!(tool_ssl_lines(&s, false).unwrap()[0], "ssl-mode=VERIFY_CA");
        spec.options.insert("ssl_mode".into(), "sometimes".into());
        assert!(ssl_settings(&spec).err().unwrap().to_string().contains("not one of"));
    }

    #[test]
    fn option_values_are_quoted() {
        assert_eq!(option_value(r#"p"w#1\ x"#), r#""p\"w#1\\ x""#);
        assert_eq!(quote_ident("a`b"), "`a``b`");
    }
}
