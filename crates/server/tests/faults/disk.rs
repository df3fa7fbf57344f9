//! A disk that fills up under the binary.

use super::*;

/// A tmpfs mounted for one test, unmounted on drop.
pub(crate) struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// Mounts a tmpfs of `megabytes`, or says why it cannot (not root, no permission).
    fn mount(megabytes: u32) -> Result<SmallDisk, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let output = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).trim().to_owned());
        }
        Ok(SmallDisk { dir })
    }

    fn resize(&self, megabytes: u32) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={megabytes}m")])
            .arg(self.dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "remounting the tmpfs");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.dir.path()).status();
    }
}

pub(crate) async fn wait_for_health(addr: &str, wanted: tonic_health::pb::health_check_response::ServingStatus) {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
    let deadline = Instant::now() + Duration::from_secs(30);
    while health_of(channel.clone()).await != wanted as i32 {
        assert!(Instant::now() < deadline, "health never turned {wanted:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_changes_keeps_what_was_acknowledged_and_recovers_when_space_returns() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let disk = match SmallDisk::mount(16) {
        Ok(disk) => disk,
        Err(why) => {
            assert!(std::env::var_os("CI").is_none(), "CI runs as root and can mount a tmpfs: {why}");
            eprintln!("skipped: a full disk is simulated with a small tmpfs, which needs root ({why})");
            return;
        }
    };
    let server = ChildServer::start(&disk.dir.path().join("data"));
    let mut client = server.client().await;

    // Fill the disk with 8 KiB responses until changes are refused.
    let body = |key: &str| format!("{key}:").into_bytes().into_iter().cycle().take(8 * 1024).collect::<Vec<u8>>();
    let mut acknowledged = Vec::new();
    let refused = loop {
        let key = format!("fill-{}", acknowledged.len());
        let grant = match client.claim(claim_request(&key, b"fp")).await {
            Ok(reply) => acquired(reply.into_inner()),
            Err(status) => break status,
        };
        match client.complete(complete_request(&key, &grant.lease_token, &body(&key))).await {
            Ok(_) => acknowledged.push(key),
            Err(status) => break status,
        }
        assert!(acknowledged.len() < 100_000, "a 16 MiB disk never filled up");
    };
    assert_status(&refused, tonic::Code::Unavailable, "STORE_UNAVAILABLE");
    wait_for_health(&server.addr, ServingStatus::NotServing).await;
    assert!(acknowledged.len() > 100, "only {} flows fit", acknowledged.len());
    // While full: acknowledged responses are still served, changes are refused.
    let replay = completed(client.claim(claim_request(&acknowledged[0], b"fp")).await.unwrap().into_inner());
    assert_eq!(replay.response.unwrap().body, body(&acknowledged[0]));
    let status = client.claim(claim_request("while-full", b"fp")).await.unwrap_err();
    assert_status(&status, tonic::Code::Unavailable, "STORE_UNAVAILABLE");

    // Space returns: the server resumes by itself and has lost nothing it acknowledged.
    disk.resize(64);
    wait_for_health(&server.addr, ServingStatus::Serving).await;
    for key in &acknowledged {
        let replay = completed(client.claim(claim_request(key, b"fp")).await.unwrap().into_inner());
        assert_eq!(replay.response.unwrap().body, body(key), "{key}");
    }
    let fresh = claim_acquired(&mut client, "after-space-returned").await;
    client.complete(complete_request("after-space-returned", &fresh.lease_token, b"ok")).await.unwrap();
    eprintln!("full disk: {} flows acknowledged before it filled, all replayed after", acknowledged.len());
    drop(server);
}
