//! backupy-agent: a database backup agent that streams dump → compression → encryption
//! → storage in constant memory.
//!
//! Module map (the layout is the data flow): `drivers` produce dump bytes (one file per
//! engine), `pipeline` compresses, encrypts and hashes them on a chain of threads,
//! `storage` keeps them (a directory or S3), `crypto` defines the object format. Around
//! them: `runner` is one backup run for both modes (`execute(RunPlan) -> RunOutcome`:
//! hooks, dump, pipeline into the plan's `Destination`, seal), `cancel` stops a run and
//! says why, and `scheduler` queues runs and runs them on its worker pool under their
//! timeouts. Two modes feed it: `standalone` (cron jobs, plans built from `config`, the
//! TOML) and `connected` (RunBackups from a control plane, plans built from `wire`
//! messages; `session` and `outbox` carry them). `state` records runs, `metrics` counts
//! them, `retention` prunes, `restore` and `verify` read backups back, `health` probes,
//! `docker` talks to dockerd, `selfupdate` replaces the binary, `env` reads every
//! `BACKUPY_*` variable once, `secrets` resolves password references and redacts, `cli`
//! holds the two binaries. Threads and channels: docs/architecture.md.

pub mod cancel;
pub mod cli;
pub mod clock;
pub mod config;
pub mod connected;
pub mod crypto;
pub mod docker;
pub mod drivers;
pub mod env;
pub mod health;
pub mod hooks;
pub mod leftovers;
pub mod logfwd;
pub mod metrics;
pub mod notify;
pub mod outbox;
pub mod pipeline;
pub mod restore;
pub mod retention;
pub mod retry;
pub mod runner;
pub mod scheduler;
pub mod secrets;
pub mod selfupdate;
pub mod session;
pub mod standalone;
pub mod state;
pub mod storage;
pub mod verify;
pub mod wire;

/// This build's version, as Register, the manifest, `version` and the Docker user agent report it.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
