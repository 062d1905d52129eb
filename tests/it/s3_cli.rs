//! The real `backupy-agent` with `[storage.s3]`: backup to the S3 server, `list`, and
//! `verify` that downloads, re-hashes, decrypts and checks the magic — and catches a
//! corrupted object.

use crate::common;

use crate::common::s3::*;
use crate::common::*;

fn sqlite_db(dir: &std::path::Path) {
    rusqlite::Connection::open(dir.join("app.db"))
        .unwrap()
        .execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1), (2), (3);")
        .unwrap();
}

#[test]
fn backup_list_and_verify_through_s3() {
    let env = s3_env();
    let bucket = new_bucket(&env, "cli");
    let dir = tempfile::tempdir().unwrap();
    sqlite_db(dir.path());
    let (_identity, recipient) = keygen(dir.path()); // backupy.key beside the config
    let config = dir.path().join("backupy.toml");
    std::fs::write(
        &config,
        format!(
            r#"
state_dir = "./state"
[storage.s3]
endpoint = "{endpoint}"
region = "{region}"
bucket = "{bucket}"
prefix = "agent1/"
access_key_id = "env:TEST_S3_KEY"
secret_access_key = "env:TEST_S3_SECRET"
[encryption]
recipient = "{recipient}"
[[targets]]
id = "app"
type = "sqlite"
path = "app.db"
[[jobs]]
id = "nightly"
target = "app"
"#,
            endpoint = env.endpoint,
            region = env.region,
        ),
    )
    .unwrap();
    let with_creds = |mut c: std::process::Command| {
        c.env("TEST_S3_KEY", &env.access_key)
            .env("TEST_S3_SECRET", &env.secret_key)
            .env("BACKUPY_LOG_LEVEL", "trace");
        c
    };

    let out = run(with_creds({
        let mut c = agent();
        c.args(["backup", "--config"]).arg(&config);
        c
    }));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let logs = text(&out.stderr) + &text(&out.stdout);
    assert!(!logs.contains(&env.secret_key), "the S3 secret never reaches a log line");
    assert!(!logs.contains("X-Amz-Signature"), "no presigned query string in the logs");

    let objects = common::files_under(&env.dir.join(&bucket));
    assert_eq!(objects.len(), 2, "{objects:?}");
    assert!(
        objects[0].starts_with("agent1/app/nightly/") && objects[0].ends_with(".sqlite.zst.bkpy"),
        "{objects:?}"
    );

    let out = run(with_creds({
        let mut c = agent();
        c.args(["list", "--json", "--config"]).arg(&config);
        c
    }));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    let id = list[0]["id"].as_str().unwrap().to_string();

    for backup in [id.as_str(), "latest"] {
        let out = run(with_creds({
            let mut c = agent();
            c.args(["verify", "--backup", backup, "--config"]).arg(&config);
            c
        }));
        assert!(out.status.success(), "verify {backup}: {}", text(&out.stderr));
        assert!(text(&out.stdout).contains("\tok\t"), "{}", text(&out.stdout));
    }

    // Corrupt the stored object on the server: verify must fail and say why.
    let path = env.dir.join(&bucket).join(&objects[0]);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    std::fs::write(&path, bytes).unwrap();
    let out = run(with_creds({
        let mut c = agent();
        c.args(["verify", "--backup", "latest", "--config"]).arg(&config);
        c
    }));
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains(&id) && (err.contains("authenticat") || err.contains("SHA-256")), "{err}");
}

#[test]
fn missing_credential_reference_is_refused_with_its_line() {
    let env = s3_env();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("backupy.toml");
    std::fs::write(
        &config,
        format!(
            "[storage.s3]\nendpoint = \"{}\"\nbucket = \"bkt\"\naccess_key_id = \"env:NOPE_NOT_SET_KEY\"\nsecret_access_key = \"x\"\n",
            env.endpoint
        ),
    )
    .unwrap();
    let out = run({
        let mut c = agent();
        c.args(["list", "--config"]).arg(&config);
        c
    });
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains(":4:") && err.contains("NOPE_NOT_SET_KEY"), "{err}");
}
