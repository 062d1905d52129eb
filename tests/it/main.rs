//! The integration tests, in one binary: each module is one former `tests/<name>.rs`,
//! named after the part of the agent it proves, and `common` holds the helpers and test
//! services they share. One binary links the dependency tree once instead of once per
//! file (docs/performance.md#ci-time). nextest still runs every test in a process of its
//! own, so process-wide state (environment, loggers) stays per test.

mod common;

mod agent_cli;
mod blob_vectors;
mod cancel_sources;
mod connected;
mod crypto_format;
mod decrypt_cli;
mod delivery;
mod dir_storage;
mod docker_client;
mod docker_discovery;
mod docker_exec;
mod drill;
mod driver_mariadb;
mod driver_mongodb;
mod driver_postgres;
mod driver_redis;
mod e2e_sqlite;
mod fuzz_envelope;
mod health;
mod hooks;
mod interrupt;
mod leftovers;
mod metrics;
mod monitoring;
mod notify;
mod object_lock;
mod ops_help;
mod ops_logs;
mod ops_metrics;
mod ops_notify;
mod ops_schedule;
mod outbox;
mod packaging;
mod pipeline;
mod restore_cli;
mod retention;
mod s3_cli;
mod s3_storage;
mod scheduler;
mod secrets_in_logs;
mod selfupdate;
mod session;
mod standalone;
mod tls_mariadb;
mod tls_mongodb;
mod tls_postgres;
mod tls_redis;
mod trust_config;
mod trust_connected;
mod trust_files;
mod trust_lints;
mod trust_outbox;
mod trust_pushed_secrets;
mod trust_restore;
mod trust_storage;
mod trust_update;
mod wire_protocol;
