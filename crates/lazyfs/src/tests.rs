//! The model through a real mount: what survives a cut and what does not.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

use super::*;

/// A mount of a fresh backing directory, or `None` where FUSE is unavailable (not in CI).
fn mounted() -> Option<(TempDir, LazyFs)> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("backing")).unwrap();
    std::fs::create_dir(dir.path().join("mnt")).unwrap();
    let lazy = mount_or_skip(&dir.path().join("backing"), &dir.path().join("mnt"))?;
    Some((dir, lazy))
}

fn at(lazy: &LazyFs, name: &str) -> PathBuf {
    lazy.mountpoint().join(name)
}

/// Creates (or replaces) a file and writes `bytes`, without syncing anything.
fn write(path: &Path, bytes: &[u8]) -> File {
    let mut file = File::create(path).unwrap();
    file.write_all(bytes).unwrap();
    file
}

fn fsync_dir(path: &Path) {
    File::open(path).unwrap().sync_all().unwrap();
}

fn read(path: &Path) -> Option<Vec<u8>> {
    match std::fs::read(path) {
        Ok(bytes) => Some(bytes),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
        Err(error) => panic!("reading {}: {error}", path.display()),
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|entry| entry.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    names
}

/// Cuts the power, checks that the backing directory holds no leftovers, and mounts again.
fn cut(lazy: &mut LazyFs) -> CutReport {
    let report = lazy.power_cut().unwrap();
    assert!(!lazy.backing().join(model::GRAVEYARD).exists(), "the cut leaves only the durable state");
    lazy.remount().unwrap();
    report
}

/// A file whose entry and contents are durable.
fn durable_file(lazy: &LazyFs, name: &str, bytes: &[u8]) -> PathBuf {
    let path = at(lazy, name);
    write(&path, bytes).sync_data().unwrap();
    fsync_dir(lazy.mountpoint());
    path
}

#[test]
fn data_written_and_fdatasynced_in_a_synced_directory_survives_a_cut() {
    let Some((_dir, mut lazy)) = mounted() else { return };
    let path = at(&lazy, "log");
    let file = write(&path, b"first");
    fsync_dir(lazy.mountpoint());
    file.write_all_at(b" second", 5).unwrap();
    file.sync_data().unwrap();
    drop(file);
    cut(&mut lazy);
    assert_eq!(read(&path).as_deref(), Some(&b"first second"[..]));
    assert_eq!(read(&lazy.backing().join("log")).as_deref(), Some(&b"first second"[..]));
}

#[test]
fn data_written_without_a_sync_is_gone_and_the_file_is_back_to_its_synced_length() {
    let Some((_dir, mut lazy)) = mounted() else { return };
    let path = durable_file(&lazy, "log", b"synced");
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(b" and then some more that nobody synced", 6).unwrap();
    drop(file);
    assert_eq!(read(&path).unwrap().len(), 44, "reads see unsynced writes");
    let report = cut(&mut lazy);
    assert_eq!(read(&path).as_deref(), Some(&b"synced"[..]));
    assert_eq!(report.files_rolled_back, 1);
}

#[test]
fn a_file_created_without_a_directory_fsync_is_gone_even_if_its_data_was_synced() {
    let Some((_dir, mut lazy)) = mounted() else { return };
    durable_file(&lazy, "kept", b"k");
    let path = at(&lazy, "new");
    write(&path, b"synced data, unsynced name").sync_all().unwrap();
    let report = cut(&mut lazy);
    assert_eq!(read(&path), None);
    assert_eq!(names(lazy.mountpoint()), ["kept"]);
    assert_eq!((report.entries_removed, report.entries_restored), (1, 0));
}

#[test]
fn a_new_file_in_a_synced_directory_is_empty_until_its_data_is_synced() {
    let Some((_dir, mut lazy)) = mounted() else { return };
    let path = at(&lazy, "new");
    write(&path, b"unsynced");
    fsync_dir(lazy.mountpoint());
    cut(&mut lazy);
    assert_eq!(read(&path).as_deref(), Some(&b""[..]));
}

#[test]
fn a_rename_not_covered_by_a_directory_fsync_is_undone() {
    let Some((_dir, mut lazy)) = mounted() else { return };
    let old = durable_file(&lazy, "snap.1", b"old snapshot");
    // sled's way of replacing a snapshot: write a temporary file, sync it, rename it over.
    let generating = at(&lazy, "snap.2.generating");
    write(&generating, b"new snapshot").sync_all().unwrap();
    std::fs::rename(&generating, at(&lazy, "snap.2")).unwrap();
    std::fs::remove_file(&old).unwrap();
    assert_eq!(names(lazy.mountpoint()), ["snap.2"]);
    let report = cut(&mut lazy);
    assert_eq!(names(lazy.mountpoint()), ["snap.1"]);
    assert_eq!(read(&old).as_deref(), Some(&b"old snapshot"[..]));
    assert_eq!((report.entries_removed, report.entries_restored), (1, 1));

    // The same with the directory fsynced: the rename and the unlink are durable.
    write(&generating, b"new snapshot").sync_all().unwrap();
    std::fs::rename(&generating, at(&lazy, "snap.2")).unwrap();
    std::fs::remove_file(&old).unwrap();
    fsync_dir(lazy.mountpoint());
    cut(&mut lazy);
    assert_eq!(names(lazy.mountpoint()), ["snap.2"]);
    assert_eq!(read(&at(&lazy, "snap.2")).as_deref(), Some(&b"new snapshot"[..]));
}

#[test]
fn a_rename_over_an_existing_file_is_undone_with_both_contents() {
    let Some((_dir, mut lazy)) = mounted() else { return };
    let target = durable_file(&lazy, "target", b"durable target");
    let source = durable_file(&lazy, "source", b"durable source");
    std::fs::rename(&source, &target).unwrap();
    OpenOptions::new().append(true).open(&target).unwrap().write_all(b", unsynced").unwrap();
    cut(&mut lazy);
    assert_eq!(read(&target).as_deref(), Some(&b"durable target"[..]));
    assert_eq!(read(&source).as_deref(), Some(&b"durable source"[..]));
}

#[test]
fn synced_then_overwritten_data_reverts_to_the_synced_bytes() {
    let Some((_dir, mut lazy)) = mounted() else { return };
    let path = durable_file(&lazy, "page", b"hello world, hello disk");
    let file = OpenOptions::new().read(true).write(true).open(&path).unwrap();
    file.write_all_at(b"HELLO", 0).unwrap();
    file.write_all_at(b"W", 6).unwrap();
    file.set_len(8).unwrap();
    file.write_all_at(b"past the end", 40).unwrap();
    file.write_all_at(b"xx", 0).unwrap();
    assert_eq!(read(&path).unwrap().len(), 52);
    drop(file);
    cut(&mut lazy);
    assert_eq!(read(&path).as_deref(), Some(&b"hello world, hello disk"[..]));

    // Synced in the middle: the cut goes back to the last sync, not the first.
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(b"HELLO", 0).unwrap();
    file.sync_data().unwrap();
    file.write_all_at(b"WORLD", 6).unwrap();
    file.set_len(3).unwrap();
    drop(file);
    cut(&mut lazy);
    assert_eq!(read(&path).as_deref(), Some(&b"HELLO world, hello disk"[..]));
}

#[test]
fn an_unlink_not_covered_by_a_directory_fsync_is_undone_with_the_durable_contents() {
    let Some((_dir, mut lazy)) = mounted() else { return };
    let path = durable_file(&lazy, "blob", b"durable");
    // Open and unlinked, as sled's blob files may be: writes still reach it.
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    file.write_all_at(b"D", 0).unwrap();
    file.sync_data().unwrap();
    file.write_all_at(b"unsynced", 7).unwrap();
    assert_eq!(read(&path), None);
    drop(file);
    cut(&mut lazy);
    assert_eq!(read(&path).as_deref(), Some(&b"Durable"[..]));

    std::fs::remove_file(&path).unwrap();
    fsync_dir(lazy.mountpoint());
    cut(&mut lazy);
    assert_eq!(read(&path), None);
}

#[test]
fn a_new_directory_is_gone_with_everything_in_it_without_an_fsync_of_its_parent() {
    let Some((_dir, mut lazy)) = mounted() else { return };
    let data = at(&lazy, "data");
    // What sled and the store do on a fresh data directory: everything but the data directory's
    // own entry in its parent is synced.
    let create = || {
        std::fs::create_dir_all(data.join("blobs")).unwrap();
        write(&data.join("db"), b"log").sync_data().unwrap();
        fsync_dir(&data);
        fsync_dir(&data.join("blobs"));
    };
    create();
    cut(&mut lazy);
    assert_eq!(names(lazy.mountpoint()), Vec::<String>::new(), "the parent of data was never fsynced");

    create();
    fsync_dir(lazy.mountpoint());
    cut(&mut lazy);
    assert_eq!(names(&data), ["blobs", "db"]);
    assert_eq!(read(&data.join("db")).as_deref(), Some(&b"log"[..]));
}

#[test]
fn a_rename_between_directories_is_durable_in_both_once_either_is_synced() {
    let Some((_dir, mut lazy)) = mounted() else { return };
    for dir in ["a", "b"] {
        std::fs::create_dir(at(&lazy, dir)).unwrap();
    }
    fsync_dir(lazy.mountpoint());
    durable_file(&lazy, "a/x", b"x");
    fsync_dir(&at(&lazy, "a"));
    for synced in ["a", "b"] {
        let (from, to) = if synced == "a" { ("a/x", "b/x") } else { ("b/x", "a/x") };
        std::fs::rename(at(&lazy, from), at(&lazy, to)).unwrap();
        fsync_dir(&at(&lazy, synced));
        cut(&mut lazy);
        assert_eq!(read(&at(&lazy, from)), None, "after syncing {synced}");
        assert_eq!(read(&at(&lazy, to)).as_deref(), Some(&b"x"[..]), "after syncing {synced}");
    }
    // Neither synced: back where it was.
    std::fs::rename(at(&lazy, "a/x"), at(&lazy, "b/x")).unwrap();
    cut(&mut lazy);
    assert_eq!(read(&at(&lazy, "a/x")).as_deref(), Some(&b"x"[..]));
    assert_eq!(names(&at(&lazy, "b")), Vec::<String>::new());
}

#[test]
fn sync_file_range_and_close_make_nothing_durable() {
    let Some((_dir, mut lazy)) = mounted() else { return };
    let path = durable_file(&lazy, "db", b"");
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(b"written the way sled writes its log", 0).unwrap();
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    // SAFETY: a valid open descriptor and a range within the file.
    let synced = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 35, flags) };
    assert_eq!(synced, 0, "{}", std::io::Error::last_os_error());
    drop(file);
    cut(&mut lazy);
    assert_eq!(read(&path).as_deref(), Some(&b""[..]));
}

#[test]
fn the_mount_serves_what_sled_needs_and_fails_everything_once_the_power_is_cut() {
    let Some((_dir, mut lazy)) = mounted() else { return };
    let path = durable_file(&lazy, "db", b"0123456789");
    // An exclusive lock, as sled takes on its `db` file, excludes a second one.
    let first = OpenOptions::new().read(true).write(true).open(&path).unwrap();
    let second = OpenOptions::new().read(true).write(true).open(&path).unwrap();
    // SAFETY: valid open descriptors.
    assert_eq!(unsafe { libc::flock(first.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
    assert_eq!(unsafe { libc::flock(second.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, -1);
    let mut buffer = [0; 4];
    second.read_exact_at(&mut buffer, 3).unwrap();
    assert_eq!(&buffer, b"3456");
    assert_eq!(first.metadata().unwrap().len(), 10);
    let stats = std::fs::metadata(lazy.mountpoint()).unwrap();
    assert!(stats.is_dir());
    // SAFETY: a NUL-terminated path and writable memory for the result.
    let statfs = unsafe {
        let mountpoint = std::ffi::CString::new(lazy.mountpoint().to_str().unwrap()).unwrap();
        let mut stats = std::mem::zeroed::<libc::statvfs>();
        libc::statvfs(mountpoint.as_ptr(), &mut stats)
    };
    assert_eq!(statfs, 0);
    drop(second);

    // A cut with the file still open: its holder gets EIO from then on, the backing directory
    // holds the durable state, and the mount can be made again at once.
    first.write_all_at(b"unsynced", 0).unwrap();
    lazy.power_cut().unwrap();
    assert!(first.write_all_at(b"late", 0).is_err(), "writes after the cut fail");
    assert_eq!(read(&lazy.backing().join("db")).as_deref(), Some(&b"0123456789"[..]));
    drop(first);
    lazy.remount().unwrap();
    assert_eq!(read(&path).as_deref(), Some(&b"0123456789"[..]));
}

/// A reference of what is durable, for random operations on a handful of files.
#[derive(Default)]
struct Reference {
    /// Node contents: (current, durable).
    nodes: Vec<(Vec<u8>, Vec<u8>)>,
    current: std::collections::BTreeMap<String, usize>,
    durable: std::collections::BTreeMap<String, usize>,
}

/// SplitMix64, for reproducible random operations.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n.max(1)
    }
}

#[test]
fn random_operations_leave_exactly_the_durable_state_after_each_cut() {
    let Some((_dir, mut lazy)) = mounted() else { return };
    let mut rng = Rng(7);
    let mut reference = Reference::default();
    let file_names = ["a", "b", "c", "d"];
    for round in 0..120 {
        // Files kept open across operations, as sled keeps its log open.
        let mut open: Vec<(usize, File)> = Vec::new();
        for _ in 0..rng.below(30) {
            let name = file_names[rng.below(file_names.len() as u64) as usize];
            let path = at(&lazy, name);
            match (rng.below(9), reference.current.get(name).copied()) {
                (0, None) => {
                    File::create(&path).unwrap();
                    reference.nodes.push((Vec::new(), Vec::new()));
                    reference.current.insert(name.to_owned(), reference.nodes.len() - 1);
                }
                (1 | 2, Some(node)) => {
                    let file = OpenOptions::new().write(true).open(&path).unwrap();
                    let contents = &mut reference.nodes[node].0;
                    let offset = rng.below(contents.len() as u64 + 20) as usize;
                    let data: Vec<u8> = (0..rng.below(3000)).map(|_| rng.below(256) as u8).collect();
                    file.write_all_at(&data, offset as u64).unwrap();
                    if contents.len() < offset + data.len() {
                        contents.resize(offset + data.len(), 0);
                    }
                    contents[offset..offset + data.len()].copy_from_slice(&data);
                    open.push((node, file));
                }
                (3, Some(node)) => {
                    let len = rng.below(reference.nodes[node].0.len() as u64 + 100) as usize;
                    OpenOptions::new().write(true).open(&path).unwrap().set_len(len as u64).unwrap();
                    reference.nodes[node].0.resize(len, 0);
                }
                (4, Some(node)) => {
                    OpenOptions::new().write(true).open(&path).unwrap().sync_data().unwrap();
                    reference.nodes[node].1 = reference.nodes[node].0.clone();
                }
                (5, Some(node)) => {
                    let to = file_names[rng.below(file_names.len() as u64) as usize];
                    std::fs::rename(&path, at(&lazy, to)).unwrap();
                    reference.current.remove(name);
                    reference.current.insert(to.to_owned(), node);
                }
                (6, Some(_)) => {
                    std::fs::remove_file(&path).unwrap();
                    reference.current.remove(name);
                }
                (7, _) => {
                    fsync_dir(lazy.mountpoint());
                    reference.durable = reference.current.clone();
                }
                (8, _) if !open.is_empty() => {
                    // A write through a file opened earlier, which may have been renamed or
                    // unlinked since.
                    let (node, file) = &open[rng.below(open.len() as u64) as usize];
                    let contents = &mut reference.nodes[*node].0;
                    let offset = rng.below(contents.len() as u64 + 1) as usize;
                    file.write_all_at(b"late", offset as u64).unwrap();
                    if contents.len() < offset + 4 {
                        contents.resize(offset + 4, 0);
                    }
                    contents[offset..offset + 4].copy_from_slice(b"late");
                    if rng.below(2) == 0 {
                        file.sync_data().unwrap();
                        reference.nodes[*node].1 = reference.nodes[*node].0.clone();
                    }
                }
                _ => {}
            }
        }
        drop(open);
        for (name, node) in &reference.current {
            assert_eq!(read(&at(&lazy, name)).as_ref(), Some(&reference.nodes[*node].0), "round {round}: {name}");
        }
        lazy.power_cut().unwrap();
        let expected: Vec<String> = reference.durable.keys().cloned().collect();
        assert_eq!(names(lazy.backing()), expected, "round {round}");
        for (name, node) in &reference.durable {
            let got = read(&lazy.backing().join(name)).unwrap();
            assert!(got == reference.nodes[*node].1, "round {round}: {name} is not its durable contents");
        }
        lazy.remount().unwrap();
        // After the cut, what is durable is all there is.
        reference.current = reference.durable.clone();
        for node in &mut reference.nodes {
            node.0 = node.1.clone();
        }
    }
}
