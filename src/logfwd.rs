//! Log levels that change at run time, and the LogEvent stream of connected mode.
//!
//! The process logger (cli::init_logging) asks [`enabled`] for every record, so
//! `AdvancedSettings.log_level` can raise or lower the level while the agent runs. In
//! connected mode it also hands every record at or above the forwarding level (WARN unless
//! the config says otherwise) to [`capture`], which queues it, already redacted, on a
//! bounded channel without blocking; the `log-forward` thread turns queued records into
//! `LogEvent`s for the outbox, at most [`RATE_PER_SEC`] a second with a burst of
//! [`BURST`], and reports how many it dropped. The job id of a record is the one its thread
//! set with [`set_job`] (run workers do).

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use log::{Level, LevelFilter};

use crate::clock::now_ms;
use crate::wire::pb;

pub const RATE_PER_SEC: f64 = 20.0;
pub const BURST: f64 = 100.0;
const QUEUE: usize = 1024;

/// The level records must reach to be logged at all (stderr), as a `LevelFilter` number.
static LOCAL_LEVEL: AtomicUsize = AtomicUsize::new(LevelFilter::Info as usize);
/// The level records must reach to become LogEvents; 0 = forwarding off.
static FORWARD_LEVEL: AtomicUsize = AtomicUsize::new(0);
static SINK: OnceLock<Sender<Captured>> = OnceLock::new();
/// Records lost because the capture queue was full; reported by the forwarder.
static OVERFLOW: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static JOB: RefCell<Option<String>> = const { RefCell::new(None) };
}

#[derive(Debug)]
pub struct Captured {
    pub ts_ms: u64,
    pub level: Level,
    pub module: String,
    pub job_id: String,
    pub message: String,
}

fn filter_from(n: usize) -> LevelFilter {
    match n {
        0 => LevelFilter::Off,
        1 => LevelFilter::Error,
        2 => LevelFilter::Warn,
        3 => LevelFilter::Info,
        4 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    }
}

/// Parses "trace" … "error" (any case; "warning" too); `None` for anything else.
pub fn parse_level(s: &str) -> Option<LevelFilter> {
    match s.trim().to_ascii_lowercase().as_str() {
        "trace" => Some(LevelFilter::Trace),
        "debug" => Some(LevelFilter::Debug),
        "info" => Some(LevelFilter::Info),
        "warn" | "warning" => Some(LevelFilter::Warn),
        "error" => Some(LevelFilter::Error),
        "off" => Some(LevelFilter::Off),
        _ => None,
    }
}

fn publish_max() {
    let local = filter_from(LOCAL_LEVEL.load(Ordering::Relaxed));
    let fwd = filter_from(FORWARD_LEVEL.load(Ordering::Relaxed));
    log::set_max_level(local.max(fwd));
}

/// Sets the stderr level (at start from `BACKUPY_LOG_LEVEL`, later from the config).
pub fn set_local_level(level: LevelFilter) {
    LOCAL_LEVEL.store(level as usize, Ordering::Relaxed);
    publish_max();
}

pub fn local_level() -> LevelFilter {
    filter_from(LOCAL_LEVEL.load(Ordering::Relaxed))
}

/// Sets the LogEvent level; `Off` stops forwarding.
pub fn set_forward_level(level: LevelFilter) {
    FORWARD_LEVEL.store(level as usize, Ordering::Relaxed);
    publish_max();
}

/// Whether a record at `level` goes anywhere: to stderr or to the control plane.
pub fn enabled(level: Level) -> bool {
    level <= filter_from(LOCAL_LEVEL.load(Ordering::Relaxed)) || forwarded(level)
}

pub fn enabled_locally(level: Level) -> bool {
    level <= filter_from(LOCAL_LEVEL.load(Ordering::Relaxed))
}

/// Whether a record at `level` becomes a LogEvent.
pub fn forwarded(level: Level) -> bool {
    SINK.get().is_some() && level <= filter_from(FORWARD_LEVEL.load(Ordering::Relaxed))
}

/// The job this thread works for, attached to its LogEvents.
pub fn set_job(job: Option<&str>) {
    JOB.with(|j| *j.borrow_mut() = job.map(String::from));
}

/// Called by the logger for every record; `message` is already redacted.
pub fn capture(level: Level, module: &str, message: &str) {
    if !forwarded(level) {
        return;
    }
    let Some(sink) = SINK.get() else { return };
    let job_id = JOB.with(|j| j.borrow().clone()).unwrap_or_default();
    let sent = sink.try_send(Captured {
        ts_ms: now_ms(),
        level,
        module: module.to_string(),
        job_id,
        message: message.to_string(),
    });
    if sent.is_err() {
        OVERFLOW.fetch_add(1, Ordering::Relaxed);
    }
}

/// Installs the capture channel (once per process) and returns its receiving end, or
/// `None` when it was installed already.
pub fn install() -> Option<Receiver<Captured>> {
    let (tx, rx) = crossbeam_channel::bounded(QUEUE);
    SINK.set(tx).ok()?;
    if FORWARD_LEVEL.load(Ordering::Relaxed) == 0 {
        set_forward_level(LevelFilter::Warn);
    }
    Some(rx)
}

pub fn wire_level(level: Level) -> pb::LogLevel {
    match level {
        Level::Trace => pb::LogLevel::Trace,
        Level::Debug => pb::LogLevel::Debug,
        Level::Info => pb::LogLevel::Info,
        Level::Warn => pb::LogLevel::Warn,
        Level::Error => pb::LogLevel::Error,
    }
}

/// A token bucket: `RATE_PER_SEC` LogEvents a second, bursts of `BURST`.
pub struct RateLimit {
    tokens: f64,
    last: Instant,
    rate: f64,
    burst: f64,
}

impl RateLimit {
    pub fn new(rate: f64, burst: f64) -> Self {
        Self { tokens: burst, last: Instant::now(), rate, burst }
    }

    pub fn allow(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Turns captured records into LogEvents until the channel closes; `push` stores one in
/// the outbox. Dropped records are counted and reported in the next LogEvent that passes.
pub fn forward(records: Receiver<Captured>, mut push: impl FnMut(pb::LogEvent)) {
    let mut limit = RateLimit::new(RATE_PER_SEC, BURST);
    let mut dropped = 0u64;
    for r in records {
        if !limit.allow(Instant::now()) {
            dropped += 1;
            continue;
        }
        dropped += OVERFLOW.swap(0, Ordering::Relaxed) as u64;
        let mut fields = BTreeMap::new();
        fields.insert("module".to_string(), r.module);
        if dropped > 0 {
            fields.insert("dropped_before".to_string(), dropped.to_string());
            dropped = 0;
        }
        push(pb::LogEvent {
            ts_ms: r.ts_ms,
            level: wire_level(r.level) as i32,
            job_id: r.job_id,
            message: r.message,
            fields: fields.into_iter().collect(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut l = RateLimit::new(20.0, 100.0);
        l.last = t0;
        let burst = (0..150).filter(|_| l.allow(t0)).count();
        assert_eq!(burst, 100);
        let later = t0 + Duration::from_secs(1);
        let more = (0..100).filter(|_| l.allow(later)).count();
        assert_eq!(more, 20);
    }

    #[test]
    fn levels_parse_in_any_case() {
        assert_eq!(parse_level("WARN"), Some(LevelFilter::Warn));
        assert_eq!(parse_level("warning"), Some(LevelFilter::Warn));
        assert_eq!(parse_level(" debug "), Some(LevelFilter::Debug));
        assert_eq!(parse_level("loud"), None);
    }
}
