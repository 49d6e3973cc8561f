//! Keywarden: the credential authority of a multi-tenant AI platform.
//!
//! # Layout
//!
//! - [`domain`]: key format, scopes, key records, verification decisions, field
//!   validation. Pure: no IO, no async, no clock, no randomness of its own. The
//!   `keywarden-domain` crate (`crates/domain`), re-exported.
//! - [`store`]: the [`store::Store`] trait and its Postgres and SQLite implementations.
//! - [`cache`]: the VerifyKey cache, whose fills cannot resurrect an invalidated entry;
//!   [`interned`]: the workspace ids, scope sets and owners its keys share.
//! - [`workspaces`]: workspaces (tenants) and what their plans allow.
//! - [`keys`]: the key lifecycle (issue, update, rotate, revoke, delete) over a store,
//!   keeping the cache coherent.
//! - [`verify`]: the VerifyKey hot path.
//! - [`ratelimit`]: rate-limit counters (in memory, or shared in Redis) behind one trait.
//! - [`usage`]: spend and last use, per replica, written to storage in batches.
//! - [`ledger`]: one record per key in use, holding its usage account and its in-memory
//!   rate-limit counters together.
//! - [`crypto`]: envelope encryption (AES-256-GCM data keys wrapped by versioned KEKs,
//!   Argon2id for passphrase KEKs) for the secrets Keywarden must give back.
//! - [`api`]: the tonic services, caller authentication, and the one mapping of errors
//!   to gRPC statuses.
//! - [`events`]: the per-replica event-log tailer and the WatchRevocations fan-out.
//! - [`metrics`]: the Prometheus figures each replica keeps, and `/metrics`.
//! - [`http`]: the `[http]` listener: the secret-scanning endpoint.
//! - [`webhooks`]: webhook endpoints and their delivery from the outbox the key
//!   mutations write (signed, at least once, in order, by one replica at a time).
//! - [`telemetry`]: log lines and OTLP trace export for the process.
//! - [`edge`]: the client library for edge nodes: [`edge::Verifier`], VerifyKey with a
//!   local cache kept coherent by the revocation stream. The `keywarden-edge` crate
//!   (`edge/`), re-exported; it also holds the bounded maps and the fill guard both
//!   caches use.
//! - [`proto`]: the messages and clients of the `keywarden-proto` crate (`crates/proto`),
//!   and the servers generated here over them.
//! - [`config`], [`clock`], [`server`]: configuration, time, and start-up / shutdown;
//!   [`startup`]: `serve`'s wait for its database, the port answering NOT_SERVING.
//! - [`bench`]: `keywarden bench`, the load generator and BENCHMARKS.md.
//! - [`cli`]: the admin CLI (`keywarden keys ...`, `verify`, ...), a gRPC client of a
//!   running server.

pub mod access_groups;
pub mod api;
pub use keywarden_proto::bearer;
pub mod bench;
pub mod cache;
pub mod cli;
pub mod clock;
pub mod config;
pub mod crypto;
pub use keywarden_domain as domain;
pub use keywarden_edge as edge;
pub mod events;
pub mod http;
pub mod interned;
pub mod keys;
pub mod ledger;
pub mod metrics;
pub mod provider_keys;
pub mod ratelimit;
pub mod server;
pub mod startup;
pub mod store;
pub mod teams;
pub mod telemetry;
pub mod usage;
pub mod usage_history;
pub mod usage_reports;
pub mod verify;
pub mod webhooks;
pub mod workspaces;

/// The protobuf and gRPC code of `keywarden.v1`: the messages, clients and file
/// descriptor set of the `keywarden-proto` crate, and the servers, generated here with
/// the server's request codec (see `build.rs` and `api::codec`).
pub mod proto {
    #![allow(clippy::all, clippy::pedantic)]
    pub use keywarden_proto::*;
    tonic::include_proto!("keywarden.v1");
}
