//! Running external dump and restore tools safely: an environment built from an
//! allow-list (the agent key and the agent's own secrets never reach a child), secrets
//! handed over in 0600 files inside a private 0700 directory that is removed when the
//! run ends, and restore input fed to a child's stdin with its stderr tail kept for the
//! error message. The Docker strategy (issue 8) will add an executor beside this one.

use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::cancel::Cancel;
use crate::pipeline::source::{STDERR_TAIL, tail_of};
use crate::secrets::Secret;

/// The only variables a child inherits from the agent's environment.
pub const ENV_ALLOW_LIST: &[&str] =
    &["PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "LC_MESSAGES", "TZ", "TMPDIR", "USER", "LOGNAME"];

/// A `Command` for `program` whose environment holds only the allow-listed variables.
/// Add what the tool needs with `.env()`; never a secret (use a [`PrivateDir`] file).
pub fn tool_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear();
    for name in ENV_ALLOW_LIST {
        if let Some(v) = std::env::var_os(name) {
            cmd.env(name, v);
        }
    }
    cmd
}

/// The first of `names` found on `PATH`, as a full path.
pub fn find_tool(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/local/bin:/usr/bin:/bin"));
    names.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
    })
}

/// A private temporary directory (0700) for secret files, removed on drop. Its name
/// carries this process's owner tag, so that the next start removes it after a crash
/// (`leftovers`).
pub struct PrivateDir {
    dir: tempfile::TempDir,
}

impl PrivateDir {
    pub fn new(parent: &Path) -> io::Result<Self> {
        fs::create_dir_all(parent)?;
        let dir = tempfile::Builder::new()
            .prefix(&crate::leftovers::tagged_prefix(crate::leftovers::SECRETS_DIR))
            .tempdir_in(parent)?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700))?;
        Ok(Self { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `contents` to a new 0600 file `name` in the directory.
    pub fn write_secret(&self, name: &str, contents: &Secret) -> io::Result<PathBuf> {
        let path = self.dir.path().join(name);
        let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
        f.write_all(contents.expose().as_bytes())?;
        f.sync_all()?;
        Ok(path)
    }
}

/// Runs `cmd` (in its own process group) with `input` on its stdin; a non-zero exit is
/// an error carrying the stderr tail. When reading `input` fails (a chunk that does not
/// authenticate, a SHA-256 mismatch), the child's whole group is killed before its stdin
/// is closed, so it never takes the cut as the end of its input, and the error names
/// the input's cause rather than the tool's "unexpected end of file".
pub fn feed(name: &str, cmd: Command, input: &mut dyn Read) -> Result<(), String> {
    feed_until(name, cmd, input, None)
}

/// [`feed`], and a `cancel` (SIGINT/SIGTERM on `restore`) kills the child's whole group
/// at once, even while it blocks (on a lock, or with its stdin pipe full), so that it
/// never goes on to commit what it was fed.
pub fn feed_until(
    name: &str,
    mut cmd: Command,
    input: &mut dyn Read,
    cancel: Option<&Cancel>,
) -> Result<(), String> {
    cmd.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped()).process_group(0);
    let mut child = cmd.spawn().map_err(|e| format!("cannot start {name}: {e}"))?;
    let pgid = child.id() as i32;
    // Until the child is reaped below, its pid cannot be reused: the kill reaches it.
    let _watch = match cancel {
        Some(c) => Some(
            crate::cancel::on_cancel(c, move || kill_group(pgid))
                .map_err(|e| format!("cannot start a thread: {e}"))?,
        ),
        None => None,
    };
    let (Some(stderr), Some(mut stdin)) = (child.stderr.take(), child.stdin.take()) else {
        kill_group(pgid);
        let _ = child.wait();
        return Err(format!("cannot start {name}: its stdin or stderr was not captured"));
    };
    let tail = std::thread::Builder::new()
        .name("restore-stderr".into())
        .spawn(move || tail_of(stderr, STDERR_TAIL))
        .map_err(|e| format!("cannot start a thread: {e}"))?;
    let mut watched = InputErrors { inner: input, error: None, bytes: 0 };
    let copied = io::copy(&mut watched, &mut stdin);
    if let Some(e) = watched.error.take() {
        // The child is still running (unreaped), so its pid is still its group's id.
        kill_group(pgid);
        drop(stdin);
        let _ = child.wait();
        let _ = tail.join();
        return Err(format!(
            "reading the backup failed after {} bytes had gone to {name}, which was killed before it \
             could finish: {}",
            watched.bytes,
            input_cause(&e)
        ));
    }
    drop(stdin);
    let status = child.wait().map_err(|e| format!("waiting for {name}: {e}"))?;
    if let Some(reason) = cancel.and_then(Cancel::reason) {
        let _ = tail.join();
        return Err(format!("{name} was killed: {reason}"));
    }
    let tail = String::from_utf8_lossy(&tail.join().unwrap_or_default()).trim().to_string();
    let suffix = if tail.is_empty() { String::new() } else { format!(": {tail}") };
    if !status.success() {
        return Err(format!("{name} failed ({status}){suffix}"));
    }
    // A child that exits 0 without reading all its input would silently drop data.
    copied.map_err(|e| format!("feeding {name}: {e}{suffix}"))?;
    Ok(())
}

/// The words of an input error: the format error's own, when there is one.
pub fn input_cause(e: &io::Error) -> String {
    match crate::crypto::find_error(e) {
        Some(c) => c.to_string(),
        None => e.to_string(),
    }
}

/// Remembers the first error of the reader it wraps, to tell it from a write error.
pub struct InputErrors<'a> {
    pub inner: &'a mut dyn Read,
    pub error: Option<io::Error>,
    pub bytes: u64,
}

impl Read for InputErrors<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.bytes += n as u64;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                let copy = io::Error::new(e.kind(), input_cause(&e));
                self.error = Some(e);
                Err(copy)
            }
        }
    }
}

pub fn kill_group(pgid: i32) {
    // SAFETY: kill(2) on the process group a child of ours leads (spawned with
    // process_group(0)); no memory-safety preconditions.
    unsafe { libc::kill(-pgid, libc::SIGKILL) };
}
