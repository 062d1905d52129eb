//! The worker pool: `max_parallel_jobs` threads (`worker-1`, `worker-2`, …) that run
//! whatever the scheduler thread hands them.
//!
//! Each worker takes a [`Dispatch`] from the dispatch channel (written only by the
//! scheduler thread, which hands out no more runs than there are workers), calls the
//! caller's run function (or the submitted run's [`Work`]) with the run's [`Cancel`],
//! and sends the outcome back on the
//! scheduler's command channel as [`SchedulerCommand::RunFinished`]. A panicking run
//! is reported as failed and the worker lives on. Workers know nothing about time,
//! timeouts or other jobs: the scheduler cancels a run by setting its `Cancel`. The pool
//! only grows ([`Pool::grow`]): a worker more than the limit needs just stays idle.

use std::any::Any;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use crossbeam_channel::{Receiver, Sender};

use super::{RunOutcome, RunRequest, SchedulerCommand, Work};
use crate::cancel::Cancel;

/// The caller's run function, shared by every worker.
pub(super) type RunFn = dyn Fn(RunRequest, Cancel) -> RunOutcome + Send + Sync;

pub(super) struct Dispatch {
    pub request: RunRequest,
    pub cancel: Cancel,
    /// A submitted run; `None`: a cron job's, for the run function.
    pub work: Option<Box<dyn Work>>,
}

pub(super) struct Pool {
    dispatch: Option<Sender<Dispatch>>,
    work: Receiver<Dispatch>,
    run: Arc<RunFn>,
    done: Sender<SchedulerCommand>,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    pub fn start(size: usize, run: Arc<RunFn>, done: Sender<SchedulerCommand>) -> io::Result<Pool> {
        let (dispatch, work) = crossbeam_channel::unbounded::<Dispatch>();
        let mut pool = Pool { dispatch: Some(dispatch), work, run, done, workers: Vec::with_capacity(size) };
        pool.grow(size)?;
        Ok(pool)
    }

    /// Starts workers until there are `size`.
    pub fn grow(&mut self, size: usize) -> io::Result<()> {
        while self.workers.len() < size {
            let (work, run, done) = (self.work.clone(), self.run.clone(), self.done.clone());
            let worker = thread::Builder::new()
                .name(format!("worker-{}", self.workers.len() + 1))
                .spawn(move || work_loop(&work, &*run, &done))?;
            self.workers.push(worker);
        }
        Ok(())
    }

    pub fn size(&self) -> usize {
        self.workers.len()
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
    for Dispatch { request, cancel, work } in work.iter() {
        let (job_id, run_id) = (request.job_id.clone(), request.run_id);
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| match work {
            Some(work) => work.run(cancel),
            None => run(request, cancel),
        }))
        .unwrap_or_else(|payload| RunOutcome::Failed(format!("run panicked: {}", panic_message(&*payload))));
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
