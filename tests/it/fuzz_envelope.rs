//! Fuzzing of what the control plane can send (agent.md "Security": bad input never
//! panics): Envelope decoding and the connected main loop's dispatch, fed random bytes and
//! mutations of valid commands, against a real state directory. Bounded so it runs in CI:
//! `BACKUPY_FUZZ_CASES` (default 3000) cases per strategy.

use std::cell::RefCell;

use backupy_agent::connected::Harness;
use backupy_agent::wire::pb;
use backupy_agent::wire::pb::envelope::Payload;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use prost::Message as _;

fn cases() -> u32 {
    std::env::var("BACKUPY_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(3000)
}

fn env(cid: &str, payload: Payload) -> Vec<u8> {
    pb::Envelope { seq: 1, ts_ms: 2, correlation_id: cid.into(), payload: Some(payload) }.encode_to_vec()
}

/// Valid frames of every server message, with plausible and edge-case fields: the seeds
/// that mutations start from.
fn corpus() -> Vec<Vec<u8>> {
    let target = pb::Target {
        id: "t".into(),
        r#type: pb::DbType::Sqlite as i32,
        display_name: "db".into(),
        connection: Some(pb::ConnectionConfig {
            host: "127.0.0.1".into(),
            port: 5432,
            database: "/nonexistent/fuzz.db".into(),
            username: "u".into(),
            password_secret_ref: "literal:pw".into(),
            container_id: "c".into(),
            strategy: pb::ConnectionStrategy::DockerExec as i32,
        }),
    };
    let job = pb::BackupJobSpec {
        id: "j".into(),
        target_id: "t".into(),
        cron: "* * * * *".into(),
        retention_days: 3,
        compression: "zstd".into(),
        encryption_enabled: true,
        pre_hooks: vec!["true".into()],
        post_hooks: vec![],
        retry: Some(pb::RetryPolicy { max_attempts: 3, backoff_seconds: vec![1, 2] }),
        timeout_sec: 5,
    };
    let config = pb::AgentConfig {
        version: 5,
        targets: vec![target],
        jobs: vec![job],
        health_checks: vec![pb::HealthCheckSpec {
            id: "h".into(),
            name: "n".into(),
            r#type: pb::CheckType::TcpCheck as i32,
            target: "127.0.0.1:1".into(),
            interval_sec: 1,
            timeout_sec: 1,
            expected_status: 200,
        }],
        maintenance: Some(pb::MaintenanceWindow { start_utc: "02:00".into(), end_utc: "05:00".into() }),
        advanced: Some(pb::AdvancedSettings {
            max_parallel_jobs: 1,
            log_level: "warn".into(),
            auto_update_enabled: false,
        }),
    };
    let creds = pb::S3UploadCreds {
        presigned_put_url: "http://127.0.0.1:1/x?X-Amz-Signature=abc".into(),
        expires_at_ms: 1,
        final_s3_key: "k".into(),
        multipart: Some(pb::S3MultipartTarget {
            endpoint: "http://127.0.0.1:1".into(),
            region: "r".into(),
            bucket: "bkt".into(),
            key: "k".into(),
            access_key_id: "a".into(),
            secret_access_key: "s".into(),
            session_token: String::new(),
            expires_at_ms: 0,
            path_style: true,
        }),
    };
    vec![
        env("c1", Payload::ConfigUpdate(pb::ConfigUpdate { config: Some(config.clone()) })),
        env(
            "",
            Payload::RegisterAck(pb::RegisterAck {
                session_id: "s".into(),
                config: Some(config),
                heartbeat_interval_sec: 1,
                server_time_iso: "2026-01-01T00:00:00Z".into(),
            }),
        ),
        env(
            "c2",
            Payload::RunBackup(pb::RunBackup {
                job_id: "j".into(),
                run_id: "r".into(),
                manual_trigger: false,
                upload_creds: Some(creds),
                encrypted_dek: vec![0; 32],
                recipient_public_key: vec![9; 32],
            }),
        ),
        env("c3", Payload::CancelJob(pb::CancelJob { job_id: "j".into() })),
        env("c4", Payload::RunHealthCheck(pb::RunHealthCheck { check_id: "h".into() })),
        env(
            "c5",
            Payload::SelfUpdate(pb::SelfUpdate {
                target_version: "9.9.9".into(),
                binary_url: "http://127.0.0.1:1/b".into(),
                sha256: "00".into(),
                cosign_signature: vec![1, 2, 3],
                force: true,
            }),
        ),
        env("c6", Payload::Ping(pb::Ping { ts_ms: 3 })),
        env("", Payload::Ack(pb::Ack { correlation_id: "17".into(), accepted: true, reason: String::new() })),
    ]
}

/// One edit of a frame: flip a byte, insert one, delete one, or cut the frame short.
#[derive(Debug, Clone)]
enum Edit {
    Set(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
}

fn apply(mut bytes: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let n = bytes.len().max(1);
        match *e {
            Edit::Set(i, b) if !bytes.is_empty() => bytes[i % n] = b,
            Edit::Insert(i, b) => bytes.insert(i % (bytes.len() + 1), b),
            Edit::Delete(i) if !bytes.is_empty() => {
                bytes.remove(i % n);
            }
            Edit::Truncate(i) => bytes.truncate(i % (bytes.len() + 1)),
            _ => {}
        }
    }
    bytes
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Insert(i, b)),
        any::<usize>().prop_map(Edit::Delete),
        any::<usize>().prop_map(Edit::Truncate),
    ]
}

#[test]
fn mutated_and_random_frames_never_panic_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let harness = RefCell::new(Harness::new(dir.path()).unwrap());
    let seeds = corpus();
    // Every seed is handled as a valid frame first: the mutations start from real commands.
    for s in &seeds {
        harness.borrow_mut().frame(s).expect("a valid frame decodes");
    }
    let mut runner =
        TestRunner::new(Config { cases: cases(), failure_persistence: None, ..Config::default() });
    let mutated = (0..seeds.len(), proptest::collection::vec(edit(), 1..4));
    let (tried, decoded) = (std::cell::Cell::new(0u32), std::cell::Cell::new(0u32));
    runner
        .run(&mutated, |(i, edits)| {
            let frame = apply(seeds[i].clone(), &edits);
            tried.set(tried.get() + 1);
            if harness.borrow_mut().frame(&frame).is_ok() {
                decoded.set(decoded.get() + 1);
            }
            Ok(())
        })
        .unwrap();
    // The mutations must reach the dispatcher, not only the decoder.
    eprintln!("{} mutated frames, {} decoded and dispatched", tried.get(), decoded.get());
    assert_eq!(tried.get(), cases());
    // About 11 % decode with 1–3 edits; 5 % leaves a wide margin for the random draw.
    assert!(decoded.get() > cases() / 20, "only {} of {} mutated frames decoded", decoded.get(), tried.get());
    let mut runner =
        TestRunner::new(Config { cases: cases(), failure_persistence: None, ..Config::default() });
    runner
        .run(&proptest::collection::vec(any::<u8>(), 0..512), |bytes| {
            let _ = harness.borrow_mut().frame(&bytes);
            Ok(())
        })
        .unwrap();
    // Still taking commands afterwards.
    let mut h = harness.borrow_mut();
    let newest = pb::AgentConfig { version: u64::MAX, ..Default::default() };
    h.frame(&env("last", Payload::ConfigUpdate(pb::ConfigUpdate { config: Some(newest) }))).unwrap();
    assert_eq!(h.config_version(), u64::MAX);
}

#[test]
fn frames_that_do_not_decode_are_refused_not_dispatched() {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new(dir.path()).unwrap();
    assert!(h.frame(&[0xff, 0xff, 0xff]).is_err(), "garbage");
    assert!(h.frame(&vec![0u8; (4 << 20) + 1]).is_err(), "over 4 MiB");
    // An unknown payload tag decodes (prost skips unknown fields) and is ignored.
    let mut unknown =
        pb::Envelope { seq: 1, ts_ms: 1, correlation_id: "x".into(), payload: None }.encode_to_vec();
    unknown.extend_from_slice(&[0x92, 0x06, 0x00]);
    assert!(h.frame(&unknown).is_ok());
}
