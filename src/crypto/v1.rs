//! Format v1: 1 MiB frames `u32 L ‖ nonce(12) ‖ AES-256-GCM(ct ‖ tag)`, end marker `L = 0`.
//!
//! Kept for objects made for today's control plane. It cannot detect dropped, duplicated
//! or reordered frames; only a known SHA-256 of the whole object catches those.

use std::io::{self, Read, Write};

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};

use super::{DataKey, Error, random_bytes, read_up_to};

/// Plaintext bytes per frame written by this implementation.
pub const FRAME_PLAINTEXT: usize = 1 << 20;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const MIN_L: usize = NONCE_LEN + TAG_LEN;
const MAX_L: usize = NONCE_LEN + FRAME_PLAINTEXT + TAG_LEN;

pub struct Writer<W: Write> {
    inner: W,
    cipher: Aes256Gcm,
    buf: Vec<u8>,
}

impl<W: Write> Writer<W> {
    pub fn new(inner: W, key: &DataKey) -> Self {
        Self {
            inner,
            cipher: Aes256Gcm::new(key.as_bytes().into()),
            buf: Vec::with_capacity(FRAME_PLAINTEXT + TAG_LEN),
        }
    }

    fn emit_frame(&mut self) -> io::Result<()> {
        let mut nonce = [0u8; NONCE_LEN];
        random_bytes(&mut nonce)?;
        let tag = self
            .cipher
            .encrypt_inout_detached(&Nonce::from(nonce), b"", self.buf.as_mut_slice().into())
            .map_err(|_| io::Error::other("AES-GCM encryption failed"))?;
        let l = (NONCE_LEN + self.buf.len() + TAG_LEN) as u32;
        self.inner.write_all(&l.to_be_bytes())?;
        self.inner.write_all(&nonce)?;
        self.inner.write_all(&self.buf)?;
        self.inner.write_all(&tag)?;
        self.buf.clear();
        Ok(())
    }

    /// Writes the last partial frame and the end marker.
    pub fn finish(mut self) -> io::Result<W> {
        if !self.buf.is_empty() {
            self.emit_frame()?;
        }
        self.inner.write_all(&0u32.to_be_bytes())?;
        Ok(self.inner)
    }
}

impl<W: Write> Write for Writer<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let take = (FRAME_PLAINTEXT - self.buf.len()).min(data.len());
        self.buf.extend_from_slice(data.get(..take).unwrap_or(data));
        if self.buf.len() == FRAME_PLAINTEXT {
            self.emit_frame()?;
        }
        Ok(take)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

pub struct Reader<R: Read> {
    inner: R,
    cipher: Aes256Gcm,
    frame: Vec<u8>,
    pos: usize,
    index: u64,
    done: bool,
}

impl<R: Read> Reader<R> {
    pub fn new(inner: R, key: &DataKey) -> Self {
        Self {
            inner,
            cipher: Aes256Gcm::new(key.as_bytes().into()),
            frame: Vec::new(),
            pos: 0,
            index: 0,
            done: false,
        }
    }

    /// Reads and authenticates the next frame; returns false at the end marker.
    fn next_frame(&mut self) -> io::Result<bool> {
        let mut len = [0u8; 4];
        let n = read_up_to(&mut self.inner, &mut len)?;
        if n == 0 {
            return Err(Error::Truncated(format!(
                "format v1 object ends after {} frame(s) without its end marker",
                self.index
            ))
            .into());
        }
        if n < 4 {
            return Err(Error::Truncated(format!("frame {} length cut short", self.index)).into());
        }
        let l = u32::from_be_bytes(len) as usize;
        if l == 0 {
            let mut extra = [0u8; 1];
            if read_up_to(&mut self.inner, &mut extra)? != 0 {
                return Err(Error::TrailingData("bytes follow the v1 end marker".into()).into());
            }
            return Ok(false);
        }
        if !(MIN_L..=MAX_L).contains(&l) {
            return Err(Error::BadHeader(format!(
                "format v1 frame {} has length {l}, outside [{MIN_L}, {MAX_L}]",
                self.index
            ))
            .into());
        }
        let mut nonce = [0u8; NONCE_LEN];
        if read_up_to(&mut self.inner, &mut nonce)? < NONCE_LEN {
            return Err(Error::Truncated(format!("frame {} cut short", self.index)).into());
        }
        let body = l - NONCE_LEN;
        self.frame.resize(body, 0);
        if read_up_to(&mut self.inner, &mut self.frame)? < body {
            return Err(Error::Truncated(format!("frame {} cut short", self.index)).into());
        }
        let short = || Error::Truncated(format!("frame {} is shorter than its tag", self.index));
        let ct_len = body.checked_sub(TAG_LEN).ok_or_else(short)?;
        let tag = self.frame.get(ct_len..).and_then(|t| Tag::try_from(t).ok()).ok_or_else(short)?;
        self.frame.truncate(ct_len);
        self.cipher
            .decrypt_inout_detached(&Nonce::from(nonce), b"", self.frame.as_mut_slice().into(), &tag)
            .map_err(
                |_| {
                    if self.index == 0 { Error::WrongKey } else { Error::Tampered { chunk: self.index } }
                },
            )?;
        self.index += 1;
        self.pos = 0;
        Ok(true)
    }
}

impl<R: Read> Read for Reader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.frame.len() {
            if self.done || out.is_empty() {
                return Ok(0);
            }
            if !self.next_frame()? {
                self.done = true;
                self.frame.clear();
                self.pos = 0;
                return Ok(0);
            }
        }
        // `pos` never passes the frame's end (it is reset with each frame).
        let mut rest = self.frame.get(self.pos..).unwrap_or_default();
        let n = Read::read(&mut rest, out)?;
        self.pos += n;
        Ok(n)
    }
}
