//! [`Client`]: the five calls of the contract with Rust types.

use std::time::Duration;

use idempotency_proto::pb;
use idempotency_proto::pb::coordinator_client::CoordinatorClient;
use tonic::Request;
use tonic::transport::{Channel, Endpoint};

use crate::error::Error;
use crate::idempotent::Idempotent;
use crate::types::{Claim, ClaimOutcome, Completion, KeyView, Renewal, Stored, duration, system_time};

/// How long a call may take unless told otherwise (a waiting Claim adds its wait).
const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A client of the coordinator. Cheap to clone: clones share one channel.
#[derive(Debug, Clone)]
pub struct Client {
    grpc: CoordinatorClient<Channel>,
    call_timeout: Duration,
}

impl Client {
    /// Connects to the coordinator at `uri` (`http://host:port`).
    pub async fn connect(uri: impl Into<String>) -> Result<Client, Error> {
        let endpoint = Endpoint::from_shared(uri.into())?;
        Ok(Client::new(endpoint.connect().await?))
    }

    /// A client over a channel you built (your own load balancing, TLS and timeouts).
    pub fn new(channel: Channel) -> Client {
        Client { grpc: CoordinatorClient::new(channel), call_timeout: DEFAULT_CALL_TIMEOUT }
    }

    /// Sets the deadline of every call (10 s by default); a waiting Claim gets its wait on top.
    /// The server answers UNAVAILABLE a little before it when its store is slow.
    #[must_use]
    pub fn with_call_timeout(mut self, timeout: Duration) -> Client {
        self.call_timeout = timeout;
        self
    }

    fn request<T>(&self, message: T, extra: Duration) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(self.call_timeout + extra);
        request
    }

    /// Claims a key.
    pub async fn claim(&self, claim: &Claim) -> Result<ClaimOutcome, Error> {
        let request = self.request(claim.to_pb(), claim.wait.unwrap_or(Duration::ZERO));
        let reply = self.grpc.clone().claim(request).await?.into_inner();
        ClaimOutcome::from_pb(reply)
            .ok_or_else(|| Error::Transport(tonic::Status::internal("a Claim reply without outcome")))
    }

    /// Stores `response` as the key's outcome; only its current lease holder may. A repeated
    /// Complete with the same token returns the first result and keeps the first response.
    pub async fn complete(
        &self,
        namespace: &str,
        key: &str,
        lease_token: &str,
        response: Stored,
        retention: Option<Duration>,
    ) -> Result<Completion, Error> {
        let message = pb::CompleteRequest {
            namespace: namespace.to_owned(),
            key: key.to_owned(),
            lease_token: lease_token.to_owned(),
            response: Some(response.into_pb()),
            retention: retention.map(duration),
        };
        let reply = self.grpc.clone().complete(self.request(message, Duration::ZERO)).await?.into_inner();
        Ok(Completion {
            completed_at: system_time(reply.completed_at),
            expires_at: system_time(reply.expires_at),
            fencing_token: reply.fencing_token,
            already_completed: reply.already_completed,
        })
    }

    /// Sets the lease to end `lease_ttl` from now (unset: the server's default).
    pub async fn renew(
        &self,
        namespace: &str,
        key: &str,
        lease_token: &str,
        lease_ttl: Option<Duration>,
    ) -> Result<Renewal, Error> {
        let message = pb::RenewRequest {
            namespace: namespace.to_owned(),
            key: key.to_owned(),
            lease_token: lease_token.to_owned(),
            lease_ttl: lease_ttl.map(duration),
        };
        let reply = self.grpc.clone().renew(self.request(message, Duration::ZERO)).await?.into_inner();
        Ok(Renewal { lease_expires_at: system_time(reply.lease_expires_at), fencing_token: reply.fencing_token })
    }

    /// Gives the key back after a mutation that failed without effect: it is claimable at once.
    pub async fn release(&self, namespace: &str, key: &str, lease_token: &str) -> Result<(), Error> {
        let message = pb::ReleaseRequest {
            namespace: namespace.to_owned(),
            key: key.to_owned(),
            lease_token: lease_token.to_owned(),
        };
        self.grpc.clone().release(self.request(message, Duration::ZERO)).await?;
        Ok(())
    }

    /// Reads a key.
    pub async fn lookup(&self, namespace: &str, key: &str) -> Result<KeyView, Error> {
        let message = pb::LookupRequest { namespace: namespace.to_owned(), key: key.to_owned() };
        let reply = self.grpc.clone().lookup(self.request(message, Duration::ZERO)).await?.into_inner();
        Ok(KeyView::from_pb(reply))
    }

    /// Runs a mutation once for `key` in `namespace`: see [`Idempotent`].
    pub fn idempotent(&self, namespace: impl Into<String>, key: impl Into<String>) -> Idempotent {
        Idempotent::new(self.clone(), namespace.into(), key.into())
    }
}
