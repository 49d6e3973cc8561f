//! `keywarden.v1.VerifyService`: the hot path. An invalid key is an answer, never an error.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert;
use super::error::{check, store_status};
use crate::domain::key::VerifyCode;
use crate::domain::validate::Violations;
use crate::proto;
use crate::proto::verify_service_server::VerifyService;
use crate::verify::Verifier;

pub struct VerifyApi {
    verifier: Arc<Verifier>,
}

impl VerifyApi {
    pub fn new(verifier: Arc<Verifier>) -> Self {
        VerifyApi { verifier }
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
    }
}

#[tonic::async_trait]
impl VerifyService for VerifyApi {
    async fn verify_key(
        &self,
        request: Request<proto::VerifyKeyRequest>,
    ) -> Result<Response<proto::VerifyKeyResponse>, Status> {
        let r = request.into_inner();
        if !r.required_scopes.is_empty() {
            let mut v = Violations::default();
            v.scopes("required_scopes", &r.required_scopes);
            check(v)?;
        }
        let verdict = self
            .verifier
            .verify(&r.key, &r.required_scopes)
            .await
            .map_err(|e| store_status(&e))?;
        let mut response = proto::VerifyKeyResponse {
            valid: verdict.code == VerifyCode::Valid,
            code: code_pb(verdict.code) as i32,
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
        }
        Ok(Response::new(response))
    }

    async fn ping(
        &self,
        _request: Request<proto::PingRequest>,
    ) -> Result<Response<proto::PingResponse>, Status> {
        Ok(Response::new(proto::PingResponse {}))
    }
}
