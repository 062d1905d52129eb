//! The S3 server of scripts/services.sh (s3s-fs, SigV4 checked) and a fault-injecting
//! loopback proxy in front of it. The proxy's threads never panic and never poison its
//! lock: an upstream failure is answered with 502, which the test then sees.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use backupy_agent::secrets::Secret;
use backupy_agent::storage::s3::{RetryPolicy, S3Target, Timeouts};

pub struct S3Env {
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    pub region: String,
    pub dir: PathBuf,
}

pub fn s3_env() -> S3Env {
    let var = |n: &str| {
        std::env::var(n).unwrap_or_else(|_| {
            panic!(
                "{n} is not set: these tests need the S3 server; run scripts/test.sh, or \
                 `source scripts/services.sh; services_init; services_start_s3` in the shell that runs cargo test"
            )
        })
    };
    S3Env {
        endpoint: var("BACKUPY_TEST_S3_ENDPOINT"),
        access_key: var("BACKUPY_TEST_S3_ACCESS_KEY"),
        secret_key: var("BACKUPY_TEST_S3_SECRET_KEY"),
        region: var("BACKUPY_TEST_S3_REGION"),
        dir: PathBuf::from(var("BACKUPY_TEST_S3_DIR")),
    }
}

/// Creates a fresh bucket (s3s-fs maps a bucket to a directory) and returns its name.
pub fn new_bucket(env: &S3Env, tag: &str) -> String {
    let name = format!("t-{tag}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    std::fs::create_dir_all(env.dir.join(&name)).unwrap();
    name
}

pub fn target(env: &S3Env, endpoint: &str, bucket: &str) -> S3Target {
    let mut t = S3Target::new(
        endpoint.parse().unwrap(),
        &env.region,
        bucket,
        Secret::new(env.access_key.clone()),
        Secret::new(env.secret_key.clone()),
    );
    t.part_size = 5 << 20;
    t.retry = RetryPolicy {
        attempts: 4,
        base_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(200),
    };
    t.timeouts = Timeouts { connect: Duration::from_secs(2), idle: Duration::from_secs(2) };
    t
}

/// A presigned single-PUT URL for `bucket/key`, as a control plane hands one out.
pub fn presign_put(env: &S3Env, bucket: &str, key: &str, ttl: Duration) -> String {
    use rusty_s3::S3Action as _;
    let b = rusty_s3::Bucket::new(
        env.endpoint.parse().unwrap(),
        rusty_s3::UrlStyle::Path,
        bucket.to_string(),
        env.region.clone(),
    )
    .unwrap();
    let creds = rusty_s3::Credentials::new(env.access_key.clone(), env.secret_key.clone());
    b.put_object(Some(&creds), key).sign(ttl).to_string()
}

/// Multipart uploads s3s-fs still holds for `bucket`. It keeps `.upload-<id>.json` per
/// open upload, and names the bucket (base64url) in the upload's metadata file
/// `.bucket-<b64>.object-<b64>.upload-<id>.metadata.json`.
pub fn open_uploads(env: &S3Env, bucket: &str) -> Vec<String> {
    use base64::Engine as _;
    let names: Vec<String> = std::fs::read_dir(&env.dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let tag = format!(".bucket-{}.", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bucket));
    names
        .iter()
        .filter_map(|n| n.strip_prefix(".upload-").and_then(|r| r.strip_suffix(".json")))
        .filter(|id| names.iter().any(|m| m.starts_with(&tag) && m.contains(&format!(".upload-{id}."))))
        .map(str::to_string)
        .collect()
}

#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub url: String,
    /// Lower-cased header names with their values.
    pub headers: Vec<(String, String)>,
}

pub enum Fault {
    Forward,
    Status(u16),
    /// Answer nothing for this long, then drop the connection.
    Stall(Duration),
}

type Rule = Box<dyn Fn(&Seen, usize) -> Fault + Send + Sync>;

/// A loopback HTTP proxy that forwards to the S3 server unchanged (Host header included,
/// so SigV4 signatures stay valid) unless `rule(request, n-th matching call)` says to fail.
pub struct FaultProxy {
    pub endpoint: String,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    server: Arc<tiny_http::Server>,
}

impl FaultProxy {
    pub fn start(upstream: &str, rule: impl Fn(&Seen, usize) -> Fault + Send + Sync + 'static) -> Self {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
        let port = server.server_addr().to_ip().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let upstream = upstream.trim_start_matches("http://").trim_end_matches('/').to_string();
        let rule: Arc<Rule> = Arc::new(Box::new(rule));
        for _ in 0..6 {
            let (server, seen, upstream, rule) =
                (server.clone(), seen.clone(), upstream.clone(), rule.clone());
            std::thread::spawn(move || {
                while let Ok(req) = server.recv() {
                    handle(req, &upstream, &seen, &rule);
                }
            });
        }
        Self { endpoint: format!("http://127.0.0.1:{port}"), seen, server }
    }

    pub fn requests(&self) -> Vec<Seen> {
        lock(&self.seen).clone()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.server.unblock();
    }
}

/// The list even if a thread panicked holding it: that panic is reported already.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn handle(mut req: tiny_http::Request, upstream: &str, seen: &Mutex<Vec<Seen>>, rule: &Rule) {
    let info = Seen {
        method: req.method().to_string(),
        url: req.url().to_string(),
        headers: req
            .headers()
            .iter()
            .map(|h| (h.field.as_str().as_str().to_ascii_lowercase(), h.value.as_str().to_string()))
            .collect(),
    };
    let n = {
        let mut s = lock(seen);
        s.push(info.clone());
        s.iter().filter(|x| x.method == info.method && x.url == info.url).count()
    };
    let mut body = Vec::new();
    let _ = req.as_reader().read_to_end(&mut body);
    match rule(&info, n) {
        Fault::Status(code) => {
            let _ = req.respond(
                tiny_http::Response::from_string("<Error><Code>InternalError</Code></Error>")
                    .with_status_code(code),
            );
        }
        Fault::Stall(d) => {
            std::thread::sleep(d);
            drop(req);
        }
        Fault::Forward => {
            let response = forward(&req, &body, upstream, info.method == "HEAD").unwrap_or_else(|e| {
                tiny_http::Response::new(
                    tiny_http::StatusCode(502),
                    Vec::new(),
                    std::io::Cursor::new(format!("test proxy: upstream {upstream}: {e}").into_bytes()),
                    None,
                    None,
                )
            });
            let _ = req.respond(response);
        }
    }
}

type Reply = tiny_http::Response<std::io::Cursor<Vec<u8>>>;

/// Sends the request to the S3 server as it came (one connection per request) and
/// returns its answer.
fn forward(req: &tiny_http::Request, body: &[u8], upstream: &str, is_head: bool) -> std::io::Result<Reply> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let mut up = TcpStream::connect(upstream)?;
    let mut head = format!("{} {} HTTP/1.1\r\n", req.method(), req.url());
    for h in req.headers() {
        let name = h.field.as_str().as_str();
        if name.eq_ignore_ascii_case("connection")
            || name.eq_ignore_ascii_case("transfer-encoding")
            || name.eq_ignore_ascii_case("content-length")
        {
            continue;
        }
        head.push_str(&format!("{}: {}\r\n", name, h.value.as_str()));
    }
    head.push_str(&format!("Content-Length: {}\r\nConnection: close\r\n\r\n", body.len()));
    up.write_all(head.as_bytes())?;
    up.write_all(body)?;
    let mut raw = Vec::new();
    up.read_to_end(&mut raw)?;
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let off = match resp.parse(&raw) {
        Ok(httparse::Status::Complete(off)) => off,
        _ => return Err(bad("an incomplete HTTP response")),
    };
    let status = resp.code.unwrap_or(502);
    let mut out_headers = Vec::new();
    let mut content_length = None;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            content_length = std::str::from_utf8(h.value).ok().and_then(|v| v.parse::<usize>().ok());
            continue;
        }
        if h.name.eq_ignore_ascii_case("connection") || h.name.eq_ignore_ascii_case("transfer-encoding") {
            continue;
        }
        out_headers
            .push(tiny_http::Header::from_bytes(h.name.as_bytes(), h.value).map_err(|()| bad("a header"))?);
    }
    let body = raw[off..].to_vec();
    let len = if is_head { content_length.unwrap_or(0) } else { body.len() };
    let response = tiny_http::Response::new(
        tiny_http::StatusCode(status),
        out_headers,
        std::io::Cursor::new(if is_head { Vec::new() } else { body }),
        Some(len),
        None,
    );
    // A HEAD answer announces the object's length without a body.
    Ok(if is_head { response.with_chunked_threshold(usize::MAX) } else { response })
}
