//! The snapshot file: the live records of a store and its fencing floor, as `backup` writes them
//! and `restore` reads them (and, later, the Admin API's export and import).
//!
//! Layout (integers big-endian):
//! - a header: the magic `IDEMSNAP`, the format version (`u32`, 2) and a fencing floor (`u64`);
//! - one entry per record: the tag `1`, the payload's length (`u32`), the payload (namespace
//!   length `u16`, namespace, key length `u16`, key, the record as the stores encode it), and the
//!   CRC-32 of the payload (`u32`);
//! - a trailer: the tag `0`, the number of entries (`u64`) and, from version 2, a fencing floor
//!   (`u64`) read after the last record, which is how a live export (the Admin API) covers tokens
//!   granted while it ran. Every grant after a restore or an import is above both floors and
//!   every token in the file. Version 1 (no floor in the trailer) is still read.
//!
//! Invariant: a file is trusted only whole. A file without its trailer (a copy cut short), with a
//! bad checksum, an unknown version or a count that does not match is refused before a single
//! record of it is used: [`SnapshotReader::read_all`] checks everything first.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use idempotency_core::domain::{Key, Namespace, Record};

const MAGIC: &[u8; 8] = b"IDEMSNAP";
const VERSION: u32 = 2;
const ENTRY: u8 = 1;
const TRAILER: u8 = 0;
/// The largest payload accepted: a record with the largest response (64 MiB) and its key.
const MAX_PAYLOAD: u32 = 65 * 1024 * 1024;

/// Why a snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The snapshot file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The file is not a whole snapshot of a version this build reads.
    #[error("{path} is not a usable snapshot: {reason}")]
    Invalid {
        /// The snapshot file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// One record of a snapshot.
pub type SnapshotRecord = (Namespace, Key, Record);

/// Writes a snapshot to a temporary file beside its destination, which [`SnapshotWriter::finish`]
/// syncs and renames into place: the destination is either absent or whole.
pub struct SnapshotWriter {
    path: PathBuf,
    temporary: PathBuf,
    out: BufWriter<File>,
    count: u64,
    fencing_floor: u64,
}

impl SnapshotWriter {
    /// Starts a snapshot whose restore hands out fencing tokens above `fencing_floor`.
    pub fn create(path: &Path, fencing_floor: u64) -> Result<SnapshotWriter, SnapshotError> {
        let temporary = path.with_extension("partial");
        let io_error = |source| SnapshotError::Io { path: path.to_owned(), source };
        let file = create_private(&temporary).map_err(io_error)?;
        let mut out = BufWriter::new(file);
        let mut header = Vec::new();
        encode_header(&mut header, fencing_floor);
        out.write_all(&header).map_err(io_error)?;
        Ok(SnapshotWriter { path: path.to_owned(), temporary, out, count: 0, fencing_floor })
    }

    /// Appends one record.
    pub fn write(&mut self, namespace: &Namespace, key: &Key, record: &Record) -> Result<(), SnapshotError> {
        let mut entry = Vec::with_capacity(128);
        encode_entry(&mut entry, namespace, key, record)
            .map_err(|reason| SnapshotError::Invalid { path: self.path.clone(), reason })?;
        self.out.write_all(&entry).map_err(|source| SnapshotError::Io { path: self.path.clone(), source })?;
        self.count += 1;
        Ok(())
    }

    /// Writes the trailer, syncs the file and moves it into place; returns the record count.
    pub fn finish(mut self) -> Result<u64, SnapshotError> {
        let io_error = |source| SnapshotError::Io { path: self.path.clone(), source };
        let mut trailer = Vec::new();
        encode_trailer(&mut trailer, self.count, self.fencing_floor);
        self.out.write_all(&trailer).map_err(io_error)?;
        let file = self.out.into_inner().map_err(|error| io_error(error.into_error()))?;
        install(file, &self.temporary, &self.path).map_err(io_error)?;
        Ok(self.count)
    }
}

/// Creates a file only its owner may read (snapshots hold stored responses and lease tokens). A
/// leftover of an interrupted run may have other permissions: it is removed first.
pub fn create_private(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)
}

/// Syncs `file` (written at `temporary`) and renames it to `path`, then syncs the directory:
/// `path` is then either as it was or whole.
pub fn install(file: File, temporary: &Path, path: &Path) -> io::Result<()> {
    file.sync_all()?;
    move_into_place(temporary, path)
}

/// Renames the synced file `temporary` to `path` and syncs the directory, so that the rename
/// itself survives a crash.
pub fn move_into_place(temporary: &Path, path: &Path) -> io::Result<()> {
    std::fs::rename(temporary, path)?;
    let directory = path.parent().filter(|parent| !parent.as_os_str().is_empty()).unwrap_or(Path::new("."));
    File::open(directory).and_then(|directory| directory.sync_all())
}

/// Appends a snapshot's header.
pub fn encode_header(out: &mut Vec<u8>, fencing_floor: u64) {
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_be_bytes());
    out.extend_from_slice(&fencing_floor.to_be_bytes());
}

/// Appends one record's entry; refuses a record too large for the format.
pub fn encode_entry(out: &mut Vec<u8>, namespace: &Namespace, key: &Key, record: &Record) -> Result<(), String> {
    let mut payload = Vec::with_capacity(64);
    for part in [namespace.as_str(), key.as_str()] {
        let length = u16::try_from(part.len()).expect("namespaces and keys are at most 255 bytes");
        payload.extend_from_slice(&length.to_be_bytes());
        payload.extend_from_slice(part.as_bytes());
    }
    record.encode_into(&mut payload);
    let length = u32::try_from(payload.len())
        .ok()
        .filter(|length| *length <= MAX_PAYLOAD)
        .ok_or_else(|| "a record is larger than 65 MiB".to_owned())?;
    out.push(ENTRY);
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(&payload);
    out.extend_from_slice(&crc32fast::hash(&payload).to_be_bytes());
    Ok(())
}

/// Appends the trailer: the entry count and the fencing floor read after the last record.
pub fn encode_trailer(out: &mut Vec<u8>, count: u64, fencing_floor: u64) {
    out.push(TRAILER);
    out.extend_from_slice(&count.to_be_bytes());
    out.extend_from_slice(&fencing_floor.to_be_bytes());
}

/// Counts the records of a snapshot (the layout above) as its bytes pass, in
/// chunks cut anywhere, for progress. Only progress trusts it: the file is checked whole apart.
pub struct EntryCounter {
    /// Bytes to let pass before the next entry's tag: the header first, then each entry's payload
    /// and checksum.
    skip: u64,
    /// Whether the bytes being skipped are an entry's (counted once they have passed).
    in_entry: bool,
    /// The tag and length of the next entry, while incomplete.
    head: Vec<u8>,
    /// The trailer (or bytes that are no entry) came: nothing more is counted.
    pub ended: bool,
    /// Entries that passed whole.
    pub records: u64,
}

impl Default for EntryCounter {
    fn default() -> Self {
        EntryCounter::new()
    }
}

impl EntryCounter {
    /// The header: magic (8 bytes), version (4), fencing floor (8).
    const HEADER_BYTES: u64 = 8 + 4 + 8;

    /// A counter at the start of a snapshot.
    pub fn new() -> EntryCounter {
        EntryCounter {
            skip: Self::HEADER_BYTES,
            in_entry: false,
            head: Vec::with_capacity(5),
            ended: false,
            records: 0,
        }
    }

    /// Takes the next bytes; returns how many more records passed whole.
    pub fn feed(&mut self, mut bytes: &[u8]) -> u64 {
        let before = self.records;
        while !bytes.is_empty() && !self.ended {
            if self.skip > 0 {
                let passing = usize::try_from(self.skip).map_or(bytes.len(), |skip| skip.min(bytes.len()));
                bytes = &bytes[passing..];
                self.skip -= passing as u64;
                if self.skip == 0 && self.in_entry {
                    self.records += 1;
                    self.in_entry = false;
                }
                continue;
            }
            self.head.push(bytes[0]);
            bytes = &bytes[1..];
            if self.head[0] != ENTRY {
                self.ended = true;
            } else if let Ok(length) = <[u8; 4]>::try_from(&self.head[1..]) {
                self.skip = u64::from(u32::from_be_bytes(length)) + 4;
                self.in_entry = true;
                self.head.clear();
            }
        }
        self.records - before
    }
}

/// A whole, checked snapshot.
pub struct Snapshot {
    /// Every grant after a restore is above this fencing token.
    pub fencing_floor: u64,
    /// The records, in the order they were written.
    pub records: Vec<SnapshotRecord>,
}

/// Reads a snapshot file.
pub struct SnapshotReader;

impl SnapshotReader {
    /// Reads and checks the whole file (checksums, trailer, count) before returning any of it.
    pub fn read_all(path: &Path, progress: impl FnMut(u64)) -> Result<Snapshot, SnapshotError> {
        let file = File::open(path).map_err(|source| SnapshotError::Io { path: path.to_owned(), source })?;
        SnapshotReader::read_from(BufReader::new(file), path, progress)
    }

    /// As [`SnapshotReader::read_all`], from `input`; `path` names it in errors.
    pub fn read_from(
        mut input: impl Read,
        path: &Path,
        mut progress: impl FnMut(u64),
    ) -> Result<Snapshot, SnapshotError> {
        let invalid = |reason: &str| SnapshotError::Invalid { path: path.to_owned(), reason: reason.to_owned() };
        let io_error = |source: io::Error| {
            if source.kind() == io::ErrorKind::UnexpectedEof {
                invalid("the file ends early (an interrupted copy?)")
            } else {
                SnapshotError::Io { path: path.to_owned(), source }
            }
        };
        let mut magic = [0u8; 8];
        input.read_exact(&mut magic).map_err(io_error)?;
        if &magic != MAGIC {
            return Err(invalid("it does not start like a snapshot"));
        }
        let version = read_u32(&mut input).map_err(io_error)?;
        if !(1..=VERSION).contains(&version) {
            return Err(invalid(&format!("format version {version}; this build reads versions 1 to {VERSION}")));
        }
        let fencing_floor = read_u64(&mut input).map_err(io_error)?;
        let mut records = Vec::new();
        loop {
            let mut tag = [0u8; 1];
            input.read_exact(&mut tag).map_err(io_error)?;
            match tag[0] {
                ENTRY => {
                    let length = read_u32(&mut input).map_err(io_error)?;
                    if length > MAX_PAYLOAD {
                        return Err(invalid("an entry is larger than any record can be"));
                    }
                    let mut payload = vec![0u8; length as usize];
                    input.read_exact(&mut payload).map_err(io_error)?;
                    let checksum = read_u32(&mut input).map_err(io_error)?;
                    if crc32fast::hash(&payload) != checksum {
                        return Err(invalid(&format!("entry {} has a bad checksum", records.len() + 1)));
                    }
                    let record = decode_entry(&payload)
                        .map_err(|reason| invalid(&format!("entry {}: {reason}", records.len() + 1)))?;
                    records.push(record);
                    progress(records.len() as u64);
                }
                TRAILER => {
                    let count = read_u64(&mut input).map_err(io_error)?;
                    if count != records.len() as u64 {
                        return Err(invalid(&format!(
                            "the trailer counts {count} records, the file holds {}",
                            records.len()
                        )));
                    }
                    let floor_after = if version >= 2 { read_u64(&mut input).map_err(io_error)? } else { 0 };
                    let mut rest = [0u8; 1];
                    if input.read(&mut rest).map_err(io_error)? != 0 {
                        return Err(invalid("bytes follow the trailer"));
                    }
                    return Ok(Snapshot { fencing_floor: fencing_floor.max(floor_after), records });
                }
                other => return Err(invalid(&format!("unknown entry tag {other}"))),
            }
        }
    }
}

fn decode_entry(payload: &[u8]) -> Result<SnapshotRecord, String> {
    let mut rest = payload;
    let mut text = || -> Result<String, String> {
        let (length, tail) = rest.split_first_chunk::<2>().ok_or("truncated")?;
        let length = usize::from(u16::from_be_bytes(*length));
        let (text, tail) = tail.split_at_checked(length).ok_or("truncated")?;
        rest = tail;
        String::from_utf8(text.to_vec()).map_err(|_| "not UTF-8".to_owned())
    };
    let namespace = Namespace::parse(&text()?).map_err(|error| error.to_string())?;
    let key = Key::parse(&text()?).map_err(|error| error.to_string())?;
    let record = Record::decode(rest).map_err(|error| error.to_string())?;
    Ok((namespace, key, record))
}

fn read_u32(input: &mut impl Read) -> io::Result<u32> {
    let mut bytes = [0u8; 4];
    input.read_exact(&mut bytes)?;
    Ok(u32::from_be_bytes(bytes))
}

fn read_u64(input: &mut impl Read) -> io::Result<u64> {
    let mut bytes = [0u8; 8];
    input.read_exact(&mut bytes)?;
    Ok(u64::from_be_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use idempotency_core::domain::{FencingToken, Fingerprint, LeaseToken, Owner, RecordState, Timestamp};

    fn record(token: u64) -> Record {
        Record {
            fingerprint: Fingerprint::parse(b"fp").unwrap(),
            fencing_token: FencingToken(token),
            attempt: 1,
            owner: Owner::parse("api-1").unwrap(),
            retention_millis: 60_000,
            updated_at: Timestamp::from_unix_millis(1_000),
            state: RecordState::Released { by: LeaseToken::generate() },
        }
    }

    fn written(dir: &Path, records: u64) -> PathBuf {
        let path = dir.join("backup.snapshot");
        let mut writer = SnapshotWriter::create(&path, 77).unwrap();
        for n in 0..records {
            let key = Key::parse(&format!("key-{n}")).unwrap();
            writer.write(&Namespace::parse("payments").unwrap(), &key, &record(n + 1)).unwrap();
        }
        assert_eq!(writer.finish().unwrap(), records);
        path
    }

    #[test]
    fn a_snapshot_reads_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = written(dir.path(), 3);
        let snapshot = SnapshotReader::read_all(&path, |_| {}).unwrap();
        assert_eq!(snapshot.fencing_floor, 77);
        assert_eq!(snapshot.records.len(), 3);
        assert_eq!(snapshot.records[2].1.as_str(), "key-2");
        let (written, read) = (record(3), &snapshot.records[2].2);
        assert_eq!(
            (read.fencing_token, &read.owner, read.updated_at),
            (written.fencing_token, &written.owner, written.updated_at)
        );
        assert!(matches!(read.state, RecordState::Released { .. }));
        assert!(!path.with_extension("partial").exists());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn a_damaged_or_cut_snapshot_is_refused_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = written(dir.path(), 3);
        let bytes = std::fs::read(&path).unwrap();
        let check = |bytes: &[u8], expected: &str| {
            std::fs::write(&path, bytes).unwrap();
            match SnapshotReader::read_all(&path, |_| {}) {
                Err(SnapshotError::Invalid { reason, .. }) => assert!(reason.contains(expected), "{reason}"),
                Err(other) => panic!("{other}"),
                Ok(_) => panic!("a damaged snapshot was read"),
            }
        };
        check(&bytes[..bytes.len() - 9], "ends early");
        check(&bytes[..bytes.len() - 30], "ends early");
        let mut flipped = bytes.clone();
        flipped[30] ^= 1;
        check(&flipped, "checksum");
        let mut versioned = bytes.clone();
        versioned[11] = 9;
        check(&versioned, "version 9");
        check(b"PK\x03\x04 something else", "does not start like a snapshot");
        let mut extra = bytes.clone();
        extra.push(0);
        check(&extra, "follow the trailer");
    }
}
