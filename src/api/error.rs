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
use crate::workspaces::WorkspaceError;

/// The message and the details both travel in the trailers, and clients bound the size of
/// those (hyper's default is 16 KiB, gRPC core's 8 KiB); a reply past the bound costs the
/// client its whole connection. A request can hold any number of wrong fields (every
/// `update_mask` path may be unknown), so the report is cut at this many bytes as sent.
const MAX_REPORT_BYTES: usize = 6 * 1024;

/// What one violation costs in the trailers: percent-encoded in `grpc-message` (bytes
/// outside printable ASCII take three), then base64-encoded twice over in
/// `grpc-status-details-bin`, which carries the message again beside the violation.
fn report_bytes(v: &crate::domain::validate::FieldViolation) -> usize {
    let text = || v.field.bytes().chain(v.description.bytes());
    let in_message: usize = text()
        .map(|b| {
            if (0x20..0x7f).contains(&b) && b != b'%' {
                1
            } else {
                3
            }
        })
        .sum();
    in_message + (2 * text().count() + 8).div_ceil(3) * 4
}

pub fn invalid_argument(violations: Violations) -> Status {
    let total = violations.0.len();
    let mut budget = MAX_REPORT_BYTES;
    let reported: Vec<_> = violations
        .0
        .into_iter()
        .enumerate()
        .take_while(|(i, v)| {
            let cost = report_bytes(v);
            // The first one is always reported (each is bounded on its own).
            let fits = *i == 0 || cost <= budget;
            budget = budget.saturating_sub(cost);
            fits
        })
        .map(|(_, v)| v)
        .collect();
    let mut message = reported
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ");
    if reported.len() < total {
        message.push_str(&format!(
            "; and {} more violations not shown",
            total - reported.len()
        ));
    }
    let details = ErrorDetails::with_bad_request(
        reported
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

/// [`check`], then the value a field parsed into: a field that did not parse always left a
/// violation, so the value is there once the check has passed.
pub fn checked<T>(violations: Violations, value: Option<T>) -> Result<T, Status> {
    check(violations)?;
    value.ok_or_else(|| Status::invalid_argument("invalid request"))
}

pub fn store_status(e: &StoreError) -> Status {
    match e {
        StoreError::NotFound => Status::not_found("not found"),
        StoreError::Precondition(why) => Status::failed_precondition(*why),
        StoreError::AlreadyExists => Status::already_exists("already exists"),
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
            KeyError::Refused(why) => Status::failed_precondition(why),
            KeyError::WorkspaceNotFound(id) => {
                Status::not_found(format!("workspace {id} does not exist"))
            }
            KeyError::TeamNotFound(id) => {
                Status::not_found(format!("team {id} does not exist in this workspace"))
            }
            KeyError::Store(e) => store_status(&e),
            KeyError::Randomness => {
                tracing::error!("the OS random source failed");
                Status::internal("internal error")
            }
        }
    }
}

impl From<WorkspaceError> for Status {
    fn from(e: WorkspaceError) -> Self {
        match e {
            WorkspaceError::NotFound(_) => Status::not_found(e.to_string()),
            WorkspaceError::AlreadyExists(_) => Status::already_exists(e.to_string()),
            WorkspaceError::Store(e) => store_status(&e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_types::StatusExt;

    fn fields(status: &Status) -> Vec<String> {
        status
            .get_details_bad_request()
            .unwrap()
            .field_violations
            .into_iter()
            .map(|v| v.field)
            .collect()
    }

    #[test]
    fn a_few_violations_are_all_reported() {
        let mut v = Violations::default();
        v.add("name", "is required");
        v.add("scopes[1]", "is not a scope");
        let status = invalid_argument(v);
        assert_eq!(fields(&status), ["name", "scopes[1]"]);
        assert_eq!(
            status.message(),
            "invalid request: name: is required; scopes[1]: is not a scope"
        );
    }

    #[test]
    fn a_flood_of_violations_is_cut_to_what_a_client_accepts() {
        let mut v = Violations::default();
        for i in 0..10_000 {
            v.add(
                "update_mask",
                format!("unknown path `{}{i}`", "é".repeat(60)),
            );
        }
        let status = invalid_argument(v);
        let reported = fields(&status).len();
        assert!((1..10_000).contains(&reported), "{reported}");
        assert!(
            status.message().ends_with(&format!(
                "; and {} more violations not shown",
                10_000 - reported
            )),
            "{}",
            status.message()
        );
        // As sent: the message percent-encoded, the details base64-encoded.
        let message: usize = status
            .message()
            .bytes()
            .map(|b| {
                if (0x20..0x7f).contains(&b) && b != b'%' {
                    1
                } else {
                    3
                }
            })
            .sum();
        let details = status.details().len().div_ceil(3) * 4;
        assert!(message + details <= 7 * 1024, "{message} + {details}");
    }
}
