//! Packaging for VMs: `scripts/install.sh` into a temporary root (DESTDIR) produces the
//! expected tree, a second run changes nothing, `--uninstall` removes what it installed
//! and keeps configuration and state; the installed unit passes `systemd-analyze verify`.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::text;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn install(root: &Path, extra: &[&str]) -> String {
    let out = Command::new("bash")
        .arg(repo().join("scripts/install.sh"))
        .args(["--prefix", "/usr", "--binary", env!("CARGO_BIN_EXE_backupy-agent")])
        .args(extra)
        .env("DESTDIR", root)
        .output()
        .expect("bash runs");
    assert!(out.status.success(), "install.sh {extra:?}: {}{}", text(&out.stdout), text(&out.stderr));
    text(&out.stdout)
}

/// Every entry under `root`: kind, mode, and for files size, mtime and content.
fn snapshot(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let v = if m.file_type().is_symlink() {
                format!("link -> {}", std::fs::read_link(&p).unwrap().display())
            } else if m.is_dir() {
                walk(root, &p, out);
                format!("dir {:o}", m.mode() & 0o7777)
            } else {
                let bytes = std::fs::read(&p).unwrap();
                format!("file {:o} {} {} {:x}", m.mode() & 0o7777, bytes.len(), m.mtime_nsec(), hash(&bytes))
            };
            out.insert(rel, v);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn hash(b: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

#[test]
fn install_script_into_a_temporary_root_is_idempotent_and_uninstalls() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let first = install(&root, &[]);
    assert!(first.contains("installed /usr/lib/backupy/backupy-agent"), "{first}");

    let tree = snapshot(&root);
    let summary: Vec<(String, String)> = tree
        .iter()
        .filter(|(_, v)| !v.starts_with("dir"))
        .map(|(k, v)| (k.clone(), v.split(' ').take(2).collect::<Vec<_>>().join(" ")))
        .collect();
    let expected: Vec<(String, String)> = [
        ("etc/backupy/backupy.env", "file 600"),
        ("etc/backupy/backupy.toml", "file 640"),
        ("etc/systemd/system/backupy-agent.service", "file 644"),
        ("etc/sysusers.d/backupy.conf", "file 644"),
        ("etc/tmpfiles.d/backupy.conf", "file 644"),
        ("usr/bin/backupy-agent", "link ->"),
        ("usr/bin/backupy-decrypt", "file 755"),
        ("usr/lib/backupy/backupy-agent", "file 755"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(summary, expected);
    assert_eq!(tree["usr/bin/backupy-agent"], "link -> /usr/lib/backupy/backupy-agent");
    assert_eq!(
        std::fs::read(root.join("usr/lib/backupy/backupy-agent")).unwrap(),
        std::fs::read(env!("CARGO_BIN_EXE_backupy-agent")).unwrap()
    );
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/backupy-agent.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/usr/lib/backupy/backupy-agent run --config /etc/backupy/backupy.toml"),
        "{unit}"
    );
    assert!(unit.contains("ReadWritePaths=/usr/lib/backupy\n"), "{unit}");
    assert!(!unit.contains("/usr/local"), "the prefix was not applied: {unit}");
    for line in [
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=\n",
        "Restart=on-failure",
        "StateDirectory=backupy",
        "User=backupy",
        "EnvironmentFile=-/etc/backupy/backupy.env",
    ] {
        assert!(unit.contains(line), "the unit lacks {line:?}");
    }
    // The configuration skeleton is commented, and fails check-config until filled in.
    let toml = std::fs::read_to_string(root.join("etc/backupy/backupy.toml")).unwrap();
    assert!(toml.contains("state_dir = \"/var/lib/backupy\""), "{toml}");

    let second = install(&root, &[]);
    assert!(second.contains("nothing changed"), "{second}");
    assert_eq!(snapshot(&root), tree, "the second run changed the tree");

    // A user's configuration survives a reinstall and an uninstall.
    std::fs::write(root.join("etc/backupy/backupy.toml"), "# mine\n").unwrap();
    install(&root, &[]);
    assert_eq!(std::fs::read_to_string(root.join("etc/backupy/backupy.toml")).unwrap(), "# mine\n");
    let out = install(&root, &["--uninstall"]);
    assert!(out.contains("removed /usr/lib/backupy/backupy-agent"), "{out}");
    let left: Vec<String> =
        snapshot(&root).into_iter().filter(|(_, v)| !v.starts_with("dir")).map(|(k, _)| k).collect();
    assert_eq!(left, ["etc/backupy/backupy.env", "etc/backupy/backupy.toml"]);
    let again = install(&root, &["--uninstall"]);
    assert!(again.contains("nothing to remove"), "{again}");
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    install(&root, &[]);
    // verify resolves the unit's dependencies (sysinit.target, …) inside the root.
    let units = Path::new("/usr/lib/systemd/system");
    assert!(units.is_dir(), "systemd's units are missing: apt-get install systemd");
    std::fs::create_dir_all(root.join("usr/lib/systemd")).unwrap();
    let cp = Command::new("cp").arg("-a").arg(units).arg(root.join("usr/lib/systemd/")).status().unwrap();
    assert!(cp.success());
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .arg("/etc/systemd/system/backupy-agent.service")
        .output()
        .unwrap_or_else(|e| panic!("systemd-analyze is needed ({e}): apt-get install systemd"));
    let err = text(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify failed: {err}");
    assert!(err.trim().is_empty(), "systemd-analyze verify warns: {err}");
}

#[test]
fn compose_example_is_valid_for_docker_compose() {
    let out = Command::new("docker-compose")
        .args(["-f", "docker-compose.yml", "config"])
        .current_dir(repo().join("docs/compose"))
        .output()
        .unwrap_or_else(|e| panic!("docker-compose is needed ({e}): apt-get install docker-compose"));
    assert!(out.status.success(), "docker-compose config: {}", text(&out.stderr));
    let resolved = text(&out.stdout);
    assert!(resolved.contains("container_name: app-postgres"), "{resolved}");
    assert!(resolved.contains("/var/run/docker.sock"), "{resolved}");
    assert!(resolved.contains("pg_password"), "{resolved}");
    let toml = std::fs::read_to_string(repo().join("docs/compose/backupy.toml")).unwrap();
    assert!(toml.contains("strategy = \"docker_exec\"") && toml.contains("container = \"app-postgres\""));
}

/// The release budget of the issue: one static binary with every driver, ≤ 20 MB.
const SIZE_BUDGET: u64 = 20_000_000;

#[test]
fn static_binary_fits_the_size_budget() {
    let bin = std::env::var_os("BACKUPY_TEST_STATIC_BIN").map(PathBuf::from).unwrap_or_else(|| {
        panic!(
            "BACKUPY_TEST_STATIC_BIN is not set: build the static binary with scripts/release.sh \
             (scripts/test.sh does) and point it at dist/release/x86_64-unknown-linux-musl/backupy-agent"
        )
    });
    let size = std::fs::metadata(&bin).unwrap_or_else(|e| panic!("{}: {e}", bin.display())).len();
    eprintln!("static backupy-agent: {size} bytes, budget {SIZE_BUDGET}");
    assert!(size <= SIZE_BUDGET, "{} is {size} bytes, over the {SIZE_BUDGET}-byte budget", bin.display());
    // Static: no program interpreter, no shared library (readelf from binutils).
    let headers = Command::new("readelf").arg("-lW").arg(&bin).output().expect("readelf (binutils) runs");
    assert!(headers.status.success());
    assert!(!text(&headers.stdout).contains("INTERP"), "{} asks for a dynamic loader", bin.display());
    let out = Command::new(&bin).args(["version", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["target"], "x86_64-unknown-linux-musl");
    let engines = v["engines"].as_object().expect("engines listed");
    for engine in ["postgresql", "mysql", "mariadb", "mongodb", "redis", "sqlite"] {
        assert!(engines.contains_key(engine), "driver {engine} missing from the static build: {v}");
    }
}
