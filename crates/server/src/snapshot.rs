//! The snapshot file: the live records of a store and its fencing floor, as `backup` writes them
//! and `restore` reads them (and, later, the Admin API's export and import).
//!
//! Layout (integers big-endian):
//! - a header: the magic `IDEMSNAP`, the format version (`u32`, 1) and the fencing floor (`u64`:
//!   every grant after a restore is above it);
//! - one entry per record: the tag `1`, the payload's length (`u32`), the payload (namespace
//!   length `u16`, namespace, key length `u16`, key, the record as the stores encode it), and the
//!   CRC-32 of the payload (`u32`);
//! - a trailer: the tag `0` and the number of entries (`u64`).
//!
//! Invariant: a file is trusted only whole. A file without its trailer (a copy cut short), with a
//! bad checksum, an unknown version or a count that does not match is refused before a single
//! record of it is used: [`SnapshotReader::read_all`] checks everything first.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use idempotency_core::domain::{Key, Namespace, Record};

const MAGIC: &[u8; 8] = b"IDEMSNAP";
const VERSION: u32 = 1;
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
}

impl SnapshotWriter {
    /// Starts a snapshot whose restore hands out fencing tokens above `fencing_floor`.
    pub fn create(path: &Path, fencing_floor: u64) -> Result<SnapshotWriter, SnapshotError> {
        let temporary = path.with_extension("partial");
        let io_error = |source| SnapshotError::Io { path: path.to_owned(), source };
        // Only the owner may read it: it holds stored responses and lease tokens.
        let file = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&temporary)
        }
        .map_err(io_error)?;
        let mut out = BufWriter::new(file);
        out.write_all(MAGIC).map_err(io_error)?;
        out.write_all(&VERSION.to_be_bytes()).map_err(io_error)?;
        out.write_all(&fencing_floor.to_be_bytes()).map_err(io_error)?;
        Ok(SnapshotWriter { path: path.to_owned(), temporary, out, count: 0 })
    }

    /// Appends one record.
    pub fn write(&mut self, namespace: &Namespace, key: &Key, record: &Record) -> Result<(), SnapshotError> {
        let mut payload = Vec::with_capacity(64);
        for part in [namespace.as_str(), key.as_str()] {
            let length = u16::try_from(part.len()).expect("namespaces and keys are at most 255 bytes");
            payload.extend_from_slice(&length.to_be_bytes());
            payload.extend_from_slice(part.as_bytes());
        }
        record.encode_into(&mut payload);
        let length = u32::try_from(payload.len()).ok().filter(|length| *length <= MAX_PAYLOAD).ok_or_else(|| {
            SnapshotError::Invalid { path: self.path.clone(), reason: "a record is larger than 65 MiB".to_owned() }
        })?;
        let io_error = |source| SnapshotError::Io { path: self.path.clone(), source };
        self.out.write_all(&[ENTRY]).map_err(io_error)?;
        self.out.write_all(&length.to_be_bytes()).map_err(io_error)?;
        self.out.write_all(&payload).map_err(io_error)?;
        self.out.write_all(&crc32fast::hash(&payload).to_be_bytes()).map_err(io_error)?;
        self.count += 1;
        Ok(())
    }

    /// Writes the trailer, syncs the file and moves it into place; returns the record count.
    pub fn finish(mut self) -> Result<u64, SnapshotError> {
        let io_error = |source| SnapshotError::Io { path: self.path.clone(), source };
        self.out.write_all(&[TRAILER]).map_err(io_error)?;
        self.out.write_all(&self.count.to_be_bytes()).map_err(io_error)?;
        let file = self.out.into_inner().map_err(|error| io_error(error.into_error()))?;
        file.sync_all().map_err(io_error)?;
        std::fs::rename(&self.temporary, &self.path).map_err(io_error)?;
        if let Some(directory) = self.path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
            File::open(directory).and_then(|directory| directory.sync_all()).map_err(io_error)?;
        }
        Ok(self.count)
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
    pub fn read_all(path: &Path, mut progress: impl FnMut(u64)) -> Result<Snapshot, SnapshotError> {
        let invalid = |reason: &str| SnapshotError::Invalid { path: path.to_owned(), reason: reason.to_owned() };
        let io_error = |source: io::Error| {
            if source.kind() == io::ErrorKind::UnexpectedEof {
                invalid("the file ends early (an interrupted copy?)")
            } else {
                SnapshotError::Io { path: path.to_owned(), source }
            }
        };
        let file = File::open(path).map_err(|source| SnapshotError::Io { path: path.to_owned(), source })?;
        let mut input = BufReader::new(file);
        let mut magic = [0u8; 8];
        input.read_exact(&mut magic).map_err(io_error)?;
        if &magic != MAGIC {
            return Err(invalid("it does not start like a snapshot"));
        }
        let version = read_u32(&mut input).map_err(io_error)?;
        if version != VERSION {
            return Err(invalid(&format!("format version {version}; this build reads version {VERSION}")));
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
                    let mut rest = [0u8; 1];
                    if input.read(&mut rest).map_err(io_error)? != 0 {
                        return Err(invalid("bytes follow the trailer"));
                    }
                    return Ok(Snapshot { fencing_floor, records });
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
