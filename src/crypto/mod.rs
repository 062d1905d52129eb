//! Encryption of stored objects, exactly as `blob-format.md` defines it.
//!
//! Owns the two object formats (v1 legacy frames, v2 STREAM with an authenticated
//! header), the key material (raw data keys, X25519 identities and recipients, HPKE
//! sealing) and decryption tokens. Everything here is plain `Read`/`Write` adapters with
//! O(chunk) memory; the pipeline runs the writers on its encrypt thread and
//! `backupy-decrypt` runs the readers on its main thread. No threads or channels here.

pub mod at_rest;
pub mod keys;
pub mod token;
pub mod v1;
pub mod v2;

use std::io::{self, Read, Write};

use zeroize::{Zeroize, ZeroizeOnDrop};

pub use keys::{Identity, Recipient};

/// A 32-byte AES-256 data key. Zeroed on drop and never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
pub struct DataKey([u8; 32]);

impl DataKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn from_slice(bytes: &[u8]) -> Result<Self, Error> {
        let arr: [u8; 32] = bytes
            .try_into()
            .map_err(|_| Error::BadKey { reason: format!("a data key is 32 bytes, got {}", bytes.len()) })?;
        Ok(Self(arr))
    }

    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, Error> {
        let mut k = [0u8; 32];
        random_bytes(&mut k)?;
        Ok(Self(k))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

pub(crate) fn random_bytes(buf: &mut [u8]) -> Result<(), Error> {
    getrandom::fill(buf).map_err(|e| Error::Random(e.to_string()))
}

/// Everything that can go wrong reading or writing an encrypted object. The messages
/// are written for the person holding the object, not for the implementer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not a valid backup object: {0}")]
    BadHeader(String),
    #[error("the object is truncated: {0}")]
    Truncated(String),
    #[error(
        "authentication failed at chunk {chunk}: the object is corrupted or tampered with, or the key is wrong"
    )]
    Tampered { chunk: u64 },
    #[error(
        "the first chunk does not authenticate: wrong key, or the object's header or first chunk is corrupted"
    )]
    WrongKey,
    #[error("wrong private key: this backup is sealed to a different recipient key")]
    WrongIdentity,
    #[error("unexpected data after the end of the object ({0})")]
    TrailingData(String),
    #[error("{0}")]
    KeyMismatch(String),
    #[error("invalid key: {reason}")]
    BadKey { reason: String },
    #[error("the operating system's random generator failed: {0}")]
    Random(String),
    #[error("the object is too large for this format ({0})")]
    TooLarge(String),
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        io::Error::other(e)
    }
}

/// Finds a [`crypto::Error`](Error) inside an I/O error produced by the readers/writers.
pub fn find_error(e: &io::Error) -> Option<&Error> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<Error>())
}

/// How a stored object is encrypted, decided per run from the job and its key.
pub enum Encryption {
    /// Explicitly requested plaintext (`encryption = "none"`); never a fallback.
    None,
    /// Legacy frames with a raw data key.
    V1 { key: DataKey },
    /// v2 with a raw data key supplied by the caller (key mode 0).
    V2Raw { key: DataKey, chunk_size: u32 },
    /// v2 with a fresh data key sealed to an X25519 recipient (key mode 1).
    V2Recipient { recipient: Recipient, chunk_size: u32 },
}

impl Encryption {
    pub fn label(&self) -> &'static str {
        match self {
            Encryption::None => "none",
            Encryption::V1 { .. } => "v1",
            Encryption::V2Raw { .. } | Encryption::V2Recipient { .. } => "v2",
        }
    }

    /// Filename suffix of objects written with this encryption.
    pub fn extension(&self) -> Option<&'static str> {
        match self {
            Encryption::None => None,
            _ => Some("bkpy"),
        }
    }

    /// Draws per-object key material and returns what the run reports about it,
    /// together with a factory for the writer the encrypt stage wraps its output in.
    pub fn prepare(&self, compression_code: u8) -> Result<PreparedEncryption, Error> {
        Ok(match self {
            Encryption::None => {
                PreparedEncryption { key_id: String::new(), encrypted_dek: Vec::new(), kind: Prepared::None }
            }
            Encryption::V1 { key } => PreparedEncryption {
                key_id: String::new(),
                encrypted_dek: key.as_bytes().to_vec(),
                kind: Prepared::V1 { key: key.clone() },
            },
            Encryption::V2Raw { key, chunk_size } => {
                let header = v2::Header::new_raw(compression_code, *chunk_size)?;
                PreparedEncryption {
                    key_id: String::new(),
                    encrypted_dek: key.as_bytes().to_vec(),
                    kind: Prepared::V2 { key: key.clone(), header },
                }
            }
            Encryption::V2Recipient { recipient, chunk_size } => {
                let key = DataKey::generate()?;
                let sealed = recipient.seal(&key)?;
                let header = v2::Header::new_sealed(compression_code, *chunk_size, sealed)?;
                PreparedEncryption {
                    key_id: recipient.key_id(),
                    encrypted_dek: sealed.to_vec(),
                    kind: Prepared::V2 { key, header },
                }
            }
        })
    }
}

/// Per-object encryption state: what to report (`key_id`, `encrypted_dek`) and how to
/// wrap the output stream.
pub struct PreparedEncryption {
    /// `dek_kms_id` of the wire protocol: "x25519:…" in recipient mode, else empty.
    pub key_id: String,
    /// The raw data key (raw modes) or the 80-byte sealed key block (recipient mode).
    pub encrypted_dek: Vec<u8>,
    kind: Prepared,
}

enum Prepared {
    None,
    V1 { key: DataKey },
    V2 { key: DataKey, header: v2::Header },
}

impl PreparedEncryption {
    /// Wraps `inner`; the returned writer must be finished with [`EncryptWriter::finish`].
    pub fn writer<W: Write>(self, inner: W) -> io::Result<EncryptWriter<W>> {
        Ok(match self.kind {
            Prepared::None => EncryptWriter::Plain(inner),
            Prepared::V1 { key } => EncryptWriter::V1(v1::Writer::new(inner, &key)),
            Prepared::V2 { key, header } => EncryptWriter::V2(v2::Writer::new(inner, &key, header)?),
        })
    }
}

/// The encrypt stage's writer, whichever format the run uses.
pub enum EncryptWriter<W: Write> {
    Plain(W),
    V1(v1::Writer<W>),
    V2(v2::Writer<W>),
}

impl<W: Write> EncryptWriter<W> {
    /// Writes the final chunk or end marker and returns the inner writer.
    pub fn finish(self) -> io::Result<W> {
        match self {
            EncryptWriter::Plain(w) => Ok(w),
            EncryptWriter::V1(w) => w.finish(),
            EncryptWriter::V2(w) => w.finish(),
        }
    }
}

impl<W: Write> Write for EncryptWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            EncryptWriter::Plain(w) => w.write(buf),
            EncryptWriter::V1(w) => w.write(buf),
            EncryptWriter::V2(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            EncryptWriter::Plain(w) => w.flush(),
            EncryptWriter::V1(w) => w.flush(),
            EncryptWriter::V2(w) => w.flush(),
        }
    }
}

/// The key a reader is given to open an object.
pub enum KeySource {
    /// A raw data key (key file, decryption token, control-plane key).
    Raw(DataKey),
    /// An X25519 private key for objects sealed to its public key.
    Identity(Identity),
}

/// Which format an object is in, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    V1,
    V2,
}

/// Opens an encrypted object for streaming decryption, detecting its format by the
/// `BKPY` magic (a v1 object cannot start with it: its first frame length would exceed
/// the v1 maximum).
pub fn open<R: Read + 'static>(mut inner: R, key: &KeySource) -> io::Result<(Format, Box<dyn Read>)> {
    let mut head = [0u8; 4];
    let n = read_up_to(&mut inner, &mut head)?;
    let rest = io::Cursor::new(head.get(..n).unwrap_or(&head).to_vec()).chain(inner);
    if n == 4 && &head == v2::MAGIC {
        Ok((Format::V2, Box::new(v2::Reader::new(rest, key)?)))
    } else {
        match key {
            KeySource::Raw(k) => Ok((Format::V1, Box::new(v1::Reader::new(rest, k)))),
            KeySource::Identity(_) => Err(Error::KeyMismatch(
                "this is a format v1 object, which uses a raw data key: use --key-file or --token, not --identity"
                    .into(),
            )
            .into()),
        }
    }
}

/// Reads until `buf` is full or the reader ends; returns the number of bytes read.
pub(crate) fn read_up_to<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let Some(rest) = buf.get_mut(n..) else { break };
        match r.read(rest) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
