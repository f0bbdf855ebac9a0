//! Compiles `liftwire/v1/*.proto` with a pure-Rust protobuf compiler (`protox`), so building
//! liftwire never needs a `protoc` binary.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "liftwire/v1/common.proto",
    "liftwire/v1/telemetry.proto",
    "liftwire/v1/events.proto",
    "liftwire/v1/device.proto",
    "liftwire/v1/backend.proto",
    "liftwire/v1/telemetry_api.proto",
    "liftwire/v1/gateway_api.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(proto).display());
    }
    let descriptors = protox::compile(PROTOS, [&root])?;
    // Kept for the tests that check code against the schema (see `text.rs`).
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("liftwire.fds"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    prost_build::Config::new()
        .enable_type_names()
        .compile_fds(descriptors)?;
    Ok(())
}
