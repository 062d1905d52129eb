//! The bounded channels that join pipeline stages, and the `Write` end a stage's
//! encoder writes into.
//!
//! Memory is bounded by construction: each channel holds at most `depth` buffers of at
//! most `buffer_size` bytes, and a stage blocks when its downstream is full.

use std::io::{self, Write};

use crossbeam_channel::{Receiver, Sender};

use crate::cancel::Cancel;

pub enum Msg {
    Data(Vec<u8>),
    /// The upstream stage finished successfully. A channel that disconnects without it
    /// means the upstream stage failed, so a half stream is never mistaken for a whole one.
    End,
}

/// Marker error: the stage on the other side of a channel stopped (it failed or was
/// cancelled and reports its own error).
#[derive(Debug, thiserror::Error)]
#[error("a neighbouring stage stopped")]
pub struct PeerStopped;

#[derive(Debug, thiserror::Error)]
#[error("cancelled")]
pub struct Cancelled;

pub fn bounded(depth: usize) -> (Sender<Msg>, Receiver<Msg>) {
    crossbeam_channel::bounded(depth)
}

pub fn peer_stopped() -> io::Error {
    io::Error::other(PeerStopped)
}

pub fn is_peer_stopped(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|i| i.is::<PeerStopped>() || i.is::<Cancelled>())
}

/// Receives the next buffer, or `None` at `End`; a disconnect without `End` is the
/// upstream's failure.
pub fn recv(rx: &Receiver<Msg>, cancel: &Cancel) -> io::Result<Option<Vec<u8>>> {
    if cancel.is_cancelled() {
        return Err(io::Error::other(Cancelled));
    }
    match rx.recv() {
        Ok(Msg::Data(d)) => Ok(Some(d)),
        Ok(Msg::End) => Ok(None),
        Err(_) => Err(peer_stopped()),
    }
}

/// Collects writes into `buffer_size` buffers and sends each downstream when full.
pub struct ChannelWriter {
    tx: Sender<Msg>,
    buf: Vec<u8>,
    buffer_size: usize,
    cancel: Cancel,
}

impl ChannelWriter {
    pub fn new(tx: Sender<Msg>, buffer_size: usize, cancel: Cancel) -> Self {
        Self { tx, buf: Vec::with_capacity(buffer_size), buffer_size, cancel }
    }

    fn send_buf(&mut self) -> io::Result<()> {
        if self.cancel.is_cancelled() {
            return Err(io::Error::other(Cancelled));
        }
        let full = std::mem::replace(&mut self.buf, Vec::with_capacity(self.buffer_size));
        self.tx.send(Msg::Data(full)).map_err(|_| peer_stopped())
    }

    /// Sends what is buffered and the `End` marker.
    pub fn finish(mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.send_buf()?;
        }
        self.tx.send(Msg::End).map_err(|_| peer_stopped())
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let take = (self.buffer_size - self.buf.len()).min(data.len());
        self.buf.extend_from_slice(&data[..take]);
        if self.buf.len() == self.buffer_size {
            self.send_buf()?;
        }
        Ok(take)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
