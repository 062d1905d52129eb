//! The worker pool: `max_parallel_jobs` threads (`worker-1`, `worker-2`, …) that run
//! whatever the scheduler thread hands them.
//!
//! Each worker takes a [`Dispatch`] from the dispatch channel (written only by the
//! scheduler thread, which hands out no more runs than there are workers), calls the
//! caller's run function with the run's [`Cancel`], and sends the outcome back on the
//! scheduler's command channel as [`SchedulerCommand::RunFinished`]. A panicking run
//! is reported as failed and the worker lives on. Workers know nothing about time,
//! timeouts or other jobs: the scheduler cancels a run by setting its `Cancel`.

use std::any::Any;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use crossbeam_channel::{Receiver, Sender};

use super::{RunOutcome, RunRequest, SchedulerCommand};
use crate::pipeline::Cancel;

/// The caller's run function, shared by every worker.
pub(super) type RunFn = dyn Fn(RunRequest, Cancel) -> RunOutcome + Send + Sync;

pub(super) struct Dispatch {
    pub request: RunRequest,
    pub cancel: Cancel,
}

pub(super) struct Pool {
    dispatch: Option<Sender<Dispatch>>,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    pub fn start(size: usize, run: Arc<RunFn>, done: &Sender<SchedulerCommand>) -> io::Result<Pool> {
        let (dispatch, work) = crossbeam_channel::unbounded::<Dispatch>();
        let mut workers = Vec::with_capacity(size);
        for n in 1..=size {
            let (work, run, done) = (work.clone(), run.clone(), done.clone());
            let worker = thread::Builder::new()
                .name(format!("worker-{n}"))
                .spawn(move || work_loop(&work, &*run, &done))?;
            workers.push(worker);
        }
        Ok(Pool { dispatch: Some(dispatch), workers })
    }

    /// Hands a run to an idle worker; gives it back if no worker is left.
    pub fn dispatch(&self, run: Dispatch) -> Result<(), Dispatch> {
        match &self.dispatch {
            Some(tx) => tx.send(run).map_err(|e| e.into_inner()),
            None => Err(run),
        }
    }

    /// Closes the dispatch channel and waits for every worker to return.
    pub fn join(mut self) {
        self.dispatch = None;
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

fn work_loop(work: &Receiver<Dispatch>, run: &RunFn, done: &Sender<SchedulerCommand>) {
    for Dispatch { request, cancel } in work.iter() {
        let (job_id, run_id) = (request.job_id.clone(), request.run_id);
        let outcome =
            panic::catch_unwind(AssertUnwindSafe(|| run(request, cancel))).unwrap_or_else(|payload| {
                RunOutcome::Failed(format!("run panicked: {}", panic_message(&*payload)))
            });
        if done.send(SchedulerCommand::RunFinished { job_id, run_id, outcome }).is_err() {
            return;
        }
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}
