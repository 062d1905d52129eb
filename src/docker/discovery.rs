//! Discovery of database containers: which running containers hold a database, of what
//! type, on which networks and ports, with which (non-secret) settings.
//!
//! [`scan`] is one pass (list, then inspect each container) and runs on the caller's
//! thread. [`start`] runs the discovery watcher: a `docker-discovery` thread that scans
//! at start, on every container event (create, start, die, destroy) and hourly, and
//! sends a `DiscoveryReport` on its channel only when the result changed; a
//! `docker-events` thread reads the daemon's event stream and wakes it. A daemon that is
//! down, restarts, or whose stream stalls or closes costs a warning and a retry, never
//! the watcher.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use serde::Deserialize;

use super::client::{Client, DockerError};
use super::exec::path_segment;
use crate::retry::Backoff;
use crate::wire::pb;

/// The variable that turns discovery off.
pub const DISABLE_VAR: &str = "BACKUPY_DISABLE_DISCOVERY";
/// Longest image name, label or environment value kept in a report.
const MAX_VALUE: usize = 256;
/// How deep below a mount point SQLite files are looked for.
const SQLITE_DEPTH: usize = 2;
/// At most this many entries are looked at per mount (a mounted root file system must
/// not turn a scan into a crawl).
const SQLITE_MAX_ENTRIES: usize = 2000;

/// `BACKUPY_DISABLE_DISCOVERY=true`.
pub fn disabled_by_env() -> bool {
    crate::env::Env::get().disable_discovery
}

// ------------------------------------------------------------------ classification

/// The repository part of an image reference: registry host, `library/`, tag and digest
/// removed, lower case ("ghcr.io/acme/redis:7@sha256:…" → "acme/redis").
pub fn image_repository(image: &str) -> String {
    let image = image.trim().to_ascii_lowercase();
    let image = image.split('@').next().unwrap_or("");
    let mut parts: Vec<&str> = image.split('/').collect();
    if parts.len() > 1 {
        let first = parts[0];
        if first.contains('.') || first.contains(':') || first == "localhost" {
            parts.remove(0);
        }
    }
    if let Some(last) = parts.last_mut() {
        *last = last.split(':').next().unwrap_or("");
    }
    if parts.len() > 1 && parts[0] == "library" {
        parts.remove(0);
    }
    parts.join("/")
}

/// Admin UIs, exporters and proxies that carry a database's name but are none.
fn is_known_non_database(repo: &str) -> bool {
    let last = repo.rsplit('/').next().unwrap_or(repo);
    ["exporter", "express", "commander", "admin", "insight", "pgbouncer", "pgpool", "proxy", "ui"]
        .iter()
        .any(|w| last.split(['-', '_', '.']).any(|part| part == *w))
}

/// The database type an image name says ("postgresql", …), from its last path component,
/// so official images, vendors' (`bitnami/*`, `postgis/postgis`, `valkey/valkey`) and
/// private mirrors (`ghcr.io/acme/redis`) all count.
pub fn db_type_from_image(image: &str) -> Option<&'static str> {
    let repo = image_repository(image);
    if is_known_non_database(&repo) {
        return None;
    }
    let last = repo.rsplit('/').next().unwrap_or(&repo);
    Some(match last {
        "postgres"
        | "postgresql"
        | "postgis"
        | "timescaledb"
        | "timescaledb-ha"
        | "pgvector"
        | "postgresql-repmgr"
        | "timescaledb-postgis" => "postgresql",
        "mysql" | "mysql-server" | "percona" | "percona-server" | "percona-xtradb-cluster" => "mysql",
        "mariadb" | "mariadb-galera" => "mariadb",
        "mongo"
        | "mongodb"
        | "mongodb-community-server"
        | "mongodb-enterprise-server"
        | "percona-server-mongodb" => "mongodb",
        "redis" | "redis-stack" | "redis-stack-server" | "valkey" | "keydb" => "redis",
        _ => return None,
    })
}

/// The database type a well-known port says.
pub fn db_type_from_port(port: u32) -> Option<&'static str> {
    Some(match port {
        5432 => "postgresql",
        3306 => "mysql",
        27017 => "mongodb",
        6379 => "redis",
        _ => return None,
    })
}

/// Whether an environment variable's value is a secret (reported only as `set`).
pub fn is_secret_env(name: &str) -> bool {
    let n = name.to_ascii_uppercase();
    n.ends_with("_FILE")
        || ["PASSWORD", "PASSWD", "PASS", "SECRET", "TOKEN", "KEY", "CREDENTIAL", "AUTH", "CERT", "PRIVATE"]
            .iter()
            .any(|w| n.contains(w))
}

/// Whether a variable names a user or database (its value is reported).
fn is_hint_env(name: &str) -> bool {
    let n = name.to_ascii_uppercase();
    ["_USER", "_USERNAME", "_DB", "_DATABASE", "_DBNAME", "_ROOT_USER"].iter().any(|s| n.ends_with(s))
}

/// Which of a container's variables go into `env_hints`, and how: names and user/database
/// values as they are (shortened), secrets as `set`, everything else left out.
pub fn env_hints(env: &[String]) -> HashMap<String, String> {
    let mut hints = HashMap::new();
    for entry in env {
        let Some((name, value)) = entry.split_once('=') else { continue };
        if name.is_empty() || name.len() > 128 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            continue;
        }
        if is_secret_env(name) {
            if !value.is_empty() {
                hints.insert(name.to_string(), "set".to_string());
            }
        } else if is_hint_env(name) {
            hints.insert(name.to_string(), shorten(value));
        }
    }
    hints
}

fn shorten(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(MAX_VALUE).collect()
}

// ------------------------------------------------------------------ scan

#[derive(Deserialize)]
struct ListedContainer {
    #[serde(rename = "Id", default)]
    id: String,
}

#[derive(Deserialize, Default)]
struct Inspect {
    #[serde(rename = "Id", default)]
    id: String,
    #[serde(rename = "Name", default)]
    name: String,
    #[serde(rename = "Config", default)]
    config: InspectConfig,
    #[serde(rename = "State", default)]
    state: InspectState,
    #[serde(rename = "Mounts", default)]
    mounts: Option<Vec<Mount>>,
    #[serde(rename = "NetworkSettings", default)]
    network: NetworkSettings,
    #[serde(rename = "HostConfig", default)]
    host_config: HostConfig,
}

#[derive(Deserialize, Default)]
struct InspectConfig {
    #[serde(rename = "Image", default)]
    image: String,
    #[serde(rename = "Env", default)]
    env: Option<Vec<String>>,
    #[serde(rename = "ExposedPorts", default)]
    exposed_ports: Option<HashMap<String, serde_json::Value>>,
}

#[derive(Deserialize, Default)]
struct InspectState {
    #[serde(rename = "Running", default)]
    running: bool,
}

#[derive(Deserialize, Default)]
struct HostConfig {
    #[serde(rename = "NetworkMode", default)]
    network_mode: String,
}

#[derive(Deserialize)]
struct Mount {
    #[serde(rename = "Source", default)]
    source: String,
    #[serde(rename = "Destination", default)]
    destination: String,
}

#[derive(Deserialize, Default)]
struct NetworkSettings {
    #[serde(rename = "Networks", default)]
    networks: Option<HashMap<String, serde_json::Value>>,
    #[serde(rename = "Ports", default)]
    ports: Option<HashMap<String, Option<Vec<HostBinding>>>>,
}

#[derive(Deserialize)]
struct HostBinding {
    #[serde(rename = "HostPort", default)]
    host_port: String,
}

/// One pass over the running containers: the database containers, sorted by name then id.
/// A container that disappears between list and inspect is skipped.
pub fn scan(client: &Client) -> Result<Vec<pb::DiscoveredContainer>, DockerError> {
    let listed: Vec<ListedContainer> = client.get_json("/containers/json")?;
    let mut found = Vec::new();
    for c in listed {
        if c.id.is_empty() || c.id.len() > 128 {
            continue;
        }
        let endpoint = format!("/containers/{}/json", path_segment(&c.id));
        let inspect: Inspect = match client.get_json(&endpoint) {
            Ok(i) => i,
            Err(e) if e.is_not_found() => {
                log::debug!("container {} went away during the scan", c.id);
                continue;
            }
            Err(DockerError::Protocol { message, .. }) => {
                log::warn!("discovery: container {} skipped, its description is unreadable: {message}", c.id);
                continue;
            }
            Err(e) => return Err(e),
        };
        if !inspect.state.running {
            continue;
        }
        if let Some(d) = describe(inspect) {
            found.push(d);
        }
    }
    found.sort_by(|a, b| (&a.name, &a.container_id).cmp(&(&b.name, &b.container_id)));
    Ok(found)
}

fn describe(i: Inspect) -> Option<pb::DiscoveredContainer> {
    let ports = ports(&i);
    let sqlite = sqlite_files(i.mounts.as_deref().unwrap_or(&[]));
    let db_type = db_type_from_image(&i.config.image)
        .or_else(|| {
            let repo = image_repository(&i.config.image);
            if is_known_non_database(&repo) {
                return None;
            }
            ports.iter().find_map(|p| db_type_from_port(p.container_port))
        })
        .or((!sqlite.is_empty()).then_some("sqlite"))?;
    let mut env_hints = env_hints(i.config.env.as_deref().unwrap_or(&[]));
    if !sqlite.is_empty() {
        let (inside, host): (Vec<_>, Vec<_>) = sqlite.into_iter().unzip();
        env_hints.insert("sqlite_files".into(), inside.join(","));
        env_hints.insert("sqlite_host_files".into(), host.join(","));
    }
    let mut networks: BTreeSet<String> =
        i.network.networks.as_ref().map(|n| n.keys().map(|k| shorten(k)).collect()).unwrap_or_default();
    if networks.is_empty() && !i.host_config.network_mode.is_empty() {
        networks.insert(shorten(&i.host_config.network_mode));
    }
    Some(pb::DiscoveredContainer {
        container_id: i.id,
        name: shorten(i.name.trim_start_matches('/')),
        image: i.config.image.chars().filter(|c| !c.is_control()).take(1024).collect(),
        detected_db_type: db_type.to_string(),
        networks: networks.into_iter().collect(),
        env_hints,
        ports,
    })
}

/// Port bindings, or exposed ports with host port 0 when nothing is published (host
/// networking), sorted and without the IPv4/IPv6 duplicates.
fn ports(i: &Inspect) -> Vec<pb::PortBinding> {
    let mut set: BTreeSet<(u32, String, u32)> = BTreeSet::new();
    let parse = |key: &str| -> Option<(u32, String)> {
        let (port, proto) = key.split_once('/').unwrap_or((key, "tcp"));
        Some((port.parse().ok()?, shorten(proto)))
    };
    if let Some(bound) = &i.network.ports {
        for (key, bindings) in bound {
            let Some((port, proto)) = parse(key) else { continue };
            match bindings {
                Some(list) if !list.is_empty() => {
                    for b in list {
                        set.insert((port, proto.clone(), b.host_port.parse().unwrap_or(0)));
                    }
                }
                _ => {
                    set.insert((port, proto, 0));
                }
            }
        }
    }
    if let Some(exposed) = &i.config.exposed_ports {
        for key in exposed.keys() {
            if let Some((port, proto)) = parse(key)
                && !set.iter().any(|(p, pr, _)| *p == port && *pr == proto)
            {
                set.insert((port, proto, 0));
            }
        }
    }
    set.into_iter()
        .map(|(container_port, protocol, host_port)| pb::PortBinding { container_port, host_port, protocol })
        .collect()
}

/// SQLite files (`*.db`, `*.sqlite`, `*.sqlite3` that start with SQLite's magic) in the
/// container's mounts that this process can see: (path inside the container, path here).
fn sqlite_files(mounts: &[Mount]) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut sorted: Vec<&Mount> = mounts.iter().filter(|m| !m.source.is_empty()).collect();
    sorted.sort_by(|a, b| a.destination.cmp(&b.destination));
    for m in sorted {
        let mut seen = 0;
        walk(Path::new(&m.source), Path::new(&m.destination), 0, &mut seen, &mut found);
    }
    found
}

fn walk(host: &Path, inside: &Path, depth: usize, seen: &mut usize, out: &mut Vec<(String, String)>) {
    let Ok(entries) = std::fs::read_dir(host) else {
        if depth == 0 && looks_like_sqlite(host) {
            out.push((inside.display().to_string(), host.display().to_string()));
        }
        return;
    };
    let mut entries: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for path in entries {
        *seen += 1;
        if *seen > SQLITE_MAX_ENTRIES {
            return;
        }
        let Some(name) = path.file_name() else { continue };
        let ft = match std::fs::symlink_metadata(&path) {
            Ok(m) => m.file_type(),
            Err(_) => continue,
        };
        if ft.is_dir() && depth + 1 < SQLITE_DEPTH {
            walk(&path, &inside.join(name), depth + 1, seen, out);
        } else if ft.is_file() && looks_like_sqlite(&path) {
            out.push((inside.join(name).display().to_string(), path.display().to_string()));
        }
    }
}

fn looks_like_sqlite(path: &Path) -> bool {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    if !matches!(ext.as_str(), "db" | "sqlite" | "sqlite3") {
        return false;
    }
    let mut head = [0u8; 16];
    std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head)).is_ok()
        && &head == b"SQLite format 3\0"
}

// ------------------------------------------------------------------ watcher

/// How the watcher rescans.
#[derive(Debug, Clone)]
pub struct Options {
    /// Rescan at least this often, events or not.
    pub rescan_interval: Duration,
    /// Events arriving within this long of each other cause one rescan.
    pub settle: Duration,
    /// The longest silence on the event stream before it is reopened.
    pub events_idle: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            rescan_interval: Duration::from_secs(3600),
            settle: Duration::from_millis(300),
            events_idle: Duration::from_secs(300),
        }
    }
}

/// The running watcher; [`Watcher::stop`] ends both its threads.
pub struct Watcher {
    stop_tx: Option<Sender<()>>,
    stopping: Arc<AtomicBool>,
    events_client: Option<Client>,
    threads: Vec<JoinHandle<()>>,
    /// Keeps the report channel open (and silent) when discovery is disabled.
    _idle_tx: Option<Sender<pb::DiscoveryReport>>,
}

impl Watcher {
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.stop_tx.take();
        if let Some(c) = self.events_client.take() {
            c.shutdown();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// [`start`] with the client of `BACKUPY_DOCKER_SOCKET`. When the socket is missing or
/// refuses us, that is logged once as a warning that says what to do, and the agent goes
/// on without discovery: the watcher runs nothing and its channel stays silent.
pub fn start_from_env(options: Options) -> (Watcher, Receiver<pb::DiscoveryReport>) {
    if disabled_by_env() {
        return idle_watcher(&format!("Docker discovery is off ({DISABLE_VAR}=true)"));
    }
    match Client::from_env() {
        Ok(client) => start(client, options),
        Err(e) => {
            log::warn!("Docker discovery is off: {e}");
            idle_watcher_quiet()
        }
    }
}

fn idle_watcher(why: &str) -> (Watcher, Receiver<pb::DiscoveryReport>) {
    log::info!("{why}");
    idle_watcher_quiet()
}

fn idle_watcher_quiet() -> (Watcher, Receiver<pb::DiscoveryReport>) {
    let (report_tx, report_rx) = crossbeam_channel::bounded(1);
    let watcher = Watcher {
        stop_tx: None,
        stopping: Arc::new(AtomicBool::new(false)),
        events_client: None,
        threads: Vec::new(),
        _idle_tx: Some(report_tx),
    };
    (watcher, report_rx)
}

/// Starts the discovery watcher. Its channel carries a `DiscoveryReport` after the first
/// scan and then whenever the result changed. With `BACKUPY_DISABLE_DISCOVERY=true`
/// nothing runs and the channel stays silent.
pub fn start(client: Client, options: Options) -> (Watcher, Receiver<pb::DiscoveryReport>) {
    if disabled_by_env() {
        return idle_watcher(&format!("Docker discovery is off ({DISABLE_VAR}=true)"));
    }
    let (report_tx, report_rx) = crossbeam_channel::bounded(4);
    let stopping = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
    let (event_tx, event_rx) = crossbeam_channel::bounded::<()>(64);
    let events_client = client.detached();
    let mut threads = Vec::new();
    {
        let c = events_client.clone();
        let stopping = stopping.clone();
        let idle = options.events_idle;
        if let Ok(t) = std::thread::Builder::new()
            .name("docker-events".into())
            .spawn(move || events_loop(&c, &event_tx, &stopping, idle))
        {
            threads.push(t);
        }
    }
    match std::thread::Builder::new()
        .name("docker-discovery".into())
        .spawn(move || watch_loop(&client, &options, &report_tx, &stop_rx, &event_rx))
    {
        Ok(t) => threads.push(t),
        Err(e) => log::warn!("discovery: cannot start its thread: {e}"),
    }
    let watcher = Watcher {
        stop_tx: Some(stop_tx),
        stopping,
        events_client: Some(events_client),
        threads,
        _idle_tx: None,
    };
    (watcher, report_rx)
}

fn watch_loop(
    client: &Client,
    options: &Options,
    report_tx: &Sender<pb::DiscoveryReport>,
    stop_rx: &Receiver<()>,
    event_rx: &Receiver<()>,
) {
    let mut last: Option<Vec<pb::DiscoveredContainer>> = None;
    let mut failing = false;
    loop {
        match scan(client) {
            Ok(found) => {
                if failing {
                    log::info!("discovery: the Docker daemon answers again");
                    failing = false;
                }
                if last.as_ref() != Some(&found) {
                    log::info!("discovery: {} database container(s)", found.len());
                    let report = pb::DiscoveryReport { containers: found.clone() };
                    crossbeam_channel::select! {
                        send(report_tx, report) -> r => if r.is_err() { return },
                        recv(stop_rx) -> _ => return,
                    }
                    last = Some(found);
                }
            }
            Err(e) => {
                if !failing {
                    log::warn!("discovery: scan failed, will retry: {e}");
                }
                failing = true;
            }
        }
        // A failing daemon is retried sooner than hourly; events wake us meanwhile.
        let wait = if failing {
            options.rescan_interval.min(Duration::from_secs(30))
        } else {
            options.rescan_interval
        };
        crossbeam_channel::select! {
            recv(stop_rx) -> _ => return,
            recv(event_rx) -> r => {
                if r.is_err() {
                    // The events thread is gone; fall back to periodic scans only.
                    crossbeam_channel::select! {
                        recv(stop_rx) -> _ => return,
                        default(wait) => {}
                    }
                    continue;
                }
                // Compose starts several containers at once: one scan for the burst.
                let settle_until = Instant::now() + options.settle;
                while let Some(left) = settle_until.checked_duration_since(Instant::now()) {
                    crossbeam_channel::select! {
                        recv(stop_rx) -> _ => return,
                        recv(event_rx) -> _ => {},
                        default(left) => break,
                    }
                }
            }
            default(wait) => {}
        }
    }
}

#[derive(Deserialize)]
struct Event {
    #[serde(rename = "Type", default)]
    kind: String,
    #[serde(rename = "Action", default)]
    action: String,
    /// What API versions before 1.22 called the action.
    #[serde(default)]
    status: String,
}

/// The wait before reopening Docker's event stream after failures in a row.
const EVENTS_BACKOFF: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));

fn events_loop(client: &Client, event_tx: &Sender<()>, stopping: &AtomicBool, idle: Duration) {
    let filters = r#"{"type":["container"],"event":["create","start","die","destroy"]}"#;
    let query: String =
        url::form_urlencoded::Serializer::new(String::new()).append_pair("filters", filters).finish();
    let mut since: Option<u64> = None;
    // Failures in a row: a stream that ended cleanly starts the backoff over.
    let mut failures = 0u32;
    let mut warned = false;
    while !stopping.load(Ordering::SeqCst) {
        let endpoint = match since {
            // Reopened streams replay what happened while they were closed.
            Some(s) => format!("/events?{query}&since={s}"),
            None => format!("/events?{query}"),
        };
        let opened = crate::clock::now_secs();
        let result = client.get_stream(&endpoint, idle).map(|reader| {
            use std::io::{BufRead, Read};
            let mut lines = std::io::BufReader::new(reader);
            let mut line = String::new();
            loop {
                line.clear();
                // One event is a few hundred bytes; a line without end is cut off, not
                // buffered without bound.
                match (&mut lines).take(1 << 20).read_line(&mut line) {
                    Ok(0) => return Ok(()),
                    Ok(_) => {
                        let relevant = serde_json::from_str::<Event>(&line)
                            .map(|e| {
                                // The daemon filters too; this guards against one that ignores filters.
                                (e.kind.is_empty() || e.kind == "container")
                                    && [e.action.as_str(), e.status.as_str()]
                                        .iter()
                                        .any(|a| ["create", "start", "die", "destroy"].contains(a))
                            })
                            .unwrap_or(false);
                        if relevant && event_tx.send(()).is_err() {
                            return Ok(());
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Ok(()),
                    Err(e) => return Err(e.to_string()),
                }
            }
        });
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        since = Some(opened.saturating_sub(1));
        match result {
            Ok(Ok(())) => {
                failures = 0;
                warned = false;
            }
            Ok(Err(e)) | Err(DockerError::Protocol { message: e, .. }) => {
                if !warned {
                    log::warn!("discovery: Docker event stream broke, reopening: {e}");
                    warned = true;
                }
                sleep_unless_stopping(EVENTS_BACKOFF.delay(failures), stopping);
                failures = failures.saturating_add(1);
                // Whatever changed while the stream was down is caught by a rescan.
                let _ = event_tx.try_send(());
            }
            Err(e) => {
                if !warned {
                    log::warn!("discovery: cannot read Docker events, retrying: {e}");
                    warned = true;
                }
                sleep_unless_stopping(EVENTS_BACKOFF.delay(failures), stopping);
                failures = failures.saturating_add(1);
                let _ = event_tx.try_send(());
            }
        }
    }
}

fn sleep_unless_stopping(d: Duration, stopping: &AtomicBool) {
    let until = Instant::now() + d;
    while Instant::now() < until && !stopping.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The report as a JSON value with sorted keys, for `discover --json` and tests.
pub fn to_json(found: &[pb::DiscoveredContainer]) -> serde_json::Value {
    serde_json::Value::Array(
        found
            .iter()
            .map(|c| {
                let hints: BTreeMap<&String, &String> = c.env_hints.iter().collect();
                serde_json::json!({
                    "container_id": c.container_id,
                    "name": c.name,
                    "image": c.image,
                    "detected_db_type": c.detected_db_type,
                    "networks": c.networks,
                    "env_hints": hints,
                    "ports": c.ports.iter().map(|p| serde_json::json!({
                        "container_port": p.container_port,
                        "host_port": p.host_port,
                        "protocol": p.protocol,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_lose_registry_library_tag_and_digest() {
        assert_eq!(image_repository("postgres:16"), "postgres");
        assert_eq!(image_repository("docker.io/library/mariadb:11"), "mariadb");
        let digest = format!("ghcr.io/acme/redis:7@sha256:{}", "a".repeat(64));
        assert_eq!(image_repository(&digest), "acme/redis");
        assert_eq!(image_repository("localhost:5000/team/app:1"), "team/app");
        assert_eq!(image_repository("Bitnami/PostgreSQL"), "bitnami/postgresql");
    }

    #[test]
    fn database_images_are_recognised_by_name() {
        let cases = [
            ("postgres:16", Some("postgresql")),
            ("docker.io/library/mariadb:11", Some("mariadb")),
            ("bitnami/postgresql:15", Some("postgresql")),
            ("postgis/postgis:16-3.4", Some("postgresql")),
            ("timescale/timescaledb:latest-pg16", Some("postgresql")),
            ("percona:8", Some("mysql")),
            ("mysql:8.0", Some("mysql")),
            ("mongo:7", Some("mongodb")),
            ("valkey/valkey:8", Some("redis")),
            ("bitnami/redis", Some("redis")),
            ("mongo-express", None),
            ("redis-commander", None),
            ("rediscommander/redis-commander:latest", None),
            ("prom/mysqld-exporter", None),
            ("nginx:1", None),
            ("", None),
        ];
        for (image, want) in cases {
            assert_eq!(db_type_from_image(image), want, "{image}");
        }
    }

    #[test]
    fn hostile_image_names_never_panic() {
        for image in ["@@@", ":::", "/", "a/b/c/d/e:f@g", "\u{0}\u{202e}ρ/ß:🙂", &"x/".repeat(10_000)] {
            let _ = db_type_from_image(image);
        }
    }

    #[test]
    fn env_hints_carry_names_and_only_set_for_secrets() {
        let env: Vec<String> = [
            "POSTGRES_USER=app",
            "POSTGRES_DB=shop",
            "POSTGRES_PASSWORD=hunter22",
            "POSTGRES_PASSWORD_FILE=/run/secrets/pg",
            "MYSQL_ROOT_PASSWORD=",
            "API_TOKEN=abc123",
            "AWS_SECRET_ACCESS_KEY=xyz",
            "PATH=/usr/bin",
            "no-equals",
            "BAD NAME=1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let hints: BTreeMap<String, String> = env_hints(&env).into_iter().collect();
        let want: BTreeMap<String, String> = [
            ("API_TOKEN", "set"),
            ("AWS_SECRET_ACCESS_KEY", "set"),
            ("POSTGRES_DB", "shop"),
            ("POSTGRES_PASSWORD", "set"),
            ("POSTGRES_PASSWORD_FILE", "set"),
            ("POSTGRES_USER", "app"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(hints, want);
    }
}
