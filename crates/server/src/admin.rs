//! The `idempotency.v1.Admin` service: operators' calls over the store's [`Maintenance`] side,
//! each admitted and authorized (admin role) by the same [`Guard`] as the coordinator's calls.
//! Like `service.rs`, only this module sees the Admin service's generated types.
//!
//! Export and Import speak the snapshot file format of [`crate::snapshot`], so that an export is
//! a backup `restore` reads and a backup is something Import takes.

use std::io::{Seek, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use idempotency_core::admin::{ListQuery, Maintenance, RecordSummary};
use idempotency_core::coordinator::{Coordinator, Error};
use idempotency_core::domain::{InvalidInput, Key, KeyState, Namespace, Timestamp};
use idempotency_core::store::StoreError;
use idempotency_proto::pb;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::Role;
use crate::service::{CallCredentials, CallError, Guard, key_state, status_of, timestamp};
use crate::snapshot::{self, SnapshotReader};
use crate::sweeper::SweeperStats;

/// A listing's page size when the request gives none, and the most it may ask for.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1_000;
/// Export sends the snapshot's bytes in chunks of about this size.
const CHUNK_BYTES: usize = 256 * 1024;

/// The `idempotency.v1.Admin` service over a coordinator's store.
pub struct AdminService<S> {
    coordinator: Arc<Coordinator<S>>,
    guard: Guard,
    sweeper: Arc<SweeperStats>,
    store_kind: &'static str,
}

impl<S> AdminService<S> {
    /// Serves the store of `coordinator` (named `store_kind` in Stats), admitting calls through
    /// `guard`.
    pub fn new(
        coordinator: Arc<Coordinator<S>>,
        guard: Guard,
        sweeper: Arc<SweeperStats>,
        store_kind: &'static str,
    ) -> Self {
        AdminService { coordinator, guard, sweeper, store_kind }
    }
}

/// The namespace a call names, authorized; `None` (every namespace, which needs admin over all of
/// them) when `raw` is empty and `empty_is_all`.
fn admin_scope(
    guard: &Guard,
    credentials: &CallCredentials,
    raw: &str,
    empty_is_all: bool,
) -> Result<Option<Namespace>, CallError> {
    if raw.is_empty() && empty_is_all {
        guard.authorize_all(credentials, Role::Admin)?;
        return Ok(None);
    }
    guard.authorize(credentials, raw, Role::Admin)?;
    Ok(Some(Namespace::parse(raw)?))
}

fn store_error(error: StoreError) -> Status {
    status_of(CallError::Coordinator(Error::Store(error)))
}

fn denied(error: CallError) -> Status {
    status_of(error)
}

/// A List page token: the namespace and the last key of the page, hex-encoded, so that a token
/// is only good for the listing it came from.
fn page_token(namespace: &Namespace, last: &Key) -> String {
    format!("v1.{}.{}", hex(namespace.as_str().as_bytes()), hex(last.as_str().as_bytes()))
}

fn parse_page_token(token: &str, namespace: &Namespace, prefix: &str) -> Result<Option<Key>, CallError> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = || CallError::InvalidPageToken;
    let mut parts = token.split('.');
    let (Some("v1"), Some(token_namespace), Some(last), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid());
    };
    let text = |hex_text: &str| unhex(hex_text).and_then(|bytes| String::from_utf8(bytes).ok()).ok_or_else(invalid);
    if text(token_namespace)? != namespace.as_str() {
        return Err(invalid());
    }
    let last = Key::parse(&text(last)?).map_err(|_| invalid())?;
    if !last.as_str().starts_with(prefix) {
        return Err(invalid());
    }
    Ok(Some(last))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|at| u8::from_str_radix(text.get(at..at + 2)?, 16).ok()).collect()
}

fn state_filter(state: i32) -> Result<Option<KeyState>, CallError> {
    Ok(match pb::KeyState::try_from(state) {
        Ok(pb::KeyState::Unspecified) => None,
        Ok(pb::KeyState::InProgress) => Some(KeyState::InProgress),
        Ok(pb::KeyState::LeaseExpired) => Some(KeyState::LeaseExpired),
        Ok(pb::KeyState::Released) => Some(KeyState::Released),
        Ok(pb::KeyState::Completed) => Some(KeyState::Completed),
        Err(_) => return Err(CallError::InvalidState),
    })
}

fn summary(record: RecordSummary) -> pb::RecordSummary {
    pb::RecordSummary {
        key: record.key.as_str().to_owned(),
        state: key_state(record.state).into(),
        fencing_token: record.fencing_token.0,
        attempt: record.attempt,
        owner: record.owner.as_str().to_owned(),
        lease_expires_at: record.lease_expires_at.map(timestamp),
        completed_at: record.completed_at.map(timestamp),
        expires_at: Some(timestamp(record.expires_at)),
        updated_at: Some(timestamp(record.updated_at)),
        response_bytes: record.response_bytes,
    }
}

type ExportStream = Pin<Box<dyn Stream<Item = Result<pb::ExportResponse, Status>> + Send>>;

#[tonic::async_trait]
impl<S: Maintenance> pb::admin_server::Admin for AdminService<S> {
    async fn stats(&self, request: Request<pb::StatsRequest>) -> Result<Response<pb::StatsResponse>, Status> {
        let _in_flight = self.guard.admit().map_err(denied)?;
        let credentials = CallCredentials::of(&request);
        let request = request.into_inner();
        let namespace = admin_scope(&self.guard, &credentials, &request.namespace, true).map_err(denied)?;
        let store = self.coordinator.store();
        let census = store.census(namespace.as_ref(), self.coordinator.now()).await.map_err(store_error)?;
        let coordinator = Arc::clone(&self.coordinator);
        // The store's own figures may walk a directory: off the async workers.
        let disk_bytes = tokio::task::spawn_blocking(move || coordinator.store().stats().disk_bytes)
            .await
            .map_err(|_| store_error(StoreError::unavailable("reading the store's figures failed")))?;
        let oldest = census.values().filter_map(|counts| counts.oldest).min();
        let last_pass = self.sweeper.last_pass_ms.load(Ordering::Relaxed);
        let records = census.values().map(|counts| counts.live() + counts.expired).sum();
        Ok(Response::new(pb::StatsResponse {
            records,
            namespaces: census
                .into_iter()
                .map(|(namespace, counts)| pb::NamespaceStats {
                    namespace: namespace.as_str().to_owned(),
                    in_progress: counts.in_progress,
                    lease_expired: counts.lease_expired,
                    released: counts.released,
                    completed: counts.completed,
                    expired: counts.expired,
                    oldest_record: counts.oldest.map(timestamp),
                })
                .collect(),
            disk_bytes: disk_bytes.unwrap_or(0),
            oldest_record: oldest.map(timestamp),
            sweeper: Some(pb::SweeperStats {
                passes: self.sweeper.passes.load(Ordering::Relaxed),
                deleted: self.sweeper.deleted.load(Ordering::Relaxed),
                last_pass: (last_pass > 0)
                    .then(|| timestamp(Timestamp::from_unix_millis(i64::try_from(last_pass).unwrap_or(i64::MAX)))),
            }),
            store: self.store_kind.to_owned(),
        }))
    }

    async fn list(&self, request: Request<pb::ListRequest>) -> Result<Response<pb::ListResponse>, Status> {
        let _in_flight = self.guard.admit().map_err(denied)?;
        let credentials = CallCredentials::of(&request);
        let request = request.into_inner();
        let query = (|| {
            let namespace = admin_scope(&self.guard, &credentials, &request.namespace, false)?
                .expect("a listing names its namespace");
            if request.prefix.len() > Key::MAX_BYTES || request.prefix.chars().any(char::is_control) {
                return Err(CallError::Coordinator(Error::Invalid(InvalidInput::Key)));
            }
            let after = parse_page_token(&request.page_token, &namespace, &request.prefix)?;
            let limit = match request.page_size as usize {
                0 => DEFAULT_PAGE,
                size => size.min(MAX_PAGE),
            };
            Ok(ListQuery {
                namespace,
                prefix: request.prefix.clone(),
                state: state_filter(request.state)?,
                after,
                limit,
            })
        })()
        .map_err(denied)?;
        let page = self.coordinator.store().list(&query, self.coordinator.now()).await.map_err(store_error)?;
        let next_page_token = match page.last() {
            Some(last) if page.len() == query.limit => page_token(&query.namespace, &last.key),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListResponse { records: page.into_iter().map(summary).collect(), next_page_token }))
    }

    async fn purge(&self, request: Request<pb::PurgeRequest>) -> Result<Response<pb::PurgeResponse>, Status> {
        let _in_flight = self.guard.admit().map_err(denied)?;
        let credentials = CallCredentials::of(&request);
        let request = request.into_inner();
        let (namespace, key) = (|| {
            let namespace = admin_scope(&self.guard, &credentials, &request.namespace, false)?
                .expect("a purge names its namespace");
            let key = (!request.key.is_empty()).then(|| Key::parse(&request.key)).transpose()?;
            Ok::<_, CallError>((namespace, key))
        })()
        .map_err(denied)?;
        let deleted = self.coordinator.store().purge(&namespace, key.as_ref()).await.map_err(store_error)?;
        tracing::info!(namespace = %namespace.as_str(), key = key.as_ref().map(Key::as_str), deleted, "purged");
        // Claims waiting on a purged key look again (and acquire it).
        self.coordinator.wake_for(&idempotency_core::store::Wakeup::All);
        Ok(Response::new(pb::PurgeResponse { deleted }))
    }

    type ExportStream = ExportStream;

    async fn export(&self, request: Request<pb::ExportRequest>) -> Result<Response<ExportStream>, Status> {
        let in_flight = self.guard.admit().map_err(denied)?;
        let credentials = CallCredentials::of(&request);
        let request = request.into_inner();
        let namespace = admin_scope(&self.guard, &credentials, &request.namespace, true).map_err(denied)?;
        let (records, mut read) = mpsc::channel(256);
        let (chunks, sent) = mpsc::channel(4);
        let coordinator = Arc::clone(&self.coordinator);
        let now = coordinator.now();
        tokio::spawn(async move {
            let _in_flight = in_flight;
            // Records are encoded as the store reads them; its sender goes when it is done, and
            // a stopped encoder drops the receiver, which stops the store.
            let encoder = chunks.clone();
            let encode = async move {
                let mut chunk = Vec::with_capacity(CHUNK_BYTES + 4096);
                snapshot::encode_header(&mut chunk, 0);
                let mut count = 0u64;
                while let Some((namespace, key, record)) = read.recv().await {
                    if let Err(reason) = snapshot::encode_entry(&mut chunk, &namespace, &key, &record) {
                        tracing::error!(%reason, "a record cannot be exported");
                        return Err(store_error(StoreError::Corrupt(reason)));
                    }
                    count += 1;
                    if chunk.len() >= CHUNK_BYTES {
                        let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK_BYTES + 4096));
                        if encoder.send(Ok(pb::ExportResponse { chunk: full })).await.is_err() {
                            return Ok(None);
                        }
                    }
                }
                Ok(Some((chunk, count)))
            };
            let export = coordinator.store().export(namespace.as_ref(), now, records);
            let last = match tokio::join!(export, encode) {
                // The client went away.
                (_, Ok(None)) => return,
                (_, Err(status)) => Err(status),
                (Err(error), _) => Err(store_error(error)),
                (Ok(floor), Ok(Some((mut chunk, count)))) => {
                    snapshot::encode_trailer(&mut chunk, count, floor);
                    tracing::info!(records = count, fencing_floor = floor, "exported");
                    Ok(pb::ExportResponse { chunk })
                }
            };
            let _ = chunks.send(last).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(sent))))
    }

    async fn import(
        &self,
        request: Request<Streaming<pb::ImportRequest>>,
    ) -> Result<Response<pb::ImportResponse>, Status> {
        let _in_flight = self.guard.admit().map_err(denied)?;
        let credentials = CallCredentials::of(&request);
        // Authenticated before a byte is read; each namespace is judged once the file is whole.
        self.guard.authenticate(&credentials).map_err(denied)?;
        let mut stream = request.into_inner();
        // Spooled to an unnamed temporary file (gone when closed), then read and checked whole:
        // a stream cut short or damaged imports nothing.
        let spool_error =
            |error: std::io::Error| store_error(StoreError::unavailable_because("spooling the import", error));
        let mut spool = tempfile::tempfile().map_err(spool_error)?;
        while let Some(message) = stream.message().await? {
            spool.write_all(&message.chunk).map_err(spool_error)?;
        }
        spool.rewind().map_err(spool_error)?;
        let snapshot = tokio::task::spawn_blocking(move || {
            SnapshotReader::read_from(std::io::BufReader::new(spool), std::path::Path::new("the import stream"), |_| {})
        })
        .await
        .map_err(|_| store_error(StoreError::unavailable("reading the import failed")))?
        .map_err(|error| denied(CallError::InvalidSnapshot(error.to_string())))?;
        let mut namespaces: Vec<&Namespace> = snapshot.records.iter().map(|(namespace, _, _)| namespace).collect();
        namespaces.sort();
        namespaces.dedup();
        for namespace in namespaces {
            self.guard.authorize(&credentials, namespace.as_str(), Role::Admin).map_err(denied)?;
        }
        let counts = self
            .coordinator
            .store()
            .import(snapshot.records, snapshot.fencing_floor, self.coordinator.now())
            .await
            .map_err(store_error)?;
        tracing::info!(
            inserted = counts.inserted,
            replaced = counts.replaced,
            kept = counts.kept,
            expired = counts.expired,
            fencing_floor = counts.fencing_floor,
            "imported"
        );
        self.coordinator.wake_for(&idempotency_core::store::Wakeup::All);
        Ok(Response::new(pb::ImportResponse {
            inserted: counts.inserted,
            replaced: counts.replaced,
            kept: counts.kept,
            expired: counts.expired,
            fencing_floor: counts.fencing_floor,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_are_bound_to_their_listing() {
        let namespace = Namespace::parse("payments").unwrap();
        let key = Key::parse("order-7 ✓").unwrap();
        let token = page_token(&namespace, &key);
        assert_eq!(parse_page_token(&token, &namespace, "order-").unwrap(), Some(key));
        assert_eq!(parse_page_token("", &namespace, "").unwrap(), None);
        let other = Namespace::parse("refunds").unwrap();
        for (bad, namespace, prefix) in [
            (token.as_str(), &other, ""),
            (token.as_str(), &namespace, "refund-"),
            ("v1.zz.00", &namespace, ""),
            ("v2.7061796d656e7473.6b", &namespace, ""),
            ("garbage", &namespace, ""),
            ("v1.7061796d656e7473.", &namespace, ""),
        ] {
            assert!(matches!(parse_page_token(bad, namespace, prefix), Err(CallError::InvalidPageToken)), "{bad}");
        }
    }
}
