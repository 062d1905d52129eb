//! Connected mode's handling of server frames without a network, for the fuzz test: a
//! frame goes through the checks of the session's reader and, when it carries a command
//! or a config, through the main loop's dispatch, against a real state directory.
//!
//! The main loop is built by [`Agent::new`], as in `run_with`; the harness keeps the
//! receiving ends of the scheduler, health and self-update channels and never serves
//! them, so a fuzzed RunBackup stays queued, no probe runs and nothing is downloaded.

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use crossbeam_channel::Receiver;

use super::agent::{Agent, Parts, Published};
use super::runs::{RunEvent, RunSettings};
use super::store::Store;
use super::update::UpdateJob;
use crate::crypto::at_rest::StateCipher;
use crate::health::HealthCommand;
use crate::metrics::Metrics;
use crate::outbox::{Limits, Outbox};
use crate::scheduler::SchedulerCommand;
use crate::secrets::Secret;
use crate::session;
use crate::state::StateDb;
use crate::wire::pb;
use crate::wire::pb::envelope::Payload;

#[doc(hidden)]
pub struct Harness {
    agent: Agent,
    scheduler: Receiver<SchedulerCommand>,
    _health: Receiver<HealthCommand>,
    _updates: Receiver<UpdateJob>,
    _runs: Receiver<RunEvent>,
}

impl Harness {
    pub fn new(state_dir: &Path) -> Result<Harness> {
        let cipher = StateCipher::from_agent_key(&Secret::new("fuzz-harness-agent-key"));
        let (scheduler_tx, scheduler) = crossbeam_channel::unbounded();
        let (health_tx, health) = crossbeam_channel::unbounded();
        let (updates_tx, updates) = crossbeam_channel::unbounded();
        let (run_tx, runs) = crossbeam_channel::unbounded();
        let parts = Parts {
            run_settings: RunSettings {
                state_dir: state_dir.to_path_buf(),
                allow_hooks: false,
                allow_insecure: false,
                hook_timeout: Duration::from_secs(1),
                ca_file: None,
            },
            endpoint: "fuzz".into(),
            store: Store::open(state_dir, cipher.clone())?,
            outbox: Arc::new(Outbox::open(state_dir, Limits::default())?.sealed_with(cipher)),
            state: Arc::new(StateDb::open(state_dir)?),
            metrics: Metrics::new()?,
            config_version: Arc::new(AtomicU64::new(0)),
            published: Arc::new(Mutex::new(Published::default())),
            scheduler: scheduler_tx,
            health: health_tx,
            updates: updates_tx,
            run_events: run_tx,
        };
        Ok(Harness { agent: Agent::new(parts), scheduler, _health: health, _updates: updates, _runs: runs })
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
        // Submitted runs are dropped unread: they never reach a worker.
        while self.scheduler.try_recv().is_ok() {}
        Ok(())
    }

    /// The applied config's version.
    pub fn config_version(&self) -> u64 {
        self.agent.config_version()
    }
}
