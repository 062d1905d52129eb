//! Pre- and post-hooks through the real `backup` command: a failing pre-hook stops the
//! run before the dump and the post-hook still runs; a hook past its timeout is killed
//! with its children; a hook's environment holds the run's ids and no secret.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::*;

fn config(dir: &Path, hooks: &str) -> std::path::PathBuf {
    rusqlite::Connection::open(dir.join("app.db")).unwrap().execute_batch("CREATE TABLE t(x);").unwrap();
    let p = dir.join("backupy.toml");
    std::fs::write(
        &p,
        format!(
            "[storage]\ndir = \"./backups\"\n[[targets]]\nid = \"app\"\ntype = \"sqlite\"\npath = \"app.db\"\n\
             [[jobs]]\nid = \"nightly\"\ntarget = \"app\"\nencryption = \"none\"\n{hooks}\n"
        ),
    )
    .unwrap();
    p
}

fn backup(config: &Path, env: &[(&str, &str)]) -> std::process::Output {
    let mut c = agent();
    c.args(["backup", "--config"]).arg(config).current_dir(config.parent().unwrap());
    for (k, v) in env {
        c.env(k, v);
    }
    run(c)
}

#[test]
fn a_failing_pre_hook_fails_the_run_before_the_dump_and_the_post_hook_still_runs() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("hooks.log");
    let cfg = config(
        dir.path(),
        &format!(
            "pre_hooks = [\"echo before >> {l}; echo 'disk check failed' >&2; exit 3\"]\n\
             post_hooks = [\"echo after $BACKUPY_RUN_STATUS $BACKUPY_JOB_ID >> {l}\"]",
            l = log.display()
        ),
    );
    let out = backup(&cfg, &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("disk check failed") && err.contains("did not start"), "{err}");
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "before\nafter failed nightly\n");
    assert!(files_under(&dir.path().join("backups")).is_empty(), "no dump was taken");
}

#[test]
fn a_hook_past_its_timeout_is_killed_with_its_children() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("child.pid");
    let cfg = config(
        dir.path(),
        &format!("pre_hooks = [\"sleep 60 & echo $! > {}; wait\"]\nhook_timeout_sec = 1", pidfile.display()),
    );
    let t0 = Instant::now();
    let out = backup(&cfg, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(t0.elapsed() < Duration::from_secs(10), "took {:?}", t0.elapsed());
    assert!(text(&out.stderr).contains("timed out after 1s"), "{}", text(&out.stderr));
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let alive = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
        .map(|s| s.split_whitespace().nth(2) != Some("Z"))
        .unwrap_or(false);
    assert!(!alive, "the hook's child {pid} was killed with its group");
}

#[test]
fn hooks_see_the_run_ids_and_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let pre = dir.path().join("pre.env");
    let post = dir.path().join("post.env");
    let cfg = config(
        dir.path(),
        &format!("pre_hooks = [\"env > {}\"]\npost_hooks = [\"env > {}\"]", pre.display(), post.display()),
    );
    let out = backup(
        &cfg,
        &[
            ("BACKUPY_AGENT_KEY", "planted-agent-key-7f3a9"),
            ("AWS_SECRET_ACCESS_KEY", "planted-s3-secret-55ab"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let pre = std::fs::read_to_string(pre).unwrap();
    let post = std::fs::read_to_string(post).unwrap();
    for env in [&pre, &post] {
        assert!(env.contains("BACKUPY_JOB_ID=nightly") && env.contains("BACKUPY_TARGET_ID=app"), "{env}");
        assert!(env.lines().any(|l| l.starts_with("BACKUPY_RUN_ID=") && l.len() > 20), "{env}");
        assert!(!env.contains("planted-agent-key") && !env.contains("planted-s3-secret"), "{env}");
    }
    assert!(!pre.contains("BACKUPY_RUN_STATUS"));
    assert!(post.contains("BACKUPY_RUN_STATUS=success"), "{post}");
}

/// Issue 16.5: a pre-hook that leaves `sleep 300 &` behind used to hold `backup` for the
/// whole sleep (its child kept the output pipes open). The run goes on once the shell
/// exits, and the background process is killed with the hook's group.
#[test]
fn a_hook_that_leaves_a_background_process_does_not_hold_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("bg.pid");
    let cfg = config(
        dir.path(),
        &format!("pre_hooks = [\"sleep 300 & echo $! > {}; echo started\"]", pidfile.display()),
    );
    let t0 = Instant::now();
    let out = backup(&cfg, &[]);
    let took = t0.elapsed();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(took < Duration::from_secs(30), "backup took {took:?}: the hook's background sleep held it");
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    let pid = pid.trim();
    // The kill is sent before `backup` returns; give init a deadline to reap it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let alive = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().next()) != Some("Z"))
            .unwrap_or(false)
    };
    while alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!alive(), "the hook's background sleep (pid {pid}) is still running");
}

/// Issue 16.5, the other half: a process that leaves the hook's group (`setsid`) cannot
/// be killed with it and keeps the output pipes open. The output is read only until the
/// hook's timeout (plus a short grace), then the run goes on, saying the output is
/// incomplete.
#[test]
fn a_process_that_escapes_the_hooks_group_holds_the_run_no_longer_than_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("escaped.pid");
    let cfg = config(
        dir.path(),
        &format!(
            // The shell exits only once the child has left the group (it writes its pid
            // after setsid(2)): otherwise the group kill at the shell's exit may catch it
            // before it escaped, and the test would prove nothing.
            "pre_hooks = [\"setsid sh -c 'echo $$ > {p}; exec sleep 120' & while [ ! -s {p} ]; do sleep 0.05; done; \
             echo started\"]\nhook_timeout_sec = 2",
            p = pidfile.display()
        ),
    );
    let t0 = Instant::now();
    let out = backup(&cfg, &[]);
    let took = t0.elapsed();
    let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
    // SAFETY: kill(2) on the process this test's hook started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(took < Duration::from_secs(20), "backup took {took:?}: the escaped process held it");
    assert!(text(&out.stderr).contains("output is incomplete"), "{}", text(&out.stderr));
}
