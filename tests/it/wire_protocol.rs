//! Wire-format checks for the `backup.v1` protocol (shared/spec/wire-v1.md).
//!
//! Three kinds of evidence that the generated types speak the spec's wire format:
//! * hand-encoded envelopes: expected bytes worked out by hand from the spec's field
//!   numbers and wire types (tag = (field << 3) | wire_type; wire types: 0 = varint,
//!   2 = length-delimited, 5 = fixed32), each byte explained;
//! * a tiny independent encoder (`Oracle`) fed from the spec tables, compared with
//!   prost's output for every message with every field set, so a wrong field number
//!   or type anywhere fails a test;
//! * round-trips, garbage input and unknown enum values.

use std::collections::HashMap;

use backupy_agent::wire::pb::{self, envelope::Payload};
use prost::Message;

// ---------------------------------------------------------------------------
// Sample values: every field set to a non-default value, distinct within a message
// so that two fields that swapped numbers would be noticed.
// ---------------------------------------------------------------------------

fn register() -> pb::Register {
    pb::Register {
        agent_version: "0.1.0".into(),
        hostname: "db-host-1".into(),
        os: "linux".into(),
        arch: "amd64".into(),
        docker_version: "27.1.1".into(),
        capabilities: vec!["docker".into(), "postgresql".into()],
        last_known_config_version: 42,
    }
}

fn agent_metrics() -> pb::AgentMetrics {
    pb::AgentMetrics {
        cpu_percent: 12.5,
        mem_used_bytes: 1_000,
        mem_total_bytes: 8_000,
        disk_used_bytes: 50_000,
        disk_total_bytes: 100_000,
        queue_depth: 3,
    }
}

fn heartbeat() -> pb::Heartbeat {
    pb::Heartbeat {
        config_version: 41,
        metrics: Some(agent_metrics()),
        active_job_ids: vec!["job-1".into(), "job-2".into()],
    }
}

fn port_binding() -> pb::PortBinding {
    pb::PortBinding { container_port: 5432, host_port: 15432, protocol: "tcp".into() }
}

fn discovered_container() -> pb::DiscoveredContainer {
    pb::DiscoveredContainer {
        container_id: "abc123".into(),
        name: "pg".into(),
        image: "postgres:16".into(),
        detected_db_type: "postgresql".into(),
        networks: vec!["bridge".into(), "backend".into()],
        // A single entry keeps the encoding order deterministic for the oracle.
        env_hints: HashMap::from([("POSTGRES_DB".to_string(), "app".to_string())]),
        ports: vec![port_binding()],
    }
}

fn discovery_report() -> pb::DiscoveryReport {
    pb::DiscoveryReport { containers: vec![discovered_container()] }
}

fn job_update() -> pb::JobUpdate {
    pb::JobUpdate {
        job_id: "job-1".into(),
        status: pb::JobStatus::Running as i32,
        progress_percent: 40,
        current_step: "dumping".into(),
        error_message: "slow disk".into(),
        run_id: "run-1".into(),
    }
}

fn backup_completed() -> pb::BackupCompleted {
    pb::BackupCompleted {
        job_id: "job-1".into(),
        run_id: "run-1".into(),
        s3_key: "backups/run-1.bkpy".into(),
        size_bytes: 123_456,
        sha256: "ab".repeat(32),
        duration_ms: 9_876,
        dek_kms_id: "x25519:abcd".into(),
        encrypted_dek: vec![7; 80],
        compression: "zstd".into(),
        db_engine_version: "PostgreSQL 16.2".into(),
    }
}

fn health_check_result() -> pb::HealthCheckResult {
    pb::HealthCheckResult {
        check_id: "hc-1".into(),
        ts_ms: 1_700_000_000_000,
        ok: true,
        latency_ms: 15,
        error: "none".into(),
        status_code: 204,
    }
}

fn log_event() -> pb::LogEvent {
    pb::LogEvent {
        ts_ms: 1_700_000_000_001,
        level: pb::LogLevel::Warn as i32,
        job_id: "job-1".into(),
        message: "retrying".into(),
        fields: HashMap::from([("attempt".to_string(), "2".to_string())]),
    }
}

fn restore_update() -> pb::RestoreUpdate {
    pb::RestoreUpdate {
        restore_id: "rs-1".into(),
        status: pb::JobStatus::Failed as i32,
        progress_percent: 70,
        current_step: "verifying".into(),
        error_message: "checksum mismatch".into(),
    }
}

fn ack() -> pb::Ack {
    pb::Ack { correlation_id: "corr-1".into(), accepted: true, reason: "queued".into() }
}

fn connection_config() -> pb::ConnectionConfig {
    pb::ConnectionConfig {
        host: "10.0.0.5".into(),
        port: 5432,
        database: "app".into(),
        username: "backup".into(),
        password_secret_ref: "secret/pg".into(),
        container_id: "abc123".into(),
        strategy: pb::ConnectionStrategy::DockerExec as i32,
    }
}

fn target() -> pb::Target {
    pb::Target {
        id: "t-1".into(),
        r#type: pb::DbType::Postgresql as i32,
        display_name: "Main DB".into(),
        connection: Some(connection_config()),
    }
}

fn retry_policy() -> pb::RetryPolicy {
    pb::RetryPolicy { max_attempts: 3, backoff_seconds: vec![60, 300, 1800] }
}

fn backup_job_spec() -> pb::BackupJobSpec {
    pb::BackupJobSpec {
        id: "job-1".into(),
        target_id: "t-1".into(),
        cron: "0 3 * * *".into(),
        retention_days: 14,
        compression: "gzip".into(),
        encryption_enabled: true,
        pre_hooks: vec!["echo pre".into()],
        post_hooks: vec!["echo post".into()],
        retry: Some(retry_policy()),
        timeout_sec: 3600,
    }
}

fn health_check_spec() -> pb::HealthCheckSpec {
    pb::HealthCheckSpec {
        id: "hc-1".into(),
        name: "api".into(),
        r#type: pb::CheckType::TcpCheck as i32,
        target: "db:5432".into(),
        interval_sec: 30,
        timeout_sec: 5,
        expected_status: 204,
    }
}

fn maintenance_window() -> pb::MaintenanceWindow {
    pb::MaintenanceWindow { start_utc: "02:00".into(), end_utc: "05:00".into() }
}

fn advanced_settings() -> pb::AdvancedSettings {
    pb::AdvancedSettings { max_parallel_jobs: 4, log_level: "debug".into(), auto_update_enabled: true }
}

fn agent_config() -> pb::AgentConfig {
    pb::AgentConfig {
        version: 43,
        targets: vec![target()],
        jobs: vec![backup_job_spec()],
        health_checks: vec![health_check_spec()],
        maintenance: Some(maintenance_window()),
        advanced: Some(advanced_settings()),
    }
}

fn register_ack() -> pb::RegisterAck {
    pb::RegisterAck {
        session_id: "sess-1".into(),
        config: Some(agent_config()),
        heartbeat_interval_sec: 15,
        server_time_iso: "2026-01-01T00:00:00Z".into(),
    }
}

fn config_update() -> pb::ConfigUpdate {
    pb::ConfigUpdate { config: Some(agent_config()) }
}

fn s3_multipart_target() -> pb::S3MultipartTarget {
    pb::S3MultipartTarget {
        endpoint: "https://s3.example".into(),
        region: "eu-west-1".into(),
        bucket: "bk".into(),
        key: "backups/run-1.bkpy".into(),
        access_key_id: "AKIA".into(),
        secret_access_key: "SECRET".into(),
        session_token: "TOKEN".into(),
        expires_at_ms: 1_700_000_100_000,
        path_style: true,
    }
}

fn s3_upload_creds() -> pb::S3UploadCreds {
    pb::S3UploadCreds {
        presigned_put_url: "https://s3.example/put".into(),
        expires_at_ms: 1_700_000_200_000,
        final_s3_key: "backups/run-1.bkpy.part".into(),
        multipart: Some(s3_multipart_target()),
    }
}

fn s3_download_creds() -> pb::S3DownloadCreds {
    pb::S3DownloadCreds {
        presigned_get_url: "https://s3.example/get".into(),
        expires_at_ms: 1_700_000_300_000,
        s3_key: "backups/run-1.bkpy".into(),
    }
}

fn run_backup() -> pb::RunBackup {
    pb::RunBackup {
        job_id: "job-1".into(),
        run_id: "run-1".into(),
        manual_trigger: true,
        upload_creds: Some(s3_upload_creds()),
        encrypted_dek: vec![0x11; 32],
        recipient_public_key: vec![0x22; 32],
    }
}

fn cancel_job() -> pb::CancelJob {
    pb::CancelJob { job_id: "job-1".into() }
}

fn run_health_check() -> pb::RunHealthCheck {
    pb::RunHealthCheck { check_id: "hc-1".into() }
}

fn self_update() -> pb::SelfUpdate {
    pb::SelfUpdate {
        target_version: "0.2.0".into(),
        binary_url: "https://example.invalid/agent".into(),
        sha256: "cd".repeat(32),
        cosign_signature: vec![1, 2, 3],
        force: true,
    }
}

fn ping() -> pb::Ping {
    pb::Ping { ts_ms: 1_700_000_000_002 }
}

/// Every payload variant with its spec tag number. The `match` in
/// `payload_tag` has no wildcard, so a new variant must be added there too.
fn all_payloads() -> Vec<(u32, Payload)> {
    vec![
        (10, Payload::Register(register())),
        (11, Payload::Heartbeat(heartbeat())),
        (12, Payload::Discovery(discovery_report())),
        (13, Payload::JobUpdate(job_update())),
        (14, Payload::BackupCompleted(backup_completed())),
        (15, Payload::HealthResult(health_check_result())),
        (16, Payload::Log(log_event())),
        (17, Payload::RestoreUpdate(restore_update())),
        (18, Payload::Ack(ack())),
        (50, Payload::RegisterAck(register_ack())),
        (51, Payload::ConfigUpdate(config_update())),
        (52, Payload::RunBackup(run_backup())),
        (53, Payload::CancelJob(cancel_job())),
        (54, Payload::RunHealthCheck(run_health_check())),
        (56, Payload::SelfUpdate(self_update())),
        (57, Payload::Ping(ping())),
    ]
}

/// Spec tag of a payload variant, written from the Envelope table of wire-v1.md.
fn payload_tag(p: &Payload) -> u32 {
    match p {
        Payload::Register(_) => 10,
        Payload::Heartbeat(_) => 11,
        Payload::Discovery(_) => 12,
        Payload::JobUpdate(_) => 13,
        Payload::BackupCompleted(_) => 14,
        Payload::HealthResult(_) => 15,
        Payload::Log(_) => 16,
        Payload::RestoreUpdate(_) => 17,
        Payload::Ack(_) => 18,
        Payload::RegisterAck(_) => 50,
        Payload::ConfigUpdate(_) => 51,
        Payload::RunBackup(_) => 52,
        Payload::CancelJob(_) => 53,
        Payload::RunHealthCheck(_) => 54,
        Payload::SelfUpdate(_) => 56,
        Payload::Ping(_) => 57,
    }
}

fn assert_round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(m: &M) {
    assert_ne!(*m, M::default(), "sample must not be the default value");
    let bytes = m.encode_to_vec();
    assert_eq!(bytes.len(), m.encoded_len());
    let back = M::decode(bytes.as_slice()).expect("decode of freshly encoded message");
    assert_eq!(&back, m);
}

/// Asserts that `value` encodes to exactly `expected` and that `expected` decodes
/// back to `value`.
fn assert_wire(value: &pb::Envelope, expected: &[u8]) {
    assert_eq!(value.encode_to_vec(), expected, "encoding differs from the hand-computed bytes");
    let decoded = pb::Envelope::decode(expected).expect("hand-computed bytes must decode");
    assert_eq!(&decoded, value);
}

// ---------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------

#[test]
fn every_message_type_round_trips_with_all_fields_set() {
    assert_round_trip(&register());
    assert_round_trip(&heartbeat());
    assert_round_trip(&agent_metrics());
    assert_round_trip(&discovery_report());
    assert_round_trip(&discovered_container());
    assert_round_trip(&port_binding());
    assert_round_trip(&job_update());
    assert_round_trip(&backup_completed());
    assert_round_trip(&health_check_result());
    assert_round_trip(&log_event());
    assert_round_trip(&restore_update());
    assert_round_trip(&ack());
    assert_round_trip(&register_ack());
    assert_round_trip(&agent_config());
    assert_round_trip(&target());
    assert_round_trip(&connection_config());
    assert_round_trip(&backup_job_spec());
    assert_round_trip(&retry_policy());
    assert_round_trip(&health_check_spec());
    assert_round_trip(&maintenance_window());
    assert_round_trip(&advanced_settings());
    assert_round_trip(&config_update());
    assert_round_trip(&run_backup());
    assert_round_trip(&s3_upload_creds());
    assert_round_trip(&s3_multipart_target());
    assert_round_trip(&s3_download_creds());
    assert_round_trip(&cancel_job());
    assert_round_trip(&run_health_check());
    assert_round_trip(&self_update());
    assert_round_trip(&ping());
}

#[test]
fn every_envelope_payload_variant_round_trips() {
    let payloads = all_payloads();
    assert_eq!(payloads.len(), 16, "the spec lists 16 payload variants");
    let mut tags: Vec<u32> = payloads.iter().map(|(t, _)| *t).collect();
    tags.sort_unstable();
    tags.dedup();
    assert_eq!(tags.len(), 16, "payload tags must be distinct");
    for (i, (tag, payload)) in payloads.into_iter().enumerate() {
        assert_eq!(payload_tag(&payload), tag);
        let env = pb::Envelope {
            seq: 1_000 + i as u64,
            ts_ms: 1_700_000_000_000 + i as u64,
            correlation_id: format!("corr-{tag}"),
            payload: Some(payload),
        };
        assert_round_trip(&env);
    }
}

// ---------------------------------------------------------------------------
// Hand-encoded envelopes
// ---------------------------------------------------------------------------

#[test]
fn envelope_ping_matches_hand_encoded_bytes() {
    let env = pb::Envelope {
        seq: 1,
        ts_ms: 2,
        correlation_id: "c".into(),
        payload: Some(Payload::Ping(pb::Ping { ts_ms: 5 })),
    };
    #[rustfmt::skip]
    let expected: &[u8] = &[
        0x08, 0x01,       // Envelope.seq: field 1, varint -> (1<<3)|0 = 0x08; value 1
        0x10, 0x02,       // Envelope.ts_ms: field 2, varint -> (2<<3)|0 = 0x10; value 2
        0x1A, 0x01, 0x63, // Envelope.correlation_id: field 3, len -> (3<<3)|2 = 0x1A; len 1; 'c'
        0xCA, 0x03,       // payload ping: field 57, len -> (57<<3)|2 = 458 = 0b11_1001010
                          //   varint: low 7 bits 0x4A | 0x80 = 0xCA, then 458>>7 = 3 -> 0x03
        0x02,             //   Ping length: 2 bytes
        0x08, 0x05,       //   Ping.ts_ms: field 1, varint -> 0x08; value 5
    ];
    assert_wire(&env, expected);
}

#[test]
fn envelope_job_update_matches_hand_encoded_bytes() {
    let env = pb::Envelope {
        seq: 300,
        ts_ms: 1_000_000,
        correlation_id: String::new(),
        payload: Some(Payload::JobUpdate(pb::JobUpdate {
            job_id: "j1".into(),
            status: pb::JobStatus::Failed as i32,
            progress_percent: 50,
            current_step: "dumping".into(),
            error_message: "e".into(),
            run_id: "r1".into(),
        })),
    };
    #[rustfmt::skip]
    let expected: &[u8] = &[
        0x08, 0xAC, 0x02,       // seq: tag 0x08; 300 = 2*128 + 44 -> 0x2C|0x80 = 0xAC, 0x02
        0x10, 0xC0, 0x84, 0x3D, // ts_ms: tag 0x10; 1_000_000 = 61*16384 + 4*128 + 64
                                //   -> 0x40|0x80 = 0xC0, 0x04|0x80 = 0x84, 61 = 0x3D
                                // correlation_id "" is the default: not written
        0x6A, 0x18,             // payload job_update: field 13, len -> (13<<3)|2 = 106 = 0x6A;
                                //   length 24 = 4 + 2 + 2 + 9 + 3 + 4
        0x0A, 0x02, 0x6A, 0x31, //   job_id: (1<<3)|2 = 0x0A; len 2; "j1"
        0x10, 0x04,             //   status: (2<<3)|0 = 0x10; FAILED = 4
        0x18, 0x32,             //   progress_percent: (3<<3)|0 = 0x18; 50 = 0x32
        0x22, 0x07,             //   current_step: (4<<3)|2 = 0x22; len 7
        0x64, 0x75, 0x6D, 0x70, 0x69, 0x6E, 0x67, // "dumping"
        0x2A, 0x01, 0x65,       //   error_message: (5<<3)|2 = 0x2A; len 1; "e"
        0x32, 0x02, 0x72, 0x31, //   run_id: (6<<3)|2 = 0x32; len 2; "r1"
    ];
    assert_wire(&env, expected);
}

#[test]
fn envelope_ack_matches_hand_encoded_bytes() {
    let env = pb::Envelope {
        seq: 7,
        ts_ms: 8,
        correlation_id: "42".into(),
        payload: Some(Payload::Ack(pb::Ack {
            correlation_id: "42".into(),
            accepted: true,
            reason: "ok".into(),
        })),
    };
    #[rustfmt::skip]
    let expected: &[u8] = &[
        0x08, 0x07,             // seq: tag 0x08; 7
        0x10, 0x08,             // ts_ms: tag 0x10; 8
        0x1A, 0x02, 0x34, 0x32, // correlation_id: tag 0x1A; len 2; "42"
        0x92, 0x01,             // payload ack: field 18, len -> (18<<3)|2 = 146
                                //   varint: 146 - 128 = 18 -> 0x12|0x80 = 0x92, then 0x01
        0x0A,                   //   Ack length: 10 = 4 + 2 + 4
        0x0A, 0x02, 0x34, 0x32, //   Ack.correlation_id: (1<<3)|2 = 0x0A; len 2; "42"
        0x10, 0x01,             //   Ack.accepted: (2<<3)|0 = 0x10; true = 1
        0x1A, 0x02, 0x6F, 0x6B, //   Ack.reason: (3<<3)|2 = 0x1A; len 2; "ok"
    ];
    assert_wire(&env, expected);
}

#[test]
fn envelope_run_backup_with_recipient_public_key_matches_hand_encoded_bytes() {
    let env = pb::Envelope {
        seq: 9,
        ts_ms: 10,
        correlation_id: "cmd".into(),
        payload: Some(Payload::RunBackup(pb::RunBackup {
            job_id: "j".into(),
            run_id: "r".into(),
            manual_trigger: true,
            upload_creds: Some(pb::S3UploadCreds {
                presigned_put_url: "u".into(),
                expires_at_ms: 3,
                final_s3_key: "k".into(),
                multipart: None,
            }),
            encrypted_dek: vec![0xDE, 0xAD],
            recipient_public_key: vec![0x01, 0x02, 0x03, 0x04],
        })),
    };
    #[rustfmt::skip]
    let expected: &[u8] = &[
        0x08, 0x09,             // seq: tag 0x08; 9
        0x10, 0x0A,             // ts_ms: tag 0x10; 10
        0x1A, 0x03, 0x63, 0x6D, 0x64, // correlation_id: tag 0x1A; len 3; "cmd"
        0xA2, 0x03,             // payload run_backup: field 52, len -> (52<<3)|2 = 418
                                //   = 3*128 + 34 -> 0x22|0x80 = 0xA2, 0x03
        0x1D,                   //   RunBackup length: 29 = 3 + 3 + 2 + 10 + 4 + 7
        0x0A, 0x01, 0x6A,       //   job_id: (1<<3)|2 = 0x0A; len 1; "j"
        0x12, 0x01, 0x72,       //   run_id: (2<<3)|2 = 0x12; len 1; "r"
        0x18, 0x01,             //   manual_trigger: (3<<3)|0 = 0x18; true
        0x22, 0x08,             //   upload_creds: (4<<3)|2 = 0x22; len 8 = 3 + 2 + 3
        0x0A, 0x01, 0x75,       //     presigned_put_url: 0x0A; len 1; "u"
        0x10, 0x03,             //     expires_at_ms: (2<<3)|0 = 0x10; 3
        0x1A, 0x01, 0x6B,       //     final_s3_key: (3<<3)|2 = 0x1A; len 1; "k"
        0x2A, 0x02, 0xDE, 0xAD, //   encrypted_dek: (5<<3)|2 = 0x2A; len 2; DE AD
        0xA2, 0x06,             //   recipient_public_key: field 100, len -> (100<<3)|2 = 802
                                //     = 6*128 + 34 -> 0x22|0x80 = 0xA2, 0x06 (two-byte tag)
        0x04, 0x01, 0x02, 0x03, 0x04, // len 4; key bytes
    ];
    assert_wire(&env, expected);
}

/// S3MultipartTarget{endpoint "e", region "r", bucket "b", key "k", access_key_id "a",
/// secret_access_key "s", session_token "t", expires_at_ms 4, path_style true}
/// = 25 bytes, worked out by hand.
#[rustfmt::skip]
const MULTIPART_BYTES: &[u8] = &[
    0x0A, 0x01, 0x65, // endpoint: (1<<3)|2 = 0x0A; len 1; "e"
    0x12, 0x01, 0x72, // region: (2<<3)|2 = 0x12; "r"
    0x1A, 0x01, 0x62, // bucket: (3<<3)|2 = 0x1A; "b"
    0x22, 0x01, 0x6B, // key: (4<<3)|2 = 0x22; "k"
    0x2A, 0x01, 0x61, // access_key_id: (5<<3)|2 = 0x2A; "a"
    0x32, 0x01, 0x73, // secret_access_key: (6<<3)|2 = 0x32; "s"
    0x3A, 0x01, 0x74, // session_token: (7<<3)|2 = 0x3A; "t"
    0x40, 0x04,       // expires_at_ms: (8<<3)|0 = 0x40; 4
    0x48, 0x01,       // path_style: (9<<3)|0 = 0x48; true
];

fn small_multipart() -> pb::S3MultipartTarget {
    pb::S3MultipartTarget {
        endpoint: "e".into(),
        region: "r".into(),
        bucket: "b".into(),
        key: "k".into(),
        access_key_id: "a".into(),
        secret_access_key: "s".into(),
        session_token: "t".into(),
        expires_at_ms: 4,
        path_style: true,
    }
}

fn small_upload_creds_with_multipart() -> pb::S3UploadCreds {
    pb::S3UploadCreds {
        presigned_put_url: "u".into(),
        expires_at_ms: 3,
        final_s3_key: "k".into(),
        multipart: Some(small_multipart()),
    }
}

#[test]
fn s3_upload_creds_with_multipart_matches_hand_encoded_bytes() {
    assert_eq!(MULTIPART_BYTES.len(), 25);
    assert_eq!(small_multipart().encode_to_vec(), MULTIPART_BYTES);

    #[rustfmt::skip]
    let mut expected: Vec<u8> = vec![
        0x0A, 0x01, 0x75, // presigned_put_url: (1<<3)|2 = 0x0A; len 1; "u"
        0x10, 0x03,       // expires_at_ms: (2<<3)|0 = 0x10; 3
        0x1A, 0x01, 0x6B, // final_s3_key: (3<<3)|2 = 0x1A; len 1; "k"
        0xA2, 0x06,       // multipart: field 100, len -> 802 = 6*128 + 34 -> 0xA2, 0x06
        0x19,             //   length 25
    ];
    expected.extend_from_slice(MULTIPART_BYTES);
    let creds = small_upload_creds_with_multipart();
    assert_eq!(creds.encode_to_vec(), expected);
    assert_eq!(pb::S3UploadCreds::decode(expected.as_slice()).unwrap(), creds);
}

#[test]
fn envelope_run_backup_with_multipart_upload_creds_matches_hand_encoded_bytes() {
    let env = pb::Envelope {
        seq: 11,
        ts_ms: 12,
        correlation_id: String::new(),
        payload: Some(Payload::RunBackup(pb::RunBackup {
            job_id: "j".into(),
            upload_creds: Some(small_upload_creds_with_multipart()),
            ..Default::default()
        })),
    };
    #[rustfmt::skip]
    let mut expected: Vec<u8> = vec![
        0x08, 0x0B,       // seq: tag 0x08; 11
        0x10, 0x0C,       // ts_ms: tag 0x10; 12
        0xA2, 0x03,       // payload run_backup: field 52 -> 418 -> 0xA2, 0x03
        0x29,             //   RunBackup length: 41 = 3 + 2 + 36
        0x0A, 0x01, 0x6A, //   job_id: 0x0A; len 1; "j"
        0x22, 0x24,       //   upload_creds: (4<<3)|2 = 0x22; len 36 = 8 + 3 + 25
        0x0A, 0x01, 0x75, //     presigned_put_url "u"
        0x10, 0x03,       //     expires_at_ms 3
        0x1A, 0x01, 0x6B, //     final_s3_key "k"
        0xA2, 0x06, 0x19, //     multipart: field 100 -> 0xA2, 0x06; len 25
    ];
    expected.extend_from_slice(MULTIPART_BYTES);
    assert_wire(&env, &expected);
}

#[test]
fn envelope_register_matches_hand_encoded_bytes() {
    let env = pb::Envelope {
        seq: 1,
        ts_ms: 0,
        correlation_id: String::new(),
        payload: Some(Payload::Register(pb::Register {
            agent_version: "1".into(),
            hostname: "h".into(),
            os: "linux".into(),
            arch: "arm64".into(),
            docker_version: "d".into(),
            capabilities: vec!["x".into(), "y".into()],
            last_known_config_version: 5,
        })),
    };
    #[rustfmt::skip]
    let expected: &[u8] = &[
        0x08, 0x01,       // seq: tag 0x08; 1 (ts_ms 0 and correlation_id "" are not written)
        0x52, 0x1F,       // payload register: field 10, len -> (10<<3)|2 = 82 = 0x52;
                          //   length 31 = 3 + 3 + 7 + 7 + 3 + 3 + 3 + 2
        0x0A, 0x01, 0x31, //   agent_version: 0x0A; len 1; "1"
        0x12, 0x01, 0x68, //   hostname: (2<<3)|2 = 0x12; "h"
        0x1A, 0x05, 0x6C, 0x69, 0x6E, 0x75, 0x78, // os: (3<<3)|2 = 0x1A; len 5; "linux"
        0x22, 0x05, 0x61, 0x72, 0x6D, 0x36, 0x34, // arch: (4<<3)|2 = 0x22; len 5; "arm64"
        0x2A, 0x01, 0x64, //   docker_version: (5<<3)|2 = 0x2A; "d"
        0x32, 0x01, 0x78, //   capabilities[0]: (6<<3)|2 = 0x32; "x"
        0x32, 0x01, 0x79, //   capabilities[1]: same tag repeated; "y"
        0x38, 0x05,       //   last_known_config_version: (7<<3)|0 = 0x38; 5
    ];
    assert_wire(&env, expected);
}

// ---------------------------------------------------------------------------
// Independent encoder fed from the spec tables
// ---------------------------------------------------------------------------

/// A minimal protobuf writer, independent of prost, used to state each message's
/// expected encoding straight from the spec's "number name type" tables.
#[derive(Default)]
struct Oracle(Vec<u8>);

impl Oracle {
    fn new() -> Self {
        Self::default()
    }

    fn raw_varint(&mut self, mut v: u64) {
        loop {
            let byte = (v & 0x7F) as u8;
            v >>= 7;
            if v == 0 {
                self.0.push(byte);
                return;
            }
            self.0.push(byte | 0x80);
        }
    }

    fn key(&mut self, field: u32, wire_type: u8) {
        self.raw_varint((u64::from(field) << 3) | u64::from(wire_type));
    }

    /// uint64 / uint32 / bool / enum: wire type 0.
    fn varint(mut self, field: u32, v: u64) -> Self {
        self.key(field, 0);
        self.raw_varint(v);
        self
    }

    /// string / bytes / embedded message: wire type 2.
    fn bytes(mut self, field: u32, b: &[u8]) -> Self {
        self.key(field, 2);
        self.raw_varint(b.len() as u64);
        self.0.extend_from_slice(b);
        self
    }

    fn string(self, field: u32, s: &str) -> Self {
        self.bytes(field, s.as_bytes())
    }

    fn message(self, field: u32, m: Oracle) -> Self {
        self.bytes(field, &m.0)
    }

    /// float: wire type 5, little-endian.
    fn float(mut self, field: u32, f: f32) -> Self {
        self.key(field, 5);
        self.0.extend_from_slice(&f.to_le_bytes());
        self
    }

    /// proto3 repeated scalars are packed: one length-delimited run of varints.
    fn packed(self, field: u32, values: &[u64]) -> Self {
        let mut inner = Oracle::new();
        for v in values {
            inner.raw_varint(*v);
        }
        self.bytes(field, &inner.0)
    }

    /// map<string,string> entry: a message with key = 1, value = 2.
    fn map_entry(self, field: u32, k: &str, v: &str) -> Self {
        self.message(field, Oracle::new().string(1, k).string(2, v))
    }

    fn done(self) -> Vec<u8> {
        self.0
    }
}

fn spec_register() -> Oracle {
    let r = register();
    Oracle::new()
        .string(1, &r.agent_version)
        .string(2, &r.hostname)
        .string(3, &r.os)
        .string(4, &r.arch)
        .string(5, &r.docker_version)
        .string(6, "docker")
        .string(6, "postgresql")
        .varint(7, 42)
}

fn spec_agent_metrics() -> Oracle {
    Oracle::new()
        .float(1, 12.5)
        .varint(2, 1_000)
        .varint(3, 8_000)
        .varint(4, 50_000)
        .varint(5, 100_000)
        .varint(6, 3)
}

fn spec_heartbeat() -> Oracle {
    Oracle::new().varint(1, 41).message(2, spec_agent_metrics()).string(3, "job-1").string(3, "job-2")
}

fn spec_port_binding() -> Oracle {
    Oracle::new().varint(1, 5432).varint(2, 15432).string(3, "tcp")
}

fn spec_discovered_container() -> Oracle {
    Oracle::new()
        .string(1, "abc123")
        .string(2, "pg")
        .string(3, "postgres:16")
        .string(4, "postgresql")
        .string(5, "bridge")
        .string(5, "backend")
        .map_entry(6, "POSTGRES_DB", "app")
        .message(7, spec_port_binding())
}

fn spec_discovery_report() -> Oracle {
    Oracle::new().message(1, spec_discovered_container())
}

fn spec_job_update() -> Oracle {
    Oracle::new()
        .string(1, "job-1")
        .varint(2, 2) // RUNNING
        .varint(3, 40)
        .string(4, "dumping")
        .string(5, "slow disk")
        .string(6, "run-1")
}

fn spec_backup_completed() -> Oracle {
    Oracle::new()
        .string(1, "job-1")
        .string(2, "run-1")
        .string(3, "backups/run-1.bkpy")
        .varint(4, 123_456)
        .string(5, &"ab".repeat(32))
        .varint(6, 9_876)
        .string(7, "x25519:abcd")
        .bytes(8, &[7; 80])
        .string(9, "zstd")
        .string(10, "PostgreSQL 16.2")
}

fn spec_health_check_result() -> Oracle {
    Oracle::new()
        .string(1, "hc-1")
        .varint(2, 1_700_000_000_000)
        .varint(3, 1)
        .varint(4, 15)
        .string(5, "none")
        .varint(6, 204)
}

fn spec_log_event() -> Oracle {
    Oracle::new()
        .varint(1, 1_700_000_000_001)
        .varint(2, 3) // WARN
        .string(3, "job-1")
        .string(4, "retrying")
        .map_entry(5, "attempt", "2")
}

fn spec_restore_update() -> Oracle {
    Oracle::new()
        .string(1, "rs-1")
        .varint(2, 4) // FAILED
        .varint(3, 70)
        .string(4, "verifying")
        .string(5, "checksum mismatch")
}

fn spec_ack() -> Oracle {
    Oracle::new().string(1, "corr-1").varint(2, 1).string(3, "queued")
}

fn spec_connection_config() -> Oracle {
    Oracle::new()
        .string(1, "10.0.0.5")
        .varint(2, 5432)
        .string(3, "app")
        .string(4, "backup")
        .string(5, "secret/pg")
        .string(6, "abc123")
        .varint(7, 1) // DOCKER_EXEC
}

fn spec_target() -> Oracle {
    Oracle::new()
        .string(1, "t-1")
        .varint(2, 1) // POSTGRESQL
        .string(3, "Main DB")
        .message(4, spec_connection_config())
}

fn spec_retry_policy() -> Oracle {
    Oracle::new().varint(1, 3).packed(2, &[60, 300, 1800])
}

fn spec_backup_job_spec() -> Oracle {
    Oracle::new()
        .string(1, "job-1")
        .string(2, "t-1")
        .string(3, "0 3 * * *")
        .varint(4, 14)
        .string(5, "gzip")
        .varint(6, 1)
        .string(7, "echo pre")
        .string(8, "echo post")
        .message(9, spec_retry_policy())
        .varint(10, 3600)
}

fn spec_health_check_spec() -> Oracle {
    Oracle::new()
        .string(1, "hc-1")
        .string(2, "api")
        .varint(3, 2) // TCP_CHECK
        .string(4, "db:5432")
        .varint(5, 30)
        .varint(6, 5)
        .varint(7, 204)
}

fn spec_maintenance_window() -> Oracle {
    Oracle::new().string(1, "02:00").string(2, "05:00")
}

fn spec_advanced_settings() -> Oracle {
    Oracle::new().varint(1, 4).string(2, "debug").varint(3, 1)
}

fn spec_agent_config() -> Oracle {
    Oracle::new()
        .varint(1, 43)
        .message(2, spec_target())
        .message(3, spec_backup_job_spec())
        .message(4, spec_health_check_spec())
        .message(5, spec_maintenance_window())
        .message(6, spec_advanced_settings())
}

fn spec_register_ack() -> Oracle {
    Oracle::new()
        .string(1, "sess-1")
        .message(2, spec_agent_config())
        .varint(3, 15)
        .string(4, "2026-01-01T00:00:00Z")
}

fn spec_config_update() -> Oracle {
    Oracle::new().message(1, spec_agent_config())
}

fn spec_s3_multipart_target() -> Oracle {
    Oracle::new()
        .string(1, "https://s3.example")
        .string(2, "eu-west-1")
        .string(3, "bk")
        .string(4, "backups/run-1.bkpy")
        .string(5, "AKIA")
        .string(6, "SECRET")
        .string(7, "TOKEN")
        .varint(8, 1_700_000_100_000)
        .varint(9, 1)
}

fn spec_s3_upload_creds() -> Oracle {
    Oracle::new()
        .string(1, "https://s3.example/put")
        .varint(2, 1_700_000_200_000)
        .string(3, "backups/run-1.bkpy.part")
        .message(100, spec_s3_multipart_target())
}

fn spec_s3_download_creds() -> Oracle {
    Oracle::new()
        .string(1, "https://s3.example/get")
        .varint(2, 1_700_000_300_000)
        .string(3, "backups/run-1.bkpy")
}

fn spec_run_backup() -> Oracle {
    Oracle::new()
        .string(1, "job-1")
        .string(2, "run-1")
        .varint(3, 1)
        .message(4, spec_s3_upload_creds())
        .bytes(5, &[0x11; 32])
        .bytes(100, &[0x22; 32])
}

fn spec_cancel_job() -> Oracle {
    Oracle::new().string(1, "job-1")
}

fn spec_run_health_check() -> Oracle {
    Oracle::new().string(1, "hc-1")
}

fn spec_self_update() -> Oracle {
    Oracle::new()
        .string(1, "0.2.0")
        .string(2, "https://example.invalid/agent")
        .string(3, &"cd".repeat(32))
        .bytes(4, &[1, 2, 3])
        .varint(5, 1)
}

fn spec_ping() -> Oracle {
    Oracle::new().varint(1, 1_700_000_000_002)
}

fn check<M: Message>(name: &str, value: &M, spec: Oracle) {
    assert_eq!(
        value.encode_to_vec(),
        spec.done(),
        "{name}: encoding does not match the spec's field numbers/types"
    );
}

#[test]
fn every_message_field_number_and_type_matches_spec_tables() {
    check("Register", &register(), spec_register());
    check("Heartbeat", &heartbeat(), spec_heartbeat());
    check("AgentMetrics", &agent_metrics(), spec_agent_metrics());
    check("DiscoveryReport", &discovery_report(), spec_discovery_report());
    check("DiscoveredContainer", &discovered_container(), spec_discovered_container());
    check("PortBinding", &port_binding(), spec_port_binding());
    check("JobUpdate", &job_update(), spec_job_update());
    check("BackupCompleted", &backup_completed(), spec_backup_completed());
    check("HealthCheckResult", &health_check_result(), spec_health_check_result());
    check("LogEvent", &log_event(), spec_log_event());
    check("RestoreUpdate", &restore_update(), spec_restore_update());
    check("Ack", &ack(), spec_ack());
    check("RegisterAck", &register_ack(), spec_register_ack());
    check("AgentConfig", &agent_config(), spec_agent_config());
    check("Target", &target(), spec_target());
    check("ConnectionConfig", &connection_config(), spec_connection_config());
    check("BackupJobSpec", &backup_job_spec(), spec_backup_job_spec());
    check("RetryPolicy", &retry_policy(), spec_retry_policy());
    check("HealthCheckSpec", &health_check_spec(), spec_health_check_spec());
    check("MaintenanceWindow", &maintenance_window(), spec_maintenance_window());
    check("AdvancedSettings", &advanced_settings(), spec_advanced_settings());
    check("ConfigUpdate", &config_update(), spec_config_update());
    check("RunBackup", &run_backup(), spec_run_backup());
    check("S3UploadCreds", &s3_upload_creds(), spec_s3_upload_creds());
    check("S3MultipartTarget", &s3_multipart_target(), spec_s3_multipart_target());
    check("S3DownloadCreds", &s3_download_creds(), spec_s3_download_creds());
    check("CancelJob", &cancel_job(), spec_cancel_job());
    check("RunHealthCheck", &run_health_check(), spec_run_health_check());
    check("SelfUpdate", &self_update(), spec_self_update());
    check("Ping", &ping(), spec_ping());
}

#[test]
fn every_envelope_payload_uses_the_spec_tag() {
    for (tag, payload) in all_payloads() {
        let body = match &payload {
            Payload::Register(_) => spec_register(),
            Payload::Heartbeat(_) => spec_heartbeat(),
            Payload::Discovery(_) => spec_discovery_report(),
            Payload::JobUpdate(_) => spec_job_update(),
            Payload::BackupCompleted(_) => spec_backup_completed(),
            Payload::HealthResult(_) => spec_health_check_result(),
            Payload::Log(_) => spec_log_event(),
            Payload::RestoreUpdate(_) => spec_restore_update(),
            Payload::Ack(_) => spec_ack(),
            Payload::RegisterAck(_) => spec_register_ack(),
            Payload::ConfigUpdate(_) => spec_config_update(),
            Payload::RunBackup(_) => spec_run_backup(),
            Payload::CancelJob(_) => spec_cancel_job(),
            Payload::RunHealthCheck(_) => spec_run_health_check(),
            Payload::SelfUpdate(_) => spec_self_update(),
            Payload::Ping(_) => spec_ping(),
        };
        let env = pb::Envelope {
            seq: 77,
            ts_ms: 1_700_000_000_003,
            correlation_id: "env-corr".into(),
            payload: Some(payload),
        };
        let spec =
            Oracle::new().varint(1, 77).varint(2, 1_700_000_000_003).string(3, "env-corr").message(tag, body);
        check(&format!("Envelope payload tag {tag}"), &env, spec);

        // A set payload is written even when the inner message is empty.
        let empty =
            pb::Envelope { payload: Some(empty_like(env.payload.as_ref().unwrap())), ..Default::default() };
        check(&format!("Envelope empty payload tag {tag}"), &empty, Oracle::new().bytes(tag, &[]));
    }
}

fn empty_like(p: &Payload) -> Payload {
    match p {
        Payload::Register(_) => Payload::Register(Default::default()),
        Payload::Heartbeat(_) => Payload::Heartbeat(Default::default()),
        Payload::Discovery(_) => Payload::Discovery(Default::default()),
        Payload::JobUpdate(_) => Payload::JobUpdate(Default::default()),
        Payload::BackupCompleted(_) => Payload::BackupCompleted(Default::default()),
        Payload::HealthResult(_) => Payload::HealthResult(Default::default()),
        Payload::Log(_) => Payload::Log(Default::default()),
        Payload::RestoreUpdate(_) => Payload::RestoreUpdate(Default::default()),
        Payload::Ack(_) => Payload::Ack(Default::default()),
        Payload::RegisterAck(_) => Payload::RegisterAck(Default::default()),
        Payload::ConfigUpdate(_) => Payload::ConfigUpdate(Default::default()),
        Payload::RunBackup(_) => Payload::RunBackup(Default::default()),
        Payload::CancelJob(_) => Payload::CancelJob(Default::default()),
        Payload::RunHealthCheck(_) => Payload::RunHealthCheck(Default::default()),
        Payload::SelfUpdate(_) => Payload::SelfUpdate(Default::default()),
        Payload::Ping(_) => Payload::Ping(Default::default()),
    }
}

#[test]
fn enum_values_and_names_match_spec() {
    use pb::{CheckType, ConnectionStrategy, DbType, JobStatus, LogLevel};
    let job: [(JobStatus, i32, &str); 6] = [
        (JobStatus::Unspecified, 0, "JOB_STATUS_UNSPECIFIED"),
        (JobStatus::Queued, 1, "QUEUED"),
        (JobStatus::Running, 2, "RUNNING"),
        (JobStatus::Success, 3, "SUCCESS"),
        (JobStatus::Failed, 4, "FAILED"),
        (JobStatus::Cancelled, 5, "CANCELLED"),
    ];
    for (v, n, name) in job {
        assert_eq!((v as i32, v.as_str_name()), (n, name));
        assert_eq!(JobStatus::try_from(n), Ok(v));
    }
    let db: [(DbType, i32, &str); 7] = [
        (DbType::DbUnspecified, 0, "DB_UNSPECIFIED"),
        (DbType::Postgresql, 1, "POSTGRESQL"),
        (DbType::Mysql, 2, "MYSQL"),
        (DbType::Mariadb, 3, "MARIADB"),
        (DbType::Mongodb, 4, "MONGODB"),
        (DbType::Redis, 5, "REDIS"),
        (DbType::Sqlite, 6, "SQLITE"),
    ];
    for (v, n, name) in db {
        assert_eq!((v as i32, v.as_str_name()), (n, name));
        assert_eq!(DbType::try_from(n), Ok(v));
    }
    let strategy: [(ConnectionStrategy, i32, &str); 3] = [
        (ConnectionStrategy::Tcp, 0, "TCP"),
        (ConnectionStrategy::DockerExec, 1, "DOCKER_EXEC"),
        (ConnectionStrategy::UnixSocket, 2, "UNIX_SOCKET"),
    ];
    for (v, n, name) in strategy {
        assert_eq!((v as i32, v.as_str_name()), (n, name));
        assert_eq!(ConnectionStrategy::try_from(n), Ok(v));
    }
    let check_type: [(CheckType, i32, &str); 3] =
        [(CheckType::Http, 0, "HTTP"), (CheckType::Https, 1, "HTTPS"), (CheckType::TcpCheck, 2, "TCP_CHECK")];
    for (v, n, name) in check_type {
        assert_eq!((v as i32, v.as_str_name()), (n, name));
        assert_eq!(CheckType::try_from(n), Ok(v));
    }
    let level: [(LogLevel, i32, &str); 5] = [
        (LogLevel::Trace, 0, "TRACE"),
        (LogLevel::Debug, 1, "DEBUG"),
        (LogLevel::Info, 2, "INFO"),
        (LogLevel::Warn, 3, "WARN"),
        (LogLevel::Error, 4, "ERROR"),
    ];
    for (v, n, name) in level {
        assert_eq!((v as i32, v.as_str_name()), (n, name));
        assert_eq!(LogLevel::try_from(n), Ok(v));
    }
}

// ---------------------------------------------------------------------------
// Robustness
// ---------------------------------------------------------------------------

#[test]
fn decoding_garbage_bytes_returns_error_not_panic() {
    let cases: &[(&str, &[u8])] = &[
        ("overlong varint key", &[0xFF; 11]),
        ("field number 0", &[0x00]),
        ("wire type 7", &[0x0F]),
        ("truncated varint", &[0x08]),
        ("truncated varint after continuation", &[0x08, 0x80]),
        ("string length past end", &[0x1A, 0x05, 0x61]),
        ("invalid utf-8 in correlation_id", &[0x1A, 0x02, 0xC3, 0x28]),
        ("seq sent length-delimited", &[0x0A, 0x01, 0x00]),
        ("seq sent as start-group", &[0x0B]),
        ("seq sent as fixed32", &[0x0D, 0x00, 0x00, 0x00, 0x00]),
        ("ping payload truncated", &[0xCA, 0x03, 0x05, 0x08]),
        ("ping payload sent as varint", &[0xC8, 0x03, 0x01]),
        ("job_update status sent length-delimited", &[0x6A, 0x03, 0x12, 0x01, 0x00]),
        ("unterminated group in unknown field", &[0xA3, 0x06]),
    ];
    for (what, bytes) in cases {
        assert!(pb::Envelope::decode(*bytes).is_err(), "{what}: {bytes:02X?} should not decode");
    }
}

#[test]
fn decoding_pseudo_random_bytes_never_panics() {
    // xorshift64*: deterministic, no extra dependency.
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let valid = pb::Envelope {
        seq: 5,
        ts_ms: 6,
        correlation_id: "x".into(),
        payload: Some(Payload::RunBackup(run_backup())),
    }
    .encode_to_vec();
    for _ in 0..5_000 {
        let len = (next() % 64) as usize;
        let random: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let _ = pb::Envelope::decode(random.as_slice());

        // Mutations of a valid frame exercise deeper paths.
        let mut mutated = valid.clone();
        let at = (next() as usize) % mutated.len();
        mutated[at] = next() as u8;
        let cut = (next() as usize) % (mutated.len() + 1);
        let _ = pb::Envelope::decode(&mutated[..cut]);
    }
}

#[test]
fn unknown_enum_values_decode_and_keep_the_raw_number() {
    #[rustfmt::skip]
    let bytes: &[u8] = &[
        0x6A, 0x02, // payload job_update: field 13, len -> 0x6A; length 2
        0x10, 0x63, //   status: (2<<3)|0 = 0x10; 99 (not a JobStatus value)
    ];
    let env = pb::Envelope::decode(bytes).expect("unknown enum value must decode");
    let Some(Payload::JobUpdate(update)) = &env.payload else {
        panic!("expected a job_update payload, got {:?}", env.payload);
    };
    assert_eq!(update.status, 99);
    assert!(pb::JobStatus::try_from(update.status).is_err());
    // prost's accessor falls back to the default (0) value.
    assert_eq!(update.status(), pb::JobStatus::Unspecified);
    // The raw number survives a re-encode.
    assert_eq!(env.encode_to_vec(), bytes);

    // A negative enum value: int32 -1 is a 10-byte sign-extended varint.
    #[rustfmt::skip]
    let negative: &[u8] = &[
        0x10, // LogEvent.level: (2<<3)|0
        0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01, // -1
    ];
    let log = pb::LogEvent::decode(negative).expect("negative enum value must decode");
    assert_eq!(log.level, -1);
    assert_eq!(log.level(), pb::LogLevel::Trace);
    assert_eq!(log.encode_to_vec(), negative);

    let target = pb::Target::decode(&[0x10, 0x2A][..]).unwrap(); // type = 42
    assert_eq!(target.r#type, 42);
    assert_eq!(target.r#type(), pb::DbType::DbUnspecified);
    let spec = pb::HealthCheckSpec::decode(&[0x18, 0x07][..]).unwrap(); // type = 7
    assert_eq!(spec.r#type, 7);
    assert_eq!(spec.r#type(), pb::CheckType::Http);
    let conn = pb::ConnectionConfig::decode(&[0x38, 0x09][..]).unwrap(); // strategy = 9
    assert_eq!(conn.strategy, 9);
    assert_eq!(conn.strategy(), pb::ConnectionStrategy::Tcp);
}

#[test]
fn reserved_tag_55_and_unknown_tags_are_skipped_not_decoded_as_payload() {
    #[rustfmt::skip]
    let bytes: &[u8] = &[
        0x08, 0x01,       // seq = 1
        0xBA, 0x03, 0x00, // field 55 (removed run_restore), len -> (55<<3)|2 = 442
                          //   = 3*128 + 58 -> 0x3A|0x80 = 0xBA, 0x03; empty body
        0xD2, 0x03, 0x00, // field 58 (not in the spec), len -> 466 = 3*128 + 82
                          //   -> 0x52|0x80 = 0xD2, 0x03; empty body
        0xA0, 0x06, 0x07, // field 100, varint -> (100<<3)|0 = 800 = 6*128 + 32 -> 0xA0, 0x06; 7
    ];
    let env = pb::Envelope::decode(bytes).expect("unknown fields are skipped");
    assert_eq!(env.seq, 1);
    assert_eq!(env.payload, None);
}

#[test]
fn last_payload_on_the_wire_wins() {
    // Two oneof members in one frame: protobuf semantics keep the last one.
    #[rustfmt::skip]
    let bytes: &[u8] = &[
        0xCA, 0x03, 0x02, 0x08, 0x05, // ping { ts_ms: 5 }
        0x92, 0x01, 0x02, 0x10, 0x01, // ack { accepted: true }
    ];
    let env = pb::Envelope::decode(bytes).unwrap();
    assert_eq!(env.payload, Some(Payload::Ack(pb::Ack { accepted: true, ..Default::default() })));
}
