//! Self-update in connected mode (agent.md "Self-update"): when a SelfUpdate may start,
//! and the `self-update` thread that downloads, checks and installs it.
//!
//! The main loop decides ([`refusal`]) and sends an [`UpdateJob`] to the thread started by
//! [`start`]; the thread answers with an [`UpdateDone`] on the main loop's channel. The
//! re-exec into the new binary happens after the main loop has stopped cleanly.

use std::path::PathBuf;

use crossbeam_channel::{Receiver, Sender};

use crate::selfupdate::{self, Applied, UpdateRequest};
use crate::wire::pb;

/// One SelfUpdate to apply.
#[derive(Debug)]
pub struct UpdateJob {
    pub correlation_id: String,
    pub request: UpdateRequest,
}

/// The `self-update` thread's answer.
#[derive(Debug)]
pub struct UpdateDone {
    pub correlation_id: String,
    pub result: Result<Applied, String>,
}

/// What the main loop knows when a SelfUpdate arrives.
pub struct UpdateState {
    pub auto_update_enabled: bool,
    pub updating: bool,
    pub stopping: bool,
    /// Backups running or queued.
    pub busy: usize,
}

/// Why `u` may not start now, or `None`: never in a build without an update key, only
/// with `auto_update_enabled` or `force`, one at a time, never while shutting down or
/// while a backup runs or waits.
pub fn refusal(u: &pb::SelfUpdate, s: &UpdateState) -> Option<String> {
    if selfupdate::compiled_key().is_none() {
        Some(selfupdate::UNAVAILABLE.to_string())
    } else if !s.auto_update_enabled && !u.force {
        Some("auto_update_enabled is off in the config and the command is not forced".to_string())
    } else if s.updating {
        Some("a self-update is already in progress".into())
    } else if s.stopping {
        Some("the agent is shutting down".into())
    } else if s.busy > 0 {
        Some(format!("{} backup(s) running or queued; send the update again when they are done", s.busy))
    } else {
        None
    }
}

/// The request of a SelfUpdate.
pub fn request(u: pb::SelfUpdate) -> UpdateRequest {
    UpdateRequest {
        url: u.binary_url,
        sha256: u.sha256,
        signature: selfupdate::signature_from_file(&u.cosign_signature),
        version: (!u.target_version.is_empty()).then_some(u.target_version),
        force: u.force,
        // A control plane's force never downgrades unless the host says so.
        allow_downgrade: crate::env::Env::get().allow_downgrade,
    }
}

/// Starts the `self-update` thread: one update at a time, each answered on the returned
/// receiver. It ends when the job channel closes.
pub fn start(state_dir: PathBuf) -> std::io::Result<(Sender<UpdateJob>, Receiver<UpdateDone>)> {
    let (job_tx, jobs) = crossbeam_channel::unbounded::<UpdateJob>();
    let (done_tx, done) = crossbeam_channel::unbounded();
    std::thread::Builder::new().name("self-update".into()).spawn(move || {
        for UpdateJob { correlation_id, request } in jobs {
            let result = selfupdate::Settings::from_env(&state_dir)
                .map_err(|e| e.to_string())
                .and_then(|settings| selfupdate::apply(&request, &settings).map_err(|e| e.to_string()));
            if done_tx.send(UpdateDone { correlation_id, result }).is_err() {
                return;
            }
        }
    })?;
    Ok((job_tx, done))
}
