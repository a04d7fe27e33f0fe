//! Compiles the wire contract in `proto/ringfence/v1` with protox (pure Rust,
//! no system `protoc`) and generates prost messages plus tonic client and
//! server code for it.

use std::error::Error;
use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "proto/ringfence/v1/envelope.proto",
    "proto/ringfence/v1/health.proto",
    "proto/ringfence/v1/task.proto",
    "proto/ringfence/v1/agent.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // JSON for operators and fixtures (`ringfenced health --json`,
        // `ringfence hosts health --json`): field names as in the .proto.
        .type_attribute(".", "#[derive(serde::Serialize, serde::Deserialize)]")
        .message_attribute(".", "#[serde(default)]")
        .file_descriptor_set_path(out_dir.join("ringfence_descriptor.bin"))
        .compile_fds(fds)?;
    Ok(())
}
