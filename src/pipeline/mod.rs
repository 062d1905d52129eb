//! The streaming backup pipeline: dump → compress → encrypt → hash → store.
//!
//! Each stage runs on its own thread (`pipeline-dump`, `-compress`, `-encrypt`, `-hash`,
//! `-store`), joined by bounded crossbeam channels of [`channel::Msg`] buffers, so memory
//! is a fixed number of buffers whatever the dump size. The calling thread is the
//! coordinator: it reads one status message per stage from an unbounded status channel,
//! and on the first real failure (or an external cancel) it cancels every stage and kills
//! the dump's process group, so all stages stop promptly and the error names the stage
//! that failed. The store stage commits the object only after `End` has travelled through
//! every stage, i.e. after the dump's exit status and magic were checked.

pub mod channel;
pub mod compress;
pub mod source;

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use sha2::{Digest, Sha256};

use crate::cancel::Cancel;
use crate::crypto::PreparedEncryption;
use crate::storage::{ObjectWriter, StoredObject};
use channel::{ChannelWriter, Msg, recv};
pub use compress::Compression;
pub use source::Source;

/// Bytes per buffer passed between stages.
pub const DEFAULT_BUFFER_SIZE: usize = 1 << 20;
/// Buffers each channel may hold.
pub const DEFAULT_CHANNEL_DEPTH: usize = 4;

/// Live byte counters for progress displays; written by the stages, read by anyone.
#[derive(Default)]
pub struct Progress {
    pub dump_bytes: AtomicU64,
    pub stored_bytes: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Dump,
    Compress,
    Encrypt,
    Hash,
    Store,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Dump => "dump",
            Stage::Compress => "compress",
            Stage::Encrypt => "encrypt",
            Stage::Hash => "hash",
            Stage::Store => "store",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("{} stage failed: {source}", stage.name())]
    Stage { stage: Stage, source: io::Error },
    #[error("cancelled")]
    Cancelled,
}

impl PipelineError {
    pub fn stage(&self) -> Option<Stage> {
        match self {
            PipelineError::Stage { stage, .. } => Some(*stage),
            PipelineError::Cancelled => None,
        }
    }
}

pub struct Options {
    pub compression: Compression,
    pub encryption: PreparedEncryption,
    pub buffer_size: usize,
    pub channel_depth: usize,
}

impl Options {
    pub fn new(compression: Compression, encryption: PreparedEncryption) -> Self {
        Self {
            compression,
            encryption,
            buffer_size: DEFAULT_BUFFER_SIZE,
            channel_depth: DEFAULT_CHANNEL_DEPTH,
        }
    }
}

#[derive(Debug)]
pub struct Output {
    /// Bytes produced by the dump, before compression.
    pub dump_bytes: u64,
    /// Bytes stored (after compression and encryption).
    pub stored_bytes: u64,
    /// Lower-case hex SHA-256 of the stored bytes.
    pub sha256: String,
    pub object: StoredObject,
}

enum Outcome {
    Ok,
    /// Stopped because a neighbour stopped or the run was cancelled.
    Peer,
    Failed,
}

/// Runs one backup stream to completion. On error nothing is committed: the object
/// writer is dropped, which removes whatever it had written.
pub fn run(
    source: Source,
    opts: Options,
    sink: Box<dyn ObjectWriter>,
    cancel: &Cancel,
    progress: Arc<Progress>,
) -> Result<Output, PipelineError> {
    let inner = Cancel::default();
    let abort = source.abort_handle();
    let (status_tx, status_rx) = crossbeam_channel::unbounded::<(Stage, Outcome)>();
    let depth = opts.channel_depth.max(1);
    let bs = opts.buffer_size.max(4096);
    let (dump_tx, dump_rx) = channel::bounded(depth);
    let (comp_tx, comp_rx) = channel::bounded(depth);
    let (enc_tx, enc_rx) = channel::bounded(depth);
    let (hash_tx, hash_rx) = channel::bounded(depth);

    let spawn = |stage: Stage, f: Box<dyn FnOnce() -> io::Result<StageValue> + Send>| {
        let status_tx = status_tx.clone();
        thread::Builder::new().name(format!("pipeline-{}", stage.name())).spawn(move || {
            let r = f();
            let outcome = match &r {
                Ok(_) => Outcome::Ok,
                Err(e) if channel::is_peer_stopped(e) => Outcome::Peer,
                Err(_) => Outcome::Failed,
            };
            let _ = status_tx.send((stage, outcome));
            r
        })
    };

    let c = inner.clone();
    let p = progress.clone();
    let handles = [
        (
            Stage::Dump,
            spawn(Stage::Dump, Box::new(move || dump_stage(source, ChannelWriter::new(dump_tx, bs, c), p))),
        ),
        (Stage::Compress, {
            let c = inner.clone();
            let compression = opts.compression;
            spawn(
                Stage::Compress,
                Box::new(move || {
                    let w = compression.writer(ChannelWriter::new(comp_tx, bs, c.clone()))?;
                    transform_stage(&dump_rx, &c, w, |w| w.finish())
                }),
            )
        }),
        (Stage::Encrypt, {
            let c = inner.clone();
            let enc = opts.encryption;
            spawn(
                Stage::Encrypt,
                Box::new(move || {
                    let w = enc.writer(ChannelWriter::new(enc_tx, bs, c.clone()))?;
                    transform_stage(&comp_rx, &c, w, |w| w.finish())
                }),
            )
        }),
        (Stage::Hash, {
            let c = inner.clone();
            spawn(Stage::Hash, Box::new(move || hash_stage(&enc_rx, hash_tx, &c)))
        }),
        (Stage::Store, {
            let c = inner.clone();
            let p = progress.clone();
            spawn(Stage::Store, Box::new(move || store_stage(&hash_rx, sink, &c, p)))
        }),
    ];
    drop(status_tx);

    // The first event decides the error: a stage's own failure, or an external cancel.
    // Everything the abort then provokes in other stages is a consequence.
    let mut cause: Option<Option<Stage>> = None;
    let mut pending = handles.len();
    while pending > 0 {
        match status_rx.recv_timeout(Duration::from_millis(50)) {
            Ok((stage, outcome)) => {
                pending -= 1;
                if matches!(outcome, Outcome::Failed) && cause.is_none() {
                    cause = Some(Some(stage));
                    inner.cancel();
                    abort.kill();
                }
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
        }
        if cancel.is_cancelled() && cause.is_none() {
            cause = Some(None);
            inner.cancel();
            abort.kill();
        }
    }

    let mut results = Vec::new();
    for (stage, h) in handles {
        let r = match h {
            Ok(h) => h.join().unwrap_or_else(|_| Err(io::Error::other("stage thread panicked"))),
            Err(e) => Err(io::Error::other(format!("cannot start stage thread: {e}"))),
        };
        results.push((stage, r));
    }
    let mut out =
        Output { dump_bytes: 0, stored_bytes: 0, sha256: String::new(), object: StoredObject::default() };
    let mut errors = Vec::new();
    for (stage, r) in results {
        match r {
            Ok(StageValue::Dumped(n)) => out.dump_bytes = n,
            Ok(StageValue::Hashed { bytes, sha256 }) => {
                out.stored_bytes = bytes;
                out.sha256 = sha256;
            }
            Ok(StageValue::Stored(o)) => out.object = o,
            Ok(StageValue::Done) => {}
            Err(e) => errors.push((stage, e)),
        }
    }
    if errors.is_empty() {
        // Every stage finished, the object is committed: a cancel that arrived after
        // that is too late to undo a complete backup.
        return Ok(out);
    }
    match cause {
        Some(None) => return Err(PipelineError::Cancelled),
        Some(Some(stage)) => {
            if let Some(pos) = errors.iter().position(|(s, _)| *s == stage) {
                let (stage, source) = errors.swap_remove(pos);
                return Err(PipelineError::Stage { stage, source });
            }
        }
        None => {}
    }
    // No recorded cause (e.g. a stage thread could not start): prefer a real error over
    // a neighbour's "stopped".
    errors.sort_by_key(|(_, e)| channel::is_peer_stopped(e));
    let (stage, source) = errors.swap_remove(0);
    Err(PipelineError::Stage { stage, source })
}

enum StageValue {
    Dumped(u64),
    Hashed { bytes: u64, sha256: String },
    Stored(StoredObject),
    Done,
}

fn dump_stage(mut source: Source, mut out: ChannelWriter, progress: Arc<Progress>) -> io::Result<StageValue> {
    let name = source.name.clone();
    let mut buf = vec![0u8; 256 << 10];
    let mut head: Vec<u8> = Vec::new();
    let head_len = source.magic.as_ref().map_or(0, |(n, _)| *n);
    let mut total = 0u64;
    loop {
        let n = match source.reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(io::Error::new(e.kind(), format!("reading from {name}: {e}")));
            }
        };
        if head.len() < head_len {
            let take = (head_len - head.len()).min(n);
            head.extend_from_slice(&buf[..take]);
        }
        out.write_all(&buf[..n])?;
        total += n as u64;
        progress.dump_bytes.store(total, Ordering::Relaxed);
    }
    // Only a dump whose producer exited cleanly and whose head is right may reach `End`.
    if let Some(child) = source.child.take() {
        child.finish(&name)?;
    }
    if let Some(remote) = source.remote.take() {
        (remote.finish)()?;
    }
    if let Some((_, check)) = &source.magic {
        check(&head).map_err(|why| io::Error::other(format!("{name} output is not a valid dump: {why}")))?;
    }
    out.finish()?;
    Ok(StageValue::Dumped(total))
}

fn transform_stage<W: Write>(
    rx: &Receiver<Msg>,
    cancel: &Cancel,
    mut w: W,
    finish: impl FnOnce(W) -> io::Result<ChannelWriter>,
) -> io::Result<StageValue> {
    while let Some(d) = recv(rx, cancel)? {
        w.write_all(&d)?;
    }
    finish(w)?.finish()?;
    Ok(StageValue::Done)
}

fn hash_stage(rx: &Receiver<Msg>, tx: Sender<Msg>, cancel: &Cancel) -> io::Result<StageValue> {
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    while let Some(d) = recv(rx, cancel)? {
        hasher.update(&d);
        bytes += d.len() as u64;
        tx.send(Msg::Data(d)).map_err(|_| channel::peer_stopped())?;
    }
    tx.send(Msg::End).map_err(|_| channel::peer_stopped())?;
    Ok(StageValue::Hashed { bytes, sha256: hex::encode(hasher.finalize()) })
}

fn store_stage(
    rx: &Receiver<Msg>,
    mut sink: Box<dyn ObjectWriter>,
    cancel: &Cancel,
    progress: Arc<Progress>,
) -> io::Result<StageValue> {
    let mut total = 0u64;
    while let Some(d) = recv(rx, cancel)? {
        sink.write_all(&d)?;
        total += d.len() as u64;
        progress.stored_bytes.store(total, Ordering::Relaxed);
    }
    Ok(StageValue::Stored(sink.commit()?))
}
