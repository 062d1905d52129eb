//! Health probes of `[[health_checks]]`: HTTP/HTTPS GET (status must equal
//! `expected_status`, default any 2xx; redirects not followed; at most a small body read)
//! and TCP connect.
//!
//! One `health` thread keeps each check's next due time (interval plus a little jitter
//! so checks do not align) and hands due probes to a small pool of `health-probe-N`
//! threads over a bounded channel, so one slow target never delays the others. Results
//! go to the metrics (`health_check_up`, `health_check_duration_seconds`), to the probe
//! states ([`snapshot`]: `/readyz`'s body and the webhook payload), and to the log once
//! per change of state (down, up again), never once per failing interval; connected mode
//! also sends them as HealthCheckResult through the outbox.
//!
//! The probe states are one process-wide table behind a mutex: a process runs one set of
//! checks, and the readers (`metrics-http`, a run's notification on its worker) then need
//! no handle threaded to them.

use std::collections::BTreeMap;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::config::HealthCheck;
use crate::metrics::Metrics;

/// Body bytes read from an HTTP probe at most.
const BODY_CAP: u64 = 64 * 1024;
const POOL_SIZE: usize = 4;

#[derive(Debug, Clone, PartialEq)]
pub struct ProbeResult {
    pub check_id: String,
    pub ok: bool,
    pub latency: Duration,
    /// 0 for TCP checks and when no response arrived.
    pub status_code: u32,
    pub error: String,
}

/// The last known state of one check, for `/readyz` and the webhook payload.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProbeState {
    pub id: String,
    /// `up`, `down`, or `unknown` (not probed yet).
    pub state: &'static str,
    /// When the check entered this state, RFC 3339 UTC; empty while `unknown`.
    pub since: String,
    /// Why the last probe failed, while `down`; empty otherwise.
    pub error: String,
}

static STATES: Mutex<BTreeMap<String, ProbeState>> = Mutex::new(BTreeMap::new());

fn states() -> std::sync::MutexGuard<'static, BTreeMap<String, ProbeState>> {
    STATES.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every configured check's state, ordered by id.
pub fn snapshot() -> Vec<ProbeState> {
    states().values().cloned().collect()
}

/// The checks probed from now on: states of checks no longer configured are dropped, new
/// ones start `unknown`, the others keep theirs.
fn track(checks: &[HealthCheck]) {
    let mut table = states();
    table.retain(|id, _| checks.iter().any(|c| &c.id == id));
    for c in checks {
        table.entry(c.id.clone()).or_insert_with(|| ProbeState {
            id: c.id.clone(),
            state: "unknown",
            since: String::new(),
            error: String::new(),
        });
    }
}

/// Records a result; logs only when the check changes state (the first result included).
fn record(r: &ProbeResult) {
    let new_state = if r.ok { "up" } else { "down" };
    let mut table = states();
    let entry = table.entry(r.check_id.clone()).or_insert_with(|| ProbeState {
        id: r.check_id.clone(),
        state: "unknown",
        since: String::new(),
        error: String::new(),
    });
    let error = if r.ok { String::new() } else { r.error.clone() };
    if entry.state == new_state {
        entry.error = error;
        return;
    }
    let since = crate::storage::rfc3339(chrono::Utc::now());
    let was = std::mem::replace(entry, ProbeState { id: r.check_id.clone(), state: new_state, since, error });
    drop(table);
    match (was.state, r.ok) {
        (_, false) => log::warn!("health check {} is down: {}", r.check_id, r.error),
        ("down", true) => log::info!("health check {} is up again (down since {})", r.check_id, was.since),
        (_, true) => log::info!("health check {} is up", r.check_id),
    }
}

/// Probes `check` once, within its timeout. `ca_file` adds trusted roots (BACKUPY_CA_FILE).
pub fn probe(check: &HealthCheck, ca_file: Option<&std::path::Path>) -> ProbeResult {
    let t0 = Instant::now();
    let (ok, status_code, error) = match check.kind.as_str() {
        "tcp" => tcp(&check.target, check.timeout),
        _ => http(check, ca_file),
    };
    ProbeResult { check_id: check.id.clone(), ok, latency: t0.elapsed(), status_code, error }
}

fn tcp(target: &str, timeout: Duration) -> (bool, u32, String) {
    let addrs = match target.to_socket_addrs() {
        Ok(a) => a.collect::<Vec<_>>(),
        Err(e) => return (false, 0, format!("cannot resolve {target}: {e}")),
    };
    let mut last = format!("{target}: no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(_) => return (true, 0, String::new()),
            Err(e) => last = format!("connect {addr}: {e}"),
        }
    }
    (false, 0, last)
}

fn http(check: &HealthCheck, ca_file: Option<&std::path::Path>) -> (bool, u32, String) {
    let mut cfg = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(check.timeout))
        .user_agent(concat!("backupy-agent/", env!("CARGO_PKG_VERSION"), " health-check"));
    if let Some(ca) = ca_file {
        match crate::storage::s3::tls_with_extra_ca(ca) {
            Ok(tls) => cfg = cfg.tls_config(tls),
            Err(e) => return (false, 0, e),
        }
    }
    let agent = cfg.build().new_agent();
    match agent.get(&check.target).call() {
        Ok(mut resp) => {
            let status = resp.status().as_u16() as u32;
            let _ = resp.body_mut().with_config().limit(BODY_CAP).read_to_vec();
            let ok = if check.expected_status == 0 {
                (200..300).contains(&status)
            } else {
                status == check.expected_status
            };
            let error = if ok {
                String::new()
            } else if check.expected_status == 0 {
                format!("HTTP {status}, expected 2xx")
            } else {
                format!("HTTP {status}, expected {}", check.expected_status)
            };
            (ok, status, error)
        }
        Err(e) => (false, 0, crate::secrets::redact_urls(&e.to_string())),
    }
}

/// Runs the checks until `stop` is dropped or sent to; every result is also sent to
/// `results` when given (tests and, later, the outbox).
pub fn start(
    checks: Vec<HealthCheck>,
    metrics: Arc<Metrics>,
    ca_file: Option<PathBuf>,
    results: Option<Sender<ProbeResult>>,
) -> std::io::Result<Sender<()>> {
    track(&checks);
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(1);
    let (job_tx, job_rx) = crossbeam_channel::bounded::<HealthCheck>(POOL_SIZE);
    for n in 0..POOL_SIZE {
        let (rx, metrics, ca, results) = (job_rx.clone(), metrics.clone(), ca_file.clone(), results.clone());
        std::thread::Builder::new().name(format!("health-probe-{n}")).spawn(move || {
            for check in rx {
                let r = probe(&check, ca.as_deref());
                metrics.health_check_up.with_label_values(&[&r.check_id]).set(if r.ok { 1.0 } else { 0.0 });
                metrics
                    .health_check_duration_seconds
                    .with_label_values(&[&r.check_id])
                    .observe(r.latency.as_secs_f64());
                log::debug!("health check {}: ok={} in {:?} {}", r.check_id, r.ok, r.latency, r.error);
                record(&r);
                if let Some(tx) = &results {
                    let _ = tx.send(r);
                }
            }
        })?;
    }
    std::thread::Builder::new().name("health".into()).spawn(move || schedule(checks, &job_tx, &stop_rx))?;
    Ok(stop_tx)
}

fn schedule(checks: Vec<HealthCheck>, jobs: &Sender<HealthCheck>, stop: &Receiver<()>) {
    if checks.is_empty() {
        let _ = stop.recv();
        return;
    }
    let start = Instant::now();
    // Spread the first probes over the first second so checks do not align.
    let mut due: Vec<Instant> =
        (0..checks.len()).map(|i| start + Duration::from_millis((i as u64 * 997) % 1000)).collect();
    loop {
        let (i, next) =
            due.iter().enumerate().min_by_key(|(_, t)| **t).map(|(i, t)| (i, *t)).expect("non-empty");
        match stop.recv_timeout(next.saturating_duration_since(Instant::now())) {
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        // A full pool means every prober is busy: skip this round rather than queue up.
        if jobs.try_send(checks[i].clone()).is_err() {
            log::warn!("health check {}: all probe threads are busy; skipped this round", checks[i].id);
        }
        due[i] = Instant::now() + checks[i].interval + jitter(checks[i].interval);
    }
}

/// Up to 5 % of the interval (at most 3 s), from the clock's nanoseconds.
fn jitter(interval: Duration) -> Duration {
    let max = (interval / 20).min(Duration::from_secs(3));
    let nanos = crate::clock::since_epoch().subsec_nanos();
    if max.is_zero() { Duration::ZERO } else { Duration::from_nanos(nanos as u64 % max.as_nanos() as u64) }
}

/// What connected mode asks of its health thread.
#[derive(Debug)]
pub enum HealthCommand {
    /// Probe these checks from now on, in place of the previous ones.
    Configure(Vec<HealthCheck>),
    /// Probe this check once now (RunHealthCheck).
    ProbeNow(HealthCheck),
}

/// Starts the `health-config` thread, which owns the probe threads of [`start`]: each
/// `Configure` replaces them, each `ProbeNow` probes once on a `health-now` thread. Every
/// result goes to `results`. The thread ends, and its probes stop, when the command
/// channel closes.
pub fn supervise(
    metrics: Arc<Metrics>,
    ca_file: Option<PathBuf>,
    results: Sender<ProbeResult>,
) -> std::io::Result<Sender<HealthCommand>> {
    let (tx, commands) = crossbeam_channel::unbounded::<HealthCommand>();
    std::thread::Builder::new().name("health-config".into()).spawn(move || {
        let mut running: Option<Sender<()>> = None;
        for command in commands {
            match command {
                HealthCommand::Configure(checks) => {
                    running = None; // stops the previous probe threads
                    match start(checks, metrics.clone(), ca_file.clone(), Some(results.clone())) {
                        Ok(stop) => running = Some(stop),
                        Err(e) => log::error!("cannot start the health-probe threads: {e}"),
                    }
                }
                HealthCommand::ProbeNow(check) => {
                    let (tx, ca) = (results.clone(), ca_file.clone());
                    let spawned = std::thread::Builder::new().name("health-now".into()).spawn(move || {
                        let r = probe(&check, ca.as_deref());
                        record(&r);
                        let _ = tx.send(r);
                    });
                    if let Err(e) = spawned {
                        log::error!("cannot start a health probe: {e}");
                    }
                }
            }
        }
        drop(running);
    })?;
    Ok(tx)
}
