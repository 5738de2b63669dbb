//! Compiles `confab/v1/*.proto` and `confab/cluster/v1/*.proto` with protox (pure Rust), so no `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["confab/v1/frames.proto", "confab/cluster/v1/bus.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["."])?;
    prost_build::Config::new()
        .bytes([".confab.cluster"])
        .compile_fds(descriptors)?;
    Ok(())
}
