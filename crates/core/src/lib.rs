//! The core of the idempotency coordinator: everything that decides, and nothing that stores or
//! speaks gRPC.
//!
//! The map, in reading order (each module uses only those above it):
//! - [`domain`]: validated values, the stored [`Record`](domain::Record) and the pure key state
//!   machine ([`domain::machine`]): given `now`, a key's record and a command, the new record and
//!   the outcome. Every rule of the contract lives there once.
//! - [`clock`]: injected wall-clock time (system, manual, offset).
//! - [`stats`]: what stores and the coordinator count for dashboards (atomic histograms), with
//!   no metrics format.
//! - [`store`]: the [`Store`](store::Store) trait every backend implements, with each method's
//!   atomicity and durability, and [`StoreError`](store::StoreError).
//! - [`admin`]: what the Admin API asks of a store ([`Maintenance`](admin::Maintenance)): a census,
//!   listing, purging, export and import, with the domain's rules for each.
//! - [`coordinator`]: applies commands through a store at the clock's time; waits for held keys,
//!   wakes waiters, drains; counts how waits ended.

#![warn(missing_docs, unreachable_pub)]

pub mod domain;

pub mod clock;
pub mod stats;

pub mod store;

pub mod admin;

pub mod coordinator;

pub use coordinator::Coordinator;
