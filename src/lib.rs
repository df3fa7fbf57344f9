//! An idempotency coordinator: API instances delegate idempotency-key ownership and response
//! storage to it over gRPC, so that each mutation runs once and every retry gets its response.
//!
//! The map, in reading order (each module uses only those above it):
//! - [`pb`]: the generated protobuf and gRPC code, and the descriptor set for reflection;
//!   [`codec`], the codec it uses (undecodable messages are bad input).
//! - [`domain`]: validated values, the stored record and the pure key state machine.
//! - [`clock`]: injected wall-clock time (system or manual).
//! - [`config`]: command-line and environment configuration.
//! - [`store`]: the storage trait, the sled backend with group commit, the PostgreSQL backend.
//! - [`coordinator`]: applies commands through a store; waiting, waking, draining.
//! - [`service`]: the gRPC adapter and the error-to-status mapping.
//! - [`sweeper`]: deletes expired records in the background.
//! - [`server`]: wires everything and serves until told to stop.
//! - [`migrate`]: copies an embedded store into PostgreSQL.
//! - [`bench`]: the load generator behind `idempotency-bench` (a client; nothing above uses it).

pub mod codec;
pub mod pb;

pub mod domain;

pub mod clock;
pub mod config;
pub mod store;

pub mod coordinator;
pub mod service;
pub mod sweeper;

pub mod server;

pub mod migrate;

pub mod bench;

pub use config::Config;
pub use coordinator::Coordinator;
pub use store::sled::SledStore;
