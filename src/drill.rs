//! Restore drills (issue 19, first part): prove that a stored backup restores, by
//! restoring it into scratch and comparing what came back with the manifest's `content`
//! block, then writing the evidence (`<object>.drill.json`) beside the backup.
//!
//! Built so far: SQLite (scratch = a temporary file in the state directory's `tmp`) and
//! PostgreSQL (scratch = a database with a unique name on the target's own server,
//! created for the drill and dropped whatever happens). The other engines are refused
//! with a clear error until their counting exists.
//! Runs on the caller's thread; the restore streams through the `restore` module (the
//! same path as `backupy-agent restore`) and stops at the caller's [`Cancel`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use chrono::Utc;
use serde::{Deserialize, Serialize};

use crate::cancel::Cancel;
use crate::crypto::KeySource;
use crate::drivers::Engine;
use crate::storage::{self, Manifest, Storage};

/// The version of the drill report's JSON (docs/drills.md).
pub const REPORT_VERSION: u32 = 1;

/// What a drill needs besides the backup.
pub struct DrillOptions {
    /// Where the scratch copy goes (the state directory's `tmp`).
    pub temp_dir: PathBuf,
    /// Stops the drill (SIGINT/SIGTERM): the download ends, the scratch copy is removed.
    pub cancel: Cancel,
    /// The job's target: where a server engine's scratch database is created.
    pub target: Option<crate::drivers::TargetSpec>,
}

/// One table's counts: what the manifest promised and what the restored copy holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TableResult {
    pub name: String,
    /// `None`: the table is not in the manifest (it appeared in the restored copy).
    pub expected: Option<u64>,
    /// `None`: the table is missing from the restored copy.
    pub found: Option<u64>,
    pub ok: bool,
}

/// The evidence of one drill, written as `<object>.drill.json` (schema: docs/drills.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DrillReport {
    pub report_version: u32,
    /// "passed" or "failed".
    pub status: String,
    /// Why the drill failed; empty when it passed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    pub backup_id: String,
    pub job: String,
    pub target: String,
    pub engine: String,
    pub object_key: String,
    /// The SHA-256 of the stored object, from the manifest; a drill that got past its
    /// verification step has recomputed it from the stored bytes.
    pub object_sha256: String,
    /// Whether the stored bytes were verified (size, SHA-256, every chunk, magic).
    pub object_verified: bool,
    /// Where the copy was restored: "temporary file" (SQLite) or the scratch database's
    /// name (dropped again before the report was written).
    pub scratch: String,
    /// The manifest's `content.engine_version` (the engine that was backed up).
    pub backup_engine_version: String,
    /// What a count counts ("rows").
    pub unit: String,
    /// Every table of the manifest or of the restored copy, by name.
    pub tables: Vec<TableResult>,
    pub verify_seconds: f64,
    /// The measured recovery time: download, decrypt, decompress and write the copy.
    pub restore_seconds: f64,
    /// Dump bytes restored per second of `restore_seconds`.
    pub restore_bytes_per_second: f64,
    pub count_seconds: f64,
    pub duration_seconds: f64,
    pub agent_version: String,
    pub host: String,
    pub started_at: String,
    pub finished_at: String,
}

impl DrillReport {
    pub fn passed(&self) -> bool {
        self.status == "passed"
    }
}

/// How a drill ended when it produced no verdict on the backup.
#[derive(Debug)]
pub enum DrillError {
    /// The drill cannot run at all (unknown engine, no `content` block, ...): no report.
    Refused(String),
    /// Stopped by the cancel flag; the scratch copy is gone.
    Cancelled(String),
}

impl std::fmt::Display for DrillError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DrillError::Refused(m) | DrillError::Cancelled(m) => f.write_str(m),
        }
    }
}

/// The debug-build-only test hook: SQL run on the scratch copy after the restore and
/// before counting, so tests can prove the comparison catches a difference. Compiled
/// out of release builds (`cfg(debug_assertions)`), where the variable is ignored.
pub const TEST_SCRATCH_SQL_VAR: &str = "BACKUPY_TEST_DRILL_SCRATCH_SQL";

/// Drills the backup `m`: verifies the stored object, restores it into scratch, counts
/// and compares. A verdict (passed or failed) is returned as a report, also written
/// beside the backup; the caller decides the exit status from [`DrillReport::passed`].
pub fn drill(
    storage: &Storage,
    m: &Manifest,
    key: Option<&KeySource>,
    opts: &DrillOptions,
) -> Result<DrillReport, DrillError> {
    let engine = Engine::parse(&m.engine)
        .ok_or_else(|| DrillError::Refused(format!("manifest names unknown engine {:?}", m.engine)))?;
    if !matches!(engine, Engine::Sqlite | Engine::PostgreSql) {
        return Err(DrillError::Refused(format!(
            "drills of {engine} backups are not built yet (only sqlite and postgresql); see docs/drills.md"
        )));
    }
    if engine == Engine::PostgreSql && opts.target.as_ref().is_none_or(|t| t.engine != engine) {
        return Err(DrillError::Refused(format!(
            "backup {} is a PostgreSQL backup: the drill needs the job's PostgreSQL target for its scratch database",
            m.id
        )));
    }
    let content = m.content.as_ref().ok_or_else(|| {
        DrillError::Refused(format!(
            "backup {} has no `content` block in its manifest (written by agent {} before drills \
             existed), so there is nothing to compare a restore with; run `verify` or `restore` instead, \
             or drill a newer backup",
            m.id, m.agent_version
        ))
    })?;
    let started = Utc::now();
    let t0 = Instant::now();
    let mut report = DrillReport {
        report_version: REPORT_VERSION,
        status: "failed".into(),
        error: String::new(),
        backup_id: m.id.clone(),
        job: m.job.clone(),
        target: m.target.clone(),
        engine: m.engine.clone(),
        object_key: m.object_key.clone(),
        object_sha256: m.sha256.clone(),
        object_verified: false,
        scratch: String::new(),
        backup_engine_version: content.engine_version.clone(),
        unit: content.unit.clone(),
        tables: Vec::new(),
        verify_seconds: 0.0,
        restore_seconds: 0.0,
        restore_bytes_per_second: 0.0,
        count_seconds: 0.0,
        duration_seconds: 0.0,
        agent_version: crate::AGENT_VERSION.to_string(),
        host: crate::session::hostname(),
        started_at: storage::rfc3339(started),
        finished_at: String::new(),
    };
    let verdict = run(engine, storage, m, key, opts, &content.tables, &mut report);
    if opts.cancel.is_cancelled() {
        return Err(DrillError::Cancelled(format!(
            "the drill of backup {} was stopped ({}); its scratch copy was removed",
            m.id,
            opts.cancel.reason().map_or("cancelled".to_string(), |r| r.to_string())
        )));
    }
    match verdict {
        Ok(()) => report.status = "passed".into(),
        Err(e) => report.error = e,
    }
    report.duration_seconds = t0.elapsed().as_secs_f64();
    report.finished_at = storage::rfc3339(Utc::now());
    write_report(storage, &report);
    Ok(report)
}

/// Verify, restore into scratch, count, compare; fills `report` as it goes.
fn run(
    engine: Engine,
    storage: &Storage,
    m: &Manifest,
    key: Option<&KeySource>,
    opts: &DrillOptions,
    expected: &BTreeMap<String, u64>,
    report: &mut DrillReport,
) -> Result<(), String> {
    // 1. The whole stored object, before anything is restored: a tampered or corrupt
    //    object fails here and no scratch copy is ever made.
    let t = Instant::now();
    let verified = crate::verify::verify(storage, m, key);
    report.verify_seconds = t.elapsed().as_secs_f64();
    let verified = verified.map_err(|e| {
        if e.starts_with("cannot download") {
            format!("cannot fetch the backup: {e}")
        } else {
            format!("the backup is tampered or corrupt, nothing was restored: {e}")
        }
    })?;
    report.object_verified = true;
    report.object_sha256 = verified.sha256.clone();

    let found = match (engine, &opts.target) {
        (Engine::PostgreSql, Some(target)) => restore_postgres(storage, m, key, opts, target, report)?,
        _ => restore_sqlite(storage, m, key, opts, report)?,
    };
    if report.restore_seconds > 0.0 {
        report.restore_bytes_per_second = verified.dump_bytes as f64 / report.restore_seconds;
    }
    report.tables = compare(expected, &found);
    let bad: Vec<String> = report.tables.iter().filter(|t| !t.ok).map(describe_mismatch).collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!("the restored copy differs from the manifest: {}", bad.join("; ")))
    }
}

/// SQLite: restore into a scratch file and count its rows.
fn restore_sqlite(
    storage: &Storage,
    m: &Manifest,
    key: Option<&KeySource>,
    opts: &DrillOptions,
    report: &mut DrillReport,
) -> Result<BTreeMap<String, u64>, String> {
    // 2. Restore through the same path as `restore` (which checks the SHA-256 again
    //    before the file takes its name, and runs SQLite's integrity check). The scratch
    //    directory carries the restore spool's owner tag, so a crash's leftover is
    //    removed at the next start; otherwise it goes when `scratch` is dropped.
    std::fs::create_dir_all(&opts.temp_dir)
        .map_err(|e| format!("cannot create {}: {e}", opts.temp_dir.display()))?;
    let scratch = tempfile::Builder::new()
        .prefix(&crate::leftovers::tagged_prefix(crate::leftovers::RESTORE_SPOOL))
        .tempdir_in(&opts.temp_dir)
        .map_err(|e| format!("cannot create a scratch directory in {}: {e}", opts.temp_dir.display()))?;
    let file = scratch.path().join("drill.sqlite");
    let restore_opts = crate::restore::RestoreOptions {
        to: file.display().to_string(),
        force: false,
        temp_dir: opts.temp_dir.clone(),
        preverify: true,
        cancel: opts.cancel.clone(),
    };
    report.scratch = "temporary file".into();
    let t = Instant::now();
    let restored = crate::restore::restore(storage, m, key, &restore_opts);
    report.restore_seconds = t.elapsed().as_secs_f64();
    restored.map_err(|e| format!("the restore into scratch failed: {e}"))?;

    // 3. Count the restored copy the way the backup counted its snapshot.
    let t = Instant::now();
    let conn = rusqlite::Connection::open(&file)
        .map_err(|e| format!("cannot open the restored copy {}: {e}", file.display()))?;
    if let Some(sql) = test_scratch_sql() {
        conn.execute_batch(&sql).map_err(|e| format!("{TEST_SCRATCH_SQL_VAR}: {e}"))?;
    }
    let found = crate::drivers::sqlite::count_rows(&conn, Some(&opts.cancel))
        .map_err(|e| format!("cannot count the restored copy: {e}"))?;
    drop(conn);
    report.count_seconds = t.elapsed().as_secs_f64();
    Ok(found)
}

/// PostgreSQL: create a scratch database on the target's server, `pg_restore` the
/// backup into it (one transaction), count its rows; the database is dropped when the
/// guard goes, on every path (a failure, a cancel that killed pg_restore).
fn restore_postgres(
    storage: &Storage,
    m: &Manifest,
    key: Option<&KeySource>,
    opts: &DrillOptions,
    target: &crate::drivers::TargetSpec,
    report: &mut DrillReport,
) -> Result<BTreeMap<String, u64>, String> {
    use crate::drivers::postgres::content;
    let name = format!("backupy_drill_{}", uuid::Uuid::new_v4().simple());
    let scratch = ScratchDb::create(target, &name, &opts.temp_dir)?;
    report.scratch = name.clone();
    let mut spec = target.clone();
    spec.database = name.clone();

    // The object was verified above; it is read again from storage, and pg_restore sees
    // the end of its input only when these bytes hash to the manifest's SHA-256 too (an
    // object swapped in between fails, and the one transaction is never committed).
    let crate::verify::OpenedBackup { dump, digest, .. } = crate::verify::open_backup(storage, m, key)
        .map_err(|e| format!("the backup is tampered or corrupt: {e}"))?;
    let mut dump: Box<dyn std::io::Read> =
        Box::new(crate::cancel::CancellableReader::new(dump, opts.cancel.clone()));
    let mut input = crate::restore::CheckedAtEnd::new(&mut dump, &digest, m);
    let t = Instant::now();
    let restored = crate::drivers::postgres::restore(
        &spec,
        &mut input,
        &crate::drivers::postgres::PgRestoreOptions {
            no_owner: true,
            single_transaction: true,
            temp_dir: Some(opts.temp_dir.clone()),
            cancel: Some(opts.cancel.clone()),
            ..Default::default()
        },
    );
    report.restore_seconds = t.elapsed().as_secs_f64();
    restored.map_err(|e| format!("the restore into scratch database {name} failed: {e}"))?;

    let t = Instant::now();
    let mut client = content::connect(target, &name, &opts.temp_dir).map_err(|e| e.to_string())?;
    if let Some(sql) = test_scratch_sql() {
        client.batch_execute(&sql).map_err(|e| format!("{TEST_SCRATCH_SQL_VAR}: {e}"))?;
    }
    let found =
        content::count_rows(&mut client).map_err(|e| format!("cannot count scratch database {name}: {e}"))?;
    drop(client);
    report.count_seconds = t.elapsed().as_secs_f64();
    drop(scratch);
    Ok(found)
}

/// A scratch database, dropped (with its connections) when this goes out of scope.
struct ScratchDb {
    target: crate::drivers::TargetSpec,
    name: String,
    temp_dir: std::path::PathBuf,
}

impl ScratchDb {
    fn create(
        target: &crate::drivers::TargetSpec,
        name: &str,
        temp_dir: &std::path::Path,
    ) -> Result<Self, String> {
        let mut admin = crate::drivers::postgres::content::connect(target, &target.database, temp_dir)
            .map_err(|e| format!("cannot reach the server for the scratch database: {e}"))?;
        admin
            .batch_execute(&format!(
                "CREATE DATABASE {} TEMPLATE template0",
                crate::drivers::postgres::content::quote_ident(name)
            ))
            .map_err(|e| {
                let why = e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_string());
                format!(
                    "cannot create the scratch database {name} on the server of target {} (the user needs CREATEDB): {why}",
                    target.id
                )
            })?;
        log::info!("drill: created scratch database {name} on the server of target {}", target.id);
        Ok(Self { target: target.clone(), name: name.to_string(), temp_dir: temp_dir.to_path_buf() })
    }
}

impl Drop for ScratchDb {
    fn drop(&mut self) {
        let sql = format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            crate::drivers::postgres::content::quote_ident(&self.name)
        );
        let dropped =
            crate::drivers::postgres::content::connect(&self.target, &self.target.database, &self.temp_dir)
                .map_err(|e| e.to_string())
                .and_then(|mut c| c.batch_execute(&sql).map_err(|e| e.to_string()));
        match dropped {
            Ok(()) => log::info!("drill: dropped scratch database {}", self.name),
            Err(e) => log::error!(
                "drill: cannot drop scratch database {} on the server of target {}: {e}; drop it by hand",
                self.name,
                self.target.id
            ),
        }
    }
}

/// The debug-build-only test hook's SQL, when set.
#[cfg(debug_assertions)]
fn test_scratch_sql() -> Option<String> {
    let sql = std::env::var(TEST_SCRATCH_SQL_VAR).ok().filter(|s| !s.is_empty())?;
    log::warn!("{TEST_SCRATCH_SQL_VAR} is set (debug build): running it on the scratch copy");
    Some(sql)
}

#[cfg(not(debug_assertions))]
fn test_scratch_sql() -> Option<String> {
    None
}

/// Every table of either side, by name, and whether its counts agree.
pub fn compare(expected: &BTreeMap<String, u64>, found: &BTreeMap<String, u64>) -> Vec<TableResult> {
    let names: std::collections::BTreeSet<&String> = expected.keys().chain(found.keys()).collect();
    names
        .into_iter()
        .map(|name| {
            let (e, f) = (expected.get(name).copied(), found.get(name).copied());
            TableResult { name: name.clone(), expected: e, found: f, ok: e.is_some() && e == f }
        })
        .collect()
}

fn describe_mismatch(t: &TableResult) -> String {
    match (t.expected, t.found) {
        (Some(e), Some(f)) => format!("table {:?}: expected {e}, found {f}", t.name),
        (Some(e), None) => format!("table {:?}: expected {e}, missing from the restored copy", t.name),
        (None, Some(f)) => format!("table {:?}: not in the manifest, found {f}", t.name),
        (None, None) => format!("table {:?}: no counts", t.name),
    }
}

/// Writes the report beside the backup. A failure to write is logged, not fatal: the
/// verdict is still printed and returned.
fn write_report(storage: &Storage, report: &DrillReport) {
    let key = storage::drill_report_key(&report.object_key);
    let written = serde_json::to_vec_pretty(report)
        .map_err(|e| e.to_string())
        .and_then(|json| storage.put(&key, &json).map_err(|e| e.to_string()));
    match written {
        Ok(()) => log::info!("drill report written to {}", storage.describe(&key)),
        Err(e) => log::warn!("cannot write the drill report {}: {e}", storage.describe(&key)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_names_every_difference() {
        let e: BTreeMap<String, u64> = [("a".to_string(), 3), ("b".to_string(), 2)].into();
        let f: BTreeMap<String, u64> = [("a".to_string(), 3), ("c".to_string(), 1)].into();
        let r = compare(&e, &f);
        assert_eq!(
            r.iter().map(|t| (t.name.as_str(), t.ok)).collect::<Vec<_>>(),
            [("a", true), ("b", false), ("c", false)]
        );
        assert_eq!(describe_mismatch(&r[1]), "table \"b\": expected 2, missing from the restored copy");
        assert_eq!(describe_mismatch(&r[2]), "table \"c\": not in the manifest, found 1");
    }
}
