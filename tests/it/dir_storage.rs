//! Directory storage shared by jobs that run at the same moment: each run opens the
//! storage directory (create it, probe that it is writable) on its own worker thread.

use std::sync::{Arc, Barrier};

use backupy_agent::storage::DirStorage;

/// Two jobs of one standalone agent fired in the same second used the same probe file;
/// one removed it under the other, which then reported the directory "not writable"
/// (stress run, metrics::scrape_matches_the_runs_and_healthz_follows_the_state_directory).
#[test]
fn jobs_opening_one_storage_directory_at_once_all_succeed() {
    const THREADS: usize = 8;
    const OPENS: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("backups");
    let start = Arc::new(Barrier::new(THREADS));
    let workers: Vec<_> = (0..THREADS)
        .map(|_| {
            let (root, start) = (root.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                (0..OPENS)
                    .filter_map(|_| DirStorage::open(&root).err().map(|e| e.to_string()))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let errors: Vec<String> = workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    assert!(errors.is_empty(), "{} of {} opens failed, e.g. {:?}", errors.len(), THREADS * OPENS, errors[0]);
    let left: Vec<_> = std::fs::read_dir(&root).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "probe files left behind: {left:?}");
}
