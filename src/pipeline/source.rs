//! Where a pipeline's bytes come from: any `Read` (a snapshot file, a native protocol
//! stream) or a child process's stdout. A child runs in its own process group so the
//! whole group can be killed on failure or cancel; its exit status and the tail of its
//! stderr decide whether the bytes it wrote are a dump at all.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

/// Bytes of a child's stderr kept for error messages.
pub const STDERR_TAIL: usize = 4096;

/// Checks the first bytes of a dump (its magic); returns why they are wrong.
pub type MagicCheck = Box<dyn Fn(&[u8]) -> Result<(), String> + Send>;

pub struct Source {
    /// What produces the bytes, for error messages ("sqlite snapshot", "pg_dump").
    pub name: String,
    pub(crate) reader: Box<dyn Read + Send>,
    pub(crate) child: Option<ChildProcess>,
    pub(crate) magic: Option<(usize, MagicCheck)>,
    /// Expected dump size, when the engine offers an estimate (progress only).
    pub size_hint: Option<u64>,
    /// Kept alive until the dump stage has read everything (e.g. a snapshot file that
    /// is deleted on drop).
    pub(crate) _guard: Vec<Box<dyn Send>>,
    /// A producer that is not a local child (a command inside a container).
    pub(crate) remote: Option<RemoteProcess>,
    /// How to stop a native reader blocked in a read (shut its socket down), called on
    /// failure or cancel like the child's group kill.
    pub(crate) abort: Option<Arc<dyn Fn() + Send + Sync>>,
    /// What the dump holds (the manifest's `content`, issue 19), filled by the driver
    /// before the stream starts or, for a driver that counts while it dumps, before the
    /// stream ends; the runner reads it after the pipeline finished.
    pub(crate) content: ContentSlot,
}

/// Where a driver leaves the counts of what its dump holds; shared with the runner.
pub type ContentSlot = Arc<std::sync::Mutex<Option<crate::storage::Content>>>;

/// A process outside this host's process table (a command run inside a container): how
/// to learn, once its output ended, whether it succeeded, and how to kill it from the
/// pipeline's coordinator thread on failure or cancel.
pub struct RemoteProcess {
    /// Called after the stream ended; an error carries the process's stderr tail.
    pub finish: Box<dyn FnOnce() -> io::Result<()> + Send>,
    /// Stops the process if it still runs; callable any number of times.
    pub kill: Arc<dyn Fn() + Send + Sync>,
}

impl Source {
    pub fn from_reader(name: impl Into<String>, reader: impl Read + Send + 'static) -> Self {
        Self {
            name: name.into(),
            reader: Box::new(reader),
            child: None,
            magic: None,
            size_hint: None,
            _guard: Vec::new(),
            remote: None,
            abort: None,
            content: ContentSlot::default(),
        }
    }

    /// Spawns `cmd` in its own process group with stdout and stderr captured. The caller
    /// builds the environment (an allow-list); this function never adds to it.
    pub fn spawn(name: impl Into<String>, mut cmd: Command) -> io::Result<Self> {
        let name = name.into();
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        let mut child =
            cmd.spawn().map_err(|e| io::Error::new(e.kind(), format!("cannot start {name}: {e}")))?;
        let stdout = child.stdout.take().expect("stdout was piped");
        let stderr = child.stderr.take().expect("stderr was piped");
        let stderr_tail = std::thread::Builder::new()
            .name("source-stderr".into())
            .spawn(move || tail_of(stderr, STDERR_TAIL))?;
        Ok(Self {
            name,
            reader: Box::new(stdout),
            child: Some(ChildProcess {
                child,
                stderr_tail: Some(stderr_tail),
                reaped: Arc::new(AtomicBool::new(false)),
            }),
            magic: None,
            size_hint: None,
            _guard: Vec::new(),
            remote: None,
            abort: None,
            content: ContentSlot::default(),
        })
    }

    pub fn with_magic(mut self, len: usize, check: MagicCheck) -> Self {
        self.magic = Some((len, check));
        self
    }

    pub fn with_size_hint(mut self, size: Option<u64>) -> Self {
        self.size_hint = size;
        self
    }

    /// Keeps `guard` alive as long as the source (several guards may be added).
    pub fn with_guard(mut self, guard: impl Send + 'static) -> Self {
        self._guard.push(Box::new(guard));
        self
    }

    /// What stops a native reader that is blocked in a read (e.g. shuts its socket down).
    pub fn with_abort(mut self, abort: Arc<dyn Fn() + Send + Sync>) -> Self {
        self.abort = Some(abort);
        self
    }

    pub fn with_remote(mut self, remote: RemoteProcess) -> Self {
        self.remote = Some(remote);
        self
    }

    /// Records what the dump holds, counted before the stream starts (SQLite).
    pub fn with_content(self, content: crate::storage::Content) -> Self {
        *self.content.lock().unwrap_or_else(|p| p.into_inner()) = Some(content);
        self
    }

    /// The slot a driver that counts while it dumps fills before its stream ends.
    pub fn content_slot(&self) -> ContentSlot {
        self.content.clone()
    }

    /// A handle that kills the child's process group from another thread.
    pub(crate) fn abort_handle(&self) -> SourceAbort {
        SourceAbort {
            pid: self.child.as_ref().map(|c| c.child.id() as i32),
            reaped: self.child.as_ref().map(|c| c.reaped.clone()),
            remote: self.remote.as_ref().map(|r| r.kill.clone()),
            native: self.abort.clone(),
        }
    }
}

pub(crate) struct ChildProcess {
    child: Child,
    stderr_tail: Option<JoinHandle<Vec<u8>>>,
    reaped: Arc<AtomicBool>,
}

impl ChildProcess {
    /// Waits for the child after its stdout ended; a non-zero exit is an error that
    /// carries the stderr tail.
    pub(crate) fn finish(mut self, name: &str) -> io::Result<()> {
        let status = self.child.wait();
        self.reaped.store(true, Ordering::SeqCst);
        let tail = self.take_tail();
        let status = status?;
        if status.success() {
            if !tail.is_empty() {
                log::debug!("{name} stderr: {tail}");
            }
            return Ok(());
        }
        Err(io::Error::other(format!("{name} {}{}", describe(status), tail_suffix(&tail))))
    }

    fn take_tail(&mut self) -> String {
        let bytes = self.stderr_tail.take().and_then(|h| h.join().ok()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).trim().to_string()
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if !self.reaped.load(Ordering::SeqCst) {
            kill_group(self.child.id() as i32);
            let _ = self.child.wait();
            self.reaped.store(true, Ordering::SeqCst);
        }
    }
}

#[derive(Clone)]
pub(crate) struct SourceAbort {
    pid: Option<i32>,
    reaped: Option<Arc<AtomicBool>>,
    remote: Option<Arc<dyn Fn() + Send + Sync>>,
    native: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl SourceAbort {
    pub(crate) fn kill(&self) {
        if let (Some(pid), Some(reaped)) = (self.pid, &self.reaped) {
            // A reaped pid may already belong to someone else; never signal it.
            if !reaped.load(Ordering::SeqCst) {
                kill_group(pid);
            }
        }
        if let Some(kill) = &self.remote {
            kill();
        }
        if let Some(abort) = &self.native {
            abort();
        }
    }
}

fn kill_group(pid: i32) {
    // SAFETY: kill(2) with a negative pid signals the process group the child leads
    // (it was spawned with process_group(0)); it has no memory-safety preconditions.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("was killed by signal {sig}"),
        _ => "failed".to_string(),
    }
}

fn tail_suffix(tail: &str) -> String {
    if tail.is_empty() { String::new() } else { format!(": {tail}") }
}

/// Reads `r` to the end, keeping only the last `cap` bytes.
pub fn tail_of(mut r: impl Read, cap: usize) -> Vec<u8> {
    let mut tail = VecDeque::with_capacity(cap);
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                for &b in &buf[..n] {
                    if tail.len() == cap {
                        tail.pop_front();
                    }
                    tail.push_back(b);
                }
            }
        }
    }
    tail.into_iter().collect()
}
