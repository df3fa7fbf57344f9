//! Who may do what: the `--auth-file` (TOML) of bearer tokens and client certificates, each with
//! the namespaces it may use and a role, and per-namespace quotas. Re-read on SIGHUP and when the
//! file changes; a broken file keeps the rules in force and logs why.
//!
//! ```toml
//! [[token]]                       # callers send `authorization: Bearer <token>`
//! name = "payments-api"
//! sha256 = "9f86d08…"             # hex SHA-256 of the token; tokens themselves are never stored
//! namespaces = ["payments", "payments-*"]   # exact names or a trailing-* prefix
//! deny = ["payments-internal"]    # optional: denied even where `namespaces` allows
//! role = "write"                  # read: Lookup; write: the five RPCs; admin: write + admin RPCs
//!
//! [[certificate]]                 # with --tls-client-ca: identity from the verified certificate
//! subject = "CN=refunds-api"      # or san = "spiffe://…" / "refunds.internal"
//! namespaces = ["refunds"]
//! role = "write"
//!
//! [[namespace]]                   # optional per-namespace quotas
//! name = "payments"
//! max_records = 1_000_000
//! ```
//!
//! Rules: deny by default; a deny pattern wins over an allow pattern; a request with a bearer
//! token is judged by the token alone (a certificate is only used when no token is sent); an
//! identity comes only from this server's own TLS handshake, never from a header a proxy could
//! set. Tokens are compared in constant time on their SHA-256. The answer never depends on the
//! key: authorization is decided before the store is touched.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use idempotency_core::domain::Namespace;
use parking_lot::RwLock;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a caller may do in a namespace it is allowed to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Lookup only.
    Read,
    /// All five RPCs.
    Write,
    /// Write, and the admin RPCs.
    Admin,
}

/// Why a call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    /// No credentials, or unknown ones.
    Unauthenticated,
    /// The caller may not use this namespace.
    NamespaceNotAllowed,
    /// The caller may use the namespace, but its role is too weak for the call.
    RoleNotAllowed,
}

/// The credentials a call came with.
#[derive(Debug, Clone, Default)]
pub struct Credentials<'a> {
    /// The `authorization` metadata, if any.
    pub authorization: Option<&'a [u8]>,
    /// The client certificate this server's TLS handshake verified (DER), if any.
    pub certificate: Option<&'a [u8]>,
}

/// Why an auth file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthFileError {
    /// It could not be read.
    #[error("cannot read the auth file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// It is not valid TOML of the expected shape, or a rule in it is invalid.
    #[error("the auth file {path} is invalid: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    #[serde(default)]
    token: Vec<TokenEntry>,
    #[serde(default)]
    certificate: Vec<CertificateEntry>,
    #[serde(default)]
    namespace: Vec<NamespaceEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    sha256: String,
    namespaces: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
    role: Role,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CertificateEntry {
    #[serde(default)]
    subject: Option<String>,
    #[serde(default)]
    san: Option<String>,
    namespaces: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
    role: Role,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NamespaceEntry {
    name: String,
    max_records: u64,
}

/// A namespace pattern: an exact name, or a prefix ending in `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Exact(String),
    Prefix(String),
}

impl Pattern {
    fn parse(text: &str) -> Result<Pattern, String> {
        let pattern = match text.strip_suffix('*') {
            Some(prefix) => Pattern::Prefix(prefix.to_owned()),
            None => Pattern::Exact(text.to_owned()),
        };
        let name = match &pattern {
            Pattern::Exact(name) | Pattern::Prefix(name) => name,
        };
        if name.contains('*') || (matches!(pattern, Pattern::Exact(_)) && Namespace::parse(name).is_err()) {
            return Err(format!("{text:?} is not a namespace or a prefix ending in *"));
        }
        Ok(pattern)
    }

    fn matches(&self, namespace: &str) -> bool {
        match self {
            Pattern::Exact(name) => name == namespace,
            Pattern::Prefix(prefix) => namespace.starts_with(prefix.as_str()),
        }
    }
}

/// What an identity may do.
#[derive(Debug, Clone)]
struct Grant {
    name: String,
    allow: Vec<Pattern>,
    deny: Vec<Pattern>,
    role: Role,
}

impl Grant {
    fn decide(&self, namespace: &Namespace, needed: Role) -> Result<&str, Denial> {
        let namespace = namespace.as_str();
        let allowed =
            self.allow.iter().any(|p| p.matches(namespace)) && !self.deny.iter().any(|p| p.matches(namespace));
        if !allowed {
            return Err(Denial::NamespaceNotAllowed);
        }
        if self.role < needed {
            return Err(Denial::RoleNotAllowed);
        }
        Ok(&self.name)
    }
}

/// How a certificate entry recognises its certificate.
#[derive(Debug, Clone)]
enum CertificateMatch {
    Subject(String),
    San(String),
}

/// The rules of one auth file, parsed.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    tokens: Vec<([u8; 32], Grant)>,
    certificates: Vec<(CertificateMatch, Grant)>,
    quotas: HashMap<Namespace, u64>,
}

fn patterns(texts: &[String]) -> Result<Vec<Pattern>, String> {
    texts.iter().map(|text| Pattern::parse(text)).collect()
}

/// A subject as `CN=x, O=y` with the separators normalised, for comparison.
fn normalise_subject(subject: &str) -> String {
    subject.split(',').map(str::trim).collect::<Vec<_>>().join(",")
}

impl Rules {
    /// Parses the text of an auth file.
    pub fn parse(text: &str) -> Result<Rules, String> {
        let file: AuthFile = toml::from_str(text).map_err(|error| error.to_string())?;
        let mut rules = Rules::default();
        for entry in file.token {
            let hash = hex32(&entry.sha256)
                .ok_or_else(|| format!("token {:?}: sha256 must be 64 hex digits (the token's SHA-256)", entry.name))?;
            let grant = Grant {
                name: entry.name.clone(),
                allow: patterns(&entry.namespaces).map_err(|error| format!("token {:?}: {error}", entry.name))?,
                deny: patterns(&entry.deny).map_err(|error| format!("token {:?}: {error}", entry.name))?,
                role: entry.role,
            };
            rules.tokens.push((hash, grant));
        }
        for entry in file.certificate {
            let (matcher, name) = match (&entry.subject, &entry.san) {
                (Some(subject), None) => (CertificateMatch::Subject(normalise_subject(subject)), subject.clone()),
                (None, Some(san)) => (CertificateMatch::San(san.clone()), san.clone()),
                _ => return Err("a [[certificate]] needs exactly one of subject and san".to_owned()),
            };
            let grant = Grant {
                allow: patterns(&entry.namespaces).map_err(|error| format!("certificate {name:?}: {error}"))?,
                deny: patterns(&entry.deny).map_err(|error| format!("certificate {name:?}: {error}"))?,
                name,
                role: entry.role,
            };
            rules.certificates.push((matcher, grant));
        }
        for entry in file.namespace {
            let namespace =
                Namespace::parse(&entry.name).map_err(|_| format!("namespace {:?} is not a valid name", entry.name))?;
            rules.quotas.insert(namespace, entry.max_records);
        }
        Ok(rules)
    }

    /// The per-namespace record quotas.
    pub fn quotas(&self) -> &HashMap<Namespace, u64> {
        &self.quotas
    }

    /// The names of the namespaces the file names (for bounded metric labels).
    pub fn token_names(&self) -> impl Iterator<Item = &str> {
        self.tokens.iter().map(|(_, grant)| grant.name.as_str())
    }

    /// Who the credentials are, if anyone this file knows.
    fn identify(&self, credentials: &Credentials<'_>) -> Option<&Grant> {
        if let Some(authorization) = credentials.authorization {
            // The scheme is case-insensitive (RFC 9110, 11.1); one space, then the token.
            let (scheme, token) = authorization.split_at_checked(7)?;
            if !scheme.eq_ignore_ascii_case(b"bearer ") {
                return None;
            }
            let hash: [u8; 32] = Sha256::digest(token).into();
            // Every entry is compared, in constant time, whichever matches.
            let mut found = None;
            for (known, grant) in &self.tokens {
                if bool::from(known.ct_eq(&hash)) {
                    found = Some(grant);
                }
            }
            return found;
        }
        let certificate = credentials.certificate?;
        let (_, parsed) = x509_parser::parse_x509_certificate(certificate).ok()?;
        let subject = normalise_subject(&parsed.subject().to_string());
        let sans: Vec<String> = parsed
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|extension| {
                extension
                    .value
                    .general_names
                    .iter()
                    .filter_map(|name| match name {
                        x509_parser::extensions::GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                        x509_parser::extensions::GeneralName::URI(uri) => Some((*uri).to_owned()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        self.certificates.iter().find_map(|(matcher, grant)| {
            let matched = match matcher {
                CertificateMatch::Subject(wanted) => *wanted == subject,
                CertificateMatch::San(wanted) => sans.iter().any(|san| san == wanted),
            };
            matched.then_some(grant)
        })
    }

    /// Whether `credentials` may make a call needing `role` in `namespace`; the identity's name
    /// when they may.
    pub fn authorize(
        &self,
        credentials: &Credentials<'_>,
        namespace: &Namespace,
        role: Role,
    ) -> Result<String, Denial> {
        let grant = self.identify(credentials).ok_or(Denial::Unauthenticated)?;
        grant.decide(namespace, role).map(str::to_owned)
    }

    /// Whether `credentials` may make a call needing `role` over every namespace (a call that
    /// names none: a whole-store export, the store's figures): their grant allows `*` and denies
    /// nothing.
    pub fn authorize_all(&self, credentials: &Credentials<'_>, role: Role) -> Result<String, Denial> {
        let grant = self.identify(credentials).ok_or(Denial::Unauthenticated)?;
        let everything = grant.allow.iter().any(|pattern| *pattern == Pattern::Prefix(String::new()));
        if !everything || !grant.deny.is_empty() {
            return Err(Denial::NamespaceNotAllowed);
        }
        if grant.role < role {
            return Err(Denial::RoleNotAllowed);
        }
        Ok(grant.name.clone())
    }

    /// Whether `credentials` belong to anyone this file knows (for reflection, which names no
    /// namespace).
    pub fn authenticate(&self, credentials: &Credentials<'_>) -> Result<String, Denial> {
        self.identify(credentials).map(|grant| grant.name.clone()).ok_or(Denial::Unauthenticated)
    }
}

fn hex32(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut bytes = [0u8; 32];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(bytes)
}

/// The rules in force, from an auth file, reloaded when asked or when the file changes.
pub struct Authorizer {
    path: PathBuf,
    rules: RwLock<Arc<Rules>>,
    seen: parking_lot::Mutex<Option<(SystemTime, u64)>>,
}

impl Authorizer {
    /// Loads `path`; fails if it cannot be read or is invalid (the server does not start).
    pub fn load(path: &Path) -> Result<Authorizer, AuthFileError> {
        let authorizer = Authorizer {
            path: path.to_owned(),
            rules: RwLock::new(Arc::new(Rules::default())),
            seen: parking_lot::Mutex::new(None),
        };
        let rules = authorizer.read()?;
        *authorizer.rules.write() = Arc::new(rules);
        *authorizer.seen.lock() = stamp(path);
        Ok(authorizer)
    }

    fn read(&self) -> Result<Rules, AuthFileError> {
        let text = std::fs::read_to_string(&self.path)
            .map_err(|source| AuthFileError::Read { path: self.path.clone(), source })?;
        Rules::parse(&text).map_err(|reason| AuthFileError::Invalid { path: self.path.clone(), reason })
    }

    /// The rules in force now.
    pub fn rules(&self) -> Arc<Rules> {
        Arc::clone(&self.rules.read())
    }

    /// Reads the file again; keeps the rules in force if it is broken. True when new rules apply.
    pub fn reload(&self) -> bool {
        *self.seen.lock() = stamp(&self.path);
        match self.read() {
            Ok(rules) => {
                tracing::info!(
                    path = %self.path.display(),
                    tokens = rules.tokens.len(),
                    certificates = rules.certificates.len(),
                    quotas = rules.quotas.len(),
                    "auth file reloaded"
                );
                *self.rules.write() = Arc::new(rules);
                true
            }
            Err(error) => {
                tracing::error!(%error, "the auth file was not reloaded; the rules in force stay");
                false
            }
        }
    }

    /// Reloads if the file changed since it was last read (its modification time or size).
    pub fn reload_if_changed(&self) -> bool {
        let now = stamp(&self.path);
        if now.is_some() && now != *self.seen.lock() { self.reload() } else { false }
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(token: &str) -> String {
        Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
    }

    fn rules() -> Rules {
        Rules::parse(&format!(
            r#"
            [[token]]
            name = "payments-api"
            sha256 = "{}"
            namespaces = ["payments", "payments-*"]
            deny = ["payments-internal"]
            role = "write"

            [[token]]
            name = "auditor"
            sha256 = "{}"
            namespaces = ["payments"]
            role = "read"

            [[namespace]]
            name = "payments"
            max_records = 10
            "#,
            sha("secret-1"),
            sha("secret-2")
        ))
        .unwrap()
    }

    fn check(token: &str, namespace: &str, role: Role, expected: Result<&str, Denial>) {
        let authorization = format!("Bearer {token}");
        let credentials = Credentials { authorization: Some(authorization.as_bytes()), certificate: None };
        let namespace = Namespace::parse(namespace).unwrap();
        assert_eq!(
            rules().authorize(&credentials, &namespace, role).as_deref().map_err(|d| *d),
            expected,
            "{token} {namespace:?} {role:?}"
        );
    }

    #[test]
    fn tokens_namespaces_roles_and_denials() {
        check("secret-1", "payments", Role::Write, Ok("payments-api"));
        check("secret-1", "payments-eu", Role::Write, Ok("payments-api"));
        check("secret-1", "payments-internal", Role::Read, Err(Denial::NamespaceNotAllowed));
        check("secret-1", "refunds", Role::Read, Err(Denial::NamespaceNotAllowed));
        check("secret-1", "payments", Role::Admin, Err(Denial::RoleNotAllowed));
        check("secret-2", "payments", Role::Read, Ok("auditor"));
        check("secret-2", "payments", Role::Write, Err(Denial::RoleNotAllowed));
        check("secret-2", "payments-eu", Role::Read, Err(Denial::NamespaceNotAllowed));
        check("wrong", "payments", Role::Read, Err(Denial::Unauthenticated));
        let none = Credentials::default();
        assert_eq!(
            rules().authorize(&none, &Namespace::parse("payments").unwrap(), Role::Read),
            Err(Denial::Unauthenticated)
        );
        let basic = Credentials { authorization: Some(b"Basic c2VjcmV0LTE="), certificate: None };
        assert_eq!(rules().authenticate(&basic), Err(Denial::Unauthenticated));
        // The scheme is case-insensitive; the token is not.
        for scheme in ["bearer", "BEARER", "BeArEr"] {
            let authorization = format!("{scheme} secret-1");
            let credentials = Credentials { authorization: Some(authorization.as_bytes()), certificate: None };
            assert_eq!(rules().authenticate(&credentials).as_deref(), Ok("payments-api"), "{scheme}");
        }
        for refused in [&b"Bearer SECRET-1"[..], b"Bearer  secret-1", b"Bearersecret-1", b"Bearer"] {
            let credentials = Credentials { authorization: Some(refused), certificate: None };
            assert_eq!(rules().authenticate(&credentials), Err(Denial::Unauthenticated));
        }
        assert_eq!(rules().quotas().get(&Namespace::parse("payments").unwrap()), Some(&10));
    }

    #[test]
    fn broken_files_are_refused_with_a_reason() {
        for (text, says) in [
            ("[[token]]\nname = \"x\"\nsha256 = \"abc\"\nnamespaces = [\"a\"]\nrole = \"write\"", "64 hex digits"),
            ("[[token]]\nname = \"x\"\nsha256 = \"abc\"\nnamespaces = [\"a\"]\nrole = \"owner\"", "owner"),
            ("[[certificate]]\nnamespaces = [\"a\"]\nrole = \"write\"", "exactly one of subject and san"),
            ("[[namespace]]\nname = \"a b\"\nmax_records = 1", "not a valid name"),
            ("[[tokens]]\n", "unknown field"),
        ] {
            let error = Rules::parse(text).unwrap_err();
            assert!(error.contains(says), "{error}");
        }
        assert!(Pattern::parse("pay*ments").is_err());
        assert!(Pattern::parse("a/b").is_err());
    }
}
