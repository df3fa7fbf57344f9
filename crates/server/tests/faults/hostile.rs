//! Hostile input through a real HTTP/2 connection: bytes and headers no generated client would send.

use super::*;

/// Sends one gRPC call with a hand-made frame and extra headers; returns its status (code,
/// message and details, `Code::Ok` for success).
pub(crate) async fn raw_call(
    addr: std::net::SocketAddr,
    path: &str,
    frame: Vec<u8>,
    headers: &[(&str, &str)],
) -> tonic::Status {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let (response, mut body) = client.send_request(request.body(()).unwrap(), false).unwrap();
    // The server may answer (an unknown method, say) and close the stream before the frame goes
    // out; sending then fails, and the answer below is what counts.
    let _ = body.send_data(bytes::Bytes::from(frame), true);
    let response = response.await.unwrap();
    if let Some(status) = tonic::Status::from_header_map(response.headers()) {
        return status;
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        body.flow_control().release_capacity(chunk.len()).unwrap();
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    tonic::Status::from_header_map(&trailers).expect("a grpc-status")
}

/// A gRPC length-prefixed frame.
pub(crate) fn frame(compressed: bool, declared_len: u32, payload: &[u8]) -> Vec<u8> {
    let mut bytes = vec![u8::from(compressed)];
    bytes.extend_from_slice(&declared_len.to_be_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

pub(crate) fn gzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// The status code and the ErrorInfo reason ("" without one).
pub(crate) fn code_and_reason(status: &tonic::Status) -> (tonic::Code, String) {
    (status.code(), status.get_details_error_info().map(|info| info.reason).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_get_a_status_and_change_nothing() {
    use prost::Message;
    use tonic::Code;
    let server = TestServer::start().await;
    let mut client = server.client().await;
    claim_acquired(&mut client, "existing").await;
    let before = server.digest().await;
    let claim = "/idempotency.v1.Coordinator/Claim";
    let gzip_header = [("grpc-encoding", "gzip")];
    // 16 MiB of zeros: a few KiB compressed, far past the 1 MiB + 64 KiB message limit inflated.
    let bomb = gzip(&vec![0u8; 16 << 20]);
    let mut invalid_utf8 = claim_request("k", b"fp").encode_to_vec();
    let at = invalid_utf8.iter().position(|b| *b == b'k').unwrap();
    invalid_utf8[at] = 0xff;
    type Case<'a> = (&'a str, Vec<u8>, &'a [(&'a str, &'a str)], Code, &'a str);
    let cases: Vec<Case> = vec![
        // Not protobuf at all: bad input, with the reason for it.
        ("garbage bytes", frame(false, 7, &[0xff; 7]), &[], Code::InvalidArgument, "INVALID_MESSAGE"),
        // Field 2 (key, a string) sent as a varint.
        ("wrong wire type", frame(false, 2, &[0x10, 0x05]), &[], Code::InvalidArgument, "INVALID_MESSAGE"),
        (
            "invalid UTF-8 in a string",
            frame(false, invalid_utf8.len() as u32, &invalid_utf8),
            &[],
            Code::InvalidArgument,
            "INVALID_MESSAGE",
        ),
        // A frame that claims 100 MB: refused from its length alone.
        ("declared length beyond the limit", frame(false, 100 << 20, &[0; 16]), &[], Code::OutOfRange, ""),
        // A compression bomb: refused once the inflated size passes the limit.
        ("gzip bomb", frame(true, bomb.len() as u32, &bomb), &gzip_header, Code::ResourceExhausted, ""),
        // Compressed, but not gzip: the transport's error.
        ("broken gzip", frame(true, 4, &[1, 2, 3, 4]), &gzip_header, Code::Internal, ""),
        // An encoding the server does not accept.
        ("zstd", frame(true, 4, &[1, 2, 3, 4]), &[("grpc-encoding", "zstd")], Code::Unimplemented, ""),
        // An empty message: every field at its default, so an empty key.
        ("empty message", frame(false, 0, &[]), &[], Code::InvalidArgument, "INVALID_KEY"),
    ];
    for (name, bytes, headers, code, reason) in cases {
        let status = raw_call(server.addr, claim, bytes, headers).await;
        assert_eq!(code_and_reason(&status), (code, reason.to_owned()), "{name}: {status:?}");
    }
    assert_eq!(server.digest().await, before, "hostile frames changed the store");

    // Unknown fields are skipped, as protobuf requires: the call works.
    let mut payload = lookup_request("existing").encode_to_vec();
    payload.extend_from_slice(&[0xf8, 0x06, 0x01]); // field 111, varint 1
    let lookup = "/idempotency.v1.Coordinator/Lookup";
    let status = raw_call(server.addr, lookup, frame(false, payload.len() as u32, &payload), &[]).await;
    assert_eq!(status.code(), Code::Ok);
    // A gzip-compressed request is served as any other.
    let compressed = gzip(&lookup_request("existing").encode_to_vec());
    let status = raw_call(server.addr, lookup, frame(true, compressed.len() as u32, &compressed), &gzip_header).await;
    assert_eq!(status.code(), Code::Ok, "{status:?}");
    // An unknown method.
    let status = raw_call(server.addr, "/idempotency.v1.Coordinator/Drop", frame(false, 0, &[]), &[]).await;
    assert_eq!(status.code(), Code::Unimplemented);
    // And the server still serves everyone else.
    in_progress(client.claim(claim_request("existing", b"fp")).await.unwrap().into_inner());
}

/// `grpc-timeout` values the spec does not allow (more than eight digits) or that would
/// overflow a clock if added to it: answered like calls without a deadline, never a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_or_malformed_grpc_timeouts_are_answered_without_a_panic() {
    use prost::Message;
    // The binary, on the system clock, so that waits end.
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::start(&dir.path().join("data"));
    let mut client = server.client().await;
    let addr: std::net::SocketAddr = server.addr.parse().unwrap();
    claim_acquired(&mut client, "held").await;
    let claim = "/idempotency.v1.Coordinator/Claim";
    for timeout in ["9223372036854775807S", "18446744073709551615S", "99999999H", "99999999S", "1x", "S", ""] {
        // A fresh key (acquired), and the held key with a wait (answers at once: the wait is 1 ms).
        let key = format!("fresh-{timeout}");
        let payload = claim_request(&key, b"fp").encode_to_vec();
        let status =
            raw_call(addr, claim, frame(false, payload.len() as u32, &payload), &[("grpc-timeout", timeout)]).await;
        assert_eq!(status.code(), tonic::Code::Ok, "grpc-timeout {timeout:?}: {status:?}");
        let waiting = pb::ClaimRequest { wait: Some(millis(1)), ..claim_request("held", b"fp") }.encode_to_vec();
        let status =
            raw_call(addr, claim, frame(false, waiting.len() as u32, &waiting), &[("grpc-timeout", timeout)]).await;
        assert_eq!(status.code(), tonic::Code::Ok, "grpc-timeout {timeout:?} on a wait: {status:?}");
    }
    // The server still serves.
    in_progress(client.claim(claim_request("held", b"fp")).await.unwrap().into_inner());
}

pub(crate) fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// How many idle connections to open: 10,000 (the machine allows 20,000 descriptors per process).
pub(crate) fn idle_connections() -> usize {
    std::env::var("IDEMPOTENCY_IDLE_CONNECTIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_connections_do_not_stop_the_service() {
    let dir = tempfile::tempdir().unwrap();
    // Above the default --max-connections (4096), which would close most of them at once (the
    // security tests check that limit): here they all stay open.
    let server = ChildServer::start_with(&dir.path().join("data"), &["--max-connections", "20000"]);
    let pid = server.child.id();
    let mut client = server.client().await;
    claim_acquired(&mut client, "before").await;
    let rss_before = rss_kib(pid);
    let mut idle = Vec::new();
    for _ in 0..idle_connections() {
        idle.push(tokio::net::TcpStream::connect(&server.addr).await.expect("the server accepts"));
    }
    // Every one of them is open; a real client still gets served, quickly enough to finish.
    let mut other = server.client().await;
    let grant = claim_acquired(&mut other, "during").await;
    other.complete(complete_request("during", &grant.lease_token, b"ok")).await.unwrap();
    let rss_during = rss_kib(pid);
    eprintln!("idle connections: {}, server RSS {rss_before} KiB before, {rss_during} KiB with them open", idle.len());
    assert!(rss_during < rss_before + 512 * 1024, "memory grew by {} KiB", rss_during - rss_before);
    drop(idle);
    completed(client.claim(claim_request("during", b"fp")).await.unwrap().into_inner());
}
