//! The outbox: the persistent queue of agent→server envelopes in connected mode
//! (wire-v1 "Transport" `seq` rules and "Delivery"; agent.md "Outbox (nothing is lost)").
//!
//! It owns the envelope `seq` counter and the `outbox` / `outbox_seq` tables of the state
//! database (`state_dir/state.db`, WAL, synchronous=FULL; the spec puts the outbox there,
//! so `dump-state` finds its depth in the one file it reads). Every envelope the agent
//! creates takes its `seq` here. Every one except `Register` and `Heartbeat` is stored here,
//! encoded, before it can be sent, and stays until the control plane confirms it: a
//! delivery `Ack` naming its seq, or the pong to a WebSocket ping written after it. The
//! queue is bounded with the spec's drop order (see [`Limits`]).
//!
//! Threads: run workers, discovery, health probes and the log forwarder `push`; the session
//! writer waits on [`Outbox::pushes`], reads [`Outbox::pending`] from its cursor, writes the
//! frames, [`Outbox::mark_sent`]s them and takes a [`Outbox::ping_marker`] before each ping;
//! the session reader [`Outbox::confirm`]s delivery Acks and hands pongs to
//! [`Outbox::confirm_through`]. All of them share one mutex-guarded connection (as in
//! `state`); every write is one short transaction.
//!
//! It does not touch the network, decide when to re-send, or take the state-directory lock:
//! `StateDb` holds that, so open the outbox after it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prost::Message;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::clock::now_ms;
use crate::crypto::at_rest::StateCipher;
use crate::wire::pb::{self, envelope::Payload};

/// Seq numbers are reserved durably this many at a time, before any of them is used, so a
/// number taken by a push that never committed is skipped after a crash, never reused.
const SEQ_BLOCK: u64 = 1000;
/// Drop warnings are summarised at most this often: a warning can itself become a LogEvent.
const WARN_EVERY: Duration = Duration::from_secs(60);
/// Associated data of sealed envelopes.
const OUTBOX_LABEL: &str = "outbox envelope";

/// Drop ranks, stored per entry: under pressure the lowest rank goes first, oldest first
/// within a rank. Rank 1 goes unconditionally; ranks 2 and 3 only once a newer entry of
/// the same kind and supersede key is queued. Entries without a rank are never dropped.
const RANK_LOG: i64 = 1;
const RANK_DISCOVERY: i64 = 2;
const RANK_SUPERSEDED: i64 = 3;

/// The outbox's bound. Over it, a push first drops (oldest first) LogEvents, then
/// DiscoveryReports with a newer one queued, then HealthCheckResults with a newer one for
/// the same check and QUEUED/RUNNING JobUpdates (RestoreUpdates) with a newer one for the
/// same run (restore). Terminal JobUpdates, BackupCompleted and Acks are never dropped,
/// nor the newest entry of a supersede group: for those the bound is soft (stored anyway,
/// with a warning). A LogEvent that does not fit is refused ([`OutboxError::Full`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_entries: u64,
    /// Sum of the encoded envelope sizes.
    pub max_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_entries: 10_000, max_bytes: 64 * 1024 * 1024 }
    }
}

/// One stored envelope: its seq and its encoded `pb::Envelope`, sent as one binary frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub envelope: Vec<u8>,
}

/// How much is queued, for heartbeats (`AgentMetrics.queue_depth`) and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Depth {
    pub entries: u64,
    pub bytes: u64,
    /// Entries written to the current connection and not confirmed yet.
    pub awaiting_confirmation: u64,
    /// When the oldest of those was written (Unix ms).
    pub oldest_sent_ms: Option<u64>,
}

/// A point in this process's stream of written frames, taken just before a WebSocket ping
/// is written. The pong to that ping confirms every entry written before the point on the
/// same connection. Its number can travel as the ping payload and come back in the pong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PingMarker(pub u64);

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error(
        "outbox in {path}: {message}; check that the state directory is writable and its disk is not full"
    )]
    Db { path: String, message: String },
    #[error("a {kind} envelope is not stored in the outbox: {reason}")]
    NotQueued { kind: &'static str, reason: &'static str },
    #[error(
        "outbox in {path} is full ({entries} entries, {bytes} bytes; bound {max_entries} entries / {max_bytes} bytes) and holds nothing that may be dropped for a LogEvent, so the LogEvent was dropped; the control plane has not confirmed delivery for a while: check the connection"
    )]
    Full { path: String, entries: u64, bytes: u64, max_entries: u64, max_bytes: u64 },
}

/// The seq a delivery `Ack` names (wire-v1 "Delivery": `correlation_id` = the agent seq in
/// decimal), or `None` when its correlation id is not a decimal number.
pub fn delivery_ack_seq(ack: &pb::Ack) -> Option<u64> {
    let id = ack.correlation_id.as_str();
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    id.parse().ok()
}

pub struct Outbox {
    inner: Mutex<Inner>,
    path: PathBuf,
    limits: Limits,
    /// Seals each stored envelope (connected mode always sets it: a BackupCompleted in
    /// raw-key mode carries the data key). `len` and the drop columns stay in clear.
    cipher: Option<StateCipher>,
    wake_tx: crossbeam_channel::Sender<()>,
    wake_rx: crossbeam_channel::Receiver<()>,
}

struct Inner {
    conn: Connection,
    next_seq: u64,
    reserved_through: u64,
    /// Counts frames written in this process; `sent` remembers each entry's latest.
    write_ordinal: u64,
    /// Entries written to the current connection. Kept in memory on purpose: the fact
    /// belongs to one connection of one process (after a reconnect or restart every
    /// unconfirmed entry is pending again), so persisting it would cost an fsync per frame
    /// and buy nothing.
    sent: HashMap<u64, Sent>,
    warning: DropWarning,
    /// Entries that do not open with this process's key (sealed under another agent
    /// key): kept in the database, never sent, reported once (see [`Outbox::pending`]).
    unopenable: std::collections::BTreeSet<u64>,
    /// `backupy_agent_outbox_undecryptable_entries`, when the caller gave it.
    unopenable_gauge: Option<prometheus::IntGauge>,
}

#[derive(Clone, Copy)]
struct Sent {
    ordinal: u64,
    at_ms: u64,
}

#[derive(Default)]
struct DropWarning {
    last: Option<Instant>,
    dropped: u64,
    over_bound: bool,
}

/// What the drop rules need to know about an envelope, stored in columns so that choosing
/// what to drop is a query, not a decode of every queued protobuf.
#[derive(Debug, PartialEq, Eq)]
struct Class {
    kind: &'static str,
    drop_rank: Option<i64>,
    supersede_key: Option<String>,
}

struct Victim {
    seq: u64,
    len: u64,
}

enum Stored {
    Kept { dropped: Vec<Victim>, over: Option<(u64, u64)> },
    Refused { entries: u64, bytes: u64 },
}

impl Outbox {
    /// Opens (creating) the outbox tables in `state_dir/state.db`. Every entry still there
    /// is pending again, with its original seq and bytes; the seq counter continues above
    /// everything ever reserved.
    pub fn open(state_dir: &Path, limits: Limits) -> Result<Outbox, OutboxError> {
        let db_err = |path: &Path, e: &dyn std::fmt::Display| OutboxError::Db {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        crate::state::create_state_dir(state_dir).map_err(|e| db_err(state_dir, &e))?;
        let path = crate::state::db_path(state_dir);
        let conn = crate::state::open_connection(state_dir).map_err(|e| db_err(&path, &e))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS outbox_seq(
                 id INTEGER PRIMARY KEY CHECK (id = 1),
                 reserved_through INTEGER NOT NULL
             );
             INSERT OR IGNORE INTO outbox_seq(id, reserved_through) VALUES (1, 0);
             CREATE TABLE IF NOT EXISTS outbox(
                 seq INTEGER PRIMARY KEY,
                 kind TEXT NOT NULL,
                 drop_rank INTEGER,
                 supersede_key TEXT,
                 len INTEGER NOT NULL,
                 created_ms INTEGER NOT NULL,
                 envelope BLOB NOT NULL
             );
             CREATE INDEX IF NOT EXISTS outbox_droppable ON outbox(drop_rank, seq)
                 WHERE drop_rank IS NOT NULL;
             CREATE INDEX IF NOT EXISTS outbox_supersede ON outbox(kind, supersede_key, seq)
                 WHERE supersede_key IS NOT NULL;
             CREATE INDEX IF NOT EXISTS outbox_len ON outbox(len);",
        )
        .map_err(|e| db_err(&path, &e))?;
        let last: u64 = conn
            .query_row(
                "SELECT max(reserved_through, (SELECT coalesce(max(seq), 0) FROM outbox)) FROM outbox_seq",
                [],
                |r| column_u64(r, 0),
            )
            .map_err(|e| db_err(&path, &e))?;
        let inner = Inner {
            conn,
            next_seq: last + 1,
            reserved_through: last,
            write_ordinal: 0,
            sent: HashMap::new(),
            warning: DropWarning::default(),
            unopenable: Default::default(),
            unopenable_gauge: None,
        };
        let (wake_tx, wake_rx) = crossbeam_channel::bounded(1);
        Ok(Outbox { inner: Mutex::new(inner), path, limits, cipher: None, wake_tx, wake_rx })
    }

    /// Stores envelopes sealed with `cipher` from now on, and opens them with it.
    pub fn sealed_with(mut self, cipher: StateCipher) -> Self {
        self.cipher = Some(cipher);
        self
    }

    /// Stores `payload` as the envelope with the next seq and `ts_ms` = now, and returns
    /// that seq once the envelope is committed. Refuses Register and Heartbeat (they are
    /// built per connection and must never be replayed: number them with [`Self::next_seq`]).
    pub fn push(&self, payload: Payload, correlation_id: &str) -> Result<u64, OutboxError> {
        let class = classify(&payload)?;
        let mut inner = self.lock();
        let seq = self.allocate(&mut inner)?;
        let envelope = pb::Envelope {
            seq,
            ts_ms: now_ms(),
            correlation_id: correlation_id.to_owned(),
            payload: Some(payload),
        }
        .encode_to_vec();
        let stored_bytes = match &self.cipher {
            Some(c) => c.seal(OUTBOX_LABEL, &envelope).map_err(|e| OutboxError::Db {
                path: self.path.display().to_string(),
                message: e.to_string(),
            })?,
            None => envelope,
        };
        let stored = self.store(&mut inner.conn, seq, &class, &stored_bytes).map_err(|e| self.err(e))?;
        match stored {
            Stored::Refused { entries, bytes } => Err(OutboxError::Full {
                path: self.path.display().to_string(),
                entries,
                bytes,
                max_entries: self.limits.max_entries,
                max_bytes: self.limits.max_bytes,
            }),
            Stored::Kept { dropped, over } => {
                for victim in &dropped {
                    inner.sent.remove(&victim.seq);
                }
                self.warn_about_pressure(&mut inner.warning, dropped.len() as u64, over);
                drop(inner);
                let _ = self.wake_tx.try_send(());
                Ok(seq)
            }
        }
    }

    /// The next seq for an envelope that is not stored (Register, Heartbeat): the same
    /// counter as [`Self::push`], so no number is ever given to two envelopes.
    pub fn next_seq(&self) -> Result<u64, OutboxError> {
        let mut inner = self.lock();
        self.allocate(&mut inner)
    }

    /// Up to `limit` stored entries with a seq above `after_seq`, in seq order. Entries
    /// commit in seq order, so a writer that moves `after_seq` to the last seq it sent never
    /// skips one; start from 0 on every new connection.
    pub fn pending(&self, after_seq: u64, limit: usize) -> Result<Vec<Entry>, OutboxError> {
        let inner = self.lock();
        let rows = self.rows_after(&inner.conn, after_seq, limit)?;
        let Some(cipher) = &self.cipher else { return Ok(rows) };
        let mut inner = inner;
        let (mut out, mut rows, mut newly) = (Vec::with_capacity(rows.len()), rows, Vec::new());
        loop {
            let full = limit > 0 && rows.len() >= limit;
            let mut cursor = after_seq;
            for Entry { seq, envelope } in rows {
                cursor = seq;
                if inner.unopenable.contains(&seq) {
                    continue;
                }
                match cipher.open(OUTBOX_LABEL, &envelope) {
                    Ok(envelope) => out.push(Entry { seq, envelope }),
                    // Sealed under another agent key. BackupCompleted must never be lost
                    // (agent.md "Outbox"), so it stays; it is skipped so that it does not
                    // block the entries behind it.
                    Err(_) => {
                        inner.unopenable.insert(seq);
                        newly.push(seq);
                    }
                }
            }
            // A whole batch that did not open: read on, or the queue would stall.
            if !out.is_empty() || !full {
                break;
            }
            rows = self.rows_after(&inner.conn, cursor, limit)?;
        }
        if let (Some(first), Some(last)) = (newly.first(), newly.last()) {
            log::error!(
                "{} outbox entr{} (seq {first}..={last}) cannot be opened with this agent key: they were \
                 sealed under another BACKUPY_AGENT_KEY and are kept, not sent. To deliver them, start \
                 the agent once with the previous key; see docs/security.md#outbox-entries-sealed-under-another-key",
                newly.len(),
                if newly.len() == 1 { "y" } else { "ies" }
            );
            if let Some(g) = &inner.unopenable_gauge {
                g.set(inner.unopenable.len() as i64);
            }
        }
        Ok(out)
    }

    /// Counts the entries that do not open into `gauge`
    /// (`backupy_agent_outbox_undecryptable_entries`).
    pub fn report_undecryptable_to(&self, gauge: prometheus::IntGauge) {
        let mut inner = self.lock();
        gauge.set(inner.unopenable.len() as i64);
        inner.unopenable_gauge = Some(gauge);
    }

    /// How many stored entries were found not to open with this process's key.
    pub fn undecryptable(&self) -> usize {
        self.lock().unopenable.len()
    }

    fn rows_after(&self, conn: &Connection, after_seq: u64, limit: usize) -> Result<Vec<Entry>, OutboxError> {
        let mut stmt = conn
            .prepare_cached("SELECT seq, envelope FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![sql_int(after_seq), limit as i64], |r| {
                Ok(Entry { seq: column_u64(r, 0)?, envelope: r.get(1)? })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| self.err(e))
    }

    /// A token after each push (coalesced), for the session writer to select on. The
    /// writer is its one consumer.
    pub fn pushes(&self) -> crossbeam_channel::Receiver<()> {
        self.wake_rx.clone()
    }

    /// The session writer starts a new connection: nothing is written to it yet, so marks
    /// from the previous one no longer count for [`Self::confirm_through`].
    pub fn new_connection(&self) {
        self.lock().sent.clear();
    }

    /// Records that entry `seq` was written to the current connection, now. Call it after
    /// writing the frame and before taking the next [`Self::ping_marker`]. An entry that is
    /// gone already (confirmed or dropped meanwhile) is ignored.
    pub fn mark_sent(&self, seq: u64) -> Result<(), OutboxError> {
        let mut inner = self.lock();
        let stored = inner
            .conn
            .query_row("SELECT 1 FROM outbox WHERE seq = ?1", [sql_int(seq)], |_| Ok(()))
            .optional()
            .map_err(|e| self.err(e))?;
        if stored.is_some() {
            inner.write_ordinal += 1;
            let sent = Sent { ordinal: inner.write_ordinal, at_ms: now_ms() };
            inner.sent.insert(seq, sent);
        }
        Ok(())
    }

    /// Taken just before writing a WebSocket ping: everything marked sent so far.
    pub fn ping_marker(&self) -> PingMarker {
        PingMarker(self.lock().write_ordinal)
    }

    /// The pong to the ping written at `marker` arrived: removes every entry marked sent on
    /// this connection before the marker. Entries written after the ping (even with a lower
    /// seq, as when a replay and new messages interleave) and entries never written stay.
    /// Returns how many were removed.
    pub fn confirm_through(&self, marker: PingMarker) -> Result<usize, OutboxError> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let seqs: Vec<u64> =
            inner.sent.iter().filter(|(_, s)| s.ordinal <= marker.0).map(|(seq, _)| *seq).collect();
        if seqs.is_empty() {
            return Ok(0);
        }
        let tx = inner.conn.transaction().map_err(|e| self.err(e))?;
        let mut removed = 0;
        for seq in &seqs {
            removed +=
                tx.execute("DELETE FROM outbox WHERE seq = ?1", [sql_int(*seq)]).map_err(|e| self.err(e))?;
        }
        tx.commit().map_err(|e| self.err(e))?;
        for seq in &seqs {
            inner.sent.remove(seq);
        }
        Ok(removed)
    }

    /// A delivery Ack named `seq` (see [`delivery_ack_seq`]): removes exactly that entry.
    /// False when it was not queued (confirmed before, or dropped).
    pub fn confirm(&self, seq: u64) -> Result<bool, OutboxError> {
        let mut inner = self.lock();
        let removed = inner
            .conn
            .execute("DELETE FROM outbox WHERE seq = ?1", [sql_int(seq)])
            .map_err(|e| self.err(e))?;
        inner.sent.remove(&seq);
        Ok(removed == 1)
    }

    pub fn depth(&self) -> Result<Depth, OutboxError> {
        let inner = self.lock();
        let (entries, bytes) = totals(&inner.conn).map_err(|e| self.err(e))?;
        Ok(Depth {
            entries,
            bytes,
            awaiting_confirmation: inner.sent.len() as u64,
            oldest_sent_ms: inner.sent.values().map(|s| s.at_ms).min(),
        })
    }

    fn err(&self, e: rusqlite::Error) -> OutboxError {
        OutboxError::Db { path: self.path.display().to_string(), message: e.to_string() }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands out the next seq. A block is committed as reserved before its first number is
    /// used, and the in-memory counter moves even when the push then fails: a number is
    /// never handed out twice, in this process or after a crash.
    fn allocate(&self, inner: &mut Inner) -> Result<u64, OutboxError> {
        if inner.next_seq > inner.reserved_through {
            let through = inner.next_seq + SEQ_BLOCK - 1;
            inner
                .conn
                .execute(
                    "UPDATE outbox_seq SET reserved_through = max(reserved_through, ?1) WHERE id = 1",
                    [sql_int(through)],
                )
                .map_err(|e| self.err(e))?;
            inner.reserved_through = through;
        }
        let seq = inner.next_seq;
        inner.next_seq += 1;
        Ok(seq)
    }

    /// Inserts the envelope and drops what the rules allow until the bound holds, in one
    /// transaction. A LogEvent that still does not fit is rolled back with its drops.
    fn store(
        &self,
        conn: &mut Connection,
        seq: u64,
        class: &Class,
        envelope: &[u8],
    ) -> rusqlite::Result<Stored> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO outbox(seq, kind, drop_rank, supersede_key, len, created_ms, envelope)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                sql_int(seq),
                class.kind,
                class.drop_rank,
                class.supersede_key,
                envelope.len() as i64,
                sql_int(now_ms()),
                envelope
            ],
        )?;
        let (mut entries, mut bytes) = totals(&tx)?;
        let over =
            |entries: u64, bytes: u64| entries > self.limits.max_entries || bytes > self.limits.max_bytes;
        let mut dropped = Vec::new();
        while over(entries, bytes) {
            let Some(victim) = tx
                .query_row(
                    "SELECT o.seq, o.len FROM outbox o
                     WHERE o.drop_rank IS NOT NULL AND o.seq <> ?1
                       AND (o.drop_rank = ?2 OR EXISTS (
                           SELECT 1 FROM outbox n
                           WHERE n.kind = o.kind AND n.supersede_key = o.supersede_key AND n.seq > o.seq))
                     ORDER BY o.drop_rank, o.seq LIMIT 1",
                    params![sql_int(seq), RANK_LOG],
                    |r| Ok(Victim { seq: column_u64(r, 0)?, len: column_u64(r, 1)? }),
                )
                .optional()?
            else {
                break;
            };
            tx.execute("DELETE FROM outbox WHERE seq = ?1", [sql_int(victim.seq)])?;
            entries -= 1;
            bytes = bytes.saturating_sub(victim.len);
            dropped.push(victim);
        }
        if !over(entries, bytes) {
            tx.commit()?;
            return Ok(Stored::Kept { dropped, over: None });
        }
        if class.drop_rank == Some(RANK_LOG) {
            tx.rollback()?;
            // Reported as the outbox stands: this push's drops undone, the LogEvent not stored.
            let entries = entries + dropped.len() as u64 - 1;
            let bytes = bytes + dropped.iter().map(|v| v.len).sum::<u64>() - envelope.len() as u64;
            return Ok(Stored::Refused { entries, bytes });
        }
        tx.commit()?;
        Ok(Stored::Kept { dropped, over: Some((entries, bytes)) })
    }

    fn warn_about_pressure(&self, warning: &mut DropWarning, dropped: u64, over: Option<(u64, u64)>) {
        warning.dropped += dropped;
        warning.over_bound |= over.is_some();
        if warning.dropped == 0 && !warning.over_bound {
            return;
        }
        if warning.last.is_some_and(|t| t.elapsed() < WARN_EVERY) {
            return;
        }
        let Limits { max_entries, max_bytes } = self.limits;
        if warning.dropped > 0 {
            log::warn!(
                "outbox {} reached its bound ({max_entries} entries / {max_bytes} bytes): dropped {} queued LogEvents or superseded reports since the last warning; the control plane has not confirmed delivery for a while",
                self.path.display(),
                warning.dropped
            );
        }
        if let Some((entries, bytes)) = over {
            log::warn!(
                "outbox {} holds {entries} entries / {bytes} bytes, over its bound of {max_entries} / {max_bytes}: what is left is never dropped (terminal job updates, BackupCompleted, acks, latest reports), so it is kept until delivered",
                self.path.display()
            );
        }
        *warning = DropWarning { last: Some(Instant::now()), ..DropWarning::default() };
    }
}

fn totals(conn: &Connection) -> rusqlite::Result<(u64, u64)> {
    conn.query_row("SELECT count(*), coalesce(sum(len), 0) FROM outbox", [], |r| {
        Ok((column_u64(r, 0)?, column_u64(r, 1)?))
    })
}

/// SQLite integers are i64; seqs, sizes and times stay far below 2^63.
fn sql_int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn column_u64(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<u64> {
    row.get::<_, i64>(index).map(|v| v.max(0) as u64)
}

/// QUEUED and RUNNING are progress; every other status (unknown values included) is kept
/// as if terminal: never drop what is not understood.
fn is_progress(status: i32) -> bool {
    status == pb::JobStatus::Queued as i32 || status == pb::JobStatus::Running as i32
}

fn key(id: &str) -> Option<String> {
    (!id.is_empty()).then(|| id.to_owned())
}

fn classify(payload: &Payload) -> Result<Class, OutboxError> {
    let class = |kind, drop_rank, supersede_key| Ok(Class { kind, drop_rank, supersede_key });
    let server =
        |kind| Err(OutboxError::NotQueued { kind, reason: "it travels from the server to the agent" });
    match payload {
        Payload::Log(_) => class("log", Some(RANK_LOG), None),
        Payload::Discovery(_) => class("discovery", Some(RANK_DISCOVERY), Some(String::new())),
        Payload::HealthResult(h) => class("health_result", Some(RANK_SUPERSEDED), key(&h.check_id)),
        Payload::JobUpdate(u) => {
            class("job_update", is_progress(u.status).then_some(RANK_SUPERSEDED), key(&u.run_id))
        }
        Payload::RestoreUpdate(u) => {
            class("restore_update", is_progress(u.status).then_some(RANK_SUPERSEDED), key(&u.restore_id))
        }
        Payload::BackupCompleted(c) => class("backup_completed", None, key(&c.run_id)),
        Payload::Ack(_) => class("ack", None, None),
        Payload::Heartbeat(_) => Err(OutboxError::NotQueued {
            kind: "heartbeat",
            reason: "heartbeats are never queued; number one with Outbox::next_seq and send it directly",
        }),
        Payload::Register(_) => Err(OutboxError::NotQueued {
            kind: "register",
            reason: "Register opens each connection and must not be replayed; number it with Outbox::next_seq",
        }),
        Payload::RegisterAck(_) => server("register_ack"),
        Payload::ConfigUpdate(_) => server("config_update"),
        Payload::RunBackup(_) => server("run_backup"),
        Payload::CancelJob(_) => server("cancel_job"),
        Payload::RunHealthCheck(_) => server("run_health_check"),
        Payload::SelfUpdate(_) => server("self_update"),
        Payload::Ping(_) => server("ping"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job_update(status: pb::JobStatus, run_id: &str) -> Payload {
        Payload::JobUpdate(pb::JobUpdate {
            status: status as i32,
            run_id: run_id.into(),
            ..Default::default()
        })
    }

    #[test]
    fn only_progress_job_updates_may_be_dropped() {
        for (status, rank) in [
            (pb::JobStatus::Queued, Some(RANK_SUPERSEDED)),
            (pb::JobStatus::Running, Some(RANK_SUPERSEDED)),
            (pb::JobStatus::Success, None),
            (pb::JobStatus::Failed, None),
            (pb::JobStatus::Cancelled, None),
            (pb::JobStatus::Unspecified, None),
        ] {
            let class = classify(&job_update(status, "r1")).unwrap();
            assert_eq!(class.drop_rank, rank, "{status:?}");
            assert_eq!(class.supersede_key.as_deref(), Some("r1"));
        }
        let unknown = Payload::JobUpdate(pb::JobUpdate { status: 42, ..Default::default() });
        assert_eq!(classify(&unknown).unwrap().drop_rank, None);
    }

    #[test]
    fn logs_go_first_then_discovery_then_superseded_results() {
        let rank = |p: Payload| classify(&p).unwrap().drop_rank;
        assert_eq!(rank(Payload::Log(pb::LogEvent::default())), Some(1));
        assert_eq!(rank(Payload::Discovery(pb::DiscoveryReport::default())), Some(2));
        assert_eq!(rank(Payload::HealthResult(pb::HealthCheckResult::default())), Some(3));
        assert_eq!(rank(Payload::BackupCompleted(pb::BackupCompleted::default())), None);
        assert_eq!(rank(Payload::Ack(pb::Ack::default())), None);
    }

    #[test]
    fn heartbeat_register_and_server_messages_are_not_queued() {
        for p in [
            Payload::Heartbeat(pb::Heartbeat::default()),
            Payload::Register(pb::Register::default()),
            Payload::Ping(pb::Ping::default()),
            Payload::RunBackup(pb::RunBackup::default()),
        ] {
            assert!(matches!(classify(&p), Err(OutboxError::NotQueued { .. })));
        }
    }

    #[test]
    fn a_delivery_ack_names_the_seq_in_decimal() {
        let ack = |id: &str| pb::Ack { correlation_id: id.into(), accepted: true, reason: String::new() };
        assert_eq!(delivery_ack_seq(&ack("17")), Some(17));
        assert_eq!(delivery_ack_seq(&ack("18446744073709551615")), Some(u64::MAX));
        for id in ["", "+17", "-1", "17 ", "0x11", "cmd-42", "18446744073709551616"] {
            assert_eq!(delivery_ack_seq(&ack(id)), None, "{id:?}");
        }
    }
}
