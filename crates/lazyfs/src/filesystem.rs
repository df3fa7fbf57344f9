//! The FUSE side: each kernel request is one call into the [`Model`](crate::model::Model), under
//! its lock, and its answer or error goes back to the kernel. Nothing here decides what is
//! durable.
//!
//! The kernel caches attributes and names for [`TTL`]: that is safe because nothing but this
//! filesystem changes the backing directory while it is mounted, and a cut ends the mount (the
//! next mount starts with empty caches). Writes are not cached by the kernel (no writeback
//! cache is asked for), so every `write(2)` reaches the model before it returns.

use std::ffi::OsStr;
use std::fs::Metadata;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use crate::model::{Ino, Model};

/// How long the kernel may cache an attribute or a name.
const TTL: Duration = Duration::from_secs(1);

/// The filesystem the FUSE session serves: a handle on the model shared with [`LazyFs`](crate::LazyFs).
pub(crate) struct LazyFilesystem {
    pub(crate) model: Arc<Mutex<Model>>,
}

fn ino(number: INodeNo) -> Ino {
    number.0
}

fn error(error: io::Error) -> Errno {
    Errno::from_i32(error.raw_os_error().unwrap_or(libc::EIO))
}

fn time(seconds: i64, nanos: i64) -> SystemTime {
    let since_epoch = Duration::new(seconds.unsigned_abs(), nanos.clamp(0, 999_999_999) as u32);
    if seconds >= 0 { UNIX_EPOCH + since_epoch } else { UNIX_EPOCH - since_epoch }
}

/// The attributes the kernel sees: the backing file's, under the mount's inode number.
fn attributes(number: Ino, metadata: &Metadata) -> FileAttr {
    FileAttr {
        ino: INodeNo(number),
        size: metadata.size(),
        blocks: metadata.blocks(),
        atime: time(metadata.atime(), metadata.atime_nsec()),
        mtime: time(metadata.mtime(), metadata.mtime_nsec()),
        ctime: time(metadata.ctime(), metadata.ctime_nsec()),
        crtime: time(metadata.ctime(), metadata.ctime_nsec()),
        kind: FileType::from_std(metadata.file_type()).unwrap_or(FileType::RegularFile),
        perm: (metadata.mode() & 0o7777) as u16,
        nlink: metadata.nlink() as u32,
        uid: metadata.uid(),
        gid: metadata.gid(),
        rdev: metadata.rdev() as u32,
        blksize: metadata.blksize() as u32,
        flags: 0,
    }
}

impl LazyFilesystem {
    fn model(&self) -> MutexGuard<'_, Model> {
        // A panic while the model was locked leaves it unknowable; serving it would hide that.
        self.model.lock().expect("no operation on the model panicked")
    }

    fn entry(&self, model: &mut Model, parent: INodeNo, name: &OsStr) -> io::Result<FileAttr> {
        let number = model.child(ino(parent), name)?;
        Ok(attributes(number, &model.metadata(number, None)?))
    }
}

impl Filesystem for LazyFilesystem {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut model = self.model();
        match self.entry(&mut model, parent, name) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(error(e)),
        }
    }

    fn getattr(&self, _req: &Request, number: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.model().metadata(ino(number), fh.map(|fh| fh.0)) {
            Ok(metadata) => reply.attr(&TTL, &attributes(ino(number), &metadata)),
            Err(e) => reply.error(error(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        number: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut model = self.model();
        let changed = (|| {
            if let Some(size) = size {
                model.set_len(ino(number), fh.map(|fh| fh.0), size)?;
            }
            if let Some(mode) = mode {
                model.set_mode(ino(number), mode)?;
            }
            model.metadata(ino(number), fh.map(|fh| fh.0))
        })();
        match changed {
            Ok(metadata) => reply.attr(&TTL, &attributes(ino(number), &metadata)),
            Err(e) => reply.error(error(e)),
        }
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let mut model = self.model();
        let made = model.mkdir(ino(parent), name, mode & !umask).and_then(|number| {
            let metadata = model.metadata(number, None)?;
            Ok(attributes(number, &metadata))
        });
        match made {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(error(e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.model().remove(ino(parent), name, false) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(error(e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.model().remove(ino(parent), name, true) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(error(e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        new_parent: INodeNo,
        new_name: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            reply.error(Errno::EINVAL);
            return;
        }
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        match self.model().rename(ino(parent), name, ino(new_parent), new_name, no_replace) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(error(e)),
        }
    }

    fn open(&self, _req: &Request, number: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.model().open(ino(number), flags.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(error(e)),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut model = self.model();
        let created = model.create(ino(parent), name, mode & !umask & 0o7777, flags).and_then(|(number, fh)| {
            let metadata = model.metadata(number, Some(fh))?;
            Ok((attributes(number, &metadata), fh))
        });
        match created {
            Ok((attr, fh)) => reply.created(&TTL, &attr, Generation(0), FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(error(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _number: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.model().read(fh.0, offset, size as usize) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(error(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _number: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.model().write(fh.0, offset, data) {
            Ok(written) => reply.written(written as u32),
            Err(e) => reply.error(error(e)),
        }
    }

    fn flush(&self, _req: &Request, _number: INodeNo, _fh: FileHandle, _owner: LockOwner, reply: ReplyEmpty) {
        // close(2) makes nothing durable.
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _number: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.model().close(fh.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, number: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        // fsync and fdatasync alike make the contents and the length durable; neither makes
        // the file's name durable (that takes an fsync of its directory).
        match self.model().sync_file(ino(number)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(error(e)),
        }
    }

    fn fsyncdir(&self, _req: &Request, number: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match self.model().sync_directory(ino(number)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(error(e)),
        }
    }

    fn readdir(&self, _req: &Request, number: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let mut model = self.model();
        let listed = match model.list(ino(number)) {
            Ok(listed) => listed,
            Err(e) => return reply.error(error(e)),
        };
        let dots = [
            (OsStr::from_bytes(b".").to_owned(), ino(number), FileType::Directory),
            (OsStr::from_bytes(b"..").to_owned(), model.parent(ino(number)), FileType::Directory),
        ];
        drop(model);
        let entries = dots.into_iter().chain(listed.into_iter().map(|(name, entry, metadata)| {
            (name, entry, FileType::from_std(metadata.file_type()).unwrap_or(FileType::RegularFile))
        }));
        for (index, (name, entry, kind)) in entries.enumerate().skip(offset as usize) {
            if reply.add(INodeNo(entry), index as u64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _number: INodeNo, reply: ReplyStatfs) {
        let stats = self.model().statfs();
        match stats {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(error(e)),
        }
    }
}
