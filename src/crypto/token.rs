//! Decryption tokens: JWTs issued by the control plane that carry a raw data key.
//!
//! The signature cannot be checked offline (the verification key stays on the server),
//! so this module only decodes and validates the claims; `backupy-decrypt --help` says so.

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD};
use serde::Deserialize;
use zeroize::Zeroizing;

use super::DataKey;

const LEEWAY_SECS: i64 = 60;

#[derive(Debug, thiserror::Error)]
#[error("invalid decryption token: {0}")]
pub struct TokenError(String);

#[derive(Deserialize)]
struct Claims {
    iss: Option<String>,
    aud: Option<Audience>,
    exp: Option<i64>,
    sub: Option<String>,
    run_id: Option<String>,
    company_id: Option<String>,
    dek: Option<String>,
    alg: Option<String>,
    sha256: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

/// What a valid token gives the decryptor.
pub struct Token {
    pub key: DataKey,
    pub run_id: String,
    /// Lower-case hex SHA-256 of the whole object, when the token carries one.
    pub sha256: Option<String>,
}

/// Decodes and validates a token against the current time (Unix seconds).
pub fn parse(jwt: &str, now_unix: i64) -> Result<Token, TokenError> {
    let err = |m: &str| TokenError(m.to_string());
    let parts: Vec<&str> = jwt.trim().split('.').collect();
    if parts.len() != 3 {
        return Err(err("a token has three dot-separated parts (header.payload.signature)"));
    }
    let payload = URL_SAFE_NO_PAD
        .decode(parts.get(1).copied().unwrap_or_default().trim_end_matches('='))
        .map_err(|_| err("the payload is not base64url"))?;
    let payload = Zeroizing::new(payload);
    let claims: Claims = serde_json::from_slice(&payload)
        .map_err(|e| TokenError(format!("the payload is not valid JSON claims: {e}")))?;
    if claims.iss.as_deref() != Some("backupy-server") {
        return Err(err("issuer (iss) is not backupy-server"));
    }
    let aud_ok = match &claims.aud {
        Some(Audience::One(a)) => a == "backupy-decrypt",
        Some(Audience::Many(v)) => v.iter().any(|a| a == "backupy-decrypt"),
        None => false,
    };
    if !aud_ok {
        return Err(err("audience (aud) is not backupy-decrypt: this token is for something else"));
    }
    let exp = claims.exp.ok_or_else(|| err("no expiry (exp) claim"))?;
    if now_unix > exp + LEEWAY_SECS {
        let when = chrono::DateTime::from_timestamp(exp, 0)
            .map(|t| t.to_rfc3339())
            .unwrap_or_else(|| exp.to_string());
        return Err(TokenError(format!("the token expired at {when}; ask for a new one")));
    }
    for (name, v) in [("sub", &claims.sub), ("run_id", &claims.run_id), ("company_id", &claims.company_id)] {
        if v.as_deref().is_none_or(str::is_empty) {
            return Err(TokenError(format!("claim {name} is missing or empty")));
        }
    }
    if claims.alg.as_deref() != Some("AES-256-GCM") {
        return Err(err("claim alg is not AES-256-GCM: this token is for another format"));
    }
    let dek = Zeroizing::new(
        B64.decode(claims.dek.as_deref().ok_or_else(|| err("no data key (dek) claim"))?)
            .map_err(|_| err("claim dek is not base64"))?,
    );
    let key = DataKey::from_slice(&dek).map_err(|_| err("claim dek is not a 32-byte key"))?;
    let sha256 = match claims.sha256 {
        Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => Some(h.to_ascii_lowercase()),
        Some(_) => return Err(err("claim sha256 is not 64 hex digits")),
        None => None,
    };
    Ok(Token { key, run_id: claims.run_id.unwrap_or_default(), sha256 })
}
