//! `keywarden.v1.VerifyService`: the hot path. An invalid key is an answer, never an error.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert;
use super::error::{check, invalid_argument, refused, store_status};
use crate::domain::key::{self, VerifyCode};
use crate::domain::key_format::KeyHash;
use crate::domain::lease::MAX_LEASE;
use crate::domain::pools::PoolOf;
use crate::domain::refusal::{Reason, Refusal};
use crate::domain::validate::{MAX_USAGE, Violations};
use crate::proto;
use crate::proto::verify_service_server::VerifyService;
use crate::ratelimit::leased::LeaseRecord;
use crate::verify::{LeaseAsk, LeaseSettle, Outcome, PoolPart, Verifier, VerifyError};

/// The most pools a settlement may name: a key counts against its owner's, its team's
/// and its workspace's.
const MAX_LEASE_POOLS: usize = 3;

/// The longest pool counter name a settlement may carry.
const MAX_COUNTER_LEN: usize = 256;

/// The most asks one LeaseQuota call may carry.
pub const MAX_LEASE_ASKS: usize = 1000;

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
        VerifyCode::PlanForbidsKeys => proto::VerifyCode::PlanForbidsKeys,
    }
}

#[tonic::async_trait]
impl VerifyService for VerifyApi {
    async fn verify_key(
        &self,
        request: Request<proto::VerifyKeyRequest>,
    ) -> Result<Response<proto::VerifyKeyResponse>, Status> {
        let r = request.into_inner();
        let (request, cost) =
            key::Request::parse(&r.required_scopes, &r.resource, &r.client_ip, r.cost)
                .map_err(invalid_argument)?;
        let verdict = self
            .verifier
            .verify(&r.key, &request, cost)
            .await
            .map_err(|e| verify_status(&e))?;
        let mut response = proto::VerifyKeyResponse {
            valid: matches!(verdict.outcome, Outcome::Valid(_)),
            code: code_pb(verdict.code()) as i32,
            rate_limit: verdict
                .limit
                .as_ref()
                .map(|d| convert::limit_decision_pb(d, verdict.decided_at)),
            rate_limit_unknown: verdict.limit_unknown,
            spent_micros: verdict.spent_micros,
            budget_scope: verdict
                .budget_scope
                .map_or(proto::LimitScope::Unspecified, convert::limit_scope_pb)
                as i32,
            ..Default::default()
        };
        if let Some(entry) = verdict.key() {
            let key = &entry.key;
            response.key_id = String::from(&*key.key_id.text());
            response.workspace_id = key.workspace_id.to_string();
            response.environment = convert::environment_pb(key.environment) as i32;
            response.scopes = key.scopes.to_vec();
            response.owner = Some(convert::owner_pb(&key.owner));
            response.expires_at = key.expires_at().map(convert::timestamp);
            response.metadata = key
                .metadata()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            response.max_budget_micros = key.max_budget_micros();
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

    async fn lease_quota(
        &self,
        request: Request<proto::LeaseQuotaRequest>,
    ) -> Result<Response<proto::LeaseQuotaResponse>, Status> {
        let r = request.into_inner();
        let asks = lease_asks(&r)?;
        let answers = self
            .verifier
            .lease(&asks)
            .await
            .map_err(|e| verify_status(&e))?
            .ok_or_else(|| {
                refused(Refusal::new(
                    Reason::QuotaLeasesDisabled,
                    "this server does not lease quota; verify each call with VerifyKey",
                ))
            })?;
        let grants = asks
            .iter()
            .zip(answers)
            .map(|(ask, a)| {
                let (amount, counted_at_micros, lease_id) = match &a.grant {
                    Some(g) if g.granted() => (g.amount, g.counted_at, g.id),
                    _ => (0, 0, 0),
                };
                proto::LeaseGrant {
                    key_id: ask.key_id.clone(),
                    amount,
                    counted_at_micros,
                    life: Some(convert::duration_pb(a.life)),
                    rate_limit: a
                        .grant
                        .as_ref()
                        .filter(|g| !g.decision.windows.is_empty())
                        .map(|g| convert::limit_decision_pb(&g.decision, a.decided_at)),
                    code: code_pb(a.code) as i32,
                    rate_limit_unknown: a.unknown,
                    lease_id,
                    pools: a.pools.iter().map(pool_lease_pb).collect(),
                }
            })
            .collect();
        Ok(Response::new(proto::LeaseQuotaResponse { grants }))
    }

    async fn ping(
        &self,
        _request: Request<proto::PingRequest>,
    ) -> Result<Response<proto::PingResponse>, Status> {
        Ok(Response::new(proto::PingResponse {}))
    }
}

/// A pool's part of a lease, as the edge repeats it in the settlement.
fn pool_lease_pb(p: &PoolPart) -> proto::PoolLease {
    proto::PoolLease {
        counter: p.counter.clone(),
        granted: p.record.granted,
        counted_at_micros: p.record.counted_at,
        lease_id: p.record.id,
        limits: p.limits.iter().map(convert::rate_limit_pb).collect(),
    }
}

/// Validates a LeaseQuota request (every violation at once, each naming its field) and
/// converts its asks.
fn lease_asks(r: &proto::LeaseQuotaRequest) -> Result<Vec<LeaseAsk>, Status> {
    let mut v = Violations::default();
    if r.asks.is_empty() || r.asks.len() > MAX_LEASE_ASKS {
        v.add("asks", format!("must hold 1 to {MAX_LEASE_ASKS} asks"));
        check(v)?;
        return Ok(Vec::new());
    }
    let mut asks = Vec::with_capacity(r.asks.len());
    for (i, a) in r.asks.iter().enumerate() {
        let field = |name: &str| format!("asks[{i}].{name}");
        v.key_id(&field("key_id"), &a.key_id);
        let hash = (a.key_hash.len() == 64
            && a.key_hash
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .then(|| hex::decode(&a.key_hash).ok())
        .flatten()
        .and_then(|b| KeyHash::from_slice(&b));
        if hash.is_none() {
            v.add(
                field("key_hash"),
                "must be the SHA-256 of the key in lowercase hex (64 characters)",
            );
        }
        if a.want > MAX_LEASE {
            v.add(field("want"), format!("must be at most {MAX_LEASE}"));
        }
        if a.want == 0 && a.settle.is_none() {
            v.add(field("want"), "must be at least 1 unless settle is set");
        }
        if a.want > 0 && a.min > a.want {
            v.add(field("min"), "must be at most want");
        }
        let settle = a.settle.as_ref().map(|s| {
            if s.granted == 0 || s.granted > MAX_LEASE {
                v.add(
                    field("settle.granted"),
                    format!("must be from 1 to {MAX_LEASE}"),
                );
            }
            if s.used > s.granted {
                v.add(field("settle.used"), "must be at most settle.granted");
            }
            if s.counted_at_micros <= 0 {
                v.add(
                    field("settle.counted_at_micros"),
                    "must be the grant's counted_at_micros",
                );
            }
            let limits = convert::rate_limits(&s.limits, &field("settle.limits"), &mut v);
            // Edge leases carry requests only: an edge never admits a key with a token
            // window or a budget from its cache.
            let record = LeaseRecord {
                granted: s.granted,
                tokens: 0,
                counted_at: s.counted_at_micros,
                id: s.lease_id,
            };
            if s.pools.len() > MAX_LEASE_POOLS {
                v.add(
                    field("settle.pools"),
                    format!("must hold at most {MAX_LEASE_POOLS} pools"),
                );
            }
            let pools = s
                .pools
                .iter()
                .enumerate()
                .take(MAX_LEASE_POOLS)
                .map(|(j, p)| {
                    let field = |name: &str| field(&format!("settle.pools[{j}].{name}"));
                    if p.counter.len() > MAX_COUNTER_LEN || PoolOf::of_counter(&p.counter).is_none()
                    {
                        v.add(field("counter"), "must be the counter of the grant's pool");
                    }
                    if p.granted < s.used {
                        v.add(field("granted"), "must be at least settle.used");
                    }
                    PoolPart {
                        counter: p.counter.clone(),
                        limits: convert::rate_limits(&p.limits, &field("limits"), &mut v),
                        record: LeaseRecord {
                            granted: p.granted,
                            tokens: 0,
                            counted_at: p.counted_at_micros,
                            id: p.lease_id,
                        },
                    }
                })
                .collect();
            LeaseSettle {
                limits,
                record,
                used: s.used,
                pools,
            }
        });
        if let Some(hash) = hash {
            asks.push(LeaseAsk {
                key_id: a.key_id.clone(),
                hash,
                want: a.want,
                min: a.min,
                settle,
            });
        }
    }
    check(v)?;
    Ok(asks)
}
