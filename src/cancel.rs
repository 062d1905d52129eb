//! Cancellation of one run, and why it was cancelled.
//!
//! A [`Cancel`] is shared by everything working on one run: the pipeline's stage threads,
//! the storage writer, hooks, and whoever may stop the run (the scheduler on a timeout or
//! at shutdown, connected mode on a CancelJob, a signal in the CLI). It is a flag, not a
//! channel: the stages poll it between buffers. The first reason set wins, so a run that
//! timed out and was then shut down still reports that it timed out. [`on_cancel`]
//! watches the flag on a thread of its own for work that blocks where nothing polls it
//! (a driver waiting for a server before the pipeline starts).

use std::fmt;
use std::io::{self, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

/// Why a run was stopped from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// Someone asked for it: the control plane's CancelJob, or the CLI.
    Requested,
    /// The job's timeout elapsed.
    TimedOut,
    /// The agent is shutting down and the run's grace period is over.
    Shutdown,
}

impl CancelReason {
    fn code(self) -> u8 {
        match self {
            CancelReason::Requested => 1,
            CancelReason::TimedOut => 2,
            CancelReason::Shutdown => 3,
        }
    }

    fn from_code(code: u8) -> Option<CancelReason> {
        match code {
            1 => Some(CancelReason::Requested),
            2 => Some(CancelReason::TimedOut),
            3 => Some(CancelReason::Shutdown),
            _ => None,
        }
    }
}

impl fmt::Display for CancelReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CancelReason::Requested => "cancelled",
            CancelReason::TimedOut => "timed out",
            CancelReason::Shutdown => "cancelled: the agent shut down during the run",
        })
    }
}

/// A cancellation flag shared by the stages of one run (and whoever may cancel it).
#[derive(Clone, Default)]
pub struct Cancel(Arc<AtomicU8>);

impl Cancel {
    /// Cancels the run as asked for ([`CancelReason::Requested`]).
    pub fn cancel(&self) {
        self.cancel_because(CancelReason::Requested);
    }

    /// Cancels the run; a reason already set is kept.
    pub fn cancel_because(&self, reason: CancelReason) {
        let _ = self.0.compare_exchange(0, reason.code(), Ordering::SeqCst, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst) != 0
    }

    /// Why the run was cancelled, or `None` while it was not.
    pub fn reason(&self) -> Option<CancelReason> {
        CancelReason::from_code(self.0.load(Ordering::SeqCst))
    }
}

/// Calls `stop` once, on a `cancel-watch` thread, as soon as `cancel` is set (checked
/// every 100 ms), for as long as the returned guard lives. For work that blocks where no
/// flag is polled: a socket read is ended by shutting the socket down.
pub fn on_cancel(cancel: &Cancel, stop: impl FnOnce() + Send + 'static) -> std::io::Result<CancelWatch> {
    let (tx, rx) = crossbeam_channel::bounded::<()>(0);
    let cancel = cancel.clone();
    std::thread::Builder::new().name("cancel-watch".into()).spawn(move || {
        loop {
            match rx.recv_timeout(std::time::Duration::from_millis(100)) {
                Err(crossbeam_channel::RecvTimeoutError::Timeout) if cancel.is_cancelled() => {
                    stop();
                    return;
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                // The guard was dropped: the work is over.
                _ => return,
            }
        }
    })?;
    Ok(CancelWatch { _stop: tx })
}

/// Keeps an [`on_cancel`] watch alive; dropping it ends the watch.
pub struct CancelWatch {
    _stop: crossbeam_channel::Sender<()>,
}

/// A reader that fails once its [`Cancel`] is set, so that a copy loop over it stops at
/// the next buffer. The error is not `ErrorKind::Interrupted`, which `io::copy` retries.
pub struct CancellableReader<R> {
    inner: R,
    cancel: Cancel,
}

impl<R> CancellableReader<R> {
    pub fn new(inner: R, cancel: Cancel) -> Self {
        CancellableReader { inner, cancel }
    }
}

impl<R: Read> Read for CancellableReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.cancel.reason() {
            Some(reason) => Err(io::Error::other(reason.to_string())),
            None => self.inner.read(buf),
        }
    }
}

impl fmt::Debug for Cancel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Cancel").field(&self.reason()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_reason_wins_and_clones_share_it() {
        let c = Cancel::default();
        let seen_by_a_stage = c.clone();
        assert!(!seen_by_a_stage.is_cancelled());
        assert_eq!(c.reason(), None);
        c.cancel_because(CancelReason::TimedOut);
        c.cancel_because(CancelReason::Shutdown);
        c.cancel();
        assert!(seen_by_a_stage.is_cancelled());
        assert_eq!(seen_by_a_stage.reason(), Some(CancelReason::TimedOut));
    }

    #[test]
    fn a_cancelled_reader_fails_at_the_next_read() {
        let c = Cancel::default();
        let mut r = CancellableReader::new(&b"abcdef"[..], c.clone());
        let mut buf = [0u8; 3];
        assert_eq!(r.read(&mut buf).unwrap(), 3);
        c.cancel();
        let err = r.read(&mut buf).unwrap_err();
        assert_ne!(err.kind(), io::ErrorKind::Interrupted);
        assert_eq!(err.to_string(), "cancelled");
    }

    #[test]
    fn a_watch_calls_its_stop_once_on_cancel_and_never_after_it_was_dropped() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let c = Cancel::default();
        let tx2 = tx.clone();
        let dropped = on_cancel(&c, move || tx2.send("dropped").unwrap()).unwrap();
        drop(dropped);
        let _kept = on_cancel(&c, move || tx.send("kept").unwrap()).unwrap();
        c.cancel();
        assert_eq!(rx.recv_timeout(std::time::Duration::from_secs(5)), Ok("kept"));
        assert!(rx.recv_timeout(std::time::Duration::from_millis(300)).is_err());
    }
}
