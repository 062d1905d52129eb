//! The Docker Engine API over a UNIX socket, synchronous.
//!
//! JSON requests go through ureq with a connector that opens the UNIX socket instead of
//! a TCP connection (ureq's pluggable transport), so ureq does all HTTP/1.1 framing
//! (chunked event streams included). The API version is negotiated once, when the client
//! is made: the lower of the daemon's (`/_ping`, `/version`) and [`API_VERSION`], never a
//! hard pin; every later request is prefixed with it. Every request has a timeout; the
//! event stream has its own, longer one and can be interrupted from another thread.

use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use serde::Deserialize;
use ureq::unversioned::resolver::{ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, LazyBuffers, NextTimeout, ShutdownHandle, Transport,
};

/// The variable naming the Engine API socket.
pub const SOCKET_VAR: &str = "BACKUPY_DOCKER_SOCKET";
/// The newest API version this client was written against.
pub const API_VERSION: ApiVersion = ApiVersion(1, 45);
/// The oldest API version that has everything the agent uses (exec `Env`, 1.25).
pub const MIN_API_VERSION: ApiVersion = ApiVersion(1, 25);
/// How long a request may take, connect included (event and exec streams excepted).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connecting to the socket may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JSON answer read (container lists with many labels stay far below).
const MAX_JSON: u64 = 64 << 20;

/// An Engine API version ("1.41").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ApiVersion(pub u32, pub u32);

impl ApiVersion {
    pub fn parse(s: &str) -> Option<Self> {
        let (major, minor) = s.trim().split_once('.')?;
        Some(Self(major.parse().ok()?, minor.parse().ok()?))
    }
}

impl fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

/// What went wrong talking to the Docker daemon, in terms a user can act on.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DockerError {
    #[error(
        "no Docker socket at {socket}: mount the host's socket into the agent's container \
         (-v /var/run/docker.sock:/var/run/docker.sock) or set {SOCKET_VAR}"
    )]
    SocketMissing { socket: String },
    #[error("permission denied on {socket}: mount the socket or add the agent's user to the docker group")]
    PermissionDenied { socket: String },
    #[error("cannot reach the Docker daemon on {socket} ({endpoint}): {message}; is dockerd running?")]
    Unreachable { socket: String, endpoint: String, message: String },
    #[error("the Docker daemon on {socket} did not answer {endpoint} in time ({message})")]
    Timeout { socket: String, endpoint: String, message: String },
    #[error("Docker {endpoint} on {socket}: HTTP {status}: {message}")]
    Api { socket: String, endpoint: String, status: u16, message: String },
    #[error(
        "the Docker daemon on {socket} speaks API {daemon}, older than the {MIN_API_VERSION} \
         this agent needs: upgrade Docker"
    )]
    TooOld { socket: String, daemon: String },
    #[error("Docker {endpoint} on {socket}: unexpected answer: {message}")]
    Protocol { socket: String, endpoint: String, message: String },
}

impl DockerError {
    /// The daemon said 404 (a container or exec that is gone).
    pub fn is_not_found(&self) -> bool {
        matches!(self, DockerError::Api { status: 404, .. })
    }
}

/// A connected Engine API client. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Client {
    socket: PathBuf,
    agent: ureq::Agent,
    api: ApiVersion,
    daemon_version: String,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("socket", &self.socket)
            .field("api", &self.api.to_string())
            .field("daemon_version", &self.daemon_version)
            .finish()
    }
}

/// `/version`'s fields that negotiation needs.
#[derive(Deserialize)]
struct VersionInfo {
    #[serde(rename = "Version", default)]
    version: String,
    #[serde(rename = "ApiVersion", default)]
    api_version: String,
}

impl Client {
    /// Connects to `BACKUPY_DOCKER_SOCKET` (default `/var/run/docker.sock`).
    pub fn from_env() -> Result<Client, DockerError> {
        Client::connect(&crate::env::Env::get().docker_socket)
    }

    /// Connects to the daemon on `socket` and negotiates the API version.
    pub fn connect(socket: &Path) -> Result<Client, DockerError> {
        let agent = new_agent(socket);
        let mut client = Client {
            socket: socket.to_path_buf(),
            agent,
            api: MIN_API_VERSION,
            daemon_version: String::new(),
        };
        client.negotiate()?;
        Ok(client)
    }

    fn negotiate(&mut self) -> Result<(), DockerError> {
        // `/_ping` is the cheapest way to learn whether anyone answers and what it speaks;
        // `/version` adds the engine version and is the authority on the API version.
        let ping = self.request("GET", "/_ping", None, REQUEST_TIMEOUT, false)?;
        let ping_api =
            ping.headers().get("api-version").and_then(|v| v.to_str().ok()).and_then(ApiVersion::parse);
        let info: VersionInfo =
            self.read_json("/version", self.request("GET", "/version", None, REQUEST_TIMEOUT, false)?)?;
        let daemon =
            ApiVersion::parse(&info.api_version).or(ping_api).ok_or_else(|| DockerError::Protocol {
                socket: self.socket_name(),
                endpoint: "/version".into(),
                message: format!("no usable ApiVersion ({:?})", info.api_version),
            })?;
        if daemon < MIN_API_VERSION {
            return Err(DockerError::TooOld { socket: self.socket_name(), daemon: daemon.to_string() });
        }
        self.api = daemon.min(API_VERSION);
        self.daemon_version = info.version;
        log::debug!(
            "Docker {} on {}: API {} (daemon {daemon}, ours {API_VERSION})",
            self.daemon_version,
            self.socket_name(),
            self.api
        );
        Ok(())
    }

    /// The daemon's engine version ("24.0.7"), for `Register.docker_version`.
    pub fn daemon_version(&self) -> &str {
        &self.daemon_version
    }

    /// The negotiated API version.
    pub fn api_version(&self) -> ApiVersion {
        self.api
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub(crate) fn socket_name(&self) -> String {
        self.socket.display().to_string()
    }

    /// `GET endpoint` (e.g. `/containers/json`), decoded from JSON.
    pub fn get_json<T: serde::de::DeserializeOwned>(&self, endpoint: &str) -> Result<T, DockerError> {
        let resp = self.request("GET", endpoint, None, REQUEST_TIMEOUT, true)?;
        self.read_json(endpoint, resp)
    }

    /// `POST endpoint` with a JSON body; the answer decoded from JSON (`null` when empty).
    pub fn post_json(
        &self,
        endpoint: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, DockerError> {
        let resp = self.request("POST", endpoint, Some(body), REQUEST_TIMEOUT, true)?;
        let text = self.read_text(endpoint, resp)?;
        if text.trim().is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_str(&text).map_err(|e| self.protocol(endpoint, format!("not JSON: {e}")))
    }

    /// A streaming `GET` (the event stream): the body as a reader, with no overall
    /// deadline but `idle` as the longest silence tolerated between reads.
    pub fn get_stream(&self, endpoint: &str, idle: Duration) -> Result<Box<dyn Read + Send>, DockerError> {
        let url = self.url(endpoint, true);
        let resp = self
            .agent
            .get(&url)
            .config()
            .timeout_global(None)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_recv_response(Some(REQUEST_TIMEOUT))
            .timeout_per_read(Some(idle))
            .build()
            .call()
            .map_err(|e| self.transport_error(endpoint, e))?;
        let resp = self.check_status(endpoint, resp)?;
        Ok(Box::new(resp.into_body().into_reader()))
    }

    /// Interrupts every request in flight on this client and its clones (the event
    /// stream of a watcher that is being stopped).
    pub fn shutdown(&self) {
        self.agent.clone().shutdown();
    }

    /// A client on the same socket and version with its own connections, so that
    /// [`Client::shutdown`] on it interrupts only its own requests.
    pub fn detached(&self) -> Client {
        Client { agent: new_agent(&self.socket), ..self.clone() }
    }

    /// The versioned path of `endpoint` ("/v1.41/containers/json").
    pub(crate) fn versioned(&self, endpoint: &str) -> String {
        format!("/v{}{endpoint}", self.api)
    }

    fn url(&self, endpoint: &str, versioned: bool) -> String {
        // The host part is never resolved: the connector always opens the socket.
        if versioned {
            format!("http://docker{}", self.versioned(endpoint))
        } else {
            format!("http://docker{endpoint}")
        }
    }

    fn request(
        &self,
        method: &str,
        endpoint: &str,
        body: Option<&serde_json::Value>,
        timeout: Duration,
        versioned: bool,
    ) -> Result<ureq::http::Response<ureq::Body>, DockerError> {
        let url = self.url(endpoint, versioned);
        let result = match method {
            "POST" => {
                let text = body.map(|b| b.to_string()).unwrap_or_default();
                self.agent
                    .post(&url)
                    .header("Content-Type", "application/json")
                    .config()
                    .timeout_global(Some(timeout))
                    .build()
                    .send(text)
            }
            "DELETE" => self.agent.delete(&url).config().timeout_global(Some(timeout)).build().call(),
            _ => self.agent.get(&url).config().timeout_global(Some(timeout)).build().call(),
        };
        let resp = result.map_err(|e| self.transport_error(endpoint, e))?;
        self.check_status(endpoint, resp)
    }

    fn check_status(
        &self,
        endpoint: &str,
        mut resp: ureq::http::Response<ureq::Body>,
    ) -> Result<ureq::http::Response<ureq::Body>, DockerError> {
        let status = resp.status().as_u16();
        if status < 300 {
            return Ok(resp);
        }
        let text = resp.body_mut().with_config().limit(64 << 10).read_to_string().unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_string))
            .unwrap_or_else(|| text.trim().chars().take(500).collect());
        Err(DockerError::Api { socket: self.socket_name(), endpoint: endpoint.to_string(), status, message })
    }

    fn read_text(
        &self,
        endpoint: &str,
        mut resp: ureq::http::Response<ureq::Body>,
    ) -> Result<String, DockerError> {
        resp.body_mut()
            .with_config()
            .limit(MAX_JSON)
            .read_to_string()
            .map_err(|e| self.transport_error(endpoint, e))
    }

    fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        endpoint: &str,
        resp: ureq::http::Response<ureq::Body>,
    ) -> Result<T, DockerError> {
        let text = self.read_text(endpoint, resp)?;
        serde_json::from_str(&text)
            .map_err(|e| self.protocol(endpoint, format!("not the expected JSON: {e}")))
    }

    pub(crate) fn protocol(&self, endpoint: &str, message: String) -> DockerError {
        DockerError::Protocol { socket: self.socket_name(), endpoint: endpoint.to_string(), message }
    }

    fn transport_error(&self, endpoint: &str, e: ureq::Error) -> DockerError {
        match e {
            ureq::Error::Io(io) => self.io_error(endpoint, &io),
            ureq::Error::Timeout(t) => DockerError::Timeout {
                socket: self.socket_name(),
                endpoint: endpoint.to_string(),
                message: t.to_string(),
            },
            other => DockerError::Unreachable {
                socket: self.socket_name(),
                endpoint: endpoint.to_string(),
                message: other.to_string(),
            },
        }
    }

    pub(crate) fn io_error(&self, endpoint: &str, e: &io::Error) -> DockerError {
        let socket = self.socket_name();
        match e.kind() {
            io::ErrorKind::NotFound => DockerError::SocketMissing { socket },
            io::ErrorKind::PermissionDenied => DockerError::PermissionDenied { socket },
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
                DockerError::Timeout { socket, endpoint: endpoint.to_string(), message: e.to_string() }
            }
            _ => DockerError::Unreachable { socket, endpoint: endpoint.to_string(), message: e.to_string() },
        }
    }

    /// Opens a fresh connection to the socket (for hijacked requests).
    pub(crate) fn open_socket(&self, endpoint: &str) -> Result<UnixStream, DockerError> {
        let stream = UnixStream::connect(&self.socket).map_err(|e| self.io_error(endpoint, &e))?;
        stream.set_write_timeout(Some(REQUEST_TIMEOUT)).map_err(|e| self.io_error(endpoint, &e))?;
        Ok(stream)
    }
}

fn new_agent(socket: &Path) -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(REQUEST_TIMEOUT))
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .user_agent(format!("backupy-agent/{}", crate::AGENT_VERSION))
        .build();
    ureq::Agent::with_parts(config, UnixConnector { socket: socket.to_path_buf() }, NoResolver)
}

/// Opens the daemon's UNIX socket whatever host the URL names.
#[derive(Debug)]
struct UnixConnector {
    socket: PathBuf,
}

impl Connector<()> for UnixConnector {
    type Out = UnixTransport;

    fn connect(
        &self,
        details: &ConnectionDetails,
        _chained: Option<()>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        // connect(2) on a local socket does not wait for the peer: it succeeds at once or
        // fails at once (no such file, permission denied, nobody listening).
        let stream = UnixStream::connect(&self.socket)?;
        let transport = UnixTransport {
            stream: Arc::new(SharedStream(stream)),
            buffers: LazyBuffers::new(
                details.config.input_buffer_size(),
                details.config.output_buffer_size(),
            ),
        };
        (details.register_shutdown)(Arc::downgrade(&transport.stream) as Weak<dyn ShutdownHandle>)?;
        Ok(Some(transport))
    }
}

#[derive(Debug)]
struct SharedStream(UnixStream);

impl ShutdownHandle for SharedStream {
    fn shutdown(&self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

#[derive(Debug)]
struct UnixTransport {
    stream: Arc<SharedStream>,
    buffers: LazyBuffers,
}

fn deadline(timeout: NextTimeout) -> Result<Option<Duration>, ureq::Error> {
    if timeout.after.is_zero() {
        return Err(ureq::Error::Timeout(timeout.reason));
    }
    Ok(timeout.not_zero().map(|d| *d))
}

fn timed_out(e: io::Error, timeout: NextTimeout) -> ureq::Error {
    if matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock) {
        ureq::Error::Timeout(timeout.reason)
    } else {
        ureq::Error::Io(e)
    }
}

impl Transport for UnixTransport {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        let timeout = timeout.for_write();
        self.stream.0.set_write_timeout(deadline(timeout)?)?;
        let output = &self.buffers.output()[..amount];
        (&self.stream.0).write_all(output).map_err(|e| timed_out(e, timeout))
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        let timeout = timeout.for_read();
        self.stream.0.set_read_timeout(deadline(timeout)?)?;
        let input = self.buffers.input_append_buf();
        let n = loop {
            match (&self.stream.0).read(input) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r.map_err(|e| timed_out(e, timeout))?,
            }
        };
        self.buffers.input_appended(n);
        Ok(n > 0)
    }

    fn is_open(&mut self) -> bool {
        // A pooled connection is reusable when nothing is waiting on it and it is not closed.
        let s = &self.stream.0;
        if s.set_nonblocking(true).is_err() {
            return false;
        }
        let mut buf = [0u8; 1];
        let open = matches!((&*s).read(&mut buf), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        s.set_nonblocking(false).is_ok() && open
    }
}

/// The URL's host is a placeholder: nothing is resolved.
#[derive(Debug)]
struct NoResolver;

impl Resolver for NoResolver {
    fn resolve(
        &self,
        _uri: &ureq::http::Uri,
        _config: &ureq::config::Config,
        _timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let mut addrs = self.empty();
        addrs.push(std::net::SocketAddr::from(([127, 0, 0, 1], 80)));
        Ok(addrs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_versions_compare_numerically() {
        assert!(ApiVersion::parse("1.9").unwrap() < ApiVersion::parse("1.41").unwrap());
        assert_eq!(ApiVersion::parse("1.41").unwrap().min(API_VERSION).to_string(), "1.41");
        assert_eq!(ApiVersion::parse("1.99").unwrap().min(API_VERSION), API_VERSION);
        assert_eq!(ApiVersion::parse("x"), None);
    }
}
