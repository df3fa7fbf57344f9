//! What the load generator talks to: the coordinator over gRPC, or the same operations built by
//! hand the way users do on PostgreSQL (one table, conditional statements) and Redis (SET NX PX
//! semantics and Lua compare-and-set), so that one tool and one load shape compare them.

use std::time::Duration;

use anyhow::{Context, bail};
use tonic::transport::{Channel, Endpoint};
use uuid::Uuid;

use idempotency_client::{Claim, ClaimOutcome, Stored};

/// The namespace the generator uses on the coordinator.
pub const NAMESPACE: &str = "bench";

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    /// The caller holds the key with this token.
    Acquired(String),
    /// Someone else holds it.
    InProgress,
    /// A response of this many bytes is stored.
    Completed(usize),
}

/// One connection's client for a target.
#[derive(Clone)]
pub enum Client {
    /// The coordinator.
    Coordinator(Box<GrpcClients>),
    /// Hand-rolled idempotency on PostgreSQL.
    Postgres(std::sync::Arc<PgConnection>),
    /// Hand-rolled idempotency on Redis.
    Redis(redis::aio::MultiplexedConnection),
}

/// One PostgreSQL connection with its prepared statements.
pub struct PgConnection {
    client: tokio_postgres::Client,
    statements: PgStatements,
}

struct PgStatements {
    claim: tokio_postgres::Statement,
    complete: tokio_postgres::Statement,
    release: tokio_postgres::Statement,
    lookup: tokio_postgres::Statement,
}

/// The coordinator's gRPC clients on one connection.
#[derive(Clone)]
pub struct GrpcClients {
    /// Its gRPC service, through the client crate.
    coordinator: idempotency_client::Client,
    /// Its health service, the transport's own ceiling.
    health: tonic_health::pb::health_client::HealthClient<Channel>,
}

/// An operation failed; the string is its status code (or the backend's error kind).
pub type OpError = String;

const PG_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS bench_idempotency (
    key text PRIMARY KEY,
    fingerprint bytea,
    lease_token uuid,
    lease_expires_at timestamptz,
    fencing_token bigint NOT NULL,
    response bytea,
    completed_at timestamptz
);
CREATE SEQUENCE IF NOT EXISTS bench_fencing;
";

/// Claim in one statement: insert, or take over a lapsed unfinished lease, else report the row.
const PG_CLAIM: &str = "
WITH granted AS (
    INSERT INTO bench_idempotency AS t (key, fingerprint, lease_token, lease_expires_at, fencing_token)
    VALUES ($1, $2, $3, clock_timestamp() + $4 * interval '1 millisecond', nextval('bench_fencing'))
    ON CONFLICT (key) DO UPDATE
        SET lease_token = EXCLUDED.lease_token, lease_expires_at = EXCLUDED.lease_expires_at,
            fencing_token = EXCLUDED.fencing_token
        WHERE t.response IS NULL AND (t.lease_token IS NULL OR t.lease_expires_at < clock_timestamp())
    RETURNING t.lease_token
)
SELECT lease_token, NULL::bytea AS response FROM granted
UNION ALL
SELECT NULL, response FROM bench_idempotency WHERE key = $1 AND NOT EXISTS (SELECT 1 FROM granted)";

const PG_COMPLETE: &str = "
UPDATE bench_idempotency SET response = $3, completed_at = clock_timestamp(), lease_token = NULL
WHERE key = $1 AND lease_token = $2 AND response IS NULL";

const PG_RELEASE: &str = "
UPDATE bench_idempotency SET lease_token = NULL WHERE key = $1 AND lease_token = $2 AND response IS NULL";

const PG_LOOKUP: &str = "SELECT lease_expires_at, response FROM bench_idempotency WHERE key = $1";

/// Claim in one round trip: a stored response wins; else SET NX PX on the lock, with a fencing counter.
const REDIS_CLAIM: &str = "
local response = redis.call('GET', KEYS[1])
if response then return {2, response} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
    redis.call('INCR', 'bench:fencing')
    return {1}
end
return {0}";

/// Complete as a compare-and-set on the lock token.
const REDIS_COMPLETE: &str = "
if redis.call('GET', KEYS[2]) == ARGV[1] then
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
    redis.call('DEL', KEYS[2])
    return 1
end
return 0";

const REDIS_RELEASE: &str = "
if redis.call('GET', KEYS[2]) == ARGV[1] then
    redis.call('DEL', KEYS[2])
    return 1
end
return 0";

/// How long hand-rolled targets keep a response (the coordinator's default retention).
const RETENTION_MILLIS: u64 = 24 * 3600 * 1000;

impl Client {
    /// Opens `connections` clients to `target` (`http://` coordinator, or several separated by
    /// commas, `postgres://`, `redis://`).
    pub async fn connect_all(options: &crate::Options) -> anyhow::Result<Vec<Client>> {
        let (target, connections, synchronous_commit) =
            (options.target.as_str(), options.connection_count(), options.synchronous_commit);
        // Several coordinator replicas: `http://a,http://b`; connections are spread round robin.
        let targets: Vec<&str> = target.split(',').map(str::trim).filter(|t| !t.is_empty()).collect();
        if targets.is_empty() {
            bail!("no target given");
        }
        let mut clients = Vec::with_capacity(connections);
        for i in 0..connections {
            clients.push(Client::connect(targets[i % targets.len()], synchronous_commit, options).await?);
        }
        Ok(clients)
    }

    async fn connect(target: &str, synchronous_commit: bool, options: &crate::Options) -> anyhow::Result<Client> {
        if target.starts_with("http://") || target.starts_with("https://") {
            let mut endpoint = Endpoint::from_shared(target.to_owned())?.tcp_nodelay(true);
            if let Some(ca) = &options.ca_file {
                let mut tls = tonic::transport::ClientTlsConfig::new().ca_certificate(
                    tonic::transport::Certificate::from_pem(std::fs::read(ca).context("reading --ca-file")?),
                );
                if let (Some(cert), Some(key)) = (&options.cert_file, &options.key_file) {
                    tls = tls.identity(tonic::transport::Identity::from_pem(
                        std::fs::read(cert).context("reading --cert-file")?,
                        std::fs::read(key).context("reading --key-file")?,
                    ));
                }
                endpoint = endpoint.tls_config(tls)?;
            }
            let channel = endpoint.connect().await.with_context(|| format!("connecting to {target}"))?;
            let mut coordinator = idempotency_client::Client::new(channel.clone());
            if let Some(path) = &options.token_file {
                let token = std::fs::read_to_string(path).context("reading --token-file")?;
                coordinator = coordinator.with_bearer_token(token.trim())?;
            }
            Ok(Client::Coordinator(Box::new(GrpcClients {
                coordinator,
                health: tonic_health::pb::health_client::HealthClient::new(channel),
            })))
        } else if target.starts_with("postgres://") || target.starts_with("postgresql://") {
            let (client, connection) = tokio_postgres::connect(target, tokio_postgres::NoTls)
                .await
                .with_context(|| format!("connecting to {target}"))?;
            tokio::spawn(async move {
                if let Err(error) = connection.await {
                    eprintln!("postgres connection ended: {error}");
                }
            });
            let mode = if synchronous_commit { "on" } else { "off" };
            client.batch_execute(&format!("SET synchronous_commit = {mode}")).await?;
            client.batch_execute(PG_SCHEMA).await.context("creating the benchmark table")?;
            // Prepared once per connection, as a pool with a statement cache does: each call is
            // then one round trip (Bind, Execute), not a Parse of the SQL text every time.
            let statements = PgStatements {
                claim: client.prepare(PG_CLAIM).await?,
                complete: client.prepare(PG_COMPLETE).await?,
                release: client.prepare(PG_RELEASE).await?,
                lookup: client.prepare(PG_LOOKUP).await?,
            };
            Ok(Client::Postgres(std::sync::Arc::new(PgConnection { client, statements })))
        } else if target.starts_with("redis://") {
            let client = redis::Client::open(target)?;
            let connection =
                client.get_multiplexed_async_connection().await.with_context(|| format!("connecting to {target}"))?;
            Ok(Client::Redis(connection))
        } else {
            bail!("unknown target {target}: use http://host:port, postgres://… or redis://…")
        }
    }

    /// Whether the target has a health service.
    pub fn has_health(&self) -> bool {
        matches!(self, Client::Coordinator(_))
    }

    /// Claims `key` with a lease of `lease`.
    pub async fn claim(&mut self, key: &str, fingerprint: &[u8], lease: Duration) -> Result<Claimed, OpError> {
        match self {
            Client::Coordinator(grpc) => {
                let claim = Claim::new(NAMESPACE, key).fingerprint(fingerprint.to_vec()).lease_ttl(lease);
                Ok(match grpc.coordinator.claim(&claim).await.map_err(|e| client_code(&e))? {
                    ClaimOutcome::Acquired(grant) => Claimed::Acquired(grant.lease_token),
                    ClaimOutcome::InProgress(_) => Claimed::InProgress,
                    ClaimOutcome::Completed(replay) => Claimed::Completed(replay.response.body.len()),
                })
            }
            Client::Postgres(client) => {
                let token = Uuid::new_v4();
                let millis = lease.as_millis() as f64;
                let rows = client
                    .client
                    .query(&client.statements.claim, &[&key, &fingerprint, &token, &millis])
                    .await
                    .map_err(|e| pg_code(&e))?;
                // No row at all: another transaction inserted the key after this statement's
                // snapshot was taken, so the conflict hid it from the SELECT. It is held.
                let Some(row) = rows.first() else { return Ok(Claimed::InProgress) };
                let granted: Option<Uuid> = row.get(0);
                let response: Option<Vec<u8>> = row.get(1);
                Ok(match (granted, response) {
                    (Some(token), _) => Claimed::Acquired(token.to_string()),
                    (None, Some(body)) => Claimed::Completed(body.len()),
                    (None, None) => Claimed::InProgress,
                })
            }
            Client::Redis(connection) => {
                let token = Uuid::new_v4().to_string();
                let reply: Vec<redis::Value> = redis::Script::new(REDIS_CLAIM)
                    .key(format!("bench:resp:{key}"))
                    .key(format!("bench:lock:{key}"))
                    .arg(&token)
                    .arg(lease.as_millis() as u64)
                    .invoke_async(connection)
                    .await
                    .map_err(|e| redis_code(&e))?;
                Ok(match reply.first() {
                    Some(redis::Value::Int(1)) => Claimed::Acquired(token),
                    Some(redis::Value::Int(2)) => match reply.get(1) {
                        Some(redis::Value::BulkString(body)) => Claimed::Completed(body.len()),
                        _ => Claimed::Completed(0),
                    },
                    _ => Claimed::InProgress,
                })
            }
        }
    }

    /// Stores `body` as the response of `key`, held with `token`.
    pub async fn complete(&mut self, key: &str, token: &str, body: &[u8]) -> Result<(), OpError> {
        match self {
            Client::Coordinator(grpc) => {
                let response = Stored::new(bytes::Bytes::copy_from_slice(body));
                grpc.coordinator.complete(NAMESPACE, key, token, response, None).await.map_err(|e| client_code(&e))?;
                Ok(())
            }
            Client::Postgres(client) => {
                let token: Uuid = token.parse().map_err(|_| "BadToken")?;
                let updated = client
                    .client
                    .execute(&client.statements.complete, &[&key, &token, &body])
                    .await
                    .map_err(|e| pg_code(&e))?;
                if updated == 1 { Ok(()) } else { Err("LeaseLost".to_owned()) }
            }
            Client::Redis(connection) => {
                let stored: i64 = redis::Script::new(REDIS_COMPLETE)
                    .key(format!("bench:resp:{key}"))
                    .key(format!("bench:lock:{key}"))
                    .arg(token)
                    .arg(body)
                    .arg(RETENTION_MILLIS)
                    .invoke_async(connection)
                    .await
                    .map_err(|e| redis_code(&e))?;
                if stored == 1 { Ok(()) } else { Err("LeaseLost".to_owned()) }
            }
        }
    }

    /// Gives `key` back.
    pub async fn release(&mut self, key: &str, token: &str) -> Result<(), OpError> {
        match self {
            Client::Coordinator(grpc) => {
                grpc.coordinator.release(NAMESPACE, key, token).await.map_err(|e| client_code(&e))?;
                Ok(())
            }
            Client::Postgres(client) => {
                let token: Uuid = token.parse().map_err(|_| "BadToken")?;
                client.client.execute(&client.statements.release, &[&key, &token]).await.map_err(|e| pg_code(&e))?;
                Ok(())
            }
            Client::Redis(connection) => {
                let _: i64 = redis::Script::new(REDIS_RELEASE)
                    .key(format!("bench:resp:{key}"))
                    .key(format!("bench:lock:{key}"))
                    .arg(token)
                    .invoke_async(connection)
                    .await
                    .map_err(|e| redis_code(&e))?;
                Ok(())
            }
        }
    }

    /// Reads `key`.
    pub async fn lookup(&mut self, key: &str) -> Result<(), OpError> {
        match self {
            Client::Coordinator(grpc) => {
                grpc.coordinator.lookup(NAMESPACE, key).await.map_err(|e| client_code(&e))?;
                Ok(())
            }
            Client::Postgres(client) => {
                client
                    .client
                    .query_opt(&client.statements.lookup, &[&key])
                    .await
                    .map_err(|e| pg_code(&e))?
                    .ok_or("NotFound")?;
                Ok(())
            }
            Client::Redis(connection) => {
                let (response, lock): (Option<Vec<u8>>, Option<String>) = redis::pipe()
                    .get(format!("bench:resp:{key}"))
                    .get(format!("bench:lock:{key}"))
                    .query_async(connection)
                    .await
                    .map_err(|e| redis_code(&e))?;
                if response.is_none() && lock.is_none() { Err("NotFound".to_owned()) } else { Ok(()) }
            }
        }
    }

    /// One health check (coordinator only).
    pub async fn health(&mut self) -> Result<(), OpError> {
        match self {
            Client::Coordinator(grpc) => {
                let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
                grpc.health.check(request).await.map_err(|s| format!("{:?}", s.code()))?;
                Ok(())
            }
            Client::Postgres(_) | Client::Redis(_) => Err("Unsupported".to_owned()),
        }
    }
}

/// A coordinator error as a short code: its reason, or its kind.
fn client_code(error: &idempotency_client::Error) -> OpError {
    match (error.reason(), error) {
        (Some(reason), _) => reason.as_str().to_owned(),
        (None, idempotency_client::Error::Transport(status)) => format!("{:?}", status.code()),
        (None, idempotency_client::Error::Unavailable { .. }) => "Unavailable".to_owned(),
        (None, other) => format!("{other}"),
    }
}

fn pg_code(error: &tokio_postgres::Error) -> OpError {
    match error.code() {
        Some(code) => format!("pg:{}", code.code()),
        None => "pg:connection".to_owned(),
    }
}

fn redis_code(error: &redis::RedisError) -> OpError {
    format!("redis:{:?}", error.kind())
}
