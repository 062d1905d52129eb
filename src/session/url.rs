//! The control-plane URL rules of wire-v1.md ("Transport"): which schemes are accepted,
//! and the default path. Pure parsing, no I/O; the caller passes the dev flag in.

use std::fmt;

/// Path used when `BACKUPY_SERVER_URL` has no path (or only `/`).
pub const DEFAULT_PATH: &str = "/v1/agents/connect";

/// Where the session connects: a `wss://` (or, in dev mode, `ws://`) URL and its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The WebSocket URL, scheme `wss` or `ws`, path filled in.
    pub url: String,
    /// Host name or IP address, without the brackets of an IPv6 literal.
    pub host: String,
    pub port: u16,
    /// The path and query sent on the upgrade request.
    pub resource: String,
    /// True for `wss`.
    pub tls: bool,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("BACKUPY_SERVER_URL {url:?} is not a URL: {reason}")]
    Invalid { url: String, reason: String },
    #[error("BACKUPY_SERVER_URL {url:?}: scheme {scheme:?} is not supported; use wss:// or https://")]
    Scheme { url: String, scheme: String },
    #[error(
        "BACKUPY_SERVER_URL {url:?} is not encrypted; use wss:// or https://, or set BACKUPY_DEV_ALLOW_INSECURE=true for development"
    )]
    Insecure { url: String },
    #[error("BACKUPY_SERVER_URL {url:?} has no host")]
    NoHost { url: String },
}

impl Endpoint {
    /// Applies the wire-v1.md URL rules: `wss://` and `https://` (→ `wss://`) always,
    /// `ws://` and `http://` (→ `ws://`) only when `allow_insecure`; no path or `/` →
    /// [`DEFAULT_PATH`], any other path as given.
    pub fn parse(raw: &str, allow_insecure: bool) -> Result<Endpoint, UrlError> {
        let raw = raw.trim();
        let mut url = url::Url::parse(raw)
            .map_err(|e| UrlError::Invalid { url: raw.to_string(), reason: e.to_string() })?;
        let tls = match url.scheme() {
            "wss" | "https" => true,
            "ws" | "http" if allow_insecure => false,
            "ws" | "http" => return Err(UrlError::Insecure { url: raw.to_string() }),
            other => {
                return Err(UrlError::Scheme { url: raw.to_string(), scheme: other.to_string() });
            }
        };
        // Both are special schemes, so the url crate allows the switch.
        let _ = url.set_scheme(if tls { "wss" } else { "ws" });
        if url.path().is_empty() || url.path() == "/" {
            url.set_path(DEFAULT_PATH);
        }
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| UrlError::NoHost { url: raw.to_string() })?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = url.port_or_known_default().unwrap_or(if tls { 443 } else { 80 });
        let resource = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_string(),
        };
        Ok(Endpoint { url: url.to_string(), host, port, resource, tls })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str, insecure: bool) -> Endpoint {
        Endpoint::parse(raw, insecure).unwrap()
    }

    #[test]
    fn wss_without_path_gets_the_default_path() {
        let e = ok("wss://cp.example.com", false);
        assert_eq!(e.url, "wss://cp.example.com/v1/agents/connect");
        assert_eq!((e.host.as_str(), e.port, e.tls), ("cp.example.com", 443, true));
        assert_eq!(e.resource, "/v1/agents/connect");
    }

    #[test]
    fn https_becomes_wss_and_slash_gets_the_default_path() {
        let e = ok("https://cp.example.com:8443/", false);
        assert_eq!(e.url, "wss://cp.example.com:8443/v1/agents/connect");
        assert_eq!(e.port, 8443);
    }

    #[test]
    fn a_given_path_is_kept_as_is() {
        let e = ok("wss://cp.example.com/custom/ws?x=1", false);
        assert_eq!(e.url, "wss://cp.example.com/custom/ws?x=1");
        assert_eq!(e.resource, "/custom/ws?x=1");
    }

    #[test]
    fn insecure_schemes_need_the_dev_flag() {
        for raw in ["ws://127.0.0.1:9000", "http://127.0.0.1:9000/"] {
            assert!(matches!(Endpoint::parse(raw, false), Err(UrlError::Insecure { .. })));
            let e = ok(raw, true);
            assert_eq!(e.url, "ws://127.0.0.1:9000/v1/agents/connect");
            assert!(!e.tls);
        }
        assert_eq!(ok("http://h", true).port, 80);
    }

    #[test]
    fn other_schemes_and_garbage_are_refused() {
        assert!(matches!(Endpoint::parse("ftp://h", true), Err(UrlError::Scheme { .. })));
        assert!(matches!(Endpoint::parse("cp.example.com", true), Err(UrlError::Invalid { .. })));
    }

    #[test]
    fn ipv6_hosts_lose_their_brackets() {
        let e = ok("wss://[::1]:9443", false);
        assert_eq!((e.host.as_str(), e.port), ("::1", 9443));
    }
}
