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
        match self {
            Storage::Dir(d) => d.put(key, bytes),
            Storage::S3(s) => Ok(s.put(key, bytes)?),
        }
    }

    pub fn get(&self, key: &str) -> io::Result<Box<dyn Read + Send>> {
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
        match self {
            Storage::Dir(d) => d.delete(key),
            Storage::S3(s) => Ok(s.delete(key)?),
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

    /// Reads every manifest under `prefix`; unreadable ones are reported, not fatal.
    pub fn manifests(&self, prefix: &str) -> io::Result<Vec<Manifest>> {
        let mut out = Vec::new();
        for (key, _) in self.list(prefix)? {
            if !key.ends_with(".json") {
                continue;
            }
            let mut text = Vec::new();
            let parsed = self
                .get(&key)
                .and_then(|mut r| r.read_to_end(&mut text))
                .map_err(|e| e.to_string())
                .and_then(|_| serde_json::from_slice::<Manifest>(&text).map_err(|e| e.to_string()));
            match parsed {
                Ok(m) => out.push(m),
                Err(e) => log::warn!("skipping manifest {key}: {e}"),
            }
        }
        out.sort_by(|a, b| a.started_at.cmp(&b.started_at).then(a.id.cmp(&b.id)));
        Ok(out)
    }
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
