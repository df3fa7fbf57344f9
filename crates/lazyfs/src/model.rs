//! The durability model, on a backing directory and without FUSE: what is current (what reads
//! see), what is durable (what a power cut leaves), and the cut itself.
//!
//! Every change is applied to the backing directory at once, so reads simply pass through. What
//! a power cut must take back is recorded beside it:
//! - per file, an undo log since its last fsync: its length then and, for every write or
//!   truncation that reached below that length, the bytes it replaced. A write entirely past the
//!   durable length needs no bytes: the cut truncates it away. A new file's durable length is 0.
//! - per directory, the entries it had at its last fsync (name → node), taken before the first
//!   change after that fsync. A new directory's durable entries are none.
//! - files and directories that were unlinked, or replaced by a rename, are not deleted but moved
//!   into a graveyard directory inside the backing directory (hidden from the mount), so that a
//!   cut can put them back, with their contents rolled back like any other file.
//!
//! Invariants:
//! - Nodes are identified by their inode number in the mount, never reused within a mount, and
//!   each node's place (parent and name, or the graveyard) is kept up to date by every
//!   operation: only this model changes the backing directory while it is mounted.
//! - The current entries of a directory with a durable snapshot are all known (the snapshot
//!   listed them), so a cut can empty it exactly.
//! - A rename between two directories is atomic under a cut, as a journaling filesystem makes
//!   it: once either directory is fsynced, the name's move is durable in both.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::{File, Metadata, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The directory in the backing directory's root that keeps unlinked nodes until a cut or an
/// unmount. It is invisible through the mount and cannot be created there.
pub(crate) const GRAVEYARD: &str = ".lazyfs-graveyard";

/// The mount's inode number of the root directory.
pub(crate) const ROOT: u64 = 1;

/// A node's number in the mount (the FUSE inode number).
pub(crate) type Ino = u64;

/// What a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    File,
    Directory,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Place {
    Root,
    Live { parent: Ino, name: OsString },
    Graveyard,
}

/// What a cut must restore in one file: its length at its last fsync, and the bytes that each
/// later write or truncation replaced below that length, in the order they were replaced.
#[derive(Debug)]
struct Undo {
    durable_len: u64,
    replaced: Vec<(u64, Vec<u8>)>,
}

#[derive(Debug)]
struct Node {
    kind: Kind,
    place: Place,
    /// Files: `None` while the file is as its last fsync left it.
    undo: Option<Undo>,
    /// Directories: `None` while the directory is as its last fsync left it.
    durable_entries: Option<BTreeMap<OsString, Ino>>,
}

/// An open file of the mount.
#[derive(Debug)]
struct Handle {
    ino: Ino,
    file: File,
}

/// What a power cut took back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Files whose unsynced writes or truncations were undone.
    pub files_rolled_back: usize,
    /// Directories whose entries were put back as their last fsync left them.
    pub directories_rolled_back: usize,
    /// Directory entries removed (created, or renamed in, since the last fsync).
    pub entries_removed: usize,
    /// Directory entries put back (unlinked, or renamed away, since the last fsync).
    pub entries_restored: usize,
}

/// The model of one mount's lifetime, from mounting to a cut or an unmount.
#[derive(Debug)]
pub(crate) struct Model {
    backing: PathBuf,
    nodes: HashMap<Ino, Node>,
    /// The known current entries of each directory (all of them for a directory with durable
    /// entries; those looked up so far otherwise).
    entries: HashMap<Ino, BTreeMap<OsString, Ino>>,
    next_ino: Ino,
    handles: HashMap<u64, Handle>,
    next_handle: u64,
    /// Set by a cut or an unmount: every later operation fails with EIO.
    finished: bool,
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

fn is_graveyard(parent: Ino, name: &OsStr) -> bool {
    parent == ROOT && name == GRAVEYARD
}

impl Model {
    /// Starts a model on `backing`, whose contents are taken as durable. A graveyard left by an
    /// earlier mount that was never cut nor unmounted is deleted.
    pub(crate) fn new(backing: &Path) -> io::Result<Model> {
        let backing = backing.canonicalize()?;
        let graveyard = backing.join(GRAVEYARD);
        match std::fs::remove_dir_all(&graveyard) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
            _ => {}
        }
        std::fs::create_dir(&graveyard)?;
        let root = Node { kind: Kind::Directory, place: Place::Root, undo: None, durable_entries: None };
        Ok(Model {
            backing,
            nodes: HashMap::from([(ROOT, root)]),
            entries: HashMap::new(),
            next_ino: ROOT + 1,
            handles: HashMap::new(),
            next_handle: 1,
            finished: false,
        })
    }

    fn live(&self) -> io::Result<()> {
        if self.finished { Err(errno(libc::EIO)) } else { Ok(()) }
    }

    fn node(&self, ino: Ino) -> io::Result<&Node> {
        self.nodes.get(&ino).ok_or_else(|| errno(libc::ENOENT))
    }

    fn node_mut(&mut self, ino: Ino) -> io::Result<&mut Node> {
        self.nodes.get_mut(&ino).ok_or_else(|| errno(libc::ENOENT))
    }

    fn graveyard_path(&self, ino: Ino) -> PathBuf {
        self.backing.join(GRAVEYARD).join(ino.to_string())
    }

    /// Where a node is in the backing directory now.
    fn path(&self, ino: Ino) -> io::Result<PathBuf> {
        match &self.node(ino)?.place {
            Place::Root => Ok(self.backing.clone()),
            Place::Live { parent, name } => Ok(self.path(*parent)?.join(name)),
            Place::Graveyard => Ok(self.graveyard_path(ino)),
        }
    }

    fn add_node(&mut self, kind: Kind, place: Place) -> Ino {
        let ino = self.next_ino;
        self.next_ino += 1;
        if let Place::Live { parent, name } = &place {
            self.entries.entry(*parent).or_default().insert(name.clone(), ino);
        }
        let (undo, durable_entries) = (None, None);
        self.nodes.insert(ino, Node { kind, place, undo, durable_entries });
        ino
    }

    /// The node named `name` in `parent`, found in the backing directory if it is not known yet.
    pub(crate) fn child(&mut self, parent: Ino, name: &OsStr) -> io::Result<Ino> {
        self.live()?;
        if is_graveyard(parent, name) {
            return Err(errno(libc::ENOENT));
        }
        if let Some(ino) = self.entries.get(&parent).and_then(|entries| entries.get(name)) {
            return Ok(*ino);
        }
        if self.node(parent)?.kind != Kind::Directory {
            return Err(errno(libc::ENOTDIR));
        }
        let metadata = std::fs::symlink_metadata(self.path(parent)?.join(name))?;
        let kind = if metadata.is_dir() { Kind::Directory } else { Kind::File };
        Ok(self.add_node(kind, Place::Live { parent, name: name.to_owned() }))
    }

    /// A node's attributes, through its open handle when one is given.
    pub(crate) fn metadata(&self, ino: Ino, handle: Option<u64>) -> io::Result<Metadata> {
        self.live()?;
        if let Some(handle) = handle.and_then(|fh| self.handles.get(&fh)) {
            return handle.file.metadata();
        }
        std::fs::symlink_metadata(self.path(ino)?)
    }

    /// The entries of a directory, by name.
    pub(crate) fn list(&mut self, dir: Ino) -> io::Result<Vec<(OsString, Ino, Metadata)>> {
        self.live()?;
        let mut names = Vec::new();
        for entry in std::fs::read_dir(self.path(dir)?)? {
            let name = entry?.file_name();
            if !is_graveyard(dir, &name) {
                names.push(name);
            }
        }
        names.sort();
        let mut listed = Vec::with_capacity(names.len());
        for name in names {
            let ino = self.child(dir, &name)?;
            listed.push((name, ino, std::fs::symlink_metadata(self.path(ino)?)?));
        }
        Ok(listed)
    }

    /// Remembers a directory's entries as durable before its first change since its last fsync.
    fn before_changing(&mut self, dir: Ino) -> io::Result<()> {
        if self.node(dir)?.kind != Kind::Directory {
            return Err(errno(libc::ENOTDIR));
        }
        if self.node(dir)?.durable_entries.is_some() {
            return Ok(());
        }
        let listed = self.list(dir)?;
        let entries: BTreeMap<OsString, Ino> = listed.into_iter().map(|(name, ino, _)| (name, ino)).collect();
        self.node_mut(dir)?.durable_entries = Some(entries);
        Ok(())
    }

    fn open_handle(&mut self, ino: Ino, file: File) -> u64 {
        let fh = self.next_handle;
        self.next_handle += 1;
        self.handles.insert(fh, Handle { ino, file });
        fh
    }

    /// Opens a file; `O_TRUNC` truncates it (undoably). The backing file is always opened for
    /// reading too, to save the bytes a write replaces.
    pub(crate) fn open(&mut self, ino: Ino, flags: i32) -> io::Result<u64> {
        self.live()?;
        if self.node(ino)?.kind != Kind::File {
            return Err(errno(libc::EISDIR));
        }
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let file = OpenOptions::new().read(true).write(writable).open(self.path(ino)?)?;
        if writable && flags & libc::O_TRUNC != 0 {
            self.set_len_of(ino, &file, 0)?;
        }
        Ok(self.open_handle(ino, file))
    }

    /// Creates and opens a file, or opens the one that exists unless `O_EXCL` is given.
    pub(crate) fn create(&mut self, parent: Ino, name: &OsStr, mode: u32, flags: i32) -> io::Result<(Ino, u64)> {
        self.live()?;
        if is_graveyard(parent, name) {
            return Err(errno(libc::EACCES));
        }
        match self.child(parent, name) {
            Ok(_) if flags & libc::O_EXCL != 0 => return Err(errno(libc::EEXIST)),
            Ok(ino) => return Ok((ino, self.open(ino, flags)?)),
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        self.before_changing(parent)?;
        let path = self.path(parent)?.join(name);
        let file = OpenOptions::new().read(true).write(true).create_new(true).mode(mode).open(path)?;
        let ino = self.add_node(Kind::File, Place::Live { parent, name: name.to_owned() });
        self.node_mut(ino)?.undo = Some(Undo { durable_len: 0, replaced: Vec::new() });
        Ok((ino, self.open_handle(ino, file)))
    }

    /// Creates a directory.
    pub(crate) fn mkdir(&mut self, parent: Ino, name: &OsStr, mode: u32) -> io::Result<Ino> {
        self.live()?;
        if is_graveyard(parent, name) {
            return Err(errno(libc::EACCES));
        }
        self.before_changing(parent)?;
        std::fs::DirBuilder::new().mode(mode).create(self.path(parent)?.join(name))?;
        let ino = self.add_node(Kind::Directory, Place::Live { parent, name: name.to_owned() });
        self.node_mut(ino)?.durable_entries = Some(BTreeMap::new());
        self.entries.insert(ino, BTreeMap::new());
        Ok(ino)
    }

    pub(crate) fn close(&mut self, fh: u64) {
        self.handles.remove(&fh);
    }

    pub(crate) fn read(&self, fh: u64, offset: u64, size: usize) -> io::Result<Vec<u8>> {
        self.live()?;
        let handle = self.handles.get(&fh).ok_or_else(|| errno(libc::EBADF))?;
        read_up_to(&handle.file, offset, size)
    }

    /// Writes at `offset`, after saving what it replaces below the durable length.
    pub(crate) fn write(&mut self, fh: u64, offset: u64, data: &[u8]) -> io::Result<usize> {
        self.live()?;
        let handle = self.handles.get(&fh).ok_or_else(|| errno(libc::EBADF))?;
        let (ino, file) = (handle.ino, handle.file.try_clone()?);
        let current_len = file.metadata()?.len();
        let undo = self.undo_of(ino, current_len)?;
        let end = offset.saturating_add(data.len() as u64).min(undo.durable_len);
        if offset < end {
            let replaced = read_up_to(&file, offset, (end - offset) as usize)?;
            undo.replaced.push((offset, replaced));
        }
        file.write_all_at(data, offset)?;
        Ok(data.len())
    }

    fn undo_of(&mut self, ino: Ino, current_len: u64) -> io::Result<&mut Undo> {
        Ok(self.node_mut(ino)?.undo.get_or_insert_with(|| Undo { durable_len: current_len, replaced: Vec::new() }))
    }

    /// Sets a file's length (through its handle when one is given), undoably.
    pub(crate) fn set_len(&mut self, ino: Ino, handle: Option<u64>, len: u64) -> io::Result<()> {
        self.live()?;
        let file = match handle.and_then(|fh| self.handles.get(&fh)) {
            Some(handle) if handle.ino == ino => handle.file.try_clone()?,
            _ => OpenOptions::new().read(true).write(true).open(self.path(ino)?)?,
        };
        self.set_len_of(ino, &file, len)
    }

    fn set_len_of(&mut self, ino: Ino, file: &File, len: u64) -> io::Result<()> {
        let current_len = file.metadata()?.len();
        let undo = self.undo_of(ino, current_len)?;
        let end = current_len.min(undo.durable_len);
        if len < end {
            let replaced = read_up_to(file, len, (end - len) as usize)?;
            undo.replaced.push((len, replaced));
        }
        file.set_len(len)
    }

    /// Sets a node's permission bits (not modelled: durable at once).
    pub(crate) fn set_mode(&mut self, ino: Ino, mode: u32) -> io::Result<()> {
        self.live()?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(self.path(ino)?, std::fs::Permissions::from_mode(mode & 0o7777))
    }

    /// fsync or fdatasync of a file: its contents and length are durable now.
    pub(crate) fn sync_file(&mut self, ino: Ino) -> io::Result<()> {
        self.live()?;
        self.node_mut(ino)?.undo = None;
        Ok(())
    }

    /// fsync of a directory: its entries are durable now, and so is the other side of every
    /// rename that moved a node into or out of it.
    pub(crate) fn sync_directory(&mut self, dir: Ino) -> io::Result<()> {
        self.live()?;
        let Some(durable) = self.node_mut(dir)?.durable_entries.take() else { return Ok(()) };
        let current = self.entries.get(&dir).cloned().unwrap_or_default();
        let was_here: BTreeSet<Ino> = durable.values().copied().collect();
        let is_here: BTreeSet<Ino> = current.values().copied().collect();
        // Moved out: the name it has now in another directory is durable too.
        for ino in was_here.difference(&is_here) {
            if let Place::Live { parent, name } = self.node(*ino)?.place.clone()
                && parent != dir
                && let Some(entries) = &mut self.node_mut(parent)?.durable_entries
            {
                entries.insert(name, *ino);
            }
        }
        // Moved in: its old name in another directory is durably gone.
        for ino in is_here.difference(&was_here) {
            for (other, node) in self.nodes.iter_mut() {
                if *other != dir
                    && let Some(entries) = &mut node.durable_entries
                {
                    entries.retain(|_, entry| entry != ino);
                }
            }
        }
        Ok(())
    }

    /// Moves a node into the graveyard, out of its directory's entries.
    fn bury(&mut self, ino: Ino) -> io::Result<()> {
        std::fs::rename(self.path(ino)?, self.graveyard_path(ino))?;
        let node = self.node_mut(ino)?;
        if let Place::Live { parent, name } = std::mem::replace(&mut node.place, Place::Graveyard)
            && let Some(entries) = self.entries.get_mut(&parent)
        {
            entries.remove(&name);
        }
        Ok(())
    }

    /// Moves a node from wherever it is to `name` in `parent` (whose entry must be free).
    fn place(&mut self, ino: Ino, parent: Ino, name: &OsStr) -> io::Result<()> {
        std::fs::rename(self.path(ino)?, self.path(parent)?.join(name))?;
        let node = self.node_mut(ino)?;
        let previous = std::mem::replace(&mut node.place, Place::Live { parent, name: name.to_owned() });
        if let Place::Live { parent, name } = previous
            && let Some(entries) = self.entries.get_mut(&parent)
        {
            entries.remove(&name);
        }
        self.entries.entry(parent).or_default().insert(name.to_owned(), ino);
        Ok(())
    }

    /// unlink (`directory` false) or rmdir (`directory` true).
    pub(crate) fn remove(&mut self, parent: Ino, name: &OsStr, directory: bool) -> io::Result<()> {
        self.live()?;
        let ino = self.child(parent, name)?;
        match (self.node(ino)?.kind, directory) {
            (Kind::Directory, false) => return Err(errno(libc::EISDIR)),
            (Kind::File, true) => return Err(errno(libc::ENOTDIR)),
            (Kind::Directory, true) if std::fs::read_dir(self.path(ino)?)?.next().is_some() => {
                return Err(errno(libc::ENOTEMPTY));
            }
            _ => {}
        }
        self.before_changing(parent)?;
        self.bury(ino)
    }

    /// rename, with `RENAME_NOREPLACE` honoured (`RENAME_EXCHANGE` is not supported).
    pub(crate) fn rename(
        &mut self,
        parent: Ino,
        name: &OsStr,
        new_parent: Ino,
        new_name: &OsStr,
        no_replace: bool,
    ) -> io::Result<()> {
        self.live()?;
        if is_graveyard(new_parent, new_name) {
            return Err(errno(libc::EACCES));
        }
        let ino = self.child(parent, name)?;
        if (parent, name) == (new_parent, new_name) {
            return Ok(());
        }
        // A directory cannot move into itself or below itself.
        let mut ancestor = Some(new_parent);
        while let Some(at) = ancestor {
            if at == ino {
                return Err(errno(libc::EINVAL));
            }
            ancestor = match &self.node(at)?.place {
                Place::Live { parent, .. } => Some(*parent),
                Place::Root | Place::Graveyard => None,
            };
        }
        let replaced = match self.child(new_parent, new_name) {
            Ok(target) => Some(target),
            Err(error) if error.kind() == io::ErrorKind::NotFound => None,
            Err(error) => return Err(error),
        };
        if let Some(target) = replaced {
            if no_replace {
                return Err(errno(libc::EEXIST));
            }
            match (self.node(ino)?.kind, self.node(target)?.kind) {
                (Kind::Directory, Kind::File) => return Err(errno(libc::ENOTDIR)),
                (Kind::File, Kind::Directory) => return Err(errno(libc::EISDIR)),
                (Kind::Directory, Kind::Directory) if std::fs::read_dir(self.path(target)?)?.next().is_some() => {
                    return Err(errno(libc::ENOTEMPTY));
                }
                _ => {}
            }
        }
        self.before_changing(parent)?;
        self.before_changing(new_parent)?;
        if let Some(target) = replaced {
            self.bury(target)?;
        }
        if let Err(error) = self.place(ino, new_parent, new_name) {
            if let Some(target) = replaced {
                self.place(target, new_parent, new_name)?;
            }
            return Err(error);
        }
        Ok(())
    }

    /// The power cut: every later operation fails, each file is rolled back to what its last
    /// fsync made durable, each directory to the entries its last fsync made durable, and the
    /// graveyard is deleted. The backing directory is then exactly the durable state.
    pub(crate) fn cut(&mut self) -> io::Result<CutReport> {
        self.finished = true;
        self.handles.clear();
        let mut report = CutReport::default();
        let mut files: Vec<Ino> =
            self.nodes.iter().filter(|(_, node)| node.undo.is_some()).map(|(ino, _)| *ino).collect();
        files.sort_unstable();
        for ino in files {
            let Some(undo) = self.node_mut(ino)?.undo.take() else { continue };
            let file = OpenOptions::new().write(true).open(self.path(ino)?)?;
            for (offset, bytes) in undo.replaced.iter().rev() {
                file.write_all_at(bytes, *offset)?;
            }
            file.set_len(undo.durable_len)?;
            report.files_rolled_back += 1;
        }
        let mut directories: Vec<Ino> =
            self.nodes.iter().filter(|(_, node)| node.durable_entries.is_some()).map(|(ino, _)| *ino).collect();
        directories.sort_unstable();
        for dir in &directories {
            let current = self.entries.get(dir).cloned().unwrap_or_default();
            let durable = self.node(*dir)?.durable_entries.clone().unwrap_or_default();
            report.entries_removed += current.iter().filter(|(name, ino)| durable.get(*name) != Some(ino)).count();
            report.entries_restored += durable.iter().filter(|(name, ino)| current.get(*name) != Some(ino)).count();
            if current != durable {
                report.directories_rolled_back += 1;
            }
        }
        // First every entry of a changed directory goes to the graveyard, then each directory
        // gets back its durable entries from there.
        for dir in &directories {
            let current: Vec<Ino> =
                self.entries.get(dir).map(|entries| entries.values().copied().collect()).unwrap_or_default();
            for ino in current {
                self.bury(ino)?;
            }
        }
        for dir in &directories {
            let durable = self.node_mut(*dir)?.durable_entries.take().unwrap_or_default();
            for (name, ino) in durable {
                if self.node(ino)?.place != Place::Graveyard {
                    let problem = format!("the model lost track of {name:?}: it is durable in two directories");
                    return Err(io::Error::other(problem));
                }
                self.place(ino, *dir, &name)?;
            }
        }
        std::fs::remove_dir_all(self.backing.join(GRAVEYARD))?;
        Ok(report)
    }

    /// The backing filesystem's statistics.
    pub(crate) fn statfs(&self) -> io::Result<libc::statvfs> {
        self.live()?;
        let path = std::ffi::CString::new(self.backing.as_os_str().as_bytes())?;
        let mut stats = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
        // SAFETY: `path` is a NUL-terminated string and `stats` is writable memory of the size
        // statvfs(3) fills.
        if unsafe { libc::statvfs(path.as_ptr(), stats.as_mut_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: statvfs(3) returned 0, so it filled the whole structure.
        Ok(unsafe { stats.assume_init() })
    }

    /// The directory a node is in (the root's is itself; a buried node's is the root).
    pub(crate) fn parent(&self, ino: Ino) -> Ino {
        match self.nodes.get(&ino).map(|node| &node.place) {
            Some(Place::Live { parent, .. }) => *parent,
            _ => ROOT,
        }
    }

    /// A clean unmount: what is current stays (as if everything had been synced), and the
    /// graveyard is deleted.
    pub(crate) fn settle(&mut self) -> io::Result<()> {
        if self.finished {
            return Ok(());
        }
        self.finished = true;
        self.handles.clear();
        std::fs::remove_dir_all(self.backing.join(GRAVEYARD))
    }
}

/// Reads up to `size` bytes at `offset`: fewer only at the end of the file.
fn read_up_to(file: &File, offset: u64, size: usize) -> io::Result<Vec<u8>> {
    let mut buffer = vec![0; size];
    let mut filled = 0;
    while filled < size {
        match file.read_at(&mut buffer[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    buffer.truncate(filled);
    Ok(buffer)
}
