//! Load, memory and disk: idle connections, a steady load with sweeping, bodies across sled's blob threshold, a client that stops reading.

use super::*;

pub(crate) fn dir_bytes(path: &std::path::Path) -> u64 {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// `IDEMPOTENCY_SOAK_SECONDS` (default 15) of steady flows at 400/s against the server binary,
/// with 20 s retention and sweeping every second. Always: zero errors and zero double grants.
/// For runs of 5 minutes or more, over the last two thirds (after warm-up), sampled every 10 s:
/// RSS stays within ±10 % of its mean; disk does not grow (the mean of the later half within
/// 10 % of the earlier half's; single samples within 25 %, as sled works in 512 KiB segments). The figures of the last long run are in
/// RELIABILITY.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_load_with_sweeping_keeps_memory_and_disk_flat() {
    use idempotency_bench::{Options, Scenario};
    let seconds: u64 = std::env::var("IDEMPOTENCY_SOAK_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(15);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = ChildServer::start_with(&data, &["--default-retention", "20s", "--sweep-interval", "1s"]);
    let pid = server.child.id();
    let options = Options {
        target: format!("http://{}", server.addr),
        scenario: Scenario::Flow,
        concurrency: 16,
        connections: Some(2),
        duration: Duration::from_secs(seconds),
        count: None,
        warmup: Duration::ZERO,
        // Mixed sizes, across the size at which sled keeps a page in a blob file of its own.
        response_bytes: 10,
        response_bytes_max: Some(200_000),
        key_space: 100,
        seed: 3,
        mix: "20,70,10".to_owned(),
        synchronous_commit: true,
        rate: 400,
        json: false,
        ca_file: None,
        cert_file: None,
        key_file: None,
        token_file: None,
        server_cpu: None,
    };
    let load = tokio::spawn(idempotency_bench::run(options));
    let mut samples = Vec::new();
    let every = if seconds >= 300 { Duration::from_secs(10) } else { Duration::from_secs(3) };
    while !load.is_finished() {
        tokio::time::sleep(every).await;
        samples.push((rss_kib(pid), dir_bytes(&data)));
    }
    let report = load.await.unwrap().unwrap();
    eprintln!(
        "soak: {seconds} s, {:.0} flows/s, errors {}, samples (RSS KiB, disk bytes): {samples:?}",
        report.rate(),
        report.error_count()
    );
    assert_eq!(report.error_count(), 0, "{}", report.to_table());
    assert_eq!(report.double_grants, 0);
    assert!(report.units > seconds * 300, "the load fell far below its rate: {}", report.units);
    if seconds >= 300 {
        let steady = &samples[samples.len() / 3..];
        let mean = |values: &[u64]| values.iter().sum::<u64>() as f64 / values.len() as f64;
        let rss: Vec<u64> = steady.iter().map(|s| s.0).collect();
        let rss_mean = mean(&rss);
        for value in &rss {
            assert!(
                (*value as f64 - rss_mean).abs() <= rss_mean * 0.10,
                "RSS is not flat: {value} against {rss_mean:.0}: {rss:?}"
            );
        }
        // sled fills and reclaims its files a 512 KiB segment at a time, so single disk samples
        // swing by a few segments around a level; what must not happen is growth. The level of
        // the second half stays within 10 % of the first, and no sample strays beyond 25 %.
        let disk: Vec<u64> = steady.iter().map(|s| s.1).collect();
        let (first, second) = disk.split_at(disk.len() / 2);
        let (first, second, all) = (mean(first), mean(second), mean(&disk));
        assert!((second - first).abs() <= first * 0.10, "disk grew from {first:.0} to {second:.0}: {disk:?}");
        for value in &disk {
            assert!((*value as f64 - all).abs() <= all * 0.25, "disk swung to {value} around {all:.0}: {disk:?}");
        }
    }
}

/// Bodies from 10 B to 300 KB, the size of a response varying with every call, written by 16
/// clients at once while the sweeper deletes what expired: sled writes pages larger than 128 KiB
/// to blob files of their own, and creates and deletes them all the time under such a load.
/// Every call succeeds and health stays SERVING throughout (a blob that sled deleted while a
/// flush was syncing used to fail the flush, and with it the store, for a second at a time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_body_sizes_across_the_blob_threshold_cause_no_outage() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Write-ahead log files of 1 MiB: a checkpoint (sled's durable flush, which lists and syncs
    // the blob files that sled deletes under it) every few hundred flows, instead of once per
    // 64 MiB of log, so that the race the flush must tolerate happens within the run.
    let flags = ["--default-retention", "1s", "--sweep-interval", "200ms", "--wal-file-mb", "1"];
    let server = ChildServer::start_with(&data, &flags);
    let channel = Channel::from_shared(format!("http://{}", server.addr)).unwrap().connect().await.unwrap();
    let mut watch = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest { service: String::new() })
        .await
        .unwrap()
        .into_inner();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let watcher = {
        let seen = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok(Some(message)) = watch.message().await {
                seen.lock().unwrap().push(message.status());
            }
        })
    };
    let until = Instant::now() + Duration::from_secs(6);
    let writers: Vec<_> = (0..16u64)
        .map(|writer| {
            let mut client = CoordinatorClient::new(channel.clone());
            tokio::spawn(async move {
                let mut rng = Rng(writer);
                let (mut flows, mut failures, mut blob_sized) = (0u64, Vec::new(), 0u64);
                for attempt in 0.. {
                    if Instant::now() >= until {
                        break;
                    }
                    let key = format!("w{writer}-{attempt}");
                    let request = pb::ClaimRequest { retention: Some(secs(1)), ..claim_request(&key, b"fp") };
                    let grant = match client.claim(request).await.map(|reply| outcome(reply.into_inner())) {
                        Ok(pb::claim_response::Outcome::Acquired(grant)) => grant,
                        Ok(other) => {
                            failures.push(format!("claim of a fresh key: {other:?}"));
                            continue;
                        }
                        Err(status) => {
                            failures.push(format!("claim: {:?} {:?}", status.code(), status.message()));
                            continue;
                        }
                    };
                    let size = idempotency_testkit::body_size(&mut rng, 10, Some(300_000));
                    blob_sized += u64::from(size > 128 * 1024);
                    let body = vec![(flows % 251) as u8; size];
                    if let Err(status) = client.complete(complete_request(&key, &grant.lease_token, &body)).await {
                        failures.push(format!("complete: {:?} {:?}", status.code(), status.message()));
                    }
                    flows += 1;
                }
                (flows, failures, blob_sized)
            })
        })
        .collect();
    let (mut flows, mut failures, mut blob_sized) = (0, Vec::new(), 0);
    for writer in writers {
        let (done, failed, large) = writer.await.unwrap();
        flows += done;
        blob_sized += large;
        failures.extend(failed);
    }
    // What health reported while the load ran, before stopping turns it NOT_SERVING.
    let health = seen.lock().unwrap().clone();
    watcher.abort();
    eprintln!("{flows} flows, {blob_sized} bodies over 128 KiB, {} failures, health {health:?}", failures.len());
    assert!(flows > 100 && blob_sized > 0, "the load ran: {flows} flows, {blob_sized} large bodies");
    assert!(
        failures.is_empty(),
        "{} calls failed, the first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert_eq!(health, vec![ServingStatus::Serving], "health left SERVING under load");
}

/// A client that asks for large responses and never reads them: HTTP/2 flow control stops the
/// server from sending, each stuck call holds one encoded response, the per-connection stream
/// limit caps how many such calls one connection can have, and everyone else is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_does_not_stop_the_service() {
    use prost::Message;
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::start_with(&dir.path().join("data"), &["--max-streams-per-connection", "64"]);
    let pid = server.child.id();
    let mut client = server.client().await;
    let grant = claim_acquired(&mut client, "large").await;
    let body = vec![7u8; 256 * 1024];
    client.complete(complete_request("large", &grant.lease_token, &body)).await.unwrap();
    let rss_before = rss_kib(pid);

    // A connection whose receive window is zero: the server may send headers but no data.
    let tcp = tokio::net::TcpStream::connect(&server.addr).await.unwrap();
    let (h2_client, connection) = h2::client::Builder::new().initial_window_size(0).handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let payload = lookup_request("large").encode_to_vec();
    let lookup = || {
        http::Request::builder()
            .method("POST")
            .uri(format!("http://{}/idempotency.v1.Coordinator/Lookup", server.addr))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap()
    };
    let mut stuck = Vec::new();
    for _ in 0..65 {
        let mut h2_client = h2_client.clone().ready().await.unwrap();
        let (response, mut send) = h2_client.send_request(lookup(), false).unwrap();
        send.send_data(bytes::Bytes::from(frame(false, payload.len() as u32, &payload)), true).unwrap();
        stuck.push((response, send));
    }
    // The first 64 are answered (headers need no window); the 65th waits for a free stream.
    let (last, _) = stuck.pop().unwrap();
    let mut answered = Vec::new();
    for (response, send) in stuck {
        answered
            .push((tokio::time::timeout(Duration::from_secs(30), response).await.expect("answered").unwrap(), send));
    }
    // It either waits, or, if the client sent it before it had the server's SETTINGS, the server
    // refuses it (REFUSED_STREAM). Either way no 65th call runs.
    match tokio::time::timeout(Duration::from_millis(500), last).await {
        Err(_) => {}
        Ok(Err(error)) if error.reason() == Some(h2::Reason::REFUSED_STREAM) => {}
        Ok(answer) => panic!("the server let a connection run more calls than its stream limit: {answer:?}"),
    }
    // Meanwhile a normal client is served, including the same large response.
    let mut other = server.client().await;
    for _ in 0..20 {
        let view = other.lookup(lookup_request("large")).await.unwrap().into_inner();
        assert_eq!(view.response.unwrap().body.len(), body.len());
    }
    let rss_stuck = rss_kib(pid);
    eprintln!(
        "stuck reader: 64 calls of 256 KiB never read; server RSS {rss_before} KiB before, {rss_stuck} KiB with them stuck"
    );
    // 64 encoded responses of 256 KiB are 16 MiB; allow generous room for buffers.
    assert!(rss_stuck < rss_before + 128 * 1024, "memory grew by {} KiB", rss_stuck - rss_before);
    drop(answered);
    drop(h2_client);
    let view = other.lookup(lookup_request("large")).await.unwrap().into_inner();
    assert_eq!(view.state(), pb::KeyState::Completed);
}
