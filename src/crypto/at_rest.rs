//! Encryption of connected-mode state at rest (agent.md "Security": "state at rest is
//! encrypted with a key derived from [the agent key] (HKDF)").
//!
//! What goes through it: outbox envelopes (a BackupCompleted in raw-key mode carries the
//! data key itself), the persisted control-plane config (database passwords), and the
//! temporary S3 credentials a run keeps so that its upload can be aborted after a crash.
//! Each record is sealed on its own with AES-256-GCM under a fresh random nonce, with a
//! label as associated data so a record cannot be moved to another purpose. Owns no thread.

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use hkdf::Hkdf;
use sha2::Sha256;

use crate::secrets::Secret;

const SALT: &[u8] = b"backupy-agent state at rest";
const INFO: &[u8] = b"backupy state v1 aes-256-gcm";
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// Seals and opens state records with the key derived from the agent key.
#[derive(Clone)]
pub struct StateCipher {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for StateCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateCipher(..)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AtRestError {
    #[error(
        "a {label} record in the state database cannot be decrypted: it was written with another agent key, or it is damaged"
    )]
    Open { label: String },
    #[error("cannot draw random bytes for state encryption: {0}")]
    Random(String),
}

impl StateCipher {
    pub fn from_agent_key(key: &Secret) -> Self {
        let hk = Hkdf::<Sha256>::new(Some(SALT), key.expose().as_bytes());
        let mut okm = zeroize::Zeroizing::new([0u8; 32]);
        // A constant 32-byte output, which HKDF-SHA256 always accepts.
        #[allow(clippy::expect_used)]
        hk.expand(INFO, okm.as_mut()).expect("32 bytes is a valid HKDF-SHA256 output length");
        Self { cipher: Aes256Gcm::new((&*okm).into()) }
    }

    /// `nonce ‖ ciphertext ‖ tag`.
    pub fn seal(&self, label: &str, plaintext: &[u8]) -> Result<Vec<u8>, AtRestError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| AtRestError::Random(e.to_string()))?;
        let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let tag = self
            .cipher
            .encrypt_inout_detached(
                &Nonce::from(nonce),
                label.as_bytes(),
                out.get_mut(NONCE_LEN..).unwrap_or_default().into(),
            )
            .map_err(|_| AtRestError::Random("AES-GCM refused the record".into()))?;
        out.extend_from_slice(&tag);
        Ok(out)
    }

    pub fn open(&self, label: &str, sealed: &[u8]) -> Result<Vec<u8>, AtRestError> {
        let fail = || AtRestError::Open { label: label.to_string() };
        // Bytes from state.db: every length is checked, nothing indexes blindly.
        let ct_end = sealed.len().checked_sub(TAG_LEN).filter(|end| *end >= NONCE_LEN).ok_or_else(fail)?;
        let nonce: [u8; NONCE_LEN] =
            sealed.get(..NONCE_LEN).and_then(|n| n.try_into().ok()).ok_or_else(fail)?;
        let tag = sealed.get(ct_end..).and_then(|t| Tag::try_from(t).ok()).ok_or_else(fail)?;
        let mut buf = sealed.get(NONCE_LEN..ct_end).ok_or_else(fail)?.to_vec();
        self.cipher
            .decrypt_inout_detached(&Nonce::from(nonce), label.as_bytes(), buf.as_mut_slice().into(), &tag)
            .map_err(|_| fail())?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_record_opens_only_with_the_same_key_and_label() {
        let c = StateCipher::from_agent_key(&Secret::new("agent-key-1"));
        let sealed = c.seal("outbox", b"the data key").unwrap();
        assert!(!sealed.windows(12).any(|w| w == b"the data key"));
        assert_eq!(c.open("outbox", &sealed).unwrap(), b"the data key");
        assert!(c.open("config", &sealed).is_err(), "label is bound");
        let other = StateCipher::from_agent_key(&Secret::new("agent-key-2"));
        assert!(other.open("outbox", &sealed).is_err(), "key is bound");
        let mut tampered = sealed.clone();
        tampered[14] ^= 1;
        assert!(c.open("outbox", &tampered).is_err());
        assert!(c.open("outbox", &sealed[..10]).is_err());
        assert_ne!(c.seal("outbox", b"x").unwrap(), c.seal("outbox", b"x").unwrap(), "fresh nonce");
    }
}
