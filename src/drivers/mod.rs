//! Database drivers: where dump bytes come from, one file per engine.
//!
//! A driver turns a target into a pipeline [`Source`](crate::pipeline::Source) (a child
//! process or a native stream) that carries the engine's magic check, and reports the
//! server's engine version as "<Engine> <version>". Drivers run on the worker thread
//! that starts a run; the bytes then flow on the pipeline's dump thread.

pub mod docker_exec;
pub mod exec;
pub mod mongodb;
pub mod mysql;
pub mod postgres;
pub mod redis;
pub mod sqlite;
pub mod tls;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use crate::pipeline::Source;
use crate::secrets::Secret;

/// The engines the agent knows, named as in the standalone TOML and `DbType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    PostgreSql,
    MySql,
    MariaDb,
    MongoDb,
    Redis,
    Sqlite,
}

impl Engine {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "postgresql" => Engine::PostgreSql,
            "mysql" => Engine::MySql,
            "mariadb" => Engine::MariaDb,
            "mongodb" => Engine::MongoDb,
            "redis" => Engine::Redis,
            "sqlite" => Engine::Sqlite,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Engine::PostgreSql => "postgresql",
            Engine::MySql => "mysql",
            Engine::MariaDb => "mariadb",
            Engine::MongoDb => "mongodb",
            Engine::Redis => "redis",
            Engine::Sqlite => "sqlite",
        }
    }

    /// The first extension of a stored object, before compression and encryption.
    pub fn dump_extension(self) -> &'static str {
        match self {
            Engine::PostgreSql => "pgdump",
            Engine::MySql | Engine::MariaDb => "sql",
            Engine::MongoDb => "archive",
            Engine::Redis => "rdb",
            Engine::Sqlite => "sqlite",
        }
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The MariaDB ≥ 10.5.25 sandbox line that may precede the mysqldump banner.
const MARIADB_SANDBOX_PREFIX: &[u8] = b"/*M!999999\\- enable the sandbox mode */";

/// The magic a dump of `engine` must start with, checked before the object is committed.
pub fn check_magic(engine: Engine, head: &[u8]) -> Result<(), String> {
    let (head, expected): (&[u8], &[&[u8]]) = match engine {
        Engine::Sqlite => (head, &[b"SQLite format 3\0"]),
        Engine::PostgreSql => (head, &[b"PGDMP"]),
        Engine::Redis => (head, &[b"REDIS"]),
        Engine::MongoDb => (head, &[&[0x6D, 0xE2, 0x99, 0x81]]),
        Engine::MySql | Engine::MariaDb => {
            // mariadb-dump 10.11 writes the sandbox line with a space before its newline.
            let rest = head.strip_prefix(MARIADB_SANDBOX_PREFIX).map_or(head, <[u8]>::trim_ascii_start);
            (rest, &[b"-- MySQL dump", b"-- MariaDB dump"])
        }
    };
    if expected.iter().any(|m| head.starts_with(m)) {
        return Ok(());
    }
    let want = expected[0];
    if head.len() < want.len() {
        return Err(format!("the dump is only {} bytes long", head.len()));
    }
    Err(format!(
        "it starts with {:?} instead of the {engine} magic {:?}",
        String::from_utf8_lossy(&head[..want.len()]),
        String::from_utf8_lossy(want)
    ))
}

/// Bytes of the dump head that [`check_magic`] needs.
pub const MAGIC_LEN: usize = 64;

/// Why a driver could not produce a dump, with the target named.
#[derive(Debug, thiserror::Error)]
#[error("target {target}: {message}")]
pub struct DriverError {
    pub target: String,
    pub message: String,
}

impl DriverError {
    pub fn new(target: &str, message: impl Into<String>) -> Self {
        Self { target: target.to_string(), message: message.into() }
    }
}

/// How the agent reaches a target's server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Strategy {
    Tcp,
    /// `host` holds the socket's directory (PostgreSQL) or path (MySQL, Redis).
    UnixSocket,
    /// Run the engine's own tools inside its container (issue 8).
    DockerExec {
        container: String,
    },
}

/// Everything a driver needs to reach one target, whatever it was configured by (the
/// standalone TOML or a control plane's `Target`). Passwords are already resolved.
#[derive(Debug, Clone)]
pub struct TargetSpec {
    pub id: String,
    pub engine: Engine,
    pub strategy: Strategy,
    pub host: String,
    /// 0 = the engine's default port.
    pub port: u16,
    /// The database (PostgreSQL, MySQL: empty = all databases, MongoDB: empty = all,
    /// Redis: ignored) or, for SQLite, the database file's path.
    pub database: String,
    pub username: String,
    pub password: Option<Secret>,
    /// Engine-specific settings from the URL query or TOML (e.g. `sslmode`, `tls`).
    pub options: BTreeMap<String, String>,
}

impl TargetSpec {
    /// A target with only the fields every engine has.
    pub fn new(id: impl Into<String>, engine: Engine) -> Self {
        Self {
            id: id.into(),
            engine,
            strategy: Strategy::Tcp,
            host: String::new(),
            port: 0,
            database: String::new(),
            username: String::new(),
            password: None,
            options: BTreeMap::new(),
        }
    }
}

/// A started dump: the byte stream and the server's version ("PostgreSQL 15.19").
pub struct Dump {
    pub source: Source,
    pub engine_version: String,
}

/// Per-run settings a driver needs besides the target.
pub struct DumpContext {
    /// Where snapshot and secret files go (inside the state directory).
    pub temp_dir: PathBuf,
    /// The pipeline compresses: the tool must not compress too.
    pub pipeline_compresses: bool,
    /// The run's cancel flag: drivers that wait before the first byte (a snapshot, a
    /// server preparing its RDB) stop within a few seconds when it is set.
    pub cancel: crate::cancel::Cancel,
}

/// Which engines can really be backed up from this host, and with what: the capability
/// names of `Register.capabilities` are the engines whose detail is `Some`.
pub fn capabilities() -> Vec<(Engine, Option<String>)> {
    vec![
        (Engine::PostgreSql, postgres::capability()),
        (Engine::MySql, mysql::capability(Engine::MySql)),
        (Engine::MariaDb, mysql::capability(Engine::MariaDb)),
        (Engine::MongoDb, mongodb::capability()),
        (Engine::Redis, redis::capability()),
        (Engine::Sqlite, Some(format!("online backup API, {}", sqlite::engine_version()))),
    ]
}

/// Starts a dump of `spec`. DOCKER_EXEC targets of every engine go to `docker_exec`
/// here (restores: in `restore`), so the engine files only know TCP and UNIX sockets.
pub fn dump(spec: &TargetSpec, ctx: &DumpContext) -> Result<Dump, DriverError> {
    if let Strategy::DockerExec { container } = &spec.strategy {
        return docker_exec::dump(spec, ctx, container);
    }
    match spec.engine {
        Engine::Sqlite => Ok(Dump {
            source: sqlite::snapshot(
                &spec.id,
                std::path::Path::new(&spec.database),
                &ctx.temp_dir,
                &ctx.cancel,
            )?,
            engine_version: sqlite::engine_version(),
        }),
        Engine::PostgreSql => postgres::dump(spec, ctx),
        Engine::MySql | Engine::MariaDb => mysql::dump(spec, ctx),
        Engine::Redis => redis::dump(spec, ctx),
        Engine::MongoDb => mongodb::dump(spec, ctx),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mariadb_banner_after_the_sandbox_line_is_accepted() {
        // As mariadb-dump 10.11.19 writes it: a space before the newline.
        let head = b"/*M!999999\\- enable the sandbox mode */ \n-- MariaDB dump 10.19  Distrib 10.11.19";
        assert_eq!(check_magic(Engine::MariaDb, head), Ok(()));
        assert_eq!(check_magic(Engine::MySql, b"-- MySQL dump 10.13  Distrib 8.0.36"), Ok(()));
        assert!(check_magic(Engine::MariaDb, b"/*M!999999\\- enable the sandbox mode */\nSELECT 1").is_err());
        assert!(check_magic(Engine::PostgreSql, b"PGDM").is_err());
        assert_eq!(check_magic(Engine::Redis, b"REDIS0011"), Ok(()));
        // Whatever whitespace the sandbox line ends with.
        assert_eq!(
            check_magic(Engine::MariaDb, b"/*M!999999\\- enable the sandbox mode */\n-- MariaDB dump 10.19"),
            Ok(())
        );
        assert_eq!(
            check_magic(Engine::MariaDb, b"/*M!999999\\- enable the sandbox mode */\r\n\n-- MariaDB dump"),
            Ok(())
        );
        assert!(
            check_magic(Engine::MariaDb, b"/*M!999999\\- enable the sandbox mode */ \nnot a dump").is_err()
        );
        assert!(check_magic(Engine::MariaDb, b"ERROR 1045").is_err());
    }
}
