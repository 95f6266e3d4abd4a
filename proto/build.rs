//! Compiles the v1 API with protox (pure Rust, no system `protoc`) and writes the
//! file descriptor set next to the generated code for server reflection.

use prost::Message;

const PROTOS: &[&str] = &[
    "io/cloudevents/v1/cloudevents.proto",
    "fedmesh/v1/types.proto",
    "fedmesh/v1/exchange.proto",
    "fedmesh/v1/relay.proto",
    "fedmesh/v1/directory.proto",
    "fedmesh/v1/notifications.proto",
    "fedmesh/v1/moves.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let descriptors = protox::compile(PROTOS, ["."])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("fedmesh_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
