//! `keywarden.v1.TeamService`: validate, convert, call [`Teams`].

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert;
use super::error::check;
use super::mutation::Mutation;
use crate::domain::Micros;
use crate::domain::team::{ServiceAccount, Team, TeamPolicy};
use crate::domain::validate::Violations;
use crate::proto;
use crate::proto::team_service_server::TeamService;
use crate::store::TeamPatch;
use crate::teams::Teams;

/// What an update mask may name.
const MASK_PATHS: &[&str] = &["name", "policy", "rate_limits", "budget"];

pub struct TeamApi {
    teams: Arc<Teams>,
}

impl TeamApi {
    pub fn new(teams: Arc<Teams>) -> Self {
        TeamApi { teams }
    }
}

fn policy(given: Option<&proto::TeamPolicy>, v: &mut Violations) -> TeamPolicy {
    let Some(p) = given else {
        return TeamPolicy::default();
    };
    if let Some(budget) = p.max_budget_micros {
        v.budget("policy.max_budget_micros", budget);
    }
    if p.max_expiry_days > 3660 {
        v.add("policy.max_expiry_days", "must be at most 3660");
    }
    let ceilings = convert::rate_limits(&p.rate_limit_ceilings, "policy.rate_limit_ceilings", v);
    let resource_access =
        convert::resource_access(p.resource_access.as_ref(), "policy.resource_access", v);
    let mut policy = TeamPolicy {
        self_service_enabled: p.self_service_enabled,
        max_keys_per_user: p.max_keys_per_user,
        max_budget_micros: p.max_budget_micros,
        require_expiry: p.require_expiry,
        max_expiry_days: p.max_expiry_days,
        rate_limit_ceilings: Vec::new(),
        resource_access,
    };
    policy.set_ceilings(&ceilings);
    policy
}

fn team_pb(t: &Team, now: Micros) -> proto::Team {
    proto::Team {
        rate_limits: t.rate_limits.iter().map(convert::rate_limit_pb).collect(),
        budget: convert::pool_budget_pb(t.budget.as_ref(), t.spend, now),
        workspace_id: t.workspace_id.clone(),
        team_id: t.team_id.clone(),
        name: t.name.clone(),
        policy: Some(proto::TeamPolicy {
            self_service_enabled: t.policy.self_service_enabled,
            max_keys_per_user: t.policy.max_keys_per_user,
            max_budget_micros: t.policy.max_budget_micros,
            require_expiry: t.policy.require_expiry,
            max_expiry_days: t.policy.max_expiry_days,
            rate_limit_ceilings: t
                .policy
                .ceilings()
                .iter()
                .map(convert::rate_limit_pb)
                .collect(),
            resource_access: Some(convert::resource_access_pb(&t.policy.resource_access)),
        }),
        created_at: Some(convert::timestamp(t.created_at)),
        updated_at: Some(convert::timestamp(t.updated_at)),
    }
}

fn response(t: &Team, now: Micros) -> Response<proto::TeamResponse> {
    Response::new(proto::TeamResponse {
        team: Some(team_pb(t, now)),
    })
}

fn account_pb(a: &ServiceAccount) -> proto::ServiceAccount {
    proto::ServiceAccount {
        workspace_id: a.workspace_id.clone(),
        team_id: a.team_id.clone(),
        service_account_id: a.service_account_id.clone(),
        name: a.name.clone(),
        created_at: Some(convert::timestamp(a.created_at)),
    }
}

#[tonic::async_trait]
impl TeamService for TeamApi {
    async fn create_service_account(
        &self,
        request: Request<proto::CreateServiceAccountRequest>,
    ) -> Result<Response<proto::ServiceAccountResponse>, Status> {
        let (mut m, r) = Mutation::of(request)?;
        let v = &mut m.v;
        v.workspace_id("workspace_id", &r.workspace_id);
        v.workspace_id("team_id", &r.team_id);
        v.principal_id("service_account_id", &r.service_account_id);
        v.name("name", &r.name);
        let actor = convert::actor(r.actor.as_ref(), v);
        let acting = m.acting(actor)?;
        let account = self
            .teams
            .create_service_account(
                &acting,
                &r.workspace_id,
                &r.team_id,
                r.service_account_id,
                r.name,
            )
            .await?;
        Ok(Response::new(proto::ServiceAccountResponse {
            service_account: Some(account_pb(&account)),
        }))
    }

    async fn list_service_accounts(
        &self,
        request: Request<proto::ListServiceAccountsRequest>,
    ) -> Result<Response<proto::ListServiceAccountsResponse>, Status> {
        let r = request.into_inner();
        let mut v = Violations::default();
        v.workspace_id("workspace_id", &r.workspace_id);
        v.workspace_id("team_id", &r.team_id);
        check(v)?;
        let accounts = self
            .teams
            .list_service_accounts(&r.workspace_id, &r.team_id)
            .await?;
        Ok(Response::new(proto::ListServiceAccountsResponse {
            service_accounts: accounts.iter().map(account_pb).collect(),
        }))
    }

    async fn delete_team(
        &self,
        request: Request<proto::DeleteTeamRequest>,
    ) -> Result<Response<proto::DeleteTeamResponse>, Status> {
        let (mut m, r) = Mutation::of(request)?;
        let v = &mut m.v;
        v.workspace_id("workspace_id", &r.workspace_id);
        v.workspace_id("team_id", &r.team_id);
        let actor = convert::actor(r.actor.as_ref(), v);
        let acting = m.acting(actor)?;
        self.teams
            .delete(&acting, &r.workspace_id, &r.team_id)
            .await?;
        Ok(Response::new(proto::DeleteTeamResponse {}))
    }

    async fn delete_service_account(
        &self,
        request: Request<proto::DeleteServiceAccountRequest>,
    ) -> Result<Response<proto::DeleteServiceAccountResponse>, Status> {
        let (mut m, r) = Mutation::of(request)?;
        let v = &mut m.v;
        v.workspace_id("workspace_id", &r.workspace_id);
        v.principal_id("service_account_id", &r.service_account_id);
        let actor = convert::actor(r.actor.as_ref(), v);
        let acting = m.acting(actor)?;
        self.teams
            .delete_service_account(&acting, &r.workspace_id, &r.service_account_id)
            .await?;
        Ok(Response::new(proto::DeleteServiceAccountResponse {}))
    }

    async fn create_team(
        &self,
        request: Request<proto::CreateTeamRequest>,
    ) -> Result<Response<proto::TeamResponse>, Status> {
        let (mut m, r) = Mutation::of(request)?;
        let v = &mut m.v;
        v.workspace_id("workspace_id", &r.workspace_id);
        v.workspace_id("team_id", &r.team_id);
        v.name("name", &r.name);
        let policy = policy(r.policy.as_ref(), v);
        let actor = convert::actor(r.actor.as_ref(), v);
        let acting = m.acting(actor)?;
        let team = self
            .teams
            .create(&acting, r.workspace_id, r.team_id, r.name, policy)
            .await?;
        Ok(response(&team, self.teams.now()))
    }

    async fn get_team(
        &self,
        request: Request<proto::GetTeamRequest>,
    ) -> Result<Response<proto::TeamResponse>, Status> {
        let r = request.into_inner();
        let mut v = Violations::default();
        v.workspace_id("workspace_id", &r.workspace_id);
        v.workspace_id("team_id", &r.team_id);
        check(v)?;
        Ok(response(
            &self.teams.get(&r.workspace_id, &r.team_id).await?,
            self.teams.now(),
        ))
    }

    async fn list_teams(
        &self,
        request: Request<proto::ListTeamsRequest>,
    ) -> Result<Response<proto::ListTeamsResponse>, Status> {
        let r = request.into_inner();
        let mut v = Violations::default();
        v.workspace_id("workspace_id", &r.workspace_id);
        check(v)?;
        let teams = self.teams.list(&r.workspace_id).await?;
        Ok(Response::new(proto::ListTeamsResponse {
            teams: teams.iter().map(|t| team_pb(t, self.teams.now())).collect(),
        }))
    }

    async fn update_team(
        &self,
        request: Request<proto::UpdateTeamRequest>,
    ) -> Result<Response<proto::TeamResponse>, Status> {
        let (mut m, r) = Mutation::of(request)?;
        let v = &mut m.v;
        v.workspace_id("workspace_id", &r.workspace_id);
        v.workspace_id("team_id", &r.team_id);
        let actor = convert::actor(r.actor.as_ref(), v);
        let mut patch = TeamPatch::default();
        let paths = convert::mask_paths(r.update_mask.as_ref(), MASK_PATHS, v);
        for path in paths {
            match path.as_str() {
                "name" => {
                    v.name("name", &r.name);
                    patch.name = Some(r.name.clone());
                }
                "policy" => patch.policy = Some(policy(r.policy.as_ref(), v)),
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
        let team = self
            .teams
            .update(&acting, &r.workspace_id, &r.team_id, patch)
            .await?;
        Ok(response(&team, self.teams.now()))
    }
}
