//! Sharing the coordinator safely: who may call what (the auth file's tokens, certificates,
//! namespaces and roles), namespace quotas, TLS and mTLS with rotation, and overload (calls in
//! flight, waiting Claims, connections, idle connections).

mod auth;
mod overload;
mod quotas;
mod tls;

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The hex SHA-256 of a token, as the auth file holds it.
fn sha256_hex(token: &str) -> String {
    Sha256::digest(token.as_bytes()).iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Writes an auth file into `dir` and returns its path.
fn write_auth_file(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("auth.toml");
    // Written beside and renamed over, as an operator's deploy tool would: never half a file.
    let partial = dir.join("auth.toml.partial");
    std::fs::write(&partial, text).unwrap();
    std::fs::rename(&partial, &path).unwrap();
    path
}

/// A request with `authorization: Bearer <token>`.
fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// The status code and ErrorInfo reason ("" without one).
fn code_and_reason(status: &tonic::Status) -> (tonic::Code, String) {
    use tonic_types::StatusExt;
    (status.code(), status.get_details_error_info().map(|info| info.reason).unwrap_or_default())
}
