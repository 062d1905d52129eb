//! Issue 16.9 through the real binary: `restore`/`verify` refuse a planted plaintext
//! object for a job the config encrypts.

use crate::common::*;
use crate::restore_cli::{backup, setup};

/// Issue 16.9: a store writer plants a plaintext object (and its manifest, saying
/// `"encryption": "none"`) for a job this config encrypts. `verify` and `restore` refuse
/// it and name --allow-plaintext; with the flag they take it.
#[test]
fn a_planted_plaintext_backup_of_an_encrypted_job_is_refused() {
    let (dir, config) = setup("type = \"sqlite\"\npath = \"app.db\"");
    rusqlite::Connection::open(dir.path().join("app.db"))
        .unwrap()
        .execute_batch("CREATE TABLE t(x TEXT); INSERT INTO t VALUES ('genuine');")
        .unwrap();
    backup(&config, &[]);
    let to = dir.path().join("restored.db");
    // The attacker's plaintext dump, written by a config of their own into the same
    // storage under the same job id.
    let evil = dir.path().join("evil");
    std::fs::create_dir_all(&evil).unwrap();
    rusqlite::Connection::open(evil.join("app.db"))
        .unwrap()
        .execute_batch("CREATE TABLE t(x TEXT); INSERT INTO t VALUES ('planted');")
        .unwrap();
    let evil_config = evil.join("backupy.toml");
    std::fs::write(
        &evil_config,
        format!(
            "state_dir = \"./state\"\n[storage]\ndir = \"{}\"\n[[targets]]\nid = \"db\"\ntype = \"sqlite\"\npath = \"app.db\"\n\
             [[jobs]]\nid = \"nightly\"\ntarget = \"db\"\nencryption = \"none\"\n",
            dir.path().join("backups").display()
        ),
    )
    .unwrap();
    backup(&evil_config, &[]);
    let manifests: Vec<serde_json::Value> = files_under(&dir.path().join("backups"))
        .into_iter()
        .filter(|f| f.ends_with(".json"))
        .map(|f| serde_json::from_slice(&std::fs::read(dir.path().join("backups").join(f)).unwrap()).unwrap())
        .collect();
    let planted = manifests.iter().find(|m| m["encryption"] == "none").expect("the planted manifest");
    let id = planted["id"].as_str().unwrap().to_string();
    let restore = |extra: &[&str]| {
        let mut c = agent();
        c.args(["restore", "--backup", &id, "--to", to.to_str().unwrap(), "--config"])
            .arg(&config)
            .args(extra);
        run(c)
    };
    let verify = |extra: &[&str]| {
        let mut c = agent();
        c.args(["verify", "--backup", &id, "--config"]).arg(&config).args(extra);
        run(c)
    };

    let out = verify(&[]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "verify must refuse it: {err}");
    assert!(err.contains("not encrypted") && err.contains("--allow-plaintext"), "{err}");

    let out = restore(&[]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "restore must refuse it: {err}");
    assert!(err.contains("not encrypted") && err.contains("--allow-plaintext"), "{err}");
    assert!(!to.exists(), "nothing was restored");

    let out = verify(&["--allow-plaintext"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = restore(&["--allow-plaintext"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(sqlite3(&to, "SELECT x FROM t"), "planted");
}
