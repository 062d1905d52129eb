//! SQLite through its online backup API: a consistent snapshot copied in one backup
//! step (so concurrent writers cannot make it inconsistent) into a 0600 temporary file
//! in the state directory, streamed by the pipeline and deleted once the dump stage has read it
//! (or, after a crash, at the next start: its name carries the owner tag of `leftovers`).
//! Before it is streamed, the snapshot's rows are counted per table for the manifest's
//! `content` block (issue 19); a drill counts a restored copy with the same function.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::{DriverError, Engine, MAGIC_LEN, check_magic};
use crate::cancel::Cancel;
use crate::pipeline::Source;
use crate::storage::Content;

/// "SQLite <version>" of the library that takes the snapshot.
pub fn engine_version() -> String {
    format!("SQLite {}", rusqlite::version())
}

/// Pages copied per backup step: between steps the run's cancel flag is checked, so a
/// cancel or timeout stops even the snapshot of a large database within a second or so.
const STEP_PAGES: i32 = 4096;
/// How long one attempt to take the read lock waits before the cancel flag is checked
/// again; the whole wait is bounded by [`LOCK_WAIT`].
const BUSY_SLICE: Duration = Duration::from_millis(200);
/// How long the database may stay locked by other connections before the run fails.
const LOCK_WAIT: Duration = Duration::from_secs(300);

/// Takes a snapshot of the database at `path` and returns it as a pipeline source.
///
/// The source connection holds one read transaction over the whole copy, so the
/// snapshot is consistent although it is copied in steps: the backup never restarts,
/// and other connections' writes are not in it. A cancel of the run is checked between
/// steps and while the database is locked by someone else.
pub fn snapshot(target: &str, path: &Path, temp_dir: &Path, cancel: &Cancel) -> Result<Source, DriverError> {
    let err = |m: String| DriverError::new(target, m);
    let meta = std::fs::metadata(path).map_err(|e| {
        err(if e.kind() == std::io::ErrorKind::NotFound {
            format!("database file {} does not exist", path.display())
        } else {
            format!("cannot access database file {}: {e}", path.display())
        })
    })?;
    if !meta.is_file() {
        return Err(err(format!("{} is not a file", path.display())));
    }
    let src =
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .map_err(|e| err(format!("cannot open {}: {e}", path.display())))?;
    src.busy_timeout(BUSY_SLICE).map_err(|e| err(format!("cannot set busy timeout: {e}")))?;
    let stopped = || {
        err(format!(
            "the snapshot of {} was stopped ({})",
            path.display(),
            cancel.reason().map_or("cancelled".to_string(), |r| r.to_string())
        ))
    };
    // The read transaction that keeps the copy consistent across steps. A writer that
    // holds the database locked makes this wait, in slices, watching the cancel flag.
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        if cancel.is_cancelled() {
            return Err(stopped());
        }
        let begun = src
            .execute_batch("BEGIN")
            .and_then(|_| src.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get::<_, i64>(0)));
        match begun {
            Ok(_) => break,
            Err(e) if is_busy(&e) && std::time::Instant::now() < deadline => {
                let _ = src.execute_batch("ROLLBACK");
            }
            Err(e) if is_busy(&e) => {
                return Err(err(format!(
                    "{} stayed locked by other connections for {} minutes",
                    path.display(),
                    LOCK_WAIT.as_secs() / 60
                )));
            }
            Err(e) => return Err(err(format!("cannot read {}: {e}", path.display()))),
        }
    }

    std::fs::create_dir_all(temp_dir)
        .map_err(|e| err(format!("cannot create temporary directory {}: {e}", temp_dir.display())))?;
    let snapshot = tempfile::Builder::new()
        .prefix(&crate::leftovers::tagged_prefix(crate::leftovers::SQLITE_SNAPSHOT))
        .tempfile_in(temp_dir)
        .map_err(|e| err(format!("cannot create a snapshot file in {}: {e}", temp_dir.display())))?;
    let content = {
        let mut dst = Connection::open(snapshot.path())
            .map_err(|e| err(format!("cannot open snapshot file {}: {e}", snapshot.path().display())))?;
        let backup = rusqlite::backup::Backup::new(&src, &mut dst)
            .map_err(|e| err(format!("cannot start the online backup of {}: {e}", path.display())))?;
        // Steps of STEP_PAGES pages inside the read transaction begun above: the same
        // consistent state throughout, and a cancel is seen between steps.
        loop {
            use rusqlite::backup::StepResult;
            if cancel.is_cancelled() {
                return Err(stopped());
            }
            match backup
                .step(STEP_PAGES)
                .map_err(|e| err(format!("online backup of {} failed: {e}", path.display())))?
            {
                StepResult::Done => break,
                StepResult::More => {}
                _ if std::time::Instant::now() > deadline => {
                    return Err(err(format!(
                        "online backup of {} stayed locked by other connections for {} minutes",
                        path.display(),
                        LOCK_WAIT.as_secs() / 60
                    )));
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        drop(backup);
        // The copy is complete: release the live database before counting.
        let _ = src.execute_batch("COMMIT");
        // The manifest's `content` (issue 19): counted from the snapshot file that is
        // about to be streamed, so the counts are exactly those of the stored dump. On the
        // connection that wrote it: closing it leaves no -wal/-shm file beside the
        // snapshot (a read-only connection to a WAL-mode copy would).
        let tables = count_rows(&dst, Some(cancel))
            .map_err(|e| err(format!("cannot count the rows of the snapshot of {}: {e}", path.display())))?;
        content_of(tables)
    };
    let file = snapshot.reopen().map_err(|e| err(format!("cannot read snapshot file: {e}")))?;
    let size = file.metadata().map(|m| m.len()).ok();
    Ok(Source::from_reader(format!("sqlite snapshot of {}", path.display()), file)
        .with_magic(MAGIC_LEN, Box::new(|head| check_magic(Engine::Sqlite, head)))
        .with_size_hint(size)
        .with_guard(snapshot)
        .with_content(content))
}

/// The manifest `content` block of a SQLite snapshot with these row counts.
pub fn content_of(tables: BTreeMap<String, u64>) -> Content {
    Content {
        engine_version: engine_version(),
        counted_from: "sqlite snapshot file".into(),
        exactness: "exact".into(),
        unit: "rows".into(),
        tables,
    }
}

/// Rows per table of the database open on `conn`: every ordinary table of `main`
/// (`sqlite_master` type `table`), the internal `sqlite_*` tables and virtual tables
/// left out (a virtual table's rows live in its shadow tables, which are counted, and
/// its module may not be loadable here). Used at backup time on the snapshot and by a
/// drill on the restored copy, so both sides count the same way. `cancel` is checked
/// between tables.
pub fn count_rows(conn: &Connection, cancel: Option<&Cancel>) -> Result<BTreeMap<String, u64>, String> {
    let mut stmt = conn
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' \
             AND upper(coalesce(sql, '')) NOT LIKE 'CREATE VIRTUAL%' ORDER BY name",
        )
        .map_err(|e| format!("cannot list the tables: {e}"))?;
    let names = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .and_then(|rows| rows.collect::<Result<Vec<String>, _>>())
        .map_err(|e| format!("cannot list the tables: {e}"))?;
    let mut out = BTreeMap::new();
    for name in names {
        if cancel.is_some_and(Cancel::is_cancelled) {
            return Err("stopped (cancelled)".into());
        }
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        let n: i64 = conn
            .query_row(&format!("SELECT count(*) FROM main.{quoted}"), [], |r| r.get(0))
            .map_err(|e| format!("cannot count the rows of table {name:?}: {e}"))?;
        out.insert(name, u64::try_from(n).unwrap_or(0));
    }
    Ok(out)
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy) | Some(rusqlite::ErrorCode::DatabaseLocked)
    )
}
