//! The durable flush: sled's own flush writes its log with `sync_file_range`, which survives a
//! process crash but not a power loss (it does not flush the disk's cache or file metadata), and
//! it writes large pages ("blobs") to separate files without syncing them. So each flush also
//! fsyncs the blob files it covers and their directory, then fdatasyncs the log file.
//!
//! Which blobs a flush covers: those that exist *before* it starts. sled reserves a page's place
//! in its log before it writes the page's blob, so every blob present then belongs to a write
//! that `flush` waits for, and is complete when `flush` returns. A blob listed *after* the flush
//! may still be being written for a later batch: syncing it then would make a torn blob durable
//! and mark it done (the power-cut test found exactly that: a 498,468-byte blob with 4 durable
//! bytes). It is synced by the flush of its own batch. Blobs are synced before the log, so a
//! durable log never points at a blob that is not.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::Path;

use crate::group_commit::FlushFn;

/// The names in `dir` (none when it does not exist yet).
fn listing(dir: &Path) -> std::io::Result<HashSet<OsString>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(HashSet::new()),
        Err(error) => return Err(error),
    };
    entries.map(|entry| entry.map(|entry| entry.file_name())).collect()
}

pub(crate) fn durable_flush(db: sled::Db, path: &Path) -> std::io::Result<FlushFn> {
    let log = File::open(path.join("db"))?;
    // The data directory and its entry in its parent: a store created a moment before a power
    // loss must not vanish with its directory entry.
    File::open(path)?.sync_all()?;
    if let Some(parent) = path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
        File::open(parent)?.sync_all()?;
    }
    let blobs_dir = path.join("blobs");
    let mut synced_blobs: HashSet<OsString> = HashSet::new();
    Ok(Box::new(move || {
        // Blob files are rare (pages over a quarter of a segment) and their directory small, so
        // it is listed on every flush; a modification time would be too coarse to rely on.
        let covered = listing(&blobs_dir)?;
        db.flush().map_err(std::io::Error::other)?;
        let mut synced = HashSet::with_capacity(covered.len());
        let mut created = false;
        for name in covered {
            if !synced_blobs.contains(&name) {
                // sled deletes a blob as soon as no page refers to it any more, which can happen
                // between the listing and this open (pages of large values are rewritten often
                // under load). A blob that is gone holds nothing that any acknowledged state
                // needs, so there is nothing to sync; it is not an I/O failure.
                match File::open(blobs_dir.join(&name)) {
                    Ok(file) => match file.sync_all() {
                        Ok(()) => {}
                        Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(error) => return Err(error),
                    },
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(error) => return Err(error),
                }
                created = true;
            }
            synced.insert(name);
        }
        if created {
            File::open(&blobs_dir)?.sync_all()?;
        }
        log.sync_data()?;
        synced_blobs = synced;
        Ok(())
    }))
}
