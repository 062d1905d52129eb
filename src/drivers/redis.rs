//! Redis, natively: the RDB snapshot streamed over the replication protocol as
//! `redis-cli --rdb` does (no tool, no shared filesystem), and two restores.
//!
//! Dump, on the run thread: connect (TCP, or a UNIX socket when the target's host is a
//! socket path), `AUTH [user] password`, `INFO server` for the version, the hints
//! `REPLCONF capa eof` (we understand the diskless form) and `REPLCONF rdb-only 1` (Redis
//! ≥ 7: send the snapshot only, buffer no command stream for us, close after it), then
//! `PSYNC ? -1` (or `SYNC` where PSYNC is unknown). While the master prepares the
//! snapshot it sends `+FULLRESYNC <replid> <offset>` and newline keep-alives; then
//! `$<len>\r\n` and exactly len bytes (disk-based), or `$EOF:<40-byte mark>\r\n`, the
//! bytes and the same mark (diskless). The returned source's `PayloadReader`, read on
//! `pipeline-dump`, yields exactly the RDB bytes, fails on a short stream, and closes the
//! connection as soon as the payload ends, so no replica connection lingers.
//!
//! The `redis` crate encodes every command and decodes every reply; only the bytes after
//! PSYNC are read by hand, because they are not RESP. The socket has 60 s read and
//! write timeouts: a server that stays silent that long fails the run. The master sends
//! a keep-alive every second while it writes the snapshot, so silence means trouble.
//!
//! Restore, on the caller's thread: [`restore_to_dir`] places an RDB where a stopped
//! redis-server loads it at start; [`restore_replay`] loads it into a throwaway
//! redis-server on a private UNIX socket and replays every key into a running server
//! with `RESTORE key ttl payload [REPLACE]`.
//!
//! Like any replica's full sync, a dump makes the server fork for a BGSAVE (copy-on-write
//! memory while it runs), unless a snapshot for another replica is already under way.
//!
//! TLS (`rediss://` or `tls = "true"`, with `ca_file`, `cert_file` + `key_file`, `sni`,
//! `insecure_skip_verify`): rustls (through [`tls`](super::tls)) wraps the TCP stream
//! before the first command, so AUTH, INFO, PSYNC and the RDB bytes after it, and the
//! RESTORE replay's target connection, all travel inside TLS. The handshake runs at
//! connect time, so a certificate problem is one clear error before anything else. The
//! certificate and host name (or `sni`) are checked unless `insecure_skip_verify = "true"`,
//! which logs a warning on every connection.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use ::redis::{InfoDict, Parser, ServerError, Value};

use super::exec;
use super::{DriverError, Dump, DumpContext, Engine, MAGIC_LEN, Strategy, TargetSpec, check_magic};
use crate::pipeline::Source;

/// Port used when the target gives none.
pub const DEFAULT_PORT: u16 = 6379;
/// How long a TCP connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Silence on the socket after which a read or write fails.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Length of the diskless end-of-payload mark (`RDB_EOF_MARK_SIZE`).
pub const EOF_MARK_LEN: usize = 40;

/// The longest preamble line accepted (`+FULLRESYNC <40 hex> <offset>` is ~60 bytes).
const MAX_LINE: u64 = 4096;
/// Bytes read from the socket at a time in the EOF-mark form.
const MARK_CHUNK: usize = 256 << 10;
/// Keys per SCAN, DUMP and RESTORE round trip in the replay.
const REPLAY_BATCH: usize = 256;
/// Databases the throwaway server accepts (an RDB may SELECT any of them).
const SCRATCH_DATABASES: u32 = 256;
/// How long the throwaway server may take to load the RDB.
const SCRATCH_LOAD_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Starts streaming an RDB snapshot of `spec` over the replication protocol.
///
/// The master may prepare the snapshot for a long time (a BGSAVE, sending keep-alive
/// newlines meanwhile), and may stall mid-stream: a cancel or timeout of the run shuts
/// the socket down, which ends a blocked read at once, before and during the stream.
pub fn dump(spec: &TargetSpec, ctx: &DumpContext) -> Result<Dump, DriverError> {
    let err = |m: String| DriverError::new(&spec.id, m);
    let conn = connect(spec).map_err(err)?;
    let stop = conn.stopper().map_err(|e| err(format!("cannot watch the connection: {e}")))?;
    let watch = {
        let stop = stop.clone();
        crate::cancel::on_cancel(&ctx.cancel, move || stop())
            .map_err(|e| err(format!("cannot start a thread: {e}")))?
    };
    let cancelled = |m: String| {
        if ctx.cancel.is_cancelled() {
            err(format!(
                "stopped while waiting for the snapshot ({}): {m}",
                ctx.cancel.reason().map_or("cancelled".to_string(), |r| r.to_string())
            ))
        } else {
            err(m)
        }
    };
    let endpoint = endpoint(spec);
    let mut session = Session::new(conn, endpoint.clone());
    session.authenticate(spec).map_err(|m| cancelled(format!("{endpoint}: {m}")))?;
    let version = session.server_version().map_err(cancelled)?;
    let payload = session.start_sync().map_err(cancelled)?;
    let size = match payload {
        Payload::Bulk(len) => Some(len),
        Payload::Mark(_) => None,
    };
    let name = format!("redis replication stream from {}", session.endpoint);
    let reader = PayloadReader::new(session.io, payload);
    Ok(Dump {
        source: Source::from_reader(name, reader)
            .with_magic(MAGIC_LEN, Box::new(|head| check_magic(Engine::Redis, head)))
            .with_size_hint(size)
            .with_guard(watch)
            .with_abort(stop),
        engine_version: engine_version(&version),
    })
}

/// "Redis 7.0.15" from `redis_version` of `INFO server`.
pub fn engine_version(redis_version: &str) -> String {
    format!("Redis {redis_version}")
}

/// The dump needs no tool, so Redis is always available; the text says what the agent
/// uses, and whether the RESTORE replay (which needs `redis-server`) can run here.
pub fn capability() -> Option<String> {
    let replay = match exec::find_tool(&["redis-server"]) {
        Some(p) => format!("RESTORE replay through {}", p.display()),
        None => "no redis-server on PATH for the RESTORE replay".to_string(),
    };
    Some(format!("redis native replication (no tool needed); {replay}"))
}

// ------------------------------------------------------------------------ connection

/// A connected socket whose timeouts turn into errors that say what happened.
enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Conn {
    /// Shuts the connection down from any thread: a blocked read returns at once.
    fn stopper(&self) -> io::Result<std::sync::Arc<dyn Fn() + Send + Sync>> {
        Ok(match self {
            Conn::Tcp(s) => {
                let s = s.try_clone()?;
                std::sync::Arc::new(move || {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                })
            }
            Conn::Unix(s) => {
                let s = s.try_clone()?;
                std::sync::Arc::new(move || {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                })
            }
            Conn::Tls(t) => {
                let s = t.sock.try_clone()?;
                std::sync::Arc::new(move || {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                })
            }
        })
    }

    fn set_idle_timeout(&self, t: Duration) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.set_read_timeout(Some(t)).and_then(|_| s.set_write_timeout(Some(t))),
            Conn::Unix(s) => s.set_read_timeout(Some(t)).and_then(|_| s.set_write_timeout(Some(t))),
            Conn::Tls(s) => s.sock.set_read_timeout(Some(t)).and_then(|_| s.sock.set_write_timeout(Some(t))),
        }
    }

    fn idle_timeout(&self) -> Option<Duration> {
        match self {
            Conn::Tcp(s) => s.read_timeout().ok().flatten(),
            Conn::Unix(s) => s.read_timeout().ok().flatten(),
            Conn::Tls(s) => s.sock.read_timeout().ok().flatten(),
        }
    }

    fn timed_out(&self, e: io::Error) -> io::Error {
        if !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
            return e;
        }
        let secs = self.idle_timeout().map(|t| t.as_secs_f64()).unwrap_or(0.0);
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the Redis server sent nothing for {secs} s (stalled, or the network dropped)"),
        )
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = match self {
            Conn::Tcp(s) => s.read(buf),
            Conn::Unix(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
        };
        r.map_err(|e| self.timed_out(e))
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let r = match self {
            Conn::Tcp(s) => s.write(buf),
            Conn::Unix(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        };
        r.map_err(|e| self.timed_out(e))
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.flush(),
            Conn::Unix(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

fn is_unix(spec: &TargetSpec) -> bool {
    spec.strategy == Strategy::UnixSocket || spec.host.starts_with('/')
}

/// "127.0.0.1:6379" or "unix socket /run/redis.sock", for messages.
fn endpoint(spec: &TargetSpec) -> String {
    if is_unix(spec) {
        format!("unix socket {}", spec.host)
    } else {
        let host = if spec.host.is_empty() { "localhost" } else { &spec.host };
        format!("{host}:{}", if spec.port == 0 { DEFAULT_PORT } else { spec.port })
    }
}

/// A boolean target option: absent = false; anything but true/false is an error.
fn flag(spec: &TargetSpec, key: &str) -> Result<bool, String> {
    match spec.options.get(key).map(|v| v.trim().to_ascii_lowercase()) {
        None => Ok(false),
        Some(v) if matches!(v.as_str(), "true" | "1" | "yes") => Ok(true),
        Some(v) if matches!(v.as_str(), "false" | "0" | "no" | "") => Ok(false),
        Some(v) => Err(format!("option {key} = {v:?} is not true or false")),
    }
}

/// The target's TLS settings, or `None` without `tls` (or `rediss://`).
fn tls_settings(spec: &TargetSpec) -> Result<Option<(super::tls::DbTls, String)>, String> {
    use super::tls::{ClientKey, DbTls, Verify};
    if !flag(spec, "tls")? {
        for key in ["ca_file", "cert_file", "key_file", "sni", "insecure_skip_verify"] {
            if spec.options.contains_key(key) {
                return Err(format!("option {key} needs tls = \"true\" (or a rediss:// url)"));
            }
        }
        return Ok(None);
    }
    let opt = |k: &str| spec.options.get(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
    let verify = if flag(spec, "insecure_skip_verify")? { Verify::Off } else { Verify::Full };
    let mut t = DbTls::new(verify);
    t.ca_file = opt("ca_file").map(PathBuf::from);
    t.client_cert = opt("cert_file").map(PathBuf::from);
    t.client_key = opt("key_file").map(|k| ClientKey::File(PathBuf::from(k)));
    let host = if spec.host.is_empty() { "localhost" } else { spec.host.as_str() };
    Ok(Some((t, opt("sni").unwrap_or_else(|| host.to_string()))))
}

/// Wraps `tcp` in TLS and completes the handshake now, so a certificate problem is one
/// clear error naming the server and what did not match.
fn start_tls(spec: &TargetSpec, tcp: TcpStream, tls: &super::tls::DbTls, sni: &str) -> Result<Conn, String> {
    let ep = endpoint(spec);
    if tls.verify == super::tls::Verify::Off {
        log::warn!(
            "target {}: insecure_skip_verify = true: the TLS certificate of {ep} is NOT checked; anyone who \
             can intercept the connection can read the backup and the password",
            spec.id
        );
    }
    let config = tls.client_config().map_err(|m| format!("TLS to {ep}: {m}"))?;
    let name = super::tls::server_name(sni).map_err(|m| format!("TLS to {ep}: sni: {m}"))?;
    let conn = rustls::ClientConnection::new(config, name).map_err(|e| format!("TLS to {ep}: {e}"))?;
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    stream
        .sock
        .set_read_timeout(Some(CONNECT_TIMEOUT))
        .and_then(|_| stream.sock.set_write_timeout(Some(CONNECT_TIMEOUT)))
        .map_err(|e| format!("cannot set socket timeouts: {e}"))?;
    while stream.conn.is_handshaking() {
        if let Err(e) = stream.conn.complete_io(&mut stream.sock) {
            let why = super::tls::explain(&e).unwrap_or_else(|| e.to_string());
            return Err(format!("TLS handshake with {ep} (name {sni:?}) failed: {why}"));
        }
    }
    log::info!(
        "target {}: Redis at {ep} over {} ({})",
        spec.id,
        super::tls::version_name(stream.conn.protocol_version()),
        tls.verify.describe()
    );
    Ok(Conn::Tls(Box::new(stream)))
}

fn connect(spec: &TargetSpec) -> Result<Conn, String> {
    let tls = tls_settings(spec)?;
    let hint = "is redis-server running and listening there?";
    let conn = if is_unix(spec) {
        if tls.is_some() {
            return Err("tls = \"true\" needs a TCP host and port, not a UNIX socket".into());
        }
        let s = UnixStream::connect(&spec.host)
            .map_err(|e| format!("cannot connect to the UNIX socket {}: {e} ({hint})", spec.host))?;
        Conn::Unix(s)
    } else {
        let host = if spec.host.is_empty() { "localhost" } else { spec.host.as_str() };
        let port = if spec.port == 0 { DEFAULT_PORT } else { spec.port };
        let addrs = (host, port).to_socket_addrs().map_err(|e| format!("cannot resolve {host}: {e}"))?;
        let mut last = None;
        let mut stream = None;
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let s = match (stream, last) {
            (Some(s), _) => s,
            (None, Some(e)) => return Err(format!("cannot connect to {host}:{port}: {e} ({hint})")),
            (None, None) => return Err(format!("{host} resolves to no address")),
        };
        let _ = s.set_nodelay(true);
        match &tls {
            Some((settings, sni)) => start_tls(spec, s, settings, sni)?,
            None => Conn::Tcp(s),
        }
    };
    conn.set_idle_timeout(IDLE_TIMEOUT).map_err(|e| format!("cannot set socket timeouts: {e}"))?;
    Ok(conn)
}

/// Why a command failed: the server's error reply, or the connection.
enum CallError {
    Server(ServerError),
    Connection(String),
}

impl CallError {
    fn code(&self) -> Option<&str> {
        match self {
            CallError::Server(e) => Some(e.code()),
            CallError::Connection(_) => None,
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Server(e) => f.write_str(&server_error_text(e)),
            CallError::Connection(m) => f.write_str(m),
        }
    }
}

/// The error as the server wrote it ("WRONGPASS invalid username-password pair …").
fn server_error_text(e: &ServerError) -> String {
    match e.details() {
        Some(d) => format!("{} {d}", e.code()),
        None => e.code().to_string(),
    }
}

/// One connection in request/reply mode. The parser keeps whatever it read past a reply
/// for the next one, so pipelined replies are safe; before PSYNC nothing is in flight,
/// so the raw reader that follows starts exactly at the server's next byte.
struct Session {
    io: BufReader<Conn>,
    parser: Parser,
    endpoint: String,
}

impl Session {
    fn new(conn: Conn, endpoint: String) -> Self {
        Self { io: BufReader::new(conn), parser: Parser::new(), endpoint }
    }

    /// Connects and authenticates.
    fn open(spec: &TargetSpec) -> Result<Self, String> {
        let endpoint = endpoint(spec);
        let mut s = Session::new(connect(spec)?, endpoint.clone());
        s.authenticate(spec).map_err(|m| format!("{endpoint}: {m}"))?;
        Ok(s)
    }

    fn send(&mut self, packed: &[u8]) -> Result<(), CallError> {
        let w = self.io.get_mut();
        w.write_all(packed)
            .and_then(|_| w.flush())
            .map_err(|e| CallError::Connection(format!("sending to {}: {e}", self.endpoint)))
    }

    fn reply(&mut self) -> Result<Value, CallError> {
        match self.parser.parse_value(&mut self.io) {
            Ok(Value::ServerError(e)) => Err(CallError::Server(e)),
            Ok(v) => Ok(v),
            Err(e) => Err(CallError::Connection(format!("reading from {}: {e}", self.endpoint))),
        }
    }

    fn call(&mut self, cmd: &::redis::Cmd) -> Result<Value, CallError> {
        self.send(&zeroize::Zeroizing::new(cmd.get_packed_command()))?;
        self.reply()
    }

    /// Sends every command of `pipe` at once; one entry per command, server errors
    /// included as `Value::ServerError`.
    fn pipeline(&mut self, pipe: &::redis::Pipeline) -> Result<Vec<Value>, CallError> {
        self.send(&pipe.get_packed_pipeline())?;
        let mut out = Vec::with_capacity(pipe.len());
        for _ in 0..pipe.len() {
            match self.reply() {
                Ok(v) => out.push(v),
                Err(CallError::Server(e)) => out.push(Value::ServerError(e)),
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    fn authenticate(&mut self, spec: &TargetSpec) -> Result<(), String> {
        if spec.password.is_none() && spec.username.is_empty() {
            return Ok(());
        }
        let mut cmd = ::redis::cmd("AUTH");
        if !spec.username.is_empty() {
            cmd.arg(&spec.username);
        }
        cmd.arg(spec.password.as_ref().map(|p| p.expose()).unwrap_or(""));
        match self.call(&cmd) {
            Ok(_) => Ok(()),
            Err(e @ CallError::Server(_)) => {
                let who = if spec.username.is_empty() { "the password" } else { "the username and password" };
                Err(format!("authentication failed ({e}): check {who} of the target"))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// `redis_version` from `INFO server`.
    fn server_version(&mut self) -> Result<String, String> {
        let info = match self.call(::redis::cmd("INFO").arg("server")) {
            Ok(v) => v,
            Err(e) if e.code() == Some("NOAUTH") => {
                return Err(format!(
                    "{}: the server requires authentication ({e}): set the target's password (and username for an ACL user)",
                    self.endpoint
                ));
            }
            Err(e) => return Err(format!("{}: INFO server failed: {e}", self.endpoint)),
        };
        let text: String = ::redis::from_redis_value(info)
            .map_err(|e| format!("{}: unexpected reply to INFO server: {e}", self.endpoint))?;
        InfoDict::new(&text).get::<String>("redis_version").ok_or_else(|| {
            format!("{}: INFO server has no redis_version: is this a Redis server?", self.endpoint)
        })
    }

    /// Asks for a full snapshot and reads the preamble up to the payload's first byte.
    fn start_sync(&mut self) -> Result<Payload, String> {
        // Hints only: older servers answer "Unrecognized REPLCONF option", and the
        // master alone decides whether to send the diskless form.
        for (key, value) in [("capa", "eof"), ("rdb-only", "1")] {
            if let Err(e) = self.call(::redis::cmd("REPLCONF").arg(key).arg(value)) {
                log::debug!("{}: REPLCONF {key} {value}: {e}", self.endpoint);
            }
        }
        let mut refusals = Vec::new();
        for args in [&["PSYNC", "?", "-1"][..], &["SYNC"][..]] {
            let mut cmd = ::redis::cmd(args[0]);
            for a in &args[1..] {
                cmd.arg(*a);
            }
            self.send(&cmd.get_packed_command()).map_err(|e| e.to_string())?;
            match read_preamble(&mut self.io) {
                Ok(p) => return Ok(p),
                Err(PreambleError::Refused(line)) => refusals.push(format!("{}: {line}", args[0])),
                Err(PreambleError::Failed(m)) => return Err(format!("{}: {m}", self.endpoint)),
            }
        }
        Err(format!(
            "{}: the server refuses replication commands ({}). The agent streams the snapshot the way a \
             replica does (PSYNC/SYNC); managed services (ElastiCache, MemoryDB, Azure Cache, Memorystore, …) \
             disable them, and an ACL user needs them granted. Grant them \
             (`ACL SETUSER <user> +psync +sync +replconf`), connect as a user that has them, or back up \
             with the provider's own snapshot export",
            self.endpoint,
            refusals.join("; ")
        ))
    }
}

// ------------------------------------------------------------------ replication stream

/// How the master frames the RDB.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Payload {
    /// `$<len>\r\n` then exactly len bytes.
    Bulk(u64),
    /// `$EOF:<mark>\r\n`, the bytes, then the same 40-byte mark.
    Mark([u8; EOF_MARK_LEN]),
}

#[derive(Debug)]
enum PreambleError {
    /// The command was refused (no permission, unknown or disabled command).
    Refused(String),
    Failed(String),
}

/// Reads the master's answer to PSYNC/SYNC up to the first payload byte: newline
/// keep-alives and `+FULLRESYNC` are skipped, an error line is a refusal or a failure.
fn read_preamble(r: &mut impl BufRead) -> Result<Payload, PreambleError> {
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = r
            .by_ref()
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .map_err(|e| PreambleError::Failed(format!("waiting for the snapshot to start: {e}")))?;
        if n == 0 {
            return Err(PreambleError::Failed(
                "the server closed the connection before the snapshot started (see its log)".into(),
            ));
        }
        if line.last() != Some(&b'\n') {
            return Err(PreambleError::Failed(format!(
                "not a Redis replication stream: a line of more than {MAX_LINE} bytes"
            )));
        }
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        match text.first() {
            None => continue, // keep-alive while the master prepares the snapshot
            Some(b'+') if text.starts_with(b"+FULLRESYNC") => {
                log::debug!("master: {}", String::from_utf8_lossy(text));
            }
            Some(b'-') => {
                let msg = String::from_utf8_lossy(&text[1..]).into_owned();
                let refused = msg.starts_with("NOPERM")
                    || msg.contains("unknown command")
                    || msg.contains("command not allowed")
                    || msg.contains("disabled");
                return Err(if refused {
                    PreambleError::Refused(msg)
                } else {
                    PreambleError::Failed(format!("the server did not start the snapshot: {msg}"))
                });
            }
            Some(b'$') => return payload_header(&text[1..]),
            Some(_) => {
                return Err(PreambleError::Failed(format!(
                    "unexpected reply instead of a snapshot: {:?}",
                    String::from_utf8_lossy(&text[..text.len().min(80)])
                )));
            }
        }
    }
}

/// `EOF:<mark>` or `<len>` (after the `$`).
fn payload_header(h: &[u8]) -> Result<Payload, PreambleError> {
    if let Some(mark) = h.strip_prefix(b"EOF:") {
        return match mark.get(..EOF_MARK_LEN).and_then(|m| <[u8; EOF_MARK_LEN]>::try_from(m).ok()) {
            Some(m) => Ok(Payload::Mark(m)),
            None => {
                Err(PreambleError::Failed(format!("end-of-payload mark shorter than {EOF_MARK_LEN} bytes")))
            }
        };
    }
    std::str::from_utf8(h).ok().and_then(|s| s.parse::<u64>().ok()).map(Payload::Bulk).ok_or_else(|| {
        PreambleError::Failed(format!(
            "bad snapshot length {:?}",
            String::from_utf8_lossy(&h[..h.len().min(40)])
        ))
    })
}

/// Yields exactly the RDB bytes of a replication stream whose preamble was read. A
/// stream that ends early is an `UnexpectedEof` error; at the payload's end the
/// connection is dropped.
pub(crate) struct PayloadReader<R: Read> {
    inner: Option<R>,
    state: ReaderState,
    /// Payload bytes received so far (for messages).
    received: u64,
}

enum ReaderState {
    Bulk {
        len: u64,
        left: u64,
    },
    Mark {
        mark: [u8; EOF_MARK_LEN],
        /// `buf[pos..end]`: payload not handed out yet; `buf[end..end + held]`: the last
        /// bytes read, which may be the start of the mark (≤ 40, held back).
        buf: Vec<u8>,
        pos: usize,
        end: usize,
        held: usize,
        seen: bool,
    },
}

impl<R: Read> PayloadReader<R> {
    fn new(inner: R, payload: Payload) -> Self {
        let state = match payload {
            Payload::Bulk(len) => ReaderState::Bulk { len, left: len },
            Payload::Mark(mark) => ReaderState::Mark {
                mark,
                buf: vec![0; EOF_MARK_LEN + MARK_CHUNK],
                pos: 0,
                end: 0,
                held: 0,
                seen: false,
            },
        };
        Self { inner: Some(inner), state, received: 0 }
    }
}

/// One read, retried on EINTR; a failure says how far the snapshot got.
fn read_retrying(r: &mut impl Read, buf: &mut [u8], received: u64) -> io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "reading the snapshot after {received} snapshot bytes: {e}: the RDB is truncated"
                    ),
                ));
            }
            ok => return ok,
        }
    }
}

impl<R: Read> Read for PayloadReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        match &mut self.state {
            ReaderState::Bulk { len, left } => {
                let Some(inner) = self.inner.as_mut().filter(|_| *left > 0) else {
                    self.inner = None;
                    return Ok(0);
                };
                let want = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                let n = read_retrying(inner, &mut buf[..want], self.received)?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "the Redis server closed the connection after {} of {len} snapshot bytes: the RDB is truncated",
                            self.received
                        ),
                    ));
                }
                *left -= n as u64;
                self.received += n as u64;
                if *left == 0 {
                    self.inner = None;
                }
                Ok(n)
            }
            ReaderState::Mark { mark, buf: data, pos, end, held, seen } => loop {
                if *pos < *end {
                    let n = buf.len().min(*end - *pos);
                    buf[..n].copy_from_slice(&data[*pos..*pos + n]);
                    *pos += n;
                    return Ok(n);
                }
                let Some(inner) = self.inner.as_mut().filter(|_| !*seen) else {
                    self.inner = None;
                    return Ok(0);
                };
                // The held-back tail goes to the front, a fresh read after it: the mark
                // may straddle both.
                data.copy_within(*end..*end + *held, 0);
                let so_far = self.received + *held as u64;
                let n = read_retrying(inner, &mut data[*held..*held + MARK_CHUNK], so_far)?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "the Redis server closed the connection after {so_far} snapshot bytes, before the \
                             end-of-snapshot mark: the RDB is truncated"
                        ),
                    ));
                }
                let total = *held + n;
                *pos = 0;
                // The master sends nothing after the mark until we acknowledge it, so
                // the mark, when it comes, ends a read.
                if data[..total].ends_with(mark) {
                    *end = total - EOF_MARK_LEN;
                    *held = 0;
                    *seen = true;
                } else {
                    *held = total.min(EOF_MARK_LEN);
                    *end = total - *held;
                }
                self.received += *end as u64;
            },
        }
    }
}

// -------------------------------------------------------------------------- restore

/// Writes the RDB `rdb` as `<data_dir>/<dbfilename>`, where a redis-server started with
/// `--dir <data_dir> --dbfilename <dbfilename>` loads it. Returns the bytes written.
///
/// The file is written under a temporary name in `data_dir`, fsynced, given the owner
/// and mode of the file it replaces (else the directory's owner, mode 0600), renamed
/// into place and the directory fsynced. The steps around it:
///
/// 1. Stop the server with `SHUTDOWN NOSAVE` (a plain shutdown would save its current
///    data over the restored file).
/// 2. Call this function.
/// 3. If the server runs with `appendonly yes`, it loads the AOF, not the RDB: move the
///    append-only directory (`appendonlydir`) aside and start once with `appendonly no`,
///    then `CONFIG SET appendonly yes` rewrites the AOF from the loaded data.
/// 4. Start the server; it loads the file before it accepts commands.
pub fn restore_to_dir(rdb: &mut dyn Read, data_dir: &Path, dbfilename: &str) -> io::Result<u64> {
    let ctx = |what: String| move |e: io::Error| io::Error::new(e.kind(), format!("{what}: {e}"));
    if dbfilename.is_empty() || dbfilename.contains('/') || dbfilename == "." || dbfilename == ".." {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("dbfilename {dbfilename:?} must be a plain file name"),
        ));
    }
    let dir_meta = fs::metadata(data_dir).map_err(ctx(format!("data directory {}", data_dir.display())))?;
    if !dir_meta.is_dir() {
        return Err(io::Error::other(format!("{} is not a directory", data_dir.display())));
    }
    let target = data_dir.join(dbfilename);
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{dbfilename}.restore-"))
        .tempfile_in(data_dir)
        .map_err(ctx(format!("cannot create a temporary file in {}", data_dir.display())))?;

    let mut head = vec![0u8; MAGIC_LEN];
    let got = crate::crypto::read_up_to(rdb, &mut head).map_err(ctx("reading the RDB".into()))?;
    head.truncate(got);
    check_magic(Engine::Redis, &head)
        .map_err(|m| io::Error::new(io::ErrorKind::InvalidData, format!("not an RDB file: {m}")))?;
    tmp.write_all(&head).map_err(ctx(format!("writing {}", tmp.path().display())))?;
    let rest = io::copy(rdb, tmp.as_file_mut()).map_err(ctx(format!("writing {}", tmp.path().display())))?;
    tmp.as_file().sync_all().map_err(ctx(format!("fsync {}", tmp.path().display())))?;

    let (uid, gid, mode) = match fs::metadata(&target) {
        Ok(m) => (m.uid(), m.gid(), m.mode() & 0o7777),
        Err(_) => (dir_meta.uid(), dir_meta.gid(), 0o600),
    };
    // Only root may give the file away; anyone else writes their own file.
    if let Err(e) = std::os::unix::fs::fchown(tmp.as_file(), Some(uid), Some(gid)) {
        log::debug!("cannot chown the restored RDB to {uid}:{gid}: {e}");
    }
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(mode))
        .map_err(ctx(format!("chmod {}", tmp.path().display())))?;
    tmp.persist(&target).map_err(|e| ctx(format!("renaming into {}", target.display()))(e.error))?;
    File::open(data_dir).and_then(|d| d.sync_all()).map_err(ctx(format!("fsync {}", data_dir.display())))?;
    Ok(got as u64 + rest)
}

/// How [`restore_replay`] runs.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// Overwrite keys that exist in the target (`RESTORE … REPLACE`, and `FUNCTION
    /// RESTORE … REPLACE`). Without it, a key that exists fails the restore.
    pub replace: bool,
    /// The redis-server that reads the RDB; the first `redis-server` on `PATH` when
    /// `None`. It must read the backup's RDB version, and the target must accept its
    /// DUMP format: use the target's own version.
    pub redis_server: Option<PathBuf>,
    /// Where the throwaway server's private directory (the RDB, its socket, its log) goes;
    /// the system temp dir when `None`. It needs room for the whole RDB.
    pub temp_dir: Option<PathBuf>,
}

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Keys restored into the target.
    pub keys: u64,
    /// Keys that expired before they could be restored (and were skipped).
    pub expired: u64,
    /// Databases that had keys.
    pub databases: Vec<u32>,
    /// Whether a function library set was restored too (Redis ≥ 7).
    pub functions: bool,
}

/// Replays the RDB `rdb` into the running server `spec` with `RESTORE key ttl payload`,
/// database by database, TTLs as the remaining milliseconds at replay time; keys already
/// expired are skipped.
///
/// Why a throwaway server and not an RDB parser: splitting an RDB into per-key `RESTORE`
/// payloads means walking every encoding of every RDB version (listpacks, quicklists,
/// three stream layouts, module types, hash-field TTLs in RDB 12) and recomputing each
/// payload's CRC-64. The Rust RDB crates stop years ago (`rdb` knows neither listpacks
/// nor streams) or wrap C. redis-server itself loads any RDB it is new enough for,
/// skips expired keys while loading, and `DUMP` produces exactly what `RESTORE` takes.
/// The cost is a `redis-server` binary on the agent's host, RAM for the dataset while
/// the replay runs, and disk for one copy of the RDB.
///
/// The target must be a standalone server (or a primary): keys are not routed to cluster
/// slots, so a cluster answers MOVED and the replay stops there.
pub fn restore_replay(
    spec: &TargetSpec,
    rdb: &mut dyn Read,
    opts: &ReplayOptions,
) -> Result<ReplayReport, DriverError> {
    let err = |m: String| DriverError::new(&spec.id, m);
    let server = match &opts.redis_server {
        Some(p) => p.clone(),
        None => exec::find_tool(&["redis-server"]).ok_or_else(|| {
            err("the RESTORE replay needs redis-server on this host (to read the RDB), and none is on PATH: \
                 install the target's Redis version, or restore into a data directory instead"
                .into())
        })?,
    };
    // A target that refuses us fails the replay before the RDB is copied and loaded.
    // The connection is not kept: a server with an idle `timeout` could close it while
    // a large RDB loads.
    let mut check = Session::open(spec).map_err(err)?;
    check.call(&::redis::cmd("PING")).map_err(|e| err(format!("{}: {e}", check.endpoint)))?;
    drop(check);
    let parent = opts.temp_dir.clone().unwrap_or_else(std::env::temp_dir);
    let scratch = ScratchServer::start(&server, &parent, rdb).map_err(err)?;
    let mut source = scratch.session().map_err(err)?;
    let mut target = Session::open(spec).map_err(err)?;
    replay(&mut source, &mut target, opts.replace).map_err(err)
}

fn replay(source: &mut Session, target: &mut Session, replace: bool) -> Result<ReplayReport, String> {
    let mut report =
        ReplayReport { functions: replay_functions(source, target, replace)?, ..Default::default() };
    let keyspace: String = source
        .call(::redis::cmd("INFO").arg("keyspace"))
        .ok()
        .and_then(|v| ::redis::from_redis_value(v).ok())
        .ok_or("the throwaway redis-server did not answer INFO keyspace")?;
    let info = InfoDict::new(&keyspace);
    report.databases =
        (0..SCRATCH_DATABASES).filter(|db| info.contains_key(&format!("db{db}").as_str())).collect();
    for &db in &report.databases.clone() {
        source
            .call(::redis::cmd("SELECT").arg(db))
            .map_err(|e| format!("SELECT {db} (throwaway server): {e}"))?;
        target.call(::redis::cmd("SELECT").arg(db)).map_err(|e| {
            format!("{}: cannot select database {db}, which the backup has keys in: {e}", target.endpoint)
        })?;
        let mut cursor = String::from("0");
        loop {
            let reply = source
                .call(::redis::cmd("SCAN").arg(&cursor).arg("COUNT").arg(REPLAY_BATCH))
                .map_err(|e| format!("SCAN (throwaway server): {e}"))?;
            let (next, keys): (String, Vec<Vec<u8>>) =
                ::redis::from_redis_value(reply).map_err(|e| format!("unexpected SCAN reply: {e}"))?;
            for batch in keys.chunks(REPLAY_BATCH) {
                replay_batch(source, target, batch, replace, &mut report)?;
            }
            if next == "0" {
                break;
            }
            cursor = next;
        }
    }
    Ok(report)
}

fn replay_batch(
    source: &mut Session,
    target: &mut Session,
    keys: &[Vec<u8>],
    replace: bool,
    report: &mut ReplayReport,
) -> Result<(), String> {
    let mut read = ::redis::pipe();
    for k in keys {
        read.cmd("PTTL").arg(k).cmd("DUMP").arg(k);
    }
    let values = source.pipeline(&read).map_err(|e| format!("DUMP (throwaway server): {e}"))?;
    let mut write = ::redis::pipe();
    let mut written = Vec::with_capacity(keys.len());
    for (key, pair) in keys.iter().zip(values.chunks(2)) {
        // PTTL: -1 = no expiry (RESTORE's 0), -2 = gone, 0 = expiring now (RESTORE's 0
        // would make it permanent).
        let ttl = match pair {
            [Value::Int(-1), _] => 0,
            [Value::Int(t), _] if *t > 0 => *t,
            [Value::Int(_), _] => {
                report.expired += 1;
                continue;
            }
            _ => return Err(format!("unexpected PTTL reply for key {}: {:?}", show_key(key), pair.first())),
        };
        match &pair[1] {
            Value::BulkString(payload) => {
                write.cmd("RESTORE").arg(key).arg(ttl).arg(payload.as_slice());
                if replace {
                    write.arg("REPLACE");
                }
                written.push(key);
            }
            Value::Nil => report.expired += 1,
            other => return Err(format!("DUMP of key {} failed: {other:?}", show_key(key))),
        }
    }
    if write.is_empty() {
        return Ok(());
    }
    let replies = target.pipeline(&write).map_err(|e| format!("{}: {e}", target.endpoint))?;
    for (key, reply) in written.iter().zip(&replies) {
        if let Value::ServerError(e) = reply {
            let hint = match e.code() {
                "BUSYKEY" => ": the key exists in the target; restore with replace to overwrite it",
                _ if e.details().is_some_and(|d| d.contains("payload version")) => {
                    ": the target is older than the redis-server that read the backup; \
                     replay with a redis-server of the target's version"
                }
                _ => "",
            };
            return Err(format!(
                "{}: RESTORE of key {} failed: {}{hint}",
                target.endpoint,
                show_key(key),
                server_error_text(e)
            ));
        }
    }
    report.keys += written.len() as u64;
    Ok(())
}

/// Copies the function libraries (Redis ≥ 7) when the backup has any.
fn replay_functions(source: &mut Session, target: &mut Session, replace: bool) -> Result<bool, String> {
    let Ok(Value::Array(libraries)) = source.call(::redis::cmd("FUNCTION").arg("LIST")) else {
        return Ok(false); // older than 7: no functions in the RDB
    };
    if libraries.is_empty() {
        return Ok(false);
    }
    let payload = match source.call(::redis::cmd("FUNCTION").arg("DUMP")) {
        Ok(Value::BulkString(p)) => p,
        other => {
            return Err(format!(
                "FUNCTION DUMP (throwaway server): {:?}",
                other.err().map(|e| e.to_string())
            ));
        }
    };
    let mut cmd = ::redis::cmd("FUNCTION");
    cmd.arg("RESTORE").arg(payload);
    if replace {
        cmd.arg("REPLACE");
    }
    target.call(&cmd).map_err(|e| {
        format!("{}: FUNCTION RESTORE of {} libraries failed: {e}", target.endpoint, libraries.len())
    })?;
    Ok(true)
}

fn show_key(k: &[u8]) -> String {
    let s = String::from_utf8_lossy(&k[..k.len().min(100)]);
    format!("{s:?}")
}

/// A redis-server that loads one RDB from a private directory and listens only on a
/// UNIX socket there; killed and its directory removed on drop.
struct ScratchServer {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ScratchServer {
    fn start(server: &Path, parent: &Path, rdb: &mut dyn Read) -> Result<Self, String> {
        fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        let dir = tempfile::Builder::new()
            .prefix(".redis-replay-")
            .tempdir_in(parent)
            .map_err(|e| format!("cannot create a directory in {}: {e}", parent.display()))?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("chmod {}: {e}", dir.path().display()))?;
        restore_to_dir(rdb, dir.path(), "dump.rdb").map_err(|e| format!("copying the RDB: {e}"))?;
        let socket = dir.path().join("redis.sock");
        let log = dir.path().join("redis.log");
        let mut cmd = exec::tool_command(server);
        cmd.arg("--port")
            .arg("0")
            .arg("--unixsocket")
            .arg(&socket)
            .arg("--unixsocketperm")
            .arg("700")
            .arg("--dir")
            .arg(dir.path())
            .arg("--dbfilename")
            .arg("dump.rdb")
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "no"])
            .args(["--databases", &SCRATCH_DATABASES.to_string()])
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        let child = cmd.spawn().map_err(|e| format!("cannot start {}: {e}", server.display()))?;
        let mut s = Self { child, socket, log, _dir: dir };
        s.wait_loaded(server)?;
        Ok(s)
    }

    fn wait_loaded(&mut self, server: &Path) -> Result<(), String> {
        let deadline = Instant::now() + SCRATCH_LOAD_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!(
                    "{} exited ({status}) while loading the RDB (is it older than the server that made the \
                     backup?): {}",
                    server.display(),
                    self.log_tail()
                ));
            }
            if let Ok(mut s) = self.session() {
                match s.call(&::redis::cmd("PING")) {
                    Ok(_) => return Ok(()),
                    Err(e) if e.code() == Some("LOADING") => {}
                    Err(e) => log::debug!("throwaway redis-server: {e}"),
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} did not finish loading the RDB within {} minutes",
                    server.display(),
                    SCRATCH_LOAD_TIMEOUT.as_secs() / 60
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn session(&self) -> Result<Session, String> {
        let conn = UnixStream::connect(&self.socket)
            .map(Conn::Unix)
            .map_err(|e| format!("cannot connect to the throwaway redis-server: {e}"))?;
        conn.set_idle_timeout(IDLE_TIMEOUT).map_err(|e| format!("cannot set socket timeouts: {e}"))?;
        Ok(Session::new(conn, "the throwaway redis-server".into()))
    }

    fn log_tail(&self) -> String {
        let text = fs::read(&self.log).unwrap_or_default();
        let tail = &text[text.len().saturating_sub(1000)..];
        String::from_utf8_lossy(tail).trim().to_string()
    }
}

impl Drop for ScratchServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that hands out `chunks` one read at a time, then ends.
    struct Chunks(std::collections::VecDeque<Vec<u8>>);

    impl Read for Chunks {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let Some(mut c) = self.0.pop_front() else { return Ok(0) };
            let n = c.len().min(buf.len());
            buf[..n].copy_from_slice(&c[..n]);
            if n < c.len() {
                self.0.push_front(c.split_off(n));
            }
            Ok(n)
        }
    }

    fn read_all(r: &mut impl Read, step: usize) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; step];
        loop {
            match r.read(&mut buf)? {
                0 => return Ok(out),
                n => out.extend_from_slice(&buf[..n]),
            }
        }
    }

    const MARK: &[u8; 40] = b"0123456789abcdef0123456789abcdef01234567";

    /// The whole stream as a master sends it: preamble, then the payload's framing.
    fn stream(preamble: &[u8], body: &[u8], split: &[usize]) -> io::BufReader<Chunks> {
        let mut all = preamble.to_vec();
        all.extend_from_slice(body);
        let mut parts = Vec::new();
        let mut last = 0;
        for &s in split {
            parts.push(all[last..s].to_vec());
            last = s;
        }
        parts.push(all[last..].to_vec());
        io::BufReader::with_capacity(16, Chunks(parts.into()))
    }

    #[test]
    fn bulk_payload_yields_exactly_its_length_and_ignores_what_follows() {
        let payload = b"REDIS0010 some rdb bytes \xff12345678";
        let mut body = payload.to_vec();
        body.extend_from_slice(b"*1\r\n$4\r\nPING\r\n"); // the command stream a master sends after it
        let pre = format!("\n\n+FULLRESYNC {} 0\r\n\n\n${}\r\n", "a".repeat(40), payload.len());
        let mut r = stream(pre.as_bytes(), &body, &[1, 3, 30]);
        let p = read_preamble(&mut r).unwrap();
        assert_eq!(p, Payload::Bulk(payload.len() as u64));
        let mut pr = PayloadReader::new(r, p);
        assert_eq!(read_all(&mut pr, 7).unwrap(), payload);
        assert!(pr.inner.is_none(), "the connection is dropped at the payload's end");
    }

    #[test]
    fn bulk_payload_that_ends_early_is_a_truncation_error() {
        let mut r = stream(b"$100\r\n", b"REDIS0010 only forty bytes of a hundred..", &[]);
        let p = read_preamble(&mut r).unwrap();
        let e = read_all(&mut PayloadReader::new(r, p), 64).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(e.to_string().contains("after 41 of 100 snapshot bytes"), "{e}");
    }

    #[test]
    fn eof_mark_form_stops_exactly_at_the_mark_even_split_across_reads() {
        let payload: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut body = payload.clone();
        body.extend_from_slice(MARK);
        let pre = [b"\n+FULLRESYNC x 0\r\n\n$EOF:".as_slice(), MARK, b"\r\n"].concat();
        let end = pre.len() + payload.len();
        // Every way of cutting the mark across two reads, including one byte at a time.
        for cut in [0, 1, 13, 39, 40] {
            let mut r = stream(&pre, &body, &[pre.len() + 10, end - 3, end + cut]);
            let p = read_preamble(&mut r).unwrap();
            assert_eq!(p, Payload::Mark(*MARK));
            let mut pr = PayloadReader::new(r, p);
            assert_eq!(read_all(&mut pr, 333).unwrap(), payload, "cut {cut}");
            assert!(pr.inner.is_none());
        }
        let bytes: Vec<Vec<u8>> = [pre.as_slice(), &body].concat().iter().map(|b| vec![*b]).collect();
        let mut r = io::BufReader::with_capacity(1, Chunks(bytes.into()));
        let p = read_preamble(&mut r).unwrap();
        assert_eq!(read_all(&mut PayloadReader::new(r, p), 1).unwrap(), payload);
    }

    #[test]
    fn eof_mark_form_without_the_mark_is_a_truncation_error() {
        let pre = [b"$EOF:".as_slice(), MARK, b"\r\n"].concat();
        // A partial mark at the very end is not the mark.
        let mut r = stream(&pre, &[b"REDIS0010 payload".as_slice(), &MARK[..39]].concat(), &[]);
        let p = read_preamble(&mut r).unwrap();
        let e = read_all(&mut PayloadReader::new(r, p), 64).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(e.to_string().contains("before the end-of-snapshot mark"), "{e}");
    }

    #[test]
    fn preamble_errors_say_refused_or_failed() {
        let refused = [
            "-NOPERM this user has no permissions to run the 'psync' command\r\n",
            "-ERR unknown command 'PSYNC', with args beginning with: '?' '-1' \r\n",
        ];
        for line in refused {
            let r = read_preamble(&mut io::Cursor::new(line.as_bytes().to_vec()));
            assert!(matches!(r, Err(PreambleError::Refused(_))), "{line}: {r:?}");
        }
        let failed: [&[u8]; 4] = [
            b"-NOMASTERLINK Can't SYNC while not connected with my master\r\n",
            b"\n\n",
            b"$abc\r\n",
            b"HTTP/1.1 400 Bad Request\r\n",
        ];
        for bytes in failed {
            let r = read_preamble(&mut io::Cursor::new(bytes.to_vec()));
            assert!(
                matches!(r, Err(PreambleError::Failed(_))),
                "{:?}: {r:?}",
                String::from_utf8_lossy(bytes)
            );
        }
        let r = read_preamble(&mut io::Cursor::new(vec![b'x'; 10_000]));
        assert!(matches!(r, Err(PreambleError::Failed(m)) if m.contains("more than")));
    }

    #[test]
    fn a_silent_server_is_a_timeout_error_that_says_so() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let conn = Conn::Unix(a);
        conn.set_idle_timeout(Duration::from_millis(100)).unwrap();
        b.write_all(b"REDIS").unwrap();
        let mut pr = PayloadReader::new(conn, Payload::Bulk(100));
        let e = read_all(&mut pr, 64).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(e.to_string().contains("sent nothing for 0.1 s"), "{e}");
        drop(b);
    }

    #[test]
    fn restore_to_dir_refuses_what_is_not_an_rdb_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let e =
            restore_to_dir(&mut io::Cursor::new(b"PGDMP...".to_vec()), dir.path(), "dump.rdb").unwrap_err();
        assert!(e.to_string().contains("not an RDB file"), "{e}");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
        let e = restore_to_dir(&mut io::Cursor::new(b"REDIS0010".to_vec()), dir.path(), "../x").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let n =
            restore_to_dir(&mut io::Cursor::new(b"REDIS0010xyz".to_vec()), dir.path(), "dump.rdb").unwrap();
        assert_eq!(n, 12);
        assert_eq!(fs::read(dir.path().join("dump.rdb")).unwrap(), b"REDIS0010xyz");
        assert_eq!(fs::metadata(dir.path().join("dump.rdb")).unwrap().mode() & 0o777, 0o600);
    }
}
