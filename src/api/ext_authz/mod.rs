//! `envoy.service.auth.v3.Authorization`: Envoy's external authorization API, so Envoy,
//! Istio and other ext_authz proxies verify keys without a gateway of their own.
//!
//! A `Check` reads the key, the path's required scopes, the resource header and the
//! client address from the proxied request ([`attributes`]), asks the same [`Verifier`]
//! VerifyKey asks (so caching, rate limits, budgets, resource and network rules are the
//! same), and answers with an Envoy OK or denial ([`reply`]). Like VerifyKey, a refused
//! key is an answer, not an error: only a failure to decide (storage or the rate-limit
//! backend unavailable) is a gRPC error, which Envoy turns into its `status_on_error`.

pub mod attributes;
pub mod reply;
pub mod settings;

use std::sync::Arc;

use envoy_types::ext_authz::v3::pb::{Authorization, CheckRequest, CheckResponse};
use tonic::{Request, Response, Status};

use self::reply::{Allowed, Denial};
use self::settings::ExtAuthzSettings;
use super::verify::verify_status;
use crate::domain::key;
use crate::verify::{Outcome, Verifier};

pub struct ExtAuthzApi {
    verifier: Arc<Verifier>,
    settings: Arc<ExtAuthzSettings>,
}

impl ExtAuthzApi {
    pub fn new(verifier: Arc<Verifier>, settings: Arc<ExtAuthzSettings>) -> Self {
        ExtAuthzApi { verifier, settings }
    }

    async fn decide(&self, r: &CheckRequest) -> Result<CheckResponse, Status> {
        let http = r
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|req| req.http.as_ref());
        // The key first: a client without one is told to authenticate, whatever else is
        // wrong with its request.
        let presented = match attributes::presented_key(http, &self.settings) {
            Ok(k) => k,
            Err(d) => return Ok(reply::denied(d, None)),
        };
        let (required_scopes, resource) = match attributes::required_scopes(http, &self.settings)
            .and_then(|s| Ok((s, attributes::resource(http, &self.settings)?)))
        {
            Ok(found) => found,
            Err(d) => return Ok(reply::denied(d, None)),
        };
        let request = key::Request {
            required_scopes,
            resource,
            client_ip: attributes::client_ip(r),
        };
        let verdict = self
            .verifier
            .verify(presented, &request, 1)
            .await
            .map_err(|e| verify_status(&e))?;
        match &verdict.outcome {
            Outcome::Valid(entry) => Ok(reply::allowed(
                &Allowed {
                    key_id: &entry.key.key_id.text(),
                    workspace_id: &entry.key.workspace_id,
                    limit: verdict.limit.as_ref(),
                },
                &self.settings,
            )),
            Outcome::Refused(why, key) => {
                let key_id = key.as_ref().map(|e| e.key.key_id.text());
                let key_id = key_id.as_deref();
                let denial = Denial::of(*why);
                tracing::debug!(key_id, reason = denial.reason(), "ext_authz refused");
                Ok(reply::denied(
                    denial,
                    verdict.limit.as_ref().map(|d| (d, verdict.decided_at)),
                ))
            }
        }
    }
}

#[tonic::async_trait]
impl Authorization for ExtAuthzApi {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let r = request.into_inner();
        self.decide(&r).await.map(Response::new)
    }
}
