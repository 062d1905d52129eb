//! SQLite through its online backup API: a consistent snapshot copied in one backup
//! step (so concurrent writers cannot make it inconsistent) into a 0600 temporary file
//! in the state directory, streamed by the pipeline and deleted once the dump stage has read it
//! (or, after a crash, at the next start: its name carries the owner tag of `leftovers`).

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::{DriverError, Engine, MAGIC_LEN, check_magic};
use crate::pipeline::Source;

/// "SQLite <version>" of the library that takes the snapshot.
pub fn engine_version() -> String {
    format!("SQLite {}", rusqlite::version())
}

/// Takes a snapshot of the database at `path` and returns it as a pipeline source.
pub fn snapshot(target: &str, path: &Path, temp_dir: &Path) -> Result<Source, DriverError> {
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
    src.busy_timeout(Duration::from_secs(30)).map_err(|e| err(format!("cannot set busy timeout: {e}")))?;

    std::fs::create_dir_all(temp_dir)
        .map_err(|e| err(format!("cannot create temporary directory {}: {e}", temp_dir.display())))?;
    let snapshot = tempfile::Builder::new()
        .prefix(&crate::leftovers::tagged_prefix(crate::leftovers::SQLITE_SNAPSHOT))
        .tempfile_in(temp_dir)
        .map_err(|e| err(format!("cannot create a snapshot file in {}: {e}", temp_dir.display())))?;
    {
        let mut dst = Connection::open(snapshot.path())
            .map_err(|e| err(format!("cannot open snapshot file {}: {e}", snapshot.path().display())))?;
        let backup = rusqlite::backup::Backup::new(&src, &mut dst)
            .map_err(|e| err(format!("cannot start the online backup of {}: {e}", path.display())))?;
        // -1 copies every page in one step while holding the read lock: a consistent
        // snapshot. Smaller steps would restart whenever another connection writes.
        let deadline = std::time::Instant::now() + Duration::from_secs(300);
        loop {
            use rusqlite::backup::StepResult;
            match backup
                .step(-1)
                .map_err(|e| err(format!("online backup of {} failed: {e}", path.display())))?
            {
                StepResult::Done => break,
                _ if std::time::Instant::now() > deadline => {
                    return Err(err(format!(
                        "online backup of {} stayed locked by other connections for 5 minutes",
                        path.display()
                    )));
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
    let file = snapshot.reopen().map_err(|e| err(format!("cannot read snapshot file: {e}")))?;
    let size = file.metadata().map(|m| m.len()).ok();
    Ok(Source::from_reader(format!("sqlite snapshot of {}", path.display()), file)
        .with_magic(MAGIC_LEN, Box::new(|head| check_magic(Engine::Sqlite, head)))
        .with_size_hint(size)
        .with_guard(snapshot))
}
