//! Helpers shared by the process-level tests: the real binaries, temp dirs, tools.
#![allow(dead_code)]

pub mod control_plane;
pub mod db;
pub mod docker;
pub mod http;
pub mod s3;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn agent() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_backupy-agent"));
    // Tests run agents in parallel: none of them may take the default metrics port.
    c.env_remove("BACKUPY_STATE_DIR").env("BACKUPY_LOG_LEVEL", "info").env("BACKUPY_METRICS_LISTEN_ADDR", "");
    c
}

/// A loopback TCP port that belongs to one test for as long as its claim lives: nothing
/// listens on it until the test starts something there. A port taken with `bind(0)` and
/// released can be handed to another test's `bind(0)` or to an outgoing connection before
/// the test uses it; this one comes from below the kernel's ephemeral range, which
/// neither ever uses, and is claimed with a lock file that every test process honours
/// (the kernel drops the lock when the process exits, however it exits).
/// Keep the claim in a named binding (`let (port, _claim) = …`) for as long as the port
/// is in use.
pub struct PortClaim(#[allow(dead_code)] std::fs::File);

pub fn reserve_port() -> (u16, PortClaim) {
    use std::os::unix::io::AsRawFd;
    // Below the ephemeral range (net.ipv4.ip_local_port_range, 32768 by default).
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    assert!(low > 12_000, "the ephemeral port range starts at {low}: too low to keep test ports below it");
    let (first, count) = (low - 10_000, 10_000u32);
    let dir = std::env::temp_dir().join("backupy-test-ports");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let seed = std::process::id()
        ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    for i in 0..count {
        let port = first + ((seed.wrapping_add(i)) % count) as u16;
        let path = dir.join(format!("{port}.lock"));
        let Ok(claim) = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path)
        else {
            continue;
        };
        // SAFETY: flock(2) on a descriptor owned by `claim`.
        if unsafe { libc::flock(claim.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            continue;
        }
        // Something outside the tests may listen there: then it is not free.
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return (port, PortClaim(claim));
        }
    }
    panic!("no free loopback port in {first}..{}", u32::from(first) + count)
}

/// The name libtest knows a test by (`module::test`), to re-run it in a child process
/// with `--exact`: `module` is the caller's `module_path!()`, which starts with the crate.
pub fn test_path(module: &str, test: &str) -> String {
    let module = module.split_once("::").map_or("", |(_, m)| m);
    format!("{module}::{test}")
}

pub fn decrypt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_backupy-decrypt"))
}

pub fn run(mut cmd: Command) -> Output {
    cmd.output().expect("the binary runs")
}

/// The last lines of a log file, for failure messages: the whole log of a debug-level
/// agent buries the assertion that failed.
pub fn log_tail(path: &Path) -> String {
    const LINES: usize = 60;
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("({}: {e})", path.display()));
    let lines: Vec<&str> = text.lines().collect();
    let skipped = lines.len().saturating_sub(LINES);
    let tail = lines[skipped..].join("\n");
    if skipped == 0 { tail } else { format!("[… {skipped} earlier lines in {}]\n{tail}", path.display()) }
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

/// A CA (`ca.pem`) and a certificate for 127.0.0.1 signed by it (`server.pem`: leaf and
/// key), made with the openssl CLI.
pub fn make_certs(dir: &Path) {
    let sh = |script: &str| {
        let out = Command::new("sh").arg("-c").arg(script).current_dir(dir).output().unwrap();
        assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
    };
    sh(
        "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=backupy-test-ca 2>/dev/null",
    );
    sh("openssl req -newkey rsa:2048 -nodes -keyout leaf.key -out leaf.csr -subj /CN=127.0.0.1 2>/dev/null");
    sh("printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\n' > ext && \
        openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out leaf.pem -days 2 -extfile ext 2>/dev/null && \
        cat leaf.pem leaf.key > server.pem");
}
