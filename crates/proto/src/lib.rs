//! The `idempotency.v1` protocol, shared by the coordinator and its clients.
//!
//! The map, in reading order:
//! - [`pb`]: the generated messages and gRPC stubs (`Coordinator` client and server), generated
//!   at build time from `proto/idempotency/v1/coordinator.proto` and kept in a private module.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for server reflection.
//! - [`Reason`]: every `google.rpc.ErrorInfo` reason of the contract, with its status code. The
//!   server builds its statuses from it and clients decode them with it; no reason is spelled
//!   anywhere else.
//! - [`codec`]: the codec the stubs use (undecodable bytes are `INVALID_MESSAGE`).

#![warn(missing_docs, unreachable_pub)]

mod generated {
    #![allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
    tonic::include_proto!("idempotency.v1");
}

/// The generated protobuf messages and gRPC stubs of `idempotency.v1`.
pub mod pb {
    pub use crate::generated::*;
}

pub mod codec;
mod reason;

pub use reason::{ERROR_DOMAIN, Reason, UnknownReason};

/// The fully qualified name of the coordinator's gRPC service, as health checks name it.
pub const SERVICE_NAME: &str = "idempotency.v1.Coordinator";

/// The encoded `FileDescriptorSet` of `proto/idempotency/v1/coordinator.proto`.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/coordinator_descriptor.bin"));
