//! A deliberately small HTTP/1.1 client over one TCP connection per request.
//!
//! The suite needs byte-level control that general-purpose clients take away: a header line sent
//! twice, header values that are not valid Structured Fields, the exact bytes of a response body,
//! a response that arrives while the request body is still being written (413), and a connection
//! that drops without any response (a crashed server). Every request carries
//! `Connection: close`; the response is framed by `Content-Length`, `chunked`, or the end of the
//! connection, and interim `1xx` responses are skipped.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Why an exchange produced no response.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The TCP connection could not be opened.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address tried.
        addr: SocketAddr,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// Reading the response failed (for example the connection was reset).
    #[error("reading the response failed: {0}")]
    Read(std::io::Error),
    /// The server closed the connection before a complete response.
    #[error("the connection closed before a complete response ({received} bytes received)")]
    Closed {
        /// How many bytes of the response had arrived.
        received: usize,
    },
    /// The response could not be parsed as HTTP/1.1.
    #[error("malformed response: {0}")]
    Malformed(String),
    /// No complete response within the time allowed.
    #[error("no complete response within {0:?}")]
    Timeout(Duration),
}

impl HttpError {
    /// True when the connection ended (closed or reset) without a response: what a client of a
    /// server that crashed mid-request sees.
    pub fn is_connection_lost(&self) -> bool {
        matches!(self, HttpError::Read(_) | HttpError::Closed { .. })
    }
}

/// One request to send.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    method: &'static str,
    path: String,
    headers: Vec<(String, String)>,
    body: Option<Vec<u8>>,
}

impl Request {
    /// `GET path`, without a body.
    pub(crate) fn get(path: &str) -> Request {
        Request { method: "GET", path: path.to_owned(), headers: Vec::new(), body: None }
    }

    /// `POST path` with a JSON body (`Content-Type: application/json`).
    pub(crate) fn post_json(path: &str, body: impl Into<Vec<u8>>) -> Request {
        Request {
            method: "POST",
            path: path.to_owned(),
            headers: vec![("Content-Type".to_owned(), "application/json".to_owned())],
            body: Some(body.into()),
        }
    }

    /// Adds a header line; adding the same name twice sends two lines.
    pub(crate) fn header(mut self, name: &str, value: &str) -> Request {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// The bytes of the request head: request line, headers and the blank line.
    fn head(&self, addr: SocketAddr) -> Vec<u8> {
        let mut head = format!("{} {} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n", self.method, self.path);
        if let Some(body) = &self.body {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        head.into_bytes()
    }
}

/// A complete response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Response {
    /// The status code.
    pub(crate) status: u16,
    /// Header lines in the order received, names lowercased, values trimmed (lossy UTF-8).
    pub(crate) headers: Vec<(String, String)>,
    /// The body, after removing any chunked framing.
    pub(crate) body: Vec<u8>,
}

impl Response {
    /// The first value of header `name` (case-insensitive).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    /// How many lines of header `name` the response has.
    pub(crate) fn header_count(&self, name: &str) -> usize {
        let name = name.to_ascii_lowercase();
        self.headers.iter().filter(|(n, _)| *n == name).count()
    }

    /// The media type of `Content-Type`, lowercased, without parameters such as `charset`.
    pub(crate) fn media_type(&self) -> Option<String> {
        self.header("content-type").map(|v| v.split(';').next().unwrap_or_default().trim().to_ascii_lowercase())
    }

    /// The body as text, for messages.
    pub(crate) fn body_text(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        if text.len() > 300 { format!("{}…", &text[..text.floor_char_boundary(300)]) } else { text.into_owned() }
    }
}

/// Sends `request` to `addr` on a new connection and reads one response, within `timeout`.
///
/// The body is written while the response is read, so that a server answering early (413 before
/// reading the whole body) is seen answering: a failure to write is ignored when a response came.
pub(crate) async fn send(addr: SocketAddr, request: &Request, timeout: Duration) -> Result<Response, HttpError> {
    match tokio::time::timeout(timeout, exchange(addr, request)).await {
        Ok(result) => result,
        Err(_) => Err(HttpError::Timeout(timeout)),
    }
}

async fn exchange(addr: SocketAddr, request: &Request) -> Result<Response, HttpError> {
    let stream = TcpStream::connect(addr).await.map_err(|source| HttpError::Connect { addr, source })?;
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = stream.into_split();
    let head = request.head(addr);
    let body = request.body.as_deref().unwrap_or_default();
    let write = async move {
        writer.write_all(&head).await?;
        writer.write_all(body).await?;
        writer.flush().await?;
        // Keep the write half open: shutting it down would tell some servers the client is gone.
        std::future::pending::<()>().await;
        Ok::<_, std::io::Error>(writer)
    };
    let read = read_response(&mut reader);
    tokio::pin!(write);
    tokio::pin!(read);
    let mut write_failed = false;
    loop {
        tokio::select! {
            written = &mut write, if !write_failed => {
                // Only an error gets here (success pends forever); the response may still come.
                if written.is_err() {
                    write_failed = true;
                }
            }
            response = &mut read => return response,
        }
    }
}

/// Reads one final (non-1xx) response from `reader`.
async fn read_response(reader: &mut (impl AsyncReadExt + Unpin)) -> Result<Response, HttpError> {
    let mut buffer = Vec::with_capacity(8 * 1024);
    loop {
        let head_end = fill_until(reader, &mut buffer, |b| find(b, b"\r\n\r\n").map(|i| i + 4)).await?;
        let (status, headers) = parse_head(&buffer[..head_end])?;
        buffer.drain(..head_end);
        if (100..200).contains(&status) {
            continue;
        }
        let chunked = headers
            .iter()
            .any(|(n, v)| n == "transfer-encoding" && v.to_ascii_lowercase().split(',').any(|t| t.trim() == "chunked"));
        let body = if chunked {
            read_chunked(reader, &mut buffer).await?
        } else if let Some((_, length)) = headers.iter().find(|(n, _)| n == "content-length") {
            let length: usize =
                length.parse().map_err(|_| HttpError::Malformed(format!("content-length {length:?}")))?;
            fill_until(reader, &mut buffer, |b| (b.len() >= length).then_some(length)).await?;
            buffer.truncate(length);
            buffer
        } else if status == 204 || status == 304 {
            Vec::new()
        } else {
            // Framed by the end of the connection.
            reader.read_to_end(&mut buffer).await.map_err(HttpError::Read)?;
            buffer
        };
        return Ok(Response { status, headers, body });
    }
}

/// Reads into `buffer` until `complete` finds what it needs in it, and returns what it found.
async fn fill_until(
    reader: &mut (impl AsyncReadExt + Unpin),
    buffer: &mut Vec<u8>,
    complete: impl Fn(&[u8]) -> Option<usize>,
) -> Result<usize, HttpError> {
    loop {
        if let Some(found) = complete(buffer) {
            return Ok(found);
        }
        let mut chunk = [0u8; 16 * 1024];
        let read = reader.read(&mut chunk).await.map_err(HttpError::Read)?;
        if read == 0 {
            return Err(HttpError::Closed { received: buffer.len() });
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
}

async fn read_chunked(reader: &mut (impl AsyncReadExt + Unpin), buffer: &mut Vec<u8>) -> Result<Vec<u8>, HttpError> {
    let mut body = Vec::new();
    loop {
        let line_end = fill_until(reader, buffer, |b| find(b, b"\r\n").map(|i| i + 2)).await?;
        let line = String::from_utf8_lossy(&buffer[..line_end - 2]).into_owned();
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| HttpError::Malformed(format!("chunk size line {line:?}")))?;
        buffer.drain(..line_end);
        if size == 0 {
            // Trailers, if any, end with an empty line.
            loop {
                let end = fill_until(reader, buffer, |b| find(b, b"\r\n").map(|i| i + 2)).await?;
                buffer.drain(..end);
                if end == 2 {
                    return Ok(body);
                }
            }
        }
        fill_until(reader, buffer, |b| (b.len() >= size + 2).then_some(size + 2)).await?;
        body.extend_from_slice(&buffer[..size]);
        buffer.drain(..size + 2);
    }
}

fn parse_head(head: &[u8]) -> Result<(u16, Vec<(String, String)>), HttpError> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let status = parts.next().and_then(|s| s.parse::<u16>().ok());
    let (true, Some(status)) = (version.starts_with("HTTP/1."), status) else {
        return Err(HttpError::Malformed(format!("status line {status_line:?}")));
    };
    let mut headers = Vec::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(HttpError::Malformed(format!("header line {line:?}")));
        };
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    Ok((status, headers))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn check(raw: &[u8], status: u16, body: &[u8]) {
        let mut reader = raw;
        let response = read_response(&mut reader).await.unwrap();
        assert_eq!(response.status, status);
        assert_eq!(response.body, body);
    }

    #[tokio::test]
    async fn responses_are_framed_by_length_chunks_or_the_end_of_the_connection() {
        check(b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}", 201, b"{}").await;
        check(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
            200,
            b"abcde",
        )
        .await;
        check(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 409 Conflict\r\nContent-Length: 1\r\n\r\nx", 409, b"x").await;
        check(b"HTTP/1.0 200 OK\r\n\r\nuntil the end", 200, b"until the end").await;
    }

    #[tokio::test]
    async fn a_connection_that_ends_early_is_lost() {
        let mut reader: &[u8] = b"HTTP/1.1 201 Created\r\ncontent-length: 10\r\n\r\n{}";
        assert!(read_response(&mut reader).await.unwrap_err().is_connection_lost());
        let mut reader: &[u8] = b"";
        assert!(read_response(&mut reader).await.unwrap_err().is_connection_lost());
    }

    #[test]
    fn repeated_headers_are_sent_as_separate_lines() {
        let request =
            Request::post_json("/payments", "{}").header("Idempotency-Key", "\"a\"").header("Idempotency-Key", "\"a\"");
        let head = String::from_utf8(request.head("127.0.0.1:80".parse().unwrap())).unwrap();
        assert_eq!(head.matches("Idempotency-Key: \"a\"\r\n").count(), 2);
        assert!(head.contains("Content-Length: 2\r\n"));
    }
}
