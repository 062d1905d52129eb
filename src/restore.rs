//! Restore of a stored backup from storage alone: download, verify the SHA-256 against
//! the manifest, decrypt, decompress, and hand the dump to its engine's restore — a file
//! for SQLite (and a Redis data directory), the engine's own tool or protocol for servers.
//! Runs on the caller's thread; the dump streams through in O(chunk) memory.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::config;
use crate::crypto::KeySource;
use crate::drivers::{self, Engine};
use crate::secrets::redact_url;
use crate::storage::{Manifest, Storage};
use crate::verify::{Digested, OpenedBackup, check_digest, describe, open_backup};

pub struct RestoreOptions {
    /// A file (SQLite), a data directory (Redis), or a server URL.
    pub to: String,
    /// Replace what is there: an existing SQLite file, existing tables/collections/keys.
    pub force: bool,
    /// Where temporary files go.
    pub temp_dir: PathBuf,
}

/// Restores `m`; returns a one-line description of what was restored where.
pub fn restore(
    storage: &Storage,
    m: &Manifest,
    key: Option<&KeySource>,
    opts: &RestoreOptions,
) -> Result<String, String> {
    let OpenedBackup { engine, mut dump, digest } = open_backup(storage, m, key)?;
    if let Some(rest) = opts.to.strip_prefix("docker://") {
        let spec = docker_target(engine, rest)?;
        let drivers::Strategy::DockerExec { container } = &spec.strategy else { unreachable!() };
        drivers::docker_exec::restore(&spec, container, &mut dump, opts.force).map_err(|e| e.to_string())?;
        check_digest(&digest, m)?;
        return Ok(format!("restored {} into container {container}", m.id));
    }
    let is_url = opts.to.contains("://");
    match (engine, is_url) {
        (Engine::Sqlite, false) => restore_file(&mut dump, Path::new(&opts.to), opts.force, &digest, m),
        (Engine::Redis, false) => {
            let dir = Path::new(&opts.to);
            let dest = dir.join("dump.rdb");
            if dest.exists() && !opts.force {
                return Err(format!("{} already exists; pass --force to replace it", dest.display()));
            }
            // Written under a temporary name and checked against the manifest before it
            // takes the name redis-server loads.
            let tmp_name = format!(".dump.rdb.restore-{}", std::process::id());
            let n = drivers::redis::restore_to_dir(&mut dump, dir, &tmp_name).map_err(|e| e.to_string())?;
            let tmp = dir.join(&tmp_name);
            if let Err(e) = check_digest(&digest, m) {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
            std::fs::rename(&tmp, &dest)
                .map_err(|e| format!("cannot rename into {}: {e}", dest.display()))?;
            Ok(format!(
                "wrote {n} bytes to {}: start redis-server with --dir {} --dbfilename dump.rdb (with the server stopped)",
                dest.display(),
                dir.display()
            ))
        }
        (Engine::Sqlite, true) => Err("a SQLite backup restores to a file path, not a URL".into()),
        (_, false) => {
            Err(format!("a {engine} backup restores to a server URL, e.g. {}", example_url(engine)))
        }
        (_, true) => {
            let spec = config::target_from_url("restore", engine, &opts.to)?;
            restore_to_server(engine, &spec, &mut dump, opts)?;
            check_digest(&digest, m)?;
            Ok(format!("restored {} into {}", m.id, redact_url(&opts.to)))
        }
    }
}

/// `docker://[USER@]CONTAINER[/DATABASE][?host=H&port=P]`: the engine's restore tool runs
/// inside the container (and connects to its default socket unless `host`/`port` say
/// otherwise); the password comes from `BACKUPY_RESTORE_PASSWORD` (a secret reference).
fn docker_target(engine: Engine, rest: &str) -> Result<drivers::TargetSpec, String> {
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (user, rest) = match rest.split_once('@') {
        Some((u, r)) => (u, r),
        None => ("", rest),
    };
    let (container, database) = rest.split_once('/').unwrap_or((rest, ""));
    crate::docker::names::check_container_ref(container)?;
    let mut spec = drivers::TargetSpec::new("restore", engine);
    spec.strategy = drivers::Strategy::DockerExec { container: container.to_string() };
    spec.username = user.to_string();
    spec.database = database.to_string();
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "host" => spec.host = v.into_owned(),
            "port" => {
                spec.port = v.parse().map_err(|_| format!("docker:// url: port {v:?} is not a port"))?
            }
            _ => {
                spec.options.insert(k.into_owned(), v.into_owned());
            }
        }
    }
    if let Some(password) = crate::env::Env::get().restore_password()? {
        spec.password = Some(password);
    }
    Ok(spec)
}

fn restore_to_server(
    engine: Engine,
    spec: &drivers::TargetSpec,
    dump: &mut dyn Read,
    opts: &RestoreOptions,
) -> Result<(), String> {
    let temp = Some(opts.temp_dir.clone());
    match engine {
        Engine::PostgreSql => drivers::postgres::restore(
            spec,
            dump,
            &drivers::postgres::PgRestoreOptions {
                clean: opts.force,
                no_owner: true,
                temp_dir: temp,
                ..Default::default()
            },
        ),
        Engine::MySql | Engine::MariaDb => drivers::mysql::restore(
            spec,
            dump,
            &drivers::mysql::MySqlRestoreOptions { create_database: true, temp_dir: temp },
        ),
        Engine::MongoDb => drivers::mongodb::restore(
            spec,
            dump,
            &drivers::mongodb::RestoreOptions {
                drop: opts.force,
                target_db: (!spec.database.is_empty()).then(|| spec.database.clone()),
                temp_dir: opts.temp_dir.clone(),
                native: false,
            },
        )
        .map(|_| ()),
        Engine::Redis => drivers::redis::restore_replay(
            spec,
            dump,
            &drivers::redis::ReplayOptions { replace: opts.force, redis_server: None, temp_dir: temp },
        )
        .map(|_| ()),
        Engine::Sqlite => unreachable!("SQLite restores to a file"),
    }
    .map_err(|e| e.to_string())
}

/// Writes a SQLite database next to its destination, checks it, then renames it into place.
fn restore_file(
    dump: &mut dyn Read,
    to: &Path,
    force: bool,
    digest: &Arc<Mutex<Digested>>,
    m: &Manifest,
) -> Result<String, String> {
    if to.exists() && !force {
        return Err(format!("{} already exists; pass --force to replace it", to.display()));
    }
    let dir = to.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".restore-")
        .tempfile_in(dir)
        .map_err(|e| format!("cannot create a file in {}: {e}", dir.display()))?;
    let n = std::io::copy(dump, tmp.as_file_mut()).map_err(describe)?;
    check_digest(digest, m)?;
    tmp.as_file().sync_all().map_err(|e| e.to_string())?;
    let conn =
        rusqlite::Connection::open(tmp.path()).map_err(|e| format!("restored file does not open: {e}"))?;
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(|e| format!("restored database fails its integrity check: {e}"))?;
    drop(conn);
    if check != "ok" {
        return Err(format!("restored database fails its integrity check: {check}"));
    }
    tmp.persist(to).map_err(|e| format!("cannot rename into {}: {}", to.display(), e.error))?;
    Ok(format!("restored {} ({n} bytes, integrity ok) to {}", m.id, to.display()))
}

fn example_url(engine: Engine) -> &'static str {
    match engine {
        Engine::PostgreSql => "postgres://user@127.0.0.1:5432/newdb",
        Engine::MySql | Engine::MariaDb => "mysql://root@127.0.0.1:3306/newdb",
        Engine::MongoDb => "mongodb://user@127.0.0.1:27017/newdb",
        Engine::Redis => "redis://127.0.0.1:6379 (or a data directory)",
        Engine::Sqlite => "/path/to/restored.db",
    }
}
