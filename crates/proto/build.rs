//! Compiles the proto with a pure-Rust parser (no `protoc` needed) and writes the descriptor set
//! that server reflection serves, both from the same parse.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The proto lives at the repository root, where every language's client generates from it.
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let proto = root.join("idempotency/v1/coordinator.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    let descriptors = protox::compile([&proto], [&root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let encoded = prost::Message::encode_to_vec(&descriptors);
    std::fs::write(out_dir.join("coordinator_descriptor.bin"), encoded)?;
    tonic_prost_build::configure()
        // Undecodable requests are bad input, not INTERNAL (see src/codec.rs).
        .codec_path("crate::codec::Codec")
        // Response bodies travel as `Bytes`, shared rather than copied between layers.
        .bytes(".idempotency.v1.Response.body")
        .compile_fds(descriptors)?;
    Ok(())
}
