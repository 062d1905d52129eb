//! The mongodump archive format (`mongodump --archive`), written and read the way
//! mongo-tools' `common/archive` package does (`archive.go`, `prelude.go`,
//! `multiplexer.go`, `demultiplexer.go`, `parser.go`, `spec.md`):
//!
//! ```text
//! archive   = magic, prelude-header, *collection-metadata, terminator,
//!             *(namespace-header, *document, terminator | eof-header, terminator)
//! magic     = 6D E2 99 81            (0x8199e26d little-endian)
//! terminator= FF FF FF FF
//! ```
//!
//! - prelude header: `{concurrent_collections: int32, version: "0.1", server_version,
//!   tool_version}`
//! - collection metadata: `{db, collection, metadata: <canonical Extended JSON v2 of
//!   {options, indexes, uuid, collectionName, type}>, size: int32, type}`
//! - namespace header: `{db, collection, EOF: false, CRC: int64 0}`, then the raw BSON
//!   documents of that collection, then a terminator
//! - EOF header: `{db, collection, EOF: true, CRC: int64}`, then a terminator. The CRC
//!   is Go's `hash/crc64` with the ECMA table (reflected polynomial
//!   0xC96C5795D7870F42, initial value and final XOR all ones — CRC-64/XZ) over the
//!   concatenated bytes of every document of the namespace.
//!
//! A single-threaded mongodump writes each collection as one header, its documents, a
//! terminator, then the EOF header and a terminator; an empty collection or a view gets
//! the same frame with no documents. [`Writer`] produces exactly that frame. Every BSON
//! document here is built with the `bson` crate.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};

use ::mongodb::bson::{self, Bson, Document, RawDocumentBuf, doc};

/// The first four bytes of every archive: 0x8199e26d, little-endian.
pub const MAGIC: [u8; 4] = [0x6D, 0xE2, 0x99, 0x81];
/// Ends the prelude and every namespace block: int32 -1.
pub const TERMINATOR: [u8; 4] = [0xFF, 0xFF, 0xFF, 0xFF];
/// The only archive format version there is.
pub const FORMAT_VERSION: &str = "0.1";
/// The largest BSON document mongo-tools accepts in an archive (`db.MaxBSONSize`).
pub const MAX_BSON_SIZE: usize = 16 * 1024 * 1024;
/// The smallest BSON document: an empty one.
const MIN_BSON_SIZE: usize = 5;

// ----------------------------------------------------------------------------- CRC

/// Go's `crc64.ECMA` as used by mongo-tools: reflected polynomial, init and final XOR
/// all ones (the CRC-64/XZ parameters).
pub const CRC64_ECMA_REFLECTED: u64 = 0xC96C_5795_D787_0F42;

const fn crc64_table() -> [u64; 256] {
    let mut table = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u64;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ CRC64_ECMA_REFLECTED } else { crc >> 1 };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

static CRC64_TABLE: [u64; 256] = crc64_table();

/// A running CRC-64 (ECMA, as Go's `hash/crc64`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Crc64 {
    /// The register before the final XOR (Go keeps `^crc` between updates).
    state: u64,
}

impl Crc64 {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, bytes: &[u8]) {
        let mut crc = !self.state;
        for &b in bytes {
            crc = CRC64_TABLE[((crc as u8) ^ b) as usize] ^ (crc >> 8);
        }
        self.state = !crc;
    }

    pub fn sum64(&self) -> u64 {
        self.state
    }
}

// ------------------------------------------------------------------------ records

/// The prelude's first document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub concurrent_collections: i32,
    pub version: String,
    pub server_version: String,
    pub tool_version: String,
}

impl Header {
    pub fn new(server_version: impl Into<String>, tool_version: impl Into<String>) -> Self {
        Self {
            concurrent_collections: 1,
            version: FORMAT_VERSION.to_string(),
            server_version: server_version.into(),
            tool_version: tool_version.into(),
        }
    }

    fn to_document(&self) -> Document {
        doc! {
            "concurrent_collections": self.concurrent_collections,
            "version": &self.version,
            "server_version": &self.server_version,
            "tool_version": &self.tool_version,
        }
    }

    fn from_document(d: &Document) -> Result<Self, String> {
        Ok(Self {
            concurrent_collections: d.get_i32("concurrent_collections").unwrap_or(0),
            version: d.get_str("version").map_err(|e| format!("archive header: version: {e}"))?.to_string(),
            server_version: d.get_str("server_version").unwrap_or_default().to_string(),
            tool_version: d.get_str("tool_version").unwrap_or_default().to_string(),
        })
    }
}

/// What a collection looks like, as mongodump's `metadata.json` says it.
#[derive(Debug, Clone, PartialEq)]
pub struct Metadata {
    /// `listCollections` options (capped, size, max, validator, viewOn, pipeline, …).
    pub options: Document,
    /// `listIndexes` entries, `_id_` included, in server order.
    pub indexes: Vec<Document>,
    /// The collection UUID as 32 lower-case hex digits, or empty.
    pub uuid: String,
    pub collection_name: String,
    /// "collection", "view" or "timeseries".
    pub kind: String,
}

impl Metadata {
    /// The canonical Extended JSON v2 text mongodump stores (`bson.MarshalExtJSON(meta,
    /// canonical=true, escapeHTML=false)`): options (omitted when empty), indexes, uuid
    /// (omitted when empty), collectionName, type (omitted when empty).
    pub fn to_extjson(&self) -> String {
        let mut d = Document::new();
        if !self.options.is_empty() {
            d.insert("options", self.options.clone());
        }
        d.insert("indexes", self.indexes.iter().cloned().map(Bson::Document).collect::<Vec<_>>());
        if !self.uuid.is_empty() {
            d.insert("uuid", &self.uuid);
        }
        d.insert("collectionName", &self.collection_name);
        if !self.kind.is_empty() {
            d.insert("type", &self.kind);
        }
        Bson::Document(d).into_canonical_extjson().to_string()
    }

    pub fn from_extjson(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Ok(Self {
                options: Document::new(),
                indexes: Vec::new(),
                uuid: String::new(),
                collection_name: String::new(),
                kind: String::new(),
            });
        }
        let json: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("collection metadata is not JSON: {e}"))?;
        let d = match Bson::try_from(json) {
            Ok(Bson::Document(d)) => d,
            Ok(_) => return Err("collection metadata is not a JSON object".into()),
            Err(e) => return Err(format!("collection metadata is not Extended JSON: {e}")),
        };
        let options = match d.get("options") {
            None | Some(Bson::Null) => Document::new(),
            Some(Bson::Document(o)) => o.clone(),
            Some(_) => return Err("collection metadata: options is not a document".into()),
        };
        let indexes = match d.get("indexes") {
            None | Some(Bson::Null) => Vec::new(),
            Some(Bson::Array(a)) => a
                .iter()
                .map(|i| match i {
                    Bson::Document(i) => Ok(i.clone()),
                    _ => Err("collection metadata: an index is not a document".to_string()),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err("collection metadata: indexes is not an array".into()),
        };
        Ok(Self {
            options,
            indexes,
            uuid: d.get_str("uuid").unwrap_or_default().to_string(),
            collection_name: d.get_str("collectionName").unwrap_or_default().to_string(),
            kind: d.get_str("type").unwrap_or_default().to_string(),
        })
    }
}

/// One prelude entry per collection (or view) in the archive.
#[derive(Debug, Clone, PartialEq)]
pub struct CollectionMetadata {
    pub db: String,
    pub collection: String,
    /// Canonical Extended JSON of a [`Metadata`].
    pub metadata: String,
    /// mongodump leaves this 0 (its `NewPrelude` never sets it); only progress uses it.
    pub size: i32,
    /// "collection", "view", "timeseries" (from `listCollections`).
    pub kind: String,
}

impl CollectionMetadata {
    pub fn new(db: &str, metadata: &Metadata) -> Self {
        Self {
            db: db.to_string(),
            collection: metadata.collection_name.clone(),
            metadata: metadata.to_extjson(),
            size: 0,
            kind: metadata.kind.clone(),
        }
    }

    pub fn namespace(&self) -> String {
        format!("{}.{}", self.db, self.collection)
    }

    pub fn parsed(&self) -> Result<Metadata, String> {
        Metadata::from_extjson(&self.metadata).map_err(|e| format!("{}: {e}", self.namespace()))
    }

    fn to_document(&self) -> Document {
        doc! {
            "db": &self.db,
            "collection": &self.collection,
            "metadata": &self.metadata,
            "size": self.size,
            "type": &self.kind,
        }
    }

    fn from_document(d: &Document) -> Result<Self, String> {
        let collection = d.get_str("collection").unwrap_or_default().to_string();
        if collection.is_empty() {
            return Err("a collection metadata entry has no collection name".into());
        }
        Ok(Self {
            db: d.get_str("db").unwrap_or_default().to_string(),
            collection,
            metadata: d.get_str("metadata").unwrap_or_default().to_string(),
            size: match d.get("size") {
                Some(Bson::Int32(n)) => *n,
                Some(Bson::Int64(n)) => i32::try_from(*n).unwrap_or(i32::MAX),
                _ => 0,
            },
            kind: d.get_str("type").unwrap_or_default().to_string(),
        })
    }
}

/// The header of a namespace block; `eof` marks the end of the namespace, with `crc`.
pub fn namespace_header(db: &str, collection: &str, eof: bool, crc: i64) -> Document {
    doc! { "db": db, "collection": collection, "EOF": eof, "CRC": crc }
}

fn encode(d: &Document) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    d.to_writer(&mut out).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    Ok(out)
}

/// Checks that `bytes` is one whole BSON document of an acceptable size.
pub fn check_document(bytes: &[u8]) -> Result<(), String> {
    if bytes.len() < MIN_BSON_SIZE || bytes.len() > MAX_BSON_SIZE {
        return Err(format!("a document of {} bytes is outside 5..=16 MiB", bytes.len()));
    }
    let declared = i32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"));
    if declared as usize != bytes.len() || bytes[bytes.len() - 1] != 0 {
        return Err(format!("a document's length prefix ({declared}) or final NUL byte is wrong"));
    }
    Ok(())
}

// ------------------------------------------------------------------------- writer

/// Writes an archive one namespace at a time, as a single-threaded mongodump does.
pub struct Writer<W: Write> {
    out: W,
    current: Option<(String, String, Crc64)>,
}

impl<W: Write> Writer<W> {
    /// Writes the magic number and the prelude (header, one metadata entry per
    /// collection, terminator).
    pub fn new(mut out: W, header: &Header, collections: &[CollectionMetadata]) -> io::Result<Self> {
        out.write_all(&MAGIC)?;
        out.write_all(&encode(&header.to_document())?)?;
        for c in collections {
            out.write_all(&encode(&c.to_document())?)?;
        }
        out.write_all(&TERMINATOR)?;
        Ok(Self { out, current: None })
    }

    /// Starts the block of `db.collection` (writes its namespace header).
    pub fn begin(&mut self, db: &str, collection: &str) -> io::Result<()> {
        if let Some((d, c, _)) = &self.current {
            return Err(io::Error::other(format!("archive writer: {d}.{c} is still open")));
        }
        self.out.write_all(&encode(&namespace_header(db, collection, false, 0))?)?;
        self.current = Some((db.to_string(), collection.to_string(), Crc64::new()));
        Ok(())
    }

    /// Appends one raw BSON document to the open namespace.
    pub fn document(&mut self, bytes: &[u8]) -> io::Result<()> {
        let Some((_, _, crc)) = &mut self.current else {
            return Err(io::Error::other("archive writer: a document outside a namespace"));
        };
        check_document(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        self.out.write_all(bytes)?;
        crc.update(bytes);
        Ok(())
    }

    /// Ends the open namespace: terminator, EOF header with the CRC, terminator.
    pub fn end(&mut self) -> io::Result<()> {
        let Some((db, collection, crc)) = self.current.take() else {
            return Err(io::Error::other("archive writer: end without begin"));
        };
        self.out.write_all(&TERMINATOR)?;
        self.out.write_all(&encode(&namespace_header(&db, &collection, true, crc.sum64() as i64))?)?;
        self.out.write_all(&TERMINATOR)?;
        Ok(())
    }

    /// The sink, e.g. to drain a `Vec<u8>` buffer between calls.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }

    pub fn into_inner(self) -> io::Result<W> {
        if let Some((d, c, _)) = &self.current {
            return Err(io::Error::other(format!("archive writer: {d}.{c} was not ended")));
        }
        Ok(self.out)
    }
}

// ------------------------------------------------------------------------- reader

/// What the reader found next in the namespace blocks.
#[derive(Debug, PartialEq)]
pub enum Event {
    /// The first block of a namespace (mongorestore then opens the collection).
    Begin { db: String, collection: String },
    /// One document of the namespace named by the last header.
    Document { db: String, collection: String, doc: RawDocumentBuf },
    /// The namespace's EOF header arrived and its CRC matched.
    End { db: String, collection: String, documents: u64 },
}

#[derive(Default)]
struct NsState {
    crc: Crc64,
    documents: u64,
    opened: bool,
    closed: bool,
}

/// Reads an archive: the prelude at once, then one [`Event`] at a time, checking the
/// structure the way mongorestore's parser and demultiplexer do (terminators, headers,
/// CRC-64 per namespace, every collection of the prelude closed at the end).
pub struct Reader<R: Read> {
    input: R,
    pub header: Header,
    pub collections: Vec<CollectionMetadata>,
    /// The namespace of the block being read, or `None` between blocks.
    block: Option<(String, String)>,
    namespaces: HashMap<String, NsState>,
    /// The end of the input was reached (and checked).
    finished: bool,
    /// An event already decided (the `End` after a synthesized `Begin`).
    pending: Option<Event>,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("corrupt mongodump archive: {}", msg.into()))
}

enum Item {
    Doc(Vec<u8>),
    Terminator,
    Eof,
}

impl<R: Read> Reader<R> {
    pub fn new(mut input: R) -> io::Result<Self> {
        let mut magic = [0u8; 4];
        read_exact_or(&mut input, &mut magic, "the magic number")?;
        if magic != MAGIC {
            return Err(bad(format!(
                "it starts with {magic:02x?}, not the mongodump archive magic {MAGIC:02x?}"
            )));
        }
        let header = match read_item(&mut input)? {
            Item::Doc(b) => Header::from_document(&decode(&b)?).map_err(bad)?,
            Item::Terminator => return Err(bad("the prelude has no header")),
            Item::Eof => return Err(bad("it ends after the magic number")),
        };
        let mut collections = Vec::new();
        loop {
            match read_item(&mut input)? {
                Item::Doc(b) => {
                    collections.push(CollectionMetadata::from_document(&decode(&b)?).map_err(bad)?)
                }
                Item::Terminator => break,
                Item::Eof => return Err(bad("it ends inside the prelude")),
            }
        }
        let mut namespaces = HashMap::new();
        for c in &collections {
            // mongorestore expects no data for a timeseries entry itself (its buckets
            // come as system.buckets.<name>).
            if c.kind != "timeseries" {
                namespaces.insert(c.namespace(), NsState::default());
            }
        }
        Ok(Self { input, header, collections, block: None, namespaces, finished: false, pending: None })
    }

    /// The databases of the prelude, in first-seen order.
    pub fn databases(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for c in &self.collections {
            if !out.contains(&c.db) {
                out.push(c.db.clone());
            }
        }
        out
    }

    /// The next event, or `None` after the last block (when every namespace announced
    /// in the prelude has been closed).
    pub fn next_event(&mut self) -> io::Result<Option<Event>> {
        if let Some(e) = self.pending.take() {
            return Ok(Some(e));
        }
        if self.finished {
            return Ok(None);
        }
        loop {
            match &self.block {
                Some((db, collection)) => {
                    let ns = format!("{db}.{collection}");
                    return match read_item(&mut self.input)? {
                        Item::Doc(bytes) => {
                            let st = self.namespaces.get_mut(&ns).expect("opened namespace");
                            st.crc.update(&bytes);
                            st.documents += 1;
                            let doc = RawDocumentBuf::from_bytes(bytes)
                                .map_err(|e| bad(format!("a document of {ns} is not BSON: {e}")))?;
                            Ok(Some(Event::Document { db: db.clone(), collection: collection.clone(), doc }))
                        }
                        Item::Terminator => {
                            self.block = None;
                            continue;
                        }
                        Item::Eof => Err(bad(format!("it ends inside a block of {ns} (no terminator)"))),
                    };
                }
                None => {
                    let bytes = match read_item(&mut self.input)? {
                        Item::Doc(b) => b,
                        Item::Terminator => {
                            return Err(bad("two terminators in a row (a block without a header)"));
                        }
                        Item::Eof => return self.end_of_archive().map(|()| None),
                    };
                    let h = decode(&bytes)?;
                    let db = h.get_str("db").unwrap_or_default().to_string();
                    let collection = h.get_str("collection").unwrap_or_default().to_string();
                    if collection.is_empty() {
                        return Err(bad("a namespace header has no collection"));
                    }
                    let eof = h.get_bool("EOF").unwrap_or(false);
                    let ns = format!("{db}.{collection}");
                    let st = self.namespaces.entry(ns.clone()).or_default();
                    if st.closed {
                        return Err(bad(format!("a header for {ns} after its EOF")));
                    }
                    if eof {
                        let want = match h.get("CRC") {
                            Some(Bson::Int64(n)) => *n,
                            Some(Bson::Int32(n)) => i64::from(*n),
                            _ => return Err(bad(format!("the EOF header of {ns} has no int64 CRC"))),
                        };
                        let got = st.crc.sum64() as i64;
                        if got != want {
                            return Err(bad(format!(
                                "CRC mismatch for {ns}: computed {got}, archive says {want}"
                            )));
                        }
                        let first = !std::mem::replace(&mut st.opened, true);
                        st.closed = true;
                        let documents = st.documents;
                        // An EOF header carries no documents: the next item must be the
                        // terminator.
                        match read_item(&mut self.input)? {
                            Item::Terminator => {}
                            Item::Doc(_) => {
                                return Err(bad(format!("documents after the EOF header of {ns}")));
                            }
                            Item::Eof => return Err(bad(format!("it ends after the EOF header of {ns}"))),
                        }
                        // A namespace whose only block is its EOF header still begins.
                        if first {
                            self.pending = Some(Event::End {
                                db: db.clone(),
                                collection: collection.clone(),
                                documents,
                            });
                            return Ok(Some(Event::Begin { db, collection }));
                        }
                        return Ok(Some(Event::End { db, collection, documents }));
                    }
                    let first = !std::mem::replace(&mut st.opened, true);
                    self.block = Some((db.clone(), collection.clone()));
                    if first {
                        return Ok(Some(Event::Begin { db, collection }));
                    }
                }
            }
        }
    }

    fn end_of_archive(&mut self) -> io::Result<()> {
        self.finished = true;
        let open: BTreeMap<&String, &NsState> = self.namespaces.iter().filter(|(_, s)| !s.closed).collect();
        if !open.is_empty() {
            let names: Vec<&str> = open.keys().map(|s| s.as_str()).collect();
            return Err(bad(format!("it ends before these namespaces were complete: {}", names.join(", "))));
        }
        Ok(())
    }
}

fn decode(bytes: &[u8]) -> io::Result<Document> {
    Document::from_reader(bytes).map_err(|e| bad(format!("not BSON: {e}")))
}

fn read_exact_or(r: &mut impl Read, buf: &mut [u8], what: &str) -> io::Result<()> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof { bad(format!("it ends inside {what}")) } else { e }
    })
}

/// Reads a BSON document or a terminator; `Eof` only when the input ends cleanly
/// before the first byte.
fn read_item(r: &mut impl Read) -> io::Result<Item> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(Item::Eof),
            Ok(0) => return Err(bad("it ends inside a length prefix")),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if len == TERMINATOR {
        return Ok(Item::Terminator);
    }
    let size = i32::from_le_bytes(len);
    if size < MIN_BSON_SIZE as i32 || size as usize > MAX_BSON_SIZE {
        return Err(bad(format!("{size} is neither a valid BSON length nor a terminator")));
    }
    let mut buf = vec![0u8; size as usize];
    buf[..4].copy_from_slice(&len);
    read_exact_or(r, &mut buf[4..], "a BSON document")?;
    if buf[buf.len() - 1] != 0 {
        return Err(bad(format!("a BSON document of {size} bytes does not end with a NUL byte")));
    }
    Ok(Item::Doc(buf))
}

/// Encodes a document for tests and callers that build documents (never by hand).
pub fn to_bytes(d: &Document) -> Vec<u8> {
    bson::to_vec(d).expect("a Document always encodes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::mongodb::bson::{Binary, DateTime, Decimal128, RawDocument, oid::ObjectId, spec::BinarySubtype};

    /// CRC-64 as the Go/ECMA definition says, one bit at a time (no table), written
    /// independently of [`Crc64`].
    fn crc64_bitwise(data: &[u8]) -> u64 {
        let mut crc: u64 = !0;
        for &b in data {
            crc ^= u64::from(b);
            for _ in 0..8 {
                let mask = (crc & 1).wrapping_neg();
                crc = (crc >> 1) ^ (0xC96C_5795_D787_0F42 & mask);
            }
        }
        !crc
    }

    #[test]
    fn crc64_matches_the_published_check_value_and_a_bitwise_implementation() {
        // CRC-64/XZ (= Go crc64.ECMA) check value of "123456789".
        let mut c = Crc64::new();
        c.update(b"123456789");
        assert_eq!(c.sum64(), 0x995D_C9BB_DF19_39FA);
        assert_eq!(crc64_bitwise(b"123456789"), 0x995D_C9BB_DF19_39FA);
        // Streaming in pieces equals one call.
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut c = Crc64::new();
        for part in data.chunks(333) {
            c.update(part);
        }
        assert_eq!(c.sum64(), crc64_bitwise(&data));
        assert_eq!(Crc64::new().sum64(), 0, "empty input");
    }

    fn sample_docs() -> Vec<Vec<u8>> {
        let oid = ObjectId::parse_str("65a1b2c3d4e5f60718293a4b").unwrap();
        vec![
            to_bytes(&doc! { "_id": oid, "name": "Zoë — ☃", "n": 1i32, "big": 1i64 << 40 }),
            to_bytes(&doc! {
                "_id": 2i32,
                "nested": { "a": [1i32, "two", { "three": 3.0f64 }] },
                "bin": Binary { subtype: BinarySubtype::Generic, bytes: vec![0, 1, 2, 255] },
                "when": DateTime::from_millis(1_700_000_000_123),
                "dec": "1.10".parse::<Decimal128>().unwrap(),
            }),
        ]
    }

    fn plain_meta() -> Metadata {
        Metadata {
            options: Document::new(),
            indexes: vec![
                doc! { "v": 2i32, "key": { "_id": 1i32 }, "name": "_id_" },
                doc! { "v": 2i32, "key": { "b": 1i32, "a": -1i32 }, "name": "b_1_a_-1", "unique": true },
            ],
            uuid: "0123456789abcdef0123456789abcdef".into(),
            collection_name: "people".into(),
            kind: "collection".into(),
        }
    }

    fn capped_meta() -> Metadata {
        Metadata {
            options: doc! { "capped": true, "size": 4096i64, "max": 10i32 },
            indexes: vec![doc! { "v": 2i32, "key": { "_id": 1i32 }, "name": "_id_" }],
            uuid: String::new(),
            collection_name: "log".into(),
            kind: "collection".into(),
        }
    }

    fn build() -> (Vec<u8>, Header, Vec<CollectionMetadata>, Vec<Vec<u8>>) {
        let header = Header::new("8.2.0", "backupy-agent test");
        let metas = vec![
            CollectionMetadata::new("app", &plain_meta()),
            CollectionMetadata::new("app", &capped_meta()),
        ];
        let docs = sample_docs();
        let mut w = Writer::new(Vec::new(), &header, &metas).unwrap();
        w.begin("app", "people").unwrap();
        for d in &docs {
            w.document(d).unwrap();
        }
        w.end().unwrap();
        w.begin("app", "log").unwrap();
        w.end().unwrap();
        (w.into_inner().unwrap(), header, metas, docs)
    }

    /// Takes one length-prefixed BSON document off the front of `rest`.
    fn take_doc<'a>(rest: &mut &'a [u8]) -> &'a [u8] {
        let n = i32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        let (d, r) = rest.split_at(n);
        *rest = r;
        d
    }

    fn take_terminator(rest: &mut &[u8]) {
        assert_eq!(&rest[..4], &[0xFF, 0xFF, 0xFF, 0xFF], "terminator expected");
        *rest = &rest[4..];
    }

    /// The field names and BSON element types of a document, in order.
    fn shape(d: &[u8]) -> Vec<(String, bson::spec::ElementType)> {
        RawDocument::from_bytes(d)
            .unwrap()
            .iter()
            .map(|e| {
                let (k, v) = e.unwrap();
                (k.to_string(), v.element_type())
            })
            .collect()
    }

    #[test]
    fn writer_output_has_the_published_structure_byte_by_byte() {
        use bson::spec::ElementType as T;
        let (bytes, _, metas, docs) = build();
        let mut rest: &[u8] = &bytes;

        // magic: 0x8199e26d little-endian
        assert_eq!(&rest[..4], &[0x6D, 0xE2, 0x99, 0x81]);
        assert_eq!(u32::from_le_bytes(rest[..4].try_into().unwrap()), 0x8199_e26d);
        rest = &rest[4..];

        // prelude header
        let h = take_doc(&mut rest);
        assert_eq!(
            shape(h),
            vec![
                ("concurrent_collections".into(), T::Int32),
                ("version".into(), T::String),
                ("server_version".into(), T::String),
                ("tool_version".into(), T::String),
            ]
        );
        let hd = Document::from_reader(h).unwrap();
        assert_eq!(hd.get_i32("concurrent_collections").unwrap(), 1);
        assert_eq!(hd.get_str("version").unwrap(), "0.1");
        assert_eq!(hd.get_str("server_version").unwrap(), "8.2.0");

        // one metadata entry per collection, then the terminator
        for m in &metas {
            let d = take_doc(&mut rest);
            assert_eq!(
                shape(d),
                vec![
                    ("db".into(), T::String),
                    ("collection".into(), T::String),
                    ("metadata".into(), T::String),
                    ("size".into(), T::Int32),
                    ("type".into(), T::String),
                ]
            );
            let d = Document::from_reader(d).unwrap();
            assert_eq!(d.get_str("db").unwrap(), "app");
            assert_eq!(d.get_str("collection").unwrap(), m.collection);
            assert_eq!(d.get_str("type").unwrap(), "collection");
            // metadata is canonical Extended JSON v2, keys in mongodump's order
            let json: serde_json::Value = serde_json::from_str(d.get_str("metadata").unwrap()).unwrap();
            let keys: Vec<&str> = json.as_object().unwrap().keys().map(|k| k.as_str()).collect();
            if m.collection == "people" {
                assert_eq!(keys, ["indexes", "uuid", "collectionName", "type"], "empty options omitted");
                assert_eq!(json["indexes"][1]["key"]["b"], serde_json::json!({ "$numberInt": "1" }));
                assert_eq!(json["indexes"][1]["key"]["a"], serde_json::json!({ "$numberInt": "-1" }));
                let key_order: Vec<&String> = json["indexes"][1]["key"].as_object().unwrap().keys().collect();
                assert_eq!(key_order, ["b", "a"], "compound index key order kept");
                assert_eq!(json["uuid"], "0123456789abcdef0123456789abcdef");
            } else {
                assert_eq!(keys, ["options", "indexes", "collectionName", "type"], "empty uuid omitted");
                assert_eq!(json["options"]["capped"], true);
                assert_eq!(json["options"]["size"], serde_json::json!({ "$numberLong": "4096" }));
                assert_eq!(json["options"]["max"], serde_json::json!({ "$numberInt": "10" }));
            }
        }
        take_terminator(&mut rest);

        // namespace block of app.people: header {db, collection, EOF:false, CRC:int64 0}
        let expected_header = |coll: &str, eof: bool, crc: i64| {
            let mut v = Vec::new();
            doc! { "db": "app", "collection": coll, "EOF": eof, "CRC": crc }.to_writer(&mut v).unwrap();
            v
        };
        let h = take_doc(&mut rest);
        assert_eq!(
            shape(h),
            vec![
                ("db".into(), T::String),
                ("collection".into(), T::String),
                ("EOF".into(), T::Boolean),
                ("CRC".into(), T::Int64),
            ]
        );
        assert_eq!(h, expected_header("people", false, 0).as_slice());
        // the documents, byte for byte
        for d in &docs {
            assert_eq!(take_doc(&mut rest), d.as_slice());
        }
        take_terminator(&mut rest);
        // EOF header with the CRC-64/ECMA of the concatenated documents, then terminator
        let crc = crc64_bitwise(&docs.concat()) as i64;
        assert_ne!(crc, 0);
        assert_eq!(take_doc(&mut rest), expected_header("people", true, crc).as_slice());
        take_terminator(&mut rest);

        // the empty capped collection: header, terminator, EOF header (CRC 0), terminator
        assert_eq!(take_doc(&mut rest), expected_header("log", false, 0).as_slice());
        take_terminator(&mut rest);
        assert_eq!(take_doc(&mut rest), expected_header("log", true, 0).as_slice());
        take_terminator(&mut rest);
        assert!(rest.is_empty(), "nothing after the last terminator");
    }

    #[test]
    fn reader_round_trips_the_writer() {
        let (bytes, header, metas, docs) = build();
        let mut r = Reader::new(io::Cursor::new(bytes)).unwrap();
        assert_eq!(r.header, header);
        assert_eq!(r.collections, metas);
        assert_eq!(r.databases(), ["app"]);
        assert_eq!(r.collections[0].parsed().unwrap(), plain_meta());
        assert_eq!(r.collections[1].parsed().unwrap(), capped_meta());
        let mut events = Vec::new();
        while let Some(e) = r.next_event().unwrap() {
            events.push(e);
        }
        let s = |x: &str| x.to_string();
        let raw = |b: &Vec<u8>| RawDocumentBuf::from_bytes(b.clone()).unwrap();
        assert_eq!(
            events,
            vec![
                Event::Begin { db: s("app"), collection: s("people") },
                Event::Document { db: s("app"), collection: s("people"), doc: raw(&docs[0]) },
                Event::Document { db: s("app"), collection: s("people"), doc: raw(&docs[1]) },
                Event::End { db: s("app"), collection: s("people"), documents: 2 },
                Event::Begin { db: s("app"), collection: s("log") },
                Event::End { db: s("app"), collection: s("log"), documents: 0 },
            ]
        );
        assert!(r.next_event().unwrap().is_none());
    }

    #[test]
    fn reader_accepts_interleaved_segments_as_a_parallel_mongodump_writes_them() {
        // Two namespaces interleaved in several segments; EOF headers later.
        let header = Header::new("7.0.5", "100.9.4");
        let a = plain_meta();
        let mut b = plain_meta();
        b.collection_name = "other".into();
        let metas = vec![CollectionMetadata::new("x", &a), CollectionMetadata::new("x", &b)];
        let docs = sample_docs();
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC);
        out.extend(to_bytes(&header.to_document()));
        for m in &metas {
            out.extend(to_bytes(&m.to_document()));
        }
        out.extend_from_slice(&TERMINATOR);
        let seg = |out: &mut Vec<u8>, coll: &str, d: &[u8]| {
            out.extend(to_bytes(&namespace_header("x", coll, false, 0)));
            out.extend_from_slice(d);
            out.extend_from_slice(&TERMINATOR);
        };
        seg(&mut out, "people", &docs[0]);
        seg(&mut out, "other", &docs[1]);
        seg(&mut out, "people", &docs[1]);
        let mut crc = Crc64::new();
        crc.update(&docs[0]);
        crc.update(&docs[1]);
        out.extend(to_bytes(&namespace_header("x", "people", true, crc.sum64() as i64)));
        out.extend_from_slice(&TERMINATOR);
        let crc = crc64_bitwise(&docs[1]) as i64;
        out.extend(to_bytes(&namespace_header("x", "other", true, crc)));
        out.extend_from_slice(&TERMINATOR);

        let mut r = Reader::new(io::Cursor::new(out)).unwrap();
        let mut begins = 0;
        let mut ends = Vec::new();
        let mut ndocs = 0;
        while let Some(e) = r.next_event().unwrap() {
            match e {
                Event::Begin { .. } => begins += 1,
                Event::Document { .. } => ndocs += 1,
                Event::End { collection, documents, .. } => ends.push((collection, documents)),
            }
        }
        assert_eq!(begins, 2, "a namespace begins once even when its data comes in several segments");
        assert_eq!(ndocs, 3);
        assert_eq!(ends, vec![("people".to_string(), 2), ("other".to_string(), 1)]);
    }

    fn read_all(bytes: Vec<u8>) -> io::Result<()> {
        let mut r = Reader::new(io::Cursor::new(bytes))?;
        while r.next_event()?.is_some() {}
        Ok(())
    }

    #[test]
    fn reader_rejects_corrupt_archives_with_clear_errors() {
        let (good, ..) = build();
        let err = |b: Vec<u8>| read_all(b).unwrap_err().to_string();

        let mut b = good.clone();
        b[0] = 0x00;
        assert!(err(b).contains("magic"), "bad magic");

        // A flipped byte inside a document string: the CRC no longer matches.
        let mut b = good.clone();
        let pos = b.windows(2).position(|w| w == b"Zo").unwrap();
        b[pos] = b'X';
        let e = err(b);
        assert!(e.contains("CRC mismatch for app.people"), "{e}");

        // Truncated: the last namespace never ends.
        let b = good[..good.len() - 30].to_vec();
        let e = err(b);
        assert!(e.contains("ends"), "{e}");

        // Missing the last EOF block entirely.
        let eof_log = {
            let mut v = to_bytes(&namespace_header("app", "log", true, 0));
            v.extend_from_slice(&TERMINATOR);
            v
        };
        let b = good[..good.len() - eof_log.len()].to_vec();
        let e = err(b);
        assert!(e.contains("before these namespaces were complete: app.log"), "{e}");

        // Two terminators in a row.
        let mut b = good.clone();
        b.extend_from_slice(&TERMINATOR);
        let e = err(b);
        assert!(e.contains("two terminators"), "{e}");

        // A document whose length prefix is absurd.
        let mut b = good.clone();
        b.extend_from_slice(&[3, 0, 0, 0]);
        let e = err(b);
        assert!(e.contains("neither a valid BSON length"), "{e}");
    }

    #[test]
    fn writer_refuses_misuse() {
        let mut w = Writer::new(Vec::new(), &Header::new("1.0.0", "t"), &[]).unwrap();
        assert!(w.document(&to_bytes(&doc! {})).is_err(), "document before begin");
        w.begin("a", "b").unwrap();
        assert!(w.begin("a", "c").is_err(), "nested begin");
        assert!(w.document(&[5, 0, 0, 0, 1]).is_err(), "no final NUL");
        assert!(w.document(&[6, 0, 0, 0, 0]).is_err(), "length mismatch");
        w.end().unwrap();
        assert!(w.end().is_err());
    }
}
