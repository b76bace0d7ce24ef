//! Generates the prost types for `proto/` with a vendored protoc, so a fresh
//! machine needs no protobuf compiler installed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto");
    prost_build::compile_protos(
        &["proto/payment_event.proto", "proto/idem.proto"],
        &["proto"],
    )?;
    Ok(())
}
