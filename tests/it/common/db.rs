//! Helpers for the database driver tests: the throwaway servers of scripts/services.sh,
//! a backup through the real pipeline into a real `DirStorage`, reading the stored
//! object back, and looking at a running dump child through /proc.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use backupy_agent::cancel::Cancel;
use backupy_agent::crypto::{self, DataKey, Encryption, KeySource};
use backupy_agent::drivers::{self, DumpContext, TargetSpec};
use backupy_agent::pipeline::compress::decompress_by_magic;
use backupy_agent::pipeline::{self, Compression, Progress};
use backupy_agent::storage::{DirStorage, ObjectWriter, StoredObject};

/// The marker a test sets when it re-runs one of its `#[ignore]`d helpers in a child
/// process (with an environment of its own).
pub const INNER: &str = "BACKUPY_TEST_INNER";

/// A required variable of scripts/services.sh, or a panic that says how to get it.
pub fn need(var: &str, service: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set: this test needs a throwaway {service} server. Run scripts/test.sh, or \
             `source scripts/services.sh; services_init; services_start_{service}` in the shell that \
             runs cargo test"
        )
    })
}

pub struct Pg {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub socket_dir: String,
}

pub fn pg() -> Pg {
    Pg {
        host: need("BACKUPY_TEST_PG_HOST", "postgres"),
        port: need("BACKUPY_TEST_PG_PORT", "postgres").parse().expect("BACKUPY_TEST_PG_PORT is a port"),
        user: need("BACKUPY_TEST_PG_USER", "postgres"),
        password: need("BACKUPY_TEST_PG_PASSWORD", "postgres"),
        socket_dir: need("BACKUPY_TEST_PG_SOCKET_DIR", "postgres"),
    }
}

pub struct Maria {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub socket: String,
}

pub fn maria() -> Maria {
    Maria {
        host: need("BACKUPY_TEST_MARIADB_HOST", "mariadb"),
        port: need("BACKUPY_TEST_MARIADB_PORT", "mariadb")
            .parse()
            .expect("BACKUPY_TEST_MARIADB_PORT is a port"),
        user: need("BACKUPY_TEST_MARIADB_USER", "mariadb"),
        password: need("BACKUPY_TEST_MARIADB_PASSWORD", "mariadb"),
        socket: need("BACKUPY_TEST_MARIADB_SOCKET", "mariadb"),
    }
}

/// A name no other test (or earlier run) uses: `<prefix>_<pid>_<n>`.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{prefix}_{}_{}_{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst), nanos % 100_000)
}

pub fn raw_key() -> (Encryption, KeySource) {
    (
        Encryption::V2Raw { key: DataKey::from_bytes([7; 32]), chunk_size: 1 << 20 },
        KeySource::Raw(DataKey::from_bytes([7; 32])),
    )
}

/// How a test backup runs.
pub struct RunOpts {
    pub compression: Compression,
    pub encryption: Encryption,
    /// Sleep this long on every write to storage (a slow upload: backpressure).
    pub sink_delay: Option<Duration>,
    pub buffer_size: Option<usize>,
    pub cancel: Cancel,
    pub progress: Arc<Progress>,
}

impl Default for RunOpts {
    fn default() -> Self {
        Self {
            compression: Compression::default(),
            encryption: raw_key().0,
            sink_delay: None,
            buffer_size: None,
            cancel: Cancel::default(),
            progress: Arc::new(Progress::default()),
        }
    }
}

pub struct Backup {
    pub output: pipeline::Output,
    pub engine_version: String,
    pub size_hint: Option<u64>,
    pub path: PathBuf,
}

/// One backup as the runner does it: driver (connects, starts the tool), then a storage
/// object, then the pipeline. Any error as text.
pub fn backup(
    spec: &TargetSpec,
    storage: &DirStorage,
    temp_dir: &Path,
    o: &RunOpts,
) -> Result<Backup, String> {
    let ctx = DumpContext {
        temp_dir: temp_dir.to_path_buf(),
        pipeline_compresses: o.compression != Compression::None,
        cancel: o.cancel.clone(),
    };
    let dump = drivers::dump(spec, &ctx).map_err(|e| e.to_string())?;
    let key = format!("{}/job/{}.{}", spec.id, unique("obj"), spec.engine.dump_extension());
    let writer = storage.create(&key).map_err(|e| e.to_string())?;
    let sink: Box<dyn ObjectWriter> = match o.sink_delay {
        Some(delay) => Box::new(SlowSink { inner: Box::new(writer), delay }),
        None => Box::new(writer),
    };
    let prepared = o.encryption.prepare(o.compression.header_code()).map_err(|e| e.to_string())?;
    let mut opts = pipeline::Options::new(o.compression, prepared);
    if let Some(b) = o.buffer_size {
        opts.buffer_size = b;
    }
    let size_hint = dump.source.size_hint;
    let output =
        pipeline::run(dump.source, opts, sink, &o.cancel, o.progress.clone()).map_err(|e| e.to_string())?;
    Ok(Backup {
        path: storage.path_of(&output.object.key),
        output,
        engine_version: dump.engine_version,
        size_hint,
    })
}

/// The dump inside a stored object: decrypted (when `key` is given) and decompressed.
pub fn open_dump(path: &Path, key: Option<&KeySource>) -> Box<dyn Read> {
    let file = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let plain: Box<dyn Read> = match key {
        Some(k) => crypto::open(io::BufReader::new(file), k).expect("the object decrypts").1,
        None => Box::new(file),
    };
    decompress_by_magic(plain).expect("the object decompresses").1
}

struct SlowSink {
    inner: Box<dyn ObjectWriter>,
    delay: Duration,
}

impl Write for SlowSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        std::thread::sleep(self.delay);
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl ObjectWriter for SlowSink {
    fn commit(self: Box<Self>) -> io::Result<StoredObject> {
        self.inner.commit()
    }
}

/// The pid of a child of this process whose program is `tool` and one of whose
/// arguments contains `needle`, waiting up to `timeout` for it to appear.
pub fn find_child(tool: &str, needle: &str, timeout: Duration) -> Option<i32> {
    find_child_of(std::process::id() as i32, tool, needle, timeout)
}

/// [`find_child`] for the children of `parent` (an agent process the test started).
pub fn find_child_of(parent: i32, tool: &str, needle: &str, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
            let args: Vec<String> =
                cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            let is_tool = args.first().is_some_and(|a| Path::new(a).file_name() == Some(OsStr::new(tool)));
            if is_tool && args.iter().any(|a| a.contains(needle)) && parent_of(pid) == Some(parent) {
                return Some(pid);
            }
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid …"; comm may contain spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// A child's argv and environment as /proc shows them (NUL-separated).
pub fn proc_cmdline_and_environ(pid: i32) -> (Vec<u8>, Vec<u8>) {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("the child's cmdline is readable");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("the child's environ is readable");
    (cmdline, environ)
}

pub fn split_nul(b: &[u8]) -> Vec<String> {
    b.split(|c| *c == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect()
}

pub fn contains(haystack: &[u8], needle: &str) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Runs the `#[ignore]`d test `name` of the caller's module (`module_path!()`) in a child
/// process of this test binary with `env` added (and `BACKUPY_TEST_INNER=1`), and checks
/// that it ran and passed.
pub fn rerun_self(module: &str, name: &str, env: &[(&str, &OsStr)]) {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args(["--exact", &super::test_path(module, name)])
        .args(["--include-ignored", "--nocapture", "--test-threads=1"])
        .env(INNER, "1")
        .envs(env.iter().map(|(k, v)| (*k, *v)))
        .output()
        .expect("the test binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{name} failed in a child process:\n{stdout}\n{stderr}");
    assert!(stdout.contains("1 passed"), "{name} did not run in the child process:\n{stdout}\n{stderr}");
}

/// True inside a [`rerun_self`] child; an `#[ignore]`d helper run any other way returns early.
pub fn is_inner() -> bool {
    std::env::var_os(INNER).is_some()
}

/// A lock shared by every test of one server, taken exclusively by a test that restores
/// a whole server (all databases), across threads and test processes.
pub struct ServerLock(File);

pub fn server_lock(name: &str, exclusive: bool) -> ServerLock {
    let path = std::env::temp_dir().join(format!("backupy-test-{name}.lock"));
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).unwrap();
    let op = if exclusive { libc::LOCK_EX } else { libc::LOCK_SH };
    // SAFETY: flock(2) on a descriptor this function owns; no memory is shared.
    let r = unsafe { libc::flock(f.as_raw_fd(), op) };
    assert_eq!(r, 0, "flock {}: {}", path.display(), io::Error::last_os_error());
    ServerLock(f)
}
