//! TLS for the server: the certificate and key (`--tls-cert`, `--tls-key`), and with
//! `--tls-client-ca` mandatory client certificates signed by that CA (mTLS). All three are
//! reloaded on SIGHUP and when their files change, without dropping established connections
//! (new handshakes use the new ones); a reload that fails (bad PEM, a key that does not match the
//! certificate, an unreadable file) keeps the ones in force and logs why.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::{Mutex, RwLock};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::client::danger::HandshakeSignatureValid;
use tokio_rustls::rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{
    DigitallySignedStruct, DistinguishedName, Error as RustlsError, RootCertStore, ServerConfig, SignatureScheme,
};

/// Where the TLS material is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain (PEM).
    pub cert: PathBuf,
    /// The server's private key (PEM).
    pub key: PathBuf,
    /// The CA that client certificates must be signed by (PEM); `None`: no client certificates.
    pub client_ca: Option<PathBuf>,
}

/// Why TLS material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A file holds no usable PEM of the expected kind, or the key does not match the certificate.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn invalid(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::Invalid { path: path.to_owned(), reason: reason.to_string() }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let chain: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|error| invalid(path, format!("not PEM certificates: {error}")))?;
    if chain.is_empty() {
        return Err(invalid(path, "no certificate in the file"));
    }
    Ok(chain)
}

fn certified_key(files: &TlsFiles) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = certificates(&files.cert)?;
    let pem = read(&files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|error| invalid(&files.key, format!("not a PEM private key: {error}")))?;
    let signing = tokio_rustls::rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|error| invalid(&files.key, format!("unusable private key: {error}")))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|error| invalid(&files.key, format!("the key does not match {}: {error}", files.cert.display())))?;
    Ok(Arc::new(certified))
}

fn client_verifier(path: &Path) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for certificate in certificates(path)? {
        roots.add(certificate).map_err(|error| invalid(path, format!("not a usable CA certificate: {error}")))?;
    }
    WebPkiClientVerifier::builder(Arc::new(roots)).build().map_err(|error| invalid(path, error))
}

/// The server certificate in force, swapped on reload.
#[derive(Debug)]
struct Certificates(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0.read()))
    }
}

/// The client-certificate verifier in force, swapped on reload. It sends no CA hints (the hints
/// would have to outlive a reload); clients send the certificate they have.
#[derive(Debug)]
struct ClientCertificates(RwLock<Arc<dyn ClientCertVerifier>>);

impl ClientCertVerifier for ClientCertificates {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, RustlsError> {
        self.0.read().verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RustlsError> {
        self.0.read().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RustlsError> {
        self.0.read().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.read().supported_verify_schemes()
    }
}

/// The server's TLS: an acceptor whose certificate and client CA can be swapped while it runs.
pub struct Tls {
    files: TlsFiles,
    certificates: Arc<Certificates>,
    client_certificates: Option<Arc<ClientCertificates>>,
    acceptor: TlsAcceptor,
    seen: Mutex<Vec<Option<(SystemTime, u64)>>>,
}

impl Tls {
    /// Loads the files; fails (the server does not start) if any is unusable.
    pub fn load(files: TlsFiles) -> Result<Tls, TlsError> {
        let certificates = Arc::new(Certificates(RwLock::new(certified_key(&files)?)));
        let client_certificates = match &files.client_ca {
            Some(path) => Some(Arc::new(ClientCertificates(RwLock::new(client_verifier(path)?)))),
            None => None,
        };
        let builder =
            ServerConfig::builder_with_provider(Arc::new(tokio_rustls::rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|error| invalid(&files.cert, error))?;
        let builder = match &client_certificates {
            Some(verifier) => builder.with_client_cert_verifier(Arc::clone(verifier) as Arc<dyn ClientCertVerifier>),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(Arc::clone(&certificates) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"h2".to_vec()];
        let tls = Tls {
            seen: Mutex::new(stamps(&files)),
            files,
            certificates,
            client_certificates,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        };
        Ok(tls)
    }

    /// The acceptor for new connections.
    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Whether client certificates are required.
    pub fn requires_client_certificates(&self) -> bool {
        self.client_certificates.is_some()
    }

    /// Reads the files again; keeps what is in force if any is unusable. True when new
    /// material applies.
    pub fn reload(&self) -> bool {
        *self.seen.lock() = stamps(&self.files);
        let loaded = certified_key(&self.files).and_then(|certified| {
            let verifier = match &self.files.client_ca {
                Some(path) => Some(client_verifier(path)?),
                None => None,
            };
            Ok((certified, verifier))
        });
        match loaded {
            Ok((certified, verifier)) => {
                *self.certificates.0.write() = certified;
                if let (Some(in_force), Some(verifier)) = (&self.client_certificates, verifier) {
                    *in_force.0.write() = verifier;
                }
                tracing::info!(cert = %self.files.cert.display(), "TLS certificates reloaded");
                true
            }
            Err(error) => {
                tracing::error!(%error, "TLS certificates were not reloaded; the ones in force stay");
                false
            }
        }
    }

    /// Reloads if any of the files changed since they were last read.
    pub fn reload_if_changed(&self) -> bool {
        let now = stamps(&self.files);
        if now != *self.seen.lock() { self.reload() } else { false }
    }
}

fn stamps(files: &TlsFiles) -> Vec<Option<(SystemTime, u64)>> {
    std::iter::once(&files.cert)
        .chain(std::iter::once(&files.key))
        .chain(files.client_ca.as_ref())
        .map(|path| {
            let metadata = std::fs::metadata(path).ok()?;
            Some((metadata.modified().ok()?, metadata.len()))
        })
        .collect()
}
