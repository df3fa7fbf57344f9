//! The durable flush: sled's own flush writes its log with `sync_file_range`, which survives a
//! process crash but not a power loss (it does not flush the disk's cache or file metadata), and
//! it writes large pages ("blobs") to separate files without syncing them. So after each flush
//! this also fdatasyncs the log file, fsyncs blob files created since the last flush, and the
//! directories that list them.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::Path;

use crate::group_commit::FlushFn;

pub(crate) fn durable_flush(db: sled::Db, path: &Path) -> std::io::Result<FlushFn> {
    let log = File::open(path.join("db"))?;
    File::open(path)?.sync_all()?;
    let blobs_dir = path.join("blobs");
    let mut synced_blobs: HashSet<OsString> = HashSet::new();
    Ok(Box::new(move || {
        db.flush().map_err(std::io::Error::other)?;
        log.sync_data()?;
        // Blob files are rare (values over a quarter of a segment) and their directory small, so
        // it is listed on every flush; a modification time would be too coarse to rely on.
        let mut present = HashSet::with_capacity(synced_blobs.len());
        let mut created = false;
        let entries = match std::fs::read_dir(&blobs_dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(error) => return Err(error),
        };
        for entry in entries {
            let name = entry?.file_name();
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
            present.insert(name);
        }
        if created {
            File::open(&blobs_dir)?.sync_all()?;
        }
        synced_blobs = present;
        Ok(())
    }))
}
