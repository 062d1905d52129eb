//! Helpers shared by the process-level tests: the real binaries, temp dirs, tools.
#![allow(dead_code)]

pub mod s3;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn agent() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_backupy-agent"));
    c.env_remove("BACKUPY_STATE_DIR").env("BACKUPY_LOG_LEVEL", "info");
    c
}

pub fn decrypt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_backupy-decrypt"))
}

pub fn run(mut cmd: Command) -> Output {
    cmd.output().expect("the binary runs")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The sqlite3 CLI, which checks restored databases independently of our code.
pub fn sqlite3(db: &Path, sql: &str) -> String {
    let out = Command::new("sqlite3").arg(db).arg(sql).output().unwrap_or_else(|e| {
        panic!("the sqlite3 CLI is needed ({e}): install it with `apt-get install sqlite3` or run scripts/test.sh")
    });
    assert!(out.status.success(), "sqlite3 {sql}: {}", text(&out.stderr));
    text(&out.stdout).trim().to_string()
}

/// Creates a key pair with the real `keygen`; returns (identity path, recipient).
pub fn keygen(dir: &Path) -> (PathBuf, String) {
    let key = dir.join("backupy.key");
    let out = run({
        let mut c = agent();
        c.args(["keygen", "--out"]).arg(&key);
        c
    });
    assert!(out.status.success(), "keygen: {}", text(&out.stderr));
    (key, text(&out.stdout).trim().to_string())
}

/// Every regular file under `dir`, relative, sorted.
pub fn files_under(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, d: &Path, out: &mut Vec<String>) {
        if let Ok(rd) = std::fs::read_dir(d) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(base, &p, out);
                } else {
                    out.push(p.strip_prefix(base).unwrap().display().to_string());
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}
