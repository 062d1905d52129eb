//! Docker for the tests: a stand-in Engine API daemon on a UNIX socket (answers written
//! in the test, every request recorded), and helpers around the real dockerd that
//! scripts/services.sh starts (images built FROM scratch, containers on the host network
//! with the host's /usr, /lib, /lib64, /bin and /etc mounted read-only).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What the stand-in answers: status, extra headers, body. Status 0 answers nothing and
/// keeps the connection open (a stalled stream).
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn json(body: serde_json::Value) -> Self {
        Reply {
            status: 200,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: body.to_string(),
        }
    }

    pub fn status(status: u16, message: &str) -> Self {
        Reply { status, headers: vec![], body: serde_json::json!({ "message": message }).to_string() }
    }
}

type Handler = dyn Fn(&str, &str) -> Reply + Send + Sync;

/// A fake dockerd: HTTP/1.1 with keep-alive on a UNIX socket.
pub struct StandIn {
    pub socket: PathBuf,
    pub requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StandIn {
    pub fn start(socket: &Path, handler: impl Fn(&str, &str) -> Reply + Send + Sync + 'static) -> StandIn {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket).expect("bind the stand-in socket");
        listener.set_nonblocking(true).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(handler);
        let thread = {
            let requests = requests.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            let (requests, handler, stop) = (requests.clone(), handler.clone(), stop.clone());
                            std::thread::spawn(move || serve(conn, &requests, &*handler, &stop));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        StandIn { socket: socket.to_path_buf(), requests, stop, thread: Some(thread) }
    }

    pub fn paths(&self) -> Vec<String> {
        unpoisoned(&self.requests).clone()
    }

    /// Stops accepting and removes the socket (a daemon that went away).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The list even if a thread panicked holding it: that panic is reported already, and a
/// second one on the stand-in's thread would only bury it.
fn unpoisoned<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn serve(conn: UnixStream, requests: &Mutex<Vec<String>>, handler: &Handler, stop: &AtomicBool) {
    // A socket that cannot be set up is closed: the client sees it fail.
    if conn.set_read_timeout(Some(Duration::from_millis(200))).is_err() {
        return;
    }
    let Ok(read_half) = conn.try_clone() else { return };
    let mut reader = BufReader::new(read_half);
    let mut conn = conn;
    loop {
        let mut head = Vec::new();
        // Read the request head line by line (until the empty line).
        loop {
            let mut line = Vec::new();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) => return,
                Ok(_) => {
                    head.extend_from_slice(&line);
                    if line == b"\r\n" {
                        break;
                    }
                }
                Err(_) if !stop.load(Ordering::SeqCst) && head.is_empty() => continue,
                Err(_) => return,
            }
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        if !matches!(req.parse(&head), Ok(httparse::Status::Complete(_))) {
            return;
        }
        let method = req.method.unwrap_or("").to_string();
        let path = req.path.unwrap_or("").to_string();
        let len: usize = req
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        unpoisoned(requests).push(format!("{method} {path}"));
        let reply = handler(&method, &path);
        if reply.status == 0 {
            // A stalled answer: the connection stays open and silent.
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
            }
            return;
        }
        let mut out = format!("HTTP/1.1 {} X\r\nContent-Length: {}\r\n", reply.status, reply.body.len());
        for (k, v) in &reply.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        out.push_str(&reply.body);
        if conn.write_all(out.as_bytes()).is_err() {
            return;
        }
    }
}

// ------------------------------------------------------------------ the real dockerd

/// The socket of the throwaway dockerd, or a panic naming the command that starts it.
pub fn socket() -> PathBuf {
    PathBuf::from(std::env::var("BACKUPY_TEST_DOCKER_SOCKET").unwrap_or_else(|_| {
        panic!(
            "BACKUPY_TEST_DOCKER_SOCKET is not set: this test needs the throwaway dockerd. Run \
             `scripts/test.sh -- docker`, or `scripts/install-deps.sh docker; source scripts/services.sh; \
             services_init; services_start_dockerd` in the shell that runs cargo test"
        )
    }))
}

pub fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .arg("-H")
        .arg(format!("unix://{}", socket().display()))
        .args(args)
        .output()
        .expect("the docker CLI runs (scripts/install-deps.sh docker)")
}

/// `docker ARGS`, which must succeed; its stdout, trimmed.
pub fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(out.status.success(), "docker {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A lock across test processes: exclusive for image builds and for the discovery tests
/// (which must see no other test's containers), shared for the tests that only use
/// containers of their own.
pub fn flock(name: &str, exclusive: bool) -> std::fs::File {
    use std::os::unix::io::AsRawFd;
    let path = std::env::temp_dir().join(format!("backupy-test-docker-{name}.lock"));
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).unwrap();
    let op = if exclusive { libc::LOCK_EX } else { libc::LOCK_SH };
    // SAFETY: flock(2) on a descriptor this function owns.
    let r = unsafe { libc::flock(f.as_raw_fd(), op) };
    assert_eq!(r, 0);
    f
}

pub fn lock(name: &str) -> std::fs::File {
    flock(name, true)
}

/// Taken by tests that run containers of their own; points the agent's code at the test
/// daemon first.
pub fn shared_lock() -> std::fs::File {
    use_test_daemon();
    flock("containers", false)
}

/// Every container a test starts carries this label.
pub const TEST_LABEL: &str = "backupy-test=1";

/// Taken by tests that look at every container of the daemon. Containers that a killed
/// test run left behind are removed first: nobody else holds the lock.
pub fn exclusive_lock() -> std::fs::File {
    use_test_daemon();
    let lock = flock("containers", true);
    let ids = docker_ok(&["ps", "-aq", "--filter", &format!("label={TEST_LABEL}")]);
    for id in ids.split_whitespace() {
        let _ = docker(&["rm", "-f", "-v", id]);
    }
    lock
}

/// Sets `BACKUPY_DOCKER_SOCKET` to the test daemon's socket for the agent code this test
/// process runs.
pub fn use_test_daemon() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    let socket = socket();
    ONCE.call_once(|| {
        // SAFETY: called at the start of a test, before it starts threads; nextest runs
        // each test in a process of its own, and every caller sets the same value.
        unsafe { std::env::set_var("BACKUPY_DOCKER_SOCKET", socket) };
    });
}

/// Builds an empty image `FROM scratch` (plus `extra` Dockerfile lines) tagged `tag`.
pub fn image(tag: &str, extra: &str) {
    let _l = lock("build");
    let dir = tempfile::tempdir().unwrap();
    let path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    std::fs::write(dir.path().join("Dockerfile"), format!("FROM scratch\nENV PATH={path}\n{extra}\n"))
        .unwrap();
    let out = Command::new("docker")
        .arg("-H")
        .arg(format!("unix://{}", socket().display()))
        .args(["build", "-q", "-t", tag])
        .arg(dir.path())
        .env("DOCKER_BUILDKIT", "0")
        .output()
        .expect("docker build runs");
    assert!(out.status.success(), "docker build {tag}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A running container, removed (with whatever runs in it) when dropped.
pub struct Container {
    pub name: String,
    pub id: String,
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", "-v", &self.name]);
    }
}

/// `docker run -d` of `image` on the host network with the host's system directories
/// mounted read-only, `extra` options, and `cmd`.
pub fn run(name: &str, image: &str, extra: &[&str], cmd: &[&str]) -> Container {
    let _ = docker(&["rm", "-f", name]);
    let mut args: Vec<&str> = vec!["run", "-d", "--name", name, "--network", "host", "--label", TEST_LABEL];
    for m in
        ["/usr:/usr:ro", "/lib:/lib:ro", "/lib64:/lib64:ro", "/bin:/bin:ro", "/sbin:/sbin:ro", "/etc:/etc:ro"]
    {
        args.extend(["-v", m]);
    }
    args.extend(extra);
    args.push(image);
    args.extend(cmd);
    let id = docker_ok(&args);
    Container { name: name.to_string(), id }
}

/// Runs `f` until it returns true or `timeout` passes.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The processes running in a container (`docker top`), one line each.
pub fn top(container: &str) -> String {
    docker_ok(&["top", container, "-eo", "pid,args"])
}

/// A temp dir that the database users of the host (postgres, mysql) can reach.
pub fn open_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}
