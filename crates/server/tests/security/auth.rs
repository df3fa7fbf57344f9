//! Authentication and authorization through the auth file: every outcome per RPC and role, on
//! both stores; cross-tenant calls that read nothing, change nothing and look the same for keys
//! that exist and keys that do not; reflection; reloading.

use std::time::Duration;

use idempotency_proto::pb;
use idempotency_proto::pb::coordinator_client::CoordinatorClient;
use idempotency_testkit::*;
use tonic::Code;
use tonic::transport::Channel;

use super::{code_and_reason, sha256_hex, with_token, write_auth_file};

pub(crate) const READER: &str = "reader-secret";
pub(crate) const WRITER: &str = "writer-secret";
pub(crate) const ADMIN: &str = "admin-secret";
pub(crate) const TENANT_A: &str = "tenant-a-secret";
pub(crate) const TENANT_B: &str = "tenant-b-secret";
pub(crate) const PAYMENTS_ADMIN: &str = "payments-admin-secret";

pub(crate) fn auth_file_text() -> String {
    format!(
        r#"
[[token]]
name = "auditor"
sha256 = "{}"
namespaces = ["payments"]
role = "read"

[[token]]
name = "payments-api"
sha256 = "{}"
namespaces = ["payments", "payments-*"]
deny = ["payments-internal"]
role = "write"

[[token]]
name = "operator"
sha256 = "{}"
namespaces = ["*"]
role = "admin"

[[token]]
name = "tenant-a"
sha256 = "{}"
namespaces = ["tenant-a"]
role = "write"

[[token]]
name = "tenant-b"
sha256 = "{}"
namespaces = ["tenant-b"]
role = "write"

[[token]]
name = "payments-operator"
sha256 = "{}"
namespaces = ["payments", "payments-*"]
role = "admin"
"#,
        sha256_hex(READER),
        sha256_hex(WRITER),
        sha256_hex(ADMIN),
        sha256_hex(TENANT_A),
        sha256_hex(TENANT_B),
        sha256_hex(PAYMENTS_ADMIN)
    )
}

#[derive(Debug, Clone, Copy)]
enum Rpc {
    Claim,
    Complete,
    Renew,
    Release,
    Lookup,
}

const RPCS: [Rpc; 5] = [Rpc::Claim, Rpc::Complete, Rpc::Renew, Rpc::Release, Rpc::Lookup];

/// Makes one call of `rpc` on `namespace`/`key`, with `token` (none when empty).
async fn call(
    client: &mut CoordinatorClient<Channel>,
    rpc: Rpc,
    namespace: &str,
    key: &str,
    token: &str,
) -> Result<(), tonic::Status> {
    fn request<T>(message: T, token: &str) -> tonic::Request<T> {
        if token.is_empty() { tonic::Request::new(message) } else { with_token(message, token) }
    }
    let lease_token = idempotency_core::domain::LeaseToken::generate().to_text();
    let (namespace, key) = (namespace.to_owned(), key.to_owned());
    match rpc {
        Rpc::Claim => {
            let message = pb::ClaimRequest { namespace, key, lease_ttl: Some(secs(10)), ..Default::default() };
            client.claim(request(message, token)).await.map(drop)
        }
        Rpc::Complete => {
            let message =
                pb::CompleteRequest { namespace, key, lease_token, response: Some(response(b"x")), retention: None };
            client.complete(request(message, token)).await.map(drop)
        }
        Rpc::Renew => {
            let message = pb::RenewRequest { namespace, key, lease_token, lease_ttl: Some(secs(10)) };
            client.renew(request(message, token)).await.map(drop)
        }
        Rpc::Release => {
            let message = pb::ReleaseRequest { namespace, key, lease_token };
            client.release(request(message, token)).await.map(drop)
        }
        Rpc::Lookup => client.lookup(request(pb::LookupRequest { namespace, key }, token)).await.map(drop),
    }
}

/// What the auth file's rules answered: allowed (whatever the contract then said), or the denial.
fn judged(result: Result<(), tonic::Status>) -> (Code, String) {
    match result {
        Ok(()) => (Code::Ok, String::new()),
        Err(status) if matches!(status.code(), Code::Unauthenticated | Code::PermissionDenied) => {
            code_and_reason(&status)
        }
        // A refusal by the contract (a random token's LEASE_LOST, KEY_NOT_FOUND): it was let in.
        Err(_) => (Code::Ok, String::new()),
    }
}

async fn every_rpc_and_role_gets_its_answer(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_auth_file(dir.path(), &auth_file_text());
    let server = TestServer::start_on_with(backend, |config| config.auth_file = Some(path)).await;
    let mut client = server.client().await;
    let allowed = (Code::Ok, String::new());
    let unauthenticated = (Code::Unauthenticated, "UNAUTHENTICATED".to_owned());
    let namespace_denied = (Code::PermissionDenied, "NAMESPACE_NOT_ALLOWED".to_owned());
    let role_denied = (Code::PermissionDenied, "ROLE_NOT_ALLOWED".to_owned());
    for rpc in RPCS {
        let writes = !matches!(rpc, Rpc::Lookup);
        let cases = [
            ("", "payments", &unauthenticated),
            ("not-a-known-token", "payments", &unauthenticated),
            (READER, "payments", if writes { &role_denied } else { &allowed }),
            (READER, "refunds", &namespace_denied),
            (WRITER, "payments", &allowed),
            (WRITER, "payments-eu", &allowed),
            (WRITER, "payments-internal", &namespace_denied),
            (WRITER, "refunds", &namespace_denied),
            (ADMIN, "refunds", &allowed),
            (ADMIN, "payments-internal", &allowed),
        ];
        for (token, namespace, expected) in cases {
            let got = judged(call(&mut client, rpc, namespace, "k", token).await);
            assert_eq!(&got, expected, "{rpc:?} in {namespace} with {token:?}");
        }
    }
    // Unknown credentials are refused before the request is looked at: even an invalid one.
    let status = call(&mut client, Rpc::Claim, "not a namespace", "k", "").await.unwrap_err();
    assert_eq!(code_and_reason(&status), unauthenticated);
    // Known credentials then see their input judged as always.
    let status = call(&mut client, Rpc::Claim, "not a namespace", "k", WRITER).await.unwrap_err();
    assert_eq!(code_and_reason(&status), (Code::InvalidArgument, "INVALID_NAMESPACE".to_owned()));
    // Health stays open.
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.expect("health is open");
}

async fn cross_tenant_calls_read_nothing_change_nothing_and_look_alike(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_auth_file(dir.path(), &auth_file_text());
    let server = TestServer::start_on_with(backend, |config| config.auth_file = Some(path)).await;
    let mut client = server.client().await;
    // Tenant B's keys: one held, one completed.
    let claim = |key: &str| pb::ClaimRequest { namespace: "tenant-b".into(), ..claim_request(key, b"fp") };
    let held = acquired(client.claim(with_token(claim("held"), TENANT_B)).await.unwrap().into_inner());
    let done = acquired(client.claim(with_token(claim("done"), TENANT_B)).await.unwrap().into_inner());
    let complete = pb::CompleteRequest {
        namespace: "tenant-b".into(),
        ..complete_request("done", &done.lease_token, b"b's secret")
    };
    client.complete(with_token(complete, TENANT_B)).await.unwrap();
    let before = server.digest().await;

    let mut refusals = std::collections::BTreeSet::new();
    let mut calls = 0;
    for round in 0..10_000 {
        let rpc = RPCS[round % RPCS.len()];
        let key = match round % 4 {
            0 => "held",
            1 => "done",
            _ => "missing",
        };
        let status = call(&mut client, rpc, "tenant-b", key, TENANT_A).await.expect_err("tenant A is refused");
        refusals.insert((
            status.code() as i32,
            status.message().to_owned(),
            code_and_reason(&status).1,
            status.details().len(),
        ));
        calls += 1;
        // Tenant A's own (real) lease tokens, aimed at B's keys, are refused the same way.
        if round % 100 == 0 {
            let lease = pb::CompleteRequest {
                namespace: "tenant-b".into(),
                ..complete_request("held", &held.lease_token, b"x")
            };
            let status = client.complete(with_token(lease, TENANT_A)).await.unwrap_err();
            refusals.insert((
                status.code() as i32,
                status.message().to_owned(),
                code_and_reason(&status).1,
                status.details().len(),
            ));
            calls += 1;
        }
    }
    assert!(calls >= 10_000);
    assert_eq!(refusals.len(), 1, "one and the same refusal for every call, existing key or not: {refusals:?}");
    let (code, _, reason, _) = refusals.into_iter().next().unwrap();
    assert_eq!((code, reason.as_str()), (Code::PermissionDenied as i32, "NAMESPACE_NOT_ALLOWED"));
    assert_eq!(server.digest().await, before, "nothing changed");
    // B still has its response, and its held lease.
    let lookup = pb::LookupRequest { namespace: "tenant-b".into(), key: "done".into() };
    let view = client.lookup(with_token(lookup, TENANT_B)).await.unwrap().into_inner();
    assert_eq!(view.response.unwrap().body, b"b's secret".as_slice());
}

/// One call of each Admin RPC on `namespace` ("": the whole store) with `token`.
async fn admin_calls(
    admin: &mut pb::admin_client::AdminClient<Channel>,
    namespace: &str,
    token: &str,
    snapshot: &[u8],
) -> Vec<(&'static str, (Code, String))> {
    fn request<T>(message: T, token: &str) -> tonic::Request<T> {
        if token.is_empty() { tonic::Request::new(message) } else { with_token(message, token) }
    }
    let judge = |result: Result<(), tonic::Status>| match result {
        Ok(()) => (Code::Ok, String::new()),
        Err(status) => code_and_reason(&status),
    };
    let namespace = namespace.to_owned();
    let stats = admin.stats(request(pb::StatsRequest { namespace: namespace.clone() }, token)).await.map(drop);
    let export = admin.export(request(pb::ExportRequest { namespace: namespace.clone() }, token)).await.map(drop);
    let mut calls = vec![("Stats", judge(stats)), ("Export", judge(export))];
    if !namespace.is_empty() {
        let list = pb::ListRequest { namespace: namespace.clone(), ..Default::default() };
        let list = admin.list(request(list, token)).await.map(drop);
        let purge = pb::PurgeRequest { namespace: namespace.clone(), key: "absent".into() };
        let purge = admin.purge(request(purge, token)).await.map(drop);
        calls.extend([("List", judge(list)), ("Purge", judge(purge))]);
    }
    let chunks = vec![pb::ImportRequest { chunk: snapshot.to_vec() }];
    let import = admin.import(request(tokio_stream::iter(chunks), token)).await.map(drop);
    calls.push(("Import", judge(import)));
    calls
}

async fn admin_calls_need_the_admin_role_over_what_they_touch(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_auth_file(dir.path(), &auth_file_text());
    let server = TestServer::start_on_with(backend, |config| config.auth_file = Some(path)).await;
    let mut client = server.client().await;
    let mut admin = pb::admin_client::AdminClient::new(server.channel().await);
    // A snapshot of one record in each of payments and refunds, taken by the operator.
    for namespace in ["payments", "refunds"] {
        let claim = pb::ClaimRequest { namespace: namespace.into(), ..claim_request("k", b"fp") };
        client.claim(with_token(claim, ADMIN)).await.unwrap();
    }
    let export = |namespace: &str| pb::ExportRequest { namespace: namespace.into() };
    let mut both = Vec::new();
    let mut stream = admin.export(with_token(export(""), ADMIN)).await.unwrap().into_inner();
    while let Some(message) = stream.message().await.unwrap() {
        both.extend_from_slice(&message.chunk);
    }
    let mut payments = Vec::new();
    let mut stream = admin.export(with_token(export("payments"), PAYMENTS_ADMIN)).await.unwrap().into_inner();
    while let Some(message) = stream.message().await.unwrap() {
        payments.extend_from_slice(&message.chunk);
    }
    let before = server.digest().await;
    let allowed = (Code::Ok, String::new());
    let unauthenticated = (Code::Unauthenticated, "UNAUTHENTICATED".to_owned());
    let namespace_denied = (Code::PermissionDenied, "NAMESPACE_NOT_ALLOWED".to_owned());
    let role_denied = (Code::PermissionDenied, "ROLE_NOT_ALLOWED".to_owned());
    // (token, namespace, snapshot, what every call gets; Import judged apart where it differs)
    type Case<'a> = (&'a str, &'a str, &'a [u8], &'a (Code, String), &'a (Code, String));
    let cases: [Case; 9] = [
        ("", "payments", &payments, &unauthenticated, &unauthenticated),
        ("not-a-known-token", "", &both, &unauthenticated, &unauthenticated),
        (READER, "payments", &payments, &role_denied, &role_denied),
        (WRITER, "payments", &payments, &role_denied, &role_denied),
        // Import is judged per namespace in the snapshot: payments first, where the role fails.
        (WRITER, "", &both, &namespace_denied, &role_denied),
        (PAYMENTS_ADMIN, "payments", &payments, &allowed, &allowed),
        (PAYMENTS_ADMIN, "refunds", &both, &namespace_denied, &namespace_denied),
        (PAYMENTS_ADMIN, "", &both, &namespace_denied, &namespace_denied),
        (ADMIN, "", &both, &allowed, &allowed),
    ];
    for (token, namespace, snapshot, expected, import) in cases {
        for (rpc, got) in admin_calls(&mut admin, namespace, token, snapshot).await {
            let expected = if rpc == "Import" { import } else { expected };
            assert_eq!(&got, expected, "{rpc} on {namespace:?} with {token:?}");
        }
    }
    // Refused calls changed nothing; allowed ones here purged an absent key and imported what
    // the store held already.
    assert_eq!(server.digest().await, before);
    // The operator may purge anywhere; the payments operator only in payments.
    let purge = |namespace: &str| pb::PurgeRequest { namespace: namespace.into(), key: "k".into() };
    let status = admin.purge(with_token(purge("refunds"), PAYMENTS_ADMIN)).await.unwrap_err();
    assert_eq!(code_and_reason(&status), namespace_denied);
    assert_eq!(admin.purge(with_token(purge("payments"), PAYMENTS_ADMIN)).await.unwrap().into_inner().deleted, 1);
    assert_eq!(admin.purge(with_token(purge("refunds"), ADMIN)).await.unwrap().into_inner().deleted, 1);
}

/// The client crate's own token setting, as a service uses it (the other tests here send the
/// header by hand).
async fn the_client_crates_bearer_token_is_what_the_server_judges(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_auth_file(dir.path(), &auth_file_text());
    let server = TestServer::start_on_with(backend, |config| config.auth_file = Some(path)).await;
    let url = format!("http://{}", server.addr);
    let writer = idempotency_client::Client::connect(url.clone()).await.unwrap().with_bearer_token(WRITER).unwrap();
    let grant = writer.claim(&idempotency_client::Claim::new("payments", "by-the-client")).await.unwrap();
    assert!(matches!(grant, idempotency_client::ClaimOutcome::Acquired(_)), "{grant:?}");
    let reader = idempotency_client::Client::builder(url.clone()).bearer_token(READER).connect().await.unwrap();
    let refused = reader.claim(&idempotency_client::Claim::new("payments", "by-the-reader")).await.unwrap_err();
    assert!(
        matches!(refused, idempotency_client::Error::Rejected(idempotency_client::Reason::RoleNotAllowed, _)),
        "{refused:?}"
    );
    let anonymous = idempotency_client::Client::connect(url).await.unwrap();
    let refused = anonymous.lookup("payments", "by-the-client").await.unwrap_err();
    assert!(
        matches!(refused, idempotency_client::Error::Rejected(idempotency_client::Reason::Unauthenticated, _)),
        "{refused:?}"
    );
}

macro_rules! on_both_stores {
    ($($test:ident),* $(,)?) => {
        mod sled {
            use idempotency_testkit::Backend;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(Backend::Sled).await;
                }
            )*
        }
        mod postgres {
            use idempotency_testkit::Backend;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    if let Some(backend) = Backend::postgres() {
                        super::$test(backend).await;
                    }
                }
            )*
        }
    };
}

on_both_stores!(
    every_rpc_and_role_gets_its_answer,
    cross_tenant_calls_read_nothing_change_nothing_and_look_alike,
    admin_calls_need_the_admin_role_over_what_they_touch,
    the_client_crates_bearer_token_is_what_the_server_judges
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_needs_credentials_only_when_told() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::{ServerReflectionRequest, server_reflection_request::MessageRequest};
    let dir = tempfile::tempdir().unwrap();
    let path = write_auth_file(dir.path(), &auth_file_text());
    for required in [false, true] {
        let path = path.clone();
        let server = TestServer::start_with(|config| {
            config.auth_file = Some(path);
            config.reflection_requires_auth = required;
        })
        .await;
        let list = || ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut reflection = ServerReflectionClient::new(server.channel().await);
        let anonymous = reflection.server_reflection_info(tokio_stream::iter([list()])).await;
        match (required, anonymous) {
            (false, result) => assert!(result.is_ok(), "open reflection"),
            (true, Err(status)) => assert_eq!(code_and_reason(&status).1, "UNAUTHENTICATED"),
            (true, Ok(mut stream)) => {
                let status = stream.get_mut().message().await.unwrap_err();
                assert_eq!(code_and_reason(&status).1, "UNAUTHENTICATED");
            }
        }
        let authorized = reflection.server_reflection_info(with_token(tokio_stream::iter([list()]), READER)).await;
        assert!(authorized.unwrap().into_inner().message().await.unwrap().is_some(), "known credentials list services");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_auth_file_applies_without_a_restart_and_a_broken_one_keeps_the_rules() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_auth_file(dir.path(), &auth_file_text());
    let server = TestServer::start_with(|config| config.auth_file = Some(path)).await;
    let mut client = server.client().await;
    let probe = client.clone();
    let eventually = |expected: (Code, String), token: &'static str| {
        let mut client = probe.clone();
        async move {
            for _ in 0..100 {
                if judged(call(&mut client, Rpc::Lookup, "payments", "k", token).await) == expected {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("{token} never got {expected:?}");
        }
    };
    assert_eq!(judged(call(&mut client, Rpc::Lookup, "payments", "k", READER).await), (Code::Ok, String::new()));
    // The auditor's token is removed: refused within a couple of seconds, without a restart.
    let without_reader = auth_file_text().replacen(
        &format!("sha256 = \"{}\"", sha256_hex(READER)),
        &format!("sha256 = \"{}\"", sha256_hex("rotated")),
        1,
    );
    write_auth_file(dir.path(), &without_reader);
    eventually((Code::Unauthenticated, "UNAUTHENTICATED".to_owned()), READER).await;
    // A broken file is not applied: the rules in force stay.
    write_auth_file(dir.path(), "[[token]]\nname = \"broken\"\n");
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(judged(call(&mut client, Rpc::Lookup, "payments", "k", WRITER).await), (Code::Ok, String::new()));
    assert_eq!(judged(call(&mut client, Rpc::Lookup, "payments", "k", READER).await).1, "UNAUTHENTICATED");
}
