//! Exponential backoff and the retry loop built on it, for the requests that give up
//! after a few attempts (S3, notifications) and the loops that never give up and only
//! need the delays (the session's reconnects, Docker's event stream). Scheduled retries
//! of whole runs are the scheduler's (`scheduler::RetryPolicy`), counted in cron time.
//! Runs on the caller's thread: [`run`] sleeps on it between attempts.

use std::time::Duration;

/// The wait before retry `n` (0-based) is `base · 2^n`, at most `cap`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Backoff {
    pub const fn new(base: Duration, cap: Duration) -> Self {
        Self { base, cap }
    }

    /// The wait before retry `n` (0-based). Saturates instead of overflowing, so a
    /// loop that counts on forever stays at `cap`.
    pub fn delay(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }
}

/// Calls `attempt(k)` for k = 1, 2, … up to `attempts` (0 counts as 1) until it
/// succeeds. After failed attempt k, `retry(&error, k + 1, delay)` decides whether to go
/// on (and is the place to log it); then the thread sleeps `backoff.delay(k - 1)`. The
/// last attempt's error, or the one `retry` refused, is returned.
pub fn run<T, E>(
    attempts: u32,
    backoff: Backoff,
    mut attempt: impl FnMut(u32) -> Result<T, E>,
    mut retry: impl FnMut(&E, u32, Duration) -> bool,
) -> Result<T, E> {
    let mut k = 1;
    loop {
        let error = match attempt(k) {
            Ok(value) => return Ok(value),
            Err(e) => e,
        };
        if k >= attempts.max(1) {
            return Err(error);
        }
        let delay = backoff.delay(k - 1);
        if !retry(&error, k + 1, delay) {
            return Err(error);
        }
        std::thread::sleep(delay);
        k += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn delays_double_from_base_up_to_cap_and_saturate() {
        let b = Backoff::new(Duration::from_millis(500), Duration::from_secs(20));
        let ms: Vec<u128> = (0..8).map(|n| b.delay(n).as_millis()).collect();
        assert_eq!(ms, [500, 1000, 2000, 4000, 8000, 16000, 20000, 20000]);
        assert_eq!(b.delay(u32::MAX), b.cap);
        let huge = Backoff::new(Duration::MAX, Duration::MAX);
        assert_eq!(huge.delay(3), Duration::MAX);
    }

    #[test]
    fn runs_until_success_and_reports_each_retry() {
        let mut seen = Vec::new();
        let result = run(
            5,
            Backoff::new(MS, 2 * MS),
            |k| if k < 3 { Err(k) } else { Ok(k * 10) },
            |e, next, delay| {
                seen.push((*e, next, delay));
                true
            },
        );
        assert_eq!(result, Ok(30));
        assert_eq!(seen, [(1, 2, MS), (2, 3, 2 * MS)]);
    }

    #[test]
    fn stops_after_the_last_attempt_or_when_told() {
        let mut calls = 0;
        let r: Result<(), u32> = run(
            3,
            Backoff::new(MS, MS),
            |k| {
                calls += 1;
                Err(k)
            },
            |_, _, _| true,
        );
        assert_eq!((r, calls), (Err(3), 3));

        let mut calls = 0;
        let r: Result<(), &str> = run(
            6,
            Backoff::new(MS, MS),
            |_| {
                calls += 1;
                Err("fatal")
            },
            |_, _, _| false,
        );
        assert_eq!((r, calls), (Err("fatal"), 1), "a refused retry returns at once");

        let mut calls = 0;
        let r: Result<(), ()> = run(
            0,
            Backoff::new(MS, MS),
            |_| {
                calls += 1;
                Err(())
            },
            |_, _, _| panic!("no retry after the only attempt"),
        );
        assert_eq!((r, calls), (Err(()), 1), "0 attempts means one");
    }
}
