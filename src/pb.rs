//! The generated protobuf and gRPC code of `idempotency.v1`, and its descriptor set for server
//! reflection. Nothing hand-written lives here.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("idempotency.v1");

/// The encoded `FileDescriptorSet` of `proto/idempotency/v1/coordinator.proto`.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/coordinator_descriptor.bin"));
