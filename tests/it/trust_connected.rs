//! Issue 16, defects 2 and 12, against the test control plane: one scheme rule for every
//! URL the control plane hands over (a presigned PUT over plain http is refused without
//! BACKUPY_DEV_ALLOW_INSECURE, as the multipart endpoint already was), and every
//! heartbeat carries the config version applied when it is sent.

use std::process::Command;
use std::time::Duration;

use crate::common::control_plane::{ControlPlane, envelope};
use crate::connected::{
    config, job, run_backup, spawn_agent, sqlite_db, sqlite_target, status, terminal, wait_for,
    wait_registered,
};
use crate::trust_pushed_secrets::StandIn;
use backupy_agent::wire::pb;
use backupy_agent::wire::pb::envelope::Payload;

/// A CA and a 127.0.0.1 leaf (P-256, PKCS#8 key) made by openssl in `dir`.
fn make_pki(dir: &std::path::Path) {
    let out = Command::new("sh")
        .arg("-ec")
        .arg(
            "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key \
             -out ca.pem -days 2 -subj /CN=test-ca 2>/dev/null
             openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout leaf.key \
             -out leaf.csr -subj /CN=127.0.0.1 2>/dev/null
             printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\n' > leaf.ext
             openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
             -extfile leaf.ext -out leaf.pem 2>/dev/null
             openssl pkcs8 -topk8 -nocrypt -in leaf.key -out leaf.pk8",
        )
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_plain_http_presigned_put_is_refused_without_the_dev_flag() {
    let dir = tempfile::tempdir().unwrap();
    make_pki(dir.path());
    let cp = ControlPlane::tls(&dir.path().join("leaf.pem"), &dir.path().join("leaf.pk8"));
    let db = dir.path().join("app.db");
    sqlite_db(&db, 50, 100);
    // An unencrypted job: what would go over plain http is the raw dump.
    let mut j = job("plain", "app");
    j.encryption_enabled = false;
    cp.state().ack_config = Some(config(2, vec![sqlite_target("app", &db)], vec![j]));
    let ca = dir.path().join("ca.pem").display().to_string();
    let agent = spawn_agent(
        &cp,
        &dir.path().join("state"),
        &[
            ("BACKUPY_SERVER_URL", &cp.url("wss")),
            ("BACKUPY_CA_FILE", &ca),
            ("BACKUPY_DEV_ALLOW_INSECURE", "false"),
        ],
    );
    wait_registered(&cp, &agent, 0);
    // The "S3 server" is a stand-in that records whatever reaches it.
    let sink = StandIn::start();
    let http_url = format!("http://127.0.0.1:{}/bucket/plain.sqlite?X-Amz-Signature=abc", sink.port);
    let presigned = pb::S3UploadCreds {
        presigned_put_url: http_url,
        final_s3_key: "plain.sqlite".into(),
        ..Default::default()
    };
    let multipart = pb::S3UploadCreds {
        multipart: Some(pb::S3MultipartTarget {
            endpoint: format!("http://127.0.0.1:{}", sink.port),
            region: "us-east-1".into(),
            bucket: "bucket".into(),
            key: "mp.sqlite".into(),
            access_key_id: "AK".into(),
            secret_access_key: "SK-not-shown".into(),
            path_style: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    cp.send(0, envelope("c1", run_backup("plain", "run-http-put", presigned, &[])));
    cp.send(0, envelope("c2", run_backup("plain", "run-http-mp", multipart, &[])));
    wait_for(&cp, &agent, "both runs to end", Duration::from_secs(60), |s| {
        terminal(s, "run-http-put").is_some() && terminal(s, "run-http-mp").is_some()
    });
    let s = cp.state();
    for run in ["run-http-put", "run-http-mp"] {
        let end = terminal(&s, run).unwrap();
        assert_eq!(status(&end), pb::JobStatus::Failed, "{run}: {end:?}");
        assert!(
            end.error_message.contains("BACKUPY_DEV_ALLOW_INSECURE=true"),
            "{run}: {}",
            end.error_message
        );
        assert!(
            !end.error_message.contains("X-Amz-Signature=abc") && !end.error_message.contains("SK-not-shown")
        );
    }
    drop(s);
    assert!(
        sink.connections().is_empty(),
        "bytes went out over plain http: {} connection(s)",
        sink.connections().len()
    );
}

#[test]
fn the_first_heartbeat_after_register_ack_reports_the_config_it_carried() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("hb.db");
    sqlite_db(&db, 1, 1);
    let cp = ControlPlane::plain();
    {
        let mut s = cp.state();
        s.ack_config = Some(config(1, vec![sqlite_target("t", &db)], vec![job("j", "t")]));
        s.heartbeat_interval_sec = 1;
    }
    let agent = spawn_agent(&cp, &dir.path().join("state"), &[]);
    let heartbeats = |s: &crate::common::control_plane::Shared, conn: usize| -> Vec<u64> {
        s.conns
            .get(conn)
            .map(|c| {
                c.payloads()
                    .into_iter()
                    .filter_map(|p| match p {
                        Payload::Heartbeat(h) => Some(h.config_version),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    wait_for(&cp, &agent, "two heartbeats", Duration::from_secs(20), |s| heartbeats(s, 0).len() >= 2);
    let register = cp.state().register(0);
    assert_eq!(register.last_known_config_version, 0, "a fresh agent starts from no config");
    let seen = heartbeats(&cp.state(), 0);
    assert!(seen.iter().all(|v| *v == 1), "every heartbeat after a RegisterAck with version 1: {seen:?}");
}
