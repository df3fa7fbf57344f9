//! A FUSE filesystem that forgets, on a simulated power cut, every change that was not made
//! durable, after the model of LazyFS (the filesystem Jepsen uses for the same purpose): tests
//! run a program on a [`LazyFs`] mount, cut the power at any moment with [`LazyFs::power_cut`],
//! and find in the backing directory exactly what the program had made durable.
//!
//! The map, in reading order:
//! - `model`: what is durable and what a cut takes back, on the backing directory, without FUSE.
//! - `filesystem`: the FUSE requests (through the `fuser` crate), each one call into the model.
//! - [`LazyFs`]: mounting in a background session, the power cut, remounting.
//!
//! # The model
//!
//! The mount passes everything through to the backing directory at once (reads see every write),
//! and remembers what a cut must take back:
//! - **File data.** `fsync` and `fdatasync` of a file make its contents and length durable. A
//!   write or a truncation after that stays volatile until the next one: a cut puts back the
//!   bytes it replaced and the length the file had. A new file's durable state is empty.
//! - **Directory entries.** Creating, unlinking or renaming a file and making or removing a
//!   directory stay volatile until the directory that holds the entry is fsynced (`open` of the
//!   directory, then `fsync`). A cut puts each directory back to the entries its last fsync left:
//!   a file created since is gone (even if its data was fsynced), an unlinked one is back (with
//!   its durable contents), a rename is undone. A new directory's durable state is empty, and it
//!   exists after a cut only if its parent was fsynced after it was made.
//! - **A rename between two directories** is atomic under a cut, as on a journaling filesystem:
//!   once either directory is fsynced, the node is durably at its new name and not at its old.
//!   A rename within one directory is durable once that directory is fsynced.
//! - **Nothing else makes anything durable**: not `close`, not `sync_file_range(2)` (which never
//!   reaches a FUSE filesystem: it only starts the kernel's writeback, and this mount has no
//!   dirty pages), not a later fsync of another file.
//!
//! What the model does not cover, by choice:
//! - **No torn or reordered writes.** A cut keeps every fsynced byte and drops every later byte
//!   of the same file, whole: it never keeps half of one `write(2)`, nor a later write without an
//!   earlier unsynced one. Real disks can do both (sectors torn, writes reordered between
//!   fsyncs); this only checks the fsync discipline, not resistance to torn pages.
//! - **Files are independent.** An fsync of one file makes nothing of another durable, as if the
//!   disk wrote each file's pages in its own order; a real filesystem may persist more (ext4
//!   often writes a new file's entry with its first fsync), never less.
//! - **Metadata other than the length**: permissions are applied, and durable, at once; owners
//!   and times cannot be changed through the mount (the backing files' own are reported).
//!   Extended attributes, hard links, symbolic links, special files and `RENAME_EXCHANGE` are
//!   not supported.
//! - **Locks** are the kernel's: `flock` and POSIX locks on the mount are local to this machine,
//!   which is all that sled's lock on its `db` file needs.
//! - **The backing disk itself** is not synced: the cut is simulated, so the backing directory is
//!   the durable state only as long as the machine running the test does not lose power.
//! - **Speed and memory**: requests are served one at a time by one thread; the bytes a write
//!   replaced are kept in memory until the file's next fsync, and unlinked files on the backing
//!   disk until the next cut or unmount.
//!
//! The state between a cut and a remount: the session is unmounted, the backing directory holds
//! the durable state and nothing else (unlinked files are kept in a hidden directory of the
//! backing directory's root until the cut or a clean unmount deletes it).

#![warn(missing_docs, unreachable_pub)]

mod filesystem;
mod model;

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use fuser::{BackgroundSession, MountOption};

use crate::filesystem::LazyFilesystem;
pub use crate::model::CutReport;
use crate::model::Model;

/// Why the filesystem could not be mounted, cut or unmounted.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// This machine cannot mount FUSE filesystems (no `/dev/fuse`).
    #[error("FUSE is unavailable: {0}")]
    Unavailable(String),
    /// The kernel refused the mount (not root, no FUSE module, a bad mountpoint).
    #[error("mounting {mountpoint} failed: {source}")]
    Mount {
        /// Where the filesystem was to be mounted.
        mountpoint: PathBuf,
        /// What the mount reported.
        #[source]
        source: io::Error,
    },
    /// The backing directory could not be read or prepared.
    #[error("the backing directory {backing} is unusable: {source}")]
    Backing {
        /// The backing directory.
        backing: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// Rolling the backing directory back to its durable state failed: it is in an unknown state.
    #[error("the power cut could not restore the durable state: {0}")]
    Cut(#[source] io::Error),
    /// The kernel refused to unmount.
    #[error("unmounting {mountpoint} failed: {source}")]
    Unmount {
        /// The mountpoint.
        mountpoint: PathBuf,
        /// What the unmount reported.
        #[source]
        source: io::Error,
    },
    /// The call needs a mounted filesystem.
    #[error("{0} is not mounted")]
    NotMounted(PathBuf),
    /// The call needs an unmounted filesystem.
    #[error("{0} is already mounted")]
    AlreadyMounted(PathBuf),
}

/// A mounted lazy filesystem: `mountpoint` shows `backing`, and a power cut reduces `backing` to
/// what was made durable. Dropping it unmounts cleanly (what is current stays, as at a clean
/// shutdown).
#[derive(Debug)]
pub struct LazyFs {
    backing: PathBuf,
    mountpoint: PathBuf,
    /// Resolved before mounting: resolving it through a finished mount would fail.
    canonical_mountpoint: PathBuf,
    mounted: Option<Mounted>,
}

#[derive(Debug)]
struct Mounted {
    model: Arc<Mutex<Model>>,
    session: BackgroundSession,
}

/// The device the kernel's FUSE driver is reached through.
const FUSE_DEVICE: &str = "/dev/fuse";

impl LazyFs {
    /// Mounts a lazy view of `backing` (whose contents are taken as durable) on `mountpoint`,
    /// served by a background thread.
    pub fn mount(backing: &Path, mountpoint: &Path) -> Result<LazyFs, Error> {
        let canonical_mountpoint =
            mountpoint.canonicalize().map_err(|source| Error::Mount { mountpoint: mountpoint.to_owned(), source })?;
        let mut lazy = LazyFs {
            backing: backing.to_owned(),
            mountpoint: mountpoint.to_owned(),
            canonical_mountpoint,
            mounted: None,
        };
        lazy.remount()?;
        Ok(lazy)
    }

    /// The directory that holds the durable state (and, while mounted, the volatile one too).
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// Where the filesystem is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Mounts again after [`LazyFs::power_cut`], on what the cut left.
    pub fn remount(&mut self) -> Result<(), Error> {
        if self.mounted.is_some() {
            return Err(Error::AlreadyMounted(self.mountpoint.clone()));
        }
        if !Path::new(FUSE_DEVICE).exists() {
            return Err(Error::Unavailable(format!("{FUSE_DEVICE} does not exist")));
        }
        let backing = |source| Error::Backing { backing: self.backing.clone(), source };
        let model = Arc::new(Mutex::new(Model::new(&self.backing).map_err(backing)?));
        let mut config = fuser::Config::default();
        config.mount_options =
            vec![MountOption::FSName("lazyfs".to_owned()), MountOption::Subtype("lazyfs".to_owned())];
        let filesystem = LazyFilesystem { model: Arc::clone(&model) };
        let session = fuser::spawn_mount(filesystem, &self.mountpoint, &config)
            .map_err(|source| Error::Mount { mountpoint: self.mountpoint.clone(), source })?;
        self.mounted = Some(Mounted { model, session });
        Ok(())
    }

    /// Cuts the power: from this moment every operation on the mount fails with EIO, every
    /// change not made durable is taken back, and the filesystem is unmounted, leaving in the
    /// backing directory exactly the durable state. Kill the programs using the mount first: a
    /// program that still has a file open keeps getting EIO from it, and the mount is then only
    /// detached (it ends when the last such file is closed). [`LazyFs::remount`] mounts again.
    pub fn power_cut(&mut self) -> Result<CutReport, Error> {
        let Some(mounted) = self.mounted.take() else { return Err(Error::NotMounted(self.mountpoint.clone())) };
        let report = mounted.model.lock().expect("no operation on the model panicked").cut().map_err(Error::Cut)?;
        self.detach(mounted.session)?;
        Ok(report)
    }

    /// Unmounts cleanly: what is current stays in the backing directory, as if it had all been
    /// synced.
    pub fn unmount(mut self) -> Result<(), Error> {
        self.unmount_cleanly()
    }

    fn unmount_cleanly(&mut self) -> Result<(), Error> {
        let Some(mounted) = self.mounted.take() else { return Ok(()) };
        let settled = mounted.model.lock().expect("no operation on the model panicked").settle();
        self.detach(mounted.session)?;
        settled.map_err(|source| Error::Backing { backing: self.backing.clone(), source })
    }

    /// Unmounts and waits for the session to end, or, while a file on the mount is still open,
    /// detaches the mount and lets the session end when the file is closed.
    fn detach(&self, session: BackgroundSession) -> Result<(), Error> {
        let failed = |source| Error::Unmount { mountpoint: self.mountpoint.clone(), source };
        let path = CString::new(self.canonical_mountpoint.as_os_str().as_bytes())
            .map_err(|error| failed(io::Error::new(io::ErrorKind::InvalidInput, error)))?;
        // SAFETY: `path` is a NUL-terminated string.
        if unsafe { libc::umount2(path.as_ptr(), 0) } == 0 {
            // The unmount ends the session's connection: its read of /dev/fuse then fails with
            // ENODEV, or with ECONNABORTED when the kernel aborted requests still in flight (a
            // killed process's). Either way the session is over and the mount gone.
            return match session.join() {
                Err(error) if error.raw_os_error() == Some(libc::ECONNABORTED) => Ok(()),
                ended => ended.map_err(failed),
            };
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EBUSY) {
            return Err(failed(error));
        }
        // SAFETY: as above.
        if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(failed(io::Error::last_os_error()));
        }
        // The session's thread answers the open files' last requests (with EIO, the model being
        // finished) and ends when the kernel closes the connection.
        drop(session);
        Ok(())
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        if let Err(error) = self.unmount_cleanly() {
            eprintln!("lazyfs: {error}");
        }
    }
}

/// For tests: mounts, or, where this machine cannot mount FUSE, prints `skipped: <why>` and
/// returns `None`. When the `CI` variable is set, a machine that cannot mount is a failure: CI
/// runs as root on a machine with `/dev/fuse`, and a power-loss test that skipped there would
/// prove nothing.
pub fn mount_or_skip(backing: &Path, mountpoint: &Path) -> Option<LazyFs> {
    match LazyFs::mount(backing, mountpoint) {
        Ok(lazy) => Some(lazy),
        Err(error @ (Error::Unavailable(_) | Error::Mount { .. })) => {
            assert!(std::env::var_os("CI").is_none(), "CI must be able to mount FUSE: {error}");
            eprintln!("skipped: {error}");
            None
        }
        Err(error) => panic!("mounting lazyfs: {error}"),
    }
}

#[cfg(test)]
mod tests;
