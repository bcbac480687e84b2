//! Generates the gRPC target's client from proto/message_router/v1/handler.proto with
//! protox (a protobuf compiler in Rust: no protoc to install).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../proto/message_router/v1/handler.proto";
    let files = protox::compile([proto], ["../proto"])?;
    // The body as bytes::Bytes: the message's own buffer is shared, not copied.
    tonic_prost_build::configure()
        .build_server(false)
        .bytes(".message_router.v1.DeliverRequest.body")
        .compile_fds(files)?;
    println!("cargo:rerun-if-changed={proto}");
    Ok(())
}
