//! The manifest's `content` block of a PostgreSQL backup (issue 19): one REPEATABLE READ
//! transaction exports its snapshot (`pg_export_snapshot()`), `pg_dump --snapshot=<id>`
//! dumps exactly that snapshot, and the same transaction counts the rows of every
//! table pg_dump dumps. The counts are exact: both see one snapshot, and no second
//! snapshot is taken.
//!
//! Threads: the transaction's connection lives on a `pg-count` thread that counts, puts
//! the counts into the source's content slot, then holds the transaction open until
//! the dump stage drops the source (pg_dump has finished: its output ended). Dropping
//! the [`SnapshotGuard`] (a guard of that source) ends the wait, cancels a count still
//! running (a cancelled run), and joins the thread, so the runner finds the counts in
//! the slot once the pipeline has returned.

use std::collections::BTreeMap;
use std::path::Path;

use crossbeam_channel::{Receiver, Sender, bounded};

use super::super::exec::PrivateDir;
use super::super::{DriverError, TargetSpec};
use crate::pipeline::source::ContentSlot;
use crate::storage::Content;

/// Which relations are counted, as pg_dump dumps their data: ordinary tables (and
/// partitions), `FROM ONLY` each, outside the system schemas, not belonging to an
/// extension. Partitioned parents hold no rows themselves, views, materialized views,
/// foreign tables and sequences are left out.
pub const TABLES_QUERY: &str = "SELECT n.nspname, c.relname FROM pg_class c \
     JOIN pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
     AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%' \
     AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass \
                     AND d.objid = c.oid AND d.deptype = 'e') \
     ORDER BY 1, 2";

/// An open REPEATABLE READ transaction whose snapshot pg_dump is to dump.
pub struct Snapshot {
    /// The id `pg_dump --snapshot=` takes.
    pub id: String,
    client: postgres::Client,
    engine_version: String,
}

/// Opens the transaction and exports its snapshot, on `client`, a connection of its own
/// (`agent_connect`).
pub fn begin(
    spec: &TargetSpec,
    mut client: postgres::Client,
    engine_version: &str,
) -> Result<Snapshot, DriverError> {
    let err = |m: String| DriverError::new(&spec.id, m);
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .map_err(|e| err(format!("cannot begin the snapshot transaction: {}", super::pg_error_text(&e))))?;
    let id: String = client
        .query_one("SELECT pg_export_snapshot()", &[])
        .and_then(|row| row.try_get(0))
        .map_err(|e| err(format!("cannot export the snapshot: {}", super::pg_error_text(&e))))?;
    Ok(Snapshot { id, client, engine_version: engine_version.to_string() })
}

/// Ends the snapshot's transaction when dropped, after its counts are in the slot.
pub struct SnapshotGuard {
    stop: Option<Sender<()>>,
    cancel: postgres::CancelToken,
    thread: Option<std::thread::JoinHandle<()>>,
    counted: Receiver<()>,
}

impl Snapshot {
    /// Starts counting on the `pg-count` thread; the counts go into `slot`. The returned
    /// guard keeps the transaction open until it is dropped.
    pub fn count_into(self, target: &str, slot: ContentSlot) -> std::io::Result<SnapshotGuard> {
        let (stop, stopped) = bounded::<()>(0);
        let (done, counted) = bounded::<()>(1);
        let cancel = self.client.cancel_token();
        let target = target.to_string();
        let Snapshot { mut client, engine_version, .. } = self;
        let thread = std::thread::Builder::new().name("pg-count".into()).spawn(move || {
            match count_rows(&mut client) {
                Ok(tables) => {
                    *slot.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(content_of(&engine_version, tables));
                }
                // The dump itself is not affected: its manifest has no `content` block.
                Err(e) => log::warn!(
                    "target {target}: cannot count the rows of the dump's snapshot, the manifest gets no \
                     content block: {e}"
                ),
            }
            let _ = done.send(());
            // Hold the transaction (and so the exported snapshot) until the dump ended.
            let _ = stopped.recv();
            let _ = client.batch_execute("ROLLBACK");
        })?;
        Ok(SnapshotGuard { stop: Some(stop), cancel, thread: Some(thread), counted })
    }
}

impl Drop for SnapshotGuard {
    fn drop(&mut self) {
        // A count still running when the source goes (a cancelled or failed run) is
        // cancelled on the server rather than waited for.
        if self.counted.try_recv().is_err() {
            let _ = self.cancel.cancel_query(postgres::NoTls);
        }
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The manifest `content` block of a PostgreSQL dump with these row counts.
pub fn content_of(engine_version: &str, tables: BTreeMap<String, u64>) -> Content {
    Content {
        engine_version: engine_version.to_string(),
        counted_from: "pg_export_snapshot() transaction of pg_dump --snapshot".into(),
        exactness: "exact".into(),
        unit: "rows".into(),
        tables,
    }
}

/// Rows per table ("schema.table", both unquoted) of the database `client` is in, inside
/// its current transaction. A drill counts its scratch database with the same function.
pub fn count_rows(client: &mut postgres::Client) -> Result<BTreeMap<String, u64>, String> {
    let rows = client.query(TABLES_QUERY, &[]).map_err(|e| format!("cannot list the tables: {e}"))?;
    let mut out = BTreeMap::new();
    for row in rows {
        let (schema, table): (String, String) =
            (row.try_get(0).map_err(|e| e.to_string())?, row.try_get(1).map_err(|e| e.to_string())?);
        let sql = format!("SELECT count(*) FROM ONLY {}.{}", quote_ident(&schema), quote_ident(&table));
        let n: i64 = client.query_one(sql.as_str(), &[]).and_then(|r| r.try_get(0)).map_err(|e| {
            format!("cannot count the rows of {schema}.{table}: {}", super::pg_error_text(&e))
        })?;
        out.insert(format!("{schema}.{table}"), u64::try_from(n).unwrap_or(0));
    }
    Ok(out)
}

/// An SQL identifier in double quotes.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A connection to `database` on `spec`'s server, with the target's TLS settings, as the
/// dump's pre-check has (a drill's scratch database and its counting). `temp_dir` takes
/// the private directory of a decrypted client key for the length of the handshake.
pub fn connect(spec: &TargetSpec, database: &str, temp_dir: &Path) -> Result<postgres::Client, DriverError> {
    let ssl = super::ssl_settings(spec)?;
    let dir = PrivateDir::new(temp_dir).map_err(|e| {
        DriverError::new(
            &spec.id,
            format!("cannot create a private directory in {}: {e}", temp_dir.display()),
        )
    })?;
    let mut scoped = spec.clone();
    scoped.database = database.to_string();
    super::agent_connect(&scoped, database, &ssl, &dir)
}
