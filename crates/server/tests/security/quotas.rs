//! Namespace quotas: a namespace at its quota refuses new keys with NAMESPACE_FULL while others
//! keep claiming, on both stores.

use std::time::Duration;

use idempotency_proto::pb;
use idempotency_testkit::*;
use tonic::Code;

use super::{code_and_reason, sha256_hex, with_token, write_auth_file};

const TOKEN: &str = "quota-secret";

async fn a_namespace_at_its_quota_refuses_new_keys_while_others_keep_claiming(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[[token]]\nname = \"api\"\nsha256 = \"{}\"\nnamespaces = [\"small\", \"large\"]\nrole = \"write\"\n\n\
         [[namespace]]\nname = \"small\"\nmax_records = 3\n",
        sha256_hex(TOKEN)
    );
    let path = write_auth_file(dir.path(), &text);
    let server = TestServer::start_on_with(backend, |config| config.auth_file = Some(path)).await;
    let mut client = server.client().await;
    let claim = |namespace: &str, key: &str| {
        let message = pb::ClaimRequest {
            namespace: namespace.to_owned(),
            retention: Some(secs(5)),
            lease_ttl: Some(secs(1)),
            ..claim_request(key, b"fp")
        };
        with_token(message, TOKEN)
    };
    for key in ["a", "b", "c"] {
        acquired(client.claim(claim("small", key)).await.unwrap().into_inner());
    }
    let status = client.claim(claim("small", "d")).await.unwrap_err();
    assert_eq!(code_and_reason(&status), (Code::ResourceExhausted, "NAMESPACE_FULL".to_owned()));
    assert_eq!(
        tonic_types::StatusExt::get_details_error_info(&status).unwrap().metadata.get("limit").map(String::as_str),
        Some("3")
    );
    // Another namespace keeps claiming; the full one still serves its keys.
    for i in 0..10 {
        acquired(client.claim(claim("large", &format!("k{i}"))).await.unwrap().into_inner());
    }
    in_progress(client.claim(claim("small", "a")).await.unwrap().into_inner());
    // Once its records expire (a retention after their leases end), the namespace has room again
    // without waiting for the sweeper.
    server.advance(Duration::from_secs(6));
    acquired(client.claim(claim("small", "d")).await.unwrap().into_inner());
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

on_both_stores!(a_namespace_at_its_quota_refuses_new_keys_while_others_keep_claiming);
