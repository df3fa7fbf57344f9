//! A client of the idempotency coordinator, for services that must run each mutation once per
//! `Idempotency-Key` and replay its response to every retry.
//!
//! The map:
//! - [`Client`]: connects, and makes the contract's five calls (`claim`, `complete`, `renew`,
//!   `release`, `lookup`) with Rust types.
//! - [`Idempotent::run`], through [`Client::idempotent`]: the one call most services need. It
//!   claims the key, runs your closure once under a renewed lease, stores its response or
//!   releases the key, and replays the stored response to retries.
//! - [`Error`]: one error type, decoded from the contract's statuses ([`Reason`]).
//! - `http` (feature `http`): an `Idempotency-Key` layer for tower and axum services, following
//!   the IETF draft.
//!
//! ```no_run
//! use std::time::Duration;
//! use idempotency_client::{Client, Failure, Stored};
//!
//! # async fn create_payment(fencing_token: u64) -> Result<String, std::io::Error> { Ok(String::new()) }
//! # async fn example() -> Result<(), idempotency_client::Error> {
//! let client = Client::connect("http://127.0.0.1:50051").await?;
//! let outcome = client
//!     .idempotent("payments", "a1b2c3d4-e5f6-7890-1234-567890abcdef")
//!     .fingerprint(b"sha-256 of the request".to_vec())
//!     .lease_ttl(Duration::from_secs(30))
//!     .wait(Duration::from_secs(10))
//!     .owner("api-1")
//!     .run(|lease| async move {
//!         // Fence your own writes with the lease's token: a stale holder's are refused.
//!         let payment = create_payment(lease.fencing_token()).await?;
//!         Ok::<_, Failure>(Stored::new(payment).metadata("status", "201"))
//!     })
//!     .await?;
//! println!("{} (replayed: {})", String::from_utf8_lossy(&outcome.response().body), outcome.replayed());
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs, unreachable_pub)]

mod client;
mod error;
#[cfg(feature = "http")]
pub mod http;
mod idempotent;
mod types;

pub use client::{Client, ClientBuilder};
pub use error::{BoxError, Error};
pub use idempotency_proto::Reason;
pub use idempotent::{Failure, Idempotent, Lease, Outcome};
pub use types::{Claim, ClaimOutcome, Completion, Grant, InProgress, KeyState, KeyView, Renewal, Replay, Stored};
