//! The MongoDB driver against a real MongoDB-wire server: SecantusDB started by
//! scripts/services.sh (`services_start_mongo`), with password authentication on.
//!
//! - a database with a capped collection, an empty one, a view, unique and compound
//!   secondary indexes and ~20 000 documents of every common BSON type is dumped by the
//!   native dumper through the real pipeline (zstd + v2 recipient encryption) into a
//!   real `DirStorage`, decrypted, checked as a mongodump archive, restored natively
//!   into another database and compared document by document, with options and indexes;
//! - wrong password, unreachable host and missing database each fail before anything is
//!   stored, with a clear message;
//! - `real_mongod_round_trip_if_BACKUPY_TEST_MONGO_URL_is_set` runs the same round trip
//!   against a real mongod (and through mongodump/mongorestore when they are on PATH).
//!   No real mongod exists on this machine, so that one test says SKIPPED when the
//!   variable is unset; it is the only test here that may skip.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use backupy_agent::cancel::Cancel;
use backupy_agent::crypto::{self, Encryption, Identity, KeySource};
use backupy_agent::drivers::mongodb::{self as mongo_driver, RestoreOptions, archive};
use backupy_agent::drivers::{self, DumpContext, Engine, TargetSpec};
use backupy_agent::pipeline::compress::decompress_by_magic;
use backupy_agent::pipeline::{self, Compression, Progress};
use backupy_agent::secrets::Secret;
use backupy_agent::storage::DirStorage;
use mongodb::bson::spec::BinarySubtype;
use mongodb::bson::{Binary, Bson, DateTime, Decimal128, Document, RawDocumentBuf, doc, oid::ObjectId};
use mongodb::sync::Client;

const DOCS: usize = 20_000;
const CAPPED_DOCS: usize = 3_000;

fn need(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set: this test needs the throwaway SecantusDB server. Run scripts/test.sh, or \
             `source scripts/services.sh; services_init; services_start_mongo` in the shell that runs \
             cargo test (scripts/install-deps.sh mongo installs it)"
        )
    })
}

fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{prefix}_{}_{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst))
}

/// The SecantusDB target by host/port/user/password (the driver builds the URI).
fn secantus_spec(database: &str) -> TargetSpec {
    let mut t = TargetSpec::new("mongo", Engine::MongoDb);
    t.host = need("BACKUPY_TEST_SECANTUS_HOST");
    t.port = need("BACKUPY_TEST_SECANTUS_PORT").parse().expect("BACKUPY_TEST_SECANTUS_PORT is a port");
    t.username = need("BACKUPY_TEST_SECANTUS_USER");
    t.password = Some(Secret::new(need("BACKUPY_TEST_SECANTUS_PASSWORD")));
    t.database = database.to_string();
    t.options.insert("authSource".into(), "admin".into());
    t
}

/// A target given as a full connection string (credentials inside).
fn uri_spec(uri: &str, database: &str) -> TargetSpec {
    let mut t = TargetSpec::new("mongo", Engine::MongoDb);
    t.database = database.to_string();
    t.options.insert("uri".into(), uri.to_string());
    t
}

fn test_client(uri: &str) -> Client {
    Client::with_uri_str(uri).unwrap_or_else(|e| panic!("test client: {e}"))
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_under(&p));
            } else {
                out.push(p.display().to_string());
            }
        }
    }
    out
}

struct DropDbs(Client, Vec<String>);
impl Drop for DropDbs {
    fn drop(&mut self) {
        for d in &self.1 {
            let _ = self.0.database(d).drop().run();
        }
    }
}

// ------------------------------------------------------------------------- data

fn person(i: usize) -> Document {
    let cities = ["Zürich", "東京", "São Paulo", "Kraków", "Reykjavík", "New York"];
    let mut oid = [0u8; 12];
    oid[..4].copy_from_slice(&0x6500_0000u32.to_be_bytes());
    oid[4..].copy_from_slice(&(i as u64).to_be_bytes());
    doc! {
        "_id": ObjectId::from_bytes(oid),
        "email": format!("user{i}@example.org"),
        "name": format!("Zoë Ñandú {i} — ☃ 北京"),
        "city": cities[i % cities.len()],
        "age": (i % 90) as i32,
        "balance": format!("{}.{:02}", i * 10, i % 100).parse::<Decimal128>().unwrap(),
        "big": (i as i64) << 33,
        "ratio": i as f64 / 7.0,
        "active": i.is_multiple_of(3),
        "nothing": Bson::Null,
        "born": DateTime::from_millis(946_684_800_000 + i as i64 * 86_400_000),
        "address": { "street": format!("{i} Main St"), "geo": { "lat": 47.37 + i as f64 / 1e5, "lon": 8.54 } },
        "tags": ["a", format!("t{}", i % 10), { "nested": [i as i32, { "deep": true }] }],
        "blob": Binary { subtype: BinarySubtype::Generic, bytes: (0..(i % 64) as u8).collect() },
        "uuid": Binary { subtype: BinarySubtype::Uuid, bytes: (i as u128).to_be_bytes().to_vec() },
    }
}

/// Creates the source database: people (20 000 docs, unique + compound indexes),
/// events (capped, 3 000 docs, an index), empty (no docs), people_view (a view).
fn seed(client: &Client, db_name: &str) {
    let db = client.database(db_name);
    let _ = db.drop().run();
    let people = db.collection::<Document>("people");
    let batch: Vec<Document> = (0..DOCS).map(person).collect();
    for chunk in batch.chunks(2_000) {
        people.insert_many(chunk).run().unwrap();
    }
    db.run_command(doc! {
        "createIndexes": "people",
        "indexes": [
            { "key": { "email": 1 }, "name": "email_unique", "unique": true },
            { "key": { "city": 1, "age": -1 }, "name": "city_1_age_-1" },
        ],
    })
    .run()
    .unwrap();
    db.run_command(doc! { "create": "events", "capped": true, "size": 4i64 << 20, "max": 10_000i64 })
        .run()
        .unwrap();
    let events = db.collection::<Document>("events");
    let ev: Vec<Document> = (0..CAPPED_DOCS)
        .map(|i| doc! { "_id": i as i64, "seq": i as i32, "msg": format!("évènement {i}"), "at": DateTime::from_millis(1_700_000_000_000 + i as i64) })
        .collect();
    events.insert_many(ev).run().unwrap();
    db.run_command(
        doc! { "createIndexes": "events", "indexes": [ { "key": { "seq": -1 }, "name": "seq_desc" } ] },
    )
    .run()
    .unwrap();
    db.run_command(doc! { "create": "empty" }).run().unwrap();
    db.run_command(doc! {
        "create": "people_view",
        "viewOn": "people",
        "pipeline": [ { "$match": { "active": true } }, { "$project": { "email": 1, "city": 1 } } ],
    })
    .run()
    .unwrap();
}

// --------------------------------------------------------------------- backup

#[derive(Debug)]
struct Stored {
    path: std::path::PathBuf,
    engine_version: String,
    dump_bytes: u64,
    stored_bytes: u64,
    size_hint: Option<u64>,
}

/// drivers::dump → pipeline::run → DirStorage, like a run of the agent.
fn backup(spec: &TargetSpec, storage: &DirStorage, temp: &Path, enc: &Encryption) -> Result<Stored, String> {
    let ctx =
        DumpContext { temp_dir: temp.to_path_buf(), pipeline_compresses: true, cancel: Default::default() };
    let dump = drivers::dump(spec, &ctx).map_err(|e| e.to_string())?;
    let key = format!("{}/job/{}.{}", spec.id, unique("obj"), Engine::MongoDb.dump_extension());
    let writer = storage.create(&key).map_err(|e| e.to_string())?;
    let compression = Compression::default();
    let prepared = enc.prepare(compression.header_code()).map_err(|e| e.to_string())?;
    let size_hint = dump.source.size_hint;
    let out = pipeline::run(
        dump.source,
        pipeline::Options::new(compression, prepared),
        Box::new(writer),
        &Cancel::default(),
        Arc::new(Progress::default()),
    )
    .map_err(|e| e.to_string())?;
    Ok(Stored {
        path: storage.path_of(&out.object.key),
        engine_version: dump.engine_version,
        dump_bytes: out.dump_bytes,
        stored_bytes: out.stored_bytes,
        size_hint,
    })
}

/// The stored object, decrypted and decompressed: the archive stream.
fn open_archive(path: &Path, key: &KeySource) -> Box<dyn Read> {
    let file = File::open(path).unwrap();
    let (_, plain) = crypto::open(io::BufReader::new(file), key).expect("the object decrypts");
    let (codec, r) = decompress_by_magic(plain).expect("the object decompresses");
    assert_eq!(codec, "zstd");
    r
}

// -------------------------------------------------------------------- compare

fn docs_by_id(client: &Client, db: &str, coll: &str) -> Vec<RawDocumentBuf> {
    client
        .database(db)
        .collection::<RawDocumentBuf>(coll)
        .find(doc! {})
        .sort(doc! { "_id": 1 })
        .run()
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn docs_natural(client: &Client, db: &str, coll: &str) -> Vec<RawDocumentBuf> {
    client
        .database(db)
        .collection::<RawDocumentBuf>(coll)
        .find(doc! {})
        .run()
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// name → (type, options) of every collection and view.
fn collections(client: &Client, db: &str) -> BTreeMap<String, (String, Document)> {
    let cursor = client.database(db).run_cursor_command(doc! { "listCollections": 1 }).run().unwrap();
    cursor
        .map(|c| {
            let c = c.unwrap();
            (
                c.get_str("name").unwrap().to_string(),
                (
                    c.get_str("type").unwrap_or("collection").to_string(),
                    c.get_document("options").cloned().unwrap_or_default(),
                ),
            )
        })
        .filter(|(n, _)| !n.starts_with("system."))
        .collect()
}

/// name → index spec without `ns` (and without the server-set `v`, compared apart).
fn indexes(client: &Client, db: &str, coll: &str) -> BTreeMap<String, Document> {
    let cursor = client.database(db).run_cursor_command(doc! { "listIndexes": coll }).run().unwrap();
    cursor
        .map(|i| {
            let mut i = i.unwrap();
            i.remove("ns");
            (i.get_str("name").unwrap().to_string(), i)
        })
        .collect()
}

/// Everything that must survive the round trip, compared between two databases.
fn assert_same_database(client: &Client, src: &str, dst: &str) {
    let a = collections(client, src);
    let b = collections(client, dst);
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "same collections and views");
    for (name, (kind, options)) in &a {
        let (kind2, options2) = &b[name];
        assert_eq!(kind, kind2, "{name}: type");
        assert_eq!(options, options2, "{name}: options (capped, size, max, viewOn, pipeline)");
        if kind == "view" {
            continue;
        }
        assert_eq!(indexes(client, src, name), indexes(client, dst, name), "{name}: indexes");
        let x = docs_by_id(client, src, name);
        let y = docs_by_id(client, dst, name);
        assert_eq!(x.len(), y.len(), "{name}: document count");
        for (d1, d2) in x.iter().zip(&y) {
            assert!(d1.as_bytes() == d2.as_bytes(), "{name}: documents differ:\n{d1:?}\n{d2:?}");
        }
    }
    // The capped collection keeps its insertion order.
    let n1 = docs_natural(client, src, "events");
    let n2 = docs_natural(client, dst, "events");
    assert!(n1.iter().map(|d| d.as_bytes()).eq(n2.iter().map(|d| d.as_bytes())), "capped natural order");
}

// ----------------------------------------------------------------- round trip

fn build_version(client: &Client) -> String {
    client
        .database("admin")
        .run_command(doc! { "buildInfo": 1 })
        .run()
        .unwrap()
        .get_str("version")
        .unwrap()
        .to_string()
}

/// Seeds `src`, backs it up with `spec`, checks the archive and restores it natively
/// into a new database; returns the decrypted archive for further checks.
fn round_trip(label: &str, client: &Client, spec_for: &dyn Fn(&str) -> TargetSpec) -> Vec<u8> {
    let src = unique("bk_src");
    let dst = unique("bk_dst");
    let _cleanup = DropDbs(client.clone(), vec![src.clone(), dst.clone()]);
    let t = Instant::now();
    seed(client, &src);
    eprintln!("[{label}] seeded {DOCS} + {CAPPED_DOCS} documents in {:.1?}", t.elapsed());

    let dir = tempfile::tempdir().unwrap();
    let storage = DirStorage::open(dir.path().join("store")).unwrap();
    let id = Identity::generate().unwrap();
    let enc = Encryption::V2Recipient { recipient: id.recipient().unwrap(), chunk_size: 1 << 20 };
    let key = KeySource::Identity(Identity::parse(&id.to_file_text().unwrap()).unwrap());

    let mut spec = spec_for(&src);
    spec.options.insert("tool".into(), "native".into());
    let t = Instant::now();
    let stored =
        backup(&spec, &storage, &dir.path().join("tmp"), &enc).unwrap_or_else(|e| panic!("backup: {e}"));
    eprintln!(
        "[{label}] native dump: {} archive bytes -> {} stored (zstd + v2) in {:.1?}; size hint {:?}",
        stored.dump_bytes,
        stored.stored_bytes,
        t.elapsed(),
        stored.size_hint
    );
    let version = build_version(client);
    assert_eq!(stored.engine_version, mongo_driver::engine_version(&version));
    assert!(stored.engine_version.starts_with("MongoDB "), "{}", stored.engine_version);
    assert!(stored.stored_bytes < stored.dump_bytes / 2, "compressed");
    let leftovers: Vec<String> =
        files_under(&dir.path().join("tmp")).into_iter().filter(|f| f.contains("secrets")).collect();
    assert!(leftovers.is_empty(), "no secret files left: {leftovers:?}");

    // The decrypted object is a mongodump archive with everything in it.
    let mut plain = Vec::new();
    open_archive(&stored.path, &key).read_to_end(&mut plain).unwrap();
    assert_eq!(plain.len() as u64, stored.dump_bytes);
    assert_eq!(&plain[..4], &archive::MAGIC);
    let mut reader = archive::Reader::new(io::Cursor::new(&plain)).unwrap();
    assert_eq!(reader.header.version, "0.1");
    assert_eq!(reader.header.server_version, version);
    let mut names: Vec<(String, String)> =
        reader.collections.iter().map(|c| (c.collection.clone(), c.kind.clone())).collect();
    names.sort();
    assert_eq!(
        names,
        [
            ("empty", "collection"),
            ("events", "collection"),
            ("people", "collection"),
            ("people_view", "view")
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
    );
    let events_meta = reader.collections.iter().find(|c| c.collection == "events").unwrap().parsed().unwrap();
    assert!(events_meta.options.get_bool("capped").unwrap());
    let people_meta = reader.collections.iter().find(|c| c.collection == "people").unwrap().parsed().unwrap();
    let mut index_names: Vec<&str> = people_meta.indexes.iter().map(|i| i.get_str("name").unwrap()).collect();
    index_names.sort();
    assert_eq!(index_names, ["_id_", "city_1_age_-1", "email_unique"]);
    let mut counts = BTreeMap::new();
    while let Some(e) = reader.next_event().unwrap() {
        if let archive::Event::End { collection, documents, .. } = e {
            counts.insert(collection, documents);
        }
    }
    assert_eq!(counts["people"], DOCS as u64);
    assert_eq!(counts["events"], CAPPED_DOCS as u64);
    assert_eq!(counts["empty"], 0);
    assert_eq!(counts["people_view"], 0);

    // Native restore of the stored object into another database.
    let opts = RestoreOptions {
        drop: true,
        target_db: Some(dst.clone()),
        temp_dir: dir.path().join("tmp"),
        native: true,
    };
    let t = Instant::now();
    let report = mongo_driver::restore(&spec_for(&dst), &mut open_archive(&stored.path, &key), &opts)
        .unwrap_or_else(|e| panic!("restore: {e}"));
    eprintln!("[{label}] native restore into {dst}: {report:?} in {:.1?}", t.elapsed());
    assert_eq!(report.method, "native");
    assert_eq!(report.indexes, 3, "email_unique, city_1_age_-1, seq_desc");
    let t = Instant::now();
    assert_same_database(client, &src, &dst);
    eprintln!("[{label}] compared {src} and {dst} in {:.1?}", t.elapsed());

    // Again with drop: same result. Without drop: a clear duplicate-key error.
    mongo_driver::restore(&spec_for(&dst), &mut open_archive(&stored.path, &key), &opts).unwrap();
    assert_same_database(client, &src, &dst);
    let no_drop = RestoreOptions { drop: false, ..opts.clone() };
    let err = mongo_driver::restore(&spec_for(&dst), &mut open_archive(&stored.path, &key), &no_drop)
        .unwrap_err()
        .to_string();
    assert!(err.contains("inserting into") && err.contains("E11000"), "{err}");

    // A truncated archive: a clear error naming the archive, not a silent partial restore.
    let cut = &plain[..plain.len() - 100];
    let err =
        mongo_driver::restore(&spec_for(&dst), &mut io::Cursor::new(cut), &opts).unwrap_err().to_string();
    assert!(err.contains("corrupt mongodump archive"), "{err}");
    plain
}

#[test]
fn secantus_native_dump_and_restore_round_trip() {
    let url = need("BACKUPY_TEST_SECANTUS_URL");
    let client = test_client(&url);
    round_trip("secantus", &client, &secantus_spec);

    // All databases (spec.database empty): admin/local/config are skipped, a seeded
    // database is there.
    let src = unique("bk_all");
    let _cleanup = DropDbs(client.clone(), vec![src.clone()]);
    client.database(&src).collection::<Document>("c").insert_one(doc! { "x": 1 }).run().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let storage = DirStorage::open(dir.path().join("store")).unwrap();
    let mut spec = secantus_spec("");
    spec.options.insert("tool".into(), "native".into());
    let stored = backup(&spec, &storage, &dir.path().join("tmp"), &Encryption::None).unwrap();
    let (_, mut r) = decompress_by_magic(File::open(&stored.path).unwrap()).unwrap();
    let reader = archive::Reader::new(&mut r).unwrap();
    let dbs = reader.databases();
    assert!(dbs.contains(&src), "{dbs:?}");
    for skipped in ["admin", "local", "config"] {
        assert!(!dbs.iter().any(|d| d == skipped), "{skipped} is not dumped: {dbs:?}");
    }
}

#[test]
fn wrong_password_fails_clearly_and_stores_nothing() {
    let mut spec = secantus_spec("anything");
    spec.password = Some(Secret::new("definitely-wrong-password"));
    let dir = tempfile::tempdir().unwrap();
    let storage = DirStorage::open(dir.path().join("store")).unwrap();
    let t = Instant::now();
    let err = backup(&spec, &storage, &dir.path().join("tmp"), &Encryption::None).unwrap_err();
    eprintln!("wrong password after {:.1?}: {err}", t.elapsed());
    assert!(
        err.contains("target mongo: authentication failed for user \"backupy\" (authSource admin)"),
        "{err}"
    );
    assert!(!err.contains("definitely-wrong-password"), "no password in the message: {err}");
    assert!(files_under(&dir.path().join("store")).is_empty(), "nothing stored");
}

#[test]
fn unreachable_host_fails_within_seconds_and_stores_nothing() {
    let mut spec = secantus_spec("anything");
    let (closed, _closed_claim) = crate::common::reserve_port();
    spec.port = closed;
    let dir = tempfile::tempdir().unwrap();
    let storage = DirStorage::open(dir.path().join("store")).unwrap();
    let t = Instant::now();
    let err = backup(&spec, &storage, &dir.path().join("tmp"), &Encryption::None).unwrap_err();
    let took = t.elapsed();
    eprintln!("unreachable after {took:.1?}: {err}");
    assert!(
        err.contains(&format!("cannot reach the MongoDB server at 127.0.0.1:{} within 5.0 s", spec.port)),
        "{err}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(files_under(&dir.path().join("store")).is_empty(), "nothing stored");

    // A shorter timeout from the options is honoured.
    spec.options.insert("serverSelectionTimeoutMS".into(), "1000".into());
    let t = Instant::now();
    let err = backup(&spec, &storage, &dir.path().join("tmp"), &Encryption::None).unwrap_err();
    assert!(err.contains("within 1.0 s"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(4), "took {:?}", t.elapsed());
}

#[test]
fn missing_database_fails_clearly_and_stores_nothing() {
    let spec = secantus_spec("no_such_database_here");
    let dir = tempfile::tempdir().unwrap();
    let storage = DirStorage::open(dir.path().join("store")).unwrap();
    let err = backup(&spec, &storage, &dir.path().join("tmp"), &Encryption::None).unwrap_err();
    assert!(err.contains("database \"no_such_database_here\" does not exist on the server"), "{err}");
    assert!(files_under(&dir.path().join("store")).is_empty(), "nothing stored");
}

/// The one test allowed to skip: no real mongod can run on this machine.
#[test]
#[allow(non_snake_case)]
fn real_mongod_round_trip_if_BACKUPY_TEST_MONGO_URL_is_set() {
    let Ok(url) = std::env::var("BACKUPY_TEST_MONGO_URL") else {
        eprintln!(
            "SKIPPED real_mongod_round_trip: BACKUPY_TEST_MONGO_URL is not set (no real mongod here; \
             set it to e.g. mongodb://user:pw@127.0.0.1:27017/?authSource=admin to run this test)"
        );
        return;
    };
    let client = test_client(&url);
    let spec_for = |db: &str| uri_spec(&url, db);
    let plain = round_trip("mongod", &client, &spec_for);

    // Interop with the MongoDB tools when they are installed.
    let dir = tempfile::tempdir().unwrap();
    if backupy_agent::drivers::exec::find_tool(&["mongorestore"]).is_some() {
        let src_db = archive::Reader::new(io::Cursor::new(&plain)).unwrap().databases().remove(0);
        let dst = unique("bk_tool");
        let _cleanup = DropDbs(client.clone(), vec![dst.clone()]);
        // The source database was dropped by round_trip: reseed it to compare.
        seed(&client, &src_db);
        let _cleanup_src = DropDbs(client.clone(), vec![src_db.clone()]);
        let opts = RestoreOptions {
            drop: true,
            target_db: Some(dst.clone()),
            temp_dir: dir.path().into(),
            native: false,
        };
        let report = mongo_driver::restore(&spec_for(&dst), &mut io::Cursor::new(&plain), &opts)
            .unwrap_or_else(|e| panic!("mongorestore of the native archive: {e}"));
        assert_eq!(report.method, "mongorestore");
        assert_same_database(&client, &src_db, &dst);
        eprintln!("mongorestore restored the native archive: verified");
    } else {
        eprintln!("mongorestore not on PATH: native archive → mongorestore interop not checked");
    }
    if backupy_agent::drivers::exec::find_tool(&["mongodump"]).is_some() {
        let src = unique("bk_tsrc");
        let dst = unique("bk_tdst");
        let _cleanup = DropDbs(client.clone(), vec![src.clone(), dst.clone()]);
        seed(&client, &src);
        let storage = DirStorage::open(dir.path().join("store")).unwrap();
        let stored = backup(&spec_for(&src), &storage, &dir.path().join("tmp"), &Encryption::None)
            .unwrap_or_else(|e| panic!("mongodump backup: {e}"));
        let (_, mut r) = decompress_by_magic(File::open(&stored.path).unwrap()).unwrap();
        let opts = RestoreOptions {
            drop: true,
            target_db: Some(dst.clone()),
            temp_dir: dir.path().into(),
            native: true,
        };
        mongo_driver::restore(&spec_for(&dst), &mut r, &opts)
            .unwrap_or_else(|e| panic!("native restore of mongodump's archive: {e}"));
        assert_same_database(&client, &src, &dst);
        eprintln!("the native reader restored mongodump's archive: verified");
    } else {
        eprintln!("mongodump not on PATH: mongodump archive → native reader interop not checked");
    }
}

// ------------------------------------------------- mongodump / mongorestore path

/// Set in the child process that runs the fake-tool test with its own PATH.
const FAKE_TOOLS: &str = "BACKUPY_TEST_MONGO_FAKE_TOOLS";

/// Stand-ins for the MongoDB tools (none can be installed here): they record their
/// argv, environment and `--config` file, then act like the tool (mongodump prints a
/// prepared archive; mongorestore keeps its stdin). `fail` makes them fail like the
/// real ones do.
const FAKE_TOOL: &str = r#"#!/bin/sh
here=$(cd "$(dirname "$0")/.." && pwd)
name=$(basename "$0")
if [ "$1" = --version ]; then
    printf '%s version: 100.0.0-fake\ngit version: 0\n' "$name"
    exit 0
fi
: >"$here/$name.argv"
for a in "$@"; do printf '%s\n' "$a" >>"$here/$name.argv"; done
env >"$here/$name.env"
for a in "$@"; do
    case $a in --config=*) cfg=${a#--config=} ;; esac
done
stat -c %a "$cfg" >"$here/$name.cfgmode"
stat -c %a "$(dirname "$cfg")" >"$here/$name.dirmode"
cat "$cfg" >"$here/$name.cfg"
echo "$cfg" >"$here/$name.cfgpath"
if [ -e "$here/fail" ]; then
    echo "Failed: can't create session: could not connect to server" >&2
    exit 1
fi
case $name in
    mongodump) cat "$here/archive.bin" ;;
    mongorestore) cat >"$here/restore.stdin" ;;
esac
"#;

#[test]
fn mongodump_and_mongorestore_get_the_password_only_in_a_0600_config_file() {
    let Some(here) = std::env::var_os(FAKE_TOOLS) else {
        // Run this test again, alone, in a child whose PATH starts with the fakes (PATH
        // is process-wide: changing it here would affect the other tests).
        need("BACKUPY_TEST_SECANTUS_URL");
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        for name in ["mongodump", "mongorestore"] {
            use std::os::unix::fs::PermissionsExt;
            let p = bin.join(name);
            std::fs::write(&p, FAKE_TOOL).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                &crate::common::test_path(
                    module_path!(),
                    "mongodump_and_mongorestore_get_the_password_only_in_a_0600_config_file",
                ),
            ])
            .args(["--nocapture", "--test-threads=1"])
            .env("PATH", path)
            .env(FAKE_TOOLS, dir.path())
            .output()
            .unwrap();
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && text.contains("1 passed"), "inner run failed:\n{text}");
        return;
    };
    let here = Path::new(&here);
    let url = need("BACKUPY_TEST_SECANTUS_URL");
    let password = need("BACKUPY_TEST_SECANTUS_PASSWORD");
    let client = test_client(&url);
    let src = unique("bk_fake_src");
    let dst = unique("bk_fake_dst");
    let _cleanup = DropDbs(client.clone(), vec![src.clone(), dst.clone()]);
    let coll = client.database(&src).collection::<Document>("c");
    coll.insert_many((0..100).map(|i| doc! { "_id": i, "v": format!("wert {i}") })).run().unwrap();
    let storage = DirStorage::open(here.join("store")).unwrap();
    let temp = here.join("tmp");

    // The archive mongodump will "print": a native dump of src, stored in the clear.
    let mut spec = secantus_spec(&src);
    spec.options.insert("tool".into(), "native".into());
    let native = backup(&spec, &storage, &temp, &Encryption::None).unwrap();
    let (_, mut r) = decompress_by_magic(File::open(&native.path).unwrap()).unwrap();
    let mut archive_bytes = Vec::new();
    r.read_to_end(&mut archive_bytes).unwrap();
    std::fs::write(here.join("archive.bin"), &archive_bytes).unwrap();

    // auto: mongodump is on PATH, so it runs.
    assert_eq!(mongo_driver::capability().as_deref(), Some("mongodump 100.0.0-fake"));
    let spec = secantus_spec(&src);
    let stored = backup(&spec, &storage, &temp, &Encryption::None).unwrap();
    let (_, mut r) = decompress_by_magic(File::open(&stored.path).unwrap()).unwrap();
    let mut got = Vec::new();
    r.read_to_end(&mut got).unwrap();
    assert!(got == archive_bytes, "the stored object is mongodump's output");
    assert!(stored.engine_version.starts_with("MongoDB "), "version still comes from the server");
    let read = |f: &str| std::fs::read_to_string(here.join(f)).unwrap();
    let argv: Vec<String> = read("mongodump.argv").lines().map(str::to_string).collect();
    assert_eq!(argv[0], "--archive");
    assert!(argv[1].starts_with("--config="), "{argv:?}");
    assert_eq!(argv[2], format!("--db={src}"));
    assert_eq!(argv.len(), 3, "{argv:?}");
    assert!(!read("mongodump.argv").contains(&password), "no password in argv");
    let env = read("mongodump.env");
    assert!(!env.contains(&password), "no password in the environment");
    assert!(!env.contains("BACKUPY_"), "only allow-listed variables: {env}");
    assert_eq!(read("mongodump.cfgmode").trim(), "600");
    assert_eq!(read("mongodump.dirmode").trim(), "700");
    let cfg = read("mongodump.cfg");
    assert!(cfg.starts_with("uri: \"mongodb://backupy:") && cfg.contains(&password), "{cfg}");
    assert!(cfg.contains("authSource=admin") && cfg.contains("directConnection=true"), "{cfg}");
    assert!(!Path::new(read("mongodump.cfgpath").trim()).exists(), "config file removed after the run");

    // A failing mongodump: its stderr in the error, nothing stored.
    std::fs::write(here.join("fail"), "").unwrap();
    let before = files_under(&here.join("store"));
    let err = backup(&spec, &storage, &temp, &Encryption::None).unwrap_err();
    assert!(err.contains("mongodump exited with status 1") && err.contains("could not connect"), "{err}");
    assert_eq!(files_under(&here.join("store")), before, "nothing stored");
    std::fs::remove_file(here.join("fail")).unwrap();

    // mongorestore gets the whole archive on stdin (the prelude it had to read for the
    // rename included) and the rename as --nsInclude/--nsFrom/--nsTo.
    let opts =
        RestoreOptions { drop: true, target_db: Some(dst.clone()), temp_dir: temp.clone(), native: false };
    let report =
        mongo_driver::restore(&secantus_spec(&dst), &mut io::Cursor::new(&archive_bytes), &opts).unwrap();
    assert_eq!(report.method, "mongorestore");
    assert!(std::fs::read(here.join("restore.stdin")).unwrap() == archive_bytes, "stdin = the archive");
    let argv: Vec<String> = read("mongorestore.argv").lines().map(str::to_string).collect();
    assert_eq!(argv[0], "--archive");
    assert!(argv[1].starts_with("--config="));
    assert_eq!(
        argv[2..],
        [
            "--drop".to_string(),
            format!("--nsInclude={src}.*"),
            format!("--nsFrom={src}.*"),
            format!("--nsTo={dst}.*")
        ]
    );
    assert!(!read("mongorestore.argv").contains(&password) && !read("mongorestore.env").contains(&password));
    assert_eq!(read("mongorestore.cfgmode").trim(), "600");
    assert!(!Path::new(read("mongorestore.cfgpath").trim()).exists(), "config file removed");
    std::fs::write(here.join("fail"), "").unwrap();
    let err = mongo_driver::restore(&secantus_spec(&dst), &mut io::Cursor::new(&archive_bytes), &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("mongorestore failed") && err.contains("could not connect"), "{err}");
}
