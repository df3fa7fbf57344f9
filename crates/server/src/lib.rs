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
//! - [`progress`]: progress of long work: a bar on a terminal, plain lines elsewhere.
//! - [`snapshot`]: the snapshot file format (checked whole before use), of backups and of the
//!   Admin API's export and import.
//! - [`service`]: the gRPC adapter and the one error-to-status mapping.
//! - [`admin`]: the `idempotency.v1.Admin` service (admin role): stats, listing, purging,
//!   export and import.
//! - [`server`]: opens the store, wires everything, serves until told to stop, drains.
//! - [`migrate`]: copies an embedded store into PostgreSQL.
//! - [`backup`]: `backup` and `restore` of a stopped embedded store through a snapshot file.
//! - [`admin_cli`]: `admin`, the operator's client of a running server's Admin service.

#![warn(missing_docs, unreachable_pub)]

pub mod config;
pub mod stores;

pub mod auth;
pub mod tls;

pub mod listener;

pub mod sweeper;

pub mod metrics;
pub mod progress;
pub mod snapshot;

pub mod service;

pub mod admin;

pub mod server;

pub mod migrate;

pub mod backup;

pub mod admin_cli;

pub use config::Config;
