//! TLS for the control-plane connection (agent.md "Security"): rustls with TLS 1.2+,
//! the webpki root store plus an optional extra CA bundle (`BACKUPY_CA_FILE`), and
//! optional SPKI pins (`BACKUPY_SERVER_PIN_SHA256`) checked *in addition to* normal
//! verification. Builds a `rustls::ClientConfig` once; runs on whichever thread connects.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};

/// What the environment says about trust, parsed.
#[derive(Debug, Clone, Default)]
pub struct TlsSettings {
    /// Extra CA certificates (PEM) trusted besides the built-in roots.
    pub ca_file: Option<PathBuf>,
    /// SHA-256 digests of acceptable server SubjectPublicKeyInfo; empty = no pinning.
    pub pins: Vec<[u8; 32]>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("BACKUPY_CA_FILE {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error(
        "BACKUPY_SERVER_PIN_SHA256 entry {pin:?} is not a base64 SHA-256 digest (44 characters, 32 bytes)"
    )]
    Pin { pin: String },
    #[error("TLS setup: {0}")]
    Setup(String),
}

impl TlsSettings {
    /// Reads the two environment values (already fetched by the caller).
    pub fn from_values(ca_file: Option<&str>, pins: Option<&str>) -> Result<TlsSettings, TlsError> {
        Ok(TlsSettings {
            ca_file: ca_file.map(str::trim).filter(|s| !s.is_empty()).map(PathBuf::from),
            pins: match pins {
                Some(p) => parse_pins(p)?,
                None => Vec::new(),
            },
        })
    }
}

/// Parses comma-separated base64 SHA-256 digests; blanks between commas are skipped.
pub fn parse_pins(list: &str) -> Result<Vec<[u8; 32]>, TlsError> {
    list.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            B64.decode(p)
                .ok()
                .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
                .ok_or_else(|| TlsError::Pin { pin: p.to_string() })
        })
        .collect()
}

/// The client configuration for every connection of a session.
pub fn client_config(settings: &TlsSettings) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    if let Some(path) = &settings.ca_file {
        add_ca_file(&mut roots, path)?;
    }
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    let config = if settings.pins.is_empty() {
        builder.with_webpki_verifier(webpki).with_no_client_auth()
    } else {
        let verifier = PinnedVerifier { inner: webpki, pins: settings.pins.clone(), provider };
        builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier)).with_no_client_auth()
    };
    Ok(Arc::new(config))
}

fn add_ca_file(roots: &mut RootCertStore, path: &Path) -> Result<(), TlsError> {
    let err = |reason: String| TlsError::CaFile { path: path.to_path_buf(), reason };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(format!("cannot read it: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(format!("not a PEM certificate bundle: {e}")))?;
    if certs.is_empty() {
        return Err(err("holds no PEM certificate".to_string()));
    }
    for cert in certs {
        roots.add(cert).map_err(|e| err(format!("unusable certificate: {e}")))?;
    }
    Ok(())
}

/// Normal webpki verification, then the leaf's SPKI digest must be one of the pins.
#[derive(Debug)]
struct PinnedVerifier {
    inner: Arc<WebPkiServerVerifier>,
    pins: Vec<[u8; 32]>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified =
            self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        let digest = spki_sha256(end_entity.as_ref())
            .ok_or(rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if self.pins.contains(&digest) {
            Ok(verified)
        } else {
            log::warn!(
                "server certificate public key (sha256 {}) matches none of BACKUPY_SERVER_PIN_SHA256",
                B64.encode(digest)
            );
            Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// SHA-256 of the certificate's DER SubjectPublicKeyInfo (the HPKP/`openssl pkey -pubin
/// -outform der` digest).
pub fn spki_sha256(cert_der: &[u8]) -> Option<[u8; 32]> {
    let spki = spki_der(cert_der)?;
    Some(Sha256::digest(spki).into())
}

/// Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL, serial,
/// signature, issuer, validity, subject, subjectPublicKeyInfo, … }, … }
fn spki_der(cert_der: &[u8]) -> Option<&[u8]> {
    let (_, cert, _) = der_element(cert_der)?;
    let (_, tbs, _) = der_element(content(cert)?)?;
    let mut rest = content(tbs)?;
    if rest.first() == Some(&0xA0) {
        rest = der_element(rest)?.2;
    }
    for _ in 0..5 {
        rest = der_element(rest)?.2;
    }
    let (tag, spki, _) = der_element(rest)?;
    (tag == 0x30).then_some(spki)
}

/// One DER element: (tag, the whole element, what follows it).
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *input.first()?;
    let first = *input.get(1)? as usize;
    let (len, header) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let len = input.get(2..2 + n)?.iter().fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, 2 + n)
    };
    let end = header.checked_add(len)?;
    Some((tag, input.get(..end)?, input.get(end..)?))
}

fn content(element: &[u8]) -> Option<&[u8]> {
    let first = *element.get(1)? as usize;
    let header = if first < 0x80 { 2 } else { 2 + (first & 0x7f) };
    element.get(header..)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_comma_separated_base64_sha256() {
        let a = B64.encode([1u8; 32]);
        let b = B64.encode([2u8; 32]);
        let pins = parse_pins(&format!(" {a} ,{b},")).unwrap();
        assert_eq!(pins, vec![[1u8; 32], [2u8; 32]]);
        assert!(matches!(parse_pins("abc"), Err(TlsError::Pin { .. })));
        assert!(matches!(parse_pins(&B64.encode([0u8; 20])), Err(TlsError::Pin { .. })));
    }

    #[test]
    fn truncated_der_is_rejected_not_panicked_on() {
        assert_eq!(spki_sha256(&[]), None);
        assert_eq!(spki_sha256(&[0x30, 0x82, 0xff]), None);
        assert_eq!(spki_sha256(&[0x30, 0x03, 0x30, 0x01, 0x00]), None);
    }

    #[test]
    fn a_missing_ca_file_is_a_clear_error() {
        let settings = TlsSettings { ca_file: Some("/nonexistent/ca.pem".into()), pins: vec![] };
        let err = client_config(&settings).unwrap_err().to_string();
        assert!(err.contains("BACKUPY_CA_FILE /nonexistent/ca.pem"), "{err}");
    }
}
