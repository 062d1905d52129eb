//! Docker discovery against the throwaway dockerd: which containers are databases (by
//! image name, then by exposed port, SQLite files in mounts), what the report and the
//! `discover` command say about them, and the watcher's reports on container events.
//!
//! These tests look at every container of the daemon, so they hold the exclusive
//! container lock (the DOCKER_EXEC tests hold it shared).

use crate::common::db;
use crate::common::docker;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::common::*;
use backupy_agent::docker::{Client, discovery};
use docker::Container;

const SECRETS: [&str; 5] =
    ["pg-secret-1", "maria-secret-2", "redis-secret-3", "bitnami-secret-4", "express-secret-5"];

fn images() {
    docker::image("postgres:16", "EXPOSE 5432");
    docker::image("docker.io/library/mariadb:11", "EXPOSE 3306");
    docker::image("ghcr.io/acme/redis:7", "EXPOSE 6379");
    docker::image("bitnami/postgresql:15", "EXPOSE 5432");
    docker::image("acme/billing:2", "EXPOSE 5432 8080");
    docker::image("acme/app:1", "EXPOSE 8000");
    docker::image("mongo-express:1", "EXPOSE 8081");
}

fn sleeper(name: &str, image: &str, extra: &[&str]) -> Container {
    docker::run(name, image, extra, &["sleep", "3600"])
}

/// The compose stack of the issue: five databases, one app with a SQLite file in a
/// mounted directory, and an admin UI that is not a database.
fn stack(sqlite_dir: &std::path::Path) -> Vec<Container> {
    images();
    let app_volume = format!("{}:/var/lib/app", sqlite_dir.display());
    vec![
        sleeper(
            "disc-pg",
            "postgres:16",
            &["-e", "POSTGRES_USER=shop", "-e", &format!("POSTGRES_PASSWORD={}", SECRETS[0])],
        ),
        sleeper(
            "disc-maria",
            "docker.io/library/mariadb:11",
            &["-e", "MARIADB_DATABASE=app", "-e", &format!("MARIADB_ROOT_PASSWORD={}", SECRETS[1])],
        ),
        sleeper("disc-cache", "ghcr.io/acme/redis:7", &["-e", &format!("REDIS_PASSWORD={}", SECRETS[2])]),
        sleeper(
            "disc-bitnami",
            "bitnami/postgresql:15",
            &["-e", "POSTGRESQL_USERNAME=u1", "-e", &format!("POSTGRESQL_PASSWORD={}", SECRETS[3])],
        ),
        sleeper("disc-billing", "acme/billing:2", &[]),
        sleeper("disc-app", "acme/app:1", &["-v", &app_volume]),
        sleeper(
            "disc-ui",
            "mongo-express:1",
            &["-e", &format!("ME_CONFIG_MONGODB_ADMINPASSWORD={}", SECRETS[4])],
        ),
    ]
}

/// Name, type, ports (container, host, protocol), networks.
type Summary<'a> = (&'a str, &'a str, Vec<(u32, u32, &'a str)>, Vec<&'a str>);

#[test]
fn discovery_lists_exactly_the_database_containers_with_type_ports_and_hints() {
    let _l = docker::exclusive_lock();
    let dir = docker::open_tempdir();
    rusqlite::Connection::open(dir.path().join("app.sqlite"))
        .unwrap()
        .execute_batch("CREATE TABLE t(x)")
        .unwrap();
    std::fs::write(dir.path().join("notes.db"), "not a database").unwrap();
    let _stack = stack(dir.path());

    let client = Client::connect(&docker::socket()).unwrap();
    assert!(!client.daemon_version().is_empty());
    let found = discovery::scan(&client).unwrap();
    let summary: Vec<Summary> = found
        .iter()
        .map(|c| {
            (
                c.name.as_str(),
                c.detected_db_type.as_str(),
                c.ports.iter().map(|p| (p.container_port, p.host_port, p.protocol.as_str())).collect(),
                c.networks.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("disc-app", "sqlite", vec![(8000, 0, "tcp")], vec!["host"]),
            ("disc-billing", "postgresql", vec![(5432, 0, "tcp"), (8080, 0, "tcp")], vec!["host"]),
            ("disc-bitnami", "postgresql", vec![(5432, 0, "tcp")], vec!["host"]),
            ("disc-cache", "redis", vec![(6379, 0, "tcp")], vec!["host"]),
            ("disc-maria", "mariadb", vec![(3306, 0, "tcp")], vec!["host"]),
            ("disc-pg", "postgresql", vec![(5432, 0, "tcp")], vec!["host"]),
        ]
    );
    let hints = |name: &str| -> BTreeMap<String, String> {
        found
            .iter()
            .find(|c| c.name == name)
            .unwrap()
            .env_hints
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    let h = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    };
    assert_eq!(hints("disc-pg"), h(&[("POSTGRES_PASSWORD", "set"), ("POSTGRES_USER", "shop")]));
    assert_eq!(hints("disc-maria"), h(&[("MARIADB_DATABASE", "app"), ("MARIADB_ROOT_PASSWORD", "set")]));
    assert_eq!(hints("disc-bitnami"), h(&[("POSTGRESQL_PASSWORD", "set"), ("POSTGRESQL_USERNAME", "u1")]));
    assert_eq!(hints("disc-app").get("sqlite_files").map(String::as_str), Some("/var/lib/app/app.sqlite"));
    let report = format!("{found:?}");
    for s in SECRETS {
        assert!(!report.contains(s), "{s} is in the report");
    }

    // The same through the command line: JSON, and TOML that check-config accepts.
    let out = run({
        let mut c = agent();
        c.args(["discover", "--json"]).env("BACKUPY_DOCKER_SOCKET", docker::socket());
        c
    });
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json, discovery::to_json(&found));
    let out = run({
        let mut c = agent();
        c.args(["discover", "--toml"]).env("BACKUPY_DOCKER_SOCKET", docker::socket());
        c
    });
    assert!(out.status.success(), "{}", text(&out.stderr));
    let toml_text = text(&out.stdout);
    for s in SECRETS {
        assert!(!toml_text.contains(s), "{s} is in the TOML");
    }
    assert!(toml_text.contains("password = \"env:DISC_PG_PASSWORD\""), "{toml_text}");
    let cfg_dir = tempfile::tempdir().unwrap();
    let (_key, recipient) = keygen(cfg_dir.path());
    let config = cfg_dir.path().join("backupy.toml");
    std::fs::write(
        &config,
        format!("state_dir = \"./state\"\n[storage]\ndir = \"./backups\"\n[encryption]\nrecipient = \"{recipient}\"\n{toml_text}"),
    )
    .unwrap();
    let mut c = agent();
    c.arg("check-config").arg(&config);
    for var in ["DISC_PG_PASSWORD", "DISC_MARIA_PASSWORD", "DISC_CACHE_PASSWORD", "DISC_BITNAMI_PASSWORD"] {
        c.env(var, "x");
    }
    let out = run(c);
    assert!(
        out.status.success(),
        "check-config refused the discovered TOML:\n{toml_text}\n{}",
        text(&out.stderr)
    );
}

#[test]
fn discover_without_a_docker_socket_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("docker.sock");
    let out = run({
        let mut c = agent();
        c.arg("discover").env("BACKUPY_DOCKER_SOCKET", &sock);
        c
    });
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains(&sock.display().to_string()) && err.contains("mount"), "{err}");
}

#[test]
fn starting_and_stopping_a_container_is_reported_within_5_s_and_nothing_else() {
    let _l = docker::exclusive_lock();
    docker::image("postgres:16", "EXPOSE 5432");
    let client = Client::connect(&docker::socket()).unwrap();
    let (watcher, reports) = discovery::start(client, discovery::Options::default());
    let first = reports.recv_timeout(Duration::from_secs(10)).expect("a first report");
    let before = first.containers.len();
    assert!(reports.recv_timeout(Duration::from_secs(2)).is_err(), "a report without any change");

    let t0 = Instant::now();
    let c = sleeper(&db::unique("disc-new"), "postgres:16", &[]);
    let report = reports.recv_timeout(Duration::from_secs(5)).expect("a report within 5 s of the start");
    assert!(
        report.containers.iter().any(|d| d.name == c.name && d.detected_db_type == "postgresql"),
        "{report:?}"
    );
    assert_eq!(report.containers.len(), before + 1);
    assert!(t0.elapsed() < Duration::from_secs(6));

    let t0 = Instant::now();
    drop(c);
    let report = reports.recv_timeout(Duration::from_secs(5)).expect("a report within 5 s of the stop");
    assert_eq!(report.containers.len(), before, "{report:?}");
    assert!(t0.elapsed() < Duration::from_secs(6));
    // A container that is not a database changes nothing in the result: no report.
    docker::image("acme/web:1", "EXPOSE 80");
    let web = sleeper(&db::unique("disc-web"), "acme/web:1", &[]);
    assert!(reports.recv_timeout(Duration::from_secs(2)).is_err(), "an unchanged rescan sent a report");
    drop(web);
    watcher.stop();
}
