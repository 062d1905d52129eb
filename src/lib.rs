//! backupy-agent: a database backup agent that streams dump → compression → encryption
//! → storage in constant memory.
//!
//! Module map (the layout is the data flow): `drivers` produce dump bytes (one file per
//! engine), `pipeline` compresses, encrypts and hashes them on a chain of threads,
//! `storage` keeps them (a directory or S3), `crypto` defines the object format. Around
//! them: `runner` ties one run together, `scheduler` and `standalone` run jobs on their
//! cron schedules, `state` records runs, `retention` prunes, `restore` and `verify` read
//! backups back, `config` parses the standalone TOML, `secrets` resolves password
//! references, `wire` holds the control-plane protocol types, `cli` the two binaries.

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
