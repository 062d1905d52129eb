//! Standalone notifications (connected mode leaves them to the control plane): a
//! dead-man's-switch URL pinged on start (`<url>/start`), success (`<url>`) and failure
//! (`<url>/fail`) — the healthchecks.io convention; the suffix goes into the URL's path,
//! before its query — and a webhook that POSTs a JSON summary of the run ([`Summary`]:
//! job, run, status, host, agent version, start and end in RFC 3339 UTC, the health
//! probes' state) on failure (or always). Each request is tried a few times with a short
//! timeout; a notification never changes the backup's outcome. Runs on the run's thread.

use std::time::Duration;

use serde::Serialize;

const ATTEMPTS: u32 = 3;
/// 0.5 s after the first failure, 1 s after the second.
const BACKOFF: crate::retry::Backoff =
    crate::retry::Backoff::new(Duration::from_millis(500), Duration::from_secs(1));
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Notify {
    /// Dead-man's-switch base URL.
    pub ping_url: Option<String>,
    pub webhook_url: Option<String>,
    /// POST the webhook after every run, not only after failures.
    pub webhook_always: bool,
}

/// The webhook's JSON body; the user guide documents it field by field.
#[derive(Debug, Serialize)]
pub struct Summary<'a> {
    pub job: &'a str,
    pub target: &'a str,
    pub run_id: &'a str,
    /// `success`, `failed` or `cancelled`.
    pub status: &'a str,
    pub size_bytes: u64,
    pub duration_seconds: f64,
    pub error: &'a str,
    pub object: &'a str,
    /// The agent's host name (the kernel's).
    pub host: &'a str,
    pub agent_version: &'a str,
    /// When the run started and ended (hooks included), RFC 3339 UTC.
    pub started_at: String,
    pub finished_at: String,
    /// The state of every `[[health_checks]]` probe when the run ended.
    pub health_checks: Vec<crate::health::ProbeState>,
}

/// Pings `<ping_url>/start`.
pub fn started(n: &Notify) {
    if let Some(url) = &n.ping_url {
        send("GET", &ping_url(url, Some("start")), None);
    }
}

/// Pings success or failure and POSTs the webhook as configured.
pub fn finished(n: &Notify, summary: &Summary<'_>) {
    if let Some(url) = &n.ping_url {
        let suffix = (summary.status != "success").then_some("fail");
        send("GET", &ping_url(url, suffix), None);
    }
    if let Some(url) = &n.webhook_url
        && (n.webhook_always || summary.status != "success")
    {
        match serde_json::to_vec(summary) {
            Ok(body) => send("POST", url, Some(&body)),
            Err(e) => log::warn!("cannot encode the webhook body: {e}"),
        }
    }
}

/// `base` with `suffix` as one more path segment, its query kept after it
/// (`https://hc/ping/x?k=1` → `https://hc/ping/x/fail?k=1`); `base` itself, without a
/// trailing slash, when there is no suffix.
pub fn ping_url(base: &str, suffix: Option<&str>) -> String {
    let Some(suffix) = suffix else { return base.trim_end_matches('/').to_string() };
    match url::Url::parse(base) {
        Ok(mut url) if !url.cannot_be_a_base() => {
            if let Ok(mut path) = url.path_segments_mut() {
                path.pop_if_empty().push(suffix);
            }
            url.to_string()
        }
        // config.rs only lets http(s) URLs through, which always have a path.
        _ => format!("{}/{suffix}", base.trim_end_matches('/')),
    }
}

fn send(method: &str, url: &str, body: Option<&[u8]>) {
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(TIMEOUT))
        .build()
        .new_agent();
    let shown = crate::secrets::redact_urls(url);
    let _ = crate::retry::run(
        ATTEMPTS,
        BACKOFF,
        |attempt| {
            let result = match body {
                Some(b) => agent.post(url).header("Content-Type", "application/json").send(b),
                None => agent.get(url).call(),
            };
            match result {
                Ok(resp) if resp.status().is_success() => return Ok(()),
                Ok(resp) => log::warn!(
                    "notification {method} {shown}: HTTP {} (attempt {attempt})",
                    resp.status().as_u16()
                ),
                Err(e) => log::warn!(
                    "notification {method} {shown}: {} (attempt {attempt})",
                    crate::secrets::redact_urls(&e.to_string())
                ),
            }
            Err(())
        },
        |_, _, _| true,
    );
}

#[cfg(test)]
mod tests {
    use super::ping_url;

    #[test]
    fn the_suffix_goes_into_the_path_before_the_query() {
        assert_eq!(ping_url("https://hc/ping/x?k=1", Some("fail")), "https://hc/ping/x/fail?k=1");
        assert_eq!(ping_url("https://hc/ping/x/?k=1", Some("start")), "https://hc/ping/x/start?k=1");
        assert_eq!(ping_url("https://hc/ping/x/", Some("fail")), "https://hc/ping/x/fail");
        assert_eq!(ping_url("https://hc/ping/x?k=1", None), "https://hc/ping/x?k=1");
        assert_eq!(ping_url("https://hc/ping/x/", None), "https://hc/ping/x");
    }
}
