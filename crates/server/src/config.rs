//! Command-line and environment configuration, validated into typed values.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::TypedValueParser;
use clap::{Args, Parser, Subcommand, ValueEnum};

use idempotency_core::domain::Limits;
use idempotency_core::domain::values::human;
use idempotency_store_postgres::{PostgresOptions, TimeSource};
use idempotency_store_sled::{Durability, SledOptions};

/// The idempotency coordinator: API instances claim idempotency keys here, and the stored
/// response of each key's mutation is replayed to every retry.
#[derive(Debug, Clone, Parser)]
#[command(version, about, long_about = None)]
pub struct Config {
    /// Without a subcommand, the server runs.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Address to serve gRPC on.
    #[arg(long, env = "IDEMPOTENCY_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Address to serve Prometheus metrics on, at `GET /metrics` (OpenMetrics text; no auth, no
    /// TLS: bind it where only the scraper can reach it). Unset: no metrics endpoint.
    #[arg(long, env = "IDEMPOTENCY_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// With --metrics-listen, how often the records-by-state gauge is recounted in the
    /// background (a read of every record, as the Admin API's Stats does; scrapes read the last
    /// count and pay nothing). 0: never (the gauge is left out).
    #[arg(long, env = "IDEMPOTENCY_RECORDS_CENSUS_INTERVAL", value_parser = duration, default_value = "60s")]
    pub records_census_interval: Duration,

    /// Also serve the health service (grpc.health.v1 and reflection of it, nothing else) in plaintext on this address,
    /// for probes that cannot speak TLS or send credentials (Kubernetes' native gRPC probes). It
    /// tells only whether the server is serving. Unset: health is on --listen only.
    #[arg(long, env = "IDEMPOTENCY_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,

    /// Directory of the embedded store; created if missing. Only one server may use it at a time.
    #[arg(long, env = "IDEMPOTENCY_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,

    /// Keep records in PostgreSQL instead (postgres://user@host:port/database), shared by any
    /// number of replicas. Unset: the embedded store in --data-dir. A URL with a password belongs
    /// in IDEMPOTENCY_STORE (from a secrets file your service manager loads), not on the command
    /// line, where `ps` shows it; --help never prints the variable's value.
    #[arg(long, env = "IDEMPOTENCY_STORE", hide_env_values = true)]
    pub store: Option<String>,

    /// A file holding the PostgreSQL password (its first line), for a --store URL without one:
    /// the password then appears neither on a command line nor in an environment.
    #[arg(long, env = "IDEMPOTENCY_STORE_PASSWORD_FILE", requires = "store")]
    pub store_password_file: Option<PathBuf>,

    /// PostgreSQL schema of the store's tables and functions; created and migrated on start.
    /// Deployments sharing one database keep apart by using different schemas.
    #[arg(long, env = "IDEMPOTENCY_POSTGRES_SCHEMA", default_value = "idempotency")]
    pub postgres_schema: String,

    /// PostgreSQL connections per replica (one more is used for LISTEN).
    #[arg(long, env = "IDEMPOTENCY_POSTGRES_POOL_SIZE", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1000).map(usize::from))]
    pub postgres_pool_size: usize,

    /// The longest a call may spend on PostgreSQL (waiting for a connection, connecting, running
    /// its statement) before it fails with UNAVAILABLE.
    #[arg(long, env = "IDEMPOTENCY_POSTGRES_TIMEOUT", value_parser = duration, default_value = "5s")]
    pub postgres_timeout: Duration,

    /// Skews this process's clock by this many milliseconds (tests of clock skew between replicas).
    #[arg(long, env = "IDEMPOTENCY_CLOCK_OFFSET_MS", default_value_t = 0, allow_hyphen_values = true, hide = true)]
    pub clock_offset_ms: i64,

    /// When a reply may report a change. strict: after it is fdatasync'ed (survives kill -9 and
    /// power loss); relaxed: at once, written out within 500 ms (a crash may lose that much).
    #[arg(long, env = "IDEMPOTENCY_DURABILITY", value_enum, default_value = "strict")]
    pub durability: DurabilityFlag,

    /// Claims of new keys fail with RESOURCE_EXHAUSTED STORE_FULL once this many records are
    /// stored (expired records count until the sweeper deletes them).
    #[arg(long, env = "IDEMPOTENCY_MAX_RECORDS", default_value_t = 10_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_records: u64,

    /// Largest response Complete accepts, in bytes, as protobuf encodes it (body plus metadata
    /// keys and values, with a few bytes of framing each); 1 to 64 MiB.
    #[arg(long, env = "IDEMPOTENCY_MAX_RESPONSE_BYTES", default_value_t = 1024 * 1024,
          value_parser = clap::value_parser!(u32).range(1..=MAX_RESPONSE_BYTES_LIMIT).map(|n| n as usize))]
    pub max_response_bytes: usize,

    /// Lease granted when a Claim or Renew leaves lease_ttl unset.
    #[arg(long, env = "IDEMPOTENCY_DEFAULT_LEASE_TTL", value_parser = duration, default_value = "30s")]
    pub default_lease_ttl: Duration,

    /// Shortest lease_ttl accepted.
    #[arg(long, env = "IDEMPOTENCY_MIN_LEASE_TTL", value_parser = duration, default_value = "100ms")]
    pub min_lease_ttl: Duration,

    /// Longest lease_ttl accepted.
    #[arg(long, env = "IDEMPOTENCY_MAX_LEASE_TTL", value_parser = duration, default_value = "1h")]
    pub max_lease_ttl: Duration,

    /// How long a key is remembered after its last change when the Claim leaves retention unset.
    #[arg(long, env = "IDEMPOTENCY_DEFAULT_RETENTION", value_parser = duration, default_value = "24h")]
    pub default_retention: Duration,

    /// Shortest retention accepted.
    #[arg(long, env = "IDEMPOTENCY_MIN_RETENTION", value_parser = duration, default_value = "1s")]
    pub min_retention: Duration,

    /// Longest retention accepted.
    #[arg(long, env = "IDEMPOTENCY_MAX_RETENTION", value_parser = duration, default_value = "30days")]
    pub max_retention: Duration,

    /// Longest wait a Claim may ask for.
    #[arg(long, env = "IDEMPOTENCY_MAX_WAIT", value_parser = duration, default_value = "60s")]
    pub max_wait: Duration,

    /// How often the sweeper deletes records whose retention ended.
    #[arg(long, env = "IDEMPOTENCY_SWEEP_INTERVAL", value_parser = duration, default_value = "1s")]
    pub sweep_interval: Duration,

    /// How many index entries the sweeper handles per batch before yielding to other work.
    #[arg(long, env = "IDEMPOTENCY_SWEEP_BATCH", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=1_000_000).map(|n| n as usize))]
    pub sweep_batch: usize,

    /// With strict durability: the size in MiB of each of the two write-ahead log files (1 to
    /// 4096). Writing moves to the other file when one is full, and sled's own files are then
    /// brought up to date in the background (a checkpoint). Larger: fewer checkpoints, more to
    /// re-apply after a crash (about a second per 100 MiB), more disk (twice this size).
    #[arg(long, env = "IDEMPOTENCY_WAL_FILE_MB", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub wal_file_mb: u64,

    /// sled's page cache, in MiB (1 to 1048576).
    #[arg(long, env = "IDEMPOTENCY_CACHE_MB", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub cache_mb: u64,

    /// Calls one HTTP/2 connection may have in flight; more wait in the client. Bounds what one
    /// connection can pin in memory (a client that stops reading holds one response per call).
    #[arg(long, env = "IDEMPOTENCY_MAX_STREAMS_PER_CONNECTION", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_connection: u32,

    /// On SIGTERM, how long the server keeps serving every call while health reports
    /// NOT_SERVING, so that load balancers and clients route away before anything is refused.
    /// SIGINT (Ctrl-C) skips it.
    #[arg(long, env = "IDEMPOTENCY_DRAIN_DELAY", value_parser = duration, default_value = "5s")]
    pub drain_delay: Duration,

    /// Once draining (after the drain delay), how long in-flight calls may take to finish before
    /// the server exits.
    #[arg(long, env = "IDEMPOTENCY_SHUTDOWN_GRACE", value_parser = duration, default_value = "10s")]
    pub shutdown_grace: Duration,

    /// The server's certificate chain (PEM file). With --tls-key, the server speaks only TLS.
    /// Reloaded on SIGHUP and when the file changes.
    #[arg(long, env = "IDEMPOTENCY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The server's private key (PEM file; the path, never the key itself, is given here).
    #[arg(long, env = "IDEMPOTENCY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// A CA (PEM file): every client must present a certificate signed by it (mTLS).
    #[arg(long, env = "IDEMPOTENCY_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Who may use which namespaces with which role, and per-namespace quotas (TOML; see
    /// SECURITY.md). Re-read on SIGHUP and when it changes. Unset: every caller may do anything.
    #[arg(long, env = "IDEMPOTENCY_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,

    /// Reflection answers only callers with valid credentials (it is open by default).
    #[arg(long, env = "IDEMPOTENCY_REFLECTION_REQUIRES_AUTH")]
    pub reflection_requires_auth: bool,

    /// Start on a non-loopback address without TLS and an auth file anyway.
    #[arg(long, env = "IDEMPOTENCY_ALLOW_INSECURE")]
    pub allow_insecure: bool,

    /// Calls served at once, Claims waiting included; beyond it a call is refused at once with
    /// RESOURCE_EXHAUSTED OVERLOADED and a retry hint.
    #[arg(long, env = "IDEMPOTENCY_MAX_IN_FLIGHT", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=1_000_000).map(|n| n as usize))]
    pub max_in_flight: usize,

    /// Claims waiting at once; beyond it a Claim that would wait answers in_progress at once.
    #[arg(long, env = "IDEMPOTENCY_MAX_WAITING", default_value_t = 256, value_parser = clap::value_parser!(u32).range(0..=1_000_000).map(|n| n as usize))]
    pub max_waiting: usize,

    /// Connections open at once; beyond it a new connection is closed at once.
    #[arg(long, env = "IDEMPOTENCY_MAX_CONNECTIONS", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1_000_000).map(|n| n as usize))]
    pub max_connections: usize,

    /// A connection on which nothing but keepalive pings passed for this long is closed.
    #[arg(long, env = "IDEMPOTENCY_IDLE_TIMEOUT", value_parser = duration, default_value = "5m")]
    pub idle_timeout: Duration,

    /// How often the server pings an HTTP/2 connection to find dead peers (0s: never).
    #[arg(long, env = "IDEMPOTENCY_KEEPALIVE_INTERVAL", value_parser = duration, default_value = "30s")]
    pub keepalive_interval: Duration,

    /// How long a ping may go unanswered before the connection is closed.
    #[arg(long, env = "IDEMPOTENCY_KEEPALIVE_TIMEOUT", value_parser = duration, default_value = "20s")]
    pub keepalive_timeout: Duration,

    /// Log format on stderr; the level is set by RUST_LOG (default: info).
    #[arg(long, env = "IDEMPOTENCY_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// The largest `--max-response-bytes` accepted (64 MiB): the transport holds a whole message in
/// memory, and gRPC's own default limit is 4 MiB.
const MAX_RESPONSE_BYTES_LIMIT: i64 = 64 * 1024 * 1024;

/// The longest duration any flag accepts. Times a record carries (now, plus a lease, plus a
/// retention) then stay far inside what `google.protobuf.Timestamp` can express (year 9999).
const LONGEST_DURATION: Duration = Duration::from_secs(100 * 31_557_600); // humantime's years of 365.25 days

/// Parses a duration flag in human units (`250ms`, `30s`, `24h`, `30days`), at most 100 years.
fn duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|error| error.to_string())?;
    if duration > LONGEST_DURATION {
        return Err("at most 100years".to_owned());
    }
    Ok(duration)
}

/// Parses a duration flag that must be above zero (a deadline).
fn positive_duration(text: &str) -> Result<Duration, String> {
    let parsed = duration(text)?;
    if parsed.is_zero() {
        return Err("must be above zero".to_owned());
    }
    Ok(parsed)
}

/// What to run instead of the server.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Copy every live record of an embedded store into PostgreSQL (safe to re-run), to move a
    /// single server to replicas on PostgreSQL. Stop the server that uses the directory first.
    Migrate(MigrateArgs),
    /// Write the live records of a stopped embedded store to a snapshot file (created whole or
    /// not at all), to restore later with `restore`.
    Backup(BackupArgs),
    /// Write the records of a snapshot file into a new embedded store (the directory must be
    /// absent or empty); every later grant gets a fencing token above the backup's.
    Restore(RestoreArgs),
    /// Call a running server's Admin service: statistics, listing, purging, export and import.
    Admin(AdminArgs),
}

/// What `backup` reads and writes.
#[derive(Debug, Clone, Args)]
pub struct BackupArgs {
    /// The data directory of the embedded store (its server stopped).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// The snapshot file to write.
    #[arg(long)]
    pub output: PathBuf,
}

/// What `restore` reads and writes.
#[derive(Debug, Clone, Args)]
pub struct RestoreArgs {
    /// The data directory to create (absent or empty).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// The snapshot file `backup` wrote.
    #[arg(long)]
    pub input: PathBuf,
}

/// Where `migrate` copies from and to.
#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// The embedded store's data directory.
    #[arg(long)]
    pub from: PathBuf,
    /// The PostgreSQL store: postgres://user@host:port/database.
    #[arg(long)]
    pub to: String,
    /// The PostgreSQL schema (as --postgres-schema of the servers that will use it).
    #[arg(long, default_value = "idempotency")]
    pub schema: String,
}

/// What `admin` does.
#[derive(Debug, Clone, Args)]
pub struct AdminArgs {
    /// The Admin call to make.
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// The calls of `admin`.
#[derive(Debug, Clone, Subcommand)]
pub enum AdminCommand {
    /// Records per namespace and state, disk use, the oldest record, and the sweeper.
    Stats(AdminStatsArgs),
    /// A page of a namespace's live records in key order (without response bodies), or every
    /// page with --all.
    List(AdminListArgs),
    /// Delete one key (--key), or every record of a namespace (--yes), durably.
    Purge(AdminPurgeArgs),
    /// Write a snapshot of the server's live records to a file (created whole or not at all).
    Export(AdminExportArgs),
    /// Copy the records of a snapshot file into the server (checked whole here first; importing
    /// twice changes nothing).
    Import(AdminImportArgs),
}

/// How `admin` reaches the server, and with which credentials.
#[derive(Debug, Clone, Args)]
pub struct AdminConnection {
    /// The server: http://host:port, or https://host:port (with --tls-ca).
    #[arg(long, env = "IDEMPOTENCY_TARGET")]
    pub target: String,
    /// The CA that signed the server's certificate (PEM file); needed for an https:// target.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// A client certificate (PEM file) for a server that requires one (mTLS).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM file).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The name the server's certificate must carry, when it is not the target's host.
    #[arg(long)]
    pub tls_server_name: Option<String>,
    /// A file holding the bearer token to send (surrounding whitespace is ignored). Unset: the
    /// IDEMPOTENCY_TOKEN environment variable, if set. A token is never taken on the command line.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// The deadline of connecting and of each unary call (export and import streams have none).
    #[arg(long, value_parser = positive_duration, default_value = "30s")]
    pub timeout: Duration,
}

/// What `admin stats` asks for.
#[derive(Debug, Clone, Args)]
pub struct AdminStatsArgs {
    /// How to reach the server.
    #[command(flatten)]
    pub connection: AdminConnection,
    /// Only this namespace. Unset: every namespace.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What `admin list` asks for.
#[derive(Debug, Clone, Args)]
pub struct AdminListArgs {
    /// How to reach the server.
    #[command(flatten)]
    pub connection: AdminConnection,
    /// The namespace to list.
    #[arg(long)]
    pub namespace: String,
    /// Only keys that start with this.
    #[arg(long)]
    pub prefix: Option<String>,
    /// Only records in this state. Unset: every live record.
    #[arg(long, value_enum)]
    pub state: Option<KeyStateFlag>,
    /// Records per page (1 to 1000). Unset: the server's default (100).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub page_size: Option<u32>,
    /// Continue from this page (the token the previous page printed).
    #[arg(long)]
    pub page_token: Option<String>,
    /// Follow the pages to the end instead of stopping after one.
    #[arg(long)]
    pub all: bool,
    /// Print one JSON object per record (JSON lines) instead of a table; the next page's token,
    /// if any, goes to standard error.
    #[arg(long)]
    pub json: bool,
}

/// What `admin purge` deletes.
#[derive(Debug, Clone, Args)]
pub struct AdminPurgeArgs {
    /// How to reach the server.
    #[command(flatten)]
    pub connection: AdminConnection,
    /// The namespace.
    #[arg(long)]
    pub namespace: String,
    /// Only this key. Unset: every record of the namespace (which needs --yes).
    #[arg(long)]
    pub key: Option<String>,
    /// Confirms deleting every record of the namespace.
    #[arg(long)]
    pub yes: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What `admin export` writes.
#[derive(Debug, Clone, Args)]
pub struct AdminExportArgs {
    /// How to reach the server.
    #[command(flatten)]
    pub connection: AdminConnection,
    /// The snapshot file to write (replaced whole if it exists; readable by its owner only).
    #[arg(long)]
    pub output: PathBuf,
    /// Only this namespace's records. Unset: every namespace.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What `admin import` reads.
#[derive(Debug, Clone, Args)]
pub struct AdminImportArgs {
    /// How to reach the server.
    #[command(flatten)]
    pub connection: AdminConnection,
    /// The snapshot file (as `admin export` or `backup` wrote it).
    #[arg(long)]
    pub input: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `admin list --state`: a key's state, as Lookup reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeyStateFlag {
    /// A caller holds a valid lease.
    InProgress,
    /// The holder's lease lapsed without Complete or Release.
    LeaseExpired,
    /// The holder released the key.
    Released,
    /// The response is stored.
    Completed,
}

/// Where records are kept, with the options the store opens with.
#[derive(Debug, Clone)]
pub enum StoreChoice {
    /// The embedded sled store.
    Sled(SledOptions),
    /// PostgreSQL.
    Postgres(PostgresOptions),
}

/// `--durability`: when a reply may report a change (the embedded store's [`Durability`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DurabilityFlag {
    /// After the change is fdatasync'ed with its batch.
    Strict,
    /// At once; written out within 500 ms.
    Relaxed,
}

impl From<DurabilityFlag> for Durability {
    fn from(flag: DurabilityFlag) -> Self {
        match flag {
            DurabilityFlag::Strict => Durability::Strict,
            DurabilityFlag::Relaxed => Durability::Relaxed,
        }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A configuration that contradicts itself.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl Config {
    /// The request bounds, checked for consistency.
    pub fn limits(&self) -> Result<Limits, ConfigError> {
        let limits = Limits {
            min_lease_ttl: self.min_lease_ttl,
            max_lease_ttl: self.max_lease_ttl,
            default_lease_ttl: self.default_lease_ttl,
            min_retention: self.min_retention,
            max_retention: self.max_retention,
            default_retention: self.default_retention,
            max_wait: self.max_wait,
            max_response_bytes: self.max_response_bytes,
        };
        let ordered = |flags: &str, min: Duration, default: Duration, max: Duration| {
            if min < Duration::from_millis(1) || min > default || default > max {
                Err(ConfigError(format!(
                    "{flags}: need 1ms <= min ({}) <= default ({}) <= max ({})",
                    human(min),
                    human(default),
                    human(max)
                )))
            } else {
                Ok(())
            }
        };
        ordered(
            "--min-lease-ttl, --default-lease-ttl, --max-lease-ttl",
            limits.min_lease_ttl,
            limits.default_lease_ttl,
            limits.max_lease_ttl,
        )?;
        ordered(
            "--min-retention, --default-retention, --max-retention",
            limits.min_retention,
            limits.default_retention,
            limits.max_retention,
        )?;
        if self.sweep_interval.is_zero() {
            return Err(ConfigError("--sweep-interval must be above zero".to_owned()));
        }
        Ok(limits)
    }

    /// Checks everything the flags' own parsers cannot: limits that must agree with each other,
    /// the store URL, and that a server reachable from other machines is protected. The server
    /// runs only on a configuration that passes. `admin` runs no server and opens no store, so
    /// none of this applies to it (its flags' parsers check all it takes).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if matches!(self.command, Some(Command::Admin(_))) {
            return Ok(());
        }
        self.limits()?;
        self.store_choice()?;
        if self.idle_timeout <= self.max_wait + Duration::from_secs(1) {
            return Err(ConfigError(format!(
                "--idle-timeout ({}) must be longer than --max-wait ({}) plus 1s, or waiting Claims would be cut off",
                human(self.idle_timeout),
                human(self.max_wait)
            )));
        }
        if !self.listen.ip().is_loopback() && !self.allow_insecure {
            let mut missing = Vec::new();
            if self.tls_cert.is_none() {
                missing.push("TLS (--tls-cert and --tls-key)");
            }
            if self.auth_file.is_none() {
                missing.push("an auth file (--auth-file)");
            }
            if !missing.is_empty() {
                return Err(ConfigError(format!(
                    "--listen {} is reachable from other machines, but {} {} missing: anyone who can reach \
                     the port could read and change every namespace. Add {}, or pass --allow-insecure",
                    self.listen,
                    missing.join(" and "),
                    if missing.len() == 1 { "is" } else { "are" },
                    missing.join(" and ")
                )));
            }
        }
        if self.postgres_timeout < Duration::from_millis(1) || self.postgres_timeout > Duration::from_secs(3600) {
            return Err(ConfigError("--postgres-timeout must be between 1ms and 1h".to_owned()));
        }
        Ok(())
    }

    /// The store the server runs on, and the options it opens with.
    pub fn store_choice(&self) -> Result<StoreChoice, ConfigError> {
        match &self.store {
            None => Ok(StoreChoice::Sled(SledOptions {
                path: self.data_dir.clone(),
                durability: self.durability.into(),
                max_records: self.max_records,
                cache_capacity_bytes: self.cache_mb * 1024 * 1024,
                wal_file_bytes: self.wal_file_mb * 1024 * 1024,
            })),
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                let password = match &self.store_password_file {
                    None => None,
                    Some(path) => {
                        let text = std::fs::read_to_string(path).map_err(|error| {
                            ConfigError(format!("--store-password-file {}: {error}", path.display()))
                        })?;
                        let line = text.lines().next().unwrap_or("").to_owned();
                        if line.is_empty() {
                            return Err(ConfigError(format!(
                                "--store-password-file {}: the file's first line is empty",
                                path.display()
                            )));
                        }
                        Some(idempotency_store_postgres::Password(line))
                    }
                };
                Ok(StoreChoice::Postgres(PostgresOptions {
                    url: url.clone(),
                    schema: self.postgres_schema.clone(),
                    pool_size: self.postgres_pool_size,
                    timeout: self.postgres_timeout,
                    max_records: self.max_records,
                    time: TimeSource::Database,
                    password,
                }))
            }
            Some(other) => Err(ConfigError(format!(
                "--store {other:?}: give a postgres://user@host:port/database URL, or leave it unset for the \
                 embedded store in --data-dir"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("idempotency-coordinator").chain(args.iter().copied()))
    }

    #[test]
    fn the_database_password_comes_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        std::fs::write(&file, "s3cret\nignored\n").unwrap();
        let file = file.to_str().unwrap();
        let url = "postgres://app@db/x";
        let Ok(StoreChoice::Postgres(options)) =
            parse(&["--store", url, "--store-password-file", file]).unwrap().store_choice()
        else {
            panic!("a PostgreSQL store")
        };
        assert_eq!(options.password.map(|password| password.0).as_deref(), Some("s3cret"));
        std::fs::write(dir.path().join("empty"), "\n").unwrap();
        let empty = dir.path().join("empty");
        let missing = dir.path().join("missing");
        for path in [&empty, &missing] {
            let config = parse(&["--store", url, "--store-password-file", path.to_str().unwrap()]).unwrap();
            assert!(config.store_choice().is_err(), "{}", path.display());
        }
        assert!(parse(&["--store-password-file", file]).is_err(), "only with --store");
    }

    #[test]
    fn defaults_match_the_contract() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.listen, "127.0.0.1:50051".parse().unwrap());
        assert_eq!(config.durability, DurabilityFlag::Strict);
        assert_eq!(config.limits().unwrap(), Limits::default());
    }

    #[test]
    fn durations_parse_in_human_units() {
        let config = parse(&["--default-lease-ttl", "2m", "--max-wait", "1500ms", "--durability", "relaxed"]).unwrap();
        assert_eq!(config.default_lease_ttl, Duration::from_secs(120));
        assert_eq!(config.max_wait, Duration::from_millis(1500));
        assert_eq!(config.durability, DurabilityFlag::Relaxed);
        assert!(parse(&["--max-wait", "soon"]).is_err());
    }

    #[test]
    fn the_store_is_sled_unless_a_postgres_url_is_given() {
        let Ok(StoreChoice::Sled(sled)) = parse(&["--data-dir", "d", "--cache-mb", "2"]).unwrap().store_choice() else {
            panic!("the embedded store")
        };
        assert_eq!((sled.path, sled.cache_capacity_bytes, sled.durability), ("d".into(), 2 << 20, Durability::Strict));
        let url = "postgres://postgres@127.0.0.1:5432/app";
        let Ok(StoreChoice::Postgres(postgres)) = parse(&["--store", url]).unwrap().store_choice() else {
            panic!("PostgreSQL")
        };
        assert_eq!((postgres.url.as_str(), postgres.schema.as_str(), postgres.pool_size), (url, "idempotency", 16));
        assert!(parse(&["--store", "mysql://x"]).unwrap().store_choice().is_err());
        assert!(parse(&["--store", url, "--postgres-pool-size", "0"]).is_err());
        let migrate = parse(&["migrate", "--from", "data", "--to", url]).unwrap();
        let Some(Command::Migrate(args)) = migrate.command else { panic!("a migrate command") };
        assert_eq!((args.from, args.to, args.schema.as_str()), ("data".into(), url.to_owned(), "idempotency"));
    }

    #[test]
    fn contradictory_limits_are_refused() {
        assert!(parse(&["--default-lease-ttl", "2h"]).unwrap().validate().is_err());
        assert!(parse(&["--min-retention", "0s"]).unwrap().validate().is_err());
        assert!(parse(&["--sweep-interval", "0s"]).unwrap().validate().is_err());
        assert!(parse(&["--postgres-timeout", "2h"]).unwrap().validate().is_err());
        assert!(parse(&[]).unwrap().validate().is_ok());
    }

    #[test]
    fn a_server_reachable_from_other_machines_needs_tls_and_an_auth_file_or_allow_insecure() {
        let error = parse(&["--listen", "0.0.0.0:50051"]).unwrap().validate().unwrap_err().to_string();
        assert!(error.contains("TLS (--tls-cert and --tls-key) and an auth file (--auth-file) are missing"), "{error}");
        let tls = ["--listen", "0.0.0.0:50051", "--tls-cert", "c.pem", "--tls-key", "k.pem"];
        let error = parse(&tls).unwrap().validate().unwrap_err().to_string();
        assert!(error.contains("an auth file (--auth-file) is missing"), "{error}");
        let mut both = tls.to_vec();
        both.extend(["--auth-file", "auth.toml"]);
        assert!(parse(&both).unwrap().validate().is_ok());
        assert!(parse(&["--listen", "0.0.0.0:50051", "--allow-insecure"]).unwrap().validate().is_ok());
        assert!(parse(&["--listen", "[::1]:50051"]).unwrap().validate().is_ok(), "loopback needs nothing");
        assert!(parse(&["--tls-cert", "c.pem"]).is_err(), "a certificate needs its key");
        assert!(parse(&["--tls-client-ca", "ca.pem"]).is_err(), "mTLS needs TLS");
        assert!(parse(&["--idle-timeout", "30s"]).unwrap().validate().is_err(), "shorter than the longest wait");
    }

    #[test]
    fn admin_commands_parse_and_skip_the_servers_checks() {
        // Server settings in the environment or on the command line that the server would refuse
        // must not stop an operator's `admin` call.
        let stats = parse(&["--listen", "0.0.0.0:50051", "admin", "stats", "--target", "http://127.0.0.1:1"]).unwrap();
        assert!(stats.validate().is_ok());
        let Some(Command::Admin(AdminArgs { command: AdminCommand::Stats(stats) })) = stats.command else {
            panic!("admin stats")
        };
        assert_eq!((stats.connection.timeout, stats.namespace, stats.json), (Duration::from_secs(30), None, false));

        let list = ["admin", "list", "--target", "http://h:1", "--namespace", "payments", "--state", "lease-expired"];
        let Some(Command::Admin(AdminArgs { command: AdminCommand::List(list) })) = parse(&list).unwrap().command
        else {
            panic!("admin list")
        };
        assert_eq!((list.state, list.page_size, list.all), (Some(KeyStateFlag::LeaseExpired), None, false));
        for state in ["in-progress", "lease-expired", "released", "completed"] {
            assert!(parse(&["admin", "list", "--target", "http://h:1", "--namespace", "n", "--state", state]).is_ok());
        }
        for refused in [
            &["admin", "list", "--target", "http://h:1", "--namespace", "n", "--state", "expired"][..],
            &["admin", "list", "--target", "http://h:1", "--namespace", "n", "--page-size", "1001"],
            &["admin", "list", "--target", "http://h:1"],
            &["admin", "stats", "--target", "http://h:1", "--timeout", "0s"],
            &["admin", "stats", "--target", "http://h:1", "--tls-cert", "c.pem"],
            &["admin", "stats", "--target", "http://h:1", "--token", "secret"],
            &["admin", "export", "--target", "http://h:1"],
        ] {
            assert_eq!(parse(refused).expect_err(&format!("{refused:?} is refused")).exit_code(), 2, "{refused:?}");
        }
    }

    /// Values that the server cannot run with are refused when the flags are parsed (clap's
    /// message and exit code 2), never by a panic or a hang later.
    #[test]
    fn values_that_would_break_the_server_are_refused_up_front() {
        for args in [
            &["--cache-mb", "0"][..],
            &["--cache-mb", "18446744073709551615"],
            &["--max-streams-per-connection", "0"],
            &["--max-response-bytes", "18446744073709551615"],
            &["--max-response-bytes", "0"],
            &["--max-response-bytes", "67108865"],
            &["--max-lease-ttl", "290000000years"],
            &["--max-retention", "290000000years"],
            &["--max-wait", "101years"],
            &["--sweep-batch", "0"],
            &["--max-records", "0"],
            &["--postgres-pool-size", "100000"],
        ] {
            let error = parse(args).expect_err(&format!("{args:?} is refused"));
            assert_eq!(error.exit_code(), 2, "{args:?}");
        }
        assert_eq!(parse(&["--max-response-bytes", "67108864"]).unwrap().max_response_bytes, 64 << 20);
        assert_eq!(parse(&["--max-retention", "100years"]).unwrap().max_retention, LONGEST_DURATION);
    }
}
