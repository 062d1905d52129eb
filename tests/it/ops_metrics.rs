//! Issue 17, against the real `backupy-agent run`: the metrics an operator's alerts read
//! survive a restart (restored from `state.db`) and exist at 0 from the start; `/readyz`
//! turns 503 as soon as a shutdown begins; the health probes log a change of state once
//! and show their state in `/readyz`'s body.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use crate::common::*;
use prometheus_parse::{Scrape, Value};

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

/// A `run` of `config` with its metrics on a port of its own and its stderr in `log`.
pub struct Agent {
    pub child: Child,
    pub addr: String,
    pub log: PathBuf,
    _port: PortClaim,
}

impl Agent {
    pub fn start(config: &Path, log: &Path, env: &[(&str, &str)]) -> Agent {
        let (port, claim) = reserve_port();
        let addr = format!("127.0.0.1:{port}");
        let mut c = agent();
        c.args(["run", "--config"])
            .arg(config)
            .env("BACKUPY_METRICS_LISTEN_ADDR", &addr)
            .stderr(std::fs::File::create(log).unwrap());
        for (k, v) in env {
            c.env(k, v);
        }
        Agent { child: c.spawn().unwrap(), addr, log: log.to_path_buf(), _port: claim }
    }

    /// Waits until `done` holds for a scrape of /metrics, and returns that scrape.
    pub fn scrape_until(&mut self, what: &str, done: impl Fn(&Scrape) -> bool) -> Scrape {
        let t0 = Instant::now();
        loop {
            let (status, body) = get(&format!("http://{}/metrics", self.addr));
            if status == 200 {
                let s = Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
                if done(&s) {
                    return s;
                }
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("the agent exited ({status}) before {what}:\n{}", log_tail(&self.log));
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "no {what} within 30 s:\n{}",
                log_tail(&self.log)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// SIGTERM (twice: no grace), then waits for the exit.
    pub fn stop(mut self) -> String {
        self.signal(libc::SIGTERM);
        std::thread::sleep(Duration::from_millis(50));
        self.signal(libc::SIGTERM);
        let t0 = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            if t0.elapsed() > Duration::from_secs(20) {
                let _ = self.child.kill();
                panic!("the agent did not stop:\n{}", log_tail(&self.log));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::fs::read_to_string(&self.log).unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
