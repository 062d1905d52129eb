//! Health probes against real servers started here: HTTP status rules, no redirects,
//! timeouts honoured, HTTPS trusted only with BACKUPY_CA_FILE, TCP connect; and the
//! probe thread feeding the metrics.

use crate::common;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use backupy_agent::config::HealthCheck;
use backupy_agent::health::{self, probe};
use backupy_agent::metrics::Metrics;

/// A loopback HTTP server: `/ok` 200, `/fail` 500, `/moved` 302, `/slow` after 3 s.
fn http_server() -> String {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let addr = server.server_addr().to_ip().unwrap();
    let server = std::sync::Arc::new(server);
    for _ in 0..4 {
        let server = server.clone();
        std::thread::spawn(move || {
            while let Ok(req) = server.recv() {
                let resp = match req.url() {
                    "/ok" => tiny_http::Response::from_string("fine").with_status_code(200),
                    "/fail" => tiny_http::Response::from_string("broken").with_status_code(500),
                    "/moved" => tiny_http::Response::from_string("")
                        .with_status_code(302)
                        .with_header(tiny_http::Header::from_bytes(&b"Location"[..], &b"/ok"[..]).unwrap()),
                    "/slow" => {
                        std::thread::sleep(Duration::from_secs(3));
                        tiny_http::Response::from_string("late").with_status_code(200)
                    }
                    _ => tiny_http::Response::from_string("?").with_status_code(404),
                };
                let _ = req.respond(resp);
            }
        });
    }
    format!("http://{addr}")
}

fn check(kind: &str, target: &str, timeout: Duration, expected: u32) -> HealthCheck {
    HealthCheck {
        id: "c".into(),
        name: String::new(),
        kind: kind.into(),
        target: target.into(),
        interval: Duration::from_secs(1),
        timeout,
        expected_status: expected,
    }
}

#[test]
fn http_status_must_be_2xx_or_the_expected_one_and_redirects_are_not_followed() {
    let base = http_server();
    let t = Duration::from_secs(5);
    let r = probe(&check("http", &format!("{base}/ok"), t, 0), None);
    assert!(r.ok && r.status_code == 200, "{r:?}");
    let r = probe(&check("http", &format!("{base}/fail"), t, 0), None);
    assert!(!r.ok && r.status_code == 500 && r.error.contains("expected 2xx"), "{r:?}");
    let r = probe(&check("http", &format!("{base}/fail"), t, 500), None);
    assert!(r.ok, "expected_status 500 accepts a 500: {r:?}");
    let r = probe(&check("http", &format!("{base}/ok"), t, 204), None);
    assert!(!r.ok && r.error.contains("expected 204"), "{r:?}");
    let r = probe(&check("http", &format!("{base}/moved"), t, 0), None);
    assert!(!r.ok && r.status_code == 302, "a redirect is reported, not followed: {r:?}");
}

#[test]
fn a_slow_handler_fails_within_a_second_of_the_timeout() {
    let base = http_server();
    let r = probe(&check("http", &format!("{base}/slow"), Duration::from_secs(1), 0), None);
    assert!(!r.ok, "{r:?}");
    assert!(r.latency >= Duration::from_secs(1) && r.latency < Duration::from_secs(2), "{:?}", r.latency);
}

#[test]
fn tcp_checks_connect_to_listeners_and_fail_on_closed_ports() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let open = listener.local_addr().unwrap().to_string();
    let r = probe(&check("tcp", &open, Duration::from_secs(2), 0), None);
    assert!(r.ok && r.status_code == 0, "{r:?}");
    let (closed, _closed_claim) = common::reserve_port();
    let closed = format!("127.0.0.1:{closed}");
    let r = probe(&check("tcp", &closed, Duration::from_secs(2), 0), None);
    assert!(!r.ok && r.error.contains("connect"), "{r:?}");
}

#[test]
fn https_with_a_self_signed_certificate_is_refused_until_its_ca_is_given() {
    let base = http_server();
    let certs = tempfile::tempdir().unwrap();
    common::make_certs(certs.path());
    let (port, _port_claim) = common::reserve_port();
    let mut socat = std::process::Command::new("socat")
        .arg(format!(
            "openssl-listen:{port},bind=127.0.0.1,reuseaddr,fork,verify=0,cert={}",
            certs.path().join("server.pem").display()
        ))
        .arg(format!("tcp:{}", base.trim_start_matches("http://")))
        .spawn()
        .expect("socat is needed: apt-get install socat (scripts/install-deps.sh core)");
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(10), "socat did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let c = check("https", &format!("https://127.0.0.1:{port}/ok"), Duration::from_secs(5), 0);
    let refused = probe(&c, None);
    let accepted = probe(&c, Some(&certs.path().join("ca.pem")));
    let _ = socat.kill();
    let _ = socat.wait();
    assert!(!refused.ok && refused.status_code == 0, "{refused:?}");
    assert!(accepted.ok && accepted.status_code == 200, "{accepted:?}");
}

#[test]
fn the_probe_thread_updates_the_metrics() {
    let base = http_server();
    let metrics = Metrics::new().unwrap();
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut up = check("http", &format!("{base}/ok"), Duration::from_secs(2), 0);
    up.id = "up".into();
    let mut down = check("http", &format!("{base}/fail"), Duration::from_secs(2), 0);
    down.id = "down".into();
    let stop = health::start(vec![up, down], metrics.clone(), None, Some(tx)).unwrap();
    let mut seen = std::collections::HashSet::new();
    while seen.len() < 2 {
        let r = rx.recv_timeout(Duration::from_secs(5)).expect("a probe result");
        seen.insert(r.check_id);
    }
    drop(stop);
    assert_eq!(metrics.health_check_up.with_label_values(&["up"]).get(), 1.0);
    assert_eq!(metrics.health_check_up.with_label_values(&["down"]).get(), 0.0);
    assert!(metrics.health_check_duration_seconds.with_label_values(&["up"]).get_sample_count() >= 1);
}
