//! Overload through the real binary: a burst of calls beyond `--max-in-flight` is refused at
//! once while health keeps answering and memory stays bounded; connections beyond
//! `--max-connections` are closed at once; idle connections are closed after `--idle-timeout`.

use std::time::{Duration, Instant};

use idempotency_proto::pb;
use idempotency_proto::pb::coordinator_client::CoordinatorClient;
use idempotency_testkit::*;
use tokio::io::AsyncReadExt;
use tonic::transport::Channel;

use super::code_and_reason;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .and_then(|line| line.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Raises this process's open-file limit (children inherit it) to hold thousands of sockets.
fn raise_file_limit(wanted: u64) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain system calls on a struct we own.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = wanted.min(limit.rlim_max.max(wanted));
        limit.rlim_max = limit.rlim_max.max(limit.rlim_cur);
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}

async fn channel_to(addr: &str) -> Channel {
    Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_beyond_max_in_flight_is_refused_at_once_and_service_returns() {
    raise_file_limit(65_536);
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::start_with(&dir.path().join("data"), &["--max-in-flight", "256", "--max-waiting", "256"]);
    let pid = server.child.id();
    let mut client = server.client().await;
    let held = claim_acquired(&mut client, "held").await;
    let rss_before = rss_kib(pid);
    // 5,000 Claims that would wait 3 s for the held key, on 20 connections.
    let mut channels = Vec::new();
    for _ in 0..20 {
        channels.push(channel_to(&server.addr).await);
    }
    let started = Instant::now();
    let calls: Vec<_> = (0..5_000)
        .map(|i| {
            let mut client = CoordinatorClient::new(channels[i % channels.len()].clone());
            tokio::spawn(async move {
                let request = pb::ClaimRequest { wait: Some(secs(3)), ..claim_request("held", b"fp") };
                let sent = Instant::now();
                let result = client.claim(request).await;
                (sent.elapsed(), result.map(|reply| outcome(reply.into_inner())))
            })
        })
        .collect();
    // While the burst is on: health answers, memory stays bounded.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_during = rss_kib(pid);
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel_to(&server.addr).await);
    health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.expect("health answers");
    let mut refused = Vec::new();
    let mut waited = 0;
    for call in calls {
        match call.await.unwrap() {
            (took, Err(status)) => {
                assert_eq!(code_and_reason(&status).1, "OVERLOADED", "{status:?}");
                let retry = tonic_types::StatusExt::get_details_retry_info(&status).and_then(|info| info.retry_delay);
                assert!(retry.is_some(), "a retry hint comes with the refusal");
                refused.push(took);
            }
            (_, Ok(pb::claim_response::Outcome::InProgress(_))) => waited += 1,
            (_, Ok(other)) => panic!("the key is held: {other:?}"),
        }
    }
    refused.sort();
    let p99 = refused.get(refused.len() * 99 / 100).copied().unwrap_or_default();
    eprintln!(
        "burst of 5,000 against --max-in-flight 256: {} refused (p50 {:?}, p99 {:?}), {waited} waited; RSS {rss_before} KiB before, {rss_during} KiB during; {:?} in all",
        refused.len(),
        refused.get(refused.len() / 2).copied().unwrap_or_default(),
        p99,
        started.elapsed()
    );
    assert!(waited <= 256, "at most --max-in-flight calls were let in: {waited}");
    assert!(refused.len() >= 5_000 - 256, "the rest were refused: {}", refused.len());
    assert!(p99 < Duration::from_secs(3), "refusals came back before the admitted calls' waits ended: {p99:?}");
    assert!(rss_during < rss_before + 256 * 1024, "memory stayed bounded: {rss_before} → {rss_during} KiB");
    // After the burst, service is normal.
    client.complete(complete_request("held", &held.lease_token, b"done")).await.unwrap();
    completed(client.claim(claim_request("held", b"fp")).await.unwrap().into_inner());
    claim_acquired(&mut client, "after the burst").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_closed_at_once() {
    raise_file_limit(65_536);
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::start_with(&dir.path().join("data"), &["--max-connections", "1000"]);
    let pid = server.child.id();
    let rss_before = rss_kib(pid);
    let opened = Instant::now();
    // This process may hold 20,000 files at most (the hard limit here), so each batch's
    // connections that the server closed are let go of; those it holds are kept.
    let mut held: Vec<tokio::net::TcpStream> = Vec::new();
    let mut closed_by_server = 0;
    for _ in 0..40 {
        let mut batch = Vec::with_capacity(500);
        for _ in 0..500 {
            batch.push(tokio::net::TcpStream::connect(&server.addr).await.expect("connect"));
        }
        for mut socket in batch {
            if held_open(&mut socket).await {
                held.push(socket);
            } else {
                closed_by_server += 1;
            }
        }
    }
    // A close that arrived later than `held_open` waited for (a busy machine) shows now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut still_held = Vec::with_capacity(held.len());
    for mut socket in held {
        if held_open(&mut socket).await {
            still_held.push(socket);
        } else {
            closed_by_server += 1;
        }
    }
    let held = still_held;
    let rss_full = rss_kib(pid);
    eprintln!(
        "20,000 connections against --max-connections 1000: {} held, {closed_by_server} closed at once; in {:?}; RSS {rss_before} → {rss_full} KiB",
        held.len(),
        opened.elapsed()
    );
    assert_eq!(held.len(), 1_000, "exactly --max-connections are held");
    assert_eq!(closed_by_server, 19_000);
    // Once they go, a real client is served.
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut client = server.client().await;
    claim_acquired(&mut client, "served again").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_after_the_idle_timeout_but_pinged_busy_ones_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::start_with(
        &dir.path().join("data"),
        &["--max-wait", "500ms", "--idle-timeout", "2s", "--keepalive-interval", "200ms"],
    );
    // Connections that never send a frame.
    let mut silent = Vec::new();
    for _ in 0..10 {
        silent.push(tokio::net::TcpStream::connect(&server.addr).await.unwrap());
    }
    // A real client that makes a call every half second (the server pings it, it answers).
    let mut client = server.client().await;
    for i in 0..8 {
        claim_acquired(&mut client, &format!("busy-{i}")).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut still_open = 0;
    for socket in &mut silent {
        if held_open(socket).await {
            still_open += 1;
        }
    }
    assert_eq!(still_open, 0, "the silent connections were closed after 2 s");
    // An HTTP/2 client that stays idle past the timeout is closed too, and reconnects when it
    // next calls (tonic's channel does).
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    claim_acquired(&mut client, "after idling").await;
}

/// Whether the server still holds `socket` open: a closed one reads end-of-file at once (after
/// whatever the server sent, such as its HTTP/2 SETTINGS); an open one has nothing more to read.
async fn held_open(socket: &mut tokio::net::TcpStream) -> bool {
    let mut buffer = [0u8; 256];
    loop {
        match tokio::time::timeout(Duration::from_millis(2), socket.read(&mut buffer)).await {
            Ok(Ok(0) | Err(_)) => return false,
            Ok(Ok(_)) => continue,
            Err(_) => return true,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_beyond_max_waiting_answer_in_progress_at_once_and_the_waiters_get_the_response() {
    let server = TestServer::start_with(|config| config.max_waiting = 2).await;
    let mut client = server.client().await;
    let holder = claim_acquired(&mut client, "held").await;
    let waiting: Vec<_> = (0..5)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let mut request = claim_request("held", b"fp");
                request.wait = Some(secs(10));
                outcome(client.claim(request).await.unwrap().into_inner())
            })
        })
        .collect();
    // Two park; the three beyond --max-waiting answer at once, without waiting (the manual
    // clock does not move, so a wait could only end by the holder's Complete).
    while server.coordinator().waiting_claims() < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut answered_at_once = 0;
    for _ in 0..200 {
        answered_at_once = waiting.iter().filter(|task| task.is_finished()).count();
        if answered_at_once == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!((answered_at_once, server.coordinator().waiting_claims()), (3, 2));
    client.complete(complete_request("held", &holder.lease_token, b"done")).await.unwrap();
    let mut outcomes = Vec::new();
    for task in waiting {
        outcomes.push(task.await.unwrap());
    }
    let in_progress = outcomes.iter().filter(|o| matches!(o, pb::claim_response::Outcome::InProgress(_))).count();
    let completed = outcomes.iter().filter(|o| matches!(o, pb::claim_response::Outcome::Completed(_))).count();
    assert_eq!((in_progress, completed), (3, 2));
}
