//! Issue 16.4 and 16.9 through the real binary: a restore into a server checks the whole
//! object before it writes anything (and with `--no-preverify` kills the tool and rolls
//! back), and `restore`/`verify` refuse a planted plaintext object for a job the config
//! encrypts.

use std::path::{Path, PathBuf};

use crate::common::db;
use crate::common::*;
use crate::restore_cli::{backup, restore, setup};

/// The one stored object (not a manifest) under `backups`.
fn stored_object(backups: &Path) -> PathBuf {
    let objects: Vec<String> = files_under(backups).into_iter().filter(|f| !f.ends_with(".json")).collect();
    assert_eq!(objects.len(), 1, "{objects:?}");
    backups.join(&objects[0])
}

/// Flips one byte `from_end` bytes before the end of `path`.
fn flip_byte_near_end(path: &Path, from_end: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    let i = bytes.len() - from_end;
    bytes[i] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

struct PgDb {
    pg: db::Pg,
}

impl PgDb {
    fn conn(&self, db: &str) -> postgres::Client {
        let pg = &self.pg;
        postgres::Client::connect(
            &format!(
                "host={} port={} user={} password={} dbname={db}",
                pg.host, pg.port, pg.user, pg.password
            ),
            postgres::NoTls,
        )
        .unwrap()
    }
}

/// What `dst` holds: its table `a` (rows and a digest) and whether table `z` exists.
fn pg_state(p: &PgDb, dst: &str) -> String {
    let mut c = p.conn(dst);
    let a: String = c
        .query_one(
            "SELECT count(*)::text || ':' || coalesce(md5(string_agg(v, ',' ORDER BY id)), '') FROM a",
            &[],
        )
        .unwrap()
        .get(0);
    let z: bool = c.query_one("SELECT to_regclass('public.z') IS NOT NULL", &[]).unwrap().get(0);
    format!("a={a} z={z}")
}

/// A PostgreSQL backup of several MiB (several v2 chunks) with one byte flipped near the
/// end, restored with --force into a database with rows of its own: those rows stay, and
/// the error names the chunk authentication, not pg_restore's "end of file". First with
/// the default pre-verification (nothing reaches the server), then with --no-preverify
/// (pg_restore is killed mid-stream and its single transaction rolls back).
#[test]
fn a_tampered_object_never_replaces_rows_in_postgresql() {
    let p = PgDb { pg: db::pg() };
    let src = db::unique("tsrc");
    let dst = db::unique("tdst");
    let mut admin = p.conn("postgres");
    admin.batch_execute(&format!("CREATE DATABASE {src}")).unwrap();
    admin.batch_execute(&format!("CREATE DATABASE {dst}")).unwrap();
    // About 12 MB of hex text: several MiB even after zstd, so the flipped byte sits in
    // a chunk long after pg_restore has started on the first ones.
    p.conn(&src)
        .batch_execute(
            "CREATE TABLE a(id int PRIMARY KEY, v text NOT NULL);
             INSERT INTO a SELECT g, md5(g::text) || md5((g * 7)::text) || md5(random()::text)
               FROM generate_series(1, 120000) g;
             CREATE TABLE z(id int PRIMARY KEY);
             INSERT INTO z SELECT generate_series(1, 10);",
        )
        .unwrap();
    p.conn(&dst)
        .batch_execute(
            "CREATE TABLE a(id int PRIMARY KEY, v text NOT NULL); INSERT INTO a VALUES (1, 'existing');",
        )
        .unwrap();
    let before = pg_state(&p, &dst);
    assert!(before.starts_with("a=1:") && before.ends_with(" z=false"), "{before}");

    let pg = &p.pg;
    let (dir, config) = setup(&format!(
        "type = \"postgresql\"\nurl = \"postgres://{}@{}:{}/{src}\"\npassword = \"env:TEST_PG_PW\"",
        pg.user, pg.host, pg.port
    ));
    let env = [("TEST_PG_PW", pg.password.as_str()), ("BACKUPY_RESTORE_PASSWORD", "env:TEST_PG_PW")];
    backup(&config, &env);
    let object = stored_object(&dir.path().join("backups"));
    let size = std::fs::metadata(&object).unwrap().len();
    assert!(size > 3 << 20, "the object has {size} bytes: too few chunks for the test to mean anything");
    // Inside the final chunk's authentication tag.
    flip_byte_near_end(&object, 5);
    let to = format!("postgres://{}@{}:{}/{dst}", pg.user, pg.host, pg.port);

    let out = restore(&config, &to, &env, &["--force"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("authentication failed"), "the error names the cause: {err}");
    assert!(err.contains("nothing was written"), "{err}");
    assert!(!err.contains("end of file"), "{err}");
    assert_eq!(pg_state(&p, &dst), before, "the existing rows are untouched");
    assert!(
        files_under(&dir.path().join("state/tmp")).is_empty(),
        "the spool is removed: {:?}",
        files_under(&dir.path().join("state/tmp"))
    );

    let out = restore(&config, &to, &env, &["--force", "--no-preverify"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--no-preverify"), "the one-pass restore says what it risks: {err}");
    assert!(err.contains("authentication failed") && err.contains("killed"), "{err}");
    assert!(!err.contains("end of file"), "{err}");
    assert_eq!(pg_state(&p, &dst), before, "pg_restore's single transaction rolled back");

    // The same object, intact again, restores (pre-verified) over the existing rows.
    flip_byte_near_end(&object, 5);
    let out = restore(&config, &to, &env, &["--force"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("verified, then applied"), "{}", text(&out.stdout));
    let q = "SELECT count(*)::text || ':' || md5(string_agg(v, ',' ORDER BY id)) FROM a";
    let a: String = p.conn(&src).query_one(q, &[]).unwrap().get(0);
    let b: String = p.conn(&dst).query_one(q, &[]).unwrap().get(0);
    assert_eq!(a, b);
}

/// Issue 16.9: a store writer plants a plaintext object (and its manifest, saying
/// `"encryption": "none"`) for a job this config encrypts. `verify` and `restore` refuse
/// it and name --allow-plaintext; with the flag they take it.
#[test]
fn a_planted_plaintext_backup_of_an_encrypted_job_is_refused() {
    let (dir, config) = setup("type = \"sqlite\"\npath = \"app.db\"");
    rusqlite::Connection::open(dir.path().join("app.db"))
        .unwrap()
        .execute_batch("CREATE TABLE t(x TEXT); INSERT INTO t VALUES ('genuine');")
        .unwrap();
    backup(&config, &[]);
    let to = dir.path().join("restored.db");
    // The attacker's plaintext dump, written by a config of their own into the same
    // storage under the same job id.
    let evil = dir.path().join("evil");
    std::fs::create_dir_all(&evil).unwrap();
    rusqlite::Connection::open(evil.join("app.db"))
        .unwrap()
        .execute_batch("CREATE TABLE t(x TEXT); INSERT INTO t VALUES ('planted');")
        .unwrap();
    let evil_config = evil.join("backupy.toml");
    std::fs::write(
        &evil_config,
        format!(
            "state_dir = \"./state\"\n[storage]\ndir = \"{}\"\n[[targets]]\nid = \"db\"\ntype = \"sqlite\"\npath = \"app.db\"\n\
             [[jobs]]\nid = \"nightly\"\ntarget = \"db\"\nencryption = \"none\"\n",
            dir.path().join("backups").display()
        ),
    )
    .unwrap();
    backup(&evil_config, &[]);
    let manifests: Vec<serde_json::Value> = files_under(&dir.path().join("backups"))
        .into_iter()
        .filter(|f| f.ends_with(".json"))
        .map(|f| serde_json::from_slice(&std::fs::read(dir.path().join("backups").join(f)).unwrap()).unwrap())
        .collect();
    let planted = manifests.iter().find(|m| m["encryption"] == "none").expect("the planted manifest");
    let id = planted["id"].as_str().unwrap().to_string();
    let restore = |extra: &[&str]| {
        let mut c = agent();
        c.args(["restore", "--backup", &id, "--to", to.to_str().unwrap(), "--config"])
            .arg(&config)
            .args(extra);
        run(c)
    };
    let verify = |extra: &[&str]| {
        let mut c = agent();
        c.args(["verify", "--backup", &id, "--config"]).arg(&config).args(extra);
        run(c)
    };

    let out = verify(&[]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "verify must refuse it: {err}");
    assert!(err.contains("not encrypted") && err.contains("--allow-plaintext"), "{err}");

    let out = restore(&[]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "restore must refuse it: {err}");
    assert!(err.contains("not encrypted") && err.contains("--allow-plaintext"), "{err}");
    assert!(!to.exists(), "nothing was restored");

    let out = verify(&["--allow-plaintext"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = restore(&["--allow-plaintext"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(sqlite3(&to, "SELECT x FROM t"), "planted");
}

/// The MongoDB case of issue 16.4: a tampered object restored with --force into a
/// database with documents of its own leaves them untouched (nothing reaches the server
/// before the whole object is checked), and the error names the authentication failure.
/// With --no-preverify the tool is killed and the error names the same cause (what
/// mongorestore applied before stays, as the user guide says).
#[test]
fn a_tampered_object_never_reaches_mongodb() {
    use mongodb::bson::{Document, doc};
    let host = db::need("BACKUPY_TEST_SECANTUS_HOST", "mongo");
    let port = db::need("BACKUPY_TEST_SECANTUS_PORT", "mongo");
    let user = db::need("BACKUPY_TEST_SECANTUS_USER", "mongo");
    let pw = db::need("BACKUPY_TEST_SECANTUS_PASSWORD", "mongo");
    let client = mongodb::sync::Client::with_uri_str(db::need("BACKUPY_TEST_SECANTUS_URL", "mongo")).unwrap();
    let src = db::unique("tmsrc");
    let dst = db::unique("tmdst");
    // Hex text from a simple generator: several MiB even after zstd.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let docs: Vec<Document> = (0..60_000)
        .map(|i| {
            let v: String = (0..6)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    format!("{x:016x}")
                })
                .collect();
            doc! { "_id": i, "v": v }
        })
        .collect();
    client.database(&src).collection::<Document>("people").insert_many(docs).run().unwrap();
    let existing = client.database(&dst).collection::<Document>("people");
    existing.insert_one(doc! { "_id": 1, "v": "existing" }).run().unwrap();
    let url =
        |db: &str| format!("mongodb://{user}@{host}:{port}/{db}?authSource=admin&directConnection=true");
    let (dir, config) =
        setup(&format!("type = \"mongodb\"\nurl = \"{}\"\npassword = \"env:TEST_MONGO_PW\"", url(&src)));
    let env = [("TEST_MONGO_PW", pw.as_str()), ("BACKUPY_RESTORE_PASSWORD", "env:TEST_MONGO_PW")];
    backup(&config, &env);
    let object = stored_object(&dir.path().join("backups"));
    let size = std::fs::metadata(&object).unwrap().len();
    assert!(size > 2 << 20, "the object has {size} bytes: too few chunks for the test to mean anything");
    flip_byte_near_end(&object, 5);

    let out = restore(&config, &url(&dst), &env, &["--force"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("authentication failed") && err.contains("nothing was written"), "{err}");
    let docs: Vec<Document> = existing.find(doc! {}).run().unwrap().collect::<Result<_, _>>().unwrap();
    assert_eq!(docs, vec![doc! { "_id": 1, "v": "existing" }], "the existing documents are untouched");

    let out = restore(&config, &url(&dst), &env, &["--force", "--no-preverify"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("authentication failed"), "the error names the cause: {err}");
    for db in [&src, &dst] {
        client.database(db).drop().run().unwrap();
    }
}
