//! One RunBackup of connected mode: the plan built from the control plane's job spec,
//! target and command (pushed hooks only with `BACKUPY_ALLOW_HOOKS=true`, the key decision
//! of wire-v1.md, the multipart extension or the presigned PUT as destination), run by
//! [`runner::execute`] like every other run.
//!
//! The main loop submits a [`ConnectedRun`] to the scheduler, whose pool runs it on a
//! `worker-N` thread under the job's timeout. The run reports on the main loop's channel
//! as [`RunEvent`]s: started, its steps and size estimate, and its outcome (or that it was
//! dropped before it started). It records itself in `state.db` and the metrics, as a
//! standalone run does.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;

use super::convert;
use crate::cancel::Cancel;
use crate::metrics::Metrics;
use crate::pipeline::{Compression, Progress};
use crate::runner::{self, Destination, ErrorKind, Hooks, ObjectName, RunError, RunOutcome, RunPlan, Stored};
use crate::scheduler::{self, SkipReason, Work};
use crate::state::StateDb;
use crate::storage::ObjectWriter;
use crate::storage::s3::{PresignedPut, S3Storage, S3Target};
use crate::wire::pb;

/// What a run tells the main loop while it works.
#[derive(Debug)]
pub enum RunEvent {
    /// A worker took the run.
    Started {
        run_id: String,
    },
    Step {
        run_id: String,
        step: &'static str,
    },
    /// The dump's expected size, for `progress_percent`.
    Estimate {
        run_id: String,
        bytes: u64,
    },
    /// The final JobUpdate and, after a success, the BackupCompleted (boxed: they are
    /// large and every other event is small).
    Finished {
        run_id: String,
        reports: Box<(pb::JobUpdate, Option<pb::BackupCompleted>)>,
    },
    /// Dropped before a worker took it.
    Dropped {
        run_id: String,
        reason: SkipReason,
    },
}

/// Host settings a run needs.
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub state_dir: PathBuf,
    pub allow_hooks: bool,
    pub allow_insecure: bool,
    pub hook_timeout: Duration,
    /// BACKUPY_CA_FILE: trusted for pushed S3 targets too.
    pub ca_file: Option<PathBuf>,
}

/// Everything one run works from, resolved by the main loop when RunBackup arrived.
#[derive(Debug, Clone)]
pub struct RunInput {
    pub job: pb::BackupJobSpec,
    pub target: pb::Target,
    pub command: pb::RunBackup,
}

/// A RunBackup as the scheduler's pool runs it.
pub struct ConnectedRun {
    pub input: RunInput,
    pub settings: RunSettings,
    pub progress: Arc<Progress>,
    pub state: Arc<StateDb>,
    pub metrics: Arc<Metrics>,
    pub report: Report,
}

impl Work for ConnectedRun {
    fn run(self: Box<Self>, cancel: Cancel) -> scheduler::RunOutcome {
        let ConnectedRun { input, settings, progress, state, metrics, report } = *self;
        let (job_id, run_id) = (input.job.id.clone(), input.command.run_id.clone());
        let _ = report.events.send(RunEvent::Started { run_id: run_id.clone() });
        crate::logfwd::set_job(Some(&job_id));
        runner::record_start(&state, &job_id, &run_id, 1);
        let observer = Observer { run_id: run_id.clone(), events: report.events.clone() };
        let outcome = match plan(&settings, &input, &report.events) {
            Ok(plan) => runner::execute(plan, &cancel, progress, &observer),
            Err(e) => RunOutcome::refused(&job_id, &run_id, e),
        };
        let reports = convert::final_reports(&outcome, input.job.timeout_sec);
        runner::record_finish(&state, &metrics, &outcome, &reports.0.error_message);
        crate::logfwd::set_job(None);
        let result = match &outcome.result {
            Ok(_) => scheduler::RunOutcome::Success,
            Err(e) if e.is_cancelled() => scheduler::RunOutcome::Cancelled,
            Err(_) => scheduler::RunOutcome::Failed(reports.0.error_message.clone()),
        };
        report.finished(reports);
        result
    }

    fn dropped(self: Box<Self>, reason: SkipReason) {
        self.report.dropped(reason);
    }
}

/// A run's last word to the main loop, sent exactly once: its reports, that it was
/// dropped before it started, or, when it never got to say either (a panic on the
/// worker, or the run thrown away unrun), a failure that says so. The main loop holds
/// each run until it hears this, so it must never be lost.
pub struct Report {
    run_id: String,
    job_id: String,
    events: Sender<RunEvent>,
    sent: bool,
}

impl Report {
    pub fn new(run_id: &str, job_id: &str, events: Sender<RunEvent>) -> Report {
        Report { run_id: run_id.to_string(), job_id: job_id.to_string(), events, sent: false }
    }

    fn finished(mut self, reports: (pb::JobUpdate, Option<pb::BackupCompleted>)) {
        self.sent = true;
        let _ =
            self.events.send(RunEvent::Finished { run_id: self.run_id.clone(), reports: Box::new(reports) });
    }

    fn dropped(mut self, reason: SkipReason) {
        self.sent = true;
        let _ = self.events.send(RunEvent::Dropped { run_id: self.run_id.clone(), reason });
    }
}

impl Drop for Report {
    fn drop(&mut self) {
        if self.sent {
            return;
        }
        let mut update = convert::job_update(&self.job_id, &self.run_id, pb::JobStatus::Failed);
        update.error_message = "the run ended without a result (the agent's log says why)".into();
        let _ = self
            .events
            .send(RunEvent::Finished { run_id: self.run_id.clone(), reports: Box::new((update, None)) });
    }
}

/// Steps and the size estimate, as RunEvents.
struct Observer {
    run_id: String,
    events: Sender<RunEvent>,
}

impl runner::Observer for Observer {
    fn step(&self, step: &'static str) {
        let _ = self.events.send(RunEvent::Step { run_id: self.run_id.clone(), step });
    }

    fn estimate(&self, bytes: u64) {
        let _ = self.events.send(RunEvent::Estimate { run_id: self.run_id.clone(), bytes });
    }
}

/// The run's plan from the wire; everything the control plane could get wrong fails here,
/// before a hook or a dump starts.
fn plan(settings: &RunSettings, input: &RunInput, events: &Sender<RunEvent>) -> Result<RunPlan, RunError> {
    let (job, cmd) = (&input.job, &input.command);
    let fail = |message: String| RunError::new(&job.id, ErrorKind::Config, message);
    if (!job.pre_hooks.is_empty() || !job.post_hooks.is_empty()) && !settings.allow_hooks {
        return Err(fail(format!(
            "job {} has {} pre-hook(s) and {} post-hook(s) pushed by the control plane; this host runs pushed hooks only with BACKUPY_ALLOW_HOOKS=true",
            job.id,
            job.pre_hooks.len(),
            job.post_hooks.len()
        )));
    }
    let target = convert::target_spec(&input.target).map_err(fail)?;
    let compression =
        Compression::parse(&job.compression).map_err(|e| fail(format!("job {}: {e}", job.id)))?;
    let encryption = convert::encryption_for(job, cmd).map_err(fail)?;
    let destination = upload(settings, cmd, events).map_err(fail)?;
    Ok(RunPlan {
        job_id: job.id.clone(),
        run_id: cmd.run_id.clone(),
        target,
        compression,
        encryption,
        hooks: Hooks {
            pre: job.pre_hooks.clone(),
            post: job.post_hooks.clone(),
            timeout: settings.hook_timeout,
        },
        notify: Default::default(),
        temp_dir: settings.state_dir.join("tmp"),
        destination,
    })
}

/// The control plane's upload target: its multipart extension, else the presigned PUT.
fn upload(
    settings: &RunSettings,
    cmd: &pb::RunBackup,
    events: &Sender<RunEvent>,
) -> Result<Box<dyn Destination>, String> {
    let creds = cmd.upload_creds.clone().unwrap_or_default();
    if let Some(mp) = &creds.multipart {
        let mut target = S3Target::from_wire(mp, settings.allow_insecure).map_err(|e| e.to_string())?;
        target.ca_file = settings.ca_file.clone();
        let storage = S3Storage::new(target, Some(&settings.state_dir)).map_err(|e| e.to_string())?;
        return Ok(Box::new(Upload::Multipart { storage, key: mp.key.clone() }));
    }
    if creds.presigned_put_url.is_empty() {
        return Err("RunBackup carried no upload target (neither multipart nor presigned_put_url)".into());
    }
    let mut put = PresignedPut::new(
        &creds.presigned_put_url,
        &creds.final_s3_key,
        creds.expires_at_ms,
        &settings.state_dir.join("spool"),
        settings.allow_insecure,
    )
    .map_err(|e| e.to_string())?;
    if let Some(ca) = &settings.ca_file {
        put = put.with_ca_file(ca).map_err(|e| e.to_string())?;
    }
    let writer = StepOnCommit { inner: Box::new(put), run_id: cmd.run_id.clone(), events: events.clone() };
    Ok(Box::new(Upload::Presigned { writer: Some(writer), key: creds.final_s3_key.clone() }))
}

/// Where the control plane said the object goes; the key is its, not the agent's.
enum Upload {
    Multipart { storage: S3Storage, key: String },
    Presigned { writer: Option<StepOnCommit>, key: String },
}

impl Destination for Upload {
    fn create(
        &mut self,
        _: &ObjectName<'_>,
        cancel: &Cancel,
    ) -> Result<(Box<dyn ObjectWriter>, String), String> {
        match self {
            Upload::Multipart { storage, key } => {
                Ok((Box::new(storage.create_cancellable(key, cancel.clone())), key.clone()))
            }
            Upload::Presigned { writer, key } => match writer.take() {
                Some(w) => Ok((Box::new(w), key.clone())),
                None => Err("internal error: the presigned PUT was already used".into()),
            },
        }
    }

    fn describe(&self, key: &str) -> String {
        key.to_string()
    }

    fn seal(&mut self, _: &Stored) -> Result<(), String> {
        Ok(())
    }
}

/// The presigned PUT sends its spooled object only at commit: that is the "uploading"
/// step of wire-v1.md.
struct StepOnCommit {
    inner: Box<dyn ObjectWriter>,
    run_id: String,
    events: Sender<RunEvent>,
}

impl std::io::Write for StepOnCommit {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl ObjectWriter for StepOnCommit {
    fn commit(self: Box<Self>) -> std::io::Result<crate::storage::StoredObject> {
        let step = runner::step::UPLOADING;
        let _ = self.events.send(RunEvent::Step { run_id: self.run_id.clone(), step });
        self.inner.commit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_that_never_reports_still_reaches_the_main_loop_once_as_failed() {
        let (tx, rx) = crossbeam_channel::unbounded();
        // A panic unwinding through the worker drops the report unsent.
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _report = Report::new("run-1", "job-1", tx.clone());
            panic!("a bug in a driver");
        }));
        assert!(panicked.is_err());
        match rx.try_recv() {
            Ok(RunEvent::Finished { run_id, reports }) => {
                assert_eq!(run_id, "run-1");
                assert_eq!(reports.0.status, pb::JobStatus::Failed as i32);
                assert!(reports.0.error_message.contains("without a result"), "{}", reports.0.error_message);
                assert!(reports.1.is_none());
            }
            other => panic!("expected one Finished, got {other:?}"),
        }
        assert!(rx.try_recv().is_err(), "exactly one event");

        // A run that reported says nothing more when it goes away.
        let (update, completed) = (convert::job_update("job-1", "run-2", pb::JobStatus::Success), None);
        Report::new("run-2", "job-1", tx.clone()).finished((update, completed));
        Report::new("run-3", "job-1", tx).dropped(SkipReason::Cancelled);
        assert!(matches!(rx.try_recv(), Ok(RunEvent::Finished { run_id, .. }) if run_id == "run-2"));
        assert!(matches!(rx.try_recv(), Ok(RunEvent::Dropped { run_id, .. }) if run_id == "run-3"));
        assert!(rx.try_recv().is_err(), "no event after a report");
    }
}
