//! Compiles the .proto files with protox (pure Rust), so building Keel needs no system protoc.

fn main() {
    let files = [
        "proto/kv.proto",
        "proto/auth.proto",
        "proto/rpc.proto",
        "proto/v3lock.proto",
        "proto/v3election.proto",
        "proto/keel/internal.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(files, ["proto"]).expect("compile etcd protos");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .bytes(".")
        .codec_path("crate::codec::SizedCodec")
        .compile_fds(fds)
        .expect("generate Rust from protos");
}
