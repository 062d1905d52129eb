//! backupy-agent: a database backup agent that streams dump → compression → encryption
//! → storage in constant memory.
//!
//! Module map (the layout is the data flow): `drivers` produce dump bytes, `pipeline`
//! compresses, encrypts and hashes them on a chain of threads, `storage` keeps them,
//! `crypto` defines the object format, `runner` ties one run together, `config` parses
//! the standalone TOML, `wire` holds the control-plane protocol types, `cli` the two
//! binaries' command lines.

pub mod cli;
pub mod config;
pub mod crypto;
pub mod drivers;
pub mod pipeline;
pub mod restore;
pub mod retention;
pub mod runner;
pub mod scheduler;
pub mod secrets;
pub mod standalone;
pub mod state;
pub mod storage;
pub mod verify;
pub mod wire;
