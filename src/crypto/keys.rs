//! Key files and key strings: X25519 identities (`BKPY-SECRET-KEY-1:`), recipients
//! (`bkpy1…`), raw data-key files, and HPKE sealing of per-backup data keys.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hpke::aead::AesGcm256;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{DataKey, Error};

pub const SEALED_BLOCK_LEN: usize = 80;
const ENC_LEN: usize = 32;
const HPKE_INFO: &[u8] = b"backupy dek v1";
const IDENTITY_PREFIX: &str = "BKPY-SECRET-KEY-1:";
const RECIPIENT_PREFIX: &str = "bkpy1";

type PrivateKey = <X25519HkdfSha256 as hpke::Kem>::PrivateKey;
type PublicKey = <X25519HkdfSha256 as hpke::Kem>::PublicKey;
type EncappedKey = <X25519HkdfSha256 as hpke::Kem>::EncappedKey;

/// An X25519 public key that backups are sealed to.
#[derive(Clone, PartialEq, Eq)]
pub struct Recipient([u8; 32]);

impl Recipient {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses `bkpy1` + lower-case base32 without padding.
    pub fn parse(s: &str) -> Result<Self, Error> {
        let s = s.trim();
        let bad = |why: &str| Error::BadKey { reason: format!("recipient {s:?}: {why}") };
        let body = s
            .strip_prefix(RECIPIENT_PREFIX)
            .ok_or_else(|| bad("a recipient starts with bkpy1 (from `backupy-agent keygen`)"))?;
        let bytes = data_encoding::BASE32_NOPAD
            .decode(body.to_ascii_uppercase().as_bytes())
            .map_err(|_| bad("not valid base32"))?;
        if body.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(bad("must be lower-case"));
        }
        let arr: [u8; 32] = bytes.try_into().map_err(|_| bad("must encode 32 bytes"))?;
        Ok(Self(arr))
    }

    /// `dek_kms_id`: "x25519:" + the first 16 hex digits of SHA-256 over the key.
    pub fn key_id(&self) -> String {
        let digest = Sha256::digest(self.0);
        format!("x25519:{}", &hex::encode(digest)[..16])
    }

    /// Seals a data key: `enc(32) ‖ AES-256-GCM(key)(48)`.
    pub fn seal(&self, key: &DataKey) -> Result<[u8; SEALED_BLOCK_LEN], Error> {
        let pk = PublicKey::from_bytes(&self.0)
            .map_err(|e| Error::BadKey { reason: format!("recipient is not a usable X25519 key: {e}") })?;
        let (enc, sealed) = hpke::single_shot_seal::<AesGcm256, HkdfSha256, X25519HkdfSha256>(
            &OpModeS::Base,
            &pk,
            HPKE_INFO,
            key.as_bytes(),
            b"",
        )
        .map_err(|e| Error::BadKey { reason: format!("sealing the data key failed: {e}") })?;
        let mut block = [0u8; SEALED_BLOCK_LEN];
        block[..ENC_LEN].copy_from_slice(&enc.to_bytes());
        block[ENC_LEN..].copy_from_slice(&sealed);
        Ok(block)
    }
}

impl std::fmt::Display for Recipient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b32 = data_encoding::BASE32_NOPAD.encode(&self.0).to_ascii_lowercase();
        write!(f, "{RECIPIENT_PREFIX}{b32}")
    }
}

impl std::fmt::Debug for Recipient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Recipient({self})")
    }
}

/// An X25519 private key (the restore side). Zeroed on drop, never printed.
pub struct Identity(Zeroizing<[u8; 32]>);

impl Identity {
    pub fn generate() -> Result<Self, Error> {
        let mut k = Zeroizing::new([0u8; 32]);
        super::random_bytes(k.as_mut())?;
        Ok(Self(k))
    }

    /// Parses the text of an identity file: one `BKPY-SECRET-KEY-1:` line; blank lines
    /// and `#` comments ignored; CRLF and surrounding whitespace accepted.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let mut found = None;
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if found.is_some() {
                return Err(Error::BadKey { reason: "an identity file holds exactly one key line".into() });
            }
            found = Some(line);
        }
        let line =
            found.ok_or_else(|| Error::BadKey { reason: format!("no {IDENTITY_PREFIX} line found") })?;
        let b64 = line.strip_prefix(IDENTITY_PREFIX).ok_or_else(|| Error::BadKey {
            reason: format!("the key line must start with {IDENTITY_PREFIX}"),
        })?;
        let bytes = Zeroizing::new(
            B64.decode(b64)
                .map_err(|_| Error::BadKey { reason: "the private key is not valid base64".into() })?,
        );
        let arr: [u8; 32] = bytes.as_slice().try_into().map_err(|_| Error::BadKey {
            reason: format!("the private key must be 32 bytes, got {}", bytes.len()),
        })?;
        Ok(Self(Zeroizing::new(arr)))
    }

    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| Error::BadKey {
            reason: format!("cannot read identity file {}: {e}", path.display()),
        })?);
        Self::parse(&text).map_err(|e| match e {
            Error::BadKey { reason } => {
                Error::BadKey { reason: format!("identity file {}: {reason}", path.display()) }
            }
            other => other,
        })
    }

    fn private_key(&self) -> Result<PrivateKey, Error> {
        PrivateKey::from_bytes(self.0.as_ref())
            .map_err(|e| Error::BadKey { reason: format!("not a usable X25519 private key: {e}") })
    }

    pub fn recipient(&self) -> Result<Recipient, Error> {
        let pk = X25519HkdfSha256::sk_to_pk(&self.private_key()?);
        let bytes: [u8; 32] = pk
            .to_bytes()
            .as_slice()
            .try_into()
            .map_err(|_| Error::BadKey { reason: "unexpected public key length".into() })?;
        Ok(Recipient(bytes))
    }

    /// The text of an identity file, with the public key as a comment.
    pub fn to_file_text(&self) -> Result<Zeroizing<String>, Error> {
        Ok(Zeroizing::new(format!(
            "# backupy identity (X25519 private key): keep it secret, keep a copy offline\n\
             # public key: {}\n{IDENTITY_PREFIX}{}\n",
            self.recipient()?,
            B64.encode(self.0.as_ref())
        )))
    }

    /// Unseals a data key from an 80-byte sealed key block.
    pub fn open(&self, block: &[u8]) -> Result<DataKey, Error> {
        if block.len() != SEALED_BLOCK_LEN {
            return Err(Error::BadHeader(format!(
                "sealed key block is {} bytes, expected {SEALED_BLOCK_LEN}",
                block.len()
            )));
        }
        let (enc_bytes, ciphertext) = block
            .split_at_checked(ENC_LEN)
            .ok_or_else(|| Error::BadHeader("sealed key block is too short".into()))?;
        let enc = EncappedKey::from_bytes(enc_bytes)
            .map_err(|_| Error::BadHeader("sealed key block has an invalid encapsulated key".into()))?;
        let key = Zeroizing::new(
            hpke::single_shot_open::<AesGcm256, HkdfSha256, X25519HkdfSha256>(
                &OpModeR::Base,
                &self.private_key()?,
                &enc,
                HPKE_INFO,
                ciphertext,
                b"",
            )
            .map_err(|_| Error::WrongIdentity)?,
        );
        DataKey::from_slice(&key)
    }
}

/// Parses a raw data-key file: 64 hex digits or standard base64 of 32 bytes.
pub fn parse_raw_key(text: &str) -> Result<DataKey, Error> {
    let t = text.trim();
    if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
        let bytes =
            Zeroizing::new(hex::decode(t).map_err(|_| Error::BadKey { reason: "invalid hex".into() })?);
        return DataKey::from_slice(&bytes);
    }
    let bytes = Zeroizing::new(B64.decode(t).map_err(|_| Error::BadKey {
        reason: "a data-key file holds 64 hex digits or the base64 of 32 bytes".into(),
    })?);
    DataKey::from_slice(&bytes)
}

pub fn read_raw_key_file(path: &Path) -> Result<DataKey, Error> {
    let text =
        Zeroizing::new(std::fs::read_to_string(path).map_err(|e| Error::BadKey {
            reason: format!("cannot read key file {}: {e}", path.display()),
        })?);
    parse_raw_key(&text).map_err(|e| match e {
        Error::BadKey { reason } => {
            Error::BadKey { reason: format!("key file {}: {reason}", path.display()) }
        }
        other => other,
    })
}
