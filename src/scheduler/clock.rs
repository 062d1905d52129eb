//! Time as the scheduler thread sees it: [`SystemClock`] (the wall clock, UTC) and
//! [`ManualClock`] (tests move it by hand, so no test sleeps through real minutes).
//!
//! The scheduler thread is the one caller of [`Clock::sleep_until`]: it blocks there
//! until its next deadline or until a [`SchedulerCommand`] arrives on its channel, so it
//! never polls. No threads of its own.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};

use super::SchedulerCommand;

pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;

    /// Blocks until `now() >= until` (`None`: no deadline) or until a command arrives on
    /// `wake`, whichever is first. Returns the command, or `None` when the time has come.
    /// It may also return `None` early: the caller looks at the time again and sleeps
    /// on. A channel whose senders are all gone reads as `Shutdown` with no grace.
    fn sleep_until(
        &self,
        until: Option<DateTime<Utc>>,
        wake: &Receiver<SchedulerCommand>,
    ) -> Option<SchedulerCommand>;
}

/// The command a closed command channel stands for.
fn closed() -> SchedulerCommand {
    SchedulerCommand::Shutdown { grace: Duration::ZERO }
}

/// The system's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

/// The longest single wait: a wall clock that is set forward or back (NTP, a suspended
/// VM) is noticed within this time.
const MAX_NAP: Duration = Duration::from_secs(60);

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn sleep_until(
        &self,
        until: Option<DateTime<Utc>>,
        wake: &Receiver<SchedulerCommand>,
    ) -> Option<SchedulerCommand> {
        let nap = match until {
            None => MAX_NAP,
            Some(t) => (t - Utc::now()).to_std().unwrap_or(Duration::ZERO).min(MAX_NAP),
        };
        match wake.recv_timeout(nap) {
            Ok(command) => Some(command),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => Some(closed()),
        }
    }
}

/// A clock that stands still until a test moves it with [`ManualClock::set`] or
/// [`ManualClock::advance`]; moving it wakes every thread sleeping on it.
pub struct ManualClock {
    state: Mutex<ManualState>,
    changed: Condvar,
}

struct ManualState {
    now: DateTime<Utc>,
    next_id: u64,
    sleepers: Vec<SleeperSlot>,
}

struct SleeperSlot {
    id: u64,
    until: Option<DateTime<Utc>>,
    tick: Sender<()>,
}

/// What a thread asleep on a [`ManualClock`] waits for (besides a command).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sleeper {
    Until(DateTime<Utc>),
    Indefinitely,
}

impl ManualClock {
    pub fn new(start: DateTime<Utc>) -> ManualClock {
        ManualClock {
            state: Mutex::new(ManualState { now: start, next_id: 0, sleepers: Vec::new() }),
            changed: Condvar::new(),
        }
    }

    /// Moves the clock to `t` (forward or back) and wakes the sleepers.
    pub fn set(&self, t: DateTime<Utc>) {
        let mut state = self.lock();
        state.now = t;
        for slot in state.sleepers.drain(..) {
            let _ = slot.tick.try_send(());
        }
        self.changed.notify_all();
    }

    pub fn advance(&self, by: Duration) {
        let by = TimeDelta::from_std(by).unwrap_or(TimeDelta::MAX);
        let now = self.now();
        self.set(now.checked_add_signed(by).unwrap_or(DateTime::<Utc>::MAX_UTC));
    }

    /// Waits (up to `timeout` of real time) until a thread is asleep on this clock and
    /// says until when. Once the scheduler's events show it has handled everything a
    /// test caused, this tells the test the scheduler's next deadline. `None`: nobody
    /// went to sleep in time.
    pub fn wait_for_sleeper(&self, timeout: Duration) -> Option<Sleeper> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if let Some(slot) = state.sleepers.first() {
                return Some(slot.until.map_or(Sleeper::Indefinitely, Sleeper::Until));
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            state = self.changed.wait_timeout(state, left).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    fn lock(&self) -> MutexGuard<'_, ManualState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        self.lock().now
    }

    fn sleep_until(
        &self,
        until: Option<DateTime<Utc>>,
        wake: &Receiver<SchedulerCommand>,
    ) -> Option<SchedulerCommand> {
        loop {
            match wake.try_recv() {
                Ok(command) => return Some(command),
                Err(TryRecvError::Disconnected) => return Some(closed()),
                Err(TryRecvError::Empty) => {}
            }
            let (id, tick) = {
                let mut state = self.lock();
                if until.is_some_and(|t| state.now >= t) {
                    return None;
                }
                let (tx, rx) = crossbeam_channel::bounded(1);
                let id = state.next_id;
                state.next_id += 1;
                state.sleepers.push(SleeperSlot { id, until, tick: tx });
                self.changed.notify_all();
                (id, rx)
            };
            crossbeam_channel::select! {
                recv(wake) -> command => {
                    self.lock().sleepers.retain(|slot| slot.id != id);
                    return Some(command.unwrap_or_else(|_| closed()));
                }
                // `set` removed our slot; look at the time again.
                recv(tick) -> _ => {}
            }
        }
    }
}
