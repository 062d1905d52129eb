//! SIGINT and SIGTERM for the one-shot commands (`backup`, `restore`, `verify`, `list`,
//! `backupy-decrypt`). `run` has its own handling (a graceful shutdown with a grace
//! period, in `standalone` and `connected`).
//!
//! The first signal cancels the command's work through its [`Cancel`]: the pipeline's
//! stages, dump children, container execs and uploads already stop and clean up when it
//! is set, so the command then returns normally and exits 130 (SIGINT) or 143 (SIGTERM),
//! as shells expect. Cleanup is bounded: if the command has not finished
//! [`CLEANUP_BOUND`] after the first signal (a child or a remote server that does not
//! answer), the `last resort` given at install runs and the process exits. A second signal
//! exits at once. Commands with nothing to stop cooperatively (`list`, `verify`,
//! `backupy-decrypt`) exit on the first signal after a quick cleanup of their own.
//!
//! Threads: a `signals` thread waits for the signals and sets the `Cancel`; after the first
//! one, a `signal-watchdog` thread waits on a channel that closes when the command drops
//! its [`Interrupt`] guard, or for the bound.

use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use signal_hook::consts::{SIGINT, SIGTERM};

use crate::cancel::{Cancel, CancelReason};

/// How long cleanup may take after the first signal before the process exits anyway.
pub const CLEANUP_BOUND: Duration = Duration::from_secs(10);

/// The exit status of a command stopped by `signal`: 128 + its number (130, 143).
pub fn exit_status(signal: i32) -> u8 {
    u8::try_from(128 + signal).unwrap_or(1)
}

/// The name of the signals handled here, for messages.
pub fn signal_name(signal: i32) -> &'static str {
    match signal {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

/// What to do when cleanup overruns [`CLEANUP_BOUND`], just before the process exits
/// (e.g. remove a temporary output file).
pub type LastResort = Box<dyn FnOnce() + Send + 'static>;

/// The installed handler. Dropping it stops the signal thread; the command is about to
/// exit by then.
pub struct Interrupt {
    received: Arc<AtomicI32>,
    handle: signal_hook::iterator::Handle,
    /// Dropped with the guard: the watchdog learns that the command finished in time.
    finished: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Interrupt {
    /// For a command whose cleanup is quick and needs no cooperation from the work
    /// (`list` and `verify` have none; `backupy-decrypt` removes its temporary output): the
    /// first signal runs `cleanup` on the signal thread and exits with the signal's
    /// status, without waiting for a read or a write that may block.
    pub fn exit_at_once(what: &str, cleanup: Option<LastResort>) -> Result<Interrupt> {
        Self::start(None, what.to_string(), cleanup)
    }

    /// Installs the handler. `what` names the work in the line printed on the first
    /// signal ("the backup", "the restore").
    pub fn install(cancel: Cancel, what: &str, last_resort: Option<LastResort>) -> Result<Interrupt> {
        Self::start(Some(cancel), what.to_string(), last_resort)
    }

    fn start(cancel: Option<Cancel>, what: String, last_resort: Option<LastResort>) -> Result<Interrupt> {
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
            .context("cannot install the SIGINT/SIGTERM handlers")?;
        let handle = signals.handle();
        let received = Arc::new(AtomicI32::new(0));
        let (finished, finished_rx) = crossbeam_channel::bounded::<()>(0);
        let seen = received.clone();
        let thread = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut last_resort = last_resort;
                for signal in signals.forever() {
                    if seen.compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst).is_err() {
                        log::warn!("{}: exiting at once", signal_name(signal));
                        std::process::exit(i32::from(exit_status(signal)));
                    }
                    let Some(cancel) = &cancel else {
                        let cleaned = match last_resort.take() {
                            Some(cleanup) => {
                                cleanup();
                                "cleaned up"
                            }
                            None => "nothing to clean up",
                        };
                        log::warn!("{}: stopped {what}; {cleaned}", signal_name(signal));
                        std::process::exit(i32::from(exit_status(signal)));
                    };
                    log::warn!(
                        "{}: stopping {what} and cleaning up (at most {} s; a second signal exits at once)",
                        signal_name(signal),
                        CLEANUP_BOUND.as_secs()
                    );
                    cancel.cancel_because(CancelReason::Requested);
                    let watchdog = finished_rx.clone();
                    let resort = last_resort.take();
                    let spawned = std::thread::Builder::new()
                        .name("signal-watchdog".into())
                        .spawn(move || watch(watchdog, signal, resort));
                    if spawned.is_err() {
                        // Without a watchdog the bound cannot be kept: exit now.
                        std::process::exit(i32::from(exit_status(signal)));
                    }
                }
            })
            .context("cannot start the signal thread")?;
        Ok(Interrupt { received, handle, finished: Some(finished), thread: Some(thread) })
    }

    /// The first signal received, if any.
    pub fn signal(&self) -> Option<i32> {
        match self.received.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s),
        }
    }
}

fn watch(finished: Receiver<()>, signal: i32, last_resort: Option<LastResort>) {
    if let Err(RecvTimeoutError::Timeout) = finished.recv_timeout(CLEANUP_BOUND) {
        if let Some(f) = last_resort {
            f();
        }
        log::warn!(
            "{}: cleanup did not finish within {} s; exiting",
            signal_name(signal),
            CLEANUP_BOUND.as_secs()
        );
        std::process::exit(i32::from(exit_status(signal)));
    }
}

impl Drop for Interrupt {
    fn drop(&mut self) {
        self.finished.take();
        self.handle.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_are_what_shells_report() {
        assert_eq!(exit_status(SIGINT), 130);
        assert_eq!(exit_status(SIGTERM), 143);
    }
}
