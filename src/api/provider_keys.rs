//! `keywarden.v1.ProviderKeyService`. Every method checks its own role: `admin` for all
//! but ResolveProviderKey, which only `provider-resolver` may call. Responses show a
//! provider key masked (its last four characters), except ResolveProviderKey's.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::auth::{Role, require};
use super::convert;
use super::error::{check, checked, internal, refused, store_status};
use super::mutation::Mutation;
use crate::domain::provider_key::{self, Provider, ProviderKeyRecord};
use crate::domain::refusal::{Reason, Refusal};
use crate::domain::validate::Violations;
use crate::proto;
use crate::proto::provider_key_service_server::ProviderKeyService;
use crate::provider_keys::{ProviderKeyError, ProviderKeys};

/// Bytes of `api_key` looked at before anything else: a larger value is refused unread.
const MAX_API_KEY_BYTES: usize = 4096;

pub struct ProviderKeyApi {
    keys: Arc<ProviderKeys>,
}

impl ProviderKeyApi {
    pub fn new(keys: Arc<ProviderKeys>) -> Self {
        ProviderKeyApi { keys }
    }
}

impl From<ProviderKeyError> for Status {
    fn from(e: ProviderKeyError) -> Self {
        let message = e.to_string();
        match e {
            ProviderKeyError::NoKek => refused(Refusal::new(Reason::KekNotConfigured, message)),
            ProviderKeyError::Refused(refusal) => refused(refusal),
            ProviderKeyError::WorkspaceNotFound(id) => {
                refused(Refusal::new(Reason::WorkspaceNotFound, message).with("workspace_id", id))
            }
            ProviderKeyError::NotFound(provider) => refused(
                Refusal::new(Reason::ProviderKeyNotFound, message).with("provider", provider),
            ),
            ProviderKeyError::Store(e) => store_status(&e),
            ProviderKeyError::Crypto(_) | ProviderKeyError::Randomness => {
                tracing::error!(error = %message, "provider key operation failed");
                internal()
            }
        }
    }
}

fn provider(raw: i32, v: &mut Violations) -> Option<Provider> {
    match proto::Provider::try_from(raw) {
        Ok(proto::Provider::Anthropic) => Some(Provider::Anthropic),
        Ok(proto::Provider::Openai) => Some(Provider::OpenAi),
        _ => {
            v.add("provider", "must be PROVIDER_ANTHROPIC or PROVIDER_OPENAI");
            None
        }
    }
}

fn provider_pb(p: Provider) -> proto::Provider {
    match p {
        Provider::Anthropic => proto::Provider::Anthropic,
        Provider::OpenAi => proto::Provider::Openai,
    }
}

fn info(r: &ProviderKeyRecord) -> proto::ProviderKeyInfo {
    proto::ProviderKeyInfo {
        workspace_id: r.workspace_id.clone(),
        provider: provider_pb(r.provider) as i32,
        last_four: r.last_four.clone(),
        created_at: Some(convert::timestamp(r.created_at)),
        updated_at: Some(convert::timestamp(r.updated_at)),
        kek_version: r.kek_version,
    }
}

/// The workspace and provider every method but List and Rewrap names.
fn target(workspace_id: &str, raw_provider: i32, v: &mut Violations) -> Option<Provider> {
    v.workspace_id("workspace_id", workspace_id);
    provider(raw_provider, v)
}

#[tonic::async_trait]
impl ProviderKeyService for ProviderKeyApi {
    async fn put_provider_key(
        &self,
        request: Request<proto::PutProviderKeyRequest>,
    ) -> Result<Response<proto::PutProviderKeyResponse>, Status> {
        let mut m = Mutation::by(require(&request, Role::Admin)?.0);
        let mut r = request.into_inner();
        // The plaintext lives in a buffer that is wiped when this call ends.
        let api_key = Zeroizing::new(std::mem::take(&mut r.api_key));
        let v = &mut m.v;
        let provider = target(&r.workspace_id, r.provider, v);
        if api_key.len() > MAX_API_KEY_BYTES {
            v.add(
                "api_key",
                format!("must be at most {MAX_API_KEY_BYTES} bytes"),
            );
        } else if let Some(p) = provider
            && let Some(why) = provider_key::shape_error(p, &api_key)
        {
            v.add("api_key", why);
        }
        let actor = convert::actor(r.actor.as_ref(), v);
        let (acting, provider) = m.acting_with(actor, provider)?;
        let stored = self
            .keys
            .put(&acting, &r.workspace_id, provider, api_key)
            .await?;
        Ok(Response::new(proto::PutProviderKeyResponse {
            provider_key: Some(info(&stored)),
        }))
    }

    async fn get_provider_key(
        &self,
        request: Request<proto::GetProviderKeyRequest>,
    ) -> Result<Response<proto::GetProviderKeyResponse>, Status> {
        require(&request, Role::Admin)?;
        let r = request.into_inner();
        let mut v = Violations::default();
        let provider = target(&r.workspace_id, r.provider, &mut v);
        let provider = checked(v, provider)?;
        let record = self.keys.get(&r.workspace_id, provider).await?;
        Ok(Response::new(proto::GetProviderKeyResponse {
            provider_key: Some(info(&record)),
        }))
    }

    async fn list_provider_keys(
        &self,
        request: Request<proto::ListProviderKeysRequest>,
    ) -> Result<Response<proto::ListProviderKeysResponse>, Status> {
        require(&request, Role::Admin)?;
        let r = request.into_inner();
        let mut v = Violations::default();
        v.workspace_id("workspace_id", &r.workspace_id);
        check(v)?;
        let records = self.keys.list(&r.workspace_id).await?;
        Ok(Response::new(proto::ListProviderKeysResponse {
            provider_keys: records.iter().map(info).collect(),
        }))
    }

    async fn delete_provider_key(
        &self,
        request: Request<proto::DeleteProviderKeyRequest>,
    ) -> Result<Response<proto::DeleteProviderKeyResponse>, Status> {
        let mut m = Mutation::by(require(&request, Role::Admin)?.0);
        let r = request.into_inner();
        let v = &mut m.v;
        let provider = target(&r.workspace_id, r.provider, v);
        let actor = convert::actor(r.actor.as_ref(), v);
        let (acting, provider) = m.acting_with(actor, provider)?;
        self.keys.delete(&acting, &r.workspace_id, provider).await?;
        Ok(Response::new(proto::DeleteProviderKeyResponse {}))
    }

    async fn resolve_provider_key(
        &self,
        request: Request<proto::ResolveProviderKeyRequest>,
    ) -> Result<Response<proto::ResolveProviderKeyResponse>, Status> {
        let caller = require(&request, Role::ProviderResolver)?.0;
        let r = request.into_inner();
        let mut v = Violations::default();
        let provider = target(&r.workspace_id, r.provider, &mut v);
        let provider = checked(v, provider)?;
        let api_key = self
            .keys
            .resolve(&caller, &r.workspace_id, provider)
            .await?;
        Ok(Response::new(proto::ResolveProviderKeyResponse {
            api_key: api_key.to_string(),
        }))
    }

    async fn rewrap_provider_keys(
        &self,
        request: Request<proto::RewrapProviderKeysRequest>,
    ) -> Result<Response<proto::RewrapProviderKeysResponse>, Status> {
        require(&request, Role::Admin)?;
        let r = request.into_inner();
        let mut v = Violations::default();
        convert::actor(r.actor.as_ref(), &mut v);
        check(v)?;
        let (rewrapped, kek_version) = self.keys.rewrap().await?;
        Ok(Response::new(proto::RewrapProviderKeysResponse {
            rewrapped,
            kek_version,
        }))
    }
}
