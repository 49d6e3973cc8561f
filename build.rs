//! Generates the gRPC servers from `proto/` with a vendored `protoc`, so a fresh machine needs
//! only the Rust toolchain. `$PROTOC` wins when set (distributions that ship their own).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded; nothing else reads the environment here.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    let protos = [
        "proto/keywarden/v1/common.proto",
        "proto/keywarden/v1/keys.proto",
        "proto/keywarden/v1/verify.proto",
        "proto/keywarden/v1/events.proto",
        "proto/keywarden/v1/workspaces.proto",
        "proto/keywarden/v1/provider_keys.proto",
        "proto/keywarden/v1/access_groups.proto",
        "proto/keywarden/v1/teams.proto",
        "proto/keywarden/v1/usage.proto",
        "proto/keywarden/v1/webhooks.proto",
    ];
    // The servers, over the messages and clients of the `keywarden-proto` crate
    // (`extern_path`: not generated twice). They decode requests with
    // `api::codec::RequestCodec`: a body that does not decode is INVALID_ARGUMENT, not
    // tonic's INTERNAL.
    tonic_prost_build::configure()
        .build_client(false)
        .codec_path("crate::api::codec::RequestCodec")
        .extern_path(".keywarden.v1", "::keywarden_proto")
        .compile_protos(&protos, &["proto"])?;
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    envoy_descriptors()?;
    // `sqlx::migrate!` embeds the migration files at compile time but cannot tell cargo
    // about them on stable Rust: without this, a new migration is missed by an
    // incremental build.
    println!("cargo:rerun-if-changed=migrations");
    Ok(())
}

/// The descriptors of Envoy's `envoy.service.auth.v3.Authorization` and everything it
/// imports, for server reflection only (its messages come from `envoy-types`), so that
/// grpcurl can call ext_authz's Check with no Envoy protos at hand. The files are
/// vendored under `proto/vendor` (see its README).
fn envoy_descriptors() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("envoy_ext_authz.bin");
    let protoc = std::env::var_os("PROTOC").ok_or("PROTOC is not set")?;
    let status = std::process::Command::new(protoc)
        .arg("--include_imports")
        .arg(format!("--descriptor_set_out={}", out.display()))
        .arg("-Iproto/vendor")
        .arg(format!(
            "-I{}",
            protoc_bin_vendored::include_path()?.display()
        ))
        .arg("envoy/service/auth/v3/external_auth.proto")
        .status()?;
    if !status.success() {
        return Err(format!("protoc failed on Envoy's ext_authz protos: {status}").into());
    }
    println!("cargo:rerun-if-changed=proto/vendor");
    Ok(())
}
