//! Issue 19 (restore drills), first part, through the real binary: the manifest's
//! `content` block of a SQLite backup, `backupy-agent drill` passing with exact counts,
//! catching a row deleted in the scratch copy, refusing a tampered object before any
//! restore, and old manifests without `content` still listed, verified and restored.

use std::path::{Path, PathBuf};

use crate::common::*;
use crate::restore_cli::{backup, restore, setup};

/// A SQLite target with three tables of known sizes (one with a name that needs
/// quoting, one empty), backed up once. Returns the temp dir and the config.
fn backed_up() -> (tempfile::TempDir, PathBuf) {
    let (dir, config) = setup("type = \"sqlite\"\npath = \"app.db\"");
    rusqlite::Connection::open(dir.path().join("app.db"))
        .unwrap()
        .execute_batch(
            "CREATE TABLE items(id INTEGER PRIMARY KEY, v TEXT);
             INSERT INTO items(v) VALUES ('a'), ('b'), ('c');
             CREATE TABLE \"odd \"\"name\"(x);
             INSERT INTO \"odd \"\"name\" VALUES (1), (2);
             CREATE TABLE empty(x);",
        )
        .unwrap();
    backup(&config, &[]);
    (dir, config)
}

fn drill(config: &Path, env: &[(&str, &str)], extra: &[&str]) -> std::process::Output {
    let mut c = agent();
    for (k, v) in env {
        c.env(k, v);
    }
    c.args(["drill", "--job", "nightly", "--config"]).arg(config).args(extra);
    run(c)
}

/// The one stored object (not a manifest or a report).
fn object(dir: &Path) -> PathBuf {
    let backups = dir.join("backups");
    let objects: Vec<String> = files_under(&backups).into_iter().filter(|f| !f.ends_with(".json")).collect();
    assert_eq!(objects.len(), 1, "{objects:?}");
    backups.join(&objects[0])
}

fn json_file(p: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

fn report_path(object: &Path) -> PathBuf {
    PathBuf::from(format!("{}.drill.json", object.display()))
}

/// What is left in the state directory's tmp (scratch copies, spools).
fn tmp_leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir.join("state/tmp"))
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

#[test]
fn sqlite_manifest_records_exact_row_counts_per_table() {
    let (dir, _config) = backed_up();
    let m = json_file(&PathBuf::from(format!("{}.json", object(dir.path()).display())));
    let content = &m["content"];
    assert_eq!(content["exactness"], "exact", "{m:#}");
    assert_eq!(content["unit"], "rows");
    assert!(content["engine_version"].as_str().unwrap().starts_with("SQLite 3."), "{m:#}");
    assert_eq!(content["tables"], serde_json::json!({"items": 3, "odd \"name": 2, "empty": 0}), "{m:#}");
}

#[test]
fn drill_passes_with_exact_counts_and_writes_its_report_beside_the_backup() {
    let (dir, config) = backed_up();
    let out = drill(&config, &[], &["--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["status"], "passed", "{printed:#}");
    assert_eq!(printed["object_verified"], true);
    let counts: Vec<(String, u64, u64, bool)> = printed["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_string(),
                t["expected"].as_u64().unwrap(),
                t["found"].as_u64().unwrap(),
                t["ok"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        counts,
        [
            ("empty".to_string(), 0, 0, true),
            ("items".to_string(), 3, 3, true),
            ("odd \"name".to_string(), 2, 2, true)
        ]
    );
    let obj = object(dir.path());
    let manifest = json_file(&PathBuf::from(format!("{}.json", obj.display())));
    assert_eq!(printed["object_sha256"], manifest["sha256"]);
    assert_eq!(printed["backup_id"], manifest["id"]);
    assert!(printed["restore_seconds"].as_f64().unwrap() > 0.0, "{printed:#}");
    for field in ["agent_version", "host", "started_at", "finished_at"] {
        assert!(!printed[field].as_str().unwrap().is_empty(), "{field}: {printed:#}");
    }
    // The evidence in storage is the document that was printed.
    assert_eq!(json_file(&report_path(&obj)), printed);
    // The scratch copy is gone.
    assert_eq!(tmp_leftovers(dir.path()), Vec::<String>::new());
    // A report beside the backup is not taken for a manifest.
    let mut c = agent();
    c.args(["list", "--json", "--config"]).arg(&config);
    let out = run(c);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!text(&out.stderr).contains("drill.json"), "{}", text(&out.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed:#}");
    // The same by backup id, in the text form.
    let id = manifest["id"].as_str().unwrap();
    let out = drill(&config, &[], &["--backup", id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with(&format!("{id}\tpassed\t")), "{}", text(&out.stdout));
}

#[test]
fn a_row_deleted_in_the_scratch_copy_fails_the_drill_and_names_the_table() {
    let (dir, config) = backed_up();
    // The debug-build-only hook runs this on the scratch copy after the restore.
    let out = drill(&config, &[("BACKUPY_TEST_DRILL_SCRATCH_SQL", "DELETE FROM items WHERE v = 'b'")], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("table \"items\": expected 3, found 2"), "{err}");
    assert!(!err.contains("table \"empty\""), "{err}");
    let report = json_file(&report_path(&object(dir.path())));
    assert_eq!(report["status"], "failed", "{report:#}");
    assert!(report["error"].as_str().unwrap().contains("\"items\""), "{report:#}");
    let items = report["tables"].as_array().unwrap().iter().find(|t| t["name"] == "items").unwrap();
    assert_eq!(items, &serde_json::json!({"name": "items", "expected": 3, "found": 2, "ok": false}));
    // The backup itself is untouched: without the hook the drill passes.
    let out = drill(&config, &[], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(json_file(&report_path(&object(dir.path())))["status"], "passed");
}

#[test]
fn a_tampered_object_fails_the_drill_before_anything_is_restored() {
    let (dir, config) = backed_up();
    let obj = object(dir.path());
    let mut bytes = std::fs::read(&obj).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&obj, &bytes).unwrap();
    // Were anything restored, this hook would fail the drill with its own message.
    let hook = [("BACKUPY_TEST_DRILL_SCRATCH_SQL", "SELECT no_such_function()")];
    let out = drill(&config, &hook, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("tampered or corrupt"), "{err}");
    assert!(!err.contains("no_such_function"), "{err}");
    let report = json_file(&report_path(&obj));
    assert_eq!(report["status"], "failed");
    assert_eq!(report["object_verified"], false);
    assert_eq!(report["restore_seconds"], 0.0);
    assert_eq!(report["tables"], serde_json::json!([]));
    assert_eq!(tmp_leftovers(dir.path()), Vec::<String>::new());
}

#[test]
fn old_manifests_without_content_still_list_verify_and_restore_and_a_drill_says_why_it_cannot() {
    let (dir, config) = backed_up();
    // A manifest as agents before issue 19 wrote it: no `content` key.
    let manifest = PathBuf::from(format!("{}.json", object(dir.path()).display()));
    let mut m = json_file(&manifest);
    assert!(m.as_object_mut().unwrap().remove("content").is_some());
    std::fs::write(&manifest, serde_json::to_vec_pretty(&m).unwrap()).unwrap();

    let mut c = agent();
    c.args(["list", "--json", "--config"]).arg(&config);
    let out = run(c);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed[0]["id"], m["id"], "{listed:#}");
    assert!(listed[0].get("content").is_none(), "{listed:#}");

    let mut c = agent();
    c.args(["verify", "--backup", "latest", "--config"]).arg(&config);
    let out = run(c);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let to = dir.path().join("restored.db");
    let out = restore(&config, to.to_str().unwrap(), &[], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(sqlite3(&to, "SELECT count(*) FROM items"), "3");

    let out = drill(&config, &[], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no `content` block"), "{}", text(&out.stderr));
    assert!(!report_path(&object(dir.path())).exists());
}

#[test]
fn drill_of_an_unknown_job_names_the_jobs() {
    let (_dir, config) = setup("type = \"sqlite\"\npath = \"app.db\"");
    let mut c = agent();
    c.args(["drill", "--job", "nope", "--config"]).arg(&config);
    let out = run(c);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no job \"nope\" (jobs: nightly)"), "{}", text(&out.stderr));
}

/// PostgreSQL (scripts/services.sh `services_start_postgres`): the manifest's counts are
/// those of the snapshot pg_dump dumped, although another connection keeps inserting
/// during the backup. Checked against a `pg_restore` of the stored object, counted by
/// this test's own queries.
#[test]
fn postgresql_manifest_counts_are_those_of_the_dumped_snapshot_under_concurrent_writes() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let pg = crate::common::db::pg();
    let (src, dst) = (PgDb(crate::common::db::unique("dsrc")), PgDb(crate::common::db::unique("ddst")));
    let (src, dst) = (&src.0, &dst.0);
    pg_conn("postgres").batch_execute(&format!("CREATE DATABASE {src}")).unwrap();
    pg_conn("postgres").batch_execute(&format!("CREATE DATABASE {dst}")).unwrap();
    pg_conn(src)
        .batch_execute(
            "CREATE TABLE items(id serial PRIMARY KEY, name text);
             INSERT INTO items(name) SELECT 'item ' || g FROM generate_series(1, 5000) g;
             CREATE SCHEMA \"Sales\";
             CREATE TABLE \"Sales\".\"odd \"\"name\"(x int);
             INSERT INTO \"Sales\".\"odd \"\"name\" VALUES (1), (2), (3);
             CREATE TABLE events(at int) PARTITION BY RANGE (at);
             CREATE TABLE events_a PARTITION OF events FOR VALUES FROM (0) TO (100);
             CREATE TABLE events_b PARTITION OF events FOR VALUES FROM (100) TO (200);
             INSERT INTO events SELECT g FROM generate_series(0, 9) g;
             INSERT INTO events SELECT 100 + g FROM generate_series(0, 19) g;
             CREATE VIEW v AS SELECT * FROM items;
             CREATE TABLE busy(id bigserial PRIMARY KEY, at timestamptz DEFAULT now());",
        )
        .unwrap();
    // A writer that commits one row at a time for as long as the backup runs.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, mut c) = (stop.clone(), pg_conn(src));
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                c.batch_execute("INSERT INTO busy DEFAULT VALUES").unwrap();
                n += 1;
            }
            n
        })
    };
    let (dir, config) = setup(&format!(
        "type = \"postgresql\"\nurl = \"postgres://{}@{}:{}/{src}?sslmode=disable\"\npassword = \"env:TEST_PG_PW\"",
        pg.user, pg.host, pg.port
    ));
    let env = [("TEST_PG_PW", pg.password.as_str()), ("BACKUPY_RESTORE_PASSWORD", "env:TEST_PG_PW")];
    // Some rows before the backup starts, more while it runs and after.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while pg_conn(src).query_one("SELECT count(*) FROM busy", &[]).unwrap().get::<_, i64>(0) < 50 {
        assert!(std::time::Instant::now() < deadline, "the writer inserts nothing");
    }
    backup(&config, &env);
    stop.store(true, Ordering::SeqCst);
    let written = writer.join().unwrap();

    let manifest = json_file(&PathBuf::from(format!("{}.json", object(dir.path()).display())));
    let content = &manifest["content"];
    assert_eq!(content["exactness"], "exact", "{manifest:#}");
    assert!(content["engine_version"].as_str().unwrap().starts_with("PostgreSQL "), "{manifest:#}");
    let tables = content["tables"].as_object().unwrap();
    assert_eq!(
        tables.keys().cloned().collect::<Vec<_>>(),
        ["Sales.odd \"name", "public.busy", "public.events_a", "public.events_b", "public.items"],
        "{manifest:#}"
    );
    assert_eq!(tables["public.items"], 5000);
    assert_eq!(tables["Sales.odd \"name"], 3);
    assert_eq!(
        (tables["public.events_a"].as_u64(), tables["public.events_b"].as_u64()),
        (Some(10), Some(20))
    );
    let busy = tables["public.busy"].as_u64().unwrap();
    assert!(busy >= 50 && busy < written, "busy: {busy} counted, {written} written in all");

    // What the stored dump really holds, restored and counted independently.
    let out = restore(&config, &format!("postgres://{}@{}:{}/{dst}", pg.user, pg.host, pg.port), &env, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut restored = pg_conn(dst);
    for (q, key) in [
        ("SELECT count(*) FROM busy", "public.busy"),
        ("SELECT count(*) FROM items", "public.items"),
        ("SELECT count(*) FROM \"Sales\".\"odd \"\"name\"", "Sales.odd \"name"),
    ] {
        let n: i64 = restored.query_one(q, &[]).unwrap().get(0);
        assert_eq!(Some(n as u64), tables[key].as_u64(), "{key}");
    }
}

fn pg_conn(db: &str) -> postgres::Client {
    let pg = crate::common::db::pg();
    postgres::Client::connect(
        &format!("host={} port={} user={} password={} dbname={db}", pg.host, pg.port, pg.user, pg.password),
        postgres::NoTls,
    )
    .unwrap_or_else(|e| panic!("connecting to the test server's database {db}: {e}"))
}

fn pg_database_exists(name: &str) -> bool {
    pg_conn("postgres")
        .query_one("SELECT count(*) FROM pg_database WHERE datname = $1", &[&name])
        .unwrap()
        .get::<_, i64>(0)
        > 0
}

/// Drops a test's source database when the test ends, passed or not.
struct PgDb(String);
impl Drop for PgDb {
    fn drop(&mut self) {
        let _ =
            pg_conn("postgres").batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.0));
    }
}

/// A fresh source database filled by `sql`, dropped when the returned guard goes, and
/// a job that backs it up (password by reference in `TEST_PG_PW`).
fn pg_job(prefix: &str, sql: &str) -> (PgDb, tempfile::TempDir, PathBuf) {
    let pg = crate::common::db::pg();
    let src = PgDb(crate::common::db::unique(prefix));
    pg_conn("postgres").batch_execute(&format!("CREATE DATABASE {}", src.0)).unwrap();
    pg_conn(&src.0).batch_execute(sql).unwrap();
    let (dir, config) = setup(&format!(
        "type = \"postgresql\"\nurl = \"postgres://{}@{}:{}/{}?sslmode=disable\"\npassword = \"env:TEST_PG_PW\"",
        pg.user, pg.host, pg.port, src.0
    ));
    (src, dir, config)
}

#[test]
fn postgresql_drill_passes_catches_a_deleted_row_refuses_a_tampered_object_and_always_drops_its_scratch() {
    let pg = crate::common::db::pg();
    let (_src, dir, config) = pg_job(
        "dpg",
        "CREATE TABLE items(id serial PRIMARY KEY, name text);
         INSERT INTO items(name) SELECT 'item ' || g FROM generate_series(1, 500) g;
         CREATE SCHEMA s; CREATE TABLE s.empty(x int);",
    );
    let env = [("TEST_PG_PW", pg.password.as_str())];
    backup(&config, &env);
    let obj = object(dir.path());

    // Passes with exact counts; the scratch database existed and is gone.
    let out = drill(&config, &env, &["--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["status"], "passed", "{report:#}");
    assert_eq!(
        report["tables"],
        serde_json::json!([
            {"name": "public.items", "expected": 500, "found": 500, "ok": true},
            {"name": "s.empty", "expected": 0, "found": 0, "ok": true}
        ])
    );
    let scratch = report["scratch"].as_str().unwrap().to_string();
    assert!(scratch.starts_with("backupy_drill_"), "{report:#}");
    assert!(
        text(&out.stderr).contains(&format!("created scratch database {scratch}")),
        "{}",
        text(&out.stderr)
    );
    assert!(!pg_database_exists(&scratch), "scratch database {scratch} was left behind");
    assert_eq!(json_file(&report_path(&obj)), report);
    assert!(!text(&out.stderr).contains(&pg.password));

    // A row deleted in the scratch copy (debug-build hook) is caught and named.
    let mut hooked = env.to_vec();
    hooked.push(("BACKUPY_TEST_DRILL_SCRATCH_SQL", "DELETE FROM items WHERE id = 7"));
    let out = drill(&config, &hooked, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("table \"public.items\": expected 500, found 499"),
        "{}",
        text(&out.stderr)
    );
    let report = json_file(&report_path(&obj));
    assert_eq!(report["status"], "failed");
    let scratch = report["scratch"].as_str().unwrap();
    assert!(
        !scratch.is_empty() && !pg_database_exists(scratch),
        "scratch database {scratch} was left behind"
    );

    // A tampered object fails before any scratch database is created.
    let mut bytes = std::fs::read(&obj).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&obj, &bytes).unwrap();
    let out = drill(&config, &env, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("tampered or corrupt"), "{}", text(&out.stderr));
    assert!(!text(&out.stderr).contains("scratch database"), "{}", text(&out.stderr));
    let report = json_file(&report_path(&obj));
    assert_eq!((report["scratch"].as_str(), report["restore_seconds"].as_f64()), (Some(""), Some(0.0)));
}

/// SIGTERM while pg_restore fills the scratch database: exit 143, pg_restore killed, the
/// scratch database dropped, no report written.
#[test]
fn postgresql_drill_stopped_by_sigterm_drops_its_scratch_database() {
    use std::io::BufRead;
    let pg = crate::common::db::pg();
    // Large enough that its restore takes well over the time a signal needs to arrive.
    let (_src, dir, config) = pg_job(
        "dpgc",
        "CREATE TABLE big(id serial PRIMARY KEY, v text);
         INSERT INTO big(v) SELECT md5(g::text) || md5((g * 7)::text) FROM generate_series(1, 600000) g;",
    );
    let env = [("TEST_PG_PW", pg.password.as_str())];
    backup(&config, &env);

    let mut c = agent();
    c.env("TEST_PG_PW", &pg.password);
    c.args(["drill", "--job", "nightly", "--config"]).arg(&config);
    c.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let scratch = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .expect("the drill never said it created its scratch database");
        if let Some(rest) = line.split("created scratch database ").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    assert!(pg_database_exists(&scratch));
    // SAFETY: kill(2) on the child this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let err = reader.join().unwrap();
    assert_eq!(status.code(), Some(143), "{err}");
    assert!(err.contains(&format!("dropped scratch database {scratch}")), "{err}");
    assert!(!pg_database_exists(&scratch), "scratch database {scratch} was left behind:\n{err}");
    assert!(!report_path(&object(dir.path())).exists());
    assert_eq!(tmp_leftovers(dir.path()), Vec::<String>::new());
}

#[test]
fn prune_deletes_a_drill_report_with_its_backup() {
    let (dir, config) = backed_up();
    let out = drill(&config, &[], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let first = object(dir.path());
    assert!(report_path(&first).exists());
    // The job's section is the last one of the config: keep only the newest backup.
    let mut toml = std::fs::read_to_string(&config).unwrap();
    toml.push_str("keep_last = 1\n");
    std::fs::write(&config, toml).unwrap();
    // Object keys and manifests carry whole seconds: the second backup must start in a
    // later second than the first, or "the newest" is a tie.
    let first_second = json_file(&PathBuf::from(format!("{}.json", first.display())))["started_at"]
        .as_str()
        .unwrap()
        .to_string();
    let t0 = std::time::Instant::now();
    while chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string() <= first_second {
        assert!(t0.elapsed() < std::time::Duration::from_secs(5), "the clock did not pass {first_second}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    backup(&config, &[]);
    let mut c = agent();
    c.args(["prune", "--config"]).arg(&config);
    let out = run(c);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!first.exists(), "the older backup was pruned");
    assert!(!report_path(&first).exists(), "its drill report went with it");
    assert_eq!(files_under(&dir.path().join("backups")).len(), 2, "the newest object and its manifest");
}
