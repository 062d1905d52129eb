//! The PostgreSQL driver against a real server (scripts/services.sh
//! `services_start_postgres`): a backup through the real pipeline and storage while
//! another connection writes, restored with `pg_restore` into a new database and
//! compared table by table; the UNIX-socket strategy; every connection error before the
//! dump starts; a missing tool; a dump killed mid-stream; and no secret in a running
//! `pg_dump`'s argv or environment.

use crate::common;
use crate::common::db;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use backupy_agent::cancel::Cancel;
use backupy_agent::crypto::{Encryption, Identity, KeySource};
use backupy_agent::drivers::postgres::{self as pg_driver, PgRestoreOptions};
use backupy_agent::drivers::{Engine, Strategy, TargetSpec};
use backupy_agent::pipeline::{Compression, Progress};
use backupy_agent::secrets::Secret;
use backupy_agent::storage::DirStorage;
use db::{Backup, RunOpts};

fn spec(database: &str) -> TargetSpec {
    let s = db::pg();
    let mut t = TargetSpec::new("pg", Engine::PostgreSql);
    t.host = s.host;
    t.port = s.port;
    t.username = s.user;
    t.password = Some(Secret::new(s.password));
    t.database = database.to_string();
    t.options.insert("sslmode".into(), "disable".into());
    t
}

fn client(database: &str) -> postgres::Client {
    let s = db::pg();
    postgres::Config::new()
        .host(&s.host)
        .port(s.port)
        .user(&s.user)
        .password(&s.password)
        .dbname(database)
        .connect(postgres::NoTls)
        .unwrap_or_else(|e| panic!("connecting to the test server's database {database}: {e}"))
}

/// A fresh, empty database (dropped first if a previous run left it).
fn create_db(name: &str) {
    let mut c = client("postgres");
    c.batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).unwrap();
    c.batch_execute(&format!("CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8'")).unwrap();
}

fn drop_db(name: &str) {
    let _ = client("postgres").batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"));
}

/// Drops the listed databases when the test ends, passed or not.
struct DropDbs(Vec<String>);
impl Drop for DropDbs {
    fn drop(&mut self) {
        for d in &self.0 {
            drop_db(d);
        }
    }
}

fn restore_into(path: &std::path::Path, key: Option<&KeySource>, database: &str, opts: &PgRestoreOptions) {
    let mut input = db::open_dump(path, key);
    pg_driver::restore(&spec(database), &mut input, opts).unwrap_or_else(|e| panic!("restore: {e}"));
}

/// Row count and md5 of the table's rows in `order` order.
fn fingerprint(c: &mut postgres::Client, table: &str, order: &str) -> (i64, String) {
    let row = c
        .query_one(
            &format!("SELECT count(*), md5(coalesce(string_agg(t::text, E'\\n' ORDER BY {order}), '')) FROM {table} t"),
            &[],
        )
        .unwrap_or_else(|e| panic!("fingerprint of {table}: {e}"));
    (row.get(0), row.get(1))
}

/// Everything about the schema a dump must carry: indexes, constraints, views,
/// sequences' state, and a large object.
fn structure(c: &mut postgres::Client) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let queries = [
        (
            "index",
            "SELECT schemaname || '.' || indexname, indexdef FROM pg_indexes \
             WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
        ),
        (
            "constraint",
            "SELECT n.nspname || '.' || c.conname, pg_get_constraintdef(c.oid) FROM pg_constraint c \
             JOIN pg_namespace n ON n.oid = c.connamespace WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')",
        ),
        (
            "view",
            "SELECT schemaname || '.' || viewname, definition FROM pg_views \
             WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
        ),
        (
            "sequence",
            "SELECT schemaname || '.' || sequencename, coalesce(last_value::text, 'null') || ' ' || increment_by \
             FROM pg_sequences",
        ),
        ("large object", "SELECT oid::text, md5(lo_get(oid)) FROM pg_largeobject_metadata"),
        ("schema", "SELECT nspname, '' FROM pg_namespace WHERE nspname NOT LIKE 'pg_%'"),
    ];
    for (kind, sql) in queries {
        for row in c.query(sql, &[]).unwrap_or_else(|e| panic!("{kind}: {e}")) {
            out.insert(format!("{kind} {}", row.get::<_, String>(0)), row.get(1));
        }
    }
    out
}

/// The tables the writer never touches, with their ordering keys.
const STILL_TABLES: &[(&str, &str)] = &[
    ("app.customers", "id"),
    ("billing.invoices", "id"),
    ("\"Ünïcode schema\".\"Tábla\"", "k"),
    ("app.docs", "id"),
    ("billing.big_spenders", "name"),
    ("app.big", "id"),
];

/// Several schemas, constraints, indexes, a view, sequences, a large object, non-ASCII
/// text, a big table of `big_rows` rows (~105 bytes each in the dump), and the writer's
/// tables.
fn populate(database: &str, big_rows: i64) {
    let mut c = client(database);
    c.batch_execute(
        r#"
        CREATE SCHEMA app;
        CREATE SCHEMA billing;
        CREATE SCHEMA "Ünïcode schema";
        CREATE SEQUENCE app.invoice_no START 1000 INCREMENT 7;
        CREATE TABLE app.customers (
            id serial PRIMARY KEY,
            email text NOT NULL UNIQUE CHECK (email LIKE '%@%'),
            name text NOT NULL,
            created timestamptz NOT NULL DEFAULT '2024-01-01 00:00:00+00'
        );
        CREATE INDEX customers_lower_name ON app.customers (lower(name));
        CREATE TABLE billing.invoices (
            id bigint PRIMARY KEY DEFAULT nextval('app.invoice_no'),
            customer_id int NOT NULL REFERENCES app.customers (id) ON DELETE CASCADE,
            amount numeric(12, 2) NOT NULL CHECK (amount >= 0),
            note text,
            data jsonb
        );
        CREATE INDEX invoices_customer_amount ON billing.invoices (customer_id, amount);
        INSERT INTO app.customers (email, name)
            SELECT 'user' || g || '@example.com', 'Ñame ' || g || ' 日本語 🎉 Grüße' FROM generate_series(1, 5000) g;
        INSERT INTO billing.invoices (customer_id, amount, note, data)
            SELECT 1 + g % 5000, (g % 1000) * 1.25, 'Zürich €' || g,
                   jsonb_build_object('g', g, 'tags', jsonb_build_array('ä', 'ß', '✓'))
            FROM generate_series(1, 20000) g;
        CREATE VIEW billing.big_spenders AS
            SELECT c.name, sum(i.amount) AS total FROM app.customers c
            JOIN billing.invoices i ON i.customer_id = c.id GROUP BY c.name HAVING sum(i.amount) > 4000;
        CREATE TABLE "Ünïcode schema"."Tábla" (k text PRIMARY KEY, v text NOT NULL);
        INSERT INTO "Ünïcode schema"."Tábla" VALUES
            ('ключ', 'значение'), ('鍵', '値'), ('emoji', '😀👍🏽'), ('quote', 'it''s a "test" \ backslash');
        CREATE TABLE app.docs (id int PRIMARY KEY, title text NOT NULL, content oid NOT NULL);
        INSERT INTO app.docs
            SELECT 1, 'large object ✓', lo_from_bytea(0, convert_to(repeat('large object ✓ ', 20000), 'UTF8'));
        CREATE TABLE app.events (id bigint PRIMARY KEY, at text NOT NULL);
        CREATE TABLE app.event_count (n bigint NOT NULL);
        INSERT INTO app.event_count VALUES (0);
        CREATE TABLE app.big (id bigint PRIMARY KEY, payload text NOT NULL);
        "#,
    )
    .unwrap();
    c.execute(
        "INSERT INTO app.big SELECT g, md5(g::text) || md5((g * 7)::text) || md5((g * 13)::text) \
         FROM generate_series(1, $1::bigint) g",
        &[&big_rows],
    )
    .unwrap();
    c.batch_execute("ANALYZE").unwrap();
}

/// Inserts events one transaction at a time (event row + counter), until stopped.
fn start_writer(
    database: &str,
    stop: Arc<AtomicBool>,
    written: Arc<AtomicI64>,
) -> std::thread::JoinHandle<()> {
    let mut c = client(database);
    std::thread::spawn(move || {
        let mut i = 0i64;
        while !stop.load(Ordering::SeqCst) {
            i += 1;
            let mut tx = c.transaction().unwrap();
            tx.execute("INSERT INTO app.events VALUES ($1, clock_timestamp()::text)", &[&i]).unwrap();
            tx.execute("UPDATE app.event_count SET n = n + 1", &[]).unwrap();
            tx.commit().unwrap();
            written.store(i, Ordering::SeqCst);
        }
    })
}

#[test]
fn backup_while_writing_restores_into_a_new_database_with_identical_tables() {
    let t0 = Instant::now();
    let source = db::unique("bk_pg_full");
    let restored = format!("{source}_restored");
    let _cleanup = DropDbs(vec![source.clone(), restored.clone()]);
    create_db(&source);
    populate(&source, 1_000_000);
    let setup = t0.elapsed();

    let mut c = client(&source);
    let before: Vec<(i64, String)> = STILL_TABLES.iter().map(|(t, o)| fingerprint(&mut c, t, o)).collect();
    let structure_before = structure(&mut c);
    let big_size: i64 = c.query_one("SELECT pg_total_relation_size('app.big')", &[]).unwrap().get(0);
    assert!(big_size > 100 << 20, "the big table is ~100 MB or more ({big_size} bytes)");

    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicI64::new(0));
    let writer = start_writer(&source, stop.clone(), written.clone());
    while written.load(Ordering::SeqCst) < 50 {
        std::thread::sleep(Duration::from_millis(5));
    }

    let dir = tempfile::tempdir().unwrap();
    let storage = DirStorage::open(dir.path().join("store")).unwrap();
    let id = Identity::generate().unwrap();
    let opts = RunOpts {
        encryption: Encryption::V2Recipient { recipient: id.recipient().unwrap(), chunk_size: 1 << 20 },
        ..RunOpts::default()
    };
    let written_at_start = written.load(Ordering::SeqCst);
    let t1 = Instant::now();
    let b: Backup = db::backup(&spec(&source), &storage, &dir.path().join("tmp"), &opts).unwrap();
    let backup_time = t1.elapsed();
    let written_at_end = written.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();

    assert_version(&b.engine_version);
    let hint = b.size_hint.expect("pg_database_size is the size hint");
    assert!(hint > big_size as u64, "size hint {hint} covers the database");
    assert!(b.output.dump_bytes > 100 << 20, "dump of {} bytes", b.output.dump_bytes);
    assert!(b.output.stored_bytes < b.output.dump_bytes, "the pipeline compressed (pg_dump did not)");
    assert_eq!(
        common::files_under(dir.path().join("tmp").as_path()),
        Vec::<String>::new(),
        "the passfile directory is gone after the run"
    );
    assert!(written_at_end > written_at_start, "the writer kept writing during the backup");

    let t2 = Instant::now();
    create_db(&restored);
    let key = KeySource::Identity(Identity::parse(&id.to_file_text().unwrap()).unwrap());
    restore_into(&b.path, Some(&key), &restored, &PgRestoreOptions::default());
    let restore_time = t2.elapsed();

    let mut r = client(&restored);
    for ((table, order), want) in STILL_TABLES.iter().zip(&before) {
        assert_eq!(&fingerprint(&mut r, table, order), want, "{table} restored identically");
    }
    assert_eq!(structure(&mut r), structure_before, "indexes, constraints, views, sequences, large object");
    let text: String =
        r.query_one("SELECT v FROM \"Ünïcode schema\".\"Tábla\" WHERE k = 'emoji'", &[]).unwrap().get(0);
    assert_eq!(text, "😀👍🏽");

    // The writer's tables: exactly what one snapshot saw, a prefix of what was written.
    let row = r
        .query_one("SELECT count(*), coalesce(min(id), 0), coalesce(max(id), 0) FROM app.events", &[])
        .unwrap();
    let (n, min, max): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    let counter: i64 = r.query_one("SELECT n FROM app.event_count", &[]).unwrap().get(0);
    assert_eq!(counter, n, "event counter and event rows come from the same snapshot");
    assert!(n >= 50, "the snapshot has the rows written before the dump started ({n})");
    assert_eq!((min, max), (1, n), "the restored events are a prefix 1..={n}");
    assert!(
        n < written_at_end,
        "rows written after the snapshot are not in the dump ({n} of {written_at_end})"
    );
    let mut s = client(&source);
    let (_, md5_source_prefix) = fingerprint_prefix(&mut s, n);
    assert_eq!(fingerprint_prefix(&mut r, n).1, md5_source_prefix, "the event rows are the source's rows");

    eprintln!(
        "timings: setup {setup:?}, backup {backup_time:?} ({} MB dump, {} MB stored), restore {restore_time:?}, total {:?}",
        b.output.dump_bytes >> 20,
        b.output.stored_bytes >> 20,
        t0.elapsed()
    );
}

/// "PostgreSQL <digits and dots>", no distribution suffix.
fn assert_version(v: &str) {
    let number = v.strip_prefix("PostgreSQL ").unwrap_or_else(|| panic!("engine version {v:?}"));
    assert!(
        !number.is_empty() && number.chars().all(|c| c.is_ascii_digit() || c == '.'),
        "engine version {v:?} has a plain version number"
    );
}

fn fingerprint_prefix(c: &mut postgres::Client, n: i64) -> (i64, String) {
    let row = c
        .query_one(
            "SELECT count(*), md5(string_agg(id || ' ' || at, E'\\n' ORDER BY id)) FROM app.events WHERE id <= $1",
            &[&n],
        )
        .unwrap();
    (row.get(0), row.get(1))
}

/// A role whose password needs escaping in a passfile (`:` and `\`), owner of `database`.
fn special_role(database: &str) -> (String, String) {
    let role = db::unique("bk_role");
    let password = r#"p:a\ss w'o"rd#1"#.to_string();
    let mut c = client("postgres");
    c.batch_execute(&format!(
        "CREATE ROLE {role} LOGIN PASSWORD '{}'; ALTER DATABASE \"{database}\" OWNER TO {role}; \
         GRANT {role} TO CURRENT_USER",
        password.replace('\'', "''")
    ))
    .unwrap();
    (role, password)
}

#[test]
fn unix_socket_dump_with_an_escaped_password_restores_and_clean_restores_again() {
    let source = db::unique("bk_pg_sock");
    let restored = format!("{source}_restored");
    let _cleanup = DropDbs(vec![source.clone(), restored.clone()]);
    create_db(&source);
    let (role, password) = special_role(&source);
    {
        let mut c = client(&source);
        c.batch_execute(&format!(
            "SET ROLE {role}; CREATE TABLE t (id int PRIMARY KEY, v text UNIQUE); \
             INSERT INTO t SELECT g, 'wert ' || g || ' ü' FROM generate_series(1, 3000) g; \
             CREATE VIEW v AS SELECT count(*) AS n FROM t; RESET ROLE"
        ))
        .unwrap();
    }
    let s = db::pg();
    let mut spec = TargetSpec::new("pg-sock", Engine::PostgreSql);
    spec.strategy = Strategy::UnixSocket;
    spec.host = s.socket_dir.clone();
    spec.port = s.port;
    spec.username = role.clone();
    spec.password = Some(Secret::new(password.clone()));
    spec.database = source.clone();

    let dir = tempfile::tempdir().unwrap();
    let storage = DirStorage::open(dir.path().join("store")).unwrap();
    let (_, key) = db::raw_key();
    let b = db::backup(&spec, &storage, &dir.path().join("tmp"), &RunOpts::default()).unwrap();
    assert_version(&b.engine_version);

    create_db(&restored);
    client("postgres").batch_execute(&format!("ALTER DATABASE \"{restored}\" OWNER TO {role}")).unwrap();
    let mut target = spec.clone();
    target.database = restored.clone();
    let restore = |opts: &PgRestoreOptions| {
        let mut input = db::open_dump(&b.path, Some(&key));
        pg_driver::restore(&target, &mut input, opts)
    };
    restore(&PgRestoreOptions::default()).unwrap();
    let want = fingerprint(&mut client(&source), "t", "id");
    assert_eq!(fingerprint(&mut client(&restored), "t", "id"), want);
    // Again without clean: the objects exist, pg_restore stops at the first error.
    let err = restore(&PgRestoreOptions::default()).unwrap_err().to_string();
    assert!(err.contains("pg_restore failed") && err.contains("already exists"), "{err}");
    assert!(!err.contains(&password), "no password in errors: {err}");
    // With clean: dropped and recreated, same content.
    restore(&PgRestoreOptions { clean: true, ..Default::default() }).unwrap();
    assert_eq!(fingerprint(&mut client(&restored), "t", "id"), want);
    let n: i64 = client(&restored).query_one("SELECT n FROM v", &[]).unwrap().get(0);
    assert_eq!(n, 3000);
    drop_db(&source);
    drop_db(&restored);
    let _ = client("postgres").batch_execute(&format!("DROP ROLE {role}"));
}

/// The run fails with `want` in its message, before anything is stored.
fn assert_fails_cleanly(spec: &TargetSpec, want: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let storage = DirStorage::open(dir.path().join("store")).unwrap();
    let t = Instant::now();
    let err = match db::backup(spec, &storage, &dir.path().join("tmp"), &RunOpts::default()) {
        Ok(_) => panic!("the backup of {spec:?} succeeded"),
        Err(e) => e,
    };
    for w in want {
        assert!(err.contains(w), "error {err:?} should contain {w:?}");
    }
    if let Some(pw) = &spec.password {
        assert!(!err.contains(pw.expose()), "no password in the error: {err}");
    }
    assert!(t.elapsed() < Duration::from_secs(15), "failed promptly ({:?})", t.elapsed());
    assert_eq!(common::files_under(dir.path()), Vec::<String>::new(), "nothing stored, no temp file left");
}

#[test]
fn wrong_password_is_a_clear_error_and_nothing_is_stored() {
    let mut s = spec("postgres");
    s.password = Some(Secret::new("not-the-password"));
    assert_fails_cleanly(
        &s,
        &[
            "target pg: PostgreSQL at 127.0.0.1:",
            "refused user \"postgres\"",
            "password authentication failed",
        ],
    );
}

#[test]
fn unreachable_server_is_a_clear_error_and_nothing_is_stored() {
    let mut s = spec("postgres");
    let (closed, _closed_claim) = crate::common::reserve_port();
    s.port = closed;
    assert_fails_cleanly(
        &s,
        &[&format!("cannot connect to PostgreSQL at 127.0.0.1:{}", s.port), "onnection refused"],
    );
}

#[test]
fn missing_database_is_a_clear_error_and_nothing_is_stored() {
    let s = spec("no_such_database_here");
    assert_fails_cleanly(
        &s,
        &["database \"no_such_database_here\" does not exist on PostgreSQL at 127.0.0.1:"],
    );
}

#[test]
fn unsupported_sslmode_values_are_refused() {
    let mut s = spec("postgres");
    s.options.insert("sslmode".into(), "sometimes".into());
    assert_fails_cleanly(&s, &["sslmode \"sometimes\" is not one of"]);
}

#[test]
fn missing_pg_dump_is_a_clear_error_naming_the_tool_and_how_to_install_it() {
    assert!(
        pg_driver::capability().is_some_and(|c| c.starts_with("pg_dump 1")),
        "capability here: {:?}",
        pg_driver::capability()
    );
    let empty = tempfile::tempdir().unwrap();
    db::rerun_self(
        module_path!(),
        "inner_pg_dump_missing",
        &[(pg_driver::TOOL_PATH_VAR, empty.path().as_os_str())],
    );
}

#[test]
#[ignore = "run by missing_pg_dump_is_a_clear_error_naming_the_tool_and_how_to_install_it"]
fn inner_pg_dump_missing() {
    if !db::is_inner() {
        return;
    }
    assert_eq!(pg_driver::capability(), None);
    assert_fails_cleanly(
        &spec("postgres"),
        &["pg_dump was not found in BACKUPY_TOOL_PATH=", "apt-get install postgresql-client"],
    );
}

/// A database with a ~20 MB table, for dumps that must still be running when looked at.
fn slow_source(prefix: &str) -> (String, DropDbs) {
    let name = db::unique(prefix);
    let guard = DropDbs(vec![name.clone()]);
    create_db(&name);
    client(&name)
        .batch_execute(
            "CREATE TABLE filler (id int PRIMARY KEY, v text); \
             INSERT INTO filler SELECT g, repeat(md5(g::text), 3) FROM generate_series(1, 200000) g",
        )
        .unwrap();
    (name, guard)
}

/// Options for a dump that the storage end slows down: nothing compresses, small
/// buffers, every write to storage sleeps.
fn slow_opts(cancel: Cancel, progress: Arc<Progress>) -> RunOpts {
    RunOpts {
        compression: Compression::None,
        encryption: Encryption::None,
        sink_delay: Some(Duration::from_millis(20)),
        buffer_size: Some(64 << 10),
        cancel,
        progress,
    }
}

#[test]
fn dump_killed_mid_stream_fails_the_run_and_stores_nothing() {
    let (name, _guard) = slow_source("bk_pg_kill");
    let dir = tempfile::tempdir().unwrap();
    let storage = DirStorage::open(dir.path().join("store")).unwrap();
    let progress = Arc::new(Progress::default());
    let opts = slow_opts(Cancel::default(), progress.clone());
    let s = spec(&name);
    let tmp = dir.path().join("tmp");
    let run = std::thread::spawn(move || db::backup(&s, &storage, &tmp, &opts));
    let pid = db::find_child("pg_dump", &name, Duration::from_secs(20)).expect("pg_dump is running");
    let deadline = Instant::now() + Duration::from_secs(20);
    while progress.dump_bytes.load(Ordering::Relaxed) < 256 << 10 {
        assert!(Instant::now() < deadline, "the dump streams");
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: kill(2) on the process group of the pg_dump this test started.
    assert_eq!(unsafe { libc::kill(-pid, libc::SIGKILL) }, 0);
    let err = match run.join().unwrap() {
        Ok(b) => panic!("a killed dump was stored: {:?}", b.output),
        Err(e) => e,
    };
    assert!(err.contains("dump stage failed") && err.contains("pg_dump was killed by signal 9"), "{err}");
    assert_eq!(common::files_under(dir.path()), Vec::<String>::new(), "nothing stored, no temp file left");
}

#[test]
fn no_password_or_agent_key_in_the_pg_dump_command_line_or_environment() {
    let agent_key = format!("bkpy-agent-key-{}", db::unique("k"));
    db::rerun_self(module_path!(), "inner_pg_dump_secrets", &[("BACKUPY_AGENT_KEY", agent_key.as_ref())]);
}

#[test]
#[ignore = "run by no_password_or_agent_key_in_the_pg_dump_command_line_or_environment"]
fn inner_pg_dump_secrets() {
    if !db::is_inner() {
        return;
    }
    let agent_key = std::env::var("BACKUPY_AGENT_KEY").expect("the outer test plants an agent key");
    let password = db::pg().password;
    let (name, _guard) = slow_source("bk_pg_secrets");
    let dir = tempfile::tempdir().unwrap();
    let storage = DirStorage::open(dir.path().join("store")).unwrap();
    let cancel = Cancel::default();
    let opts = slow_opts(cancel.clone(), Arc::new(Progress::default()));
    let s = spec(&name);
    let tmp = dir.path().join("tmp");
    let run = std::thread::spawn(move || db::backup(&s, &storage, &tmp, &opts));

    let pid = db::find_child("pg_dump", &name, Duration::from_secs(20)).expect("pg_dump is running");
    let (cmdline, environ) = db::proc_cmdline_and_environ(pid);
    assert!(!db::contains(&cmdline, &password), "password in pg_dump's argv");
    assert!(!db::contains(&environ, &password), "password in pg_dump's environment");
    assert!(!db::contains(&cmdline, &agent_key), "agent key in pg_dump's argv");
    assert!(!db::contains(&environ, &agent_key), "agent key in pg_dump's environment");
    let env = db::split_nul(&environ);
    assert!(!env.iter().any(|v| v.starts_with("BACKUPY_") || v.starts_with("PGPASSWORD")), "{env:?}");
    let passfile = env.iter().find_map(|v| v.strip_prefix("PGPASSFILE=")).expect("PGPASSFILE is set");
    let passfile = std::path::Path::new(passfile);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(passfile), 0o600, "passfile mode");
        assert_eq!(mode(passfile.parent().unwrap()), 0o700, "passfile directory mode");
        assert!(passfile.starts_with(dir.path().join("tmp")), "the passfile is under the run's temp dir");
        let content = std::fs::read_to_string(passfile).unwrap();
        assert!(content.contains(&password), "the passfile holds the password");
    }
    let args = db::split_nul(&cmdline);
    assert!(
        args.contains(&"--format=custom".to_string()) && args.contains(&"--no-password".to_string()),
        "{args:?}"
    );
    assert!(
        !args.iter().any(|a| a == "--compress=0"),
        "pg_dump compresses itself when the pipeline does not: {args:?}"
    );

    cancel.cancel();
    let err = match run.join().unwrap() {
        Ok(_) => panic!("a cancelled run was stored"),
        Err(e) => e,
    };
    assert_eq!(err, "cancelled");
    assert!(!passfile.exists(), "the passfile is removed when the run ends");
}
