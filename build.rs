//! Compiles the vendored `proto/onnx.proto` into prost message types (`$OUT_DIR/onnx.rs`,
//! included by `src/onnx/proto.rs`). protox parses the schema in Rust, so no system `protoc`
//! is needed; prost-build generates the code from protox's descriptor set.

fn main() {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    println!("cargo:rerun-if-changed=build.rs");
    let fds = match protox::compile(["proto/onnx.proto"], ["proto"]) {
        Ok(fds) => fds,
        Err(e) => panic!("proto/onnx.proto does not compile: {e}"),
    };
    let mut config = prost_build::Config::new();
    if let Err(e) = config.compile_fds(fds) {
        panic!("prost-build failed on proto/onnx.proto: {e}");
    }
}
