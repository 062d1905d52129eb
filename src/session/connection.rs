//! One WebSocket connection: TCP connect, TLS, the HTTP upgrade (written here so that the
//! `Authorization` header never reaches a log line — tungstenite's own client handshake
//! traces the whole request), and the reader and writer threads that share the socket.
//!
//! The reader thread (`session-read`) polls the socket with a short read timeout and
//! sends every frame to the supervisor as an [`Inbound`]; the writer thread
//! (`session-write`) takes [`Outbound`] frames from its channel. They share the
//! `WebSocket` behind a mutex that the reader releases between polls.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use prost::Message as _;
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use rustls_pki_types::ServerName;
use tungstenite::protocol::{Role, WebSocketConfig};
use tungstenite::{Message, WebSocket};
use zeroize::Zeroizing;

use super::url::Endpoint;
use crate::secrets::Secret;
use crate::wire::pb;

/// Frames (and messages) above this are refused (agent.md "Security").
pub const MAX_FRAME_BYTES: usize = 4 << 20;
/// How long the reader holds the socket before letting the writer in.
const POLL: Duration = Duration::from_millis(20);
const MAX_RESPONSE_HEAD: usize = 16 << 10;

/// A TCP stream, wrapped in TLS for `wss`.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// Why a connection attempt failed, in the words an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot reach {endpoint}: {source}")]
    Tcp { endpoint: String, source: io::Error },
    #[error("TLS with {endpoint} failed: {reason}")]
    Tls { endpoint: String, reason: String },
    #[error("{endpoint} refused the WebSocket upgrade: {reason}")]
    Upgrade { endpoint: String, reason: String },
    #[error("{endpoint}: {reason}")]
    Protocol { endpoint: String, reason: String },
}

pub type Socket = WebSocket<Stream>;

/// Connects, upgrades with `Authorization: Bearer <key>`, and returns the socket with
/// `timeout` as its read/write timeout.
pub fn open(
    endpoint: &Endpoint,
    tls: &Arc<ClientConfig>,
    key: &Secret,
    timeout: Duration,
) -> Result<Socket, ConnectError> {
    let name = endpoint.url.clone();
    let tcp_err = |source| ConnectError::Tcp { endpoint: name.clone(), source };
    let addrs: Vec<_> = (endpoint.host.as_str(), endpoint.port).to_socket_addrs().map_err(tcp_err)?.collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the host name resolved to no address");
    let mut tcp = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = e,
        }
    }
    let tcp = tcp.ok_or_else(|| tcp_err(last))?;
    tcp.set_read_timeout(Some(timeout)).map_err(tcp_err)?;
    tcp.set_write_timeout(Some(timeout)).map_err(tcp_err)?;
    let _ = tcp.set_nodelay(true);
    let mut stream = if endpoint.tls {
        let server_name = ServerName::try_from(endpoint.host.clone())
            .map_err(|e| ConnectError::Tls { endpoint: name.clone(), reason: e.to_string() })?;
        let conn = ClientConnection::new(tls.clone(), server_name)
            .map_err(|e| ConnectError::Tls { endpoint: name.clone(), reason: e.to_string() })?;
        let mut s = StreamOwned::new(conn, tcp);
        while s.conn.is_handshaking() {
            s.conn
                .complete_io(&mut s.sock)
                .map_err(|e| ConnectError::Tls { endpoint: name.clone(), reason: e.to_string() })?;
        }
        Stream::Tls(Box::new(s))
    } else {
        Stream::Plain(tcp)
    };
    let leftover = upgrade(&mut stream, endpoint, key)?;
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_FRAME_BYTES))
        .max_frame_size(Some(MAX_FRAME_BYTES));
    Ok(WebSocket::from_partially_read(stream, leftover, Role::Client, Some(config)))
}

/// RFC 6455 client handshake; returns bytes read past the response head.
fn upgrade(stream: &mut Stream, endpoint: &Endpoint, key: &Secret) -> Result<Vec<u8>, ConnectError> {
    let err = |reason: String| ConnectError::Upgrade { endpoint: endpoint.url.clone(), reason };
    let nonce = tungstenite::handshake::client::generate_key();
    let host = if endpoint.host.contains(':') {
        format!("[{}]:{}", endpoint.host, endpoint.port)
    } else {
        format!("{}:{}", endpoint.host, endpoint.port)
    };
    let request = Zeroizing::new(format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {nonce}\r\n\
         Authorization: Bearer {}\r\nUser-Agent: backupy-agent/{}\r\n\r\n",
        endpoint.resource,
        key.expose(),
        env!("CARGO_PKG_VERSION"),
    ));
    stream.write_all(request.as_bytes()).map_err(|e| err(format!("sending the request: {e}")))?;
    stream.flush().map_err(|e| err(format!("sending the request: {e}")))?;

    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_RESPONSE_HEAD {
            return Err(err("response head too large".into()));
        }
        let n = stream.read(&mut chunk).map_err(|e| err(format!("reading the response: {e}")))?;
        if n == 0 {
            return Err(err("connection closed before the response".into()));
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
    };
    let (head, rest) = buf.split_at_checked(head_end).unwrap_or((buf.as_slice(), &[]));
    let head = String::from_utf8_lossy(head);
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("101") {
        return Err(err(format!("HTTP status {:?}", status.trim())));
    }
    let expected = tungstenite::handshake::derive_accept_key(nonce.as_bytes());
    let accept = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("sec-websocket-accept"))
        .map(|(_, v)| v.trim().to_string());
    if accept.as_deref() != Some(expected.as_str()) {
        return Err(err("wrong Sec-WebSocket-Accept".into()));
    }
    Ok(rest.to_vec())
}

/// What the reader (or the writer, on failure) tells the supervisor.
#[derive(Debug)]
pub enum Inbound {
    Envelope(Box<pb::Envelope>),
    /// A frame that carries no envelope (ping, ignored text): proof of life.
    Other,
    /// A pong, with the payload of the ping it answers: proof of life, and of delivery of
    /// everything written before that ping.
    Pong(Vec<u8>),
    Closed(String),
}

/// What the writer can be asked to do.
#[derive(Debug)]
pub enum Outbound {
    Envelope(Vec<u8>),
    /// A WebSocket ping with this payload (≤ 125 bytes).
    Ping(Vec<u8>),
}

/// The threads of one live connection; dropping it closes the socket and joins them.
pub struct Live {
    tcp: TcpStream,
    stop: Arc<AtomicBool>,
    pub outbound: Sender<Outbound>,
    threads: Vec<JoinHandle<()>>,
}

/// Starts the reader and writer over an already registered socket.
pub fn spawn(socket: Socket, inbound: Sender<Inbound>) -> io::Result<Live> {
    let tcp = socket.get_ref().tcp().try_clone()?;
    tcp.set_read_timeout(Some(POLL))?;
    let socket = Arc::new(Mutex::new(socket));
    let stop = Arc::new(AtomicBool::new(false));
    let (out_tx, out_rx) = crossbeam_channel::unbounded();
    let reader = {
        let (socket, stop, inbound) = (socket.clone(), stop.clone(), inbound.clone());
        thread::Builder::new()
            .name("session-read".into())
            .spawn(move || read_loop(&socket, &stop, &inbound))?
    };
    let writer = {
        let stop = stop.clone();
        thread::Builder::new()
            .name("session-write".into())
            .spawn(move || write_loop(&socket, &stop, &out_rx, &inbound))?
    };
    Ok(Live { tcp, stop, outbound: out_tx, threads: vec![reader, writer] })
}

impl Drop for Live {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.tcp.shutdown(Shutdown::Both);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn read_loop(socket: &Mutex<Socket>, stop: &AtomicBool, inbound: &Sender<Inbound>) {
    while !stop.load(Ordering::SeqCst) {
        let result = match socket.lock() {
            Ok(mut ws) => ws.read(),
            Err(_) => return,
        };
        let event = match result {
            Ok(Message::Binary(bytes)) => match pb::Envelope::decode(bytes.as_ref()) {
                Ok(env) => Inbound::Envelope(Box::new(env)),
                Err(e) => Inbound::Closed(format!("a frame did not decode as an Envelope: {e}")),
            },
            Ok(Message::Text(text)) => {
                log::warn!("ignoring a text frame from the control plane ({} bytes)", text.len());
                Inbound::Other
            }
            Ok(Message::Close(frame)) => Inbound::Closed(match frame {
                Some(f) => format!("the server closed the connection ({} {})", f.code, f.reason),
                None => "the server closed the connection".into(),
            }),
            Ok(Message::Pong(payload)) => Inbound::Pong(payload.to_vec()),
            Ok(_) => Inbound::Other,
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) =>
            {
                // Let the writer take the socket between polls.
                thread::sleep(Duration::from_millis(1));
                continue;
            }
            Err(e) => Inbound::Closed(format!("reading from the control plane: {e}")),
        };
        let closed = matches!(event, Inbound::Closed(_));
        if inbound.send(event).is_err() || closed {
            return;
        }
    }
}

fn write_loop(
    socket: &Mutex<Socket>,
    stop: &AtomicBool,
    outbound: &Receiver<Outbound>,
    inbound: &Sender<Inbound>,
) {
    while !stop.load(Ordering::SeqCst) {
        let msg = match outbound.recv_timeout(POLL) {
            Ok(Outbound::Envelope(bytes)) => Message::binary(bytes),
            Ok(Outbound::Ping(payload)) => Message::Ping(payload.into()),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
        };
        let result = match socket.lock() {
            Ok(mut ws) => ws.send(msg),
            Err(_) => return,
        };
        if let Err(e) = result {
            let _ = inbound.send(Inbound::Closed(format!("writing to the control plane: {e}")));
            return;
        }
    }
}
