//! Why a request was refused, as a stable code a client can branch on.
//!
//! Every non-OK status the server produces carries a google.rpc.ErrorInfo whose `reason`
//! is one of these (domain `keywarden.dev`): the status message is for people and may be
//! reworded, the reason is a contract. `docs/errors.md` lists every reason with its gRPC
//! code and whether a retry makes sense; the code and the retry delay of each reason are
//! decided in one place, `api::error`, so the same reason never travels with two codes.
//!
//! A [`Refusal`] is a reason with its message and a little metadata (ids and field names,
//! never a secret), built where the refusal is decided and carried by the error types
//! (`KeyError`, `StoreError`, `ProviderKeyError`) up to the API layer unchanged.

use std::fmt;

/// The stable reasons, each with its ErrorInfo string (SCREAMING_SNAKE). A new reason
/// needs a row in `docs/errors.md` (a test checks); a string is never changed (clients
/// match on it). One macro writes the enum, `as_str` and `ALL`, so none can miss a reason.
macro_rules! reasons {
    ($($(#[$doc:meta])* $variant:ident => $name:literal,)*) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Reason {
            $($(#[$doc])* $variant,)*
        }

        impl Reason {
            /// Every reason, in the order of `docs/errors.md`.
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)*];

            /// The ErrorInfo `reason`.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$variant => $name,)*
                }
            }
        }
    };
}

reasons! {
    // UNAUTHENTICATED
    /// No `authorization: Bearer <token>` metadata.
    CallerTokenMissing => "CALLER_TOKEN_MISSING",
    /// A bearer token that matches no configured caller token.
    CallerTokenUnknown => "CALLER_TOKEN_UNKNOWN",

    // PERMISSION_DENIED
    /// The caller's token lacks the role the method needs.
    CallerRoleMissing => "CALLER_ROLE_MISSING",
    /// The actor asked for scopes it does not hold itself (the RBAC ceiling).
    ScopeCeilingExceeded => "SCOPE_CEILING_EXCEEDED",
    /// A member without the admin permission acted in a team whose self-service is off.
    SelfServiceDisabled => "SELF_SERVICE_DISABLED",
    /// A member already holds the team's maximum of keys.
    SelfServiceKeyLimitReached => "SELF_SERVICE_KEY_LIMIT_REACHED",
    /// A self-service member named another owner for its key: a member's key is its own.
    SelfServiceOwnerNotActor => "SELF_SERVICE_OWNER_NOT_ACTOR",
    /// A self-service member asked to reset a budget: only an admin may.
    BudgetResetNeedsAdmin => "BUDGET_RESET_NEEDS_ADMIN",

    // FAILED_PRECONDITION
    /// The workspace's plan holds no API keys.
    PlanForbidsApiKeys => "PLAN_FORBIDS_API_KEYS",
    /// The workspace's plan does not allow provider keys (BYOK).
    PlanForbidsByok => "PLAN_FORBIDS_BYOK",
    /// No key-encryption key is configured, so provider keys cannot be stored or read.
    KekNotConfigured => "KEK_NOT_CONFIGURED",
    /// LeaseQuota on a replica that does not lease quota (`rate_limits.edge_lease_ms = 0`).
    QuotaLeasesDisabled => "QUOTA_LEASES_DISABLED",
    /// A member's key has no budget or one above the team's `max_budget_micros`.
    TeamBudgetCeilingExceeded => "TEAM_BUDGET_CEILING_EXCEEDED",
    /// The team requires an expiry and the member's key has none.
    TeamExpiryRequired => "TEAM_EXPIRY_REQUIRED",
    /// The member's key expires later than the team's `max_expiry_days` allow.
    TeamExpiryTooFar => "TEAM_EXPIRY_TOO_FAR",
    /// A member's key lacks a rate limit the team caps, or sets it above the ceiling.
    TeamRateLimitCeilingExceeded => "TEAM_RATE_LIMIT_CEILING_EXCEEDED",
    /// A key or a team's reach names access groups that do not exist in the workspace.
    AccessGroupsMissing => "ACCESS_GROUPS_MISSING",
    /// A team key's own reach names targets or access groups its team cannot reach: a
    /// key may narrow its team's reach, never widen it.
    ReachBeyondTeam => "REACH_BEYOND_TEAM",
    /// An access group still named by keys or by a team's reach cannot be deleted.
    AccessGroupInUse => "ACCESS_GROUP_IN_USE",
    /// A team key's owning service account is not in that team.
    ServiceAccountNotInTeam => "SERVICE_ACCOUNT_NOT_IN_TEAM",
    /// A service account that still owns keys not revoked cannot be deleted.
    ServiceAccountOwnsKeys => "SERVICE_ACCOUNT_OWNS_KEYS",
    /// A team that still has keys neither revoked nor deleted cannot be deleted.
    TeamInUse => "TEAM_IN_USE",
    /// A workspace has as many webhook endpoints as it may.
    WebhookLimitReached => "WEBHOOK_LIMIT_REACHED",
    /// Rotation of a revoked key.
    KeyRevoked => "KEY_REVOKED",
    /// Rotation of an expired key.
    KeyExpired => "KEY_EXPIRED",
    /// A team id taken in the workspace.
    TeamAlreadyExists => "TEAM_ALREADY_EXISTS",
    /// An access group name taken in the workspace.
    AccessGroupAlreadyExists => "ACCESS_GROUP_ALREADY_EXISTS",
    /// A service account id taken in the workspace.
    ServiceAccountAlreadyExists => "SERVICE_ACCOUNT_ALREADY_EXISTS",

    // NOT_FOUND
    KeyNotFound => "KEY_NOT_FOUND",
    WorkspaceNotFound => "WORKSPACE_NOT_FOUND",
    TeamNotFound => "TEAM_NOT_FOUND",
    AccessGroupNotFound => "ACCESS_GROUP_NOT_FOUND",
    ServiceAccountNotFound => "SERVICE_ACCOUNT_NOT_FOUND",
    ProviderKeyNotFound => "PROVIDER_KEY_NOT_FOUND",
    /// No webhook endpoint of that id in the workspace.
    WebhookNotFound => "WEBHOOK_NOT_FOUND",
    /// Anything else the storage did not find.
    ResourceNotFound => "RESOURCE_NOT_FOUND",

    // ALREADY_EXISTS
    WorkspaceAlreadyExists => "WORKSPACE_ALREADY_EXISTS",
    /// Anything else the storage already holds.
    ResourceAlreadyExists => "RESOURCE_ALREADY_EXISTS",

    // INVALID_ARGUMENT
    /// Fields failed validation (the google.rpc.BadRequest details name them).
    InvalidRequest => "INVALID_REQUEST",
    /// The request body is not a valid protobuf message of the method's request type
    /// (a truncated field, a string that is not UTF-8, an undefined wire type).
    MalformedRequest => "MALFORMED_REQUEST",

    // ABORTED
    /// A WatchRevocations subscriber fell too far behind; resume from the cursor named.
    StreamSubscriberTooSlow => "STREAM_SUBSCRIBER_TOO_SLOW",

    // UNAVAILABLE
    /// The database did not answer (down, unreachable, busy or out of connections).
    StorageUnavailable => "STORAGE_UNAVAILABLE",
    /// The rate-limit backend (Redis) did not answer and the limiter fails closed.
    RateLimitBackendUnavailable => "RATE_LIMIT_BACKEND_UNAVAILABLE",
    /// The replica is shutting down; another replica answers.
    ServerShuttingDown => "SERVER_SHUTTING_DOWN",
    /// The replica has not read the event log within its freshness bound, so it cannot
    /// vouch for any key; another replica (or this one, once it has caught up) answers.
    EventLogStale => "EVENT_LOG_STALE",

    // INTERNAL
    /// A fault with no retry to suggest; the details are in the server's log only.
    InternalError => "INTERNAL_ERROR",
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refusal as decided: the reason, the message people read (the status message,
/// unchanged from what it always said) and metadata for the ErrorInfo. Metadata holds ids,
/// field names and configured limits only, never a secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: Reason,
    pub message: String,
    pub metadata: Vec<(&'static str, String)>,
    /// Where one request breaks several rules at once: each of them (the API sends them
    /// as a google.rpc.PreconditionFailure), `reason` being the first's.
    pub violations: Vec<Violation>,
}

/// One broken rule of several: its reason, the request field at fault, and a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub reason: Reason,
    pub field: &'static str,
    pub description: String,
}

impl Refusal {
    pub fn new(reason: Reason, message: impl Into<String>) -> Refusal {
        Refusal {
            reason,
            message: message.into(),
            metadata: Vec::new(),
            violations: Vec::new(),
        }
    }

    /// Adds the rules broken besides (or including) this one.
    pub fn with_violations(mut self, violations: Vec<Violation>) -> Refusal {
        self.violations = violations;
        self
    }

    /// Adds one metadata entry (keys are lower_snake, like proto field names).
    pub fn with(mut self, key: &'static str, value: impl ToString) -> Refusal {
        self.metadata.push((key, value.to_string()));
        self
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_reason_is_listed_once_with_a_unique_screaming_snake_string() {
        let strings: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        let unique: HashSet<&str> = strings.iter().copied().collect();
        assert_eq!(unique.len(), strings.len(), "duplicate reason strings");
        let variants: HashSet<Reason> = Reason::ALL.iter().copied().collect();
        assert_eq!(variants.len(), Reason::ALL.len(), "a reason listed twice");
        for s in strings {
            assert!(
                !s.is_empty()
                    && !s.starts_with('_')
                    && !s.ends_with('_')
                    && !s.contains("__")
                    && s.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'),
                "{s} is not SCREAMING_SNAKE"
            );
        }
    }
}
