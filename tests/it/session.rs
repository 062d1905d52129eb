//! The control-plane session against a control plane written from wire-v1.md
//! (`common/control_plane.rs`): handshake, Ping/Ack, bad frames, reconnect backoff, TLS
//! trust and pinning. Every line logged during these tests (trace level, all crates) is
//! kept, to prove the agent key never appears in one.

use crate::common::control_plane;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use backupy_agent::secrets::Secret;
use backupy_agent::session::{
    self, Endpoint, HeartbeatFields, SessionConfig, SessionEvent, SessionHandle, Timing, TlsSettings,
    UrlError,
};
use backupy_agent::wire::pb;
use backupy_agent::wire::pb::envelope::Payload;
use control_plane::{Action, ControlPlane, envelope};
use crossbeam_channel::Receiver;
use tungstenite::Message;

/// Every agent key in this file contains it, so one scan covers all tests.
const KEY_MARK: &str = "SECRETKEYMARK";

static LOG_LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());
static LOGGER_INIT: Once = Once::new();

struct CaptureLogger;

impl log::Log for CaptureLogger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        let line = format!("{} {} {}", record.level(), record.target(), record.args());
        // A test that failed while reading the lines must not make the session thread
        // panic too.
        LOG_LINES.lock().unwrap_or_else(|e| e.into_inner()).push(line);
    }
    fn flush(&self) {}
}

fn capture_logs() {
    LOGGER_INIT.call_once(|| {
        log::set_logger(&CaptureLogger).unwrap();
        log::set_max_level(log::LevelFilter::Trace);
    });
}

fn key_for(test: &str) -> String {
    format!("agent-key-{test}-{KEY_MARK}")
}

fn fast_timing() -> Timing {
    Timing {
        backoff_base: Duration::from_millis(100),
        backoff_cap: Duration::from_secs(2),
        healthy_after: Duration::from_secs(60),
        dead_after: Duration::from_secs(5),
        ws_ping_every: Duration::from_millis(300),
        default_heartbeat: Duration::from_secs(30),
        handshake_timeout: Duration::from_secs(2),
    }
}

fn config(url: &str, key: &str, tls: TlsSettings, timing: Timing) -> SessionConfig {
    SessionConfig {
        endpoint: Endpoint::parse(url, true).unwrap(),
        tls,
        agent_key: Secret::new(key),
        agent_version: "0.1.0-test".into(),
        docker_version: String::new(),
        capabilities: vec!["postgresql".into(), "sqlite".into()],
        config_version: Arc::new(AtomicU64::new(5)),
        timing,
        outbox: None,
    }
}

fn start(config: SessionConfig) -> (SessionHandle, Receiver<SessionEvent>) {
    capture_logs();
    let counter = AtomicU64::new(0);
    let seq = Box::new(move || counter.fetch_add(1, Ordering::SeqCst) + 1);
    let heartbeat = Box::new(|| HeartbeatFields {
        metrics: Some(pb::AgentMetrics { queue_depth: 3, ..Default::default() }),
        active_job_ids: vec!["run-1".into()],
    });
    session::start(config, seq, heartbeat).unwrap()
}

fn start_plain(cp: &ControlPlane, test: &str) -> (SessionHandle, Receiver<SessionEvent>) {
    start(config(&cp.url("ws"), &key_for(test), TlsSettings::default(), fast_timing()))
}

fn next_event(events: &Receiver<SessionEvent>, timeout: Duration) -> Option<SessionEvent> {
    events.recv_timeout(timeout).ok()
}

fn wait_connected(events: &Receiver<SessionEvent>, timeout: Duration) -> Option<String> {
    let deadline = Instant::now() + timeout;
    while let Ok(ev) = events.recv_deadline(deadline) {
        if let SessionEvent::Connected { session_id, .. } = ev {
            return Some(session_id);
        }
    }
    None
}

fn acks(conn: &control_plane::Conn) -> Vec<(String, pb::Ack)> {
    conn.received
        .iter()
        .filter_map(|r| match &r.envelope.payload {
            Some(Payload::Ack(a)) => Some((r.envelope.correlation_id.clone(), a.clone())),
            _ => None,
        })
        .collect()
}

fn ping(id: &str) -> pb::Envelope {
    envelope(id, Payload::Ping(pb::Ping { ts_ms: 1 }))
}

#[track_caller]
fn wait_ack(cp: &ControlPlane, conn: usize, id: &str) {
    cp.wait_for(&format!("the Ack of {id:?} on connection {conn}"), Duration::from_secs(10), |s| {
        s.conns.get(conn).is_some_and(|c| acks(c).iter().any(|(_, a)| a.correlation_id == id))
    })
}

/// x86_64 → amd64 as wire-v1.md names it, from `uname -m` rather than our code.
fn uname_arch() -> String {
    let out = Command::new("uname").arg("-m").output().unwrap();
    match String::from_utf8_lossy(&out.stdout).trim() {
        "x86_64" => "amd64".into(),
        "aarch64" => "arm64".into(),
        other => other.into(),
    }
}

#[test]
fn register_is_first_with_bearer_key_real_host_and_heartbeats_follow_the_ack_interval() {
    let cp = ControlPlane::plain();
    cp.state().heartbeat_interval_sec = 1;
    let (handle, events) = start_plain(&cp, "handshake");
    match next_event(&events, Duration::from_secs(5)) {
        Some(SessionEvent::Connected { session_id, config }) => {
            assert_eq!(session_id, "session-0");
            assert_eq!(config.map(|c| c.version), Some(7));
        }
        other => panic!("expected Connected, got {other:?}"),
    }
    let heartbeats = |s: &control_plane::Shared| {
        s.conns.first().map_or(0, |c| {
            c.received.iter().filter(|r| matches!(r.envelope.payload, Some(Payload::Heartbeat(_)))).count()
        })
    };
    cp.wait_for("four heartbeats", Duration::from_secs(10), |s| heartbeats(s) >= 4);
    handle.shutdown();

    let state = cp.state();
    let conn = &state.conns[0];
    assert_eq!(conn.authorization.as_deref(), Some(format!("Bearer {}", key_for("handshake")).as_str()));
    assert_eq!(conn.path, "/v1/agents/connect");
    let reg = state.register(0);
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(reg.hostname, hostname.trim());
    assert_eq!(reg.os, "linux");
    assert_eq!(reg.arch, uname_arch());
    assert_eq!(reg.agent_version, "0.1.0-test");
    assert_eq!(reg.capabilities, ["postgresql", "sqlite"]);
    assert_eq!(reg.last_known_config_version, 5);
    assert!(conn.received[0].envelope.seq > 0 && conn.received[0].envelope.ts_ms > 0);

    let beats: Vec<_> = conn
        .received
        .iter()
        .filter_map(|r| match &r.envelope.payload {
            Some(Payload::Heartbeat(h)) => Some((r.at, h.clone())),
            _ => None,
        })
        .collect();
    for (_, h) in &beats {
        assert_eq!(h.config_version, 5);
        assert_eq!(h.active_job_ids, ["run-1"]);
        assert_eq!(h.metrics.as_ref().map(|m| m.queue_depth), Some(3));
    }
    for pair in beats.windows(2).skip(1) {
        let gap = pair[1].0 - pair[0].0;
        assert!(
            gap > Duration::from_millis(700) && gap < Duration::from_millis(1500),
            "heartbeat gap {gap:?}"
        );
    }
    let seqs: Vec<u64> = conn.received.iter().map(|r| r.envelope.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "seq increases: {seqs:?}");
}

#[test]
fn ping_is_acked_with_its_correlation_id_and_a_server_ack_is_never_acked() {
    let cp = ControlPlane::plain();
    let (handle, events) = start_plain(&cp, "ping");
    assert!(wait_connected(&events, Duration::from_secs(5)).is_some());

    cp.send(0, ping("p1"));
    wait_ack(&cp, 0, "p1");
    // A delivery Ack (envelope id empty) and one carrying an envelope id: neither answered.
    cp.send(
        0,
        envelope(
            "",
            Payload::Ack(pb::Ack { correlation_id: "1".into(), accepted: true, reason: String::new() }),
        ),
    );
    cp.send(
        0,
        envelope(
            "a1",
            Payload::Ack(pb::Ack { correlation_id: "a1".into(), accepted: true, reason: String::new() }),
        ),
    );
    cp.send(0, ping("p2"));
    wait_ack(&cp, 0, "p2");

    // A command goes to the caller, who acks it through the handle.
    cp.send(0, envelope("c1", Payload::CancelJob(pb::CancelJob { job_id: "job-9".into() })));
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut server_acks = 0;
    loop {
        match events.recv_deadline(deadline).expect("the command reaches the caller") {
            SessionEvent::Ack(_) => server_acks += 1,
            SessionEvent::Command(env) => {
                assert_eq!(env.correlation_id, "c1");
                assert!(matches!(env.payload, Some(Payload::CancelJob(ref c)) if c.job_id == "job-9"));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(server_acks, 2, "both server Acks are handed to the caller");
    let reply = pb::Ack { correlation_id: "c1".into(), accepted: false, reason: "unknown job job-9".into() };
    handle.send(Payload::Ack(reply), "c1").unwrap();
    wait_ack(&cp, 0, "c1");
    handle.shutdown();

    let state = cp.state();
    let sent = acks(&state.conns[0]);
    let ids: Vec<_> =
        sent.iter().map(|(env_id, a)| (env_id.as_str(), a.correlation_id.as_str(), a.accepted)).collect();
    assert_eq!(ids, [("p1", "p1", true), ("p2", "p2", true), ("c1", "c1", false)]);
}

#[test]
fn a_first_server_frame_other_than_register_ack_closes_and_reconnects() {
    let cp = ControlPlane::plain();
    cp.state().first_replies.push_back(Message::binary(prost::Message::encode_to_vec(&ping("early"))));
    let (handle, events) = start_plain(&cp, "first-frame");
    assert_eq!(wait_connected(&events, Duration::from_secs(5)).as_deref(), Some("session-1"));
    handle.shutdown();
    let state = cp.state();
    assert!(state.conns[0].closed_at.is_some(), "the first connection was closed");
    assert!(acks(&state.conns[0]).is_empty(), "nothing was answered before RegisterAck");
    state.register(1);
}

#[test]
fn text_frames_are_ignored_and_an_undecodable_frame_closes_the_connection() {
    let cp = ControlPlane::plain();
    let (handle, events) = start_plain(&cp, "bad-frames");
    assert!(wait_connected(&events, Duration::from_secs(5)).is_some());

    cp.act(0, Action::Raw(Message::text("hello")));
    cp.send(0, ping("after-text"));
    wait_ack(&cp, 0, "after-text");

    cp.act(0, Action::Raw(Message::binary(vec![0xff, 0xff, 0xff])));
    match next_event(&events, Duration::from_secs(5)) {
        Some(SessionEvent::Disconnected { reason }) => assert!(reason.contains("decode"), "{reason}"),
        other => panic!("expected Disconnected, got {other:?}"),
    }
    assert_eq!(wait_connected(&events, Duration::from_secs(5)).as_deref(), Some("session-1"));
    handle.shutdown();
    let state = cp.state();
    assert!(state.conns[0].closed_at.is_some());
    state.register(1);
}

#[test]
fn a_frame_over_four_mebibytes_is_refused() {
    let cp = ControlPlane::plain();
    let (handle, events) = start_plain(&cp, "big-frame");
    assert!(wait_connected(&events, Duration::from_secs(5)).is_some());
    let big = pb::Envelope {
        correlation_id: "big".into(),
        payload: Some(Payload::Ping(pb::Ping { ts_ms: 1 })),
        ..Default::default()
    };
    let mut bytes = prost::Message::encode_to_vec(&big);
    // Unknown field 1000 (length-delimited) pads the envelope past 4 MiB.
    bytes.extend_from_slice(&[0xc2, 0x3e]);
    let pad = session::MAX_FRAME_BYTES;
    let mut len = pad;
    while len >= 0x80 {
        bytes.push((len as u8 & 0x7f) | 0x80);
        len >>= 7;
    }
    bytes.push(len as u8);
    bytes.resize(bytes.len() + pad, 0);
    cp.act(0, Action::Raw(Message::binary(bytes)));
    match next_event(&events, Duration::from_secs(5)) {
        Some(SessionEvent::Disconnected { reason }) => {
            assert!(reason.contains("too long") || reason.contains("size"), "{reason}")
        }
        other => panic!("expected Disconnected, got {other:?}"),
    }
    assert!(wait_connected(&events, Duration::from_secs(5)).is_some(), "the agent reconnects");
    handle.shutdown();
    assert!(acks(&cp.state().conns[0]).is_empty(), "the oversized ping was not answered");
}

#[test]
fn a_dropped_connection_is_reestablished_with_growing_backoff() {
    let cp = ControlPlane::plain();
    let mut timing = fast_timing();
    timing.backoff_base = Duration::from_millis(200);
    let (handle, events) =
        start(config(&cp.url("http"), &key_for("backoff"), TlsSettings::default(), timing));
    for i in 0..4 {
        cp.wait_for(&format!("Register on connection {i}"), Duration::from_secs(10), |s| s.registered(i));
        cp.act(i, Action::Drop);
    }
    cp.wait_for("Register on connection 4", Duration::from_secs(10), |s| s.registered(4));
    handle.shutdown();

    let state = cp.state();
    let gaps: Vec<Duration> =
        (0..4).map(|i| state.conns[i + 1].accepted_at - state.conns[i].closed_at.unwrap()).collect();
    // base·2^n ± 20 %, plus a little scheduling slack.
    for (n, gap) in gaps.iter().enumerate() {
        let nominal = 200.0 * f64::from(1u32 << n);
        let ms = gap.as_secs_f64() * 1000.0;
        assert!(
            ms >= nominal * 0.8 - 5.0 && ms <= nominal * 1.2 + 300.0,
            "gap {n}: {ms:.0} ms, nominal {nominal}"
        );
    }
    for i in 0..5 {
        state.register(i);
    }
    let disconnects = events.try_iter().filter(|e| matches!(e, SessionEvent::Disconnected { .. })).count();
    assert!(disconnects >= 4);
}

#[test]
fn a_connection_without_server_frames_is_declared_dead() {
    let cp = ControlPlane::plain();
    let mut timing = fast_timing();
    timing.dead_after = Duration::from_millis(600);
    // The test server answers pings with pongs, so the agent must not ping within the deadline.
    timing.ws_ping_every = Duration::from_secs(30);
    let (handle, events) = start(config(&cp.url("ws"), &key_for("dead"), TlsSettings::default(), timing));
    assert!(wait_connected(&events, Duration::from_secs(5)).is_some());
    match next_event(&events, Duration::from_secs(5)) {
        Some(SessionEvent::Disconnected { reason }) => assert!(reason.contains("presumed dead"), "{reason}"),
        other => panic!("expected Disconnected, got {other:?}"),
    }
    handle.shutdown();
}

#[test]
fn agent_pings_keep_a_quiet_connection_alive() {
    let cp = ControlPlane::plain();
    let mut timing = fast_timing();
    timing.dead_after = Duration::from_millis(800);
    timing.ws_ping_every = Duration::from_millis(200);
    let (handle, events) = start(config(&cp.url("ws"), &key_for("pongs"), TlsSettings::default(), timing));
    assert!(wait_connected(&events, Duration::from_secs(5)).is_some());
    assert!(next_event(&events, Duration::from_secs(2)).is_none(), "pongs count as server frames");
    handle.shutdown();
}

#[test]
fn ws_is_refused_without_the_insecure_flag() {
    let cp = ControlPlane::plain();
    for scheme in ["ws", "http"] {
        assert!(matches!(Endpoint::parse(&cp.url(scheme), false), Err(UrlError::Insecure { .. })));
    }
    assert!(cp.state().conns.is_empty());
}

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// A CA and a leaf for IP 127.0.0.1 signed by it, made by the openssl CLI.
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let sh = |script: &str| {
            let out = Command::new("sh").arg("-ec").arg(script).current_dir(dir.path()).output().unwrap();
            assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
            out.stdout
        };
        sh("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key \
            -out ca.pem -days 2 -subj /CN=test-ca 2>/dev/null
            openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout leaf.key \
            -out leaf.csr -subj /CN=127.0.0.1 2>/dev/null
            printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' > leaf.ext
            openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
            -extfile leaf.ext -out leaf.pem 2>/dev/null
            openssl pkcs8 -topk8 -nocrypt -in leaf.key -out leaf.pk8");
        Pki { dir }
    }
    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
    /// base64 SHA-256 of the leaf's SubjectPublicKeyInfo, computed by openssl.
    fn leaf_pin(&self) -> String {
        let out = Command::new("sh")
            .arg("-ec")
            .arg(
                "openssl x509 -in leaf.pem -pubkey -noout | openssl pkey -pubin -outform der \
                  | openssl dgst -sha256 -binary | base64",
            )
            .current_dir(self.dir.path())
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }
}

fn tls_server(pki: &Pki) -> ControlPlane {
    ControlPlane::tls(&pki.path("leaf.pem"), &pki.path("leaf.pk8"))
}

fn tls_outcome(cp: &ControlPlane, test: &str, ca: Option<&Path>, pins: Option<&str>) -> bool {
    let settings = TlsSettings::from_values(ca.and_then(|p| p.to_str()), pins).unwrap();
    let (handle, events) = start(config(&cp.url("https"), &key_for(test), settings, fast_timing()));
    let connected = wait_connected(&events, Duration::from_secs(3)).is_some();
    handle.shutdown();
    connected
}

#[test]
fn an_untrusted_server_certificate_is_refused_by_default_and_trusted_with_the_ca_file() {
    let pki = Pki::new();
    let cp = tls_server(&pki);
    assert!(!tls_outcome(&cp, "tls-default", None, None), "refused with only the built-in roots");
    cp.wait_for("the refused TLS handshake", Duration::from_secs(10), |s| s.failed_handshakes >= 1);
    assert!(cp.state().conns.is_empty());
    assert!(tls_outcome(&cp, "tls-ca", Some(&pki.path("ca.pem")), None), "accepted with BACKUPY_CA_FILE");
    assert_eq!(cp.state().conns[0].path, "/v1/agents/connect");
}

#[test]
fn a_wrong_pin_is_refused_and_the_right_pin_accepted() {
    let pki = Pki::new();
    let cp = tls_server(&pki);
    let ca = pki.path("ca.pem");
    let wrong = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    assert!(!tls_outcome(&cp, "pin-wrong", Some(&ca), Some(wrong)));
    assert!(cp.state().conns.is_empty());
    let right = format!("{wrong},{}", pki.leaf_pin());
    assert!(tls_outcome(&cp, "pin-right", Some(&ca), Some(&right)));
    // A pin does not replace verification: the right pin without the CA is still refused.
    assert!(!tls_outcome(&cp, "pin-no-ca", None, Some(&pki.leaf_pin())));
    assert_eq!(cp.state().conns.len(), 1);
}

#[test]
fn the_agent_key_never_appears_in_any_log_line() {
    let cp = ControlPlane::plain();
    let (handle, events) = start_plain(&cp, "logs");
    assert!(wait_connected(&events, Duration::from_secs(5)).is_some());
    cp.send(0, ping("p1"));
    wait_ack(&cp, 0, "p1");
    cp.act(0, Action::Drop);
    assert!(wait_connected(&events, Duration::from_secs(5)).is_some());
    handle.shutdown();
    // A refused upgrade, too.
    let (handle, events) =
        start(config("ws://127.0.0.1:9/", &key_for("logs"), TlsSettings::default(), fast_timing()));
    assert!(wait_connected(&events, Duration::from_millis(300)).is_none());
    handle.shutdown();

    let lines = LOG_LINES.lock().unwrap_or_else(|e| e.into_inner());
    assert!(lines.iter().any(|l| l.contains("connected to ws://127.0.0.1")), "logs were captured");
    assert!(lines.iter().any(|l| l.starts_with("TRACE")), "trace level was on");
    let leaks: Vec<_> = lines.iter().filter(|l| l.contains(KEY_MARK)).collect();
    assert!(leaks.is_empty(), "the agent key was logged: {leaks:?}");
}
