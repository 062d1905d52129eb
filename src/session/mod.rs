//! The control-plane session (connected mode): one long-lived WebSocket to the Backupy
//! control plane, spoken exactly as wire-v1.md says.
//!
//! Threads: the `session` supervisor owns everything about the session — connecting,
//! Register/RegisterAck, heartbeats, agent-side WebSocket pings, the 90 s liveness
//! deadline, answering `Ping`, and reconnecting with backoff. Per connection it starts a
//! reader (`session-read`) and a writer (`session-write`, see [`connection`]). The
//! supervisor reads [`Control`] from [`SessionHandle`] and frames from the reader; it
//! writes [`SessionEvent`]s to the caller's channel.
//!
//! With an [`Outbox`] (connected mode always has one) delivery is the outbox's: every
//! message the caller or the session itself creates, Register and Heartbeat excepted, is
//! pushed there first; on each connection the supervisor replays what is pending in seq
//! order and then whatever is pushed, in batches so a long backlog never starves the
//! socket, and follows written entries with a WebSocket ping whose payload is the outbox's
//! [`PingMarker`]: the pong confirms them. Delivery `Ack`s from the server confirm too.
//! Without an outbox (tests of the bare session) messages sent while disconnected are
//! dropped with a warning.
//!
//! What it deliberately does not do: apply or persist configs or run commands. Commands
//! other than `Ping` go to the caller, who answers with its own `Ack` through
//! [`SessionHandle::send`].

mod connection;
pub mod tls;
pub mod url;

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select};
use prost::Message as _;
use rustls::ClientConfig;

use crate::clock::now_ms;
use crate::outbox::{Outbox, PingMarker};
use crate::secrets::Secret;
use crate::wire::pb;
use crate::wire::pb::envelope::Payload;
pub use connection::{ConnectError, MAX_FRAME_BYTES};
use connection::{Inbound, Live, Outbound, Socket};
pub use tls::{TlsError, TlsSettings};
pub use url::{Endpoint, UrlError};

/// Everything the session needs, parsed and typed by the caller.
pub struct SessionConfig {
    pub endpoint: Endpoint,
    pub tls: TlsSettings,
    pub agent_key: Secret,
    pub agent_version: String,
    pub docker_version: String,
    pub capabilities: Vec<String>,
    /// The config version the caller works from: sent as `last_known_config_version` in
    /// every Register and as `config_version` in every Heartbeat. The caller raises it
    /// when it applies a newer config.
    pub config_version: Arc<AtomicU64>,
    pub timing: Timing,
    /// Where messages wait for confirmed delivery (see the module comment).
    pub outbox: Option<Arc<Outbox>>,
}

/// Time constants of wire-v1.md, injectable so tests run in seconds.
#[derive(Debug, Clone)]
pub struct Timing {
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// A connection that stayed up this long resets the backoff.
    pub healthy_after: Duration,
    /// No server frame (pongs included) for this long = dead connection.
    pub dead_after: Duration,
    /// Agent-side WebSocket ping period.
    pub ws_ping_every: Duration,
    /// Used when RegisterAck.heartbeat_interval_sec is 0.
    pub default_heartbeat: Duration,
    /// Connect, TLS, upgrade and RegisterAck must each finish within this.
    pub handshake_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(60),
            healthy_after: Duration::from_secs(60),
            dead_after: Duration::from_secs(90),
            ws_ping_every: Duration::from_secs(30),
            default_heartbeat: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

/// What the caller contributes to each Heartbeat.
#[derive(Debug, Clone, Default)]
pub struct HeartbeatFields {
    pub metrics: Option<pb::AgentMetrics>,
    pub active_job_ids: Vec<String>,
}

/// What the session tells its caller.
#[derive(Debug, Clone)]
pub enum SessionEvent {
    /// RegisterAck received; `config` is the server's config as sent (apply only if newer).
    Connected { session_id: String, config: Option<pb::AgentConfig> },
    /// A server command other than `Ping`. If its `correlation_id` is not empty the caller
    /// must answer with an `Ack` carrying it.
    Command(pb::Envelope),
    /// A delivery `Ack` from the server (wire-v1.md "Delivery"); never answered.
    Ack(pb::Ack),
    /// A connection that had reached `Connected` ended; attempts that fail before
    /// RegisterAck are only logged.
    Disconnected { reason: String },
}

/// Requests to the supervisor; one input enum for the `session` thread.
#[derive(Debug)]
pub enum Control {
    Send { payload: Box<Payload>, correlation_id: String },
    Shutdown,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot start the session thread: {0}")]
    Spawn(io::Error),
    #[error("the control-plane session has stopped")]
    Stopped,
}

/// The caller's end of a running session; dropping it stops the session.
pub struct SessionHandle {
    control: Sender<Control>,
    thread: Option<JoinHandle<()>>,
}

impl SessionHandle {
    /// Queues an envelope (seq and ts_ms are filled in when it is sent).
    pub fn send(&self, payload: Payload, correlation_id: impl Into<String>) -> Result<(), SessionError> {
        self.control
            .send(Control::Send { payload: Box::new(payload), correlation_id: correlation_id.into() })
            .map_err(|_| SessionError::Stopped)
    }

    /// Closes the connection and waits for the session threads to end.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.control.send(Control::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for SessionHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Seq numbers for outgoing envelopes (the outbox's counter, later).
pub type SeqAllocator = Box<dyn FnMut() -> u64 + Send>;
/// Called for each Heartbeat.
pub type HeartbeatSource = Box<dyn FnMut() -> HeartbeatFields + Send>;

/// Starts the `session` thread. TLS settings are checked here, so a bad CA file or pin
/// fails at start rather than on every reconnect.
pub fn start(
    config: SessionConfig,
    seq: SeqAllocator,
    heartbeat: HeartbeatSource,
) -> Result<(SessionHandle, Receiver<SessionEvent>), SessionError> {
    let tls = tls::client_config(&config.tls)?;
    let (control_tx, control_rx) = crossbeam_channel::unbounded();
    let (events_tx, events_rx) = crossbeam_channel::unbounded();
    let supervisor = Supervisor {
        register: register_message(&config),
        config,
        tls,
        seq,
        heartbeat,
        control: control_rx,
        events: events_tx,
    };
    let thread = thread::Builder::new()
        .name("session".into())
        .spawn(move || supervisor.run())
        .map_err(SessionError::Spawn)?;
    Ok((SessionHandle { control: control_tx, thread: Some(thread) }, events_rx))
}

fn register_message(config: &SessionConfig) -> pb::Register {
    pb::Register {
        agent_version: config.agent_version.clone(),
        hostname: hostname(),
        os: "linux".into(),
        arch: wire_arch(std::env::consts::ARCH).into(),
        docker_version: config.docker_version.clone(),
        capabilities: config.capabilities.clone(),
        last_known_config_version: 0,
    }
}

/// The wire names of wire-v1.md ("amd64", "arm64"); anything else as Rust names it.
pub fn wire_arch(rust_arch: &str) -> &str {
    match rust_arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// The kernel's host name.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its whole length; gethostname writes at most that.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc == 0 {
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        if end > 0 {
            return String::from_utf8_lossy(buf.get(..end).unwrap_or_default()).into_owned();
        }
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default()
}

/// Backoff before reconnect attempt `attempt` (0-based): base·2^attempt capped at `cap`,
/// then scaled by `jitter` ∈ [-1, 1] times 20 %.
pub fn backoff_delay(attempt: u32, base: Duration, cap: Duration, jitter: f64) -> Duration {
    crate::retry::Backoff::new(base, cap).delay(attempt).mul_f64(1.0 + 0.2 * jitter.clamp(-1.0, 1.0))
}

fn random_jitter() -> f64 {
    let r = getrandom::u64().unwrap_or(1 << 52);
    (r >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
}

/// Why one connection ended, and whether it got as far as RegisterAck.
struct Ended {
    reason: String,
    connected_for: Option<Duration>,
}

struct Supervisor {
    config: SessionConfig,
    tls: Arc<ClientConfig>,
    register: pb::Register,
    seq: SeqAllocator,
    heartbeat: HeartbeatSource,
    control: Receiver<Control>,
    events: Sender<SessionEvent>,
}

impl Supervisor {
    fn run(mut self) {
        let mut attempt = 0u32;
        loop {
            let ended = match self.connect_and_serve() {
                Ok(ended) => ended,
                Err(Stop) => return,
            };
            log::warn!("control plane {}: {}", self.config.endpoint, ended.reason);
            if let Some(up) = ended.connected_for {
                let _ = self.events.send(SessionEvent::Disconnected { reason: ended.reason });
                if up >= self.config.timing.healthy_after {
                    attempt = 0;
                }
            }
            let t = &self.config.timing;
            let delay = backoff_delay(attempt, t.backoff_base, t.backoff_cap, random_jitter());
            attempt = attempt.saturating_add(1);
            log::info!("reconnecting to {} in {:.1} s", self.config.endpoint, delay.as_secs_f64());
            if self.wait(delay).is_err() {
                return;
            }
        }
    }

    /// Sleeps, still answering the caller; `Err` when asked to stop.
    fn wait(&mut self, delay: Duration) -> Result<(), Stop> {
        let deadline = Instant::now() + delay;
        loop {
            match self.control.recv_deadline(deadline) {
                Ok(Control::Send { payload, correlation_id }) => {
                    self.send_payload(None, *payload, correlation_id)
                }
                Ok(Control::Shutdown) | Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    return Err(Stop);
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => return Ok(()),
            }
        }
    }

    fn envelope(&mut self, payload: Payload, correlation_id: String) -> Vec<u8> {
        pb::Envelope { seq: (self.seq)(), ts_ms: now_ms(), correlation_id, payload: Some(payload) }
            .encode_to_vec()
    }

    /// Connect, register, then serve until the connection ends.
    fn connect_and_serve(&mut self) -> Result<Ended, Stop> {
        let timing = self.config.timing.clone();
        let failed = |reason: String| Ok(Ended { reason, connected_for: None });
        let mut socket = match connection::open(
            &self.config.endpoint,
            &self.tls,
            &self.config.agent_key,
            timing.handshake_timeout,
        ) {
            Ok(s) => s,
            Err(e) => return failed(e.to_string()),
        };
        let ack = match self.register(&mut socket) {
            Ok(ack) => ack,
            Err(reason) => {
                let _ = socket.close(None);
                let _ = socket.flush();
                return failed(reason);
            }
        };
        let (in_tx, in_rx) = crossbeam_channel::unbounded();
        let live = match connection::spawn(socket, in_tx) {
            Ok(live) => live,
            Err(e) => return failed(format!("cannot start the connection threads: {e}")),
        };
        let heartbeat_every = match ack.heartbeat_interval_sec {
            0 => timing.default_heartbeat,
            s => Duration::from_secs(u64::from(s)),
        };
        log::info!(
            "connected to {} (session {}, heartbeat every {} s)",
            self.config.endpoint,
            ack.session_id,
            heartbeat_every.as_secs_f64()
        );
        // A newer config in the RegisterAck is applied by the caller, on its own thread:
        // the first heartbeat waits for it (a little), so that it reports the version
        // applied when it is sent, not the one before (issue 16).
        let current = self.config.config_version.load(Ordering::SeqCst);
        let pending = ack.config.as_ref().map(|c| c.version).filter(|v| *v > current);
        let _ = self.events.send(SessionEvent::Connected { session_id: ack.session_id, config: ack.config });
        let since = Instant::now();
        let reason = self.serve(&live, &in_rx, heartbeat_every, pending)?;
        drop(live);
        Ok(Ended { reason, connected_for: Some(since.elapsed()) })
    }

    /// Sends Register and waits for the first server frame, which must be RegisterAck.
    fn register(&mut self, socket: &mut Socket) -> Result<pb::RegisterAck, String> {
        let mut register = self.register.clone();
        register.last_known_config_version = self.config.config_version.load(Ordering::SeqCst);
        let bytes = self.envelope(Payload::Register(register), String::new());
        socket.send(tungstenite::Message::binary(bytes)).map_err(|e| format!("sending Register: {e}"))?;
        loop {
            match socket.read().map_err(|e| format!("waiting for RegisterAck: {e}"))? {
                tungstenite::Message::Binary(bytes) => {
                    let env = pb::Envelope::decode(bytes.as_ref())
                        .map_err(|e| format!("the first frame did not decode as an Envelope: {e}"))?;
                    return match env.payload {
                        Some(Payload::RegisterAck(ack)) => Ok(ack),
                        other => Err(format!(
                            "the first server message was {} instead of RegisterAck",
                            payload_name(other.as_ref())
                        )),
                    };
                }
                tungstenite::Message::Text(_) => log::warn!("ignoring a text frame before RegisterAck"),
                tungstenite::Message::Close(_) => return Err("closed before RegisterAck".into()),
                _ => {}
            }
        }
    }

    /// The connected loop; returns why the connection ended.
    fn serve(
        &mut self,
        live: &Live,
        inbound: &Receiver<Inbound>,
        heartbeat_every: Duration,
        mut pending_version: Option<u64>,
    ) -> Result<String, Stop> {
        let timing = self.config.timing.clone();
        let mut last_frame = Instant::now();
        let mut next_heartbeat = Instant::now();
        let pending_until = Instant::now() + PENDING_CONFIG_WAIT;
        let mut next_ping = Instant::now() + timing.ws_ping_every;
        let mut delivery = Delivery::default();
        let pushes = match &self.config.outbox {
            Some(outbox) => {
                outbox.new_connection();
                delivery.backlog = true;
                outbox.pushes()
            }
            None => crossbeam_channel::never(),
        };
        loop {
            let now = Instant::now();
            if pending_version.is_some_and(|v| {
                self.config.config_version.load(Ordering::SeqCst) >= v || now >= pending_until
            }) {
                pending_version = None;
            }
            if now >= next_heartbeat && pending_version.is_none() {
                self.send_heartbeat(live);
                next_heartbeat = now + heartbeat_every;
            }
            if delivery.backlog {
                self.flush_outbox(live, &mut delivery);
            }
            if now >= next_ping || (delivery.unconfirmed_writes && delivery.ping.is_none()) {
                self.send_ping(live, &mut delivery);
                next_ping = now + timing.ws_ping_every;
            }
            let dead_at = last_frame + timing.dead_after;
            if now >= dead_at {
                return Ok(format!(
                    "no frame from the server for {:.1} s: connection presumed dead",
                    timing.dead_after.as_secs_f64()
                ));
            }
            let mut wake = next_heartbeat.min(next_ping).min(dead_at);
            if delivery.backlog || pending_version.is_some() {
                wake = wake.min(Instant::now() + BACKLOG_POLL);
            }
            select! {
                recv(inbound) -> msg => match msg {
                    Ok(Inbound::Envelope(env)) => {
                        last_frame = Instant::now();
                        self.dispatch(live, *env);
                    }
                    Ok(Inbound::Pong(payload)) => {
                        last_frame = Instant::now();
                        self.pong(&payload, &mut delivery);
                    }
                    Ok(Inbound::Other) => last_frame = Instant::now(),
                    Ok(Inbound::Closed(reason)) => return Ok(reason),
                    Err(_) => return Ok("connection threads ended".into()),
                },
                recv(self.control) -> msg => match msg {
                    Ok(Control::Send { payload, correlation_id }) => {
                        self.send_payload(Some(live), *payload, correlation_id);
                    }
                    Ok(Control::Shutdown) | Err(_) => return Err(Stop),
                },
                recv(pushes) -> _ => delivery.backlog = true,
                default(wake.saturating_duration_since(Instant::now())) => {}
            }
        }
    }

    /// Sends a message: through the outbox when there is one (the writer picks it up from
    /// there), else straight to the connection, or dropped when there is none.
    fn send_payload(&mut self, live: Option<&Live>, payload: Payload, correlation_id: String) {
        if let Some(outbox) = &self.config.outbox {
            match outbox.push(payload, &correlation_id) {
                Ok(_) => return,
                Err(e) => {
                    log::error!("{e}");
                    return;
                }
            }
        }
        match live {
            Some(live) => {
                let bytes = self.envelope(payload, correlation_id);
                let _ = live.outbound.send(Outbound::Envelope(bytes));
            }
            None => warn_dropped(&payload),
        }
    }

    /// Writes the next batch of pending outbox entries, unless the writer still has enough
    /// queued; leaves `backlog` set while more remain.
    fn flush_outbox(&mut self, live: &Live, delivery: &mut Delivery) {
        let Some(outbox) = &self.config.outbox else {
            delivery.backlog = false;
            return;
        };
        if live.outbound.len() >= MAX_QUEUED_FRAMES {
            return;
        }
        let batch = match outbox.pending(delivery.cursor, BATCH) {
            Ok(batch) => batch,
            Err(e) => {
                log::error!("{e}");
                return;
            }
        };
        delivery.backlog = batch.len() == BATCH;
        if let (Some(first), Some(last)) = (batch.first(), batch.last()) {
            log::trace!("writing {} outbox entries, seq {} to {}", batch.len(), first.seq, last.seq);
        }
        for entry in batch {
            delivery.cursor = entry.seq;
            if live.outbound.send(Outbound::Envelope(entry.envelope)).is_err() {
                return;
            }
            // The writer sends frames in channel order, so a ping queued after this call is
            // written after the frame: marking it now is as good as after the write.
            if let Err(e) = outbox.mark_sent(entry.seq) {
                log::error!("{e}");
            }
            delivery.unconfirmed_writes = true;
        }
    }

    fn send_ping(&mut self, live: &Live, delivery: &mut Delivery) {
        let payload = match &self.config.outbox {
            Some(outbox) => {
                let marker = outbox.ping_marker();
                delivery.ping = Some(marker);
                delivery.unconfirmed_writes = false;
                marker.0.to_be_bytes().to_vec()
            }
            None => Vec::new(),
        };
        let _ = live.outbound.send(Outbound::Ping(payload));
    }

    fn pong(&mut self, payload: &[u8], delivery: &mut Delivery) {
        let (Some(outbox), Ok(bytes)) = (&self.config.outbox, <[u8; 8]>::try_from(payload)) else { return };
        let marker = PingMarker(u64::from_be_bytes(bytes));
        // Only a pong to a ping of this connection confirms; a stray one may not.
        if delivery.ping.is_some_and(|p| marker <= p) {
            if let Err(e) = outbox.confirm_through(marker) {
                log::error!("{e}");
            }
            if delivery.ping == Some(marker) {
                delivery.ping = None;
            }
        }
    }

    fn send_heartbeat(&mut self, live: &Live) {
        let fields = (self.heartbeat)();
        let heartbeat = pb::Heartbeat {
            config_version: self.config.config_version.load(Ordering::SeqCst),
            metrics: fields.metrics,
            active_job_ids: fields.active_job_ids,
        };
        let bytes = self.envelope(Payload::Heartbeat(heartbeat), String::new());
        let _ = live.outbound.send(Outbound::Envelope(bytes));
    }

    fn dispatch(&mut self, live: &Live, env: pb::Envelope) {
        let correlation_id = env.correlation_id.clone();
        log::debug!(
            "received {} (seq {}, correlation id {:?})",
            payload_name(env.payload.as_ref()),
            env.seq,
            correlation_id
        );
        match &env.payload {
            Some(Payload::Ping(_)) => {
                let ack =
                    pb::Ack { correlation_id: correlation_id.clone(), accepted: true, reason: String::new() };
                self.send_payload(Some(live), Payload::Ack(ack), correlation_id);
            }
            Some(Payload::Ack(ack)) => {
                if let (Some(outbox), Some(seq)) = (&self.config.outbox, crate::outbox::delivery_ack_seq(ack))
                    && let Err(e) = outbox.confirm(seq)
                {
                    log::error!("{e}");
                }
                let _ = self.events.send(SessionEvent::Ack(ack.clone()));
            }
            Some(
                Payload::ConfigUpdate(_)
                | Payload::RunBackup(_)
                | Payload::CancelJob(_)
                | Payload::RunHealthCheck(_)
                | Payload::SelfUpdate(_),
            ) => {
                if self.events.send(SessionEvent::Command(env)).is_err() && !correlation_id.is_empty() {
                    let ack = pb::Ack {
                        correlation_id: correlation_id.clone(),
                        accepted: false,
                        reason: "the agent is shutting down".into(),
                    };
                    self.send_payload(Some(live), Payload::Ack(ack), correlation_id);
                }
            }
            other => {
                log::warn!("ignoring an unexpected {} from the control plane", payload_name(other.as_ref()))
            }
        }
    }
}

/// The session was asked to stop (or its handle is gone).
struct Stop;

/// Outbox entries per batch, and how many frames may wait in the writer's channel before
/// the next batch is read: enough to keep the socket busy, little enough that a backlog of
/// 10 000 never sits in memory at once.
const BATCH: usize = 256;
const MAX_QUEUED_FRAMES: usize = 512;
const BACKLOG_POLL: Duration = Duration::from_millis(5);

/// How long the first heartbeat of a connection waits for the caller to apply the newer
/// config its RegisterAck carried; after that it goes out with the version applied then.
const PENDING_CONFIG_WAIT: Duration = Duration::from_secs(5);

/// Per-connection delivery state of the supervisor.
#[derive(Default)]
struct Delivery {
    /// The highest seq written to this connection.
    cursor: u64,
    /// More may be pending than was written so far.
    backlog: bool,
    /// Entries were written since the last ping.
    unconfirmed_writes: bool,
    /// The marker of the newest ping whose pong has not come.
    ping: Option<PingMarker>,
}

fn warn_dropped(payload: &Payload) {
    log::warn!("not connected to the control plane: {} dropped", payload_name(Some(payload)));
}

/// The wire-v1.md field name of a payload, for log lines and errors.
pub fn payload_name(payload: Option<&Payload>) -> &'static str {
    match payload {
        None => "an envelope without a known payload",
        Some(Payload::Register(_)) => "register",
        Some(Payload::Heartbeat(_)) => "heartbeat",
        Some(Payload::Discovery(_)) => "discovery",
        Some(Payload::JobUpdate(_)) => "job_update",
        Some(Payload::BackupCompleted(_)) => "backup_completed",
        Some(Payload::HealthResult(_)) => "health_result",
        Some(Payload::Log(_)) => "log",
        Some(Payload::RestoreUpdate(_)) => "restore_update",
        Some(Payload::Ack(_)) => "ack",
        Some(Payload::RegisterAck(_)) => "register_ack",
        Some(Payload::ConfigUpdate(_)) => "config_update",
        Some(Payload::RunBackup(_)) => "run_backup",
        Some(Payload::CancelJob(_)) => "cancel_job",
        Some(Payload::RunHealthCheck(_)) => "run_health_check",
        Some(Payload::SelfUpdate(_)) => "self_update",
        Some(Payload::Ping(_)) => "ping",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_to_a_sixty_second_cap() {
        let (b, c) = (Duration::from_secs(1), Duration::from_secs(60));
        let secs: Vec<u64> = (0..9).map(|a| backoff_delay(a, b, c, 0.0).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff_delay(100, b, c, 0.0), c);
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let (b, c) = (Duration::from_secs(1), Duration::from_secs(60));
        assert_eq!(backoff_delay(2, b, c, 1.0), Duration::from_millis(4800));
        assert_eq!(backoff_delay(2, b, c, -1.0), Duration::from_millis(3200));
        for _ in 0..1000 {
            let j = random_jitter();
            assert!((-1.0..=1.0).contains(&j), "{j}");
        }
    }

    #[test]
    fn arch_uses_the_wire_names() {
        assert_eq!(wire_arch("x86_64"), "amd64");
        assert_eq!(wire_arch("aarch64"), "arm64");
    }

    #[test]
    fn hostname_is_the_kernels() {
        let proc = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        assert_eq!(hostname(), proc.trim());
    }
}
