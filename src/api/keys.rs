//! `keywarden.v1.KeyService`: validate, convert, call [`KeyLifecycle`], convert back.

use std::collections::BTreeMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert;
use super::error::check;
use super::mutation::Mutation;
use crate::domain::key::MAX_ROTATION_GRACE;
use crate::domain::leak::LeakFinding;
use crate::domain::validate::{MAX_REASON_LEN, Violations};
use crate::keys::{IssueInput, KeyLifecycle, KeyQuery};
use crate::proto;
use crate::proto::key_service_server::KeyService;
use crate::store::{AuditFilter, KeyPatch, KeySelection, page_token};

/// What an update mask may name.
const MASK_PATHS: &[&str] = &[
    "name",
    "scopes",
    "expires_at",
    "metadata",
    "rate_limits",
    "max_budget_micros",
    "budget_period",
    "resource_access",
    "allowed_cidrs",
];

pub struct KeyApi {
    lifecycle: Arc<KeyLifecycle>,
}

impl KeyApi {
    pub fn new(lifecycle: Arc<KeyLifecycle>) -> Self {
        KeyApi { lifecycle }
    }
}

/// The longest text `ReportLeakedKey` takes as a key: longer than any key, shorter than
/// anything worth hashing.
const MAX_REPORTED_KEY_LEN: usize = 256;
const MAX_SOURCE_URL_LEN: usize = 2048;

#[tonic::async_trait]
impl KeyService for KeyApi {
    async fn issue_key(
        &self,
        request: Request<proto::IssueKeyRequest>,
    ) -> Result<Response<proto::IssueKeyResponse>, Status> {
        let (mut m, r) = Mutation::of(request)?;
        let now = self.lifecycle.now();
        let v = &mut m.v;
        v.workspace_id("workspace_id", &r.workspace_id);
        v.name("name", &r.name);
        let environment = convert::environment(r.environment, "environment", v);
        let scopes = v.scopes("scopes", &r.scopes);
        let expires_at = r
            .expires_at
            .as_ref()
            .and_then(|ts| convert::micros_of(ts, "expires_at", v));
        if let Some(at) = expires_at {
            v.expiry("expires_at", at, now);
        }
        // A self-service member may leave the owner unset: its key is its own. Anyone
        // else names one.
        let self_service = r
            .actor
            .as_ref()
            .is_some_and(|a| crate::domain::actor::is_self_service(&a.permissions));
        let owner = if r.owner.is_none() && self_service {
            Some(None)
        } else {
            convert::owner(r.owner.as_ref(), "owner", v).map(Some)
        };
        let actor = convert::actor(r.actor.as_ref(), v);
        let metadata = convert::metadata(&r.metadata, "metadata", v);
        let rate_limits = convert::rate_limits(&r.rate_limits, "rate_limits", v);
        if let Some(budget) = r.max_budget_micros {
            v.budget("max_budget_micros", budget);
        }
        let resource_access =
            convert::resource_access(r.resource_access.as_ref(), "resource_access", v);
        let network = convert::allowed_cidrs(&r.allowed_cidrs, "allowed_cidrs", v);
        let budget_period =
            convert::budget_period(r.budget_period, r.budget_period_days, "budget_period", v);
        if !r.team_id.is_empty() {
            v.workspace_id("team_id", &r.team_id);
        }
        let (acting, (environment, owner)) = m.acting_with(actor, environment.zip(owner))?;
        let issued = self
            .lifecycle
            .issue(
                &acting,
                IssueInput {
                    workspace_id: r.workspace_id,
                    name: r.name,
                    environment,
                    scopes,
                    expires_at,
                    owner,
                    metadata,
                    rate_limits,
                    max_budget_micros: r.max_budget_micros,
                    budget_period,
                    resource_access,
                    network,
                    team_id: (!r.team_id.is_empty()).then(|| r.team_id.clone()),
                },
            )
            .await?;
        Ok(Response::new(proto::IssueKeyResponse {
            key: issued.plaintext.expose().to_owned(),
            key_info: Some(convert::key_info(&issued.key, now)),
        }))
    }

    async fn get_key(
        &self,
        request: Request<proto::GetKeyRequest>,
    ) -> Result<Response<proto::GetKeyResponse>, Status> {
        let r = request.into_inner();
        let mut v = Violations::default();
        v.key_id("key_id", &r.key_id);
        let actor = convert::optional_actor(r.actor.as_ref(), &mut v);
        check(v)?;
        let key = self.lifecycle.get(actor.as_ref(), &r.key_id).await?;
        Ok(Response::new(proto::GetKeyResponse {
            key_info: Some(convert::key_info(&key, self.lifecycle.now())),
        }))
    }

    async fn list_keys(
        &self,
        request: Request<proto::ListKeysRequest>,
    ) -> Result<Response<proto::ListKeysResponse>, Status> {
        let r = request.into_inner();
        let mut v = Violations::default();
        v.workspace_id("workspace_id", &r.workspace_id);
        let owner = r
            .owner
            .as_ref()
            .and_then(|o| convert::owner(Some(o), "owner", &mut v));
        let status = convert::status_filter(r.status, "status", &mut v);
        let page_size = v.page_size("page_size", r.page_size);
        let after = convert::page_token_field(&r.page_token, &mut v, page_token::decode_key_cursor);
        let unused_since = r
            .unused_since
            .as_ref()
            .and_then(|ts| convert::micros_of(ts, "unused_since", &mut v));
        let actor = convert::optional_actor(r.actor.as_ref(), &mut v);
        let name_prefix = (!r.name_prefix.is_empty()).then(|| r.name_prefix.clone());
        if let Some(prefix) = &name_prefix {
            v.name("name_prefix", prefix);
        }
        let metadata = match (r.metadata_key.is_empty(), r.metadata_value.is_empty()) {
            (true, true) => None,
            (true, false) => {
                v.add("metadata_key", "is required with metadata_value");
                None
            }
            _ => {
                let entry = BTreeMap::from([(r.metadata_key.clone(), r.metadata_value.clone())]);
                v.metadata("metadata_key", &entry);
                entry.into_iter().next()
            }
        };
        let team_id = (!r.team_id.is_empty()).then(|| r.team_id.clone());
        if let Some(team_id) = &team_id {
            v.workspace_id("team_id", team_id);
        }
        check(v)?;
        let (keys, next) = self
            .lifecycle
            .list(
                actor.as_ref(),
                KeyQuery {
                    workspace_id: r.workspace_id,
                    owner,
                    status,
                    unused_since,
                    name_prefix,
                    metadata,
                    team_id,
                },
                page_size,
                after,
            )
            .await?;
        let now = self.lifecycle.now();
        Ok(Response::new(proto::ListKeysResponse {
            keys: keys.iter().map(|k| convert::key_info(k, now)).collect(),
            next_page_token: next
                .map(|c| page_token::encode_key_cursor(&c))
                .unwrap_or_default(),
        }))
    }

    async fn update_key(
        &self,
        request: Request<proto::UpdateKeyRequest>,
    ) -> Result<Response<proto::UpdateKeyResponse>, Status> {
        let (mut m, r) = Mutation::of(request)?;
        let now = self.lifecycle.now();
        let v = &mut m.v;
        v.key_id("key_id", &r.key_id);
        let actor = convert::actor(r.actor.as_ref(), v);
        let mut patch = KeyPatch::default();
        let paths = convert::mask_paths(r.update_mask.as_ref(), MASK_PATHS, v);
        for path in paths {
            match path.as_str() {
                "name" => {
                    v.name("name", &r.name);
                    patch.name = Some(r.name.clone());
                }
                "scopes" => patch.scopes = Some(v.scopes("scopes", &r.scopes)),
                "expires_at" => {
                    let at = r
                        .expires_at
                        .as_ref()
                        .and_then(|ts| convert::micros_of(ts, "expires_at", v));
                    if let Some(at) = at {
                        v.expiry("expires_at", at, now);
                    }
                    patch.expires_at = Some(at);
                }
                "metadata" => patch.metadata = Some(convert::metadata(&r.metadata, "metadata", v)),
                "rate_limits" => {
                    patch.rate_limits = Some(convert::rate_limits(&r.rate_limits, "rate_limits", v))
                }
                "max_budget_micros" => {
                    if let Some(budget) = r.max_budget_micros {
                        v.budget("max_budget_micros", budget);
                    }
                    patch.max_budget_micros = Some(r.max_budget_micros);
                }
                "budget_period" => {
                    patch.budget_period = Some(convert::budget_period(
                        r.budget_period,
                        r.budget_period_days,
                        "budget_period",
                        v,
                    ))
                }
                "resource_access" => {
                    patch.resource_access = Some(convert::resource_access(
                        r.resource_access.as_ref(),
                        "resource_access",
                        v,
                    ))
                }
                "allowed_cidrs" => {
                    patch.network =
                        Some(convert::allowed_cidrs(&r.allowed_cidrs, "allowed_cidrs", v))
                }
                other => convert::unknown_mask_path(other, MASK_PATHS, v),
            }
        }
        let acting = m.acting(actor)?;
        let key = self.lifecycle.update(&acting, &r.key_id, patch).await?;
        Ok(Response::new(proto::UpdateKeyResponse {
            key_info: Some(convert::key_info(&key, now)),
        }))
    }

    async fn rotate_key(
        &self,
        request: Request<proto::RotateKeyRequest>,
    ) -> Result<Response<proto::RotateKeyResponse>, Status> {
        let (mut m, r) = Mutation::of(request)?;
        let v = &mut m.v;
        v.key_id("key_id", &r.key_id);
        let actor = convert::actor(r.actor.as_ref(), v);
        let grace = r
            .grace_period
            .as_ref()
            .and_then(|d| convert::duration_micros(d, "grace_period", v))
            .unwrap_or(0);
        if grace > MAX_ROTATION_GRACE {
            v.add("grace_period", "must be at most 7 days");
        }
        let acting = m.acting(actor)?;
        let rotated = self.lifecycle.rotate(&acting, &r.key_id, grace).await?;
        Ok(Response::new(proto::RotateKeyResponse {
            key: rotated.plaintext.expose().to_owned(),
            key_info: Some(convert::key_info(&rotated.key, self.lifecycle.now())),
            old_key_valid_until: Some(convert::timestamp(rotated.old_secret_valid_until)),
        }))
    }

    async fn revoke_key(
        &self,
        request: Request<proto::RevokeKeyRequest>,
    ) -> Result<Response<proto::RevokeKeyResponse>, Status> {
        let (mut m, r) = Mutation::of(request)?;
        let v = &mut m.v;
        v.key_id("key_id", &r.key_id);
        let actor = convert::actor(r.actor.as_ref(), v);
        v.text("reason", &r.reason, MAX_REASON_LEN);
        let acting = m.acting(actor)?;
        let key = self.lifecycle.revoke(&acting, &r.key_id, &r.reason).await?;
        Ok(Response::new(proto::RevokeKeyResponse {
            key_info: Some(convert::key_info(&key, self.lifecycle.now())),
        }))
    }

    async fn report_leaked_key(
        &self,
        request: Request<proto::ReportLeakedKeyRequest>,
    ) -> Result<Response<proto::ReportLeakedKeyResponse>, Status> {
        let (mut m, r) = Mutation::of(request)?;
        let v = &mut m.v;
        if r.key.is_empty() {
            v.add("key", "is required");
        } else {
            v.text("key", &r.key, MAX_REPORTED_KEY_LEN);
        }
        v.text("source_url", &r.source_url, MAX_SOURCE_URL_LEN);
        let actor = convert::actor(r.actor.as_ref(), v);
        let acting = m.acting(actor)?;
        let found = self
            .lifecycle
            .report_leak(&acting, &r.key, &r.source_url)
            .await?;
        Ok(Response::new(proto::ReportLeakedKeyResponse {
            label: convert::leak_label_pb(found.label()) as i32,
            key_id: found.key_id().unwrap_or_default().to_owned(),
            revoked: matches!(found, LeakFinding::Revoked { .. }),
        }))
    }

    async fn reset_budget(
        &self,
        request: Request<proto::ResetBudgetRequest>,
    ) -> Result<Response<proto::ResetBudgetResponse>, Status> {
        let (mut m, r) = Mutation::of(request)?;
        let v = &mut m.v;
        v.key_id("key_id", &r.key_id);
        let actor = convert::actor(r.actor.as_ref(), v);
        let acting = m.acting(actor)?;
        let key = self.lifecycle.reset_budget(&acting, &r.key_id).await?;
        Ok(Response::new(proto::ResetBudgetResponse {
            key_info: Some(convert::key_info(&key, self.lifecycle.now())),
        }))
    }

    async fn revoke_keys(
        &self,
        request: Request<proto::RevokeKeysRequest>,
    ) -> Result<Response<proto::RevokeKeysResponse>, Status> {
        let (mut m, r) = Mutation::of(request)?;
        let v = &mut m.v;
        v.workspace_id("workspace_id", &r.workspace_id);
        let owner = r
            .owner
            .as_ref()
            .and_then(|o| convert::owner(Some(o), "owner", v));
        let team_id = (!r.team_id.is_empty()).then(|| r.team_id.clone());
        if let Some(team_id) = &team_id {
            v.workspace_id("team_id", team_id);
        }
        let created_by = (!r.created_by.is_empty()).then(|| r.created_by.clone());
        if let Some(created_by) = &created_by {
            v.principal_id("created_by", created_by);
        }
        // Exactly one filter: revoking "all" must be asked for, never the result of a
        // filter left out.
        let set = [
            ("owner", r.owner.is_some()),
            ("team_id", team_id.is_some()),
            ("created_by", created_by.is_some()),
            ("all", r.all),
        ];
        match set.iter().filter(|(_, on)| *on).count() {
            0 => v.add(
                "all",
                "set one filter: owner, team_id, created_by, or all = true",
            ),
            1 => {}
            _ => {
                if let Some((field, _)) = set.iter().filter(|(_, on)| *on).nth(1) {
                    v.add(
                        *field,
                        "set only one filter: owner, team_id, created_by or all",
                    );
                }
            }
        }
        let actor = convert::actor(r.actor.as_ref(), v);
        v.text("reason", &r.reason, MAX_REASON_LEN);
        let acting = m.acting(actor)?;
        let revoked = self
            .lifecycle
            .revoke_many(
                &acting,
                KeySelection {
                    workspace_id: r.workspace_id,
                    owner,
                    team_id,
                    created_by,
                },
                &r.reason,
            )
            .await?;
        Ok(Response::new(proto::RevokeKeysResponse { revoked }))
    }

    async fn delete_key(
        &self,
        request: Request<proto::DeleteKeyRequest>,
    ) -> Result<Response<proto::DeleteKeyResponse>, Status> {
        let (mut m, r) = Mutation::of(request)?;
        let v = &mut m.v;
        v.key_id("key_id", &r.key_id);
        let actor = convert::actor(r.actor.as_ref(), v);
        let acting = m.acting(actor)?;
        self.lifecycle.delete(&acting, &r.key_id).await?;
        Ok(Response::new(proto::DeleteKeyResponse {}))
    }

    async fn list_audit_events(
        &self,
        request: Request<proto::ListAuditEventsRequest>,
    ) -> Result<Response<proto::ListAuditEventsResponse>, Status> {
        let r = request.into_inner();
        let mut v = Violations::default();
        v.workspace_id("workspace_id", &r.workspace_id);
        let page_size = v.page_size("page_size", r.page_size);
        let before =
            convert::page_token_field(&r.page_token, &mut v, page_token::decode_audit_cursor);
        let set = |s: &String| (!s.is_empty()).then(|| s.clone());
        if !r.key_id.is_empty() {
            v.key_id("key_id", &r.key_id);
        }
        if !r.actor_id.is_empty() {
            v.principal_id("actor_id", &r.actor_id);
        }
        if !r.action.is_empty() {
            v.audit_action("action", &r.action);
        }
        let since = r
            .since
            .as_ref()
            .and_then(|t| convert::micros_of(t, "since", &mut v));
        let until = r
            .until
            .as_ref()
            .and_then(|t| convert::micros_of(t, "until", &mut v));
        if let (Some(since), Some(until)) = (since, until)
            && until <= since
        {
            v.add("until", "must be after since");
        }
        check(v)?;
        let filter = AuditFilter {
            key_id: set(&r.key_id),
            actor_id: set(&r.actor_id),
            action: set(&r.action),
            since,
            until,
            workspace_id: r.workspace_id,
        };
        let (events, next) = self.lifecycle.audit_log(&filter, page_size, before).await?;
        Ok(Response::new(proto::ListAuditEventsResponse {
            events: events.iter().map(convert::audit_event).collect(),
            next_page_token: next
                .map(page_token::encode_audit_cursor)
                .unwrap_or_default(),
        }))
    }
}
