//! The supervisor thread: after a failed flush, waits until the disk works again, then reopens
//! the database from disk and accepts changes again.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::database::open_database;
use crate::group_commit::FlushFn;
use crate::store::StoreState;

/// How often a failed store checks whether the disk works again.
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// The probe: 1 MiB written to a scratch file in the data directory and synced, so that a disk
/// with a few free pages does not pass for a working one.
pub(crate) fn space_probe(path: &Path) -> FlushFn {
    let scratch = path.join("space-probe");
    Box::new(move || {
        let result = (|| {
            let mut file = File::create(&scratch)?;
            std::io::Write::write_all(&mut file, &vec![0u8; 1 << 20])?;
            file.sync_all()
        })();
        let _ = std::fs::remove_file(&scratch);
        result
    })
}

/// The supervisor thread: after a failed flush, waits until the disk works again, then reopens
/// the database from disk and accepts changes again. Returns when the store closes.
pub(crate) fn supervise(shared: &StoreState) {
    // Sleeps for `timeout` unless the store is closing; true when it is.
    let stopped = |timeout: Duration| {
        let mut stopping = shared.stopping.lock();
        if !*stopping {
            shared.stop_signal.wait_for(&mut stopping, timeout);
        }
        *stopping
    };
    loop {
        let commit_health = match shared.current.read().as_ref().and_then(|inner| inner.commit.as_ref()) {
            Some(commit) => commit.health(),
            None => return,
        };
        while *commit_health.borrow() {
            if stopped(Duration::from_millis(100)) {
                return;
            }
        }
        shared.healthy.send_replace(false);
        tracing::error!(
            "a write could not be made durable (disk full or failing): refusing changes, serving what is on disk, \
             and checking the disk every second"
        );
        let mut probe = (shared.wrap)(space_probe(&shared.options.path));
        loop {
            if stopped(PROBE_INTERVAL) {
                return;
            }
            if probe().is_ok() {
                break;
            }
        }
        tracing::info!("the disk accepts writes again; reopening the data directory");
        let Some(old) = shared.current.write().take() else { return };
        // Calls in flight on the old database fail at once (its group commit is poisoned); wait
        // until they let go, so that sled releases the directory.
        while Arc::strong_count(&old) > 1 {
            if stopped(Duration::from_millis(10)) {
                *shared.current.write() = Some(old);
                return;
            }
        }
        if let Some(commit) = &old.commit {
            commit.stop();
        }
        drop(old);
        let reopened = loop {
            match open_database(&shared.options, &shared.wrap, &shared.quotas, &shared.flush_stats) {
                Ok(inner) => break inner,
                Err(error) => {
                    // sled's own threads may hold the directory lock a moment after the last handle.
                    tracing::warn!(%error, "reopening the data directory failed; retrying");
                    if stopped(Duration::from_millis(100)) {
                        return;
                    }
                }
            }
        };
        *shared.current.write() = Some(Arc::new(reopened));
        shared.healthy.send_replace(true);
        tracing::info!("the data directory was reopened; accepting changes again");
    }
}
