//! The server's life: restarts keep every acknowledged state, kill -9 loses nothing acknowledged,
//! health and reflection, draining on shutdown, and refusing to start on a bad data directory.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use idempotency_proto::pb;
use idempotency_store_sled::{Durability, SledOptions, SledStore};
use idempotency_testkit::*;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_every_acknowledged_state_and_fencing_keeps_increasing() {
    restart_keeps_everything(Backend::Sled).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_on_postgres_keeps_every_acknowledged_state_and_fencing_keeps_increasing() {
    if let Some(backend) = Backend::postgres() {
        restart_keeps_everything(backend).await;
    }
}

async fn restart_keeps_everything(backend: Backend) {
    let mut server = TestServer::start_on(backend).await;
    let mut client = server.client().await;
    let held = claim_acquired(&mut client, "held").await;
    let done = claim_acquired(&mut client, "done").await;
    let mut stored = response(b"\x00binary\xffbody");
    stored.metadata.insert("location".into(), "/payments/pay_abc123".into());
    let mut request = complete_request("done", &done.lease_token, b"");
    request.response = Some(stored.clone());
    client.complete(request).await.unwrap();
    let released = claim_acquired(&mut client, "released").await;
    client.release(release_request("released", &released.lease_token)).await.unwrap();
    let highest = [held.fencing_token, done.fencing_token, released.fencing_token].into_iter().max().unwrap();

    server.restart().await;
    let mut client = server.client().await;
    // The first grant after a restart must already be above everything granted before it.
    let first_after = claim_acquired(&mut client, "never-seen").await;
    assert!(first_after.fencing_token > highest, "{} after {highest}", first_after.fencing_token);
    let busy = in_progress(client.claim(claim_request("held", b"fp")).await.unwrap().into_inner());
    assert_eq!(busy.lease_expires_at, held.lease_expires_at);
    let replay = completed(client.claim(claim_request("done", b"fp")).await.unwrap().into_inner());
    assert_eq!(replay.response, Some(stored));
    let status = client.claim(claim_request("done", b"other")).await.unwrap_err();
    assert_status(&status, Code::FailedPrecondition, "FINGERPRINT_MISMATCH");
    // The holder's token still works after the restart.
    client.renew(renew_request("held", &held.lease_token, secs(10))).await.unwrap();
    let again = claim_acquired(&mut client, "released").await;
    assert!(again.fencing_token > highest);
    let fresh = claim_acquired(&mut client, "fresh").await;
    assert!(fresh.fencing_token > again.fencing_token);
    assert_eq!(server.record_count().await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_tokens_keep_increasing_after_a_sweep_and_a_restart() {
    fencing_survives_sweep_and_restart(Backend::Sled).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_tokens_on_postgres_keep_increasing_after_a_sweep_and_a_restart() {
    if let Some(backend) = Backend::postgres() {
        fencing_survives_sweep_and_restart(backend).await;
    }
}

async fn fencing_survives_sweep_and_restart(backend: Backend) {
    let mut server = TestServer::start_on(backend).await;
    let mut client = server.client().await;
    let mut request = claim_request("swept", b"");
    request.retention = Some(secs(1));
    request.lease_ttl = Some(secs(1));
    let first = acquired(client.claim(request.clone()).await.unwrap().into_inner());
    // Kept a retention after its lease lapsed: gone 2 s after the claim.
    server.advance(Duration::from_secs(2));
    assert_eq!(server.sweep().await.deleted, 1);
    server.restart().await;
    let mut client = server.client().await;
    let second = acquired(client.claim(request).await.unwrap().into_inner());
    assert!(second.fencing_token > first.fencing_token);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_serving_for_the_server_and_the_service() {
    let server = TestServer::start().await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "idempotency.v1.Coordinator"] {
        let reply = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(reply.status(), ServingStatus::Serving, "service {service:?}");
    }
    let status = health.check(HealthCheckRequest { service: "nope".into() }).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services_in_v1_and_v1alpha() {
    use tokio_stream::StreamExt;
    let server = TestServer::start().await;
    let channel = server.channel().await;

    let mut v1 = tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut replies = v1.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let reply = replies.next().await.unwrap().unwrap();
    let Some(tonic_reflection::pb::v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        reply.message_response
    else {
        panic!("expected a service list, got {reply:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"idempotency.v1.Coordinator".to_owned()), "{names:?}");
    assert!(names.contains(&"idempotency.v1.Admin".to_owned()), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health".to_owned()), "{names:?}");

    let mut v1alpha = tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let request = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "idempotency.v1.Coordinator".into(),
            ),
        ),
    };
    let mut replies = v1alpha.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let reply = replies.next().await.unwrap().unwrap();
    assert!(
        matches!(
            reply.message_response,
            Some(tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(ref f))
                if !f.file_descriptor_proto.is_empty()
        ),
        "{reply:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_answers_waiting_claims_and_refuses_new_calls() {
    let mut server = TestServer::start().await;
    let mut client = server.client().await;
    claim_acquired(&mut client, "busy").await;
    let mut waiter_client = client.clone();
    let waiter = tokio::spawn(async move {
        let request = pb::ClaimRequest { wait: Some(secs(60)), ..claim_request("busy", b"fp") };
        waiter_client.claim(request).await
    });
    for _ in 0..10_000 {
        if server.coordinator().waiting_keys() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The sweeper reads this count to tell whether calls are being served.
    assert_eq!(server.coordinator().calls_admitted(), 2, "the claim and the waiting claim");
    server.coordinator().drain();
    in_progress(waiter.await.unwrap().expect("the waiting claim is answered").into_inner());
    let status = client.lookup(lookup_request("busy")).await.unwrap_err();
    assert_status(&status, Code::Unavailable, "SHUTTING_DOWN");
    assert_eq!(server.coordinator().calls_admitted(), 2, "a refused call is not counted");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_that_reaches_the_coordinator_counts_as_load_for_the_sweeper() {
    let mut server = TestServer::start().await;
    let mut client = server.client().await;
    let grant = claim_acquired(&mut client, "counted").await;
    client.renew(renew_request("counted", &grant.lease_token, secs(30))).await.unwrap();
    client.complete(complete_request("counted", &grant.lease_token, b"done")).await.unwrap();
    // Refused by the state machine (the key is completed), but it reached the store: counted.
    client.release(release_request("counted", &grant.lease_token)).await.unwrap_err();
    client.lookup(lookup_request("counted")).await.unwrap();
    assert_eq!(server.coordinator().calls_admitted(), 5, "claim, renew, complete, release, lookup");
    // Refused as invalid before it reaches the coordinator: not counted.
    let status = client.lookup(lookup_request("")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(server.coordinator().calls_admitted(), 5);
    server.stop().await;
}

/// Runs the binary on `data_dir` and returns its exit success and everything it logged.
fn run_to_exit(data_dir: &Path) -> (bool, String) {
    let output = Command::new(binary())
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .env("RUST_LOG", "info")
        .output()
        .expect("the binary runs");
    (output.status.success(), String::from_utf8_lossy(&output.stderr).into_owned())
}

/// A configuration the server cannot run with stops it before anything opens, with a message
/// naming the flag and exit code 2, as clap's own refusals do (never a panic, a hang or exit 101).
#[test]
fn a_configuration_that_cannot_work_is_refused_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    for (args, named) in [
        (&["--cache-mb", "0"][..], "--cache-mb"),
        (&["--max-streams-per-connection", "0"], "--max-streams-per-connection"),
        (&["--max-response-bytes", "18446744073709551615"], "--max-response-bytes"),
        (&["--max-retention", "290000000years"], "--max-retention"),
        (&["--default-lease-ttl", "2h"], "--default-lease-ttl"),
    ] {
        let output = Command::new(binary())
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(args)
            .output()
            .expect("the binary runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(named), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    assert!(!dir.path().join("data").exists(), "nothing was opened");
}

#[test]
fn a_locked_data_directory_stops_the_server_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let options = SledOptions {
        path: dir.path().join("data"),
        durability: Durability::Strict,
        max_records: 10,
        cache_capacity_bytes: 1 << 20,
        wal_file_bytes: idempotency_store_sled::WAL_FILE_BYTES,
    };
    let _holder = SledStore::open(&options).expect("the first opener wins");
    let (success, log) = run_to_exit(&options.path);
    assert!(!success, "started on a locked directory: {log}");
    assert!(log.contains("cannot open the data directory"), "{log}");
}

#[test]
fn a_data_directory_that_is_a_file_stops_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-directory");
    std::fs::write(&file, b"x").unwrap();
    let (success, log) = run_to_exit(&file);
    assert!(!success, "{log}");
    assert!(log.contains("cannot open the data directory"), "{log}");
}

#[test]
fn a_corrupt_data_directory_stops_the_server_instead_of_starting_empty() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("conf"), b"this is not sled's configuration").unwrap();
    std::fs::write(data.join("db"), vec![0xAB; 4096]).unwrap();
    let (success, log) = run_to_exit(&data);
    assert!(!success, "started on a corrupt directory: {log}");
    assert!(log.contains("data directory"), "{log}");
    assert_eq!(std::fs::read(data.join("conf")).unwrap(), b"this is not sled's configuration", "it overwrote the data");
}

/// Runs the binary with `RUST_LOG` set to `filter`, makes one flow on `key` and a replay of it,
/// stops it, and returns everything it logged.
async fn log_of_one_flow(filter: &str, key: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::start_logging(&dir.path().join("data"), &[], filter);
    let mut client = server.client().await;
    let grant = claim_acquired(&mut client, key).await;
    client.complete(complete_request(key, &grant.lease_token, b"secret-body")).await.unwrap();
    completed(client.claim(claim_request(key, b"fp")).await.unwrap().into_inner());
    let log = server.stop_and_log();
    assert!(
        !log.contains("secret-body") && !log.contains(&grant.lease_token),
        "a body or lease token was logged:\n{log}"
    );
    log
}

/// At the default level a call logs nothing (a per-call span would cost every call its
/// formatting); at `debug` every call logs a line with its namespace, key and outcome, and
/// never its body or lease token (README, `--log-format`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_logged_at_debug_with_namespace_key_and_outcome_and_not_at_info() {
    let quiet = log_of_one_flow("info", "logged-at-info").await;
    assert!(!quiet.contains("logged-at-info"), "a call was logged at info:\n{quiet}");
    let log = log_of_one_flow("idempotency_coordinator=debug", "logged-at-debug").await;
    let calls: Vec<&str> = log.lines().filter(|line| line.contains("key=logged-at-debug")).collect();
    let logged = |call: &str, outcome: &str| {
        calls.iter().any(|line| {
            line.contains(&format!("{call}{{namespace=payments key=logged-at-debug"))
                && line.contains(outcome)
                && line.contains("answered")
        })
    };
    assert!(logged("claim", "acquired"), "no debug line for the Claim:\n{log}");
    assert!(logged("complete", "completed"), "no debug line for the Complete:\n{log}");
    assert!(logged("claim", "replayed"), "no debug line for the replay:\n{log}");
}

/// The body stored for `key`: its name repeated to `size` bytes.
fn body_of(key: &str, size: usize) -> Vec<u8> {
    key.bytes().cycle().take(size).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_change_and_sigint_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = ChildServer::start(&data);
    let mut client = server.client().await;
    let mut held_tokens = Vec::new();
    for i in 0..20 {
        let key = format!("held-{i}");
        held_tokens.push((key.clone(), claim_acquired(&mut client, &key).await));
    }
    // 16 clients claim and complete fresh keys as fast as they can; the kill lands mid-flight,
    // with batches of changes waiting on a flush.
    let acknowledged = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let writers: Vec<_> = (0..16)
        .map(|writer| {
            let mut client = client.clone();
            let acknowledged = std::sync::Arc::clone(&acknowledged);
            tokio::spawn(async move {
                let mut rng = idempotency_testkit::Rng(writer);
                for i in 0.. {
                    let key = format!("w{writer}-{i}");
                    let Ok(reply) = client.claim(claim_request(&key, b"fp")).await else { return };
                    let grant = acquired(reply.into_inner());
                    // Bodies from a few bytes to 200 kB: across sled's blob threshold.
                    let size = idempotency_testkit::body_size(&mut rng, 10, Some(200_000));
                    let body = body_of(&key, size);
                    if client.complete(complete_request(&key, &grant.lease_token, &body)).await.is_err() {
                        return;
                    }
                    acknowledged.lock().unwrap().push((key, grant.fencing_token, size));
                }
            })
        })
        .collect();
    while acknowledged.lock().unwrap().len() < 200 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.signal("-KILL");
    for writer in writers {
        writer.await.unwrap();
    }
    drop(server);
    let acknowledged = acknowledged.lock().unwrap().clone();

    let server = ChildServer::start(&data);
    let mut client = server.client().await;
    let mut highest = 0;
    for (key, fencing_token, size) in &acknowledged {
        let replay = completed(client.claim(claim_request(key, b"fp")).await.unwrap().into_inner());
        assert!(replay.response.unwrap().body == body_of(key, *size), "{key}: the body differs");
        assert_eq!(replay.fencing_token, *fencing_token);
        highest = highest.max(*fencing_token);
    }
    for (key, grant) in &held_tokens {
        let view = client.lookup(lookup_request(key)).await.unwrap().into_inner();
        assert_eq!(view.fencing_token, grant.fencing_token);
        client
            .complete(complete_request(key, &grant.lease_token, b"after crash"))
            .await
            .expect("the holder keeps its lease");
        highest = highest.max(grant.fencing_token);
    }
    let fresh = claim_acquired(&mut client, "fresh").await;
    assert!(fresh.fencing_token > highest);

    let mut server = server;
    server.signal("-INT");
    let status = server.child.wait().unwrap();
    assert!(status.success(), "SIGINT exit: {status:?}");
}

async fn health_check(addr: &str) -> Result<ServingStatus, tonic::Status> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .map_err(|error| tonic::Status::unavailable(error.to_string()))?;
    let reply = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await?;
    Ok(reply.into_inner().status())
}

/// What a load balancer needs from a rolling restart: on SIGTERM the server reports NOT_SERVING at
/// once but keeps serving every call, on new connections too, for the drain delay; only then does
/// it answer waiting Claims, refuse, close and exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_reports_not_serving_and_serves_on_through_the_drain_delay() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ChildServer::start_with(&dir.path().join("data"), &["--drain-delay", "2s"]);
    let addr = server.addr.clone();
    let mut client = server.client().await;
    let held = claim_acquired(&mut client, "held").await;
    let mut waiting_client = client.clone();
    let waiting = tokio::spawn(async move {
        waiting_client.claim(pb::ClaimRequest { wait: Some(secs(60)), ..claim_request("held", b"fp") }).await
    });
    assert_eq!(health_check(&addr).await.unwrap(), ServingStatus::Serving);

    server.signal("-TERM");
    let mut status = ServingStatus::Serving;
    for _ in 0..200 {
        status = health_check(&addr).await.expect("health answers during the drain delay");
        if status == ServingStatus::NotServing {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(status, ServingStatus::NotServing);
    // A client that has not noticed yet, on a new connection, is still served.
    let mut late_client = server.client().await;
    claim_acquired(&mut late_client, "during the delay").await;
    client.complete(complete_request("held", &held.lease_token, b"done")).await.expect("served during the delay");
    let replay = completed(waiting.await.unwrap().expect("the waiting claim is answered").into_inner());
    assert_eq!(replay.response.unwrap().body, b"done".as_slice());

    let exit = tokio::task::spawn_blocking(move || server.child.wait().unwrap()).await.unwrap();
    assert!(exit.success(), "SIGTERM exit: {exit:?}");
    assert!(health_check(&addr).await.is_err(), "the server is gone");
}

/// A disk whose flushes wait until the test opens the gate, or fail once it says so.
#[derive(Clone, Default)]
struct TestDisk {
    state: std::sync::Arc<(std::sync::Mutex<DiskState>, std::sync::Condvar)>,
}

#[derive(Default)]
struct DiskState {
    closed: bool,
    failing: bool,
}

impl TestDisk {
    fn set(&self, change: impl FnOnce(&mut DiskState)) {
        let (state, changed) = &*self.state;
        change(&mut state.lock().unwrap());
        changed.notify_all();
    }

    fn wrap(&self, mut flush: idempotency_store_sled::FlushFn) -> idempotency_store_sled::FlushFn {
        let disk = self.clone();
        Box::new(move || {
            let (state, changed) = &*disk.state;
            let guard = changed.wait_while(state.lock().unwrap(), |s| s.closed && !s.failing).unwrap();
            if guard.failing {
                return Err(std::io::Error::other("injected: no space left on device"));
            }
            drop(guard);
            flush()
        })
    }
}

struct OpenOnDrop(TestDisk);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.set(|s| s.closed = false);
    }
}

/// Serves a coordinator over a sled store whose flushes go through `disk`.
async fn serve_on(
    disk: &TestDisk,
    dir: &Path,
) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    use idempotency_coordinator::server::{self, ServeOptions};
    let options = SledOptions {
        path: dir.to_path_buf(),
        durability: Durability::Strict,
        max_records: 1000,
        cache_capacity_bytes: 1 << 24,
        wal_file_bytes: idempotency_store_sled::WAL_FILE_BYTES,
    };
    let wrapped = disk.clone();
    let store = SledStore::open_with_flush_wrapper(&options, move |flush| wrapped.wrap(flush)).unwrap();
    let clock = std::sync::Arc::new(idempotency_core::clock::ManualClock::new(START));
    let coordinator = std::sync::Arc::new(idempotency_core::Coordinator::new(store, clock, Default::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serve_options = ServeOptions {
        sweep_interval: Duration::from_secs(3600),
        sweep_batch: 100,
        drain_delay: Duration::ZERO,
        shutdown_grace: Duration::from_secs(1),
        max_streams_per_connection: 256,
        max_in_flight: 512,
        max_connections: 1024,
        idle_timeout: Duration::from_secs(300),
        keepalive: (Duration::from_secs(30), Duration::from_secs(20)),
        security: Default::default(),
        metrics_listen: None,
        records_census_interval: Duration::ZERO,
        health_listen: None,
    };
    let task = tokio::spawn(async move {
        let _ = server::serve(listener, coordinator, serve_options, async move {
            let _ = stopped.await;
            server::Stop::Now
        })
        .await;
    });
    (addr, stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_wait_until_what_they_report_is_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let disk = TestDisk::default();
    let (addr, stop, task) = serve_on(&disk, dir.path()).await;
    let mut client = pb::coordinator_client::CoordinatorClient::connect(format!("http://{addr}")).await.unwrap();
    claim_acquired(&mut client, "warm").await;

    disk.set(|s| s.closed = true);
    // If an assertion below fails, the gate must still open, or closing the store would wait
    // on the held flush forever and hang the test instead of failing it.
    let _open_on_exit = OpenOnDrop(disk.clone());
    let mut writer = client.clone();
    let claim = tokio::spawn(async move { writer.claim(claim_request("pending", b"fp")).await });
    let mut reader = client.clone();
    let lookup = tokio::spawn(async move {
        // Give the claim a head start so that the lookup reads its (not yet durable) record.
        tokio::time::sleep(Duration::from_millis(100)).await;
        reader.lookup(lookup_request("pending")).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!claim.is_finished(), "the claim was acknowledged before its flush");
    assert!(!lookup.is_finished(), "the lookup reported a change that is not on disk yet");
    disk.set(|s| s.closed = false);
    acquired(claim.await.unwrap().unwrap().into_inner());
    let view = lookup.await.unwrap().expect("the lookup sees the claim once durable").into_inner();
    assert_eq!(view.state(), pb::KeyState::InProgress);
    let _ = stop.send(());
    task.await.unwrap();
}

/// A call whose deadline comes while the store cannot answer (here a disk that does not finish
/// its flush) gets the contract's answer for an indeterminate call, UNAVAILABLE
/// STORE_UNAVAILABLE, shortly before its deadline: not the transport's CANCELLED or
/// DEADLINE_EXCEEDED, whichever wins a race.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_deadline_passes_on_a_stalled_disk_answers_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let disk = TestDisk::default();
    let (addr, stop, task) = serve_on(&disk, dir.path()).await;
    let mut client = pb::coordinator_client::CoordinatorClient::connect(format!("http://{addr}")).await.unwrap();
    let grant = claim_acquired(&mut client, "stalled").await;
    disk.set(|s| s.closed = true);
    let _open_on_exit = OpenOnDrop(disk.clone());
    fn with_deadline<T>(message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(Duration::from_millis(500));
        request
    }
    let status = client.claim(with_deadline(claim_request("new", b"fp"))).await.unwrap_err();
    assert_status(&status, Code::Unavailable, "STORE_UNAVAILABLE");
    let complete = complete_request("stalled", &grant.lease_token, b"done");
    let status = client.complete(with_deadline(complete.clone())).await.unwrap_err();
    assert_status(&status, Code::Unavailable, "STORE_UNAVAILABLE");
    // Once the disk answers, the retried Complete is applied (or returns the first result).
    disk.set(|s| s.closed = false);
    client.complete(complete).await.expect("the retry succeeds");
    let _ = stop.send(());
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_disk_turns_calls_unavailable_and_health_not_serving_until_it_works_again() {
    let dir = tempfile::tempdir().unwrap();
    let disk = TestDisk::default();
    let (addr, stop, task) = serve_on(&disk, dir.path()).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let mut client = pb::coordinator_client::CoordinatorClient::new(channel.clone());
    let mut health = HealthClient::new(channel);
    let done = claim_acquired(&mut client, "done").await;
    client.complete(complete_request("done", &done.lease_token, b"kept")).await.unwrap();

    disk.set(|s| s.failing = true);
    let status = client.claim(claim_request("lost", b"fp")).await.unwrap_err();
    assert_status(&status, Code::Unavailable, "STORE_UNAVAILABLE");
    let mut watch =
        health.watch(HealthCheckRequest { service: "idempotency.v1.Coordinator".into() }).await.unwrap().into_inner();
    loop {
        let update = tokio::time::timeout(Duration::from_secs(30), watch.message()).await.unwrap().unwrap().unwrap();
        if update.status() == ServingStatus::NotServing {
            break;
        }
    }
    // What was acknowledged before the failure is still served, and changes keep failing.
    let replay = completed(client.claim(claim_request("done", b"fp")).await.unwrap().into_inner());
    assert_eq!(replay.response.unwrap().body, b"kept".as_slice());
    let status = client.claim(claim_request("still-lost", b"fp")).await.unwrap_err();
    assert_status(&status, Code::Unavailable, "STORE_UNAVAILABLE");

    // The disk works again: the store reopens itself from disk and accepts changes.
    disk.set(|s| s.failing = false);
    loop {
        let update = tokio::time::timeout(Duration::from_secs(30), watch.message()).await.unwrap().unwrap().unwrap();
        if update.status() == ServingStatus::Serving {
            break;
        }
    }
    let after = claim_acquired(&mut client, "after").await;
    assert!(after.fencing_token > done.fencing_token);
    let replay = completed(client.claim(claim_request("done", b"fp")).await.unwrap().into_inner());
    assert_eq!(replay.response.unwrap().body, b"kept".as_slice());
    client.complete(complete_request("after", &after.lease_token, b"works")).await.unwrap();
    let _ = stop.send(());
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_reports_not_serving_before_the_server_goes() {
    let mut server = TestServer::start_with(|config| config.shutdown_grace = Duration::from_millis(500)).await;
    let mut health = HealthClient::new(server.channel().await);
    let mut watch = health.watch(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    let stopping = tokio::spawn(async move {
        server.stop().await;
    });
    let next = tokio::time::timeout(Duration::from_secs(30), watch.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(next.status(), ServingStatus::NotServing);
    stopping.await.unwrap();
}

fn bench_options(target: String, scenario: idempotency_bench::Scenario) -> idempotency_bench::Options {
    idempotency_bench::Options {
        target,
        scenario,
        concurrency: 16,
        connections: Some(2),
        duration: Duration::from_secs(1),
        count: Some(300),
        warmup: Duration::ZERO,
        response_bytes: 500,
        response_bytes_max: None,
        key_space: 50,
        seed: 7,
        mix: "20,70,10".to_owned(),
        synchronous_commit: true,
        rate: 0,
        json: false,
        ca_file: None,
        cert_file: None,
        key_file: None,
        token_file: None,
        server_cpu: None,
    }
}

/// The load generator's smoke run: every scenario completes with zero errors, zero wrong answers
/// and zero double grants. Its figures are not looked at here; BENCHMARKS.md has them.
async fn smoke_run(target: String, scenarios: &[idempotency_bench::Scenario]) {
    for scenario in scenarios {
        let report = idempotency_bench::run(bench_options(target.clone(), *scenario)).await.unwrap();
        assert_eq!(report.units, 300, "{scenario:?} on {target}");
        assert_eq!(report.error_count(), 0, "{scenario:?} on {target}: {}", report.to_table());
        assert_eq!(report.wrong_answers, 0, "{scenario:?} on {target}: {}", report.to_table());
        assert_eq!(report.double_grants, 0, "{scenario:?} on {target}: {}", report.to_table());
        let json = report.to_json();
        assert_eq!(json["units"], 300);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_generator_runs_every_scenario_against_the_coordinator() {
    use idempotency_bench::Scenario;
    let server = TestServer::start().await;
    let scenarios =
        [Scenario::Flow, Scenario::Replay, Scenario::Lookup, Scenario::Contention, Scenario::Mixed, Scenario::Health];
    smoke_run(format!("http://{}", server.addr), &scenarios).await;
    let report =
        idempotency_bench::run(bench_options(format!("http://{}", server.addr), Scenario::Contention)).await.unwrap();
    assert!(!report.ops["claim"].latency.is_empty());
    assert!(report.ops.contains_key("release"), "some claims won and released: {}", report.to_table());
}

/// The hand-rolled baselines, on the PostgreSQL and Redis named by the environment. CI sets both;
/// elsewhere a missing one is skipped with the reason printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_generator_runs_the_hand_rolled_baselines() {
    use idempotency_bench::Scenario;
    let scenarios = [Scenario::Flow, Scenario::Replay, Scenario::Lookup, Scenario::Contention, Scenario::Mixed];
    for variable in ["IDEMPOTENCY_TEST_POSTGRES", "IDEMPOTENCY_TEST_REDIS"] {
        match std::env::var(variable) {
            Ok(target) => smoke_run(target, &scenarios).await,
            Err(_) if std::env::var("CI").is_ok() => panic!("{variable} must be set in CI"),
            Err(_) => eprintln!("skipped: {variable} is not set, so that baseline is not exercised"),
        }
    }
}

fn run_migrate(data_dir: &Path, url: &str, schema: &str) -> String {
    let output = Command::new(binary())
        .args(["migrate", "--from"])
        .arg(data_dir)
        .args(["--to", url, "--schema", schema])
        .output()
        .expect("the binary runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "migrate failed: {stdout}{}", String::from_utf8_lossy(&output.stderr));
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_copies_an_embedded_store_to_postgres_and_can_be_rerun() {
    use idempotency_core::clock::{Clock, SystemClock};
    use idempotency_core::domain::Timestamp;
    let Some(Backend::Postgres(url)) = Backend::postgres() else { return };
    drop_stale_schemas(&url).await;
    let schema = test_schema();

    // An embedded store on real time, with a record whose retention ended ten seconds ago.
    let mut server = TestServer::start().await;
    let now = SystemClock.now();
    server.clock.set(Timestamp::from_unix_millis(now.unix_millis() - 10_000));
    let mut client = server.client().await;
    let mut short = claim_request("gone", b"fp");
    (short.lease_ttl, short.retention) = (Some(secs(1)), Some(secs(1)));
    client.claim(short).await.unwrap();
    server.clock.set(now);
    let done = claim_acquired(&mut client, "done").await;
    client.complete(complete_request("done", &done.lease_token, b"stored")).await.unwrap();
    let mut long = claim_request("held", b"fp");
    long.lease_ttl = Some(secs(120));
    let held = acquired(client.claim(long).await.unwrap().into_inner());
    let released = claim_acquired(&mut client, "released").await;
    client.release(release_request("released", &released.lease_token)).await.unwrap();
    server.stop().await;

    let report = run_migrate(server.data_dir(), &url, &schema);
    assert!(report.contains("copied 3 records (3 new, 0 replacing"), "{report}");
    assert!(report.contains("1 expired left behind"), "{report}");

    let dir = tempfile::tempdir().unwrap();
    let replica = ChildServer::start_with(&dir.path().join("unused"), &["--store", &url, "--postgres-schema", &schema]);
    let mut client = replica.client().await;
    let replay = completed(client.claim(claim_request("done", b"fp")).await.unwrap().into_inner());
    assert_eq!(replay.response.unwrap().body, b"stored".as_slice());
    let busy = in_progress(client.claim(claim_request("held", b"fp")).await.unwrap().into_inner());
    assert_eq!(busy.lease_expires_at, held.lease_expires_at);
    let status = client.claim(claim_request("held", b"other")).await.unwrap_err();
    assert_status(&status, Code::FailedPrecondition, "FINGERPRINT_MISMATCH");
    // Fencing tokens continue above everything the embedded store may have handed out: above its
    // persisted reservation, which is 2^20 above the first token of its block.
    let again = claim_acquired(&mut client, "released").await;
    assert!(again.fencing_token > held.fencing_token.max(released.fencing_token));
    assert!(again.fencing_token > 1 << 20, "{}", again.fencing_token);
    // The holder's token survived the move.
    client.complete(complete_request("held", &held.lease_token, b"finished")).await.unwrap();
    let status = client.lookup(lookup_request("gone")).await.unwrap_err();
    assert_status(&status, Code::NotFound, "KEY_NOT_FOUND");

    // A second run copies nothing and undoes nothing done since.
    let report = run_migrate(server.data_dir(), &url, &schema);
    assert!(report.contains("copied 0 records (0 new, 0 replacing older copies); 3 already there"), "{report}");
    let replay = completed(client.claim(claim_request("held", b"fp")).await.unwrap().into_inner());
    assert_eq!(replay.response.unwrap().body, b"finished".as_slice());
    let view = client.lookup(lookup_request("released")).await.unwrap().into_inner();
    assert_eq!((view.state(), view.fencing_token), (pb::KeyState::InProgress, again.fencing_token));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_store_url_or_an_absent_database_stops_the_server_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let fail = |flags: &[&str]| {
        let output = Command::new(binary())
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("unused"))
            .args(flags)
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let log = fail(&["--store", "mysql://localhost/x"]);
    assert!(log.contains("give a postgres://user@host:port/database URL"), "{log}");
    let log = fail(&["--store", "postgres://nobody:secret@127.0.0.1:1/x", "--postgres-timeout", "1s"]);
    assert!(log.contains("PostgreSQL at 127.0.0.1:1/x"), "{log}");
    assert!(!log.contains("secret"), "the password leaked: {log}");
    let log = fail(&["--store", "postgres://127.0.0.1/x", "--postgres-schema", "Bad-Name"]);
    assert!(log.contains("schema name"), "{log}");
}

/// An address on loopback that was free a moment ago, below Linux's ephemeral range (32768 and
/// up), so that no listener bound to port 0 meanwhile (other tests' servers) can take it.
fn free_local_address() -> std::net::SocketAddr {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    loop {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = 20_000 + (std::process::id() * 131 + n) % 10_000;
        if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port as u16)) {
            return listener.local_addr().unwrap();
        }
    }
}

/// A sample line of the metrics endpoint: its name, its labels and its value.
type Sample = (String, Vec<(String, String)>, f64);

/// `GET /metrics` from `address`: each sample line.
async fn scrape(address: std::net::SocketAddr) -> Vec<Sample> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: application/openmetrics-text"), "{head}");
    assert!(body.trim_end().ends_with("# EOF"), "{body}");
    body.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split(',')
                .filter(|pair| !pair.is_empty())
                .map(|pair| {
                    let (key, value) = pair.split_once('=').unwrap();
                    (key.to_owned(), value.trim_matches('"').to_owned())
                })
                .collect();
            (name.to_owned(), labels, value.parse().unwrap())
        })
        .collect()
}

/// The value of the sample named `name` whose labels include `labels` (0 if there is none; it
/// panics if several match).
fn sample(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let matching: Vec<f64> = samples
        .iter()
        .filter(|(sample_name, sample_labels, _)| {
            sample_name == name
                && labels.iter().all(|(key, value)| sample_labels.iter().any(|(k, v)| k == key && v == value))
        })
        .map(|(_, _, value)| *value)
        .collect();
    assert!(matching.len() <= 1, "{name} {labels:?} matches {matching:?}");
    matching.first().copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_every_call_by_method_code_and_outcome() {
    metrics_count_every_call(Backend::Sled).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_on_postgres_count_every_call_and_show_the_pool_and_statements() {
    if let Some(backend) = Backend::postgres() {
        metrics_count_every_call(backend).await;
    }
}

async fn metrics_count_every_call(backend: Backend) {
    let metrics = free_local_address();
    let sled = matches!(backend, Backend::Sled);
    let server = TestServer::start_on_with(backend, |config| {
        config.metrics_listen = Some(metrics);
        config.records_census_interval = Duration::from_millis(100);
    })
    .await;
    let mut client = server.client().await;
    let a = claim_acquired(&mut client, "a").await;
    let b = claim_acquired(&mut client, "b").await;
    in_progress(client.claim(claim_request("a", b"fp")).await.unwrap().into_inner());
    client.complete(complete_request("a", &a.lease_token, b"body")).await.unwrap();
    client.complete(complete_request("a", &a.lease_token, b"body")).await.unwrap();
    completed(client.claim(claim_request("a", b"fp")).await.unwrap().into_inner());
    let status = client.claim(claim_request("a", b"other")).await.unwrap_err();
    assert_status(&status, Code::FailedPrecondition, "FINGERPRINT_MISMATCH");
    let status = client.claim(claim_request("", b"fp")).await.unwrap_err();
    assert_status(&status, Code::InvalidArgument, "INVALID_KEY");
    // a's token does not hold b.
    let status = client.complete(complete_request("b", &a.lease_token, b"")).await.unwrap_err();
    assert_status(&status, Code::Aborted, "LEASE_LOST");
    client.renew(renew_request("b", &b.lease_token, secs(30))).await.unwrap();
    client.release(release_request("b", &b.lease_token)).await.unwrap();
    client.lookup(lookup_request("a")).await.unwrap();
    // A Claim that waits for a held key and gets its response when the holder completes.
    let c = claim_acquired(&mut client, "c").await;
    let waiter = {
        let mut client = client.clone();
        tokio::spawn(async move {
            let mut request = claim_request("c", b"fp");
            request.wait = Some(secs(10));
            client.claim(request).await
        })
    };
    while server.coordinator().waiting_claims() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    client.complete(complete_request("c", &c.lease_token, b"")).await.unwrap();
    completed(waiter.await.unwrap().unwrap().into_inner());

    let samples = scrape(metrics).await;
    let grpc = |method: &str, code: Option<&str>| {
        let mut labels =
            vec![("grpc_type", "unary"), ("grpc_service", "idempotency.v1.Coordinator"), ("grpc_method", method)];
        match code {
            Some(code) => {
                labels.push(("grpc_code", code));
                sample(&samples, "grpc_server_handled_total", &labels)
            }
            None => sample(&samples, "grpc_server_started_total", &labels),
        }
    };
    assert_eq!(grpc("Claim", None), 8.0);
    assert_eq!(grpc("Claim", Some("OK")), 6.0);
    assert_eq!(grpc("Claim", Some("FailedPrecondition")), 1.0);
    assert_eq!(grpc("Claim", Some("InvalidArgument")), 1.0);
    assert_eq!(grpc("Complete", None), 4.0);
    assert_eq!(grpc("Complete", Some("OK")), 3.0);
    assert_eq!(grpc("Complete", Some("Aborted")), 1.0);
    assert_eq!(grpc("Renew", Some("OK")), 1.0);
    assert_eq!(grpc("Release", Some("OK")), 1.0);
    assert_eq!(grpc("Lookup", Some("OK")), 1.0);
    let handled_claims = [("grpc_method", "Claim"), ("grpc_service", "idempotency.v1.Coordinator")];
    assert_eq!(sample(&samples, "grpc_server_handling_seconds_count", &handled_claims), 8.0);

    let claims = |outcome: &str| sample(&samples, "idempotency_claims_total", &[("outcome", outcome)]);
    assert_eq!(claims("acquired"), 3.0);
    assert_eq!(claims("in_progress"), 1.0);
    assert_eq!(claims("replayed"), 2.0);
    assert_eq!(claims("fingerprint_mismatch"), 1.0);
    assert_eq!(claims("takeover"), 0.0);
    let refusals = |method: &str, reason: &str| {
        sample(&samples, "idempotency_refusals_total", &[("method", method), ("reason", reason)])
    };
    assert_eq!(refusals("Claim", "INVALID_KEY"), 1.0);
    assert_eq!(refusals("Claim", "FINGERPRINT_MISMATCH"), 1.0);
    assert_eq!(refusals("Complete", "LEASE_LOST"), 1.0);
    let completions = |outcome: &str| sample(&samples, "idempotency_completions_total", &[("outcome", outcome)]);
    assert_eq!(completions("completed"), 2.0);
    assert_eq!(completions("already_completed"), 1.0);
    assert_eq!(sample(&samples, "idempotency_renewals_total", &[]), 1.0);
    assert_eq!(sample(&samples, "idempotency_releases_total", &[]), 1.0);
    assert_eq!(sample(&samples, "idempotency_claim_waits_total", &[("ended", "completed")]), 1.0);
    assert_eq!(sample(&samples, "idempotency_claim_waits_total", &[("ended", "timed_out")]), 0.0);
    if sled {
        // (PostgreSQL's count is read every second.)
        assert_eq!(sample(&samples, "idempotency_records", &[]), 3.0);
    }
    assert_eq!(sample(&samples, "idempotency_store_healthy", &[]), 1.0);
    // Records by state, recounted in the background: a and c completed, b released.
    let by_state =
        |samples: &[Sample], state: &str| sample(samples, "idempotency_records_by_state", &[("state", state)]);
    let mut counted = samples.clone();
    for _ in 0..100 {
        if by_state(&counted, "completed") == 2.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        counted = scrape(metrics).await;
    }
    let states =
        ["in_progress", "lease_expired", "released", "completed", "expired"].map(|state| by_state(&counted, state));
    assert_eq!(states, [0.0, 0.0, 1.0, 2.0, 0.0]);
    assert!(sample(&counted, "idempotency_records_by_state_counted_at_seconds", &[]) > 1.7e9);
    if sled {
        // Grants, completes, the renewal and the release were each made durable by a flush.
        let flushes = sample(&samples, "idempotency_store_flush_duration_seconds_count", &[]);
        assert!(flushes >= 1.0, "{flushes}");
        assert_eq!(sample(&samples, "idempotency_store_flush_batch_size_count", &[]), flushes);
        assert!(sample(&samples, "idempotency_store_flush_batch_size_sum", &[]) >= 7.0);
        assert!(sample(&samples, "idempotency_store_disk_bytes", &[]) > 0.0);
    } else {
        // Every call above that reached the store ran a statement (the waiting Claim two).
        let statements = sample(&samples, "idempotency_postgres_statement_duration_seconds_count", &[]);
        assert!(statements >= 14.0, "{statements}");
        assert!(sample(&samples, "idempotency_postgres_pool_connections", &[("state", "idle")]) >= 1.0);
        assert_eq!(sample(&samples, "idempotency_postgres_pool_waiting", &[]), 0.0);
        assert_eq!(sample(&samples, "idempotency_postgres_listen_reconnects_total", &[]), 0.0);
        // Every Claim and Complete went in some statement, alone or in a batch.
        assert!(sample(&samples, "idempotency_postgres_batch_size_count", &[]) >= 1.0);
        assert!(
            sample(&samples, "idempotency_postgres_batch_size_sum", &[])
                >= sample(&samples, "idempotency_postgres_batch_size_count", &[])
        );
        assert_eq!(samples.iter().filter(|(name, ..)| name == "idempotency_postgres_clock_offset_seconds").count(), 1);
    }
    assert!(sample(&samples, "process_resident_memory_bytes", &[]) > 0.0);
    assert!(sample(&samples, "process_open_fds", &[]) > 0.0);

    // The Grafana dashboard uses only series this server exports (those of the other store
    // aside, and the sweeper's lag, known only once a pass has found nothing left to sweep).
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/grafana/idempotency-coordinator.json"
    ))
    .unwrap();
    let other_store = if sled { "idempotency_postgres_" } else { "idempotency_store_" };
    let used: std::collections::BTreeSet<&str> = dashboard
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
        .filter(|word| ["grpc_server_", "idempotency_", "process_"].iter().any(|prefix| word.starts_with(prefix)))
        .filter(|word| !word.starts_with(other_store) && *word != "idempotency_sweeper_lag_seconds")
        .collect();
    assert!(used.len() >= 20, "{used:?}");
    for name in used {
        assert!(
            counted.iter().any(|(sample_name, ..)| sample_name == name),
            "the dashboard uses {name}, which the server does not export"
        );
    }
}

/// Runs the binary with `args`; its exit status and what it printed (standard output, then error).
fn run_binary(args: &[&std::ffi::OsStr]) -> (bool, String) {
    let output = Command::new(binary()).args(args).output().expect("the binary runs");
    let printed = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), printed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_and_restore_keep_every_live_record_lease_and_fencing_floor() {
    use idempotency_core::clock::{Clock, SystemClock};
    use idempotency_core::domain::Timestamp;
    use std::ffi::OsStr;

    // An embedded store on real time with three live records, then, after each of two restarts
    // (each starts a new block of fencing tokens), a grant whose retention ended ten seconds ago:
    // the highest tokens it handed out are on records the backup leaves out.
    let mut server = TestServer::start().await;
    let now = SystemClock.now();
    server.clock.set(now);
    let mut client = server.client().await;
    let done = claim_acquired(&mut client, "done").await;
    let mut stored = response(b"\x00binary\xffbody");
    stored.metadata.insert("location".into(), "/payments/pay_1".into());
    let mut request = complete_request("done", &done.lease_token, b"");
    request.response = Some(stored.clone());
    client.complete(request).await.unwrap();
    let mut long = claim_request("held", b"fp");
    long.lease_ttl = Some(secs(120));
    let held = acquired(client.claim(long).await.unwrap().into_inner());
    let released = claim_acquired(&mut client, "released").await;
    client.release(release_request("released", &released.lease_token)).await.unwrap();
    let mut highest_expired = 0;
    for gone in ["gone-1", "gone-2"] {
        server.restart().await;
        server.clock.set(Timestamp::from_unix_millis(now.unix_millis() - 10_000));
        let mut client = server.client().await;
        let mut short = claim_request(gone, b"fp");
        (short.lease_ttl, short.retention) = (Some(secs(1)), Some(secs(1)));
        highest_expired = acquired(client.claim(short).await.unwrap().into_inner()).fencing_token;
        server.clock.set(now);
    }

    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("store.snapshot");
    let data_dir = server.data_dir().as_os_str().to_owned();
    // A running server holds its directory: the backup is refused, clearly.
    let (ok, printed) = run_binary(&[
        OsStr::new("backup"),
        OsStr::new("--data-dir"),
        &data_dir,
        OsStr::new("--output"),
        snapshot.as_os_str(),
    ]);
    assert!(!ok && printed.contains("is a server still running on it?"), "{printed}");
    assert!(!snapshot.exists());
    server.stop().await;

    let (ok, printed) = run_binary(&[
        OsStr::new("backup"),
        OsStr::new("--data-dir"),
        &data_dir,
        OsStr::new("--output"),
        snapshot.as_os_str(),
    ]);
    assert!(ok, "{printed}");
    assert!(printed.contains("wrote 3 records") && printed.contains("2 expired left out"), "{printed}");
    // Without a terminal, progress comes as plain lines.
    assert!(printed.contains("backup: 5 of 5 records"), "{printed}");

    // A restore writes a new directory only.
    let (ok, printed) = run_binary(&[
        OsStr::new("restore"),
        OsStr::new("--data-dir"),
        &data_dir,
        OsStr::new("--input"),
        snapshot.as_os_str(),
    ]);
    assert!(!ok && printed.contains("is not empty"), "{printed}");
    // A damaged snapshot is refused before anything is written.
    let damaged = dir.path().join("damaged.snapshot");
    let bytes = std::fs::read(&snapshot).unwrap();
    std::fs::write(&damaged, &bytes[..bytes.len() - 20]).unwrap();
    let restored = dir.path().join("restored");
    let (ok, printed) = run_binary(&[
        OsStr::new("restore"),
        OsStr::new("--data-dir"),
        restored.as_os_str(),
        OsStr::new("--input"),
        damaged.as_os_str(),
    ]);
    assert!(!ok && printed.contains("not a usable snapshot"), "{printed}");
    assert!(!restored.exists());
    let (ok, printed) = run_binary(&[
        OsStr::new("restore"),
        OsStr::new("--data-dir"),
        restored.as_os_str(),
        OsStr::new("--input"),
        snapshot.as_os_str(),
    ]);
    assert!(ok, "{printed}");
    assert!(printed.contains("restored 3 records"), "{printed}");

    let server = ChildServer::start(&restored);
    let mut client = server.client().await;
    let replay = completed(client.claim(claim_request("done", b"fp")).await.unwrap().into_inner());
    assert_eq!(replay.response, Some(stored));
    let busy = in_progress(client.claim(claim_request("held", b"fp")).await.unwrap().into_inner());
    assert_eq!(busy.lease_expires_at, held.lease_expires_at);
    let status = client.claim(claim_request("held", b"other")).await.unwrap_err();
    assert_status(&status, Code::FailedPrecondition, "FINGERPRINT_MISMATCH");
    // Fencing continues above every token the backed-up store handed out, those of records the
    // backup left out included, and the holder's token still works.
    let again = claim_acquired(&mut client, "released").await;
    assert!(again.fencing_token > highest_expired, "{} after {highest_expired}", again.fencing_token);
    client.complete(complete_request("held", &held.lease_token, b"finished")).await.unwrap();
    let status = client.lookup(lookup_request("gone-2")).await.unwrap_err();
    assert_status(&status, Code::NotFound, "KEY_NOT_FOUND");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_only_address_answers_health_and_nothing_else() {
    let health = free_local_address();
    let server = TestServer::start_with(|config| config.health_listen = Some(health)).await;
    // The test server's task binds the address as it starts serving, moments after it returns.
    let mut answered = health_check(&health.to_string()).await;
    for _ in 0..100 {
        if answered.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        answered = health_check(&health.to_string()).await;
    }
    assert_eq!(answered.unwrap(), ServingStatus::Serving);
    let mut client = pb::coordinator_client::CoordinatorClient::connect(format!("http://{health}")).await.unwrap();
    let status = client.claim(claim_request("a", b"fp")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    // The server's own address still serves everything.
    server.client().await.claim(claim_request("a", b"fp")).await.unwrap();
}

/// The flags of a deployment recipe's command line: `--flag=value` or `--flag value` words.
fn recipe_flags(text: &str, line_prefix: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| line.trim_start().strip_prefix(line_prefix))
        .flat_map(|rest| rest.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .collect()
}

#[test]
fn the_deployment_recipes_use_only_flags_the_server_accepts_and_would_start_with() {
    use clap::Parser;
    use idempotency_coordinator::Config;
    let recipe =
        |path: &str| std::fs::read_to_string(format!("{}/../../deploy/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let check = |name: &str, flags: Vec<String>| {
        assert!(flags.len() >= 3, "{name}: {flags:?}");
        let config = Config::try_parse_from(std::iter::once("idempotency-coordinator".to_owned()).chain(flags.clone()))
            .unwrap_or_else(|error| panic!("{name}: {error}"));
        config.validate().unwrap_or_else(|error| panic!("{name}: {error}"));
        assert!(config.metrics_listen.is_some(), "{name}: no metrics port");
    };
    // systemd: the words after the binary on ExecStart.
    let unit = recipe("systemd/idempotency-coordinator.service");
    let exec = recipe_flags(&unit, "ExecStart=");
    assert!(exec[0].ends_with("/idempotency-coordinator"), "{exec:?}");
    check("systemd", exec[1..].to_vec());
    // Kubernetes: the container's args (one `- --flag=value` per line).
    for manifest in ["kubernetes/embedded.yaml", "kubernetes/postgres.yaml"] {
        let text = recipe(manifest);
        let mut flags = recipe_flags(&text, "- --");
        for flag in &mut flags {
            flag.insert_str(0, "--");
        }
        if manifest.contains("postgres") {
            // The store URL comes from a Secret, as IDEMPOTENCY_STORE.
            assert!(text.contains("name: IDEMPOTENCY_STORE"), "{manifest}");
            flags.push("--store=postgres://user@db:5432/app".to_owned());
        }
        check(manifest, flags);
        assert!(text.contains("grpc: {port: 8081, service: idempotency.v1.Coordinator}"), "{manifest}: readiness");
        assert!(text.contains("kind: PodDisruptionBudget"), "{manifest}");
    }
}

/// Runs `idempotency-coordinator admin …` with `env`; its success, stdout and stderr.
fn admin_cli(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let output = Command::new(binary()).arg("admin").args(args).envs(env.iter().copied()).output().unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn json_of(text: &str) -> serde_json::Value {
    serde_json::from_str(text.trim()).unwrap_or_else(|error| panic!("{error}: {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_command_line_drives_every_admin_call_with_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let token = "operator-token";
    let auth = dir.path().join("auth.toml");
    let digest: String =
        <sha2::Sha256 as sha2::Digest>::digest(token).iter().map(|byte| format!("{byte:02x}")).collect();
    std::fs::write(
        &auth,
        format!("[[token]]\nname = \"operator\"\nsha256 = \"{digest}\"\nnamespaces = [\"*\"]\nrole = \"admin\"\n"),
    )
    .unwrap();
    let auth_flag = ["--auth-file", auth.to_str().unwrap()];
    // Seeded without the auth file, then served with it.
    let source = ChildServer::start(&dir.path().join("source"));
    let mut client = source.client().await;
    let mut held = None;
    for n in 0..30 {
        let key = format!("k-{n:02}");
        let grant = claim_acquired(&mut client, &key).await;
        if n == 29 {
            held = Some(grant);
        } else {
            client.complete(complete_request(&key, &grant.lease_token, key.as_bytes())).await.unwrap();
        }
    }
    drop(source);
    let source = ChildServer::start_with(&dir.path().join("source"), &auth_flag);
    let target = format!("http://{}", source.addr);
    let with_token = [("IDEMPOTENCY_TOKEN", token)];
    // Without credentials: refused, with the reason.
    let (ok, _, stderr) = admin_cli(&["stats", "--target", &target], &[]);
    assert!(!ok && stderr.contains("UNAUTHENTICATED"), "{stderr}");
    let (ok, stdout, stderr) = admin_cli(&["stats", "--target", &target, "--json"], &with_token);
    assert!(ok, "{stderr}");
    let stats = json_of(&stdout);
    assert_eq!((stats["records"].as_u64(), stats["store"].as_str()), (Some(30), Some("sled")));
    assert_eq!(stats["namespaces"][0]["completed"].as_u64(), Some(29));
    // List, in pages of 7, followed to the end: one JSON line per record, in key order.
    let list = ["list", "--target", &target, "--namespace", "payments", "--page-size", "7", "--all", "--json"];
    let (ok, stdout, stderr) = admin_cli(&list, &with_token);
    assert!(ok, "{stderr}");
    let keys: Vec<String> = stdout.lines().map(|line| json_of(line)["key"].as_str().unwrap().to_owned()).collect();
    assert_eq!(keys, (0..30).map(|n| format!("k-{n:02}")).collect::<Vec<_>>());
    // Export to a file only its owner may read, which `restore` takes as a backup.
    let snapshot = dir.path().join("export.snapshot");
    let export = ["export", "--target", &target, "--output", snapshot.to_str().unwrap(), "--json"];
    let (ok, stdout, stderr) = admin_cli(&export, &with_token);
    assert!(ok, "{stderr}");
    assert_eq!(json_of(&stdout)["records"].as_u64(), Some(30));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&snapshot).unwrap().permissions().mode() & 0o777, 0o600);
    let restored_dir = dir.path().join("restored");
    let (ok, printed) = run_binary(&[
        "restore".as_ref(),
        "--data-dir".as_ref(),
        restored_dir.as_os_str(),
        "--input".as_ref(),
        snapshot.as_os_str(),
    ]);
    assert!(ok, "{printed}");
    let restored = ChildServer::start(&restored_dir);
    let mut restored_client = restored.client().await;
    let replay = completed(restored_client.claim(claim_request("k-03", b"fp")).await.unwrap().into_inner());
    assert_eq!(replay.response.unwrap().body, b"k-03".as_slice());
    // Import into another running server, twice: the second changes nothing.
    let empty = ChildServer::start(&dir.path().join("empty"));
    let empty_target = format!("http://{}", empty.addr);
    let import = ["import", "--target", &empty_target, "--input", snapshot.to_str().unwrap(), "--json"];
    let (ok, stdout, stderr) = admin_cli(&import, &with_token);
    assert!(ok, "{stderr}");
    assert_eq!(json_of(&stdout)["inserted"].as_u64(), Some(30));
    let (ok, stdout, stderr) = admin_cli(&import, &with_token);
    assert!(ok, "{stderr}");
    assert_eq!((json_of(&stdout)["inserted"].as_u64(), json_of(&stdout)["kept"].as_u64()), (Some(0), Some(30)));
    let mut imported = empty.client().await;
    let held = held.unwrap();
    imported.complete(complete_request("k-29", &held.lease_token, b"done")).await.expect("the held lease works there");
    // A damaged file is refused before anything is sent.
    let mut bytes = std::fs::read(&snapshot).unwrap();
    bytes.truncate(bytes.len() - 5);
    let damaged = dir.path().join("damaged.snapshot");
    std::fs::write(&damaged, bytes).unwrap();
    let (ok, _, stderr) =
        admin_cli(&["import", "--target", &empty_target, "--input", damaged.to_str().unwrap()], &with_token);
    assert!(!ok && stderr.contains("ends early"), "{stderr}");
    // Purge one key, then (only when confirmed) the whole namespace.
    let purge_one = ["purge", "--target", &target, "--namespace", "payments", "--key", "k-00", "--json"];
    let (ok, stdout, stderr) = admin_cli(&purge_one, &with_token);
    assert!(ok, "{stderr}");
    assert_eq!(json_of(&stdout)["deleted"].as_u64(), Some(1));
    let (ok, _, _) = admin_cli(&["purge", "--target", &target, "--namespace", "payments"], &with_token);
    assert!(!ok, "a whole namespace needs --yes");
    let (ok, stdout, stderr) =
        admin_cli(&["purge", "--target", &target, "--namespace", "payments", "--yes", "--json"], &with_token);
    assert!(ok, "{stderr}");
    assert_eq!(json_of(&stdout)["deleted"].as_u64(), Some(29));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_without_anything_to_reload_leaves_the_server_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ChildServer::start(&dir.path().join("data"));
    let mut client = server.client().await;
    let grant = claim_acquired(&mut client, "before").await;
    // A process manager's "reload" (systemctl reload, kill -HUP) on a server without TLS or an
    // auth file: the default action of SIGHUP would end the process.
    server.signal("-HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(server.child.try_wait().unwrap().is_none(), "the server ended on SIGHUP");
    client.complete(complete_request("before", &grant.lease_token, b"done")).await.expect("still serving");
    claim_acquired(&mut client, "after").await;
}
