//! TLS for the agent's own connections to databases (PostgreSQL's pre-dump and restore
//! checks, Redis's replication stream and restore): one `rustls::ClientConfig` per
//! connection, built on the thread that connects, from what the target's options say.
//!
//! Three levels of checking, named after libpq's modes because every engine has them:
//! - [`Verify::Off`]: encrypted, the certificate is not checked (a network actor who can
//!   redirect traffic can read it). The handshake signatures are still checked.
//! - [`Verify::Chain`]: the certificate chains to a trusted root; any host name.
//! - [`Verify::Full`]: chain and host name (or IP address) match.
//!
//! Trusted roots: the CA file when the target names one (only it, as libpq's
//! `sslrootcert`, `redis-cli --cacert` and MySQL's `ssl-ca` do: a private CA does not
//! widen to every public one), otherwise the built-in Mozilla roots (`webpki-roots`).
//! Client certificates: a PEM chain and an unencrypted PEM key (PKCS#8, PKCS#1 or SEC1).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

/// How much of the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    Off,
    Chain,
    Full,
}

impl Verify {
    /// For messages and `check-config`: "not verified", "CA verified", "verified".
    pub fn describe(self) -> &'static str {
        match self {
            Verify::Off => "encrypted, certificate not verified",
            Verify::Chain => "encrypted, certificate chain verified (host name not checked)",
            Verify::Full => "encrypted, certificate and host name verified",
        }
    }
}

/// What a target asks for, in engine-neutral terms.
#[derive(Debug, Clone)]
pub struct DbTls {
    pub verify: Verify,
    /// Trusted roots (PEM); `None` = the built-in roots.
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    /// An unencrypted PEM key; or the key itself in memory (decrypted by the caller).
    pub client_key: Option<ClientKey>,
}

/// Where the client key comes from.
#[derive(Debug, Clone)]
pub enum ClientKey {
    File(PathBuf),
    /// PEM text (zeroized when dropped).
    Pem(crate::secrets::Secret),
}

impl DbTls {
    pub fn new(verify: Verify) -> Self {
        DbTls { verify, ca_file: None, client_cert: None, client_key: None }
    }

    /// The client configuration; errors name the option and file that are wrong.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = match &self.ca_file {
            Some(path) => ca_roots(path)?,
            None => RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() },
        };
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| format!("TLS setup: {e}"))?;
        let verifier = DbVerifier { inner: webpki, verify: self.verify, provider: provider.clone() };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| format!("TLS setup: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier));
        let config = match (&self.client_cert, &self.client_key) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), Some(key)) => {
                let chain = cert_chain(cert)?;
                let key = client_key(key)?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    format!("client certificate {} and its key do not fit: {e}", cert.display())
                })?
            }
            (Some(_), None) => return Err("a client certificate needs its key too".into()),
            (None, Some(_)) => return Err("a client key needs its certificate too".into()),
        };
        Ok(Arc::new(config))
    }
}

/// A server name for SNI and the name check: a DNS name or an IP address.
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']').to_string())
        .map_err(|_| format!("{host:?} is not a valid host name for TLS"))
}

fn ca_roots(path: &Path) -> Result<RootCertStore, String> {
    let certs = cert_chain(path)?;
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| format!("CA file {}: unusable certificate: {e}", path.display()))?;
    }
    Ok(roots)
}

fn cert_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{} is not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

fn client_key(key: &ClientKey) -> Result<PrivateKeyDer<'static>, String> {
    let encrypted = |text: &str| text.contains("ENCRYPTED");
    match key {
        ClientKey::File(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the client key {}: {e}", path.display()))?;
            let text = zeroize::Zeroizing::new(text);
            if encrypted(&text) {
                return Err(format!(
                    "the client key {} is encrypted; give its password (sslpassword) or an unencrypted key",
                    path.display()
                ));
            }
            PrivateKeyDer::from_pem_slice(text.as_bytes())
                .map_err(|e| format!("{} is not a PEM private key: {e}", path.display()))
        }
        ClientKey::Pem(pem) => PrivateKeyDer::from_pem_slice(pem.expose().as_bytes())
            .map_err(|e| format!("the decrypted client key is not a PEM private key: {e}")),
    }
}

/// The first TLS error in `e`'s chain, in words: what did not match.
pub fn explain(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(explain_rustls(r));
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(r) = inner.downcast_ref::<rustls::Error>()
        {
            return Some(explain_rustls(r));
        }
        cur = err.source();
    }
    None
}

/// A rustls error as one sentence: expired, unknown issuer, wrong name, or rustls's words.
pub fn explain_rustls(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => {
                "the server certificate is not signed by a trusted CA (unknown issuer; check the CA file)"
                    .into()
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the server certificate has expired".into()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the server certificate is not valid yet".into()
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!("the server certificate does not name the host connected to (wrong name: {e})")
            }
            CertificateError::Revoked => "the server certificate is revoked".into(),
            _ => format!("the server certificate was rejected: {e}"),
        },
        other => format!("TLS failed: {other}"),
    }
}

/// webpki's verdict, softened to what [`Verify`] asks for.
#[derive(Debug)]
struct DbVerifier {
    inner: Arc<WebPkiServerVerifier>,
    verify: Verify,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for DbVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.verify == Verify::Off {
            return Ok(ServerCertVerified::assertion());
        }
        match self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            // webpki checks the chain before the name: a name error means the chain held.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if self.verify == Verify::Chain => Ok(ServerCertVerified::assertion()),
            other => other,
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

/// "TLSv1_3" → "TLS 1.3", for what was negotiated.
pub fn version_name(v: Option<rustls::ProtocolVersion>) -> String {
    match v {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLS 1.3".into(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLS 1.2".into(),
        Some(other) => format!("{other:?}"),
        None => "TLS (version unknown)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_are_named() {
        let mut t = DbTls::new(Verify::Full);
        t.ca_file = Some("/nonexistent/ca.pem".into());
        assert!(t.client_config().unwrap_err().contains("/nonexistent/ca.pem"));
        let mut t = DbTls::new(Verify::Off);
        t.client_cert = Some("/nonexistent/c.pem".into());
        assert!(t.client_config().unwrap_err().contains("needs its key"));
    }

    #[test]
    fn server_names_accept_ips_and_dns_names() {
        assert!(server_name("127.0.0.1").is_ok());
        assert!(server_name("[::1]").is_ok());
        assert!(server_name("db.example.com").is_ok());
        assert!(server_name("bad name").is_err());
    }
}
