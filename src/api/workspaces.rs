//! `keywarden.v1.WorkspaceService`: validate, convert, call [`Workspaces`], convert back.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert;
use super::error::{check, checked};
use super::mutation::Mutation;
use crate::domain::Micros;
use crate::domain::key::Owner;
use crate::domain::validate::Violations;
use crate::domain::workspace::{Plan, Workspace};
use crate::proto;
use crate::proto::workspace_service_server::WorkspaceService;
use crate::store::OwnerPool;
use crate::store::{WorkspacePatch, page_token};
use crate::workspaces::Workspaces;

/// What an update mask may name.
const MASK_PATHS: &[&str] = &["name", "plan", "rate_limits", "budget"];

pub struct WorkspaceApi {
    workspaces: Arc<Workspaces>,
}

impl WorkspaceApi {
    pub fn new(workspaces: Arc<Workspaces>) -> Self {
        WorkspaceApi { workspaces }
    }

    fn workspace_pb(&self, w: &Workspace) -> proto::Workspace {
        let policy = self.workspaces.policy(w.plan);
        proto::Workspace {
            workspace_id: w.workspace_id.clone(),
            name: w.name.clone(),
            plan: plan_pb(w.plan) as i32,
            created_at: Some(convert::timestamp(w.created_at)),
            updated_at: Some(convert::timestamp(w.updated_at)),
            api_keys_allowed: policy.api_keys,
            byok_allowed: policy.byok,
            rate_limits: w.rate_limits.iter().map(convert::rate_limit_pb).collect(),
            budget: convert::pool_budget_pb(w.budget.as_ref(), w.spend, self.workspaces.now()),
        }
    }
}

fn plan_pb(plan: Plan) -> proto::Plan {
    match plan {
        Plan::Spark => proto::Plan::Spark,
        Plan::Pro => proto::Plan::Pro,
        Plan::Team => proto::Plan::Team,
        Plan::Enterprise => proto::Plan::Enterprise,
    }
}

fn plan(raw: i32, field: &str, v: &mut Violations) -> Option<Plan> {
    match proto::Plan::try_from(raw) {
        Ok(proto::Plan::Spark) => Some(Plan::Spark),
        Ok(proto::Plan::Pro) => Some(Plan::Pro),
        Ok(proto::Plan::Team) => Some(Plan::Team),
        Ok(proto::Plan::Enterprise) => Some(Plan::Enterprise),
        _ => {
            v.add(
                field,
                "must be PLAN_SPARK, PLAN_PRO, PLAN_TEAM or PLAN_ENTERPRISE",
            );
            None
        }
    }
}

#[tonic::async_trait]
impl WorkspaceService for WorkspaceApi {
    async fn create_workspace(
        &self,
        request: Request<proto::CreateWorkspaceRequest>,
    ) -> Result<Response<proto::CreateWorkspaceResponse>, Status> {
        let (mut m, r) = Mutation::of(request)?;
        let v = &mut m.v;
        v.workspace_id("workspace_id", &r.workspace_id);
        v.name("name", &r.name);
        let plan = plan(r.plan, "plan", v);
        let actor = convert::actor(r.actor.as_ref(), v);
        let (acting, plan) = m.acting_with(actor, plan)?;
        let workspace = self
            .workspaces
            .create(&acting, r.workspace_id, r.name, plan)
            .await?;
        Ok(Response::new(proto::CreateWorkspaceResponse {
            workspace: Some(self.workspace_pb(&workspace)),
        }))
    }

    async fn get_workspace(
        &self,
        request: Request<proto::GetWorkspaceRequest>,
    ) -> Result<Response<proto::GetWorkspaceResponse>, Status> {
        let r = request.into_inner();
        let mut v = Violations::default();
        v.workspace_id("workspace_id", &r.workspace_id);
        check(v)?;
        let workspace = self.workspaces.get(&r.workspace_id).await?;
        Ok(Response::new(proto::GetWorkspaceResponse {
            workspace: Some(self.workspace_pb(&workspace)),
        }))
    }

    async fn list_workspaces(
        &self,
        request: Request<proto::ListWorkspacesRequest>,
    ) -> Result<Response<proto::ListWorkspacesResponse>, Status> {
        let r = request.into_inner();
        let mut v = Violations::default();
        let page_size = v.page_size("page_size", r.page_size);
        let after =
            convert::page_token_field(&r.page_token, &mut v, page_token::decode_workspace_cursor);
        check(v)?;
        let (page, next) = self.workspaces.list(page_size, after.as_deref()).await?;
        Ok(Response::new(proto::ListWorkspacesResponse {
            workspaces: page.iter().map(|w| self.workspace_pb(w)).collect(),
            next_page_token: next
                .map(|after| page_token::encode_workspace_cursor(&after))
                .unwrap_or_default(),
        }))
    }

    async fn update_workspace(
        &self,
        request: Request<proto::UpdateWorkspaceRequest>,
    ) -> Result<Response<proto::UpdateWorkspaceResponse>, Status> {
        let (mut m, r) = Mutation::of(request)?;
        let v = &mut m.v;
        v.workspace_id("workspace_id", &r.workspace_id);
        let actor = convert::actor(r.actor.as_ref(), v);
        let mut patch = WorkspacePatch::default();
        let paths = convert::mask_paths(r.update_mask.as_ref(), MASK_PATHS, v);
        for path in paths {
            match path.as_str() {
                "name" => {
                    v.name("name", &r.name);
                    patch.name = Some(r.name.clone());
                }
                "plan" => patch.plan = plan(r.plan, "plan", v),
                "rate_limits" => {
                    patch.rate_limits =
                        Some(convert::rate_limits(&r.rate_limits, "rate_limits", v));
                }
                "budget" => {
                    patch.budget = Some(convert::pool_budget(r.budget.as_ref(), "budget", v))
                }
                other => convert::unknown_mask_path(other, MASK_PATHS, v),
            }
        }
        let acting = m.acting(actor)?;
        let workspace = self
            .workspaces
            .update(&acting, &r.workspace_id, patch)
            .await?;
        Ok(Response::new(proto::UpdateWorkspaceResponse {
            workspace: Some(self.workspace_pb(&workspace)),
        }))
    }

    async fn get_owner_limits(
        &self,
        request: Request<proto::GetOwnerLimitsRequest>,
    ) -> Result<Response<proto::OwnerLimits>, Status> {
        let r = request.into_inner();
        let mut v = Violations::default();
        v.workspace_id("workspace_id", &r.workspace_id);
        let owner = convert::owner(r.owner.as_ref(), "owner", &mut v);
        let owner = checked(v, owner)?;
        let limits = self
            .workspaces
            .owner_limits(&r.workspace_id, &owner)
            .await?;
        Ok(Response::new(owner_limits_pb(
            r.workspace_id,
            &owner,
            &limits,
            self.workspaces.now(),
        )))
    }

    async fn set_owner_limits(
        &self,
        request: Request<proto::SetOwnerLimitsRequest>,
    ) -> Result<Response<proto::OwnerLimits>, Status> {
        let (mut m, r) = Mutation::of(request)?;
        let v = &mut m.v;
        v.workspace_id("workspace_id", &r.workspace_id);
        let owner = convert::owner(r.owner.as_ref(), "owner", v);
        let limits = convert::rate_limits(&r.rate_limits, "rate_limits", v);
        let budget = convert::pool_budget(r.budget.as_ref(), "budget", v);
        let actor = convert::actor(r.actor.as_ref(), v);
        let (acting, owner) = m.acting_with(actor, owner)?;
        let limits = self
            .workspaces
            .set_owner_limits(&acting, &r.workspace_id, &owner, limits, budget)
            .await?;
        Ok(Response::new(owner_limits_pb(
            r.workspace_id,
            &owner,
            &limits,
            self.workspaces.now(),
        )))
    }
}

fn owner_limits_pb(
    workspace_id: String,
    owner: &Owner,
    pool: &OwnerPool,
    now: Micros,
) -> proto::OwnerLimits {
    proto::OwnerLimits {
        workspace_id,
        owner: Some(convert::owner_pb(owner)),
        rate_limits: pool
            .rate_limits
            .iter()
            .map(convert::rate_limit_pb)
            .collect(),
        budget: convert::pool_budget_pb(pool.budget.as_ref(), pool.spend, now),
    }
}
