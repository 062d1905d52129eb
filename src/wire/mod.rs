//! The `backup.v1` protocol types, generated at build time from `proto/backup/v1/`.
//!
//! This module owns only the message definitions; framing and delivery are `session`'s
//! and `outbox`'s, and `connected` acts on the commands. Field numbers are fixed by `wire-v1.md` and checked by `tests/it/wire_protocol.rs`.

#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/backup.v1.rs"));
}
