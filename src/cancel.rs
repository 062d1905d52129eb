//! Cancellation of one run, and why it was cancelled.
//!
//! A [`Cancel`] is shared by everything working on one run: the pipeline's stage threads,
//! the storage writer, hooks, and whoever may stop the run (the scheduler on a timeout or
//! at shutdown, connected mode on a CancelJob, a signal in the CLI). It is a flag, not a
//! channel: the stages poll it between buffers. The first reason set wins, so a run that
//! timed out and was then shut down still reports that it timed out.

use std::fmt;
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
}
