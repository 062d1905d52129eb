//! A control plane for tests, written from wire-v1.md: a tungstenite WebSocket server on
//! 127.0.0.1:0 (plain or TLS) that records the upgrade request and every envelope it
//! receives, answers Register with RegisterAck (or with a scripted first reply), and lets
//! the test push envelopes or raw frames and drop connections.
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
    pub closed_at: Option<Instant>,
    actions: Sender<Action>,
}

impl Conn {
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
}

impl Shared {
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
        self.shared.lock().unwrap()
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

    /// Sends `envelope` on the newest connection.
    pub fn send_last(&self, envelope: pb::Envelope) {
        let index = self.state().conns.len().checked_sub(1).expect("a connection");
        self.send(index, envelope);
    }

    /// Asks connection `index` (in accept order) to do `action`.
    pub fn act(&self, index: usize, action: Action) {
        let _ = self.state().conns[index].actions.send(action);
    }

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
            Ok((tcp, _)) if shared.lock().unwrap().refuse => drop(tcp),
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
    tcp.set_nonblocking(false).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let stream = match tls {
        None => ServerStream::Plain(tcp.try_clone().unwrap()),
        Some(config) => {
            let conn = rustls::ServerConnection::new(config).unwrap();
            let mut s = rustls::StreamOwned::new(conn, tcp.try_clone().unwrap());
            let mut ok = true;
            while s.conn.is_handshaking() {
                if s.conn.complete_io(&mut s.sock).is_err() {
                    ok = false;
                    break;
                }
            }
            if !ok {
                shared.lock().unwrap().failed_handshakes += 1;
                return;
            }
            ServerStream::Tls(Box::new(s))
        }
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
            shared.lock().unwrap().failed_handshakes += 1;
            return;
        }
    };
    let (path, authorization) = seen.unwrap_or_default();
    let (tx, actions): (Sender<Action>, Receiver<Action>) = crossbeam_channel::unbounded();
    let index = {
        let mut s = shared.lock().unwrap();
        s.conns.push(Conn {
            accepted_at: Instant::now(),
            path,
            authorization,
            received: Vec::new(),
            closed_at: None,
            actions: tx,
        });
        s.conns.len() - 1
    };
    tcp.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
    let close = |shared: &Mutex<Shared>| {
        let _ = tcp.shutdown(std::net::Shutdown::Both);
        shared.lock().unwrap().conns[index].closed_at = Some(Instant::now());
    };
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
                let reply = {
                    let mut s = shared.lock().unwrap();
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
                if let Some(reply) = reply
                    && ws.send(reply).is_err()
                {
                    return close(shared);
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
