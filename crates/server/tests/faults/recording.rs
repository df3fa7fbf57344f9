//! Recording real calls into histories, the randomized workload, and client helpers.

use super::*;

pub(crate) fn refusal(status: &tonic::Status) -> Outcome {
    match status.get_details_error_info() {
        // The store could not say whether the change took effect (a lost database connection).
        Some(info) if info.reason == "STORE_UNAVAILABLE" || info.reason == "INTERNAL" => Outcome::Unknown,
        Some(info) => Outcome::Refused(info.reason),
        // No ErrorInfo: the transport failed; the call may or may not have happened.
        None => Outcome::Unknown,
    }
}

/// A client that records every call it makes into a shared history.
pub(crate) struct Recorder {
    pub(crate) client: CoordinatorClient<Channel>,
    pub(crate) history: Arc<History>,
}

impl Recorder {
    pub(crate) async fn claim(&mut self, key: &str, lease_ms: i64, request_id: Option<String>) -> Outcome {
        let invoked = Instant::now();
        let request = pb::ClaimRequest {
            lease_ttl: Some(millis(lease_ms)),
            retention: Some(secs(3600)),
            request_id: request_id.clone().unwrap_or_default(),
            ..claim_request(key, b"fp")
        };
        let outcome = match self.client.claim(request).await {
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
        self.history.record(key, Call::Claim { request_id }, invoked, outcome.clone());
        outcome
    }

    pub(crate) async fn complete(&mut self, key: &str, token: &str, body: &[u8]) {
        let invoked = Instant::now();
        let outcome = match self.client.complete(complete_request(key, token, body)).await {
            Ok(reply) => {
                let reply = reply.into_inner();
                Outcome::CompleteOk { completed_at: millis_of(reply.completed_at), fresh: !reply.already_completed }
            }
            Err(status) => refusal(&status),
        };
        self.history.record(key, Call::Complete { token: token.to_owned(), body: body.to_vec() }, invoked, outcome);
    }

    pub(crate) async fn renew(&mut self, key: &str, token: &str, lease_ms: i64) {
        let invoked = Instant::now();
        let outcome = match self.client.renew(renew_request(key, token, millis(lease_ms))).await {
            Ok(reply) => Outcome::RenewOk { lease_expires_at: millis_of(reply.into_inner().lease_expires_at) },
            Err(status) => refusal(&status),
        };
        self.history.record(key, Call::Renew { token: token.to_owned() }, invoked, outcome);
    }

    pub(crate) async fn release(&mut self, key: &str, token: &str) {
        let invoked = Instant::now();
        let outcome = match self.client.release(release_request(key, token)).await {
            Ok(_) => Outcome::ReleaseOk,
            Err(status) => refusal(&status),
        };
        self.history.record(key, Call::Release { token: token.to_owned() }, invoked, outcome);
    }

    pub(crate) async fn lookup(&mut self, key: &str) {
        let invoked = Instant::now();
        let outcome = match self.client.lookup(lookup_request(key)).await {
            Ok(reply) => {
                let view = reply.into_inner();
                if view.state() == pb::KeyState::Completed {
                    Outcome::Completed { body: view.response.unwrap_or_default().body.to_vec() }
                } else {
                    Outcome::NotCompleted
                }
            }
            Err(status) => refusal(&status),
        };
        self.history.record(key, Call::Lookup, invoked, outcome);
    }
}

pub(crate) fn millis_of(timestamp: Option<prost_types::Timestamp>) -> i64 {
    let t = timestamp.unwrap_or_default();
    t.seconds * 1000 + i64::from(t.nanos) / 1_000_000
}

/// One client of the randomized workload: claims keys from a small space with short leases,
/// then completes, releases, renews, abandons or looks up, and sometimes reuses an old token.
/// The key space moves on every 300 ms (all clients share the same `keys` keys at a time), so
/// that fresh keys keep being contended instead of everything ending up completed. Each call
/// goes to one of `recorders` at random (several replicas behind a load balancer).
pub(crate) async fn workload_client(
    mut recorders: Vec<Recorder>,
    seed: u64,
    keys: u64,
    start: Instant,
    until: Instant,
) {
    let mut rng = Rng(seed);
    let mut old_tokens: Vec<(String, String)> = Vec::new();
    let replicas = recorders.len() as u64;
    while Instant::now() < until {
        let epoch = start.elapsed().as_millis() as u64 / 300;
        let key = format!("key-{epoch}-{}", rng.below(keys));
        let mut pick = || rng.below(replicas) as usize;
        let (first, second) = (pick(), pick());
        if rng.below(10) == 0 {
            recorders[first].lookup(&key).await;
            continue;
        }
        if rng.below(10) == 0
            && let Some((key, token)) = old_tokens.get(rng.below(old_tokens.len().max(1) as u64) as usize).cloned()
        {
            recorders[first].complete(&key, &token, b"stale").await;
            continue;
        }
        let request_id = (rng.below(4) == 0).then(|| format!("req-{seed}-{}", rng.below(1000)));
        let lease_ms = 300 + rng.below(700) as i64;
        let Outcome::Acquired { token, .. } = recorders[first].claim(&key, lease_ms, request_id).await else {
            continue;
        };
        old_tokens.push((key.clone(), token.clone()));
        let recorder = &mut recorders[second];
        // Bodies of mixed sizes, across the size at which sled writes pages to blob files.
        let mut body = format!("{key} by {token}").into_bytes();
        body.resize(idempotency_testkit::body_size(&mut rng, body.len(), Some(200_000)), b'.');
        match rng.below(20) {
            0..=12 => recorder.complete(&key, &token, &body).await,
            13..=15 => recorder.release(&key, &token).await,
            16..=17 => {
                recorder.renew(&key, &token, lease_ms).await;
                recorder.complete(&key, &token, &body).await;
            }
            _ => {} // abandoned: the lease lapses and someone takes over
        }
    }
}

/// Opens a store that was just closed in this process. sled's I/O threads may hold the
/// directory's lock for a moment after the last handle is dropped, so a locked directory is
/// retried for a few seconds (a different process holding it would fail every retry).
pub(crate) fn reopen<T, E: std::fmt::Debug>(mut open: impl FnMut() -> Result<T, E>) -> T {
    let give_up = Instant::now() + Duration::from_secs(5);
    loop {
        match open() {
            Ok(opened) => return opened,
            Err(error) if Instant::now() < give_up && format!("{error:?}").contains("could not acquire lock") => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(error) => panic!("the store reopens: {error:?}"),
        }
    }
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub(crate) async fn lazy_client(addr: &str) -> CoordinatorClient<Channel> {
    lazy_client_with_deadline(addr, Duration::from_secs(2)).await
}

pub(crate) async fn lazy_client_with_deadline(addr: &str, deadline: Duration) -> CoordinatorClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .timeout(deadline)
        .connect_timeout(Duration::from_millis(500))
        .connect_lazy();
    CoordinatorClient::new(channel)
}

/// How many kill -9 a crash run does: about 10 in CI, under a 64-client workload; `IDEMPOTENCY_CRASH_KILLS` for longer runs.
pub(crate) fn crash_kills() -> usize {
    std::env::var("IDEMPOTENCY_CRASH_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(10)
}
