//! `idempotency-coordinator admin …`: the operator's client of a running server's Admin service
//! (`stats`, `list`, `purge`, `export`, `import`).
//!
//! It connects as the client crate does: plaintext to `http://`, TLS to `https://` with the CA
//! given, a client certificate for mTLS, and `authorization: Bearer <token>` with a token read
//! from a file or the `IDEMPOTENCY_TOKEN` environment variable (never from the command line, where
//! `ps` would show it). It prints text, or JSON with `--json`, and turns a failed call into an
//! error naming the status code and the `ErrorInfo` reason.
//!
//! Invariants:
//! - A snapshot file is used whole or not at all on this side too. `export` writes to a
//!   temporary file beside the destination (readable by its owner only), checks it with
//!   [`SnapshotReader::read_all`], syncs it and renames it into place, so the destination is
//!   either absent or whole; `import` checks the file whole before it connects.
//! - Unary calls have a deadline (`--timeout`); the export and import streams have none, since
//!   their length depends on the store's size.
//! - This module, a client of the Admin API, is the one place of this crate besides `service`
//!   that sees generated types.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use idempotency_proto::Reason;
use idempotency_proto::pb;
use idempotency_proto::pb::admin_client::AdminClient;
use serde_json::{Value, json};
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

use crate::config::{
    AdminArgs, AdminCommand, AdminConnection, AdminExportArgs, AdminImportArgs, AdminListArgs, AdminPurgeArgs,
    AdminStatsArgs, KeyStateFlag,
};
use crate::progress::Progress;
use crate::snapshot::{EntryCounter, SnapshotError, SnapshotReader};

/// The environment variable a bearer token is read from when no `--token-file` is given.
const TOKEN_VARIABLE: &str = "IDEMPOTENCY_TOKEN";

/// The size of the chunks `import` sends.
const IMPORT_CHUNK_BYTES: usize = 256 * 1024;

/// The largest message accepted or sent: an export chunk may carry a whole record, and a record's
/// response can be 64 MiB.
const MAX_MESSAGE_BYTES: usize = 80 * 1024 * 1024;

/// Why an `admin` command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminCliError {
    /// The command stopped on its own: flags it refuses before any call (a whole-namespace purge
    /// without `--yes`, TLS files for a plaintext target, …), or an answer it cannot go on from.
    #[error("{0}")]
    Refused(String),
    /// A credential file could not be read.
    #[error("cannot read {path}: {error}")]
    Credentials {
        /// The file.
        path: PathBuf,
        /// Why.
        error: io::Error,
    },
    /// The server could not be reached.
    #[error("cannot connect to {target}")]
    Connect {
        /// The `--target`.
        target: String,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
    /// The server refused or failed a call.
    #[error("{call} failed: status {code}{}: {message}", reason.as_ref().map(|reason| format!(", reason {reason}")).unwrap_or_default())]
    Call {
        /// The Admin method.
        call: &'static str,
        /// The gRPC status code, as the gRPC specification spells it (`PERMISSION_DENIED`).
        code: &'static str,
        /// The `google.rpc.ErrorInfo` reason, if the status carries one.
        reason: Option<String>,
        /// The status message.
        message: String,
    },
    /// A snapshot file is damaged, or could not be read or written.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A file could not be written, synced or renamed.
    #[error("{path}: {error}")]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        error: io::Error,
    },
    /// The command's output could not be written.
    #[error("cannot write the output: {0}")]
    Output(#[from] io::Error),
}

/// Runs one `admin` command, writing its report to `out` (progress goes to standard error).
pub async fn run(args: &AdminArgs, out: &mut (impl Write + Send)) -> Result<(), AdminCliError> {
    match &args.command {
        AdminCommand::Stats(args) => stats(args, out).await,
        AdminCommand::List(args) => list(args, out).await,
        AdminCommand::Purge(args) => purge(args, out).await,
        AdminCommand::Export(args) => export(args, out).await,
        AdminCommand::Import(args) => import(args, out).await,
    }
}

async fn stats(args: &AdminStatsArgs, out: &mut impl Write) -> Result<(), AdminCliError> {
    let connection = Connection::open(&args.connection).await?;
    let request = pb::StatsRequest { namespace: args.namespace.clone().unwrap_or_default() };
    let stats = connection.admin().stats(connection.unary(request)).await.map_err(call_failed("Stats"))?.into_inner();
    if args.json {
        writeln!(out, "{}", stats_json(&stats))?;
    } else {
        write!(out, "{}", stats_text(&stats))?;
    }
    Ok(())
}

async fn list(args: &AdminListArgs, out: &mut impl Write) -> Result<(), AdminCliError> {
    let connection = Connection::open(&args.connection).await?;
    let mut request = pb::ListRequest {
        namespace: args.namespace.clone(),
        prefix: args.prefix.clone().unwrap_or_default(),
        state: args.state.map_or(pb::KeyState::Unspecified, key_state) as i32,
        page_size: args.page_size.unwrap_or(0),
        page_token: args.page_token.clone().unwrap_or_default(),
    };
    // JSON lines stream out page by page; a table waits for its last page so that its columns
    // line up.
    let mut rows = Vec::new();
    let mut next_page = None;
    loop {
        let page =
            connection.admin().list(connection.unary(request.clone())).await.map_err(call_failed("List"))?.into_inner();
        if args.json {
            for record in &page.records {
                writeln!(out, "{}", record_json(record))?;
            }
        } else {
            rows.extend(page.records.iter().map(record_row));
        }
        if page.next_page_token.is_empty() {
            break;
        }
        if !args.all {
            next_page = Some(page.next_page_token);
            break;
        }
        if page.next_page_token == request.page_token {
            return Err(AdminCliError::Refused(
                "the server returned the same page token twice: stopping rather than looping".to_owned(),
            ));
        }
        request.page_token = page.next_page_token;
    }
    if !args.json {
        if rows.is_empty() {
            writeln!(out, "no records")?;
        } else {
            write!(out, "{}", table(&["KEY", "STATE", "FENCING-TOKEN", "ATTEMPT", "OWNER", "EXPIRES-AT"], &rows))?;
        }
    }
    if let Some(token) = next_page {
        // JSON lines on standard output stay all records: the hint goes beside them.
        let hint = format!("more records: continue with --page-token {token}");
        if args.json {
            eprintln!("{hint}");
        } else {
            writeln!(out, "{hint}")?;
        }
    }
    Ok(())
}

async fn purge(args: &AdminPurgeArgs, out: &mut impl Write) -> Result<(), AdminCliError> {
    if args.key.is_none() && !args.yes {
        return Err(AdminCliError::Refused(format!(
            "without --key, purge deletes every record of namespace {:?}: pass --yes to confirm, or --key to \
             delete one key",
            args.namespace
        )));
    }
    let connection = Connection::open(&args.connection).await?;
    let request = pb::PurgeRequest { namespace: args.namespace.clone(), key: args.key.clone().unwrap_or_default() };
    let purged = connection.admin().purge(connection.unary(request)).await.map_err(call_failed("Purge"))?.into_inner();
    if args.json {
        writeln!(out, "{}", json!({ "deleted": purged.deleted }))?;
    } else {
        match (&args.key, purged.deleted) {
            (Some(key), 0) => {
                writeln!(out, "key {key:?} of namespace {:?} was absent: nothing deleted", args.namespace)?
            }
            (Some(key), _) => writeln!(out, "deleted key {key:?} of namespace {:?}", args.namespace)?,
            (None, deleted) => {
                writeln!(out, "deleted {} of namespace {:?}", records_word(deleted), args.namespace)?;
            }
        }
    }
    Ok(())
}

async fn export(args: &AdminExportArgs, out: &mut impl Write) -> Result<(), AdminCliError> {
    let temporary = temporary_path(&args.output)?;
    let connection = Connection::open(&args.connection).await?;
    let file = crate::snapshot::create_private(&temporary)
        .map_err(|error| AdminCliError::File { path: temporary.clone(), error })?;
    let exported = async {
        let (file, bytes, expected) = receive_export(&connection, args, file, &temporary).await?;
        let (output, temporary) = (args.output.clone(), temporary.clone());
        let (records, fencing_floor) =
            tokio::task::spawn_blocking(move || install_export(file, &temporary, &output, expected))
                .await
                .expect("checking and installing the snapshot does not panic")?;
        Ok::<_, AdminCliError>((bytes, records, fencing_floor))
    }
    .await;
    let (bytes, records, fencing_floor) = exported.inspect_err(|_| {
        // The error that stopped the export is the one to report; a temporary file that cannot
        // be removed is overwritten by the next export to the same destination.
        let _ = std::fs::remove_file(&temporary);
    })?;
    if args.json {
        let report = json!({
            "output": args.output.display().to_string(),
            "records": records,
            "bytes": bytes,
            "fencing_floor": fencing_floor,
        });
        writeln!(out, "{report}")?;
    } else {
        writeln!(
            out,
            "wrote {} ({bytes} bytes) to {}; importing it raises fencing tokens above {fencing_floor}",
            records_word(records),
            args.output.display()
        )?;
    }
    Ok(())
}

/// Receives the export stream into `file`; returns the file, the bytes received and the records
/// counted in them.
async fn receive_export(
    connection: &Connection,
    args: &AdminExportArgs,
    file: File,
    temporary: &Path,
) -> Result<(File, u64, u64), AdminCliError> {
    let request = pb::ExportRequest { namespace: args.namespace.clone().unwrap_or_default() };
    let mut stream =
        connection.admin().export(connection.streaming(request)).await.map_err(call_failed("Export"))?.into_inner();
    let file_error = |error| AdminCliError::File { path: temporary.to_owned(), error };
    let mut writer = BufWriter::with_capacity(1024 * 1024, file);
    let mut progress = Progress::new("export", None);
    let mut counter = EntryCounter::new();
    let mut bytes = 0;
    while let Some(message) = stream.message().await.map_err(call_failed("Export"))? {
        let chunk: &[u8] = &message.chunk;
        writer.write_all(chunk).map_err(file_error)?;
        bytes += chunk.len() as u64;
        for _ in 0..counter.feed(chunk) {
            progress.inc();
        }
    }
    progress.finish();
    let file = writer.into_inner().map_err(|error| file_error(error.into_error()))?;
    Ok((file, bytes, counter.records))
}

/// Syncs the received snapshot, checks it whole, and moves it into place.
fn install_export(file: File, temporary: &Path, output: &Path, expected: u64) -> Result<(u64, u64), AdminCliError> {
    let file_error = |path: &Path| {
        let path = path.to_owned();
        move |error| AdminCliError::File { path, error }
    };
    file.sync_all().map_err(file_error(temporary))?;
    drop(file);
    let mut progress = Progress::new("check", Some(expected));
    let snapshot = SnapshotReader::read_all(temporary, |_| progress.inc())?;
    progress.finish();
    crate::snapshot::move_into_place(temporary, output).map_err(file_error(output))?;
    Ok((snapshot.records.len() as u64, snapshot.fencing_floor))
}

async fn import(args: &AdminImportArgs, out: &mut impl Write) -> Result<(), AdminCliError> {
    let input = args.input.clone();
    // Checked before connecting: a damaged file is refused here, with nothing sent.
    let (records, fencing_floor) = tokio::task::spawn_blocking(move || {
        let mut progress = Progress::new("check", None);
        let snapshot = SnapshotReader::read_all(&input, |_| progress.inc())?;
        progress.finish();
        Ok::<_, AdminCliError>((snapshot.records.len() as u64, snapshot.fencing_floor))
    })
    .await
    .expect("checking the snapshot does not panic")?;
    eprintln!(
        "{} is a whole snapshot of {} (fencing floor {fencing_floor}); sending it",
        args.input.display(),
        records_word(records)
    );
    let connection = Connection::open(&args.connection).await?;
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    let input = args.input.clone();
    let reader = tokio::task::spawn_blocking(move || send_file(&input, records, &sender));
    let answer = connection.admin().import(connection.streaming(ReceiverStream::new(receiver))).await;
    // A file that could not be read to its end made the stream end early, so the server refused
    // it: the read error is the cause to report.
    reader.await.expect("reading the snapshot does not panic")?;
    let counts = answer.map_err(call_failed("Import"))?.into_inner();
    if args.json {
        let report = json!({
            "inserted": counts.inserted,
            "replaced": counts.replaced,
            "kept": counts.kept,
            "expired": counts.expired,
            "fencing_floor": counts.fencing_floor,
        });
        writeln!(out, "{report}")?;
    } else {
        writeln!(
            out,
            "imported {} ({} new, {} replacing an earlier state of their key); {} left alone (the server holds \
             the same or a later state); {} expired left out; fencing tokens continue above {}",
            records_word(counts.inserted + counts.replaced),
            counts.inserted,
            counts.replaced,
            counts.kept,
            counts.expired,
            counts.fencing_floor
        )?;
    }
    Ok(())
}

/// Reads `path` in chunks into the import stream, showing the records sent (of `records`). Stops
/// early, without error, when the call has ended (its status then tells why).
fn send_file(
    path: &Path,
    records: u64,
    sender: &tokio::sync::mpsc::Sender<pb::ImportRequest>,
) -> Result<(), AdminCliError> {
    let file_error = |error| AdminCliError::File { path: path.to_owned(), error };
    let mut file = File::open(path).map_err(file_error)?;
    let mut progress = Progress::new("import", Some(records));
    let mut counter = EntryCounter::new();
    loop {
        let mut chunk = Vec::with_capacity(IMPORT_CHUNK_BYTES);
        (&mut file).take(IMPORT_CHUNK_BYTES as u64).read_to_end(&mut chunk).map_err(file_error)?;
        if chunk.is_empty() {
            break;
        }
        for _ in 0..counter.feed(&chunk) {
            progress.inc();
        }
        if sender.blocking_send(pb::ImportRequest { chunk }).is_err() {
            break;
        }
    }
    progress.finish();
    Ok(())
}

/// A connection to the Admin service, with the credentials and the deadline every call carries.
struct Connection {
    admin: AdminClient<Channel>,
    /// `Bearer <token>`, marked sensitive so that it is never logged.
    authorization: Option<MetadataValue<Ascii>>,
    timeout: Duration,
}

impl Connection {
    async fn open(settings: &AdminConnection) -> Result<Connection, AdminCliError> {
        // Credentials first: a missing file is reported before the network is tried.
        let token = bearer_token(settings.token_file.as_deref(), std::env::var(TOKEN_VARIABLE).ok())?;
        let authorization = token.as_deref().map(authorization).transpose()?;
        let channel = endpoint(settings)?
            .connect()
            .await
            .map_err(|source| AdminCliError::Connect { target: settings.target.clone(), source })?;
        let admin = AdminClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Connection { admin, authorization, timeout: settings.timeout })
    }

    /// The client, for one call (clones share the channel).
    fn admin(&self) -> AdminClient<Channel> {
        self.admin.clone()
    }

    /// A unary call's request: credentials and the deadline.
    fn unary<T>(&self, message: T) -> Request<T> {
        let mut request = self.streaming(message);
        request.set_timeout(self.timeout);
        request
    }

    /// A streaming call's request: credentials, no deadline.
    fn streaming<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(authorization) = &self.authorization {
            request.metadata_mut().insert("authorization", authorization.clone());
        }
        request
    }
}

/// The endpoint `--target` and the TLS flags describe.
fn endpoint(settings: &AdminConnection) -> Result<Endpoint, AdminCliError> {
    let tls_flags = settings.tls_ca.is_some() || settings.tls_cert.is_some() || settings.tls_server_name.is_some();
    let tls = uses_tls(&settings.target, tls_flags).map_err(AdminCliError::Refused)?;
    let endpoint = Endpoint::from_shared(settings.target.clone())
        .map_err(|_| AdminCliError::Refused(format!("--target {:?} is not a valid URL", settings.target)))?
        .tcp_nodelay(true)
        .connect_timeout(settings.timeout);
    if !tls {
        return Ok(endpoint);
    }
    let Some(ca) = &settings.tls_ca else {
        return Err(AdminCliError::Refused(
            "an https:// target needs --tls-ca: the CA (PEM file) that signed the server's certificate".to_owned(),
        ));
    };
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_credential(ca)?));
    if let (Some(certificate), Some(key)) = (&settings.tls_cert, &settings.tls_key) {
        config = config.identity(Identity::from_pem(read_credential(certificate)?, read_credential(key)?));
    }
    if let Some(name) = &settings.tls_server_name {
        config = config.domain_name(name);
    }
    endpoint.tls_config(config).map_err(|source| AdminCliError::Connect { target: settings.target.clone(), source })
}

/// Whether `target` is reached over TLS; TLS flags with a plaintext target are a mistake to
/// point out, not to ignore.
fn uses_tls(target: &str, tls_flags: bool) -> Result<bool, String> {
    match target.split_once("://") {
        Some(("https", rest)) if !rest.is_empty() => Ok(true),
        Some(("http", rest)) if !rest.is_empty() => {
            if tls_flags {
                Err(format!("TLS flags were given for the plaintext target {target}: use https://"))
            } else {
                Ok(false)
            }
        }
        _ => Err(format!("--target {target:?}: give http://host:port, or https://host:port for TLS")),
    }
}

fn read_credential(path: &Path) -> Result<Vec<u8>, AdminCliError> {
    std::fs::read(path).map_err(|error| AdminCliError::Credentials { path: path.to_owned(), error })
}

/// The bearer token: the content of `token_file` if given, else the environment variable's value
/// (`environment`) if set and not blank, else none. Surrounding whitespace (a file's final
/// newline) is not part of it.
fn bearer_token(token_file: Option<&Path>, environment: Option<String>) -> Result<Option<String>, AdminCliError> {
    match token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|error| AdminCliError::Credentials { path: path.to_owned(), error })?;
            let token = text.trim();
            if token.is_empty() {
                return Err(AdminCliError::Refused(format!("--token-file {} holds no token", path.display())));
            }
            Ok(Some(token.to_owned()))
        }
        None => Ok(environment.map(|token| token.trim().to_owned()).filter(|token| !token.is_empty())),
    }
}

fn authorization(token: &str) -> Result<MetadataValue<Ascii>, AdminCliError> {
    // The message never shows the token: an error can end up in a log.
    let mut value = MetadataValue::try_from(format!("Bearer {token}"))
        .map_err(|_| AdminCliError::Refused("the bearer token holds characters a header cannot carry".to_owned()))?;
    value.set_sensitive(true);
    Ok(value)
}

/// Turns the status of a failed `call` into the error reported.
fn call_failed(call: &'static str) -> impl Fn(Status) -> AdminCliError {
    move |status| {
        let reason = match Reason::of(&status) {
            Some(reason) => Some(reason.as_str().to_owned()),
            // A reason this build does not know (a newer server's) is still worth showing.
            None => status.get_details_error_info().map(|info| info.reason).filter(|reason| !reason.is_empty()),
        };
        // A status made on this side (the connection broke, a handshake was refused) says little
        // by itself ("transport error"); its causes say what happened.
        let mut message = status.message().to_owned();
        let mut cause = std::error::Error::source(&status);
        while let Some(error) = cause {
            let text = error.to_string();
            if !message.contains(&text) {
                message = format!("{message}: {text}");
            }
            cause = error.source();
        }
        AdminCliError::Call { call, code: code_name(status.code()), reason, message }
    }
}

/// A status code as the gRPC specification spells it.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn key_state(flag: KeyStateFlag) -> pb::KeyState {
    match flag {
        KeyStateFlag::InProgress => pb::KeyState::InProgress,
        KeyStateFlag::LeaseExpired => pb::KeyState::LeaseExpired,
        KeyStateFlag::Released => pb::KeyState::Released,
        KeyStateFlag::Completed => pb::KeyState::Completed,
    }
}

/// A state as `--state` spells it.
fn state_name(state: i32) -> String {
    match pb::KeyState::try_from(state) {
        Ok(pb::KeyState::InProgress) => "in-progress".to_owned(),
        Ok(pb::KeyState::LeaseExpired) => "lease-expired".to_owned(),
        Ok(pb::KeyState::Released) => "released".to_owned(),
        Ok(pb::KeyState::Completed) => "completed".to_owned(),
        Ok(pb::KeyState::Unspecified) => "unspecified".to_owned(),
        Err(_) => format!("unknown ({state})"),
    }
}

/// A timestamp in RFC 3339 with milliseconds (UTC), if set.
fn rfc3339(timestamp: Option<&prost_types::Timestamp>) -> Option<String> {
    /// 10000-01-01T00:00:00Z: humantime writes years up to 9999.
    const YEAR_10000: i64 = 253_402_300_800;
    let timestamp = timestamp?;
    match SystemTime::try_from(*timestamp) {
        Ok(time) if (0..YEAR_10000).contains(&timestamp.seconds) => {
            Some(humantime::format_rfc3339_millis(time).to_string())
        }
        // Out of humantime's range (no server sends these): prost's own notation.
        _ => Some(timestamp.to_string()),
    }
}

fn rfc3339_or_dash(timestamp: Option<&prost_types::Timestamp>) -> String {
    rfc3339(timestamp).unwrap_or_else(|| "-".to_owned())
}

/// `1 record`, `2 records`.
fn records_word(count: u64) -> String {
    format!("{count} record{}", if count == 1 { "" } else { "s" })
}

/// Bytes for people: `512 B`, `1.5 KiB`, `3.2 GiB`.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

fn stats_text(stats: &pb::StatsResponse) -> String {
    let mut text = format!(
        "store: {}; {} stored (expired ones not yet swept included); {} on disk\n",
        if stats.store.is_empty() { "unknown" } else { &stats.store },
        records_word(stats.records),
        human_bytes(stats.disk_bytes)
    );
    text += &format!("oldest record: {}\n", rfc3339_or_dash(stats.oldest_record.as_ref()));
    match &stats.sweeper {
        Some(sweeper) => {
            text += &format!(
                "sweeper: {} passes, {} deleted, last pass {}\n",
                sweeper.passes,
                sweeper.deleted,
                rfc3339_or_dash(sweeper.last_pass.as_ref())
            );
        }
        None => text += "sweeper: -\n",
    }
    if stats.namespaces.is_empty() {
        text += "no live records\n";
        return text;
    }
    let header = ["NAMESPACE", "IN-PROGRESS", "LEASE-EXPIRED", "RELEASED", "COMPLETED", "EXPIRED", "OLDEST-RECORD"];
    let rows: Vec<Vec<String>> = stats
        .namespaces
        .iter()
        .map(|namespace| {
            vec![
                namespace.namespace.clone(),
                namespace.in_progress.to_string(),
                namespace.lease_expired.to_string(),
                namespace.released.to_string(),
                namespace.completed.to_string(),
                namespace.expired.to_string(),
                rfc3339_or_dash(namespace.oldest_record.as_ref()),
            ]
        })
        .collect();
    text += &table(&header, &rows);
    text
}

fn stats_json(stats: &pb::StatsResponse) -> Value {
    let namespaces: Vec<Value> = stats
        .namespaces
        .iter()
        .map(|namespace| {
            json!({
                "namespace": namespace.namespace,
                "in_progress": namespace.in_progress,
                "lease_expired": namespace.lease_expired,
                "released": namespace.released,
                "completed": namespace.completed,
                "expired": namespace.expired,
                "oldest_record": rfc3339(namespace.oldest_record.as_ref()),
            })
        })
        .collect();
    let sweeper = stats.sweeper.as_ref().map(|sweeper| {
        json!({
            "passes": sweeper.passes,
            "deleted": sweeper.deleted,
            "last_pass": rfc3339(sweeper.last_pass.as_ref()),
        })
    });
    json!({
        "store": stats.store,
        "records": stats.records,
        "disk_bytes": stats.disk_bytes,
        "oldest_record": rfc3339(stats.oldest_record.as_ref()),
        "sweeper": sweeper,
        "namespaces": namespaces,
    })
}

fn record_row(record: &pb::RecordSummary) -> Vec<String> {
    vec![
        record.key.clone(),
        state_name(record.state),
        record.fencing_token.to_string(),
        record.attempt.to_string(),
        if record.owner.is_empty() { "-".to_owned() } else { record.owner.clone() },
        rfc3339_or_dash(record.expires_at.as_ref()),
    ]
}

fn record_json(record: &pb::RecordSummary) -> Value {
    json!({
        "key": record.key,
        "state": state_name(record.state),
        "fencing_token": record.fencing_token,
        "attempt": record.attempt,
        "owner": record.owner,
        "lease_expires_at": rfc3339(record.lease_expires_at.as_ref()),
        "completed_at": rfc3339(record.completed_at.as_ref()),
        "expires_at": rfc3339(record.expires_at.as_ref()),
        "updated_at": rfc3339(record.updated_at.as_ref()),
        "response_bytes": record.response_bytes,
    })
}

/// A text table: a header line, then one line per row, columns two spaces apart and aligned.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let header: Vec<String> = header.iter().map(|title| (*title).to_owned()).collect();
    let mut widths: Vec<usize> = header.iter().map(|title| title.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let last = row.len().saturating_sub(1);
        for (column, cell) in row.iter().enumerate() {
            text += cell;
            if column < last {
                let width = widths.get(column).copied().unwrap_or(0);
                text.extend(std::iter::repeat_n(' ', width.saturating_sub(cell.chars().count()) + 2));
            }
        }
        text.push('\n');
    }
    text
}

/// The temporary file an export is written to: beside `output` (so that the rename stays on one
/// filesystem), named after it.
fn temporary_path(output: &Path) -> Result<PathBuf, AdminCliError> {
    let Some(name) = output.file_name() else {
        return Err(AdminCliError::Refused(format!("--output {} does not name a file", output.display())));
    };
    let mut temporary = name.to_owned();
    temporary.push(".partial");
    Ok(output.with_file_name(temporary))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::snapshot::SnapshotWriter;
    use idempotency_core::domain::{FencingToken, Fingerprint, Key, LeaseToken, Namespace, Owner, Record};
    use idempotency_core::domain::{RecordState, Timestamp};

    fn timestamp(seconds: i64, nanos: i32) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos })
    }

    #[test]
    fn timestamps_read_as_rfc3339_with_milliseconds() {
        let check = |timestamp: Option<prost_types::Timestamp>, expected: Option<&str>| {
            assert_eq!(rfc3339(timestamp.as_ref()).as_deref(), expected, "{timestamp:?}");
        };
        check(None, None);
        check(timestamp(0, 0), Some("1970-01-01T00:00:00.000Z"));
        check(timestamp(1_700_000_000, 123_456_789), Some("2023-11-14T22:13:20.123Z"));
        check(timestamp(253_402_300_799, 0), Some("9999-12-31T23:59:59.000Z"));
        // Out of humantime's range: shown anyway, never a panic.
        assert!(rfc3339(timestamp(-1, 0).as_ref()).is_some_and(|text| text.starts_with("1969")));
        assert!(rfc3339(timestamp(253_402_300_800, 0).as_ref()).is_some());
        assert_eq!(rfc3339_or_dash(None), "-");
    }

    #[test]
    fn states_are_named_as_the_state_flag_spells_them() {
        let check = |flag: KeyStateFlag, expected: &str| {
            assert_eq!(state_name(key_state(flag) as i32), expected);
            let parsed = <KeyStateFlag as clap::ValueEnum>::from_str(expected, false).expect("a --state value");
            assert_eq!(parsed, flag);
        };
        check(KeyStateFlag::InProgress, "in-progress");
        check(KeyStateFlag::LeaseExpired, "lease-expired");
        check(KeyStateFlag::Released, "released");
        check(KeyStateFlag::Completed, "completed");
        assert_eq!(state_name(0), "unspecified");
        assert_eq!(state_name(9), "unknown (9)");
    }

    #[test]
    fn targets_say_whether_tls_is_used() {
        let check = |target: &str, tls_flags: bool, expected: Result<bool, &str>| {
            let result = uses_tls(target, tls_flags);
            match expected {
                Ok(tls) => assert_eq!(result, Ok(tls), "{target}"),
                Err(fragment) => {
                    assert!(result.as_ref().is_err_and(|error| error.contains(fragment)), "{target}: {result:?}")
                }
            }
        };
        check("http://127.0.0.1:50051", false, Ok(false));
        check("https://coordinator.internal:50051", false, Ok(true));
        check("https://coordinator.internal:50051", true, Ok(true));
        check("http://127.0.0.1:50051", true, Err("use https://"));
        check("127.0.0.1:50051", false, Err("give http://host:port"));
        check("grpc://h:1", false, Err("give http://host:port"));
        check("http://", false, Err("give http://host:port"));
    }

    #[test]
    fn the_token_comes_from_its_file_first_then_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "  s3cret\n").unwrap();
        let from = |file: Option<&Path>, environment: Option<&str>| {
            bearer_token(file, environment.map(str::to_owned)).map_err(|error| error.to_string())
        };
        assert_eq!(from(Some(&file), Some("other")), Ok(Some("s3cret".to_owned())));
        assert_eq!(from(None, Some(" other\n")), Ok(Some("other".to_owned())));
        assert_eq!(from(None, Some("  ")), Ok(None));
        assert_eq!(from(None, None), Ok(None));
        let missing = from(Some(&dir.path().join("absent")), None).unwrap_err();
        assert!(missing.starts_with("cannot read"), "{missing}");
        std::fs::write(&file, "\n").unwrap();
        assert!(from(Some(&file), None).unwrap_err().contains("holds no token"));

        let value = authorization("s3cret").unwrap();
        assert!(value.is_sensitive());
        assert_eq!(value.to_str().unwrap(), "Bearer s3cret");
        let refused = authorization("line\nbreak").unwrap_err().to_string();
        assert!(!refused.contains("line"), "the token stays out of messages: {refused}");
    }

    #[test]
    fn a_failed_call_names_its_code_and_reason() {
        let check = |status: Status, expected: &str| {
            assert_eq!(call_failed("List")(status).to_string(), expected);
        };
        check(
            Reason::NamespaceNotAllowed.status("may not use namespace \"x\"", HashMap::new()),
            "List failed: status PERMISSION_DENIED, reason NAMESPACE_NOT_ALLOWED: may not use namespace \"x\"",
        );
        check(Status::unimplemented("no Admin here"), "List failed: status UNIMPLEMENTED: no Admin here");
        let unknown = Status::with_error_details(
            Code::Unavailable,
            "later",
            tonic_types::ErrorDetails::with_error_info("NEWER_REASON", "idempotency.v1", HashMap::new()),
        );
        check(unknown, "List failed: status UNAVAILABLE, reason NEWER_REASON: later");
        assert_eq!(code_name(Code::DeadlineExceeded), "DEADLINE_EXCEEDED");
    }

    #[test]
    fn tables_align_columns_under_their_header() {
        let row = |cells: &[&str]| cells.iter().map(|cell| (*cell).to_owned()).collect::<Vec<_>>();
        let header = ["KEY", "STATE", "OWNER"];
        assert_eq!(table(&header, &[]), "KEY  STATE  OWNER\n");
        assert_eq!(
            table(&header, &[row(&["order-1", "completed", "api-1"]), row(&["o2", "released", "-"])]),
            "KEY      STATE      OWNER\norder-1  completed  api-1\no2       released   -\n"
        );
    }

    #[test]
    fn bytes_and_counts_read_for_people() {
        let check = |bytes: u64, expected: &str| assert_eq!(human_bytes(bytes), expected);
        check(0, "0 B");
        check(1023, "1023 B");
        check(1536, "1.5 KiB");
        check(5 << 30, "5.0 GiB");
        check(u64::MAX, "16384.0 PiB");
        assert_eq!(
            (records_word(1), records_word(0), records_word(2)),
            ("1 record".into(), "0 records".into(), "2 records".into())
        );
    }

    #[test]
    fn stats_show_each_namespace_and_the_store() {
        let stats = pb::StatsResponse {
            records: 5,
            namespaces: vec![pb::NamespaceStats {
                namespace: "payments".to_owned(),
                in_progress: 1,
                lease_expired: 0,
                released: 2,
                completed: 1,
                expired: 1,
                oldest_record: timestamp(0, 0),
            }],
            disk_bytes: 2048,
            oldest_record: timestamp(0, 0),
            sweeper: Some(pb::SweeperStats { passes: 3, deleted: 4, last_pass: None }),
            store: "sled".to_owned(),
        };
        let text = stats_text(&stats);
        assert!(text.starts_with("store: sled; 5 records stored"), "{text}");
        assert!(text.contains("2.0 KiB on disk"), "{text}");
        assert!(text.contains("sweeper: 3 passes, 4 deleted, last pass -"), "{text}");
        assert!(
            text.contains("payments   1            0              2         1          1        1970-01-01"),
            "{text}"
        );
        let json = stats_json(&stats);
        assert_eq!(json["namespaces"][0]["released"], 2);
        assert_eq!(json["oldest_record"], "1970-01-01T00:00:00.000Z");
        assert_eq!(json["sweeper"]["last_pass"], Value::Null);
        let empty = pb::StatsResponse { namespaces: Vec::new(), ..stats };
        assert!(stats_text(&empty).ends_with("no live records\n"));
    }

    #[test]
    fn a_listed_record_shows_its_state_token_and_expiry() {
        let record = pb::RecordSummary {
            key: "order-1".to_owned(),
            state: pb::KeyState::Completed as i32,
            fencing_token: 42,
            attempt: 2,
            owner: String::new(),
            completed_at: timestamp(60, 0),
            expires_at: timestamp(120, 0),
            response_bytes: 10,
            ..pb::RecordSummary::default()
        };
        assert_eq!(record_row(&record), ["order-1", "completed", "42", "2", "-", "1970-01-01T00:02:00.000Z"]);
        let json = record_json(&record);
        assert_eq!(
            (&json["state"], &json["fencing_token"], &json["lease_expires_at"], &json["completed_at"]),
            (&json!("completed"), &json!(42), &Value::Null, &json!("1970-01-01T00:01:00.000Z"))
        );
    }

    #[test]
    fn the_temporary_export_file_sits_beside_the_output() {
        assert_eq!(temporary_path(Path::new("/backups/a.snapshot")).unwrap(), Path::new("/backups/a.snapshot.partial"));
        assert_eq!(temporary_path(Path::new("a")).unwrap(), Path::new("a.partial"));
        assert!(temporary_path(Path::new("/")).is_err());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.partial");
        std::fs::write(&path, "left over").unwrap();
        crate::snapshot::create_private(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let metadata = std::fs::metadata(&path).unwrap();
        assert_eq!((metadata.len(), metadata.permissions().mode() & 0o777), (0, 0o600));
    }

    fn snapshot_bytes(records: u64) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let mut writer = SnapshotWriter::create(&path, 9).unwrap();
        for n in 0..records {
            let record = Record {
                fingerprint: Fingerprint::parse(b"fp").unwrap(),
                fencing_token: FencingToken(n + 1),
                attempt: 1,
                owner: Owner::parse("api-1").unwrap(),
                retention_millis: 60_000,
                updated_at: Timestamp::from_unix_millis(1_000),
                state: RecordState::Released { by: LeaseToken::generate() },
            };
            let key = Key::parse(&"k".repeat(1 + n as usize * 7)).unwrap();
            writer.write(&Namespace::parse("payments").unwrap(), &key, &record).unwrap();
        }
        writer.finish().unwrap();
        std::fs::read(&path).unwrap()
    }

    #[test]
    fn records_are_counted_as_a_snapshot_streams_in_chunks_cut_anywhere() {
        for records in [0, 1, 5] {
            let bytes = snapshot_bytes(records);
            for chunk in [1, 2, 3, 5, 7, 20, 21, 64, bytes.len()] {
                let mut counter = EntryCounter::new();
                let counted: u64 = bytes.chunks(chunk).map(|piece| counter.feed(piece)).sum();
                assert_eq!((counted, counter.records, counter.ended), (records, records, true), "chunks of {chunk}");
            }
            // Cut inside the first entry (header, tag, length, one payload byte): nothing counted.
            let mut counter = EntryCounter::new();
            if records > 0 {
                assert_eq!(counter.feed(&bytes[..20 + 1 + 4 + 1]), 0);
            }
        }
        let mut counter = EntryCounter::new();
        assert_eq!(counter.feed(b"not a snapshot at all, just some words"), 0);
    }
}
