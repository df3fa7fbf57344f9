//! The scale-out store of the idempotency coordinator: PostgreSQL, shared by any number of
//! coordinator replicas.
//!
//! Each transition is one round trip: a PL/pgSQL function (`src/sql/`) that locks the key's row,
//! decides by the same rules as `idempotency_core::domain::machine`, writes, and returns the
//! outcome. Lookup reads the row and lets the domain machine decide.
//!
//! The map, in reading order:
//! - `codes`: the outcome and state codes that Rust and SQL share, named once.
//! - `connection`: connection settings, schema names, errors from the database.
//! - `schema`: the embedded, versioned migrations.
//! - `rows`: rows of `records` and outcome rows read into the domain's types, and back.
//! - `listen`: the LISTEN task that turns other replicas' changes into wake-ups.
//! - [`PostgresStore`]: the [`Store`](idempotency_core::store::Store), its health task, and
//!   [`import`] (what `migrate` uses).
//! - `maintenance`: the operators' side ([`Maintenance`](idempotency_core::admin::Maintenance)):
//!   census, listing, purging, a repeatable-read export and a live import.
//!
//! Invariants:
//! Invariants:
//! - Time is the database's clock (`clock_timestamp()`), never a replica's, so replicas with
//!   skewed clocks agree on every lease. (Tests may pass their own time: [`TimeSource::Caller`].)
//! - Fencing tokens come from one sequence, so they increase across replicas and restarts.
//! - A reply reports only committed state; durability is the database's (`synchronous_commit`).
//! - Claims waiting on one replica learn of a Complete, Release or Renew on another through
//!   LISTEN/NOTIFY on the channel `<schema>.keys`; a function notifies only for rows whose
//!   `waiters` flag a waiting Claim set, so plain traffic pays nothing for it.
//! - The schema is created and upgraded on start by the embedded, versioned migrations under a
//!   transaction-scoped advisory lock, so replicas starting together migrate once.

#![warn(missing_docs, unreachable_pub)]

mod batch;
mod codes;
mod connection;
mod import;
mod listen;
mod maintenance;
mod rows;
mod schema;
mod store;

pub use connection::PostgresOpenError;
pub use import::{ImportError, ImportReport, import};
pub use store::{Password, PostgresOptions, PostgresStore, TimeSource};
