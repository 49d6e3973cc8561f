//! Teams inside a workspace and their policy: the self-service rules (enforced by the key
//! lifecycle when a member without the admin permission creates, changes or rotates a
//! key) and the team's reach, which caps what every key of the team reaches. A change of
//! the reach appends an `updated` event for each of the team's keys, like an access
//! group change, so every replica reloads them.

use std::sync::Arc;

use crate::cache::VerifyCache;
use crate::clock::Clock;
use crate::domain::refusal::{Reason, Refusal};
use crate::domain::team::{ServiceAccount, Team, TeamPolicy};
use crate::events::EventHub;
use crate::events::invalidate_committed;
use crate::store::Acting;
use crate::store::{Store, StoreError, TeamPatch};

/// Why a team operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TeamError {
    /// Refused, with the reason that decides the status code (see `api::error`).
    #[error("{0}")]
    Refused(Refusal),
    #[error("workspace {0} does not exist")]
    WorkspaceNotFound(String),
    #[error("team {0} does not exist in this workspace")]
    TeamNotFound(String),
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for TeamError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Precondition(refusal) => TeamError::Refused(refusal),
            other => TeamError::Store(other),
        }
    }
}

pub struct Teams {
    store: Arc<dyn Store>,
    cache: Arc<VerifyCache>,
    events: Arc<EventHub>,
    clock: Clock,
}

impl Teams {
    /// The time now, by the service's clock (what answers compute periods from).
    pub fn now(&self) -> crate::domain::Micros {
        self.clock.now()
    }

    pub fn new(
        store: Arc<dyn Store>,
        cache: Arc<VerifyCache>,
        events: Arc<EventHub>,
        clock: Clock,
    ) -> Self {
        Teams {
            store,
            cache,
            events,
            clock,
        }
    }

    pub async fn create(
        &self,
        acting: &Acting,
        workspace_id: String,
        team_id: String,
        name: String,
        policy: TeamPolicy,
    ) -> Result<Team, TeamError> {
        if self.store.get_workspace(&workspace_id).await?.is_none() {
            return Err(TeamError::WorkspaceNotFound(workspace_id));
        }
        let now = self.clock.now();
        let team = Team {
            workspace_id,
            team_id,
            name,
            policy,
            rate_limits: Vec::new(),
            budget: None,
            spend: Default::default(),
            created_at: now,
            updated_at: now,
        };
        match self
            .store
            .insert_team(
                &team,
                &acting.audit("team.create", format!("team: {}", team.team_id)),
            )
            .await
        {
            Ok(()) => Ok(team),
            Err(StoreError::AlreadyExists) => Err(TeamError::Refused(
                Refusal::new(
                    Reason::TeamAlreadyExists,
                    format!(
                        "team {} exists already in workspace {}",
                        team.team_id, team.workspace_id
                    ),
                )
                .with("workspace_id", &team.workspace_id)
                .with("team_id", &team.team_id),
            )),
            Err(e) => Err(e.into()),
        }
    }

    /// The team; NOT_FOUND naming the workspace when that is what does not exist.
    pub async fn get(&self, workspace_id: &str, team_id: &str) -> Result<Team, TeamError> {
        match self.store.get_team(workspace_id, team_id).await? {
            Some(team) => Ok(team),
            None => Err(self
                .missing_workspace(workspace_id)
                .await?
                .unwrap_or_else(|| TeamError::TeamNotFound(team_id.to_owned()))),
        }
    }

    pub async fn list(&self, workspace_id: &str) -> Result<Vec<Team>, TeamError> {
        let teams = self.store.list_teams(workspace_id).await?;
        if teams.is_empty()
            && let Some(missing) = self.missing_workspace(workspace_id).await?
        {
            return Err(missing);
        }
        Ok(teams)
    }

    /// The error to answer when a read found nothing: the workspace's, if it does not
    /// exist.
    async fn missing_workspace(&self, workspace_id: &str) -> Result<Option<TeamError>, TeamError> {
        Ok((!self.store.workspace_exists(workspace_id).await?)
            .then(|| TeamError::WorkspaceNotFound(workspace_id.to_owned())))
    }

    /// Applies the patch's fields (each when given). A change of the team's pool takes
    /// effect on the next call of each team key on every replica.
    pub async fn update(
        &self,
        acting: &Acting,
        workspace_id: &str,
        team_id: &str,
        patch: TeamPatch,
    ) -> Result<Team, TeamError> {
        let mut detail = format!("team: {team_id}");
        if let Some(limits) = &patch.rate_limits {
            detail.push_str(&format!(", pool: {}", crate::workspaces::pool_text(limits)));
        }
        if let Some(budget) = &patch.budget {
            detail.push_str(&format!(
                ", budget: {}",
                crate::workspaces::budget_text(budget.as_ref())
            ));
        }
        // The store applies the patch to the team as it stands under its row lock: a read
        // here and a write of the whole team would undo a concurrent update's field.
        let written = self
            .store
            .update_team(
                workspace_id,
                team_id,
                &patch,
                self.clock.now(),
                &acting.audit("team.update", detail),
            )
            .await;
        let (team, stale) = match written {
            Err(StoreError::NotFound) => return Err(TeamError::TeamNotFound(team_id.to_owned())),
            other => other?,
        };
        invalidate_committed(&self.cache, &self.events, &stale);
        Ok(team)
    }
}

impl Teams {
    /// Deletes the team and its service accounts; refused while it has keys neither
    /// revoked nor deleted.
    pub async fn delete(
        &self,
        acting: &Acting,
        workspace_id: &str,
        team_id: &str,
    ) -> Result<(), TeamError> {
        let audit = acting.audit("team.delete", format!("team: {team_id}"));
        match self
            .store
            .delete_team(workspace_id, team_id, self.clock.now(), &audit)
            .await
        {
            Ok(()) => {
                tracing::info!(workspace_id, team_id, "team deleted");
                Ok(())
            }
            Err(StoreError::NotFound) => Err(self
                .missing_workspace(workspace_id)
                .await?
                .unwrap_or_else(|| TeamError::TeamNotFound(team_id.to_owned()))),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn create_service_account(
        &self,
        acting: &Acting,
        workspace_id: &str,
        team_id: &str,
        service_account_id: String,
        name: String,
    ) -> Result<ServiceAccount, TeamError> {
        self.get(workspace_id, team_id).await?;
        let account = ServiceAccount {
            workspace_id: workspace_id.to_owned(),
            team_id: team_id.to_owned(),
            service_account_id,
            name,
            created_at: self.clock.now(),
        };
        match self
            .store
            .insert_service_account(
                &account,
                &acting.audit("service_account.create", format!("team: {team_id}")),
            )
            .await
        {
            Ok(()) => Ok(account),
            // The team was deleted since it was read.
            Err(StoreError::NotFound) => Err(TeamError::TeamNotFound(team_id.to_owned())),
            Err(StoreError::AlreadyExists) => Err(TeamError::Refused(
                Refusal::new(
                    Reason::ServiceAccountAlreadyExists,
                    format!(
                        "service account {} exists already in workspace {workspace_id}",
                        account.service_account_id
                    ),
                )
                .with("workspace_id", workspace_id)
                .with("service_account_id", &account.service_account_id),
            )),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn list_service_accounts(
        &self,
        workspace_id: &str,
        team_id: &str,
    ) -> Result<Vec<ServiceAccount>, TeamError> {
        self.get(workspace_id, team_id).await?;
        Ok(self
            .store
            .list_service_accounts(workspace_id, team_id)
            .await?)
    }

    pub async fn delete_service_account(
        &self,
        acting: &Acting,
        workspace_id: &str,
        service_account_id: &str,
    ) -> Result<(), TeamError> {
        match self
            .store
            .delete_service_account(
                workspace_id,
                service_account_id,
                self.clock.now(),
                &acting.audit(
                    "service_account.delete",
                    format!("service_account: {service_account_id}"),
                ),
            )
            .await
        {
            Err(StoreError::NotFound) => Err(TeamError::Refused(
                Refusal::new(
                    Reason::ServiceAccountNotFound,
                    format!(
                        "service account {service_account_id} does not exist in workspace {workspace_id}"
                    ),
                )
                .with("workspace_id", workspace_id)
                .with("service_account_id", service_account_id),
            )),
            other => Ok(other?),
        }
    }
}
