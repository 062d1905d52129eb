//! Issue 16, defect 1: a config pushed by the control plane cannot make the agent read a
//! host secret and send it to a server of the control plane's choosing. The real agent
//! against the test control plane; the "database" is a stand-in TCP server that records
//! every byte it receives (agent.md "Secrets", the pushed rules).

use std::io::Read as _;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::common::control_plane::{ControlPlane, envelope};
use crate::connected::{
    KEY, config, job, run_backup, spawn_agent, status, terminal, wait_for, wait_registered,
};
use backupy_agent::wire::pb;

/// A TCP server on 127.0.0.1 that accepts connections and records what each sends, for
/// up to two seconds per connection, then closes it (so a client that did connect fails).
pub(crate) struct StandIn {
    pub(crate) port: u16,
    received: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StandIn {
    pub(crate) fn start() -> StandIn {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (rec, st) = (received.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
                        let index = {
                            let mut r = rec.lock().unwrap_or_else(|p| p.into_inner());
                            r.push(Vec::new());
                            r.len() - 1
                        };
                        let deadline = std::time::Instant::now() + Duration::from_secs(2);
                        let mut buf = [0u8; 4096];
                        while std::time::Instant::now() < deadline && !st.load(Ordering::Relaxed) {
                            match conn.read(&mut buf) {
                                Ok(0) => break,
                                Ok(n) => rec.lock().unwrap_or_else(|p| p.into_inner())[index]
                                    .extend_from_slice(&buf[..n]),
                                Err(_) => {}
                            }
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        StandIn { port, received, stop, thread: Some(thread) }
    }

    /// Every connection so far, with the bytes it sent.
    pub(crate) fn connections(&self) -> Vec<Vec<u8>> {
        self.received.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn all_bytes(&self) -> Vec<u8> {
        self.connections().concat()
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn target(id: &str, db_type: pb::DbType, port: u16, secret_ref: &str) -> pb::Target {
    pb::Target {
        id: id.into(),
        r#type: db_type as i32,
        display_name: String::new(),
        connection: Some(pb::ConnectionConfig {
            host: "127.0.0.1".into(),
            port: port.into(),
            database: "postgres".into(),
            username: "postgres".into(),
            password_secret_ref: secret_ref.into(),
            ..Default::default()
        }),
    }
}

fn creds() -> pb::S3UploadCreds {
    // Never reached: each run fails at its source.
    pb::S3UploadCreds { presigned_put_url: "http://127.0.0.1:9/never".into(), ..Default::default() }
}

#[test]
fn a_pushed_reference_to_the_agent_key_or_a_key_file_fails_the_run_and_sends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let secrets_dir = dir.path().join("secrets");
    std::fs::create_dir(&secrets_dir).unwrap();
    let pem = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIPlantedPrivateKeyBytes0123456789ab\n-----END PRIVATE KEY-----";
    let key_file = dir.path().join("host.key.pem");
    std::fs::write(&key_file, format!("{pem}\n")).unwrap();
    // A symlink inside the secrets directory that leads out of it.
    std::os::unix::fs::symlink(&key_file, secrets_dir.join("innocent")).unwrap();
    let allowed_value = "allowed-db-password-5150";

    let redis_env = StandIn::start();
    let pg_file = StandIn::start();
    let pg_dotdot = StandIn::start();
    let redis_link = StandIn::start();
    let redis_allowed = StandIn::start();
    let cases: Vec<(&str, &StandIn, pb::Target, &[&str])> = vec![
        (
            "run-env",
            &redis_env,
            target("r-env", pb::DbType::Redis, redis_env.port, "env:BACKUPY_AGENT_KEY"),
            &["BACKUPY_* variables", "env:BACKUPY_AGENT_KEY"],
        ),
        (
            "run-file",
            &pg_file,
            target("p-file", pb::DbType::Postgresql, pg_file.port, &format!("file:{}", key_file.display())),
            &["BACKUPY_SECRETS_DIR", "inside"],
        ),
        (
            "run-dotdot",
            &pg_dotdot,
            target(
                "p-dotdot",
                pb::DbType::Postgresql,
                pg_dotdot.port,
                &format!("file:{}/../host.key.pem", secrets_dir.display()),
            ),
            &["BACKUPY_SECRETS_DIR"],
        ),
        (
            "run-link",
            &redis_link,
            target("r-link", pb::DbType::Redis, redis_link.port, "file:innocent"),
            &["BACKUPY_SECRETS_DIR", "symlinks"],
        ),
    ];
    let mut targets: Vec<pb::Target> = cases.iter().map(|c| c.2.clone()).collect();
    // The control case: a variable the host listed resolves and reaches the server, so
    // the stand-in does see what a client sends.
    targets.push(target("r-ok", pb::DbType::Redis, redis_allowed.port, "env:TRUST_ALLOWED_PW"));
    let mut jobs: Vec<pb::BackupJobSpec> = targets
        .iter()
        .map(|t| {
            let mut j = job(&format!("j-{}", t.id), &t.id);
            j.timeout_sec = 30;
            j
        })
        .collect();
    jobs.iter_mut().for_each(|j| j.encryption_enabled = false);

    let cp = ControlPlane::plain();
    cp.state().ack_config = Some(config(1, targets, jobs));
    let secrets_dir_s = secrets_dir.display().to_string();
    let agent = spawn_agent(
        &cp,
        &dir.path().join("state"),
        &[
            ("BACKUPY_SECRETS_DIR", &secrets_dir_s),
            ("TRUST_ALLOWED_PW", allowed_value),
            // Listing a BACKUPY_* name does not open it up.
            ("BACKUPY_PUSHED_SECRET_ENV", "TRUST_ALLOWED_PW,BACKUPY_AGENT_KEY"),
        ],
    );
    wait_registered(&cp, &agent, 0);
    let mut runs: Vec<(&str, &str)> = cases.iter().map(|c| (c.0, c.2.id.as_str())).collect();
    runs.push(("run-ok", "r-ok"));
    for (run, target_id) in &runs {
        cp.send(0, envelope(run, run_backup(&format!("j-{target_id}"), run, creds(), &[])));
    }
    wait_for(&cp, &agent, "every run to end", Duration::from_secs(60), |s| {
        runs.iter().all(|(r, _)| terminal(s, r).is_some())
    });
    // The control case did reach its server with the listed value.
    assert!(
        contains(&redis_allowed.all_bytes(), allowed_value.as_bytes()),
        "the stand-in never saw the allowed password; received {:?}\n{}",
        String::from_utf8_lossy(&redis_allowed.all_bytes()),
        agent.log_tail()
    );

    let s = cp.state();
    for (run, stand_in, t, words) in &cases {
        let end = terminal(&s, run).unwrap();
        assert_eq!(status(&end), pb::JobStatus::Failed, "{run}: {end:?}");
        for w in *words {
            assert!(end.error_message.contains(w), "{run}: {w:?} not in {:?}", end.error_message);
        }
        let got = stand_in.all_bytes();
        assert!(!contains(&got, KEY.as_bytes()), "{run}: the agent key reached {}", t.id);
        assert!(!contains(&got, b"PRIVATE KEY"), "{run}: the key file reached {}", t.id);
        // Nothing at all was sent to the database.
        assert!(stand_in.connections().is_empty(), "{run}: {} was connected to", t.id);
        assert!(!end.error_message.contains(KEY) && !end.error_message.contains("PlantedPrivateKey"));
    }
    drop(s);
    assert!(!agent.log_text().contains("PlantedPrivateKey"));
}
