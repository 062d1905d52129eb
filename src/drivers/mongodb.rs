//! MongoDB: `mongodump --archive` when the tool is installed, otherwise a native dumper
//! built on the `mongodb` crate's synchronous client that writes the same archive
//! format (see [`archive`]), so `mongorestore --archive` can restore either. Restore
//! goes through `mongorestore --archive` when it exists, otherwise through the native
//! archive reader (create collections with their options, insert, build indexes).
//!
//! The native dump is a lazy `Read`: each `read` pulls the next documents from the
//! current cursor and frames them, so memory stays at one server batch (≤ 16 MiB) plus
//! a 256 KiB buffer, whatever the database size. Like mongodump without `--oplog`, it
//! is not a point-in-time snapshot: each collection is read with its own cursor.
//!
//! Target options (`TargetSpec::options`): `uri` replaces host/port (credentials from
//! the target are put into it); `tool` = `auto` (default) | `native` | `mongodump`;
//! every other option becomes a connection-string parameter (`authSource=admin`,
//! `tls=true`, `serverSelectionTimeoutMS=2000`, …). `directConnection=true` is added
//! for a single-host `mongodb://` URI unless the URI says otherwise. Server selection
//! and connection time out after 5 s unless the URI sets them.

pub mod archive;

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ::mongodb::bson::{Bson, Document, RawDocumentBuf, doc};
use ::mongodb::error::{Error as MongoError, ErrorKind};
use ::mongodb::options::ClientOptions;
use ::mongodb::sync::{Client, Cursor};

use super::{DriverError, Dump, DumpContext, Engine, MAGIC_LEN, Strategy, TargetSpec, check_magic, exec};
use crate::pipeline::Source;
use crate::secrets::{Secret, redact_values};

pub const DEFAULT_PORT: u16 = 27017;
/// Server selection and connect timeout unless the connection string sets them.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Never dumped when the target names no database (mongodump skips local and config;
/// admin holds users and roles, which the native restore cannot replay).
pub const SKIPPED_DATABASES: &[&str] = &["admin", "local", "config"];
/// Option keys the driver reads itself; all others go into the connection string.
const DRIVER_OPTIONS: &[&str] = &["uri", "tool"];
/// Bytes the native dumper frames before handing them to the pipeline.
const FILL_TARGET: usize = 256 << 10;
const INSERT_BATCH_DOCS: usize = 1000;
const INSERT_BATCH_BYTES: usize = 8 << 20;

/// What [`capability`] and the dump report as the tool.
pub const NATIVE: &str = "native";

/// The capability line: the installed `mongodump`'s version, else the native dumper,
/// which is always available.
pub fn capability() -> Option<String> {
    Some(match tool_version("mongodump") {
        Some(v) => format!("mongodump {v}"),
        None => format!("{NATIVE} archive writer (mongodb crate)"),
    })
}

/// "100.9.4" from `mongodump --version` ("mongodump version: 100.9.4").
fn tool_version(name: &str) -> Option<String> {
    let tool = exec::find_tool(&[name])?;
    let out = exec::tool_command(&tool).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("version"))?;
    Some(line.rsplit(' ').next()?.trim().to_string())
}

/// "MongoDB 8.2.0" from a `buildInfo` version such as "8.2.0" or "7.0.5-ent".
pub fn engine_version(server_version: &str) -> String {
    let number: String = server_version.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    format!("MongoDB {}", if number.is_empty() { server_version } else { &number })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tool {
    Auto,
    Native,
    External,
}

fn tool_choice(spec: &TargetSpec) -> Result<Tool, DriverError> {
    match spec.options.get("tool").map(String::as_str) {
        None | Some("auto") => Ok(Tool::Auto),
        Some("native") => Ok(Tool::Native),
        Some("mongodump") | Some("mongorestore") => Ok(Tool::External),
        Some(other) => Err(DriverError::new(
            &spec.id,
            format!("option tool = {other:?}: expected auto, native, mongodump or mongorestore"),
        )),
    }
}

// --------------------------------------------------------------------- connection

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn pct(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A connection string with the target's credentials, and what error messages may
/// show of it.
struct Uri {
    full: Secret,
    /// The host list, for messages ("127.0.0.1:27017").
    hosts: String,
    auth_source: String,
}

fn connection_uri(spec: &TargetSpec) -> Result<Uri, String> {
    let base = match spec.options.get("uri") {
        Some(u) => u.trim().to_string(),
        None => {
            let port = if spec.port == 0 { DEFAULT_PORT } else { spec.port };
            let host = match &spec.strategy {
                Strategy::UnixSocket => pct(&spec.host),
                _ => {
                    let h = if spec.host.is_empty() { "127.0.0.1" } else { spec.host.as_str() };
                    if h.contains(':') && !h.starts_with('[') {
                        format!("[{h}]:{port}")
                    } else {
                        format!("{h}:{port}")
                    }
                }
            };
            format!("mongodb://{host}/")
        }
    };
    let Some((scheme, rest)) = base.split_once("://") else {
        return Err("option uri must start with mongodb:// or mongodb+srv://".into());
    };
    if scheme != "mongodb" && scheme != "mongodb+srv" {
        return Err(format!("option uri has scheme {scheme:?}: expected mongodb or mongodb+srv"));
    }
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (userinfo, hosts) = match authority.rfind('@') {
        Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
        None => (None, authority),
    };
    if hosts.is_empty() {
        return Err("the connection string names no host".into());
    }
    let userinfo = if spec.username.is_empty() {
        userinfo.map(str::to_string)
    } else {
        let mut u = pct(&spec.username);
        if let Some(pw) = &spec.password {
            u.push(':');
            u.push_str(&pct(pw.expose()));
        }
        Some(u)
    };
    let (path, query) = tail.split_once('?').unwrap_or((tail, ""));
    let path = if path.is_empty() { "/" } else { path };
    let mut params: Vec<String> = query.split('&').filter(|p| !p.is_empty()).map(str::to_string).collect();
    let has = |params: &[String], key: &str| {
        params.iter().any(|p| p.split('=').next().is_some_and(|k| k.eq_ignore_ascii_case(key)))
    };
    for (k, v) in &spec.options {
        if !DRIVER_OPTIONS.contains(&k.as_str()) && !has(&params, k) {
            params.push(format!("{}={}", pct(k), pct(v)));
        }
    }
    if scheme == "mongodb"
        && !hosts.contains(',')
        && !has(&params, "directConnection")
        && !has(&params, "replicaSet")
    {
        params.push("directConnection=true".into());
    }
    let auth_source = params
        .iter()
        .find_map(|p| p.split_once('=').filter(|(k, _)| k.eq_ignore_ascii_case("authSource")).map(|(_, v)| v))
        .map(str::to_string)
        .unwrap_or_else(|| {
            let db = path.trim_start_matches('/');
            if db.is_empty() { "admin".to_string() } else { db.to_string() }
        });
    let user = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
    let query = if params.is_empty() { String::new() } else { format!("?{}", params.join("&")) };
    Ok(Uri {
        full: Secret::new(format!("{scheme}://{user}{hosts}{path}{query}")),
        hosts: hosts.to_string(),
        auth_source,
    })
}

/// A connected client and what error messages need to know about it.
pub struct Connection {
    client: Client,
    target: String,
    user: String,
    uri: Uri,
    timeout: Duration,
    secrets: Vec<String>,
}

impl Connection {
    /// Parses the connection string and checks the server is reachable and the
    /// credentials work (`buildInfo`); returns the connection and the server's version.
    pub fn open(spec: &TargetSpec) -> Result<(Self, String), DriverError> {
        let uri = connection_uri(spec).map_err(|m| DriverError::new(&spec.id, m))?;
        let mut secrets = Vec::new();
        if let Some(pw) = spec.password.as_ref().filter(|p| !p.is_empty()) {
            secrets.push(pw.expose().to_string());
            secrets.push(pct(pw.expose()));
        }
        let user = if spec.username.is_empty() {
            // A user given inside `uri`: "user:pw@" → "user".
            let full = uri.full.expose();
            let rest = full.split_once("://").map(|x| x.1).unwrap_or("");
            let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
            match authority.rfind('@') {
                Some(i) => {
                    let info = &authority[..i];
                    if let Some((_, pw)) = info.split_once(':') {
                        secrets.push(pw.to_string());
                    }
                    info.split(':').next().unwrap_or("").to_string()
                }
                None => String::new(),
            }
        } else {
            spec.username.clone()
        };
        // Shorter values would blank ordinary words of the driver's messages.
        secrets.retain(|s| s.len() >= 3);
        let redact = |msg: String| redact_values(&msg, &secrets);
        let mut opts = ClientOptions::parse(uri.full.expose()).run().map_err(|e| {
            DriverError::new(&spec.id, redact(format!("invalid MongoDB connection string: {}", e.kind)))
        })?;
        let timeout = *opts.server_selection_timeout.get_or_insert(DEFAULT_TIMEOUT);
        opts.connect_timeout.get_or_insert(DEFAULT_TIMEOUT);
        opts.app_name.get_or_insert_with(|| "backupy-agent".to_string());
        let client = Client::with_options(opts).map_err(|e| {
            DriverError::new(&spec.id, redact(format!("cannot create a MongoDB client: {}", e.kind)))
        })?;
        let conn = Self { client, target: spec.id.clone(), user, uri, timeout, secrets };
        let info = conn
            .client
            .database("admin")
            .run_command(doc! { "buildInfo": 1 })
            .run()
            .map_err(|e| conn.error(&e))?;
        let version = info.get_str("version").unwrap_or("unknown").to_string();
        Ok((conn, version))
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// A message for a driver error: authentication, reachability and permissions
    /// named plainly; never a password.
    fn describe(&self, e: &MongoError) -> String {
        let auth = |m: &str| {
            format!(
                "authentication failed for user {:?} (authSource {}) at {}: {m}",
                self.user, self.uri.auth_source, self.uri.hosts
            )
        };
        let msg = match e.kind.as_ref() {
            ErrorKind::Authentication { message, .. } => auth(message),
            ErrorKind::Command(c) if c.code == 18 => auth(&c.message),
            ErrorKind::Command(c) if c.code == 13 => format!("not authorized on the server: {}", c.message),
            ErrorKind::ServerSelection { message, .. } => format!(
                "cannot reach the MongoDB server at {} within {:.1} s: {}",
                self.uri.hosts,
                self.timeout.as_secs_f64(),
                selection_cause(message)
            ),
            other => other.to_string(),
        };
        redact_values(&msg, &self.secrets)
    }

    fn error(&self, e: &MongoError) -> DriverError {
        DriverError::new(&self.target, self.describe(e))
    }

    fn io_error(&self, what: &str, e: &MongoError) -> io::Error {
        io::Error::other(format!("{what}: {}", self.describe(e)))
    }
}

/// The first server's error out of a server-selection message ("… Servers: [ { …,
/// Error: Kind: I/O error: Connection refused (os error 111), labels: … } ] }"), else
/// the whole message.
fn selection_cause(message: &str) -> &str {
    match message.split_once("Error: Kind: ") {
        Some((_, rest)) => rest.split(", labels:").next().unwrap_or(rest).trim(),
        None => message,
    }
}

// --------------------------------------------------------------------------- dump

/// One collection or view to dump.
struct Planned {
    db: String,
    meta: archive::Metadata,
}

/// Lists what a dump of `spec` covers: databases (spec.database, or every one but
/// admin/local/config), their collections and views with options and indexes, the way
/// mongodump does (system.* skipped except system.js).
fn plan(conn: &Connection, spec: &TargetSpec) -> Result<(Vec<Planned>, Option<u64>), DriverError> {
    let names = conn.client.list_database_names().run().map_err(|e| conn.error(&e))?;
    let dbs: Vec<String> = if spec.database.is_empty() {
        names.into_iter().filter(|n| !SKIPPED_DATABASES.contains(&n.as_str())).collect()
    } else if names.iter().any(|n| n == &spec.database) {
        vec![spec.database.clone()]
    } else {
        let mut shown = names;
        shown.sort();
        return Err(DriverError::new(
            &spec.id,
            format!(
                "database {:?} does not exist on the server at {} (it has: {})",
                spec.database,
                conn.uri.hosts,
                if shown.is_empty() { "none".to_string() } else { shown.join(", ") }
            ),
        ));
    };
    let mut out = Vec::new();
    let mut size = Some(0u64);
    for db_name in dbs {
        let db = conn.client.database(&db_name);
        let cursor =
            db.run_cursor_command(doc! { "listCollections": 1 }).run().map_err(|e| conn.error(&e))?;
        let mut colls = Vec::new();
        for info in cursor {
            let info = info.map_err(|e| conn.error(&e))?;
            let name = info.get_str("name").unwrap_or_default().to_string();
            if skip_collection(&name) {
                continue;
            }
            let kind = info.get_str("type").unwrap_or("collection").to_string();
            if kind == "timeseries" {
                return Err(DriverError::new(
                    &spec.id,
                    format!(
                        "{db_name}.{name} is a time-series collection, which the native dumper does not \
                         support yet (install mongodump)"
                    ),
                ));
            }
            let options = info.get_document("options").cloned().unwrap_or_default();
            let uuid = match info.get_document("info").ok().and_then(|i| i.get("uuid")) {
                Some(Bson::Binary(b)) if b.subtype == ::mongodb::bson::spec::BinarySubtype::Uuid => {
                    hex::encode(&b.bytes)
                }
                _ => String::new(),
            };
            let indexes = if kind == "view" {
                Vec::new()
            } else {
                let listed = db
                    .run_cursor_command(doc! { "listIndexes": &name })
                    .run()
                    .and_then(|c| c.collect::<Result<Vec<Document>, _>>());
                match listed {
                    Ok(i) => i,
                    // NamespaceNotFound: dropped since listCollections; mongodump skips it too.
                    Err(e) if matches!(e.kind.as_ref(), ErrorKind::Command(c) if c.code == 26) => continue,
                    Err(e) => return Err(conn.error(&e)),
                }
            };
            colls.push(archive::Metadata { options, indexes, uuid, collection_name: name, kind });
        }
        colls.sort_by(|a, b| a.collection_name.cmp(&b.collection_name));
        let stats = db.run_command(doc! { "dbStats": 1 }).run().ok();
        size = match (size, stats.as_ref().and_then(|s| number(s.get("dataSize")))) {
            (Some(total), Some(n)) => Some(total + n),
            _ => None,
        };
        out.extend(colls.into_iter().map(|meta| Planned { db: db_name.clone(), meta }));
    }
    Ok((out, size))
}

fn number(b: Option<&Bson>) -> Option<u64> {
    match b? {
        Bson::Int32(n) => u64::try_from(*n).ok(),
        Bson::Int64(n) => u64::try_from(*n).ok(),
        Bson::Double(f) if *f >= 0.0 => Some(*f as u64),
        _ => None,
    }
}

/// mongodump's rule: skip `system.*` (except `system.js`) and names with `$`.
fn skip_collection(name: &str) -> bool {
    (name.starts_with("system.") && name != "system.js") || name.contains('$')
}

/// Starts a dump of `spec`: `mongodump --archive` when installed (and not
/// `tool = "native"`), else the native archive writer.
pub fn dump(spec: &TargetSpec, ctx: &DumpContext) -> Result<Dump, DriverError> {
    let choice = tool_choice(spec)?;
    let (conn, server_version) = Connection::open(spec)?;
    let engine_version = engine_version(&server_version);
    let tool = match choice {
        Tool::Native => None,
        Tool::Auto => exec::find_tool(&["mongodump"]),
        Tool::External => Some(exec::find_tool(&["mongodump"]).ok_or_else(|| {
            DriverError::new(&spec.id, "option tool = mongodump, but mongodump is not on PATH")
        })?),
    };
    if let Some(tool) = tool {
        let source = dump_with_tool(spec, ctx, &tool, &conn)?;
        return Ok(Dump { source, engine_version });
    }
    let (planned, size) = plan(&conn, spec)?;
    let header = archive::Header::new(server_version, format!("backupy-agent {}", env!("CARGO_PKG_VERSION")));
    let metas: Vec<archive::CollectionMetadata> =
        planned.iter().map(|p| archive::CollectionMetadata::new(&p.db, &p.meta)).collect();
    let writer = archive::Writer::new(Vec::with_capacity(FILL_TARGET * 2), &header, &metas)
        .map_err(|e| DriverError::new(&spec.id, format!("cannot write the archive prelude: {e}")))?;
    let name = if spec.database.is_empty() {
        format!("native mongodb dump of {}", conn.uri.hosts)
    } else {
        format!("native mongodb dump of {} on {}", spec.database, conn.uri.hosts)
    };
    let stream = NativeArchive {
        conn,
        queue: planned.into(),
        writer,
        pos: 0,
        cursor: None,
        current: None,
        done: false,
        cancel: ctx.cancel.clone(),
    };
    let source = Source::from_reader(name, stream)
        .with_magic(MAGIC_LEN, Box::new(|head| check_magic(Engine::MongoDb, head)))
        .with_size_hint(size);
    Ok(Dump { source, engine_version })
}

/// A 0600 YAML file for the MongoDB tools' `--config`: the connection string with its
/// password (a JSON string is a valid YAML double-quoted scalar).
fn tool_config(dir: &exec::PrivateDir, uri: &Secret) -> io::Result<PathBuf> {
    let quoted = serde_json::to_string(uri.expose()).map_err(io::Error::other)?;
    dir.write_secret("mongo-tools.yaml", &Secret::new(format!("uri: {quoted}\n")))
}

fn dump_with_tool(
    spec: &TargetSpec,
    ctx: &DumpContext,
    tool: &Path,
    conn: &Connection,
) -> Result<Source, DriverError> {
    let err = |m: String| DriverError::new(&spec.id, m);
    let dir = exec::PrivateDir::new(&ctx.temp_dir)
        .map_err(|e| err(format!("cannot create a private directory in {}: {e}", ctx.temp_dir.display())))?;
    let config = tool_config(&dir, &conn.uri.full)
        .map_err(|e| err(format!("cannot write the mongodump config: {e}")))?;
    let mut cmd = exec::tool_command(tool);
    // --archive without a file name writes to stdout; no --gzip: the pipeline compresses.
    cmd.arg("--archive").arg(format!("--config={}", config.display()));
    if !spec.database.is_empty() {
        cmd.arg(format!("--db={}", spec.database));
    }
    let source = Source::spawn("mongodump", cmd).map_err(|e| err(e.to_string()))?;
    Ok(source.with_magic(MAGIC_LEN, Box::new(|head| check_magic(Engine::MongoDb, head))).with_guard(dir))
}

/// The native dump as a lazy reader: frames the next documents only when the pipeline
/// asks for bytes.
struct NativeArchive {
    conn: Connection,
    queue: VecDeque<Planned>,
    writer: archive::Writer<Vec<u8>>,
    /// Bytes of the writer's buffer already handed out.
    pos: usize,
    cursor: Option<Cursor<RawDocumentBuf>>,
    /// "db.collection" being read, for error messages.
    current: Option<String>,
    done: bool,
    /// The run's cancel flag, checked per document: one `fill` can read many server
    /// batches of small documents before it returns to the pipeline.
    cancel: crate::cancel::Cancel,
}

impl NativeArchive {
    fn fill(&mut self) -> io::Result<()> {
        let stopped = |cancel: &crate::cancel::Cancel| {
            io::Error::other(format!(
                "the native dump was stopped ({})",
                cancel.reason().map_or("cancelled".to_string(), |r| r.to_string())
            ))
        };
        if self.cancel.is_cancelled() {
            // Dropping the cursor (with the reader) kills it on the server.
            self.cursor = None;
            return Err(stopped(&self.cancel));
        }
        if let Some(cursor) = &mut self.cursor {
            let ns = self.current.as_deref().unwrap_or_default();
            while self.writer.get_mut().len() < FILL_TARGET {
                if self.cancel.is_cancelled() {
                    return Err(stopped(&self.cancel));
                }
                if !cursor.advance().map_err(|e| self.conn.io_error(&format!("reading {ns}"), &e))? {
                    self.cursor = None;
                    self.current = None;
                    return self.writer.end();
                }
                self.writer.document(cursor.current().as_bytes())?;
            }
            return Ok(());
        }
        let Some(p) = self.queue.pop_front() else {
            self.done = true;
            return Ok(());
        };
        let name = &p.meta.collection_name;
        self.writer.begin(&p.db, name)?;
        if p.meta.kind == "view" {
            // mongodump writes an empty block for a view: restore creates it from that.
            return self.writer.end();
        }
        let ns = format!("{}.{name}", p.db);
        let coll = self.conn.client.database(&p.db).collection::<RawDocumentBuf>(name);
        let cursor =
            coll.find(doc! {}).run().map_err(|e| self.conn.io_error(&format!("reading {ns}"), &e))?;
        self.cursor = Some(cursor);
        self.current = Some(ns);
        Ok(())
    }
}

impl Read for NativeArchive {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let pending = self.writer.get_mut();
            if self.pos < pending.len() {
                let n = buf.len().min(pending.len() - self.pos);
                buf[..n].copy_from_slice(&pending[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            pending.clear();
            self.pos = 0;
            if self.done {
                return Ok(0);
            }
            self.fill()?;
        }
    }
}

// ------------------------------------------------------------------------ restore

/// How to restore an archive.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Drop each collection (or view) before restoring it (`mongorestore --drop`).
    pub drop: bool,
    /// Restore into this database instead of the one in the archive (the archive must
    /// hold one database; `--nsFrom 'src.*' --nsTo 'target.*'`).
    pub target_db: Option<String>,
    /// Where the tool's 0600 config file goes (inside the state directory).
    pub temp_dir: PathBuf,
    /// Use the native reader even when mongorestore is installed.
    pub native: bool,
}

/// What a restore did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RestoreReport {
    /// "mongorestore" or "native".
    pub method: String,
    /// Restored namespaces (after renaming) and their document counts (native only).
    pub collections: Vec<(String, u64)>,
    /// Secondary indexes created (native only).
    pub indexes: usize,
    /// Namespaces in the archive that the native restore does not replay (users and
    /// roles in admin, the oplog).
    pub skipped: Vec<String>,
}

/// Restores a mongodump archive read from `input` into the server of `spec`.
pub fn restore(
    spec: &TargetSpec,
    input: &mut dyn Read,
    opts: &RestoreOptions,
) -> Result<RestoreReport, DriverError> {
    let choice = tool_choice(spec)?;
    let tool = match (opts.native, choice) {
        (true, _) | (_, Tool::Native) => None,
        (_, Tool::Auto) => exec::find_tool(&["mongorestore"]),
        (_, Tool::External) => Some(exec::find_tool(&["mongorestore"]).ok_or_else(|| {
            DriverError::new(&spec.id, "option tool = mongorestore, but it is not on PATH")
        })?),
    };
    match tool {
        Some(tool) => restore_with_tool(spec, input, opts, &tool),
        None => restore_native(spec, input, opts),
    }
}

/// Records every byte read through it (to replay the prelude to mongorestore).
struct Recorder<'a> {
    inner: &'a mut dyn Read,
    seen: Vec<u8>,
}

impl Read for Recorder<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.seen.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

/// The one database of an archive that `target_db` renames.
fn single_database(target: &str, dbs: &[String]) -> Result<String, DriverError> {
    let real: Vec<&String> = dbs.iter().filter(|d| !d.is_empty()).collect();
    match real.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(DriverError::new(target, "the archive holds no database to restore into another one")),
        many => Err(DriverError::new(
            target,
            format!(
                "the archive holds several databases ({}): a target database needs a one-database archive",
                many.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

fn restore_with_tool(
    spec: &TargetSpec,
    input: &mut dyn Read,
    opts: &RestoreOptions,
    tool: &Path,
) -> Result<RestoreReport, DriverError> {
    let err = |m: String| DriverError::new(&spec.id, m);
    let (conn, _) = Connection::open(spec)?;
    let mut cmd = exec::tool_command(tool);
    let dir = exec::PrivateDir::new(&opts.temp_dir)
        .map_err(|e| err(format!("cannot create a private directory in {}: {e}", opts.temp_dir.display())))?;
    let config = tool_config(&dir, &conn.uri.full)
        .map_err(|e| err(format!("cannot write the mongorestore config: {e}")))?;
    cmd.arg("--archive").arg(format!("--config={}", config.display()));
    if opts.drop {
        cmd.arg("--drop");
    }
    // Read the prelude first: renaming needs the archive's database name.
    let mut rec = Recorder { inner: input, seen: Vec::new() };
    let dbs =
        archive::Reader::new(&mut rec).map_err(|e| err(format!("reading the archive: {e}")))?.databases();
    if let Some(target) = &opts.target_db {
        let source = single_database(&spec.id, &dbs)?;
        cmd.arg(format!("--nsInclude={source}.*"))
            .arg(format!("--nsFrom={source}.*"))
            .arg(format!("--nsTo={target}.*"));
    }
    let Recorder { inner, seen } = rec;
    let mut whole = io::Cursor::new(seen).chain(inner);
    exec::feed("mongorestore", cmd, &mut whole).map_err(err)?;
    Ok(RestoreReport { method: "mongorestore".into(), ..Default::default() })
}

/// A namespace the native restore does not replay: users/roles/version in admin, the
/// oplog (db ""), `$admin.*` entries of `--dumpDbUsersAndRoles`.
fn not_replayed(db: &str, collection: &str) -> bool {
    db.is_empty() || collection.starts_with("$admin.") || (db == "admin" && collection.starts_with("system."))
}

struct Batch {
    ns: Option<(String, String)>,
    docs: Vec<RawDocumentBuf>,
    bytes: usize,
}

fn restore_native(
    spec: &TargetSpec,
    input: &mut dyn Read,
    opts: &RestoreOptions,
) -> Result<RestoreReport, DriverError> {
    let err = |m: String| DriverError::new(&spec.id, m);
    let (conn, _) = Connection::open(spec)?;
    let mut reader = archive::Reader::new(io::BufReader::with_capacity(1 << 20, input))
        .map_err(|e| err(format!("reading the archive: {e}")))?;
    let rename = match &opts.target_db {
        Some(target) => Some((single_database(&spec.id, &reader.databases())?, target.clone())),
        None => None,
    };
    let map_db = |db: &str| match &rename {
        Some((from, to)) if from == db => to.clone(),
        _ => db.to_string(),
    };
    let mut report = RestoreReport { method: NATIVE.into(), ..Default::default() };
    // Source namespace → (target db, metadata).
    let mut metas: HashMap<String, (String, archive::Metadata)> = HashMap::new();
    let collections = reader.collections.clone();
    // Collections before views: a view may be defined on any of them.
    let (views, colls): (Vec<_>, Vec<_>) = collections.iter().partition(|c| c.kind == "view");
    for c in colls.into_iter().chain(views) {
        if not_replayed(&c.db, &c.collection) {
            report.skipped.push(c.namespace());
            continue;
        }
        let meta = c.parsed().map_err(|m| err(format!("reading the archive: {m}")))?;
        if meta.kind == "timeseries" || c.kind == "timeseries" {
            return Err(err(format!(
                "{} is a time-series collection: the native restore does not support it (install mongorestore)",
                c.namespace()
            )));
        }
        let tdb = map_db(&c.db);
        let db = conn.client.database(&tdb);
        if opts.drop {
            db.collection::<Document>(&c.collection)
                .drop()
                .run()
                .map_err(|e| err(format!("dropping {tdb}.{}: {}", c.collection, conn.describe(&e))))?;
        }
        let mut create = doc! { "create": &c.collection };
        for (k, v) in &meta.options {
            create.insert(k.clone(), v.clone());
        }
        match db.run_command(create).run() {
            Ok(_) => {}
            // NamespaceExists: restore into the existing collection, as mongorestore does.
            Err(e) if matches!(e.kind.as_ref(), ErrorKind::Command(c) if c.code == 48) => {}
            Err(e) => return Err(err(format!("creating {tdb}.{}: {}", c.collection, conn.describe(&e)))),
        }
        metas.insert(c.namespace(), (tdb, meta));
    }

    let mut batch = Batch { ns: None, docs: Vec::new(), bytes: 0 };
    let flush = |batch: &mut Batch| -> Result<(), DriverError> {
        if let Some((tdb, coll)) = &batch.ns
            && !batch.docs.is_empty()
        {
            conn.client
                .database(tdb)
                .collection::<RawDocumentBuf>(coll)
                .insert_many(batch.docs.drain(..))
                .run()
                .map_err(|e| err(format!("inserting into {tdb}.{coll}: {}", conn.describe(&e))))?;
        }
        batch.docs.clear();
        batch.bytes = 0;
        Ok(())
    };
    let mut indexed: HashSet<String> = HashSet::new();
    loop {
        let event = reader.next_event().map_err(|e| err(format!("reading the archive: {e}")))?;
        match event {
            None => break,
            Some(archive::Event::Begin { .. }) => {}
            Some(archive::Event::Document { db, collection, doc }) => {
                if not_replayed(&db, &collection) {
                    continue;
                }
                let target = (map_db(&db), collection);
                if batch.ns.as_ref() != Some(&target) {
                    flush(&mut batch)?;
                    batch.ns = Some(target);
                }
                batch.bytes += doc.as_bytes().len();
                batch.docs.push(doc);
                if batch.docs.len() >= INSERT_BATCH_DOCS || batch.bytes >= INSERT_BATCH_BYTES {
                    flush(&mut batch)?;
                }
            }
            Some(archive::Event::End { db, collection, documents }) => {
                if not_replayed(&db, &collection) {
                    continue;
                }
                flush(&mut batch)?;
                let ns = format!("{db}.{collection}");
                if let Some((tdb, meta)) = metas.get(&ns) {
                    report.indexes += create_indexes(&conn, tdb, &collection, meta).map_err(err)?;
                    indexed.insert(ns);
                    report.collections.push((format!("{tdb}.{collection}"), documents));
                } else {
                    // Data for a namespace the prelude did not announce.
                    report.collections.push((format!("{}.{collection}", map_db(&db)), documents));
                }
            }
        }
    }
    flush(&mut batch)?;
    Ok(report)
}

/// Creates the secondary indexes of `meta` (not `_id_`); returns how many.
fn create_indexes(
    conn: &Connection,
    db: &str,
    collection: &str,
    meta: &archive::Metadata,
) -> Result<usize, String> {
    let specs: Vec<Document> = meta
        .indexes
        .iter()
        .filter(|i| i.get_str("name").ok() != Some("_id_"))
        .map(|i| {
            let mut i = i.clone();
            i.remove("ns");
            i
        })
        .collect();
    if specs.is_empty() {
        return Ok(0);
    }
    let n = specs.len();
    conn.client
        .database(db)
        .run_command(doc! { "createIndexes": collection, "indexes": specs })
        .run()
        .map_err(|e| format!("creating the indexes of {db}.{collection}: {}", conn.describe(&e)))?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> TargetSpec {
        let mut s = TargetSpec::new("m", Engine::MongoDb);
        s.host = "db.example".into();
        s
    }

    #[test]
    fn connection_strings_carry_credentials_options_and_direct_connection() {
        let mut s = spec();
        let u = connection_uri(&s).unwrap();
        assert_eq!(u.full.expose(), "mongodb://db.example:27017/?directConnection=true");
        assert_eq!(u.auth_source, "admin");

        s.port = 27018;
        s.username = "bäck up".into();
        s.password = Some(Secret::new("p@ss:w/rd%"));
        s.options.insert("authSource".into(), "users".into());
        s.options.insert("tool".into(), "native".into());
        let u = connection_uri(&s).unwrap();
        assert_eq!(
            u.full.expose(),
            "mongodb://b%C3%A4ck%20up:p%40ss%3Aw%2Frd%25@db.example:27018/?authSource=users&directConnection=true"
        );
        assert_eq!(u.hosts, "db.example:27018");
        assert_eq!(u.auth_source, "users");

        // A uri option: its own parameters win; credentials from the target replace its user.
        let mut s = spec();
        s.options.insert("uri".into(), "mongodb://old:pw@a:1,b:2/app?replicaSet=rs0&authSource=x".into());
        s.username = "u".into();
        s.password = Some(Secret::new("p"));
        let u = connection_uri(&s).unwrap();
        assert_eq!(u.full.expose(), "mongodb://u:p@a:1,b:2/app?replicaSet=rs0&authSource=x");
        s.options.insert("uri".into(), "mongodb+srv://cluster.example/".into());
        assert_eq!(connection_uri(&s).unwrap().full.expose(), "mongodb+srv://u:p@cluster.example/");
        s.options.insert("uri".into(), "postgres://x".into());
        assert!(connection_uri(&s).is_err());

        let mut s = spec();
        s.strategy = Strategy::UnixSocket;
        s.host = "/tmp/mongodb-27017.sock".into();
        assert_eq!(
            connection_uri(&s).unwrap().full.expose(),
            "mongodb://%2Ftmp%2Fmongodb-27017.sock/?directConnection=true"
        );
        let mut s = spec();
        s.host = "::1".into();
        assert_eq!(connection_uri(&s).unwrap().full.expose(), "mongodb://[::1]:27017/?directConnection=true");
    }

    #[test]
    fn server_selection_messages_are_shortened_to_the_cause() {
        let m = "Server selection timeout: No available servers. Topology: { Type: Single, Servers: [ { \
                 Address: 127.0.0.1:1, Type: Unknown, Error: Kind: I/O error: Connection refused (os error \
                 111), labels: {\"RetryableError\"}, source: None } ] }";
        assert_eq!(selection_cause(m), "I/O error: Connection refused (os error 111)");
        assert_eq!(selection_cause("plain"), "plain");
    }

    #[test]
    fn engine_versions_drop_suffixes() {
        assert_eq!(engine_version("8.2.0"), "MongoDB 8.2.0");
        assert_eq!(engine_version("7.0.5-ent"), "MongoDB 7.0.5");
    }

    #[test]
    fn mongodump_skip_rules() {
        assert!(skip_collection("system.views"));
        assert!(!skip_collection("system.js"));
        assert!(skip_collection("a$b"));
        assert!(!skip_collection("orders"));
        assert!(not_replayed("admin", "system.users"));
        assert!(not_replayed("", "oplog"));
        assert!(!not_replayed("app", "system.js"));
    }

    #[test]
    fn capability_is_always_available() {
        assert!(capability().is_some());
    }
}
