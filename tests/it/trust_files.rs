//! Issue 16, defect 8: file modes. A state directory the agent creates is 0700 and
//! `state.db` (with its WAL) 0600; stored objects and manifests are 0640 whatever the
//! umask (docs/security.md "File modes"). Each test sets its own umask: nextest runs every
//! test in a process of its own.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use backupy_agent::outbox::{Limits, Outbox};
use backupy_agent::state::StateDb;
use backupy_agent::storage::{DirStorage, Storage, manifest_key};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o777
}

#[test]
fn a_state_directory_the_agent_creates_is_0700_and_its_database_0600() {
    // SAFETY: umask(2) has no failure mode; this process runs this test only.
    unsafe { libc::umask(0o022) };
    let root = tempfile::tempdir().unwrap();
    let state = root.path().join("var").join("backupy");
    let db = StateDb::open(&state).unwrap();
    db.record_start("run-1", "job", 1, chrono::Utc::now()).unwrap();
    assert_eq!(mode(&state), 0o700, "state dir");
    assert_eq!(mode(&state.join("state.db")), 0o600, "state.db");
    let wal = state.join("state.db-wal");
    if wal.exists() {
        assert_eq!(mode(&wal), 0o600, "state.db-wal");
    }
    assert_eq!(mode(&state.join("agent.lock")), 0o600, "agent.lock");
    drop(db);

    // The outbox alone (connected mode opens it too) makes the same.
    let other = root.path().join("outbox-only");
    let _outbox = Outbox::open(&other, Limits::default()).unwrap();
    assert_eq!((mode(&other), mode(&other.join("state.db"))), (0o700, 0o600));

    // A state.db an older agent left world-readable is tightened.
    let old = root.path().join("old");
    std::fs::create_dir(&old).unwrap();
    std::fs::write(old.join("state.db"), b"").unwrap();
    std::fs::set_permissions(old.join("state.db"), std::fs::Permissions::from_mode(0o644)).unwrap();
    drop(StateDb::open(&old).unwrap());
    assert_eq!(mode(&old.join("state.db")), 0o600);
    assert_eq!(mode(&old), 0o755, "an existing directory is the operator's");
}

#[test]
fn stored_objects_and_manifests_are_0640_whatever_the_umask() {
    for umask in [0o022, 0o077, 0o000] {
        // SAFETY: as above.
        unsafe { libc::umask(umask) };
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::Dir(DirStorage::open(dir.path()).unwrap());
        let key = "app/nightly/20260101T000000Z-r1.sqlite";
        let mut w = storage.create(key, &Default::default()).unwrap();
        w.write_all(b"object").unwrap();
        w.commit().unwrap();
        storage.put(&manifest_key(key), b"{}").unwrap();
        assert_eq!(mode(&dir.path().join(key)), 0o640, "object, umask {umask:o}");
        assert_eq!(mode(&dir.path().join(manifest_key(key))), 0o640, "manifest, umask {umask:o}");
    }
}

#[test]
fn storage_file_mode_in_the_config_sets_the_mode_of_what_backup_stores() {
    // SAFETY: as above.
    unsafe { libc::umask(0o022) };
    let dir = tempfile::tempdir().unwrap();
    rusqlite::Connection::open(dir.path().join("app.db"))
        .unwrap()
        .execute_batch("CREATE TABLE t(x);")
        .unwrap();
    let write = |mode: &str| {
        std::fs::write(
            dir.path().join("backupy.toml"),
            format!(
                "state_dir = \"./state\"\n[storage]\ndir = \"./backups\"\nfile_mode = \"{mode}\"\n\
                 [[targets]]\nid = \"app\"\ntype = \"sqlite\"\npath = \"app.db\"\n\
                 [[jobs]]\nid = \"j\"\ntarget = \"app\"\nencryption = \"none\"\n"
            ),
        )
        .unwrap();
    };
    let backup = || {
        let mut c = crate::common::agent();
        c.args(["backup", "--config"]).arg(dir.path().join("backupy.toml"));
        crate::common::run(c)
    };
    write("0600");
    let out = backup();
    assert!(out.status.success(), "{}", crate::common::text(&out.stderr));
    let stored = crate::common::files_under(&dir.path().join("backups"));
    assert_eq!(stored.len(), 2, "an object and its manifest: {stored:?}");
    for f in &stored {
        assert_eq!(mode(&dir.path().join("backups").join(f)), 0o600, "{f}");
    }
    // A mode that would lock the agent out of its own files is refused, with file:line.
    write("0440");
    let out = backup();
    let err = crate::common::text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("backupy.toml:4") && err.contains("file_mode"), "{err}");
}
