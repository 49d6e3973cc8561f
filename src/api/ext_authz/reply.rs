//! Building Envoy `CheckResponse`s: an OK that tells Envoy which headers to add and
//! remove, or a denial carrying the HTTP status, headers and JSON body the end client
//! gets. The gRPC status inside the response is what Envoy acts on: OK lets the request
//! through, PERMISSION_DENIED refuses it with the denial's HTTP response.
//!
//! A body names the reason only (`{"error":"revoked_key"}`): never the key, and never
//! anything about a key the client did not present.

use envoy_types::ext_authz::v3::pb::{
    CheckResponse, DeniedHttpResponse, HeaderAppendAction, HeaderValue, HeaderValueOption,
    HttpResponse, HttpStatus, HttpStatusCode, OkHttpResponse,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::google::rpc;

use super::settings::ExtAuthzSettings;
use crate::api::convert::unix_seconds_ceil;
use crate::domain::key::VerifyCode;
use crate::domain::limits::LimitDecision;
use crate::domain::{MICROS_PER_SECOND, Micros};
use crate::verify::Refused;

/// Why a request is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denial {
    MissingKey,
    MalformedKey,
    UnknownKey,
    RevokedKey,
    ExpiredKey,
    InsufficientScope,
    ResourceForbidden,
    IpForbidden,
    /// The key's workspace is on a plan without API keys.
    PlanForbidsKeys,
    RateLimited,
    BudgetExceeded,
    /// The path is not in normal form (only judged when routes are configured).
    InvalidPath,
    /// The resource header does not name a well-formed target.
    InvalidResource,
}

impl Denial {
    /// The denial for a verifier's refusal.
    pub fn of(why: Refused) -> Denial {
        match why.code() {
            // A refusal is never VALID (`Refused::new`); were it, no key is the answer.
            VerifyCode::Valid | VerifyCode::NotFound => Denial::UnknownKey,
            VerifyCode::Malformed => Denial::MalformedKey,
            VerifyCode::Revoked => Denial::RevokedKey,
            VerifyCode::Expired => Denial::ExpiredKey,
            VerifyCode::InsufficientScope => Denial::InsufficientScope,
            VerifyCode::ResourceForbidden => Denial::ResourceForbidden,
            VerifyCode::IpForbidden => Denial::IpForbidden,
            VerifyCode::PlanForbidsKeys => Denial::PlanForbidsKeys,
            VerifyCode::RateLimited => Denial::RateLimited,
            VerifyCode::BudgetExceeded => Denial::BudgetExceeded,
        }
    }

    /// The reason in the JSON body (and the gRPC status message Envoy may log).
    pub fn reason(self) -> &'static str {
        match self {
            Denial::MissingKey => "missing_key",
            Denial::MalformedKey => "malformed_key",
            Denial::UnknownKey => "unknown_key",
            Denial::RevokedKey => "revoked_key",
            Denial::ExpiredKey => "expired_key",
            Denial::InsufficientScope => "insufficient_scope",
            Denial::ResourceForbidden => "resource_forbidden",
            Denial::IpForbidden => "ip_forbidden",
            Denial::PlanForbidsKeys => "plan_forbids_keys",
            Denial::RateLimited => "rate_limited",
            Denial::BudgetExceeded => "budget_exceeded",
            Denial::InvalidPath => "invalid_path",
            Denial::InvalidResource => "invalid_resource",
        }
    }

    /// 401: no usable key; 403: a key that may not make this call; 429: a key out of
    /// quota (a budget too: waiting does not help, but it is the client's quota, not its
    /// permissions); 400: the request itself cannot be judged.
    pub fn http_status(self) -> HttpStatusCode {
        match self {
            Denial::MissingKey
            | Denial::MalformedKey
            | Denial::UnknownKey
            | Denial::RevokedKey
            | Denial::ExpiredKey => HttpStatusCode::Unauthorized,
            Denial::InsufficientScope
            | Denial::ResourceForbidden
            | Denial::IpForbidden
            | Denial::PlanForbidsKeys => HttpStatusCode::Forbidden,
            Denial::RateLimited | Denial::BudgetExceeded => HttpStatusCode::TooManyRequests,
            Denial::InvalidPath | Denial::InvalidResource => HttpStatusCode::BadRequest,
        }
    }
}

/// Set, replacing whatever the request or response already carries under that name (a
/// client must not be able to supply its own `x-keywarden-key-id`).
fn set(name: &str, value: impl Into<String>) -> HeaderValueOption {
    #[allow(deprecated)]
    HeaderValueOption {
        header: Some(HeaderValue {
            key: name.to_owned(),
            value: value.into(),
            raw_value: Vec::new(),
        }),
        append: None,
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd.into(),
        keep_empty_value: false,
    }
}

/// `x-ratelimit-limit` / `-remaining` / `-reset` (unix seconds) of the tightest window;
/// none at all (never zeros) without a decision: a key without limits, or a call let
/// through while the counters were unreachable (`rate_limits.redis_failure = "open"`).
fn rate_limit_headers(limit: Option<&LimitDecision>) -> Vec<HeaderValueOption> {
    let Some(w) = limit.and_then(LimitDecision::tightest) else {
        return Vec::new();
    };
    vec![
        set("x-ratelimit-limit", w.limit.limit.to_string()),
        set("x-ratelimit-remaining", w.remaining.to_string()),
        set(
            "x-ratelimit-reset",
            unix_seconds_ceil(w.reset_at).to_string(),
        ),
    ]
}

fn status(code: tonic::Code, message: &str) -> Option<rpc::Status> {
    Some(rpc::Status {
        code: code as i32,
        message: message.to_owned(),
        details: Vec::new(),
    })
}

fn text(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    }
}

/// What an allowed request carries on.
pub struct Allowed<'a> {
    pub key_id: &'a str,
    pub workspace_id: &'a str,
    pub limit: Option<&'a LimitDecision>,
}

/// OK: the key's id and workspace go upstream, the credential headers do not (every
/// configured one, so a second key sent alongside cannot reach the upstream unverified),
/// and the client gets the rate-limit headers. The id and workspace also go into the
/// filter's dynamic metadata, for Envoy's access log.
pub fn allowed(a: &Allowed<'_>, settings: &ExtAuthzSettings) -> CheckResponse {
    #[allow(deprecated)]
    let ok = OkHttpResponse {
        headers: vec![
            set(&settings.key_id_header, a.key_id),
            set(&settings.workspace_id_header, a.workspace_id),
        ],
        headers_to_remove: settings.key_headers.clone(),
        response_headers_to_add: rate_limit_headers(a.limit),
        ..Default::default()
    };
    let metadata = Struct {
        fields: [
            ("key_id".to_owned(), text(a.key_id)),
            ("workspace_id".to_owned(), text(a.workspace_id)),
        ]
        .into_iter()
        .collect(),
    };
    CheckResponse {
        status: status(tonic::Code::Ok, ""),
        http_response: Some(HttpResponse::OkResponse(ok)),
        dynamic_metadata: Some(metadata),
    }
}

/// A refusal. `limit` (with the time it was decided at) adds the rate-limit headers and,
/// for a rate-limited call, `retry-after` in whole seconds, rounded up.
pub fn denied(denial: Denial, limit: Option<(&LimitDecision, Micros)>) -> CheckResponse {
    let mut headers = vec![set("content-type", "application/json")];
    if denial.http_status() == HttpStatusCode::Unauthorized {
        headers.push(set("www-authenticate", "Bearer"));
    }
    if let Some((decision, decided_at)) = limit {
        headers.extend(rate_limit_headers(Some(decision)));
        if denial == Denial::RateLimited
            && let Some(at) = decision.retry_at()
        {
            let wait = (at - decided_at).max(0);
            let seconds = (wait + MICROS_PER_SECOND - 1) / MICROS_PER_SECOND;
            headers.push(set("retry-after", seconds.max(1).to_string()));
        }
    }
    let body = serde_json::json!({ "error": denial.reason() }).to_string();
    CheckResponse {
        status: status(tonic::Code::PermissionDenied, denial.reason()),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: denial.http_status().into(),
            }),
            headers,
            body,
        })),
        dynamic_metadata: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header<'r>(headers: &'r [HeaderValueOption], name: &str) -> Option<&'r str> {
        headers
            .iter()
            .filter_map(|h| h.header.as_ref())
            .find(|h| h.key == name)
            .map(|h| h.value.as_str())
    }

    #[test]
    fn every_denial_has_a_json_body_and_its_status() {
        for (d, code) in [
            (Denial::MissingKey, 401),
            (Denial::RevokedKey, 401),
            (Denial::IpForbidden, 403),
            (Denial::PlanForbidsKeys, 403),
            (Denial::BudgetExceeded, 429),
            (Denial::InvalidPath, 400),
        ] {
            let r = denied(d, None);
            assert_eq!(r.status.as_ref().unwrap().code, 7);
            let Some(HttpResponse::DeniedResponse(resp)) = r.http_response else {
                panic!("not a denial");
            };
            assert_eq!(resp.status.unwrap().code, code);
            let body: serde_json::Value = serde_json::from_str(&resp.body).unwrap();
            assert_eq!(body, serde_json::json!({ "error": d.reason() }));
            assert_eq!(
                header(&resp.headers, "content-type"),
                Some("application/json")
            );
        }
    }

    #[test]
    fn an_allowed_call_without_a_decision_gets_no_rate_limit_headers() {
        let r = allowed(
            &Allowed {
                key_id: "key_1",
                workspace_id: "ws",
                limit: None,
            },
            &ExtAuthzSettings::default(),
        );
        let Some(HttpResponse::OkResponse(ok)) = r.http_response else {
            panic!("not an OK");
        };
        assert!(
            ok.response_headers_to_add
                .iter()
                .filter_map(|h| h.header.as_ref())
                .all(|h| !h.key.starts_with("x-ratelimit")),
            "{:?}",
            ok.response_headers_to_add
        );
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        use crate::domain::limits::{LimitUnit, LimitWindow, RateLimit, WindowState};
        let decision = LimitDecision {
            allowed: false,
            windows: vec![WindowState {
                limit: RateLimit {
                    unit: LimitUnit::Requests,
                    window: LimitWindow::Minute,
                    limit: 2,
                },
                scope: Default::default(),
                used: 2,
                remaining: 0,
                reset_at: 61 * MICROS_PER_SECOND + 1,
                retry_at: Some(1_500_000),
                allowed: false,
            }],
            tightest: Some(0),
        };
        let r = denied(Denial::RateLimited, Some((&decision, 0)));
        let Some(HttpResponse::DeniedResponse(resp)) = r.http_response else {
            panic!("not a denial");
        };
        assert_eq!(resp.status.unwrap().code, 429);
        assert_eq!(header(&resp.headers, "retry-after"), Some("2"));
        assert_eq!(header(&resp.headers, "x-ratelimit-limit"), Some("2"));
        assert_eq!(header(&resp.headers, "x-ratelimit-remaining"), Some("0"));
        assert_eq!(header(&resp.headers, "x-ratelimit-reset"), Some("62"));
    }
}
