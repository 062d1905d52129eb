//! The state database (SQLite in `state_dir`, WAL, synchronous=FULL): one record per run,
//! used by `list`-style reporting, retention and missed-run detection; and the lock that
//! keeps a second agent off the same state directory.
//!
//! Shared by the scheduler thread and the worker threads through one mutex-guarded
//! connection (the database is the one piece of state made for sharing); every write is
//! a short transaction.
//!
//! File modes (issue 16): a state directory the agent creates is 0700 and `state.db`
//! is 0600 (SQLite gives its `-wal` and `-shm` files the database's mode), because the
//! database holds run records, the sealed outbox and connected mode's config. An existing
//! directory is left as the operator made it; a `state.db` open to others is tightened.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "another backupy-agent is using the state directory {dir} (it holds the lock {lock}); stop it or use another state_dir"
    )]
    Locked { dir: String, lock: String },
    #[error("state database {path}: {message}")]
    Db { path: String, message: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    Running,
    Success,
    Failed,
    Cancelled,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Success => "success",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "running" => RunStatus::Running,
            "success" => RunStatus::Success,
            "cancelled" => RunStatus::Cancelled,
            _ => RunStatus::Failed,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRecord {
    pub run_id: String,
    pub job_id: String,
    pub status: RunStatus,
    pub attempt: u32,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub size_bytes: u64,
    pub object_key: String,
    pub error: String,
}

/// `state_dir/state.db`: the runs (here), the outbox and connected mode's tables.
pub fn db_path(state_dir: &Path) -> PathBuf {
    state_dir.join("state.db")
}

/// A connection to `state_dir/state.db` with the settings every table in it relies on:
/// WAL, so that `dump-state` reads while the agent writes; synchronous=FULL, so that a
/// committed outbox entry or run record survives a power cut; and a busy timeout, as
/// several connections of one process write to it.
pub fn open_connection(state_dir: &Path) -> rusqlite::Result<Connection> {
    let path = db_path(state_dir);
    private_db_file(&path).map_err(|e| {
        rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
            Some(format!("cannot create {} with mode 0600: {e}", path.display())),
        )
    })?;
    let conn = Connection::open(&path)?;
    conn.execute_batch(
        "PRAGMA journal_mode=WAL;
         PRAGMA synchronous=FULL;
         PRAGMA busy_timeout=5000;",
    )?;
    Ok(conn)
}

/// How long `open` waits for a lock held briefly by a one-shot command's cleanup before
/// it says another agent holds the directory.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(3);

/// The mode of a state directory the agent creates.
pub const STATE_DIR_MODE: u32 = 0o700;
/// The mode of `state.db` (and, through SQLite, its `-wal` and `-shm` files).
pub const STATE_DB_MODE: u32 = 0o600;

/// Creates the state directory (and missing parents) with mode 0700; an existing one is
/// left as it is.
pub fn create_state_dir(dir: &Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new().recursive(true).mode(STATE_DIR_MODE).create(dir)?;
    // The umask may have narrowed it further, never widened it; make it exact.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(STATE_DIR_MODE))
}

/// Creates `path` empty with mode 0600 before SQLite opens it, or tightens an existing
/// one that group or others could read (made by an older agent).
fn private_db_file(path: &Path) -> std::io::Result<()> {
    match OpenOptions::new().write(true).create_new(true).mode(STATE_DB_MODE).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                log::warn!("{} was mode {mode:o}; setting it to 600", path.display());
                // Best effort: a read-only view (dump-state as another user) must still open.
                let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(STATE_DB_MODE));
            }
            Ok(())
        }
        Err(e) => Err(e),
    }
}

pub struct StateDb {
    conn: Mutex<Connection>,
    path: PathBuf,
    /// The directory lock (`agent.lock`); `None` for a one-shot command's connection.
    _lock: Option<File>,
}

impl StateDb {
    /// Opens (creating) the state database and takes the directory lock. A run that was
    /// still `running` belongs to an agent that died: it is marked failed.
    pub fn open(state_dir: &Path) -> Result<Self, StateError> {
        let db_err = |path: &Path, e: &dyn std::fmt::Display| StateError::Db {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        create_state_dir(state_dir).map_err(|e| db_err(state_dir, &e))?;
        let lock_path = state_dir.join("agent.lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(STATE_DB_MODE)
            .open(&lock_path)
            .map_err(|e| db_err(&lock_path, &e))?;
        // A one-shot `backup` or `restore` holds the lock for the few milliseconds of its
        // start-up cleanup (`leftovers`): wait that out rather than refuse to start.
        let deadline = std::time::Instant::now() + LOCK_PATIENCE;
        // SAFETY: flock(2) on a descriptor we own; released when the file is closed.
        while unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            if std::time::Instant::now() >= deadline {
                return Err(StateError::Locked {
                    dir: state_dir.display().to_string(),
                    lock: lock_path.display().to_string(),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let db = Self::connect(state_dir, Some(lock))?;
        db.conn()
            .execute(
                "UPDATE runs SET status = 'failed', error = 'agent restarted while the run was in flight',
                 finished_at = ?1 WHERE status = 'running'",
                params![Utc::now().to_rfc3339()],
            )
            .map_err(|e| db.err(e))?;
        Ok(db)
    }

    /// Opens the state database beside an agent that may be running on the same state
    /// directory, without its lock: for a one-shot `backup`, which records its run but
    /// must neither keep `run` from starting nor mark the running agent's runs as failed.
    pub fn open_shared(state_dir: &Path) -> Result<Self, StateError> {
        create_state_dir(state_dir)
            .map_err(|e| StateError::Db { path: state_dir.display().to_string(), message: e.to_string() })?;
        Self::connect(state_dir, None)
    }

    fn connect(state_dir: &Path, lock: Option<File>) -> Result<Self, StateError> {
        let path = db_path(state_dir);
        let db_err =
            |e: rusqlite::Error| StateError::Db { path: path.display().to_string(), message: e.to_string() };
        let conn = open_connection(state_dir).map_err(db_err)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS runs(
                 run_id TEXT PRIMARY KEY,
                 job_id TEXT NOT NULL,
                 status TEXT NOT NULL,
                 attempt INTEGER NOT NULL DEFAULT 1,
                 started_at TEXT NOT NULL,
                 finished_at TEXT,
                 size_bytes INTEGER NOT NULL DEFAULT 0,
                 object_key TEXT NOT NULL DEFAULT '',
                 error TEXT NOT NULL DEFAULT ''
             );
             CREATE INDEX IF NOT EXISTS runs_by_job ON runs(job_id, started_at);",
        )
        .map_err(db_err)?;
        Ok(Self { conn: Mutex::new(conn), path, _lock: lock })
    }

    fn err(&self, e: rusqlite::Error) -> StateError {
        StateError::Db { path: self.path.display().to_string(), message: e.to_string() }
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn record_start(
        &self,
        run_id: &str,
        job_id: &str,
        attempt: u32,
        at: DateTime<Utc>,
    ) -> Result<(), StateError> {
        self.conn()
            .execute(
                "INSERT OR REPLACE INTO runs(run_id, job_id, status, attempt, started_at) VALUES (?1, ?2, 'running', ?3, ?4)",
                params![run_id, job_id, attempt, at.to_rfc3339()],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    pub fn record_finish(
        &self,
        run_id: &str,
        status: RunStatus,
        size_bytes: u64,
        object_key: &str,
        error: &str,
    ) -> Result<(), StateError> {
        self.conn()
            .execute(
                "UPDATE runs SET status = ?2, finished_at = ?3, size_bytes = ?4, object_key = ?5, error = ?6 WHERE run_id = ?1",
                params![run_id, status.as_str(), Utc::now().to_rfc3339(), size_bytes as i64, object_key, error],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// When each job last succeeded (for missed-run catch-up).
    pub fn last_successes(&self) -> Result<std::collections::HashMap<String, DateTime<Utc>>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT job_id, max(started_at) FROM runs WHERE status = 'success' GROUP BY job_id")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(|e| self.err(e))?;
        let mut out = std::collections::HashMap::new();
        for row in rows {
            let (job, at) = row.map_err(|e| self.err(e))?;
            if let Ok(t) = DateTime::parse_from_rfc3339(&at) {
                out.insert(job, t.with_timezone(&Utc));
            }
        }
        Ok(out)
    }

    /// What each job's recorded runs say, for the metrics at start and the catch-up
    /// rule: when it last succeeded and last failed (the end of those runs), whether the
    /// later of the two was the success, and when its last run of any status started.
    pub fn job_outcomes(&self) -> Result<std::collections::HashMap<String, JobOutcomes>, StateError> {
        let conn = self.conn();
        let parse = |s: &str| DateTime::parse_from_rfc3339(s).ok().map(|t| t.with_timezone(&Utc));
        let mut out: std::collections::HashMap<String, JobOutcomes> = std::collections::HashMap::new();
        let mut stmt = conn
            .prepare(
                "SELECT job_id, status, max(coalesce(finished_at, started_at)) FROM runs
                 WHERE status IN ('success', 'failed') GROUP BY job_id, status",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)))
            .map_err(|e| self.err(e))?;
        for row in rows {
            let (job, status, at) = row.map_err(|e| self.err(e))?;
            let entry = out.entry(job).or_default();
            match status.as_str() {
                "success" => entry.last_success = parse(&at),
                _ => entry.last_failure = parse(&at),
            }
        }
        let mut stmt = conn
            .prepare("SELECT job_id, max(started_at) FROM runs GROUP BY job_id")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(|e| self.err(e))?;
        for row in rows {
            let (job, at) = row.map_err(|e| self.err(e))?;
            out.entry(job).or_default().last_run_started = parse(&at);
        }
        for o in out.values_mut() {
            o.last_run_succeeded = match (o.last_success, o.last_failure) {
                (Some(s), Some(f)) => Some(s >= f),
                (Some(_), None) => Some(true),
                (None, Some(_)) => Some(false),
                (None, None) => None,
            };
        }
        Ok(out)
    }

    pub fn run(&self, run_id: &str) -> Result<Option<RunRecord>, StateError> {
        self.conn()
            .query_row(
                "SELECT run_id, job_id, status, attempt, started_at, finished_at, size_bytes, object_key, error
                 FROM runs WHERE run_id = ?1",
                params![run_id],
                row_to_record,
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// The newest runs first.
    pub fn recent_runs(&self, limit: usize) -> Result<Vec<RunRecord>, StateError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT run_id, job_id, status, attempt, started_at, finished_at, size_bytes, object_key, error
                 FROM runs ORDER BY started_at DESC, rowid DESC LIMIT ?1",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt.query_map(params![limit as i64], row_to_record).map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }
}

/// One job's history in `state.db` (see [`StateDb::job_outcomes`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobOutcomes {
    pub last_success: Option<DateTime<Utc>>,
    pub last_failure: Option<DateTime<Utc>>,
    /// Whether the later of the last success and the last failure was the success;
    /// `None` when the job has neither (cancelled runs do not count).
    pub last_run_succeeded: Option<bool>,
    /// The start of the job's newest recorded run, whatever its status.
    pub last_run_started: Option<DateTime<Utc>>,
}

fn row_to_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunRecord> {
    let parse = |s: String| DateTime::parse_from_rfc3339(&s).map(|t| t.with_timezone(&Utc)).ok();
    Ok(RunRecord {
        run_id: r.get(0)?,
        job_id: r.get(1)?,
        status: RunStatus::parse(&r.get::<_, String>(2)?),
        attempt: r.get(3)?,
        started_at: parse(r.get(4)?).unwrap_or_default(),
        finished_at: r.get::<_, Option<String>>(5)?.and_then(parse),
        size_bytes: r.get::<_, i64>(6)? as u64,
        object_key: r.get(7)?,
        error: r.get(8)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_agent_on_the_same_state_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = StateDb::open(dir.path()).unwrap();
        let err = StateDb::open(dir.path()).err().expect("second open refused");
        assert!(matches!(err, StateError::Locked { .. }), "{err}");
        assert!(err.to_string().contains("agent.lock"));
        drop(first);
        StateDb::open(dir.path()).expect("free again once the first agent is gone");
    }

    #[test]
    fn a_lock_held_briefly_by_a_one_shot_cleanup_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        drop(StateDb::open(dir.path()).unwrap());
        let held = File::open(dir.path().join("agent.lock")).unwrap();
        // SAFETY: flock(2) on a descriptor this test owns.
        assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
        let release = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(held);
        });
        StateDb::open(dir.path()).expect("opened once the brief holder let go");
        release.join().unwrap();
    }

    #[test]
    fn runs_are_recorded_and_interrupted_ones_marked_failed_on_restart() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Utc::now();
        {
            let db = StateDb::open(dir.path()).unwrap();
            db.record_start("r1", "j", 1, t0).unwrap();
            db.record_finish("r1", RunStatus::Success, 42, "k", "").unwrap();
            db.record_start("r2", "j", 1, t0 + chrono::Duration::seconds(5)).unwrap();
            assert_eq!(db.last_successes().unwrap().get("j").map(|t| t.timestamp()), Some(t0.timestamp()));
        }
        let db = StateDb::open(dir.path()).unwrap();
        let r2 = db.run("r2").unwrap().unwrap();
        assert_eq!(r2.status, RunStatus::Failed);
        assert!(r2.error.starts_with("agent restarted"));
        let recent = db.recent_runs(10).unwrap();
        assert_eq!(recent.iter().map(|r| r.run_id.as_str()).collect::<Vec<_>>(), ["r2", "r1"]);
        assert_eq!(recent[1].size_bytes, 42);
        let outcomes = db.job_outcomes().unwrap();
        let j = &outcomes["j"];
        assert!(j.last_success.is_some() && j.last_failure > j.last_success, "{j:?}");
        assert_eq!(j.last_run_succeeded, Some(false), "the interrupted run is the later one");
        assert_eq!(j.last_run_started.map(|t| t.timestamp()), Some(t0.timestamp() + 5));
    }
}
