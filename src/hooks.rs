//! Pre- and post-hooks: shell commands around a run.
//!
//! Hooks from the operator's own TOML run as given; hooks pushed by a control plane will
//! run only with `BACKUPY_ALLOW_HOOKS=true` (connected mode). Each runs as
//! `/bin/sh -c COMMAND` in its own process group, with an environment built from the
//! allow-list of `drivers::exec` plus `BACKUPY_JOB_ID`, `BACKUPY_RUN_ID`,
//! `BACKUPY_TARGET_ID` and, for post-hooks, `BACKUPY_RUN_STATUS` — never the agent key
//! or a database password. The whole group is killed on timeout or cancel; the last
//! 8 KiB of its output are kept for the log and the error message. Runs on the run's
//! thread, with two `hook-output` threads collecting stdout and stderr.

use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::cancel::Cancel;
use crate::drivers::exec::tool_command;
use crate::pipeline::source::tail_of;

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
pub const OUTPUT_CAP: usize = 8 * 1024;

/// What a hook knows about its run.
pub struct HookContext<'a> {
    pub job_id: &'a str,
    pub run_id: &'a str,
    pub target_id: &'a str,
    /// `success`, `failed` or `cancelled`, for post-hooks.
    pub run_status: Option<&'a str>,
}

/// Runs one hook to completion; the error names the hook and carries its output tail.
pub fn run(
    command: &str,
    ctx: &HookContext<'_>,
    timeout: Duration,
    cancel: &Cancel,
) -> Result<String, String> {
    let mut cmd = tool_command("/bin/sh");
    cmd.arg("-c")
        .arg(command)
        .env("BACKUPY_JOB_ID", ctx.job_id)
        .env("BACKUPY_RUN_ID", ctx.run_id)
        .env("BACKUPY_TARGET_ID", ctx.target_id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if let Some(status) = ctx.run_status {
        cmd.env("BACKUPY_RUN_STATUS", status);
    }
    let mut child = cmd.spawn().map_err(|e| format!("hook {command:?}: cannot start /bin/sh: {e}"))?;
    let pgid = child.id() as i32;
    let out = child.stdout.take().expect("piped");
    let err = child.stderr.take().expect("piped");
    let spawn_tail = |r: Box<dyn std::io::Read + Send>| {
        std::thread::Builder::new().name("hook-output".into()).spawn(move || tail_of(r, OUTPUT_CAP))
    };
    let out_t = spawn_tail(Box::new(out)).map_err(|e| e.to_string())?;
    let err_t = spawn_tail(Box::new(err)).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let stopped = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if t0.elapsed() >= timeout => {
                break Err(format!("timed out after {}s", timeout.as_secs()));
            }
            Ok(None) if cancel.is_cancelled() => break Err("cancelled".to_string()),
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => break Err(format!("waiting for it failed: {e}")),
        }
    };
    if stopped.is_err() {
        // SAFETY: kill(2) on the process group the hook leads (spawned with process_group(0)).
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = child.wait();
    }
    // Children of the hook may still hold the pipes; the group kill above closes them,
    // and a hook that exited normally has no business leaving writers behind.
    let mut output = out_t.join().unwrap_or_default();
    output.extend(err_t.join().unwrap_or_default());
    if output.len() > OUTPUT_CAP {
        output.drain(..output.len() - OUTPUT_CAP);
    }
    let output = String::from_utf8_lossy(&output).trim().to_string();
    let suffix = if output.is_empty() { String::new() } else { format!(": {output}") };
    match stopped {
        Ok(status) if status.success() => Ok(output),
        Ok(status) => Err(format!("hook {command:?} failed ({status}){suffix}")),
        Err(why) => Err(format!("hook {command:?} {why}{suffix}")),
    }
}
