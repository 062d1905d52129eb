//! Issue 17, defects 6, 11 and 12, against a local HTTP receiver: a `notify_url` with a
//! query gets `/start` and `/fail` in its path with the query kept; the webhook payload
//! carries host, agent version, start and end (RFC 3339 UTC) and, under `run`, the
//! health probes' state.

use std::sync::{Arc, Mutex};

use crate::common::*;

type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

/// A receiver on 127.0.0.1 that records (method, URL, body) and answers 200.
fn receiver() -> (String, Seen) {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let addr = server.server_addr().to_ip().unwrap();
    let seen: Seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    std::thread::spawn(move || {
        while let Ok(mut req) = server.recv() {
            let mut body = String::new();
            let _ = req.as_reader().read_to_string(&mut body);
            s.lock().unwrap_or_else(|e| e.into_inner()).push((
                req.method().to_string(),
                req.url().to_string(),
                body,
            ));
            let _ = req.respond(tiny_http::Response::from_string("OK"));
        }
    });
    (format!("http://{addr}"), seen)
}

fn config(dir: &std::path::Path, head: &str, jobs: &str) -> std::path::PathBuf {
    rusqlite::Connection::open(dir.join("app.db")).unwrap().execute_batch("CREATE TABLE t(x);").unwrap();
    let p = dir.join("backupy.toml");
    std::fs::write(
        &p,
        format!(
            "{head}[storage]\ndir = \"./backups\"\n[[targets]]\nid = \"app\"\ntype = \"sqlite\"\npath = \"app.db\"\n\
             [[targets]]\nid = \"gone\"\ntype = \"sqlite\"\npath = \"missing.db\"\n{jobs}"
        ),
    )
    .unwrap();
    p
}

#[test]
fn pings_keep_the_query_after_start_and_fail_and_the_webhook_says_host_version_and_times() {
    let (base, seen) = receiver();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        "",
        &format!(
            "[[jobs]]\nid = \"good\"\ntarget = \"app\"\nencryption = \"none\"\nnotify_url = \"{base}/ping/good?k=1&rid=a%2Fb\"\n\
             webhook_url = \"{base}/hook?token=t\"\nwebhook_on = \"always\"\n\
             [[jobs]]\nid = \"bad\"\ntarget = \"gone\"\nencryption = \"none\"\nnotify_url = \"{base}/ping/bad/?k=2\"\n\
             webhook_url = \"{base}/hook?token=t\"\n"
        ),
    );
    let mut c = agent();
    c.args(["backup", "--config"]).arg(&cfg);
    let out = run(c);
    assert_eq!(out.status.code(), Some(1), "the failing job fails the command: {}", text(&out.stderr));
    let seen = seen.lock().unwrap().clone();
    let calls: Vec<(&str, &str)> = seen.iter().map(|(m, u, _)| (m.as_str(), u.as_str())).collect();
    assert_eq!(
        calls,
        vec![
            ("GET", "/ping/good/start?k=1&rid=a%2Fb"),
            ("GET", "/ping/good?k=1&rid=a%2Fb"),
            ("POST", "/hook?token=t"),
            ("GET", "/ping/bad/start?k=2"),
            ("GET", "/ping/bad/fail?k=2"),
            ("POST", "/hook?token=t"),
        ]
    );
}
