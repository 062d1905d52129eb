//! The Docker Engine client and discovery against a stand-in daemon written here: API
//! version negotiation, clear errors for a missing socket, one without permission and a
//! daemon that is too old, and scans of hostile or vanishing containers.

use crate::common;
use crate::common::docker;

use std::collections::BTreeMap;
use std::time::Duration;

use backupy_agent::docker::client::{API_VERSION, ApiVersion};
use backupy_agent::docker::{Client, DockerError, discovery};
use docker::{Reply, StandIn};
use serde_json::json;

fn daemon(api: &'static str, version: &'static str) -> impl Fn(&str, &str) -> Reply + Send + Sync {
    move |_method, path| match path {
        "/_ping" => {
            Reply { status: 200, headers: vec![("Api-Version".into(), api.into())], body: "OK".into() }
        }
        "/version" => Reply::json(json!({ "Version": version, "ApiVersion": api, "MinAPIVersion": "1.12" })),
        p if p.ends_with("/containers/json") => Reply::json(json!([])),
        _ => Reply::status(404, "page not found"),
    }
}

#[test]
fn api_version_is_negotiated_down_to_an_older_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let standin = StandIn::start(&dir.path().join("docker.sock"), daemon("1.30", "17.06.2-ce"));
    let client = Client::connect(&standin.socket).expect("an older daemon is spoken to in its version");
    assert_eq!(client.api_version(), ApiVersion(1, 30));
    assert_eq!(client.daemon_version(), "17.06.2-ce");
    assert_eq!(discovery::scan(&client).unwrap(), vec![]);
    let paths = standin.paths();
    assert_eq!(paths[..2], ["GET /_ping".to_string(), "GET /version".to_string()]);
    assert!(paths.contains(&"GET /v1.30/containers/json".to_string()), "{paths:?}");
}

#[test]
fn a_newer_daemon_is_spoken_to_in_our_version() {
    let dir = tempfile::tempdir().unwrap();
    let standin = StandIn::start(&dir.path().join("docker.sock"), daemon("1.99", "99.0.0"));
    let client = Client::connect(&standin.socket).unwrap();
    assert_eq!(client.api_version(), API_VERSION);
    discovery::scan(&client).unwrap();
    assert!(
        standin.paths().contains(&format!("GET /v{API_VERSION}/containers/json")),
        "{:?}",
        standin.paths()
    );
}

#[test]
fn a_daemon_older_than_we_support_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let standin = StandIn::start(&dir.path().join("docker.sock"), daemon("1.12", "1.0.0"));
    let err = Client::connect(&standin.socket).unwrap_err();
    assert!(matches!(err, DockerError::TooOld { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("1.12") && text.contains("upgrade Docker"), "{text}");
}

#[test]
fn a_missing_socket_names_the_socket_and_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nothing-here.sock");
    let err = Client::connect(&path).unwrap_err();
    assert!(matches!(err, DockerError::SocketMissing { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(&path.display().to_string()) && text.contains("BACKUPY_DOCKER_SOCKET"), "{text}");
}

#[test]
fn a_socket_nobody_answers_on_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dead.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let err = Client::connect(&path).unwrap_err();
    assert!(matches!(err, DockerError::Unreachable { .. }), "{err:?}");
    assert!(err.to_string().contains("is dockerd running?"), "{err}");
}

/// Root passes every permission check, so the client runs as `nobody` in a child process.
#[test]
fn a_socket_without_permission_is_a_clear_error() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if std::env::var_os("BACKUPY_TEST_PERMISSION_SOCKET").is_some() {
        let path = std::path::PathBuf::from(std::env::var_os("BACKUPY_TEST_PERMISSION_SOCKET").unwrap());
        let err = Client::connect(&path).unwrap_err();
        assert!(matches!(err, DockerError::PermissionDenied { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "permission denied on {}: mount the socket or add the agent's user to the docker group",
                path.display()
            )
        );
        return;
    }
    let dir = docker::open_tempdir();
    let standin = StandIn::start(&dir.path().join("docker.sock"), daemon("1.41", "20.10.24"));
    std::fs::set_permissions(&standin.socket, std::fs::Permissions::from_mode(0o600)).unwrap();
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(&exe)
        .args([
            "--exact",
            &common::test_path(module_path!(), "a_socket_without_permission_is_a_clear_error"),
            "--nocapture",
        ])
        .env("BACKUPY_TEST_PERMISSION_SOCKET", &standin.socket)
        .uid(65534)
        .gid(65534)
        .output()
        .expect("the test binary runs as nobody (its directory must be world-readable)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "as nobody:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The daemon never saw a request: the kernel refused the connection.
    assert!(standin.paths().is_empty(), "{:?}", standin.paths());
}

fn container(id: &str, name: &str, image: &str, env: &[&str], exposed: &[&str]) -> serde_json::Value {
    let exposed: serde_json::Map<String, serde_json::Value> =
        exposed.iter().map(|p| (p.to_string(), json!({}))).collect();
    json!({
        "Id": id,
        "Name": format!("/{name}"),
        "State": { "Running": true },
        "Config": { "Image": image, "Env": env, "ExposedPorts": exposed, "Labels": {} },
        "HostConfig": { "NetworkMode": "app_default" },
        "Mounts": [],
        "NetworkSettings": {
            "Networks": { "app_default": {}, "backend": {} },
            "Ports": { "5432/tcp": [ { "HostIp": "0.0.0.0", "HostPort": "15432" }, { "HostIp": "::", "HostPort": "15432" } ] }
        }
    })
}

/// A daemon whose containers include a digest-pinned private mirror, an admin UI, one
/// that disappears between list and inspect, and one with hostile values.
fn compose_daemon() -> impl Fn(&str, &str) -> Reply + Send + Sync {
    let digest = format!("ghcr.io/acme/redis:7@sha256:{}", "ab".repeat(32));
    let hostile_label = "\u{202e}".repeat(10_000);
    move |_m, path| {
        let p = path.split_once("/containers/").map(|(_, rest)| rest).unwrap_or("");
        match (path, p) {
            ("/_ping", _) => {
                Reply { status: 200, headers: vec![("Api-Version".into(), "1.41".into())], body: "OK".into() }
            }
            ("/version", _) => Reply::json(json!({ "Version": "20.10.24", "ApiVersion": "1.41" })),
            (_, "json") => Reply::json(json!([
                { "Id": "c1" }, { "Id": "c2" }, { "Id": "gone" }, { "Id": "c3" }, { "Id": "c4" }
            ])),
            (_, "c1/json") => Reply::json(container(
                "c1",
                "shop-db-1",
                "postgres:16",
                &[
                    "POSTGRES_USER=shop",
                    "POSTGRES_DB=orders",
                    "POSTGRES_PASSWORD=s3cr3t-pg-value",
                    "PATH=/usr/bin",
                ],
                &["5432/tcp"],
            )),
            (_, "c2/json") => Reply::json(container(
                "c2",
                "cache",
                &digest,
                &["REDIS_PASSWORD_FILE=/run/secrets/r"],
                &["6379/tcp"],
            )),
            (_, "c3/json") => Reply::json(container(
                "c3",
                "admin",
                "mongo-express:1",
                &["ME_CONFIG_MONGODB_ADMINPASSWORD=x1y2z3"],
                &["8081/tcp"],
            )),
            (_, "c4/json") => {
                let mut c = container(
                    "c4",
                    &"n".repeat(5000),
                    "x/\u{0}weird:tag",
                    &[&format!("APP_DB={hostile_label}")],
                    &["3306/tcp"],
                );
                c["Config"]["Labels"] = json!({ hostile_label.clone(): hostile_label.clone() });
                Reply::json(c)
            }
            (_, "gone/json") => Reply::status(404, "No such container: gone"),
            _ => Reply::status(404, "page not found"),
        }
    }
}

#[test]
fn scan_reports_exactly_the_databases_in_a_stable_order_without_secret_values() {
    let dir = tempfile::tempdir().unwrap();
    let standin = StandIn::start(&dir.path().join("docker.sock"), compose_daemon());
    let client = Client::connect(&standin.socket).unwrap();
    let found = discovery::scan(&client).unwrap();
    let summary: Vec<(&str, &str, String)> = found
        .iter()
        .map(|c| (c.container_id.as_str(), c.detected_db_type.as_str(), c.image.chars().take(30).collect()))
        .collect();
    let expected: Vec<(&str, &str, String)> = vec![
        ("c2", "redis", "ghcr.io/acme/redis:7@sha256:ab".to_string()),
        // The hostile one: no image name it knows, but port 3306 says MySQL.
        ("c4", "mysql", "x/weird:tag".to_string()),
        ("c1", "postgresql", "postgres:16".to_string()),
    ];
    // Sorted by name: "cache" < "nnnn…" < "shop-db-1"; mongo-express and the container
    // that vanished are not there.
    assert_eq!(summary, expected);
    let pg = &found[2];
    assert_eq!(pg.name, "shop-db-1");
    assert_eq!(pg.networks, vec!["app_default".to_string(), "backend".to_string()]);
    let ports: Vec<(u32, u32, &str)> =
        pg.ports.iter().map(|p| (p.container_port, p.host_port, p.protocol.as_str())).collect();
    assert_eq!(ports, vec![(5432, 15432, "tcp")]);
    let hints: BTreeMap<_, _> = pg.env_hints.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(
        hints,
        BTreeMap::from([("POSTGRES_DB", "orders"), ("POSTGRES_PASSWORD", "set"), ("POSTGRES_USER", "shop")])
    );
    assert_eq!(found[0].env_hints.get("REDIS_PASSWORD_FILE").map(String::as_str), Some("set"));
    // Hostile values are shortened, control characters dropped.
    assert!(found[1].name.chars().count() <= 256);
    assert!(found[1].env_hints.get("APP_DB").is_some_and(|v| v.chars().count() <= 256));
    let all = format!("{found:?}");
    for secret in ["s3cr3t-pg-value", "x1y2z3", "/run/secrets/r"] {
        assert!(!all.contains(secret), "{secret} leaked into the report");
    }
}

#[test]
fn the_watcher_survives_a_daemon_restart_and_reports_the_new_state() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("docker.sock");
    let first = StandIn::start(&sock, compose_daemon());
    let client = Client::connect(&sock).unwrap();
    let options = discovery::Options { rescan_interval: Duration::from_millis(300), ..Default::default() };
    let (watcher, reports) = discovery::start(client, options);
    let report = reports.recv_timeout(Duration::from_secs(10)).expect("a first report");
    assert_eq!(report.containers.len(), 3);
    // An unchanged rescan sends nothing.
    assert!(reports.recv_timeout(Duration::from_secs(1)).is_err(), "an unchanged rescan sent a report");
    // The daemon goes away (warnings, no report) and comes back with other containers.
    first.stop();
    assert!(reports.recv_timeout(Duration::from_secs(1)).is_err());
    let _second = StandIn::start(&sock, daemon("1.41", "20.10.25"));
    let report = reports.recv_timeout(Duration::from_secs(40)).expect("a report after the restart");
    assert!(report.containers.is_empty(), "{report:?}");
    watcher.stop();
}

#[test]
fn discovery_can_be_turned_off() {
    if std::env::var_os("BACKUPY_DISABLE_DISCOVERY").is_none() {
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                &common::test_path(module_path!(), "discovery_can_be_turned_off"),
                "--nocapture",
            ])
            .env("BACKUPY_DISABLE_DISCOVERY", "true")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let standin = StandIn::start(&dir.path().join("docker.sock"), compose_daemon());
    let client = Client::connect(&standin.socket).unwrap();
    let before = standin.paths().len();
    let (watcher, reports) = discovery::start(client, discovery::Options::default());
    assert!(reports.recv_timeout(Duration::from_secs(1)).is_err());
    assert_eq!(standin.paths().len(), before, "a disabled watcher asked the daemon: {:?}", standin.paths());
    watcher.stop();
}

#[test]
fn a_stalled_event_stream_neither_stops_rescans_nor_delays_stop() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let emptied = Arc::new(AtomicBool::new(false));
    let inner = compose_daemon();
    let flag = emptied.clone();
    let standin = StandIn::start(&dir.path().join("docker.sock"), move |m, path| {
        if path.contains("/events") {
            return Reply { status: 0, headers: vec![], body: String::new() };
        }
        if flag.load(Ordering::SeqCst) && path.ends_with("/containers/json") {
            return Reply::json(json!([]));
        }
        inner(m, path)
    });
    let client = Client::connect(&standin.socket).unwrap();
    let options = discovery::Options { rescan_interval: Duration::from_millis(300), ..Default::default() };
    let (watcher, reports) = discovery::start(client, options);
    assert_eq!(reports.recv_timeout(Duration::from_secs(10)).unwrap().containers.len(), 3);
    docker::wait_for("the watcher's event request", Duration::from_secs(5), || {
        standin.paths().iter().any(|p| p.contains("/events"))
    });
    emptied.store(true, Ordering::SeqCst);
    let report =
        reports.recv_timeout(Duration::from_secs(5)).expect("periodic rescans go on while events stall");
    assert!(report.containers.is_empty());
    let t0 = std::time::Instant::now();
    watcher.stop();
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "stop took {:?} with a stalled event stream",
        t0.elapsed()
    );
}

/// Runs in a child process: it sets BACKUPY_DOCKER_SOCKET for itself.
#[test]
fn without_a_socket_the_watcher_warns_and_stays_silent() {
    if std::env::var_os("BACKUPY_TEST_INNER_NO_SOCKET").is_none() {
        let dir = tempfile::tempdir().unwrap();
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                &common::test_path(module_path!(), "without_a_socket_the_watcher_warns_and_stays_silent"),
                "--nocapture",
            ])
            .env("BACKUPY_TEST_INNER_NO_SOCKET", "1")
            .env("BACKUPY_DOCKER_SOCKET", dir.path().join("docker.sock"))
            .env_remove("BACKUPY_DISABLE_DISCOVERY")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    let (watcher, reports) = discovery::start_from_env(discovery::Options::default());
    assert_eq!(
        reports.recv_timeout(Duration::from_millis(500)),
        Err(crossbeam_channel::RecvTimeoutError::Timeout),
        "no report, and the channel stays open"
    );
    watcher.stop();
}

fn parse_target(target: &str) -> Result<backupy_agent::drivers::TargetSpec, String> {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "state_dir = \"./state\"\n[storage]\ndir = \"./b\"\n[encryption]\nrecipient = \"{}\"\n[[targets]]\nid = \"db\"\n{target}\n",
        common::keygen(dir.path()).1
    );
    backupy_agent::config::Config::parse(&dir.path().join("backupy.toml"), &text)
        .map(|c| c.targets["db"].clone())
        .map_err(|e| e.to_string())
}

#[test]
fn toml_targets_take_the_docker_exec_strategy_with_a_container() {
    use backupy_agent::drivers::Strategy;
    let spec = parse_target(
        "type = \"postgresql\"\nstrategy = \"docker_exec\"\ncontainer = \"shop-db-1\"\ndatabase = \"orders\"",
    )
    .unwrap();
    assert_eq!(spec.strategy, Strategy::DockerExec { container: "shop-db-1".into() });
    assert_eq!(spec.database, "orders");
    let spec = parse_target(
        "type = \"sqlite\"\nstrategy = \"docker_exec\"\ncontainer = \"app\"\npath = \"/var/lib/app/app.db\"",
    )
    .unwrap();
    assert_eq!(spec.database, "/var/lib/app/app.db", "the path inside the container is kept as written");

    for (target, why) in [
        ("type = \"postgresql\"\nstrategy = \"docker_exec\"\ndatabase = \"x\"", "needs container"),
        ("type = \"postgresql\"\ncontainer = \"db\"\nhost = \"h\"", "container needs strategy"),
        ("type = \"postgresql\"\nstrategy = \"ssh\"\ncontainer = \"db\"", "is not one of docker_exec"),
        (
            "type = \"postgresql\"\nstrategy = \"docker_exec\"\ncontainer = \"../x\"",
            "is not a container name",
        ),
        ("type = \"sqlite\"\nstrategy = \"docker_exec\"\ncontainer = \"app\"\npath = \"app.db\"", "absolute"),
    ] {
        let err = parse_target(target).unwrap_err();
        assert!(err.contains(why) && err.contains("backupy.toml"), "{target}: {err}");
    }
}
