//! Local directory storage: every file is written under a temporary name in its final
//! directory, fsynced, renamed into place and the directory fsynced, so a crash leaves
//! either the whole object or nothing under the final name.
//!
//! Every object and manifest gets mode [`OBJECT_MODE`] (0640: the owner writes, a backup
//! operators' group may read, others nothing) unless the config's `[storage] file_mode`
//! says otherwise, set explicitly so the umask neither widens nor narrows it
//! (docs/security.md).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{ObjectWriter, StoredObject};

/// The mode of every stored object and manifest.
pub const OBJECT_MODE: u32 = 0o640;

#[derive(Debug, Clone)]
pub struct DirStorage {
    root: PathBuf,
    file_mode: u32,
}

impl DirStorage {
    /// Opens (creating if needed) a storage directory and checks it is writable.
    pub fn open(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot create storage directory {}: {e}", root.display()))
        })?;
        // One name per call: runs that start together open the same directory on their
        // own threads, and a shared name let one remove the other's probe.
        static PROBES: AtomicU64 = AtomicU64::new(0);
        let n = PROBES.fetch_add(1, Ordering::Relaxed);
        let probe = root.join(format!(".backupy-write-test-{}-{n}", std::process::id()));
        File::create(&probe).and_then(|_| fs::remove_file(&probe)).map_err(|e| {
            io::Error::new(e.kind(), format!("storage directory {} is not writable: {e}", root.display()))
        })?;
        Ok(Self { root, file_mode: OBJECT_MODE })
    }

    /// Stores objects and manifests with `mode` instead of [`OBJECT_MODE`].
    pub fn with_file_mode(mut self, mode: u32) -> Self {
        self.file_mode = mode;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn path_of(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// Starts writing the object `key`; it appears only on commit.
    pub fn create(&self, key: &str) -> io::Result<DirObjectWriter> {
        DirObjectWriter::create(self.path_of(key), key.to_string(), self.file_mode)
    }

    /// Writes a small file (a manifest) atomically.
    pub fn put(&self, key: &str, bytes: &[u8]) -> io::Result<()> {
        let mut w = self.create(key)?;
        w.write_all(bytes)?;
        Box::new(w).commit().map(|_| ())
    }

    /// Every committed file under `prefix` (a key prefix): (key, size). Temporary
    /// `.partial` files are not objects and are skipped.
    pub fn list(&self, prefix: &str) -> io::Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(io::Error::new(e.kind(), format!("cannot list {}: {e}", dir.display())));
                }
            };
            for entry in entries {
                let entry = entry?;
                let path = entry.path();
                let meta = entry.metadata()?;
                if meta.is_dir() {
                    stack.push(path);
                    continue;
                }
                let name = entry.file_name();
                if name.to_string_lossy().starts_with('.') {
                    continue;
                }
                let Ok(rel) = path.strip_prefix(&self.root) else { continue };
                let key = rel.to_string_lossy().into_owned();
                if key.starts_with(prefix) {
                    out.push((key, meta.len()));
                }
            }
        }
        Ok(out)
    }

    pub fn delete(&self, key: &str) -> io::Result<()> {
        match fs::remove_file(self.path_of(key)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}

pub struct DirObjectWriter {
    key: String,
    final_path: PathBuf,
    temp_path: PathBuf,
    file: Option<File>,
    size: u64,
}

impl DirObjectWriter {
    fn create(final_path: PathBuf, key: String, mode: u32) -> io::Result<Self> {
        let dir = final_path.parent().unwrap_or(Path::new(".")).to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot create directory {}: {e}", dir.display()))
        })?;
        let name = final_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        // Tagged with this process, so the next start removes it if we die (`leftovers`).
        let temp_path = dir.join(crate::leftovers::partial_name(&name));
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&temp_path)
            .and_then(|f| f.set_permissions(fs::Permissions::from_mode(mode)).map(|_| f))
            .map_err(|e| io::Error::new(e.kind(), format!("cannot create {}: {e}", temp_path.display())))?;
        Ok(Self { key, final_path, temp_path, file: Some(file), size: 0 })
    }
}

impl Write for DirObjectWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let file = self.file.as_mut().ok_or_else(|| io::Error::other("object already committed"))?;
        let n = file
            .write(buf)
            .map_err(|e| io::Error::new(e.kind(), format!("writing {}: {e}", self.temp_path.display())))?;
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ObjectWriter for DirObjectWriter {
    fn commit(mut self: Box<Self>) -> io::Result<StoredObject> {
        let file = self.file.take().ok_or_else(|| io::Error::other("object already committed"))?;
        let ctx = |what: &str, p: &Path, e: io::Error| {
            io::Error::new(e.kind(), format!("{what} {}: {e}", p.display()))
        };
        let durable = file.sync_all().map_err(|e| ctx("cannot fsync", &self.temp_path, e)).and_then(|_| {
            fs::rename(&self.temp_path, &self.final_path)
                .map_err(|e| ctx("cannot rename into", &self.final_path, e))
        });
        if let Err(e) = durable {
            let _ = fs::remove_file(&self.temp_path);
            return Err(e);
        }
        if let Some(dir) = self.final_path.parent()
            && let Err(e) = File::open(dir).and_then(|d| d.sync_all())
        {
            // The rename may not survive a crash: do not report a durable object.
            let _ = fs::remove_file(&self.final_path);
            return Err(ctx("cannot fsync directory", dir, e));
        }
        Ok(StoredObject { key: self.key.clone(), size: self.size })
    }
}

impl Drop for DirObjectWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.temp_path);
        }
    }
}
