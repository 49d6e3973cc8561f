//! The rules of Keywarden with no IO and no async: the key format, scopes and their
//! implications, what a key record is and how a verification is decided, and the
//! validation of every field a caller can send.
//!
//! **Architecture Invariant:** nothing in here touches the network, the database, the
//! clock or the environment. The current time is always a parameter (`now`, unix
//! microseconds), so expiry and grace periods are tested without sleeping.

pub mod access;
pub mod actor;
pub mod base62;
pub mod budget;
pub mod event;
pub mod ids;
pub mod key;
pub mod key_format;
pub mod leak;
pub mod lease;
pub mod limits;
pub mod packed_id;
pub mod pools;
pub mod provider_key;
pub mod refusal;
pub mod rollup;
pub mod scopes;
pub mod team;
pub mod validate;
pub mod webhook;
pub mod workspace;

/// A point in time as unix microseconds (UTC). Storage and the domain share this one
/// representation so that both stores compare and order times identically.
pub type Micros = i64;

pub const MICROS_PER_SECOND: i64 = 1_000_000;

/// A length of time in microseconds, saturating at `Micros::MAX`.
pub fn micros_in(d: std::time::Duration) -> Micros {
    Micros::try_from(d.as_micros()).unwrap_or(Micros::MAX)
}
