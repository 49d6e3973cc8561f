//! The one place errors become gRPC statuses.
//!
//! Every status the server produces is built by [`refused`] from a [`Refusal`]: the
//! reason decides the code ([`code`]) and whether a retry is suggested ([`retry_delay`]),
//! and the status carries a google.rpc.ErrorInfo (the reason, domain `keywarden.dev`, the
//! refusal's metadata), plus google.rpc.RetryInfo where waiting and trying again can
//! succeed. INVALID_ARGUMENT also carries google.rpc.BadRequest field violations. Faults
//! become UNAVAILABLE (retry) or INTERNAL with a generic message, the details going to the
//! log only (they never hold a secret: the store never sees one). `docs/errors.md` lists
//! the reasons for clients.

use std::collections::HashMap;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::access_groups::AccessGroupError;
use crate::domain::refusal::{Reason, Refusal};
use crate::domain::validate::Violations;
use crate::keys::KeyError;
use crate::store::StoreError;
use crate::teams::TeamError;
use crate::usage_reports::UsageError;
use crate::workspaces::WorkspaceError;

/// The ErrorInfo `domain` of every reason.
pub const ERROR_DOMAIN: &str = "keywarden.dev";

/// The gRPC code a reason travels with: one code per reason, whoever refuses.
pub fn code(reason: Reason) -> Code {
    use Reason::*;
    match reason {
        CallerTokenMissing | CallerTokenUnknown => Code::Unauthenticated,
        CallerRoleMissing
        | ScopeCeilingExceeded
        | SelfServiceDisabled
        | SelfServiceKeyLimitReached
        | SelfServiceOwnerNotActor
        | BudgetResetNeedsAdmin => Code::PermissionDenied,
        PlanForbidsApiKeys
        | PlanForbidsByok
        | KekNotConfigured
        | QuotaLeasesDisabled
        | TeamBudgetCeilingExceeded
        | TeamExpiryRequired
        | TeamExpiryTooFar
        | TeamRateLimitCeilingExceeded
        | AccessGroupsMissing
        | ReachBeyondTeam
        | AccessGroupInUse
        | TeamInUse
        | WebhookLimitReached
        | ServiceAccountNotInTeam
        | ServiceAccountOwnsKeys
        | KeyRevoked
        | KeyExpired => Code::FailedPrecondition,
        KeyNotFound
        | WorkspaceNotFound
        | TeamNotFound
        | AccessGroupNotFound
        | ServiceAccountNotFound
        | ProviderKeyNotFound
        | WebhookNotFound
        | ResourceNotFound => Code::NotFound,
        // A taken name or id is ALREADY_EXISTS, whatever holds it (Google's AIP-133).
        WorkspaceAlreadyExists
        | TeamAlreadyExists
        | AccessGroupAlreadyExists
        | ServiceAccountAlreadyExists
        | ResourceAlreadyExists => Code::AlreadyExists,
        InvalidRequest | MalformedRequest => Code::InvalidArgument,
        StreamSubscriberTooSlow => Code::Aborted,
        StorageUnavailable | RateLimitBackendUnavailable | ServerShuttingDown | EventLogStale => {
            Code::Unavailable
        }
        InternalError => Code::Internal,
    }
}

/// How long to wait before trying again, for the reasons where trying again can succeed
/// with nothing changed: a backend that did not answer, a replica going away, a stream
/// subscriber that can resume at once (a short pause lets it drain). Never for a policy
/// refusal: the same request would be refused again.
pub fn retry_delay(reason: Reason) -> Option<Duration> {
    match reason {
        Reason::StorageUnavailable
        | Reason::RateLimitBackendUnavailable
        | Reason::ServerShuttingDown
        | Reason::EventLogStale => Some(Duration::from_secs(1)),
        Reason::StreamSubscriberTooSlow => Some(Duration::from_millis(100)),
        _ => None,
    }
}

/// The one way a refusal becomes a status.
pub fn refused(refusal: Refusal) -> Status {
    with_details(refusal, ErrorDetails::new())
}

/// [`refused`], adding ErrorInfo and RetryInfo to `details` (which may hold a BadRequest).
fn with_details(refusal: Refusal, mut details: ErrorDetails) -> Status {
    let reason = refusal.reason;
    // Several rules broken at once: each as a PreconditionFailure violation (type: its
    // reason, subject: the field), so a client sees every one in one answer.
    for v in &refusal.violations {
        details.add_precondition_failure_violation(
            v.reason.as_str(),
            v.field,
            v.description.clone(),
        );
    }
    let metadata: HashMap<String, String> = refusal
        .metadata
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    details.set_error_info(reason.as_str(), ERROR_DOMAIN, metadata);
    if let Some(delay) = retry_delay(reason) {
        details.set_retry_info(Some(delay));
    }
    Status::with_error_details(code(reason), refusal.message, details)
}

/// A fault: the reason with a fixed, generic message (what went wrong is logged by the
/// caller, never sent).
fn fault(reason: Reason, message: &str) -> Status {
    refused(Refusal::new(reason, message))
}

/// The message and the details both travel in the trailers, and clients bound the size of
/// those (hyper's default is 16 KiB, gRPC core's 8 KiB); a reply past the bound costs the
/// client its whole connection. A request can hold any number of wrong fields (every
/// `update_mask` path may be unknown), so the report is cut at this many bytes as sent.
const MAX_REPORT_BYTES: usize = 6 * 1024;

/// What the ErrorInfo beside the violations costs at most (its reason, domain and a count),
/// base64-encoded: taken from the report's budget.
const ERROR_INFO_BYTES: usize = 128;

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
    let mut budget = MAX_REPORT_BYTES - ERROR_INFO_BYTES;
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
    with_details(
        Refusal::new(
            Reason::InvalidRequest,
            format!("invalid request: {message}"),
        )
        .with("violations", total),
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
    value.ok_or_else(|| fault(Reason::InvalidRequest, "invalid request"))
}

pub fn store_status(e: &StoreError) -> Status {
    match e {
        StoreError::NotFound => fault(Reason::ResourceNotFound, "not found"),
        StoreError::Precondition(refusal) => refused(refusal.clone()),
        StoreError::AlreadyExists => fault(Reason::ResourceAlreadyExists, "already exists"),
        StoreError::Unavailable(_) => {
            tracing::warn!(error = %e, "storage unavailable");
            fault(
                Reason::StorageUnavailable,
                "storage is unavailable; retry later",
            )
        }
        _ => {
            tracing::error!(error = %e, "storage error");
            internal()
        }
    }
}

/// A request body that does not decode as the method's request message: the caller's
/// mistake, not a fault. prost's description names the message and field and the kind of
/// error ("IssueKeyRequest.name: invalid string value: data is not UTF-8 encoded"),
/// never the bytes.
pub fn malformed_request(e: &prost::DecodeError) -> Status {
    refused(Refusal::new(
        Reason::MalformedRequest,
        format!("malformed request: {e}"),
    ))
}

/// INTERNAL with nothing to say: the cause is logged where it happened.
pub fn internal() -> Status {
    fault(Reason::InternalError, "internal error")
}

impl From<KeyError> for Status {
    fn from(e: KeyError) -> Self {
        match e {
            KeyError::Refused(refusal) => refused(refusal),
            KeyError::NotFound => fault(Reason::KeyNotFound, "key not found"),
            KeyError::WorkspaceNotFound(id) => workspace_not_found(id),
            KeyError::TeamNotFound(id) => team_not_found(id),
            KeyError::Store(e) => store_status(&e),
            KeyError::Randomness => {
                tracing::error!("the OS random source failed");
                internal()
            }
        }
    }
}

impl From<TeamError> for Status {
    fn from(e: TeamError) -> Self {
        match e {
            TeamError::Refused(refusal) => refused(refusal),
            TeamError::WorkspaceNotFound(id) => workspace_not_found(id),
            TeamError::TeamNotFound(id) => team_not_found(id),
            TeamError::Store(e) => store_status(&e),
        }
    }
}

impl From<AccessGroupError> for Status {
    fn from(e: AccessGroupError) -> Self {
        match e {
            AccessGroupError::Refused(refusal) => refused(refusal),
            AccessGroupError::WorkspaceNotFound(id) => workspace_not_found(id),
            AccessGroupError::Store(e) => store_status(&e),
        }
    }
}

fn workspace_not_found(id: String) -> Status {
    refused(
        Refusal::new(
            Reason::WorkspaceNotFound,
            format!("workspace {id} does not exist"),
        )
        .with("workspace_id", id),
    )
}

fn team_not_found(id: String) -> Status {
    refused(
        Refusal::new(
            Reason::TeamNotFound,
            format!("team {id} does not exist in this workspace"),
        )
        .with("team_id", id),
    )
}

impl From<WorkspaceError> for Status {
    fn from(e: WorkspaceError) -> Self {
        let message = e.to_string();
        match e {
            WorkspaceError::NotFound(id) => {
                refused(Refusal::new(Reason::WorkspaceNotFound, message).with("workspace_id", id))
            }
            WorkspaceError::AlreadyExists(id) => refused(
                Refusal::new(Reason::WorkspaceAlreadyExists, message).with("workspace_id", id),
            ),
            WorkspaceError::Store(e) => store_status(&e),
        }
    }
}

impl From<UsageError> for Status {
    fn from(e: UsageError) -> Self {
        let message = e.to_string();
        match e {
            UsageError::WorkspaceNotFound(id) => {
                refused(Refusal::new(Reason::WorkspaceNotFound, message).with("workspace_id", id))
            }
            UsageError::Store(e) => store_status(&e),
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

    fn screaming(code: Code) -> String {
        let mut out = String::new();
        for (i, c) in format!("{code:?}").chars().enumerate() {
            if c.is_ascii_uppercase() && i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_uppercase());
        }
        out
    }

    fn delay_text(delay: Option<Duration>) -> String {
        match delay {
            None => "no".to_owned(),
            Some(d) if d.subsec_millis() == 0 => format!("yes, {} s", d.as_secs()),
            Some(d) => format!("yes, {} ms", d.as_millis()),
        }
    }

    /// docs/errors.md is the contract clients read: every reason has exactly one row, and
    /// the row's code and retry are what the server sends.
    #[test]
    fn the_documented_table_matches_every_reason() {
        let doc = include_str!("../../docs/errors.md");
        let rows: Vec<Vec<&str>> = doc
            .lines()
            .filter(|l| l.starts_with("| `"))
            .map(|l| l.trim_matches('|').split(" | ").map(str::trim).collect())
            .collect();
        let documented: Vec<&str> = rows.iter().map(|r| r[0].trim_matches('`')).collect();
        let expected: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(documented, expected, "one row per reason, in order");
        for (row, reason) in rows.iter().zip(Reason::ALL) {
            assert_eq!(
                row[1].trim_matches('`'),
                screaming(code(*reason)),
                "{reason}"
            );
            assert_eq!(row[3], delay_text(retry_delay(*reason)), "{reason}");
        }
    }

    #[test]
    fn every_status_carries_its_reason_and_a_retry_only_where_one_helps() {
        for reason in Reason::ALL {
            let status = refused(Refusal::new(*reason, "why").with("team_id", "team_ml"));
            assert_eq!(status.code(), code(*reason));
            assert_eq!(status.message(), "why");
            let info = status.get_details_error_info().unwrap();
            assert_eq!(info.reason, reason.as_str());
            assert_eq!(info.domain, ERROR_DOMAIN);
            assert_eq!(
                info.metadata.get("team_id").map(String::as_str),
                Some("team_ml")
            );
            let retry = status.get_details_retry_info().map(|r| r.retry_delay);
            assert_eq!(retry, retry_delay(*reason).map(Some), "{reason}");
        }
        // Policy refusals never suggest a retry.
        for reason in [
            Reason::ScopeCeilingExceeded,
            Reason::TeamExpiryTooFar,
            Reason::PlanForbidsApiKeys,
            Reason::InvalidRequest,
        ] {
            assert_eq!(retry_delay(reason), None);
        }
    }

    #[test]
    fn invalid_argument_carries_the_violations_and_the_reason() {
        let mut v = Violations::default();
        v.add("name", "is required");
        let status = invalid_argument(v);
        assert_eq!(status.code(), Code::InvalidArgument);
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, "INVALID_REQUEST");
        assert_eq!(
            info.metadata.get("violations").map(String::as_str),
            Some("1")
        );
        assert_eq!(fields(&status), ["name"]);
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
