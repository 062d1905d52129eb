//! Compression layer: zstd (one frame, level 3 by default), gzip, or none; and the
//! reader side that recognises the format by its magic.

use std::io::{self, Read, Write};

use crate::crypto::read_up_to;

const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];
const GZIP_MAGIC: [u8; 2] = [0x1F, 0x8B];
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Zstd { level: i32 },
    Gzip,
    None,
}

impl Default for Compression {
    fn default() -> Self {
        Compression::Zstd { level: DEFAULT_ZSTD_LEVEL }
    }
}

impl Compression {
    /// Parses the job's `compression` value; "" means the default (zstd).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "" | "zstd" => Ok(Self::default()),
            "gzip" => Ok(Compression::Gzip),
            "none" => Ok(Compression::None),
            other => Err(format!("unknown compression {other:?} (expected zstd, gzip or none)")),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Compression::Zstd { .. } => "zstd",
            Compression::Gzip => "gzip",
            Compression::None => "none",
        }
    }

    /// The code in a v2 header: 0 none, 1 zstd, 2 gzip.
    pub fn header_code(&self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Zstd { .. } => 1,
            Compression::Gzip => 2,
        }
    }

    pub fn extension(&self) -> Option<&'static str> {
        match self {
            Compression::Zstd { .. } => Some("zst"),
            Compression::Gzip => Some("gz"),
            Compression::None => None,
        }
    }

    pub fn writer<W: Write>(self, inner: W) -> io::Result<CompressWriter<W>> {
        Ok(match self {
            Compression::Zstd { level } => CompressWriter::Zstd(zstd::Encoder::new(inner, level)?),
            Compression::Gzip => {
                CompressWriter::Gzip(flate2::write::GzEncoder::new(inner, flate2::Compression::default()))
            }
            Compression::None => CompressWriter::None(inner),
        })
    }
}

pub enum CompressWriter<W: Write> {
    Zstd(zstd::Encoder<'static, W>),
    Gzip(flate2::write::GzEncoder<W>),
    None(W),
}

impl<W: Write> CompressWriter<W> {
    pub fn finish(self) -> io::Result<W> {
        match self {
            CompressWriter::Zstd(e) => e.finish(),
            CompressWriter::Gzip(e) => e.finish(),
            CompressWriter::None(w) => Ok(w),
        }
    }
}

impl<W: Write> Write for CompressWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            CompressWriter::Zstd(e) => e.write(buf),
            CompressWriter::Gzip(e) => e.write(buf),
            CompressWriter::None(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            CompressWriter::Zstd(e) => e.flush(),
            CompressWriter::Gzip(e) => e.flush(),
            CompressWriter::None(w) => w.flush(),
        }
    }
}

/// Wraps `inner` in the decompressor its first bytes call for (zstd, gzip), or passes
/// it through unchanged. Returns the detected compression name too.
pub fn decompress_by_magic<R: Read + 'static>(mut inner: R) -> io::Result<(&'static str, Box<dyn Read>)> {
    let mut head = [0u8; 4];
    let n = read_up_to(&mut inner, &mut head)?;
    let rest = io::Cursor::new(head[..n].to_vec()).chain(inner);
    if n == 4 && head == ZSTD_MAGIC {
        Ok(("zstd", Box::new(zstd::Decoder::new(rest)?)))
    } else if n >= 2 && head[..2] == GZIP_MAGIC {
        Ok(("gzip", Box::new(flate2::read::MultiGzDecoder::new(rest))))
    } else {
        Ok(("none", Box::new(rest)))
    }
}
