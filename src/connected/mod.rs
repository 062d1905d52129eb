//! Connected mode: the agent driven by a Backupy control plane (agent.md "Control-plane
//! session", wire-v1.md).
//!
//! Threads and channels: the `connected` main loop (this module) owns the applied config,
//! the table of runs and every decision; it selects on the session's events, the run
//! workers' [`RunEvent`]s, health-probe results, signals and a 500 ms tick. The `session`
//! thread (and its reader and writer) delivers commands in and drains the outbox out. One
//! `run-…` thread per running backup (at most `max_parallel_jobs`; the rest wait as
//! QUEUED). The `health` thread and its probe pool, the `log-forward` thread (warnings and
//! errors as LogEvents) and the `metrics-http` thread complete the picture. Everything the
//! agent reports goes through the [`Outbox`], so nothing is lost to a dropped connection or
//! a `kill -9`; the [`store`] keeps the config and each run's reports by `run_id`.

pub mod dump_state;
pub mod host;
pub mod runs;
pub mod store;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use crossbeam_channel::{Receiver, Sender, select};

use crate::config::HealthCheck;
use crate::crypto::at_rest::StateCipher;
use crate::health::ProbeResult;
use crate::metrics::Metrics;
use crate::outbox::{Limits, Outbox};
use crate::pipeline::{Cancel, Progress};
use crate::scheduler::window::MaintenanceWindow;
use crate::secrets::Secret;
use crate::session::{self, Endpoint, HeartbeatFields, SessionConfig, SessionEvent, Timing, TlsSettings};
use crate::state::{RunStatus, StateDb};
use crate::storage::s3::{S3Storage, S3Target};
use crate::wire::pb;
use crate::wire::pb::envelope::Payload;
use runs::{RunEvent, RunInput, RunSettings};
use store::{RunPhase, Store};

/// Everything connected mode takes from the environment (agent.md "Environment").
pub struct Settings {
    pub endpoint: Endpoint,
    pub tls: TlsSettings,
    pub agent_key: Secret,
    pub state_dir: PathBuf,
    pub allow_hooks: bool,
    pub allow_insecure: bool,
    pub metrics_addr: Option<String>,
    pub timing: Timing,
    pub hook_timeout: Duration,
    /// How long running backups may go on after SIGTERM before they are cancelled.
    pub shutdown_grace: Duration,
    pub outbox_limits: Limits,
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "true" | "1" | "yes"))
}

fn env_secs(name: &str, default: u64) -> Result<Duration> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => {
            let n: f64 =
                v.trim().parse().with_context(|| format!("{name}={v:?} is not a number of seconds"))?;
            if !(n.is_finite() && n >= 0.0) {
                bail!("{name}={v:?} is not a number of seconds");
            }
            Ok(Duration::from_secs_f64(n))
        }
        _ => Ok(Duration::from_secs(default)),
    }
}

impl Settings {
    /// Reads and checks the environment; every refusal names the variable.
    pub fn from_env() -> Result<Settings> {
        let url = std::env::var("BACKUPY_SERVER_URL").context("BACKUPY_SERVER_URL is not set")?;
        let allow_insecure = env_flag("BACKUPY_DEV_ALLOW_INSECURE");
        let endpoint = Endpoint::parse(&url, allow_insecure).context("BACKUPY_SERVER_URL")?;
        let agent_key = agent_key_from_env()?.context(
            "connected mode needs the agent key: set BACKUPY_AGENT_KEY or BACKUPY_AGENT_KEY_FILE (the file form keeps it out of the process environment)",
        )?;
        let tls = TlsSettings::from_values(
            std::env::var("BACKUPY_CA_FILE").ok().as_deref(),
            std::env::var("BACKUPY_SERVER_PIN_SHA256").ok().as_deref(),
        )?;
        let state_dir =
            PathBuf::from(std::env::var("BACKUPY_STATE_DIR").unwrap_or_else(|_| "/var/lib/backupy".into()));
        // Test hooks for the wire timers; production never sets them.
        let timing = Timing {
            backoff_base: env_secs("BACKUPY_DEV_BACKOFF_BASE_SEC", 1)?,
            dead_after: env_secs("BACKUPY_DEV_DEAD_AFTER_SEC", 90)?,
            ws_ping_every: env_secs("BACKUPY_DEV_WS_PING_SEC", 30)?,
            ..Timing::default()
        };
        Ok(Settings {
            endpoint,
            tls,
            agent_key,
            state_dir,
            allow_hooks: env_flag("BACKUPY_ALLOW_HOOKS"),
            allow_insecure,
            metrics_addr: crate::metrics::listen_addr_from_env(),
            timing,
            hook_timeout: crate::hooks::DEFAULT_TIMEOUT,
            shutdown_grace: env_secs("BACKUPY_SHUTDOWN_GRACE_SEC", 60)?,
            outbox_limits: Limits::default(),
        })
    }
}

/// The agent key from `BACKUPY_AGENT_KEY`, else the file `BACKUPY_AGENT_KEY_FILE` names
/// (surrounding whitespace stripped); `None` when neither is set.
pub fn agent_key_from_env() -> Result<Option<Secret>> {
    if let Ok(k) = std::env::var("BACKUPY_AGENT_KEY")
        && !k.trim().is_empty()
    {
        return Ok(Some(Secret::new(k.trim())));
    }
    let Some(path) = std::env::var_os("BACKUPY_AGENT_KEY_FILE") else { return Ok(None) };
    let path = PathBuf::from(path);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("BACKUPY_AGENT_KEY_FILE {}: cannot read the agent key", path.display()))?;
    let key = Secret::new(text.trim());
    if key.is_empty() {
        bail!("BACKUPY_AGENT_KEY_FILE {} is empty", path.display());
    }
    Ok(Some(key))
}

/// The capability names of Register: the engines whose tools (or native drivers) work here.
pub fn capabilities() -> Vec<String> {
    crate::drivers::capabilities()
        .into_iter()
        .filter(|(_, d)| d.is_some())
        .map(|(e, _)| e.name().to_string())
        .collect()
}

/// Runs connected mode until SIGTERM/SIGINT.
pub fn run() -> Result<()> {
    let settings = Settings::from_env()?;
    // SIGHUP (sent by `self-update` on this host): stop like SIGTERM, then run the
    // installed binary.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ])
    .context("cannot install signal handlers")?;
    let (sig_tx, sig_rx) = crossbeam_channel::unbounded();
    let signal_handle = signals.handle();
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        for sig in signals.forever() {
            if sig_tx.send(sig).is_err() {
                break;
            }
        }
    })?;
    let result = run_with(settings, sig_rx);
    signal_handle.close();
    result
}

/// Connected mode with `stop` as the signal source (a message = SIGTERM).
pub fn run_with(settings: Settings, stop: Receiver<i32>) -> Result<()> {
    std::fs::create_dir_all(&settings.state_dir)
        .with_context(|| format!("cannot create the state directory {}", settings.state_dir.display()))?;
    let state = Arc::new(StateDb::open(&settings.state_dir)?);
    let cipher = StateCipher::from_agent_key(&settings.agent_key);
    let outbox =
        Arc::new(Outbox::open(&settings.state_dir, settings.outbox_limits)?.sealed_with(cipher.clone()));
    let store = Store::open(&settings.state_dir, cipher)?;
    let metrics = Metrics::new().context("cannot create the metrics registry")?;
    metrics.set_connection_state("disconnected");
    if let Some(addr) = &settings.metrics_addr {
        crate::metrics::serve(addr, metrics.clone(), settings.state_dir.clone())
            .map_err(|e| anyhow::anyhow!(e))?;
        log::info!("metrics and health endpoints on http://{addr}/metrics, /healthz, /readyz");
    }

    if let Some(records) = crate::logfwd::install() {
        let outbox = outbox.clone();
        std::thread::Builder::new().name("log-forward".into()).spawn(move || {
            crate::logfwd::forward(records, |event| {
                let _ = outbox.push(Payload::Log(event), "");
            })
        })?;
    }

    // After the log forwarder: a rollback that brought this binary back is a LogEvent.
    // (on_start logs the outcome itself.)
    let _ = crate::selfupdate::on_start(&settings.state_dir);
    let config_version = Arc::new(AtomicU64::new(0));
    let published = Arc::new(Mutex::new(Published::default()));
    let (run_tx, run_rx) = crossbeam_channel::unbounded();
    let (health_tx, health_rx) = crossbeam_channel::unbounded();
    let (update_tx, update_rx) = crossbeam_channel::unbounded();
    let mut agent = Agent {
        run_settings: RunSettings {
            state_dir: settings.state_dir.clone(),
            allow_hooks: settings.allow_hooks,
            allow_insecure: settings.allow_insecure,
            hook_timeout: settings.hook_timeout,
            ca_file: settings.tls.ca_file.clone(),
        },
        ca_file: settings.tls.ca_file.clone(),
        endpoint: settings.endpoint.url.clone(),
        store,
        outbox: outbox.clone(),
        state,
        metrics: metrics.clone(),
        config: pb::AgentConfig::default(),
        config_version: config_version.clone(),
        active: HashMap::new(),
        queued: VecDeque::new(),
        run_tx,
        health_tx,
        health_stop: None,
        published: published.clone(),
        stopping: None,
        dry_run: false,
        state_dir: settings.state_dir.clone(),
        updating: false,
        update_tx,
        reexec: false,
    };
    match agent.store.load_config() {
        Ok(Some(config)) => {
            log::info!(
                "working from the stored config version {} until the control plane answers",
                config.version
            );
            agent.apply_config(config, false);
        }
        Ok(None) => log::info!("no stored config yet: waiting for the control plane's"),
        Err(e) => log::error!("{e}"),
    }
    agent.recover();

    let heartbeat = {
        let mut sampler = host::HostSampler::new(&settings.state_dir);
        let published = published.clone();
        Box::new(move || {
            let h = sampler.sample();
            let p = published.lock().map(|p| p.clone()).unwrap_or_default();
            HeartbeatFields {
                metrics: Some(pb::AgentMetrics {
                    cpu_percent: h.cpu_percent,
                    mem_used_bytes: h.mem_used_bytes,
                    mem_total_bytes: h.mem_total_bytes,
                    disk_used_bytes: h.disk_used_bytes,
                    disk_total_bytes: h.disk_total_bytes,
                    queue_depth: p.queued,
                }),
                active_job_ids: p.active,
            }
        })
    };
    let seq = {
        let outbox = outbox.clone();
        Box::new(move || match outbox.next_seq() {
            Ok(seq) => seq,
            Err(e) => {
                log::error!("{e}");
                0
            }
        })
    };
    // Docker: its version and the docker_exec capability in Register when the socket
    // answers, and discovery reports into the outbox; without it the agent goes on.
    let mut capabilities = capabilities();
    let (docker_version, _discovery, discovery) = match crate::docker::Client::from_env() {
        Ok(client) => {
            capabilities.push("docker_exec".to_string());
            let version = client.daemon_version().to_string();
            log::info!("Docker {version} answers on {}", client.socket().display());
            let (watcher, reports) = crate::docker::discovery::start(client, Default::default());
            (version, Some(watcher), reports)
        }
        Err(e) => {
            log::warn!("{e}; Docker discovery and DOCKER_EXEC are off");
            (String::new(), None, crossbeam_channel::never())
        }
    };
    let (session, events) = session::start(
        SessionConfig {
            endpoint: settings.endpoint.clone(),
            tls: settings.tls.clone(),
            agent_key: settings.agent_key.clone(),
            agent_version: crate::runner::AGENT_VERSION.to_string(),
            docker_version,
            capabilities,
            config_version,
            timing: settings.timing.clone(),
            outbox: Some(outbox),
        },
        seq,
        heartbeat,
    )?;
    log::info!(
        "connected mode: control plane {}, state in {}, pushed hooks {}",
        settings.endpoint,
        settings.state_dir.display(),
        if settings.allow_hooks { "allowed" } else { "refused (BACKUPY_ALLOW_HOOKS is not true)" }
    );
    let inputs = Inputs { events, runs: run_rx, health: health_rx, discovery, updates: update_rx, stop };
    agent.serve(&inputs, settings.shutdown_grace);
    let reexec = agent.reexec;
    drop(agent); // closes the state database and releases its lock for the next binary
    session.shutdown();
    metrics.ready.store(false, Ordering::SeqCst);
    if reexec {
        return Err(crate::selfupdate::reexec(&settings.state_dir).into());
    }
    log::info!("connected mode stopped");
    Ok(())
}

/// What the heartbeat (on the session thread) reads of the main loop's state.
#[derive(Debug, Clone, Default)]
struct Published {
    active: Vec<String>,
    queued: u32,
}

/// Why a run was stopped from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopReason {
    Cancelled,
    TimedOut(u32),
    Shutdown,
}

struct Active {
    job_id: String,
    cancel: Cancel,
    progress: Arc<Progress>,
    step: &'static str,
    estimate: Option<u64>,
    /// What the last JobUpdate said, and when it went out.
    reported: (&'static str, u32),
    reported_at: Instant,
    deadline: Option<Instant>,
    timeout_sec: u32,
    stop: Option<StopReason>,
    thread: Option<JoinHandle<()>>,
}

/// Progress updates of one run go out at most this often (agent.md).
const UPDATE_EVERY: Duration = Duration::from_secs(2);
const TICK: Duration = Duration::from_millis(500);

struct Agent {
    run_settings: RunSettings,
    ca_file: Option<PathBuf>,
    endpoint: String,
    store: Store,
    outbox: Arc<Outbox>,
    state: Arc<StateDb>,
    metrics: Arc<Metrics>,
    config: pb::AgentConfig,
    config_version: Arc<AtomicU64>,
    active: HashMap<String, Active>,
    queued: VecDeque<RunInput>,
    run_tx: Sender<RunEvent>,
    health_tx: Sender<ProbeResult>,
    health_stop: Option<Sender<()>>,
    published: Arc<Mutex<Published>>,
    /// Set by SIGTERM: when running backups get cancelled.
    stopping: Option<Instant>,
    /// Runs stay queued (the fuzz harness: no dump may reach a fuzzed host).
    dry_run: bool,
    state_dir: PathBuf,
    /// A SelfUpdate is downloading and checking on the `self-update` thread.
    updating: bool,
    update_tx: Sender<UpdateDone>,
    /// An update is installed: once stopped, exec it.
    reexec: bool,
}

/// The `self-update` thread's answer.
#[derive(Debug)]
struct UpdateDone {
    correlation_id: String,
    result: Result<crate::selfupdate::Applied, String>,
}

fn job_update(job_id: &str, run_id: &str, status: pb::JobStatus) -> pb::JobUpdate {
    pb::JobUpdate {
        job_id: job_id.to_string(),
        status: status as i32,
        run_id: run_id.to_string(),
        ..Default::default()
    }
}

/// Everything the main loop selects on.
struct Inputs {
    events: Receiver<SessionEvent>,
    runs: Receiver<RunEvent>,
    health: Receiver<ProbeResult>,
    discovery: Receiver<pb::DiscoveryReport>,
    updates: Receiver<UpdateDone>,
    stop: Receiver<i32>,
}

impl Agent {
    fn serve(&mut self, inputs: &Inputs, grace: Duration) {
        let Inputs { events, runs, health, discovery, updates, stop } = inputs;
        let mut next_tick = Instant::now() + TICK;
        loop {
            if let Some(at) = self.stopping {
                if self.active.is_empty() {
                    return;
                }
                if Instant::now() >= at {
                    for run in self.active.values_mut() {
                        if run.stop.is_none() {
                            run.stop = Some(StopReason::Shutdown);
                            run.cancel.cancel();
                        }
                    }
                }
            }
            let wait = next_tick.saturating_duration_since(Instant::now());
            select! {
                recv(events) -> ev => match ev {
                    Ok(ev) => self.session_event(ev),
                    Err(_) => return,
                },
                recv(runs) -> ev => {
                    if let Ok(ev) = ev {
                        self.run_event(ev);
                    }
                },
                recv(health) -> r => {
                    if let Ok(r) = r {
                        self.health_result(r);
                    }
                },
                recv(discovery) -> report => {
                    if let Ok(report) = report {
                        log::info!("discovery: {} database container(s)", report.containers.len());
                        self.push(Payload::Discovery(report), "");
                    }
                },
                recv(updates) -> done => {
                    if let Ok(done) = done {
                        self.update_done(done, grace);
                    }
                },
                recv(stop) -> sig => {
                    if sig == Ok(signal_hook::consts::SIGHUP) {
                        match crate::selfupdate::pending(&self.state_dir) {
                            Some(version) => {
                                log::info!("SIGHUP: stopping to run the installed update {version}");
                                self.reexec = true;
                            }
                            None => log::info!("SIGHUP with no installed update: stopping"),
                        }
                    }
                    let first = self.stopping.is_none();
                    let grace = if first && sig.is_ok() { grace } else { Duration::ZERO };
                    log::info!(
                        "stopping: no new runs; {} running backup(s) get {:.0} s to finish",
                        self.active.len(),
                        grace.as_secs_f64()
                    );
                    self.stopping = Some(Instant::now() + grace);
                    self.fail_queued("the agent shut down before the run started");
                    if sig.is_err() && self.active.is_empty() {
                        return;
                    }
                },
                default(wait) => {}
            }
            if Instant::now() >= next_tick {
                self.tick();
                next_tick = Instant::now() + TICK;
            }
        }
    }

    // ---- delivery helpers ----

    fn push(&self, payload: Payload, correlation_id: &str) {
        if let Err(e) = self.outbox.push(payload, correlation_id) {
            log::error!("{e}");
        }
    }

    /// Answers a server command (wire-v1.md "Acknowledging commands").
    fn ack(&self, correlation_id: &str, accepted: bool, reason: impl Into<String>) {
        if correlation_id.is_empty() {
            return;
        }
        let ack = pb::Ack { correlation_id: correlation_id.to_string(), accepted, reason: reason.into() };
        self.push(Payload::Ack(ack), correlation_id);
    }

    fn publish(&self) {
        if let Ok(mut p) = self.published.lock() {
            p.active = self.active.keys().cloned().collect();
            p.active.sort();
            p.queued = self.queued.len() as u32;
        }
        self.metrics.queue_depth.set(self.queued.len() as i64);
    }

    // ---- session ----

    fn session_event(&mut self, ev: SessionEvent) {
        match ev {
            SessionEvent::Connected { session_id, config } => {
                // RegisterAck reached: an update waiting for proof is confirmed.
                if let Some(outcome) = crate::selfupdate::confirm(&self.state_dir) {
                    // confirm() logged it locally; the control plane hears it whatever the
                    // forwarding level.
                    self.log_event(pb::LogLevel::Info, &outcome.to_string());
                }
                self.metrics.set_connection_state("connected");
                self.metrics.ready.store(true, Ordering::SeqCst);
                if let Err(e) = self.store.record_connected(&self.endpoint, &session_id) {
                    log::warn!("{e}");
                }
                if let Some(config) = config {
                    self.offer_config(config, "");
                }
            }
            SessionEvent::Disconnected { reason } => {
                self.metrics.set_connection_state("disconnected");
                self.metrics.reconnects_total.inc();
                self.metrics.ready.store(false, Ordering::SeqCst);
                if let Err(e) = self.store.record_disconnected(&reason) {
                    log::warn!("{e}");
                }
            }
            SessionEvent::Ack(_) => {}
            SessionEvent::Command(env) => self.command(env),
        }
    }

    fn command(&mut self, env: pb::Envelope) {
        let cid = env.correlation_id;
        match env.payload {
            Some(Payload::ConfigUpdate(u)) => match u.config {
                Some(config) => self.offer_config(config, &cid),
                None => self.ack(&cid, false, "config_update without a config"),
            },
            Some(Payload::RunBackup(cmd)) => self.run_backup(cmd, &cid),
            Some(Payload::CancelJob(c)) => self.cancel_job(&c.job_id, &cid),
            Some(Payload::RunHealthCheck(c)) => self.run_health_check(&c.check_id, &cid),
            Some(Payload::SelfUpdate(u)) => self.self_update(u, &cid),
            other => {
                log::warn!("ignoring an unexpected {} command", session::payload_name(other.as_ref()));
                self.ack(&cid, false, "not a command this agent takes");
            }
        }
    }

    // ---- config ----

    /// RegisterAck or ConfigUpdate: applied only when newer (agent.md).
    fn offer_config(&mut self, config: pb::AgentConfig, cid: &str) {
        let current = self.config.version;
        if config.version <= current {
            let reason = if config.version == current {
                format!("config version {} is already applied", config.version)
            } else {
                format!(
                    "config version {} is older than the applied version {current}; kept {current}",
                    config.version
                )
            };
            log::debug!("{reason}");
            self.ack(cid, config.version == current, reason);
            return;
        }
        let problems = self.apply_config(config, true);
        self.ack(cid, true, problems.join("; "));
    }

    /// Applies (and, when `persist`, first stores) a config; returns what is wrong in it.
    /// Problems do not refuse the config: jobs and checks that are fine keep working; a run
    /// of a broken job fails with the same reason.
    fn apply_config(&mut self, config: pb::AgentConfig, persist: bool) -> Vec<String> {
        let problems = config_problems(&config);
        for p in &problems {
            log::warn!("config version {}: {p}", config.version);
        }
        if persist && let Err(e) = self.store.save_config(&config) {
            log::error!("config version {} is applied but not stored: {e}", config.version);
        }
        let advanced = config.advanced.clone().unwrap_or_default();
        if let Some(level) = crate::logfwd::parse_level(&advanced.log_level) {
            crate::logfwd::set_local_level(level);
            crate::logfwd::set_forward_level(level);
        }
        self.config_version.store(config.version, Ordering::SeqCst);
        self.metrics.config_version.set(config.version as i64);
        let checks: Vec<HealthCheck> =
            config.health_checks.iter().filter_map(|c| health_check(c).ok()).collect();
        self.health_stop = None; // stops the previous probe threads
        match crate::health::start(
            if self.dry_run { Vec::new() } else { checks },
            self.metrics.clone(),
            self.ca_file.clone(),
            Some(self.health_tx.clone()),
        ) {
            Ok(stop) => self.health_stop = Some(stop),
            Err(e) => log::error!("cannot start the health-probe threads: {e}"),
        }
        log::info!(
            "applied config version {}: {} target(s), {} job(s), {} health check(s)",
            config.version,
            config.targets.len(),
            config.jobs.len(),
            config.health_checks.len()
        );
        self.config = config;
        self.start_queued();
        problems
    }

    fn max_parallel(&self) -> usize {
        match self.config.advanced.as_ref().map(|a| a.max_parallel_jobs).unwrap_or(0) {
            0 => 2,
            n => n as usize,
        }
    }

    // ---- runs ----

    fn run_backup(&mut self, cmd: pb::RunBackup, cid: &str) {
        if cmd.run_id.is_empty() {
            self.ack(cid, false, "run_backup without a run_id");
            return;
        }
        match self.store.run(&cmd.run_id) {
            Ok(Some(row)) => {
                self.ack(cid, true, "duplicate run_id");
                if let Some(u) = row.last_update {
                    self.push(Payload::JobUpdate(u), "");
                }
                if let Some(c) = row.completed {
                    self.push(Payload::BackupCompleted(c), "");
                }
                return;
            }
            Ok(None) => {}
            Err(e) => log::error!("{e}"),
        }
        let refuse = |this: &mut Self, reason: String| {
            crate::logfwd::set_job(Some(&cmd.job_id));
            log::error!("job {}: run {} refused: {reason}", cmd.job_id, cmd.run_id);
            this.ack(cid, false, reason.clone());
            let mut u = job_update(&cmd.job_id, &cmd.run_id, pb::JobStatus::Failed);
            u.error_message = reason;
            this.finish_report(&cmd.run_id, &cmd.job_id, u, None);
            crate::logfwd::set_job(None);
        };
        if self.stopping.is_some() {
            return refuse(self, "the agent is shutting down".into());
        }
        if self.updating {
            return refuse(
                self,
                "the agent is updating itself; send the run again after it reconnects".into(),
            );
        }
        let Some(job) = self.config.jobs.iter().find(|j| j.id == cmd.job_id).cloned() else {
            return refuse(
                self,
                format!("unknown job {:?} (config version {})", cmd.job_id, self.config.version),
            );
        };
        let Some(target) = self.config.targets.iter().find(|t| t.id == job.target_id).cloned() else {
            return refuse(
                self,
                format!(
                    "job {:?} refers to target {:?}, which config version {} does not define",
                    job.id, job.target_id, self.config.version
                ),
            );
        };
        if !cmd.manual_trigger
            && let Some(w) = self.config.maintenance.as_ref()
            && let Ok(window) = MaintenanceWindow::parse(&w.start_utc, &w.end_utc)
            && window.contains(chrono::Utc::now())
        {
            return refuse(
                self,
                format!("not started: inside the maintenance window {}–{} UTC", w.start_utc, w.end_utc),
            );
        }
        let queued = job_update(&job.id, &cmd.run_id, pb::JobStatus::Queued);
        let upload = cmd.upload_creds.as_ref().and_then(|c| c.multipart.as_ref());
        if let Err(e) = self.store.insert_run(&cmd.run_id, &job.id, &queued, upload) {
            log::error!("{e}");
        }
        self.ack(cid, true, "");
        self.push(Payload::JobUpdate(queued), "");
        self.queued.push_back(RunInput { job, target, command: cmd });
        self.start_queued();
    }

    fn start_queued(&mut self) {
        while self.stopping.is_none() && !self.dry_run && self.active.len() < self.max_parallel() {
            let Some(input) = self.queued.pop_front() else { break };
            self.start(input);
        }
        self.publish();
    }

    fn start(&mut self, input: RunInput) {
        let run_id = input.command.run_id.clone();
        let job_id = input.job.id.clone();
        let cancel = Cancel::default();
        let progress = Arc::new(Progress::default());
        let first_step = if input.job.pre_hooks.is_empty() { "dumping" } else { "pre_hooks" };
        let timeout_sec = input.job.timeout_sec;
        let deadline = (input.job.timeout_sec > 0)
            .then(|| Instant::now() + Duration::from_secs(input.job.timeout_sec.into()));
        let mut running = job_update(&job_id, &run_id, pb::JobStatus::Running);
        running.current_step = first_step.into();
        if let Err(e) = self.store.set_running(&run_id, &running) {
            log::error!("{e}");
        }
        if let Err(e) = self.state.record_start(&run_id, &job_id, 1, chrono::Utc::now()) {
            log::warn!("{e}");
        }
        self.push(Payload::JobUpdate(running), "");
        let thread = {
            let (settings, cancel, progress, tx) =
                (self.run_settings.clone(), cancel.clone(), progress.clone(), self.run_tx.clone());
            let name = format!("run-{}", run_id.chars().take(8).collect::<String>());
            std::thread::Builder::new()
                .name(name)
                .spawn(move || runs::run(&settings, input, cancel, progress, tx))
        };
        let thread = match thread {
            Ok(t) => Some(t),
            Err(e) => {
                let _ = self.run_tx.send(RunEvent::Finished {
                    run_id: run_id.clone(),
                    result: Err(format!("cannot start the run thread: {e}")),
                });
                None
            }
        };
        log::info!("job {job_id}: run {run_id} started");
        self.active.insert(
            run_id,
            Active {
                job_id,
                cancel,
                progress,
                step: first_step,
                estimate: None,
                reported: (first_step, 0),
                reported_at: Instant::now(),
                deadline,
                timeout_sec,
                stop: None,
                thread,
            },
        );
    }

    fn run_event(&mut self, ev: RunEvent) {
        match ev {
            RunEvent::Step { run_id, step } => {
                if let Some(run) = self.active.get_mut(&run_id) {
                    run.step = step;
                }
                self.progress_updates();
            }
            RunEvent::Estimate { run_id, bytes } => {
                if let Some(run) = self.active.get_mut(&run_id) {
                    run.estimate = Some(bytes.max(1));
                }
            }
            RunEvent::Finished { run_id, result } => self.finished(&run_id, result),
        }
    }

    fn finished(&mut self, run_id: &str, result: Result<pb::BackupCompleted, String>) {
        let Some(run) = self.active.remove(run_id) else { return };
        // Log lines about the run carry its job id into LogEvents.
        crate::logfwd::set_job(Some(&run.job_id));
        self.finish_run(run_id, run, result);
        crate::logfwd::set_job(None);
    }

    fn finish_run(&mut self, run_id: &str, mut run: Active, result: Result<pb::BackupCompleted, String>) {
        if let Some(t) = run.thread.take() {
            let _ = t.join();
        }
        let mut update = job_update(&run.job_id, run_id, pb::JobStatus::Success);
        let completed = match result {
            Ok(c) => {
                update.progress_percent = 100;
                Some(c)
            }
            Err(e) => {
                let (status, message) = match run.stop {
                    Some(StopReason::Cancelled) => {
                        (pb::JobStatus::Cancelled, "cancelled by the control plane".into())
                    }
                    Some(StopReason::Shutdown) => {
                        (pb::JobStatus::Cancelled, "cancelled: the agent shut down during the run".into())
                    }
                    Some(StopReason::TimedOut(s)) => {
                        (pb::JobStatus::Failed, format!("timed out after {s} s (the job's timeout_sec)"))
                    }
                    None => (pb::JobStatus::Failed, e),
                };
                update.status = status as i32;
                update.error_message = message;
                None
            }
        };
        let status = pb::JobStatus::try_from(update.status).unwrap_or(pb::JobStatus::Failed);
        let (state_status, label) = match status {
            pb::JobStatus::Success => (RunStatus::Success, "success"),
            pb::JobStatus::Cancelled => (RunStatus::Cancelled, "cancelled"),
            _ => (RunStatus::Failed, "failed"),
        };
        match &completed {
            Some(c) => log::info!("job {}: run {run_id} succeeded ({} bytes)", run.job_id, c.size_bytes),
            None if status == pb::JobStatus::Failed => {
                log::error!("job {}: run {run_id} failed: {}", run.job_id, update.error_message)
            }
            None => log::warn!("job {}: run {run_id} {}", run.job_id, update.error_message),
        }
        let size = completed.as_ref().map(|c| c.size_bytes);
        let key = completed.as_ref().map(|c| c.s3_key.clone()).unwrap_or_default();
        if let Err(e) =
            self.state.record_finish(run_id, state_status, size.unwrap_or(0), &key, &update.error_message)
        {
            log::warn!("{e}");
        }
        let elapsed = Duration::from_millis(completed.as_ref().map(|c| c.duration_ms).unwrap_or(0));
        self.metrics.record_run(&run.job_id, label, elapsed, size);
        let job_id = run.job_id.clone();
        self.finish_report(run_id, &job_id, update, completed);
        self.start_queued();
    }

    /// The final reports of a run: stored first (so a crash before they reach the outbox
    /// re-pushes them at restart), then pushed, then marked reported.
    fn finish_report(
        &mut self,
        run_id: &str,
        job_id: &str,
        update: pb::JobUpdate,
        completed: Option<pb::BackupCompleted>,
    ) {
        if let Err(e) = self.store.set_done(run_id, job_id, &update, completed.as_ref()) {
            log::error!("{e}");
        }
        self.push(Payload::JobUpdate(update), "");
        if let Some(c) = completed {
            self.push(Payload::BackupCompleted(c), "");
        }
        if let Err(e) = self.store.set_reported(run_id) {
            log::error!("{e}");
        }
        self.publish();
    }

    fn cancel_job(&mut self, job_id: &str, cid: &str) {
        let mut found = 0;
        let (cancelled, kept): (Vec<_>, Vec<_>) = self.queued.drain(..).partition(|q| q.job.id == job_id);
        self.queued = kept.into();
        for q in cancelled {
            found += 1;
            let mut u = job_update(job_id, &q.command.run_id, pb::JobStatus::Cancelled);
            u.error_message = "cancelled by the control plane before it started".into();
            self.finish_report(&q.command.run_id, job_id, u, None);
        }
        for (run_id, run) in self.active.iter_mut().filter(|(_, r)| r.job_id == job_id) {
            found += 1;
            if run.stop.is_none() {
                run.stop = Some(StopReason::Cancelled);
            }
            run.cancel.cancel();
            log::info!("job {job_id}: run {run_id} cancelled by the control plane");
        }
        if found == 0 {
            self.ack(cid, false, format!("no queued or running run of job {job_id:?}"));
        } else {
            self.ack(cid, true, "");
        }
        self.publish();
    }

    fn fail_queued(&mut self, reason: &str) {
        for q in std::mem::take(&mut self.queued) {
            let mut u = job_update(&q.job.id, &q.command.run_id, pb::JobStatus::Failed);
            u.error_message = reason.into();
            self.finish_report(&q.command.run_id, &q.job.id.clone(), u, None);
        }
    }

    fn tick(&mut self) {
        let now = Instant::now();
        for run in self.active.values_mut() {
            if let Some(deadline) = run.deadline
                && now >= deadline
                && run.stop.is_none()
            {
                run.stop = Some(StopReason::TimedOut(run.timeout_sec));
                run.cancel.cancel();
            }
        }
        self.progress_updates();
    }

    /// RUNNING updates for runs whose step or percentage changed, at most one per run per
    /// [`UPDATE_EVERY`].
    fn progress_updates(&mut self) {
        let mut out = Vec::new();
        for (run_id, run) in self.active.iter_mut() {
            if run.reported_at.elapsed() < UPDATE_EVERY {
                continue;
            }
            let percent = match run.estimate {
                Some(total) => {
                    let done = run.progress.dump_bytes.load(Ordering::Relaxed);
                    ((done.saturating_mul(100) / total).min(99)) as u32
                }
                None => 0,
            };
            if (run.step, percent) == run.reported {
                continue;
            }
            run.reported = (run.step, percent);
            run.reported_at = Instant::now();
            let mut u = job_update(&run.job_id, run_id, pb::JobStatus::Running);
            u.current_step = run.step.into();
            u.progress_percent = percent;
            out.push(u);
        }
        for u in out {
            if let Err(e) = self.store.set_running(&u.run_id, &u) {
                log::warn!("{e}");
            }
            self.push(Payload::JobUpdate(u), "");
        }
    }

    /// After a restart: runs that were queued or running when the process died are
    /// reported FAILED ("agent restarted …") and their multipart uploads aborted; final
    /// reports that never reached the outbox are pushed now.
    fn recover(&mut self) {
        let rows = match self.store.unfinished_runs() {
            Ok(rows) => rows,
            Err(e) => {
                log::error!("{e}");
                return;
            }
        };
        for row in rows {
            match row.phase {
                RunPhase::Queued | RunPhase::Running => {
                    let was = if row.phase == RunPhase::Queued { "queued" } else { "running" };
                    let mut message = format!("agent restarted while the run was {was}");
                    if let Some(mp) = &row.upload {
                        match S3Target::from_wire(mp, self.run_settings.allow_insecure)
                            .and_then(|t| S3Storage::new(t, Some(&self.run_settings.state_dir)))
                        {
                            Ok(s3) => {
                                let n = s3.abort_recorded_uploads();
                                if n > 0 {
                                    message.push_str("; its unfinished upload was aborted");
                                }
                            }
                            Err(e) => log::warn!("run {}: cannot abort its upload: {e}", row.run_id),
                        }
                    }
                    log::warn!("job {}: run {}: {message}", row.job_id, row.run_id);
                    let mut u = job_update(&row.job_id, &row.run_id, pb::JobStatus::Failed);
                    u.error_message = message;
                    self.finish_report(&row.run_id, &row.job_id, u, None);
                }
                RunPhase::Done { reported: false } => {
                    if let Some(u) = row.last_update {
                        self.push(Payload::JobUpdate(u), "");
                    }
                    if let Some(c) = row.completed {
                        self.push(Payload::BackupCompleted(c), "");
                    }
                    if let Err(e) = self.store.set_reported(&row.run_id) {
                        log::error!("{e}");
                    }
                }
                RunPhase::Done { reported: true } => {}
            }
        }
    }

    // ---- self-update ----

    /// SelfUpdate (agent.md "Self-update"): only with `auto_update_enabled` or `force`,
    /// and only while no backup runs; the download and checks run on their own thread.
    fn self_update(&mut self, u: pb::SelfUpdate, cid: &str) {
        let auto = self.config.advanced.as_ref().is_some_and(|a| a.auto_update_enabled);
        let refusal = if !auto && !u.force {
            Some("auto_update_enabled is off in the config and the command is not forced".to_string())
        } else if self.updating {
            Some("a self-update is already in progress".into())
        } else if self.stopping.is_some() {
            Some("the agent is shutting down".into())
        } else if !self.active.is_empty() || !self.queued.is_empty() {
            Some(format!(
                "{} backup(s) running or queued; send the update again when they are done",
                self.active.len() + self.queued.len()
            ))
        } else {
            None
        };
        if let Some(reason) = refusal {
            log::warn!("self-update to {:?} refused: {reason}", u.target_version);
            self.ack(cid, false, reason);
            return;
        }
        let settings = match crate::selfupdate::Settings::from_env(&self.state_dir) {
            Ok(s) => s,
            Err(e) => {
                self.ack(cid, false, e.to_string());
                return;
            }
        };
        let req = crate::selfupdate::UpdateRequest {
            url: u.binary_url,
            sha256: u.sha256,
            signature: crate::selfupdate::signature_from_file(&u.cosign_signature),
            version: (!u.target_version.is_empty()).then_some(u.target_version),
            force: u.force,
        };
        let (tx, correlation_id) = (self.update_tx.clone(), cid.to_string());
        let spawned = std::thread::Builder::new().name("self-update".into()).spawn(move || {
            let result = crate::selfupdate::apply(&req, &settings).map_err(|e| e.to_string());
            let _ = tx.send(UpdateDone { correlation_id, result });
        });
        match spawned {
            Ok(_) => self.updating = true,
            Err(e) => self.ack(cid, false, format!("cannot start the self-update thread: {e}")),
        }
    }

    fn update_done(&mut self, done: UpdateDone, grace: Duration) {
        self.updating = false;
        match done.result {
            Ok(applied) => {
                let message = format!(
                    "self-update: installed {} (was {}); restarting into it",
                    applied.version, applied.previous_version
                );
                // Stored before the exec: the new process delivers it.
                self.log_event(pb::LogLevel::Info, &message);
                log::info!("{message}");
                self.ack(&done.correlation_id, true, message);
                self.reexec = true;
                self.stopping = Some(Instant::now() + grace);
            }
            Err(reason) => {
                log::error!("self-update refused: {reason}");
                self.ack(&done.correlation_id, false, reason);
            }
        }
    }

    /// A LogEvent straight into the outbox, whatever the forwarding level.
    fn log_event(&self, level: pb::LogLevel, message: &str) {
        let event = pb::LogEvent {
            ts_ms: crate::clock::now_ms(),
            level: level as i32,
            job_id: String::new(),
            message: crate::secrets::redact(message),
            fields: Default::default(),
        };
        self.push(Payload::Log(event), "");
    }

    // ---- health ----

    fn run_health_check(&mut self, check_id: &str, cid: &str) {
        let Some(spec) = self.config.health_checks.iter().find(|c| c.id == check_id) else {
            self.ack(
                cid,
                false,
                format!("unknown health check {check_id:?} (config version {})", self.config.version),
            );
            return;
        };
        let check = match health_check(spec) {
            Ok(c) => c,
            Err(e) => {
                self.ack(cid, false, e);
                return;
            }
        };
        if self.dry_run {
            self.ack(cid, true, "");
            return;
        }
        let (tx, ca) = (self.health_tx.clone(), self.ca_file.clone());
        let spawned = std::thread::Builder::new().name("health-now".into()).spawn(move || {
            let _ = tx.send(crate::health::probe(&check, ca.as_deref()));
        });
        match spawned {
            Ok(_) => self.ack(cid, true, ""),
            Err(e) => self.ack(cid, false, format!("cannot start the probe: {e}")),
        }
    }

    fn health_result(&mut self, r: ProbeResult) {
        let result = pb::HealthCheckResult {
            check_id: r.check_id,
            ts_ms: crate::clock::now_ms(),
            ok: r.ok,
            latency_ms: r.latency.as_millis().min(u32::MAX as u128) as u32,
            error: r.error,
            status_code: r.status_code,
        };
        self.push(Payload::HealthResult(result), "");
    }
}

/// Connected mode's handling of server frames without a network or runs, for the fuzz
/// test: a frame goes through the checks of the session's reader and, when it carries a
/// command, through the main loop's dispatch, against a real state directory.
#[doc(hidden)]
pub struct Harness {
    agent: Agent,
    _runs: Receiver<RunEvent>,
    _health: Receiver<ProbeResult>,
}

impl Harness {
    pub fn new(state_dir: &std::path::Path) -> Result<Harness> {
        let key = Secret::new("fuzz-harness-agent-key");
        let cipher = StateCipher::from_agent_key(&key);
        let state = Arc::new(StateDb::open(state_dir)?);
        let outbox = Arc::new(Outbox::open(state_dir, Limits::default())?.sealed_with(cipher.clone()));
        let (run_tx, runs) = crossbeam_channel::unbounded();
        let (health_tx, health) = crossbeam_channel::unbounded();
        let agent = Agent {
            run_settings: RunSettings {
                state_dir: state_dir.to_path_buf(),
                allow_hooks: false,
                allow_insecure: false,
                hook_timeout: Duration::from_secs(1),
                ca_file: None,
            },
            ca_file: None,
            endpoint: "fuzz".into(),
            store: Store::open(state_dir, cipher)?,
            outbox,
            state,
            metrics: Metrics::new()?,
            config: pb::AgentConfig::default(),
            config_version: Arc::new(AtomicU64::new(0)),
            active: HashMap::new(),
            queued: VecDeque::new(),
            run_tx,
            health_tx,
            health_stop: None,
            published: Arc::new(Mutex::new(Published::default())),
            stopping: None,
            dry_run: true,
            state_dir: state_dir.to_path_buf(),
            updating: false,
            update_tx: crossbeam_channel::unbounded().0,
            reexec: false,
        };
        Ok(Harness { agent, _runs: runs, _health: health })
    }

    /// One binary frame as the session would take it; `Err` when the session would close
    /// the connection.
    pub fn frame(&mut self, bytes: &[u8]) -> Result<(), String> {
        use prost::Message as _;
        if bytes.len() > session::MAX_FRAME_BYTES {
            return Err("frame too large".into());
        }
        let env = pb::Envelope::decode(bytes).map_err(|e| e.to_string())?;
        match env.payload {
            Some(Payload::ConfigUpdate(_))
            | Some(Payload::RunBackup(_))
            | Some(Payload::CancelJob(_))
            | Some(Payload::RunHealthCheck(_))
            | Some(Payload::SelfUpdate(_)) => self.agent.command(env),
            Some(Payload::RegisterAck(ack)) => {
                if let Some(config) = ack.config {
                    self.agent.offer_config(config, "");
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The applied config's version.
    pub fn config_version(&self) -> u64 {
        self.agent.config.version
    }
}

/// A control plane health check as the probes take it.
fn health_check(c: &pb::HealthCheckSpec) -> Result<HealthCheck, String> {
    let kind = match pb::CheckType::try_from(c.r#type) {
        Ok(pb::CheckType::Http) => "http",
        Ok(pb::CheckType::Https) => "https",
        Ok(pb::CheckType::TcpCheck) => "tcp",
        Err(_) => return Err(format!("health check {:?}: unknown check type {}", c.id, c.r#type)),
    };
    Ok(HealthCheck {
        id: c.id.clone(),
        name: c.name.clone(),
        kind: kind.into(),
        target: c.target.clone(),
        interval: Duration::from_secs(if c.interval_sec == 0 { 60 } else { c.interval_sec.into() }),
        timeout: Duration::from_secs(if c.timeout_sec == 0 { 10 } else { c.timeout_sec.into() }),
        expected_status: c.expected_status,
    })
}

/// What is wrong in a pushed config, each in words an operator can act on.
pub fn config_problems(config: &pb::AgentConfig) -> Vec<String> {
    let mut problems = Vec::new();
    for job in &config.jobs {
        if !config.targets.iter().any(|t| t.id == job.target_id) {
            problems.push(format!(
                "job {:?} refers to target {:?}, which the config does not define",
                job.id, job.target_id
            ));
        }
    }
    for t in &config.targets {
        if let Err(e) = runs::engine_of(t.r#type) {
            problems.push(format!("target {:?}: {e}", t.id));
        }
    }
    for c in &config.health_checks {
        if let Err(e) = health_check(c) {
            problems.push(e);
        }
    }
    if let Some(a) = &config.advanced
        && !a.log_level.is_empty()
        && crate::logfwd::parse_level(&a.log_level).is_none()
    {
        problems.push(format!(
            "advanced.log_level {:?} is not one of trace, debug, info, warn, error",
            a.log_level
        ));
    }
    problems
}
