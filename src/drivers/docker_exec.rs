//! The DOCKER_EXEC strategy for all five engines: the dump tool runs inside the
//! database's own container (its version always matches the server's), its stdout is the
//! pipeline's source, and its stderr tail is the error when it fails. Restores run the
//! engine's restore tool in the container with the dump on its stdin.
//!
//! Passwords reach the tools through the exec's environment (`PGPASSWORD`, `MYSQL_PWD`,
//! `REDISCLI_AUTH`) or, for the MongoDB tools, which read none, a 0600 config file that
//! is written through stdin and removed afterwards: never argv, never a log line.
//!
//! Runs on the worker thread that starts the run; the bytes flow on the pipeline's dump
//! thread and a cancel stops the tool inside the container (see `docker::exec`).

use std::io::Read;
use std::time::Duration;

use super::{DriverError, Dump, DumpContext, Engine, MAGIC_LEN, TargetSpec, check_magic};
use crate::docker::exec::{self, Command};
use crate::docker::names::check_container_ref;
use crate::docker::{Client, DockerError};
use crate::pipeline::Source;
use crate::secrets::Secret;

/// How long the short helper commands (version queries, snapshots) may take.
const HELPER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a SQLite `.backup` or a Redis BGSAVE inside the container may take.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(3600);

/// Starts a dump of `spec` inside `container`.
pub fn dump(spec: &TargetSpec, ctx: &DumpContext, container: &str) -> Result<Dump, DriverError> {
    let err = |m: String| DriverError::new(&spec.id, m);
    check_container_ref(container).map_err(err)?;
    let client = Client::from_env().map_err(|e| err(e.to_string()))?;
    let d = Docker { client: &client, spec, container, cancel: &ctx.cancel };
    let (source, engine_version) = match spec.engine {
        Engine::PostgreSql => d.postgres(ctx)?,
        Engine::MySql | Engine::MariaDb => d.mysql()?,
        Engine::Redis => d.redis()?,
        Engine::Sqlite => d.sqlite()?,
        Engine::MongoDb => d.mongodb()?,
    };
    let engine = spec.engine;
    Ok(Dump {
        source: source.with_magic(MAGIC_LEN, Box::new(move |head| check_magic(engine, head))),
        engine_version,
    })
}

struct Docker<'a> {
    client: &'a Client,
    spec: &'a TargetSpec,
    container: &'a str,
    /// The run's cancel flag, watched by the waits before the dump starts (BGSAVE).
    cancel: &'a crate::cancel::Cancel,
}

impl Docker<'_> {
    fn err(&self, m: impl Into<String>) -> DriverError {
        DriverError::new(&self.spec.id, m)
    }

    fn docker_err(&self, e: DockerError) -> DriverError {
        self.err(e.to_string())
    }

    fn cmd(&self, argv: &[&str]) -> Command {
        Command::new(self.container, argv)
    }

    /// Runs a helper command; its trimmed stdout when it exits 0.
    fn helper(&self, cmd: &Command) -> Result<String, DriverError> {
        let out = exec::run_plain(self.client, cmd, HELPER_TIMEOUT).map_err(|e| self.docker_err(e))?;
        if !out.success() {
            return Err(self.err(format!(
                "{} exited with status {} inside container {}{}",
                cmd.argv.first().map(String::as_str).unwrap_or(""),
                out.exit_code,
                self.container,
                suffix(&out.stderr)
            )));
        }
        Ok(out.stdout_text())
    }

    /// The first of `names` the container has on its `PATH`.
    fn find_tool(&self, names: &[&str]) -> Result<String, DriverError> {
        let script =
            "for t in \"$@\"; do command -v \"$t\" >/dev/null 2>&1 && { echo \"$t\"; exit 0; }; done; exit 1";
        let mut cmd = self.cmd(&["sh", "-c", script, "sh"]);
        cmd.argv.extend(names.iter().map(|s| s.to_string()));
        let out = exec::run_plain(self.client, &cmd, HELPER_TIMEOUT).map_err(|e| self.docker_err(e))?;
        match out.stdout_text() {
            t if out.success() && !t.is_empty() => Ok(t),
            _ => Err(self.err(format!(
                "container {} has none of {} on its PATH",
                self.container,
                names.join(", ")
            ))),
        }
    }

    fn source(&self, cmd: &Command, name: &str) -> Result<Source, DriverError> {
        exec::source(self.client, cmd, name).map_err(|e| self.docker_err(e))
    }

    fn with_password(&self, cmd: Command, var: &str) -> Command {
        match &self.spec.password {
            Some(pw) if !pw.is_empty() => cmd.env(var, pw.clone()),
            _ => cmd,
        }
    }

    fn postgres(&self, ctx: &DumpContext) -> Result<(Source, String), DriverError> {
        let spec = self.spec;
        if spec.database.is_empty() {
            return Err(self.err("a PostgreSQL target needs a database name (pg_dump dumps one database)"));
        }
        let user = if spec.username.is_empty() { "postgres" } else { &spec.username };
        let conn_args = |mut cmd: Command| {
            if !spec.host.is_empty() {
                cmd = cmd.arg(format!("--host={}", spec.host));
            }
            if spec.port != 0 {
                cmd = cmd.arg(format!("--port={}", spec.port));
            }
            cmd.arg(format!("--username={user}"))
        };
        // A failing version query is left to pg_dump to report: its error is the one the
        // user needs (wrong password, no such database).
        let version_cmd =
            conn_args(self.cmd(&["psql", "-X", "-A", "-t", "--no-password", "-c", "SHOW server_version"]))
                .arg(format!("--dbname={}", spec.database));
        let version = self
            .helper(&self.with_password(version_cmd, "PGPASSWORD"))
            .map(|v| super::postgres::engine_version(&v))
            .unwrap_or_else(|_| "PostgreSQL".to_string());
        let mut cmd = conn_args(self.cmd(&["pg_dump", "--format=custom", "--no-password"]));
        if ctx.pipeline_compresses {
            cmd = cmd.arg("--compress=0");
        }
        let cmd = self.with_password(cmd.arg(format!("--dbname={}", spec.database)), "PGPASSWORD");
        Ok((self.source(&cmd, "pg_dump")?, version))
    }

    fn mysql_conn_args(&self, mut cmd: Command) -> Command {
        let spec = self.spec;
        if !spec.host.is_empty() {
            cmd = cmd.arg(format!("--host={}", spec.host)).arg("--protocol=TCP");
        }
        if spec.port != 0 {
            cmd = cmd.arg(format!("--port={}", spec.port));
        }
        let user = if spec.username.is_empty() { "root" } else { &spec.username };
        self.with_password(cmd.arg(format!("--user={user}")), "MYSQL_PWD")
    }

    fn mysql(&self) -> Result<(Source, String), DriverError> {
        let dump_tool = self.find_tool(&["mariadb-dump", "mysqldump"])?;
        let client_tool = self.find_tool(&["mariadb", "mysql"]).ok();
        let version = client_tool
            .and_then(|t| {
                let cmd = self.mysql_conn_args(self.cmd(&[&t]));
                self.helper(&cmd.arg("--batch").arg("--skip-column-names").arg("--execute=SELECT VERSION()"))
                    .ok()
            })
            .map(|v| super::mysql::engine_version(&v))
            .unwrap_or_else(|| {
                if self.spec.engine == Engine::MariaDb { "MariaDB" } else { "MySQL" }.to_string()
            });
        let mut cmd = self.mysql_conn_args(self.cmd(&[&dump_tool]));
        for a in [
            "--single-transaction",
            "--routines",
            "--triggers",
            "--events",
            "--hex-blob",
            "--default-character-set=utf8mb4",
        ] {
            cmd = cmd.arg(a);
        }
        cmd = if self.spec.database.is_empty() {
            cmd.arg("--all-databases")
        } else {
            cmd.arg("--").arg(&self.spec.database)
        };
        Ok((self.source(&cmd, &dump_tool)?, version))
    }

    fn redis_conn_args(&self, mut cmd: Command) -> Command {
        let spec = self.spec;
        if !spec.host.is_empty() {
            cmd = cmd.arg("-h").arg(&spec.host);
        }
        if spec.port != 0 {
            cmd = cmd.arg("-p").arg(spec.port.to_string());
        }
        if !spec.username.is_empty() {
            cmd = cmd.arg("--user").arg(&spec.username);
        }
        self.with_password(cmd, "REDISCLI_AUTH")
    }

    fn redis(&self) -> Result<(Source, String), DriverError> {
        let info = self
            .helper(&self.redis_conn_args(self.cmd(&["redis-cli", "--no-raw"])).arg("INFO").arg("server"));
        let version = info
            .as_ref()
            .ok()
            .and_then(|i| i.lines().find_map(|l| l.trim().strip_prefix("redis_version:").map(str::to_string)))
            .map(|v| super::redis::engine_version(v.trim()))
            .unwrap_or_else(|| "Redis".to_string());
        let cli_version = self.helper(&self.cmd(&["redis-cli", "--version"])).unwrap_or_default();
        let method = self.spec.options.get("docker_redis_method").map(String::as_str);
        if method != Some("bgsave") && redis_cli_streams_rdb(&cli_version) {
            let cmd = self.redis_conn_args(self.cmd(&["redis-cli"])).arg("--rdb").arg("-");
            return Ok((self.source(&cmd, "redis-cli --rdb")?, version));
        }
        Ok((self.redis_bgsave()?, version))
    }

    /// For clients older than 7.0 (no `--rdb -`): BGSAVE, wait for it, stream the file.
    fn redis_bgsave(&self) -> Result<Source, DriverError> {
        let cli = |args: &[&str]| {
            let mut cmd = self.redis_conn_args(self.cmd(&["redis-cli", "--raw"]));
            cmd.argv.extend(args.iter().map(|s| s.to_string()));
            cmd
        };
        let config_value = |key: &str| -> Result<String, DriverError> {
            let out = self.helper(&cli(&["CONFIG", "GET", key]))?;
            out.lines().nth(1).map(|s| s.trim().to_string()).ok_or_else(|| {
                self.err(format!(
                    "redis-cli CONFIG GET {key} inside container {} gave no value",
                    self.container
                ))
            })
        };
        let dir = config_value("dir")?;
        let file = config_value("dbfilename")?;
        let before = self.helper(&cli(&["LASTSAVE"]))?;
        // LASTSAVE counts seconds: a save finishing in the second of the previous one
        // would look like no save at all.
        let server_now = self.helper(&cli(&["TIME"]))?;
        if server_now.lines().next().map(str::trim) == Some(before.trim()) {
            std::thread::sleep(Duration::from_millis(1100));
        }
        let answer = self.helper(&cli(&["BGSAVE"]))?;
        if answer.contains("ERR") {
            return Err(self.err(format!("BGSAVE inside container {} failed: {answer}", self.container)));
        }
        let deadline = std::time::Instant::now() + SNAPSHOT_TIMEOUT;
        loop {
            std::thread::sleep(Duration::from_millis(200));
            if self.cancel.is_cancelled() {
                // The BGSAVE itself runs on in the server and ends by itself; only the
                // wait for it is ours to stop.
                return Err(self.err(format!(
                    "stopped while waiting for BGSAVE inside container {} ({})",
                    self.container,
                    self.cancel.reason().map_or("cancelled".to_string(), |r| r.to_string())
                )));
            }
            let persistence = self.helper(&cli(&["INFO", "persistence"]))?;
            let in_progress = persistence.lines().any(|l| l.trim() == "rdb_bgsave_in_progress:1");
            if !in_progress && self.helper(&cli(&["LASTSAVE"]))? != before {
                if persistence.lines().any(|l| l.trim() == "rdb_last_bgsave_status:err") {
                    return Err(self.err(format!("BGSAVE inside container {} failed", self.container)));
                }
                break;
            }
            if std::time::Instant::now() > deadline {
                return Err(
                    self.err(format!("BGSAVE inside container {} did not finish in time", self.container))
                );
            }
        }
        let path = format!("{}/{}", dir.trim_end_matches('/'), file);
        self.source(&self.cmd(&["cat", "--", &path]), "redis RDB file")
    }

    fn sqlite(&self) -> Result<(Source, String), DriverError> {
        let path = &self.spec.database;
        if !path.starts_with('/') {
            return Err(self.err(format!(
                "a SQLite target in a container needs the file's absolute path there, not {path:?}"
            )));
        }
        let sqlite3 = self.find_tool(&["sqlite3"]).map_err(|e| {
            self.err(format!(
                "{}: install the sqlite3 CLI in the image, or mount the file into the agent",
                e.message
            ))
        })?;
        let version = self
            .helper(&self.cmd(&[&sqlite3, "--version"]))
            .ok()
            .and_then(|v| v.split_whitespace().next().map(|n| format!("SQLite {n}")))
            .unwrap_or_else(|| "SQLite".to_string());
        // Next to the database: its directory is writable (SQLite's journal lives there)
        // and exists even in minimal images without /tmp.
        let dir = path.rsplit_once('/').map(|(d, _)| if d.is_empty() { "/" } else { d }).unwrap_or("/");
        let snapshot =
            format!("{}/.backupy-snapshot-{}.sqlite", dir.trim_end_matches('/'), uuid::Uuid::new_v4());
        let cleanup = Cleanup {
            client: self.client.clone(),
            container: self.container.to_string(),
            path: snapshot.clone(),
        };
        // `.backup` is SQLite's online backup API: a consistent copy while writers go on.
        let backup = self.cmd(&[&sqlite3, "-bail", path, &format!(".backup '{snapshot}'")]);
        let out = exec::run(self.client, &backup, None, 1 << 20, Some(SNAPSHOT_TIMEOUT))
            .map_err(|e| self.docker_err(e))?;
        if !out.success() {
            return Err(self.err(format!(
                "sqlite3 .backup of {path} inside container {} exited with status {}{}",
                self.container,
                out.exit_code,
                suffix(&out.stderr)
            )));
        }
        let source = self.source(&self.cmd(&["cat", "--", &snapshot]), "sqlite snapshot")?;
        Ok((source.with_guard(cleanup), version))
    }

    fn mongodb(&self) -> Result<(Source, String), DriverError> {
        let spec = self.spec;
        let version = self
            .helper(&self.cmd(&["mongod", "--version"]))
            .ok()
            .and_then(|v| {
                // "db version v7.0.5"
                v.lines().next()?.split_whitespace().find_map(|w| {
                    w.strip_prefix('v')
                        .filter(|n| n.starts_with(|c: char| c.is_ascii_digit()))
                        .map(str::to_string)
                })
            })
            .map(|v| super::mongodb::engine_version(&v))
            .unwrap_or_else(|| "MongoDB".to_string());
        let (cmd, cleanup) = self.mongo_tool(self.cmd(&["mongodump", "--archive", "--quiet"]))?;
        let cmd = if spec.database.is_empty() { cmd } else { cmd.arg(format!("--db={}", spec.database)) };
        let mut source = self.source(&cmd, "mongodump")?;
        if let Some(c) = cleanup {
            // mongodump has read its config (the password) once it writes its first byte:
            // the file goes then, not at the end of the dump, so that an agent killed
            // mid-dump leaves it in the container for seconds at most, not for good.
            let inner = std::mem::replace(&mut source.reader, Box::new(std::io::empty()));
            source.reader = Box::new(DropAfterFirstByte { inner, guard: Some(c) });
        }
        Ok((source, version))
    }

    /// A MongoDB tool's connection arguments, and with a password the 0600 config file
    /// that carries it (removed when the returned guard is dropped).
    fn mongo_tool(&self, mut cmd: Command) -> Result<(Command, Option<Cleanup>), DriverError> {
        let spec = self.spec;
        let host = if spec.host.is_empty() { "127.0.0.1" } else { &spec.host };
        let port = if spec.port == 0 { 27017 } else { spec.port };
        cmd = cmd.arg(format!("--host={host}")).arg(format!("--port={port}"));
        let mut cleanup = None;
        if let Some(pw) = spec.password.as_ref().filter(|p| !p.is_empty()) {
            let user = if spec.username.is_empty() { "root" } else { &spec.username };
            let auth_db = spec.options.get("authSource").map(String::as_str).unwrap_or("admin");
            cmd = cmd.arg(format!("--username={user}")).arg(format!("--authenticationDatabase={auth_db}"));
            // The MongoDB tools read passwords from argv, a prompt or a config file: a
            // 0600 file it is, written through stdin so the value is in no command line.
            let path = format!("/tmp/.backupy-mongo-{}.yaml", uuid::Uuid::new_v4());
            let quoted = serde_json::to_string(pw.expose()).map_err(|e| self.err(e.to_string()))?;
            let contents = Secret::new(format!("password: {quoted}\n"));
            let write = self.cmd(&["sh", "-c", "umask 077 && cat > \"$1\"", "sh", &path]);
            let mut input = std::io::Cursor::new(contents.expose().as_bytes().to_vec());
            let out = exec::run(self.client, &write, Some(&mut input), 4096, Some(HELPER_TIMEOUT))
                .map_err(|e| self.docker_err(e))?;
            cleanup = Some(Cleanup {
                client: self.client.clone(),
                container: self.container.to_string(),
                path: path.clone(),
            });
            if !out.success() {
                return Err(self.err(format!(
                    "cannot write the mongodump config inside container {}{}",
                    self.container,
                    suffix(&out.stderr)
                )));
            }
            cmd = cmd.arg(format!("--config={path}"));
        }
        Ok((cmd, cleanup))
    }
}

/// clients ≥ 7.0 write the RDB to stdout with `--rdb -`.
fn redis_cli_streams_rdb(version_line: &str) -> bool {
    // "redis-cli 7.0.15" (also valkey-cli's "valkey-cli 8.0.1")
    version_line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse::<u32>().ok())
        .is_some_and(|major| major >= 7)
}

/// Passes reads through and drops `guard` once the first byte came (or with itself).
struct DropAfterFirstByte<G> {
    inner: Box<dyn std::io::Read + Send>,
    guard: Option<G>,
}

impl<G> std::io::Read for DropAfterFirstByte<G> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.guard.take();
        }
        Ok(n)
    }
}

/// Removes a file inside the container when dropped (a snapshot, a secret config).
struct Cleanup {
    client: Client,
    container: String,
    path: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let cmd = Command::new(&self.container, &["rm", "-f", "--", &self.path]);
        match exec::run_plain(&self.client, &cmd, HELPER_TIMEOUT) {
            Ok(out) if out.success() => {}
            Ok(out) => {
                log::warn!("cannot remove {} in container {}: {}", self.path, self.container, out.stderr)
            }
            Err(e) => log::warn!("cannot remove {} in container {}: {e}", self.path, self.container),
        }
    }
}

fn suffix(tail: &str) -> String {
    if tail.is_empty() { String::new() } else { format!(": {tail}") }
}

/// Restores `dump` into the server inside `container` with the engine's own tool, fed on
/// its stdin. `spec.database` is the database to restore into (PostgreSQL: must exist;
/// MySQL: the dump's own CREATE DATABASE applies when empty).
pub fn restore(
    spec: &TargetSpec,
    container: &str,
    dump: &mut dyn Read,
    replace: bool,
) -> Result<(), DriverError> {
    let err = |m: String| DriverError::new(&spec.id, m);
    check_container_ref(container).map_err(err)?;
    let client = Client::from_env().map_err(|e| err(e.to_string()))?;
    let no_cancel = crate::cancel::Cancel::default();
    let d = Docker { client: &client, spec, container, cancel: &no_cancel };
    // Kept until the tool has exited: it reads the password from there.
    let _mongo_config: Option<Cleanup>;
    let cmd = match spec.engine {
        Engine::PostgreSql => {
            let db = if spec.database.is_empty() { "postgres" } else { &spec.database };
            let user = if spec.username.is_empty() { "postgres" } else { &spec.username };
            // One transaction, as for a restore over TCP: a failure rolls everything back.
            let mut cmd = d.cmd(&[
                "pg_restore",
                "--no-password",
                "--exit-on-error",
                "--no-owner",
                "--single-transaction",
            ]);
            if replace {
                cmd = cmd.arg("--clean").arg("--if-exists");
            }
            if !spec.host.is_empty() {
                cmd = cmd.arg(format!("--host={}", spec.host));
            }
            if spec.port != 0 {
                cmd = cmd.arg(format!("--port={}", spec.port));
            }
            d.with_password(cmd.arg(format!("--username={user}")).arg(format!("--dbname={db}")), "PGPASSWORD")
        }
        Engine::MySql | Engine::MariaDb => {
            let tool = d.find_tool(&["mariadb", "mysql"])?;
            let mut cmd =
                d.mysql_conn_args(d.cmd(&[&tool])).arg("--default-character-set=utf8mb4").arg("--batch");
            if !spec.database.is_empty() {
                let ident = format!("`{}`", spec.database.replace('`', "``"));
                let create = d
                    .mysql_conn_args(d.cmd(&[&tool]))
                    .arg(format!("--execute=CREATE DATABASE IF NOT EXISTS {ident} CHARACTER SET utf8mb4"));
                d.helper(&create)?;
                cmd = cmd.arg(format!("--database={}", spec.database));
            }
            cmd
        }
        Engine::MongoDb => {
            let (mut cmd, cleanup) = d.mongo_tool(d.cmd(&["mongorestore", "--archive", "--quiet"]))?;
            if replace {
                cmd = cmd.arg("--drop");
            }
            if !spec.database.is_empty() {
                cmd = cmd.arg(format!("--nsInclude={}.*", spec.database));
            }
            _mongo_config = cleanup;
            cmd
        }
        Engine::Redis | Engine::Sqlite => {
            return Err(err(format!(
                "a {} backup restores to a file (SQLite) or a data directory (Redis), not docker://",
                spec.engine
            )));
        }
    };
    let out = exec::run(&client, &cmd, Some(dump), 1 << 20, None).map_err(|e| err(e.to_string()))?;
    if !out.success() {
        return Err(err(format!(
            "{} exited with status {} inside container {container}{}",
            cmd.argv[0],
            out.exit_code,
            suffix(&out.stderr)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_cli_7_streams_the_rdb() {
        assert!(redis_cli_streams_rdb("redis-cli 7.0.15"));
        assert!(redis_cli_streams_rdb("valkey-cli 8.0.1"));
        assert!(!redis_cli_streams_rdb("redis-cli 6.2.14"));
        assert!(!redis_cli_streams_rdb(""));
    }
}
