//! The gRPC surface: thin tonic services that validate and convert requests, call the
//! lifecycle or the verifier, and map errors to statuses in one place (`error.rs`).
//! Caller authentication happens in interceptors (`auth.rs`) before a service sees a request;
//! request bodies are decoded by `codec.rs`, which refuses one that is not a valid message.

pub mod access_groups;
pub mod auth;
pub mod codec;
pub mod connect;
pub mod convert;
pub mod error;
pub mod ext_authz;
pub mod keys;
pub mod mutation;
pub mod openapi;
pub mod provider_keys;
pub mod revocations;
pub mod teams;
pub mod usage;
pub mod verify;
pub mod webhooks;
pub mod workspaces;
