//! The Admin service's contract, on each store: Stats, List, Purge, Export and Import.
//! (Who may call them is in `security/auth.rs`; an export under load and the command line are in
//! `lifecycle.rs` and `faults/`.)

use std::time::Duration;

use idempotency_proto::pb;
use idempotency_proto::pb::admin_client::AdminClient;
use idempotency_testkit::*;
use tonic::Code;
use tonic::transport::Channel;

async fn admin(server: &TestServer) -> AdminClient<Channel> {
    AdminClient::new(server.channel().await)
}

fn in_namespace(namespace: &str, mut request: pb::ClaimRequest) -> pb::ClaimRequest {
    request.namespace = namespace.to_owned();
    request
}

/// Leases handed out by [`seed`], still held.
struct Seeded {
    /// `order-1`, in progress.
    held: pb::Acquired,
    /// `order-2`, lapsed.
    lapsed: pb::Acquired,
}

/// Puts one key of each state into `payments` (order-1 in progress, order-2 lapsed, order-3
/// released, order-4 completed, order-5 expired and not swept) and a completed key into
/// `refunds`. Ends 11 s after the server's start.
async fn seed(server: &TestServer) -> Seeded {
    let mut client = server.client().await;
    let lapsed = claim_acquired(&mut client, "order-2").await;
    let expiring = claim_acquired(&mut client, "order-5").await;
    let mut complete = complete_request("order-5", &expiring.lease_token, b"short-lived");
    complete.retention = Some(secs(1));
    client.complete(complete).await.unwrap();
    server.advance(Duration::from_secs(11));
    let held = claim_acquired(&mut client, "order-1").await;
    let released = claim_acquired(&mut client, "order-3").await;
    client.release(release_request("order-3", &released.lease_token)).await.unwrap();
    let done = claim_acquired(&mut client, "order-4").await;
    client.complete(complete_request("order-4", &done.lease_token, b"paid")).await.unwrap();
    let refund =
        acquired(client.claim(in_namespace("refunds", claim_request("refund-1", b"fp"))).await.unwrap().into_inner());
    let mut complete = complete_request("refund-1", &refund.lease_token, b"refunded");
    complete.namespace = "refunds".into();
    client.complete(complete).await.unwrap();
    Seeded { held, lapsed }
}

pub(crate) async fn admin_stats_count_records_by_namespace_and_state(backend: Backend) {
    let server = TestServer::start_on(backend.clone()).await;
    let seeded = seed(&server).await;
    let mut admin = admin(&server).await;
    let stats = admin.stats(pb::StatsRequest::default()).await.unwrap().into_inner();
    let kind = if backend == Backend::Sled { "sled" } else { "postgres" };
    assert_eq!((stats.store.as_str(), stats.records), (kind, 6));
    // The store's own count (which --max-records is checked against) agrees with the census.
    assert_eq!(server.coordinator().store().counted_records().await.unwrap(), 6);
    let payments = &stats.namespaces[0];
    assert_eq!(payments.namespace, "payments");
    assert_eq!(
        (payments.in_progress, payments.lease_expired, payments.released, payments.completed, payments.expired),
        (1, 1, 1, 1, 1)
    );
    // The oldest live record is the lapsed lease, granted at the start.
    assert_eq!(payments.oldest_record.unwrap().seconds, START.unix_millis() / 1000);
    assert_eq!(stats.oldest_record, payments.oldest_record);
    let refunds = &stats.namespaces[1];
    assert_eq!((refunds.namespace.as_str(), refunds.completed, refunds.in_progress), ("refunds", 1, 0));
    assert_eq!(stats.namespaces.len(), 2);
    if backend == Backend::Sled {
        assert!(stats.disk_bytes > 0, "the embedded store reports its files");
    }
    // One namespace alone.
    let request = pb::StatsRequest { namespace: "refunds".into() };
    let refunds_only = admin.stats(request).await.unwrap().into_inner();
    assert_eq!((refunds_only.records, refunds_only.namespaces.len()), (1, 1));
    // A sweep removes the expired record; a Complete moves a key from one state to another.
    server.sweep().await;
    let mut client = server.client().await;
    client.complete(complete_request("order-1", &seeded.held.lease_token, b"done")).await.unwrap();
    let stats = admin.stats(pb::StatsRequest::default()).await.unwrap().into_inner();
    let payments = &stats.namespaces[0];
    assert_eq!((payments.in_progress, payments.completed, payments.expired, stats.records), (0, 2, 0, 5));
    let status = admin.stats(pb::StatsRequest { namespace: "no spaces".into() }).await.unwrap_err();
    assert_status(&status, Code::InvalidArgument, "INVALID_NAMESPACE");
}

pub(crate) async fn admin_list_pages_through_live_records_in_key_order(backend: Backend) {
    let server = TestServer::start_on(backend).await;
    let seeded = seed(&server).await;
    let mut client = server.client().await;
    // 23 more keys under `order-`, claimed out of order, and some under another prefix.
    for n in (10..33).rev() {
        claim_acquired(&mut client, &format!("order-{n}")).await;
    }
    for n in 0..3 {
        claim_acquired(&mut client, &format!("refund-{n}")).await;
    }
    let mut admin = admin(&server).await;
    let list = |prefix: &str, state: pb::KeyState, page_token: String| pb::ListRequest {
        namespace: "payments".into(),
        prefix: prefix.into(),
        state: state.into(),
        page_size: 10,
        page_token,
    };
    let mut keys = Vec::new();
    let mut page_token = String::new();
    let mut pages = 0;
    loop {
        let page = admin.list(list("order-", pb::KeyState::Unspecified, page_token)).await.unwrap().into_inner();
        pages += 1;
        assert!(page.records.len() <= 10);
        keys.extend(page.records.iter().map(|record| record.key.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    // order-1..4 and order-10..32: the expired order-5 is not listed.
    let mut expected: Vec<String> =
        [1, 2, 3, 4].iter().chain(&(10..33).collect::<Vec<_>>()).map(|n| format!("order-{n}")).collect();
    expected.sort();
    assert_eq!(keys, expected, "every live key once, in bytewise order");
    assert_eq!(pages, 3);
    // A state filter; what a summary shows (no body, its length instead).
    let completed = admin.list(list("", pb::KeyState::Completed, String::new())).await.unwrap().into_inner();
    assert_eq!(completed.records.len(), 1);
    let record = &completed.records[0];
    assert_eq!((record.key.as_str(), record.state(), record.response_bytes), ("order-4", pb::KeyState::Completed, 4));
    assert!(record.completed_at.is_some() && record.lease_expires_at.is_none());
    let lapsed = admin.list(list("order-", pb::KeyState::LeaseExpired, String::new())).await.unwrap().into_inner();
    assert_eq!(lapsed.records.len(), 1);
    assert_eq!(
        (lapsed.records[0].key.as_str(), lapsed.records[0].fencing_token),
        ("order-2", seeded.lapsed.fencing_token)
    );
    assert_eq!(lapsed.records[0].lease_expires_at, seeded.lapsed.lease_expires_at);
    // Tokens are good only for their own listing.
    let first = admin.list(list("order-", pb::KeyState::Unspecified, String::new())).await.unwrap().into_inner();
    for (prefix, token) in [("refund-", first.next_page_token.clone()), ("order-", "v1.nonsense".to_owned())] {
        let status = admin.list(list(prefix, pb::KeyState::Unspecified, token)).await.unwrap_err();
        assert_status(&status, Code::InvalidArgument, "INVALID_PAGE_TOKEN");
    }
    let mut elsewhere = list("order-", pb::KeyState::Unspecified, first.next_page_token);
    elsewhere.namespace = "refunds".into();
    assert_status(&admin.list(elsewhere).await.unwrap_err(), Code::InvalidArgument, "INVALID_PAGE_TOKEN");
    let mut bad_state = list("", pb::KeyState::Unspecified, String::new());
    bad_state.state = 42;
    assert_status(&admin.list(bad_state).await.unwrap_err(), Code::InvalidArgument, "INVALID_MESSAGE");
}

pub(crate) async fn admin_purge_deletes_durably_and_fencing_tokens_never_go_back(backend: Backend) {
    let mut server = TestServer::start_on(backend).await;
    let seeded = seed(&server).await;
    let mut client = server.client().await;
    let mut admin = admin(&server).await;
    let purge = |namespace: &str, key: &str| pb::PurgeRequest { namespace: namespace.into(), key: key.into() };
    assert_eq!(admin.purge(purge("payments", "order-4")).await.unwrap().into_inner().deleted, 1);
    assert_eq!(admin.purge(purge("payments", "order-4")).await.unwrap().into_inner().deleted, 0, "already gone");
    assert_status(&client.lookup(lookup_request("order-4")).await.unwrap_err(), Code::NotFound, "KEY_NOT_FOUND");
    // The purged key starts afresh, with a fencing token above every earlier one.
    let again = claim_acquired(&mut client, "order-4").await;
    assert_eq!((again.attempt, again.takeover), (1, false));
    assert!(again.fencing_token > seeded.held.fencing_token);
    // A whole namespace: the holder of a purged lease can no longer complete it.
    let deleted = admin.purge(purge("payments", "")).await.unwrap().into_inner().deleted;
    assert_eq!(deleted, 5, "order-1..5, the expired order-5 included");
    let status = client.complete(complete_request("order-1", &seeded.held.lease_token, b"late")).await.unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    let refund = pb::LookupRequest { namespace: "refunds".into(), key: "refund-1".into() };
    assert_eq!(client.lookup(refund.clone()).await.unwrap().into_inner().state(), pb::KeyState::Completed);
    let stats = admin.stats(pb::StatsRequest::default()).await.unwrap().into_inner();
    assert_eq!((stats.records, stats.namespaces.len()), (1, 1), "only refunds is left");
    // Deletions outlive a restart, and tokens still only go up.
    server.restart().await;
    let mut client = server.client().await;
    for key in ["order-1", "order-2", "order-3", "order-4"] {
        assert_status(&client.lookup(lookup_request(key)).await.unwrap_err(), Code::NotFound, "KEY_NOT_FOUND");
    }
    let after = claim_acquired(&mut client, "order-1").await;
    assert!(after.fencing_token > again.fencing_token);
    assert_eq!(client.lookup(refund).await.unwrap().into_inner().state(), pb::KeyState::Completed);
}

/// The bytes of a whole export.
async fn export(admin: &mut AdminClient<Channel>, namespace: &str) -> Vec<u8> {
    let mut stream = admin.export(pb::ExportRequest { namespace: namespace.into() }).await.unwrap().into_inner();
    let mut bytes = Vec::new();
    while let Some(message) = stream.message().await.unwrap() {
        bytes.extend_from_slice(&message.chunk);
    }
    bytes
}

/// Sends `bytes` to Import in small chunks.
async fn import(admin: &mut AdminClient<Channel>, bytes: &[u8]) -> Result<pb::ImportResponse, tonic::Status> {
    let chunks: Vec<pb::ImportRequest> =
        bytes.chunks(1000).map(|chunk| pb::ImportRequest { chunk: chunk.to_vec() }).collect();
    admin.import(tokio_stream::iter(chunks)).await.map(tonic::Response::into_inner)
}

/// The store of the other kind (sled when PostgreSQL is not configured outside CI).
fn other_kind(backend: &Backend) -> Backend {
    match backend {
        Backend::Sled => Backend::postgres().unwrap_or(Backend::Sled),
        Backend::Postgres(_) => Backend::Sled,
    }
}

pub(crate) async fn admin_export_and_import_into_the_other_store_reproduce_every_live_record(backend: Backend) {
    let source = TestServer::start_on(backend.clone()).await;
    let seeded = seed(&source).await;
    let bytes = export(&mut admin(&source).await, "").await;
    assert!(bytes.starts_with(b"IDEMSNAP"));
    let target = TestServer::start_on(other_kind(&backend)).await;
    // The same time as the source's (seeding took 11 s).
    target.advance(Duration::from_secs(11));
    let mut target_admin = admin(&target).await;
    let imported = import(&mut target_admin, &bytes).await.unwrap();
    assert_eq!((imported.inserted, imported.replaced, imported.kept), (5, 0, 0), "the five live records");
    assert!(imported.fencing_floor >= seeded.held.fencing_token);
    // Every live key reads the same through both.
    let mut from = source.client().await;
    let mut to = target.client().await;
    for (namespace, key) in [
        ("payments", "order-1"),
        ("payments", "order-2"),
        ("payments", "order-3"),
        ("payments", "order-4"),
        ("refunds", "refund-1"),
    ] {
        let lookup = || pb::LookupRequest { namespace: namespace.into(), key: key.into() };
        let original = from.lookup(lookup()).await.unwrap().into_inner();
        let copy = to.lookup(lookup()).await.unwrap().into_inner();
        assert_eq!(copy, original, "{namespace}/{key}");
    }
    assert_status(&to.lookup(lookup_request("order-5")).await.unwrap_err(), Code::NotFound, "KEY_NOT_FOUND");
    // Importing again changes nothing.
    let again = import(&mut target_admin, &bytes).await.unwrap();
    assert_eq!((again.inserted, again.replaced, again.kept), (0, 0, 5));
    // Held leases keep working with their tokens; new grants are above every exported token.
    to.renew(renew_request("order-1", &seeded.held.lease_token, secs(10))).await.unwrap();
    to.complete(complete_request("order-1", &seeded.held.lease_token, b"finished")).await.unwrap();
    let fresh = claim_acquired(&mut to, "order-9").await;
    assert!(fresh.fencing_token > seeded.held.fencing_token);
    let takeover = claim_acquired(&mut to, "order-2").await;
    assert!(takeover.takeover && takeover.fencing_token > seeded.lapsed.fencing_token);
    // A later state in the target is never replaced by an import of an earlier one.
    let later = import(&mut target_admin, &bytes).await.unwrap();
    assert_eq!((later.inserted, later.replaced), (0, 0));
    let view = to.lookup(lookup_request("order-1")).await.unwrap().into_inner();
    assert_eq!(view.response, Some(response(b"finished")));
    // One namespace alone.
    let refunds = export(&mut admin(&source).await, "refunds").await;
    let target = TestServer::start_on(other_kind(&backend)).await;
    target.advance(Duration::from_secs(11));
    let imported = import(&mut admin(&target).await, &refunds).await.unwrap();
    assert_eq!(imported.inserted, 1);
}

pub(crate) async fn admin_import_refuses_a_damaged_snapshot_and_changes_nothing(backend: Backend) {
    let source = TestServer::start_on(backend.clone()).await;
    seed(&source).await;
    let bytes = export(&mut admin(&source).await, "").await;
    let target = TestServer::start_on(backend).await;
    let mut target_admin = admin(&target).await;
    let before = target.coordinator().store().contents_digest().await.unwrap();
    let mut flipped = bytes.clone();
    flipped[40] ^= 0x55;
    for (damaged, why) in
        [(&bytes[..bytes.len() - 3], "ends early"), (&flipped[..], "checksum"), (&b"not a snapshot"[..], "snapshot")]
    {
        let status = import(&mut target_admin, damaged).await.unwrap_err();
        assert_status(&status, Code::InvalidArgument, "INVALID_SNAPSHOT");
        assert!(status.message().contains(why), "{}", status.message());
    }
    assert_eq!(target.coordinator().store().contents_digest().await.unwrap(), before);
    let stats = target_admin.stats(pb::StatsRequest::default()).await.unwrap().into_inner();
    assert_eq!(stats.records, 0);
}
