//! The stores against a small reference model, on random command sequences with clock moves, sweeps and restarts.

use super::*;

pub(crate) mod reference {
    use std::collections::HashMap;
    use std::time::Duration;

    use idempotency_coordinator::stores::AnyStore;
    use idempotency_core::clock::{Clock, SystemClock};
    use idempotency_core::domain::{
        ApiResponse, Claim, ClaimOutcome, Complete, Fingerprint, Key, KeyState, LeaseToken, Namespace, Owner, Release,
        Renew, RequestId, Timestamp,
    };
    use idempotency_core::store::{Store, StoreError};
    use idempotency_store_postgres::{PostgresOptions, PostgresStore, TimeSource};
    use idempotency_store_sled::{Durability, SledOptions, SledStore};
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    pub enum Op {
        Claim { key: u8, fingerprint: u8, ttl_s: u8, retention_s: u8, request: Option<u8> },
        Complete { key: u8, token: u8, body: u8, retention_s: Option<u8> },
        Renew { key: u8, token: u8, ttl_s: u8 },
        Release { key: u8, token: u8 },
        Lookup { key: u8 },
        Advance { seconds: u8 },
        Sweep,
        Restart,
    }

    pub fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..3u8, 0..3u8, 1..5u8, 1..8u8, proptest::option::of(0..2u8))
                .prop_map(|(key, fingerprint, ttl_s, retention_s, request)| Op::Claim { key, fingerprint, ttl_s, retention_s, request }),
            3 => (0..3u8, 0..6u8, 0..3u8, proptest::option::of(1..8u8))
                .prop_map(|(key, token, body, retention_s)| Op::Complete { key, token, body, retention_s }),
            1 => (0..3u8, 0..6u8, 1..5u8).prop_map(|(key, token, ttl_s)| Op::Renew { key, token, ttl_s }),
            1 => (0..3u8, 0..6u8).prop_map(|(key, token)| Op::Release { key, token }),
            2 => (0..3u8).prop_map(|key| Op::Lookup { key }),
            2 => (1..6u8).prop_map(|seconds| Op::Advance { seconds }),
            1 => Just(Op::Sweep),
            1 => Just(Op::Restart),
        ]
    }

    /// What a call returned, with the random parts (tokens, fencing values) left out.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Seen {
        Acquired { attempt: u32, takeover: bool, expires: i64, same_as: Option<usize> },
        InProgress { expires: i64, attempt: u32 },
        Completed { body: Vec<u8>, completed_at: i64, expires: i64 },
        CompleteOk { completed_at: i64, expires: i64, already: bool },
        RenewOk { expires: i64 },
        ReleaseOk,
        Lookup { state: &'static str, attempt: u32, lease: Option<i64>, body: Option<Vec<u8>>, expires: i64 },
        Refused(&'static str),
        Nothing,
    }

    #[derive(Clone)]
    enum State {
        Held { token: usize, expires: i64, request: Option<u8>, takeover: bool },
        Released { token: usize },
        Completed { token: usize, body: Vec<u8>, at: i64 },
    }

    #[derive(Clone)]
    struct Entry {
        fingerprint: u8,
        attempt: u32,
        updated: i64,
        retention: i64,
        state: State,
    }

    impl Entry {
        /// Retention after the last change; for a held key, retention after its lease ends.
        fn expires(&self) -> i64 {
            match self.state {
                State::Held { expires, .. } => expires.max(self.updated) + self.retention,
                _ => self.updated + self.retention,
            }
        }
    }

    /// The reference: a map from key to entry, with the contract's rules written out plainly.
    /// Tokens are indices into the list of tokens the store handed out (index 0 is never granted).
    #[derive(Default)]
    pub struct Model {
        entries: HashMap<u8, Entry>,
        granted: usize,
    }

    const S: i64 = 1000;

    impl Model {
        fn live(&self, key: u8, now: i64) -> Option<&Entry> {
            self.entries.get(&key).filter(|e| e.expires() > now)
        }

        pub fn apply(&mut self, op: &Op, now: i64) -> Seen {
            match *op {
                Op::Claim { key, fingerprint, ttl_s, retention_s, request } => {
                    let (ttl, retention) = (i64::from(ttl_s) * S, i64::from(retention_s) * S);
                    let live = self.live(key, now).cloned();
                    let grant = |model: &mut Model, attempt: u32, takeover: bool, bound: u8| {
                        model.granted += 1;
                        let state = State::Held { token: model.granted, expires: now + ttl, request, takeover };
                        model
                            .entries
                            .insert(key, Entry { fingerprint: bound, attempt, updated: now, retention, state });
                        Seen::Acquired { attempt, takeover, expires: now + ttl, same_as: None }
                    };
                    let Some(entry) = live else { return grant(self, 1, false, fingerprint) };
                    if fingerprint != 0 && entry.fingerprint != 0 && fingerprint != entry.fingerprint {
                        return Seen::Refused("FINGERPRINT_MISMATCH");
                    }
                    let bound = if entry.fingerprint != 0 { entry.fingerprint } else { fingerprint };
                    let entry_expires = entry.expires();
                    match entry.state {
                        State::Completed { body, at, .. } => {
                            Seen::Completed { body, completed_at: at, expires: entry_expires }
                        }
                        State::Held { token, expires, request: held_request, takeover } if expires > now => {
                            if request.is_some() && request == held_request {
                                Seen::Acquired { attempt: entry.attempt, takeover, expires, same_as: Some(token) }
                            } else {
                                Seen::InProgress { expires, attempt: entry.attempt }
                            }
                        }
                        State::Held { .. } => grant(self, entry.attempt + 1, true, bound),
                        State::Released { .. } => grant(self, entry.attempt + 1, false, bound),
                    }
                }
                Op::Complete { key, token, body, retention_s } => {
                    let Some(entry) = self.live(key, now).cloned() else { return Seen::Refused("LEASE_LOST") };
                    match entry.state {
                        State::Held { token: holder, .. } if holder == usize::from(token) => {
                            let retention = retention_s.map_or(entry.retention, |r| i64::from(r) * S);
                            let completed = Entry {
                                updated: now,
                                retention,
                                state: State::Completed { token: holder, body: vec![body], at: now },
                                ..entry
                            };
                            let expires = completed.expires();
                            self.entries.insert(key, completed);
                            Seen::CompleteOk { completed_at: now, expires, already: false }
                        }
                        State::Completed { token: by, at, .. } if by == usize::from(token) => {
                            Seen::CompleteOk { completed_at: at, expires: entry.expires(), already: true }
                        }
                        _ => Seen::Refused("LEASE_LOST"),
                    }
                }
                Op::Renew { key, token, ttl_s } => {
                    let Some(entry) = self.live(key, now).cloned() else { return Seen::Refused("LEASE_LOST") };
                    match entry.state {
                        State::Held { token: holder, request, takeover, .. } if holder == usize::from(token) => {
                            let expires = now + i64::from(ttl_s) * S;
                            let state = State::Held { token: holder, expires, request, takeover };
                            self.entries.insert(key, Entry { updated: now, state, ..entry });
                            Seen::RenewOk { expires }
                        }
                        State::Completed { token: by, .. } if by == usize::from(token) => {
                            Seen::Refused("ALREADY_COMPLETED")
                        }
                        _ => Seen::Refused("LEASE_LOST"),
                    }
                }
                Op::Release { key, token } => {
                    let Some(entry) = self.live(key, now).cloned() else { return Seen::ReleaseOk };
                    match entry.state {
                        State::Held { token: holder, .. } if holder == usize::from(token) => {
                            self.entries
                                .insert(key, Entry { updated: now, state: State::Released { token: holder }, ..entry });
                            Seen::ReleaseOk
                        }
                        State::Released { token: by } if by == usize::from(token) => Seen::ReleaseOk,
                        State::Completed { token: by, .. } if by == usize::from(token) => {
                            Seen::Refused("ALREADY_COMPLETED")
                        }
                        _ => Seen::Refused("LEASE_LOST"),
                    }
                }
                Op::Lookup { key } => {
                    let Some(entry) = self.live(key, now) else { return Seen::Refused("KEY_NOT_FOUND") };
                    let (state, lease, body) = match &entry.state {
                        State::Held { expires, .. } if *expires > now => ("in_progress", Some(*expires), None),
                        State::Held { expires, .. } => ("lease_expired", Some(*expires), None),
                        State::Released { .. } => ("released", None, None),
                        State::Completed { body, .. } => ("completed", None, Some(body.clone())),
                    };
                    Seen::Lookup { state, attempt: entry.attempt, lease, body, expires: entry.expires() }
                }
                Op::Advance { .. } | Op::Sweep | Op::Restart => Seen::Nothing,
            }
        }
    }

    /// The store under test, with the tokens it handed out (index 0: one it never did).
    pub struct Subject {
        pub dir: tempfile::TempDir,
        /// `None`: sled in `dir`; `Some((url, schema))`: PostgreSQL.
        pub postgres: Option<(String, String)>,
        pub store: Option<AnyStore>,
        pub tokens: Vec<LeaseToken>,
        pub fencing: HashMap<u8, u64>,
    }

    fn reason(error: StoreError) -> &'static str {
        use idempotency_core::domain::Rejection;
        match error {
            StoreError::Rejected(Rejection::FingerprintMismatch) => "FINGERPRINT_MISMATCH",
            StoreError::Rejected(Rejection::LeaseLost) => "LEASE_LOST",
            StoreError::Rejected(Rejection::AlreadyCompleted) => "ALREADY_COMPLETED",
            StoreError::Rejected(Rejection::NotFound) => "KEY_NOT_FOUND",
            other => panic!("unexpected store error {other}"),
        }
    }

    pub async fn open(dir: &std::path::Path, postgres: &Option<(String, String)>) -> AnyStore {
        match postgres {
            None => {
                let options = SledOptions {
                    path: dir.join("data"),
                    durability: Durability::Strict,
                    max_records: 1000,
                    cache_capacity_bytes: 1 << 22,
                    wal_file_bytes: idempotency_store_sled::WAL_FILE_BYTES,
                };
                AnyStore::Sled(super::reopen(|| SledStore::open(&options)))
            }
            Some((url, schema)) => {
                let options = PostgresOptions {
                    url: url.clone(),
                    schema: schema.clone(),
                    pool_size: 2,
                    timeout: Duration::from_secs(10),
                    max_records: 1000,
                    time: TimeSource::Caller,
                    password: None,
                };
                let local: std::sync::Arc<dyn Clock> = std::sync::Arc::new(SystemClock);
                let store = PostgresStore::open(&options, local, Default::default()).await.expect("PostgreSQL opens");
                AnyStore::Postgres(store)
            }
        }
    }

    impl Subject {
        fn token(&self, index: u8) -> LeaseToken {
            self.tokens.get(usize::from(index)).copied().unwrap_or(self.tokens[0])
        }

        pub async fn apply(&mut self, op: &Op, now: i64) -> Seen {
            let namespace = Namespace::parse("model").unwrap();
            let at = Timestamp::from_unix_millis(now);
            let key_of = |key: u8| Key::parse(&format!("k{key}")).unwrap();
            let ms = |t: Timestamp| t.unix_millis();
            if let Op::Restart = op {
                let store = self.store.take().unwrap();
                store.close().await.unwrap();
                drop(store);
                self.store = Some(open(self.dir.path(), &self.postgres).await);
                return Seen::Nothing;
            }
            let store = self.store.as_ref().unwrap();
            match *op {
                Op::Claim { key, fingerprint, ttl_s, retention_s, request } => {
                    let fingerprint = if fingerprint == 0 { vec![] } else { vec![fingerprint] };
                    let command = Claim {
                        fingerprint: Fingerprint::parse(&fingerprint).unwrap(),
                        lease_ttl: Duration::from_secs(u64::from(ttl_s)),
                        retention: Duration::from_secs(u64::from(retention_s)),
                        request_id: request.map(|r| RequestId::parse_optional(&format!("r{r}")).unwrap().unwrap()),
                        owner: Owner::parse("").unwrap(),
                        new_lease_token: LeaseToken::generate(),
                    };
                    match store.claim(&namespace, &key_of(key), at, &command, false).await {
                        Ok(ClaimOutcome::Acquired(grant)) => {
                            let previous = self.fencing.insert(key, grant.fencing_token.0).unwrap_or(0);
                            let same_as = self.tokens.iter().position(|t| *t == grant.lease_token);
                            if same_as.is_none() {
                                assert!(
                                    grant.fencing_token.0 > previous,
                                    "fencing went from {previous} to {}",
                                    grant.fencing_token.0
                                );
                                self.tokens.push(grant.lease_token);
                            }
                            Seen::Acquired {
                                attempt: grant.attempt,
                                takeover: grant.takeover,
                                expires: ms(grant.lease_expires_at),
                                same_as,
                            }
                        }
                        Ok(ClaimOutcome::InProgress { lease_expires_at, attempt, .. }) => {
                            Seen::InProgress { expires: ms(lease_expires_at), attempt }
                        }
                        Ok(ClaimOutcome::Completed(stored)) => Seen::Completed {
                            body: stored.response.body.to_vec(),
                            completed_at: ms(stored.completed_at),
                            expires: ms(stored.expires_at),
                        },
                        Err(error) => Seen::Refused(reason(error)),
                    }
                }
                Op::Complete { key, token, body, retention_s } => {
                    let command = Complete {
                        lease_token: self.token(token),
                        response: ApiResponse { body: vec![body].into(), metadata: Default::default() },
                        retention: retention_s.map(|r| Duration::from_secs(u64::from(r))),
                    };
                    match store.complete(&namespace, &key_of(key), at, command).await {
                        Ok(done) => Seen::CompleteOk {
                            completed_at: ms(done.completed_at),
                            expires: ms(done.expires_at),
                            already: done.already_completed,
                        },
                        Err(error) => Seen::Refused(reason(error)),
                    }
                }
                Op::Renew { key, token, ttl_s } => {
                    let command =
                        Renew { lease_token: self.token(token), lease_ttl: Duration::from_secs(u64::from(ttl_s)) };
                    match store.renew(&namespace, &key_of(key), at, &command).await {
                        Ok(renewed) => Seen::RenewOk { expires: ms(renewed.lease_expires_at) },
                        Err(error) => Seen::Refused(reason(error)),
                    }
                }
                Op::Release { key, token } => {
                    match store.release(&namespace, &key_of(key), at, &Release { lease_token: self.token(token) }).await
                    {
                        Ok(()) => Seen::ReleaseOk,
                        Err(error) => Seen::Refused(reason(error)),
                    }
                }
                Op::Lookup { key } => match store.lookup(&namespace, &key_of(key), at).await {
                    Ok(view) => Seen::Lookup {
                        state: match view.state {
                            KeyState::InProgress => "in_progress",
                            KeyState::LeaseExpired => "lease_expired",
                            KeyState::Released => "released",
                            KeyState::Completed => "completed",
                        },
                        attempt: view.attempt,
                        lease: view.lease_expires_at.map(ms),
                        body: view.completed.map(|(response, _)| response.body.to_vec()),
                        expires: ms(view.expires_at),
                    },
                    Err(error) => Seen::Refused(reason(error)),
                },
                Op::Sweep => {
                    store.sweep(at, 100).await.unwrap();
                    Seen::Nothing
                }
                Op::Advance { .. } | Op::Restart => Seen::Nothing,
            }
        }
    }
}

/// Runs `ops` against the reference model and a store (sled, or PostgreSQL in `postgres`), and
/// asserts that every step is seen the same way by both.
pub(crate) fn run_model(ops: &[reference::Op], postgres: Option<(String, String)>) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = reference::open(dir.path(), &postgres).await;
        let mut subject = reference::Subject {
            dir,
            postgres,
            store: Some(store),
            tokens: vec![idempotency_core::domain::LeaseToken::generate()],
            fencing: Default::default(),
        };
        let mut reference = reference::Model::default();
        let mut now = START.unix_millis();
        for (step, op) in ops.iter().enumerate() {
            if let reference::Op::Advance { seconds } = op {
                now += i64::from(*seconds) * 1000;
            }
            let expected = reference.apply(op, now);
            let actual = subject.apply(op, now).await;
            // Both number tokens by grant order (1, 2, …), so a request-id retry names the
            // same earlier grant on both sides.
            assert_eq!(actual, expected, "step {step}: {op:?} at {now}\nops: {ops:?}");
        }
        idempotency_core::store::Store::close(&subject.store.take().unwrap()).await.unwrap();
    });
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config { cases: 128, ..Default::default() })]

    #[test]
    fn the_sled_store_behaves_like_the_reference_model(ops in proptest::collection::vec(reference::op(), 1..40)) {
        run_model(&ops, None);
    }
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config { cases: 96, ..Default::default() })]

    /// The same model against the SQL reimplementation of the state machine, a schema per case.
    #[test]
    fn the_postgres_store_behaves_like_the_reference_model(ops in proptest::collection::vec(reference::op(), 1..40)) {
        if let Some(Backend::Postgres(url)) = Backend::postgres() {
            let _serial = POSTGRES.blocking_lock();
            run_model(&ops, Some((url, test_schema())));
        }
    }
}
