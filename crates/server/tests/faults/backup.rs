//! Backups of a running server: an export taken through the Admin API while clients claim,
//! complete, renew and release restores to a store that passes the history checks, and a purge
//! survives kill -9.

use super::*;

/// Runs `binary()` with `args` to its end; panics with its output when it fails.
fn run_binary(args: &[&std::ffi::OsStr]) {
    let output = std::process::Command::new(binary()).args(args).output().unwrap();
    assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_under_load_restores_to_a_store_that_passes_the_history_checks() {
    let dir = tempfile::tempdir().unwrap();
    let source = ChildServer::start(&dir.path().join("source"));
    let history = Arc::new(History::default());
    let start = Instant::now();
    let until = start + Duration::from_secs(3);
    let mut clients = Vec::new();
    for seed in 0..16u64 {
        let recorders = recorders(std::slice::from_ref(&source), &history).await;
        clients.push(tokio::spawn(workload_client(recorders, seed + 5_000, 12, start, until)));
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // The export, through the Admin API, while the clients go on.
    let snapshot = dir.path().join("online.snapshot");
    let export_began = Instant::now();
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", source.addr)).unwrap().connect().await.unwrap();
    let mut admin = pb::admin_client::AdminClient::new(channel);
    let mut stream = admin.export(pb::ExportRequest::default()).await.unwrap().into_inner();
    let mut bytes = Vec::new();
    while let Some(message) = stream.message().await.unwrap() {
        bytes.extend_from_slice(&message.chunk);
    }
    std::fs::write(&snapshot, &bytes).unwrap();
    for client in clients {
        client.await.unwrap();
    }
    drop(source);

    let restored_dir = dir.path().join("restored");
    run_binary(&[
        "restore".as_ref(),
        "--data-dir".as_ref(),
        restored_dir.as_os_str(),
        "--input".as_ref(),
        snapshot.as_os_str(),
    ]);
    let restored = ChildServer::start(&restored_dir);
    // What the restored store must show: every change acknowledged before the export began; any
    // call that overlapped the export or came after it may or may not be in it.
    let mut events: Vec<Event> = history
        .events()
        .into_iter()
        .map(|mut event| {
            if event.returned >= export_began {
                event.outcome = Outcome::Unknown;
            }
            event
        })
        .collect();
    let before = events.iter().filter(|event| event.outcome != Outcome::Unknown).count();
    assert!(before > 100, "only {before} calls before the export");
    let mut keys: Vec<String> = events.iter().map(|event| event.key.clone()).collect();
    keys.sort();
    keys.dedup();
    // The restored server, read and then written: every key looked up, claimed (a takeover or a
    // fresh grant must carry a higher fencing token than any before), looked up again.
    let after = Arc::new(History::default());
    let mut recorder = Recorder { client: lazy_client(&restored.addr).await, history: Arc::clone(&after) };
    for key in &keys {
        recorder.lookup(key).await;
        recorder.claim(key, 1_000, None).await;
        recorder.lookup(key).await;
    }
    events.extend(after.events());
    let unknown = events.iter().filter(|event| event.outcome == Outcome::Unknown).count();
    eprintln!(
        "online export: {} bytes, {} keys, {} calls ({unknown} indeterminate)",
        bytes.len(),
        keys.len(),
        events.len()
    );
    assert_clean(&events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = ChildServer::start(&data);
    let mut client = server.client().await;
    let mut highest = 0;
    for n in 0..40 {
        let key = format!("order-{n}");
        let grant = claim_acquired(&mut client, &key).await;
        highest = highest.max(grant.fencing_token);
        if n % 2 == 0 {
            client.complete(complete_request(&key, &grant.lease_token, b"paid")).await.unwrap();
        }
    }
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr)).unwrap().connect().await.unwrap();
    let mut admin = pb::admin_client::AdminClient::new(channel);
    for n in 0..10 {
        let purge = pb::PurgeRequest { namespace: "payments".into(), key: format!("order-{n}") };
        assert_eq!(admin.purge(purge).await.unwrap().into_inner().deleted, 1);
    }
    server.signal("-KILL");
    drop(server);
    let server = ChildServer::start(&data);
    let mut client = server.client().await;
    for n in 0..40 {
        let found = client.lookup(lookup_request(&format!("order-{n}"))).await;
        assert_eq!(found.is_ok(), n >= 10, "order-{n} after kill -9: {found:?}");
    }
    let again = claim_acquired(&mut client, "order-0").await;
    assert!(again.fencing_token > highest, "fencing went back after a purge");
    let admin_channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", server.addr)).unwrap().connect().await.unwrap();
    let stats = pb::admin_client::AdminClient::new(admin_channel)
        .stats(pb::StatsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.records, 31, "the 30 kept and the new grant");
}
