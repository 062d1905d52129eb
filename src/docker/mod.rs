//! Docker: the Engine API client, the DOCKER_EXEC strategy and container discovery.
//!
//! - `client`: the Engine API over the UNIX socket (`BACKUPY_DOCKER_SOCKET`), synchronous,
//!   with the API version negotiated through `/_ping` and `/version`. JSON requests go
//!   through ureq with a UNIX-socket connector; the one request that needs a full-duplex
//!   connection (exec start, hijacked) opens its own socket.
//! - `exec`: runs a command inside a container (exec create + start), demultiplexes its
//!   stdout/stderr stream and turns it into a pipeline [`Source`](crate::pipeline::Source)
//!   or feeds a restore into its stdin. Runs on the worker thread that starts a run; the
//!   bytes then flow on the pipeline's dump thread, and a cancel from the pipeline's
//!   coordinator kills the process inside the container.
//! - `names`: the container-name rule, checked by the config, the restore CLI and the
//!   DOCKER_EXEC driver before a name reaches a URL.
//! - `discovery`: one scan of the running containers (`scan`, called on any thread) and
//!   the discovery watcher thread (`start`) that rescans on Docker events and hourly and
//!   sends a `DiscoveryReport` on its channel only when the result changed.
//!
//! This module does not schedule backups and does not talk to the control plane: connected
//! mode forwards the watcher's reports into its outbox.

pub mod client;
pub mod discovery;
pub mod exec;
pub mod names;

pub use client::{Client, DockerError};
