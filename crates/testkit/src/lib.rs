//! Test support for the coordinator's crates (not published, and no production crate depends on
//! it): [`TestServer`], a coordinator served in-process on a loopback port with a manual clock and
//! a temporary data directory, restartable on the same directory; [`ChildServer`], the real binary
//! as a child process; the [`history`] checker of P1–P5; a seeded [`Rng`]; request builders.

#![warn(unreachable_pub)]

pub mod history;
pub mod pki;
mod random;

pub use random::{Rng, body_size};

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use idempotency_coordinator::Config;
use idempotency_coordinator::server::{self, ServeOptions, ServerError};
use idempotency_coordinator::stores::AnyStore;
use idempotency_core::Coordinator;
use idempotency_core::clock::ManualClock;
use idempotency_core::domain::Timestamp;
use idempotency_core::store::SweepReport;
use idempotency_proto::pb;
use idempotency_proto::pb::coordinator_client::CoordinatorClient;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// 2026-01-01T00:00:00Z: tests start here and move the clock by hand.
pub const START: Timestamp = Timestamp::from_unix_millis(1_767_225_600_000);

/// Where a test's records live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// The embedded store in a temporary directory.
    Sled,
    /// The PostgreSQL test database, in a schema of the test's own.
    Postgres(String),
}

/// The variable that names the PostgreSQL database the tests may use (CI sets it).
pub const POSTGRES_ENV: &str = "IDEMPOTENCY_TEST_POSTGRES";

impl Backend {
    /// The PostgreSQL backend, or `None` (after saying why) when no test database is configured.
    /// In CI a missing database is a failure, never a skip.
    pub fn postgres() -> Option<Backend> {
        match std::env::var(POSTGRES_ENV) {
            Ok(url) if !url.is_empty() => Some(Backend::Postgres(url)),
            _ => {
                assert!(std::env::var_os("CI").is_none(), "CI must set {POSTGRES_ENV} (see .ci/run)");
                eprintln!("skipped: PostgreSQL tests need {POSTGRES_ENV}=postgres://user@host:port/database");
                None
            }
        }
    }
}

/// A fresh schema name for one test's PostgreSQL store. Schemas left by earlier test processes
/// (named after their pid) are dropped by [`drop_stale_schemas`].
pub fn test_schema() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("test_{}_{n}", std::process::id())
}

/// Drops the test schemas of processes that no longer run, once per process.
pub async fn drop_stale_schemas(url: &str) {
    static ONCE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    ONCE.get_or_init(|| async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("PostgreSQL");
        tokio::spawn(connection);
        let rows = client
            .query("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'test\\_%'", &[])
            .await
            .expect("schemas listed");
        for row in rows {
            let name: String = row.get(0);
            let pid = name.split('_').nth(1).unwrap_or("");
            if !Path::new("/proc").join(pid).exists() {
                let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE")).await;
            }
        }
    })
    .await;
}

pub struct TestServer {
    pub clock: ManualClock,
    pub config: Config,
    pub addr: SocketAddr,
    pub backend: Backend,
    coordinator: Option<Arc<Coordinator<AnyStore>>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
    _dir: TempDir,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    /// Starts on the sled store with the default configuration changed by `configure`.
    pub async fn start_with(configure: impl FnOnce(&mut Config)) -> TestServer {
        Self::start_on_with(Backend::Sled, configure).await
    }

    /// Starts on `backend` with the default configuration.
    pub async fn start_on(backend: Backend) -> TestServer {
        Self::start_on_with(backend, |_| {}).await
    }

    /// Starts on `backend` with the default configuration changed by `configure`.
    pub async fn start_on_with(backend: Backend, configure: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let data_dir = dir.path().join("data");
        let mut config = Config::parse_from([
            "idempotency-coordinator".as_ref(),
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--data-dir".as_ref(),
            data_dir.as_os_str(),
        ]);
        // The sweeper is driven by hand in tests, through `sweep`.
        config.sweep_interval = Duration::from_secs(3600);
        if let Backend::Postgres(url) = &backend {
            drop_stale_schemas(url).await;
            config.store = Some(url.clone());
            config.postgres_schema = test_schema();
        }
        configure(&mut config);
        let mut server = TestServer {
            clock: ManualClock::new(START),
            config,
            backend,
            addr: "127.0.0.1:0".parse().unwrap(),
            coordinator: None,
            stop: None,
            task: None,
            _dir: dir,
        };
        server.launch().await;
        server
    }

    async fn launch(&mut self) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a loopback port");
        self.addr = listener.local_addr().unwrap();
        // After an in-process restart, sled's I/O threads may hold the directory lock a moment
        // longer than the last handle; a lock held by another process would fail every retry.
        let give_up = std::time::Instant::now() + Duration::from_secs(5);
        let coordinator = loop {
            match server::open_on_caller_time(&self.config, Arc::new(self.clock.clone())).await {
                Ok(coordinator) => break coordinator,
                Err(error)
                    if std::time::Instant::now() < give_up && error.to_string().contains("could not acquire lock") =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(error) => panic!("the store opens: {error}"),
            }
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let options = ServeOptions::load(&self.config).expect("the TLS material and the auth file load");
        self.task = Some(tokio::spawn(server::serve(listener, Arc::clone(&coordinator), options, async move {
            let _ = stopped.await;
            server::Stop::Now
        })));
        self.coordinator = Some(coordinator);
        self.stop = Some(stop);
    }

    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }

    pub fn coordinator(&self) -> &Coordinator<AnyStore> {
        self.coordinator.as_ref().expect("the server runs")
    }

    pub async fn client(&self) -> CoordinatorClient<Channel> {
        CoordinatorClient::new(self.channel().await)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr)).unwrap().connect().await.expect("the server accepts")
    }

    /// Stops the server gracefully and waits until its store is closed.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("the server task does not panic").expect("the server stops cleanly");
        }
        self.coordinator = None;
    }

    /// Stops the server and starts it again on the same data directory and clock.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.launch().await;
    }

    /// Runs the sweeper until nothing expired is left.
    pub async fn sweep(&self) -> SweepReport {
        let mut total = SweepReport::default();
        loop {
            let report = self.coordinator().sweep(100).await.expect("sweeping works");
            total.deleted += report.deleted;
            total.scanned += report.scanned;
            if !report.more {
                return total;
            }
        }
    }

    pub async fn digest(&self) -> u64 {
        self.coordinator().store().contents_digest().await.expect("the store reads")
    }

    /// The number of stored records, counted now.
    pub async fn record_count(&self) -> u64 {
        self.coordinator().store().counted_records().await.expect("the store counts")
    }

    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

pub fn secs(seconds: i64) -> prost_types::Duration {
    prost_types::Duration { seconds, nanos: 0 }
}

pub fn millis(millis: i64) -> prost_types::Duration {
    prost_types::Duration { seconds: millis / 1000, nanos: ((millis % 1000) * 1_000_000) as i32 }
}

pub fn claim_request(key: &str, fingerprint: &[u8]) -> pb::ClaimRequest {
    pb::ClaimRequest {
        namespace: "payments".into(),
        key: key.into(),
        fingerprint: fingerprint.to_vec(),
        lease_ttl: Some(secs(10)),
        retention: Some(secs(3600)),
        ..Default::default()
    }
}

pub fn response(body: &[u8]) -> pb::Response {
    pb::Response { body: body.to_vec().into(), metadata: [("status".to_owned(), "201".to_owned())].into() }
}

pub fn complete_request(key: &str, lease_token: &str, body: &[u8]) -> pb::CompleteRequest {
    pb::CompleteRequest {
        namespace: "payments".into(),
        key: key.into(),
        lease_token: lease_token.into(),
        response: Some(response(body)),
        retention: None,
    }
}

pub fn release_request(key: &str, lease_token: &str) -> pb::ReleaseRequest {
    pb::ReleaseRequest { namespace: "payments".into(), key: key.into(), lease_token: lease_token.into() }
}

pub fn renew_request(key: &str, lease_token: &str, ttl: prost_types::Duration) -> pb::RenewRequest {
    pb::RenewRequest {
        namespace: "payments".into(),
        key: key.into(),
        lease_token: lease_token.into(),
        lease_ttl: Some(ttl),
    }
}

pub fn lookup_request(key: &str) -> pb::LookupRequest {
    pb::LookupRequest { namespace: "payments".into(), key: key.into() }
}

pub fn outcome(response: pb::ClaimResponse) -> pb::claim_response::Outcome {
    response.outcome.expect("a claim always has an outcome")
}

pub fn acquired(response: pb::ClaimResponse) -> pb::Acquired {
    match outcome(response) {
        pb::claim_response::Outcome::Acquired(acquired) => acquired,
        other => panic!("expected acquired, got {other:?}"),
    }
}

pub fn in_progress(response: pb::ClaimResponse) -> pb::InProgress {
    match outcome(response) {
        pb::claim_response::Outcome::InProgress(in_progress) => in_progress,
        other => panic!("expected in_progress, got {other:?}"),
    }
}

pub fn completed(response: pb::ClaimResponse) -> pb::Completed {
    match outcome(response) {
        pb::claim_response::Outcome::Completed(completed) => completed,
        other => panic!("expected completed, got {other:?}"),
    }
}

/// Asserts a status's code and its ErrorInfo reason and domain.
pub fn assert_status(status: &Status, code: Code, reason: &str) {
    assert_eq!(status.code(), code, "status: {status:?}");
    let info = status.get_details_error_info().unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"));
    assert_eq!(info.reason, reason, "status: {status:?}");
    assert_eq!(info.domain, "idempotency.v1");
}

/// Claims `key` and expects to acquire it.
pub async fn claim_acquired(client: &mut CoordinatorClient<Channel>, key: &str) -> pb::Acquired {
    acquired(client.claim(claim_request(key, b"fp")).await.expect("claim works").into_inner())
}

/// The path of the server binary, beside the test binaries that cargo built with it
/// (`target/<profile>/idempotency-coordinator`; the server crate's tests build it).
pub fn binary() -> std::path::PathBuf {
    let test_binary = std::env::current_exe().expect("the test binary's path");
    let profile_dir = test_binary.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let binary = profile_dir.join("idempotency-coordinator");
    assert!(binary.exists(), "{} is not built: run the server crate's tests", binary.display());
    binary
}

/// A server binary running as a child process, with its actual address read from its log.
pub struct ChildServer {
    pub child: Child,
    pub addr: String,
    /// Every line it has logged so far, read on a thread of its own so that the child never
    /// blocks on a full pipe.
    log: Arc<std::sync::Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl ChildServer {
    pub fn start(data_dir: &Path) -> ChildServer {
        Self::start_with(data_dir, &[])
    }

    /// Starts the binary on `data_dir` with extra flags.
    pub fn start_with(data_dir: &Path, flags: &[&str]) -> ChildServer {
        Self::start_logging(data_dir, flags, "info")
    }

    /// Starts the binary on `data_dir` with extra flags and `RUST_LOG` set to `filter`.
    pub fn start_logging(data_dir: &Path, flags: &[&str], filter: &str) -> ChildServer {
        let mut child = Command::new(binary())
            .args(if flags.contains(&"--listen") { &[][..] } else { &["--listen", "127.0.0.1:0"][..] })
            .arg("--data-dir")
            .arg(data_dir)
            .args(flags)
            .env("RUST_LOG", filter)
            .env("NO_COLOR", "1")
            .stderr(Stdio::piped())
            .spawn()
            .expect("the binary starts");
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let mut seen = Vec::new();
        let addr = loop {
            let Some(line) = lines.next() else {
                let status = child.wait().expect("the child exits");
                panic!("the server exited ({status}) before serving:\n{}", seen.join("\n"));
            };
            let line = line.unwrap();
            let addr = line.split("listen=").nth(1).map(|rest| rest.split_whitespace().next().unwrap().to_owned());
            seen.push(line);
            if let Some(addr) = addr {
                break addr;
            }
        };
        let log = Arc::new(std::sync::Mutex::new(seen));
        let kept = Arc::clone(&log);
        let reader = std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                kept.lock().unwrap().push(line);
            }
        });
        ChildServer { child, addr, log, reader: Some(reader) }
    }

    /// Stops the server with SIGINT, asserts that it exits cleanly, and returns everything it
    /// logged.
    pub fn stop_and_log(mut self) -> String {
        self.signal("-INT");
        let status = self.child.wait().unwrap();
        assert!(status.success(), "the server exited with {status}");
        if let Some(reader) = self.reader.take() {
            reader.join().unwrap();
        }
        self.log.lock().unwrap().join("\n")
    }

    pub async fn client(&self) -> pb::coordinator_client::CoordinatorClient<tonic::transport::Channel> {
        pb::coordinator_client::CoordinatorClient::connect(format!("http://{}", self.addr)).await.unwrap()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([signal, &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
