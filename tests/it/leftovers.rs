//! Issues 16.7 and 17.9 through the real binary: a `backup` killed with SIGKILL mid-dump
//! leaves its passfile directory behind; the next `run` on the same state directory
//! removes that and every other leftover of dead runs (SQLite snapshots, restore spools,
//! partial objects, files of an older agent), never a live process's, says so in one
//! log line and counts it in `backupy_agent_leftovers_removed_{total,bytes_total}`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::db;
use crate::common::http::get;
use crate::common::*;

/// The value of one sample line `metric{kind="KIND"} V` of a scrape.
fn sample(body: &str, metric: &str, kind: &str) -> Option<f64> {
    let prefix = format!("{metric}{{kind=\"{kind}\"}} ");
    body.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok())
}

/// "PID_STARTTIME" of a process (field 22 of /proc/PID/stat), as the agent tags files.
fn tag_of(pid: u32) -> String {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(')').unwrap().1;
    let start = rest.split_whitespace().nth(22 - 3).unwrap();
    format!("{pid}_{start}")
}

/// The tag of a process that has exited: its pid with a start time no process has.
fn dead_tag() -> String {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    format!("{pid}_1")
}

fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool, log: &Path) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < timeout, "{what} did not happen within {timeout:?}:\n{}", log_tail(log));
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn leftovers_of_a_killed_run_are_removed_at_start_and_counted() {
    let pg = db::pg();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let database = db::unique("left");
    postgres::Client::connect(
        &format!(
            "host={} port={} user={} password={} dbname=postgres",
            pg.host, pg.port, pg.user, pg.password
        ),
        postgres::NoTls,
    )
    .unwrap()
    .batch_execute(&format!("CREATE DATABASE {database}"))
    .unwrap();
    // A pg_dump that starts a dump and then stalls: the run is mid-dump for as long as
    // the test wants, with its passfile written and its partial object open.
    let tools = d.join("tools");
    std::fs::create_dir_all(&tools).unwrap();
    let stalled = d.join("stalled.pid");
    let fake = tools.join("pg_dump");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\necho $$ > {}\nprintf 'PGDMP'\nhead -c 200000 /dev/zero\nexec sleep 300\n",
            stalled.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        d.join("backupy.toml"),
        format!(
            "state_dir = \"./state\"\n[storage]\ndir = \"./backups\"\n\
             [[targets]]\nid = \"db\"\ntype = \"postgresql\"\nurl = \"postgres://{}@{}:{}/{database}\"\npassword = \"env:TEST_PG_PW\"\n\
             [[jobs]]\nid = \"nightly\"\ntarget = \"db\"\nencryption = \"none\"\n",
            pg.user, pg.host, pg.port
        ),
    )
    .unwrap();
    let log = d.join("backup.log");
    let mut c = agent();
    c.args(["backup", "--config"])
        .arg(d.join("backupy.toml"))
        .env("TEST_PG_PW", &pg.password)
        .env("BACKUPY_TOOL_PATH", &tools)
        .stderr(std::fs::File::create(&log).unwrap());
    let mut backup = c.spawn().unwrap();
    wait_for("the fake pg_dump's start", Duration::from_secs(30), || stalled.exists(), &log);
    let tmp = d.join("state/tmp");
    let secrets_dirs = || -> Vec<String> {
        std::fs::read_dir(&tmp)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(".backupy-secrets-"))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(secrets_dirs().len(), 1, "the running dump's passfile directory");
    backup.kill().unwrap(); // SIGKILL: nothing gets to clean up
    backup.wait().unwrap();
    let pid: i32 = std::fs::read_to_string(&stalled).unwrap().trim().parse().unwrap();
    // SAFETY: kill(2) on the fake pg_dump's process group (the agent made it a leader).
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    let left = secrets_dirs();
    assert_eq!(left.len(), 1, "the killed run left its passfile directory");
    assert!(tmp.join(&left[0]).join("pgpass").exists());

    // More of what dead runs leave, planted; and one file of a live process (this test).
    let dead = dead_tag();
    let live = tag_of(std::process::id());
    std::fs::write(tmp.join(format!(".sqlite-snapshot-{dead}-Ab12Cd")), vec![7u8; 5000]).unwrap();
    std::fs::write(tmp.join(format!(".restore-spool-{dead}-Ef34Gh")), vec![7u8; 300]).unwrap();
    let legacy = tmp.join(".sqlite-snapshot-Ij56Kl");
    std::fs::write(&legacy, vec![7u8; 100]).unwrap();
    let old =
        std::process::Command::new("touch").args(["-d", "10 minutes ago"]).arg(&legacy).status().unwrap();
    assert!(old.success());
    let live_dir = tmp.join(format!(".backupy-secrets-{live}-Mn78Op"));
    std::fs::create_dir_all(&live_dir).unwrap();
    std::fs::write(live_dir.join("pgpass"), "*:*:*:*:x\n").unwrap();
    let objects = d.join("backups/nightly/2026/12/08");
    std::fs::create_dir_all(&objects).unwrap();
    let partial = objects.join(format!(".x.pgdump.zst.{dead}.partial"));
    std::fs::write(&partial, vec![7u8; 1000]).unwrap();
    let live_partial = objects.join(format!(".y.pgdump.zst.{live}.partial"));
    std::fs::write(&live_partial, vec![7u8; 10]).unwrap();
    // Whatever the killed run's storage writer had open, plus the planted dead one.
    let dead_partials =
        files_under(&d.join("backups")).iter().filter(|f| f.ends_with(".partial")).count() as f64 - 1.0;

    // `run` with a job that never fires, on the same state directory and storage.
    rusqlite::Connection::open(d.join("app.db")).unwrap().execute_batch("CREATE TABLE t(x);").unwrap();
    std::fs::write(
        d.join("run.toml"),
        "state_dir = \"./state\"\n[storage]\ndir = \"./backups\"\n\
         [[targets]]\nid = \"app\"\ntype = \"sqlite\"\npath = \"app.db\"\n\
         [[jobs]]\nid = \"yearly\"\ntarget = \"app\"\ncron = \"0 0 1 1 *\"\nencryption = \"none\"\n",
    )
    .unwrap();
    let (port, _port_claim) = reserve_port();
    let addr = format!("127.0.0.1:{port}");
    let run_log = d.join("run.log");
    let mut c = agent();
    c.args(["run", "--config"])
        .arg(d.join("run.toml"))
        .env("BACKUPY_METRICS_LISTEN_ADDR", &addr)
        .stderr(std::fs::File::create(&run_log).unwrap());
    let mut agent_run = c.spawn().unwrap();
    let mut body = String::new();
    wait_for(
        "the metrics endpoint",
        Duration::from_secs(30),
        || {
            let (status, b) = get(&format!("http://{addr}/metrics"));
            body = b;
            status == 200
        },
        &run_log,
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(agent_run.id() as i32, libc::SIGTERM) };
    let t0 = Instant::now();
    while agent_run.try_wait().unwrap().is_none() {
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = agent_run.kill();
            panic!("agent did not stop:\n{}", log_tail(&run_log));
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    let metric = "backupy_agent_leftovers_removed_total";
    assert_eq!(sample(&body, metric, "secrets_dir"), Some(1.0), "{body}");
    assert_eq!(sample(&body, metric, "sqlite_snapshot"), Some(2.0), "{body}");
    assert_eq!(sample(&body, metric, "restore_spool"), Some(1.0), "{body}");
    assert_eq!(sample(&body, metric, "partial_object"), Some(dead_partials), "{body}");
    let bytes = "backupy_agent_leftovers_removed_bytes_total";
    assert_eq!(sample(&body, bytes, "sqlite_snapshot"), Some(5100.0), "{body}");
    assert!(sample(&body, bytes, "partial_object").unwrap() >= 1000.0, "{body}");
    assert!(sample(&body, bytes, "secrets_dir").unwrap() > 0.0, "{body}");

    let run_text = std::fs::read_to_string(&run_log).unwrap();
    let lines: Vec<&str> = run_text.lines().filter(|l| l.contains("leftover")).collect();
    assert_eq!(lines.len(), 1, "one log line:\n{run_text}");
    let total = 4.0 + dead_partials;
    assert!(lines[0].contains(&format!("removed {total} leftover(s) of dead runs")), "{}", lines[0]);
    assert_eq!(
        files_under(&d.join("backups")).iter().filter(|f| f.ends_with(".partial")).count(),
        1,
        "only the live partial stays"
    );

    assert!(!tmp.join(&left[0]).exists(), "the killed run's passfile directory is gone");
    assert!(!legacy.exists() && !partial.exists());
    assert!(live_dir.join("pgpass").exists() && live_partial.exists(), "a live process's files stay");
    let remaining: Vec<String> = std::fs::read_dir(&tmp)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(remaining, vec![live_dir.file_name().unwrap().to_string_lossy().into_owned()]);
}
