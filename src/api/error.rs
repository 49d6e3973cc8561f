//! The one place errors become gRPC statuses.
//!
//! INVALID_ARGUMENT carries google.rpc.BadRequest field violations; faults become
//! UNAVAILABLE (retry) or INTERNAL with a generic message, the details going to the log
//! only (they never hold a secret: the store never sees one).

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::domain::validate::Violations;
use crate::keys::KeyError;
use crate::store::StoreError;

pub fn invalid_argument(violations: Violations) -> Status {
    let message = violations
        .0
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ");
    let details = ErrorDetails::with_bad_request(
        violations
            .0
            .into_iter()
            .map(|v| FieldViolation::new(v.field, v.description))
            .collect::<Vec<_>>(),
    );
    Status::with_error_details(
        Code::InvalidArgument,
        format!("invalid request: {message}"),
        details,
    )
}

/// Turns a non-empty set of violations into an error.
pub fn check(violations: Violations) -> Result<(), Status> {
    if violations.is_empty() {
        Ok(())
    } else {
        Err(invalid_argument(violations))
    }
}

pub fn store_status(e: &StoreError) -> Status {
    match e {
        StoreError::NotFound => Status::not_found("not found"),
        StoreError::Precondition(why) => Status::failed_precondition(*why),
        StoreError::Unavailable(_) => {
            tracing::warn!(error = %e, "storage unavailable");
            Status::unavailable("storage is unavailable; retry later")
        }
        _ => {
            tracing::error!(error = %e, "storage error");
            Status::internal("internal error")
        }
    }
}

impl From<KeyError> for Status {
    fn from(e: KeyError) -> Self {
        match e {
            KeyError::PermissionDenied(why) => Status::permission_denied(why),
            KeyError::NotFound => Status::not_found("key not found"),
            KeyError::FailedPrecondition(why) => Status::failed_precondition(why),
            KeyError::Store(e) => store_status(&e),
            KeyError::Randomness => {
                tracing::error!("the OS random source failed");
                Status::internal("internal error")
            }
        }
    }
}
