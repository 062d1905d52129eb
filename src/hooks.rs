//! Pre- and post-hooks: shell commands around a run.
//!
//! Hooks from the operator's own TOML run as given; hooks pushed by a control plane will
//! run only with `BACKUPY_ALLOW_HOOKS=true` (connected mode). Each runs as
//! `/bin/sh -c COMMAND` in its own process group, with an environment built from the
//! allow-list of `drivers::exec` plus `BACKUPY_JOB_ID`, `BACKUPY_RUN_ID`,
//! `BACKUPY_TARGET_ID` and, for post-hooks, `BACKUPY_RUN_STATUS` — never the agent key
//! or a database password. The whole group is killed when the shell exits (so a
//! `sleep 300 &` left behind cannot hold the run), on timeout and on cancel; the last
//! 8 KiB of its output are kept for the log and the error message. Runs on the run's
//! thread, with two `hook-output` threads collecting stdout and stderr into a channel
//! that the run's thread reads with a deadline.

use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::cancel::Cancel;
use crate::drivers::exec::tool_command;
use crate::pipeline::source::tail_of;

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
pub const OUTPUT_CAP: usize = 8 * 1024;
/// How long the output of a hook that ended (or was killed) may still take to drain,
/// past the hook's own timeout.
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

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
    let (Some(out), Some(err)) = (child.stdout.take(), child.stderr.take()) else {
        kill_group(pgid);
        let _ = child.wait();
        return Err(format!("hook {command:?}: its output was not captured"));
    };
    // The readers report through a channel, so the wait for them has a deadline: a
    // process that left the hook's group (setsid) may hold the pipes open for good.
    let (tx, rx) = crossbeam_channel::bounded::<(usize, Vec<u8>)>(2);
    for (i, r) in [Box::new(out) as Box<dyn std::io::Read + Send>, Box::new(err)].into_iter().enumerate() {
        let tx = tx.clone();
        std::thread::Builder::new()
            .name("hook-output".into())
            .spawn(move || {
                let _ = tx.send((i, tail_of(r, OUTPUT_CAP)));
            })
            .map_err(|e| {
                kill_group(pgid);
                format!("hook {command:?}: cannot start a thread: {e}")
            })?;
    }
    drop(tx);
    let t0 = Instant::now();
    let stopped = loop {
        match exited(pgid) {
            Ok(true) => break Ok(()),
            Ok(false) if t0.elapsed() >= timeout => {
                break Err(format!("timed out after {}s", timeout.as_secs()));
            }
            Ok(false) if cancel.is_cancelled() => break Err("cancelled".to_string()),
            Ok(false) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => break Err(format!("waiting for it failed: {e}")),
        }
    };
    // The shell has exited (still a zombie, so its pid, which is the group's id, cannot
    // be reused yet), timed out or was cancelled: whatever it left running in its group
    // (`sleep 300 &`) goes too. Otherwise a background child holds the output pipes, and
    // with them the run, until it ends by itself.
    kill_group(pgid);
    let status = child.wait();
    // stdout first, then stderr, as they were before the readers went on threads.
    let mut parts: [Vec<u8>; 2] = Default::default();
    let mut incomplete = false;
    for _ in 0..2 {
        let left = timeout.saturating_sub(t0.elapsed()).max(OUTPUT_GRACE);
        match rx.recv_timeout(left) {
            Ok((i, part)) => parts[i.min(1)] = part,
            Err(_) => {
                incomplete = true;
                break;
            }
        }
    }
    let [mut output, stderr] = parts;
    output.extend(stderr);
    if output.len() > OUTPUT_CAP {
        output.drain(..output.len() - OUTPUT_CAP);
    }
    let mut output = String::from_utf8_lossy(&output).trim().to_string();
    if incomplete {
        log::warn!(
            "hook {command:?}: a process that left the hook's process group still holds its output; \
             its output is incomplete"
        );
        output.push_str(" [output incomplete: a process outside the hook's group holds it]");
    }
    let suffix = if output.is_empty() { String::new() } else { format!(": {output}") };
    match (stopped, status) {
        (Ok(()), Ok(status)) if status.success() => Ok(output),
        (Ok(()), Ok(status)) => Err(format!("hook {command:?} failed ({status}){suffix}")),
        (Ok(()), Err(e)) => Err(format!("hook {command:?}: waiting for it failed: {e}{suffix}")),
        (Err(why), _) => Err(format!("hook {command:?} {why}{suffix}")),
    }
}

/// Whether the hook's shell `pid` has exited, without reaping it: while it is a zombie
/// its pid stays reserved, so the group kill that follows cannot hit a stranger.
fn exited(pid: i32) -> std::io::Result<bool> {
    // SAFETY: siginfo_t is plain data; all-zero is a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid(2) on our own child, filling in `info`, which we own.
    let rc = unsafe {
        libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: si_pid is valid to read after a successful waitid; 0 = nothing exited yet.
    Ok(unsafe { info.si_pid() } != 0)
}

fn kill_group(pgid: i32) {
    // SAFETY: kill(2) on the process group the hook leads (spawned with process_group(0)).
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
}
