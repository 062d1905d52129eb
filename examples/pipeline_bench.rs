//! Benchmark of the backup pipeline (used by `scripts/bench.sh`): pushes N bytes of
//! realistic, moderately compressible dump text through dump → compress → encrypt →
//! hash → store (a discarding sink) and prints throughput, CPU time and peak RSS.
//!
//!   pipeline_bench --size 1GiB --compression zstd --encryption v2
//!   pipeline_bench --size 1GiB --emit | zstd -3 > /dev/null     (the same bytes, for the plain tools)
//!   pipeline_bench --size 1GiB --s3 BUCKET                       (store to S3: BACKUPY_TEST_S3_* env)

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::Instant;

use backupy_agent::cancel::Cancel;
use backupy_agent::crypto::{DataKey, Encryption, Identity};
use backupy_agent::pipeline::{self, Compression, Progress, Source};
use backupy_agent::secrets::Secret;
use backupy_agent::storage::s3::{S3Storage, S3Target};
use backupy_agent::storage::{Discard, ObjectWriter};

/// Generates SQL-dump-like rows: a pool of 8 MiB is built once, then served from random
/// offsets, so content never repeats within zstd's window yet costs only a memcpy.
struct DumpText {
    pool: Vec<u8>,
    remaining: u64,
    rng: u64,
}

impl DumpText {
    fn new(size: u64) -> Self {
        const WORDS: &[&str] = &[
            "alpha",
            "shipped",
            "paid",
            "customer",
            "order",
            "invoice",
            "Berlin",
            "Lisbon",
            "pending",
            "refund",
            "premium",
            "basic",
            "widget",
            "gadget",
            "example.com",
            "mail",
            "note",
            "priority",
        ];
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut pool = Vec::with_capacity(8 << 20);
        let mut id = 1u64;
        while pool.len() < 8 << 20 {
            let r = next();
            let w1 = WORDS[(r % WORDS.len() as u64) as usize];
            let w2 = WORDS[((r >> 8) % WORDS.len() as u64) as usize];
            writeln!(
                pool,
                "{id}\t{w1} {w2}\t{}.{:02}\t2026-{:02}-{:02} {:02}:{:02}:{:02}\t{:x}",
                (r >> 16) % 100_000,
                (r >> 40) % 100,
                1 + (r >> 20) % 12,
                1 + (r >> 24) % 28,
                (r >> 28) % 24,
                (r >> 32) % 60,
                (r >> 36) % 60,
                next() & 0xffff_ffff
            )
            .unwrap();
            id += 1 + (r >> 60);
        }
        Self { pool, remaining: size, rng: 0x9E37_79B9_7F4A_7C15 }
    }
}

impl Read for DumpText {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (buf.len() as u64).min(self.remaining).min(256 << 10) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let off = (self.rng % (self.pool.len() - n) as u64) as usize;
        buf[..n].copy_from_slice(&self.pool[off..off + n]);
        self.remaining -= n as u64;
        Ok(n)
    }
}

fn parse_size(s: &str) -> u64 {
    let (num, mul) = match s {
        s if s.ends_with("GiB") => (&s[..s.len() - 3], 1u64 << 30),
        s if s.ends_with("MiB") => (&s[..s.len() - 3], 1 << 20),
        s => (s, 1),
    };
    num.parse::<u64>().expect("size like 1GiB, 512MiB or a byte count") * mul
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn cpu_seconds() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we own.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: &str| -> String {
        args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or(default.into())
    };
    let size = parse_size(&arg("--size", "1GiB"));
    let mut source = DumpText::new(size);
    if args.iter().any(|a| a == "--emit") {
        let mut out = io::stdout().lock();
        io::copy(&mut source, &mut out).unwrap();
        return;
    }
    let compression = Compression::parse(&arg("--compression", "zstd")).unwrap();
    let encryption = match arg("--encryption", "v2").as_str() {
        "none" => Encryption::None,
        "v1" => Encryption::V1 { key: DataKey::generate().unwrap() },
        "v2" => Encryption::V2Recipient {
            recipient: Identity::generate().unwrap().recipient().unwrap(),
            chunk_size: backupy_agent::crypto::v2::DEFAULT_CHUNK,
        },
        other => panic!("unknown encryption {other}"),
    };
    let prepared = encryption.prepare(compression.header_code()).unwrap();
    let s3_bucket = args.iter().position(|a| a == "--s3").and_then(|i| args.get(i + 1)).cloned();
    let sink: Box<dyn ObjectWriter> = match &s3_bucket {
        None => Box::new(Discard::default()),
        Some(bucket) => {
            let env = |n: &str| std::env::var(n).unwrap_or_else(|_| panic!("{n} is not set"));
            let mut target = S3Target::new(
                env("BACKUPY_TEST_S3_ENDPOINT").parse().unwrap(),
                &env("BACKUPY_TEST_S3_REGION"),
                bucket,
                Secret::new(env("BACKUPY_TEST_S3_ACCESS_KEY")),
                Secret::new(env("BACKUPY_TEST_S3_SECRET_KEY")),
            );
            if let Some(c) = args.iter().position(|a| a == "--concurrency").and_then(|i| args.get(i + 1)) {
                target.upload_concurrency = c.parse().unwrap();
            }
            Box::new(S3Storage::new(target, None).unwrap().create("bench/object"))
        }
    };
    let t0 = Instant::now();
    let out = pipeline::run(
        Source::from_reader("generated dump", source),
        pipeline::Options::new(compression, prepared),
        sink,
        &Cancel::default(),
        Arc::new(Progress::default()),
    )
    .unwrap();
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "sink={} compression={} encryption={} input_mib={} stored_mib={:.1} ratio={:.2} seconds={:.2} mib_per_s={:.0} cpu_s={:.2} peak_rss_mib={:.1}",
        if s3_bucket.is_some() { "s3" } else { "discard" },
        compression.name(),
        encryption.label(),
        size >> 20,
        out.stored_bytes as f64 / (1 << 20) as f64,
        size as f64 / out.stored_bytes.max(1) as f64,
        secs,
        (size >> 20) as f64 / secs,
        cpu_seconds(),
        status_kib("VmHWM:") as f64 / 1024.0
    );
}
