//! backupy-agent: a database backup agent that streams dump → compression → encryption
//! → storage in constant memory.
//!
//! Module map (the layout is the data flow): `drivers` produce dump bytes (one file per
//! engine), `pipeline` compresses, encrypts and hashes them on a chain of threads,
//! `storage` keeps them (a directory or S3), `crypto` defines the object format. Around
//! them: `runner` is one backup run for both modes (`execute(RunPlan) -> RunOutcome`:
//! hooks, dump, pipeline into the plan's `Destination`, seal), `cancel` stops a run and
//! says why (`interrupt` turns SIGINT/SIGTERM of a one-shot command into a cancel), and
//! `scheduler` queues runs and runs them on its worker pool under their timeouts. Two modes feed it: `standalone` (cron jobs, plans built from `config`, the
//! TOML) and `connected` (RunBackups from a control plane, plans built from `wire`
//! messages; `session` and `outbox` carry them). `state` records runs, `metrics` counts
//! them, `retention` prunes, `restore` and `verify` read backups back, `drill` restores one into scratch and
//! compares it with its manifest's counts, `health` probes,
//! `docker` talks to dockerd, `selfupdate` replaces the binary, `env` reads every
//! `BACKUPY_*` variable once, `secrets` resolves password references and redacts, `cli`
//! holds the two binaries. Threads and channels: docs/architecture.md.

// The modules that read bytes from the network, the store or a manifest: no `unwrap`,
// `expect` or indexing there, so hostile input gets an error, never a panic (issue 16,
// docs/security.md). Tests inside them may (clippy.toml). tests/it/trust_lints.rs keeps
// the list.
pub mod cancel;
pub mod cli;
pub mod clock;
pub mod config;
#[deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
pub mod connected;
#[deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
pub mod crypto;
pub mod docker;
#[deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
pub mod drill;
pub mod drivers;
pub mod env;
pub mod health;
pub mod hooks;
pub mod interrupt;
pub mod leftovers;
pub mod logfwd;
pub mod metrics;
pub mod notify;
#[deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
pub mod outbox;
pub mod pipeline;
pub mod restore;
#[deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
pub mod retention;
pub mod retry;
pub mod runner;
pub mod scheduler;
pub mod secrets;
#[deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
pub mod selfupdate;
#[deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
pub mod session;
pub mod standalone;
pub mod state;
#[deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
pub mod storage;
#[deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
pub mod verify;
#[deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
pub mod wire;

/// This build's version, as Register, the manifest, `version` and the Docker user agent report it.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
