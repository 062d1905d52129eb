//! Where stored objects go, and the JSON manifest written beside each one.
//!
//! The store stage of the pipeline writes through an [`ObjectWriter`] and commits it only
//! after the whole stream succeeded; dropping an uncommitted writer removes what it
//! wrote. The manifest is written last, so an object without a manifest is an
//! incomplete backup. Runs on the pipeline's store thread and the caller's thread.

pub mod dir;
pub mod s3;

use std::io::{self, Read, Write};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use dir::DirStorage;
pub use s3::S3Storage;

/// The storage of a standalone configuration: a local directory or an S3 bucket.
#[derive(Clone)]
pub enum Storage {
    Dir(DirStorage),
    S3(S3Storage),
}

impl Storage {
    /// Where an object lives, for messages ("backups/app/…" or "s3://bucket/prefix/app/…").
    pub fn describe(&self, key: &str) -> String {
        match self {
            Storage::Dir(d) => d.path_of(key).display().to_string(),
            Storage::S3(s) => format!("s3://{}/{}", s.target().bucket, s.full_key(key)),
        }
    }

    /// Starts writing `key`; a cancelled run's writer stops waiting on slow storage.
    pub fn create(&self, key: &str, cancel: &crate::cancel::Cancel) -> io::Result<Box<dyn ObjectWriter>> {
        Ok(match self {
            Storage::Dir(d) => Box::new(d.create(key)?),
            Storage::S3(s) => Box::new(s.create_cancellable(key, cancel.clone())),
        })
    }

    pub fn put(&self, key: &str, bytes: &[u8]) -> io::Result<()> {
        check_key(key)?;
        match self {
            Storage::Dir(d) => d.put(key, bytes),
            Storage::S3(s) => Ok(s.put(key, bytes)?),
        }
    }

    pub fn get(&self, key: &str) -> io::Result<Box<dyn Read + Send>> {
        check_key(key)?;
        match self {
            Storage::Dir(d) => {
                let p = d.path_of(key);
                let f = std::fs::File::open(&p)
                    .map_err(|e| io::Error::new(e.kind(), format!("cannot open {}: {e}", p.display())))?;
                Ok(Box::new(f))
            }
            Storage::S3(s) => Ok(s.get(key)?),
        }
    }

    pub fn delete(&self, key: &str) -> io::Result<()> {
        check_key(key)?;
        match self {
            Storage::Dir(d) => d.delete(key),
            Storage::S3(s) => Ok(s.delete(key)?),
        }
    }

    /// Whether objects here are written under S3 Object Lock (`[storage.s3] object_lock`).
    pub fn object_lock(&self) -> bool {
        matches!(self, Storage::S3(s) if s.target().object_lock.is_some())
    }

    /// The Object Lock retention date of `key` (S3 HeadObject); always `None` in a directory.
    pub fn locked_until(&self, key: &str) -> io::Result<Option<DateTime<Utc>>> {
        check_key(key)?;
        match self {
            Storage::Dir(_) => Ok(None),
            Storage::S3(s) => Ok(s.retain_until(key)?),
        }
    }

    /// Every object under `prefix`: (key, size), sorted by key.
    pub fn list(&self, prefix: &str) -> io::Result<Vec<(String, u64)>> {
        let mut out = match self {
            Storage::Dir(d) => d.list(prefix)?,
            Storage::S3(s) => s.list(prefix)?,
        };
        out.sort();
        Ok(out)
    }

    /// Reads every manifest under `prefix` that the agent may act on; unreadable and
    /// foreign ones are reported (a warning each) and left out. See [`Self::manifests_checked`].
    pub fn manifests(&self, prefix: &str) -> io::Result<Vec<Manifest>> {
        Ok(self.manifests_checked(prefix)?.manifests)
    }

    /// Reads every manifest under `prefix`. A manifest is the agent's to act on (list,
    /// retention, restore, verify) only when [`Manifest::check_stored_at`] accepts it
    /// where it was found; anything else is foreign: reported once here, returned in
    /// [`Manifests::foreign`], and left alone, as are unreadable ones (issue 16: a
    /// planted `object_key` must not steer a delete or a download).
    pub fn manifests_checked(&self, prefix: &str) -> io::Result<Manifests> {
        let mut out = Manifests::default();
        for (key, _) in self.list(prefix)? {
            // Drill reports sit beside the manifests but are not manifests.
            if !key.ends_with(".json") || key.ends_with(DRILL_REPORT_SUFFIX) {
                continue;
            }
            let mut text = Vec::new();
            let parsed = self
                .get(&key)
                .and_then(|r| r.take(MAX_MANIFEST_BYTES).read_to_end(&mut text))
                .map_err(|e| e.to_string())
                .and_then(|_| serde_json::from_slice::<Manifest>(&text).map_err(|e| e.to_string()));
            match parsed {
                Ok(m) => match m.check_stored_at(&key) {
                    Ok(()) => out.manifests.push(m),
                    Err(reason) => {
                        log::warn!(
                            "foreign manifest {}: {reason}; left alone (not listed, deleted, verified or restored)",
                            self.describe(&key)
                        );
                        out.foreign.push(ForeignManifest { key, reason });
                    }
                },
                Err(e) => {
                    log::warn!("skipping manifest {key}: {e}");
                    out.unreadable.push(key);
                }
            }
        }
        out.manifests.sort_by(|a, b| a.started_at.cmp(&b.started_at).then(a.id.cmp(&b.id)));
        Ok(out)
    }
}

/// A manifest is small; a larger file under a `.json` name is not one of ours.
const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// The manifests found under a prefix, sorted by start time, and those left alone.
#[derive(Debug, Default)]
pub struct Manifests {
    pub manifests: Vec<Manifest>,
    pub foreign: Vec<ForeignManifest>,
    /// Keys of `.json` files that are not manifests at all.
    pub unreadable: Vec<String>,
}

/// A manifest the agent does not act on, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignManifest {
    /// Where it was found.
    pub key: String,
    pub reason: String,
}

/// A writer for one object. Dropping it without `commit` discards the object.
pub trait ObjectWriter: Write + Send {
    /// Makes the object durable and visible under its final key.
    fn commit(self: Box<Self>) -> io::Result<StoredObject>;
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredObject {
    pub key: String,
    pub size: u64,
}

/// An object writer that keeps nothing (benchmarks measure the pipeline without I/O).
#[derive(Default)]
pub struct Discard {
    size: u64,
}

impl Write for Discard {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.size += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ObjectWriter for Discard {
    fn commit(self: Box<Self>) -> io::Result<StoredObject> {
        Ok(StoredObject { key: String::new(), size: self.size })
    }
}

/// `<target>/<job>/<yyyymmddThhmmssZ>-<run id>.<ext>`.
pub fn object_key(target: &str, job: &str, started: DateTime<Utc>, run_id: &str, ext: &str) -> String {
    format!("{target}/{job}/{}-{run_id}.{ext}", started.format("%Y%m%dT%H%M%SZ"))
}

/// The manifest key of an object: its key plus `.json`.
pub fn manifest_key(object_key: &str) -> String {
    format!("{object_key}.json")
}

/// What ends the key of a drill report ([`drill_report_key`]).
pub const DRILL_REPORT_SUFFIX: &str = ".drill.json";

/// The key of the drill report of an object: its key plus `.drill.json` (issue 19).
/// Never a manifest: object names end in a dump extension, never in `.drill`.
pub fn drill_report_key(object_key: &str) -> String {
    format!("{object_key}{DRILL_REPORT_SUFFIX}")
}

/// Checks that an id may be used as one path segment of an object key.
pub fn check_key_segment(what: &str, s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s != "."
        && s != ".."
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {s:?} must be 1-128 characters of letters, digits, '-', '_' or '.', so it can name a storage path"
        ))
    }
}

/// Checks the file-name segment of an object key (`<yyyymmddThhmmssZ>-<run id>.<ext>`):
/// the characters of [`check_key_segment`], up to 255 of them (a run id alone may have 128).
pub fn check_name_segment(what: &str, s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 255
        && s != "."
        && s != ".."
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!("{what} {s:?} must be 1-255 characters of letters, digits, '-', '_' or '.'"))
    }
}

/// The JSON manifest stored beside each object (`manifest_version` 1).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub manifest_version: u32,
    /// The run id; the backup ID that `restore` and `verify` take.
    pub id: String,
    pub job: String,
    pub target: String,
    pub engine: String,
    pub engine_version: String,
    pub object_key: String,
    pub size_bytes: u64,
    pub dump_bytes: u64,
    pub sha256: String,
    pub compression: String,
    pub encryption: String,
    pub key_id: String,
    pub started_at: String,
    pub finished_at: String,
    pub agent_version: String,
    /// What the dump holds, counted from the same snapshot it was taken from (issue 19):
    /// what a drill compares a restored copy with. Absent in manifests written before
    /// it existed and for engines that do not count yet; never written when absent, so
    /// older agents still read these manifests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Content>,
}

/// The `content` block of a manifest: per-table (or per-collection, per-db) counts of
/// what the dump holds, and how far those counts can be trusted.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Content {
    /// The engine's own version as the counting connection saw it ("SQLite 3.46.0").
    pub engine_version: String,
    /// What was counted from: "sqlite snapshot file" and the like.
    pub counted_from: String,
    /// `"exact"`: counted inside the very snapshot the dump holds, so a faithful
    /// restore has exactly these counts.
    pub exactness: String,
    /// What a count counts: "rows", "documents", "keys".
    pub unit: String,
    /// Count per table (SQLite: the table name; schema-qualified where an engine has
    /// schemas), sorted by name.
    pub tables: std::collections::BTreeMap<String, u64>,
}

impl Manifest {
    /// Whether this manifest, found at `key`, may be acted on: its own name must be
    /// `object_key + ".json"`, and `object_key` must be `<target>/<job>/<name>` for the
    /// manifest's own target and job, every segment a valid one. Otherwise the reason
    /// (the manifest is foreign: planted, or another tool's).
    pub fn check_stored_at(&self, key: &str) -> Result<(), String> {
        if manifest_key(&self.object_key) != key {
            return Err(format!(
                "its object_key {:?} is not its own name without \".json\"",
                self.object_key
            ));
        }
        check_key_segment("target", &self.target)?;
        check_key_segment("job", &self.job)?;
        let segments: Vec<&str> = self.object_key.split('/').collect();
        let [target, job, name] = segments.as_slice() else {
            return Err(format!("its object_key {:?} is not <target>/<job>/<name>", self.object_key));
        };
        if *target != self.target || *job != self.job {
            return Err(format!(
                "its object_key {:?} lies outside the prefix {}/{}/ of its own job",
                self.object_key, self.target, self.job
            ));
        }
        check_name_segment("object name", name)
    }
}

/// Refuses a key that could leave the storage root or name a parent: empty, absolute,
/// or with an empty, `.` or `..` segment. Keys the agent made never do; keys read from a
/// manifest or a listing are checked before they reach the file system.
pub fn check_key(key: &str) -> io::Result<()> {
    let bad = key.is_empty()
        || key.starts_with('/')
        || key.contains('\0')
        || key.split('/').any(|seg| seg.is_empty() || seg == "." || seg == "..");
    if bad {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "refusing storage key {key:?}: it is empty, absolute, or has an empty, '.' or '..' segment"
            ),
        ));
    }
    Ok(())
}

pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}
