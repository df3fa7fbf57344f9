//! Certificates for TLS tests, made fresh for each test: a CA, server certificates (valid for
//! `localhost` and 127.0.0.1, expired, or for another host), client certificates signed by the CA
//! or by another CA, written as PEM files into a temporary directory.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, Issuer, KeyPair, SanType,
};

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct PemPair {
    /// The certificate.
    pub cert: PathBuf,
    /// The private key.
    pub key: PathBuf,
}

impl PemPair {
    /// The certificate's PEM text.
    pub fn cert_pem(&self) -> Vec<u8> {
        std::fs::read(&self.cert).expect("the certificate file")
    }

    /// The key's PEM text.
    pub fn key_pem(&self) -> Vec<u8> {
        std::fs::read(&self.key).expect("the key file")
    }
}

/// One CA with the certificates a test needs.
pub struct Pki {
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
    /// The CA certificate (PEM file).
    pub ca_cert: PathBuf,
}

fn params(common_name: &str, sans: &[&str]) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("empty SANs are valid");
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    params.distinguished_name = name;
    for san in sans {
        params.subject_alt_names.push(match san.parse() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName((*san).try_into().expect("a DNS name")),
        });
    }
    params
}

impl Pki {
    /// A fresh CA named `name`, in a fresh directory.
    pub fn new(name: &str) -> Pki {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let mut ca_params = params(name, &[]);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("a key")).expect("a CA");
        let ca_cert = dir.path().join(format!("{name}.pem"));
        std::fs::write(&ca_cert, ca.pem()).expect("the CA written");
        Pki { dir, ca, ca_cert }
    }

    fn issue(&self, file: &str, params: CertificateParams) -> PemPair {
        let key = KeyPair::generate().expect("a key");
        let issuer: &Issuer<'_, KeyPair> = &self.ca;
        let certificate = params.signed_by(&key, issuer).expect("a certificate");
        let pair = PemPair { cert: self.path(&format!("{file}.pem")), key: self.path(&format!("{file}.key")) };
        std::fs::write(&pair.cert, certificate.pem()).expect("the certificate written");
        std::fs::write(&pair.key, key.serialize_pem()).expect("the key written");
        pair
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The directory the files are in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A server certificate for `localhost` and 127.0.0.1, in files named after `file`.
    pub fn server(&self, file: &str) -> PemPair {
        self.issue(file, params("localhost", &["localhost", "127.0.0.1"]))
    }

    /// A server certificate for another host only.
    pub fn server_for_another_host(&self, file: &str) -> PemPair {
        self.issue(file, params("elsewhere.example", &["elsewhere.example"]))
    }

    /// A server certificate for `localhost` that expired in 2020.
    pub fn expired_server(&self, file: &str) -> PemPair {
        let mut params = params("localhost", &["localhost", "127.0.0.1"]);
        params.not_before = rcgen::date_time_ymd(2019, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        self.issue(file, params)
    }

    /// A client certificate with subject `CN=<common_name>` and the DNS names `sans`.
    pub fn client(&self, file: &str, common_name: &str, sans: &[&str]) -> PemPair {
        self.issue(file, params(common_name, sans))
    }
}
