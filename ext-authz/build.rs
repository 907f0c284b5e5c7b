//! Generates the `llmpolicy.v1` gRPC API from `proto/` with protox (a Rust protobuf compiler), so
//! a fresh machine builds without a system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../proto/llmpolicy/v1/policy.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["../proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
