//! Prometheus metrics and the local health endpoints.
//!
//! Owns the registry with every metric of the spec (names, types and labels exactly as
//! listed, plus the process collector) and a small HTTP server thread (`metrics-http`,
//! tiny_http) on `BACKUPY_METRICS_LISTEN_ADDR` serving `/metrics`, `/healthz` (alive and
//! the state directory writable) and `/readyz` (200 while the agent takes new runs:
//! standalone, the scheduler runs and no shutdown has begun; connected, the session is
//! up; the body adds each health probe's state). The metric handles are atomics made for sharing: worker threads update them
//! directly; label values come from the configuration only (job and check ids), so the
//! label space stays bounded.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub up: IntGauge,
    pub build_info: GaugeVec,
    pub config_version: IntGauge,
    pub connection_state: GaugeVec,
    pub reconnects_total: IntCounter,
    pub queue_depth: IntGauge,
    pub jobs_total: IntCounterVec,
    pub backup_duration_seconds: HistogramVec,
    pub backup_size_bytes: HistogramVec,
    pub last_success_timestamp_seconds: GaugeVec,
    pub last_failure_timestamp_seconds: GaugeVec,
    /// 1 when the job's last finished run succeeded, 0 when it failed; a cancelled run
    /// leaves it as it was. Absent for a job that has not finished a run yet.
    pub last_run_success: GaugeVec,
    pub bytes_uploaded_total: IntCounter,
    pub health_check_up: GaugeVec,
    pub health_check_duration_seconds: HistogramVec,
    /// Outbox entries kept because they do not open with the agent key (issue 16).
    pub outbox_undecryptable_entries: IntGauge,
    /// What the start-up cleanup removed of dead runs (`leftovers`), by kind.
    pub leftovers_removed_total: IntCounterVec,
    pub leftovers_removed_bytes_total: IntCounterVec,
    /// Deletes of retention the storage refused (403: Object Lock, no permission), by job.
    pub retention_deletes_refused_total: IntCounterVec,
    /// Set while the agent can do its job (standalone: the scheduler runs).
    pub ready: AtomicBool,
    /// Held while a run is recorded and while a scrape is gathered: a scrape shows whole
    /// runs, never one counted in `jobs_total` and not yet in its histograms.
    whole_runs: Mutex<()>,
}

impl Metrics {
    pub fn new() -> Result<Arc<Self>, prometheus::Error> {
        let registry = Registry::new();
        let n = |name: &str, help: &str| Opts::new(format!("backupy_agent_{name}"), help.to_string());
        let h = |name: &str, help: &str, buckets: Vec<f64>| {
            HistogramOpts::new(format!("backupy_agent_{name}"), help.to_string()).buckets(buckets)
        };
        let m = Metrics {
            up: IntGauge::with_opts(n("up", "1 while the agent runs"))?,
            build_info: GaugeVec::new(n("build_info", "the agent's version"), &["version"])?,
            config_version: IntGauge::with_opts(n("config_version", "version of the applied configuration"))?,
            connection_state: GaugeVec::new(
                n("connection_state", "1 for the current control-plane connection state"),
                &["state"],
            )?,
            reconnects_total: IntCounter::with_opts(n("reconnects_total", "control-plane reconnects"))?,
            queue_depth: IntGauge::with_opts(n("queue_depth", "runs waiting for a worker"))?,
            jobs_total: IntCounterVec::new(
                n("jobs_total", "finished runs by job and status"),
                &["job_id", "status"],
            )?,
            backup_duration_seconds: HistogramVec::new(
                h(
                    "backup_duration_seconds",
                    "wall time of finished runs",
                    vec![1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0],
                ),
                &["job_id"],
            )?,
            backup_size_bytes: HistogramVec::new(
                h(
                    "backup_size_bytes",
                    "stored size of successful backups",
                    prometheus::exponential_buckets(1024.0 * 1024.0, 4.0, 12)?,
                ),
                &["job_id"],
            )?,
            last_success_timestamp_seconds: GaugeVec::new(
                n("last_success_timestamp_seconds", "Unix time of the job's last successful backup"),
                &["job_id"],
            )?,
            last_failure_timestamp_seconds: GaugeVec::new(
                n("last_failure_timestamp_seconds", "Unix time of the job's last failed run"),
                &["job_id"],
            )?,
            last_run_success: GaugeVec::new(
                n("last_run_success", "1 when the job's last finished run succeeded, 0 when it failed"),
                &["job_id"],
            )?,
            bytes_uploaded_total: IntCounter::with_opts(n(
                "bytes_uploaded_total",
                "bytes stored by successful runs",
            ))?,
            health_check_up: GaugeVec::new(
                n("health_check_up", "1 when the last probe succeeded"),
                &["check_id"],
            )?,
            health_check_duration_seconds: HistogramVec::new(
                h("health_check_duration_seconds", "probe latency", prometheus::DEFAULT_BUCKETS.to_vec()),
                &["check_id"],
            )?,
            outbox_undecryptable_entries: IntGauge::with_opts(n(
                "outbox_undecryptable_entries",
                "outbox entries kept unsent because they do not open with the agent key",
            ))?,
            leftovers_removed_total: IntCounterVec::new(
                n("leftovers_removed_total", "files of dead runs removed at start, by kind"),
                &["kind"],
            )?,
            leftovers_removed_bytes_total: IntCounterVec::new(
                n("leftovers_removed_bytes_total", "bytes of dead runs' files removed at start, by kind"),
                &["kind"],
            )?,
            retention_deletes_refused_total: IntCounterVec::new(
                n(
                    "retention_deletes_refused_total",
                    "retention deletes the storage refused (Object Lock, no permission)",
                ),
                &["job_id"],
            )?,
            ready: AtomicBool::new(false),
            whole_runs: Mutex::new(()),
            registry,
        };
        let r = &m.registry;
        r.register(Box::new(m.up.clone()))?;
        r.register(Box::new(m.build_info.clone()))?;
        r.register(Box::new(m.config_version.clone()))?;
        r.register(Box::new(m.connection_state.clone()))?;
        r.register(Box::new(m.reconnects_total.clone()))?;
        r.register(Box::new(m.queue_depth.clone()))?;
        r.register(Box::new(m.jobs_total.clone()))?;
        r.register(Box::new(m.backup_duration_seconds.clone()))?;
        r.register(Box::new(m.backup_size_bytes.clone()))?;
        r.register(Box::new(m.last_success_timestamp_seconds.clone()))?;
        r.register(Box::new(m.last_failure_timestamp_seconds.clone()))?;
        r.register(Box::new(m.last_run_success.clone()))?;
        r.register(Box::new(m.bytes_uploaded_total.clone()))?;
        r.register(Box::new(m.health_check_up.clone()))?;
        r.register(Box::new(m.health_check_duration_seconds.clone()))?;
        r.register(Box::new(m.outbox_undecryptable_entries.clone()))?;
        r.register(Box::new(m.leftovers_removed_total.clone()))?;
        r.register(Box::new(m.leftovers_removed_bytes_total.clone()))?;
        r.register(Box::new(m.retention_deletes_refused_total.clone()))?;
        r.register(Box::new(prometheus::process_collector::ProcessCollector::for_self()))?;
        m.up.set(1);
        m.build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1.0);
        Ok(Arc::new(m))
    }

    /// Records a finished run. `status` is "success", "failed" or "cancelled".
    pub fn record_run(&self, job_id: &str, status: &str, duration: Duration, stored_bytes: Option<u64>) {
        let _whole = self.whole_runs.lock().unwrap_or_else(|e| e.into_inner());
        self.jobs_total.with_label_values(&[job_id, status]).inc();
        self.backup_duration_seconds.with_label_values(&[job_id]).observe(duration.as_secs_f64());
        let now = crate::clock::since_epoch().as_secs_f64();
        if let Some(bytes) = stored_bytes {
            self.backup_size_bytes.with_label_values(&[job_id]).observe(bytes as f64);
            self.bytes_uploaded_total.inc_by(bytes);
        }
        match status {
            "success" => {
                self.last_success_timestamp_seconds.with_label_values(&[job_id]).set(now);
                self.last_run_success.with_label_values(&[job_id]).set(1.0);
            }
            "failed" => {
                self.last_failure_timestamp_seconds.with_label_values(&[job_id]).set(now);
                self.last_run_success.with_label_values(&[job_id]).set(0.0);
            }
            _ => {}
        }
    }

    /// At start: every configured job's `jobs_total` series exist at 0, so that the first
    /// failure is a rise `increase()` sees; and what `state.db` remembers of each job
    /// (last success, last failure, whether the last finished run succeeded) is exported
    /// again, so that the alerts built on them survive a restart of the agent.
    pub fn init_jobs<'a>(&self, job_ids: impl IntoIterator<Item = &'a str>, history: &JobHistory) {
        let _whole = self.whole_runs.lock().unwrap_or_else(|e| e.into_inner());
        for job_id in job_ids {
            for status in ["success", "failed", "cancelled"] {
                self.jobs_total.with_label_values(&[job_id, status]);
            }
            let Some(h) = history.get(job_id) else { continue };
            if let Some(t) = h.last_success {
                self.last_success_timestamp_seconds.with_label_values(&[job_id]).set(unix(t));
            }
            if let Some(t) = h.last_failure {
                self.last_failure_timestamp_seconds.with_label_values(&[job_id]).set(unix(t));
            }
            if let Some(ok) = h.last_run_succeeded {
                self.last_run_success.with_label_values(&[job_id]).set(if ok { 1.0 } else { 0.0 });
            }
        }
    }

    /// Marks the connection state: exactly one of the states is 1.
    pub fn set_connection_state(&self, state: &str) {
        for s in ["standalone", "connected", "disconnected"] {
            self.connection_state.with_label_values(&[s]).set(if s == state { 1.0 } else { 0.0 });
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let families = {
            let _whole = self.whole_runs.lock().unwrap_or_else(|e| e.into_inner());
            self.registry.gather()
        };
        if let Err(e) = TextEncoder::new().encode(&families, &mut buf) {
            log::warn!("cannot encode metrics: {e}");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

/// Each job's outcomes as `state.db` records them (`StateDb::job_outcomes`).
pub type JobHistory = std::collections::HashMap<String, crate::state::JobOutcomes>;

fn unix(t: chrono::DateTime<chrono::Utc>) -> f64 {
    t.timestamp_millis() as f64 / 1000.0
}

/// Serves the endpoints on a thread until the process ends. `state_dir` is probed by
/// `/healthz` (create and remove a file) so a full or read-only volume turns it 503.
pub fn serve(addr: &str, metrics: Arc<Metrics>, state_dir: PathBuf) -> Result<(), String> {
    let server = tiny_http::Server::http(addr)
        .map_err(|e| format!("cannot listen on {addr} for metrics (BACKUPY_METRICS_LISTEN_ADDR): {e}"))?;
    std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            for req in server.incoming_requests() {
                let (status, body, ctype) = match req.url() {
                    "/metrics" => (200, metrics.render(), "text/plain; version=0.0.4"),
                    "/healthz" => match probe_writable(&state_dir) {
                        Ok(()) => (200, "ok\n".to_string(), "text/plain"),
                        Err(e) => (503, format!("state directory not writable: {e}\n"), "text/plain"),
                    },
                    "/readyz" => {
                        let ready = metrics.ready.load(Ordering::SeqCst);
                        (if ready { 200 } else { 503 }, readyz_body(ready), "text/plain")
                    }
                    _ => (404, "not found\n".into(), "text/plain"),
                };
                let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], ctype.as_bytes())
                    .expect("static header is valid");
                let _ = req.respond(
                    tiny_http::Response::from_string(body).with_status_code(status).with_header(header),
                );
            }
        })
        .map_err(|e| format!("cannot start the metrics thread: {e}"))?;
    Ok(())
}

/// `ready` or `not ready`, then one line per health check: its state, since when, and
/// why it is down. The probes never change the status: the agent still takes runs while
/// a probed service fails.
fn readyz_body(ready: bool) -> String {
    let mut body = String::from(if ready { "ready\n" } else { "not ready\n" });
    for p in crate::health::snapshot() {
        body.push_str(&format!("health_check {} {}", p.id, p.state));
        if !p.since.is_empty() {
            body.push_str(&format!(" since {}", p.since));
        }
        if !p.error.is_empty() {
            body.push_str(&format!(": {}", p.error.replace('\n', " ")));
        }
        body.push('\n');
    }
    body
}

fn probe_writable(dir: &std::path::Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".healthz-{}", std::process::id()));
    std::fs::write(&probe, b"ok")?;
    std::fs::remove_file(&probe)
}

/// `backupy-agent health-check`: asks the running agent's `/healthz`; true when healthy.
pub fn health_check(addr: &str) -> Result<(), String> {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .new_agent();
    let url = format!("http://{addr}/healthz");
    let mut resp = agent.get(&url).call().map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status().as_u16();
    let body = resp.body_mut().read_to_string().unwrap_or_default();
    if status == 200 { Ok(()) } else { Err(format!("{url}: HTTP {status}: {}", body.trim())) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of `family{job_id=job}`; only for series that exist (asking creates them).
    fn gauge(family: &GaugeVec, job: &str) -> Option<f64> {
        family.get_metric_with_label_values(&[job]).ok().map(|g| g.get())
    }

    #[test]
    fn a_failure_sets_last_run_success_to_zero_a_success_to_one_and_a_cancel_changes_nothing() {
        let m = Metrics::new().unwrap();
        let d = Duration::from_secs(1);
        m.record_run("j", "failed", d, None);
        assert_eq!(gauge(&m.last_run_success, "j"), Some(0.0));
        assert!(gauge(&m.last_failure_timestamp_seconds, "j").is_some_and(|t| t > 0.0));
        m.record_run("j", "cancelled", d, None);
        assert_eq!(gauge(&m.last_run_success, "j"), Some(0.0), "a cancel is not a success");
        m.record_run("j", "success", d, Some(10));
        assert_eq!(gauge(&m.last_run_success, "j"), Some(1.0));
        m.record_run("j", "cancelled", d, None);
        assert_eq!(gauge(&m.last_run_success, "j"), Some(1.0), "a cancel is not a failure");
    }

    #[test]
    fn init_jobs_exports_the_history_and_zero_counters() {
        let m = Metrics::new().unwrap();
        let t = |s: &str| chrono::DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&chrono::Utc);
        let mut history = JobHistory::new();
        history.insert(
            "old".into(),
            crate::state::JobOutcomes {
                last_success: Some(t("2026-12-01T03:00:10Z")),
                last_failure: Some(t("2026-12-02T03:00:05Z")),
                last_run_succeeded: Some(false),
                last_run_started: Some(t("2026-12-02T03:00:00Z")),
            },
        );
        m.init_jobs(["old", "new"], &history);
        assert_eq!(gauge(&m.last_success_timestamp_seconds, "old"), Some(1_796_094_010.0));
        assert_eq!(gauge(&m.last_failure_timestamp_seconds, "old"), Some(1_796_180_405.0));
        assert_eq!(gauge(&m.last_run_success, "old"), Some(0.0));
        let text = m.render();
        assert!(!text.contains("last_run_success{job_id=\"new\"}"), "{text}");
        for job in ["old", "new"] {
            for status in ["success", "failed", "cancelled"] {
                let line = format!("backupy_agent_jobs_total{{job_id=\"{job}\",status=\"{status}\"}} 0");
                assert!(text.contains(&line), "{line} missing:\n{text}");
            }
        }
    }
}
