//! Where stored objects go, and the JSON manifest written beside each one.
//!
//! The store stage of the pipeline writes through an [`ObjectWriter`] and commits it only
//! after the whole stream succeeded; dropping an uncommitted writer removes what it
//! wrote. The manifest is written last, so an object without a manifest is an
//! incomplete backup. Runs on the pipeline's store thread and the caller's thread.

pub mod dir;
pub mod s3;

use std::io::{self, Write};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use dir::DirStorage;

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
}

pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}
