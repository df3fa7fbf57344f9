//! Crashes, races and pauses: kill -9 of the binary mid-workload, racing claims, a paused server, clock steps, a paused client process.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_randomized_workload_violates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let addr = format!("127.0.0.1:{}", free_port());
    let flags = ["--listen", addr.as_str()];
    let mut server = ChildServer::start_with(&data, &flags);
    let history = Arc::new(History::default());
    let kills = crash_kills();
    let run_for = Duration::from_millis(600 * kills as u64 + 1_000);
    let start = Instant::now();
    let until = start + run_for;
    let mut clients = Vec::new();
    for seed in 0..64u64 {
        let recorder = Recorder { client: lazy_client(&addr).await, history: Arc::clone(&history) };
        clients.push(tokio::spawn(workload_client(vec![recorder], seed + 1, 12, start, until)));
    }
    let mut rng = Rng(42);
    for _ in 0..kills {
        tokio::time::sleep(Duration::from_millis(200 + rng.below(400))).await;
        server.signal("-KILL");
        let _ = server.child.wait();
        server = ChildServer::start_with(&data, &flags);
    }
    for client in clients {
        client.await.unwrap();
    }
    let events = history.events();
    let acknowledged = events.iter().filter(|e| matches!(e.outcome, Outcome::CompleteOk { .. })).count();
    let grants = events.iter().filter(|e| matches!(e.outcome, Outcome::Acquired { .. })).count();
    let unknown = events.iter().filter(|e| matches!(e.outcome, Outcome::Unknown)).count();
    eprintln!(
        "crash run: {kills} kills, {} calls, {grants} grants, {acknowledged} completes, {unknown} indeterminate",
        events.len()
    );
    assert!(acknowledged > 50 && grants > 50, "the workload did too little to prove anything");

    // After the last restart every acknowledged completion is still there, byte for byte.
    let mut recorder = Recorder { client: server.client().await, history: Arc::clone(&history) };
    let mut keys: Vec<String> = events.iter().map(|e| e.key.clone()).collect();
    keys.sort();
    keys.dedup();
    for key in &keys {
        recorder.lookup(key).await;
    }
    let events = history.events();
    let violations = history::check(&events);
    if !violations.is_empty() {
        for violation in &violations {
            let key = violation.split_whitespace().nth(1).unwrap_or_default().trim_end_matches(':');
            eprintln!("{violation}");
            for event in events.iter().filter(|e| e.key == key) {
                eprintln!(
                    "  {:?} -> {:?} at {:?}..{:?}",
                    event.call,
                    event.outcome,
                    event.invoked - start,
                    event.returned - start
                );
            }
        }
    }
    assert!(violations.is_empty(), "{} violations:\n{}", violations.len(), violations.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_claims_over_many_keys_grant_each_exactly_once() {
    let server = TestServer::start().await;
    let history = Arc::new(History::default());
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(server.channel().await);
    }
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let mut recorder =
                Recorder { client: CoordinatorClient::new(channels[i % 4].clone()), history: Arc::clone(&history) };
            tokio::spawn(async move {
                for key in 0..1000 {
                    recorder.claim(&format!("race-{key}"), 10_000, None).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let events = history.events();
    let grants = events.iter().filter(|e| matches!(e.outcome, Outcome::Acquired { .. })).count();
    assert_eq!(grants, 1000);
    assert_eq!(events.len(), 64_000);
    assert_eq!(history::check(&events), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_server_lets_leases_lapse_and_fences_the_old_holder() {
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::start(&dir.path().join("data"));
    let history = Arc::new(History::default());
    let mut first = Recorder { client: server.client().await, history: Arc::clone(&history) };
    let Outcome::Acquired { token, .. } = first.claim("paused", 500, None).await else { panic!("first claim") };
    server.signal("-STOP");
    tokio::time::sleep(Duration::from_millis(800)).await;
    server.signal("-CONT");
    let mut second = Recorder { client: server.client().await, history: Arc::clone(&history) };
    let Outcome::Acquired { token: newer, .. } = second.claim("paused", 5_000, None).await else { panic!("takeover") };
    first.complete("paused", &token, b"late").await;
    second.complete("paused", &newer, b"fresh").await;
    second.lookup("paused").await;
    let events = history.events();
    let late =
        events.iter().find(|e| e.call == Call::Complete { token: token.clone(), body: b"late".to_vec() }).unwrap();
    assert_eq!(late.outcome, Outcome::Refused("LEASE_LOST".into()));
    assert_eq!(history::check(&events), Vec::<String>::new());
}

/// The clock jumps forward and back while 16 clients work. A forward step lapses leases early (a
/// takeover may come while the old holder still works) and a backward step lengthens them; in
/// the server's time no two grants overlap, fencing still increases and stale tokens still fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_steps_during_traffic_keep_p1_to_p3() {
    let server = TestServer::start().await;
    let history = Arc::new(History::default());
    let start = Instant::now();
    let until = start + Duration::from_secs(3);
    let channel = server.channel().await;
    let clients: Vec<_> = (0..16u64)
        .map(|seed| {
            let recorder = Recorder { client: CoordinatorClient::new(channel.clone()), history: Arc::clone(&history) };
            tokio::spawn(workload_client(vec![recorder], seed + 100, 6, start, until))
        })
        .collect();
    let mut rng = Rng(7);
    let mut steps = 0;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = idempotency_core::clock::Clock::now(&server.clock);
        let step = rng.below(1500) as i64;
        let to = if rng.below(3) == 0 { now.unix_millis() - step } else { now.unix_millis() + step };
        server.clock.set(idempotency_core::domain::Timestamp::from_unix_millis(to));
        steps += 1;
    }
    for client in clients {
        client.await.unwrap();
    }
    let events = history.events();
    let grants = events.iter().filter(|e| matches!(e.outcome, Outcome::Acquired { .. })).count();
    assert!(grants > 20, "too few grants ({grants}) to prove anything");
    // With the clock moving back, retention is no longer monotonic in real time, so P4 (which
    // reads "later" in real time) is not expected here; P1–P3 and P5 are.
    let violations: Vec<_> = history::check(&events).into_iter().filter(|v| !v.starts_with("P4")).collect();
    eprintln!("clock steps: {steps} steps, {} calls, {grants} grants", events.len());
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

/// Builds (if needed) and locates an example program of this crate.
pub(crate) fn example_program(name: &str) -> std::path::PathBuf {
    let test_binary = std::env::current_exe().unwrap();
    let profile_dir = test_binary.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let mut build = std::process::Command::new(env!("CARGO"));
    build
        .args(["build", "--quiet", "-p", "idempotency-client", "--example", name])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile_dir.ends_with("release") {
        build.arg("--release");
    }
    assert!(build.status().unwrap().success(), "building the {name} example");
    profile_dir.join("examples").join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_client_process_is_fenced_off_when_it_resumes_after_a_takeover() {
    use std::io::BufRead;
    let worker_program = example_program("worker");
    let dir = tempfile::tempdir().unwrap();
    let server = ChildServer::start(&dir.path().join("data"));
    let mut worker = std::process::Command::new(worker_program)
        .args(["--target", &format!("http://{}", server.addr), "--key", "paused-client", "--namespace", "payments"])
        .args(["--body", "fp", "--lease", "1s", "--work", "2s"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // If an assertion fails, the frozen worker must not outlive the test.
    struct Reaper(u32);
    impl Drop for Reaper {
        fn drop(&mut self) {
            let _ = std::process::Command::new("kill").args(["-KILL", &self.0.to_string()]).status();
        }
    }
    let _reaper = Reaper(worker.id());
    let mut lines = std::io::BufReader::new(worker.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let stale_fencing: u64 = first.strip_prefix("acquired fencing_token=").expect(&first).parse().unwrap();
    // The worker is in the middle of its mutation: freeze it past its lease.
    let signal = |name: &str| {
        let status = std::process::Command::new("kill").args([name, &worker.id().to_string()]).status().unwrap();
        assert!(status.success());
    };
    signal("-STOP");
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let mut client = server.client().await;
    let takeover = acquired(client.claim(claim_request("paused-client", b"fp")).await.unwrap().into_inner());
    assert!(takeover.takeover && takeover.fencing_token > stale_fencing);
    client.complete(complete_request("paused-client", &takeover.lease_token, b"by the new holder")).await.unwrap();

    signal("-CONT");
    let last = lines.next().unwrap().unwrap();
    assert_eq!(last, "refused LEASE_LOST");
    assert_eq!(worker.wait().unwrap().code(), Some(3));
    let replay = completed(client.claim(claim_request("paused-client", b"fp")).await.unwrap().into_inner());
    assert_eq!(replay.response.unwrap().body, b"by the new holder".as_slice());
    assert_eq!(replay.fencing_token, takeover.fencing_token);
}
