//! Generates the messages of our own gRPC API (`llmpolicy.v1`, the usage report the filter sends)
//! from `proto/` with protox, as the server does: one definition for both sides, and no system
//! `protoc`. Only messages: the filter calls the service through Envoy's gRPC client.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../proto/llmpolicy/v1/policy.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["../proto"])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
