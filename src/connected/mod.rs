//! Connected mode: the agent driven by a Backupy control plane (agent.md "Control-plane
//! session", wire-v1.md). This module wires the threads together; each concern has its
//! own file: [`settings`] (the environment), [`agent`] (the main loop's state and
//! decisions), [`convert`] (protobuf ⇄ domain), [`runs`] (a RunBackup as a run plan),
//! [`update`] (self-update), [`store`] (what is kept by `run_id`).
//!
//! Threads and channels: the `connected` main loop ([`agent::Agent`]) selects on the
//! session's events, the runs' [`RunEvent`]s, health-probe results, discovery reports,
//! the self-update thread's answers, signals and a 500 ms tick. The `session` thread (and
//! its reader and writer) delivers commands in and drains the outbox out. Runs go to the
//! same [`Scheduler`] standalone mode uses, which runs them on its `worker-N` pool (at
//! most `max_parallel_jobs`, the rest queued) under each job's timeout. The
//! `health-config` thread owns the probe threads, the `self-update` thread applies
//! updates, and the `log-forward` (warnings and errors as LogEvents) and `metrics-http`
//! threads complete the picture. Everything the agent reports goes through the
//! [`Outbox`], so nothing is lost to a dropped connection or a `kill -9`.

pub mod agent;
pub mod convert;
pub mod dump_state;
mod harness;
pub mod host;
pub mod runs;
pub mod settings;
pub mod store;
pub mod update;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use crossbeam_channel::Receiver;

use crate::crypto::at_rest::StateCipher;
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::scheduler::{Scheduler, SchedulerOptions};
use crate::session::{self, HeartbeatFields, SessionConfig};
use crate::state::StateDb;
use crate::wire::pb;
use crate::wire::pb::envelope::Payload;
use agent::{Agent, Inputs, Parts, Published};
pub use convert::config_problems;
pub use harness::Harness;
use runs::RunSettings;
pub use settings::{Settings, agent_key_from_env};
use store::Store;

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
    crate::state::create_state_dir(&settings.state_dir)
        .with_context(|| format!("cannot create the state directory {}", settings.state_dir.display()))?;
    let state = Arc::new(StateDb::open(&settings.state_dir)?);
    // Under the state lock: what a killed run left (secrets files, snapshots, spools).
    let leftovers = crate::leftovers::clean(&settings.state_dir, None, true);
    let cipher = StateCipher::from_agent_key(&settings.agent_key);
    let outbox =
        Arc::new(Outbox::open(&settings.state_dir, settings.outbox_limits)?.sealed_with(cipher.clone()));
    let store = Store::open(&settings.state_dir, cipher)?;
    let metrics = Metrics::new().context("cannot create the metrics registry")?;
    leftovers.record(&metrics);
    outbox.report_undecryptable_to(metrics.outbox_undecryptable_entries.clone());
    metrics.set_connection_state("disconnected");
    // The jobs the control plane ran here before: their last outcomes survive a restart.
    match state.job_outcomes() {
        Ok(history) => metrics.init_jobs(history.keys().map(String::as_str), &history),
        Err(e) => log::warn!("{e}"),
    }
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
    let health = crate::health::supervise(metrics.clone(), settings.tls.ca_file.clone(), health_tx)
        .context("cannot start the health thread")?;
    let (updates, update_rx) =
        update::start(settings.state_dir.clone()).context("cannot start the self-update thread")?;
    // Connected mode schedules no cron jobs: every run is a submitted RunBackup.
    let scheduler = Scheduler::start(SchedulerOptions::new(Vec::new()), |request, _| {
        crate::scheduler::RunOutcome::Failed(format!(
            "job {}: connected mode has no cron jobs",
            request.job_id
        ))
    })
    .context("cannot start the scheduler")?;
    let mut agent = Agent::new(Parts {
        run_settings: RunSettings {
            state_dir: settings.state_dir.clone(),
            allow_hooks: settings.allow_hooks,
            allow_insecure: settings.allow_insecure,
            hook_timeout: settings.hook_timeout,
            ca_file: settings.tls.ca_file.clone(),
        },
        endpoint: settings.endpoint.url.clone(),
        store,
        outbox: outbox.clone(),
        state,
        metrics: metrics.clone(),
        config_version: config_version.clone(),
        published: published.clone(),
        scheduler: scheduler.sender(),
        health,
        updates,
        run_events: run_tx,
    });

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
            agent_version: crate::AGENT_VERSION.to_string(),
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
    let reexec = agent.reexec();
    // Runs still in flight (the session ended) are cancelled and waited for.
    scheduler.shutdown(std::time::Duration::ZERO);
    drop(agent); // closes the state database and releases its lock for the next binary
    session.shutdown();
    metrics.ready.store(false, Ordering::SeqCst);
    if reexec {
        return Err(crate::selfupdate::reexec(&settings.state_dir).into());
    }
    log::info!("connected mode stopped");
    Ok(())
}
