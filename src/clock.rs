//! The wall clock as Unix time, for timestamps that leave the process or outlive it:
//! wire messages, state rows, presigned-URL expiry, Docker's `since`, metrics. Schedules
//! read `scheduler::clock` instead, which tests can move by hand. Any thread.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Time since the Unix epoch; zero for a clock set before 1970, so a broken clock makes
/// timestamps old rather than failing the caller.
pub fn since_epoch() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    since_epoch().as_millis() as u64
}

/// Whole seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    since_epoch().as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_agree_and_are_after_2020() {
        let ms = now_ms();
        let secs = now_secs();
        assert!(ms > 1_577_836_800_000, "{ms}");
        assert!(secs >= ms / 1000 && secs - ms / 1000 <= 1, "{secs} vs {ms}");
    }
}
