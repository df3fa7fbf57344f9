//! Compiles the proto with a pure-Rust parser (no `protoc` needed) and writes the descriptor set
//! that server reflection serves, both from the same parse.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/idempotency/v1/coordinator.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let encoded = prost::Message::encode_to_vec(&descriptors);
    std::fs::write(out_dir.join("coordinator_descriptor.bin"), encoded)?;
    // The service answers undecodable messages as bad input (see src/codec.rs).
    tonic_prost_build::configure().codec_path("crate::codec::Codec").compile_fds(descriptors)?;
    Ok(())
}
