//! How every mutating handler starts and ends its checks: the caller the auth layer
//! recognised, the fields' violations, and last the actor the message names.
//!
//! A mutation is recorded in the audit log as a caller token acting for a principal
//! ([`Acting`]). Every handler that changes something takes the same steps: the caller
//! from the request's extensions, its fields and the actor validated into one set of
//! violations (in the message's field order, which is the order the error lists them
//! in), then the check, then `Acting`. [`Mutation`] holds the caller and the violations
//! from the first step to the last, so the one way to an `Acting` is through the check.

use std::sync::Arc;

use tonic::{Request, Status};

use super::auth::Caller;
use super::error::checked;
use crate::domain::actor::Actor;
use crate::domain::validate::Violations;
use crate::store::Acting;

/// The caller the auth layer put into the request's extensions (every service behind
/// the auth layer has one; its absence is a wiring fault, answered UNAUTHENTICATED).
pub(crate) fn caller<T>(request: &Request<T>) -> Result<Arc<str>, Status> {
    request
        .extensions()
        .get::<Caller>()
        .map(|c| c.0.clone())
        .ok_or_else(super::auth::no_caller)
}

/// A mutating request being checked: who called, and the violations found so far.
pub(crate) struct Mutation {
    caller: Arc<str>,
    /// The handler's own field checks add to these.
    pub v: Violations,
}

impl Mutation {
    /// The request's caller and message, with no violation yet.
    pub fn of<T>(request: Request<T>) -> Result<(Self, T), Status> {
        let caller = caller(&request)?;
        Ok((Mutation::by(caller), request.into_inner()))
    }

    /// For a handler that has already established its caller (and its role).
    pub fn by(caller: Arc<str>) -> Self {
        Mutation {
            caller,
            v: Violations::default(),
        }
    }

    /// Ends the checks: one INVALID_ARGUMENT names every bad field (the actor's among
    /// them, checked where its field stands in the message); otherwise who is acting.
    pub fn acting(self, actor: Actor) -> Result<Acting, Status> {
        let (acting, ()) = self.acting_with(actor, Some(()))?;
        Ok(acting)
    }

    /// [`Mutation::acting`], with the value a field parsed into (see [`checked`]).
    pub fn acting_with<T>(self, actor: Actor, value: Option<T>) -> Result<(Acting, T), Status> {
        let value = checked(self.v, value)?;
        Ok((
            Acting {
                caller: self.caller,
                actor,
            },
            value,
        ))
    }
}
