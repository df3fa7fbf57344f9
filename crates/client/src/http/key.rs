//! The `Idempotency-Key` field: an RFC 8941 Structured Header String (`"abc"`), as
//! draft-ietf-httpapi-idempotency-key-header defines it, or a bare value (`abc`, as most clients
//! send a UUID), and the key the coordinator stores it under.

use http::HeaderMap;
use sha2::{Digest, Sha256};

/// The field's name.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 255;

/// Why a request's key was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeyError {
    /// No `Idempotency-Key` field.
    Missing,
    /// The field is sent more than once.
    Repeated,
    /// Empty, too long, or not a string or bare value.
    Invalid(&'static str),
}

/// The request's idempotency key, if it sent exactly one valid field.
pub(crate) fn key_of(headers: &HeaderMap) -> Result<String, KeyError> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let value = values.next().ok_or(KeyError::Missing)?;
    if values.next().is_some() {
        return Err(KeyError::Repeated);
    }
    let text = value.to_str().map_err(|_| KeyError::Invalid("the key must be printable ASCII"))?;
    let key = parse(text.trim_matches(|c| c == ' ' || c == '\t'))?;
    if key.is_empty() {
        return Err(KeyError::Invalid("the key is empty"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(KeyError::Invalid("the key is longer than 255 bytes"));
    }
    Ok(key)
}

/// An sf-string (`"` … `"`, with `\"` and `\\` escapes, printable ASCII), or a bare value of
/// visible characters without quotes or spaces.
fn parse(text: &str) -> Result<String, KeyError> {
    let Some(quoted) = text.strip_prefix('"') else {
        if text.chars().all(|c| c.is_ascii_graphic() && c != '"' && c != '\\') {
            return Ok(text.to_owned());
        }
        return Err(KeyError::Invalid("a bare key may hold only visible characters, no quotes or spaces"));
    };
    let mut key = String::with_capacity(quoted.len());
    let mut chars = quoted.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                return if chars.as_str().is_empty() {
                    Ok(key)
                } else {
                    Err(KeyError::Invalid("nothing may follow the closing quote"))
                };
            }
            '\\' => match chars.next() {
                Some(escaped @ ('"' | '\\')) => key.push(escaped),
                _ => return Err(KeyError::Invalid("only \\\" and \\\\ may be escaped")),
            },
            ' '..='~' => key.push(c),
            _ => return Err(KeyError::Invalid("a string may hold only printable ASCII")),
        }
    }
    Err(KeyError::Invalid("the string has no closing quote"))
}

/// The key the coordinator stores a request under: its scope and its key, so that one scope (a
/// tenant) can never replay another's response. `<scope length>:<scope><key>`, or, when that is
/// over the coordinator's 255 bytes or holds characters it refuses, `sha256:` and its digest.
pub(crate) fn stored_key(scope: Option<&str>, key: &str) -> String {
    let scope = scope.unwrap_or("");
    let plain = format!("{}:{scope}{key}", scope.len());
    if plain.len() <= MAX_KEY_BYTES && !plain.chars().any(char::is_control) {
        return plain;
    }
    let digest = Sha256::digest(plain.as_bytes());
    let mut hashed = String::from("sha256:");
    for byte in digest {
        hashed.push_str(&format!("{byte:02x}"));
    }
    hashed
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn check(values: &[&str], expected: Result<&str, KeyError>) {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(IDEMPOTENCY_KEY, HeaderValue::from_str(value).unwrap());
        }
        assert_eq!(key_of(&headers), expected.map(str::to_owned), "{values:?}");
    }

    #[test]
    fn keys_parse_as_structured_strings_or_bare_values() {
        check(&["\"abc\""], Ok("abc"));
        check(&["8e03978e-40d5-43e8-bc93-6894a57f9324"], Ok("8e03978e-40d5-43e8-bc93-6894a57f9324"));
        check(&["\"a \\\"quoted\\\" key\""], Ok("a \"quoted\" key"));
        check(&["\"with\\\\backslash\""], Ok("with\\backslash"));
        check(&[" \"padded\" "], Ok("padded"));
        check(&[], Err(KeyError::Missing));
        check(&["a", "b"], Err(KeyError::Repeated));
        for bad in ["\"\"", "", "\"abc", "\"a\"b\"", "a b", "\"a\\x\"", "a\"b"] {
            assert!(
                matches!(
                    key_of(
                        &[(IDEMPOTENCY_KEY, bad)]
                            .into_iter()
                            .map(|(n, v)| (n.parse().unwrap(), HeaderValue::from_str(v).unwrap()))
                            .collect()
                    ),
                    Err(KeyError::Invalid(_))
                ),
                "{bad:?}"
            );
        }
        check(&[&"k".repeat(255)], Ok(&"k".repeat(255)));
        assert!(matches!(
            key_of(
                &[(IDEMPOTENCY_KEY.parse().unwrap(), HeaderValue::from_str(&"k".repeat(256)).unwrap())]
                    .into_iter()
                    .collect()
            ),
            Err(KeyError::Invalid(_))
        ));
    }

    #[test]
    fn stored_keys_keep_scopes_apart_and_stay_within_the_limit() {
        assert_eq!(stored_key(None, "k"), "0:k");
        assert_eq!(stored_key(Some("acme"), "k"), "4:acmek");
        assert_ne!(stored_key(Some("ab"), "c"), stored_key(Some("a"), "bc"));
        let long = stored_key(Some("tenant"), &"k".repeat(255));
        assert!(long.starts_with("sha256:") && long.len() == 71);
        assert!(stored_key(Some("a\nb"), "k").starts_with("sha256:"));
    }
}
