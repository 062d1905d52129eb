//! The streaming pipeline: every compression × encryption combination round-trips, and
//! a failure in any stage stops all stages promptly, names the stage, and stores nothing.

use std::io::{self, Read, Write};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backupy_agent::cancel::Cancel;
use backupy_agent::crypto::{self, DataKey, Encryption, Identity, KeySource};
use backupy_agent::drivers::{Engine, MAGIC_LEN, check_magic};
use backupy_agent::pipeline::compress::decompress_by_magic;
use backupy_agent::pipeline::{self, Compression, PipelineError, Progress, Source, Stage};
use backupy_agent::storage::{DirStorage, ObjectWriter, StoredObject};
use sha2::Digest;

fn text_data(n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n);
    let mut i = 0u64;
    while out.len() < n {
        out.extend_from_slice(
            format!("INSERT INTO t VALUES ({i}, 'row {}', {});\n", i * 7919 % 1000, i % 13).as_bytes(),
        );
        i += 1;
    }
    out.truncate(n);
    out
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_in(&p));
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    out
}

fn run(
    source: Source,
    compression: Compression,
    enc: &Encryption,
    sink: Box<dyn ObjectWriter>,
    cancel: &Cancel,
) -> Result<pipeline::Output, PipelineError> {
    let prepared = enc.prepare(compression.header_code()).unwrap();
    let mut opts = pipeline::Options::new(compression, prepared);
    opts.buffer_size = 64 << 10;
    pipeline::run(source, opts, sink, cancel, Arc::new(Progress::default()))
}

#[test]
fn every_compression_and_encryption_mode_round_trips() {
    let input = text_data(5 * (1 << 20) + 123);
    let id = Identity::generate().unwrap();
    let modes: Vec<(&str, Encryption, Option<KeySource>)> = vec![
        ("none", Encryption::None, None),
        (
            "v1",
            Encryption::V1 { key: DataKey::from_bytes([1; 32]) },
            Some(KeySource::Raw(DataKey::from_bytes([1; 32]))),
        ),
        (
            "v2raw",
            Encryption::V2Raw { key: DataKey::from_bytes([2; 32]), chunk_size: 1 << 20 },
            Some(KeySource::Raw(DataKey::from_bytes([2; 32]))),
        ),
        (
            "v2rcpt",
            Encryption::V2Recipient { recipient: id.recipient().unwrap(), chunk_size: 64 << 10 },
            Some(KeySource::Identity(Identity::parse(&id.to_file_text().unwrap()).unwrap())),
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let storage = DirStorage::open(dir.path()).unwrap();
    for compression in [Compression::default(), Compression::Gzip, Compression::None] {
        for (label, enc, key) in &modes {
            let name = format!("{}-{label}", compression.name());
            let source = Source::from_reader("test data", io::Cursor::new(input.clone()));
            let sink = Box::new(storage.create(&name).unwrap());
            let out = run(source, compression, enc, sink, &Cancel::default()).unwrap();
            let stored = std::fs::read(storage.path_of(&name)).unwrap();
            assert_eq!(out.dump_bytes, input.len() as u64, "{name}");
            assert_eq!(out.stored_bytes, stored.len() as u64, "{name}");
            assert_eq!(out.object, StoredObject { key: name.clone(), size: stored.len() as u64 });
            assert_eq!(
                out.sha256,
                hex::encode(sha2::Sha256::digest(&stored)),
                "{name}: sha256 of the stored bytes"
            );
            if compression != Compression::None {
                assert!(stored.len() < input.len() / 2, "{name}: compressed");
            }
            let plain: Box<dyn Read> = match key {
                None => Box::new(io::Cursor::new(stored)),
                Some(k) => crypto::open(io::Cursor::new(stored), k).unwrap().1,
            };
            let (detected, mut r) = decompress_by_magic(plain).unwrap();
            assert_eq!(detected, compression.name(), "{name}");
            let mut back = Vec::new();
            r.read_to_end(&mut back).unwrap();
            assert!(back == input, "{name}: restored bytes differ");
        }
    }
}

#[test]
fn empty_dump_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let storage = DirStorage::open(dir.path()).unwrap();
    let enc = Encryption::V2Raw { key: DataKey::from_bytes([9; 32]), chunk_size: 4096 };
    let out = run(
        Source::from_reader("empty", io::empty()),
        Compression::default(),
        &enc,
        Box::new(storage.create("e").unwrap()),
        &Cancel::default(),
    )
    .unwrap();
    assert_eq!(out.dump_bytes, 0);
    let stored = std::fs::read(storage.path_of("e")).unwrap();
    let (_, r) =
        crypto::open(io::Cursor::new(stored), &KeySource::Raw(DataKey::from_bytes([9; 32]))).unwrap();
    let (_, mut r) = decompress_by_magic(r).unwrap();
    let mut back = Vec::new();
    r.read_to_end(&mut back).unwrap();
    assert!(back.is_empty());
}

fn sh(script: &str) -> Source {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c").arg(script).env_clear().env("PATH", "/usr/bin:/bin");
    Source::spawn("test-dump", cmd).unwrap()
}

#[test]
fn dump_exiting_nonzero_after_writing_bytes_fails_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let storage = DirStorage::open(dir.path()).unwrap();
    let source = sh(
        "printf 'SQLite format 3\\000'; head -c 3000000 /dev/zero; echo 'FATAL: lost connection' >&2; exit 1",
    )
    .with_magic(MAGIC_LEN, Box::new(|h| check_magic(Engine::Sqlite, h)));
    let err = run(
        source,
        Compression::default(),
        &Encryption::None,
        Box::new(storage.create("t/j/obj").unwrap()),
        &Cancel::default(),
    )
    .unwrap_err();
    assert_eq!(err.stage(), Some(Stage::Dump), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("exited with status 1"), "{msg}");
    assert!(msg.contains("FATAL: lost connection"), "stderr tail in the error: {msg}");
    assert_eq!(files_in(dir.path()), Vec::<String>::new(), "no object, no partial file");
}

#[test]
fn dump_with_wrong_magic_fails_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let storage = DirStorage::open(dir.path()).unwrap();
    let source = sh("echo 'this is not a database'")
        .with_magic(MAGIC_LEN, Box::new(|h| check_magic(Engine::Sqlite, h)));
    let err = run(
        source,
        Compression::None,
        &Encryption::None,
        Box::new(storage.create("obj").unwrap()),
        &Cancel::default(),
    )
    .unwrap_err();
    assert_eq!(err.stage(), Some(Stage::Dump));
    assert!(err.to_string().contains("not a valid dump"), "{err}");
    assert!(files_in(dir.path()).is_empty());
}

/// Fails after `limit` bytes, like a full disk or a refused upload.
struct FailingSink {
    written: usize,
    limit: usize,
}

impl Write for FailingSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written + buf.len() > self.limit {
            return Err(io::Error::new(io::ErrorKind::StorageFull, "no space left on device"));
        }
        self.written += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ObjectWriter for FailingSink {
    fn commit(self: Box<Self>) -> io::Result<StoredObject> {
        panic!("a failed stream must never be committed")
    }
}

fn pid_alive(pid: &str) -> bool {
    // A zombie still has a /proc entry; its state letter is Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2).is_none_or(|st| st != "Z"))
        .unwrap_or(false)
}

#[test]
fn store_failure_stops_an_endless_dump_promptly_and_names_the_stage() {
    let pidfile = tempfile::NamedTempFile::new().unwrap();
    let source = sh(&format!("echo $$ > {}; exec cat /dev/urandom", pidfile.path().display()));
    let t0 = Instant::now();
    let err = run(
        source,
        Compression::None,
        &Encryption::V2Raw { key: DataKey::from_bytes([1; 32]), chunk_size: 1 << 20 },
        Box::new(FailingSink { written: 0, limit: 8 << 20 }),
        &Cancel::default(),
    )
    .unwrap_err();
    assert_eq!(err.stage(), Some(Stage::Store), "{err}");
    assert!(err.to_string().contains("no space left"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(10), "stopped promptly, took {:?}", t0.elapsed());
    let pid = std::fs::read_to_string(pidfile.path()).unwrap();
    assert!(!pid_alive(pid.trim()), "the dump process was killed");
}

#[test]
fn cancel_stops_a_stalled_dump_and_kills_its_process_group() {
    let pidfile = tempfile::NamedTempFile::new().unwrap();
    // The child forks a grandchild that holds stdout open: only a group kill ends both.
    let source = sh(&format!("sleep 600 & echo $! > {}; wait", pidfile.path().display()));
    let cancel = Cancel::default();
    let c = cancel.clone();
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        c.cancel();
    });
    let t0 = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let storage = DirStorage::open(dir.path()).unwrap();
    let err = run(
        source,
        Compression::default(),
        &Encryption::None,
        Box::new(storage.create("obj").unwrap()),
        &cancel,
    )
    .unwrap_err();
    canceller.join().unwrap();
    assert!(matches!(err, PipelineError::Cancelled), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(5), "cancel took {:?}", t0.elapsed());
    let grandchild = std::fs::read_to_string(pidfile.path()).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(!pid_alive(grandchild.trim()), "the grandchild was killed with the group");
    assert!(files_in(dir.path()).is_empty());
}
