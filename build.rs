//! Compiles the wire contract without a system `protoc`: protox parses the
//! .proto files in Rust, and the descriptor set is kept for gRPC reflection.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/tokenbroker/v1/token_broker.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out.join("tokenbroker_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;

    // The bench's echo baseline (benches/broker.rs). Generated into OUT_DIR
    // like the above, but only the bench includes it: the library does not.
    let echo = "proto/bench/v1/echo.proto";
    println!("cargo:rerun-if-changed={echo}");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(protox::compile([echo], ["proto"])?)?;
    Ok(())
}
