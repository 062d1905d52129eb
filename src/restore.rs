//! Restore of a stored backup from storage alone: download, verify the SHA-256 against
//! the manifest, decrypt, decompress, and hand the dump to its engine's restore — a file
//! for SQLite (and a Redis data directory), the engine's own tool or protocol for servers.
//! Runs on the caller's thread; the dump streams through in O(chunk) memory.
//!
//! A restore into a server is applied only after the whole object has been checked
//! (issue 16.4): the stored bytes are downloaded once into a 0600 spool file in the state
//! directory's `tmp` (ciphertext, unless the backup is unencrypted) while every chunk is
//! authenticated, the dump decompressed, its magic checked and the SHA-256 compared with
//! the manifest; only then is the spool decrypted again into the restore tool. Nothing
//! reaches the server from an object that fails. `--no-preverify` streams in one pass;
//! then a failure part-way kills the tool (its process group, or the exec in the
//! container) before it sees the end of its input, and the error names the decrypt or
//! verify cause. Files (SQLite, a Redis data directory) are always written under a
//! temporary name and checked before they take their real name, so they need no spool.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::cancel::{Cancel, CancellableReader};
use crate::config;
use crate::crypto::{self, KeySource};
use crate::drivers::{self, Engine, MAGIC_LEN, check_magic};
use crate::secrets::redact_url;
use crate::storage::{Manifest, Storage};
use crate::verify::{Digested, OpenedBackup, check_digest, describe, open_backup, open_stored};

pub struct RestoreOptions {
    /// A file (SQLite), a data directory (Redis), or a server URL.
    pub to: String,
    /// Replace what is there: an existing SQLite file, existing tables/collections/keys.
    pub force: bool,
    /// Where temporary files go.
    pub temp_dir: PathBuf,
    /// Check the whole object before anything is written to a server (the default).
    pub preverify: bool,
    /// Stops the restore (SIGINT/SIGTERM on `restore`): the download ends at the next
    /// buffer and a running restore tool is killed with its process group.
    pub cancel: Cancel,
}

/// What a one-pass restore into a server risks, logged and returned with the result.
pub const NO_PREVERIFY_WARNING: &str = "--no-preverify: the backup is applied while it is downloaded and \
     decrypted; a damaged or tampered object is found only part-way through, and then PostgreSQL rolls \
     back but MySQL/MariaDB and MongoDB keep what was applied before the failure";

/// Restores `m`; returns a one-line description of what was restored where.
pub fn restore(
    storage: &Storage,
    m: &Manifest,
    key: Option<&KeySource>,
    opts: &RestoreOptions,
) -> Result<String, String> {
    let engine =
        Engine::parse(&m.engine).ok_or_else(|| format!("manifest names unknown engine {:?}", m.engine))?;
    let docker = opts.to.strip_prefix("docker://");
    let is_url = opts.to.contains("://");
    let into_server = docker.is_some() || (is_url && engine != Engine::Sqlite);
    if !into_server {
        if is_url {
            return Err("a SQLite backup restores to a file path, not a URL".into());
        }
        let OpenedBackup { dump, digest, .. } = open_backup(storage, m, key)?;
        let mut dump = CancellableReader::new(dump, opts.cancel.clone());
        return restore_to_path(engine, &mut dump, &digest, m, opts);
    }
    // Refuse a bad destination before anything is downloaded.
    let spec = match docker {
        Some(rest) => docker_target(engine, rest)?,
        None => config::target_from_url("restore", engine, &opts.to)?,
    };
    let (mut dump, digest, _spool) = if opts.preverify {
        let spool = preverify(storage, engine, m, key, &opts.temp_dir, &opts.cancel)?;
        let file = spool.reopen().map_err(|e| format!("cannot reopen the verified copy: {e}"))?;
        let (dump, digest) = open_stored(Box::new(file), m, key)?;
        (dump, digest, Some(spool))
    } else {
        log::warn!("{NO_PREVERIFY_WARNING}");
        let input =
            storage.get(&m.object_key).map_err(|e| format!("cannot download {}: {e}", m.object_key))?;
        let input = Box::new(CancellableReader::new(input, opts.cancel.clone()));
        let (dump, digest) = open_stored(input, m, key)?;
        (dump, digest, None)
    };
    // The tool sees the end of its input only once the stored bytes matched the
    // manifest: a mismatch is an input error, which stops the tool before it commits.
    let mut checked = CheckedAtEnd { inner: &mut dump, digest: &digest, m, done: false };
    let (result, place) = match &spec.strategy {
        drivers::Strategy::DockerExec { container } => (
            drivers::docker_exec::restore(&spec, container, &mut checked, opts.force)
                .map_err(|e| e.to_string()),
            format!("container {container}"),
        ),
        _ => (restore_to_server(engine, &spec, &mut checked, opts), redact_url(&opts.to)),
    };
    result?;
    check_digest(&digest, m)?;
    let how = if opts.preverify { "verified, then applied" } else { "applied in one pass (--no-preverify)" };
    Ok(format!("restored {} into {place} ({how})", m.id))
}

/// What a restore stopped part-way (a signal) leaves behind, per engine, in one clause.
pub fn what_a_stop_leaves(engine: &str) -> &'static str {
    match Engine::parse(engine) {
        Some(Engine::PostgreSql) => {
            "nothing was committed: PostgreSQL rolled the restore's one transaction back"
        }
        Some(Engine::Sqlite) => "the destination file was not written",
        Some(Engine::Redis) => {
            "a data directory's dump.rdb was not replaced; a restore into a server keeps the keys written so far"
        }
        Some(Engine::MySql | Engine::MariaDb) => {
            "MySQL/MariaDB keep the tables applied before the stop: drop the target database or restore again"
        }
        Some(Engine::MongoDb) => {
            "MongoDB keeps the collections applied before the stop: drop the target database or restore again"
        }
        None => "nothing more to clean up",
    }
}

/// SQLite to a file, Redis to a data directory.
fn restore_to_path(
    engine: Engine,
    dump: &mut dyn Read,
    digest: &Arc<Mutex<Digested>>,
    m: &Manifest,
    opts: &RestoreOptions,
) -> Result<String, String> {
    match engine {
        Engine::Sqlite => restore_file(dump, Path::new(&opts.to), opts.force, digest, m),
        Engine::Redis => {
            let dir = Path::new(&opts.to);
            let dest = dir.join("dump.rdb");
            if dest.exists() && !opts.force {
                return Err(format!("{} already exists; pass --force to replace it", dest.display()));
            }
            // Written under a temporary name and checked against the manifest before it
            // takes the name redis-server loads.
            let tmp_name = format!(".dump.rdb.restore-{}", std::process::id());
            let n = drivers::redis::restore_to_dir(dump, dir, &tmp_name).map_err(|e| e.to_string())?;
            let tmp = dir.join(&tmp_name);
            if let Err(e) = check_digest(digest, m) {
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
        _ => Err(format!("a {engine} backup restores to a server URL, e.g. {}", example_url(engine))),
    }
}

/// Downloads the object into a spool file while checking all of it: every chunk's
/// authentication, the decompressed dump's magic, and the size and SHA-256 against the
/// manifest. Returns the spool (deleted when dropped) only when everything held.
fn preverify(
    storage: &Storage,
    engine: Engine,
    m: &Manifest,
    key: Option<&KeySource>,
    temp_dir: &Path,
    cancel: &Cancel,
) -> Result<tempfile::NamedTempFile, String> {
    let fail = |e: String| format!("the backup failed verification, nothing was written to the server: {e}");
    std::fs::create_dir_all(temp_dir).map_err(|e| format!("cannot create {}: {e}", temp_dir.display()))?;
    let spool = tempfile::Builder::new()
        .prefix(&crate::leftovers::tagged_prefix(crate::leftovers::RESTORE_SPOOL))
        .tempfile_in(temp_dir)
        .map_err(|e| format!("cannot create a spool file in {}: {e}", temp_dir.display()))?;
    let copy = spool.as_file().try_clone().map_err(|e| format!("cannot open the spool file: {e}"))?;
    let input = storage.get(&m.object_key).map_err(|e| format!("cannot download {}: {e}", m.object_key))?;
    let input = CancellableReader::new(input, cancel.clone());
    let tee = Tee { inner: input, copy: io::BufWriter::with_capacity(1 << 20, copy) };
    let (mut dump, digest) = open_stored(Box::new(tee), m, key).map_err(fail)?;
    let mut head = vec![0u8; MAGIC_LEN];
    let n = crypto::read_up_to(&mut dump, &mut head).map_err(|e| fail(describe(e)))?;
    head.truncate(n);
    check_magic(engine, &head)
        .map_err(|why| fail(format!("the dump is not a valid {engine} dump: {why}")))?;
    io::copy(&mut dump, &mut io::sink()).map_err(|e| fail(describe(e)))?;
    check_digest(&digest, m).map_err(fail)?;
    drop(dump); // flushes the tee's buffer into the spool
    spool.as_file().sync_all().map_err(|e| format!("cannot write the spool file: {e}"))?;
    Ok(spool)
}

/// Copies every byte read into a file (the spool of [`preverify`]).
struct Tee<R> {
    inner: R,
    copy: io::BufWriter<std::fs::File>,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.copy
            .write_all(&buf[..n])
            .map_err(|e| io::Error::new(e.kind(), format!("writing the spool file: {e}")))?;
        if n == 0 {
            self.copy.flush()?;
        }
        Ok(n)
    }
}

/// Turns the end of the dump into an error when the stored bytes do not match the
/// manifest, so a restore tool never sees a clean end of input from a bad object.
/// Also used by `drill` for its scratch database.
pub(crate) struct CheckedAtEnd<'a> {
    inner: &'a mut Box<dyn Read>,
    digest: &'a Arc<Mutex<Digested>>,
    m: &'a Manifest,
    done: bool,
}

impl<'a> CheckedAtEnd<'a> {
    pub(crate) fn new(
        inner: &'a mut Box<dyn Read>,
        digest: &'a Arc<Mutex<Digested>>,
        m: &'a Manifest,
    ) -> Self {
        Self { inner, digest, m, done: false }
    }
}

impl Read for CheckedAtEnd<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf).map_err(|e| io::Error::new(e.kind(), describe(e)))?;
        if n == 0 && !buf.is_empty() && !self.done {
            check_digest(self.digest, self.m).map_err(io::Error::other)?;
            self.done = true;
        }
        Ok(n)
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
                // A failure part-way (a bad object with --no-preverify, a server error)
                // rolls everything back instead of leaving tables half replaced.
                single_transaction: true,
                cancel: Some(opts.cancel.clone()),
                ..Default::default()
            },
        ),
        Engine::MySql | Engine::MariaDb => drivers::mysql::restore(
            spec,
            dump,
            &drivers::mysql::MySqlRestoreOptions {
                create_database: true,
                temp_dir: temp,
                cancel: Some(opts.cancel.clone()),
            },
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
