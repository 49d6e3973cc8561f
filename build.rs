//! Generates the gRPC code from `proto/` with a vendored `protoc`, so a fresh machine needs
//! only the Rust toolchain. `$PROTOC` wins when set (distributions that ship their own).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded; nothing else reads the environment here.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "proto/keywarden/v1/common.proto",
        "proto/keywarden/v1/keys.proto",
        "proto/keywarden/v1/verify.proto",
        "proto/keywarden/v1/events.proto",
        "proto/keywarden/v1/workspaces.proto",
        "proto/keywarden/v1/provider_keys.proto",
        "proto/keywarden/v1/access_groups.proto",
        "proto/keywarden/v1/teams.proto",
    ];
    // The messages and the servers. The servers decode requests with
    // `api::codec::RequestCodec`: a body that does not decode is INVALID_ARGUMENT, not
    // tonic's INTERNAL.
    tonic_prost_build::configure()
        .build_client(false)
        .codec_path("crate::api::codec::RequestCodec")
        .file_descriptor_set_path(out_dir.join("keywarden_descriptor.bin"))
        .compile_protos(&protos, &["proto"])?;
    // The clients, with tonic's own codec (an answer that does not decode is a fault of
    // the server: INTERNAL), over the messages above (`extern_path`: not generated twice).
    let clients = out_dir.join("clients");
    std::fs::create_dir_all(&clients)?;
    tonic_prost_build::configure()
        .build_server(false)
        .extern_path(".keywarden.v1", "crate::proto")
        .out_dir(&clients)
        .compile_protos(&protos, &["proto"])?;
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    // `sqlx::migrate!` embeds the migration files at compile time but cannot tell cargo
    // about them on stable Rust: without this, a new migration is missed by an
    // incremental build.
    println!("cargo:rerun-if-changed=migrations");
    Ok(())
}
