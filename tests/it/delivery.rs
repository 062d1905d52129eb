//! The session draining the outbox (wire-v1.md "Transport", agent.md "Outbox"): a backlog
//! of 10 000 envelopes replays in seq order while new ones keep being pushed, everything
//! is confirmed by pongs (or the server's delivery Acks), and nothing is lost or repeated
//! on one connection.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use crate::common::control_plane::{ControlPlane, envelope};
use backupy_agent::crypto::at_rest::StateCipher;
use backupy_agent::outbox::{Limits, Outbox};
use backupy_agent::secrets::Secret;
use backupy_agent::session::{self, Endpoint, HeartbeatFields, SessionConfig, Timing, TlsSettings};
use backupy_agent::wire::pb;
use backupy_agent::wire::pb::envelope::Payload;

fn timing() -> Timing {
    Timing {
        backoff_base: Duration::from_millis(100),
        backoff_cap: Duration::from_secs(1),
        healthy_after: Duration::from_secs(60),
        dead_after: Duration::from_secs(10),
        ws_ping_every: Duration::from_millis(300),
        default_heartbeat: Duration::from_secs(30),
        handshake_timeout: Duration::from_secs(5),
    }
}

fn start(cp: &ControlPlane, outbox: &Arc<Outbox>) -> session::SessionHandle {
    let config = SessionConfig {
        endpoint: Endpoint::parse(&cp.url("ws"), true).unwrap(),
        tls: TlsSettings::default(),
        agent_key: Secret::new("delivery-test-key"),
        agent_version: "test".into(),
        docker_version: String::new(),
        capabilities: vec![],
        config_version: Arc::new(AtomicU64::new(0)),
        timing: timing(),
        outbox: Some(outbox.clone()),
    };
    let seq = {
        let outbox = outbox.clone();
        Box::new(move || outbox.next_seq().unwrap())
    };
    let (handle, _events) = session::start(config, seq, Box::new(HeartbeatFields::default)).unwrap();
    handle
}

fn completed(i: usize) -> Payload {
    Payload::BackupCompleted(pb::BackupCompleted {
        job_id: "j".into(),
        run_id: format!("run-{i}"),
        size_bytes: i as u64,
        ..Default::default()
    })
}

#[test]
fn ten_thousand_queued_envelopes_replay_in_order_while_new_ones_flow() {
    let dir = tempfile::tempdir().unwrap();
    let cipher = StateCipher::from_agent_key(&Secret::new("delivery-test-key"));
    let outbox = Arc::new(
        Outbox::open(dir.path(), Limits { max_entries: 20_000, ..Limits::default() })
            .unwrap()
            .sealed_with(cipher),
    );
    let mut backlog = Vec::new();
    for i in 0..10_000 {
        backlog.push(outbox.push(completed(i), "").unwrap());
    }
    let cp = ControlPlane::plain();
    let session = start(&cp, &outbox);
    // New envelopes while the backlog drains.
    let pusher = {
        let outbox = outbox.clone();
        std::thread::spawn(move || {
            (10_000..10_500)
                .map(|i| {
                    std::thread::sleep(Duration::from_millis(2));
                    outbox.push(completed(i), "").unwrap()
                })
                .collect::<Vec<u64>>()
        })
    };
    let fresh = pusher.join().unwrap();
    let want: HashSet<u64> = backlog.iter().chain(&fresh).copied().collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got: HashSet<u64> = cp
            .state()
            .all()
            .into_iter()
            .filter(|e| matches!(e.payload, Some(Payload::BackupCompleted(_))))
            .map(|e| e.seq)
            .collect();
        if want.is_subset(&got) {
            break;
        }
        assert!(Instant::now() < deadline, "{} of {} delivered", want.intersection(&got).count(), want.len());
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = cp.state();
    assert_eq!(s.conns.len(), 1, "no reconnect was needed");
    let seqs: Vec<u64> = s.conns[0]
        .received
        .iter()
        .filter(|r| matches!(r.envelope.payload, Some(Payload::BackupCompleted(_))))
        .map(|r| r.envelope.seq)
        .collect();
    assert_eq!(seqs.len(), 10_500, "each entry written once on this connection");
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "replayed and new envelopes arrive in seq order");
    let sizes: Vec<u64> = s.conns[0]
        .received
        .iter()
        .filter_map(|r| match &r.envelope.payload {
            Some(Payload::BackupCompleted(c)) => Some(c.size_bytes),
            _ => None,
        })
        .collect();
    assert_eq!(sizes, (0..10_500).collect::<Vec<u64>>(), "payloads intact, in push order");
    drop(s);
    // Pongs to the agent's pings confirm everything: the outbox empties.
    let deadline = Instant::now() + Duration::from_secs(20);
    while outbox.depth().unwrap().entries > 0 {
        assert!(Instant::now() < deadline, "{:?}", outbox.depth().unwrap());
        std::thread::sleep(Duration::from_millis(50));
    }
    session.shutdown();
}

#[test]
fn entries_queued_while_down_are_delivered_on_connect_and_a_delivery_ack_confirms() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = Arc::new(Outbox::open(dir.path(), Limits::default()).unwrap());
    let cp = ControlPlane::plain();
    // Refuse the first connections: entries pile up.
    cp.state().refuse = true;
    let session = start(&cp, &outbox);
    let a = outbox.push(completed(1), "").unwrap();
    let b = outbox.push(completed(2), "").unwrap();
    cp.wait_for("a refused connection attempt", Duration::from_secs(10), |s| s.refused >= 1);
    cp.state().refuse = false;
    cp.wait_for("the entries queued while down", Duration::from_secs(10), |s| {
        let seqs: Vec<u64> = s.all().iter().map(|e| e.seq).collect();
        seqs.contains(&a) && seqs.contains(&b)
    });
    // A server delivery Ack naming a seq confirms that entry (wire-v1.md "Delivery").
    let c = outbox.push(completed(3), "").unwrap();
    cp.wait_for("the entry pushed while connected", Duration::from_secs(10), |s| {
        s.all().iter().any(|e| e.seq == c)
    });
    cp.send_last(envelope(
        "",
        Payload::Ack(pb::Ack { correlation_id: c.to_string(), accepted: true, reason: String::new() }),
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    while outbox.depth().unwrap().entries > 0 {
        assert!(Instant::now() < deadline, "{:?}", outbox.depth().unwrap());
        std::thread::sleep(Duration::from_millis(20));
    }
    // The server's Ack is not acknowledged. The agent answers frames in order, so once a
    // later Ping is acked, an Ack of the server's Ack would have arrived before it.
    cp.send_last(envelope("after", Payload::Ping(pb::Ping { ts_ms: 1 })));
    let ack_of = |e: &pb::Envelope| match &e.payload {
        Some(Payload::Ack(a)) => Some(a.correlation_id.clone()),
        _ => None,
    };
    cp.wait_for("the Ack of the later Ping", Duration::from_secs(10), |s| {
        s.all().into_iter().any(|e| ack_of(e).as_deref() == Some("after"))
    });
    let acks: Vec<String> = cp.state().all().into_iter().filter_map(ack_of).collect();
    assert_eq!(acks, ["after"], "only the Ping was acked");
    session.shutdown();
}
