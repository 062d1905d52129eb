//! A control plane for tests, written from wire-v1.md: a tungstenite WebSocket server on
//! 127.0.0.1:0 (plain or TLS) that records the upgrade request and every envelope it
//! receives, answers Register with RegisterAck (or with a scripted first reply), and lets
//! the test push envelopes or raw frames and drop connections.
//!
//! The server threads never panic and never poison the state's lock: a test that fails
//! while it holds `state()` reports its own assertion, not a second panic from here.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use backupy_agent::wire::pb;
use backupy_agent::wire::pb::envelope::Payload;
use crossbeam_channel::{Receiver, Sender};
use prost::Message as _;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tungstenite::Message;
use tungstenite::handshake::server::{Request, Response};

/// What the server does to a connection, on the test's request.
#[derive(Debug)]
pub enum Action {
    Send(Box<pb::Envelope>),
    Raw(Message),
    Drop,
}

#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub envelope: pb::Envelope,
}

/// One accepted WebSocket connection.
#[derive(Debug)]
pub struct Conn {
    pub accepted_at: Instant,
    pub path: String,
    pub authorization: Option<String>,
    pub received: Vec<Received>,
    /// When the reply to Register (RegisterAck or a scripted first reply) was written.
    pub register_answered_at: Option<Instant>,
    pub closed_at: Option<Instant>,
    actions: Sender<Action>,
}

impl Conn {
    /// The Register frame, once it has been received; by the protocol it comes first.
    pub fn register(&self) -> Option<&pb::Register> {
        match &self.received.first()?.envelope.payload {
            Some(Payload::Register(r)) => Some(r),
            _ => None,
        }
    }

    pub fn payloads(&self) -> Vec<&Payload> {
        self.received.iter().filter_map(|r| r.envelope.payload.as_ref()).collect()
    }
}

#[derive(Debug, Default)]
pub struct Shared {
    pub conns: Vec<Conn>,
    /// TCP connections whose TLS or WebSocket handshake failed.
    pub failed_handshakes: usize,
    /// Replaces RegisterAck as the reply to Register, one per connection, first first.
    pub first_replies: VecDeque<Message>,
    pub heartbeat_interval_sec: u32,
    /// The config of every RegisterAck (default: an empty config, version 7).
    pub ack_config: Option<pb::AgentConfig>,
    /// While set, new TCP connections are closed at once (a control plane that is down).
    pub refuse: bool,
    /// TCP connections closed at once because `refuse` was set.
    pub refused: usize,
    /// How long a received Register frame waits before it is recorded and answered: a
    /// slow control plane, which a test that waits for the connection alone (not for the
    /// Register) would read too early.
    pub register_delay: Duration,
}

impl Shared {
    /// Connection `index` exists, its Register was recorded and the reply to it sent: from
    /// here on, frames the test sends arrive after RegisterAck.
    pub fn registered(&self, index: usize) -> bool {
        self.conns.get(index).is_some_and(|c| c.register_answered_at.is_some())
    }

    /// The Register frame of connection `index`; panics (in the test's thread) when the
    /// test did not wait for it with [`Shared::registered`].
    #[track_caller]
    pub fn register(&self, index: usize) -> pb::Register {
        let conn = self.conns.get(index).unwrap_or_else(|| {
            panic!(
                "connection {index} does not exist ({} so far): wait for `registered({index})`",
                self.conns.len()
            )
        });
        conn.register().cloned().unwrap_or_else(|| {
            panic!("connection {index} has no Register first: {:?}", conn.received.first())
        })
    }

    /// Every envelope received on every connection, in arrival order per connection.
    pub fn all(&self) -> Vec<&pb::Envelope> {
        self.conns.iter().flat_map(|c| c.received.iter().map(|r| &r.envelope)).collect()
    }

    pub fn job_updates(&self, run_id: &str) -> Vec<pb::JobUpdate> {
        self.all()
            .into_iter()
            .filter_map(|e| match &e.payload {
                Some(Payload::JobUpdate(u)) if u.run_id == run_id => Some(u.clone()),
                _ => None,
            })
            .collect()
    }

    pub fn completed(&self, run_id: &str) -> Vec<pb::BackupCompleted> {
        self.all()
            .into_iter()
            .filter_map(|e| match &e.payload {
                Some(Payload::BackupCompleted(c)) if c.run_id == run_id => Some(c.clone()),
                _ => None,
            })
            .collect()
    }

    /// The Ack answering the command sent with `correlation_id`.
    pub fn ack(&self, correlation_id: &str) -> Option<pb::Ack> {
        self.all().into_iter().find_map(|e| match &e.payload {
            Some(Payload::Ack(a)) if a.correlation_id == correlation_id => Some(a.clone()),
            _ => None,
        })
    }

    pub fn logs(&self) -> Vec<pb::LogEvent> {
        self.all()
            .into_iter()
            .filter_map(|e| match &e.payload {
                Some(Payload::Log(l)) => Some(l.clone()),
                _ => None,
            })
            .collect()
    }
}

pub struct ControlPlane {
    pub port: u16,
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlPlane {
    pub fn plain() -> ControlPlane {
        Self::start(None)
    }

    /// TLS with the PEM certificate chain and PKCS#8 key given.
    pub fn tls(cert_pem: &Path, key_pem: &Path) -> ControlPlane {
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(cert_pem).unwrap().map(|c| c.unwrap()).collect();
        let key = PrivateKeyDer::from_pem_file(key_pem).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        Self::start(Some(Arc::new(config)))
    }

    fn start(tls: Option<Arc<ServerConfig>>) -> ControlPlane {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Mutex::new(Shared { heartbeat_interval_sec: 30, ..Default::default() }));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (shared, stop) = (shared.clone(), stop.clone());
            thread::spawn(move || accept_loop(&listener, tls, &shared, &stop))
        };
        ControlPlane { port, shared, stop, thread: Some(thread) }
    }

    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn state(&self) -> MutexGuard<'_, Shared> {
        lock(&self.shared)
    }

    /// Polls `cond` until it holds or `timeout` passes; returns whether it held.
    pub fn wait_until(&self, timeout: Duration, cond: impl Fn(&Shared) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if cond(&self.state()) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// [`ControlPlane::wait_until`], or a panic naming `what` was awaited.
    #[track_caller]
    pub fn wait_for(&self, what: &str, timeout: Duration, cond: impl Fn(&Shared) -> bool) {
        assert!(self.wait_until(timeout, cond), "timed out after {timeout:?} waiting for {what}");
    }

    /// Sends `envelope` on the newest connection.
    pub fn send_last(&self, envelope: pb::Envelope) {
        let index = self.state().conns.len().checked_sub(1).expect("a connection");
        self.send(index, envelope);
    }

    /// Asks connection `index` (in accept order) to do `action`.
    #[track_caller]
    pub fn act(&self, index: usize, action: Action) {
        let s = self.state();
        let conn = s.conns.get(index).unwrap_or_else(|| {
            panic!("connection {index} does not exist ({} so far): wait for it first", s.conns.len())
        });
        // A connection that already closed drops the action, as a real socket would.
        let _ = conn.actions.send(action);
    }

    #[track_caller]
    pub fn send(&self, index: usize, envelope: pb::Envelope) {
        self.act(index, Action::Send(Box::new(envelope)));
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The state even if a thread panicked while holding it: that panic is already reported,
/// and a second one here would only bury it.
fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A server envelope.
pub fn envelope(correlation_id: &str, payload: Payload) -> pb::Envelope {
    pb::Envelope { seq: 0, ts_ms: 0, correlation_id: correlation_id.into(), payload: Some(payload) }
}

enum ServerStream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ServerConnection, TcpStream>>),
}

impl Read for ServerStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ServerStream::Plain(s) => s.read(buf),
            ServerStream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for ServerStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ServerStream::Plain(s) => s.write(buf),
            ServerStream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            ServerStream::Plain(s) => s.flush(),
            ServerStream::Tls(s) => s.flush(),
        }
    }
}

fn accept_loop(
    listener: &TcpListener,
    tls: Option<Arc<ServerConfig>>,
    shared: &Arc<Mutex<Shared>>,
    stop: &Arc<AtomicBool>,
) {
    let mut handlers = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((tcp, _)) if lock(shared).refuse => {
                drop(tcp);
                lock(shared).refused += 1;
            }
            Ok((tcp, _)) => {
                let (tls, shared, stop) = (tls.clone(), shared.clone(), stop.clone());
                handlers.push(thread::spawn(move || serve(tcp, tls, &shared, &stop)));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(5)),
            Err(_) => break,
        }
    }
    for h in handlers {
        let _ = h.join();
    }
}

fn serve(tcp: TcpStream, tls: Option<Arc<ServerConfig>>, shared: &Mutex<Shared>, stop: &AtomicBool) {
    // Any failure before the upgrade counts as a failed handshake: the agent sees a
    // closed connection, and the test sees the count.
    let Some(stream) = handshake(&tcp, tls) else {
        lock(shared).failed_handshakes += 1;
        return;
    };
    let mut seen: Option<(String, Option<String>)> = None;
    // tungstenite's callback signature, not ours.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, resp: Response| {
        let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(String::from);
        seen = Some((req.uri().path().to_string(), auth));
        Ok(resp)
    };
    let mut ws = match tungstenite::accept_hdr(stream, callback) {
        Ok(ws) => ws,
        Err(_) => {
            lock(shared).failed_handshakes += 1;
            return;
        }
    };
    let (path, authorization) = seen.unwrap_or_default();
    let (tx, actions): (Sender<Action>, Receiver<Action>) = crossbeam_channel::unbounded();
    let index = {
        let mut s = lock(shared);
        s.conns.push(Conn {
            accepted_at: Instant::now(),
            path,
            authorization,
            received: Vec::new(),
            register_answered_at: None,
            closed_at: None,
            actions: tx,
        });
        s.conns.len() - 1
    };
    let close = |shared: &Mutex<Shared>| {
        let _ = tcp.shutdown(std::net::Shutdown::Both);
        lock(shared).conns[index].closed_at = Some(Instant::now());
    };
    if tcp.set_read_timeout(Some(Duration::from_millis(10))).is_err() {
        return close(shared);
    }
    while !stop.load(Ordering::SeqCst) {
        while let Ok(action) = actions.try_recv() {
            let result = match action {
                Action::Send(env) => ws.send(Message::binary(env.encode_to_vec())),
                Action::Raw(m) => ws.send(m),
                Action::Drop => return close(shared),
            };
            if result.is_err() {
                return close(shared);
            }
        }
        match ws.read() {
            Ok(Message::Binary(bytes)) => {
                let Ok(env) = pb::Envelope::decode(bytes.as_ref()) else { return close(shared) };
                let is_register = matches!(env.payload, Some(Payload::Register(_)));
                if is_register {
                    let delay = lock(shared).register_delay;
                    thread::sleep(delay);
                }
                let reply = {
                    let mut s = lock(shared);
                    s.conns[index].received.push(Received { at: Instant::now(), envelope: env });
                    is_register.then(|| {
                        s.first_replies.pop_front().unwrap_or_else(|| {
                            let ack = pb::RegisterAck {
                                session_id: format!("session-{index}"),
                                config: Some(
                                    s.ack_config
                                        .clone()
                                        .unwrap_or(pb::AgentConfig { version: 7, ..Default::default() }),
                                ),
                                heartbeat_interval_sec: s.heartbeat_interval_sec,
                                server_time_iso: String::new(),
                            };
                            Message::binary(envelope("", Payload::RegisterAck(ack)).encode_to_vec())
                        })
                    })
                };
                if let Some(reply) = reply {
                    if ws.send(reply).is_err() {
                        return close(shared);
                    }
                    lock(shared).conns[index].register_answered_at = Some(Instant::now());
                }
            }
            Ok(Message::Close(_)) => return close(shared),
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(_) => return close(shared),
        }
    }
    close(shared)
}

/// TLS (when configured) on a blocking socket; `None` when anything fails.
fn handshake(tcp: &TcpStream, tls: Option<Arc<ServerConfig>>) -> Option<ServerStream> {
    tcp.set_nonblocking(false).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let sock = tcp.try_clone().ok()?;
    let Some(config) = tls else { return Some(ServerStream::Plain(sock)) };
    let conn = rustls::ServerConnection::new(config).ok()?;
    let mut s = rustls::StreamOwned::new(conn, sock);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).ok()?;
    }
    Some(ServerStream::Tls(Box::new(s)))
}
