//! Criterion benchmarks of the core: the pure state machine, the sled store's operations, and
//! group commit's batching with 1, 16 and 64 concurrent writers. Run with `cargo bench`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use idempotency_core::domain::machine;
use idempotency_core::domain::{
    ApiResponse, Claim, Complete, FencingToken, Fingerprint, Key, LeaseToken, Namespace, Owner, Timestamp,
};
use idempotency_core::store::Store;
use idempotency_store_sled::{Durability, SledOptions, SledStore};

fn claim_command() -> Claim {
    Claim {
        fingerprint: Fingerprint::parse(&[7; 32]).unwrap(),
        lease_ttl: Duration::from_secs(30),
        retention: Duration::from_secs(86_400),
        request_id: None,
        owner: Owner::parse("bench").unwrap(),
        new_lease_token: LeaseToken::generate(),
    }
}

fn response() -> ApiResponse {
    ApiResponse { body: vec![b'x'; 500].into(), metadata: [("status".to_owned(), "201".to_owned())].into() }
}

fn state_machine(c: &mut Criterion) {
    let now = Timestamp::from_unix_millis(1_767_225_600_000);
    let command = claim_command();
    let held = machine::claim(now, None, &command, |_| FencingToken(1)).unwrap().write.unwrap();
    let complete = Complete { lease_token: command.new_lease_token, response: response(), retention: None };
    let completed = machine::complete(now, Some(&held), complete.clone()).unwrap().write.unwrap();
    let mut group = c.benchmark_group("machine");
    group.bench_function("claim_absent", |b| b.iter(|| machine::claim(now, None, &command, |_| FencingToken(1))));
    group.bench_function("claim_completed_replay", |b| {
        b.iter(|| machine::claim(now, Some(&completed), &command, |_| FencingToken(2)))
    });
    group.bench_function("complete_held", |b| b.iter(|| machine::complete(now, Some(&held), complete.clone())));
    group.bench_function("record_encode_500b", |b| b.iter(|| completed.encode()));
    let encoded = completed.encode();
    group.bench_function("record_decode_500b", |b| {
        b.iter(|| idempotency_core::domain::Record::decode(&encoded).unwrap())
    });
    group.finish();
}

fn open_store(dir: &tempfile::TempDir, durability: Durability) -> Arc<SledStore> {
    let options = SledOptions {
        path: dir.path().join("data"),
        durability,
        max_records: u64::MAX,
        cache_capacity_bytes: 256 << 20,
        wal_file_bytes: idempotency_store_sled::WAL_FILE_BYTES,
    };
    Arc::new(SledStore::open(&options).unwrap())
}

/// One flow (claim a fresh key, complete it) against the store.
async fn flow(store: &SledStore, namespace: &Namespace, id: u64) {
    let key = Key::parse(&format!("key-{id}")).unwrap();
    let now = Timestamp::from_unix_millis(1_767_225_600_000);
    let command = claim_command();
    store.claim(namespace, &key, now, &command, false).await.unwrap();
    let complete = Complete { lease_token: command.new_lease_token, response: response(), retention: None };
    store.complete(namespace, &key, now, complete).await.unwrap();
}

fn store_operations(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let namespace = Namespace::parse("bench").unwrap();
    let mut group = c.benchmark_group("sled_store");
    for durability in [Durability::Strict, Durability::Relaxed] {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(&dir, durability);
        let next = AtomicU64::new(0);
        group.bench_function(BenchmarkId::new("flow", format!("{durability:?}")), |b| {
            b.to_async(&runtime).iter(|| flow(&store, &namespace, next.fetch_add(1, Ordering::Relaxed)))
        });
        let now = Timestamp::from_unix_millis(1_767_225_600_000);
        let replayed = Key::parse("key-0").unwrap();
        let command = claim_command();
        group.bench_function(BenchmarkId::new("replay", format!("{durability:?}")), |b| {
            b.to_async(&runtime).iter(|| store.claim(&namespace, &replayed, now, &command, false))
        });
        runtime.block_on(store.close()).unwrap();
    }
    group.finish();
}

/// Writes per second through group commit with 1, 16 and 64 concurrent writers: with batching,
/// the rate grows with the number of writers instead of staying at one flush per write.
fn flush_batching(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut group = c.benchmark_group("group_commit");
    group.sample_size(10);
    for writers in [1u64, 16, 64] {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(&dir, Durability::Strict);
        let next = Arc::new(AtomicU64::new(0));
        group.throughput(Throughput::Elements(1));
        group.bench_function(BenchmarkId::new("flows_with_writers", writers), |b| {
            b.to_async(&runtime).iter_custom(|iterations| {
                let store = Arc::clone(&store);
                let next = Arc::clone(&next);
                async move {
                    let started = Instant::now();
                    let done = Arc::new(AtomicU64::new(0));
                    let tasks: Vec<_> = (0..writers)
                        .map(|_| {
                            let store = Arc::clone(&store);
                            let next = Arc::clone(&next);
                            let done = Arc::clone(&done);
                            tokio::spawn(async move {
                                let namespace = Namespace::parse("bench").unwrap();
                                while done.fetch_add(1, Ordering::Relaxed) < iterations {
                                    flow(&store, &namespace, next.fetch_add(1, Ordering::Relaxed)).await;
                                }
                            })
                        })
                        .collect();
                    for task in tasks {
                        task.await.unwrap();
                    }
                    started.elapsed()
                }
            })
        });
        runtime.block_on(store.close()).unwrap();
    }
    group.finish();
}

criterion_group!(benches, state_machine, store_operations, flush_batching);
criterion_main!(benches);
