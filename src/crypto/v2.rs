//! Format v2: a STREAM construction (as in Tink's streaming AEAD and age).
//!
//! Per-object chunk key from HKDF over a random salt, counter nonces with a final-chunk
//! flag, and the SHA-256 of the header as associated data of every chunk. Truncation,
//! reordering, duplication, dropped chunks and appended bytes are all detected. The
//! writer holds back one chunk so it knows which chunk is final; the reader looks one
//! byte ahead for the same reason. Memory is O(chunk size) either way.

use std::io::{self, Read, Write};

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use hkdf::Hkdf;
use sha2::{Digest, Sha256};

use super::keys::SEALED_BLOCK_LEN;
use super::{DataKey, Error, KeySource, random_bytes, read_up_to};

pub const MAGIC: &[u8; 4] = b"BKPY";
pub const VERSION: u8 = 2;
pub const DEFAULT_CHUNK: u32 = 1 << 20;
pub const MIN_CHUNK: u32 = 4 << 10;
pub const MAX_CHUNK: u32 = 16 << 20;
const FIXED_HEADER_LEN: usize = 4 + 1 + 1 + 1 + 1 + 4 + 16 + 7 + 2;
const TAG_LEN: usize = 16;
const HKDF_INFO: &[u8] = b"backupy blob v2";

pub const KEY_MODE_RAW: u8 = 0;
pub const KEY_MODE_RECIPIENT: u8 = 1;

/// The object header. `bytes` is the exact serialized form, whose SHA-256 is the AAD.
#[derive(Clone)]
pub struct Header {
    pub key_mode: u8,
    pub compression: u8,
    pub chunk_size: u32,
    pub salt: [u8; 16],
    pub nonce_prefix: [u8; 7],
    pub sealed_key: Vec<u8>,
}

impl Header {
    pub fn new_raw(compression: u8, chunk_size: u32) -> Result<Self, Error> {
        Self::new(KEY_MODE_RAW, compression, chunk_size, Vec::new())
    }

    pub fn new_sealed(
        compression: u8,
        chunk_size: u32,
        sealed: [u8; SEALED_BLOCK_LEN],
    ) -> Result<Self, Error> {
        Self::new(KEY_MODE_RECIPIENT, compression, chunk_size, sealed.to_vec())
    }

    fn new(key_mode: u8, compression: u8, chunk_size: u32, sealed_key: Vec<u8>) -> Result<Self, Error> {
        if !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk_size) {
            return Err(Error::BadHeader(format!(
                "chunk size {chunk_size} outside [{MIN_CHUNK}, {MAX_CHUNK}]"
            )));
        }
        let mut salt = [0u8; 16];
        let mut nonce_prefix = [0u8; 7];
        random_bytes(&mut salt)?;
        random_bytes(&mut nonce_prefix)?;
        Ok(Self { key_mode, compression, chunk_size, salt, nonce_prefix, sealed_key })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(FIXED_HEADER_LEN + self.sealed_key.len());
        b.extend_from_slice(MAGIC);
        b.push(VERSION);
        b.push(self.key_mode);
        b.push(self.compression);
        b.push(0);
        b.extend_from_slice(&self.chunk_size.to_be_bytes());
        b.extend_from_slice(&self.salt);
        b.extend_from_slice(&self.nonce_prefix);
        b.extend_from_slice(&(self.sealed_key.len() as u16).to_be_bytes());
        b.extend_from_slice(&self.sealed_key);
        b
    }

    /// Reads and validates a header, returning it with its exact bytes.
    pub fn read_from<R: Read>(r: &mut R) -> Result<(Self, Vec<u8>), io::Error> {
        let mut fixed = [0u8; FIXED_HEADER_LEN];
        let n = read_up_to(r, &mut fixed)?;
        if n < 4 || &fixed[..4] != MAGIC {
            return Err(Error::BadHeader("missing BKPY magic".into()).into());
        }
        if n < FIXED_HEADER_LEN {
            return Err(Error::Truncated(format!("header cut short after {n} bytes")).into());
        }
        let bad = |m: String| -> io::Error { Error::BadHeader(m).into() };
        if fixed[4] != VERSION {
            return Err(bad(format!("unsupported format version {}", fixed[4])));
        }
        let key_mode = fixed[5];
        if key_mode > KEY_MODE_RECIPIENT {
            return Err(bad(format!("unknown key mode {key_mode}")));
        }
        let compression = fixed[6];
        if compression > 2 {
            return Err(bad(format!("unknown compression code {compression}")));
        }
        if fixed[7] != 0 {
            return Err(bad(format!("reserved byte is {} (must be 0)", fixed[7])));
        }
        let chunk_size = u32::from_be_bytes([fixed[8], fixed[9], fixed[10], fixed[11]]);
        if !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk_size) {
            return Err(bad(format!("chunk size {chunk_size} outside [{MIN_CHUNK}, {MAX_CHUNK}]")));
        }
        let mut salt = [0u8; 16];
        salt.copy_from_slice(&fixed[12..28]);
        let mut nonce_prefix = [0u8; 7];
        nonce_prefix.copy_from_slice(&fixed[28..35]);
        let k = u16::from_be_bytes([fixed[35], fixed[36]]) as usize;
        let expected_k = if key_mode == KEY_MODE_RAW { 0 } else { SEALED_BLOCK_LEN };
        if k != expected_k {
            return Err(bad(format!(
                "sealed key block is {k} bytes, key mode {key_mode} requires {expected_k}"
            )));
        }
        let mut sealed_key = vec![0u8; k];
        if read_up_to(r, &mut sealed_key)? < k {
            return Err(Error::Truncated("header cut short in the sealed key block".into()).into());
        }
        let mut bytes = fixed.to_vec();
        bytes.extend_from_slice(&sealed_key);
        Ok((Self { key_mode, compression, chunk_size, salt, nonce_prefix, sealed_key }, bytes))
    }
}

/// Per-object AEAD state shared by writer and reader.
struct ChunkCipher {
    cipher: Aes256Gcm,
    nonce_prefix: [u8; 7],
    aad: [u8; 32],
}

impl ChunkCipher {
    fn new(key: &DataKey, header: &Header, header_bytes: &[u8]) -> Self {
        let hk = Hkdf::<Sha256>::new(Some(&header.salt), key.as_bytes());
        let mut chunk_key = zeroize::Zeroizing::new([0u8; 32]);
        // A constant 32-byte output, which HKDF-SHA256 always accepts.
        #[allow(clippy::expect_used)]
        hk.expand(HKDF_INFO, chunk_key.as_mut()).expect("32 bytes is a valid HKDF-SHA256 output length");
        let aad: [u8; 32] = Sha256::digest(header_bytes).into();
        Self { cipher: Aes256Gcm::new((&*chunk_key).into()), nonce_prefix: header.nonce_prefix, aad }
    }

    fn nonce(&self, index: u32, last: bool) -> Nonce<aes_gcm::aead::consts::U12> {
        let mut n = [0u8; 12];
        n[..7].copy_from_slice(&self.nonce_prefix);
        n[7..11].copy_from_slice(&index.to_be_bytes());
        n[11] = last as u8;
        Nonce::from(n)
    }

    fn seal(&self, index: u32, last: bool, buf: &mut [u8]) -> io::Result<Tag> {
        self.cipher
            .encrypt_inout_detached(&self.nonce(index, last), &self.aad, buf.into())
            .map_err(|_| io::Error::other("AES-GCM encryption failed"))
    }

    /// Decrypts in place; `buf` holds ciphertext followed by its tag.
    fn open(&self, index: u32, last: bool, buf: &mut Vec<u8>) -> bool {
        // Bytes from the store: a chunk too short to hold a tag does not authenticate.
        let Some(ct_len) = buf.len().checked_sub(TAG_LEN) else { return false };
        let Some(tag) = buf.get(ct_len..).and_then(|t| Tag::try_from(t).ok()) else { return false };
        let (ct, _) = buf.split_at_mut(ct_len);
        let ok =
            self.cipher.decrypt_inout_detached(&self.nonce(index, last), &self.aad, ct.into(), &tag).is_ok();
        if ok {
            buf.truncate(ct_len);
        }
        ok
    }
}

pub struct Writer<W: Write> {
    inner: W,
    cipher: ChunkCipher,
    chunk_size: usize,
    buf: Vec<u8>,
    index: u32,
}

impl<W: Write> Writer<W> {
    /// Writes the header at once; chunks follow as data arrives.
    pub fn new(mut inner: W, key: &DataKey, header: Header) -> io::Result<Self> {
        let bytes = header.to_bytes();
        inner.write_all(&bytes)?;
        let chunk_size = header.chunk_size as usize;
        Ok(Self {
            inner,
            cipher: ChunkCipher::new(key, &header, &bytes),
            chunk_size,
            buf: Vec::with_capacity(chunk_size + TAG_LEN),
            index: 0,
        })
    }

    fn emit(&mut self, last: bool) -> io::Result<()> {
        let tag = self.cipher.seal(self.index, last, &mut self.buf)?;
        self.inner.write_all(&self.buf)?;
        self.inner.write_all(&tag)?;
        self.buf.clear();
        self.index =
            self.index.checked_add(1).ok_or_else(|| Error::TooLarge("more than 2^32 chunks".into()))?;
        Ok(())
    }

    /// Seals the held-back chunk as the final one and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.emit(true)?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for Writer<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        // A full chunk is only sealed once more data proves it is not the final one.
        if self.buf.len() == self.chunk_size {
            self.emit(false)?;
        }
        let take = (self.chunk_size - self.buf.len()).min(data.len());
        self.buf.extend_from_slice(data.get(..take).unwrap_or(data));
        Ok(take)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

pub struct Reader<R: Read> {
    inner: R,
    cipher: ChunkCipher,
    chunk_size: usize,
    buf: Vec<u8>,
    pos: usize,
    index: u32,
    lookahead: Option<u8>,
    done: bool,
}

impl<R: Read> Reader<R> {
    /// Reads and validates the header and unseals the data key when needed.
    pub fn new(mut inner: R, key: &KeySource) -> io::Result<Self> {
        let (header, bytes) = Header::read_from(&mut inner)?;
        let data_key = match (key, header.key_mode) {
            (KeySource::Raw(k), KEY_MODE_RAW) => k.clone(),
            (KeySource::Identity(id), KEY_MODE_RECIPIENT) => id.open(&header.sealed_key)?,
            (KeySource::Raw(_), _) => {
                return Err(Error::KeyMismatch(
                    "this backup is sealed to a recipient key; use --identity with the private key".into(),
                )
                .into());
            }
            (KeySource::Identity(_), _) => {
                return Err(Error::KeyMismatch(
                    "this backup uses a raw data key, not a recipient key; use --key-file or --token".into(),
                )
                .into());
            }
        };
        let chunk_size = header.chunk_size as usize;
        Ok(Self {
            inner,
            cipher: ChunkCipher::new(&data_key, &header, &bytes),
            chunk_size,
            buf: Vec::with_capacity(chunk_size + TAG_LEN),
            pos: 0,
            index: 0,
            lookahead: None,
            done: false,
        })
    }

    fn next_chunk(&mut self) -> io::Result<()> {
        let want = self.chunk_size + TAG_LEN;
        self.buf.clear();
        if let Some(b) = self.lookahead.take() {
            self.buf.push(b);
        }
        let have = self.buf.len();
        self.buf.resize(want, 0);
        let n = have + read_up_to(&mut self.inner, self.buf.get_mut(have..).unwrap_or_default())?;
        self.buf.truncate(n);
        let at_end = if n < want {
            true
        } else {
            let mut one = [0u8; 1];
            let more = read_up_to(&mut self.inner, &mut one)? == 1;
            if more {
                self.lookahead = Some(one[0]);
            }
            !more
        };
        let index = self.index;
        if n == 0 {
            return Err(Error::Truncated(format!(
                "the stream ends after {index} chunk(s) without a final chunk"
            ))
            .into());
        }
        if n < TAG_LEN {
            return Err(Error::Truncated(format!("chunk {index} is cut short")).into());
        }
        if at_end && n == TAG_LEN && index > 0 {
            return Err(Error::BadHeader(format!("empty final chunk {index} after other chunks")).into());
        }
        if self.cipher.open(index, at_end, &mut self.buf) {
            self.done = at_end;
            self.index =
                index.checked_add(1).ok_or_else(|| Error::TooLarge("more than 2^32 chunks".into()))?;
            self.pos = 0;
            return Ok(());
        }
        // The tag failed; try the other flag only to name the failure precisely. aes-gcm
        // checks the tag before decrypting, so `buf` still holds the ciphertext.
        let other = self.cipher.open(index, !at_end, &mut self.buf);
        Err(match (other, at_end) {
            (true, true) => {
                Error::Truncated(format!("the stream ends after chunk {index}, which is not the final chunk"))
            }
            (true, false) => Error::TrailingData(format!("bytes follow the final chunk {index}")),
            (false, _) if index == 0 => Error::WrongKey,
            (false, _) => Error::Tampered { chunk: index as u64 },
        }
        .into())
    }
}

impl<R: Read> Read for Reader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            if self.done || out.is_empty() {
                return Ok(0);
            }
            self.next_chunk()?;
        }
        // `pos` never passes the chunk's end (it is reset with each chunk).
        let mut rest = self.buf.get(self.pos..).unwrap_or_default();
        let n = Read::read(&mut rest, out)?;
        self.pos += n;
        Ok(n)
    }
}
