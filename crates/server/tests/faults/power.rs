//! Power loss: the server binary keeps its data directory on a lazyfs mount (see the
//! `idempotency-lazyfs` crate: every write not covered by an fsync, and every directory entry not
//! covered by an fsync of its directory, is lost when the power is cut). Under the randomized
//! workload, the power is cut again and again: the server is killed with SIGKILL and, at once,
//! the mount loses everything that was not durable; then the mount and the server come back on
//! what is left. Every change that was acknowledged must have been durable.

use std::collections::BTreeMap;
use std::time::SystemTime;

use idempotency_lazyfs::CutReport;

use super::*;

/// How many power cuts a run does: 20 in CI; `IDEMPOTENCY_POWER_CUTS` for longer runs.
fn power_cuts() -> usize {
    std::env::var("IDEMPOTENCY_POWER_CUTS").ok().and_then(|v| v.parse().ok()).unwrap_or(20)
}

/// The server's retention when a Claim leaves it unset, which the short-retention clients do.
const SHORT_RETENTION_MS: i64 = 1_000;

/// How often the server sweeps.
const SWEEP_INTERVAL_MS: i64 = 200;

/// Server flags: short default retention, and sweeps every 200 ms in batches of 4 (each batch a
/// group commit of its own, with the sweeper resting between them), so that sweeps delete
/// records all the time, in many small commits that a cut can fall between.
const SWEEP_FLAGS: [&str; 6] = ["--default-retention", "1s", "--sweep-interval", "200ms", "--sweep-batch", "4"];

/// 64 clients (56 on the randomized workload of the crash tests, 8 on short-retention keys that
/// the sweeper keeps deleting) while the power is cut at random moments, one cut in each slot of
/// 800 ms: the server is killed with SIGKILL and the mount at once loses what was not durable,
/// then both come back on what is left. Every cut comes while dozens of calls are in flight (in
/// the middle of a group-commit batch), and most while the sweeper has expired records to delete
/// (both counts are printed). At the end every key is looked up and the histories are checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_during_a_randomized_workload_lose_no_acknowledged_change() {
    let dir = tempfile::tempdir().unwrap();
    let (backing, mountpoint) = (dir.path().join("backing"), dir.path().join("mnt"));
    std::fs::create_dir(&backing).unwrap();
    std::fs::create_dir(&mountpoint).unwrap();
    let Some(mut lazy) = idempotency_lazyfs::mount_or_skip(&backing, &mountpoint) else { return };
    // The server makes its data directory itself: the store syncs the directory's entry in its
    // parent (a power cut right after it was created used to lose the whole store).
    let data = mountpoint.join("data");
    let addr = format!("127.0.0.1:{}", free_port());
    // Write-ahead log files of 1 MiB: they take turns every few hundred milliseconds under this
    // load, so cuts also fall in the middle of checkpoints (sled's own durable flush, then the
    // checkpoint file), and restarts re-apply entries across both files.
    let mut flags = vec!["--listen", addr.as_str(), "--wal-file-mb", "1"];
    flags.extend(SWEEP_FLAGS);
    let began = Instant::now();
    let mut server = ChildServer::start_with(&data, &flags);

    let cuts = power_cuts();
    let slot = Duration::from_millis(800);
    let history = Arc::new(History::default());
    let short_history = Arc::new(History::default());
    let (wall_start, start) = (SystemTime::now(), Instant::now());
    let until = start + slot * cuts as u32 + Duration::from_secs(1);
    let mut clients = Vec::new();
    for seed in 0..56u64 {
        let recorder = Recorder { client: lazy_client(&addr).await, history: Arc::clone(&history) };
        clients.push(tokio::spawn(workload_client(vec![recorder], seed + 1, 12, start, until)));
    }
    for seed in 0..8u64 {
        let recorder = Recorder { client: lazy_client(&addr).await, history: Arc::clone(&short_history) };
        clients.push(tokio::spawn(short_retention_client(recorder, seed + 1_000, until)));
    }

    let mut rng = Rng(4242);
    let mut cut_at = Vec::with_capacity(cuts);
    let mut undone = CutReport::default();
    for cut in 0..cuts as u32 {
        // A random moment in this cut's slot, and at least 150 ms after the last restart.
        let moment = start + slot * cut + slot.mul_f64(0.2 + rng.below(700) as f64 / 1000.0);
        tokio::time::sleep_until(moment.max(Instant::now() + Duration::from_millis(150)).into()).await;
        // Killing the server and waiting for it, cutting, remounting and restarting all block.
        server = tokio::task::block_in_place(|| {
            cut_at.push(Instant::now());
            server.signal("-KILL");
            let _ = server.child.wait();
            let report = lazy.power_cut().expect("the power cut leaves the durable state");
            undone.files_rolled_back += report.files_rolled_back;
            undone.entries_removed += report.entries_removed;
            undone.entries_restored += report.entries_restored;
            lazy.remount().expect("the mount comes back");
            ChildServer::start_with(&data, &flags)
        });
    }
    assert!(Instant::now() < until, "the cuts took longer than the workload: give each a longer slot");
    for client in clients {
        client.await.unwrap();
    }

    // After the last restart, every key is looked up.
    for history in [&history, &short_history] {
        let mut recorder = Recorder { client: server.client().await, history: Arc::clone(history) };
        let mut keys: Vec<String> = history.events().iter().map(|e| e.key.clone()).collect();
        keys.sort();
        keys.dedup();
        for key in &keys {
            recorder.lookup(key).await;
        }
    }
    let events = history.events();
    let short_events = short_history.events();
    let all = || events.iter().chain(&short_events);
    let count = |what: fn(&Outcome) -> bool| all().filter(|e| what(&e.outcome)).count();
    let acknowledged = count(|o| matches!(o, Outcome::CompleteOk { .. }));
    let grants = count(|o| matches!(o, Outcome::Acquired { .. }));
    let unknown = count(|o| matches!(o, Outcome::Unknown));
    let short_acknowledged = short_events.iter().filter(|e| matches!(e.outcome, Outcome::CompleteOk { .. })).count();
    let wall_millis = |at: Instant| {
        let wall = wall_start + at.duration_since(start);
        wall.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() as i64
    };
    // What was under way at each cut: calls sent and not yet answered, and short-retention
    // records whose retention had ended in the last sweep interval (the sweeper's work then).
    let in_flight: Vec<usize> =
        cut_at.iter().map(|at| all().filter(|e| e.invoked < *at && e.returned > *at).count()).collect();
    let expiries: Vec<i64> = short_events
        .iter()
        .filter_map(|e| match e.outcome {
            Outcome::CompleteOk { completed_at, fresh: true } => Some(completed_at + SHORT_RETENTION_MS),
            _ => None,
        })
        .collect();
    let due: Vec<usize> = cut_at
        .iter()
        .map(|at| {
            let now = wall_millis(*at);
            expiries.iter().filter(|expiry| (now - SWEEP_INTERVAL_MS..now).contains(*expiry)).count()
        })
        .collect();

    // The long-retention keys: P1–P5 as after crashes (P4: every acknowledged response is still
    // there at the end). The short-retention keys: P1–P3 and P5, and P4 until retention ends.
    let mut violations = history::check(&events);
    violations.extend(history::check(&short_events).into_iter().filter(|v| !v.starts_with("P4")));
    violations.extend(check_retained(&short_events, SHORT_RETENTION_MS, wall_millis));
    let spread = |values: &[usize]| {
        let mean = values.iter().sum::<usize>() as f64 / values.len().max(1) as f64;
        format!("{}–{} (mean {mean:.1})", values.iter().min().unwrap_or(&0), values.iter().max().unwrap_or(&0))
    };
    eprintln!(
        "power cuts: {cuts} cuts, {} calls, {grants} grants, {acknowledged} acknowledged completes \
         ({short_acknowledged} on short retention), {unknown} indeterminate, {} violations; at each cut \
         {} calls in flight and {} records due for sweeping; the cuts undid writes in {} files and \
         {} directory entries, and restored {}; {:.1?} in all",
        events.len() + short_events.len(),
        violations.len(),
        spread(&in_flight),
        spread(&due),
        undone.files_rolled_back,
        undone.entries_removed,
        undone.entries_restored,
        began.elapsed(),
    );
    if !violations.is_empty() {
        let offsets: Vec<Duration> = cut_at.iter().map(|at| *at - start).collect();
        eprintln!("cuts at {offsets:.2?}");
        for violation in violations.iter().take(20) {
            let key = violation.split_whitespace().nth(1).unwrap_or_default().trim_end_matches(':');
            eprintln!("{}", shortened(violation));
            for event in all().filter(|e| e.key == key) {
                let (call, outcome) =
                    (shortened(&format!("{:?}", event.call)), shortened(&format!("{:?}", event.outcome)));
                eprintln!("  {call} -> {outcome} at {:?}..{:?}", event.invoked - start, event.returned - start);
            }
        }
    }
    let listed: Vec<String> = violations.iter().map(|v| shortened(v)).collect();
    assert!(violations.is_empty(), "{} violations:\n{}", violations.len(), listed.join("\n"));
    assert!(acknowledged > 50 && grants > 50, "the workload did too little to prove anything");
    assert!(short_acknowledged > 20, "too few short-retention completes to keep the sweeper busy");
    drop(server);
    lazy.unmount().unwrap();
}

/// A violation or an event without the bytes of its bodies.
fn shortened(text: &str) -> String {
    let mut short = String::with_capacity(text.len().min(400));
    let mut rest = text;
    while let Some(at) = rest.find("body: [") {
        short.push_str(&rest[..at]);
        let end = rest[at..].find(']').map_or(rest.len(), |end| at + end + 1);
        let bytes = rest[at + 7..end.saturating_sub(1)].split(", ").count();
        short.push_str(&format!("body: <{bytes} bytes>"));
        rest = &rest[end..];
    }
    short.push_str(rest);
    short
}

/// One client on keys of its own that are claimed with the server's short default retention,
/// completed (mostly), released or abandoned, looked up now and then, and claimed again once
/// their retention ended: the sweeper keeps deleting them while the power is cut.
async fn short_retention_client(mut recorder: Recorder, seed: u64, until: Instant) {
    let mut rng = Rng(seed);
    while Instant::now() < until {
        let key = format!("short-{seed}-{}", rng.below(40));
        if rng.below(4) == 0 {
            recorder.lookup(&key).await;
            continue;
        }
        let lease_ms = 300 + rng.below(700) as i64;
        let Outcome::Acquired { token, .. } = claim_with_default_retention(&mut recorder, &key, lease_ms).await else {
            continue;
        };
        let mut body = format!("{key} by {token}").into_bytes();
        body.resize(idempotency_testkit::body_size(&mut rng, body.len(), Some(50_000)), b'.');
        match rng.below(10) {
            0..=7 => recorder.complete(&key, &token, &body).await,
            8 => recorder.release(&key, &token).await,
            _ => {} // abandoned: remembered for a retention after its lease
        }
    }
}

/// A Claim that leaves retention unset (the server's default applies), recorded like
/// [`Recorder::claim`].
async fn claim_with_default_retention(recorder: &mut Recorder, key: &str, lease_ms: i64) -> Outcome {
    let invoked = Instant::now();
    let request = pb::ClaimRequest { lease_ttl: Some(millis(lease_ms)), retention: None, ..claim_request(key, b"fp") };
    let outcome = match recorder.client.claim(request).await {
        Ok(reply) => match outcome(reply.into_inner()) {
            pb::claim_response::Outcome::Acquired(a) => Outcome::Acquired {
                token: a.lease_token,
                fencing: a.fencing_token,
                lease_expires_at: millis_of(a.lease_expires_at),
                lease_ttl_ms: lease_ms,
            },
            pb::claim_response::Outcome::InProgress(_) => Outcome::InProgress,
            pb::claim_response::Outcome::Completed(c) => {
                Outcome::Completed { body: c.response.unwrap_or_default().body.to_vec() }
            }
        },
        Err(status) => refusal(&status),
    };
    recorder.history.record(key, Call::Claim { request_id: None }, invoked, outcome.clone());
    outcome
}

/// P4 while retention lasts: after a fresh acknowledged Complete, every Claim or Lookup of the
/// key that was sent after the acknowledgement and answered before the completion time plus
/// `retention_ms` (both on the server's wall clock; `wall_millis` puts the client's instants on
/// it, with a margin for the two clocks' drift) returns that response.
fn check_retained(events: &[Event], retention_ms: i64, wall_millis: impl Fn(Instant) -> i64) -> Vec<String> {
    const MARGIN_MS: i64 = 50;
    let mut by_key: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for event in events {
        by_key.entry(&event.key).or_default().push(event);
    }
    let mut violations = Vec::new();
    for (key, events) in by_key {
        for ack in &events {
            let (Call::Complete { body, .. }, Outcome::CompleteOk { completed_at, fresh: true }) =
                (&ack.call, &ack.outcome)
            else {
                continue;
            };
            let retained_until = completed_at + retention_ms - MARGIN_MS;
            for later in events.iter().filter(|e| e.invoked >= ack.returned && wall_millis(e.returned) < retained_until)
            {
                let wrong = match (&later.call, &later.outcome) {
                    (Call::Claim { .. } | Call::Lookup, Outcome::Completed { body: got }) => got != body,
                    (Call::Claim { .. }, Outcome::Acquired { .. } | Outcome::InProgress) => true,
                    (Call::Lookup, Outcome::NotCompleted) => true,
                    (Call::Lookup, Outcome::Refused(reason)) => reason == "KEY_NOT_FOUND",
                    _ => false,
                };
                if wrong {
                    violations.push(format!(
                        "P4 {key}: within retention of an acknowledged Complete, {:?} returned {:?}",
                        later.call, later.outcome
                    ));
                }
            }
        }
    }
    violations
}
