//! Commands inside a container (the DOCKER_EXEC strategy): exec create + start, the
//! multiplexed stdout/stderr stream demultiplexed, the exit code from exec inspect.
//!
//! Exec start needs the raw connection in both directions (a restore writes the dump
//! into the process's stdin while reading its output), which ureq does not offer: the
//! request is written by hand on a fresh socket, the response head is parsed with
//! `httparse`, and what follows is Docker's frame stream (8-byte headers: stream type,
//! three zero bytes, big-endian payload length).
//!
//! Secrets go into the exec's `Env`, never its `Cmd` (which `docker inspect` and `ps`
//! show). Every command runs under `sh -c 'echo $$; exec "$@"'`, so the first stdout line
//! is the process's PID inside the container: cancel and timeout then kill exactly that
//! process with a second exec, and nothing is left running.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::client::{Client, DockerError, REQUEST_TIMEOUT};
use crate::pipeline::Source;
use crate::pipeline::source::{RemoteProcess, STDERR_TAIL};
use crate::secrets::Secret;

/// How long a process whose feeding failed may take to end before it is given up on.
const FAILED_FEED_WAIT: Duration = Duration::from_secs(30);

/// A command to run inside a container.
#[derive(Debug, Clone)]
pub struct Command {
    pub container: String,
    /// What to run, as argv; never a secret.
    pub argv: Vec<String>,
    /// Environment for the command (`NAME`, value): passwords go here.
    pub env: Vec<(String, Secret)>,
}

impl Command {
    pub fn new(container: &str, argv: &[&str]) -> Self {
        Self {
            container: container.to_string(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
        }
    }

    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.argv.push(a.into());
        self
    }

    pub fn env(mut self, name: &str, value: Secret) -> Self {
        self.env.push((name.to_string(), value));
        self
    }

    fn program(&self) -> &str {
        self.argv.first().map(String::as_str).unwrap_or("")
    }
}

/// What a command that ran to completion left behind.
#[derive(Debug)]
pub struct Output {
    pub exit_code: i64,
    pub stdout: Vec<u8>,
    /// The last [`STDERR_TAIL`] bytes of stderr, trimmed.
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.exit_code == 0
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).trim().to_string()
    }
}

#[derive(Deserialize)]
struct ExecInspect {
    #[serde(rename = "Running", default)]
    running: bool,
    #[serde(rename = "ExitCode", default)]
    exit_code: Option<i64>,
}

/// A started exec: its id, the PID inside the container, and the connection.
struct Started {
    id: String,
    stream: Demux<io::Chain<io::Cursor<Vec<u8>>, UnixStream>>,
    socket: UnixStream,
}

/// Shared by a streaming source's reader, finisher and killer.
struct Remote {
    client: Client,
    container: String,
    exec_id: String,
    pid: u32,
    finished: AtomicBool,
}

impl Remote {
    /// Kills the process inside the container if its exec still runs.
    fn kill(&self) {
        if self.finished.load(Ordering::SeqCst) {
            return;
        }
        match inspect(&self.client, &self.exec_id) {
            Ok(i) if !i.running => return,
            Err(e) if e.is_not_found() => return,
            _ => {}
        }
        log::info!("stopping process {} inside container {}", self.pid, self.container);
        // A PID is reused only after its process exited, and then the exec is no longer
        // running: checked just above.
        let cmd = Command::new(&self.container, &["kill", "-KILL", &self.pid.to_string()]);
        if let Err(e) = run_plain(&self.client, &cmd, Duration::from_secs(10)) {
            log::warn!("cannot stop process {} in container {}: {e}", self.pid, self.container);
        }
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        // A source dropped before its stream ended (a failed run) leaves nothing behind.
        self.kill();
    }
}

/// Starts `cmd` and returns its stdout as a pipeline source named `name`. The source
/// fails unless the command exits 0 (the error carries the container-side stderr tail);
/// a cancel kills the command inside the container.
pub fn source(client: &Client, cmd: &Command, name: &str) -> Result<Source, DockerError> {
    let mut started = start(client, cmd, false)?;
    let pid = read_pid(&mut started.stream).map_err(|e| {
        let tail = started.stream.tail_text();
        client.protocol(
            "/exec/start",
            format!("{} in container {} did not start: {e}{}", cmd.program(), cmd.container, suffix(&tail)),
        )
    })?;
    // The dump may stay silent for as long as the tool thinks; a cancel ends it.
    started.socket.set_read_timeout(None).map_err(|e| client.io_error("/exec/start", &e))?;
    let remote = Arc::new(Remote {
        client: client.clone(),
        container: cmd.container.clone(),
        exec_id: started.id.clone(),
        pid,
        finished: AtomicBool::new(false),
    });
    let tail = started.stream.tail.clone();
    let finish = {
        let remote = remote.clone();
        let name = name.to_string();
        Box::new(move || {
            let code = wait_exit(&remote.client, &remote.exec_id).map_err(io::Error::other)?;
            remote.finished.store(true, Ordering::SeqCst);
            if code == 0 {
                return Ok(());
            }
            let tail = tail_string(&tail);
            Err(io::Error::other(format!(
                "{name} exited with status {code} inside container {}{}",
                remote.container,
                suffix(&tail)
            )))
        })
    };
    let kill = {
        let remote = remote.clone();
        Arc::new(move || remote.kill())
    };
    drop(started.socket);
    Ok(Source::from_reader(name, started.stream)
        .with_remote(RemoteProcess { finish, kill })
        .with_guard(remote))
}

/// Runs `cmd` to completion with `stdin` (if any) fed to it, keeping at most `max_stdout`
/// bytes of its output. A command still running after `timeout` is killed.
pub fn run(
    client: &Client,
    cmd: &Command,
    stdin: Option<&mut dyn Read>,
    max_stdout: usize,
    timeout: Option<Duration>,
) -> Result<Output, DockerError> {
    let Started { id, mut stream, socket } = start(client, cmd, stdin.is_some())?;
    let not_started = |e: io::Error, tail: String| {
        client.protocol(
            "/exec/start",
            format!("{} in container {} did not start: {e}{}", cmd.program(), cmd.container, suffix(&tail)),
        )
    };
    let pid = match read_pid(&mut stream) {
        Ok(pid) => pid,
        Err(e) => return Err(not_started(e, stream.tail_text())),
    };
    let remote = Remote {
        client: client.clone(),
        container: cmd.container.clone(),
        exec_id: id.clone(),
        pid,
        finished: AtomicBool::new(false),
    };
    socket.set_read_timeout(timeout).map_err(|e| client.io_error("/exec/start", &e))?;
    let tail = stream.tail.clone();
    // The output is read on its own thread so that a process writing much while its
    // stdin is fed can never block on us. It reports through a channel, so that the
    // wait for it can have a deadline once feeding failed.
    let (done_tx, done_rx) = crossbeam_channel::bounded::<io::Result<Vec<u8>>>(1);
    std::thread::Builder::new()
        .name("docker-exec-out".into())
        .spawn(move || {
            let deadline = timeout.map(|t| Instant::now() + t);
            let mut stdout = Vec::new();
            let mut buf = [0u8; 64 << 10];
            let result = loop {
                match stream.read(&mut buf) {
                    Ok(0) => break Ok(stdout),
                    Ok(n) => {
                        let keep = n.min(max_stdout.saturating_sub(stdout.len()));
                        stdout.extend_from_slice(&buf[..keep]);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => break Err(e),
                }
                if deadline.is_some_and(|d| Instant::now() > d) {
                    break Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"));
                }
            };
            let _ = done_tx.send(result);
        })
        .map_err(|e| client.protocol("/exec/start", format!("cannot start a thread: {e}")))?;
    let mut input_failed = None;
    let fed = stdin.map(|input| -> io::Result<u64> {
        let mut watched = crate::drivers::exec::InputErrors { inner: input, error: None, bytes: 0 };
        let mut sock = &socket;
        let copied = sock.set_write_timeout(None).and_then(|_| io::copy(&mut watched, &mut sock));
        input_failed = watched.error.take().map(|e| (watched.bytes, e));
        // The half-close is what tells the process its stdin ended; it is sent also
        // when the copy failed, so that nothing waits for more input for ever.
        let _ = socket.shutdown(std::net::Shutdown::Write);
        copied
    });
    if let Some((bytes, e)) = input_failed {
        // The input failed part-way (a chunk that does not authenticate, a SHA-256
        // mismatch): kill the process before it can take the cut for the end of its
        // input, then drop the connection, which ends the output thread.
        remote.kill();
        let _ = socket.shutdown(std::net::Shutdown::Both);
        let _ = done_rx.recv_timeout(FAILED_FEED_WAIT);
        return Err(client.protocol(
            "/exec/start",
            format!(
                "reading the backup failed after {bytes} bytes had gone to {} in container {}, which was \
                 killed before it could finish: {}",
                cmd.program(),
                cmd.container,
                crate::drivers::exec::input_cause(&e)
            ),
        ));
    }
    let read = match fed {
        // The process stopped reading (it exited or broke): its output ends soon, or
        // it is killed.
        Some(Err(_)) => done_rx.recv_timeout(FAILED_FEED_WAIT).unwrap_or_else(|_| {
            Err(io::Error::new(io::ErrorKind::TimedOut, "it stopped reading its input but did not exit"))
        }),
        _ => done_rx.recv().unwrap_or_else(|_| Err(io::Error::other("output thread panicked"))),
    };
    let stdout = match read {
        Ok(out) => out,
        Err(e) => {
            remote.kill();
            let _ = socket.shutdown(std::net::Shutdown::Both);
            let what = if e.kind() == io::ErrorKind::TimedOut { "did not finish in time" } else { "failed" };
            return Err(client.protocol(
                "/exec/start",
                format!("{} in container {} {what}: {e}", cmd.program(), cmd.container),
            ));
        }
    };
    let exit_code = wait_exit(client, &id)?;
    remote.finished.store(true, Ordering::SeqCst);
    let stderr = tail_string(&tail);
    if exit_code == 0
        && let Some(Err(e)) = fed
    {
        // A process that exits 0 without reading all its input would silently drop data.
        return Err(client.protocol(
            "/exec/start",
            format!("feeding {} in container {}: {e}{}", cmd.program(), cmd.container, suffix(&stderr)),
        ));
    }
    Ok(Output { exit_code, stdout, stderr })
}

/// Runs a short command without input and returns its output (at most 1 MiB of stdout).
pub fn run_plain(client: &Client, cmd: &Command, timeout: Duration) -> Result<Output, DockerError> {
    run(client, cmd, None, 1 << 20, Some(timeout))
}

/// The `Cmd` an exec really runs: `cmd` behind a shell that first prints its PID.
fn wrapped_argv(cmd: &Command) -> Vec<String> {
    let mut argv = vec!["sh".to_string(), "-c".into(), "echo \"$$\"; exec \"$@\"".into(), "sh".into()];
    argv.extend(cmd.argv.iter().cloned());
    argv
}

fn start(client: &Client, cmd: &Command, stdin: bool) -> Result<Started, DockerError> {
    let create = format!("/containers/{}/exec", path_segment(&cmd.container));
    let env: Vec<String> = cmd.env.iter().map(|(k, v)| format!("{k}={}", v.expose())).collect();
    let body = serde_json::json!({
        "AttachStdin": stdin,
        "AttachStdout": true,
        "AttachStderr": true,
        "Tty": false,
        "Cmd": wrapped_argv(cmd),
        "Env": env,
    });
    let created = client.post_json(&create, &body)?;
    let id = created
        .get("Id")
        .and_then(|v| v.as_str())
        .filter(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric()))
        .ok_or_else(|| client.protocol(&create, "no exec Id in the answer".into()))?
        .to_string();
    let (socket, leftover) = hijack(client, &id)?;
    let reader = socket.try_clone().map_err(|e| client.io_error("/exec/start", &e))?;
    Ok(Started { id, stream: Demux::new(io::Cursor::new(leftover).chain(reader)), socket })
}

/// `POST /exec/{id}/start` on a fresh connection that Docker then hands over to the
/// process's streams. Returns the connection and the bytes read past the response head.
fn hijack(client: &Client, id: &str) -> Result<(UnixStream, Vec<u8>), DockerError> {
    let endpoint = format!("/exec/{id}/start");
    let mut sock = client.open_socket(&endpoint)?;
    let body = r#"{"Detach":false,"Tty":false}"#;
    let request = format!(
        "POST {} HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\n\
         Connection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: {}\r\n\r\n{body}",
        client.versioned(&endpoint),
        body.len()
    );
    sock.write_all(request.as_bytes()).map_err(|e| client.io_error(&endpoint, &e))?;
    sock.set_read_timeout(Some(REQUEST_TIMEOUT)).map_err(|e| client.io_error(&endpoint, &e))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let (status, head_len) = loop {
        let n = sock.read(&mut chunk).map_err(|e| client.io_error(&endpoint, &e))?;
        if n == 0 {
            return Err(client.protocol(&endpoint, "connection closed before the response".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => break (resp.code.unwrap_or(0), len),
            Ok(httparse::Status::Partial) if buf.len() < 64 << 10 => continue,
            Ok(httparse::Status::Partial) => {
                return Err(client.protocol(&endpoint, "response head too long".into()));
            }
            Err(e) => return Err(client.protocol(&endpoint, format!("bad response head: {e}"))),
        }
    };
    let rest = buf.split_off(head_len);
    if status != 101 && status != 200 {
        let message = serde_json::from_slice::<serde_json::Value>(&rest)
            .ok()
            .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&rest).trim().chars().take(500).collect());
        return Err(DockerError::Api { socket: client.socket_name(), endpoint, status, message });
    }
    // The request timeout stays until the PID line has arrived (a paused container must
    // not hang the run); the callers then set the stream's own.
    Ok((sock, rest))
}

fn inspect(client: &Client, id: &str) -> Result<ExecInspect, DockerError> {
    client.get_json(&format!("/exec/{id}/json"))
}

/// The exit code once the exec is no longer running. Docker closes the stream a moment
/// before it records the exit code, so this polls briefly.
fn wait_exit(client: &Client, id: &str) -> Result<i64, DockerError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let i = inspect(client, id)?;
        if !i.running
            && let Some(code) = i.exit_code
        {
            return Ok(code);
        }
        if Instant::now() > deadline {
            return Err(client.protocol(
                &format!("/exec/{id}/json"),
                "the exec's output ended but it still runs after 10 s".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The first stdout line: the PID the wrapper shell printed before `exec`.
fn read_pid(stream: &mut impl Read) -> io::Result<u32> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 32 {
        if stream.read(&mut b)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "no output (is there a `sh` in the container?)",
            ));
        }
        if b[0] == b'\n' {
            let text = String::from_utf8_lossy(&line);
            return text
                .trim()
                .parse()
                .map_err(|_| io::Error::other(format!("unexpected first line {text:?}")));
        }
        line.push(b[0]);
    }
    Err(io::Error::other("unexpected first line"))
}

/// A container name or id as one URL path segment.
pub(crate) fn path_segment(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>().replace('+', "%20")
}

fn suffix(tail: &str) -> String {
    if tail.is_empty() { String::new() } else { format!(": {tail}") }
}

fn tail_string(tail: &Mutex<VecDeque<u8>>) -> String {
    let t = tail.lock().unwrap_or_else(|p| p.into_inner());
    let bytes: Vec<u8> = t.iter().copied().collect();
    crate::secrets::redact(String::from_utf8_lossy(&bytes).trim())
}

/// Docker's multiplexed stream: yields stdout bytes, keeps the tail of stderr.
pub struct Demux<R> {
    inner: R,
    stdout_left: usize,
    tail: Arc<Mutex<VecDeque<u8>>>,
}

impl<R: Read> Demux<R> {
    pub fn new(inner: R) -> Self {
        Self { inner, stdout_left: 0, tail: Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL))) }
    }

    /// The stderr seen so far (its last [`STDERR_TAIL`] bytes), trimmed and redacted.
    pub fn tail_text(&self) -> String {
        tail_string(&self.tail)
    }

    /// Reads one frame header; `None` at a clean end of stream.
    fn header(&mut self) -> io::Result<Option<(u8, usize)>> {
        let mut h = [0u8; 8];
        let mut got = 0;
        while got < 8 {
            match self.inner.read(&mut h[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "stream ended inside a frame header",
                    ));
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Some((h[0], u32::from_be_bytes([h[4], h[5], h[6], h[7]]) as usize)))
    }

    fn skip(&mut self, mut len: usize, keep: bool) -> io::Result<()> {
        let mut buf = [0u8; 8192];
        while len > 0 {
            let n = self.inner.read(&mut buf[..len.min(8192)])?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "stream ended inside a frame"));
            }
            if keep {
                let mut t = self.tail.lock().unwrap_or_else(|p| p.into_inner());
                for &b in &buf[..n] {
                    if t.len() == STDERR_TAIL {
                        t.pop_front();
                    }
                    t.push_back(b);
                }
            }
            len -= n;
        }
        Ok(())
    }
}

impl<R: Read> Read for Demux<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.stdout_left == 0 {
            match self.header()? {
                None => return Ok(0),
                Some((1, len)) => self.stdout_left = len,
                Some((2, len)) => self.skip(len, true)?,
                Some((_, len)) => self.skip(len, false)?,
            }
        }
        let want = buf.len().min(self.stdout_left);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "stream ended inside a frame"));
        }
        self.stdout_left -= n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![kind, 0, 0, 0];
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn demux_keeps_stdout_in_order_and_stderr_apart() {
        let mut s = Vec::new();
        s.extend(frame(1, b"PGD"));
        s.extend(frame(2, b"warning: x\n"));
        s.extend(frame(1, b""));
        s.extend(frame(1, b"MP rest"));
        let mut d = Demux::new(&s[..]);
        let mut out = Vec::new();
        d.read_to_end(&mut out).unwrap();
        assert_eq!(out, b"PGDMP rest");
        assert_eq!(d.tail_text(), "warning: x");
    }

    #[test]
    fn demux_reports_a_truncated_frame() {
        let mut s = frame(1, b"hello");
        s.truncate(10);
        let mut out = Vec::new();
        assert_eq!(
            Demux::new(&s[..]).read_to_end(&mut out).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    #[test]
    fn container_names_cannot_escape_their_path_segment() {
        assert_eq!(path_segment("../../_ping?x=1"), "..%2F..%2F_ping%3Fx%3D1");
        assert_eq!(path_segment("a b"), "a%20b");
    }
}
