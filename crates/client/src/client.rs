//! [`Client`]: the five calls of the contract with Rust types.

use std::time::Duration;

use idempotency_proto::pb;
use idempotency_proto::pb::coordinator_client::CoordinatorClient;
use tonic::Request;
use tonic::metadata::{Ascii, MetadataValue};
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
    /// `Bearer <token>`, sent with every call (never logged: the value is marked sensitive).
    authorization: Option<MetadataValue<Ascii>>,
}

/// How to connect: the address, TLS (feature `tls`), credentials and deadlines. Built with
/// [`Client::builder`].
#[derive(Clone)]
pub struct ClientBuilder {
    uri: String,
    call_timeout: Duration,
    token: Option<String>,
    #[cfg(feature = "tls")]
    tls: Option<tonic::transport::ClientTlsConfig>,
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a secret: its presence is shown, never its value.
        f.debug_struct("ClientBuilder")
            .field("uri", &self.uri)
            .field("call_timeout", &self.call_timeout)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

impl ClientBuilder {
    /// Sends `authorization: Bearer <token>` with every call. Read the token from a file or an
    /// environment variable, never from a command-line flag (`ps` shows flags to everyone).
    #[must_use]
    pub fn bearer_token(mut self, token: impl Into<String>) -> ClientBuilder {
        self.token = Some(token.into());
        self
    }

    /// The deadline of every call (10 s by default); a waiting Claim gets its wait on top.
    #[must_use]
    pub fn call_timeout(mut self, timeout: Duration) -> ClientBuilder {
        self.call_timeout = timeout;
        self
    }

    /// Speaks TLS, trusting the CA certificates in `ca_pem` (PEM) for the server's certificate.
    #[cfg(feature = "tls")]
    #[must_use]
    pub fn ca_certificate(mut self, ca_pem: impl AsRef<[u8]>) -> ClientBuilder {
        let config = self.tls.take().unwrap_or_default();
        self.tls = Some(config.ca_certificate(tonic::transport::Certificate::from_pem(ca_pem)));
        self
    }

    /// Presents this client certificate and key (PEM) to a server that requires them (mTLS).
    #[cfg(feature = "tls")]
    #[must_use]
    pub fn identity(mut self, certificate_pem: impl AsRef<[u8]>, key_pem: impl AsRef<[u8]>) -> ClientBuilder {
        let config = self.tls.take().unwrap_or_default();
        self.tls = Some(config.identity(tonic::transport::Identity::from_pem(certificate_pem, key_pem)));
        self
    }

    /// The name the server's certificate must carry, when it is not the URI's host.
    #[cfg(feature = "tls")]
    #[must_use]
    pub fn domain_name(mut self, name: impl Into<String>) -> ClientBuilder {
        let config = self.tls.take().unwrap_or_default();
        self.tls = Some(config.domain_name(name));
        self
    }

    fn endpoint(&self) -> Result<Endpoint, Error> {
        #[allow(unused_mut)]
        let mut endpoint = Endpoint::from_shared(self.uri.clone())?.tcp_nodelay(true);
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone())?;
        }
        Ok(endpoint)
    }

    fn build(self, channel: Channel) -> Result<Client, Error> {
        let client = Client::new(channel).with_call_timeout(self.call_timeout);
        match &self.token {
            Some(token) => client.with_bearer_token(token),
            None => Ok(client),
        }
    }

    /// Connects now.
    pub async fn connect(self) -> Result<Client, Error> {
        let channel = self.endpoint()?.connect().await?;
        self.build(channel)
    }

    /// Connects on the first call (and again after the connection breaks), so that a service
    /// can start while the coordinator is down.
    pub fn connect_lazy(self) -> Result<Client, Error> {
        let channel = self.endpoint()?.connect_lazy();
        self.build(channel)
    }
}

impl Client {
    /// Connects to the coordinator at `uri` (`http://host:port`).
    pub async fn connect(uri: impl Into<String>) -> Result<Client, Error> {
        Client::builder(uri).connect().await
    }

    /// How to connect to `uri` (`http://host:port`, or `https://host:port` with TLS): credentials,
    /// TLS, deadlines.
    pub fn builder(uri: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            uri: uri.into(),
            call_timeout: DEFAULT_CALL_TIMEOUT,
            token: None,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    /// A client over a channel you built (your own load balancing, TLS and timeouts).
    pub fn new(channel: Channel) -> Client {
        Client { grpc: CoordinatorClient::new(channel), call_timeout: DEFAULT_CALL_TIMEOUT, authorization: None }
    }

    /// Sends `authorization: Bearer <token>` with every call (see [`ClientBuilder::bearer_token`]).
    pub fn with_bearer_token(mut self, token: &str) -> Result<Client, Error> {
        let mut value = MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
            Error::Transport(tonic::Status::invalid_argument("the token holds characters a header cannot"))
        })?;
        value.set_sensitive(true);
        self.authorization = Some(value);
        Ok(self)
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
        if let Some(authorization) = &self.authorization {
            request.metadata_mut().insert("authorization", authorization.clone());
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_builder_shows_that_it_has_a_token_never_the_token() {
        let builder = Client::builder("http://127.0.0.1:50051").bearer_token("s3cret-value");
        let shown = format!("{builder:?}");
        assert!(shown.contains("<redacted>") && !shown.contains("s3cret-value"), "{shown}");
    }
}
