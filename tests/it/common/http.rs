//! HTTP on loopback for the tests: GETs of the agent's endpoints, the samples of a
//! Prometheus scrape, and a receiver that records what the agent sends (pings, webhooks).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_parse::{Scrape, Value};

/// GET `url`: (status, body), or (0, "") when nothing answered within 5 s.
pub fn get(url: &str) -> (u16, String) {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .new_agent();
    match agent.get(url).call() {
        Ok(mut r) => (r.status().as_u16(), r.body_mut().read_to_string().unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

/// The value of the sample of `metric` with these labels (a histogram's count).
pub fn value(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .find(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(buckets) => buckets.iter().map(|b| b.count).fold(0.0, f64::max),
            Value::Summary(_) => f64::NAN,
        })
}

/// What a [`receiver`] was sent: (method, URL, body) in order.
pub type Seen = Arc<Mutex<Vec<(String, String, String)>>>;

/// A server on 127.0.0.1 that records every request and answers 200 "OK"; its base URL.
pub fn receiver() -> (String, Seen) {
    let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
    let addr = server.server_addr().to_ip().unwrap();
    let seen: Seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    std::thread::spawn(move || {
        while let Ok(mut req) = server.recv() {
            let mut body = String::new();
            let _ = req.as_reader().read_to_string(&mut body);
            // A test that failed holding the list has reported that already.
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
