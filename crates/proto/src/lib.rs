//! The generated messages and clients of `keywarden.v1`, the file descriptor set that
//! server reflection serves, and [`Bearer`], the interceptor Keywarden's own clients
//! present their caller token with.
//!
//! The servers are not here: the `keywarden` crate generates them over these messages,
//! with its own request codec. Clients keep tonic's codec (an answer that does not
//! decode is the server's fault: INTERNAL).

#![allow(clippy::all, clippy::pedantic)]

pub mod bearer;

pub use bearer::Bearer;

tonic::include_proto!("keywarden.v1");

pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("keywarden_descriptor");
