//! Verification of a stored backup from storage alone: download it, compare its size and
//! SHA-256 with the manifest, decrypt it (authenticating every chunk), decompress it and
//! check the dump's magic. Runs on the caller's thread, streaming, in O(chunk) memory.

use std::io::{self, Read};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use crate::crypto::{self, KeySource};
use crate::drivers::{Engine, MAGIC_LEN, check_magic};
use crate::pipeline::compress::decompress_by_magic;
use crate::storage::{Manifest, Storage};

/// SHA-256 and size of everything read through a [`HashingReader`].
#[derive(Default)]
pub struct Digested {
    hasher: Sha256,
    pub bytes: u64,
}

impl Digested {
    pub fn hex(&self) -> String {
        hex::encode(self.hasher.clone().finalize())
    }
}

/// Hashes the bytes that pass through it; the digest stays readable by whoever holds
/// the other end of the `Arc` after the reader was moved into a decoder chain.
pub struct HashingReader<R> {
    inner: R,
    digest: Arc<Mutex<Digested>>,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> (Self, Arc<Mutex<Digested>>) {
        let digest = Arc::new(Mutex::new(Digested::default()));
        (Self { inner, digest: digest.clone() }, digest)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut d = self.digest.lock().unwrap_or_else(|p| p.into_inner());
        d.hasher.update(buf.get(..n).unwrap_or_default());
        d.bytes += n as u64;
        Ok(n)
    }
}

#[derive(Debug)]
pub struct Verified {
    pub size: u64,
    pub sha256: String,
    pub dump_bytes: u64,
}

/// A stored backup opened for reading: its engine, the dump stream (downloaded,
/// decrypted, decompressed), and the digest of the stored bytes read so far.
pub struct OpenedBackup {
    pub engine: Engine,
    pub dump: Box<dyn Read>,
    pub digest: Arc<Mutex<Digested>>,
}

/// Opens the backup `m`. `key` may be `None` only for unencrypted backups.
pub fn open_backup(storage: &Storage, m: &Manifest, key: Option<&KeySource>) -> Result<OpenedBackup, String> {
    let engine =
        Engine::parse(&m.engine).ok_or_else(|| format!("manifest names unknown engine {:?}", m.engine))?;
    let input = storage.get(&m.object_key).map_err(|e| format!("cannot download {}: {e}", m.object_key))?;
    let (dump, digest) = open_stored(input, m, key)?;
    Ok(OpenedBackup { engine, dump, digest })
}

/// A dump stream and the digest of the stored bytes read for it so far.
pub type StoredStream = (Box<dyn Read>, Arc<Mutex<Digested>>);

/// The stored bytes of `m` read from `input` (storage, or a local copy of them):
/// decrypted when the manifest says so, decompressed, and hashed as they are read.
pub fn open_stored(
    input: Box<dyn Read + Send>,
    m: &Manifest,
    key: Option<&KeySource>,
) -> Result<StoredStream, String> {
    let (hashing, digest) = HashingReader::new(input);
    let plain: Box<dyn Read> = match (m.encryption.as_str(), key) {
        ("none", _) => Box::new(hashing),
        (_, Some(k)) => crypto::open(hashing, k).map_err(describe)?.1,
        (_, None) => {
            return Err(format!(
                "backup {} is encrypted ({}): pass --identity FILE (or set [encryption] identity)",
                m.id, m.encryption
            ));
        }
    };
    let (_, dump) = decompress_by_magic(plain).map_err(describe)?;
    Ok((dump, digest))
}

/// Compares what was read with the manifest's size and SHA-256.
pub fn check_digest(digest: &Arc<Mutex<Digested>>, m: &Manifest) -> Result<(), String> {
    let d = digest.lock().unwrap_or_else(|p| p.into_inner());
    if d.bytes != m.size_bytes {
        return Err(format!(
            "size mismatch: stored object has {} bytes, the manifest says {}",
            d.bytes, m.size_bytes
        ));
    }
    let sha256 = d.hex();
    if sha256 != m.sha256 {
        return Err(format!(
            "SHA-256 mismatch: stored object hashes to {sha256}, the manifest says {}",
            m.sha256
        ));
    }
    Ok(())
}

/// Verifies the backup `m`. `key` may be `None` only for unencrypted backups.
pub fn verify(storage: &Storage, m: &Manifest, key: Option<&KeySource>) -> Result<Verified, String> {
    let OpenedBackup { engine, mut dump, digest } = open_backup(storage, m, key)?;
    let mut head = vec![0u8; MAGIC_LEN];
    let n = crypto::read_up_to(&mut dump, &mut head).map_err(describe)?;
    head.truncate(n);
    check_magic(engine, &head)
        .map_err(|why| format!("the restored dump is not a valid {engine} dump: {why}"))?;
    let rest = io::copy(&mut dump, &mut io::sink()).map_err(describe)?;
    check_digest(&digest, m)?;
    let d = digest.lock().unwrap_or_else(|p| p.into_inner());
    let (size, sha256) = (d.bytes, d.hex());
    Ok(Verified { size, sha256, dump_bytes: n as u64 + rest })
}

/// The message of a stream error: the format error's own words when there is one.
pub fn describe(e: io::Error) -> String {
    match crypto::find_error(&e) {
        Some(c) => c.to_string(),
        None => e.to_string(),
    }
}
