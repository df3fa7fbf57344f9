//! Replicas on PostgreSQL: several coordinator processes on one database behave as one. These tests share the database server (one of them restarts it), so they run one at a time.

use super::*;

pub(crate) static POSTGRES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The test database's URL, and a fresh schema in it, or `None` (skipped, said why).
pub(crate) async fn postgres_schema() -> Option<(String, String)> {
    let Backend::Postgres(url) = Backend::postgres()? else { unreachable!() };
    drop_stale_schemas(&url).await;
    Some((url, test_schema()))
}

/// A call whose deadline passes while its row is locked in PostgreSQL (a slow transaction
/// elsewhere) answers UNAVAILABLE STORE_UNAVAILABLE before the deadline, even though the store's
/// own timeout (3 s) is longer; once the lock is gone the retry is applied. Meanwhile a Complete
/// of another key is not held up behind the stuck one (its batch stalled, so it goes in a batch
/// of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_deadline_passes_on_a_locked_row_answers_unavailable() {
    let Some(backend) = Backend::postgres() else { return };
    let _one_at_a_time = POSTGRES.lock().await;
    let server = TestServer::start_on_with(backend, |config| config.postgres_timeout = Duration::from_secs(3)).await;
    let mut client = server.client().await;
    let grant = claim_acquired(&mut client, "locked").await;
    let free = claim_acquired(&mut client, "free").await;
    let (url, schema) = (server.config.store.clone().unwrap(), server.config.postgres_schema.clone());
    let (mut locker, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let transaction = locker.transaction().await.unwrap();
    transaction.execute(&format!("SELECT 1 FROM {schema}.records WHERE key = 'locked' FOR UPDATE"), &[]).await.unwrap();
    let mut stuck_client = client.clone();
    let lease_token = grant.lease_token.clone();
    let stuck = tokio::spawn(async move {
        let mut request = tonic::Request::new(complete_request("locked", &lease_token, b"done"));
        request.set_timeout(Duration::from_secs(1));
        stuck_client.complete(request).await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut request = tonic::Request::new(complete_request("free", &free.lease_token, b"done"));
    request.set_timeout(Duration::from_millis(700));
    client.complete(request).await.expect("a Complete of another key is not held up by the locked row");
    let status = stuck.await.unwrap().unwrap_err();
    assert_eq!(
        (status.code(), status.get_details_error_info().map(|info| info.reason)),
        (tonic::Code::Unavailable, Some("STORE_UNAVAILABLE".to_owned())),
        "{status:?}"
    );
    transaction.rollback().await.unwrap();
    client.complete(complete_request("locked", &grant.lease_token, b"done")).await.expect("the retry is applied");
}

/// Starts `count` replicas on one schema at once (they race to migrate it), each with its own
/// extra flags.
pub(crate) fn start_replicas(url: &str, schema: &str, flags: &[&[&str]]) -> (Vec<ChildServer>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let starts: Vec<_> = flags
        .iter()
        .enumerate()
        .map(|(i, extra)| {
            let data = dir.path().join(format!("unused-{i}"));
            let mut args: Vec<String> = ["--store", url, "--postgres-schema", schema, "--postgres-timeout", "1s"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            args.extend(extra.iter().map(|s| s.to_string()));
            std::thread::spawn(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                ChildServer::start_with(&data, &args)
            })
        })
        .collect();
    (starts.into_iter().map(|start| start.join().expect("a replica starts")).collect(), dir)
}

/// One recorder per replica, with a 10 s deadline: far beyond the replicas' 1 s database
/// timeout, so a call that reaches it shows a replica that hung instead of failing fast.
pub(crate) async fn recorders(replicas: &[ChildServer], history: &Arc<History>) -> Vec<Recorder> {
    let mut recorders = Vec::new();
    for replica in replicas {
        let client = lazy_client_with_deadline(&replica.addr, Duration::from_secs(10)).await;
        recorders.push(Recorder { client, history: Arc::clone(history) });
    }
    recorders
}

pub(crate) fn assert_clean(events: &[Event]) {
    let violations = history::check(events);
    assert!(violations.is_empty(), "{} violations:\n{}", violations.len(), violations.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_racing_for_a_thousand_keys_grant_each_exactly_once() {
    let Some((url, schema)) = postgres_schema().await else { return };
    let _serial = POSTGRES.lock().await;
    let (replicas, _dir) = start_replicas(&url, &schema, &[&[], &[], &[]]);
    let history = Arc::new(History::default());
    let mut channels = Vec::new();
    for replica in &replicas {
        channels.push(replica.client().await);
    }
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let mut recorder = Recorder { client: channels[i % 3].clone(), history: Arc::clone(&history) };
            tokio::spawn(async move {
                for key in 0..1000 {
                    recorder.claim(&format!("race-{key}"), 60_000, None).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let events = history.events();
    let grants = events.iter().filter(|e| matches!(e.outcome, Outcome::Acquired { .. })).count();
    let failed = events.iter().filter(|e| matches!(e.outcome, Outcome::Unknown | Outcome::Refused(_))).count();
    assert_eq!((grants, failed, events.len()), (1000, 0, 64_000));
    assert_clean(&events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_loses_nothing_and_its_keys_are_taken_over_through_the_others() {
    let Some((url, schema)) = postgres_schema().await else { return };
    let _serial = POSTGRES.lock().await;
    let (mut replicas, _dir) = start_replicas(&url, &schema, &[&[], &[], &[]]);
    let history = Arc::new(History::default());

    // A key held through the replica about to die.
    let mut doomed = Recorder { client: replicas[0].client().await, history: Arc::clone(&history) };
    let Outcome::Acquired { fencing: orphan_fencing, .. } = doomed.claim("orphan", 1_500, None).await else {
        panic!("the orphan is claimed")
    };

    let start = Instant::now();
    let until = start + Duration::from_secs(5);
    let mut clients = Vec::new();
    for seed in 0..64u64 {
        let recorders = recorders(&replicas, &history).await;
        clients.push(tokio::spawn(workload_client(recorders, seed + 1_000, 12, start, until)));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    replicas[0].signal("-KILL");
    let _ = replicas[0].child.wait();
    for client in clients {
        client.await.unwrap();
    }

    // The dead replica's key: refused while its lease runs, taken over through another after.
    let mut survivor = Recorder { client: replicas[1].client().await, history: Arc::clone(&history) };
    let takeover = loop {
        match survivor.claim("orphan", 5_000, None).await {
            Outcome::InProgress => tokio::time::sleep(Duration::from_millis(100)).await,
            outcome => break outcome,
        }
    };
    let Outcome::Acquired { fencing, .. } = takeover else { panic!("taken over: {takeover:?}") };
    assert!(fencing > orphan_fencing);

    let events = history.events();
    let acknowledged = events.iter().filter(|e| matches!(e.outcome, Outcome::CompleteOk { .. })).count();
    assert!(acknowledged > 50, "the workload did too little to prove anything ({acknowledged} completes)");
    let mut keys: Vec<String> = events.iter().map(|e| e.key.clone()).collect();
    keys.sort();
    keys.dedup();
    let mut checker = Recorder { client: replicas[2].client().await, history: Arc::clone(&history) };
    for key in &keys {
        checker.lookup(key).await;
    }
    assert_clean(&history.events());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_with_clocks_skewed_by_minutes_agree_on_every_lease() {
    let Some((url, schema)) = postgres_schema().await else { return };
    let _serial = POSTGRES.lock().await;
    let ahead = ["--clock-offset-ms", "300000"];
    let behind = ["--clock-offset-ms", "-300000"];
    let (replicas, _dir) = start_replicas(&url, &schema, &[&[], &ahead, &behind]);
    let mut exact = replicas[0].client().await;
    let mut fast = replicas[1].client().await;
    let mut slow = replicas[2].client().await;

    // A lease granted through one replica is the same lease through the others: the replica five
    // minutes ahead does not see it lapsed, the one behind reports the same end.
    let grant = acquired(exact.claim(claim_request("skew", b"fp")).await.unwrap().into_inner());
    in_progress(fast.claim(claim_request("skew", b"fp")).await.unwrap().into_inner());
    let view = slow.lookup(lookup_request("skew")).await.unwrap().into_inner();
    assert_eq!(view.lease_expires_at, grant.lease_expires_at);
    assert_eq!(view.state(), pb::KeyState::InProgress);

    // A Claim waiting on the replica behind is woken by a Complete through the one ahead (the
    // lease is 10 s and the wait 8 s, so only a notification can answer it with the response).
    let waiting = tokio::spawn(async move {
        let request = pb::ClaimRequest { wait: Some(secs(8)), ..claim_request("skew", b"fp") };
        slow.claim(request).await.map(|reply| reply.into_inner())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    fast.complete(complete_request("skew", &grant.lease_token, b"done")).await.unwrap();
    let woken = completed(waiting.await.unwrap().unwrap());
    assert_eq!(woken.response.unwrap().body, b"done".as_slice());

    // A short lease lapses for every replica at the same moment: the one behind takes it over
    // once the database's clock passes its end, not five minutes later.
    let short = pb::ClaimRequest { lease_ttl: Some(millis(500)), ..claim_request("short", b"fp") };
    let first = acquired(fast.claim(short).await.unwrap().into_inner());
    let mut slow = replicas[2].client().await;
    let taken = loop {
        match outcome(slow.claim(claim_request("short", b"fp")).await.unwrap().into_inner()) {
            pb::claim_response::Outcome::InProgress(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            pb::claim_response::Outcome::Acquired(taken) => break taken,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(taken.takeover && taken.fencing_token > first.fencing_token);
    let lapsed_at = millis_of(first.lease_expires_at);
    let granted_until = millis_of(taken.lease_expires_at);
    // The takeover's lease (10 s) was granted after the first lease ended, on the database clock.
    assert!(granted_until - 10_000 >= lapsed_at, "taken over before the lease ended");
    assert!(granted_until - 10_000 < lapsed_at + 60_000, "taken over by a clock minutes off");
}

/// Restarts the local PostgreSQL cluster (root, local database only).
pub(crate) fn restart_postgres() -> Result<(), String> {
    let version = std::fs::read_dir("/etc/postgresql")
        .map_err(|e| format!("no /etc/postgresql: {e}"))?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .next()
        .ok_or("no cluster in /etc/postgresql")?;
    let status = std::process::Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &version, "main", "restart", "-m", "fast"])
        .status()
        .map_err(|e| format!("pg_ctlcluster: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("pg_ctlcluster exited with {status}")) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_under_load_loses_nothing_and_service_resumes() {
    let Some((url, schema)) = postgres_schema().await else { return };
    if !(url.contains("@127.0.0.1") || url.contains("@localhost")) || !Path::new("/etc/postgresql").exists() {
        assert!(std::env::var_os("CI").is_none(), "CI runs PostgreSQL locally so that this test can restart it");
        eprintln!("skipped: restarting the database needs a local cluster managed by pg_ctlcluster");
        return;
    }
    let _serial = POSTGRES.lock().await;
    let (replicas, _dir) = start_replicas(&url, &schema, &[&[], &[]]);
    let history = Arc::new(History::default());
    let start = Instant::now();
    let until = start + Duration::from_secs(8);
    let mut clients = Vec::new();
    for seed in 0..32u64 {
        let recorders = recorders(&replicas, &history).await;
        clients.push(tokio::spawn(workload_client(recorders, seed + 2_000, 12, start, until)));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let restart_began = Instant::now();
    tokio::task::spawn_blocking(restart_postgres).await.unwrap().expect("the database restarts");
    let restarted = Instant::now();
    // A fast shutdown checkpoints first, which on a busy machine takes seconds: the clients keep
    // going for 5 s after the database is back, however long the restart itself took.
    for seed in 0..8u64 {
        let recorders = recorders(&replicas, &history).await;
        clients.push(tokio::spawn(workload_client(
            recorders,
            seed + 3_000,
            12,
            start,
            restarted + Duration::from_secs(5),
        )));
    }
    for client in clients {
        client.await.unwrap();
    }
    let events = history.events();
    // Every call was answered well before its 10 s deadline: none hung on the restart (the
    // replicas give up on the database after 1 s).
    let slowest = events.iter().map(|e| e.returned - e.invoked).max().unwrap();
    assert!(slowest < Duration::from_secs(5), "a call took {slowest:?}");
    let resumed = events
        .iter()
        .filter(|e| e.invoked > restarted && matches!(e.outcome, Outcome::CompleteOk { .. }))
        .map(|e| e.invoked - restarted)
        .min();
    let restart_took = restarted - restart_began;
    let Some(resumed) = resumed else {
        panic!("service did not resume within 5 s of the database's restart (which took {restart_took:?})")
    };
    eprintln!("database restart took {restart_took:?}; first completion {resumed:?} after it");
    let mut keys: Vec<String> = events.iter().map(|e| e.key.clone()).collect();
    keys.sort();
    keys.dedup();
    let mut checker = Recorder { client: replicas[1].client().await, history: Arc::clone(&history) };
    for key in &keys {
        checker.lookup(key).await;
    }
    let events = history.events();
    let unknown = events.iter().filter(|e| e.outcome == Outcome::Unknown).count();
    eprintln!("database restart: {} calls, {unknown} indeterminate, slowest {slowest:?}", events.len());
    assert_clean(&events);
}

/// A TCP proxy in front of PostgreSQL that can stop forwarding (a network partition: packets
/// vanish, connections stay open) and resume (the stalled connections are then dropped).
pub(crate) struct Partition {
    port: u16,
    cut: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Partition {
    async fn start(upstream: String) -> Partition {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(tokio::sync::watch::Sender::new(false));
        let state = Arc::clone(&cut);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut watch = state.subscribe();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let partitioned = *watch.borrow();
                    if partitioned {
                        // Partitioned: accept and say nothing until it heals, then hang up.
                        let _ = watch.wait_for(|cut| !*cut).await;
                        return;
                    }
                    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else { return };
                    let partitioned = tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => false,
                        cut = watch.wait_for(|cut| *cut) => cut.is_ok(),
                    };
                    if partitioned {
                        // Stalled: nothing passes until the partition heals, then hang up.
                        let _ = watch.wait_for(|cut| !*cut).await;
                    }
                });
            }
        });
        Partition { port, cut }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

pub(crate) async fn health_of(channel: Channel) -> i32 {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let mut health = HealthClient::new(channel);
    let request = HealthCheckRequest { service: "idempotency.v1.Coordinator".into() };
    health.check(request).await.map(|reply| reply.into_inner().status).unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_fails_calls_fast_turns_health_off_and_recovers_by_itself() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let Some((url, _)) = postgres_schema().await else { return };
    let _serial = POSTGRES.lock().await;
    let upstream = {
        let config: tokio_postgres::Config = url.parse().unwrap();
        let host = match &config.get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(host) => host.clone(),
            other => panic!("a TCP database is needed, not {other:?}"),
        };
        format!("{host}:{}", config.get_ports().first().copied().unwrap_or(5432))
    };
    let partition = Partition::start(upstream.clone()).await;
    let proxied = url.replacen(&upstream, &format!("127.0.0.1:{}", partition.port), 1);
    assert_ne!(proxied, url, "the URL names its host and port");
    let server = TestServer::start_on_with(Backend::Postgres(proxied), |config| {
        config.postgres_timeout = Duration::from_secs(1);
    })
    .await;
    let mut client = server.client().await;
    claim_acquired(&mut client, "before").await;
    assert_eq!(health_of(server.channel().await).await, ServingStatus::Serving as i32);

    partition.set_cut(true);
    let mut request = tonic::Request::new(claim_request("during", b"fp"));
    request.set_timeout(Duration::from_secs(10));
    let status = client.claim(request).await.expect_err("no database, no claim");
    // Refused by the store's own timeout (1 s), well within the caller's 10 s deadline.
    assert_status(&status, tonic::Code::Unavailable, "STORE_UNAVAILABLE");
    let deadline = Instant::now() + Duration::from_secs(15);
    while health_of(server.channel().await).await != ServingStatus::NotServing as i32 {
        assert!(Instant::now() < deadline, "health never turned NOT_SERVING");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    partition.set_cut(false);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client.claim(claim_request("after", b"fp")).await {
            Ok(reply) => {
                acquired(reply.into_inner());
                break;
            }
            Err(status) => {
                assert_status(&status, tonic::Code::Unavailable, "STORE_UNAVAILABLE");
                assert!(Instant::now() < deadline, "service did not resume");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while health_of(server.channel().await).await != ServingStatus::Serving as i32 {
        assert!(Instant::now() < deadline, "health never turned SERVING again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
