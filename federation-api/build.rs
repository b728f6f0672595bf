//! Compiles the Hamlet protos with `protox` (pure Rust, no system `protoc`)
//! and generates prost messages plus tonic clients and servers for both API
//! versions. The encoded descriptor set is kept for gRPC reflection.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "proto/google/rpc/status.proto",
    "proto/federation/types/v1alpha2/types.proto",
    "proto/federation/types/v1alpha1/types.proto",
    "proto/federation/resourcediscovery/v1alpha2/discovery.proto",
    "proto/federation/resourcediscovery/v1alpha1/discovery.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");

    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_source_info(true).include_imports(true);
    compiler.open_files(PROTOS)?;

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("hamlet_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    // The imported well-known types stay in the set: prost-build needs their
    // descriptors to analyse our messages, and maps them to prost-types
    // (its default extern path) instead of generating them again.
    let fds = compiler.file_descriptor_set();

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
