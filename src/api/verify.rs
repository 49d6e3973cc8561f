//! `keywarden.v1.VerifyService`: the hot path. An invalid key is an answer, never an error.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert;
use super::error::{check, refused, store_status};
use crate::domain::access;
use crate::domain::key::{self, VerifyCode};
use crate::domain::refusal::{Reason, Refusal};
use crate::domain::validate::{MAX_COST, MAX_USAGE, Violations};
use crate::proto;
use crate::proto::verify_service_server::VerifyService;
use crate::verify::Verifier;
use crate::verify::VerifyError;

pub struct VerifyApi {
    verifier: Arc<Verifier>,
}

impl VerifyApi {
    pub fn new(verifier: Arc<Verifier>) -> Self {
        VerifyApi { verifier }
    }
}

pub(crate) fn verify_status(e: &VerifyError) -> Status {
    match e {
        VerifyError::Store(e) => store_status(e),
        VerifyError::Stale => refused(Refusal::new(
            Reason::EventLogStale,
            "this replica cannot read the event log; retry (another replica may answer)",
        )),
        VerifyError::Limiter(e) => {
            tracing::warn!(error = %e, "no rate-limit decision");
            refused(Refusal::new(
                Reason::RateLimitBackendUnavailable,
                "rate-limit backend unavailable; retry",
            ))
        }
    }
}

fn code_pb(code: VerifyCode) -> proto::VerifyCode {
    match code {
        VerifyCode::Valid => proto::VerifyCode::Valid,
        VerifyCode::NotFound => proto::VerifyCode::NotFound,
        VerifyCode::Malformed => proto::VerifyCode::Malformed,
        VerifyCode::Revoked => proto::VerifyCode::Revoked,
        VerifyCode::Expired => proto::VerifyCode::Expired,
        VerifyCode::InsufficientScope => proto::VerifyCode::InsufficientScope,
        VerifyCode::RateLimited => proto::VerifyCode::RateLimited,
        VerifyCode::BudgetExceeded => proto::VerifyCode::BudgetExceeded,
        VerifyCode::ResourceForbidden => proto::VerifyCode::ResourceForbidden,
        VerifyCode::IpForbidden => proto::VerifyCode::IpForbidden,
    }
}

#[tonic::async_trait]
impl VerifyService for VerifyApi {
    async fn verify_key(
        &self,
        request: Request<proto::VerifyKeyRequest>,
    ) -> Result<Response<proto::VerifyKeyResponse>, Status> {
        let r = request.into_inner();
        let mut client_ip = None;
        if !r.required_scopes.is_empty()
            || r.cost > MAX_COST
            || !r.resource.is_empty()
            || !r.client_ip.is_empty()
        {
            let mut v = Violations::default();
            v.scopes("required_scopes", &r.required_scopes);
            if r.cost > MAX_COST {
                v.add("cost", format!("must be at most {MAX_COST}"));
            }
            if !r.resource.is_empty() && !access::is_target(&r.resource) {
                v.add(
                    "resource",
                    "must be 1 to 128 printable ASCII characters without spaces",
                );
            }
            if !r.client_ip.is_empty() {
                client_ip = r.client_ip.trim().parse::<std::net::IpAddr>().ok();
                if client_ip.is_none() {
                    v.add("client_ip", "is not an IPv4 or IPv6 address");
                }
            }
            check(v)?;
        }
        let request = key::Request {
            required_scopes: &r.required_scopes,
            resource: (!r.resource.is_empty()).then_some(r.resource.as_str()),
            client_ip,
        };
        let verdict = self
            .verifier
            .verify(&r.key, &request, r.cost.max(1))
            .await
            .map_err(|e| verify_status(&e))?;
        let mut response = proto::VerifyKeyResponse {
            valid: verdict.code == VerifyCode::Valid,
            code: code_pb(verdict.code) as i32,
            rate_limit: verdict
                .limit
                .as_ref()
                .map(|d| convert::limit_decision_pb(d, verdict.decided_at)),
            rate_limit_unknown: verdict.limit_unknown,
            spent_micros: verdict.spent_micros,
            ..Default::default()
        };
        if let Some(entry) = verdict.key {
            let key = &entry.key;
            response.key_id = key.key_id.clone();
            response.workspace_id = key.workspace_id.clone();
            response.environment = convert::environment_pb(key.environment) as i32;
            response.scopes = key.scopes.clone();
            response.owner = Some(convert::owner_pb(&key.owner));
            response.expires_at = key.expires_at.map(convert::timestamp);
            response.metadata = key
                .metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            response.max_budget_micros = key.max_budget_micros;
        }
        Ok(Response::new(response))
    }

    async fn report_usage(
        &self,
        request: Request<proto::ReportUsageRequest>,
    ) -> Result<Response<proto::ReportUsageResponse>, Status> {
        let r = request.into_inner();
        let mut v = Violations::default();
        v.key_id("key_id", &r.key_id);
        for (field, value) in [("tokens", r.tokens), ("spend_micros", r.spend_micros)] {
            if value > MAX_USAGE {
                v.add(field, format!("must be at most {MAX_USAGE}"));
            }
        }
        check(v)?;
        let spent = self
            .verifier
            .report_usage(&r.key_id, r.tokens, r.spend_micros)
            .await
            .map_err(|e| verify_status(&e))?
            .ok_or_else(|| {
                refused(
                    Refusal::new(Reason::KeyNotFound, "key not found").with("key_id", &r.key_id),
                )
            })?;
        Ok(Response::new(proto::ReportUsageResponse {
            spent_micros: spent,
        }))
    }

    async fn ping(
        &self,
        _request: Request<proto::PingRequest>,
    ) -> Result<Response<proto::PingResponse>, Status> {
        Ok(Response::new(proto::PingResponse {}))
    }
}
