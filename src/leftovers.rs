//! What a dead run left behind, and removing it at start (issues 16.7 and 17.9).
//!
//! A run killed with `kill -9` (or a power cut) cannot clean up: its password files
//! (pgpass, my.cnf, mongo YAML in `.backupy-secrets-*` directories), SQLite snapshots
//! (`.sqlite-snapshot-*`, a plaintext copy of the whole database), restore spools
//! (`.restore-spool-*`) in `state_dir/tmp`, and the directory storage's `*.partial`
//! objects stay there. Every such file now carries an owner tag in its name: the pid
//! and the kernel's start time of the process that made it ([`owner_tag`]). At start,
//! [`clean`] removes the tagged files whose owner no longer runs, so never a live run's,
//! whichever agent process (`run`, `backup`, `restore`) owns it. Files without a tag
//! (made by an older agent) are removed only while the state directory's lock
//! (`agent.lock`, the one `state.rs` holds for `run`) is held, and only when they have
//! not changed for a minute.
//!
//! What cannot be reached from here: the `/tmp/.backupy-mongo-*.yaml` files that the
//! MongoDB tools read inside a database container (docs/user-guide.md says how to find
//! them). S3 objects are never partial: a multipart upload that was not completed is
//! aborted by `S3Storage::abort_recorded_uploads`.
//!
//! Runs on the caller's thread (main, at start), before any run starts.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

/// Private directories for secret files (`drivers::exec::PrivateDir`).
pub const SECRETS_DIR: &str = ".backupy-secrets-";
/// SQLite online-backup snapshots (`drivers::sqlite`).
pub const SQLITE_SNAPSHOT: &str = ".sqlite-snapshot-";
/// The verified copy of an object that `restore` applies (`restore`).
pub const RESTORE_SPOOL: &str = ".restore-spool-";
/// The suffix of an object the directory storage is still writing.
pub const PARTIAL: &str = ".partial";

/// An untagged file younger than this may belong to an older agent that is still
/// starting a run; it is left for the next start.
const LEGACY_MIN_AGE: Duration = Duration::from_secs(60);

/// "PID_STARTTIME" of this process: the start time (in clock ticks since boot, from
/// `/proc/self/stat`) makes the tag unique even when the pid is reused later.
pub fn owner_tag() -> &'static str {
    static TAG: OnceLock<String> = OnceLock::new();
    TAG.get_or_init(|| {
        let pid = std::process::id();
        let start = start_time(pid).unwrap_or(0);
        format!("{pid}_{start}")
    })
}

/// `kind` followed by this process's tag and a dash, for `tempfile`'s prefix.
pub fn tagged_prefix(kind: &str) -> String {
    format!("{kind}{}-", owner_tag())
}

/// The storage's temporary name for an object being written to `final_name`.
pub fn partial_name(final_name: &str) -> String {
    format!(".{final_name}.{}{PARTIAL}", owner_tag())
}

/// Field 22 of `/proc/PID/stat`, the process's start time; `None` when it does not run.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count after the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); a zombie has exited and owns nothing any more.
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(22 - 3)?.parse().ok()
}

/// Whether the owner named by `tag` ("PID_STARTTIME") still runs; `None` for text that
/// is not a tag.
fn owner_alive(tag: &str) -> Option<bool> {
    let (pid, start) = tag.split_once('_')?;
    let pid: u32 = pid.parse().ok()?;
    let start: u64 = start.parse().ok()?;
    Some(start_time(pid) == Some(start))
}

/// What a file's name says about its owner.
enum Owner {
    /// Made by a process that is gone: remove it.
    Dead,
    /// Made by a running process (perhaps this one): leave it.
    Alive,
    /// No tag: made by an agent from before owner tags.
    Untagged,
}

fn owner_of_tagged(rest: &str) -> Owner {
    // rest = "PID_START-RANDOM" for tagged names, "RANDOM" for old ones.
    match rest.split_once('-').and_then(|(tag, _)| owner_alive(tag)) {
        Some(true) => Owner::Alive,
        Some(false) => Owner::Dead,
        None => Owner::Untagged,
    }
}

fn owner_of_partial(name: &str) -> Owner {
    let tag = name.strip_suffix(PARTIAL).and_then(|n| n.rsplit_once('.')).map(|(_, tag)| tag);
    match tag.and_then(owner_alive) {
        Some(true) => Owner::Alive,
        Some(false) => Owner::Dead,
        None => Owner::Untagged,
    }
}

/// What [`clean`] removed, by kind: (items, bytes).
#[derive(Debug, Default)]
pub struct Removed {
    pub by_kind: BTreeMap<&'static str, (u64, u64)>,
    /// Leftovers that could not be removed, with why.
    pub failed: Vec<String>,
}

/// The kinds of leftovers, as the metric's `kind` label.
pub const KINDS: &[&str] =
    &["secrets_dir", "sqlite_snapshot", "restore_spool", "upload_spool", "partial_object"];

impl Removed {
    pub fn items(&self) -> u64 {
        self.by_kind.values().map(|(n, _)| n).sum()
    }

    pub fn bytes(&self) -> u64 {
        self.by_kind.values().map(|(_, b)| b).sum()
    }

    fn add(&mut self, kind: &'static str, bytes: u64) {
        let e = self.by_kind.entry(kind).or_default();
        e.0 += 1;
        e.1 += bytes;
    }

    /// Adds the counts to `backupy_agent_leftovers_removed_total` and
    /// `backupy_agent_leftovers_removed_bytes_total` (every kind appears, at 0 if need be).
    pub fn record(&self, metrics: &crate::metrics::Metrics) {
        for kind in KINDS {
            let (n, b) = self.by_kind.get(kind).copied().unwrap_or_default();
            metrics.leftovers_removed_total.with_label_values(&[kind]).inc_by(n);
            metrics.leftovers_removed_bytes_total.with_label_values(&[kind]).inc_by(b);
        }
    }

    /// One log line for what was removed (none when nothing was), one for what could not be.
    pub fn log(&self) {
        if self.items() > 0 {
            let parts: Vec<String> =
                self.by_kind.iter().map(|(kind, (n, b))| format!("{n} {kind} ({b} bytes)")).collect();
            log::info!(
                "removed {} leftover(s) of dead runs, {} bytes: {}",
                self.items(),
                self.bytes(),
                parts.join(", ")
            );
        }
        if !self.failed.is_empty() {
            log::warn!("could not remove leftovers of dead runs: {}", self.failed.join("; "));
        }
    }
}

/// Removes what dead runs left in `state_dir` (its `tmp` and `spool`) and, for a
/// directory storage, the `*.partial` objects under `storage_dir`. Never touches a file
/// whose owner still runs. Logs one line when something was removed. `holds_lock`: the
/// caller holds the state directory's lock (`run`, through `StateDb`); otherwise it is
/// taken here if it is free, and untagged files are left alone if it is not.
pub fn clean(state_dir: &Path, storage_dir: Option<&Path>, holds_lock: bool) -> Removed {
    let mut removed = Removed::default();
    // The lock `run` holds: while it is held, no `run` of an older agent writes here.
    let taken = if holds_lock { None } else { try_state_lock(state_dir) };
    let locked = holds_lock || taken.is_some();
    for (dir, kinds) in [
        (
            state_dir.join("tmp"),
            &[
                (SECRETS_DIR, "secrets_dir"),
                (SQLITE_SNAPSHOT, "sqlite_snapshot"),
                (RESTORE_SPOOL, "restore_spool"),
            ][..],
        ),
        // Connected mode's presigned-PUT spool (ciphertext; untagged).
        (state_dir.join("spool"), &[(".spool-", "upload_spool")][..]),
    ] {
        let Ok(entries) = fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((prefix, kind)) = kinds.iter().find(|(p, _)| name.starts_with(p)) else { continue };
            let owner = owner_of_tagged(&name[prefix.len()..]);
            remove_if_dead(&entry.path(), owner, locked, kind, &mut removed);
        }
    }
    if let Some(root) = storage_dir {
        let mut stack = vec![root.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                let Ok(ft) = entry.file_type() else { continue };
                let name = entry.file_name().to_string_lossy().into_owned();
                if ft.is_dir() {
                    stack.push(entry.path());
                } else if ft.is_file() && name.starts_with('.') && name.ends_with(PARTIAL) {
                    let owner = owner_of_partial(&name);
                    remove_if_dead(&entry.path(), owner, locked, "partial_object", &mut removed);
                }
            }
        }
    }
    drop(taken);
    removed.log();
    removed
}

/// [`clean`] for a standalone config: its state directory and its storage directory.
pub fn clean_for(cfg: &crate::config::Config, holds_lock: bool) -> Removed {
    let storage_dir = match &cfg.storage {
        crate::config::StorageConfig::Dir(d) => Some(d.as_path()),
        crate::config::StorageConfig::S3(_) => None,
    };
    clean(&cfg.state_dir, storage_dir, holds_lock)
}

fn remove_if_dead(path: &Path, owner: Owner, locked: bool, kind: &'static str, removed: &mut Removed) {
    let Ok(meta) = fs::symlink_metadata(path) else { return };
    match owner {
        Owner::Alive => return,
        Owner::Dead => {}
        Owner::Untagged => {
            let age = meta.modified().ok().and_then(|m| SystemTime::now().duration_since(m).ok());
            if !locked || age.is_none_or(|a| a < LEGACY_MIN_AGE) {
                return;
            }
        }
    }
    let bytes = size_of(path, &meta);
    let result = if meta.is_dir() { fs::remove_dir_all(path) } else { fs::remove_file(path) };
    match result {
        Ok(()) => removed.add(kind, bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => removed.failed.push(format!("{}: {e}", path.display())),
    }
}

fn size_of(path: &Path, meta: &fs::Metadata) -> u64 {
    if !meta.is_dir() {
        return meta.len();
    }
    fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| fs::symlink_metadata(e.path()).ok().map(|m| size_of(&e.path(), &m)))
        .sum()
}

/// Takes `state_dir/agent.lock` if nobody holds it; released when the file is dropped.
fn try_state_lock(state_dir: &Path) -> Option<fs::File> {
    let path = state_dir.join("agent.lock");
    if !path.exists() {
        return None;
    }
    let f = fs::OpenOptions::new().read(true).write(true).open(&path).ok()?;
    // SAFETY: flock(2) on a descriptor we own.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    (rc == 0).then_some(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_name_a_live_or_a_dead_owner() {
        let mine = owner_tag();
        assert_eq!(owner_alive(mine), Some(true));
        let (pid, start) = mine.split_once('_').unwrap();
        let other_start: u64 = start.parse::<u64>().unwrap() + 1;
        assert_eq!(
            owner_alive(&format!("{pid}_{other_start}")),
            Some(false),
            "a reused pid is not the owner"
        );
        assert_eq!(owner_alive("abc123"), None);
        assert!(matches!(owner_of_tagged(&format!("{mine}-x1Y2z3")), Owner::Alive));
        assert!(matches!(owner_of_tagged("x1Y2z3"), Owner::Untagged));
        assert!(matches!(owner_of_partial(&partial_name("a.pgdump.zst.age")), Owner::Alive));
        assert!(matches!(owner_of_partial(".a.pgdump.zst.age.partial"), Owner::Untagged));
        assert!(matches!(owner_of_partial(&format!(".a.sql.{pid}_{other_start}.partial")), Owner::Dead));
    }
}
