//! The idempotency coordinator's server: API instances delegate idempotency-key ownership and
//! response storage to it over gRPC, so that each mutation runs once and every retry gets its
//! response.
//!
//! The map, in reading order (each module uses only those above it; the domain, the stores and
//! the protocol are crates of their own):
//! - [`config`]: command-line and environment configuration, converted into the core's and the
//!   stores' types (only this module knows clap).
//! - [`stores`]: [`AnyStore`](stores::AnyStore), the store the configuration chose.
//! - [`auth`]: the auth file: who may use which namespaces with which role, and quotas.
//! - [`tls`]: TLS and mTLS material, reloaded while serving.
//! - [`listener`]: accepting connections: the connection limit, TLS handshakes, idle timeouts.
//! - [`sweeper`]: deletes expired records in the background.
//! - [`metrics`]: Prometheus metrics: the gRPC layer, call counters, a collector of what the
//!   coordinator, store, sweeper and process count, and the `/metrics` endpoint.
//! - [`service`]: the gRPC adapter and the one error-to-status mapping.
//! - [`server`]: opens the store, wires everything, serves until told to stop, drains.
//! - [`progress`]: progress of long work: a bar on a terminal, plain lines elsewhere.
//! - [`migrate`]: copies an embedded store into PostgreSQL.
//! - [`snapshot`]: the snapshot file format (checked whole before use).
//! - [`backup`]: `backup` and `restore` of a stopped embedded store through a snapshot file.

#![warn(missing_docs, unreachable_pub)]

pub mod config;
pub mod stores;

pub mod auth;
pub mod listener;
pub mod tls;

pub mod sweeper;

pub mod metrics;
pub mod service;

pub mod server;

pub mod progress;

pub mod migrate;
pub mod snapshot;

pub mod backup;

pub use config::Config;
