//! What connected mode keeps in the state database besides the outbox: the applied
//! control-plane config, the reports of every run by `run_id` (so a repeated RunBackup is
//! answered from here and a run in flight when the process died is found at restart), and
//! the last session. Config, reports and a run's temporary S3 credentials are sealed with
//! the agent-key cipher ([`StateCipher`]); ids and states stay in clear for `dump-state`.
//!
//! Used by the connected main loop only, through its own connection (the outbox has one
//! too; both are short transactions on the WAL database). Open it after `StateDb`, which
//! holds the directory lock.

use std::path::{Path, PathBuf};

use prost::Message;
use rusqlite::{Connection, OptionalExtension, params};

use crate::clock::now_ms;
use crate::crypto::at_rest::StateCipher;
use crate::wire::pb;

#[derive(Debug, thiserror::Error)]
#[error(
    "state database {path}: {message}; check that the state directory is writable and its disk is not full"
)]
pub struct StoreError {
    path: String,
    message: String,
}

/// Where a run is in its life, as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunPhase {
    Queued,
    Running,
    /// Terminal; its final reports are stored. `reported` says they reached the outbox.
    Done {
        reported: bool,
    },
}

#[derive(Debug, Clone)]
pub struct RunRow {
    pub run_id: String,
    pub job_id: String,
    pub phase: RunPhase,
    pub last_update: Option<pb::JobUpdate>,
    pub completed: Option<pb::BackupCompleted>,
    pub upload: Option<pb::S3MultipartTarget>,
}

pub struct Store {
    conn: Connection,
    path: PathBuf,
    cipher: StateCipher,
}

const CONFIG_LABEL: &str = "control-plane config";
const UPDATE_LABEL: &str = "job update";
const COMPLETED_LABEL: &str = "backup completed";
const UPLOAD_LABEL: &str = "upload credentials";
/// Finished runs kept for duplicate detection and `dump-state`.
const KEEP_DONE_RUNS: i64 = 2000;

impl Store {
    pub fn open(state_dir: &Path, cipher: StateCipher) -> Result<Store, StoreError> {
        let path = crate::state::db_path(state_dir);
        let err =
            |e: rusqlite::Error| StoreError { path: path.display().to_string(), message: e.to_string() };
        let conn = crate::state::open_connection(state_dir).map_err(err)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS connected_config(
                 id INTEGER PRIMARY KEY CHECK (id = 1),
                 version INTEGER NOT NULL,
                 applied_at_ms INTEGER NOT NULL,
                 config BLOB NOT NULL
             );
             CREATE TABLE IF NOT EXISTS connected_runs(
                 run_id TEXT PRIMARY KEY,
                 job_id TEXT NOT NULL,
                 phase TEXT NOT NULL,
                 received_ms INTEGER NOT NULL,
                 finished_ms INTEGER,
                 last_update BLOB,
                 completed BLOB,
                 upload BLOB
             );
             CREATE INDEX IF NOT EXISTS connected_runs_phase ON connected_runs(phase, received_ms);
             CREATE TABLE IF NOT EXISTS connected_session(
                 id INTEGER PRIMARY KEY CHECK (id = 1),
                 endpoint TEXT NOT NULL,
                 session_id TEXT NOT NULL,
                 connected_at_ms INTEGER NOT NULL,
                 disconnected_at_ms INTEGER,
                 last_error TEXT NOT NULL DEFAULT ''
             );",
        )
        .map_err(err)?;
        Ok(Store { conn, path, cipher })
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError { path: self.path.display().to_string(), message: e.to_string() }
    }

    fn seal(&self, label: &str, msg: &impl Message) -> Result<Vec<u8>, StoreError> {
        self.cipher.seal(label, &msg.encode_to_vec()).map_err(|e| self.err(e))
    }

    fn open_msg<M: Message + Default>(&self, label: &str, blob: Option<Vec<u8>>) -> Option<M> {
        let blob = blob?;
        match self.cipher.open(label, &blob).map_err(|e| e.to_string()).and_then(|b| {
            M::decode(b.as_slice()).map_err(|e| format!("a stored {label} does not decode: {e}"))
        }) {
            Ok(m) => Some(m),
            Err(e) => {
                log::warn!("{e}");
                None
            }
        }
    }

    /// The config applied last, if any (and readable with this agent key).
    pub fn load_config(&self) -> Result<Option<pb::AgentConfig>, StoreError> {
        let blob: Option<Vec<u8>> = self
            .conn
            .query_row("SELECT config FROM connected_config WHERE id = 1", [], |r| r.get(0))
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(self.open_msg(CONFIG_LABEL, blob))
    }

    pub fn save_config(&self, config: &pb::AgentConfig) -> Result<(), StoreError> {
        let blob = self.seal(CONFIG_LABEL, config)?;
        self.conn
            .execute(
                "INSERT INTO connected_config(id, version, applied_at_ms, config) VALUES (1, ?1, ?2, ?3)
                 ON CONFLICT(id) DO UPDATE SET version = ?1, applied_at_ms = ?2, config = ?3",
                params![config.version as i64, now_ms() as i64, blob],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    pub fn run(&self, run_id: &str) -> Result<Option<RunRow>, StoreError> {
        let row = self
            .conn
            .query_row(
                "SELECT run_id, job_id, phase, last_update, completed, upload FROM connected_runs
                 WHERE run_id = ?1",
                [run_id],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, Option<Vec<u8>>>(3)?,
                        r.get::<_, Option<Vec<u8>>>(4)?,
                        r.get::<_, Option<Vec<u8>>>(5)?,
                    ))
                },
            )
            .optional()
            .map_err(|e| self.err(e))?;
        Ok(row.map(|(run_id, job_id, phase, update, completed, upload)| {
            self.row(run_id, job_id, &phase, update, completed, upload)
        }))
    }

    fn row(
        &self,
        run_id: String,
        job_id: String,
        phase: &str,
        update: Option<Vec<u8>>,
        completed: Option<Vec<u8>>,
        upload: Option<Vec<u8>>,
    ) -> RunRow {
        RunRow {
            run_id,
            job_id,
            phase: parse_phase(phase),
            last_update: self.open_msg(UPDATE_LABEL, update),
            completed: self.open_msg(COMPLETED_LABEL, completed),
            upload: self.open_msg(UPLOAD_LABEL, upload),
        }
    }

    /// Runs not finished (queued or running) or finished and not yet reported.
    pub fn unfinished_runs(&self) -> Result<Vec<RunRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT run_id, job_id, phase, last_update, completed, upload FROM connected_runs
                 WHERE phase <> 'reported' ORDER BY received_ms",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get::<_, String>(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
            })
            .map_err(|e| self.err(e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(e))?;
        Ok(rows.into_iter().map(|(a, b, p, u, c, up)| self.row(a, b, &p, u, c, up)).collect())
    }

    /// A new run, queued; `upload` kept (sealed) so a crash can still abort its upload.
    pub fn insert_run(
        &self,
        run_id: &str,
        job_id: &str,
        update: &pb::JobUpdate,
        upload: Option<&pb::S3MultipartTarget>,
    ) -> Result<(), StoreError> {
        let update = self.seal(UPDATE_LABEL, update)?;
        let upload = upload.map(|u| self.seal(UPLOAD_LABEL, u)).transpose()?;
        self.conn
            .execute(
                "INSERT INTO connected_runs(run_id, job_id, phase, received_ms, last_update, upload)
                 VALUES (?1, ?2, 'queued', ?3, ?4, ?5)",
                params![run_id, job_id, now_ms() as i64, update, upload],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Records the latest non-terminal update (phase running).
    pub fn set_running(&self, run_id: &str, update: &pb::JobUpdate) -> Result<(), StoreError> {
        let update = self.seal(UPDATE_LABEL, update)?;
        self.conn
            .execute(
                "UPDATE connected_runs SET phase = 'running', last_update = ?2 WHERE run_id = ?1",
                params![run_id, update],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Records the final reports before they are pushed to the outbox (so a crash in
    /// between re-pushes them at restart rather than losing them); the upload
    /// credentials are forgotten.
    pub fn set_done(
        &self,
        run_id: &str,
        job_id: &str,
        update: &pb::JobUpdate,
        completed: Option<&pb::BackupCompleted>,
    ) -> Result<(), StoreError> {
        let update = self.seal(UPDATE_LABEL, update)?;
        let completed = completed.map(|c| self.seal(COMPLETED_LABEL, c)).transpose()?;
        self.conn
            .execute(
                "INSERT INTO connected_runs(run_id, job_id, phase, received_ms, finished_ms, last_update, completed)
                 VALUES (?1, ?2, 'done', ?3, ?3, ?4, ?5)
                 ON CONFLICT(run_id) DO UPDATE SET phase = 'done', finished_ms = ?3, last_update = ?4,
                     completed = ?5, upload = NULL",
                params![run_id, job_id, now_ms() as i64, update, completed],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    /// The final reports are in the outbox.
    pub fn set_reported(&self, run_id: &str) -> Result<(), StoreError> {
        self.conn
            .execute("UPDATE connected_runs SET phase = 'reported' WHERE run_id = ?1", [run_id])
            .map_err(|e| self.err(e))?;
        self.conn
            .execute(
                "DELETE FROM connected_runs WHERE phase = 'reported' AND run_id NOT IN (
                     SELECT run_id FROM connected_runs WHERE phase = 'reported'
                     ORDER BY finished_ms DESC LIMIT ?1)",
                [KEEP_DONE_RUNS],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    pub fn record_connected(&self, endpoint: &str, session_id: &str) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO connected_session(id, endpoint, session_id, connected_at_ms, disconnected_at_ms, last_error)
                 VALUES (1, ?1, ?2, ?3, NULL, '')
                 ON CONFLICT(id) DO UPDATE SET endpoint = ?1, session_id = ?2, connected_at_ms = ?3,
                     disconnected_at_ms = NULL, last_error = ''",
                params![endpoint, session_id, now_ms() as i64],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    pub fn record_disconnected(&self, reason: &str) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE connected_session SET disconnected_at_ms = ?1, last_error = ?2 WHERE id = 1",
                params![now_ms() as i64, crate::secrets::redact(reason)],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }
}

fn parse_phase(s: &str) -> RunPhase {
    match s {
        "queued" => RunPhase::Queued,
        "running" => RunPhase::Running,
        "reported" => RunPhase::Done { reported: true },
        _ => RunPhase::Done { reported: false },
    }
}
