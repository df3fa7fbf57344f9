//! TLS and mTLS through the real binary: plaintext refused, untrusted, expired and wrong-host
//! certificates refused by the client, client certificates required and mapped to identities,
//! and certificates rotated under load without a lost call or a dropped connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use idempotency_client::{Client, Error, Reason, Stored};
use idempotency_testkit::pki::{PemPair, Pki};
use idempotency_testkit::*;

use super::{sha256_hex, write_auth_file};

fn tls_flags(server: &PemPair) -> Vec<String> {
    vec!["--tls-cert".into(), server.cert.display().to_string(), "--tls-key".into(), server.key.display().to_string()]
}

fn start(dir: &std::path::Path, flags: &[String]) -> ChildServer {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    ChildServer::start_with(&dir.join("data"), &flags)
}

async fn tls_client(server: &ChildServer, ca: &std::path::Path, identity: Option<&PemPair>) -> Result<Client, Error> {
    let mut builder = Client::builder(format!("https://{}", server.addr))
        .ca_certificate(std::fs::read(ca).unwrap())
        .call_timeout(Duration::from_secs(5));
    if let Some(identity) = identity {
        builder = builder.identity(identity.cert_pem(), identity.key_pem());
    }
    builder.connect().await
}

/// Whether a call got through to the contract (a KEY_NOT_FOUND for a lookup of nothing counts).
async fn reaches_the_contract(client: Result<Client, Error>, namespace: &str) -> Result<(), String> {
    let client = client.map_err(|error| format!("connect: {error}"))?;
    match client.lookup(namespace, "nothing").await {
        Ok(_) | Err(Error::Rejected(Reason::KeyNotFound, _)) => Ok(()),
        Err(error) => Err(format!("{error}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_is_refused_and_bad_server_certificates_are_refused_by_the_client() {
    let pki = Pki::new("ca");
    let other_ca = Pki::new("other-ca");
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &tls_flags(&pki.server("server")));
    reaches_the_contract(tls_client(&server, &pki.ca_cert, None).await, "payments").await.expect("TLS works");
    let plaintext = Client::connect(format!("http://{}", server.addr)).await;
    assert!(reaches_the_contract(plaintext, "payments").await.is_err(), "plaintext to a TLS port fails");
    let untrusted = tls_client(&server, &other_ca.ca_cert, None).await;
    assert!(reaches_the_contract(untrusted, "payments").await.is_err(), "a certificate from an untrusted CA");
    drop(server);

    for (what, pair) in
        [("expired", pki.expired_server("expired")), ("for another host", pki.server_for_another_host("elsewhere"))]
    {
        let dir = tempfile::tempdir().unwrap();
        let server = start(dir.path(), &tls_flags(&pair));
        let result = reaches_the_contract(tls_client(&server, &pki.ca_cert, None).await, "payments").await;
        assert!(result.is_err(), "a server certificate {what} is refused");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_requires_a_certificate_from_the_ca_and_names_the_caller_by_it() {
    let pki = Pki::new("ca");
    let other_ca = Pki::new("other-ca");
    let dir = tempfile::tempdir().unwrap();
    let auth = write_auth_file(
        dir.path(),
        &format!(
            "[[certificate]]\nsubject = \"CN=refunds-api\"\nnamespaces = [\"refunds\"]\nrole = \"write\"\n\n\
             [[certificate]]\nsan = \"ledger.internal\"\nnamespaces = [\"ledger\"]\nrole = \"read\"\n\n\
             [[token]]\nname = \"ops\"\nsha256 = \"{}\"\nnamespaces = [\"*\"]\nrole = \"admin\"\n",
            sha256_hex("ops-secret")
        ),
    );
    let mut flags = tls_flags(&pki.server("server"));
    flags.extend([
        "--tls-client-ca".into(),
        pki.ca_cert.display().to_string(),
        "--auth-file".into(),
        auth.display().to_string(),
    ]);
    let server = start(dir.path(), &flags);

    let refunds = pki.client("refunds", "refunds-api", &[]);
    reaches_the_contract(tls_client(&server, &pki.ca_cert, Some(&refunds)).await, "refunds")
        .await
        .expect("its namespace");
    let elsewhere = tls_client(&server, &pki.ca_cert, Some(&refunds)).await.unwrap().lookup("payments", "k").await;
    assert!(matches!(elsewhere, Err(Error::Rejected(Reason::NamespaceNotAllowed, _))), "{elsewhere:?}");
    let ledger = pki.client("ledger", "some-name", &["ledger.internal"]);
    reaches_the_contract(tls_client(&server, &pki.ca_cert, Some(&ledger)).await, "ledger").await.expect("by SAN");
    let unknown = pki.client("unknown", "nobody", &[]);
    let refused = tls_client(&server, &pki.ca_cert, Some(&unknown)).await.unwrap().lookup("refunds", "k").await;
    assert!(matches!(refused, Err(Error::Rejected(Reason::Unauthenticated, _))), "{refused:?}");

    let without = reaches_the_contract(tls_client(&server, &pki.ca_cert, None).await, "refunds").await;
    assert!(without.is_err(), "no client certificate: refused in the handshake");
    let foreign = other_ca.client("foreign", "refunds-api", &[]);
    let foreign = reaches_the_contract(tls_client(&server, &pki.ca_cert, Some(&foreign)).await, "refunds").await;
    assert!(foreign.is_err(), "a certificate from another CA, even with the right name, is refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_without_a_lost_call_or_a_dropped_connection() {
    let first = Pki::new("first-ca");
    let second = Pki::new("second-ca");
    let dir = tempfile::tempdir().unwrap();
    let live = first.server("live");
    let mut server = start(dir.path(), &tls_flags(&live));
    // 64 clients on 8 connections, each trusting only the first CA: if any connection were
    // dropped and made again after the rotation, its calls would fail.
    let mut connections = Vec::new();
    for _ in 0..8 {
        connections.push(tls_client(&server, &first.ca_cert, None).await.unwrap());
    }
    let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let until = Instant::now() + Duration::from_secs(4);
    let workers: Vec<_> = (0..64)
        .map(|i| {
            let client = connections[i % 8].clone();
            let (done, failed) = (Arc::clone(&done), Arc::clone(&failed));
            tokio::spawn(async move {
                let mut n = 0;
                while Instant::now() < until {
                    n += 1;
                    let result = client
                        .idempotent("rotation", format!("{i}-{n}"))
                        .run(|_| async { Ok::<_, idempotency_client::Failure>(Stored::new("ok")) })
                        .await;
                    match result {
                        Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                        Err(error) => {
                            eprintln!("call failed: {error}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // A broken file first: ignored, the certificate in force stays.
    std::fs::write(&live.cert, b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n").unwrap();
    server.signal("-HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    reaches_the_contract(tls_client(&server, &first.ca_cert, None).await, "rotation")
        .await
        .expect("the old certificate stays");
    // Then the rotation, to a certificate of the second CA, picked up when the files change.
    let next = second.server("next");
    std::fs::copy(&next.key, &live.key).unwrap();
    std::fs::copy(&next.cert, &live.cert).unwrap();
    let mut rotated = false;
    for _ in 0..60 {
        if reaches_the_contract(tls_client(&server, &second.ca_cert, None).await, "rotation").await.is_ok() {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(rotated, "new handshakes use the new certificate");
    for worker in workers {
        worker.await.unwrap();
    }
    let (done, failed) = (done.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("rotation under load: {done} flows, {failed} failed");
    assert!(done > 100, "the load ran: {done}");
    assert_eq!(failed, 0, "no call was lost across the rotation");
    server.signal("-INT");
    assert!(server.child.wait().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_a_mismatched_key_keeps_the_old_certificate_and_a_new_client_ca_applies() {
    let pki = Pki::new("ca");
    let next_ca = Pki::new("next-ca");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, client_ca) = (dir.path().join("cert.pem"), dir.path().join("key.pem"), dir.path().join("ca.pem"));
    let first = pki.server("first");
    std::fs::copy(&first.cert, &cert).unwrap();
    std::fs::copy(&first.key, &key).unwrap();
    std::fs::copy(&pki.ca_cert, &client_ca).unwrap();
    let auth = write_auth_file(
        dir.path(),
        "[[certificate]]\nsubject = \"CN=refunds-api\"\nnamespaces = [\"refunds\"]\nrole = \"write\"\n",
    );
    let flags: Vec<String> = [
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--tls-client-ca",
        client_ca.to_str().unwrap(),
        "--auth-file",
        auth.to_str().unwrap(),
    ]
    .iter()
    .map(|flag| flag.to_string())
    .collect();
    let server = start(dir.path(), &flags);
    let old_client = pki.client("refunds", "refunds-api", &[]);
    let new_client = next_ca.client("refunds-next", "refunds-api", &[]);
    reaches_the_contract(tls_client(&server, &pki.ca_cert, Some(&old_client)).await, "refunds").await.unwrap();

    // A certificate whose key is not the key file's: refused, the old pair stays in force.
    let other = pki.server("other");
    std::fs::copy(&other.cert, &cert).unwrap();
    server.signal("-HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    reaches_the_contract(tls_client(&server, &pki.ca_cert, Some(&old_client)).await, "refunds")
        .await
        .expect("the old certificate still serves new connections");

    // A new client CA: certificates it signed are accepted from then on, the old CA's are not.
    std::fs::copy(&first.cert, &cert).unwrap();
    std::fs::copy(&next_ca.ca_cert, &client_ca).unwrap();
    server.signal("-HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    reaches_the_contract(tls_client(&server, &pki.ca_cert, Some(&new_client)).await, "refunds")
        .await
        .expect("a certificate of the new client CA");
    let old = reaches_the_contract(tls_client(&server, &pki.ca_cert, Some(&old_client)).await, "refunds").await;
    assert!(old.is_err(), "a certificate of the replaced client CA is refused in the handshake");
}
