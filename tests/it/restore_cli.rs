//! `backupy-agent restore` through the real binary, for every engine: back up with a
//! TOML target (URL form, password by reference), restore into a fresh database or file,
//! and compare the data with what was written.

use crate::common::db;

use std::path::Path;
use std::process::Command;

use crate::common::*;

/// A config with one target (TOML lines) and one job, encrypted to a fresh key pair
/// whose private key sits beside the config (restore finds it there).
pub(crate) fn setup(target_toml: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (_key, recipient) = keygen(dir.path());
    let config = dir.path().join("backupy.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"./state\"\n[storage]\ndir = \"./backups\"\n[encryption]\nrecipient = \"{recipient}\"\n\
             [[targets]]\nid = \"db\"\n{target_toml}\n[[jobs]]\nid = \"nightly\"\ntarget = \"db\"\n"
        ),
    )
    .unwrap();
    (dir, config)
}

fn agent_with(env: &[(&str, &str)]) -> Command {
    let mut c = agent();
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

pub(crate) fn backup(config: &Path, env: &[(&str, &str)]) {
    let mut c = agent_with(env);
    c.args(["backup", "--config"]).arg(config);
    let out = run(c);
    assert!(out.status.success(), "backup: {}", text(&out.stderr));
}

pub(crate) fn restore(config: &Path, to: &str, env: &[(&str, &str)], extra: &[&str]) -> std::process::Output {
    let mut c = agent_with(env);
    c.args(["restore", "--backup", "latest", "--to", to, "--config"]).arg(config).args(extra);
    run(c)
}

#[test]
fn sqlite_restores_to_a_file_and_refuses_to_overwrite_without_force() {
    let (dir, config) = setup("type = \"sqlite\"\npath = \"app.db\"");
    rusqlite::Connection::open(dir.path().join("app.db"))
        .unwrap()
        .execute_batch("CREATE TABLE t(x TEXT); INSERT INTO t VALUES ('héllo'), ('wörld');")
        .unwrap();
    backup(&config, &[]);
    let to = dir.path().join("restored.db");
    let out = restore(&config, to.to_str().unwrap(), &[], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(sqlite3(&to, "SELECT group_concat(x, ',') FROM t"), "héllo,wörld");
    let out = restore(&config, to.to_str().unwrap(), &[], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("--force"), "{}", text(&out.stderr));
    let out = restore(&config, to.to_str().unwrap(), &[], &["--force"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn restore_without_a_private_key_says_where_to_put_one() {
    let (dir, config) = setup("type = \"sqlite\"\npath = \"app.db\"");
    rusqlite::Connection::open(dir.path().join("app.db"))
        .unwrap()
        .execute_batch("CREATE TABLE t(x);")
        .unwrap();
    backup(&config, &[]);
    std::fs::remove_file(dir.path().join("backupy.key")).unwrap();
    let out = restore(&config, dir.path().join("r.db").to_str().unwrap(), &[], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("--identity") && err.contains("backupy.key"), "{err}");
}

#[test]
fn postgresql_restores_into_a_new_database() {
    let pg = db::pg();
    let src = db::unique("rsrc");
    let dst = db::unique("rdst");
    let mut admin = postgres::Client::connect(
        &format!(
            "host={} port={} user={} password={} dbname=postgres",
            pg.host, pg.port, pg.user, pg.password
        ),
        postgres::NoTls,
    )
    .unwrap();
    admin.batch_execute(&format!("CREATE DATABASE {src}")).unwrap();
    admin.batch_execute(&format!("CREATE DATABASE {dst}")).unwrap();
    let conn = |db: &str| {
        postgres::Client::connect(
            &format!(
                "host={} port={} user={} password={} dbname={db}",
                pg.host, pg.port, pg.user, pg.password
            ),
            postgres::NoTls,
        )
        .unwrap()
    };
    conn(&src)
        .batch_execute(
            "CREATE TABLE items(id serial PRIMARY KEY, name text NOT NULL UNIQUE);
             INSERT INTO items(name) SELECT 'item ' || g || ' ü' FROM generate_series(1, 5000) g;",
        )
        .unwrap();
    let (_dir, config) = setup(&format!(
        "type = \"postgresql\"\nurl = \"postgres://{}@{}:{}/{src}\"\npassword = \"env:TEST_PG_PW\"",
        pg.user, pg.host, pg.port
    ));
    let env = [("TEST_PG_PW", pg.password.as_str()), ("BACKUPY_RESTORE_PASSWORD", "env:TEST_PG_PW")];
    backup(&config, &env);
    let out = restore(&config, &format!("postgres://{}@{}:{}/{dst}", pg.user, pg.host, pg.port), &env, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!text(&out.stdout).contains(&pg.password) && !text(&out.stderr).contains(&pg.password));
    let q = "SELECT count(*)::text || ':' || md5(string_agg(name, ',' ORDER BY id)) FROM items";
    let a: String = conn(&src).query_one(q, &[]).unwrap().get(0);
    let b: String = conn(&dst).query_one(q, &[]).unwrap().get(0);
    assert_eq!(a, b);
}

#[test]
fn mariadb_restores_into_a_new_database() {
    let _lock = db::server_lock("mariadb", false);
    let m = db::maria();
    let src = db::unique("rsrc");
    let dst = db::unique("rdst");
    let opts = mysql::OptsBuilder::new()
        .ip_or_hostname(Some(m.host.clone()))
        .tcp_port(m.port)
        .user(Some(m.user.clone()))
        .pass(Some(m.password.clone()));
    let pool = mysql::Pool::new(opts).unwrap();
    let mut c = pool.get_conn().unwrap();
    use mysql::prelude::Queryable;
    c.query_drop(format!("CREATE DATABASE {src} CHARACTER SET utf8mb4")).unwrap();
    c.query_drop(format!(
        "CREATE TABLE {src}.t(id INT PRIMARY KEY, s VARCHAR(50) CHARACTER SET utf8mb4, b BLOB)"
    ))
    .unwrap();
    c.query_drop(format!("INSERT INTO {src}.t VALUES (1, 'emoji 🎉', X'00FF10'), (2, 'ok', NULL)")).unwrap();
    let (_dir, config) = setup(&format!(
        "type = \"mariadb\"\nurl = \"mariadb://{}@{}:{}/{src}\"\npassword = \"env:TEST_MY_PW\"",
        m.user, m.host, m.port
    ));
    let env = [("TEST_MY_PW", m.password.as_str()), ("BACKUPY_RESTORE_PASSWORD", "env:TEST_MY_PW")];
    backup(&config, &env);
    let out = restore(&config, &format!("mysql://{}@{}:{}/{dst}", m.user, m.host, m.port), &env, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let q = |db: &str| -> Vec<(i32, Option<String>, Option<Vec<u8>>)> {
        pool.get_conn().unwrap().query(format!("SELECT id, s, b FROM {db}.t ORDER BY id")).unwrap()
    };
    assert_eq!(q(&src), q(&dst));
    assert_eq!(q(&dst)[0].1.as_deref(), Some("emoji 🎉"));
}

#[test]
fn redis_restores_by_replay_and_to_a_data_directory() {
    let port = db::need("BACKUPY_TEST_REDIS_PORT", "redis");
    let pw = db::need("BACKUPY_TEST_REDIS_PASSWORD", "redis");
    let server = db::need("BACKUPY_TEST_REDIS_SERVER", "redis");
    let url = format!("redis://:{pw}@127.0.0.1:{port}/");
    let mut c = redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
    let prefix = db::unique("rk");
    for i in 0..200 {
        let _: () =
            redis::cmd("SET").arg(format!("{prefix}:{i}")).arg(format!("v{i}")).query(&mut c).unwrap();
    }
    let _: () = redis::cmd("HSET").arg(format!("{prefix}:h")).arg("f").arg("ü").query(&mut c).unwrap();
    let (dir, config) = setup(&format!(
        "type = \"redis\"\nurl = \"redis://127.0.0.1:{port}\"\npassword = \"env:TEST_REDIS_PW\""
    ));
    let env = [("TEST_REDIS_PW", pw.as_str()), ("BACKUPY_RESTORE_PASSWORD", "env:TEST_REDIS_PW")];
    backup(&config, &env);

    // A fresh server without a password receives the keys by RESTORE.
    let fresh_dir = tempfile::tempdir().unwrap();
    let (fresh_port, _fresh_port_claim) = reserve_port();
    let mut fresh = Command::new(&server)
        .args(["--port", &fresh_port.to_string(), "--bind", "127.0.0.1", "--save", "", "--dir"])
        .arg(fresh_dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let fresh_url = format!("redis://127.0.0.1:{fresh_port}/");
    let mut fc = None;
    for _ in 0..100 {
        if let Ok(conn) = redis::Client::open(fresh_url.as_str()).unwrap().get_connection() {
            fc = Some(conn);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mut fc = fc.expect("fresh redis-server starts");
    let out = restore(&config, &fresh_url, &[("TEST_REDIS_PW", pw.as_str())], &[]);
    let ok = out.status.success();
    let v: Option<String> = redis::cmd("GET").arg(format!("{prefix}:199")).query(&mut fc).unwrap();
    let h: Option<String> = redis::cmd("HGET").arg(format!("{prefix}:h")).arg("f").query(&mut fc).unwrap();
    let _ = fresh.kill();
    let _ = fresh.wait();
    assert!(ok, "{}", text(&out.stderr));
    assert_eq!(v.as_deref(), Some("v199"));
    assert_eq!(h.as_deref(), Some("ü"));

    // A data directory gets dump.rdb, which a redis-server loads.
    let data = dir.path().join("redis-data");
    std::fs::create_dir_all(&data).unwrap();
    let out = restore(&config, data.to_str().unwrap(), &[("TEST_REDIS_PW", pw.as_str())], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rdb = std::fs::read(data.join("dump.rdb")).unwrap();
    assert!(rdb.starts_with(b"REDIS"));
    let again = restore(&config, data.to_str().unwrap(), &[("TEST_REDIS_PW", pw.as_str())], &[]);
    assert_eq!(again.status.code(), Some(1), "an existing dump.rdb is not replaced without --force");
    assert!(text(&again.stderr).contains("--force"), "{}", text(&again.stderr));
    let forced = restore(&config, data.to_str().unwrap(), &[("TEST_REDIS_PW", pw.as_str())], &["--force"]);
    assert!(forced.status.success(), "{}", text(&forced.stderr));
    assert_eq!(files_under(&data), vec!["dump.rdb".to_string()], "no temporary file left");
}

#[test]
fn mongodb_restores_into_a_new_database() {
    use mongodb::bson::{Document, doc};
    let host = db::need("BACKUPY_TEST_SECANTUS_HOST", "mongo");
    let port = db::need("BACKUPY_TEST_SECANTUS_PORT", "mongo");
    let user = db::need("BACKUPY_TEST_SECANTUS_USER", "mongo");
    let pw = db::need("BACKUPY_TEST_SECANTUS_PASSWORD", "mongo");
    let admin_uri = db::need("BACKUPY_TEST_SECANTUS_URL", "mongo");
    let client = mongodb::sync::Client::with_uri_str(&admin_uri).unwrap();
    let src = db::unique("msrc");
    let dst = db::unique("mdst");
    let coll = client.database(&src).collection::<Document>("people");
    let docs: Vec<Document> =
        (0..500).map(|i| doc! { "_id": i, "name": format!("person {i} ü"), "tags": ["a", "b"] }).collect();
    coll.insert_many(docs).run().unwrap();
    let url =
        |db: &str| format!("mongodb://{user}@{host}:{port}/{db}?authSource=admin&directConnection=true");
    let (_dir, config) =
        setup(&format!("type = \"mongodb\"\nurl = \"{}\"\npassword = \"env:TEST_MONGO_PW\"", url(&src)));
    let env = [("TEST_MONGO_PW", pw.as_str()), ("BACKUPY_RESTORE_PASSWORD", "env:TEST_MONGO_PW")];
    backup(&config, &env);
    let out = restore(&config, &url(&dst), &env, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let restored = client.database(&dst).collection::<Document>("people");
    assert_eq!(restored.count_documents(doc! {}).run().unwrap(), 500);
    let one = restored.find_one(doc! { "_id": 499 }).run().unwrap().unwrap();
    assert_eq!(one.get_str("name").unwrap(), "person 499 ü");
}
